"""SD3 / SD3.5 MM-DiT joint block (Stability-AI/sd3.5 ``mmditx.py``): parameters with upstream names,
math in :mod:`ditfast.nn.functional`.

Parameter names follow the SD3.5 reference: ``context_block.*`` and ``x_block.*``, each with
``adaLN_modulation.1``, ``attn.qkv``, ``attn.proj`` (absent for a pre-only context block),
``attn.ln_q.weight`` / ``attn.ln_k.weight`` (qk_norm="rms"), ``mlp.fc1`` / ``mlp.fc2``, and
``x_block.attn2.*`` for SD3.5-medium's dual attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from .layers import Attention, Mlp, ada_ln


class DismantledBlock(nn.Module):
    """One stream of a joint block: 6-chunk adaLN (2 when pre_only, 9 with attn2), attention, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False,
                 qk_norm: Optional[str] = None, x_block_self_attn: bool = False, qkv_bias: bool = True):
        super().__init__()
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        if qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm must be None or 'rms', got {qk_norm!r}")
        self.attn = Attention(hidden_size, num_heads, qkv_bias, not pre_only, qk_norm)
        if x_block_self_attn:
            self.attn2 = Attention(hidden_size, num_heads, qkv_bias, True, qk_norm)
        if not pre_only:
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        chunks = 2 if pre_only else (9 if x_block_self_attn else 6)
        self.adaLN_modulation = ada_ln(hidden_size, chunks)


class JointBlock(nn.Module):
    """SD3 / SD3.5 MM-DiT block. forward(context (B, Lc, D), x (B, Lx, D), c (B, D)) -> (context, x).

    context is None on return when ``pre_only`` (the last block discards its context stream).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False,
                 qk_norm: Optional[str] = None, x_block_self_attn: bool = False, qkv_bias: bool = True):
        super().__init__()
        self.pre_only = pre_only
        self.context_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, pre_only, qk_norm, False, qkv_bias)
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, False, qk_norm, x_block_self_attn, qkv_bias)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        cb, xb = self.context_block, self.x_block
        c_mod = cb.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        x_mod = xb.adaLN_modulation(c).chunk(9 if xb.x_block_self_attn else 6, dim=1)
        x2 = xb.attn2.stream(None) if xb.x_block_self_attn else None
        return F.sd3_joint(context, x, c_mod, x_mod, cb.attn.stream(getattr(cb, "mlp", None)), xb.attn.stream(xb.mlp),
                           head_dim=xb.attn.head_dim, x2=x2)
