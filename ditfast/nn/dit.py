"""DiT blocks (facebookresearch/DiT ``models.py``): parameters with upstream names, math in
:mod:`ditfast.nn.functional`.

State-dict keys match upstream: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``,
``adaLN_modulation.1`` for DiTBlock; ``linear`` and ``adaLN_modulation.1`` for FinalLayer.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from .layers import Attention, Mlp, ada_ln, check_conditioning


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning. forward(x (B, L, D), c (B, D)) -> (B, L, D)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = ada_ln(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        check_conditioning("c", c, self.adaLN_modulation[1].in_features, "DiTBlock")
        mod = self.adaLN_modulation(c).chunk(6, dim=1)
        return F.dit_block(x, mod, self.attn.stream(self.mlp), head_dim=self.attn.head_dim)


class FinalLayer(nn.Module):
    """DiT's final layer: modulate(LN(x)) then ``linear`` to p·p·C_out. forward(x, c)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = ada_ln(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        check_conditioning("c", c, self.adaLN_modulation[1].in_features, "FinalLayer")
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return F.final_layer(x, shift, scale, self.linear)
