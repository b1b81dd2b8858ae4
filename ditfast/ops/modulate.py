"""adaLN ops: LayerNorm + modulate (shift/scale), gated residual, and the fused seam of both.

Output dtype: PyTorch's promotion of the inputs' dtypes, as the eager reference gives (an fp32
residual stream modulated by bf16 shift/scale yields fp32). Math is fp32 in every backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, reference
from . import _validate as v

__all__ = ["norm_modulate", "norm_modulate_dual", "gated_residual", "gated_residual_norm_modulate"]


def _check_x(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    return v.tensor(name, x, 3, "(B, L, D)")


# The family's options (docs/design.md): each one an implementation feature, so the automatic choice
# takes only the implementations that have it (the compiled extension has none of them).
NORMS = ("layer", "rms")
GATE_ACTS = (None, "tanh")
OPTION_FEATURES = ("rms", "norm_weight", "tanh_gate", "post_norm", "out_dtype")


def _options(norm: str, weight, gate_act=None, y_weight=None, x=None, out_dtype=None) -> tuple:
    """The features the options ask for, after checking them."""
    if out_dtype is not None and out_dtype not in v.FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"out_dtype must be None or a floating dtype (float32, bfloat16, float16), got {out_dtype!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if gate_act not in GATE_ACTS:
        raise ValueError(f"gate_act must be None or 'tanh', got {gate_act!r}")
    for name, w in (("weight", weight), ("y_weight", y_weight)):
        if w is not None:
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name} must be a tensor (D,) or None, got {type(w).__name__}")
            v.float_dtype(name, w)
            if w.shape != (x.shape[-1],):
                raise ValueError(f"{name} must be a (D,) = ({x.shape[-1]},) norm weight, got shape {tuple(w.shape)}")
            v.same_device("x", x, **{name: w})
    return tuple(f for f, on in zip(OPTION_FEATURES, (norm == "rms", weight is not None, gate_act == "tanh",
                                                      y_weight is not None, out_dtype is not None)) if on)


def norm_modulate(
    x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor, *, eps: float = 1e-6,
    norm: str = "layer", weight: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``N(x) * (1 + scale) + shift``: N is LayerNorm over D without affine parameters (``norm="layer"``,
    the default) or RMSNorm (``norm="rms"``), times the norm weight ``weight`` (D,) when given. The
    result is in ``out_dtype`` when given (one rounding of the fp32 math: Wan's ``.type_as(x)``), else
    in the promotion of the inputs' dtypes.

    x: (B, L, D). shift, scale: (B, D) per sample or (B, L, D) per token; shift may be None.
    """
    _check_x(x)
    scale = v.modulation("scale", scale, x)
    shift = None if shift is None else v.modulation("shift", shift, x)
    features = _options(norm, weight, x=x, out_dtype=out_dtype)
    v.dtensor("norm_modulate", x=x, shift=shift, scale=scale, weight=weight)
    impl = _backend.select("norm_modulate", x.device, x, features)
    if not features:
        return impl(x, shift, scale, eps=v.eps(eps))
    return impl(x, shift, scale, eps=v.eps(eps), norm=norm, weight=weight, out_dtype=out_dtype)


def norm_modulate_dual(
    x: torch.Tensor,
    shift1: Optional[torch.Tensor],
    scale1: torch.Tensor,
    shift2: Optional[torch.Tensor],
    scale2: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two modulations of one LayerNorm(x): ``(LN(x)(1+scale1)+shift1, LN(x)(1+scale2)+shift2)``.

    The SD3.5 dual-attention block feeds attn and attn2 from the same norm1(x).
    """
    _check_x(x)
    scale1, scale2 = v.modulation("scale1", scale1, x), v.modulation("scale2", scale2, x)
    shift1 = None if shift1 is None else v.modulation("shift1", shift1, x)
    shift2 = None if shift2 is None else v.modulation("shift2", shift2, x)
    dt = v.dtensor("norm_modulate_dual", x=x, shift1=shift1, scale1=scale1, shift2=shift2, scale2=scale2)
    impl = _backend.select("norm_modulate_dual", x.device, x)
    out = impl(x, shift1, scale1, shift2, scale2, eps=v.eps(eps))
    return v.dtensor_outputs(out) if dt else out  # (an unused output's gradient: ditfast/parallel/guard.py)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, gate_act: Optional[str] = None,
    y_weight: Optional[torch.Tensor] = None, y_eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x + act(gate) * P(y)``. x, y: (B, L, D); gate: (B, D) or (B, L, D). act: the identity, or tanh
    (``gate_act="tanh"``); P(y): y, or with ``y_weight`` (D,) the post-norm ``RMSNorm(y) * y_weight``
    (eps ``y_eps``) of a "sandwich" block (Z-Image, Lumina 2). In ``out_dtype`` when given (Wan's fp32
    gate, result cast back to x's dtype), else the promotion of the inputs' dtypes."""
    _check_x(x)
    _check_x(y, "y")
    v.same_shape("y", y, "x", x)
    v.same_device("x", x, y=y)
    gate = v.modulation("gate", gate, x)
    features = _options("layer", None, gate_act, y_weight, x=x, out_dtype=out_dtype)
    v.dtensor("gated_residual", x=x, y=y, gate=gate, y_weight=y_weight)
    impl = _backend.select("gated_residual", x.device, x, features)
    if not features:
        return impl(x, y, gate)
    return impl(x, y, gate, gate_act=gate_act, y_weight=y_weight, y_eps=v.eps(y_eps), out_dtype=out_dtype)


def gated_residual_norm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm: str = "layer",
    weight: Optional[torch.Tensor] = None,
    gate_act: Optional[str] = None,
    y_weight: Optional[torch.Tensor] = None,
    y_eps: float = 1e-6,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_new, h)``: ``x_new = gated_residual(x, y, gate, gate_act=, y_weight=, y_eps=)`` and
    ``h = norm_modulate(x_new, shift, scale, eps=, norm=, weight=)`` in one pass; both in ``out_dtype``
    when given (h is the norm of the x_new returned)."""
    _check_x(x)
    _check_x(y, "y")
    v.same_shape("y", y, "x", x)
    v.same_device("x", x, y=y)
    gate = v.modulation("gate", gate, x)
    scale = v.modulation("scale", scale, x)
    shift = None if shift is None else v.modulation("shift", shift, x)
    features = _options(norm, weight, gate_act, y_weight, x=x, out_dtype=out_dtype)
    dt = v.dtensor("gated_residual_norm_modulate", x=x, y=y, gate=gate, shift=shift, scale=scale, weight=weight,
                   y_weight=y_weight)
    impl = _backend.select("gated_residual_norm_modulate", x.device, x, features)
    if not features:
        out = impl(x, y, gate, shift, scale, eps=v.eps(eps))
    else:
        out = impl(x, y, gate, shift, scale, eps=v.eps(eps), norm=norm, weight=weight, gate_act=gate_act,
                   y_weight=y_weight, y_eps=v.eps(y_eps), out_dtype=out_dtype)
    return v.dtensor_outputs(out) if dt else out  # (an unused output's gradient: ditfast/parallel/guard.py)


_backend.register("norm_modulate", "reference", reference.norm_modulate, features=OPTION_FEATURES)
_backend.register("norm_modulate_dual", "reference", reference.norm_modulate_dual)
_backend.register("gated_residual", "reference", reference.gated_residual, features=OPTION_FEATURES)
_backend.register("gated_residual_norm_modulate", "reference", reference.gated_residual_norm_modulate,
                  features=OPTION_FEATURES)


# -------------------------------------------------------------------------------------------------
# "triton" backend: torch.library custom ops around ditfast.kernels.triton.modulate.
#
# Each op is a custom_op (visible to torch.compile, checked by torch.library.opcheck) whose forward
# also returns the fp32 per-row mean and rstd that backward needs; the backward is a custom_op too.
# Saved for backward: x (or x_new), mean, rstd and the tensors the gradients multiply by (scale,
# gate, y); shift is never saved, only its dtype and layout. triton is imported on the first call.
# -------------------------------------------------------------------------------------------------
Tensor = torch.Tensor
_TRITON_MAX_D = 16384  # == ditfast.kernels.triton.modulate.MAX_D (tests check they agree)


def _kernels():
    from ..kernels import triton as kernels  # no triton import until load()

    return kernels.load("modulate")


def _empty_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    B, L, _ = x.shape
    return x.new_empty((B, L), dtype=torch.float32), x.new_empty((B, L), dtype=torch.float32)


def _shift_spec(shift: Optional[Tensor]) -> tuple[Optional[torch.dtype], bool, bool]:
    """What backward needs to know about shift: (dtype or None when absent, per-token layout,
    one row broadcast over the batch)."""
    return (None, False, False) if shift is None else (shift.dtype, shift.dim() == 3, shift.shape[0] == 1)


def _shift_meta(x: Tensor, dtype: Optional[torch.dtype], per_token: bool, one_row: bool) -> Optional[Tensor]:
    """A data-less stand-in for shift (its gradient's shape and dtype), or None when there is none."""
    if dtype is None:
        return None
    B, L, D = x.shape
    B = 1 if one_row else B
    return torch.empty((B, L, D) if per_token else (B, D), dtype=dtype, device="meta")


def _fake_shift_grad(x: Tensor, dtype: Optional[torch.dtype], per_token: bool, one_row: bool) -> Tensor:
    meta = _shift_meta(x, dtype, per_token, one_row)
    return x.new_empty(0) if meta is None else x.new_empty(meta.shape, dtype=dtype)


# --- norm_modulate ----------------------------------------------------------------------------------
@torch.library.custom_op("ditfast::norm_modulate", mutates_args=())
def _norm_modulate_op(x: Tensor, shift: Optional[Tensor], scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd): LN(x) * (1 + scale) + shift and the fp32 (B, L) row statistics."""
    out, _, mean, rstd = _kernels().norm_modulate_fwd(x, shift, scale, eps=eps)
    return out, mean, rstd


@_norm_modulate_op.register_fake
def _(x, shift, scale, eps):
    return (x.new_empty(x.shape, dtype=v.result_dtype(x, shift, scale)),) + _empty_stats(x)


@torch.library.custom_op("ditfast::norm_modulate_backward", mutates_args=())
def _norm_modulate_bwd_op(
    dout: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
    shift_dtype: Optional[torch.dtype], shift_per_token: bool, shift_one_row: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale); dshift is empty when there is no shift (shift_dtype None)."""
    shift = _shift_meta(x, shift_dtype, shift_per_token, shift_one_row)
    dx, dshift, dscale, _, _ = _kernels().norm_modulate_bwd(dout, None, x, mean, rstd, shift, scale)
    return dx, dshift, dscale


@_norm_modulate_bwd_op.register_fake
def _(dout, x, mean, rstd, scale, shift_dtype, shift_per_token, shift_one_row):
    shift_grad = _fake_shift_grad(x, shift_dtype, shift_per_token, shift_one_row)
    return x.new_empty(x.shape), shift_grad, scale.new_empty(scale.shape)


def _norm_modulate_setup(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_spec = _shift_spec(shift)


def _norm_modulate_backward(ctx, dout, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _norm_modulate_bwd_op(dout, x, mean, rstd, scale, *ctx.shift_spec)
    return dx, (None if ctx.shift_spec[0] is None else dshift), dscale, None


_norm_modulate_op.register_autograd(_norm_modulate_backward, setup_context=_norm_modulate_setup)


# --- norm_modulate_dual -----------------------------------------------------------------------------
@torch.library.custom_op("ditfast::norm_modulate_dual", mutates_args=())
def _norm_modulate_dual_op(
    x: Tensor, shift1: Optional[Tensor], scale1: Tensor, shift2: Optional[Tensor], scale2: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out1, out2, mean, rstd): two modulations of one LN(x), and its fp32 (B, L) statistics."""
    return _kernels().norm_modulate_fwd(x, shift1, scale1, shift2, scale2, eps=eps)


@_norm_modulate_dual_op.register_fake
def _(x, shift1, scale1, shift2, scale2, eps):
    out1 = x.new_empty(x.shape, dtype=v.result_dtype(x, shift1, scale1))
    out2 = x.new_empty(x.shape, dtype=v.result_dtype(x, shift2, scale2))
    return (out1, out2) + _empty_stats(x)


@torch.library.custom_op("ditfast::norm_modulate_dual_backward", mutates_args=())
def _norm_modulate_dual_bwd_op(
    dout1: Tensor, dout2: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale1: Tensor, scale2: Tensor,
    shift1_dtype: Optional[torch.dtype], shift1_per_token: bool, shift1_one_row: bool,
    shift2_dtype: Optional[torch.dtype], shift2_per_token: bool, shift2_one_row: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dshift1, dscale1, dshift2, dscale2); a dshift is empty when that shift is absent."""
    shift1 = _shift_meta(x, shift1_dtype, shift1_per_token, shift1_one_row)
    shift2 = _shift_meta(x, shift2_dtype, shift2_per_token, shift2_one_row)
    return _kernels().norm_modulate_bwd(dout1, dout2, x, mean, rstd, shift1, scale1, shift2, scale2)


@_norm_modulate_dual_bwd_op.register_fake
def _(dout1, dout2, x, mean, rstd, scale1, scale2, *shift_specs):
    return (
        x.new_empty(x.shape),
        _fake_shift_grad(x, *shift_specs[:3]),
        scale1.new_empty(scale1.shape),
        _fake_shift_grad(x, *shift_specs[3:]),
        scale2.new_empty(scale2.shape),
    )


def _norm_modulate_dual_setup(ctx, inputs, output):
    x, shift1, scale1, shift2, scale2, _ = inputs
    _, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale1, scale2, mean, rstd)
    ctx.shift_specs = _shift_spec(shift1) + _shift_spec(shift2)


def _norm_modulate_dual_backward(ctx, dout1, dout2, _dmean, _drstd):
    x, scale1, scale2, mean, rstd = ctx.saved_tensors
    # an unused output gets None on DTensors (ditfast/parallel/guard.py): zeros of x's kind
    dout1 = torch.zeros_like(x) if dout1 is None else dout1
    dout2 = torch.zeros_like(x) if dout2 is None else dout2
    dx, dshift1, dscale1, dshift2, dscale2 = _norm_modulate_dual_bwd_op(
        dout1, dout2, x, mean, rstd, scale1, scale2, *ctx.shift_specs
    )
    has1, has2 = ctx.shift_specs[0] is not None, ctx.shift_specs[3] is not None
    return dx, (dshift1 if has1 else None), dscale1, (dshift2 if has2 else None), dscale2, None


_norm_modulate_dual_op.register_autograd(_norm_modulate_dual_backward, setup_context=_norm_modulate_dual_setup)


# --- gated_residual ---------------------------------------------------------------------------------
@torch.library.custom_op("ditfast::gated_residual", mutates_args=())
def _gated_residual_op(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + gate * y."""
    return _kernels().gated_residual_fwd(x, y, gate)


@_gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape, dtype=v.result_dtype(x, y, gate))


@torch.library.custom_op("ditfast::gated_residual_backward", mutates_args=())
def _gated_residual_bwd_op(dout: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """(dy, dgate) of x + gate * y."""
    return _kernels().gated_residual_bwd(dout, y, gate)


@_gated_residual_bwd_op.register_fake
def _(dout, y, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gated_residual_setup(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _gated_residual_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd_op(dout, y, gate)
    return dout.to(ctx.x_dtype), dy, dgate


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


# --- gated_residual_norm_modulate -------------------------------------------------------------------
@torch.library.custom_op("ditfast::gated_residual_norm_modulate", mutates_args=())
def _gated_residual_norm_modulate_op(
    x: Tensor, y: Tensor, gate: Tensor, shift: Optional[Tensor], scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_new, h, mean, rstd): x_new = x + gate * y, h = LN(x_new) * (1 + scale) + shift, LN statistics."""
    return _kernels().gated_residual_norm_modulate_fwd(x, y, gate, shift, scale, eps=eps)


@_gated_residual_norm_modulate_op.register_fake
def _(x, y, gate, shift, scale, eps):
    x_new = x.new_empty(x.shape, dtype=v.result_dtype(x, y, gate))
    h = x.new_empty(x.shape, dtype=v.result_dtype(x_new, shift, scale))
    return (x_new, h) + _empty_stats(x)


@torch.library.custom_op("ditfast::gated_residual_norm_modulate_backward", mutates_args=())
def _gated_residual_norm_modulate_bwd_op(
    dx_new: Optional[Tensor], dh: Tensor, x_new: Tensor, mean: Tensor, rstd: Tensor,
    y: Tensor, gate: Tensor, scale: Tensor,
    x_dtype: torch.dtype, shift_dtype: Optional[torch.dtype], shift_per_token: bool, shift_one_row: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dgate, dshift, dscale); dx_new is the gradient reaching x_new from outside (None: 0)."""
    shift = _shift_meta(x_new, shift_dtype, shift_per_token, shift_one_row)
    return _kernels().gated_residual_norm_modulate_bwd(dx_new, dh, x_new, mean, rstd, y, gate, shift, scale, x_dtype)


@_gated_residual_norm_modulate_bwd_op.register_fake
def _(dx_new, dh, x_new, mean, rstd, y, gate, scale, x_dtype, *shift_spec):
    return (
        x_new.new_empty(x_new.shape, dtype=x_dtype),
        y.new_empty(y.shape),
        gate.new_empty(gate.shape),
        _fake_shift_grad(x_new, *shift_spec),
        scale.new_empty(scale.shape),
    )


def _gated_residual_norm_modulate_setup(ctx, inputs, output):
    x, y, gate, shift, scale, _ = inputs
    x_new, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x_new, mean, rstd, y, gate, scale)
    ctx.x_dtype = x.dtype
    ctx.shift_spec = _shift_spec(shift)


def _gated_residual_norm_modulate_backward(ctx, dx_new, dh, _dmean, _drstd):
    x_new, mean, rstd, y, gate, scale = ctx.saved_tensors
    if dh is None:  # h unused: only the residual path carries gradient
        dh = torch.zeros_like(x_new)
    dx, dy, dgate, dshift, dscale = _gated_residual_norm_modulate_bwd_op(
        dx_new, dh, x_new, mean, rstd, y, gate, scale, ctx.x_dtype, *ctx.shift_spec
    )
    return dx, dy, dgate, (None if ctx.shift_spec[0] is None else dshift), dscale, None


_gated_residual_norm_modulate_op.register_autograd(
    _gated_residual_norm_modulate_backward, setup_context=_gated_residual_norm_modulate_setup
)


# --- the options: RMSNorm, norm weights, tanh gates, post-norm (kernels: *_x in the kernel module) ----
def _weight_grad_fake(w: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if w is None else w.new_empty(w.shape)


@torch.library.custom_op("ditfast::norm_modulate_x", mutates_args=())
def _norm_modulate_x_op(x: Tensor, shift: Optional[Tensor], scale: Tensor, weight: Optional[Tensor], eps: float,
                        rms: bool, out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd): N(x)·w·(1 + scale) + shift; mean is 0 for RMSNorm."""
    return _kernels().norm_modulate_x_fwd(x, shift, scale, weight, eps=eps, rms=rms, out_dtype=out_dtype)


@_norm_modulate_x_op.register_fake
def _(x, shift, scale, weight, eps, rms, out_dtype):
    return (x.new_empty(x.shape, dtype=out_dtype or v.result_dtype(x, shift, scale, weight)),) + _empty_stats(x)


@torch.library.custom_op("ditfast::norm_modulate_x_backward", mutates_args=())
def _norm_modulate_x_bwd_op(
    dout: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, weight: Optional[Tensor], rms: bool,
    shift_dtype: Optional[torch.dtype], shift_per_token: bool, shift_one_row: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale, dweight); dshift / dweight are empty when there is no shift / weight."""
    shift = _shift_meta(x, shift_dtype, shift_per_token, shift_one_row)
    return _kernels().norm_modulate_x_bwd(dout, x, mean, rstd, shift, scale, weight, rms=rms)


@_norm_modulate_x_bwd_op.register_fake
def _(dout, x, mean, rstd, scale, weight, rms, *shift_spec):
    return (x.new_empty(x.shape), _fake_shift_grad(x, *shift_spec), scale.new_empty(scale.shape),
            _weight_grad_fake(weight, x))


def _norm_modulate_x_setup(ctx, inputs, output):
    x, shift, scale, weight, _, rms, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, weight, mean, rstd)
    ctx.shift_spec, ctx.rms = _shift_spec(shift), rms


def _norm_modulate_x_backward(ctx, dout, _dmean, _drstd):
    x, scale, weight, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dweight = _norm_modulate_x_bwd_op(dout, x, mean, rstd, scale, weight, ctx.rms, *ctx.shift_spec)
    return (dx, None if ctx.shift_spec[0] is None else dshift, dscale, None if weight is None else dweight,
            None, None, None)


_norm_modulate_x_op.register_autograd(_norm_modulate_x_backward, setup_context=_norm_modulate_x_setup)


@torch.library.custom_op("ditfast::gated_residual_x", mutates_args=())
def _gated_residual_x_op(x: Tensor, y: Tensor, gate: Tensor, y_weight: Optional[Tensor], y_eps: float,
                         tanh: bool, out_dtype: Optional[torch.dtype]) -> Tensor:
    """x + act(gate)·P(y)."""
    return _kernels().gated_residual_x_fwd(x, y, gate, y_weight, y_eps=y_eps, tanh=tanh, out_dtype=out_dtype)


@_gated_residual_x_op.register_fake
def _(x, y, gate, y_weight, y_eps, tanh, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or v.result_dtype(x, y, gate, y_weight))


@torch.library.custom_op("ditfast::gated_residual_x_backward", mutates_args=())
def _gated_residual_x_bwd_op(dout: Tensor, y: Tensor, gate: Tensor, y_weight: Optional[Tensor], y_eps: float,
                             tanh: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dgate, dy_weight); dy_weight is empty without a post-norm."""
    return _kernels().gated_residual_x_bwd(dout, y, gate, y_weight, y_eps=y_eps, tanh=tanh)


@_gated_residual_x_bwd_op.register_fake
def _(dout, y, gate, y_weight, y_eps, tanh):
    return y.new_empty(y.shape), gate.new_empty(gate.shape), _weight_grad_fake(y_weight, y)


def _gated_residual_x_setup(ctx, inputs, output):
    x, y, gate, y_weight, y_eps, tanh, _ = inputs
    ctx.save_for_backward(y, gate, y_weight)
    ctx.x_dtype, ctx.y_eps, ctx.tanh = x.dtype, y_eps, tanh


def _gated_residual_x_backward(ctx, dout):
    y, gate, y_weight = ctx.saved_tensors
    dy, dgate, dwy = _gated_residual_x_bwd_op(dout, y, gate, y_weight, ctx.y_eps, ctx.tanh)
    return dout.to(ctx.x_dtype), dy, dgate, None if y_weight is None else dwy, None, None, None


_gated_residual_x_op.register_autograd(_gated_residual_x_backward, setup_context=_gated_residual_x_setup)


@torch.library.custom_op("ditfast::gated_residual_norm_modulate_x", mutates_args=())
def _gated_residual_norm_modulate_x_op(
    x: Tensor, y: Tensor, gate: Tensor, shift: Optional[Tensor], scale: Tensor, weight: Optional[Tensor],
    y_weight: Optional[Tensor], eps: float, y_eps: float, rms: bool, tanh: bool, out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_new, h, mean, rstd): x_new = x + act(gate)·P(y), h = N(x_new)·w·(1 + scale) + shift."""
    return _kernels().gated_residual_norm_modulate_x_fwd(x, y, gate, shift, scale, weight, y_weight, eps=eps,
                                                         y_eps=y_eps, rms=rms, tanh=tanh, out_dtype=out_dtype)


@_gated_residual_norm_modulate_x_op.register_fake
def _(x, y, gate, shift, scale, weight, y_weight, eps, y_eps, rms, tanh, out_dtype):
    x_new = x.new_empty(x.shape, dtype=out_dtype or v.result_dtype(x, y, gate, y_weight))
    h = x.new_empty(x.shape, dtype=out_dtype or v.result_dtype(x_new, shift, scale, weight))
    return (x_new, h) + _empty_stats(x)


@torch.library.custom_op("ditfast::gated_residual_norm_modulate_x_backward", mutates_args=())
def _gated_residual_norm_modulate_x_bwd_op(
    dx_new: Optional[Tensor], dh: Tensor, x_new: Tensor, mean: Tensor, rstd: Tensor, y: Tensor, gate: Tensor,
    scale: Tensor, weight: Optional[Tensor], y_weight: Optional[Tensor], y_eps: float, rms: bool, tanh: bool,
    x_dtype: torch.dtype, shift_dtype: Optional[torch.dtype], shift_per_token: bool, shift_one_row: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dgate, dshift, dscale, dweight, dy_weight); absent tensors get empty gradients."""
    shift = _shift_meta(x_new, shift_dtype, shift_per_token, shift_one_row)
    return _kernels().gated_residual_norm_modulate_x_bwd(dx_new, dh, x_new, mean, rstd, y, gate, shift, scale, weight,
                                                         y_weight, x_dtype, y_eps=y_eps, rms=rms, tanh=tanh)


@_gated_residual_norm_modulate_x_bwd_op.register_fake
def _(dx_new, dh, x_new, mean, rstd, y, gate, scale, weight, y_weight, y_eps, rms, tanh, x_dtype, *shift_spec):
    return (x_new.new_empty(x_new.shape, dtype=x_dtype), y.new_empty(y.shape), gate.new_empty(gate.shape),
            _fake_shift_grad(x_new, *shift_spec), scale.new_empty(scale.shape), _weight_grad_fake(weight, x_new),
            _weight_grad_fake(y_weight, x_new))


def _gated_residual_norm_modulate_x_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, y_weight, _, y_eps, rms, tanh, _ = inputs
    x_new, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x_new, mean, rstd, y, gate, scale, weight, y_weight)
    ctx.x_dtype, ctx.shift_spec, ctx.options = x.dtype, _shift_spec(shift), (y_eps, rms, tanh)


def _gated_residual_norm_modulate_x_backward(ctx, dx_new, dh, _dmean, _drstd):
    x_new, mean, rstd, y, gate, scale, weight, y_weight = ctx.saved_tensors
    if dh is None:  # h unused: only the residual path carries gradient
        dh = torch.zeros_like(x_new)
    dx, dy, dgate, dshift, dscale, dw, dwy = _gated_residual_norm_modulate_x_bwd_op(
        dx_new, dh, x_new, mean, rstd, y, gate, scale, weight, y_weight, *ctx.options, ctx.x_dtype, *ctx.shift_spec
    )
    return (dx, dy, dgate, None if ctx.shift_spec[0] is None else dshift, dscale, None if weight is None else dw,
            None if y_weight is None else dwy, None, None, None, None, None)


_gated_residual_norm_modulate_x_op.register_autograd(
    _gated_residual_norm_modulate_x_backward, setup_context=_gated_residual_norm_modulate_x_setup
)


# --- backend entry points (the public signatures) ---------------------------------------------------
def _direct(*tensors: Optional[Tensor]) -> bool:
    """True for an eager call that records no autograd graph (inference): it launches the kernels
    without the custom-op dispatch, which costs more host time than the launch. Under torch.compile /
    export, when a gradient is needed, or for tensor subclasses (DTensor: its sharding rules live on the
    custom ops, ditfast/parallel/sharding.py), the custom ops run."""
    if torch.compiler.is_compiling():
        return False
    if any(t is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _triton_norm_modulate(x, shift, scale, *, eps=1e-6, norm="layer", weight=None, out_dtype=None):
    if norm != "layer" or weight is not None or out_dtype is not None:
        if _direct(x, shift, scale, weight):
            return _kernels().norm_modulate_x_fwd(x, shift, scale, weight, eps=eps, rms=norm == "rms",
                                                  out_dtype=out_dtype)[0]
        return _norm_modulate_x_op(x, shift, scale, weight, eps, norm == "rms", out_dtype)[0]
    if _direct(x, shift, scale):
        return _kernels().norm_modulate_fwd(x, shift, scale, eps=eps)[0]
    return _norm_modulate_op(x, shift, scale, eps)[0]


def _triton_norm_modulate_dual(x, shift1, scale1, shift2, scale2, *, eps=1e-6):
    if _direct(x, shift1, scale1, shift2, scale2):
        out1, out2, _, _ = _kernels().norm_modulate_fwd(x, shift1, scale1, shift2, scale2, eps=eps)
    else:
        out1, out2, _, _ = _norm_modulate_dual_op(x, shift1, scale1, shift2, scale2, eps)
    return out1, out2


def _triton_gated_residual(x, y, gate, *, gate_act=None, y_weight=None, y_eps=1e-6, out_dtype=None):
    if gate_act is not None or y_weight is not None or out_dtype is not None:
        if _direct(x, y, gate, y_weight):
            return _kernels().gated_residual_x_fwd(x, y, gate, y_weight, y_eps=y_eps, tanh=gate_act == "tanh",
                                                   out_dtype=out_dtype)
        return _gated_residual_x_op(x, y, gate, y_weight, y_eps, gate_act == "tanh", out_dtype)
    if _direct(x, y, gate):
        return _kernels().gated_residual_fwd(x, y, gate)
    return _gated_residual_op(x, y, gate)


def _triton_gated_residual_norm_modulate(x, y, gate, shift, scale, *, eps=1e-6, norm="layer", weight=None,
                                         gate_act=None, y_weight=None, y_eps=1e-6, out_dtype=None):
    if norm != "layer" or weight is not None or gate_act is not None or y_weight is not None or out_dtype is not None:
        args = (x, y, gate, shift, scale, weight, y_weight)
        opts = dict(eps=eps, y_eps=y_eps, rms=norm == "rms", tanh=gate_act == "tanh", out_dtype=out_dtype)
        if _direct(*args):
            x_new, h, _, _ = _kernels().gated_residual_norm_modulate_x_fwd(*args, **opts)
        else:
            x_new, h, _, _ = _gated_residual_norm_modulate_x_op(*args, *opts.values())
        return x_new, h
    if _direct(x, y, gate, shift, scale):
        x_new, h, _, _ = _kernels().gated_residual_norm_modulate_fwd(x, y, gate, shift, scale, eps=eps)
    else:
        x_new, h, _, _ = _gated_residual_norm_modulate_op(x, y, gate, shift, scale, eps)
    return x_new, h


_backend.register("norm_modulate", "triton", _triton_norm_modulate, max_width=_TRITON_MAX_D, features=OPTION_FEATURES)
_backend.register("norm_modulate_dual", "triton", _triton_norm_modulate_dual, max_width=_TRITON_MAX_D)
_backend.register("gated_residual", "triton", _triton_gated_residual, max_width=_TRITON_MAX_D, features=OPTION_FEATURES)
_backend.register("gated_residual_norm_modulate", "triton", _triton_gated_residual_norm_modulate, max_width=_TRITON_MAX_D,
                  features=OPTION_FEATURES)
