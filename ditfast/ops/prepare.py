"""The attention prepare op: per-stream QK-RMSNorm + RoPE written straight into joint q, k, v buffers.

MM-DiT blocks (FLUX, SD3) attend over the joint [text; image] sequence. Instead of normalizing and
rotating each stream's q and k, then concatenating q, k and v (three q-sized copies), the blocks call

    q, k, v = ops.prepare_attention((q_txt, q_img), (k_txt, k_img), (v_txt, v_img),
                                    q_weights=(wq_txt, wq_img), k_weights=(wk_txt, wk_img),
                                    rope=(cos, sin))
    o = ops.joint_attention(q, k, v)

and split ``o`` back into per-stream views. One pass reads every input once and writes every joint
output once. The inputs may be strided views of packed projections
(``qkv.view(B, L, 3, H, Dh).unbind(2)``); nothing is copied to contiguous first.

Backends: "reference" (ditfast/reference/prepare.py), "triton" (ditfast/kernels/triton/prepare.py,
custom ops ``ditfast::prepare_attention`` and ``ditfast::prepare_attention_backward``) and "cuda"
(the compiled ``ditfast::prepare_attention_c`` ops, ditfast/ops/cuda_impl.py). The rope tables get
no gradient from the fast backends: a call whose cos/sin require grad runs the reference.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import _backend
from ..reference.prepare import prepare_attention as _reference
from . import _validate as v

__all__ = ["prepare_attention"]

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def _streams(name: str, xs) -> List[Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(
            f"{name} must be a tuple or list of per-stream (B, L_i, H, Dh) tensors, got {type(xs).__name__}"
        )
    if len(xs) == 0:
        raise ValueError(f"{name} must hold at least one stream, got an empty {type(xs).__name__}")
    return list(xs)


def _weights(name: str, ws, n: int, Dh: int, like: Tensor) -> List[Optional[Tensor]]:
    if ws is None:
        return [None] * n
    if isinstance(ws, torch.Tensor) or not isinstance(ws, (list, tuple)):
        raise TypeError(f"{name} must be None or a tuple of per-stream ({Dh},) weights or None, got {type(ws).__name__}")
    if len(ws) != n:
        raise ValueError(f"{name} must have one entry per stream ({n}), got {len(ws)}")
    out = []
    for i, w in enumerate(ws):
        if w is not None:
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a ({Dh},) tensor or None, got {type(w).__name__}")
            v.float_dtype(f"{name}[{i}]", w)
            if w.shape != (Dh,):
                raise ValueError(f"{name}[{i}] must have shape ({Dh},) (the head dim), got {tuple(w.shape)}")
            v.same_device("qs[0]", like, **{f"{name}[{i}]": w})
        out.append(w)
    return out


def _tables(rope, B: int, L_total: int, Dh: int, like: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if rope is None:
        return None, None
    if isinstance(rope, torch.Tensor) or not isinstance(rope, (list, tuple)) or len(rope) != 2:
        raise TypeError("rope must be None or a (cos, sin) pair of float32 tables (from ops.rope_freqs)")
    if Dh % 2:
        raise ValueError(f"rope needs an even head dim, got Dh = {Dh}")
    for name, t in zip(("rope[0] (cos)", "rope[1] (sin)"), rope):
        v.rope_table(name, t, B, L_total, Dh, like, seq="L_total (the joint sequence)")
    return rope[0], rope[1]


def prepare_attention(
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    vs: Sequence[Tensor],
    *,
    q_weights: Optional[Sequence[Optional[Tensor]]] = None,
    k_weights: Optional[Sequence[Optional[Tensor]]] = None,
    rope: Optional[Tuple[Tensor, Tensor]] = None,
    eps: float = 1e-6,
    interleaved: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Joint ``(q, k, v)``, contiguous (B, L_total, H, Dh) with L_total = sum of the streams' L_i.

    qs / ks / vs: per-stream (B, L_i, H, Dh) tensors (same B, H, Dh and dtype; any strides), in the
    order of the joint sequence (text first for FLUX). q_weights / k_weights: None (no norm anywhere)
    or one (Dh,) RMSNorm weight or None per stream; a stream's two weights are both given (norm, FLUX
    rounding: fp32, cast, times the weight) or both None (no norm). rope: None or fp32 (cos, sin) of
    the joint sequence, each (L_total, Dh/2) or (B, L_total, Dh/2); ``interleaved`` picks FLUX's
    (2i, 2i+1) pairs, else half-split (i, i + Dh/2). q and k are normalized then rotated; v is copied.
    """
    qs, ks, vs = _streams("qs", qs), _streams("ks", ks), _streams("vs", vs)
    n = len(qs)
    if len(ks) != n or len(vs) != n:
        raise ValueError(f"qs, ks and vs must have the same number of streams, got {n}, {len(ks)}, {len(vs)}")
    for i in range(n):
        v.tensor(f"qs[{i}]", qs[i], 4, "(B, L_i, H, Dh)")
        v.tensor(f"ks[{i}]", ks[i], 4, "(B, L_i, H, Dh)")
        v.tensor(f"vs[{i}]", vs[i], 4, "(B, L_i, H, Dh)")
    q0 = qs[0]
    B, _, H, Dh = q0.shape
    for i in range(n):
        q = qs[i]
        if q.shape[0] != B or q.shape[2:] != (H, Dh):
            raise ValueError(
                f"qs[{i}] must have shape (B, L_i, H, Dh) with the B, H, Dh of qs[0] ({B}, L_i, {H}, {Dh}), "
                f"got {tuple(q.shape)}"
            )
        v.same_shape(f"ks[{i}]", ks[i], f"qs[{i}]", q)
        v.same_shape(f"vs[{i}]", vs[i], f"qs[{i}]", q)
        for name, t in ((f"qs[{i}]", q), (f"ks[{i}]", ks[i]), (f"vs[{i}]", vs[i])):
            if t.dtype != q0.dtype:
                raise TypeError(f"{name} is {t.dtype} but qs[0] is {q0.dtype}; every q, k, v must have one dtype")
            v.same_device("qs[0]", q0, **{name: t})
    qw = _weights("q_weights", q_weights, n, Dh, q0)
    kw = _weights("k_weights", k_weights, n, Dh, q0)
    for i in range(n):
        if (qw[i] is None) != (kw[i] is None):
            raise ValueError(
                f"stream {i}: q_weights[{i}] and k_weights[{i}] must both be given (norm) or both be None (no norm)"
            )
    L_total = sum(q.shape[1] for q in qs)
    cos, sin = _tables(rope, B, L_total, Dh, q0)
    dt = False
    if v.dtensor_possible():  # (the per-stream argument names are built only then)
        dt = v.dtensor("prepare_attention", **{f"qs[{i}]": t for i, t in enumerate(qs)},
                       **{f"ks[{i}]": t for i, t in enumerate(ks)}, **{f"vs[{i}]": t for i, t in enumerate(vs)},
                       **{f"q_weights[{i}]": t for i, t in enumerate(qw)},
                       **{f"k_weights[{i}]": t for i, t in enumerate(kw)}, cos=cos, sin=sin)
    impl = _backend.select("prepare_attention", q0.device, q0)
    if dt:  # DTensors: the backend runs on the local shards (forward and backward; ditfast/parallel/local.py)
        from ..parallel import local

        return local.prepare_attention(impl, qs, ks, vs, qw, kw, cos, sin, v.eps(eps), bool(interleaved))
    return impl(
        qs, ks, vs, q_weights=qw, k_weights=kw, rope=None if cos is None else (cos, sin), eps=v.eps(eps),
        interleaved=bool(interleaved),
    )


def tables_need_grad(rope) -> bool:
    """Whether the rope tables require grad (the fast backends then run the reference)."""
    return rope is not None and torch.is_grad_enabled() and (rope[0].requires_grad or rope[1].requires_grad)


_backend.register("prepare_attention", "reference", _reference)


# ------------------------------------------------------------------------------------------------
# The "triton" backend: custom ops around ditfast/kernels/triton/prepare.py.
#
# custom_op (not triton_op: docs/design.md section 6, the interpreter under torch.compile). Weights travel as
# Tensor[] with an empty (0,) tensor for "no norm on this stream": torch.library's autograd treats a
# list that holds a None as one opaque leaf, so weights in a Tensor?[] would get no gradient. The
# forward op returns
# the fp32 rstd of the normalized rows as a fourth, non-differentiable output that the backward op
# reads. The backward op returns the grads of each stream's q and k and of its weights (empty (0,)
# tensors for a stream without norm: custom ops cannot return None); v's grads are narrow views of
# the joint grad, made in the autograd formula (a custom op may not return views of its inputs).
# ------------------------------------------------------------------------------------------------


def _kernels():
    from ..kernels import triton as kernels  # no triton import until load()

    return kernels.load("prepare")


@torch.library.custom_op("ditfast::prepare_attention", mutates_args=())
def _prepare_op(
    qs: List[Tensor],
    ks: List[Tensor],
    vs: List[Tensor],
    q_weights: List[Tensor],
    k_weights: List[Tensor],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    eps: float,
    interleaved: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v, rstd): joint outputs and the fp32 (2, B * L_total * H) rstd buffer."""
    return _kernels().prepare_fwd(qs, ks, vs, _present(q_weights), _present(k_weights), cos, sin, eps, interleaved)


def _present(ws: List[Tensor]) -> List[Optional[Tensor]]:
    """The op-level weight list (empty tensor = none) as the kernels' (None = none)."""
    return [None if w.numel() == 0 else w for w in ws]


def _as_op_weights(ws, like: Tensor) -> List[Tensor]:
    return [like.new_empty((0,)) if w is None else w for w in ws]


def _joint_shape(qs) -> Tuple[int, int, int, int]:
    B, _, H, Dh = qs[0].shape
    return B, sum(q.shape[1] for q in qs), H, Dh


@_prepare_op.register_fake
def _(qs, ks, vs, q_weights, k_weights, cos, sin, eps, interleaved):
    B, L_total, H, Dh = _joint_shape(qs)
    q0 = qs[0]
    joint = (B, L_total, H, Dh)
    return (q0.new_empty(joint), q0.new_empty(joint), q0.new_empty(joint),
            q0.new_empty((2, B * L_total * H), dtype=torch.float32))


@torch.library.custom_op("ditfast::prepare_attention_backward", mutates_args=())
def _prepare_backward_op(
    dq: Tensor,
    dk: Tensor,
    qs: List[Tensor],
    ks: List[Tensor],
    q_weights: List[Tensor],
    k_weights: List[Tensor],
    rstd: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    interleaved: bool,
) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """(dqs, dks, dq_weights, dk_weights) per stream; a stream without norm gets empty weight grads."""
    dqs, dks, dqws, dkws = _kernels().prepare_bwd(
        dq, dk, qs, ks, _present(q_weights), _present(k_weights), rstd, cos, sin, interleaved
    )
    def fill(ws):  # one empty tensor per absent weight: outputs may not alias each other
        return [qs[0].new_empty((0,)) if w is None else w for w in ws]

    return dqs, dks, fill(dqws), fill(dkws)


@_prepare_backward_op.register_fake
def _(dq, dk, qs, ks, q_weights, k_weights, rstd, cos, sin, interleaved):
    def wgrads(ws):
        return [torch.empty_like(w) for w in ws]

    return [q.new_empty(q.shape) for q in qs], [k.new_empty(k.shape) for k in ks], wgrads(q_weights), wgrads(k_weights)


def _zeros_if_none(g: Optional[Tensor], shape, like: Tensor) -> Tensor:
    # an unused output may get no gradient; a stride-0 zero view costs no memory
    if g is not None:
        return g
    if type(like) is not torch.Tensor:  # a DTensor: a real zero tensor of its kind, not a plain view
        return like.new_zeros(shape)
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(shape)


def _prepare_setup(ctx, inputs, output):
    qs, ks, vs, q_weights, k_weights, cos, sin, _, interleaved = inputs
    ctx.mark_non_differentiable(output[3])
    ctx.n = len(qs)
    ctx.lengths = [q.shape[1] for q in qs]
    ctx.interleaved = interleaved
    ctx.save_for_backward(*qs, *ks, *q_weights, *k_weights, output[3], cos, sin)


def _prepare_bwd(ctx, dq, dk, dv, _drstd):
    n = ctx.n
    saved = ctx.saved_tensors
    qs, ks = list(saved[:n]), list(saved[n : 2 * n])
    qws, kws = list(saved[2 * n : 3 * n]), list(saved[3 * n : 4 * n])
    rstd, cos, sin = saved[4 * n :]
    shape = _joint_shape(qs)
    dqs, dks, dqws, dkws = torch.ops.ditfast.prepare_attention_backward.default(
        _zeros_if_none(dq, shape, qs[0]), _zeros_if_none(dk, shape, ks[0]), qs, ks, qws, kws, rstd, cos, sin,
        ctx.interleaved,
    )
    dvs = [None] * n
    if dv is not None:
        starts = [sum(ctx.lengths[:i]) for i in range(n)]
        dvs = [dv.narrow(1, s, L) for s, L in zip(starts, ctx.lengths)]
    dqws = [None if w.numel() == 0 else g for w, g in zip(qws, dqws)]
    dkws = [None if w.numel() == 0 else g for w, g in zip(kws, dkws)]
    return list(dqs), list(dks), dvs, dqws, dkws, None, None, None, None


_prepare_op.register_autograd(_prepare_bwd, setup_context=_prepare_setup)


def _prepare_triton(qs, ks, vs, *, q_weights=None, k_weights=None, rope=None, eps=1e-6, interleaved=True):
    n = len(qs)
    if tables_need_grad(rope):
        return _reference(
            qs, ks, vs, q_weights=q_weights, k_weights=k_weights, rope=rope, eps=eps, interleaved=interleaved
        )
    cos, sin = (None, None) if rope is None else rope
    qw = _as_op_weights([None] * n if q_weights is None else q_weights, qs[0])
    kw = _as_op_weights([None] * n if k_weights is None else k_weights, qs[0])
    q, k, v_, _ = torch.ops.ditfast.prepare_attention.default(
        list(qs), list(ks), list(vs), qw, kw, cos, sin, eps, interleaved
    )
    return q, k, v_


_backend.register("prepare_attention", "triton", _prepare_triton)
