"""ditfast forwards for diffusers' FLUX.1 blocks (``transformer_flux.py``, diffusers >= 0.35).

``FluxTransformerBlock`` (double stream) and ``FluxSingleTransformerBlock`` keep their diffusers
signature ``(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
joint_attention_kwargs=None)`` and return ``(encoder_hidden_states, hidden_states)``.

Per block: adaLN-Zero modulation -> ``ops.norm_modulate``; projections (separate ``to_q/k/v`` or
the fused ``to_qkv`` after ``fuse_qkv_projections()``); ``ops.qk_norm_rope`` (per-stream RMSNorm
weights, RoPE rows of that stream); ``ops.joint_attention`` over [text, image] (diffusers' order);
``ops.gated_residual_norm_modulate`` after the output projection; ``ops.gated_residual`` after the
MLP; diffusers' fp16 clipping where diffusers clips.

RoPE: diffusers passes ``image_rotary_emb = (cos, sin)``, each (L_txt + L_img, Dh) with every
frequency repeated for the two members of an interleaved pair (``repeat_interleave_real=True``);
ditfast's tables are the (L, Dh/2) columns 0, 2, 4, ... of those, rotating pairs (2i, 2i+1) as
diffusers' ``apply_rotary_emb(use_real_unbind_dim=-1)`` does.

The original forward runs instead (same call, same result) when ``joint_attention_kwargs`` is not
empty (IP-adapter), when the attention processor is not diffusers' ``FluxAttnProcessor``, when the
RoPE argument is not a (cos, sin) pair of that shape, or for dtypes other than fp32/bf16/fp16.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import ops
from ._common import (
    BlockSpec,
    ada_chunks,
    check_ada_norm,
    check_layer_norm,
    check_linears,
    check_rms_pair,
    check_signature,
    describe,
    fast_dtypes,
    heads,
    is_diffusers,
    no_kwargs,
    out_proj,
    packed_heads,
    rms_eps,
    rms_weight,
)

Tables = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def rope_tables(image_rotary_emb, length: int, head_dim: int) -> Optional[Tables]:
    """diffusers' (cos, sin), each (L, Dh) repeat-interleaved, -> ditfast's fp32 (L, Dh/2) tables.

    The tables are the strided views ``cos[:, 0::2]`` (no copy when diffusers' tables are fp32, as
    FluxPosEmbed makes them): every block of a forward gets the same tensors, and the Triton kernels
    read them through their strides. (None, None) when there is no RoPE; None when the argument is
    not in the expected format.
    """
    if image_rotary_emb is None:
        return None, None
    if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
        return None
    cos, sin = image_rotary_emb
    for t in (cos, sin):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or tuple(t.shape) != (length, head_dim):
            return None
    return cos[:, 0::2].float(), sin[:, 0::2].float()


def _rows(tables: Tables, start: int, stop: int) -> Tables:
    cos, sin = tables
    return (None, None) if cos is None else (cos[start:stop], sin[start:stop])


def _fast(attn, kwargs, *tensors) -> bool:
    return no_kwargs(kwargs) and is_diffusers(attn.processor, "FluxAttnProcessor") and fast_dtypes(*tensors)


def _qkv_heads(attn, h: torch.Tensor, added: bool, tables: Tables):
    """One stream's q, k, v (B, L, H, Dh), with its QK-RMSNorm and RoPE applied to q and k."""
    d = attn.head_dim
    if getattr(attn, "fused_projections", False):  # after fuse_qkv_projections(): packed, strided views
        q, k, v = packed_heads((attn.to_added_qkv if added else attn.to_qkv)(h), d)
    elif added:
        q, k, v = heads(attn.add_q_proj(h), d), heads(attn.add_k_proj(h), d), heads(attn.add_v_proj(h), d)
    else:
        q, k, v = heads(attn.to_q(h), d), heads(attn.to_k(h), d), heads(attn.to_v(h), d)
    nq, nk = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    cos, sin = tables
    if nq is not None or cos is not None:
        q, k = ops.qk_norm_rope(q, k, rms_weight(nq), rms_weight(nk), cos, sin, eps=rms_eps(nq))
    return q, k, v


def flux_block_forward(
    self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None
):
    """ditfast forward of diffusers' ``FluxTransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    attn = self.attn
    Lt, Li = encoder_hidden_states.shape[1], hidden_states.shape[1]
    tables = None
    if _fast(attn, joint_attention_kwargs, hidden_states, encoder_hidden_states, temb):
        tables = rope_tables(image_rotary_emb, Lt + Li, attn.head_dim)
    if tables is None:
        return type(self).forward(
            self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
        )
    x, c = hidden_states, encoder_hidden_states
    x_shift, x_scale, x_gate, x_shift2, x_scale2, x_gate2 = ada_chunks(self.norm1, temb, 6)
    c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = ada_chunks(self.norm1_context, temb, 6)

    q, k, v = _qkv_heads(attn, ops.norm_modulate(x, x_shift, x_scale, eps=self.norm1.norm.eps), False,
                         _rows(tables, Lt, Lt + Li))
    cq, ck, cv = _qkv_heads(attn, ops.norm_modulate(c, c_shift, c_scale, eps=self.norm1_context.norm.eps), True,
                            _rows(tables, 0, Lt))
    o = ops.joint_attention(torch.cat((cq, q), 1), torch.cat((ck, k), 1), torch.cat((cv, v), 1))
    c_o, x_o = o.flatten(2).split((Lt, Li), dim=1)  # text first, as diffusers' FluxAttnProcessor

    x, h = ops.gated_residual_norm_modulate(x, out_proj(attn, x_o), x_gate, x_shift2, x_scale2, eps=self.norm2.eps)
    x = ops.gated_residual(x, self.ff(h), x_gate2)
    c, h = ops.gated_residual_norm_modulate(
        c, attn.to_add_out(c_o), c_gate, c_shift2, c_scale2, eps=self.norm2_context.eps
    )
    c = ops.gated_residual(c, self.ff_context(h), c_gate2)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, x


def flux_single_block_forward(
    self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None
):
    """ditfast forward of diffusers' ``FluxSingleTransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    attn = self.attn
    Lt = encoder_hidden_states.shape[1]
    tables = None
    if _fast(attn, joint_attention_kwargs, hidden_states, encoder_hidden_states, temb):
        tables = rope_tables(image_rotary_emb, Lt + hidden_states.shape[1], attn.head_dim)
    if tables is None:
        return type(self).forward(
            self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
        )
    x = torch.cat((encoder_hidden_states, hidden_states), dim=1)  # the joint sequence [text, image]
    shift, scale, gate = ada_chunks(self.norm, temb, 3)
    h = ops.norm_modulate(x, shift, scale, eps=self.norm.norm.eps)
    mlp = self.act_mlp(self.proj_mlp(h))
    q, k, v = _qkv_heads(attn, h, False, tables)
    o = ops.joint_attention(q, k, v).flatten(2)
    x = ops.gated_residual(x, self.proj_out(torch.cat((o, mlp), dim=2)), gate)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :Lt], x[:, Lt:]


# ---------------------------------------------------------------------------------------------- checks


def _check_attention(attn, dim: int, added: bool, where: str, problems: List[str]) -> None:
    if not is_diffusers(attn, "FluxAttention"):
        problems.append(f"{where} is {describe(attn)}, expected diffusers' FluxAttention (diffusers >= 0.35)")
        return
    names = ["to_q", "to_k", "to_v"]
    if added:
        names += ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out"]
    if not check_linears(attn, names, where, problems):
        return
    head_dim, n_heads = getattr(attn, "head_dim", None), getattr(attn, "heads", None)
    if not head_dim or not n_heads or head_dim * n_heads != attn.to_q.out_features:
        problems.append(f"{where}: heads {n_heads} x head_dim {head_dim} != to_q outputs {attn.to_q.out_features}")
        return
    check_rms_pair(attn, "norm_q", "norm_k", head_dim, where, problems)
    if added:
        check_rms_pair(attn, "norm_added_q", "norm_added_k", head_dim, where, problems)
    if attn.to_q.in_features != dim:
        problems.append(f"{where}.to_q takes {attn.to_q.in_features} features, expected {dim}")


def check_block(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), flux_block_forward, problems)
    dim = getattr(getattr(block.attn, "to_q", None), "in_features", None)
    if dim is None:
        return problems + [f"attn is {describe(block.attn)} without to_q"]
    for name in ("norm1", "norm1_context"):
        norm = getattr(block, name, None)
        if check_ada_norm(norm, ("AdaLayerNormZero",), 6, dim, name, problems) and norm.emb is not None:
            problems.append(f"{name} embeds timesteps itself (num_embeddings set), which FLUX blocks do not")
    _check_attention(block.attn, dim, True, "attn", problems)
    check_layer_norm(getattr(block, "norm2", None), dim, "norm2", problems)
    check_layer_norm(getattr(block, "norm2_context", None), dim, "norm2_context", problems)
    check_linears(block, ["ff", "ff_context"], "block", problems)
    return problems


def check_single_block(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), flux_single_block_forward, problems)
    if not check_linears(block, ["norm", "proj_mlp", "act_mlp", "proj_out", "attn"], "block", problems):
        return problems
    dim = block.proj_mlp.in_features
    check_ada_norm(block.norm, ("AdaLayerNormZeroSingle",), 3, dim, "norm", problems)
    _check_attention(block.attn, dim, False, "attn", problems)
    if block.proj_out.in_features != dim + block.proj_mlp.out_features:
        problems.append(f"proj_out takes {block.proj_out.in_features} features, expected attention + MLP widths")
    return problems


SPECS = (
    BlockSpec("FluxTransformerBlock", check_block, flux_block_forward),
    BlockSpec("FluxSingleTransformerBlock", check_single_block, flux_single_block_forward),
)
