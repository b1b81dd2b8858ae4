"""The "triton" attention backend: torch.library custom ops around ditfast/kernels/triton/attention.py.

* ``ditfast::flash_attention(q, k, v, softmax_scale=None, key_lengths=None) -> (o, lse)``: o (B, Lq, H, Dh) in q's
  dtype, lse (B, H, Lq) fp32, the natural-log logsumexp of each query row's scaled scores
  ``q kᵀ · softmax_scale`` (None: Dh**-0.5; flash-attn's ``softmax_lse`` convention; -inf for a row
  with no keys). k, v are (B, Lk, H_kv, Dh) with H % H_kv == 0 (grouped-query attention: query head
  h reads k / v head h // (H // H_kv)). key_lengths: None or a (B,) int32 tensor on q's device: sample b
  attends its first key_lengths[b] keys (each in [1, Lk]); the kernels stop at them, forward and backward.
* ``ditfast::flash_attention_backward(do, q, k, v, o, lse, deterministic, softmax_scale=None,
  key_lengths=None) -> (dq, dk, dv)`` (dk, dv summed over each group's query heads; 0 for padded keys).

Both are ``custom_op`` (not ``triton_op``, which fails under torch.compile with the interpreter:
see docs/attention.md) with ``register_fake``, so torch.compile(fullgraph=True) sees one opaque op
per direction and torch.library.opcheck passes. Autograd: gradients flow through o only. lse is
marked non-differentiable: it gets no gradient (a loss that uses lse directly does not
differentiate through it; ring-attention merges that need it must treat lse as a constant).

Triton is imported on the first call, never at ``import ditfast``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # == ditfast.kernels.triton.attention.MAX_HEAD_DIM (the tests check they agree)

__all__ = ["triton_attention", "MAX_HEAD_DIM"]


def _kernels():
    from ..kernels import triton as kernels  # no triton import until load()

    return kernels.load("attention")


def _unit_last(t: Tensor) -> Tensor:
    """The kernels read the head dim with unit stride; every other stride is read as it is."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("ditfast::flash_attention", mutates_args=())
def _flash_attention_op(q: Tensor, k: Tensor, v: Tensor, softmax_scale: Optional[float] = None,
                        key_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(o, lse) of softmax(q kᵀ · softmax_scale) v; see the module docstring."""
    return _kernels().attention_forward(_unit_last(q), _unit_last(k), _unit_last(v), softmax_scale, key_lengths)


@_flash_attention_op.register_fake
def _(q, k, v, softmax_scale=None, key_lengths=None):
    B, Lq, H, Dh = q.shape
    return q.new_empty((B, Lq, H, Dh)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("ditfast::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, deterministic: bool,
    softmax_scale: Optional[float] = None, key_lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous, in the inputs' dtype."""
    args = [_unit_last(t) for t in (do, q, k, v, o)]
    return _kernels().attention_backward(*args, lse, deterministic, softmax_scale, key_lengths)


@_flash_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, deterministic, softmax_scale=None, key_lengths=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, inputs[4] if len(inputs) > 4 else None)
    ctx.deterministic = True
    # the scale and key lengths may arrive positionally or not at all (left at their defaults): one
    # gradient per input
    ctx.softmax_scale = inputs[3] if len(inputs) > 3 else None
    ctx.n_inputs = len(inputs)


def _backward(ctx, do, _dlse):
    # _dlse is ignored: lse is non-differentiable (module docstring)
    q, k, v, o, lse, key_lengths = ctx.saved_tensors
    if do is None:  # o unused by the loss
        do = torch.zeros_like(o)
    if key_lengths is None:
        grads = _flash_attention_backward_op(do, q, k, v, o, lse, ctx.deterministic, ctx.softmax_scale)
    else:
        grads = _flash_attention_backward_op(do, q, k, v, o, lse, ctx.deterministic, ctx.softmax_scale,
                                             key_lengths)
    return tuple(grads) + (None,) * (ctx.n_inputs - 3)


_flash_attention_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def _check(q, k, v, softmax_scale=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{name} must be float32, bfloat16 or float16 for the triton attention backend, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, L, H, Dh) (4 dims), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move them to one device")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k must have shape (B, Lk, H_kv, Dh) matching q {tuple(q.shape)} in B and Dh, with "
                         f"H_kv dividing q's H, got {tuple(k.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 1:
        raise ValueError(f"q, k, v: the triton attention backend takes head dims 1..{MAX_HEAD_DIM}, got Dh = {q.shape[-1]}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q is on {q.device}; the triton attention backend runs on CUDA (or CPU under TRITON_INTERPRET=1)")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")


def _check_key_lengths(q: Tensor, key_lengths) -> None:
    if not isinstance(key_lengths, Tensor) or key_lengths.dtype != torch.int32 or key_lengths.dim() != 1:
        raise TypeError("key_lengths must be a 1-D int32 tensor (one count per sample) for the triton attention "
                        f"backend, got {key_lengths!r}"[:300])
    if key_lengths.shape[0] != q.shape[0] or key_lengths.device != q.device:
        raise ValueError(f"key_lengths must hold {q.shape[0]} counts on {q.device}, got shape "
                         f"{tuple(key_lengths.shape)} on {key_lengths.device}")


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False,
                     softmax_scale: Optional[float] = None, key_lengths: Optional[Tensor] = None):
    """softmax(q kᵀ · softmax_scale) v with ditfast's Triton FlashAttention kernel (non-causal).

    q: (B, Lq, H, Dh); k, v: (B, Lk, H_kv, Dh) with H % H_kv == 0 (grouped-query attention when
    H_kv < H, as flash-attn); fp32 / bf16 / fp16, one dtype and device, Dh <= 256; any strides (a
    non-unit stride on Dh is copied first). softmax_scale: None for Dh**-0.5. Returns o
    (B, Lq, H, Dh) in q's dtype, or with ``return_lse=True`` the pair (o, lse), lse (B, H, Lq) fp32 =
    logsumexp (natural log) of the scaled scores. Gradients flow through o (deterministic backward;
    dk, dv summed over each group's query heads); lse has no gradient. Lk = 0 gives o = 0 and
    lse = -inf. key_lengths: None, or a (B,) int32 tensor on q's device with counts in [1, Lk]
    (``ops.joint_attention`` checks them; the kernels clamp to Lk): sample b attends keys
    [0, key_lengths[b]) in one launch, the padded key blocks skipped, their dk, dv exactly 0.
    """
    _check(q, k, v, softmax_scale)
    if key_lengths is not None:
        _check_key_lengths(q, key_lengths)
        scale = None if softmax_scale is None else float(softmax_scale)
        o, lse = _flash_attention_op(q, k, v, scale, key_lengths)
    elif softmax_scale is None:  # left at its default: the op's schema default (Dh**-0.5)
        o, lse = _flash_attention_op(q, k, v)
    else:
        o, lse = _flash_attention_op(q, k, v, float(softmax_scale))
    return (o, lse) if return_lse else o
