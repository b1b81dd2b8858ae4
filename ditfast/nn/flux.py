"""FLUX.1 blocks (black-forest-labs/flux ``modules/layers.py``): parameters with upstream names, math
in :mod:`ditfast.nn.functional`.

``rope`` is the ``(cos, sin)`` pair from ``ditfast.ops.rope_freqs(ids, axes_dim)`` for ids ordered
[txt, img] (the joint sequence). RoPE uses FLUX's interleaved pairs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from . import functional as F
from .layers import Attention, QKNorm, flux_mlp

Rope = Optional[Tuple[torch.Tensor, torch.Tensor]]


class Modulation(nn.Module):
    """``lin`` Linear(D, 3D or 6D) on SiLU(vec); chunks (shift, scale, gate)[, (shift, scale, gate)]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(nn.functional.silu(vec)).chunk(self.multiplier, dim=-1)


class DoubleStreamBlock(nn.Module):
    """FLUX double-stream block. forward(img (B, Li, D), txt (B, Lt, D), vec (B, D), rope) -> (img, txt)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = Attention(hidden_size, num_heads, qkv_bias, qk_norm="flux")
        self.img_mlp = flux_mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = Attention(hidden_size, num_heads, qkv_bias, qk_norm="flux")
        self.txt_mlp = flux_mlp(hidden_size, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: Rope):
        return F.flux_double(img, txt, self.img_mod(vec), self.txt_mod(vec), rope, self.img_attn.stream(self.img_mlp),
                             self.txt_attn.stream(self.txt_mlp), head_dim=self.img_attn.head_dim)


class SingleStreamBlock(nn.Module):
    """FLUX single-stream block (parallel attention + MLP). forward(x [txt, img] (B, L, D), vec, rope)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: Rope) -> torch.Tensor:
        # linear1's output is [q | k | v | mlp]: Stream.mlp None tells flux_single to split it
        s = F.Stream(self.linear1, self.linear2, None, self.norm.query_norm.scale, self.norm.key_norm.scale)
        return F.flux_single(x, self.modulation(vec), rope, s, head_dim=self.hidden_size // self.num_heads)


class LastLayer(nn.Module):
    """FLUX's last layer: modulate(LN(x), shift, scale) then ``linear``. forward(x, vec)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return F.final_layer(x, shift, scale, self.linear)
