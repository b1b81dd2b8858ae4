"""The "triton" attention backend: torch.library custom ops around ditfast/kernels/triton/attention.py.

* ``ditfast::flash_attention(q, k, v) -> (o, lse)``: o (B, Lq, H, Dh) in q's dtype, lse (B, H, Lq)
  fp32, the natural-log logsumexp of each query row's scaled scores ``q kᵀ · Dh**-0.5``
  (flash-attn's ``softmax_lse`` convention; -inf for a row with no keys).
* ``ditfast::flash_attention_backward(do, q, k, v, o, lse, deterministic) -> (dq, dk, dv)``.

Both are ``custom_op`` (not ``triton_op``, which fails under torch.compile with the interpreter:
see docs/attention.md) with ``register_fake``, so torch.compile(fullgraph=True) sees one opaque op
per direction and torch.library.opcheck passes. Autograd: gradients flow through o only. lse is
marked non-differentiable: it gets no gradient (a loss that uses lse directly does not
differentiate through it; ring-attention merges that need it must treat lse as a constant).

Triton is imported on the first call, never at ``import ditfast``.
"""
from __future__ import annotations

from typing import Tuple

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
def _flash_attention_op(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """(o, lse) of softmax(q kᵀ · Dh**-0.5) v; see the module docstring."""
    return _kernels().attention_forward(_unit_last(q), _unit_last(k), _unit_last(v))


@_flash_attention_op.register_fake
def _(q, k, v):
    B, Lq, H, Dh = q.shape
    return q.new_empty((B, Lq, H, Dh)), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("ditfast::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, deterministic: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous, in the inputs' dtype."""
    args = [_unit_last(t) for t in (do, q, k, v, o)]
    return _kernels().attention_backward(*args, lse, deterministic)


@_flash_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.deterministic = True


def _backward(ctx, do, _dlse):
    # _dlse is ignored: lse is non-differentiable (module docstring)
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:  # o unused by the loss
        do = torch.zeros_like(o)
    return _flash_attention_backward_op(do, q, k, v, o, lse, ctx.deterministic)


_flash_attention_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def _check(q, k, v) -> None:
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
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must have shape (B, Lk, H, Dh) matching q {tuple(q.shape)} in B, H and Dh, got {tuple(k.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 1:
        raise ValueError(f"q, k, v: the triton attention backend takes head dims 1..{MAX_HEAD_DIM}, got Dh = {q.shape[-1]}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q is on {q.device}; the triton attention backend runs on CUDA (or CPU under TRITON_INTERPRET=1)")


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False):
    """softmax(q kᵀ · Dh**-0.5) v with ditfast's Triton FlashAttention kernel (non-causal).

    q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh); fp32 / bf16 / fp16, one dtype and device, Dh <= 256;
    any strides (a non-unit stride on Dh is copied first). Returns o (B, Lq, H, Dh) in q's dtype, or
    with ``return_lse=True`` the pair (o, lse), lse (B, H, Lq) fp32 = logsumexp (natural log) of the
    scaled scores. Gradients flow through o (deterministic backward); lse has no gradient. Lk = 0
    gives o = 0 and lse = -inf.
    """
    _check(q, k, v)
    o, lse = _flash_attention_op(q, k, v)
    return (o, lse) if return_lse else o
