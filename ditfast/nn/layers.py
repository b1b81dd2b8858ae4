"""Parameter containers shared by the DiT, SD3 and FLUX blocks, with upstream parameter names (the math
is in :mod:`ditfast.nn.functional`)."""
from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear(D, hidden) -> GELU(tanh) -> Linear(hidden, D); parameters ``fc1``, ``fc2`` (timm / DiT / SD3)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


def flux_mlp(dim: int, hidden: int) -> nn.Sequential:
    """FLUX's ``Sequential(Linear, GELU(tanh), Linear)``: parameters ``0.*`` and ``2.*``."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def ada_ln(dim: int, chunks: int) -> nn.Sequential:
    """``Sequential(SiLU, Linear(dim, chunks * dim))``: the ``adaLN_modulation`` of DiT and SD3."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))


class RMSNormWeight(nn.Module):
    """Holds the learnable weight of a per-head RMSNorm under ``name`` ("scale" in FLUX, "weight" in SD3.5)."""

    def __init__(self, dim: int, name: str = "weight"):
        super().__init__()
        self._name = name
        self.register_parameter(name, nn.Parameter(torch.ones(dim)))

    @property
    def param(self) -> torch.Tensor:
        return getattr(self, self._name)


class QKNorm(nn.Module):
    """FLUX's ``QKNorm``: ``query_norm.scale`` and ``key_norm.scale``, each of size Dh."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNormWeight(head_dim, "scale")
        self.key_norm = RMSNormWeight(head_dim, "scale")
