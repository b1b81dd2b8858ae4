"""ditfast forward for diffusers' Qwen-Image block (``QwenImageTransformerBlock`` in
``transformer_qwenimage.py``; written against diffusers 0.42.1, and ``check_signature`` refuses a version
whose block forward takes other arguments), used by ``QwenImageTransformer2DModel`` (Qwen-Image, 2512,
Qwen-Image-Edit, -Edit-2509 / 2511, Layered) and ``QwenImageControlNetModel``.

The block is FLUX.1's double-stream block, so the math is :func:`ditfast.nn.functional.flux_double`
(the function ``ditfast.nn.DoubleStreamBlock`` and the patched FLUX blocks run). What differs from
diffusers' FLUX block, and how this module adapts it:

* Signature ``(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
  image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None)``; returns
  ``(encoder_hidden_states, hidden_states)``, both clipped to +-65504 in fp16 (diffusers clips both).
* Modulation: ``img_mod`` / ``txt_mod`` are ``Sequential(SiLU, Linear(D, 6D))``, called as modules;
  their output is split in halves (norm1, norm2) and each half in (shift, scale, gate): the same six
  chunks, in the same order, as FLUX's ``AdaLayerNormZero``. Both streams read the same ``temb``
  (with ``zero_cond_t``, the text stream reads its first half, see below). The LayerNorms
  (``img_norm1/2``, ``txt_norm1/2``) have no affine parameters; their eps is read from them.
* Attention: diffusers' shared ``Attention`` with ``QwenDoubleStreamAttnProcessor2_0``: image q/k/v
  from ``to_q/k/v``, text from ``add_q/k/v_proj`` (always the separate projections, as that processor
  does, also after ``fuse_projections()``), per-head RMS QK-norm (``norm_q/k``, ``norm_added_q/k``),
  joint sequence [text, image], output projections ``to_out`` (Linear, Dropout) for the image and
  ``to_add_out`` for the text. The head dim is ``inner_dim // heads`` as in the processor.
* RoPE: diffusers passes ``image_rotary_emb = (image_freqs, text_freqs)``, complex64 tables of shape
  (L_img, Dh/2) and (L_txt, Dh/2) (``QwenEmbedRope``: fp32 angles, centred image positions, text
  positions after the image's), applied as complex products of consecutive pairs (2i, 2i+1): the
  interleaved rotation. ditfast's joint table is ``cos = real``, ``sin = imag`` of the text rows then
  the image rows, in fp32 (:func:`rope_tables`); the tables are diffusers', never rebuilt.
* ``encoder_hidden_states_mask``: a bool mask of shape (B, L_txt) (the model turns any mask into bool;
  diffusers' processor keeps the masked text keys and every image key). An all-True mask is dropped --
  attending every key is what it means. A mask that keeps a prefix of each sample's text (tokenizer
  padding; none kept is allowed) runs as per-sample key lengths over the joint sequence taken in the
  order [image, text] (``flux_double(image_first=True)``, the RoPE tables in that order too): attention
  is the same function of the keys in any order, and in that order the kept keys are a prefix of
  L_img + n_b. Deciding reads the mask (one device sync per block call, and no
  ``torch.compile(fullgraph=True)`` with a mask); the Qwen-Image pipelines pass None for an all-True mask.
* ``zero_cond_t`` / ``modulate_index`` (Qwen-Image-Edit-2511): ``temb`` has 2B rows (the timestep's,
  then timestep 0's); each image token takes its modulation from row b (index 0) or row B + b
  (otherwise), the text stream from the first B rows. This runs on ditfast as per-token (B, L, D)
  modulations, materialized with the same ``torch.where`` diffusers uses (exact selection), which
  the ops take as they take per-sample ones.

diffusers' own forward runs instead (same call, same result), with a one-time warning per reason,
for: non-empty ``joint_attention_kwargs``; an attention processor other than
``QwenDoubleStreamAttnProcessor2_0``; dtypes other than fp32 / bf16 / fp16; an
``encoder_hidden_states_mask`` whose kept text tokens are not a prefix per sample, or any mask under
context parallelism (the ranks must take the same path); a
``modulate_index`` / ``zero_cond_t`` combination other than the one above; RoPE tables not in the
format above. Hooks follow the FLUX rule (ditfast/integrations/_hooks.py): hooks on the attention
module or its QK-norms make the block call that module in place of ditfast's attention step; hooks on
a LayerNorm make it run diffusers' forward (warned once).

Context parallelism and diffusers' attention backends: the attention step goes through
:func:`ditfast.integrations._context_parallel.attention_for`, as for FLUX.
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
    gelu_tanh_ff,
    is_diffusers,
    no_kwargs,
    out_proj,
    prefix_lengths,
    rms_eps,
    rms_weight,
    warn_fallback_once,
)

_PROCESSOR = "QwenDoubleStreamAttnProcessor2_0"

# the submodules diffusers' forward calls and ditfast's does not: hooks on the attention module or its
# QK-norms make the block call the attention module; hooks on the LayerNorms make it run diffusers' forward
_BYPASSED = ("attn", "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k",
             "img_norm1", "img_norm2", "txt_norm1", "txt_norm2")


def rope_tables(image_rotary_emb, len_txt: int, len_img: int, head_dim: int, image_first: bool = False):
    """diffusers' ``(image_freqs, text_freqs)`` complex64 tables -> ditfast's fp32 ``(cos, sin)`` of
    the joint sequence [text, image] ([image, text] with ``image_first``), each (L_txt + L_img, Dh/2).
    None without RoPE; False when the argument is not in that format (diffusers' forward runs then)."""
    if image_rotary_emb is None:
        return None
    if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
        return False
    img, txt = image_rotary_emb
    for t, length in ((img, len_img), (txt, len_txt)):
        if (not isinstance(t, torch.Tensor) or t.dtype != torch.complex64 or t.dim() != 2
                or tuple(t.shape) != (length, head_dim // 2)):
            return False
    first, second = (img, txt) if image_first else (txt, img)
    return torch.cat((first.real, second.real)), torch.cat((first.imag, second.imag))


def _fallback_reason(block, hidden_states, encoder_hidden_states, mask, temb, kwargs,
                     modulate_index) -> Optional[Tuple[str, str]]:
    """(key, reason) when ditfast cannot run this call exactly; None when it can."""
    attn = block.attn
    B, Li, Lt = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
    if not no_kwargs(kwargs):
        return "kwargs", f"joint_attention_kwargs ({', '.join(map(str, kwargs))}), which ditfast does not take"
    if not is_diffusers(attn.processor, _PROCESSOR):
        return "processor", (f"the attention processor {describe(attn.processor)} (ditfast runs "
                             f"{_PROCESSOR}'s math only)")
    if not fast_dtypes(hidden_states, encoder_hidden_states, temb):
        dtypes = sorted({str(t.dtype) for t in (hidden_states, encoder_hidden_states, temb)})
        return "dtype", f"{'/'.join(dtypes)} inputs (ditfast's ops take float32, bfloat16 and float16)"
    if mask is not None:
        if _context_parallel.parallel_config(attn) is not None:
            return "mask-cp", ("an encoder_hidden_states_mask under context parallelism (each rank holds part of "
                               "the mask; ditfast drops only an all-True mask, which one rank cannot decide)")
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == (B, Lt)):
            return "mask", (f"an encoder_hidden_states_mask that is not a bool (B, L_txt) = {(B, Lt)} tensor "
                            "(the model passes one)")
    zero = bool(getattr(block, "zero_cond_t", False))
    if zero or modulate_index is not None:
        ok = (zero and isinstance(modulate_index, torch.Tensor) and tuple(modulate_index.shape) == (B, Li)
              and not modulate_index.is_floating_point() and temb.dim() == 2 and temb.shape[0] == 2 * B)
        if not ok:
            return "modulate_index", (f"zero_cond_t={zero} and a modulate_index of shape "
                                      f"{None if modulate_index is None else tuple(modulate_index.shape)} for "
                                      f"temb {tuple(temb.shape)} (ditfast runs zero_cond_t with a (B, L_img) index "
                                      f"and 2B temb rows)")
    return None


def _attention_call(block, image_rotary_emb, mask):
    """None: no bypassed module is hooked. A callable calling the attention module as diffusers'
    forward does, when only it and its QK-norms are hooked. False (warned once): another bypassed
    module is hooked, diffusers' forward must run."""
    names = _hooks.hooked_names(block, _BYPASSED)
    if not names:
        return None
    if all(n == "attn" or n.startswith("attn.") for n in names):
        return functools.partial(_call_attention, block.attn, image_rotary_emb, mask)
    _hooks.warn_fallback(block, next(n for n in names if not n.startswith("attn")))
    return False


def _call_attention(attn, image_rotary_emb, mask, h_img, h_txt):
    # mask: None when it was None or all True (dropped: attending every key is what it means)
    return attn(hidden_states=h_img, encoder_hidden_states=h_txt, encoder_hidden_states_mask=mask,
                image_rotary_emb=image_rotary_emb)


def _modulations(block, temb, modulate_index, batch: int):
    """The six (shift, scale, gate) x 2 chunks of each stream, (B, D) views or, with modulate_index,
    per-token (B, L_img, D) selections of the image stream's two rows (diffusers' torch.where)."""
    img = block.img_mod(temb).chunk(6, dim=-1)
    txt = block.txt_mod(temb.chunk(2, dim=0)[0] if getattr(block, "zero_cond_t", False) else temb).chunk(6, dim=-1)
    if modulate_index is not None:
        first = (modulate_index == 0).unsqueeze(-1)  # (B, L_img, 1)
        img = tuple(torch.where(first, m[:batch].unsqueeze(1), m[batch:].unsqueeze(1)) for m in img)
    return img, txt


def qwen_block_forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                       image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
    """ditfast forward of diffusers' ``QwenImageTransformerBlock``; returns (encoder_hidden_states, hidden_states)."""
    attn = self.attn
    head_dim = attn.inner_dim // attn.heads
    why = _fallback_reason(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                           joint_attention_kwargs, modulate_index)
    rope, text_lengths = None, None
    if why is None and encoder_hidden_states_mask is not None:
        # None (all kept: dropped), per-sample counts of a kept prefix, or False
        text_lengths = prefix_lengths(encoder_hidden_states_mask, allow_empty=True)
        if text_lengths is False:
            why = "mask", "an encoder_hidden_states_mask whose kept text tokens are not a prefix per sample"
    image_first = bool(text_lengths)  # a padded text: [image, text], whose kept keys are a prefix
    if why is None:
        rope = rope_tables(image_rotary_emb, encoder_hidden_states.shape[1], hidden_states.shape[1], head_dim,
                           image_first)
        if rope is False:
            why = "rope", ("an image_rotary_emb that is not diffusers' (image, text) complex64 tables of shapes "
                           "(L_img, Dh/2), (L_txt, Dh/2)")
    attn_call = False if why is not None else _attention_call(
        self, image_rotary_emb, encoder_hidden_states_mask if image_first else None)
    if attn_call is False:
        if why is not None:
            warn_fallback_once(self, *why)
        return type(self).forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                                  image_rotary_emb, joint_attention_kwargs, modulate_index)
    img_mod, txt_mod = _modulations(self, temb, modulate_index, hidden_states.shape[0])
    # the feed-forwards as FLUX's (gelu_tanh_ff: the GELU in the matmul's epilogue in CUDA inference, its
    # backward fused with the bias gradient in training)
    img_s = F.Stream((attn.to_q, attn.to_k, attn.to_v), functools.partial(out_proj, attn),
                     functools.partial(gelu_tanh_ff, self.img_mlp),
                     rms_weight(attn.norm_q), rms_weight(attn.norm_k), self.img_norm1.eps, self.img_norm2.eps)
    txt_s = F.Stream((attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), attn.to_add_out,
                     functools.partial(gelu_tanh_ff, self.txt_mlp),
                     rms_weight(attn.norm_added_q), rms_weight(attn.norm_added_k), self.txt_norm1.eps,
                     self.txt_norm2.eps)
    key_lengths = tuple(hidden_states.shape[1] + n for n in text_lengths) if image_first else None
    x, c = F.flux_double(hidden_states, encoder_hidden_states, img_mod, txt_mod, rope, img_s, txt_s,
                         head_dim=head_dim, qk_eps=rms_eps(attn.norm_q, attn.norm_added_q),
                         attention=None if image_first else _context_parallel.attention_for(attn),
                         attn_call=attn_call, image_first=image_first, key_lengths=key_lengths)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return c, x


# ---------------------------------------------------------------------------------------------- checks


def _check_mod(mod, dim: int, where: str, problems: List[str]) -> None:
    ok = (isinstance(mod, nn.Sequential) and len(mod) == 2 and isinstance(mod[0], nn.SiLU)
          and getattr(mod[1], "out_features", None) == 6 * dim)
    if not ok:
        problems.append(f"{where} is {describe(mod)}, expected Sequential(SiLU, Linear({dim}, {6 * dim}))")


def _check_attention(attn, dim: int, problems: List[str]) -> None:
    if not is_diffusers(attn, "Attention"):
        problems.append(f"attn is {describe(attn)}, expected diffusers' Attention")
        return
    names = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out", "to_add_out"]
    if not check_linears(attn, names, "attn", problems):
        return
    inner, heads = getattr(attn, "inner_dim", None), getattr(attn, "heads", None)
    if not inner or not heads or inner % heads:
        problems.append(f"attn: inner_dim {inner} is not a multiple of heads {heads}")
        return
    for name in names[:6]:
        lin = getattr(attn, name)
        if (getattr(lin, "in_features", None), getattr(lin, "out_features", None)) != (dim, inner):
            problems.append(f"attn.{name} maps {getattr(lin, 'in_features', None)} -> "
                            f"{getattr(lin, 'out_features', None)}, expected {dim} -> {inner}")
    head_dim = inner // heads
    check_rms_pair(attn, "norm_q", "norm_k", head_dim, "attn", problems)
    check_rms_pair(attn, "norm_added_q", "norm_added_k", head_dim, "attn", problems)
    check_qk_eps([(n, getattr(attn, n, None)) for n in ("norm_q", "norm_added_q")], "attn", problems)


def check_block(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), qwen_block_forward, problems)
    names = ["attn", "img_mod", "txt_mod", "img_norm1", "img_norm2", "txt_norm1", "txt_norm2", "img_mlp", "txt_mlp"]
    if not check_linears(block, names, "block", problems):
        return problems
    dim = getattr(getattr(block.attn, "to_q", None), "in_features", None)
    if dim is None:
        return problems + [f"attn is {describe(block.attn)} without to_q"]
    _check_mod(block.img_mod, dim, "img_mod", problems)
    _check_mod(block.txt_mod, dim, "txt_mod", problems)
    for name in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2"):
        check_layer_norm(getattr(block, name), dim, name, problems)
    _check_attention(block.attn, dim, problems)
    return problems


SPECS = (BlockSpec("QwenImageTransformerBlock", check_block, qwen_block_forward),)
