"""Plain-PyTorch reference for QK-RMSNorm and rotary position embedding (RoPE).

Conventions (docs/upstream.md): RMSNorm over the head dim with eps 1e-6, computed in fp32, cast to the
input dtype, then multiplied by the weight (FLUX's rounding). RoPE angles from multi-axis position
ids with frequencies restarting on every axis (FLUX's layout); the rotation is computed in fp32 and
cast back. Two pair layouts: interleaved (2i, 2i+1) (FLUX, the default) and half-split (i, i + Dh/2)
(GPT-NeoX's "rotate_half").
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["rms_norm", "rope_freqs", "apply_rope", "qk_norm_rope"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], *, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dim; output in x's dtype."""
    xf = _wide(x)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        y = y * weight.to(x.dtype)
    return y


def rope_freqs(
    ids: torch.Tensor, axes_dim: Sequence[int], *, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for multi-axis position ids.

    ids: (L, n_axes) or (B, L, n_axes), any numeric dtype. axes_dim: the even width of each axis'
    share of the head dim (sum = Dh). Returns fp32 (cos, sin), each (L, Dh/2) or (B, L, Dh/2); the
    pair index runs over axis 0's pairs, then axis 1's, ...; each axis has its own frequencies
    ``theta ** (-2j / d_i)``.
    """
    # fp64 for the angles where the device has it (diffusers does the same), then fp32 tables.
    wide = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for i, d in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, d, 2, dtype=wide, device=ids.device) / d)  # (d/2,)
        angles.append(ids[..., i].to(wide).unsqueeze(-1) * omega)  # (..., L, d/2)
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def _rope_table(t: torch.Tensor) -> torch.Tensor:
    """(L, Dh/2) or (B, L, Dh/2) -> broadcastable against (B, L, H, Dh/2)."""
    return t.unsqueeze(-2)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = True
) -> torch.Tensor:
    """Rotate the pairs of x (B, L, H, Dh) by the angles whose cos/sin are given, in fp32."""
    xf = _wide(x)
    c, s = _rope_table(cos.to(xf.dtype)), _rope_table(sin.to(xf.dtype))
    if interleaved:
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x0, x1 = xf[..., :half], xf[..., half:]
        out = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)
    return out.to(x.dtype)


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
    """RMSNorm of each head of q and k (with its own weight), then RoPE.

    cos/sin None: norm only. Both weights None: RoPE only (no norm), as docs/design.md (section 3) says.
    across_heads: the norm runs over all heads of a token (weights (H·Dh,), Wan's QK-norm), RoPE per head.
    """
    if across_heads and (q_weight is not None or k_weight is not None):
        q = rms_norm(q.flatten(-2), q_weight, eps=eps).unflatten(-1, q.shape[-2:])
        k = rms_norm(k.flatten(-2), k_weight, eps=eps).unflatten(-1, k.shape[-2:])
    elif q_weight is not None or k_weight is not None:
        q, k = rms_norm(q, q_weight, eps=eps), rms_norm(k, k_weight, eps=eps)
    if cos is not None:
        q = apply_rope(q, cos, sin, interleaved=interleaved)
        k = apply_rope(k, cos, sin, interleaved=interleaved)
    return q, k
