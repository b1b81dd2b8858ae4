"""Plain-PyTorch reference for joint (non-causal) attention on the (B, L, H, Dh) layout."""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["joint_attention"]


def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """softmax(q kᵀ · Dh**-0.5) v over the whole (joint) sequence; q (B, Lq, H, Dh), k, v (B, Lk, H, Dh).

    With ``return_lse`` also the log-sum-exp of the scaled scores, (B, H, Lq) in fp32 (natural log,
    flash-attn's ``softmax_lse``), computed from the explicit score matrix in fp32; its gradient is
    exact (it is an ordinary autograd graph). Without it the unpinned SDPA picks PyTorch's fastest
    kernel for the device."""
    if not return_lse:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq); -inf where there are no keys
    probs = torch.exp(scores - lse.unsqueeze(-1)) if k.shape[1] else scores
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(acc)).to(q.dtype)
    return out, lse.to(torch.float32) if acc == torch.float32 else lse
