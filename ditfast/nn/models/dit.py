"""DiT (facebookresearch/DiT ``models.py``) assembled from ditfast blocks, plus the embedders that
SD3's MM-DiT shares with it.

Parameter names are upstream's, so an original DiT checkpoint loads with ``strict=True``:
``x_embedder.proj`` (patchify conv), ``pos_embed`` (fixed 2-D sin-cos, a saved non-trainable
Parameter), ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``blocks.i.*``,
``final_layer.*``.

    model = DiT.from_config("DiT-XL/2")            # or dit_models["DiT-XL/2"]()
    out = model(x, t, y)                           # x (N, C, H, W), t (N,), y (N,) -> (N, C_out, H, W)
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..dit import DiTBlock, FinalLayer

__all__ = [
    "DiT",
    "dit_models",
    "DIT_CONFIGS",
    "PatchEmbed",
    "TimestepEmbedder",
    "LabelEmbedder",
    "timestep_embedding",
    "sincos_pos_embed_2d",
]


# ---------------------------------------------------------------------------------------------
# Embedders (shared with SD3's MM-DiT)
# ---------------------------------------------------------------------------------------------
def timestep_embedding(
    t: torch.Tensor, dim: int, *, max_period: float = 10000.0, time_factor: float = 1.0
) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), **cos first**: ``[cos(t·f_j), sin(t·f_j)]``,
    ``f_j = max_period ** (-j / (dim/2))``, computed in fp32 (DiT, SD3; FLUX with time_factor=1000).

    Odd ``dim`` gets one zero column. A floating ``t`` gives the output in t's dtype.
    """
    if t.dim() != 1:
        raise ValueError(f"timesteps must be 1-D (N,), got shape {tuple(t.shape)}")
    t = t * time_factor if time_factor != 1.0 else t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    if dim % 2:
        emb = torch.cat((emb, torch.zeros_like(emb[:, :1])), dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


class TimestepEmbedder(nn.Module):
    """``mlp = Sequential(Linear(256, D), SiLU, Linear(D, D))`` on the sinusoidal embedding of t."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """``embedding_table`` with one extra row (index ``num_classes``) for the CFG "null" label when
    ``dropout_prob > 0``; in training, labels are replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Patchify: ``proj`` Conv2d(C, D, kernel = stride = p), then (N, D, H/p, W/p) -> (N, H/p·W/p, D)
    with tokens in row-major order (timm's ``PatchEmbed`` without norm)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.dim() != 4 or x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"x must be (N, C, H, W) with H and W multiples of the patch size {p}, "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_2d(dim: int, grid: int, *, base_size: Optional[float] = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position table of DiT / SD3: (grid·grid, dim), fp32, row-major tokens.

    Token (row h, col w) gets ``[sin(w·ω), cos(w·ω), sin(h·ω), cos(h·ω)]``, ``ω_j = 10000 ** (-j / (dim/4))``
    for j < dim/4 (the first half encodes the column, as DiT's ``meshgrid(grid_w, grid_h)``).
    ``base_size`` scales positions by ``base_size / grid`` (diffusers' SD3 ``PatchEmbed``; only the
    initial value, checkpoints carry the table); None: integer positions (DiT).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    pos = torch.arange(grid, dtype=torch.float32)
    if base_size is not None:
        pos = pos / (grid / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    angles = pos.double()[:, None] * omega[None]
    axis = torch.cat((angles.sin(), angles.cos()), dim=1).float()  # (grid, dim/2), one per position
    # token (h, w) = [axis[w], axis[h]]: one axis table broadcast, not grid² rows of fp64 trig
    cols, rows = axis[None].expand(grid, grid, -1), axis[:, None].expand(grid, grid, -1)
    return torch.cat((cols, rows), dim=-1).reshape(grid * grid, dim)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """(N, h·w, p·p·c) tokens -> (N, c, h·p, w·p) image; each token's features ordered (p, q, c)."""
    n = x.shape[0]
    x = x.reshape(n, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, h * p, w * p)


# ---------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero blocks (class-conditional, facebookresearch/DiT)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_heads = num_heads
        self.grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # fixed sin-cos table, saved in the state dict (upstream: a Parameter with requires_grad=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_config(cls, name: str, **overrides) -> "DiT":
        """``DiT.from_config("DiT-XL/2", input_size=64)``: a named config (``DIT_CONFIGS``) plus overrides."""
        if name not in DIT_CONFIGS:
            raise KeyError(f"unknown DiT config {name!r}; known: {sorted(DIT_CONFIGS)}")
        return cls(**{**DIT_CONFIGS[name], **overrides})

    def initialize_weights(self) -> None:
        """DiT's initialization: xavier-uniform Linears with zero bias, N(0, 0.02) embedders, the
        patch conv as a Linear, zeroed adaLN modulations and final projection, sin-cos ``pos_embed``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if not self.pos_embed.is_meta:
            table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid)
            self.pos_embed.data.copy_(table.unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C_out) -> (N, C_out, H, W) for a square grid of T tokens."""
        h = w = int(round(x.shape[1] ** 0.5))
        if h * w != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens do not form a square grid")
        return unpatchify(x, self.patch_size, self.out_channels, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) diffusion steps, y (N,) class labels -> (N, C_out, H, W)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"x must be (N, {self.in_channels}, {self.input_size}, {self.input_size}) "
                             f"(the fixed pos_embed grid), got {tuple(x.shape)}")
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))  # (N, C_out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_channels: Optional[int] = 3) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half holds the null labels (``num_classes``).

        Only the first half of ``x`` is used (duplicated). Guidance is applied to the first
        ``cfg_channels`` output channels; upstream DiT uses 3 "for exact reproducibility" (its default,
        kept here); ``None`` guides all ``in_channels`` eps channels, the standard formulation.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat((half, half), dim=0), t, y)
        n = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = out[:, :n], out[:, n:]
        cond, uncond = eps.split(len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat((torch.cat((guided, guided), dim=0), rest), dim=1)


# (depth, hidden size, heads) per model size; patch sizes 2 / 4 / 8 (upstream's DiT_models table)
_DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DIT_CONFIGS: Dict[str, dict] = {
    f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
    for size, (d, h, n) in _DIT_SIZES.items()
    for p in (2, 4, 8)
}
dit_models: Dict[str, Callable[..., DiT]] = {name: partial(DiT.from_config, name) for name in DIT_CONFIGS}
