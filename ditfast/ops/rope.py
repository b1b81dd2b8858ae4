"""QK-RMSNorm and rotary position embedding ops on the (B, L, H, Dh) layout.

q and k may be strided views of a packed qkv projection (for example
``qkv.view(B, L, 3, H, Dh).unbind(2)``); nothing is copied to contiguous. cos/sin tables are fp32
(L, Dh/2) or (B, L, Dh/2), from :func:`rope_freqs`; compute them once per forward and pass the same
pair to every block. Outputs have the dtype of q / k / x.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

from .. import _backend, reference
from . import _validate as v

__all__ = ["rms_norm", "rope_freqs", "apply_rope", "qk_norm_rope"]


def _check_weight(name: str, w, x: torch.Tensor) -> None:
    if w is None:
        return
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor of shape ({x.shape[-1]},), got {type(w).__name__}")
    v.float_dtype(name, w)
    if w.shape != (x.shape[-1],):
        raise ValueError(f"{name} must have shape ({x.shape[-1]},) (the last dim of the input), got {tuple(w.shape)}")
    v.same_device("the input", x, **{name: w})


def _check_rope(cos, sin, x: torch.Tensor) -> None:
    """cos/sin must be fp32 (L, Dh/2) or (B, L, Dh/2) tables for x (B, L, H, Dh)."""
    B, L, _, Dh = x.shape
    if Dh % 2:
        raise ValueError(f"RoPE needs an even head dim, got Dh = {Dh}")
    for name, t in (("cos", cos), ("sin", sin)):
        v.rope_table(name, t, B, L, Dh, x)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], *, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``(x * rsqrt(mean(x²) + eps)).to(x.dtype) * weight``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a float32/bfloat16/float16 tensor, got {type(x).__name__}")
    v.float_dtype("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dim (..., D), got shape {tuple(x.shape)}")
    _check_weight("weight", weight, x)
    v.dtensor("rms_norm", x=x, weight=weight)
    return _backend.select("rms_norm", x.device, x)(x, weight, eps=v.eps(eps))


def rope_freqs(
    ids: torch.Tensor, axes_dim: Sequence[int], *, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) tables, (L, Dh/2) for ids (L, n_axes) or (B, L, Dh/2) for ids (B, L, n_axes).

    FLUX's multi-axis layout: axis i owns ``axes_dim[i] / 2`` pairs, with frequencies restarting at
    ``theta ** 0`` for every axis.
    """
    if not isinstance(ids, torch.Tensor) or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be a real-valued tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if isinstance(axes_dim, (int, float)) or not hasattr(axes_dim, "__iter__"):
        raise TypeError(
            f"axes_dim must be a sequence of even ints, one per column of ids (FLUX: (16, 56, 56), summing to the "
            f"head dim), got {axes_dim!r}; for a single axis pass a 1-tuple, e.g. axes_dim=({axes_dim!r},)"
        )
    try:
        axes_dim = tuple(operator.index(d) for d in axes_dim)
    except TypeError:
        raise TypeError(f"every entry of axes_dim must be an int, got {tuple(axes_dim)!r}") from None
    if ids.dim() not in (2, 3) or ids.shape[-1] != len(axes_dim):
        raise ValueError(
            f"ids must have shape (L, n_axes) or (B, L, n_axes) with n_axes = len(axes_dim) = {len(axes_dim)}, "
            f"got {tuple(ids.shape)}: one row per token, one column per RoPE axis (FLUX: [0, row, col] for an "
            f"image token, zeros for a text token)"
        )
    if any(d <= 0 or d % 2 for d in axes_dim):
        raise ValueError(f"every entry of axes_dim must be a positive even number, got {axes_dim}")
    return reference.rope_freqs(ids, axes_dim, theta=theta)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = True
) -> torch.Tensor:
    """Rotate x (B, L, H, Dh): interleaved pairs (2i, 2i+1) by default, else half-split (i, i+Dh/2)."""
    v.tensor("x", x, 4, "(B, L, H, Dh)")
    _check_rope(cos, sin, x)
    v.dtensor("apply_rope", x=x, cos=cos, sin=sin)
    return _backend.select("apply_rope", x.device, x)(x, cos, sin, interleaved=bool(interleaved))


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    interleaved: bool = True,
    across_heads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_out, k_out)``: per-head RMSNorm of q and k (each with its own weight), then RoPE.

    q, k: (B, L, H, Dh), possibly strided views of one packed projection. cos/sin None: norm only.
    Both weights None: RoPE only, no norm (docs/design.md, section 3); one weight None and the other not
    is an error. Both None and no tables: q and k are returned unchanged.
    across_heads: the RMSNorm runs over all heads of a token (one rstd per token, weights of shape
    (H·Dh,): Wan's QK-norm), RoPE still per head; the rounding is the same (the normalized row rounded to
    q's dtype, times the weight, rounded, then rotated). One pass over q and k, as per head. Not on DTensors
    (norm with :func:`rms_norm` over the flattened heads, then :func:`apply_rope`, there).
    """
    v.tensor("q", q, 4, "(B, L, H, Dh)")
    v.tensor("k", k, 4, "(B, L, H, Dh)")
    v.same_shape("k", k, "q", q)
    v.same_device("q", q, k=k)
    across_heads = bool(across_heads)
    if across_heads:
        rows = q.flatten(-2)  # the weight's shape: (H·Dh,)
        _check_weight("q_weight", q_weight, rows)
        _check_weight("k_weight", k_weight, rows)
        if v.dtensor_possible() and any(isinstance(t, torch.distributed.tensor.DTensor) for t in (q, k)):
            raise NotImplementedError("qk_norm_rope(across_heads=True) does not take DTensors (a head shard "
                                      "holds part of a token's norm): use rms_norm over the flattened heads, "
                                      "then apply_rope")
    else:
        _check_weight("q_weight", q_weight, q)
        _check_weight("k_weight", k_weight, k)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given or both be None")
    if cos is not None:
        _check_rope(cos, sin, q)
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight must both be given (norm) or both be None (RoPE only)")
    dt = v.dtensor("qk_norm_rope", q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin)
    if q_weight is None:  # RoPE only
        if cos is None:
            return q, k
        return apply_rope(q, cos, sin, interleaved=interleaved), apply_rope(k, cos, sin, interleaved=interleaved)
    if across_heads:
        impl = _backend.select("qk_norm_rope", q.device, q, features=ACROSS_HEADS)
        return impl(q, k, q_weight, k_weight, cos, sin, eps=v.eps(eps), interleaved=bool(interleaved),
                    across_heads=True)
    impl = _backend.select("qk_norm_rope", q.device, q)
    out = impl(q, k, q_weight, k_weight, cos, sin, eps=v.eps(eps), interleaved=bool(interleaved))
    return v.dtensor_outputs(out) if dt else out  # (an unused output's gradient: ditfast/parallel/guard.py)


_backend.register("rms_norm", "reference", reference.rms_norm)
_backend.register("apply_rope", "reference", reference.apply_rope)
# the option of qk_norm_rope the compiled extension lacks (its automatic choice skips it then)
ACROSS_HEADS = ("across_heads",)
_backend.register("qk_norm_rope", "reference", reference.qk_norm_rope, features=ACROSS_HEADS)


# ------------------------------------------------------------------------------------------------
# The "triton" backend: torch.library custom ops around ditfast/kernels/triton/rope.py.
#
# custom_op rather than triton_op (docs/design.md, section 6: only custom_op also runs under torch.compile with the
# Triton interpreter). Each forward op returns its fp32 per-row rstd as an extra, non-differentiable
# output, which backward uses with the saved inputs; everything else is recomputed. Backward ops are
# custom ops too, so compiled graphs keep them opaque. Optional inputs that are absent come back from
# a backward op as empty (0,) tensors (custom ops cannot return None). cos/sin that require grad get
# their gradients (rarely wanted: the tables are usually constants). Triton is imported on first use.
# ------------------------------------------------------------------------------------------------
Tensor = torch.Tensor
_EMPTY = (0,)


def _kernels():
    from ..kernels import triton as kernels  # no triton import until load()

    return kernels.load("rope")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY)


def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    # An unused output may get no gradient; a stride-0 zero view costs no memory.
    if g is not None:
        return g
    if type(like) is not torch.Tensor:  # a DTensor: a zero DTensor like it, not a plain view
        return torch.zeros_like(like)
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(like.shape)


# -- rms_norm --------------------------------------------------------------------------------------
@torch.library.custom_op("ditfast::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """(y, rstd): y like x (contiguous), rstd fp32 of shape x.shape[:-1]."""
    k = _kernels()
    (x4,) = k.as_rows_4d(x)
    y, _, rstd, _ = k.norm_rope_fwd(x4, None, weight, None, None, None, eps, True, False)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ditfast::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dweight); dweight is empty when weight is None."""
    k = _kernels()
    x4, dy4 = k.as_rows_4d(x, dy)
    dx, _, dw, _, _, _ = k.norm_rope_bwd(dy4, None, x4, None, weight, None, rstd, None, None, None, False, False)
    return dx.view(x.shape), _empty(x) if dw is None else dw


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), _empty(x) if weight is None else torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_bwd(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.ditfast.rms_norm_backward.default(_zeros_if_none(dy, x), x, weight, rstd)
    return dx, (dw if weight is not None else None), None


_rms_norm_op.register_autograd(_rms_norm_bwd, setup_context=_rms_norm_setup)


def _rms_norm_triton(x: Tensor, weight: Optional[Tensor], *, eps: float = 1e-6) -> Tensor:
    return torch.ops.ditfast.rms_norm.default(x, weight, eps)[0]


# -- apply_rope ------------------------------------------------------------------------------------
@torch.library.custom_op("ditfast::apply_rope", mutates_args=())
def _apply_rope_op(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    return _kernels().norm_rope_fwd(x, None, None, None, cos, sin, 0.0, False, interleaved)[0]


@_apply_rope_op.register_fake
def _(x, cos, sin, interleaved):
    return x.new_empty(x.shape)


@torch.library.custom_op("ditfast::apply_rope_backward", mutates_args=())
def _apply_rope_backward_op(
    dy: Tensor, x: Optional[Tensor], cos: Tensor, sin: Tensor, interleaved: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dcos, dsin); x is needed (and dcos, dsin are computed) only for the tables' grads."""
    table_grad = x is not None
    dx, _, _, _, dcos, dsin = _kernels().norm_rope_bwd(
        dy, None, x if table_grad else dy, None, None, None, None, None, cos, sin, interleaved, table_grad
    )
    return dx, _empty(cos) if dcos is None else dcos, _empty(sin) if dsin is None else dsin


@_apply_rope_backward_op.register_fake
def _(dy, x, cos, sin, interleaved):
    if x is None:
        return dy.new_empty(dy.shape), _empty(cos), _empty(sin)
    return dy.new_empty(dy.shape), torch.empty_like(cos), torch.empty_like(sin)


def _apply_rope_setup(ctx, inputs, output):
    x, cos, sin, interleaved = inputs
    ctx.interleaved = interleaved
    ctx.table_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(x if ctx.table_grad else None, cos, sin)


def _apply_rope_bwd(ctx, dy):
    x, cos, sin = ctx.saved_tensors
    dx, dcos, dsin = torch.ops.ditfast.apply_rope_backward.default(dy, x, cos, sin, ctx.interleaved)
    if not ctx.table_grad:
        return dx, None, None, None
    return dx, dcos, dsin, None


_apply_rope_op.register_autograd(_apply_rope_bwd, setup_context=_apply_rope_setup)


def _apply_rope_triton(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = True) -> Tensor:
    return torch.ops.ditfast.apply_rope.default(x, cos, sin, interleaved)


# -- qk_norm_rope ----------------------------------------------------------------------------------
@torch.library.custom_op("ditfast::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: Tensor,
    k: Tensor,
    q_weight: Optional[Tensor],
    k_weight: Optional[Tensor],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    eps: float,
    interleaved: bool,
    across_heads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q_out, k_out, q_rstd, k_rstd): one launch for both q and k; rstd fp32 (B, L, H), or (B, L, 1) with
    ``across_heads`` (each token's heads are one row of the kernels: one rstd over them, RoPE per head)."""
    if not across_heads:
        return _kernels().norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps, True, interleaved)
    qo, ko, qr, kr = _kernels().norm_rope_fwd(_token_rows(q), _token_rows(k), q_weight, k_weight, cos, sin, eps,
                                              True, interleaved, _head_pairs(q, cos))
    return qo.view(q.shape), ko.view(k.shape), qr, kr


def _token_rows(t: Tensor) -> Tensor:
    """(B, L, H, Dh) -> (B, L, 1, H·Dh): each token's heads as one row (a view where the strides allow)."""
    B, L, H, Dh = t.shape
    if H == 1 or t.stride(2) == Dh * t.stride(3):
        return t.as_strided((B, L, 1, H * Dh), (t.stride(0), t.stride(1), H * Dh * t.stride(3), t.stride(3)),
                            t.storage_offset())
    return t.reshape(B, L, 1, H * Dh)


def _head_pairs(q: Tensor, cos: Optional[Tensor]) -> Optional[int]:
    return None if cos is None else q.shape[-1] // 2


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, interleaved, across_heads):
    rstd_shape = q.shape[:2] + (1,) if across_heads else q.shape[:-1]
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        q.new_empty(rstd_shape, dtype=torch.float32),
        q.new_empty(rstd_shape, dtype=torch.float32),
    )


@torch.library.custom_op("ditfast::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(
    dq_out: Tensor,
    dk_out: Tensor,
    q: Tensor,
    k: Tensor,
    q_weight: Optional[Tensor],
    k_weight: Optional[Tensor],
    q_rstd: Tensor,
    k_rstd: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    interleaved: bool,
    table_grad: bool,
    across_heads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dq_weight, dk_weight, dcos, dsin); absent weights / tables give empty tensors."""
    if across_heads:
        # q and k in two launches: a program holding one row of all heads keeps one tensor's weight and
        # weight-grad accumulators (both spill at Wan's width, tests/compile_sm90.py)
        ph = _head_pairs(q, cos)
        dq, _, dqw, _, dcq, dsq = _kernels().norm_rope_bwd(
            _token_rows(dq_out), None, _token_rows(q), None, q_weight, None, q_rstd, None, cos, sin, interleaved,
            table_grad, ph)
        dk, _, dkw, _, dck, dsk = _kernels().norm_rope_bwd(
            _token_rows(dk_out), None, _token_rows(k), None, k_weight, None, k_rstd, None, cos, sin, interleaved,
            table_grad, ph)
        dq, dk = dq.view(q.shape), dk.view(k.shape)
        dcos = None if dcq is None else dcq + dck
        dsin = None if dsq is None else dsq + dsk
    else:
        dq, dk, dqw, dkw, dcos, dsin = _kernels().norm_rope_bwd(
            dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, interleaved, table_grad
        )
    return (
        dq,
        dk,
        _empty(q) if dqw is None else dqw,
        _empty(q) if dkw is None else dkw,
        _empty(q if cos is None else cos) if dcos is None else dcos,
        _empty(q if sin is None else sin) if dsin is None else dsin,
    )


@_qk_norm_rope_backward_op.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, interleaved, table_grad, across_heads):
    tables = table_grad and cos is not None
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        _empty(q) if q_weight is None else torch.empty_like(q_weight),
        _empty(q) if k_weight is None else torch.empty_like(k_weight),
        torch.empty_like(cos) if tables else _empty(q if cos is None else cos),
        torch.empty_like(sin) if tables else _empty(q if sin is None else sin),
    )


def _qk_norm_rope_setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, _, interleaved, across_heads = inputs
    _, _, q_rstd, k_rstd = output
    ctx.mark_non_differentiable(q_rstd, k_rstd)
    ctx.interleaved = interleaved
    ctx.across_heads = across_heads
    ctx.table_grad = cos is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
    ctx.save_for_backward(q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin)


def _qk_norm_rope_bwd(ctx, dq_out, dk_out, _dq_rstd, _dk_rstd):
    q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin = ctx.saved_tensors
    dq, dk, dqw, dkw, dcos, dsin = torch.ops.ditfast.qk_norm_rope_backward.default(
        _zeros_if_none(dq_out, q), _zeros_if_none(dk_out, k), q, k, q_weight, k_weight, q_rstd, k_rstd,
        cos, sin, ctx.interleaved, ctx.table_grad, ctx.across_heads,
    )
    return (
        dq,
        dk,
        dqw if q_weight is not None else None,
        dkw if k_weight is not None else None,
        dcos if ctx.table_grad else None,
        dsin if ctx.table_grad else None,
        None,
        None,
        None,
    )


_qk_norm_rope_op.register_autograd(_qk_norm_rope_bwd, setup_context=_qk_norm_rope_setup)


def _qk_norm_rope_triton(
    q: Tensor,
    k: Tensor,
    q_weight: Optional[Tensor],
    k_weight: Optional[Tensor],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    *,
    eps: float = 1e-6,
    interleaved: bool = True,
    across_heads: bool = False,
) -> tuple[Tensor, Tensor]:
    if across_heads and cos is not None and not interleaved:
        # half-split pairs (i, i + Dh/2) are per head, not per row of all heads: the reference runs them
        return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps=eps, interleaved=False, across_heads=True)
    q_out, k_out, _, _ = torch.ops.ditfast.qk_norm_rope.default(q, k, q_weight, k_weight, cos, sin, eps, interleaved,
                                                                across_heads)
    return q_out, k_out


# == ditfast.kernels.triton.rope.MAX_D (tests check they agree): the widest row one program holds
_TRITON_MAX_ROW = 65536
_backend.register("rms_norm", "triton", _rms_norm_triton, max_width=_TRITON_MAX_ROW)
_backend.register("apply_rope", "triton", _apply_rope_triton, max_width=_TRITON_MAX_ROW)
_backend.register("qk_norm_rope", "triton", _qk_norm_rope_triton, max_width=_TRITON_MAX_ROW, features=ACROSS_HEADS)
