"""ditfast forward for diffusers' SD3 / SD3.5 MM-DiT block (``JointTransformerBlock`` in
``models/attention.py``), used by ``SD3Transformer2DModel`` (and SD3 ControlNets).

Signature ``(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None)``, returns
``(encoder_hidden_states, hidden_states)`` with ``encoder_hidden_states = None`` for the last,
``context_pre_only`` block. Covers SD3-medium (no QK-norm), SD3.5 (RMS QK-norm) and SD3.5-medium's
dual attention (``SD35AdaLayerNormZeroX``: one LayerNorm, two modulations via
``ops.norm_modulate_dual``; ``attn2`` is image-only self-attention added with ``gate_msa2`` after
``attn``'s residual). The pre-only block's context stream is modulated by an
``AdaLayerNormContinuous``, which splits its projection (scale, shift). The joint sequence is
[image, text], diffusers' order. Feed-forward chunking (``enable_forward_chunking``) is honoured.

The original forward runs instead (same call, same result) when ``joint_attention_kwargs`` is not
empty (IP-adapter), when a processor is not diffusers' ``JointAttnProcessor2_0`` (e.g. after
``fuse_qkv_projections()``), or for dtypes other than fp32/bf16/fp16.
"""
from __future__ import annotations

from typing import List

import torch

from .. import ops
from ._common import (
    BlockSpec,
    ada_chunks,
    ada_continuous,
    check_ada_norm,
    check_layer_norm,
    check_linears,
    check_rms_pair,
    check_signature,
    describe,
    fast_dtypes,
    feed_forward,
    heads,
    is_diffusers,
    no_kwargs,
    out_proj,
    rms_eps,
    rms_weight,
)

_PROCESSOR = "JointAttnProcessor2_0"


def _qkv_heads(attn, h: torch.Tensor, added: bool):
    """q, k, v (B, L, H, Dh) of one stream, QK-RMSNorm applied when the attention has it."""
    if added:
        q, k, v = attn.add_q_proj(h), attn.add_k_proj(h), attn.add_v_proj(h)
        nq, nk = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        nq, nk = attn.norm_q, attn.norm_k
    d = k.shape[-1] // attn.heads
    q, k, v = heads(q, d), heads(k, d), heads(v, d)
    if nq is not None:
        q, k = ops.qk_norm_rope(q, k, rms_weight(nq), rms_weight(nk), None, None, eps=rms_eps(nq))
    return q, k, v


def joint_block_forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """ditfast forward of diffusers' ``JointTransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    attn, attn2 = self.attn, self.attn2
    fast = (
        no_kwargs(joint_attention_kwargs)
        and is_diffusers(attn.processor, _PROCESSOR)
        and (attn2 is None or is_diffusers(attn2.processor, _PROCESSOR))
        and fast_dtypes(hidden_states, encoder_hidden_states, temb)
    )
    if not fast:
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
    x, c = hidden_states, encoder_hidden_states
    Lx, Lc = x.shape[1], c.shape[1]

    # modulation, LayerNorm + modulate
    if self.use_dual_attention:
        x_shift, x_scale, x_gate, x_shift_mlp, x_scale_mlp, x_gate_mlp, x_shift2, x_scale2, x_gate2 = ada_chunks(
            self.norm1, temb, 9
        )
        h, h2 = ops.norm_modulate_dual(x, x_shift, x_scale, x_shift2, x_scale2, eps=self.norm1.norm.eps)
    else:
        x_shift, x_scale, x_gate, x_shift_mlp, x_scale_mlp, x_gate_mlp = ada_chunks(self.norm1, temb, 6)
        h = ops.norm_modulate(x, x_shift, x_scale, eps=self.norm1.norm.eps)
    if self.context_pre_only:
        c_shift, c_scale = ada_continuous(self.norm1_context, temb, c.dtype)
    else:
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = ada_chunks(self.norm1_context, temb, 6)
    hc = ops.norm_modulate(c, c_shift, c_scale, eps=self.norm1_context.norm.eps)

    # joint attention over [image, text]
    q, k, v = _qkv_heads(attn, h, False)
    cq, ck, cv = _qkv_heads(attn, hc, True)
    o = ops.joint_attention(torch.cat((q, cq), 1), torch.cat((k, ck), 1), torch.cat((v, cv), 1))
    x_o, c_o = o.flatten(2).split((Lx, Lc), dim=1)

    # image stream: attn residual, (attn2 residual), MLP
    a, gate = out_proj(attn, x_o), x_gate
    if self.use_dual_attention:
        x = ops.gated_residual(x, a, x_gate)
        q2, k2, v2 = _qkv_heads(attn2, h2, False)
        a, gate = out_proj(attn2, ops.joint_attention(q2, k2, v2).flatten(2)), x_gate2
    x, h = ops.gated_residual_norm_modulate(x, a, gate, x_shift_mlp, x_scale_mlp, eps=self.norm2.eps)
    x = ops.gated_residual(x, feed_forward(self, self.ff, h), x_gate_mlp)
    if self.context_pre_only:
        return None, x

    # text stream
    c, hc = ops.gated_residual_norm_modulate(
        c, attn.to_add_out(c_o), c_gate, c_shift_mlp, c_scale_mlp, eps=self.norm2_context.eps
    )
    c = ops.gated_residual(c, feed_forward(self, self.ff_context, hc), c_gate_mlp)
    return c, x


# ---------------------------------------------------------------------------------------------- checks


def _check_attention(attn, dim: int, added: bool, pre_only: bool, where: str, problems: List[str]) -> None:
    if not is_diffusers(attn, "Attention"):
        problems.append(f"{where} is {describe(attn)}, expected diffusers' Attention")
        return
    names = ["to_q", "to_k", "to_v", "to_out"]
    if added:
        names += ["add_q_proj", "add_k_proj", "add_v_proj"] + ([] if pre_only else ["to_add_out"])
    if not check_linears(attn, names, where, problems):
        return
    inner, n_heads = attn.to_k.out_features, attn.heads
    if inner % n_heads or attn.to_q.out_features != inner or attn.to_q.in_features != dim:
        problems.append(f"{where}: to_q {attn.to_q.in_features}->{attn.to_q.out_features}, to_k -> {inner}, "
                        f"heads {n_heads}; expected {dim} -> H·Dh for all")
        return
    check_rms_pair(attn, "norm_q", "norm_k", inner // n_heads, where, problems)
    if added:
        check_rms_pair(attn, "norm_added_q", "norm_added_k", inner // n_heads, where, problems)
    if bool(getattr(attn, "context_pre_only", False)) != (pre_only and added):
        problems.append(f"{where}.context_pre_only={attn.context_pre_only} disagrees with the block")


def check_block(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), joint_block_forward, problems)
    if not check_linears(block, ["attn", "norm1", "norm1_context", "norm2", "ff"], "block", problems):
        return problems
    attn = block.attn
    dim = getattr(getattr(attn, "to_q", None), "in_features", None)
    if dim is None:
        return problems + [f"attn is {describe(attn)} without to_q"]
    dual, pre_only = bool(block.use_dual_attention), bool(block.context_pre_only)
    if dual:
        check_ada_norm(block.norm1, ("SD35AdaLayerNormZeroX",), 9, dim, "norm1", problems)
        if block.attn2 is None:
            problems.append("use_dual_attention is set but attn2 is None")
        else:
            _check_attention(block.attn2, dim, False, False, "attn2", problems)
    else:
        ok = check_ada_norm(block.norm1, ("AdaLayerNormZero",), 6, dim, "norm1", problems)
        if ok and block.norm1.emb is not None:
            problems.append("norm1 embeds timesteps itself (num_embeddings set)")
        if block.attn2 is not None:
            problems.append("attn2 is set but use_dual_attention is False")
    if pre_only:
        check_ada_norm(block.norm1_context, ("AdaLayerNormContinuous",), 2, dim, "norm1_context", problems)
    else:
        check_ada_norm(block.norm1_context, ("AdaLayerNormZero",), 6, dim, "norm1_context", problems)
        check_layer_norm(getattr(block, "norm2_context", None), dim, "norm2_context", problems)
        check_linears(block, ["ff_context"], "block", problems)
    _check_attention(attn, dim, True, pre_only, "attn", problems)
    check_layer_norm(block.norm2, dim, "norm2", problems)
    return problems


SPECS = (BlockSpec("JointTransformerBlock", check_block, joint_block_forward),)
