"""Small building blocks shared by the DiT, SD3 and FLUX blocks, with upstream parameter names."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.param, eps=1e-6)


class QKNorm(nn.Module):
    """FLUX's ``QKNorm``: ``query_norm.scale`` and ``key_norm.scale``, each of size Dh."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNormWeight(head_dim, "scale")
        self.key_norm = RMSNormWeight(head_dim, "scale")


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3·H·Dh) packed [q; k; v] -> three strided (B, L, H, Dh) views (no copies)."""
    B, L, three_d = qkv.shape
    return qkv.view(B, L, 3, num_heads, three_d // (3 * num_heads)).unbind(2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, Dh) -> (B, L, H·Dh)."""
    return x.flatten(2)


def attend_joint(qs, ks, vs, q_weights=None, k_weights=None, rope=None) -> tuple[torch.Tensor, ...]:
    """One attention over the concatenation of several streams' tokens; outputs split back per stream.

    q/k arrive as projected (strided views, before QK-norm); ``q_weights`` / ``k_weights`` (one RMSNorm
    weight per stream, or None for no QK-norm) and ``rope`` (the joint sequence's (cos, sin)) are
    applied inside the attention: on the triton backend in the kernel's prologue, without
    materializing the concatenation.
    """
    return ops.joint_attention_streams(qs, ks, vs, q_weights=q_weights, k_weights=k_weights, rope=rope)
