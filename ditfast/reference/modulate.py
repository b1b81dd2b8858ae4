"""Plain-PyTorch reference for the adaLN family: LayerNorm + modulate, gated residual.

These functions are the ground truth the fast paths are tested against. They compute the way an
eager upstream block does (LayerNorm, then elementwise ops in PyTorch's type promotion), so running
them in bf16/fp16 gives the "plain PyTorch in low precision" error that the tolerance rule (docs/numerics.md)
uses as its yardstick, and running them on fp32 copies of the inputs gives the exact answer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "norm_modulate",
    "norm_modulate_dual",
    "gated_residual",
    "gated_residual_norm_modulate",
]


def _per_token(t: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, 1, D) so it broadcasts over tokens; (B, L, D) is returned as is."""
    return t.unsqueeze(1) if t.dim() == 2 else t


def _norm(x: torch.Tensor, eps: float, norm: str, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """LayerNorm (no affine) or RMSNorm of x over its last dim, times ``weight`` when given."""
    if norm == "rms":
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return h if weight is None else h * weight


def _gate(gate: torch.Tensor, gate_act: Optional[str]) -> torch.Tensor:
    return _per_token(gate.tanh() if gate_act == "tanh" else gate)


def norm_modulate(
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm: str = "layer",
    weight: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``N(x) * (1 + scale) + shift``: N is LayerNorm (``norm="layer"``, no affine parameters) or RMSNorm
    (``norm="rms"``) over the last dim, times ``weight`` (D,) when given; cast to ``out_dtype`` when given
    (Wan's ``.type_as(x)`` of an fp32 computation).

    x: (B, L, D); shift, scale: (B, D) per sample or (B, L, D) per token; shift may be None.
    """
    h = _norm(x, eps, norm, weight)
    h = h * (1 + _per_token(scale))
    if shift is not None:
        h = h + _per_token(shift)
    return h if out_dtype is None else h.to(out_dtype)


def norm_modulate_dual(
    x: torch.Tensor,
    shift1: Optional[torch.Tensor],
    scale1: torch.Tensor,
    shift2: Optional[torch.Tensor],
    scale2: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two modulations of the same ``LN(x)`` (SD3.5 dual-attention blocks)."""
    return (
        norm_modulate(x, shift1, scale1, eps=eps),
        norm_modulate(x, shift2, scale2, eps=eps),
    )


def gated_residual(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    *,
    gate_act: Optional[str] = None,
    y_weight: Optional[torch.Tensor] = None,
    y_eps: float = 1e-6,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x + act(gate) * P(y)`` (cast to ``out_dtype`` when given); gate (B, D) or (B, L, D); act is the identity or ``tanh``
    (``gate_act="tanh"``); P(y) is y, or with ``y_weight`` (D,) the post-norm ``RMSNorm(y) * y_weight``
    (eps ``y_eps``) of Z-Image's sandwich blocks."""
    if y_weight is not None:
        y = _norm(y, y_eps, "rms", y_weight)
    out = x + _gate(gate, gate_act) * y
    return out if out_dtype is None else out.to(out_dtype)


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
    """``x_new = gated_residual(x, y, gate, ...)`` and ``h = norm_modulate(x_new, shift, scale, ...)``, both
    in ``out_dtype`` when given (h is the norm of the x_new returned)."""
    x_new = gated_residual(x, y, gate, gate_act=gate_act, y_weight=y_weight, y_eps=y_eps, out_dtype=out_dtype)
    return x_new, norm_modulate(x_new, shift, scale, eps=eps, norm=norm, weight=weight, out_dtype=out_dtype)
