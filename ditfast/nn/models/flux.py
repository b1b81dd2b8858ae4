"""FLUX.1 (black-forest-labs/flux ``model.py``) assembled from ditfast blocks.

Parameter names are upstream's, so a FLUX.1 [dev] / [schnell] checkpoint loads with ``strict=True``:
``img_in``, ``time_in.{in,out}_layer``, ``vector_in.*``, ``guidance_in.*`` (dev only), ``txt_in``,
``double_blocks.i.*``, ``single_blocks.i.*``, ``final_layer.*``.

The RoPE tables are computed once per forward with ``ditfast.ops.rope_freqs`` from the position ids
ordered [txt, img], and the same (cos, sin) pair is passed to every block.

    model = Flux.from_config("flux-dev")
    out = model(img, img_ids, txt, txt_ids, timesteps, y, guidance)   # (N, L_img, 64)
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ... import ops
from ..flux import DoubleStreamBlock, LastLayer, SingleStreamBlock
from .dit import timestep_embedding

__all__ = ["Flux", "MLPEmbedder", "FLUX_CONFIGS", "flux_models"]


class MLPEmbedder(nn.Module):
    """FLUX's ``in_layer`` -> SiLU -> ``out_layer``."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(nn.functional.silu(self.in_layer(x)))


class Flux(nn.Module):
    """Flow-matching transformer on packed latent sequences (FLUX.1)."""

    def __init__(self, *, in_channels: int = 64, out_channels: Optional[int] = None, vec_in_dim: int = 768,
                 context_in_dim: int = 4096, hidden_size: int = 3072, mlp_ratio: float = 4.0, num_heads: int = 24,
                 depth: int = 19, depth_single_blocks: int = 38, axes_dim: Sequence[int] = (16, 56, 56),
                 theta: float = 10000.0, qkv_bias: bool = True, guidance_embed: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if sum(axes_dim) != hidden_size // num_heads:
            raise ValueError(f"sum(axes_dim) = {sum(axes_dim)} must equal the head dim {hidden_size // num_heads}")
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.axes_dim = tuple(int(d) for d in axes_dim)
        self.theta = float(theta)
        self.guidance_embed = guidance_embed

        self.img_in = nn.Linear(in_channels, hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(256, hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)]
        )
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels)

    @classmethod
    def from_config(cls, name: str, **overrides) -> "Flux":
        """``Flux.from_config("flux-schnell")``: a named config (``FLUX_CONFIGS``) plus overrides."""
        if name not in FLUX_CONFIGS:
            raise KeyError(f"unknown FLUX config {name!r}; known: {sorted(FLUX_CONFIGS)}")
        return cls(**{**FLUX_CONFIGS[name], **overrides})

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor):
        """(cos, sin) for ids [txt, img]: each (L, Dh/2) for 2-D ids, (N, L, Dh/2) for batched ids."""
        if txt_ids.dim() != img_ids.dim():
            raise ValueError(f"txt_ids and img_ids must both be (L, 3) or both (N, L, 3), got "
                             f"{tuple(txt_ids.shape)} and {tuple(img_ids.shape)}")
        ids = torch.cat((txt_ids, img_ids), dim=-2)
        return ops.rope_freqs(ids, self.axes_dim, theta=self.theta)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """img (N, Li, C) packed latents, txt (N, Lt, context_in_dim), ids (Li, 3) / (Lt, 3) or batched
        (N, L, 3), timesteps and guidance (N,) in [0, 1] (scaled by 1000 inside), y (N, vec_in_dim)
        pooled text -> (N, Li, C_out)."""
        if img.dim() != 3 or txt.dim() != 3:
            raise ValueError(f"img and txt must be (N, L, C), got {tuple(img.shape)} and {tuple(txt.shape)}")
        x = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256, time_factor=1000.0).to(x.dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (dev): pass guidance (N,)")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256, time_factor=1000.0).to(x.dtype))
        vec = vec + self.vector_in(y)
        t = self.txt_in(txt)
        rope = self.rope(txt_ids, img_ids)  # once per forward, shared by all blocks

        for block in self.double_blocks:
            x, t = block(x, t, vec, rope)
        n_txt = t.shape[1]
        x = torch.cat((t, x), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, rope)
        return self.final_layer(x[:, n_txt:], vec)  # (N, Li, C_out)


_FLUX_COMMON = dict(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                    num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10000.0,
                    qkv_bias=True)
FLUX_CONFIGS: Dict[str, dict] = {
    "flux-dev": dict(_FLUX_COMMON, guidance_embed=True),
    "flux-schnell": dict(_FLUX_COMMON, guidance_embed=False),
}
flux_models: Dict[str, Callable[..., Flux]] = {name: partial(Flux.from_config, name) for name in FLUX_CONFIGS}
