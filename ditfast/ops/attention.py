"""Joint-sequence attention on the (B, L, H, Dh) layout (non-causal, scale Dh**-0.5).

* :func:`joint_attention` (q, k, v) runs one of the backends of ditfast/ops/attention_backends.py
  (flash-attention 2/3/4, PyTorch SDPA's kernels, ditfast's Triton kernel, the reference), chosen
  by ``backend=``, ``ditfast.use_backend``, ``DITFAST_ATTENTION_BACKEND`` or automatically.
* :func:`joint_attention_streams` attends several token streams (text, image) as ONE joint
  sequence, optionally with QK-RMSNorm + RoPE first. The "triton" backend does all of it in one
  kernel (prologue fused into the q / k tile loads, no concatenation, one output per stream);
  every other backend runs ``qk_norm_rope`` per stream, concatenates, attends and splits.

Layout: q, k, v may be strided views (of a packed qkv projection, say); nothing is copied unless
a backend needs it (the Triton kernel and flash-attention need a unit stride on the head dim only).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .. import _backend, reference
from . import _validate as check
from . import attention_backends as backends
from . import rope as rope_ops
from .attention_backends import backend_report, choose_backend, explain_choice

__all__ = ["joint_attention", "joint_attention_streams", "choose_backend", "backend_report", "explain_choice"]

Tensor = torch.Tensor
_ROPE_NONE, _ROPE_INTERLEAVED, _ROPE_HALF = 0, 1, 2  # the kernel's ROPE modes (kernels/triton/attention.py)
_MAX_FUSED_STREAMS = 2  # the Triton kernel's stream slots; more streams are concatenated first


# ------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------
def joint_attention(q: Tensor, k: Tensor, v: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """softmax(q kᵀ / sqrt(Dh)) v. q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh). Returns (B, Lq, H, Dh).

    backend: an attention backend name (``ditfast.ops.attention_backends.NAMES``), "auto" or None
    (see the module docstring of attention_backends for the order of precedence).
    """
    fp64_ok = backends.requested(backend)[0] in backends.FP64_BACKENDS
    check.tensor("q", q, 4, "(B, L, H, Dh)", fp64_ok=fp64_ok)
    check.tensor("k", k, 4, "(B, L, H, Dh)", fp64_ok=fp64_ok)
    check.tensor("v", v, 4, "(B, L, H, Dh)", fp64_ok=fp64_ok)
    check.same_shape("v", v, "k", k)
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must have shape (B, Lk, H, Dh) matching q {tuple(q.shape)} in B, H and Dh, got {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check.same_device("q", q, k=k, v=v)
    if k.shape[1] == 0 and q.shape[1] > 0:  # nothing to attend to: zeros, as SDPA gives (q * 0 keeps q in the graph)
        return q * 0
    name = backends.resolve(backend, backends.Spec.of(q, k, v))
    return backends.BACKENDS[name].run(q, k, v)


def joint_attention_streams(
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    vs: Sequence[Tensor],
    *,
    q_weights: Optional[Sequence[Optional[Tensor]]] = None,
    k_weights: Optional[Sequence[Optional[Tensor]]] = None,
    rope: Optional[Tuple[Tensor, Tensor]] = None,
    eps: float = 1e-6,
    interleaved: bool = True,
    backend: Optional[str] = None,
) -> Tuple[Tensor, ...]:
    """Attention over the joint sequence ``[stream 0; stream 1; ...]``, one output per stream.

    qs, ks, vs: tuples with one (B, L_i, H, Dh) tensor per stream (strided views welcome), in the
    joint order (text first for FLUX / SD3). q_weights, k_weights: None (no QK-norm) or one
    RMSNorm weight (Dh,) or None per stream -- given together; a stream's q and k weights are both
    tensors (QK-norm) or both None (no QK-norm for that stream, as ops.qk_norm_rope) -- applied per
    head before RoPE, with FLUX's rounding (ditfast.ops.rms_norm). rope: None or the fp32 (cos, sin) pair of the whole joint
    sequence, each (L_total, Dh/2) or (B, L_total, Dh/2); pairs interleaved (FLUX) or half-split.
    Returns a tuple of (B, L_i, H, Dh) outputs, in the dtype of q.
    """
    qs, ks, vs = _check_streams(qs, ks, vs)
    q_weights, k_weights = _check_weights(q_weights, k_weights, qs)
    if rope is not None:
        rope = _check_rope(rope, qs)
    eps = check.eps(eps)
    name = backends.resolve(backend, backends.Spec.of(qs[0], ks[0], vs[0]))
    # The fused kernel gives no gradient for the RoPE tables; tables that need one take the unfused
    # path (still on the Triton attention kernel).
    table_grad = rope is not None and torch.is_grad_enabled() and (rope[0].requires_grad or rope[1].requires_grad)
    # The fused kernel normalizes every stream or none: a stream without QK-norm beside one with it
    # takes the unfused path.
    some_unnormed = q_weights is not None and any(w is None for w in q_weights)
    if name == "triton" and len(qs) <= _MAX_FUSED_STREAMS and not table_grad and not some_unnormed:
        return _triton_streams(qs, ks, vs, q_weights, k_weights, rope, eps, bool(interleaved))
    return _unfused_streams(name, qs, ks, vs, q_weights, k_weights, rope, eps, bool(interleaved))


# ------------------------------------------------------------------------------------------------
# Validation of the stream arguments
# ------------------------------------------------------------------------------------------------
def _check_streams(qs, ks, vs) -> Tuple[Tuple[Tensor, ...], ...]:
    for name, seq in (("qs", qs), ("ks", ks), ("vs", vs)):
        if not isinstance(seq, (tuple, list)) or not seq:
            raise TypeError(f"{name} must be a non-empty tuple of (B, L_i, H, Dh) tensors, one per stream, got {type(seq).__name__}")
    if not len(qs) == len(ks) == len(vs):
        raise ValueError(f"qs, ks and vs must have one tensor per stream each, got {len(qs)}, {len(ks)}, {len(vs)}")
    first = check.tensor("qs[0]", qs[0], 4, "(B, L, H, Dh)")
    B, _, H, Dh = first.shape
    for i, (q, k, v) in enumerate(zip(qs, ks, vs)):
        for name, t in ((f"qs[{i}]", q), (f"ks[{i}]", k), (f"vs[{i}]", v)):
            check.tensor(name, t, 4, "(B, L, H, Dh)")
            if t.dtype != first.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but qs[0] has {first.dtype}; all streams share one dtype")
            if t.shape[0] != B or t.shape[2:] != (H, Dh) or t.shape[1] != q.shape[1]:
                raise ValueError(
                    f"{name} must have shape (B, L_{i}, H, Dh) = ({B}, {q.shape[1]}, {H}, {Dh}) "
                    f"(B, H, Dh of qs[0], L of qs[{i}]), got {tuple(t.shape)}"
                )
            check.same_device("qs[0]", first, **{name: t})
        if q.shape[1] < 1:
            raise ValueError(f"stream {i} is empty (qs[{i}] has shape {tuple(q.shape)}); every stream needs a token")
    return tuple(qs), tuple(ks), tuple(vs)


def _check_weights(q_weights, k_weights, qs):
    if q_weights is None and k_weights is None:
        return None, None
    if (q_weights is None) != (k_weights is None):
        raise ValueError("q_weights and k_weights must both be given (QK-norm) or both be None (no QK-norm)")
    n, Dh = len(qs), qs[0].shape[-1]
    out = []
    for name, ws in (("q_weights", q_weights), ("k_weights", k_weights)):
        if not isinstance(ws, (tuple, list)) or len(ws) != n:
            raise ValueError(f"{name} must be a tuple with one weight (Dh,) = ({Dh},) or None per stream ({n}), got {ws!r:.80}")
        for i, w in enumerate(ws):
            if w is None:
                continue
            if not isinstance(w, Tensor):
                raise TypeError(f"{name}[{i}] must be a float32/bfloat16/float16 tensor of shape ({Dh},), got {type(w).__name__}")
            check.float_dtype(f"{name}[{i}]", w)
            if w.shape != (Dh,):
                raise ValueError(f"{name}[{i}] must have shape (Dh,) = ({Dh},), got {tuple(w.shape)}")
            check.same_device("qs[0]", qs[0], **{f"{name}[{i}]": w})
        out.append(tuple(ws))
    for i, (wq, wk) in enumerate(zip(*out)):
        if (wq is None) != (wk is None):
            raise ValueError(f"q_weights[{i}] and k_weights[{i}] must both be tensors (QK-norm) or both be None "
                             f"(no QK-norm for stream {i}), got {type(wq).__name__} and {type(wk).__name__}")
    return out[0], out[1]


def _check_rope(rope, qs) -> Tuple[Tensor, Tensor]:
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError(f"rope must be None or a (cos, sin) pair from ditfast.ops.rope_freqs, got {type(rope).__name__}")
    cos, sin = rope
    B, _, _, Dh = qs[0].shape
    L = sum(q.shape[1] for q in qs)
    if Dh % 2:
        raise ValueError(f"RoPE needs an even head dim, got Dh = {Dh}")
    for name, t in (("rope[0] (cos)", cos), ("rope[1] (sin)", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (from rope_freqs), got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (as rope_freqs returns), got {t.dtype}")
        if not ((t.dim() == 2 and t.shape == (L, Dh // 2)) or (t.dim() == 3 and t.shape == (B, L, Dh // 2))):
            raise ValueError(
                f"{name} must cover the joint sequence: (L_total, Dh/2) = ({L}, {Dh // 2}) or "
                f"(B, L_total, Dh/2) = ({B}, {L}, {Dh // 2}), got {tuple(t.shape)}"
            )
        check.same_device("qs[0]", qs[0], **{name: t})
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return cos, sin


# ------------------------------------------------------------------------------------------------
# The unfused path: qk_norm_rope per stream, concatenate, attend, split
# ------------------------------------------------------------------------------------------------
def _unfused_streams(name, qs, ks, vs, q_weights, k_weights, rope, eps, interleaved):
    lengths = [q.shape[1] for q in qs]
    qs_, ks_ = list(qs), list(ks)
    start = 0
    for i, n in enumerate(lengths):
        cos = sin = None
        if rope is not None:
            cos, sin = rope[0][..., start : start + n, :], rope[1][..., start : start + n, :]
        if q_weights is not None:
            qs_[i], ks_[i] = rope_ops.qk_norm_rope(
                qs[i], ks[i], q_weights[i], k_weights[i], cos, sin, eps=eps, interleaved=interleaved
            )
        elif rope is not None:
            qs_[i] = rope_ops.apply_rope(qs[i], cos, sin, interleaved=interleaved)
            ks_[i] = rope_ops.apply_rope(ks[i], cos, sin, interleaved=interleaved)
        start += n
    if len(qs) == 1:
        return (backends.BACKENDS[name].run(qs_[0], ks_[0], vs[0]),)
    out = backends.BACKENDS[name].run(torch.cat(qs_, dim=1), torch.cat(ks_, dim=1), torch.cat(vs, dim=1))
    return tuple(out.split(lengths, dim=1))


# ------------------------------------------------------------------------------------------------
# The "triton" backend: torch.library custom ops around ditfast/kernels/triton/attention.py.
#
# custom_op (not triton_op, see DESIGN.md) so that torch.compile sees one opaque op per direction.
# The forward op takes up to two streams (stream 1's tensors None for one stream) and returns
# (o0, o1, lse): o1 is (B, 0, H, Dh) with one stream; lse is the fp32 base-2 logsumexp the backward
# needs (not differentiable). The backward op is a custom op too; grads of absent inputs come back
# as empty (0,) tensors (custom ops cannot return None). Triton is imported on first use.
# ------------------------------------------------------------------------------------------------
_K = None


def _kernels():
    global _K
    if _K is None:
        from ..kernels.triton import attention as kernels

        _K = kernels
    return _K


def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernel reads the head dim with unit stride; other strides are free."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("ditfast::joint_attention", mutates_args=())
def _attention_op(
    q0: Tensor, k0: Tensor, v0: Tensor,
    q1: Optional[Tensor], k1: Optional[Tensor], v1: Optional[Tensor],
    wq0: Optional[Tensor], wk0: Optional[Tensor], wq1: Optional[Tensor], wk1: Optional[Tensor],
    cos: Optional[Tensor], sin: Optional[Tensor], norm: bool, rope: int, eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(o0, o1, lse) of the joint attention over [stream 0; stream 1] (rope: 0 none, 1 interleaved,
    2 half-split; norm: QK-RMSNorm with the given weights, None = no weight)."""
    args = [_unit_last(t) for t in (q0, k0, v0, q1, k1, v1)]
    return _kernels().attention_forward(*args, wq0, wk0, wq1, wk1, cos, sin, norm, rope, eps)


@_attention_op.register_fake
def _(q0, k0, v0, q1, k1, v1, wq0, wk0, wq1, wk1, cos, sin, norm, rope, eps):
    B, Lq0, H, Dh = q0.shape
    Lq1 = 0 if q1 is None else q1.shape[1]
    return (
        q0.new_empty((B, Lq0, H, Dh)),
        q0.new_empty((B, Lq1, H, Dh)),
        q0.new_empty((B, H, Lq0 + Lq1), dtype=torch.float32),
    )


@torch.library.custom_op("ditfast::joint_attention_backward", mutates_args=())
def _attention_backward_op(
    do0: Tensor, do1: Optional[Tensor],
    q0: Tensor, k0: Tensor, v0: Tensor,
    q1: Optional[Tensor], k1: Optional[Tensor], v1: Optional[Tensor],
    o0: Tensor, o1: Optional[Tensor], lse: Tensor,
    wq0: Optional[Tensor], wk0: Optional[Tensor], wq1: Optional[Tensor], wk1: Optional[Tensor],
    cos: Optional[Tensor], sin: Optional[Tensor], norm: bool, rope: int, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq0, dk0, dv0, dq1, dk1, dv1, dwq0, dwk0, dwq1, dwk1); absent ones are empty (0,) tensors."""
    args = [_unit_last(t) for t in (do0, do1, q0, k0, v0, q1, k1, v1, o0, o1)]
    grads = _kernels().attention_backward(*args, lse, wq0, wk0, wq1, wk1, cos, sin, norm, rope, eps)
    return tuple(q0.new_empty((0,)) if g is None else g for g in grads)


@_attention_backward_op.register_fake
def _(do0, do1, q0, k0, v0, q1, k1, v1, o0, o1, lse, wq0, wk0, wq1, wk1, cos, sin, norm, rope, eps):
    def like(t):
        return q0.new_empty((0,)) if t is None else t.new_empty(t.shape)

    def weight(w):
        return q0.new_empty((0,)) if (w is None or not norm) else w.new_empty(w.shape)

    return (like(q0), like(k0), like(v0), like(q1), like(k1), like(v1), weight(wq0), weight(wk0), weight(wq1), weight(wk1))


def _attention_setup(ctx, inputs, output):
    q0, k0, v0, q1, k1, v1, wq0, wk0, wq1, wk1, cos, sin, norm, rope, eps = inputs
    o0, o1, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q0, k0, v0, q1, k1, v1, wq0, wk0, wq1, wk1, cos, sin, o0, o1, lse)
    ctx.norm, ctx.rope, ctx.eps = norm, rope, eps


def _attention_backward(ctx, do0, do1, _dlse):
    q0, k0, v0, q1, k1, v1, wq0, wk0, wq1, wk1, cos, sin, o0, o1, lse = ctx.saved_tensors
    two = q1 is not None
    do0 = torch.zeros_like(o0) if do0 is None else do0  # an unused output gets no gradient
    do1 = (torch.zeros_like(o1) if do1 is None else do1) if two else None
    grads = _attention_backward_op(
        do0, do1, q0, k0, v0, q1, k1, v1, o0, o1 if two else None, lse,
        wq0, wk0, wq1, wk1, cos, sin, ctx.norm, ctx.rope, ctx.eps,
    )
    inputs = (q0, k0, v0, q1, k1, v1, wq0, wk0, wq1, wk1)
    present = [t is not None for t in inputs]
    present[6:] = [p and ctx.norm for p in present[6:]]
    return (*(g if p else None for g, p in zip(grads, present)), None, None, None, None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def triton_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The Triton kernel on one stream, no prologue (the "triton" attention backend)."""
    out, _, _ = _attention_op(q, k, v, None, None, None, None, None, None, None, None, None, False, _ROPE_NONE, 1e-6)
    return out


def _triton_streams(qs, ks, vs, q_weights, k_weights, rope, eps, interleaved) -> Tuple[Tensor, ...]:
    """One or two streams, prologue fused, in one kernel per direction."""
    two = len(qs) == 2
    norm = q_weights is not None
    wq = tuple(q_weights) + (None,) * (2 - len(qs)) if norm else (None, None)
    wk = tuple(k_weights) + (None,) * (2 - len(qs)) if norm else (None, None)
    cos, sin = rope if rope is not None else (None, None)
    mode = _ROPE_NONE if rope is None else (_ROPE_INTERLEAVED if interleaved else _ROPE_HALF)
    s1 = (qs[1], ks[1], vs[1]) if two else (None, None, None)
    o0, o1, _ = _attention_op(qs[0], ks[0], vs[0], *s1, wq[0], wk[0], wq[1], wk[1], cos, sin, norm, mode, eps)
    return (o0, o1) if two else (o0,)


_backend.register("joint_attention", "reference", reference.joint_attention)
_backend.register("joint_attention", "triton", triton_attention)
