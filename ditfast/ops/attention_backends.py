"""Attention implementations for ``ditfast.ops.joint_attention``, registered in ditfast/_backend.py.

Each is one :class:`ditfast._backend.Impl` of the op ``"joint_attention"``: a name, a family (what
``ditfast.use_backend`` asks for), the devices, dtypes and head dims (the op's "width") it takes,
the CUDA compute capabilities it runs on, whether it can return the log-sum-exp (feature ``"lse"``)
and a probe that says whether its package is installed. All take and return the (B, L, H, Dh)
layout; ``run(q, k, v, return_lse)`` returns ``o`` or ``(o, lse)`` with lse (B, H, Lq) fp32.

======================  ==========  ============================================================
name                    family      what runs
======================  ==========  ============================================================
``flash_attn3``         cuda        ``flash_attn_interface.flash_attn_func`` (flash-attention 3, Hopper)
``flash_attn4``         cuda        ``flash_attn.cute.flash_attn_func`` (flash-attention 4)
``flash_attn2``         cuda        ``flash_attn.flash_attn_func`` (flash-attention 2, Ampere and newer)
``sdpa_cudnn``          cuda        PyTorch SDPA pinned to its cuDNN kernel
``sdpa_flash``          cuda        PyTorch SDPA's flash kernel (lse through ``aten._scaled_dot_product_flash_attention``)
``sdpa_efficient``      cuda        PyTorch SDPA's memory-efficient kernel (lse through its aten op)
``triton``              triton      ditfast's own Triton flash attention (ditfast/kernels/triton/attention.py)
``sdpa_math``           reference   PyTorch SDPA pinned to its math kernel (any device)
``reference``           reference   ditfast.reference.joint_attention (plain PyTorch; any device)
======================  ==========  ============================================================

The request order is the registry's (``backend=`` argument, ``use_backend``,
``DITFAST_ATTENTION_BACKEND``, ``DITFAST_BACKEND``); the automatic order is :func:`priority`.
Missing packages are found when an implementation is first considered, never at ``import ditfast``.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, List, Optional, Tuple

import torch

from .. import _backend, reference
from .._backend import Spec

Tensor = torch.Tensor
OP = "joint_attention"
ENV_VAR = "DITFAST_ATTENTION_BACKEND"
_HALF = (torch.float16, torch.bfloat16)
_ALL = (torch.float32, torch.float16, torch.bfloat16)
_ANY = _ALL + (torch.float64,)


# -- probes ----------------------------------------------------------------------------------------
def _import(module: str):
    """The module, or None when it is not installed (an install that fails to import raises)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):  # a missing parent package
        return None
    return importlib.import_module(module)


def _probe_module(module: str, attr: str, package: str) -> Callable[[str], Tuple[bool, str]]:
    def probe(device_type: str) -> Tuple[bool, str]:
        mod = _import(module)
        if mod is None:
            return False, f"{module} is not installed (pip install {package})"
        if not hasattr(mod, attr):
            return False, f"{module} has no {attr} (an unexpected version of {package})"
        return True, f"{module}.{attr} is installed"

    return probe


def _probe_flash_attn2(device_type: str) -> Tuple[bool, str]:
    mod = _import("flash_attn")
    if mod is None:
        return False, "flash_attn is not installed (pip install flash-attn)"
    version = str(getattr(mod, "__version__", ""))
    if not hasattr(mod, "flash_attn_func") or not version.startswith("2."):
        return False, f"flash_attn {version or '(no version)'} is not flash-attention 2"
    return True, f"flash_attn {version} is installed"


def _probe_sdpa(kernel: str) -> Callable[[str], Tuple[bool, str]]:
    def probe(device_type: str) -> Tuple[bool, str]:
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, kernel):
            return False, f"this PyTorch ({torch.__version__}) has no SDPBackend.{kernel}"
        if device_type == "cuda":
            if kernel == "FLASH_ATTENTION" and not torch.backends.cuda.is_flash_attention_available():
                return False, "this PyTorch build has no flash attention kernel"
            if kernel == "CUDNN_ATTENTION" and not torch.backends.cudnn.is_available():
                return False, "cuDNN is not available to this PyTorch"
        return True, f"torch {torch.__version__} SDPBackend.{kernel}"

    return probe


# -- runners: (q, k, v, return_lse) -> o or (o, lse) ----------------------------------------------
def _split_lse(out, return_lse: bool, name: str):
    """flash-attn 3 / 4 return (out, lse) (or out alone in some versions)."""
    if isinstance(out, (tuple, list)):
        return (out[0], out[1].float()) if return_lse else out[0]
    if return_lse:
        raise RuntimeError(f"this version of {name} does not return the log-sum-exp")
    return out


def _run_flash_attn2(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False):
    from flash_attn import flash_attn_func

    if return_lse:
        out, lse, _ = flash_attn_func(q, k, v, causal=False, return_attn_probs=True)
        return out, lse.float()
    return flash_attn_func(q, k, v, causal=False)


def _run_flash_attn3(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False):
    import flash_attn_interface

    return _split_lse(flash_attn_interface.flash_attn_func(q, k, v, causal=False), return_lse, "flash_attn3")


def _run_flash_attn4(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False):
    from flash_attn.cute import flash_attn_func

    # its kernels need a unit stride on the head dim (views of packed projections have one)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _split_lse(flash_attn_func(q, k, v, causal=False), return_lse, "flash_attn4")


def _run_sdpa(kernel: str) -> Callable:
    def run(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, Dh) views, no copies
        if return_lse:
            aten = torch.ops.aten
            if kernel == "FLASH_ATTENTION":
                out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
            elif kernel == "EFFICIENT_ATTENTION":
                out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
                lse = lse[..., : q.shape[1]]  # padded to a multiple of 32 queries
            else:
                raise AssertionError(kernel)
            return out.transpose(1, 2), lse.float()
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        return out.transpose(1, 2)

    return run


def _run_triton(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False):
    from ._attention_triton import triton_attention

    return triton_attention(q, k, v, return_lse=return_lse)


# ------------------------------------------------------------------------------------------------
# Registration (conservative static rules; the CUDA libraries may accept more than listed)
# ------------------------------------------------------------------------------------------------
_LSE = ("lse",)


def _register(name: str, family: str, run: Callable, probe, description: str, **limits) -> None:
    _backend.register(OP, family, run, name=name, probe=probe, description=description, **limits)


_register("flash_attn3", "cuda", _run_flash_attn3,
          _probe_module("flash_attn_interface", "flash_attn_func", "flash-attn-3 (hopper/ of flash-attention)"),
          "flash-attention 3 (flash_attn_interface.flash_attn_func)", devices=("cuda",), dtypes=_HALF,
          max_width=256, width_multiple=8, min_capability=(9, 0), max_capability=(9, 0), features=_LSE)
_register("flash_attn4", "cuda", _run_flash_attn4, _probe_module("flash_attn.cute", "flash_attn_func", "flash-attn-cute"),
          "flash-attention 4 (flash_attn.cute.flash_attn_func)", devices=("cuda",), dtypes=_HALF,
          max_width=128, width_multiple=8, min_capability=(9, 0), max_capability=(10, 3), features=_LSE)
_register("flash_attn2", "cuda", _run_flash_attn2, _probe_flash_attn2, "flash-attention 2 (flash_attn.flash_attn_func)",
          devices=("cuda",), dtypes=_HALF, max_width=256, width_multiple=8, min_capability=(8, 0), features=_LSE)
_register("sdpa_cudnn", "cuda", _run_sdpa("CUDNN_ATTENTION"), _probe_sdpa("CUDNN_ATTENTION"),
          "PyTorch SDPA, cuDNN kernel", devices=("cuda",), dtypes=_HALF, max_width=128, width_multiple=8,
          min_capability=(8, 0))
_register("sdpa_flash", "cuda", _run_sdpa("FLASH_ATTENTION"), _probe_sdpa("FLASH_ATTENTION"),
          "PyTorch SDPA, flash kernel", devices=("cuda",), dtypes=_HALF, max_width=256, min_capability=(8, 0),
          features=_LSE)
_register("sdpa_efficient", "cuda", _run_sdpa("EFFICIENT_ATTENTION"), _probe_sdpa("EFFICIENT_ATTENTION"),
          "PyTorch SDPA, memory-efficient kernel", devices=("cuda",), dtypes=_ALL, width_multiple=8,
          min_capability=(5, 0), features=_LSE)
_register("triton", "triton", _run_triton, _backend.probe_triton, "ditfast Triton flash attention (prologue-free, lse)",
          devices=("cuda", "cpu"), dtypes=_ALL, max_width=256, min_capability=(8, 0), features=_LSE)
_register("sdpa_math", "reference", _run_sdpa("MATH"), _probe_sdpa("MATH"), "PyTorch SDPA, math kernel",
          devices=None, dtypes=_ANY)
_register("reference", "reference", reference.joint_attention, _backend.probe_reference,
          "ditfast.reference.joint_attention (plain PyTorch)", devices=None, dtypes=_ANY, features=_LSE)

NAMES: Tuple[str, ...] = _backend.implemented(OP)
FP64_BACKENDS = frozenset(n for n in NAMES if torch.float64 in _backend.impl(OP, n).dtypes)


def priority(spec: Spec) -> Tuple[str, ...]:
    """Implementations to try, fastest first, for a device / GPU generation / dtype / head dim.

    A starting table, to be calibrated on a GPU by the benchmarks: flash-attention 3 and cuDNN lead
    on Hopper, flash-attention 4 and cuDNN on datacenter Blackwell, flash-attention 2 on Ampere / Ada.
    ditfast's Triton kernel comes after the hand-written CUDA kernels, and after SDPA's flash kernel
    when the head dim is not a power of two (it pads 72 to 128). fp32 has no tensor-core kernel but
    the Triton one (exact fp32, no TF32) and SDPA's memory-efficient one. On CPU the unpinned SDPA of
    the reference picks PyTorch's fastest CPU kernel.
    """
    if spec.device_type != "cuda":
        return ("reference", "sdpa_math")
    major = spec.capability[0] if spec.capability else 0
    if spec.dtype == torch.float32:
        order: List[str] = ["sdpa_efficient", "triton"]
    elif major == 9:
        order = ["flash_attn3", "sdpa_cudnn", "flash_attn4", "triton", "flash_attn2", "sdpa_flash"]
    elif major == 10:
        order = ["flash_attn4", "sdpa_cudnn", "triton", "flash_attn2", "sdpa_flash"]
    elif major >= 8:
        order = ["flash_attn2", "sdpa_flash", "triton", "sdpa_cudnn"]
    else:
        order = []
    if "triton" in order and spec.width & (spec.width - 1):
        order.remove("triton")
        order.insert(order.index("sdpa_flash") + 1 if "sdpa_flash" in order else len(order), "triton")
    order += ["sdpa_efficient", "sdpa_math", "reference"]
    return tuple(dict.fromkeys(order))


_backend.set_priority(OP, priority, env_var=ENV_VAR)


# ------------------------------------------------------------------------------------------------
# Introspection helpers (ditfast.ops.attention re-exports them)
# ------------------------------------------------------------------------------------------------
def choose_backend(q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False) -> str:
    """The implementation the automatic choice runs for (q, k, v) (see :func:`explain_choice`)."""
    return _backend.resolve_name(OP, _backend.Request(None), Spec.of(q, ("lse",) if return_lse else ()))


def explain_choice(q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False) -> str:
    """Why each implementation can or cannot run (q, k, v), the priority list and the choice."""
    return _backend.explain(OP, Spec.of(q, ("lse",) if return_lse else ()))


def backend_report(device_type: str) -> List[Tuple[str, bool, str]]:
    """(name, available, reason) of every implementation on a device type, for ``python -m ditfast.info``.
    'available' means installed and able to run on that device type; dtype, head dim and GPU
    generation are checked per call."""
    rows = []
    for name in NAMES:
        impl = _backend.impl(OP, name)
        ok, why = impl.availability(device_type)
        rows.append((name, ok, f"{impl.description}: {why}"))
    return rows
