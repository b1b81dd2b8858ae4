"""GELU(tanh) backward with the bias gradient of the Linear before it, in one pass.

Used by training backwards where an MLP's first Linear is followed by GELU(tanh) (FLUX, SD3, DiT):
``ditfast.nn.functional.linears_of_one_input(..., gelu_tanh_last=True)``. It is a backward
computation itself, so it has no autograd formula of its own.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend, reference
from . import _validate as v

__all__ = ["gelu_tanh_backward"]

Tensor = torch.Tensor


def gelu_tanh_backward(dy: Tensor, pre: Tensor, *, bias_grad: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """``(dpre, dbias)`` of ``y = gelu(pre, approximate="tanh")``: ``dpre = dy · gelu'(pre)`` in dy's
    dtype, and (``bias_grad``) its sum over every leading dimension, (N,) in pre's dtype, the bias
    gradient of the Linear whose output ``pre`` is; else None.

    dy, pre: (..., N) of one shape, on one device. Math in fp32; the sum is of the unrounded dpre.
    """
    for name, t in (("dy", dy), ("pre", pre)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        v.float_dtype(name, t)
    if pre.dim() < 1:
        raise ValueError("pre must have at least one dimension (..., N), got a scalar")
    v.same_shape("dy", dy, "pre", pre)
    v.same_device("pre", pre, dy=dy)
    v.dtensor("gelu_tanh_backward", dy=dy, pre=pre)
    return _backend.select("gelu_tanh_backward", pre.device, pre)(dy, pre, bias_grad=bool(bias_grad))


_backend.register("gelu_tanh_backward", "reference", reference.gelu_tanh_backward)


# --- "triton": a torch.library custom op around ditfast.kernels.triton.gelu --------------------------
@torch.library.custom_op("ditfast::gelu_tanh_backward", mutates_args=())
def _gelu_tanh_backward_op(dy: Tensor, pre: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor]:
    """(dpre, dbias); dbias is empty without ``bias_grad``."""
    from ..kernels import triton as kernels  # no triton import until the first call

    dx, dbias = kernels.load("gelu").gelu_tanh_bwd(dy, pre, bias_grad=bias_grad)
    return dx, (pre.new_empty(0) if dbias is None else dbias)


@_gelu_tanh_backward_op.register_fake
def _(dy, pre, bias_grad):
    return dy.new_empty(pre.shape), pre.new_empty(pre.shape[-1:] if bias_grad else (0,))


def _triton(dy: Tensor, pre: Tensor, *, bias_grad: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    dx, dbias = _gelu_tanh_backward_op(dy, pre, bias_grad)
    return dx, (dbias if bias_grad else None)


_backend.register("gelu_tanh_backward", "triton", _triton)
