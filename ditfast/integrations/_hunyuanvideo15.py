"""ditfast forward for diffusers' HunyuanVideo 1.5 block (``HunyuanVideo15TransformerBlock`` in
``transformer_hunyuan_video15.py``; written against diffusers 0.42.1, and ``check_signature`` refuses a
version whose block forward takes other arguments), used by ``HunyuanVideo15Transformer3DModel`` (54
double-stream blocks, no single-stream blocks; T2V and I2V, and the ``use_meanflow`` variant, which
only adds a ``timestep_r`` embedding to ``temb``).

The block is HunyuanVideo 1.0's double-stream block with another attention processor
(``HunyuanVideo15AttnProcessor2_0``), so the math is :func:`ditfast.nn.functional.flux_double` with
``image_first=True``, as in :mod:`._hunyuanvideo` (whose RoPE adaptation and attention checks this
module reuses):

* Joint order [video; text], returned as (hidden_states, encoder_hidden_states). The "text" is what the
  model built before the blocks: per sample [valid image tokens (I2V's SigLIP embeddings); valid ByT5
  tokens; valid MLLM tokens; then the invalid ones], each with its cond-type embedding added -- the
  image projection, the ByT5 projection, the token refiner and the cond-type embeddings run before
  the first block and stay diffusers'.
* RoPE on the video tokens only: diffusers' (cos, sin) tables (L_video, Dh), repeat-interleaved,
  extended with identity rows (cos 1, sin 0) for the text (``_hunyuanvideo.rope_tables``).
* The attention mask differs from 1.0's. The block receives the model's (B, L_text) text mask; the
  processor left-pads it with True to the joint length, applies ``.bool()`` and masks queries *and*
  keys (``keep[i] & keep[j]``), so a masked query row attends nothing and SDPA returns zeros for it
  (before ``to_out`` / ``to_add_out``, so that token's attention output is the projection's bias).
  The model's reordering puts each sample's valid tokens first, so the kept tokens are a prefix of
  [video; text]: run as per-sample key lengths (``flux_double(key_lengths=)``), and each stream's rows
  past its sample's prefix are set to zero before its output projection (exactly what SDPA gives
  them; their gradient is zero as in diffusers). The mask may have any dtype (``.bool()``, as the
  processor) and any length up to the joint length (left-padded with True, as the processor).
  ``attention_mask=None``, which diffusers' processor cannot take (``F.pad`` of None raises), runs as
  every token kept -- what diffusers computes for an all-True mask; it is also the form that
  compiles (reading a mask's prefix lengths is a host sync).
* Modulation: ``norm1`` / ``norm1_context`` (``AdaLayerNormZero``: shift, scale, gate ×2), LayerNorms
  without affine parameters (eps 1e-6); diffusers' ``Attention`` with biased q/k/v and per-head RMS
  QK-norm on both streams, ``to_out`` / ``to_add_out``; GELU(tanh) FeedForwards (``gelu_tanh_ff``).

diffusers' own forward runs instead (same call, same result), with a one-time warning per reason, for:
a mask whose kept tokens are not a prefix per sample (or keep no token of a sample), a mask that is not
a (B, n <= L_video + L_text) tensor, a mask under context parallelism, an attention processor other
than ``HunyuanVideo15AttnProcessor2_0``, dtypes other than fp32 / bf16 / fp16, RoPE tables not in the
format above, and a hook on a module ditfast's forward does not call (the attention module, its
QK-norms, the adaLN modules and LayerNorms). Extra positional / keyword arguments are ignored, as
diffusers' block does. With a padded mask ditfast's attention runs even where a diffusers attention
backend other than "native" is chosen (as for 1.0); without padding the chosen backend attends.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from ..nn import functional as F
from . import _context_parallel, _hooks
from ._common import (
    BlockSpec,
    ada_chunks,
    check_ada_norm,
    check_layer_norm,
    check_linears,
    check_signature,
    describe,
    fast_dtypes,
    gelu_tanh_ff,
    is_diffusers,
    out_proj,
    prefix_lengths,
    rms_eps,
    stream,
    warn_fallback_once,
)
from ._hunyuanvideo import _BYPASSED_DOUBLE, _check_attention, rope_tables

_PROCESSOR = "HunyuanVideo15AttnProcessor2_0"
_BYPASSED = _BYPASSED_DOUBLE  # the same modules as 1.0's double block


class _Plan:
    """What one ditfast call of the block needs besides the block's modules."""

    __slots__ = ("rope", "lengths", "keep_video", "keep_text")

    def __init__(self, rope, lengths=None, keep_video=None, keep_text=None):
        self.rope, self.lengths = rope, lengths
        self.keep_video, self.keep_text = keep_video, keep_text  # (B, L_i) bool, None where every row is kept


def _keep_mask(attention_mask, B: int, L: int):
    """The processor's joint (B, L) keep mask: ``F.pad(mask, (L - n, 0), value=True).bool()``; None when
    the mask is not a (B, n <= L) tensor (the processor's view would fail or mean something else)."""
    m = attention_mask
    if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != B or m.shape[1] > L or m.is_complex():
        return None
    m = m.bool()
    if m.shape[1] == L:
        return m
    return torch.cat((m.new_ones((B, L - m.shape[1])), m), dim=1)


def _fast(block, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb):
    """(plan, None) for a call ditfast runs, or (None, (key, reason))."""
    attn = block.attn
    if not is_diffusers(attn.processor, _PROCESSOR):
        return None, ("processor", f"the attention processor {describe(attn.processor)} (ditfast runs "
                                   f"{_PROCESSOR}'s math only)")
    if not fast_dtypes(hidden_states, encoder_hidden_states, temb):
        dtypes = sorted({str(t.dtype) for t in (hidden_states, encoder_hidden_states, temb)})
        return None, ("dtype", f"{'/'.join(dtypes)} inputs (ditfast's ops take float32, bfloat16 and float16)")
    B, Lv, Lt = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
    rope = rope_tables(image_rotary_emb, Lv, Lt, attn.heads and (attn.inner_dim // attn.heads))
    if rope is False:
        return None, ("rope", "RoPE tables that are not diffusers' video (cos, sin) of shape (L_video, Dh)")
    if attention_mask is None:
        return _Plan(rope), None
    if _context_parallel.parallel_config(attn) is not None:
        return None, ("mask-cp", "an attention mask under context parallelism")
    keep = _keep_mask(attention_mask, B, Lv + Lt)
    if keep is None:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else describe(attention_mask)
        return None, ("mask-shape", f"an attention mask of shape {shape} (ditfast takes the processor's "
                                    f"(B, n <= L_video + L_text) mask)")
    lengths = prefix_lengths(keep)
    if lengths is False:
        return None, ("mask", "an attention mask whose kept tokens are not a prefix of [video; text]")
    if lengths is None:
        return _Plan(rope), None
    return _Plan(rope, lengths, keep[:, :Lv] if min(lengths) < Lv else None, keep[:, Lv:]), None


def _zero_masked_rows(proj, keep: Optional[torch.Tensor]):
    """``proj`` applied to the attention output with the rows of masked queries set to 0 (what SDPA returns
    for a query whose every key is masked); ``proj`` itself when no row is masked."""
    if keep is None:
        return proj
    return lambda o: proj(o.masked_fill(~keep.unsqueeze(-1), 0))


def block_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, freqs_cis=None,
                  *args, **kwargs):
    """ditfast forward of diffusers' ``HunyuanVideo15TransformerBlock``; returns (hidden_states, encoder_hidden_states)."""
    plan, why = _fast(self, hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis)
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis,
                                  *args, **kwargs)
    attn = self.attn
    img_s = stream(attn, False, _zero_masked_rows(functools.partial(out_proj, attn), plan.keep_video),
                   functools.partial(gelu_tanh_ff, self.ff), self.norm1.norm.eps, self.norm2.eps)
    txt_s = stream(attn, True, _zero_masked_rows(attn.to_add_out, plan.keep_text),
                   functools.partial(gelu_tanh_ff, self.ff_context), self.norm1_context.norm.eps,
                   self.norm2_context.eps)
    return F.flux_double(hidden_states, encoder_hidden_states, ada_chunks(self.norm1, temb, 6),
                         ada_chunks(self.norm1_context, temb, 6), plan.rope, img_s, txt_s,
                         head_dim=attn.inner_dim // attn.heads, qk_eps=rms_eps(attn.norm_q, attn.norm_added_q),
                         attention=None if plan.lengths is not None else _context_parallel.attention_for(attn),
                         image_first=True, key_lengths=plan.lengths)


# ---------------------------------------------------------------------------------------------- checks


def check_block(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), block_forward, problems)
    if not check_linears(block, ["attn", "norm1", "norm1_context", "norm2", "norm2_context", "ff", "ff_context"],
                         "block", problems):
        return problems
    dim = getattr(block.attn.to_q, "in_features", None)
    _check_attention(block.attn, dim, True, problems)
    for name in ("norm_q", "norm_k"):  # the processor calls them unconditionally
        if is_diffusers(block.attn, "Attention") and getattr(block.attn, name, None) is None:
            problems.append(f"attn.{name} is None; diffusers' {_PROCESSOR} requires the QK-norm (qk_norm='rms_norm')")
    check_ada_norm(block.norm1, ("AdaLayerNormZero",), 6, dim, "norm1", problems)
    check_ada_norm(block.norm1_context, ("AdaLayerNormZero",), 6, dim, "norm1_context", problems)
    check_layer_norm(block.norm2, dim, "norm2", problems)
    check_layer_norm(block.norm2_context, dim, "norm2_context", problems)
    return problems


SPECS = (BlockSpec("HunyuanVideo15TransformerBlock", check_block, block_forward),)
