"""ditfast forward for diffusers' Wan 2.x block (``WanTransformerBlock`` in ``transformer_wan.py``; written
against diffusers 0.42.1, and ``check_signature`` refuses a version whose block forward takes other
arguments), used by ``WanTransformer3DModel`` (Wan 2.1 / 2.2 T2V and I2V, Wan 2.2 TI2V; SkyReels-V2
shares the block).

The math is :func:`ditfast.nn.functional.cross_block`. What the diffusers block does, and how this
module adapts it:

* Signature ``(hidden_states, encoder_hidden_states, temb, rotary_emb)``; returns hidden_states.
* Modulation (adaLN-single): ``scale_shift_table`` (1, 6, D) plus the shared timestep projection
  ``temb`` (B, 6, D), or per token (B, L, 6, D) for TI2V, summed in fp32 as diffusers does; the six
  chunks are (shift, scale, gate) of the self-attention and of the MLP. Every step is computed in
  fp32 and rounded once to the activations' dtype (diffusers' ``.float()`` ... ``.type_as(x)``): the
  ops' ``out_dtype``.
* Norms: ``norm1`` / ``norm3`` are ``FP32LayerNorm`` without affine parameters; ``norm2`` (before the
  cross-attention) is an affine ``FP32LayerNorm`` (``cross_attn_norm=True``) or ``Identity``.
* Attention (``WanAttention`` with ``WanAttnProcessor``): ``to_q/k/v`` (or ``to_qkv`` / ``to_kv`` after
  ``fuse_projections``), QK-RMSNorm over all heads at once (``norm_q/k``: one weight of H·Dh per token),
  RoPE on the self-attention only, from diffusers' (1, L, 1, Dh) repeat-interleaved tables (ditfast reads
  ``cos[..., 0::2]`` and ``sin[..., 1::2]``, as diffusers does), ``to_out`` (Linear, Dropout). The
  cross-attention attends the text, and for I2V (``add_k_proj``) also the image tokens that lead
  ``encoder_hidden_states`` (all but the last 512), the two outputs summed; its residual has no gate.
* MLP: diffusers' ``FeedForward`` with GELU(tanh) (``gelu_tanh_ff``: the GELU in the matmul's epilogue in
  CUDA inference, its backward fused with the bias gradient in training).

diffusers' own forward runs instead (same call, same result), with a one-time warning per reason, for:
an attention processor other than ``WanAttnProcessor``; dtypes other than fp32 / bf16 / fp16; RoPE
tables not in the format above; a hook on a module ditfast's forward does not call (the attention
modules, their QK-norms, the LayerNorms: ditfast/integrations/_hooks.py).
"""
from __future__ import annotations

import functools
from typing import List

import torch
from torch import nn

from ..nn import functional as F
from . import _context_parallel, _hooks
from ._common import (
    BlockSpec,
    check_linears,
    check_signature,
    describe,
    fast_dtypes,
    gelu_tanh_ff,
    is_diffusers,
    out_proj,
    warn_fallback_once,
)

_PROCESSOR = "WanAttnProcessor"
_TEXT_LEN = 512  # the text context's length in an I2V encoder_hidden_states (diffusers hardcodes it too)
_BYPASSED = ("attn1", "attn1.norm_q", "attn1.norm_k", "attn2", "attn2.norm_q", "attn2.norm_k",
             "attn2.norm_added_k", "norm1", "norm2", "norm3")


def rope_tables(rotary_emb, L: int, head_dim: int):
    """diffusers' (freqs_cos, freqs_sin), each (1, L, 1, Dh) repeat-interleaved -> fp32 (L, Dh/2) views;
    None without RoPE; False when not in that format."""
    if rotary_emb is None:
        return None
    if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
        return False
    cos, sin = rotary_emb
    for t in (cos, sin):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (1, L, 1, head_dim):
            return False
    return cos[0, :, 0, 0::2].float(), sin[0, :, 0, 1::2].float()


def _fallback_reason(block, hidden_states, encoder_hidden_states, temb):
    for name in ("attn1", "attn2"):
        proc = getattr(block, name).processor
        if not is_diffusers(proc, _PROCESSOR):
            return "processor", f"the attention processor {describe(proc)} (ditfast runs {_PROCESSOR}'s math only)"
    if not fast_dtypes(hidden_states, encoder_hidden_states, temb):
        dtypes = sorted({str(t.dtype) for t in (hidden_states, encoder_hidden_states, temb)})
        return "dtype", f"{'/'.join(dtypes)} inputs (ditfast's ops take float32, bfloat16 and float16)"
    B, L, D = hidden_states.shape
    if not ((temb.dim() == 3 and tuple(temb.shape) == (B, 6, D)) or (temb.dim() == 4 and tuple(temb.shape) == (B, L, 6, D))):
        return "temb", f"a temb of shape {tuple(temb.shape)} (ditfast runs (B, 6, D) and TI2V's (B, L, 6, D))"
    if block.attn2.add_k_proj is not None and encoder_hidden_states.shape[1] <= _TEXT_LEN:
        return "i2v", "an I2V block whose encoder_hidden_states hold no image tokens before the 512 text tokens"
    return None


def _projections(attn, cross: bool):
    if getattr(attn, "fused_projections", False):
        return attn.to_kv if cross else attn.to_qkv
    return (attn.to_k, attn.to_v) if cross else (attn.to_q, attn.to_k, attn.to_v)


def wan_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """ditfast forward of diffusers' ``WanTransformerBlock``; returns hidden_states."""
    a1, a2 = self.attn1, self.attn2
    head_dim = a1.inner_dim // a1.heads
    why = _fallback_reason(self, hidden_states, encoder_hidden_states, temb)
    rope = None
    if why is None:
        rope = rope_tables(rotary_emb, hidden_states.shape[1], head_dim)
        if rope is False:
            why = "rope", "rotary_emb that is not diffusers' (cos, sin) of shape (1, L, 1, Dh)"
    if why is not None:
        warn_fallback_once(self, *why)
    if why is not None or _hooks.falls_back(self, _BYPASSED):
        return type(self).forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
    table = self.scale_shift_table.unsqueeze(0) if temb.dim() == 4 else self.scale_shift_table
    mod = (table + temb.float()).unbind(-2)  # six fp32 (B, D) or (B, L, D) views
    context = encoder_hidden_states
    contexts = []
    if a2.add_k_proj is not None:  # I2V: image tokens first, then the text
        n_img = context.shape[1] - _TEXT_LEN
        image, context = context[:, :n_img], context[:, n_img:]
        kv_img = a2.to_added_kv if getattr(a2, "fused_projections", False) else (a2.add_k_proj, a2.add_v_proj)
        contexts.append(F.CrossKV(image, kv_img, a2.norm_added_k.weight))
    contexts.insert(0, F.CrossKV(context, _projections(a2, True), a2.norm_k.weight))
    norm2 = None if isinstance(self.norm2, nn.Identity) else (self.norm2.weight, self.norm2.bias)
    s = F.Stream(_projections(a1, False), functools.partial(out_proj, a1), functools.partial(gelu_tanh_ff, self.ffn),
                 a1.norm_q.weight, a1.norm_k.weight, self.norm1.eps, self.norm3.eps)
    return F.cross_block(hidden_states, mod, s, a2.to_q, a2.norm_q.weight, contexts, functools.partial(out_proj, a2),
                         head_dim=head_dim, qk_eps=float(a1.norm_q.eps), rope=rope, norm2=norm2,
                         attention=_context_parallel.attention_for(a1))


# ---------------------------------------------------------------------------------------------- checks


def _check_layer_norm(norm, dim: int, affine: bool, where: str, problems: List[str]) -> None:
    if not is_diffusers(norm, "FP32LayerNorm"):
        problems.append(f"{where} is {describe(norm)}, expected diffusers' FP32LayerNorm")
        return
    if tuple(norm.normalized_shape) != (dim,):
        problems.append(f"{where} normalizes over {tuple(norm.normalized_shape)}, expected ({dim},)")
    has = norm.weight is not None
    if has != affine or (affine and norm.bias is None):
        problems.append(f"{where} has {'no ' if not has else ''}affine parameters; Wan's {where} "
                        f"{'has weight and bias' if affine else 'has none'}")


def _check_attention(attn, dim: int, cross: bool, where: str, problems: List[str]) -> None:
    if not is_diffusers(attn, "WanAttention"):
        problems.append(f"{where} is {describe(attn)}, expected diffusers' WanAttention")
        return
    if not check_linears(attn, ["to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k"], where, problems):
        return
    inner, heads = attn.inner_dim, attn.heads
    if inner % heads or getattr(attn, "kv_inner_dim", inner) != inner:
        problems.append(f"{where}: inner_dim {inner}, kv_inner_dim {getattr(attn, 'kv_inner_dim', None)} and heads "
                        f"{heads} (ditfast runs equal q and kv widths, whole heads)")
    for name in ("norm_q", "norm_k") + (("norm_added_k",) if getattr(attn, "add_k_proj", None) is not None else ()):
        norm = getattr(attn, name, None)
        if not isinstance(norm, nn.RMSNorm) or norm.weight is None or tuple(norm.normalized_shape) != (inner,) \
                or norm.eps is None:
            problems.append(f"{where}.{name} is {describe(norm)}; ditfast runs an RMSNorm({inner}) over all heads "
                            "with a weight and an eps")
    if cross != bool(attn.is_cross_attention):
        problems.append(f"{where}.is_cross_attention is {attn.is_cross_attention}")
    if attn.norm_q.eps != attn.norm_k.eps:
        problems.append(f"{where}: norm_q and norm_k have different eps")


def check_block(block) -> List[str]:
    problems: List[str] = []
    check_signature(type(block), wan_block_forward, problems)
    if not check_linears(block, ["norm1", "attn1", "norm2", "attn2", "ffn", "norm3"], "block", problems):
        return problems
    dim = getattr(getattr(block.attn1, "to_q", None), "in_features", None)
    if dim is None:
        return problems + [f"attn1 is {describe(block.attn1)} without to_q"]
    _check_layer_norm(block.norm1, dim, False, "norm1", problems)
    _check_layer_norm(block.norm3, dim, False, "norm3", problems)
    if not isinstance(block.norm2, nn.Identity):
        _check_layer_norm(block.norm2, dim, True, "norm2", problems)
    _check_attention(block.attn1, dim, False, "attn1", problems)
    _check_attention(block.attn2, dim, True, "attn2", problems)
    if not problems and block.attn1.norm_q.eps != block.attn2.norm_q.eps:
        problems.append("attn1 and attn2 QK-norms have different eps")
    table = getattr(block, "scale_shift_table", None)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != (1, 6, dim):
        problems.append(f"scale_shift_table is {describe(table)}, expected a (1, 6, {dim}) parameter")
    return problems


SPECS = (BlockSpec("WanTransformerBlock", check_block, wan_block_forward),)
