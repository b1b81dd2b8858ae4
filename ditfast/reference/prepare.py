"""Plain-PyTorch reference of the attention prepare op.

``prepare_attention`` turns each stream's q, k, v (B, L_i, H, Dh) into the joint (B, sum L_i, H, Dh)
q, k, v that one attention call reads: per stream, QK-RMSNorm (with that stream's weights, or none)
then RoPE with the rows of the joint sequence's tables that belong to the stream; v is copied. The
streams are concatenated in the order given (text first for FLUX and SD3). This is the ground truth
of the fused kernels, built from :func:`ditfast.reference.qk_norm_rope` (FLUX's rounding), so it may
use ``torch.cat``; the kernels write straight into the joint buffers instead.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .rope import qk_norm_rope

__all__ = ["prepare_attention"]


def prepare_attention(
    qs: Sequence[torch.Tensor],
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    *,
    q_weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
    k_weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
    rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    eps: float = 1e-6,
    interleaved: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint ``(q, k, v)``, each contiguous (B, sum L_i, H, Dh).

    qs / ks / vs: one (B, L_i, H, Dh) tensor per stream. q_weights / k_weights: None (no norm on any
    stream) or one (Dh,) weight or None per stream (a stream whose two weights are None gets no
    norm). rope: None or fp32 (cos, sin) tables of the joint sequence, (L_total, Dh/2) or
    (B, L_total, Dh/2); stream i uses rows [sum_{j<i} L_j, sum_{j<=i} L_j).
    """
    n = len(qs)
    q_weights = [None] * n if q_weights is None else list(q_weights)
    k_weights = [None] * n if k_weights is None else list(k_weights)
    cos, sin = (None, None) if rope is None else rope
    q_out, k_out = [], []
    start = 0
    for q, k, qw, kw in zip(qs, ks, q_weights, k_weights):
        length = q.shape[1]
        c = None if cos is None else cos.narrow(-2, start, length)
        s = None if sin is None else sin.narrow(-2, start, length)
        qi, ki = qk_norm_rope(q, k, qw, kw, c, s, eps=eps, interleaved=interleaved)
        q_out.append(qi)
        k_out.append(ki)
        start += length
    return torch.cat(q_out, 1), torch.cat(k_out, 1), torch.cat(list(vs), 1)
