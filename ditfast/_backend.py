"""Backend selection for ditfast.ops.

Three backend names exist: ``"reference"`` (plain PyTorch, always there), ``"triton"`` (the fused
Triton kernels) and ``"cuda"`` (the C++/CUDA extension ``ditfast._C``). Each op module registers the
implementations it has with :func:`register`; :func:`select` picks one per call:

1. the innermost ``with ditfast.use_backend(name):`` block, else
2. the ``DITFAST_BACKEND`` environment variable (read when ditfast is imported), else
3. automatic: on CUDA tensors, the backend a measured table prefers for the op, dtype and row
   width (the chooser installed with :func:`set_chooser`, ditfast/ops/cuda_impl.py's table), if it
   implements the op and can run; else the first backend in :data:`AUTO_ORDER` that implements the
   op and can run on the tensors' device.

An explicitly requested backend that cannot run raises a ``RuntimeError`` that says why; automatic
choice never fails because "reference" always runs. Nothing here touches the GPU at import time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ._compile import constant_for_compile

BACKENDS = ("reference", "triton", "cuda")
# Automatic preference per device type. On CPU the Triton interpreter is a test tool, not a fast
# path, so it is never chosen automatically.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cuda", "reference")}

_IMPLS: Dict[str, Dict[str, Callable]] = {}  # op name -> backend name -> implementation
_STACK: List[Optional[str]] = []  # use_backend() nesting; None = automatic
_ENV_BACKEND = os.environ.get("DITFAST_BACKEND") or None
_AVAILABILITY: Dict[Tuple[str, str], Tuple[bool, str]] = {}  # (backend, device type) -> (ok, why)
# (op, device, dtype, row width) -> preferred backend or None; consulted for CUDA tensors only
Chooser = Callable[[str, torch.device, torch.dtype, int], Optional[str]]
_CHOOSER: Optional[Chooser] = None


def _check_name(name: Optional[str]) -> Optional[str]:
    if name is not None and name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown ditfast backend {name!r}; expected one of {BACKENDS} or 'auto'")
    return None if name == "auto" else name


if _ENV_BACKEND is not None:
    _ENV_BACKEND = _check_name(_ENV_BACKEND)


def register(op: str, backend: str, fn: Callable) -> None:
    """Declare that ``backend`` implements ``op`` with ``fn`` (same signature as the public op)."""
    _check_name(backend)
    _IMPLS.setdefault(op, {})[backend] = fn


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (None or "auto": automatic)."""
    _STACK.append(_check_name(name))
    try:
        yield
    finally:
        _STACK.pop()


def requested_backend() -> Optional[str]:
    """The backend asked for by use_backend() or DITFAST_BACKEND; None means automatic."""
    return _STACK[-1] if _STACK else _ENV_BACKEND


def _probe(backend: str, device_type: str) -> Tuple[bool, str]:
    if backend == "reference":
        return True, "plain PyTorch, always available"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "the triton package is not installed"
        if device_type == "cuda":
            return True, "triton is installed"
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return True, "CPU tensors run under the Triton interpreter (TRITON_INTERPRET=1; slow)"
            return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        return False, f"Triton kernels do not run on {device_type!r} tensors"
    if backend == "cuda":
        from . import _ext

        return _ext.availability(device_type)
    raise AssertionError(backend)


@constant_for_compile  # torch.compile: no guard on the lazily filled cache, so no cold-start recompile
def availability(backend: str, device_type: str) -> Tuple[bool, str]:
    """(available, reason) for a backend on a device type; probed once and cached."""
    key = (backend, device_type)
    if key not in _AVAILABILITY:
        _AVAILABILITY[key] = _probe(backend, device_type)
    return _AVAILABILITY[key]


def set_chooser(fn: Optional[Chooser]) -> None:
    """Install (None: remove) the measured-table hook of the automatic choice: ``fn(op, device, dtype,
    width)`` names the preferred backend for CUDA tensors of ``dtype`` whose rows have ``width``
    elements, or returns None to leave the choice to AUTO_ORDER. Asked only for ops the "cuda"
    backend implements. It must be cheap and, under torch.compile, constant for given arguments
    (mark it with ditfast._compile.constant_for_compile)."""
    global _CHOOSER
    _CHOOSER = fn


def chosen_name(op: str, device: torch.device, like: Optional[torch.Tensor] = None) -> str:
    """The name of the backend that runs ``op`` for tensors on ``device`` (raises if a requested one
    can't). ``like``: the op's main input, whose dtype and last-dim size the measured table is keyed by."""
    impls = _IMPLS[op]
    name = requested_backend()
    if name is not None:
        if name not in impls:
            raise RuntimeError(
                f"ditfast backend {name!r} has no implementation of {op}; implemented by {implemented(op)}"
            )
        ok, why = availability(name, device.type)
        if not ok:
            raise RuntimeError(f"ditfast backend {name!r} cannot run {op} on {device.type}: {why}")
        return name
    if _CHOOSER is not None and like is not None and device.type == "cuda" and "cuda" in impls:
        pick = _CHOOSER(op, device, like.dtype, int(like.shape[-1]))
        if pick in impls and availability(pick, device.type)[0]:
            return pick
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        if candidate in impls and availability(candidate, device.type)[0]:
            return candidate
    return "reference"


def select(op: str, device: torch.device, like: Optional[torch.Tensor] = None) -> Callable:
    """The implementation of ``op`` to run for tensors on ``device`` (``like``: see chosen_name)."""
    return _IMPLS[op][chosen_name(op, device, like)]


def implemented(op: str) -> Tuple[str, ...]:
    """Backends that implement ``op``."""
    return tuple(b for b in BACKENDS if b in _IMPLS.get(op, {}))


def ops() -> Tuple[str, ...]:
    return tuple(_IMPLS)
