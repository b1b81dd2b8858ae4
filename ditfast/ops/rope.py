"""QK-RMSNorm and rotary position embedding ops on the (B, L, H, Dh) layout.

q and k may be strided views of a packed qkv projection (for example
``qkv.view(B, L, 3, H, Dh).unbind(2)``); nothing is copied to contiguous. cos/sin tables are fp32
(L, Dh/2) or (B, L, Dh/2), from :func:`rope_freqs`; compute them once per forward and pass the same
pair to every block. Outputs have the dtype of q / k / x.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _backend, reference
from . import _validate as v

__all__ = ["rms_norm", "rope_freqs", "apply_rope", "qk_norm_rope"]


def _check_weight(name: str, w, x: torch.Tensor) -> None:
    if w is None:
        return
    if not isinstance(w, torch.Tensor) or w.dtype not in v.FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor of shape ({x.shape[-1]},), got {w!r:.80}")
    if w.shape != (x.shape[-1],):
        raise ValueError(f"{name} must have shape ({x.shape[-1]},) (the last dim of the input), got {tuple(w.shape)}")
    v.same_device("the input", x, **{name: w})


def _check_rope(cos, sin, x: torch.Tensor) -> None:
    """cos/sin must be fp32 (L, Dh/2) or (B, L, Dh/2) tables for x (B, L, H, Dh)."""
    B, L, _, Dh = x.shape
    if Dh % 2:
        raise ValueError(f"RoPE needs an even head dim, got Dh = {Dh}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (from rope_freqs), got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (as rope_freqs returns), got {t.dtype}")
        ok = (t.dim() == 2 and t.shape == (L, Dh // 2)) or (t.dim() == 3 and t.shape == (B, L, Dh // 2))
        if not ok:
            raise ValueError(
                f"{name} must have shape (L, Dh/2) = ({L}, {Dh // 2}) or (B, L, Dh/2) = ({B}, {L}, {Dh // 2}), "
                f"got {tuple(t.shape)}"
            )
        v.same_device("the input", x, **{name: t})


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], *, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``(x * rsqrt(mean(x²) + eps)).to(x.dtype) * weight``."""
    if not isinstance(x, torch.Tensor) or x.dtype not in v.FLOAT_DTYPES:
        raise TypeError(f"x must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim")
    _check_weight("weight", weight, x)
    return _backend.select("rms_norm", x.device)(x, weight, eps=v.eps(eps))


def rope_freqs(
    ids: torch.Tensor, axes_dim: Sequence[int], *, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) tables, (L, Dh/2) for ids (L, n_axes) or (B, L, Dh/2) for ids (B, L, n_axes).

    FLUX's multi-axis layout: axis i owns ``axes_dim[i] / 2`` pairs, with frequencies restarting at
    ``theta ** 0`` for every axis.
    """
    if not isinstance(ids, torch.Tensor) or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be a real-valued tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    axes_dim = tuple(int(d) for d in axes_dim)
    if ids.dim() not in (2, 3) or ids.shape[-1] != len(axes_dim):
        raise ValueError(
            f"ids must have shape (L, n_axes) or (B, L, n_axes) with n_axes = len(axes_dim) = {len(axes_dim)}, "
            f"got {tuple(ids.shape)}"
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
    return _backend.select("apply_rope", x.device)(x, cos, sin, interleaved=bool(interleaved))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_out, k_out)``: per-head RMSNorm of q and k (own weights, None = no weight), then RoPE.

    q, k: (B, L, H, Dh), possibly strided views of one packed projection. cos/sin None: norm only.
    """
    v.tensor("q", q, 4, "(B, L, H, Dh)")
    v.tensor("k", k, 4, "(B, L, H, Dh)")
    v.same_shape("k", k, "q", q)
    v.same_device("q", q, k=k)
    _check_weight("q_weight", q_weight, q)
    _check_weight("k_weight", k_weight, k)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given or both be None")
    if cos is not None:
        _check_rope(cos, sin, q)
    impl = _backend.select("qk_norm_rope", q.device)
    return impl(q, k, q_weight, k_weight, cos, sin, eps=v.eps(eps), interleaved=bool(interleaved))


_backend.register("rms_norm", "reference", reference.rms_norm)
_backend.register("apply_rope", "reference", reference.apply_rope)
_backend.register("qk_norm_rope", "reference", reference.qk_norm_rope)
