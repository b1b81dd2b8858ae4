"""Joint-sequence attention on the (B, L, H, Dh) layout (non-causal, scale Dh**-0.5)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, reference
from . import _validate as check

__all__ = ["joint_attention"]


def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(Dh)) v. q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh). Returns (B, Lq, H, Dh)."""
    check.tensor("q", q, 4, "(B, L, H, Dh)")
    check.tensor("k", k, 4, "(B, L, H, Dh)")
    check.tensor("v", v, 4, "(B, L, H, Dh)")
    check.same_shape("v", v, "k", k)
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must have shape (B, Lk, H, Dh) matching q {tuple(q.shape)} in B, H and Dh, got {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check.same_device("q", q, k=k, v=v)
    if backend is not None:
        with _backend.use_backend(backend):
            return _backend.select("joint_attention", q.device)(q, k, v)
    return _backend.select("joint_attention", q.device)(q, k, v)


_backend.register("joint_attention", "reference", reference.joint_attention)
