"""ditfast forward for diffusers' PixArt-α / Σ block: ``BasicTransformerBlock`` with
``norm_type="ada_norm_single"`` (as built by ``PixArtTransformer2DModel``): adaLN-single modulation,
self-attention, cross-attention to the T5 tokens, MLP. ``BasicTransformerBlock``'s other configuration
ditfast runs, DiT's ``ada_norm_zero``, is in ``_dit.py``, which hands this one over.

The math is :func:`ditfast.nn.functional.cross_block` (the function patched Wan blocks run), with no
QK-norm, no RoPE and no norm before the cross-attention (PixArt's own layout):

* Signature ``(hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
  timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None)``; returns
  hidden_states. ``timestep`` is the model's shared (B, 6·D) projection; with the block's
  ``scale_shift_table`` (6, D) it gives (shift, scale, gate) of the self-attention and of the MLP.
* ``norm1`` (before the self-attention) and ``norm2`` (before the MLP) are LayerNorms without affine
  parameters; ``attn1`` / ``attn2`` are diffusers' ``Attention`` with ``AttnProcessor2_0`` (biased
  projections, no QK-norm); ``ff`` is diffusers' GELU(tanh) ``FeedForward`` (``feed_forward``: chunked as
  diffusers' ``set_chunk_feed_forward`` asks, each chunk through ``gelu_tanh_ff``).
* ``encoder_attention_mask``: the model turns the T5 mask into an additive bias (B, 1, L_text) of 0 and
  -10000; the kept tokens are a prefix per sample (the padding follows the prompt), run as per-sample
  key lengths of the cross-attention (``ops.joint_attention(key_lengths=)``); an all-kept mask is dropped.

diffusers' own forward runs instead (same call, same result), with a one-time warning per reason, for:
an ``encoder_attention_mask`` whose kept tokens are not a prefix, or any self-attention ``attention_mask``; non-empty ``cross_attention_kwargs``; processors
other than ``AttnProcessor2_0``; dtypes other than fp32 / bf16 / fp16; a hook on a module ditfast's
forward does not call (the attention modules, the LayerNorms).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from ..nn import functional as F
from . import _hooks
from ._common import (
    check_layer_norm,
    check_linears,
    describe,
    fast_dtypes,
    feed_forward,
    is_diffusers,
    no_kwargs,
    out_proj,
    prefix_lengths,
    warn_fallback_once,
)

_PROCESSOR = "AttnProcessor2_0"
_BYPASSED = ("attn1", "attn2", "norm1", "norm2")


def _fallback_reason(block, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
                     kwargs) -> Optional[Tuple[str, str]]:
    if not no_kwargs(kwargs):
        return "kwargs", f"cross_attention_kwargs ({', '.join(map(str, kwargs))}), which ditfast does not take"
    for name in ("attn1", "attn2"):
        proc = getattr(block, name).processor
        if not is_diffusers(proc, _PROCESSOR):
            return "processor", f"the attention processor {describe(proc)} (ditfast runs {_PROCESSOR}'s math only)"
    if hidden_states.dim() != 3 or encoder_hidden_states is None or timestep is None:
        return "inputs", "inputs other than (B, L, D) hidden states with encoder_hidden_states and a timestep"
    if not fast_dtypes(hidden_states, encoder_hidden_states, timestep):
        dtypes = sorted({str(t.dtype) for t in (hidden_states, encoder_hidden_states, timestep)})
        return "dtype", f"{'/'.join(dtypes)} inputs (ditfast's ops take float32, bfloat16 and float16)"
    if attention_mask is not None:
        return "mask", "a self-attention attention_mask (ditfast's attention takes no mask)"
    return None


def _text_lengths(encoder_attention_mask, B: int, Lk: int):
    """(per-sample text lengths or None, None), or (None, (key, reason)) for a mask ditfast cannot run:
    the model's additive bias (B, 1, L_text) of 0 (keep) and -10000 (drop), or a (B, L_text) 0/1 mask."""
    if encoder_attention_mask is None:
        return None, None
    m = encoder_attention_mask
    if m.dim() == 3 and m.shape[1] == 1:
        keep = m[:, 0] == 0  # diffusers' bias form
    elif m.dim() == 2:
        keep = m.bool() if m.dtype == torch.bool else m == 1
    else:
        return None, ("encoder-mask", f"an encoder_attention_mask of shape {tuple(m.shape)}")
    if tuple(keep.shape) != (B, Lk):
        return None, ("encoder-mask", f"an encoder_attention_mask of shape {tuple(m.shape)} for {Lk} text tokens")
    lengths = prefix_lengths(keep)
    if lengths is False:
        return None, ("encoder-mask", "an encoder_attention_mask whose kept text tokens are not a prefix")
    return lengths, None


def pixart_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                         encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                         added_cond_kwargs=None):
    """ditfast forward of diffusers' ``BasicTransformerBlock`` (ada_norm_single); returns hidden_states."""
    why = _fallback_reason(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                           timestep, cross_attention_kwargs)
    lengths = None
    if why is None:
        lengths, why = _text_lengths(encoder_attention_mask, hidden_states.shape[0], encoder_hidden_states.shape[1])
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    a1, a2 = self.attn1, self.attn2
    B = hidden_states.shape[0]
    mod = (self.scale_shift_table[None] + timestep.reshape(B, 6, -1)).unbind(1)  # six (B, D)
    s = F.Stream((a1.to_q, a1.to_k, a1.to_v), functools.partial(out_proj, a1), functools.partial(feed_forward, self, self.ff),
                 None, None, self.norm1.eps, self.norm2.eps)
    context = F.CrossKV(encoder_hidden_states, (a2.to_k, a2.to_v), None, lengths)
    return F.cross_block(hidden_states, mod, s, a2.to_q, None, (context,), functools.partial(out_proj, a2),
                         head_dim=a1.to_k.out_features // a1.heads)


def _check_attention(attn, dim: int, kv_dim: int, where: str, problems: List[str]) -> None:
    if not is_diffusers(attn, "Attention"):
        problems.append(f"{where} is {describe(attn)}, expected diffusers' Attention")
        return
    if not check_linears(attn, ["to_q", "to_k", "to_v", "to_out"], where, problems):
        return
    inner = attn.to_q.out_features
    if inner % attn.heads or attn.to_k.out_features != inner or attn.to_v.out_features != inner \
            or attn.to_q.in_features != dim or attn.to_k.in_features != kv_dim:
        problems.append(f"{where}: projections {attn.to_q.in_features}/{attn.to_k.in_features} -> {inner} with "
                        f"{attn.heads} heads")
    for name in ("norm_q", "norm_k", "spatial_norm", "group_norm", "norm_cross"):
        if getattr(attn, name, None) is not None:
            problems.append(f"{where}.{name} is {describe(getattr(attn, name))}; PixArt attention has none")
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        problems.append(f"{where} has residual_connection / rescale_output_factor set")
    if getattr(attn, "scale", None) != (inner // attn.heads) ** -0.5:
        problems.append(f"{where}.scale is {getattr(attn, 'scale', None)}, not head_dim ** -0.5")


def check_block(block, problems: List[str]) -> List[str]:
    """The PixArt configuration of ``BasicTransformerBlock`` (called by _dit.check_block)."""
    if not check_linears(block, ["attn1", "attn2", "norm1", "norm2", "ff"], "block", problems):
        return problems
    dim = getattr(getattr(block.attn1, "to_q", None), "in_features", None)
    if dim is None:
        return problems + [f"attn1 is {describe(block.attn1)} without to_q"]
    check_layer_norm(block.norm1, dim, "norm1", problems)
    check_layer_norm(block.norm2, dim, "norm2", problems)
    _check_attention(block.attn1, dim, dim, "attn1", problems)
    kv_dim = getattr(getattr(block.attn2, "to_k", None), "in_features", None) or dim
    _check_attention(block.attn2, dim, kv_dim, "attn2", problems)
    for name in ("pos_embed", "fuser"):
        if getattr(block, name, None) is not None:
            problems.append(f"block has {name} ({describe(getattr(block, name))}), which PixArt blocks do not")
    if getattr(block, "only_cross_attention", False) or getattr(block, "double_self_attention", False):
        problems.append("attn1 is a cross-attention or attn2 a self-attention (only_cross / double_self_attention)")
    table = getattr(block, "scale_shift_table", None)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != (6, dim):
        problems.append(f"scale_shift_table is {describe(table)}, expected a (6, {dim}) parameter")
    return problems
