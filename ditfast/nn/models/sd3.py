"""SD3 / SD3.5 MM-DiT (Stability-AI/sd3.5 ``mmditx.py`` ``MMDiTX``) assembled from ditfast blocks.

Parameter names are the reference's, so the transformer part of an official checkpoint loads with
``strict=True`` (strip its ``model.diffusion_model.`` prefix): ``x_embedder.proj``, ``pos_embed``
(a saved buffer of ``pos_embed_max_size²`` positions, center-cropped to the input),
``t_embedder.mlp.{0,2}``, ``y_embedder.mlp.{0,2}``, ``context_embedder``, ``joint_blocks.i.*``
(the last one ``pre_only``; SD3.5-medium: dual attention in blocks 0-12), ``final_layer.*``.

    model = MMDiT.from_config("sd3.5-medium")
    out = model(x, t, y, context)   # x (N, 16, H, W), t (N,) in [0, 1000], y (N, 2048), context (N, L, 4096)
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..dit import FinalLayer
from ..sd3 import JointBlock
from .dit import PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify

__all__ = ["MMDiT", "VectorEmbedder", "MMDIT_CONFIGS", "mmdit_models"]


class VectorEmbedder(nn.Module):
    """``mlp = Sequential(Linear(in, D), SiLU, Linear(D, D))``: the pooled text vector embedder."""

    def __init__(self, input_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MMDiT(nn.Module):
    """Multimodal DiT of SD3 / SD3.5. Head dim 64: ``hidden_size = 64·depth``, ``num_heads = depth``
    unless given (the overrides exist for small test models)."""

    def __init__(self, depth: int = 24, *, patch_size: int = 2, in_channels: int = 16,
                 out_channels: Optional[int] = None, adm_in_channels: int = 2048, context_dim: int = 4096,
                 pos_embed_max_size: int = 192, qk_norm: Optional[str] = None,
                 x_block_self_attn_layers: Sequence[int] = (), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 hidden_size: Optional[int] = None, num_heads: Optional[int] = None, sample_size: int = 128):
        super().__init__()
        hidden_size = 64 * depth if hidden_size is None else hidden_size
        num_heads = depth if num_heads is None else num_heads
        self.depth = depth
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.pos_embed_max_size = pos_embed_max_size
        self.x_block_self_attn_layers = tuple(x_block_self_attn_layers)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = VectorEmbedder(adm_in_channels, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        # a persistent buffer, as the reference; the initial table follows diffusers' SD3 PatchEmbed
        # (positions scaled by base_size / max_size); checkpoints overwrite it
        self.register_buffer("pos_embed", torch.zeros(1, pos_embed_max_size**2, hidden_size))
        if not self.pos_embed.is_meta:
            table = sincos_pos_embed_2d(hidden_size, pos_embed_max_size, base_size=sample_size // patch_size)
            self.pos_embed.copy_(table.unsqueeze(0))
        self.joint_blocks = nn.ModuleList([
            JointBlock(hidden_size, num_heads, mlp_ratio, pre_only=(i == depth - 1), qk_norm=qk_norm,
                       x_block_self_attn=(i in self.x_block_self_attn_layers), qkv_bias=qkv_bias)
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    @classmethod
    def from_config(cls, name: str, **overrides) -> "MMDiT":
        """``MMDiT.from_config("sd3.5-large")``: a named config (``MMDIT_CONFIGS``) plus overrides."""
        if name not in MMDIT_CONFIGS:
            raise KeyError(f"unknown MM-DiT config {name!r}; known: {sorted(MMDIT_CONFIGS)}")
        return cls(**{**MMDIT_CONFIGS[name], **overrides})

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The (1, h/p · w/p, D) center crop of the ``pos_embed_max_size²`` table for an h × w latent."""
        p, m = self.patch_size, self.pos_embed_max_size
        h, w = h // p, w // p
        if h > m or w > m:
            raise ValueError(f"latent of {h}x{w} patches exceeds pos_embed_max_size {m}")
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(1, m, m, -1)[:, top:top + h, left:left + w, :]
        return table.reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, C, H, W), t (N,) timesteps (SD3 scale: sigma·1000), y (N, adm) pooled text,
        context (N, L, context_dim) -> (N, C_out, H, W)."""
        if context is None:
            raise ValueError("context (N, L, context_dim) is required: the joint blocks attend over it")
        H, W = x.shape[-2:]
        h = self.x_embedder(x) + self.cropped_pos_embed(H, W).to(x.dtype)  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        if y is not None:
            c = c + self.y_embedder(y)
        ctx = self.context_embedder(context)  # (N, L, D)
        for block in self.joint_blocks:
            ctx, h = block(ctx, h, c)  # the last block returns ctx = None
        h = self.final_layer(h, c)  # (N, T, p·p·C_out)
        p = self.patch_size
        return unpatchify(h, p, self.out_channels, H // p, W // p)


MMDIT_CONFIGS: Dict[str, dict] = {
    # SD3-medium: 24 blocks, D 1536, no QK-norm
    "sd3-medium": dict(depth=24, pos_embed_max_size=192, qk_norm=None),
    # SD3.5-medium: QK-norm, dual attention (attn2) in blocks 0-12, larger position table
    "sd3.5-medium": dict(depth=24, pos_embed_max_size=384, qk_norm="rms", x_block_self_attn_layers=tuple(range(13))),
    # SD3.5-large: 38 blocks, D 2432, QK-norm
    "sd3.5-large": dict(depth=38, pos_embed_max_size=192, qk_norm="rms"),
}
mmdit_models: Dict[str, Callable[..., MMDiT]] = {name: partial(MMDiT.from_config, name) for name in MMDIT_CONFIGS}
