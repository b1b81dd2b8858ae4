"""Plain-PyTorch reference for joint (non-causal) attention on the (B, L, H, Dh) layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["joint_attention"]


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ · Dh**-0.5) v over the whole (joint) sequence; q, k, v (B, L, H, Dh)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
