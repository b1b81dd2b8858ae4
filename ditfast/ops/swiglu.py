"""SwiGLU: ``silu(gate) * up`` in one pass, forward and backward (FLUX.2 / FLUX.3's packed MLPs, Z-Image's
w1 / w3 pair)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, reference
from . import _validate as v

__all__ = ["swiglu"]

Tensor = torch.Tensor


def swiglu(x: Tensor, up: Optional[Tensor] = None, *, gate_first: bool = True) -> Tensor:
    """``silu(gate) * up``.

    With ``up`` given: ``gate = x``, both (..., H) of one shape. Without: x is (..., 2H) holding both
    halves, ``[gate | up]`` (``gate_first=True``: diffusers' FLUX.2 / FLUX.3 ``SwiGLU``) or
    ``[up | gate]``; the result is (..., H). Output in x's dtype; math in fp32 on the fast paths.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    v.float_dtype("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., H)")
    if up is None:
        if x.shape[-1] % 2:
            raise ValueError(f"x's last dim ({x.shape[-1]}) must be even: it holds the gate and up halves "
                             "(or pass up=)")
    else:
        if not isinstance(up, torch.Tensor):
            raise TypeError(f"up must be a tensor or None, got {type(up).__name__}")
        v.float_dtype("up", up)
        v.same_shape("up", up, "x", x)
        v.same_device("x", x, up=up)
        if up.dtype != x.dtype:
            raise TypeError(f"up is {up.dtype} and x {x.dtype}: swiglu takes one dtype")
    v.dtensor("swiglu", x=x, up=up)
    return _backend.select("swiglu", x.device, x)(x, up, gate_first=bool(gate_first))


_backend.register("swiglu", "reference", reference.swiglu)


# --- "triton": torch.library custom ops around ditfast.kernels.triton.swiglu -------------------------
def _kernels():
    from ..kernels import triton as kernels

    return kernels.load("swiglu")


@torch.library.custom_op("ditfast::swiglu", mutates_args=())
def _swiglu_op(x: Tensor, up: Optional[Tensor], gate_first: bool) -> Tensor:
    """silu(gate) · up (the halves of x when up is None)."""
    return _kernels().swiglu_fwd(x, up, gate_first)


@_swiglu_op.register_fake
def _(x, up, gate_first):
    shape = x.shape if up is not None else x.shape[:-1] + (x.shape[-1] // 2,)
    return x.new_empty(shape)


@torch.library.custom_op("ditfast::swiglu_backward", mutates_args=())
def _swiglu_bwd_op(dy: Tensor, x: Tensor, up: Optional[Tensor], gate_first: bool) -> tuple[Tensor, Tensor]:
    """(dx, dup); dup is empty in the packed form (dx holds both halves' gradients)."""
    dx, dup = _kernels().swiglu_bwd(dy, x, up, gate_first)
    return dx, (x.new_empty(0) if dup is None else dup)


@_swiglu_bwd_op.register_fake
def _(dy, x, up, gate_first):
    return x.new_empty(x.shape), (x.new_empty(0) if up is None else up.new_empty(up.shape))


def _setup(ctx, inputs, output):
    x, up, gate_first = inputs
    ctx.save_for_backward(x, up)
    ctx.gate_first = gate_first


def _backward(ctx, dy):
    x, up = ctx.saved_tensors
    dx, dup = _swiglu_bwd_op(dy, x, up, ctx.gate_first)
    return dx, (None if up is None else dup), None


_swiglu_op.register_autograd(_backward, setup_context=_setup)


def _triton(x: Tensor, up: Optional[Tensor] = None, *, gate_first: bool = True) -> Tensor:
    return _swiglu_op(x, up, gate_first)


_backend.register("swiglu", "triton", _triton)
