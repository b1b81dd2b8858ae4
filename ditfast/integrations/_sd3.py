"""ditfast forward for diffusers' SD3 / SD3.5 MM-DiT block (``JointTransformerBlock`` in
``models/attention.py``), used by ``SD3Transformer2DModel`` (and SD3 ControlNets).

Signature ``(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None)``, returns
``(encoder_hidden_states, hidden_states)`` with ``encoder_hidden_states = None`` for the last,
``context_pre_only`` block. Covers SD3-medium (no QK-norm), SD3.5 (RMS QK-norm) and SD3.5-medium's
dual attention (``SD35AdaLayerNormZeroX``: one LayerNorm, two modulations; ``attn2`` is image-only
self-attention added with ``gate_msa2`` after ``attn``'s residual). The math is
:func:`ditfast.nn.functional.sd3_joint`, as for ``ditfast.nn.JointBlock``; this module adapts the
arguments: the pre-only block's context stream is modulated by an ``AdaLayerNormContinuous``, which
splits its projection (scale, shift); the joint sequence is [text, image] (the SD3.5 reference's
order; diffusers' processor puts the image first, which changes only the order of the softmax's
sums). Feed-forward chunking (``enable_forward_chunking``) is honoured.

The original forward runs instead (same call, same result) when ``joint_attention_kwargs`` is not
empty (IP-adapter), when a processor is not diffusers' ``JointAttnProcessor2_0`` (e.g. after
``fuse_qkv_projections()``), or for dtypes other than fp32/bf16/fp16.
"""
from __future__ import annotations

import functools
from typing import List

from ..nn import functional as F
from . import _hooks
from ._common import (
    BlockSpec,
    ada_chunks,
    ada_continuous,
    check_ada_norm,
    check_layer_norm,
    check_linears,
    check_qk_eps,
    check_rms_pair,
    check_signature,
    describe,
    fast_dtypes,
    feed_forward,
    is_diffusers,
    no_kwargs,
    out_proj,
    rms_eps,
    stream,
)

_PROCESSOR = "JointAttnProcessor2_0"


# the submodules diffusers' forward calls and ditfast's does not (it reads their weights or does
# their work itself): hooks on any of them make the block run diffusers' forward (see _hooks.py)
_BYPASSED = ("attn", "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k", "attn2",
             "attn2.norm_q", "attn2.norm_k", "norm1", "norm1.norm", "norm1_context", "norm1_context.norm", "norm2",
             "norm2_context")


def joint_block_forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """ditfast forward of diffusers' ``JointTransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    attn, attn2 = self.attn, self.attn2
    fast = (
        no_kwargs(joint_attention_kwargs)
        and is_diffusers(attn.processor, _PROCESSOR)
        and (attn2 is None or is_diffusers(attn2.processor, _PROCESSOR))
        and fast_dtypes(hidden_states, encoder_hidden_states, temb)
    )
    if not fast or _hooks.falls_back(self, _BYPASSED):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
    c = encoder_hidden_states
    x_mod = ada_chunks(self.norm1, temb, 9 if self.use_dual_attention else 6)
    xs = stream(attn, False, functools.partial(out_proj, attn), functools.partial(feed_forward, self, self.ff),
                self.norm1.norm.eps, self.norm2.eps)
    if self.context_pre_only:  # AdaLayerNormContinuous: (shift, scale); the context ends after the attention
        c_mod = ada_continuous(self.norm1_context, temb, c.dtype)
        cs = stream(attn, True, None, None, self.norm1_context.norm.eps)
    else:
        c_mod = ada_chunks(self.norm1_context, temb, 6)
        cs = stream(attn, True, attn.to_add_out, functools.partial(feed_forward, self, self.ff_context),
                    self.norm1_context.norm.eps, self.norm2_context.eps)
    x2 = stream(attn2, False, functools.partial(out_proj, attn2), None, 1e-6) if self.use_dual_attention else None
    norms = (attn.norm_q, attn.norm_added_q) + ((attn2.norm_q,) if attn2 is not None else ())
    return F.sd3_joint(c, hidden_states, c_mod, x_mod, cs, xs, head_dim=attn.to_k.out_features // attn.heads, x2=x2,
                       qk_eps=rms_eps(*norms))


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
    if attn.to_v.out_features != inner or attn.to_v.in_features != dim:
        problems.append(f"{where}.to_v maps {attn.to_v.in_features} -> {attn.to_v.out_features}, "
                        f"expected {dim} -> {inner}")
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
    attns = [("attn", attn)] + ([("attn2", block.attn2)] if dual and block.attn2 is not None else [])
    check_qk_eps([(f"{w}.{n}", getattr(a, n, None)) for w, a in attns for n in ("norm_q", "norm_added_q")],
                 "block", problems)
    if dual and block.attn2 is not None and getattr(block.attn2, "heads", None) != attn.heads:
        problems.append(f"attn2 has {block.attn2.heads} heads, attn {attn.heads}; ditfast expects one head dim")
    check_layer_norm(block.norm2, dim, "norm2", problems)
    return problems


SPECS = (BlockSpec("JointTransformerBlock", check_block, joint_block_forward),)
