"""ditfast forwards for diffusers' FLUX.1 blocks (``transformer_flux.py``, diffusers >= 0.35).

``FluxTransformerBlock`` (double stream) and ``FluxSingleTransformerBlock`` keep their diffusers
signature ``(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
joint_attention_kwargs=None)`` and return ``(encoder_hidden_states, hidden_states)``.

The math is :func:`ditfast.nn.functional.flux_double` / :func:`~ditfast.nn.functional.flux_single`,
the functions ``ditfast.nn``'s FLUX blocks run; this module adapts the arguments: the modulation
chunks of diffusers' adaLN modules, the projections (separate ``to_q/k/v`` or the fused ``to_qkv``
after ``fuse_qkv_projections()``), the QK-norm weights, the RoPE tables (below), the single block's
[text, image] concatenation, and diffusers' fp16 clipping where diffusers clips.

RoPE: diffusers passes ``image_rotary_emb = (cos, sin)``, each (L_txt + L_img, Dh) with every
frequency repeated for the two members of an interleaved pair (``repeat_interleave_real=True``);
ditfast's tables are the (L, Dh/2) columns 0, 2, 4, ... of those, rotating pairs (2i, 2i+1) as
diffusers' ``apply_rotary_emb(use_real_unbind_dim=-1)`` does.

The original forward runs instead (same call, same result) when ``joint_attention_kwargs`` is not
empty (IP-adapter), when the attention processor is not diffusers' ``FluxAttnProcessor``, when the
RoPE argument is not a (cos, sin) pair of that shape, for dtypes other than fp32/bf16/fp16, and
when an adaLN module (which ditfast does not call) carries hooks. Hooks on the attention module or
its QK-norms (diffusers' attention caches, leaf-level offloading) keep ditfast for the rest of the
block, which then calls the attention module itself (ditfast/integrations/_hooks.py).

Context parallelism (diffusers' ``enable_parallelism``): when the attention processor has a
context-parallel config, the attention step spans every rank's tokens through diffusers' Ulysses /
ring templates with ditfast's kernel as the local attention (ditfast/integrations/_context_parallel.py).
"""
from __future__ import annotations

import functools
from typing import List

import torch

from ..nn import functional as F
from . import _context_parallel, _hooks
from ._common import (
    BlockSpec,
    ada_chunks,
    check_ada_norm,
    check_layer_norm,
    check_linears,
    check_qk_eps,
    check_rms_pair,
    check_signature,
    describe,
    fast_dtypes,
    gelu_tanh_ff,
    is_diffusers,
    joint_sequence,
    no_kwargs,
    out_proj,
    rms_eps,
    stream,
)

def rope_tables(image_rotary_emb, length: int, head_dim: int):
    """diffusers' (cos, sin), each (L, Dh) repeat-interleaved, -> ditfast's fp32 (L, Dh/2) tables.

    The tables are the strided views ``cos[:, 0::2]`` (no copy when diffusers' tables are fp32, as
    FluxPosEmbed makes them): every block of a forward gets the same tensors, and the kernels read
    them through their strides. None when there is no RoPE; False when the argument is not in the
    expected format (the original forward runs then).
    """
    if image_rotary_emb is None:
        return None
    if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
        return False
    cos, sin = image_rotary_emb
    for t in (cos, sin):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or tuple(t.shape) != (length, head_dim):
            return False
    return cos[:, 0::2].float(), sin[:, 0::2].float()


def _rope_if_fast(attn, kwargs, image_rotary_emb, length: int, *tensors):
    """ditfast's RoPE tables (or None) for a call ditfast runs; False for a call the original forward takes."""
    if not (no_kwargs(kwargs) and is_diffusers(attn.processor, "FluxAttnProcessor") and fast_dtypes(*tensors)):
        return False
    return rope_tables(image_rotary_emb, length, attn.head_dim)


# the submodules diffusers' forward calls and ditfast's does not (it reads their weights or does
# their work itself): hooks on the attention module or its QK-norms make the block call the attention
# module; hooks on the others make it run diffusers' forward (see _hooks.py)
_BYPASSED_DOUBLE = ("attn", "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k",
                    "norm1", "norm1_context", "norm1.norm", "norm1_context.norm", "norm2", "norm2_context")
_BYPASSED_SINGLE = ("attn", "attn.norm_q", "attn.norm_k", "norm", "norm.norm")


def _attention_call(block, bypassed, image_rotary_emb):
    """None: no bypassed module is hooked (ditfast runs the whole block). A callable that calls the
    block's attention module as diffusers' forward does (its hooks and processor run) when only the
    attention module and its QK-norms are hooked. False (after a one-time warning): another bypassed
    module is hooked, so the original forward must run."""
    names = _hooks.hooked_names(block, bypassed)
    if not names:
        return None
    if all(n == "attn" or n.startswith("attn.") for n in names):
        return functools.partial(_call_attention, block.attn, image_rotary_emb)
    _hooks.warn_fallback(block, next(n for n in names if not n.startswith("attn")))
    return False


def _call_attention(attn, image_rotary_emb, h, h_context=None):
    if h_context is None:  # single-stream block: the attention output before proj_out
        return attn(hidden_states=h, image_rotary_emb=image_rotary_emb)
    return attn(hidden_states=h, encoder_hidden_states=h_context, image_rotary_emb=image_rotary_emb)


def flux_block_forward(
    self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None
):
    """ditfast forward of diffusers' ``FluxTransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    attn = self.attn
    rope = _rope_if_fast(attn, joint_attention_kwargs, image_rotary_emb,
                         encoder_hidden_states.shape[1] + hidden_states.shape[1], hidden_states, encoder_hidden_states,
                         temb)
    attn_call = False if rope is False else _attention_call(self, _BYPASSED_DOUBLE, image_rotary_emb)
    if attn_call is False:
        return type(self).forward(
            self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
        )
    # the feed-forwards' GELU(tanh) in their first matmul's epilogue where it can be (gelu_tanh_ff)
    img_s = stream(attn, False, functools.partial(out_proj, attn), functools.partial(gelu_tanh_ff, self.ff),
                   self.norm1.norm.eps, self.norm2.eps)
    txt_s = stream(attn, True, attn.to_add_out, functools.partial(gelu_tanh_ff, self.ff_context), self.norm1_context.norm.eps,
                   self.norm2_context.eps)
    x, c = F.flux_double(hidden_states, encoder_hidden_states, ada_chunks(self.norm1, temb, 6),
                         ada_chunks(self.norm1_context, temb, 6), rope, img_s, txt_s,
                         head_dim=attn.head_dim, qk_eps=rms_eps(attn.norm_q, attn.norm_added_q),
                         attention=_context_parallel.attention_for(attn), attn_call=attn_call)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, x


def _gelu_tanh_act(block) -> bool:
    act = block.act_mlp
    return type(act) is torch.nn.GELU and act.approximate == "tanh" and F.unhooked(act)


def _single_mlp(block, h: torch.Tensor) -> torch.Tensor:
    if _gelu_tanh_act(block):
        return F.linear_gelu_tanh(block.proj_mlp, h)  # GELU in the matmul epilogue where it can be
    return block.act_mlp(block.proj_mlp(h))


def flux_single_block_forward(
    self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None
):
    """ditfast forward of diffusers' ``FluxSingleTransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    attn, Lt = self.attn, encoder_hidden_states.shape[1]
    rope = _rope_if_fast(attn, joint_attention_kwargs, image_rotary_emb, Lt + hidden_states.shape[1], hidden_states,
                         encoder_hidden_states, temb)
    attn_call = False if rope is False else _attention_call(self, _BYPASSED_SINGLE, image_rotary_emb)
    if attn_call is False:
        return type(self).forward(
            self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
        )
    x = joint_sequence(encoder_hidden_states, hidden_states)  # [text, image]; no copy after a single block
    # proj_out maps [attention | MLP hidden]
    s = stream(attn, False, self.proj_out, functools.partial(_single_mlp, self), self.norm.norm.eps)
    x = F.flux_single(x, ada_chunks(self.norm, temb, 3), rope, s, head_dim=attn.head_dim,
                      qk_eps=rms_eps(attn.norm_q), attention=_context_parallel.attention_for(attn),
                      attn_call=attn_call, gelu_linear=self.proj_mlp if _gelu_tanh_act(self) else None)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    c, x = x.split((Lt, x.shape[1] - Lt), dim=1)  # views; backward: one cat of the two gradients
    return c, x


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
        check_qk_eps([("norm_q", attn.norm_q), ("norm_added_q", attn.norm_added_q)], where, problems)
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
