"""ditfast forward for diffusers' DiT block: ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"``
(as built by ``DiTTransformer2DModel``): class-conditional adaLN-Zero, self-attention, MLP.

Signature ``(hidden_states, attention_mask=None, encoder_hidden_states=None,
encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
added_cond_kwargs=None)``, returns hidden_states. The modulation comes from the block's own
``norm1.emb`` (timestep + class-label embedding, label dropout in training as upstream) and
``norm1.linear``; norm1 and norm3 keep their own eps (diffusers' DiT uses 1e-6 and ``norm_eps``).

Only the plain DiT configuration is taken: no cross-attention (``attn2``), no positional embedding
inside the block, no GLIGEN fuser, no QK-norm, plain ``AttnProcessor2_0``. The original forward
runs instead (same call, same result) when an ``attention_mask`` or non-empty
``cross_attention_kwargs`` is passed, when the processor was changed, for inputs that are not
(B, L, D), or for dtypes other than fp32/bf16/fp16.
"""
from __future__ import annotations

import functools
from typing import List

from ..nn import functional as F
from . import _hooks, _pixart
from ._common import (
    BlockSpec,
    ada_chunks,
    check_ada_norm,
    check_layer_norm,
    check_linears,
    check_signature,
    describe,
    fast_dtypes,
    feed_forward,
    is_diffusers,
    no_kwargs,
    out_proj,
    stream,
)


# the submodules diffusers' forward calls and ditfast's does not (it reads their weights or does
# their work itself): hooks on any of them make the block run diffusers' forward (see _hooks.py)
_BYPASSED = ("attn1", "attn1.norm_q", "attn1.norm_k", "norm1", "norm1.norm", "norm3")


def dit_block_forward(
    self,
    hidden_states,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    timestep=None,
    cross_attention_kwargs=None,
    class_labels=None,
    added_cond_kwargs=None,
):
    """ditfast forward of diffusers' ``BasicTransformerBlock`` (ada_norm_zero; PixArt's ada_norm_single is
    handed to ``_pixart``); returns hidden_states."""
    if self.norm_type == "ada_norm_single":
        return _pixart.pixart_block_forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                            encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                            added_cond_kwargs)
    attn = self.attn1
    fast = (
        attention_mask is None
        and no_kwargs(cross_attention_kwargs)
        and is_diffusers(attn.processor, "AttnProcessor2_0")
        and hidden_states.dim() == 3
        and fast_dtypes(hidden_states)
    )
    if not fast or _hooks.falls_back(self, _BYPASSED):
        return type(self).forward(
            self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
            cross_attention_kwargs, class_labels, added_cond_kwargs,
        )
    emb = self.norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
    mod = ada_chunks(self.norm1, emb, 6)  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    s = stream(attn, False, functools.partial(out_proj, attn), functools.partial(feed_forward, self, self.ff),
               self.norm1.norm.eps, self.norm3.eps)
    return F.dit_block(hidden_states, mod, s, head_dim=attn.to_k.out_features // attn.heads)


def check_block(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), dit_block_forward, problems)
    norm_type = getattr(block, "norm_type", None)
    if norm_type == "ada_norm_single":
        return _pixart.check_block(block, problems)
    if norm_type != "ada_norm_zero":
        return problems + [f"norm_type is {norm_type!r}; ditfast runs the DiT ('ada_norm_zero') and PixArt "
                           "('ada_norm_single') configurations"]
    if not check_linears(block, ["attn1", "norm1", "norm3", "ff"], "block", problems):
        return problems
    attn = block.attn1
    dim = getattr(getattr(attn, "to_q", None), "in_features", None)
    if not is_diffusers(attn, "Attention") or dim is None:
        return problems + [f"attn1 is {describe(attn)}, expected diffusers' Attention"]
    if check_ada_norm(block.norm1, ("AdaLayerNormZero",), 6, dim, "norm1", problems) and block.norm1.emb is None:
        problems.append("norm1 has no timestep/label embedding (num_embeds_ada_norm is None)")
    check_layer_norm(block.norm3, dim, "norm3", problems)
    for name in ("attn2", "pos_embed", "fuser"):
        if getattr(block, name, None) is not None:
            problems.append(f"block has {name} ({describe(getattr(block, name))}), which DiT blocks do not")
    if getattr(block, "only_cross_attention", False) or getattr(attn, "is_cross_attention", False):
        problems.append("attn1 is a cross-attention")
    if check_linears(attn, ["to_q", "to_k", "to_v", "to_out"], "attn1", problems):
        inner = attn.to_k.out_features
        if inner % attn.heads or attn.to_q.out_features != inner or attn.to_v.in_features != dim:
            problems.append(f"attn1: projections {dim} -> {attn.to_q.out_features}/{inner} with {attn.heads} heads")
    for name in ("norm_q", "norm_k", "spatial_norm", "group_norm"):
        if getattr(attn, name, None) is not None:
            problems.append(f"attn1.{name} is {describe(getattr(attn, name))}; DiT attention has none")
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        problems.append("attn1 has residual_connection / rescale_output_factor set")
    return problems


SPECS = (BlockSpec("BasicTransformerBlock", check_block, dit_block_forward),)
