"""ditfast forward for diffusers' HunyuanVideo 1.0 blocks (``HunyuanVideoTransformerBlock`` and
``HunyuanVideoSingleTransformerBlock`` in ``transformer_hunyuan_video.py``; written against diffusers 0.42.1,
and ``check_signature`` refuses a version whose block forwards take other arguments), used by
``HunyuanVideoTransformer3DModel`` (20 double + 40 single blocks; HunyuanImage 2.1 shares the topology).

FLUX.1's topology, so the math is :func:`ditfast.nn.functional.flux_double` and
:func:`~ditfast.nn.functional.flux_single`. What HunyuanVideo does differently, and how this module
adapts it:

* Joint order [video; text] (``flux_double(image_first=True)``; the single blocks' joint sequence is
  [video; text] too), both returned as (hidden_states, encoder_hidden_states).
* RoPE on the video tokens only: diffusers' (cos, sin) tables (L_video, Dh), repeat-interleaved (FLUX.1's
  format: ditfast reads ``cos[:, 0::2]``), extended with identity rows (cos 1, sin 0: an exact no-op) for
  the text tokens.
* The attention mask: the model always passes (B, 1, 1, L) bool, True on the video tokens and on each
  sample's valid text tokens -- a prefix of the joint sequence, run as per-sample key lengths
  (``ops.joint_attention(key_lengths=)``); any other mask runs diffusers' forward.
* Modulation: ``norm1`` / ``norm1_context`` (``AdaLayerNormZero``) and the single block's
  ``AdaLayerNormZeroSingle``, FLUX.1's chunk order; diffusers' ``Attention`` with
  ``HunyuanVideoAttnProcessor2_0`` (biased q/k/v, per-head RMS QK-norm, ``to_out`` / ``to_add_out``);
  GELU(tanh) FeedForwards and the single block's ``proj_mlp`` (``gelu_tanh_ff`` / ``linear_gelu_tanh``).

diffusers' own forward runs instead (same call, same result), with a one-time warning per reason, for:
a mask that is not a prefix per sample, a mask under context parallelism, an attention processor other
than ``HunyuanVideoAttnProcessor2_0``, dtypes other than fp32 / bf16 / fp16, RoPE tables not in the format
above, and a hook on a module ditfast's forward does not call. The extra arguments the model passes every
block (``token_replace_emb``, ``first_frame_num_tokens``) are ignored, as diffusers' blocks do; the
token-replace (I2V) blocks are other classes and stay diffusers'; the token refiner is not patched.
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
    out_proj,
    prefix_lengths,
    rms_eps,
    stream,
    warn_fallback_once,
)

_PROCESSOR = "HunyuanVideoAttnProcessor2_0"
_BYPASSED_DOUBLE = ("attn", "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k",
                    "norm1", "norm1_context", "norm1.norm", "norm1_context.norm", "norm2", "norm2_context")
_BYPASSED_SINGLE = ("attn", "attn.norm_q", "attn.norm_k", "norm", "norm.norm")


def rope_tables(image_rotary_emb, L_video: int, L_text: int, head_dim: int):
    """diffusers' video (cos, sin), each (L_video, Dh) repeat-interleaved -> fp32 (L, Dh/2) tables of the joint
    [video; text] sequence, identity rows for the text. None without RoPE; False when not in that format."""
    if image_rotary_emb is None:
        return None
    if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
        return False
    cos, sin = image_rotary_emb
    for t in (cos, sin):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (L_video, head_dim):
            return False
    cos, sin = cos[:, 0::2].float(), sin[:, 0::2].float()
    return (torch.cat((cos, cos.new_ones((L_text, cos.shape[1])))),
            torch.cat((sin, sin.new_zeros((L_text, sin.shape[1])))))


def _fast(block, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb):
    """(rope, key lengths, None) for a call ditfast runs, or (None, None, (key, reason))."""
    attn = block.attn  # extra arguments (token_replace_emb, first_frame_num_tokens): ignored, as diffusers' block does
    if not is_diffusers(attn.processor, _PROCESSOR):
        return None, None, ("processor", f"the attention processor {describe(attn.processor)} (ditfast runs "
                                         f"{_PROCESSOR}'s math only)")
    if not fast_dtypes(hidden_states, encoder_hidden_states, temb):
        dtypes = sorted({str(t.dtype) for t in (hidden_states, encoder_hidden_states, temb)})
        return None, None, ("dtype", f"{'/'.join(dtypes)} inputs (ditfast's ops take float32, bfloat16 and float16)")
    B, Lv, Lt = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
    rope = rope_tables(image_rotary_emb, Lv, Lt, attn.heads and (attn.inner_dim // attn.heads))
    if rope is False:
        return None, None, ("rope", "RoPE tables that are not diffusers' video (cos, sin) of shape (L_video, Dh)")
    lengths = None
    if attention_mask is not None:
        if _context_parallel.parallel_config(attn) is not None:
            return None, None, ("mask-cp", "an attention mask under context parallelism")
        m = attention_mask
        ok = isinstance(m, torch.Tensor) and m.dtype == torch.bool and tuple(m.shape) == (B, 1, 1, Lv + Lt)
        lengths = prefix_lengths(m[:, 0, 0]) if ok else False
        if lengths is False:
            return None, None, ("mask", "an attention mask whose kept keys are not a prefix of [video; text]")
    return rope, lengths, None


def double_block_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, freqs_cis=None,
                         *args, **kwargs):
    """ditfast forward of diffusers' ``HunyuanVideoTransformerBlock``; returns (hidden_states, encoder_hidden_states)."""
    rope, lengths, why = _fast(self, hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis)
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED_DOUBLE):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis,
                                  *args, **kwargs)
    attn = self.attn
    img_s = stream(attn, False, functools.partial(out_proj, attn), functools.partial(gelu_tanh_ff, self.ff),
                   self.norm1.norm.eps, self.norm2.eps)
    txt_s = stream(attn, True, attn.to_add_out, functools.partial(gelu_tanh_ff, self.ff_context),
                   self.norm1_context.norm.eps, self.norm2_context.eps)
    return F.flux_double(hidden_states, encoder_hidden_states, ada_chunks(self.norm1, temb, 6),
                         ada_chunks(self.norm1_context, temb, 6), rope, img_s, txt_s,
                         head_dim=attn.inner_dim // attn.heads, qk_eps=rms_eps(attn.norm_q, attn.norm_added_q),
                         attention=None if lengths is not None else _context_parallel.attention_for(attn),
                         image_first=True, key_lengths=lengths)


def _gelu_tanh(block) -> bool:
    act = block.act_mlp
    return type(act) is torch.nn.GELU and act.approximate == "tanh" and F.unhooked(act)


def _single_mlp(block, h):
    return F.linear_gelu_tanh(block.proj_mlp, h) if _gelu_tanh(block) else block.act_mlp(block.proj_mlp(h))


def single_block_forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None,
                         *args, **kwargs):
    """ditfast forward of diffusers' ``HunyuanVideoSingleTransformerBlock``; returns (hidden_states, encoder_hidden_states)."""
    rope, lengths, why = _fast(self, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb)
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED_SINGLE + ("act_mlp",)):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb,
                                  *args, **kwargs)
    attn, Lv = self.attn, hidden_states.shape[1]
    x = torch.cat((hidden_states, encoder_hidden_states), dim=1)  # [video; text]
    s = stream(attn, False, self.proj_out, functools.partial(_single_mlp, self), self.norm.norm.eps)
    x = F.flux_single(x, ada_chunks(self.norm, temb, 3), rope, s, head_dim=attn.inner_dim // attn.heads,
                      qk_eps=rms_eps(attn.norm_q), gelu_linear=self.proj_mlp if _gelu_tanh(self) else None,
                      attention=None if lengths is not None else _context_parallel.attention_for(attn),
                      key_lengths=lengths)
    return x[:, :Lv], x[:, Lv:]


# ---------------------------------------------------------------------------------------------- checks


def _check_attention(attn, dim: int, added: bool, problems: List[str]) -> None:
    if not is_diffusers(attn, "Attention"):
        problems.append(f"attn is {describe(attn)}, expected diffusers' Attention")
        return
    names = ["to_q", "to_k", "to_v"] + (["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_out"] if added else [])
    if not check_linears(attn, names, "attn", problems):
        return
    inner, heads = attn.inner_dim, attn.heads
    if inner % heads or inner != dim:
        problems.append(f"attn: inner_dim {inner}, heads {heads}, model dim {dim}")
        return
    check_rms_pair(attn, "norm_q", "norm_k", inner // heads, "attn", problems)
    norms = [("norm_q", getattr(attn, "norm_q", None))]
    if added:
        check_rms_pair(attn, "norm_added_q", "norm_added_k", inner // heads, "attn", problems)
        norms.append(("norm_added_q", getattr(attn, "norm_added_q", None)))
    check_qk_eps(norms, "attn", problems)


def check_double(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), double_block_forward, problems)
    if not check_linears(block, ["attn", "norm1", "norm1_context", "norm2", "norm2_context", "ff", "ff_context"],
                         "block", problems):
        return problems
    dim = getattr(block.attn.to_q, "in_features", None)
    _check_attention(block.attn, dim, True, problems)
    check_ada_norm(block.norm1, ("AdaLayerNormZero",), 6, dim, "norm1", problems)
    check_ada_norm(block.norm1_context, ("AdaLayerNormZero",), 6, dim, "norm1_context", problems)
    check_layer_norm(block.norm2, dim, "norm2", problems)
    check_layer_norm(block.norm2_context, dim, "norm2_context", problems)
    return problems


def check_single(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), single_block_forward, problems)
    if not check_linears(block, ["attn", "norm", "proj_mlp", "act_mlp", "proj_out"], "block", problems):
        return problems
    dim = getattr(block.attn.to_q, "in_features", None)
    _check_attention(block.attn, dim, False, problems)
    check_ada_norm(block.norm, ("AdaLayerNormZeroSingle",), 3, dim, "norm", problems)
    if block.proj_out.in_features != dim + block.proj_mlp.out_features:
        problems.append(f"proj_out maps {block.proj_out.in_features}, expected {dim} + {block.proj_mlp.out_features}")
    return problems


SPECS = (
    BlockSpec("HunyuanVideoTransformerBlock", check_double, double_block_forward),
    BlockSpec("HunyuanVideoSingleTransformerBlock", check_single, single_block_forward),
)
