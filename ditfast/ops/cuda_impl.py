"""The "cuda" backend: the compiled operators of ``ditfast._C`` (csrc/).

``_C`` defines ``torch.ops.ditfast.<op>_c`` (and ``<op>_c_backward``) with CPU and CUDA kernels,
so on CPU this backend is a compiled C++ path, and on GPUs it is the hand-written CUDA kernels.
This module adds what the C++ side leaves to Python, once ``_C`` is loaded (ditfast._ext.on_load):

* fake kernels (torch.library.register_fake) so the ops trace under torch.compile/export;
* autograd (torch.library.register_autograd): every backward is a C++ kernel, one pass:
  - norm_modulate_c / gated_residual_norm_modulate_c -> the *_c_backward ops (recompute the row
    statistics from the saved inputs; grads of per-sample shift/scale/gate are summed over tokens
    per block, then over blocks, deterministically);
  - apply_rope_c -> apply_rope_c itself, rotating by minus the angle;
  - qk_norm_rope_c -> qk_norm_rope_c_backward (RMSNorm + RoPE backward, weight grads included;
    with both weights None the op is RoPE only and its backward the inverse rotation);
  - prepare_attention_c -> prepare_attention_c_backward (the same backward per stream, reading the
    stream's rows of the joint grads); v's grads are narrow views of the joint grad. Weights are
    Tensor[] with an empty tensor for "no norm" (a list holding None gets no gradient from
    torch.library's autograd).
  cos/sin get no gradient from these ops: calls whose tables require grad go to the reference.
  A (1, D) / (1, L, D) modulation reaches the C++ op as it is: the op broadcasts it and sums its
  grad over the batch in fp32, rounding once.

It also registers the backend implementations with ditfast._backend (availability is probed
there, lazily: importing this module does not load _C) and keeps the measured backend table
(:func:`table_choice`) that lets the automatic choice take the faster of the CUDA and Triton
kernels per op, dtype and row width.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from .. import _backend, _ext, reference
from .._compile import constant_for_compile
from ..reference.prepare import prepare_attention as _reference_prepare
from . import _validate as v

__all__ = ["table_choice", "load_table", "save_table", "TABLE_ENV", "DEFAULT_TABLE", "OPS"]

# public op name -> the C++ operator that implements it
OPS = {
    "norm_modulate": "ditfast::norm_modulate_c",
    "gated_residual_norm_modulate": "ditfast::gated_residual_norm_modulate_c",
    "apply_rope": "ditfast::apply_rope_c",
    "qk_norm_rope": "ditfast::qk_norm_rope_c",
    "prepare_attention": "ditfast::prepare_attention_c",
}
_MAX_ROW_CUDA = 8192  # ditfast._C.MAX_ROW_CUDA (csrc/kernels.h); larger rows go to the reference
_MAX_HEAD_DIM_CUDA = 512  # ditfast._C.MAX_HEAD_DIM_CUDA


# ---- fake kernels (shapes and dtypes only; outputs are new contiguous tensors) ----------------------
def _fake_norm_modulate(x, shift, scale, eps):
    return x.new_empty(x.shape, dtype=v.result_dtype(x, shift, scale))


def _fake_norm_modulate_backward(grad_out, x, shift, scale, eps):
    dshift = scale.new_empty(0) if shift is None else shift.new_empty(shift.shape)
    return x.new_empty(x.shape), scale.new_empty(scale.shape), dshift


def _fake_grnm(x, y, gate, shift, scale, eps):
    xn_dtype = v.result_dtype(x, y, gate)
    x_new = x.new_empty(x.shape, dtype=xn_dtype)
    return x_new, x.new_empty(x.shape, dtype=v.result_dtype(x_new, shift, scale))


def _fake_grnm_backward(grad_x_new, grad_h, x, y, gate, shift, scale, eps):
    dshift = scale.new_empty(0) if shift is None else shift.new_empty(shift.shape)
    return x.new_empty(x.shape), y.new_empty(y.shape), gate.new_empty(gate.shape), scale.new_empty(scale.shape), dshift


def _fake_apply_rope(x, cos, sin, interleaved, inverse):
    return x.new_empty(x.shape)


def _fake_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _fake_qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, interleaved):
    dqw = q.new_empty(0) if q_weight is None else q_weight.new_empty(q_weight.shape)
    dkw = k.new_empty(0) if k_weight is None else k_weight.new_empty(k_weight.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), dqw, dkw


def _fake_prepare(qs, ks, vs, q_weights, k_weights, cos, sin, eps, interleaved):
    B, _, H, Dh = qs[0].shape
    joint = (B, sum(q.shape[1] for q in qs), H, Dh)
    return qs[0].new_empty(joint), qs[0].new_empty(joint), qs[0].new_empty(joint)


def _fake_prepare_backward(grad_q, grad_k, qs, ks, q_weights, k_weights, cos, sin, eps, interleaved):
    return ([q.new_empty(q.shape) for q in qs], [k.new_empty(k.shape) for k in ks],
            [w.new_empty(w.shape) for w in q_weights], [w.new_empty(w.shape) for w in k_weights])


# ---- autograd ----------------------------------------------------------------------------------------
def _nm_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps = eps


def _nm_backward(ctx, grad):
    x, shift, scale = ctx.saved_tensors
    dx, dscale, dshift = torch.ops.ditfast.norm_modulate_c_backward(grad, x, shift, scale, ctx.eps)
    return dx, (None if shift is None else dshift), dscale, None


def _grnm_setup(ctx, inputs, output):
    x, y, gate, shift, scale, eps = inputs
    ctx.save_for_backward(x, y, gate, shift, scale)
    ctx.eps = eps


def _grnm_backward(ctx, grad_x_new, grad_h):
    x, y, gate, shift, scale = ctx.saved_tensors
    dx, dy, dgate, dscale, dshift = torch.ops.ditfast.gated_residual_norm_modulate_c_backward(
        grad_x_new, grad_h, x, y, gate, shift, scale, ctx.eps
    )
    return dx, dy, dgate, (None if shift is None else dshift), dscale, None


def _rope_setup(ctx, inputs, output):
    x, cos, sin, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved, ctx.inverse = interleaved, inverse


def _rope_backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    dx = torch.ops.ditfast.apply_rope_c(grad, cos, sin, ctx.interleaved, not ctx.inverse)
    return dx, None, None, None, None


def _qk_setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, eps, interleaved = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.eps, ctx.interleaved = eps, interleaved


def _qk_backward(ctx, grad_q, grad_k):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq, dk, dqw, dkw = torch.ops.ditfast.qk_norm_rope_c_backward(
        grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, ctx.eps, ctx.interleaved
    )
    return dq, dk, (None if q_weight is None else dqw), (None if k_weight is None else dkw), None, None, None, None


def _prepare_setup(ctx, inputs, output):
    qs, ks, vs, q_weights, k_weights, cos, sin, eps, interleaved = inputs
    ctx.n, ctx.lengths = len(qs), [q.shape[1] for q in qs]
    ctx.eps, ctx.interleaved = eps, interleaved
    ctx.save_for_backward(*qs, *ks, *q_weights, *k_weights, cos, sin)


def _prepare_backward(ctx, grad_q, grad_k, grad_v):
    n = ctx.n
    saved = ctx.saved_tensors
    qs, ks, qws, kws = (list(saved[i * n : (i + 1) * n]) for i in range(4))
    cos, sin = saved[4 * n :]
    dqs, dks, dqws, dkws = torch.ops.ditfast.prepare_attention_c_backward(
        grad_q, grad_k, qs, ks, qws, kws, cos, sin, ctx.eps, ctx.interleaved
    )
    # Lists of gradients hold tensors only (no None): torch 2.11's autograd wrapper reads a list with a
    # None as one opaque item and rejects the structure. An empty (0,) weight (no norm) gets its empty
    # gradient; v was copied, so its grads are the stream's rows of the joint grad (zeros if unused).
    starts = [sum(ctx.lengths[:i]) for i in range(n)]
    if grad_v is None:
        dvs = [qs[i].new_zeros(qs[i].shape) for i in range(n)]
    else:
        dvs = [grad_v.narrow(1, s, L) for s, L in zip(starts, ctx.lengths)]
    return list(dqs), list(dks), dvs, list(dqws), list(dkws), None, None, None, None


_REGISTERED = False
_HAS_PREPARE = False


def _register(_c_module) -> None:
    """Fake kernels and autograd for the C++ ops; runs once, when ditfast._C is loaded."""
    global _REGISTERED
    if _REGISTERED:
        return
    fakes = {
        "ditfast::norm_modulate_c": _fake_norm_modulate,
        "ditfast::norm_modulate_c_backward": _fake_norm_modulate_backward,
        "ditfast::gated_residual_norm_modulate_c": _fake_grnm,
        "ditfast::gated_residual_norm_modulate_c_backward": _fake_grnm_backward,
        "ditfast::apply_rope_c": _fake_apply_rope,
        "ditfast::qk_norm_rope_c": _fake_qk_norm_rope,
        "ditfast::qk_norm_rope_c_backward": _fake_qk_norm_rope_backward,
        "ditfast::prepare_attention_c": _fake_prepare,
        "ditfast::prepare_attention_c_backward": _fake_prepare_backward,
    }
    global _HAS_PREPARE
    # a _C built before the prepare ops existed still serves the other ops (prepare then runs the reference)
    _HAS_PREPARE = hasattr(torch.ops.ditfast, "prepare_attention_c")
    if not _HAS_PREPARE:
        for name in ("ditfast::prepare_attention_c", "ditfast::prepare_attention_c_backward"):
            fakes.pop(name)
    for name, fn in fakes.items():
        torch.library.register_fake(name, fn)
    torch.library.register_autograd("ditfast::norm_modulate_c", _nm_backward, setup_context=_nm_setup)
    torch.library.register_autograd(
        "ditfast::gated_residual_norm_modulate_c", _grnm_backward, setup_context=_grnm_setup
    )
    torch.library.register_autograd("ditfast::apply_rope_c", _rope_backward, setup_context=_rope_setup)
    torch.library.register_autograd("ditfast::qk_norm_rope_c", _qk_backward, setup_context=_qk_setup)
    if _HAS_PREPARE:
        torch.library.register_autograd("ditfast::prepare_attention_c", _prepare_backward, setup_context=_prepare_setup)
    _REGISTERED = True


_ext.on_load(_register)


# ---- backend implementations (same signatures as the public ops) ------------------------------------
def _tables_need_grad(cos, sin) -> bool:
    return cos is not None and torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)


def norm_modulate(x, shift, scale, *, eps=1e-6):
    if x.is_cuda and x.shape[-1] > _MAX_ROW_CUDA:
        return reference.norm_modulate(x, shift, scale, eps=eps)
    return torch.ops.ditfast.norm_modulate_c(x, shift, scale, eps)


def gated_residual_norm_modulate(x, y, gate, shift, scale, *, eps=1e-6):
    if x.is_cuda and x.shape[-1] > _MAX_ROW_CUDA:
        return reference.gated_residual_norm_modulate(x, y, gate, shift, scale, eps=eps)
    return tuple(torch.ops.ditfast.gated_residual_norm_modulate_c(x, y, gate, shift, scale, eps))


def apply_rope(x, cos, sin, *, interleaved=True):
    if (x.is_cuda and x.shape[-1] > _MAX_HEAD_DIM_CUDA) or _tables_need_grad(cos, sin):
        return reference.apply_rope(x, cos, sin, interleaved=interleaved)
    return torch.ops.ditfast.apply_rope_c(x, cos, sin, interleaved, False)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, *, eps=1e-6, interleaved=True):
    Dh = q.shape[-1]
    if Dh % 2 or (q.is_cuda and Dh > _MAX_HEAD_DIM_CUDA) or _tables_need_grad(cos, sin):
        return reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps=eps, interleaved=interleaved)
    return tuple(torch.ops.ditfast.qk_norm_rope_c(q, k, q_weight, k_weight, cos, sin, eps, interleaved))


def prepare_attention(qs, ks, vs, *, q_weights=None, k_weights=None, rope=None, eps=1e-6, interleaved=True):
    Dh = qs[0].shape[-1]
    cos, sin = (None, None) if rope is None else rope
    if not _HAS_PREPARE or Dh % 2 or (qs[0].is_cuda and Dh > _MAX_HEAD_DIM_CUDA) or _tables_need_grad(cos, sin):
        return _reference_prepare(
            qs, ks, vs, q_weights=q_weights, k_weights=k_weights, rope=rope, eps=eps, interleaved=interleaved
        )
    n = len(qs)

    def weights(ws):  # empty tensor = no norm for that stream (see the module docstring)
        return [qs[0].new_empty((0,)) if w is None else w for w in ([None] * n if ws is None else ws)]

    return tuple(torch.ops.ditfast.prepare_attention_c(
        list(qs), list(ks), list(vs), weights(q_weights), weights(k_weights), cos, sin, eps, interleaved
    ))


_backend.register("norm_modulate", "cuda", norm_modulate)
_backend.register("gated_residual_norm_modulate", "cuda", gated_residual_norm_modulate)
_backend.register("apply_rope", "cuda", apply_rope)
_backend.register("qk_norm_rope", "cuda", qk_norm_rope)
_backend.register("prepare_attention", "cuda", prepare_attention)


# ---- the measured backend table ----------------------------------------------------------------------
# A JSON file written by the benchmarks (one per GPU model inside one file):
#
#   {"format": "ditfast-backend-table/1",
#    "devices": {
#      "NVIDIA H100 80GB HBM3": {
#        "measured": {"torch": "2.11.0", "triton": "3.6.0", "commit": "abc123", "date": "2026-11-23"},
#        "entries": [
#          {"op": "norm_modulate", "dtype": "bfloat16", "width_min": 1, "width_max": 2048,
#           "backend": "cuda", "gbps": {"cuda": 2950.0, "triton": 2810.0}},
#          ...]}}}
#
# "width" is the row length the kernels work on: D for the modulate ops, Dh for the rope ops;
# width_min/width_max are inclusive; the first matching entry wins; "gbps" is informational.
# Looked up at $DITFAST_BACKEND_TABLE, else ditfast/ops/backend_table.json. No file, no device
# entry or no matching entry: table_choice returns None and the fixed AUTO_ORDER applies.
TABLE_ENV = "DITFAST_BACKEND_TABLE"
DEFAULT_TABLE = Path(__file__).with_name("backend_table.json")
_DEFAULT_TABLE_STR = str(DEFAULT_TABLE)
TABLE_FORMAT = "ditfast-backend-table/1"


def _table_path() -> Path:
    return Path(os.environ.get(TABLE_ENV) or DEFAULT_TABLE)


def load_table(path: Optional[os.PathLike] = None) -> Dict[str, dict]:
    """{device name: {"measured": ..., "entries": [...]}} from a table file ({} if there is none).

    Raises ValueError on a file that exists but is not a ditfast backend table."""
    p = Path(path) if path is not None else _table_path()
    if not p.exists():
        return {}
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("devices"), dict):
        raise ValueError(f"{p} is not a ditfast backend table (expected format {TABLE_FORMAT!r})")
    for dev, block in data["devices"].items():
        for e in block.get("entries", []):
            missing = {"op", "dtype", "width_min", "width_max", "backend"} - set(e)
            # a family ("triton", "compiled"; the alias "cuda") or one implementation ("flash_attn3", "sdpa_cudnn")
            if missing or e["backend"] not in _backend.known_names():
                raise ValueError(f"{p}: bad entry for {dev!r}: {e} (missing {sorted(missing)} or unknown backend)")
    return data["devices"]


def save_table(entries: Iterable[dict], device_name: str, path: Optional[os.PathLike] = None,
               measured: Optional[dict] = None) -> Path:
    """Write (replace) ``device_name``'s entries in the table file, keeping other devices'."""
    p = Path(path) if path is not None else _table_path()
    devices = load_table(p) if p.exists() else {}
    entries = [dict(e) for e in entries]
    for e in entries:
        missing = {"op", "dtype", "width_min", "width_max", "backend"} - set(e)
        if missing:
            raise ValueError(f"table entry {e} lacks {sorted(missing)}")
    devices[device_name] = {"measured": dict(measured or {}), "entries": entries}
    p.write_text(json.dumps({"format": TABLE_FORMAT, "devices": devices}, indent=1, sort_keys=True) + "\n")
    _cached_table.cache_clear()
    _cached_choice.cache_clear()
    return p


@functools.lru_cache(maxsize=None)
def _cached_table(path: str) -> Dict[str, dict]:
    try:
        return load_table(path)
    except (OSError, ValueError):
        return {}  # a broken table must not break the ops: fall back to the fixed order


@functools.lru_cache(maxsize=64)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=4096)
def _cached_choice(op: str, device_name: str, dtype: str, width: int, path: str) -> Optional[str]:
    block = _cached_table(path).get(device_name)
    if not block:
        return None
    for e in block.get("entries", []):
        if e["op"] == op and e["dtype"] == dtype and int(e["width_min"]) <= width <= int(e["width_max"]):
            return e["backend"]
    return None


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@constant_for_compile  # evaluated at trace time; its file reads never reach Dynamo
def table_choice(op: str, device: torch.device, dtype: torch.dtype, width: int) -> Optional[str]:
    """The backend the measured table prefers for ``op`` on ``device`` with ``dtype`` inputs and rows
    of ``width`` elements (D, or Dh for the rope ops); None when it has no entry. Entries are per GPU
    model name, so only CUDA tensors have any today."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    path = os.environ.get(TABLE_ENV) or _DEFAULT_TABLE_STR
    return _cached_choice(op, _device_name(index), _DTYPE_NAMES.get(dtype, str(dtype)), int(width), path)


# The automatic choice in ditfast._backend consults the table for CUDA tensors.
_backend.set_chooser(table_choice)
