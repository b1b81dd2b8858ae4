"""ditfast forward for diffusers' FLUX.3 blocks (``Flux3ModeTransformerBlock`` and
``Flux3SingleTransformerBlock`` in ``transformer_flux3.py``; written against diffusers 0.42.1, and
``check_signature`` refuses a version whose block forwards take other arguments), used by
``Flux3Transformer2DModel``.

Both blocks are parallel-residual blocks: the math is :func:`ditfast.nn.functional.parallel_block`.
What the diffusers blocks do, and how this module adapts them:

* ``Flux3ModeTransformerBlock(hidden_states, temb_mod, image_rotary_emb)`` -> hidden_states: one token
  mode (the text, the image or the reference images) attends within itself. One stream.
* ``Flux3SingleTransformerBlock(hidden_states, encoder_hidden_states, temb_mod, temb_mod_context,
  image_rotary_emb)`` -> (encoder_hidden_states, hidden_states): the joint sequence [text; content],
  each stream with its own modulation, every weight shared. Two streams (ditfast's prepare writes
  both into the joint buffers: no concatenation of the normalized streams).
* Modulation: ``temb_mod`` is per token, (B, L, 3D) = (shift, scale, gate) (diffusers materializes it
  per token; it is constant within a mode), read as strided (B, L, D) chunks, never copied. The
  LayerNorm ``norm`` has no affine parameters.
* Attention: ``Flux3Attention`` with ``Flux3AttnProcessor``: bias-free ``to_q/k/v`` (or ``to_qkv`` after
  ``fuse_projections``), per-head ``torch.nn.RMSNorm`` QK-norm computed in fp32 (ditfast's prepare
  computes in fp32 anyway), RoPE with diffusers' repeat-interleaved (cos, sin) tables (L, Dh)
  (FLUX.1's format: ditfast reads ``cos[:, 0::2]``), ``to_out`` (Linear, Dropout).
* MLP: ``Flux3FeedForward`` (``linear_in``, SwiGLU over its two halves, ``linear_out``): its Linears called as
  modules around :func:`ditfast.ops.swiglu` (``_common.swiglu_ff``); a hooked or replaced feed-forward is
  called as the module.

diffusers' own forward runs instead (same call, same result), with a one-time warning per reason, for:
an attention processor other than ``Flux3AttnProcessor``; dtypes other than fp32 / bf16 / fp16; RoPE
tables not in the format above; a hook on a module ditfast's forward does not call (the attention
module, its QK-norms, the LayerNorm: ditfast/integrations/_hooks.py).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..nn import functional as F
from . import _context_parallel, _hooks
from ._common import (
    BlockSpec,
    check_layer_norm,
    check_linears,
    check_qk_eps,
    check_rms_pair,
    check_signature,
    describe,
    fast_dtypes,
    is_diffusers,
    out_proj,
    rms_eps,
    rms_weight,
    swiglu_ff,
    warn_fallback_once,
)
from ._flux import rope_tables

_PROCESSOR = "Flux3AttnProcessor"
_BYPASSED = ("attn", "attn.norm_q", "attn.norm_k", "norm")


def _fallback(block, length: int, image_rotary_emb, *tensors):
    """(rope tables or None, None) for a call ditfast runs, or (None, (key, reason)) for one it cannot."""
    attn = block.attn
    if not is_diffusers(attn.processor, _PROCESSOR):
        return None, ("processor", f"the attention processor {describe(attn.processor)} (ditfast runs "
                                   f"{_PROCESSOR}'s math only)")
    if not fast_dtypes(*tensors):
        dtypes = sorted({str(t.dtype) for t in tensors})
        return None, ("dtype", f"{'/'.join(dtypes)} inputs (ditfast's ops take float32, bfloat16 and float16)")
    rope = rope_tables(image_rotary_emb, length, attn.head_dim)
    if rope is False:
        return None, ("rope", "RoPE tables that are not diffusers' (cos, sin) of shape (L, Dh)")
    return rope, None


def _stream(block) -> F.Stream:
    attn = block.attn
    qkv = attn.to_qkv if getattr(attn, "fused_projections", False) else (attn.to_q, attn.to_k, attn.to_v)
    ff = functools.partial(swiglu_ff, block.ff, ff_class="Flux3FeedForward", act_class="Flux3SwiGLU")
    return F.Stream(qkv, functools.partial(out_proj, attn), ff, rms_weight(attn.norm_q), rms_weight(attn.norm_k),
                    block.norm.eps)


def _run(block, xs, mods, rope):
    attn = block.attn
    return F.parallel_block(xs, mods, _stream(block), head_dim=attn.head_dim, qk_eps=rms_eps(attn.norm_q),
                            rope=rope, attention=_context_parallel.attention_for(attn))


def mode_block_forward(self, hidden_states, temb_mod, image_rotary_emb):
    """ditfast forward of diffusers' ``Flux3ModeTransformerBlock``; returns hidden_states."""
    rope, why = _fallback(self, hidden_states.shape[1], image_rotary_emb, hidden_states, temb_mod)
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED):
        return type(self).forward(self, hidden_states, temb_mod, image_rotary_emb)
    (x,) = _run(self, (hidden_states,), (temb_mod.chunk(3, dim=-1),), rope)
    return x


def single_block_forward(self, hidden_states, encoder_hidden_states, temb_mod, temb_mod_context, image_rotary_emb):
    """ditfast forward of diffusers' ``Flux3SingleTransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    length = encoder_hidden_states.shape[1] + hidden_states.shape[1]
    rope, why = _fallback(self, length, image_rotary_emb, hidden_states, encoder_hidden_states, temb_mod,
                          temb_mod_context)
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb_mod, temb_mod_context,
                                  image_rotary_emb)
    c, x = _run(self, (encoder_hidden_states, hidden_states),
                (temb_mod_context.chunk(3, dim=-1), temb_mod.chunk(3, dim=-1)), rope)
    return c, x


# ---------------------------------------------------------------------------------------------- checks


def check_block(block, forward) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), forward, problems)
    if not check_linears(block, ["norm", "attn", "ff"], "block", problems):
        return problems
    attn = block.attn
    if not is_diffusers(attn, "Flux3Attention"):
        return problems + [f"attn is {describe(attn)}, expected diffusers' Flux3Attention"]
    if not check_linears(attn, ["to_q", "to_k", "to_v", "to_out"], "attn", problems):
        return problems
    dim = getattr(attn.to_q, "in_features", None)
    inner, heads, head_dim = getattr(attn, "inner_dim", None), getattr(attn, "heads", None), getattr(attn, "head_dim", None)
    if not dim or not heads or not head_dim or inner != heads * head_dim:
        return problems + [f"attn: inner_dim {inner} is not heads {heads} x head_dim {head_dim}"]
    for name in ("to_q", "to_k", "to_v"):
        lin = getattr(attn, name)
        if (getattr(lin, "in_features", None), getattr(lin, "out_features", None)) != (dim, inner):
            problems.append(f"attn.{name} maps {getattr(lin, 'in_features', None)} -> "
                            f"{getattr(lin, 'out_features', None)}, expected {dim} -> {inner}")
    check_rms_pair(attn, "norm_q", "norm_k", head_dim, "attn", problems)
    check_qk_eps([("norm_q", getattr(attn, "norm_q", None))], "attn", problems)
    check_layer_norm(block.norm, dim, "norm", problems)
    if not is_diffusers(block.ff, "Flux3FeedForward"):
        problems.append(f"ff is {describe(block.ff)}, expected diffusers' Flux3FeedForward")
    return problems


SPECS = (
    BlockSpec("Flux3ModeTransformerBlock", functools.partial(check_block, forward=mode_block_forward),
              mode_block_forward),
    BlockSpec("Flux3SingleTransformerBlock", functools.partial(check_block, forward=single_block_forward),
              single_block_forward),
)
