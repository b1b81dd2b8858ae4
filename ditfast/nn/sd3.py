"""SD3 / SD3.5 MM-DiT joint block (Stability-AI/sd3.5 ``mmditx.py``) running on ditfast.ops.

Parameter names follow the SD3.5 reference: ``context_block.*`` and ``x_block.*``, each with
``adaLN_modulation.1``, ``attn.qkv``, ``attn.proj`` (absent for a pre-only context block),
``attn.ln_q.weight`` / ``attn.ln_k.weight`` (qk_norm="rms"), ``mlp.fc1`` / ``mlp.fc2``, and
``x_block.attn2.*`` for SD3.5-medium's dual attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from .layers import Mlp, RMSNormWeight, ada_ln, attend_joint, merge_heads, split_heads


class JointAttention(nn.Module):
    """SD3.5 ``SelfAttention`` parameters: ``qkv``, ``proj`` (unless pre_only), ``ln_q`` / ``ln_k``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, pre_only: bool = False,
                 qk_norm: Optional[str] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if qk_norm not in (None, "rms"):
            raise ValueError(f"qk_norm must be None or 'rms', got {qk_norm!r}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm == "rms":
            self.ln_q = RMSNormWeight(dim // num_heads)
            self.ln_k = RMSNormWeight(dim // num_heads)
        self.qk_norm = qk_norm

    def qkv_heads(self, h: torch.Tensor):
        """Project and split into heads: (q, k, v), strided (B, L, H, Dh) views, before QK-norm."""
        return split_heads(self.qkv(h), self.num_heads)

    @property
    def qk_weights(self):
        """(q weight, k weight) of the RMS QK-norm, or (None, None) without one."""
        return (self.ln_q.weight, self.ln_k.weight) if self.qk_norm == "rms" else (None, None)


def _weights(*attns: "JointAttention"):
    """q_weights, k_weights for attend_joint: None when the streams have no QK-norm."""
    if attns[0].qk_norm is None:
        return None, None
    return tuple(a.qk_weights[0] for a in attns), tuple(a.qk_weights[1] for a in attns)


class DismantledBlock(nn.Module):
    """One stream of a joint block: 6-chunk adaLN (2 when pre_only, 9 with attn2), attention, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False,
                 qk_norm: Optional[str] = None, x_block_self_attn: bool = False, qkv_bias: bool = True):
        super().__init__()
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        self.attn = JointAttention(hidden_size, num_heads, qkv_bias, pre_only, qk_norm)
        if x_block_self_attn:
            self.attn2 = JointAttention(hidden_size, num_heads, qkv_bias, False, qk_norm)
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

        # pre-attention: modulate, project, (QK-norm)
        c_q, c_k, c_v = cb.attn.qkv_heads(ops.norm_modulate(context, c_mod[0], c_mod[1]))
        if xb.x_block_self_attn:
            h1, h2 = ops.norm_modulate_dual(x, x_mod[0], x_mod[1], x_mod[6], x_mod[7])
            x_q2, x_k2, x_v2 = xb.attn2.qkv_heads(h2)
        else:
            h1 = ops.norm_modulate(x, x_mod[0], x_mod[1])
        x_q, x_k, x_v = xb.attn.qkv_heads(h1)

        qw, kw = _weights(cb.attn, xb.attn)  # QK-norm fused into the attention
        c_o, x_o = attend_joint((c_q, x_q), (c_k, x_k), (c_v, x_v), qw, kw)  # context first, as the reference

        # image stream: gated residuals (attn, then attn2), modulate for the MLP, MLP
        x_shift_mlp, x_scale_mlp, x_gate_mlp = x_mod[3], x_mod[4], x_mod[5]
        a = xb.attn.proj(merge_heads(x_o))
        if xb.x_block_self_attn:
            x = ops.gated_residual(x, a, x_mod[2])
            qw2, kw2 = _weights(xb.attn2)
            (o2,) = attend_joint((x_q2,), (x_k2,), (x_v2,), qw2, kw2)
            a, gate = xb.attn2.proj(merge_heads(o2)), x_mod[8]
        else:
            gate = x_mod[2]
        x, h = ops.gated_residual_norm_modulate(x, a, gate, x_shift_mlp, x_scale_mlp)
        x = ops.gated_residual(x, xb.mlp(h), x_gate_mlp)

        if self.pre_only:
            return None, x
        context, h = ops.gated_residual_norm_modulate(context, cb.attn.proj(merge_heads(c_o)), c_mod[2], c_mod[3], c_mod[4])
        context = ops.gated_residual(context, cb.mlp(h), c_mod[5])
        return context, x
