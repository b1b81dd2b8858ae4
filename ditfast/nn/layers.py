"""Parameter containers shared by the DiT, SD3 and FLUX blocks, with upstream parameter names (the math
is in :mod:`ditfast.nn.functional`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F


class Mlp(nn.Module):
    """Linear(D, hidden) -> GELU(tanh) -> Linear(hidden, D); parameters ``fc1``, ``fc2`` (timm / DiT / SD3)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.linear_gelu_tanh(self.fc1, x))  # GELU fused where it can be (linear_gelu_tanh)


class FluxMlp(nn.Sequential):
    """FLUX's ``Sequential(Linear, GELU(tanh), Linear)``: parameters ``0.*`` and ``2.*``. The first Linear
    and its GELU run as :func:`ditfast.nn.functional.linear_gelu_tanh` while the GELU is an unhooked
    ``nn.GELU("tanh")`` (as the diffusers FeedForward does when patched); else as a Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self[1]
        if len(self) == 3 and type(act) is nn.GELU and act.approximate == "tanh" and F.unhooked(act):
            return self[2](F.linear_gelu_tanh(self[0], x))
        return super().forward(x)


def flux_mlp(dim: int, hidden: int) -> nn.Sequential:
    """FLUX's MLP (:class:`FluxMlp`): parameters ``0.*`` and ``2.*``."""
    return FluxMlp(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def check_conditioning(name: str, c, dim: int, block: str) -> None:
    """``c`` must be the per-sample conditioning (B, dim) of a block's adaLN; the message says how to fix it."""
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{block}: {name} must be a torch.Tensor (B, {dim}), got {type(c).__name__}")
    if c.dim() == 2 and c.shape[1] == dim:
        return
    hint = ""
    if c.dim() == 3 and c.shape[1] == 1 and c.shape[2] == dim:
        hint = f"; {block} takes one conditioning vector per sample: pass {name}.squeeze(1)"
    elif c.dim() == 1 and c.shape[0] == dim:
        hint = f"; for a single sample pass {name}.unsqueeze(0)"
    elif c.dim() >= 1 and c.shape[-1] != dim:
        hint = f"; its last dim must be the block's hidden size {dim}"
    raise ValueError(f"{block}: {name} must have shape (B, D) = (B, {dim}), got {tuple(c.shape)}{hint}")


def ada_ln(dim: int, chunks: int) -> nn.Sequential:
    """``Sequential(SiLU, Linear(dim, chunks * dim))``: the ``adaLN_modulation`` of DiT and SD3."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))


class RMSNormWeight(nn.Module):
    """Holds the learnable weight of a per-head RMSNorm under ``name`` ("scale" in FLUX, "weight" in SD3.5)."""

    def __init__(self, dim: int, name: str = "weight"):
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.ones(dim)))


class QKNorm(nn.Module):
    """FLUX's ``QKNorm``: ``query_norm.scale`` and ``key_norm.scale``, each of size Dh."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNormWeight(head_dim, "scale")
        self.key_norm = RMSNormWeight(head_dim, "scale")


class Attention(nn.Module):
    """Self-attention parameters (the math is :func:`ditfast.nn.functional.attend`): ``qkv`` Linear(D, 3D)
    and ``proj`` Linear(D, D) (absent with ``proj=False``: SD3's pre-only context), plus per-head
    QK-RMSNorm weights named as FLUX does (qk_norm="flux": ``norm.query_norm.scale`` /
    ``norm.key_norm.scale``) or as SD3.5 does (qk_norm="rms": ``ln_q.weight`` / ``ln_k.weight``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj: bool = True,
                 qk_norm: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if qk_norm not in (None, "rms", "flux"):
            raise ValueError(f"qk_norm must be None, 'rms' or 'flux', got {qk_norm!r}")
        self.num_heads, self.head_dim, self.qk_norm = num_heads, dim // num_heads, qk_norm
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qk_norm == "flux":
            self.norm = QKNorm(self.head_dim)
        if proj:
            self.proj = nn.Linear(dim, dim)
        if qk_norm == "rms":
            self.ln_q = RMSNormWeight(self.head_dim)
            self.ln_k = RMSNormWeight(self.head_dim)

    def stream(self, mlp: Optional[nn.Module] = None) -> F.Stream:
        """This attention's modules and QK-norm weights (None without QK-norm), with the stream's MLP."""
        q_norm = k_norm = None
        if self.qk_norm == "flux":
            q_norm, k_norm = self.norm.query_norm.scale, self.norm.key_norm.scale
        elif self.qk_norm == "rms":
            q_norm, k_norm = self.ln_q.weight, self.ln_k.weight
        return F.Stream(self.qkv, getattr(self, "proj", None), mlp, q_norm, k_norm)
