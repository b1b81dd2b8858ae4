"""The pieces every level shares: what a variant is, how ditfast's backends are enumerated (with the
reason each missing one is skipped), and small helpers for inputs and torch.compile.

Variant names, used in the JSON, the table and the plots:
  "ditfast"            ditfast with its automatic backend choice (what a user gets by default)
  "ditfast:<backend>"  ditfast with one backend forced (triton, cuda, or an attention backend)
  "eager"              the plain-PyTorch reference, eager
  "compile"            the reference under torch.compile (compile time reported separately)
  "diffusers", "diffusers+compile", "sdpa:<kernel>", "flash_attn", "liger", ...: peers
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch

from .. import _backend


@dataclass
class Built:
    """A ready-to-time variant: ``forward()`` runs it once; ``leaves`` get gradients in fwd+bwd."""

    forward: Callable[[], Any]
    leaves: List[torch.Tensor] = field(default_factory=list)
    graphable: bool = True
    notes: List[str] = field(default_factory=list)


@dataclass
class VariantSpec:
    """A variant to measure, or (``build`` None) one that is skipped with ``reason``."""

    name: str
    kind: str  # "ditfast" | "backend" | "peer"
    build: Optional[Callable[[], Built]] = None
    reason: Optional[str] = None
    backend: Optional[str] = None
    compiled: bool = False
    fwd_bwd_reason: Optional[str] = None  # set when fwd+bwd is not measured for this variant


def skipped(name: str, kind: str, reason: str, backend: Optional[str] = None) -> VariantSpec:
    return VariantSpec(name, kind, None, reason, backend)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def flat_tensors(out) -> List[torch.Tensor]:
    """The tensors of a (possibly nested) output that autograd can differentiate."""
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_tensors(o)]
    if hasattr(out, "to_tuple"):  # diffusers' output dataclasses
        return flat_tensors(out.to_tuple())
    return []


def leaf(shape: Sequence[int], device, dtype, *, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, device=device, dtype=torch.float32) * scale
    return t.to(dtype).requires_grad_(grad)


# ----------------------------------------------------------------------------------- ditfast backends
def auto_backend(op: str, device: torch.device, like: Optional[torch.Tensor] = None) -> Optional[str]:
    """The backend ditfast picks automatically for ``op`` on ``device`` (None if unknown); ``like``,
    the op's main input, lets a measured backend table take part (see ditfast._backend.chosen_name)."""
    if _backend.requested_backend() is not None:
        return None
    try:
        return _backend.chosen_name(op, device, like)
    except Exception:  # noqa: BLE001 - a probe, never fatal
        return None


def attention_choice(device: torch.device, dtype: torch.dtype, H: int, Dh: int) -> Optional[str]:
    """The attention backend ditfast picks automatically for (·, ·, H, Dh) tensors of ``dtype``."""
    from ..ops import attention as attn

    choose = getattr(attn, "choose_backend", None)
    if choose is None:
        return auto_backend("joint_attention", device)
    try:
        t = torch.empty(1, 1, H, Dh, device=device, dtype=dtype)
        return choose(t, t, t)
    except Exception:  # noqa: BLE001 - a label, never fatal
        return None


def auto_backends(device: torch.device) -> dict:
    """{op: automatically chosen backend} for every registered op."""
    return {op: auto_backend(op, device) for op in _backend.ops()}


def backend_availability(device_type: str) -> dict:
    """{backend: {"available": bool, "reason": str}} for ditfast's op backends on a device type."""
    out = {}
    for b in _backend.BACKENDS:
        ok, why = _backend.availability(b, device_type)
        out[b] = {"available": bool(ok), "reason": why}
    return out


def forced_backends(device: torch.device, op: Optional[str], allowed: Optional[Sequence[str]]):
    """Yield (backend, skip reason or None) for each non-reference ditfast backend.

    ``op`` None means "a block of several ops": only availability on the device is checked.
    ``allowed`` (from --backends) restricts which backends are tried.
    """
    for b in _backend.BACKENDS:
        if b == "reference":  # measured as the "eager" peer, without the dispatch layer
            continue
        if allowed is not None and b not in allowed:
            yield b, "not selected (--backends)"
            continue
        if op is not None and b not in _backend.implemented(op):
            yield b, f"ditfast has no {b} implementation of {op} yet"
            continue
        ok, why = _backend.availability(b, device.type)
        yield b, (None if ok else why)


def with_backend(backend: Optional[str], fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run inside ``ditfast.use_backend(backend)`` (None: automatic, no context)."""
    if backend is None:
        return fn

    def run():
        with _backend.use_backend(backend):
            return fn()

    return run


# ------------------------------------------------------------------------------------------- compile
def compile_fn(fn):
    """torch.compile with static shapes (each benchmark shape gets its own specialised graph)."""
    return torch.compile(fn, dynamic=False)


def compile_unavailable(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run here, or None."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cuda" and not installed("triton"):
        return "torch.compile on CUDA needs triton"
    return None


def raise_recompile_limit(limit: int = 256) -> None:
    """Many shapes per function would otherwise hit dynamo's recompile limit and fall back to eager."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(limit, getattr(dcfg, name)))


def reset_compiled() -> None:
    """Drop compiled graphs between cases (frees their memory; the on-disk cache stays)."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
