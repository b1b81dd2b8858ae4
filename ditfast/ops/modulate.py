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


def norm_modulate(
    x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm over D without affine parameters).

    x: (B, L, D). shift, scale: (B, D) per sample or (B, L, D) per token; shift may be None.
    """
    _check_x(x)
    scale = v.modulation("scale", scale, x)
    shift = None if shift is None else v.modulation("shift", shift, x)
    return _backend.select("norm_modulate", x.device)(x, shift, scale, eps=v.eps(eps))


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
    impl = _backend.select("norm_modulate_dual", x.device)
    return impl(x, shift1, scale1, shift2, scale2, eps=v.eps(eps))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``. x, y: (B, L, D); gate: (B, D) or (B, L, D)."""
    _check_x(x)
    _check_x(y, "y")
    v.same_shape("y", y, "x", x)
    v.same_device("x", x, y=y)
    gate = v.modulation("gate", gate, x)
    return _backend.select("gated_residual", x.device)(x, y, gate)


def gated_residual_norm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_new, h)``: ``x_new = x + gate * y`` and ``h = norm_modulate(x_new, shift, scale)``."""
    _check_x(x)
    _check_x(y, "y")
    v.same_shape("y", y, "x", x)
    v.same_device("x", x, y=y)
    gate = v.modulation("gate", gate, x)
    scale = v.modulation("scale", scale, x)
    shift = None if shift is None else v.modulation("shift", shift, x)
    impl = _backend.select("gated_residual_norm_modulate", x.device)
    return impl(x, y, gate, shift, scale, eps=v.eps(eps))


_backend.register("norm_modulate", "reference", reference.norm_modulate)
_backend.register("norm_modulate_dual", "reference", reference.norm_modulate_dual)
_backend.register("gated_residual", "reference", reference.gated_residual)
_backend.register("gated_residual_norm_modulate", "reference", reference.gated_residual_norm_modulate)
