"""Attention implementations for ``ditfast.ops.joint_attention``, registered in ditfast/_backend.py.

Each is one :class:`ditfast._backend.Impl` of the op ``"joint_attention"``: a name, a family (what
``ditfast.use_backend`` asks for), the devices, dtypes and head dims (the op's "width") it takes,
the CUDA compute capabilities it runs on, whether it can return the log-sum-exp (feature ``"lse"``)
and a probe that says whether its package is installed. All take and return the (B, L, H, Dh)
layout; ``run(q, k, v, return_lse)`` returns ``o`` or ``(o, lse)`` with lse (B, H, Lq) fp32. A runner
with the feature ``"key_lengths"`` also takes per-sample key counts (``ops.joint_attention``'s
``key_lengths``); the others get one call per sample over a view of its keys.

======================  ==========  ============================================================
name                    family      what runs
======================  ==========  ============================================================
``flash_attn3``         compiled    ``flash_attn_interface.flash_attn_func`` (flash-attention 3, Hopper)
``flash_attn4``         compiled    ``flash_attn.cute.flash_attn_func`` (flash-attention 4)
``flash_attn2``         compiled    ``flash_attn.flash_attn_func`` (flash-attention 2, Ampere and newer)
``sdpa_cudnn``          compiled    PyTorch SDPA pinned to its cuDNN kernel
``sdpa_flash``          compiled    PyTorch SDPA's flash kernel (lse through ``aten._scaled_dot_product_flash_attention``)
``sdpa_efficient``      compiled    PyTorch SDPA's memory-efficient kernel (lse through its aten op)
``sdpa_cpu``            compiled    PyTorch SDPA's CPU flash kernel (lse through its aten op)
``triton``              triton      ditfast's own Triton flash attention (ditfast/kernels/triton/attention.py)
``sdpa_math``           reference   PyTorch SDPA pinned to its math kernel (any device)
``reference``           reference   ditfast.reference.joint_attention (plain PyTorch; any device)
======================  ==========  ============================================================

Every runner takes ``softmax_scale`` (None: Dh**-0.5) and grouped-query k / v (H_kv heads, H % H_kv
== 0): flash-attention and ditfast's Triton kernel natively, SDPA's flash and math kernels through
``enable_gqa``, the other SDPA kernels and the aten lse entry points on k / v repeated per query head.
The flash-attention runners pass ``softmax_scale`` and grouped heads straight to ``flash_attn_func``;
they are untested here (no flash-attention on the CPU machines).

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


# -- runners: (q, k, v, return_lse, softmax_scale) -> o or (o, lse) -------------------------------
# q (B, Lq, H, Dh), k and v (B, Lk, H_kv, Dh) with H % H_kv == 0 (grouped-query attention when
# H_kv < H: query head h attends k / v head h // (H // H_kv), flash-attn's convention);
# softmax_scale None means Dh**-0.5.
def _group(q: Tensor, k: Tensor) -> int:
    return q.shape[2] // k.shape[2]


def _repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """k, v with each head repeated for its query heads (for kernels without grouped heads)."""
    g = _group(q, k)
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)


def _split_lse(out, return_lse: bool, name: str):
    """flash-attn 3 / 4 return (out, lse) (or out alone in some versions)."""
    if isinstance(out, (tuple, list)):
        return (out[0], out[1].float()) if return_lse else out[0]
    if return_lse:
        raise RuntimeError(f"this version of {name} does not return the log-sum-exp")
    return out


# flash-attention takes grouped k / v heads and softmax_scale natively (flash_attn_func's own
# arguments); these three runners are not exercised here (no flash-attn on the CPU machines).
def _run_flash_attn2(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False, softmax_scale: Optional[float] = None):
    from flash_attn import flash_attn_func

    if return_lse:
        out, lse, _ = flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=False, return_attn_probs=True)
        return out, lse.float()
    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=False)


def _run_flash_attn3(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False, softmax_scale: Optional[float] = None):
    import flash_attn_interface

    out = flash_attn_interface.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=False)
    return _split_lse(out, return_lse, "flash_attn3")


def _run_flash_attn4(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False, softmax_scale: Optional[float] = None):
    from flash_attn.cute import flash_attn_func

    # its kernels need a unit stride on the head dim (views of packed projections have one)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _split_lse(flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=False), return_lse, "flash_attn4")


# SDPA kernels that take grouped heads (enable_gqa=True); the others get k / v repeated per head
_SDPA_GQA = ("FLASH_ATTENTION", "MATH")


def _run_sdpa(kernel: str) -> Callable:
    def run(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False, softmax_scale: Optional[float] = None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        gqa = _group(q, k) > 1
        if gqa and (return_lse or kernel not in _SDPA_GQA):
            k, v = _repeat_kv(q, k, v)
            gqa = False
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, Dh) views, no copies
        if return_lse:
            aten = torch.ops.aten
            if kernel == "FLASH_ATTENTION" and q.device.type == "cpu":
                out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, scale=softmax_scale)[:2]
            elif kernel == "FLASH_ATTENTION":
                out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, scale=softmax_scale)[:2]
            elif kernel == "EFFICIENT_ATTENTION":
                out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, scale=softmax_scale)[:2]
                lse = lse[..., : q.shape[1]]  # padded to a multiple of 32 queries
            else:
                raise AssertionError(kernel)
            return out.transpose(1, 2), lse.float()
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=softmax_scale,
                                                                   **({"enable_gqa": True} if gqa else {}))
        return out.transpose(1, 2)

    return run


def _run_triton(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False, softmax_scale: Optional[float] = None,
                key_lengths: Optional[Tensor] = None):
    from ._attention_triton import triton_attention

    return triton_attention(q, k, v, return_lse=return_lse, softmax_scale=softmax_scale, key_lengths=key_lengths)


def _run_reference(q: Tensor, k: Tensor, v: Tensor, return_lse: bool = False, softmax_scale: Optional[float] = None):
    """ditfast.reference.joint_attention, extended to a softmax scale and grouped k / v heads: the
    unpinned SDPA without lse; with it, the explicit fp32 (fp64 for fp64 inputs) score matrix per
    group of query heads, whose lse gradient is exact."""
    g = _group(q, k)
    if softmax_scale is None and g == 1:
        return reference.joint_attention(q, k, v, return_lse=return_lse)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not return_lse:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, **({"enable_gqa": True} if g > 1 else {}))
        return out.transpose(1, 2)
    B, Lq, H, Dh = q.shape
    Hk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(B, Lq, Hk, g, Dh)  # query head h = kv head h // g, member h % g
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hk, g, Lq); -inf where there are no keys
    probs = torch.exp(scores - lse.unsqueeze(-1)) if k.shape[1] else scores
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(acc)).reshape(B, Lq, H, Dh).to(q.dtype)
    lse = lse.reshape(B, H, Lq)
    return out, lse.to(torch.float32) if acc == torch.float32 else lse


# ------------------------------------------------------------------------------------------------
# Registration (conservative static rules; the CUDA libraries may accept more than listed)
# ------------------------------------------------------------------------------------------------
_LSE = ("lse",)
# the runner takes ``key_lengths=`` (a (B,) int32 device tensor of per-sample key counts) natively:
# ops.joint_attention passes it unequal counts in one call instead of one call per sample
KEY_LENGTHS = "key_lengths"


def _register(name: str, family: str, run: Callable, probe, description: str, **limits) -> None:
    _backend.register(OP, family, run, name=name, probe=probe, description=description, **limits)


_register("flash_attn3", "compiled", _run_flash_attn3,
          _probe_module("flash_attn_interface", "flash_attn_func", "flash-attn-3 (hopper/ of flash-attention)"),
          "flash-attention 3 (flash_attn_interface.flash_attn_func)", devices=("cuda",), dtypes=_HALF,
          max_width=256, width_multiple=8, min_capability=(9, 0), max_capability=(9, 0), features=_LSE)
_register("flash_attn4", "compiled", _run_flash_attn4, _probe_module("flash_attn.cute", "flash_attn_func", "flash-attn-cute"),
          "flash-attention 4 (flash_attn.cute.flash_attn_func)", devices=("cuda",), dtypes=_HALF,
          max_width=128, width_multiple=8, min_capability=(9, 0), max_capability=(10, 3), features=_LSE)
_register("flash_attn2", "compiled", _run_flash_attn2, _probe_flash_attn2, "flash-attention 2 (flash_attn.flash_attn_func)",
          devices=("cuda",), dtypes=_HALF, max_width=256, width_multiple=8, min_capability=(8, 0), features=_LSE)
_register("sdpa_cudnn", "compiled", _run_sdpa("CUDNN_ATTENTION"), _probe_sdpa("CUDNN_ATTENTION"),
          "PyTorch SDPA, cuDNN kernel", devices=("cuda",), dtypes=_HALF, max_width=128, width_multiple=8,
          min_capability=(8, 0))
_register("sdpa_flash", "compiled", _run_sdpa("FLASH_ATTENTION"), _probe_sdpa("FLASH_ATTENTION"),
          "PyTorch SDPA, flash kernel", devices=("cuda",), dtypes=_HALF, max_width=256, min_capability=(8, 0),
          features=_LSE)
_register("sdpa_efficient", "compiled", _run_sdpa("EFFICIENT_ATTENTION"), _probe_sdpa("EFFICIENT_ATTENTION"),
          "PyTorch SDPA, memory-efficient kernel", devices=("cuda",), dtypes=_ALL, width_multiple=8,
          min_capability=(5, 0), features=_LSE)
_register("sdpa_cpu", "compiled", _run_sdpa("FLASH_ATTENTION"), _probe_sdpa("FLASH_ATTENTION"),
          "PyTorch SDPA, CPU flash kernel (lse through aten._scaled_dot_product_flash_attention_for_cpu)",
          devices=("cpu",), dtypes=_ALL, features=_LSE)
_register("triton", "triton", _run_triton, _backend.probe_triton, "ditfast Triton flash attention (prologue-free, lse)",
          devices=("cuda", "cpu"), dtypes=_ALL, max_width=256, min_capability=(8, 0), features=_LSE + (KEY_LENGTHS,))
_register("sdpa_math", "reference", _run_sdpa("MATH"), _probe_sdpa("MATH"), "PyTorch SDPA, math kernel",
          devices=None, dtypes=_ANY)
_register("reference", "reference", _run_reference, _backend.probe_reference,
          "ditfast.reference.joint_attention (plain PyTorch)", devices=None, dtypes=_ANY, features=_LSE)

NAMES: Tuple[str, ...] = _backend.implemented(OP)
FP64_BACKENDS = frozenset(n for n in NAMES if torch.float64 in _backend.impl(OP, n).dtypes)


def priority(spec: Spec) -> Tuple[str, ...]:
    """Implementations to try, fastest first, for a device / GPU generation / dtype / head dim.

    A starting table, to be calibrated on a GPU by the benchmarks: flash-attention 3 and cuDNN lead
    on Hopper, flash-attention 4 and cuDNN on datacenter Blackwell, flash-attention 2 on Ampere / Ada.
    ditfast's Triton kernel comes after the hand-written CUDA kernels, and after SDPA's flash kernel
    when the head dim is not a power of two (it pads 72 to 128). fp32 has no tensor-core kernel but
    the Triton one (exact fp32, no TF32) and SDPA's memory-efficient one.

    On CPU, SDPA's CPU flash kernel (``sdpa_cpu``) leads for every dtype: measured on the CPU
    machines (torch 2.14, 2 threads; (1, 1024, 8, 64) and (2, 333, 4, 128)) its forward takes
    0.2-0.65x the math kernel's time in fp32 / bf16 / fp16, and its forward + backward 0.45-0.75x in
    fp32 (in bf16 / fp16 its backward is 2-3x slower than the math kernel's: CPU training in half
    precision runs faster with ``backend="sdpa_math"``). It meets the numerics rule in all three
    dtypes, forward and backward (tests/test_attention.py). The measured table, where it has an
    entry, overrides this order on every device (ditfast/_backend.py).
    """
    if spec.device_type != "cuda":
        return ("sdpa_cpu", "reference", "sdpa_math")
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
def choose_backend(q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False, backend: Optional[str] = None) -> str:
    """The implementation ``joint_attention(q, k, v, return_lse=..., backend=...)`` runs now: the
    request in force (``backend=``, ``use_backend``, ``DITFAST_ATTENTION_BACKEND``,
    ``DITFAST_BACKEND``) resolved exactly as the call resolves it, else the automatic choice.
    Raises what the call would raise when the request cannot run these inputs."""
    return _backend.resolve_name(OP, _backend.current_request(OP, backend), Spec.of(q, ("lse",) if return_lse else ()))


def explain_choice(q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False, backend: Optional[str] = None) -> str:
    """Why each implementation can or cannot run (q, k, v), the priority list, the request in force
    and what runs (the last line names :func:`choose_backend`'s answer)."""
    return _backend.explain(OP, Spec.of(q, ("lse",) if return_lse else ()), _backend.current_request(OP, backend))


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
