"""ditfast forward for diffusers' FLUX.2 blocks (``Flux2TransformerBlock`` and ``Flux2SingleTransformerBlock``
in ``transformer_flux2.py``; written against diffusers 0.42.1, and ``check_signature`` refuses a version whose
block forwards take other arguments), used by ``Flux2Transformer2DModel`` (FLUX.2 dev and klein).

FLUX.1's topology, so the math is :func:`ditfast.nn.functional.flux_double` and
:func:`ditfast.nn.functional.flux_single` (the functions FLUX.1's patched blocks and ``ditfast.nn`` run).
What FLUX.2's blocks do differently, and how this module adapts them:

* Modulation is computed once per forward and shared by every block: ``temb_mod_img`` /
  ``temb_mod_txt`` (B, 6D) for the double blocks ((shift, scale, gate) x 2, FLUX.1's order) and
  ``temb_mod`` (B, 3D) for the single blocks, read as (B, D) chunks. Every Linear is bias-free.
* Double block: ``Flux2Attention`` with ``Flux2AttnProcessor``: image q/k/v from ``to_q/k/v`` (or
  ``to_qkv``), text from ``add_q/k/v_proj`` (or ``to_added_qkv``), per-head ``torch.nn.RMSNorm`` QK-norm,
  joint sequence [text, image], ``to_out`` / ``to_add_out``; MLPs ``Flux2FeedForward`` (``linear_in``,
  SwiGLU over its ``[gate | up]`` halves, ``linear_out``), run as the Linear modules around
  :func:`ditfast.ops.swiglu` when the feed-forward and its activation are diffusers' own and unhooked
  (else the module is called). fp16: the text stream is clipped to +-65504, as diffusers does.
* Single block: ``Flux2ParallelSelfAttention`` with ``Flux2ParallelSelfAttnProcessor``: one projection
  ``to_qkv_mlp_proj`` gives ``[q | k | v | gate | up]`` (one matmul), the SwiGLU of the MLP columns is
  :func:`ditfast.ops.swiglu`, ``to_out`` maps ``[attention | MLP]`` (two accumulating matmuls,
  ``linear_of_concat``). The model calls it with the joint sequence already concatenated
  (``encoder_hidden_states=None``); with ``encoder_hidden_states`` it joins them first, and
  ``split_hidden_states`` returns the two parts, as diffusers does.
* RoPE: 4-axis tables from diffusers' ``Flux2PosEmbed`` (cos, sin), each (L, Dh) repeat-interleaved:
  FLUX.1's format (ditfast reads ``cos[:, 0::2]``).

diffusers' own forward runs instead (same call, same result), with a one-time warning per reason, for:
non-empty ``joint_attention_kwargs`` (the KV-cache modes for reference images pass their cache there);
attention processors other than the two above (the KV-cache processors included); dtypes other than
fp32 / bf16 / fp16; RoPE tables not in the format above; a hook on a module ditfast's forward does not
call (the attention modules, their QK-norms, the LayerNorms: ditfast/integrations/_hooks.py).
"""
from __future__ import annotations

import functools
from typing import List

import torch
from torch import nn

from .. import ops
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
    joint_sequence,
    no_kwargs,
    out_proj,
    rms_eps,
    rms_weight,
    swiglu_ff,
    warn_fallback_once,
)
from ._flux import rope_tables

_DOUBLE_PROCESSOR = "Flux2AttnProcessor"
_FF, _ACT = "Flux2FeedForward", "Flux2SwiGLU"
_SINGLE_PROCESSOR = "Flux2ParallelSelfAttnProcessor"
_BYPASSED_DOUBLE = ("attn", "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k",
                    "norm1", "norm1_context", "norm2", "norm2_context")
_BYPASSED_SINGLE = ("attn", "attn.norm_q", "attn.norm_k", "attn.mlp_act_fn", "norm")


def _chunks(mod: torch.Tensor, n: int):
    """A shared modulation (B, n·D) (or (B, 1, n·D)) as n (B, D) views."""
    if mod.dim() == 3 and mod.shape[1] == 1:
        mod = mod[:, 0]
    return mod.chunk(n, dim=-1)


def _fallback(block, processor: str, kwargs, length: int, image_rotary_emb, head_dim: int, *tensors):
    """(rope tables or None, None) for a call ditfast runs, or (None, (key, reason))."""
    attn = block.attn
    if not no_kwargs(kwargs):
        return None, ("kwargs", f"joint_attention_kwargs ({', '.join(map(str, kwargs))}: the KV-cache modes "
                                "among them), which ditfast does not take")
    if not is_diffusers(attn.processor, processor):
        return None, ("processor", f"the attention processor {describe(attn.processor)} (ditfast runs {processor}'s "
                                   "math only)")
    if not fast_dtypes(*tensors):
        dtypes = sorted({str(t.dtype) for t in tensors})
        return None, ("dtype", f"{'/'.join(dtypes)} inputs (ditfast's ops take float32, bfloat16 and float16)")
    rope = rope_tables(image_rotary_emb, length, head_dim)
    if rope is False:
        return None, ("rope", "RoPE tables that are not diffusers' (cos, sin) of shape (L, Dh)")
    return rope, None


def double_block_forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                         image_rotary_emb=None, joint_attention_kwargs=None):
    """ditfast forward of diffusers' ``Flux2TransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    attn = self.attn
    length = encoder_hidden_states.shape[1] + hidden_states.shape[1]
    rope, why = _fallback(self, _DOUBLE_PROCESSOR, joint_attention_kwargs, length, image_rotary_emb, attn.head_dim,
                          hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt)
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED_DOUBLE):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                                  image_rotary_emb, joint_attention_kwargs)
    fused = getattr(attn, "fused_projections", False)
    img_s = F.Stream(attn.to_qkv if fused else (attn.to_q, attn.to_k, attn.to_v), functools.partial(out_proj, attn),
                     functools.partial(swiglu_ff, self.ff, ff_class=_FF, act_class=_ACT), rms_weight(attn.norm_q), rms_weight(attn.norm_k),
                     self.norm1.eps, self.norm2.eps)
    txt_s = F.Stream(attn.to_added_qkv if fused else (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                     attn.to_add_out, functools.partial(swiglu_ff, self.ff_context, ff_class=_FF, act_class=_ACT), rms_weight(attn.norm_added_q),
                     rms_weight(attn.norm_added_k), self.norm1_context.eps, self.norm2_context.eps)
    x, c = F.flux_double(hidden_states, encoder_hidden_states, _chunks(temb_mod_img, 6), _chunks(temb_mod_txt, 6),
                         rope, img_s, txt_s, head_dim=attn.head_dim, qk_eps=rms_eps(attn.norm_q, attn.norm_added_q),
                         attention=_context_parallel.attention_for(attn))
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, x


def _packed_swiglu(attn):
    """The single block's MLP activation on the packed ``[gate | up]`` columns: ops.swiglu, or diffusers'
    module when it is not diffusers' own SwiGLU."""
    act = attn.mlp_act_fn
    if is_diffusers(act, _ACT) and F.unhooked(act):
        return ops.swiglu
    return act


def single_block_forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                         joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
    """ditfast forward of diffusers' ``Flux2SingleTransformerBlock``; returns hidden_states, or
    (encoder_hidden_states, hidden_states) with ``split_hidden_states``."""
    attn = self.attn
    length = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
    tensors = [t for t in (hidden_states, encoder_hidden_states, temb_mod) if t is not None]
    rope, why = _fallback(self, _SINGLE_PROCESSOR, joint_attention_kwargs, length, image_rotary_emb, attn.head_dim,
                          *tensors)
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED_SINGLE):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb,
                                  joint_attention_kwargs, split_hidden_states, text_seq_len)
    x = hidden_states
    if encoder_hidden_states is not None:
        text_seq_len = encoder_hidden_states.shape[1]
        x = joint_sequence(encoder_hidden_states, hidden_states)
    s = F.Stream(attn.to_qkv_mlp_proj, attn.to_out, None, rms_weight(attn.norm_q), rms_weight(attn.norm_k),
                 self.norm.eps)
    x = F.flux_single(x, _chunks(temb_mod, 3), rope, s, head_dim=attn.head_dim, qk_eps=rms_eps(attn.norm_q),
                      attention=_context_parallel.attention_for(attn), packed_act=_packed_swiglu(attn))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    if split_hidden_states:
        return x[:, :text_seq_len], x[:, text_seq_len:]
    return x


# ---------------------------------------------------------------------------------------------- checks


def _check_ff(ff, dim: int, where: str, problems: List[str]) -> None:
    if not is_diffusers(ff, "Flux2FeedForward"):
        problems.append(f"{where} is {describe(ff)}, expected diffusers' Flux2FeedForward")
        return
    check_linears(ff, ["linear_in", "linear_out"], where, problems)


def check_double(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), double_block_forward, problems)
    names = ["attn", "norm1", "norm1_context", "norm2", "norm2_context", "ff", "ff_context"]
    if not check_linears(block, names, "block", problems):
        return problems
    attn = block.attn
    if not is_diffusers(attn, "Flux2Attention"):
        return problems + [f"attn is {describe(attn)}, expected diffusers' Flux2Attention"]
    lin = ["to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    if not check_linears(attn, lin, "attn", problems):
        return problems
    dim, inner = attn.to_q.in_features, attn.inner_dim
    if inner != dim or inner != attn.heads * attn.head_dim:
        problems.append(f"attn: inner_dim {inner}, heads {attn.heads} x head_dim {attn.head_dim}, model dim {dim}")
    check_rms_pair(attn, "norm_q", "norm_k", attn.head_dim, "attn", problems)
    check_rms_pair(attn, "norm_added_q", "norm_added_k", attn.head_dim, "attn", problems)
    check_qk_eps([(n, getattr(attn, n, None)) for n in ("norm_q", "norm_added_q")], "attn", problems)
    for name in ("norm1", "norm1_context", "norm2", "norm2_context"):
        check_layer_norm(getattr(block, name), dim, name, problems)
    _check_ff(block.ff, dim, "ff", problems)
    _check_ff(block.ff_context, dim, "ff_context", problems)
    return problems


def check_single(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), single_block_forward, problems)
    if not check_linears(block, ["attn", "norm"], "block", problems):
        return problems
    attn = block.attn
    if not is_diffusers(attn, "Flux2ParallelSelfAttention"):
        return problems + [f"attn is {describe(attn)}, expected diffusers' Flux2ParallelSelfAttention"]
    if not check_linears(attn, ["to_qkv_mlp_proj", "to_out"], "attn", problems):
        return problems
    dim, inner = attn.query_dim, attn.inner_dim
    mlp = attn.mlp_hidden_dim
    if inner != dim or inner != attn.heads * attn.head_dim or attn.mlp_mult_factor != 2:
        problems.append(f"attn: inner_dim {inner}, heads {attn.heads} x head_dim {attn.head_dim}, model dim {dim}, "
                        f"mlp_mult_factor {attn.mlp_mult_factor} (ditfast runs inner = dim and SwiGLU's factor 2)")
    if attn.to_qkv_mlp_proj.out_features != 3 * inner + 2 * mlp or attn.to_out.in_features != inner + mlp:
        problems.append(f"attn: to_qkv_mlp_proj / to_out widths {attn.to_qkv_mlp_proj.out_features} / "
                        f"{attn.to_out.in_features}, expected {3 * inner + 2 * mlp} / {inner + mlp}")
    check_rms_pair(attn, "norm_q", "norm_k", attn.head_dim, "attn", problems)
    check_qk_eps([("norm_q", getattr(attn, "norm_q", None))], "attn", problems)
    check_layer_norm(block.norm, dim, "norm", problems)
    return problems


SPECS = (
    BlockSpec("Flux2TransformerBlock", check_double, double_block_forward),
    BlockSpec("Flux2SingleTransformerBlock", check_single, single_block_forward),
)
