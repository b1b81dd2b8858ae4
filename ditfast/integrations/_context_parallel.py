"""The attention step of patched diffusers blocks: context parallelism and diffusers' attention backends.

Design note. Under ``model.enable_parallelism(config=ContextParallelConfig(...))`` diffusers splits
the model's inputs along the sequence (hooks on the model, gathered again at ``proj_out``) and
gives every attention processor the config as ``processor._parallel_config``. Every step of a FLUX
block except attention works token by token, so a patched block needs exactly one change: the
attention of its prepared joint q, k, v (ditfast's QK-norm + RoPE pass runs on the local tokens,
with the local RoPE rows diffusers computed) must span every rank's tokens. That is what
:func:`context_parallel_attention` does, with ditfast's kernel as the local attention
(``ops.joint_attention(..., return_lse=True)``: lse (B, H, L) fp32, natural log, transposed here to
diffusers' (B, L, H)): Ulysses (all-to-all over heads) through diffusers' own template; ring (k/v
chunks gathered, partial outputs merged with their lse) through ditfast's :class:`_RingAttention`;
"unified" (both) as diffusers' Ulysses all-to-all (``SeqAllToAllDim``) around ditfast's ring. Why
not diffusers' ring template: its backward (diffusers 0.42.1) passes each k/v-gradient accumulator
to the next rank where the previous one processes that chunk next, so dk, dv are wrong for
ring_degree > 2 (tests/test_context_parallel.py runs a ring of 4). The token order of the gathered
sequence ([text_r0, image_r0, text_r1, image_r1, ...]) does not matter: the attention is
non-causal and unmasked, and each query's output stays with its token.

Backward: a flash-attention backward per (query, key/value chunk) pair, from the saved output and
log-sum-exp, never a score matrix (:func:`chunk_backward`). Ulysses' forward op saves q, k, v, o and
lse and its backward runs it once on them (no forward recomputation); the ring saves q, its own k,
v and the *merged* output and lse, gathers the k/v chunks again in the backward and runs it once
per chunk. With the merged lse, P = exp(q kᵀ·s - lse) restricted to a chunk is that chunk's share
of the full softmax and Δ = rowsum(dO ∘ O) uses the final output, so the per-chunk dq, dk, dv are
exactly the chunk's terms of the full gradient. Which kernel runs is picked per device
(:func:`backward_path`):

* CUDA (fp32 / bf16 / fp16, Dh <= 256, compute capability >= 8.0, triton installed): ditfast's Triton
  FlashAttention backward, the op ``ditfast::flash_attention_backward(do, q, k, v, o, lse, True)``
  (deterministic), whatever backend ran the forward. It takes any o and lse, so the merged ones go
  in as they are. Memory: the gradients, Δ and the fp32 dq accumulator, O(L) per head.
* anything else (CPU, where the Triton kernel would run under the slow interpreter; fp64; older
  GPUs): a blockwise PyTorch flash backward in fp32 (fp64 for fp64 inputs) over blocks of
  ``KEY_BLOCK`` keys: per block the (B, H, L_q, KEY_BLOCK) probabilities and their gradient, with dq
  accumulated across blocks, so its memory is O(L_q · KEY_BLOCK) per head besides the O(L) inputs
  and gradients: linear in L. Exact (the same formulas), not fast.

Memory of the whole backward is linear in L: measured on CPU (2 gloo ranks, B 1, H 2, Dh 16, fp32;
live tensor bytes counted by tests/test_context_parallel.py's ``LiveBytes``), the ring backward's
peak is 2.07 / 4.13 / 8.27 MiB at L = 1024 / 2048 / 4096 (the former score-matrix backward:
6.94 / 25.88 / 99.77 MiB) and Ulysses' 1.25 / 2.51 / 5.02 MiB (docs/attention.md).

The forward is ``ops.joint_attention(..., return_lse=True)`` on the automatic (or ``use_backend``)
choice: a flash kernel with lse where one runs (SDPA's CPU flash kernel on CPU; the CUDA libraries
and ditfast's Triton kernel on GPUs); the reference backend computes lse from the explicit fp32
score matrix of each local call (quadratic memory in the local lengths). The ring's merge runs
in fp32 (fp64 for fp64). diffusers' "ring anything" / "Ulysses anything" modes run diffusers'
templates, which have no backward (they raise).

Only what diffusers' templates support is supported (no mask, no dropout, no causal, no GQA, the
default scale); anything else raises ``ValueError`` here rather than computing something else.

diffusers' attention backends. diffusers users pick kernels with ``model.set_attention_backend(name)``
(sets ``processor._attention_backend``) or the ``attention_backend(name)`` context manager (the
registry's active backend, which a processor without its own choice uses; the default is "native",
also settable with ``DIFFUSERS_ATTN_BACKEND``). A patched block honours that choice
(:func:`diffusers_backend`): when it is anything but diffusers' default "native", the block runs
ditfast's prepare and then attends through diffusers' ``dispatch_attention_fn`` with that backend
(and the processor's parallel config, for a backend that supports context parallelism; one that does
not raises under context parallelism instead of attending the local tokens only). "native" (left at
the default or set explicitly) keeps ditfast's own attention choice.

diffusers is imported lazily (only when a config or a diffusers model is present), so
``import ditfast`` stays free of it.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional, Tuple

import torch

from .. import ops

__all__ = ["parallel_config", "diffusers_backend", "attention_for", "dispatch_attention", "context_parallel_attention",
           "chunk_backward", "backward_path", "KEY_BLOCK"]

Tensor = torch.Tensor
KEY_BLOCK = 128  # keys per step of the blockwise PyTorch backward (memory O(B·H·L_q·KEY_BLOCK))
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def parallel_config(attn) -> Optional[object]:
    """The diffusers ``ParallelConfig`` of ``attn``'s processor when context parallelism is on, else None.

    Tensor parallelism alone (diffusers' ``TensorParallelConfig``) leaves the attention local (each
    rank attends its own heads): None then.
    """
    cfg = getattr(getattr(attn, "processor", None), "_parallel_config", None)
    if cfg is None or getattr(cfg, "context_parallel_config", None) is None:
        return None
    return cfg


def diffusers_backend(attn) -> Optional[object]:
    """The diffusers attention backend (an ``AttentionBackendName``) chosen for ``attn``, or None for
    diffusers' default "native" (ditfast's attention then). The processor's own choice
    (``set_attention_backend``) wins over the registry's active backend (the ``attention_backend``
    context manager, ``DIFFUSERS_ATTN_BACKEND``), as in diffusers' ``dispatch_attention_fn``."""
    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    if dispatch is None:  # diffusers' attention dispatch was never imported: nothing can be chosen
        return None
    chosen = getattr(getattr(attn, "processor", None), "_attention_backend", None)
    if chosen is None:
        chosen = dispatch._AttentionBackendRegistry._active_backend
    # chosen is an AttentionBackendName or its string value; look the member up by value rather than
    # calling the Enum (Dynamo in torch 2.11 cannot trace an Enum call under torch.compile)
    value = getattr(chosen, "value", chosen)
    if value == dispatch.AttentionBackendName.NATIVE.value:
        return None
    return dispatch.AttentionBackendName._value2member_map_[value]


def attention_for(attn) -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The ``attention=`` argument of ditfast.nn.functional's blocks for a diffusers attention module:
    diffusers' dispatch with the chosen backend when one other than "native" is chosen
    (:func:`diffusers_backend`), else None (the local ditfast attention) without context
    parallelism, else the context-parallel attention bound to the processor's config."""
    cfg = parallel_config(attn)
    backend = diffusers_backend(attn)
    if backend is not None:
        return functools.partial(dispatch_attention, backend=backend, config=cfg)
    return None if cfg is None else functools.partial(context_parallel_attention, config=cfg)


def dispatch_attention(q: Tensor, k: Tensor, v: Tensor, backend, config=None) -> Tensor:
    """Prepared q, k, v (B, L, H, Dh) attended by diffusers' ``dispatch_attention_fn`` with ``backend``
    (an ``AttentionBackendName``); config: the processor's context-parallel config or None."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn

    if config is not None and not _AttentionBackendRegistry._is_context_parallel_available(backend):
        raise ValueError(
            f"ditfast: the diffusers attention backend {backend.value!r} does not support context parallelism "
            f"(it would attend each rank's tokens only); choose one of "
            f"{sorted(_AttentionBackendRegistry._supports_context_parallel)} or diffusers' default 'native' "
            f"(ditfast's context-parallel attention)")
    out = dispatch_attention_fn(q, k, v, backend=backend, parallel_config=config)
    return out.to(q.dtype)


def _diffusers(name: str):
    try:
        from diffusers.models import attention_dispatch
    except ImportError as e:
        raise RuntimeError("ditfast: context-parallel attention needs diffusers (pip install diffusers)") from e
    if not hasattr(attention_dispatch, name):  # a diffusers version without (or with renamed) templates
        raise RuntimeError(
            f"ditfast: this model has a diffusers context-parallel config, but this diffusers version has no "
            f"`{name}` (diffusers >= 0.36 has it); ditfast cannot run context-parallel attention with it: unpatch "
            f"the model (ditfast.unpatch) or upgrade diffusers")
    return getattr(attention_dispatch, name)


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, config) -> Tensor:
    """Attention of this rank's queries over every rank's keys and values.

    q, k, v: (B, L_local, H, Dh), this rank's share of the joint sequence (prepared: QK-norm and RoPE
    applied). config: the diffusers ``ParallelConfig`` of the attention processor (see
    :func:`parallel_config`). Returns (B, L_local, H, Dh). Ring attention (and the ring inside
    unified attention) is ditfast's :class:`_RingAttention`; Ulysses (and diffusers' "anything"
    modes) run diffusers' templates with ditfast's local attention.
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
    if cp.ring_degree > 1 and not getattr(cp, "ring_anything", False):
        if cp.ulysses_degree == 1:
            return _RingAttention.apply(q, k, v, config)
        # unified: heads scattered / sequence gathered over the Ulysses group around the ring
        exchange, group = _diffusers("SeqAllToAllDim"), cp._ulysses_mesh.get_group()
        q, k, v = (exchange.apply(group, t, 2, 1) for t in (q, k, v))
        return exchange.apply(group, _RingAttention.apply(q, k, v, config), 1, 2)
    run = _diffusers("_templated_context_parallel_attention")
    return run(q, k, v, None, 0.0, False, None, False, False,
               forward_op=_forward_op, backward_op=_backward_op, _parallel_config=config)


def _local_attention(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """ditfast's attention of q over k, v: (o, lse) with lse (B, L_q, H) fp32 (diffusers' layout)."""
    out, lse = ops.joint_attention(q, k, v, return_lse=True)
    return out, lse.transpose(1, 2)


def _forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' forward-op protocol (see attention_dispatch's templated classes) on ditfast's kernel.
    Saves q, k, v, o and lse (B, L, H) for :func:`_backward_op`."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError("ditfast context-parallel attention supports no mask, dropout, causal masking or GQA")
    if scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-12 * scale:
        raise ValueError(f"ditfast attention uses the scale head_dim**-0.5, got scale={scale}")
    out, lse = _local_attention(query, key, value)
    if _save_ctx:
        ctx.save_for_backward(query, key, value, out, lse)
    return (out, lse) if return_lse else out


def _backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """dq, dk, dv by :func:`chunk_backward` from the saved q, k, v, o, lse (Ulysses: its one local
    attention, no forward recomputation). Overrides (diffusers' ring protocol) replace them."""
    saved_q, saved_k, saved_v, saved_out, saved_lse = ctx.saved_tensors
    q = saved_q if query is None else query
    k = saved_k if key is None else key
    v = saved_v if value is None else value
    o = saved_out if out is None else out
    lse = saved_lse if lse is None else lse
    return chunk_backward(grad_out, q, k, v, o, lse)


# ---- ring attention ----------------------------------------------------------------------------------
def _waited(t: Tensor) -> Tensor:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


def _gather_kv(k: Tensor, v: Tensor, group, world: int):
    """Every ring rank's (k, v) chunk, in ring-rank order (one all-gather of the packed pair)."""
    n = k.numel()
    mine = torch.cat((k.reshape(-1), v.reshape(-1)))
    packed = mine.new_empty(world * mine.numel())
    # all_gather_single: newer torch's name of all_gather_into_tensor (deprecated there)
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(packed, mine, group=group)
    return [(c[:n].view(k.shape), c[n:].view(v.shape)) for c in packed.chunk(world)]


class _RingAttention(torch.autograd.Function):
    """Ring attention over the ring group of a diffusers context-parallel config.

    Forward: the k/v chunks of the ring are all-gathered; rank r attends chunk r, r+1, ... with
    ditfast's local attention and merges the partial outputs with their lse (in fp32; fp64 for fp64),
    saving q, k, v, the merged output and lse. Backward: the chunks are gathered again; at step i
    rank r runs :func:`chunk_backward` on chunk r+i against the merged output and lse, adds dq
    locally and adds dk, dv to the chunk's accumulator, which it received from rank r+1 (that
    processed the chunk at step i-1) and passes on to rank r-1 (the chunk's next processor); after
    the last step one more pass brings every accumulator to its owner. (diffusers' own
    ``TemplatedRingAttention.backward`` up to at least 0.42.1 passes the accumulators to rank r+1
    instead, which is right only for ring_degree 2.)
    """

    @staticmethod
    def forward(ctx, q, k, v, config):
        cp = config.context_parallel_config
        group, world, rank = cp._ring_mesh.get_group(), cp.ring_degree, cp._ring_local_rank
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        chunks = _gather_kv(k, v, group, world)
        out = lse = None
        for i in range(world):
            o_i, lse_i = _local_attention(q, *chunks[(rank + i) % world])
            o_i, lse_i = o_i.to(acc), lse_i.to(acc)
            if out is None:
                out, lse = o_i, lse_i
                continue
            merged = torch.logaddexp(lse, lse_i)
            out = out * (lse - merged).exp().unsqueeze(-1) + o_i * (lse_i - merged).exp().unsqueeze(-1)
            lse = merged
        del chunks
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, do):
        from torch.distributed import _functional_collectives as funcol

        q, k, v, out, lse = ctx.saved_tensors
        cp = ctx.config.context_parallel_config
        group, world, rank = cp._ring_mesh.get_group(), cp.ring_degree, cp._ring_local_rank
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        to_prev = [(m - 1) % world for m in range(world)]  # permute_tensor: rank m sends to to_prev[m]
        chunks = _gather_kv(k, v, group, world)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv = None  # the accumulator of chunk r+i at step i
        for i in range(world):
            gq, gk, gv = chunk_backward(do, q, *chunks[(rank + i) % world], out, lse)
            dq += gq
            part = torch.cat((gk.reshape(-1), gv.reshape(-1))).to(acc)
            dkv = part if dkv is None else _waited(dkv) + part
            dkv = funcol.permute_tensor(dkv, to_prev, group=group)
        del chunks
        dkv, n = _waited(dkv), k.numel()
        return dq.to(q.dtype), dkv[:n].view(k.shape).to(k.dtype), dkv[n:].view(v.shape).to(v.dtype), None


# ---- the per-chunk flash backward ------------------------------------------------------------------
def backward_path(q: Tensor) -> str:
    """The backward :func:`chunk_backward` runs for q's device, dtype and head dim (module docstring):
    ``"triton"`` (ditfast's FlashAttention backward kernel) or ``"blockwise"`` (PyTorch, key blocks)."""
    if (q.is_cuda and q.dtype in _TRITON_DTYPES and q.shape[-1] <= _triton_max_head_dim()
            and _triton_runs_on(q.device)):
        return "triton"
    return "blockwise"


@functools.lru_cache(maxsize=None)
def _triton_runs_on(device: torch.device) -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device) >= (8, 0)


def _triton_max_head_dim() -> int:
    from ..ops._attention_triton import MAX_HEAD_DIM

    return MAX_HEAD_DIM


def chunk_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, *,
                   path: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the attention of q over the key/value chunk (k, v), as a share of a softmax
    whose output is o and whose log-sum-exp is lse (over every chunk: the merged ones in a ring).

    do, q, o: (B, L_q, H, Dh); k, v: (B, L_k, H, Dh); lse: (B, L_q, H) (diffusers' layout; a trailing
    1 is accepted), natural log. Returns gradients in q's / k's / v's dtype. path: "triton",
    "blockwise" or None (:func:`backward_path`). No L_q x L_k matrix is formed on either path.
    """
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    path = backward_path(q) if path is None else path
    if path == "triton":
        return _triton_backward(do, q, k, v, o, lse)
    if path == "blockwise":
        return _blockwise_backward(do, q, k, v, o, lse)
    raise ValueError(f"chunk_backward: path must be 'triton', 'blockwise' or None, got {path!r}")


def _triton_backward(do, q, k, v, o, lse):
    from ..ops import _attention_triton  # noqa: F401  (registers ditfast::flash_attention_backward)

    lse = lse.to(torch.float32).transpose(1, 2).contiguous()  # the kernel's (B, H, L_q) fp32 rows
    dq, dk, dv = torch.ops.ditfast.flash_attention_backward(do.to(q.dtype), q, k, v, o.to(q.dtype), lse, True)
    return dq, dk, dv


def _blockwise_backward(do, q, k, v, o, lse):
    """The flash-attention gradient formulas over blocks of ``KEY_BLOCK`` keys, in fp32 (fp64 for fp64).

    With P = exp(q kᵀ·s - lse) (per block): dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - Δ) with Δ = rowsum(dO ∘ O),
    dQ = s·Σ_blocks dS K, dK = s·dSᵀ Q.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = q.shape[-1] ** -0.5
    B, Lq, H, D = q.shape
    Lk, block = k.shape[1], KEY_BLOCK
    qh = q.to(acc).transpose(1, 2).contiguous()  # (B, H, L_q, D): one copy, read by every block
    doh = do.to(acc).transpose(1, 2).contiguous()
    delta = (do.to(acc) * o.to(acc)).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, H, L_q, 1)
    lse_h = lse.to(acc).transpose(1, 2).unsqueeze(-1)  # (B, H, L_q, 1)
    dq = torch.zeros((B, H, Lq, D), dtype=acc, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for j in range(0, Lk, block):
        kb = k[:, j:j + block].to(acc).transpose(1, 2)  # (B, H, n, D)
        vb = v[:, j:j + block].to(acc).transpose(1, 2)
        p = torch.matmul(qh, kb.transpose(-1, -2))  # (B, H, L_q, n)
        p.mul_(s).sub_(lse_h).exp_()
        dv[:, j:j + block] = torch.matmul(p.transpose(-1, -2), doh).transpose(1, 2)
        ds = torch.matmul(doh, vb.transpose(-1, -2)).sub_(delta).mul_(p)
        del p
        dq.add_(torch.matmul(ds, kb))
        dk[:, j:j + block] = torch.matmul(ds.transpose(-1, -2), qh).mul_(s).transpose(1, 2)
        del ds
    return dq.mul_(s).transpose(1, 2).to(q.dtype).contiguous(), dk, dv
