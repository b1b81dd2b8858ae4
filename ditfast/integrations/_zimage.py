"""ditfast forward for diffusers' Z-Image block (``ZImageTransformerBlock`` in ``transformer_z_image.py``;
written against diffusers 0.42.1, and ``check_signature`` refuses a version whose block forward takes
other arguments), used by ``ZImageTransformer2DModel`` (Z-Image Turbo and Base, and the Omni mode)
for its noise refiner, its context (caption) refiner and its main layers.

The block is a single-stream "sandwich" block: the math is :func:`ditfast.nn.functional.sandwich_block`.
What the diffusers block does, and how this module adapts it:

* Signature ``(x, attn_mask, freqs_cis, adaln_input=None, noise_mask=None, adaln_noisy=None,
  adaln_clean=None)``; returns x. The model passes the sequence [image; caption] per sample, padded
  to the batch's longest with a (B, L) bool ``attn_mask`` that is True on a prefix (None when every
  sample has the same length).
* Norms: four diffusers ``RMSNorm`` (``attention_norm1/2``, ``ffn_norm1/2``) with weights, no bias,
  one eps (``norm_eps``); the "1" norms before each branch, the "2" norms on its output.
* Modulation (``modulation=True``): ``adaLN_modulation`` (Sequential(Linear(256, 4D))) of
  ``adaln_input``, chunks (scale_msa, gate_msa, scale_mlp, gate_mlp), used as ``1 + scale`` and
  ``tanh(gate)``: the ops take the raw chunks with ``gate_act="tanh"``. Omni mode (``noise_mask``):
  two modulations (of ``adaln_noisy`` and ``adaln_clean``), each token taking one by its noise mask,
  materialized per token with the same ``torch.where`` diffusers uses (exact selection). Blocks with
  ``modulation=False`` (the refiners of the caption and SigLIP streams) have no scale or gate.
* Attention: diffusers' ``Attention`` with ``ZSingleStreamAttnProcessor``: ``to_q/k/v`` without bias,
  per-head RMS QK-norm (``norm_q/k``), RoPE as complex products of consecutive pairs with the
  per-sample complex64 ``freqs_cis`` (B, L, Dh/2): ditfast's interleaved rotation with ``cos = real``,
  ``sin = imag`` (fp32, diffusers' tables, never rebuilt); ``to_out`` (Linear, Dropout).
* MLP: ``FeedForward`` (w2(silu(w1 x) * w3 x)): its three Linears called as modules (LoRA works) around
  :func:`ditfast.ops.swiglu`; a hooked feed-forward is called as the module.

The ``attn_mask`` of a padded batch keeps a prefix of each sample's tokens: ditfast runs it as per-sample
key lengths (``ops.joint_attention(key_lengths=)``); the padded query rows attend the valid keys, as in
diffusers.

diffusers' own forward runs instead (same call, same result), with a one-time warning per reason, for:
a mask whose kept keys are not a prefix, or any mask under context parallelism; dtypes other than fp32 / bf16 / fp16;
an attention processor other than ``ZSingleStreamAttnProcessor``; ``freqs_cis`` not in the format
above; ``noise_mask`` without both omni embeddings; a hook on a module ditfast's forward does not call
(the attention module, its QK-norms, the four RMSNorms: ditfast/integrations/_hooks.py).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..nn import functional as F
from . import _context_parallel, _hooks
from ._common import (
    BlockSpec,
    check_linears,
    check_qk_eps,
    check_rms_pair,
    check_signature,
    describe,
    fast_dtypes,
    is_diffusers,
    out_proj,
    prefix_lengths,
    rms_eps,
    rms_weight,
    warn_fallback_once,
)

_PROCESSOR = "ZSingleStreamAttnProcessor"
_NORMS = ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")
# the submodules diffusers' forward calls and ditfast's does not: a hook on any of them runs diffusers' forward
_BYPASSED = ("attention", "attention.norm_q", "attention.norm_k") + _NORMS


def rope_tables(freqs_cis, B: int, L: int, head_dim: int):
    """diffusers' per-sample complex64 ``freqs_cis`` (B, L, Dh/2) -> fp32 ``(cos, sin)`` (B, L, Dh/2).
    None without RoPE; False when the argument is not in that format."""
    if freqs_cis is None:
        return None
    if (not isinstance(freqs_cis, torch.Tensor) or freqs_cis.dtype != torch.complex64
            or tuple(freqs_cis.shape) != (B, L, head_dim // 2)):
        return False
    return freqs_cis.real, freqs_cis.imag


def _key_lengths(block, x, attn_mask):
    """(per-sample key lengths or None, None) for a mask ditfast runs -- none, all True, or a valid prefix
    per sample (the model's padding of unequal lengths) -- or (None, (key, reason))."""
    if attn_mask is None:
        return None, None
    if _context_parallel.parallel_config(block.attention) is not None:
        return None, ("mask-cp", "an attn_mask under context parallelism (each rank holds part of the mask)")
    B, L = x.shape[:2]
    if not (isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool and tuple(attn_mask.shape) == (B, L)):
        return None, ("mask", f"an attn_mask that is not a (B, L) bool key-padding mask ({describe(attn_mask)})")
    lengths = prefix_lengths(attn_mask)
    if lengths is False:
        return None, ("mask", "an attn_mask whose valid keys are not a prefix of each sample's sequence")
    return lengths, None


def _fallback_reason(block, x, attn_mask, adaln_input, noise_mask, adaln_noisy, adaln_clean):
    """(key, reason) when ditfast cannot run this call exactly; None when it can."""
    if not is_diffusers(block.attention.processor, _PROCESSOR):
        return "processor", (f"the attention processor {describe(block.attention.processor)} (ditfast runs "
                             f"{_PROCESSOR}'s math only)")
    conds = (adaln_input, adaln_noisy, adaln_clean) if block.modulation else ()
    if not fast_dtypes(x, *conds):
        dtypes = sorted({str(t.dtype) for t in (x, *conds) if t is not None})
        return "dtype", f"{'/'.join(dtypes)} inputs (ditfast's ops take float32, bfloat16 and float16)"
    if block.modulation:
        if noise_mask is not None and (adaln_noisy is None or adaln_clean is None):
            return "noise_mask", "a noise_mask without both adaln_noisy and adaln_clean"
        if noise_mask is None and adaln_input is None:
            return "adaln", "a modulated block called without adaln_input"
    return None


def _modulation(block, x, adaln_input, noise_mask, adaln_noisy, adaln_clean):
    """(scale_msa, gate_msa, scale_mlp, gate_mlp), raw: (B, D) views, or per token (B, L, D) in Omni mode;
    None for an unmodulated block."""
    if not block.modulation:
        return None
    if noise_mask is None:
        return block.adaLN_modulation(adaln_input).chunk(4, dim=-1)
    noisy = block.adaLN_modulation(adaln_noisy).chunk(4, dim=-1)
    clean = block.adaLN_modulation(adaln_clean).chunk(4, dim=-1)
    pick = (noise_mask == 1).unsqueeze(-1)  # (B, L, 1), as diffusers' select_per_token
    return tuple(torch.where(pick, n.unsqueeze(1), c.unsqueeze(1)) for n, c in zip(noisy, clean))


def _feed_forward(ff, h):
    """Z-Image's ``FeedForward`` (w2(silu(w1 h) * w3 h)): its Linears called as modules around
    :func:`ditfast.ops.swiglu` when it is diffusers' own class (exactly), unhooked, its gating not replaced on
    the instance; else the module."""
    if is_diffusers(ff, "FeedForward") and F.unhooked(ff) and "_forward_silu_gating" not in ff.__dict__:
        return ff.w2(ops.swiglu(ff.w1(h), ff.w3(h)))
    return ff(h)


def zimage_block_forward(self, x, attn_mask, freqs_cis, adaln_input=None, noise_mask=None, adaln_noisy=None,
                         adaln_clean=None):
    """ditfast forward of diffusers' ``ZImageTransformerBlock``; returns x."""
    attn = self.attention
    head_dim = attn.inner_dim // attn.heads
    why = _fallback_reason(self, x, attn_mask, adaln_input, noise_mask, adaln_noisy, adaln_clean)
    rope = lengths = None
    if why is None:
        lengths, why = _key_lengths(self, x, attn_mask)
    if why is None:
        rope = rope_tables(freqs_cis, x.shape[0], x.shape[1], head_dim)
        if rope is False:
            why = "rope", "freqs_cis that are not diffusers' complex64 (B, L, Dh/2) tables"
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED):
        return type(self).forward(self, x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean)
    mod = _modulation(self, x, adaln_input, noise_mask, adaln_noisy, adaln_clean)
    s = F.Stream((attn.to_q, attn.to_k, attn.to_v), functools.partial(out_proj, attn),
                 functools.partial(_feed_forward, self.feed_forward),
                 rms_weight(attn.norm_q), rms_weight(attn.norm_k), self.attention_norm1.eps)
    return F.sandwich_block(x, mod, s, tuple(getattr(self, n).weight for n in _NORMS), head_dim=head_dim,
                            eps=float(self.attention_norm1.eps), qk_eps=rms_eps(attn.norm_q, default=1e-5),
                            rope=rope, attention=None if lengths is not None else _context_parallel.attention_for(attn),
                            key_lengths=lengths)


# ---------------------------------------------------------------------------------------------- checks


def _check_norms(block, dim: int, problems: List[str]) -> None:
    eps = set()
    for name in _NORMS:
        norm = getattr(block, name, None)
        if not is_diffusers(norm, "RMSNorm"):
            problems.append(f"{name} is {describe(norm)}, expected diffusers' RMSNorm")
            continue
        w = getattr(norm, "weight", None)
        if w is None or tuple(w.shape) != (dim,) or getattr(norm, "bias", None) is not None:
            problems.append(f"{name} must be an RMSNorm({dim}) with a weight and no bias")
        if getattr(norm, "eps", None) is None:
            problems.append(f"{name} has eps=None")
        eps.add(getattr(norm, "eps", None))
    if len(eps) > 1:
        problems.append(f"the four RMSNorms have different eps {sorted(map(str, eps))}; ditfast takes one")


def check_block(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), zimage_block_forward, problems)
    names = ["attention", "feed_forward", *_NORMS]
    if not check_linears(block, names, "block", problems):
        return problems
    attn = block.attention
    if not is_diffusers(attn, "Attention"):
        return problems + [f"attention is {describe(attn)}, expected diffusers' Attention"]
    if not check_linears(attn, ["to_q", "to_k", "to_v", "to_out"], "attention", problems):
        return problems
    dim = getattr(attn.to_q, "in_features", None)
    inner, heads = getattr(attn, "inner_dim", None), getattr(attn, "heads", None)
    if not dim or not inner or not heads or inner % heads:
        return problems + [f"attention: inner_dim {inner} is not a multiple of heads {heads}"]
    for name in ("to_q", "to_k", "to_v"):
        lin = getattr(attn, name)
        if (getattr(lin, "in_features", None), getattr(lin, "out_features", None)) != (dim, inner):
            problems.append(f"attention.{name} maps {getattr(lin, 'in_features', None)} -> "
                            f"{getattr(lin, 'out_features', None)}, expected {dim} -> {inner}")
    check_rms_pair(attn, "norm_q", "norm_k", inner // heads, "attention", problems)
    check_qk_eps([(n, getattr(attn, n, None)) for n in ("norm_q",)], "attention", problems)
    _check_norms(block, dim, problems)
    if getattr(block, "modulation", None) is True:
        mod = getattr(block, "adaLN_modulation", None)
        ok = isinstance(mod, nn.Sequential) and len(mod) == 1 and getattr(mod[0], "out_features", None) == 4 * dim
        if not ok:
            problems.append(f"adaLN_modulation is {describe(mod)}, expected Sequential(Linear(·, {4 * dim}))")
    elif getattr(block, "modulation", None) is not False:
        problems.append(f"modulation is {getattr(block, 'modulation', None)!r}, expected True or False")
    return problems


SPECS = (BlockSpec("ZImageTransformerBlock", check_block, zimage_block_forward),)
