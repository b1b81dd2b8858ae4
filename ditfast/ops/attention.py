"""Joint-sequence attention on the (B, L, H, Dh) layout (non-causal; softmax scale Dh**-0.5 unless
given; grouped-query k / v heads).

* :func:`joint_attention` (q, k, v) runs one implementation of the op ``"joint_attention"``
  (flash-attention 2/3/4, PyTorch SDPA's kernels, ditfast's Triton kernel, the reference; see
  ditfast/ops/attention_backends.py), chosen by ``backend=``, ``ditfast.use_backend``,
  ``DITFAST_ATTENTION_BACKEND`` or automatically; with ``return_lse=True`` it also returns the
  log-sum-exp, and only implementations that can give it are considered.
* :func:`joint_attention_streams` attends several token streams (text, image) as ONE joint
  sequence: ``ops.prepare_attention`` (per-stream QK-RMSNorm + RoPE written straight into joint
  q, k, v buffers, no concatenation), then :func:`joint_attention`, then one view of the output
  per stream. This is the attention step of every ditfast block (ditfast/nn/functional.py).

Layout: q, k, v may be strided views (of a packed qkv projection, say); nothing is copied unless
an implementation needs it (the Triton kernel and flash-attention need a unit stride on Dh only).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .. import _backend
from . import _validate as check
from . import attention_backends as backends
from .attention_backends import backend_report, choose_backend, explain_choice
from .prepare import prepare_attention

__all__ = ["joint_attention", "joint_attention_streams", "choose_backend", "backend_report", "explain_choice"]

Tensor = torch.Tensor


def _heads_error(q: Tensor, k: Tensor, v: Tensor) -> str:
    """The message for q / k whose B, H or Dh do not fit the (B, L, H, Dh) layout, with a hint when
    the tensors fit SDPA's (B, H, L, Dh) layout instead (q.transpose(1, 2) would be consistent)."""
    msg = (f"k must have shape (B, Lk, H_kv, Dh) matching q {tuple(q.shape)} in B and Dh, with H_kv dividing "
           f"q's H = {q.shape[2]} (H_kv = H, or fewer k / v heads for grouped-query attention), got {tuple(k.shape)}")
    hq, hk = q.shape[1], k.shape[1]  # the head counts if the tensors are (B, H, L, Dh)
    if k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3] and hk >= 1 and hq % hk == 0:
        msg += (f". q, k, v look like PyTorch SDPA's (B, H, L, Dh) layout (H = {hq}, L = {q.shape[2]}); "
                "joint_attention takes flash-attn's (B, L, H, Dh): pass q.transpose(1, 2), k.transpose(1, 2), "
                "v.transpose(1, 2) (views, no copy) and transpose the output back")
    return msg


def _key_lengths(key_lengths, B: int, Lk: int) -> Optional[Tuple[int, ...]]:
    """Per-sample key counts as Python ints, checked (None: every key of every sample)."""
    if key_lengths is None:
        return None
    if isinstance(key_lengths, torch.Tensor):
        if key_lengths.is_floating_point() or key_lengths.is_complex() or key_lengths.dim() != 1:
            raise TypeError(f"key_lengths must be a 1-D integer tensor or a sequence of ints, got a "
                            f"{key_lengths.dtype} tensor of shape {tuple(key_lengths.shape)}")
        key_lengths = key_lengths.tolist()  # (one device sync for a GPU tensor: pass a list to avoid it)
    lengths = tuple(key_lengths)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
        raise TypeError(f"key_lengths must hold ints, got {lengths!r}")
    if len(lengths) != B:
        raise ValueError(f"key_lengths has {len(lengths)} entries; q has a batch of {B} (one count per sample)")
    if any(n < 1 or n > Lk for n in lengths):
        raise ValueError(f"key_lengths must be in [1, {Lk}] (the keys' length), got {lengths}; a sample with no "
                         "valid key has no defined attention")
    return lengths


def _attend_prefixes(q, k, v, lengths, call, return_lse: bool):
    """Attention where sample b attends its first lengths[b] keys: each sample (or all of them, when the
    lengths agree) attends a view of its valid keys, on the backend ``call`` runs -- no masked work,
    every backend, gradients through the views."""
    if len(set(lengths)) == 1:
        n = lengths[0]
        return call(q, k[:, :n], v[:, :n])
    parts = [call(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]) for b, n in enumerate(lengths)]
    if not return_lse:
        return torch.cat(parts, dim=0)
    return torch.cat([p[0] for p in parts], dim=0), torch.cat([p[1] for p in parts], dim=0)


def joint_attention(
    q: Tensor, k: Tensor, v: Tensor, *, softmax_scale: Optional[float] = None, backend: Optional[str] = None,
    return_lse: bool = False, key_lengths=None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """softmax(q kᵀ · softmax_scale) v. q: (B, Lq, H, Dh); k, v: (B, Lk, H_kv, Dh). Returns (B, Lq, H, Dh).

    softmax_scale: the factor of the scores (flash-attn's ``softmax_scale``); None for Dh**-0.5.
    Grouped-query attention (as flash-attn): k and v may have fewer heads, H % H_kv == 0; query head
    h attends k / v head h // (H // H_kv). The layout is flash-attn's (B, L, H, Dh), not SDPA's
    (B, H, L, Dh): where q and k only fit once transposed, the error says so (tensors that fit both
    readings cannot be told apart, e.g. self-attention with H = L).
    backend: an attention implementation name (``attention_backends.NAMES``), a family
    ("reference", "triton", "compiled"; "cuda" is its alias), "auto" or None (see ditfast/_backend.py
    for the order of precedence; :func:`choose_backend` says what runs). return_lse: also return the
    log-sum-exp of the scaled scores, (B, H, Lq) float32, natural log (flash-attn's
    ``softmax_lse``; -inf for a query with no keys). Gradients flow through the output only: the lse
    is returned without a gradient path on the kernel backends (the reference's lse is an ordinary
    autograd graph, so its gradient is exact there).
    key_lengths: None, or one count per sample (a sequence of ints, or a 1-D integer tensor, read on the
    host) of the keys it attends: sample b attends keys ``[0, key_lengths[b])`` only (a key-padding mask
    whose valid keys are a prefix, as T5 or caption padding gives). Every backend serves it, with no
    masked work: an implementation with the feature ``"key_lengths"`` (ditfast's Triton kernel) in one
    launch whose programs stop at each sample's count; the others attend a view of each sample's valid
    keys (one call when the lengths agree, else one per sample). Not on DTensors.
    """
    request = _backend.current_request(backends.OP, backend)
    fp64_ok = request.name in backends.FP64_BACKENDS
    check.tensor("q", q, 4, "(B, L, H, Dh)", fp64_ok=fp64_ok)
    check.tensor("k", k, 4, "(B, L, H_kv, Dh)", fp64_ok=fp64_ok)
    check.tensor("v", v, 4, "(B, L, H_kv, Dh)", fp64_ok=fp64_ok)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(_heads_error(q, k, v))
    check.same_shape("v", v, "k", k)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None (for Dh**-0.5), got {type(softmax_scale).__name__}")
        softmax_scale = float(softmax_scale)
    check.same_device("q", q, k=k, v=v)
    check.dtensor("joint_attention", q=q, k=k, v=v)
    if k.shape[1] == 0 and q.shape[1] > 0:  # nothing to attend to: zeros, as SDPA gives (q * 0 keeps q in the graph)
        if not return_lse:
            return q * 0
        B, Lq, H, _ = q.shape
        return q * 0, torch.full((B, H, Lq), float("-inf"), device=q.device, dtype=torch.float32)
    lengths = _key_lengths(key_lengths, q.shape[0], k.shape[1])
    if lengths is not None and check.dtensor_possible() and isinstance(q, torch.distributed.tensor.DTensor):
        raise NotImplementedError("joint_attention: key_lengths is not supported on DTensors")
    spec = _backend.Spec.of(q, ("lse",) if return_lse else ())
    impl = _backend.impl(backends.OP, _backend.resolve_name(backends.OP, request, spec))
    fn = impl.fn
    kwargs = {} if softmax_scale is None else {"softmax_scale": softmax_scale}

    def call(q, k, v, **extra):
        return fn(q, k, v, return_lse=True, **kwargs, **extra) if return_lse else fn(q, k, v, **kwargs, **extra)

    if lengths is not None and any(n < k.shape[1] for n in lengths):
        if len(set(lengths)) > 1 and backends.KEY_LENGTHS in impl.features:
            # one launch that stops at each sample's count (a small host-to-device copy of the counts)
            counts = torch.tensor(lengths, dtype=torch.int32).to(q.device, non_blocking=True)
            return call(q, k, v, key_lengths=counts)
        return _attend_prefixes(q, k, v, lengths, call, return_lse)
    return call(q, k, v)


def joint_attention_streams(
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    vs: Sequence[Tensor],
    *,
    q_weights: Optional[Sequence[Optional[Tensor]]] = None,
    k_weights: Optional[Sequence[Optional[Tensor]]] = None,
    rope: Optional[Tuple[Tensor, Tensor]] = None,
    eps: float = 1e-6,
    interleaved: bool = True,
    backend: Optional[str] = None,
    attention: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
    key_lengths=None,
) -> Tuple[Tensor, ...]:
    """Attention over the joint sequence ``[stream 0; stream 1; ...]``, one output view per stream.

    qs, ks, vs: one (B, L_i, H, Dh) tensor per stream (strided views welcome), in the joint order
    (text first for FLUX / SD3). q_weights, k_weights: None (no QK-norm) or one RMSNorm weight (Dh,)
    or None per stream; a stream's q and k weights are both tensors or both None. rope: None or the
    fp32 (cos, sin) pair of the whole joint sequence, each (L_total, Dh/2) or (B, L_total, Dh/2);
    pairs interleaved (FLUX) or half-split. ``backend`` picks the attention implementation (the
    prepare pass follows ``use_backend``). attention: a callable ``(q, k, v) -> o`` that attends the
    prepared joint tensors instead of :func:`joint_attention` (the diffusers integration passes
    context-parallel attention). key_lengths: per sample, the count of valid keys of the joint sequence,
    a prefix (see :func:`joint_attention`; not with ``attention``). Returns (B, L_i, H, Dh) views of one
    joint output.
    """
    if key_lengths is not None and attention is not None:
        raise ValueError("joint_attention_streams: key_lengths goes with the default attention only "
                         "(a custom attention callable takes no key lengths)")
    q, k, v = prepare_attention(qs, ks, vs, q_weights=q_weights, k_weights=k_weights, rope=rope,
                                eps=eps, interleaved=interleaved)
    out = joint_attention(q, k, v, backend=backend, key_lengths=key_lengths) if attention is None else attention(q, k, v)
    if len(qs) == 1:  # no split: its backward would copy the gradient into a new tensor
        return (out,)
    widths = [int(t.shape[1]) for t in qs]
    if check.dtensor_possible() and isinstance(out, torch.distributed.tensor.DTensor):
        # one narrow per stream: split's backward fills the gradient of an unused piece with plain
        # zeros and concatenates them with the DTensor ones, which DTensor refuses; a narrow that no
        # loss uses has no backward at all
        starts = [sum(widths[:i]) for i in range(len(widths))]
        return tuple(out.narrow(1, s, n) for s, n in zip(starts, widths))
    return tuple(out.split(widths, dim=1))
