"""FLUX.1 blocks (black-forest-labs/flux ``modules/layers.py``) running on ditfast.ops.

``rope`` is the ``(cos, sin)`` pair from ``ditfast.ops.rope_freqs(ids, axes_dim)`` for ids ordered
[txt, img]; the blocks slice it per stream. RoPE uses FLUX's interleaved pairs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from .layers import QKNorm, attend_joint, flux_mlp, merge_heads, split_heads

Rope = Optional[Tuple[torch.Tensor, torch.Tensor]]


class Modulation(nn.Module):
    """``lin`` Linear(D, 3D or 6D) on SiLU(vec); chunks (shift, scale, gate)[, (shift, scale, gate)]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(nn.functional.silu(vec)).chunk(self.multiplier, dim=-1)


class SelfAttention(nn.Module):
    """FLUX attention parameters: ``qkv``, ``norm.query_norm.scale``, ``norm.key_norm.scale``, ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, h: torch.Tensor):
        """Project and split into heads: (q, k, v), strided (B, L, H, Dh) views, before QK-norm."""
        return split_heads(self.qkv(h), self.num_heads)


class DoubleStreamBlock(nn.Module):
    """FLUX double-stream block. forward(img (B, Li, D), txt (B, Lt, D), vec (B, D), rope) -> (img, txt)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = flux_mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = flux_mlp(hidden_size, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: Rope):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        t_q, t_k, t_v = self.txt_attn.qkv_heads(ops.norm_modulate(txt, t_shift1, t_scale1))
        i_q, i_k, i_v = self.img_attn.qkv_heads(ops.norm_modulate(img, i_shift1, i_scale1))
        # text first, as FLUX; QK-RMSNorm (each stream its own weights) and RoPE fused into attention
        t_o, i_o = attend_joint(
            (t_q, i_q), (t_k, i_k), (t_v, i_v),
            q_weights=(self.txt_attn.norm.query_norm.scale, self.img_attn.norm.query_norm.scale),
            k_weights=(self.txt_attn.norm.key_norm.scale, self.img_attn.norm.key_norm.scale),
            rope=rope,
        )

        img, h = ops.gated_residual_norm_modulate(img, self.img_attn.proj(merge_heads(i_o)), i_gate1, i_shift2, i_scale2)
        img = ops.gated_residual(img, self.img_mlp(h), i_gate2)
        txt, h = ops.gated_residual_norm_modulate(txt, self.txt_attn.proj(merge_heads(t_o)), t_gate1, t_shift2, t_scale2)
        txt = ops.gated_residual(txt, self.txt_mlp(h), t_gate2)
        return img, txt


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
        shift, scale, gate = self.modulation(vec)
        qkv, mlp_in = self.linear1(ops.norm_modulate(x, shift, scale)).split(
            [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)  # views into linear1's output row
        (attn,) = attend_joint((q,), (k,), (v,), q_weights=(self.norm.query_norm.scale,),
                               k_weights=(self.norm.key_norm.scale,), rope=rope)
        attn = merge_heads(attn)
        out = self.linear2(torch.cat((attn, nn.functional.gelu(mlp_in, approximate="tanh")), dim=-1))
        return ops.gated_residual(x, out, gate)


class LastLayer(nn.Module):
    """FLUX's last layer: modulate(LN(x), shift, scale) then ``linear``. forward(x, vec)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(ops.norm_modulate(x, shift, scale))
