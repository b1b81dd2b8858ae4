"""Context parallelism for patched blocks: diffusers' ``enable_parallelism`` with ditfast attention.

Design note. Under ``model.enable_parallelism(config=ContextParallelConfig(...))`` diffusers splits
the model's inputs along the sequence (hooks on the model, gathered again at ``proj_out``) and
gives every attention processor the config as ``processor._parallel_config``. Every step of a FLUX
block except attention works token by token, so a patched block needs exactly one change: the
attention of its prepared joint q, k, v (ditfast's QK-norm + RoPE pass runs on the local tokens,
with the local RoPE rows diffusers computed) must span every rank's tokens. That is what
:func:`context_parallel_attention` does: it hands q, k, v to diffusers' own context-parallel
templates (Ulysses all-to-all over heads, ring with log-sum-exp merges, and "unified" = both) with
ditfast's kernel as the local attention (``ops.joint_attention(..., return_lse=True)``: lse (B, H, L)
fp32, natural log, transposed here to diffusers' (B, L, H)). The token order of the gathered
sequence ([text_r0, image_r0, text_r1, image_r1, ...]) does not matter: the attention is
non-causal and unmasked, and each query's output stays with its token.

Backward: Ulysses (and every call without ring overrides) recomputes the local attention under
autograd, so ditfast's own backward kernel runs; ring attention's backward needs the gradient of
each key/value chunk against the *merged* output and lse, which this module computes in PyTorch
(fp32, O(L_q x L_kv_chunk) memory per head). diffusers' "ring anything" / "Ulysses anything" modes
have no backward in diffusers (they raise).

Only what diffusers' templates support is supported (no mask, no dropout, no causal, no GQA, the
default scale); anything else raises ``ValueError`` here rather than computing something else.
diffusers is imported lazily (only when a config is present), so ``import ditfast`` stays free of it.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .. import ops

__all__ = ["parallel_config", "attention_for", "context_parallel_attention"]

Tensor = torch.Tensor


def parallel_config(attn) -> Optional[object]:
    """The diffusers ``ParallelConfig`` of ``attn``'s processor when context parallelism is on, else None.

    Tensor parallelism alone (diffusers' ``TensorParallelConfig``) leaves the attention local (each
    rank attends its own heads): None then.
    """
    cfg = getattr(getattr(attn, "processor", None), "_parallel_config", None)
    if cfg is None or getattr(cfg, "context_parallel_config", None) is None:
        return None
    return cfg


def attention_for(attn) -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The ``attention=`` argument of ditfast.nn.functional's blocks for a diffusers attention module:
    None (the local ditfast attention) without context parallelism, else the context-parallel
    attention bound to the processor's config."""
    cfg = parallel_config(attn)
    return None if cfg is None else functools.partial(context_parallel_attention, config=cfg)


def _templates():
    try:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention
    except ImportError as e:  # a diffusers version without (or with renamed) context-parallel templates
        raise RuntimeError(
            "ditfast: this model has a diffusers context-parallel config, but this diffusers version has no "
            "`_templated_context_parallel_attention` (diffusers >= 0.36 has it); ditfast cannot run context-parallel "
            "attention with it: unpatch the model (ditfast.unpatch) or upgrade diffusers"
        ) from e
    return _templated_context_parallel_attention


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, config) -> Tensor:
    """Attention of this rank's queries over every rank's keys and values.

    q, k, v: (B, L_local, H, Dh), this rank's share of the joint sequence (prepared: QK-norm and RoPE
    applied). config: the diffusers ``ParallelConfig`` of the attention processor (see
    :func:`parallel_config`). Returns (B, L_local, H, Dh).
    """
    cp = config.context_parallel_config
    if cp._mesh is None:
        raise RuntimeError("ditfast: the diffusers context-parallel config has no device mesh yet "
                           "(call model.enable_parallelism(config=...) before running the model)")
    heads = q.shape[2]
    if cp.ulysses_degree > 1 and heads % cp.ulysses_degree and not cp.ulysses_anything:
        raise ValueError(f"ditfast: Ulysses attention splits the {heads} heads over ulysses_degree="
                         f"{cp.ulysses_degree} ranks, which does not divide them (diffusers' ulysses_anything=True "
                         f"handles uneven heads)")
    run = _templates()
    return run(q, k, v, None, 0.0, False, None, False, False,
               forward_op=_forward_op, backward_op=_backward_op, _parallel_config=config)


def _forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' forward-op protocol (see attention_dispatch's templated classes) on ditfast's kernel."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError("ditfast context-parallel attention supports no mask, dropout, causal masking or GQA")
    if scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-12 * scale:
        raise ValueError(f"ditfast attention uses the scale head_dim**-0.5, got scale={scale}")
    out, lse = ops.joint_attention(query, key, value, return_lse=True)
    lse = lse.transpose(1, 2)  # (B, H, L) -> diffusers' model layout (B, L, H)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
    return (out, lse) if return_lse else out


def _backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """dq, dk, dv. Without overrides: autograd through ditfast's attention recomputed on the saved
    q, k, v. With ring's overrides (another rank's k/v chunk, the merged out and lse): the
    flash-attention gradient formulas against the merged softmax (:func:`_chunk_backward`)."""
    saved_q, saved_k, saved_v, saved_out, saved_lse = ctx.saved_tensors
    if query is None and key is None and value is None and out is None and lse is None:
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_(True) for t in (saved_q, saved_k, saved_v))
            o = ops.joint_attention(q, k, v)
            return torch.autograd.grad(o, (q, k, v), grad_out.to(o.dtype))
    q = saved_q if query is None else query
    k = saved_k if key is None else key
    v = saved_v if value is None else value
    o = saved_out if out is None else out
    lse = saved_lse if lse is None else lse
    return _chunk_backward(grad_out, q, k, v, o, lse)


def _chunk_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor):
    """Gradients of the merged attention output w.r.t. this q and this k/v chunk, in fp32.

    With the merged softmax P = exp(q kᵀ·s - lse) (lse (B, L_q, H) the merged log-sum-exp, so P
    restricted to this chunk is the chunk's share of the full softmax): dV = Pᵀ dO,
    dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)), dQ = s·dS K, dK = s·dSᵀ Q.
    """
    s = q.shape[-1] ** -0.5
    qf, kf, vf, of, gf = (t.float() for t in (q, k, v, o, do))
    p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * s - lse.float().transpose(1, 2).unsqueeze(-1))
    dv = torch.einsum("bhqk,bqhd->bkhd", p, gf)
    delta = (gf * of).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, H, L_q, 1)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", gf, vf) - delta)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * s
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf) * s
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
