"""Attention backends for ``ditfast.ops.joint_attention``: small descriptors and the automatic choice.

Each backend is an :class:`AttentionBackend`: a name, the devices, dtypes and head dims it takes, the
CUDA compute capabilities it runs on, how to probe whether it is installed, and
``not_supported_reasons(q, k, v)``, the list of everything that stops it from running these tensors
(empty: it can). All of them take and return the (B, L, H, Dh) layout.

======================  ==========================================================================
name                    what runs
======================  ==========================================================================
``flash_attn2``         ``flash_attn.flash_attn_func`` (flash-attention 2, Ampere and newer)
``flash_attn3``         ``flash_attn_interface.flash_attn_func`` (flash-attention 3, Hopper)
``flash_attn4``         ``flash_attn.cute.flash_attn_func`` (flash-attention 4, Hopper/Blackwell)
``sdpa_cudnn``          PyTorch SDPA pinned to its cuDNN kernel
``sdpa_flash``          PyTorch SDPA pinned to its flash kernel
``sdpa_efficient``      PyTorch SDPA pinned to its memory-efficient kernel
``sdpa_math``           PyTorch SDPA pinned to its math kernel (any device)
``triton``              ditfast's own Triton flash attention (ditfast/kernels/triton/attention.py)
``reference``           ditfast.reference.joint_attention (plain PyTorch; any device)
======================  ==========================================================================

Which one runs (:func:`resolve`), first match wins:

1. the ``backend=`` argument of the op;
2. the innermost ``with ditfast.use_backend(name)`` block;
3. the ``DITFAST_ATTENTION_BACKEND`` environment variable (read when ditfast is imported);
4. the ``DITFAST_BACKEND`` environment variable;
5. the automatic choice, :func:`choose_backend`: the first backend of :func:`priority` (by device, GPU
   generation, dtype and head dim) with no reason against it. "reference" ends every list, so the
   automatic choice never fails.

Besides the names above, each place takes ``"auto"`` (or None: the automatic choice) and the generic
``ditfast.use_backend`` names: ``"reference"`` and ``"triton"`` mean the backends of those names and
``"cuda"`` (ditfast's CUDA extension, which has no attention kernel) means the automatic choice among
the CUDA libraries (every backend but "triton"). A named backend that cannot run the inputs raises a
``RuntimeError`` that says why each backend was or was not usable. Missing packages are found when a
backend is first considered, never at ``import ditfast``; no GPU is queried at import either.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _backend, reference
from .._compile import constant_for_compile

Tensor = torch.Tensor
ENV_VAR = "DITFAST_ATTENTION_BACKEND"
_ENV_REQUEST: Optional[str] = os.environ.get(ENV_VAR) or None  # validated on first use

_HALF = (torch.float16, torch.bfloat16)
_ALL = (torch.float32, torch.float16, torch.bfloat16)
_ANY = _ALL + (torch.float64,)  # float64: the reference only (ditfast.ops._validate), for fp64 truths
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


# ------------------------------------------------------------------------------------------------
# What a backend is asked about
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """The properties of (q, k, v) that decide which backends can run them."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    capability: Optional[Tuple[int, int]] = None  # CUDA compute capability, None off CUDA

    @staticmethod
    def of(q: Tensor, k: Tensor, v: Tensor) -> "Spec":
        cap = _capability(q.device) if q.device.type == "cuda" else None
        return Spec(q.device.type, q.dtype, int(q.shape[-1]), cap)

    def describe(self) -> str:
        gpu = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        return f"{_DTYPE_NAMES.get(self.dtype, self.dtype)} tensors with head dim {self.head_dim} on {self.device_type}{gpu}"


def _capability(device: torch.device) -> Tuple[int, int]:
    """Compute capability of a CUDA device, queried on first use (never at import)."""
    return _capability_of(device.index if device.index is not None else -1)


@constant_for_compile  # torch.compile: a constant of the trace, not traced into
def _capability_of(index: int) -> Tuple[int, int]:
    if index not in _CAPABILITY:
        _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(None if index < 0 else index))
    return _CAPABILITY[index]


_CAPABILITY: Dict[int, Tuple[int, int]] = {}


# ------------------------------------------------------------------------------------------------
# Descriptors
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AttentionBackend:
    """One way to compute ``softmax(q kᵀ · Dh**-0.5) v`` on (B, L, H, Dh) tensors."""

    name: str
    description: str
    run: Callable[[Tensor, Tensor, Tensor], Tensor]
    probe: Callable[[str], Tuple[bool, str]]  # device type -> (installed and usable, why)
    devices: Optional[Tuple[str, ...]] = ("cuda",)  # None: any device
    dtypes: Tuple[torch.dtype, ...] = _HALF
    max_head_dim: Optional[int] = 256
    head_dim_multiple: int = 1
    min_capability: Optional[Tuple[int, int]] = None  # CUDA only; inclusive
    max_capability: Optional[Tuple[int, int]] = None  # CUDA only; inclusive

    def availability(self, device_type: str) -> Tuple[bool, str]:
        """(available, why) on a device type: the device is supported and the package is usable.
        Probed once per device type and cached."""
        if self.devices is not None and device_type not in self.devices:
            return False, f"runs on {' / '.join(self.devices)} tensors only, not {device_type}"
        return _availability(self.name, device_type)

    def reasons(self, spec: Spec) -> List[str]:
        """Everything that stops this backend from running tensors described by ``spec``."""
        ok, why = self.availability(spec.device_type)
        out = [] if ok else [why]
        if spec.dtype not in self.dtypes:
            names = "/".join(_DTYPE_NAMES[d] for d in self.dtypes)
            out.append(f"takes {names}, not {_DTYPE_NAMES.get(spec.dtype, spec.dtype)}")
        if self.max_head_dim is not None and spec.head_dim > self.max_head_dim:
            out.append(f"head dim {spec.head_dim} > {self.max_head_dim}")
        if spec.head_dim % self.head_dim_multiple:
            out.append(f"head dim {spec.head_dim} is not a multiple of {self.head_dim_multiple}")
        cap = spec.capability
        if cap is not None:
            lo, hi = self.min_capability, self.max_capability
            if lo is not None and cap < lo:
                out.append(f"needs compute capability >= {lo[0]}.{lo[1]}, the GPU has {cap[0]}.{cap[1]}")
            if hi is not None and cap > hi:
                out.append(f"needs compute capability <= {hi[0]}.{hi[1]}, the GPU has {cap[0]}.{cap[1]}")
        return out

    def not_supported_reasons(self, q: Tensor, k: Tensor, v: Tensor) -> List[str]:
        """Why this backend cannot run (q, k, v); empty when it can."""
        return self.reasons(Spec.of(q, k, v))


_PROBED: Dict[Tuple[str, str], Tuple[bool, str]] = {}


@constant_for_compile  # torch.compile: probes (imports, build flags) run eagerly
def _availability(name: str, device_type: str) -> Tuple[bool, str]:
    key = (name, device_type)
    if key not in _PROBED:
        try:
            _PROBED[key] = BACKENDS[name].probe(device_type)
        except Exception as exc:  # a broken install must not break the dispatcher
            _PROBED[key] = (False, f"probing it failed: {type(exc).__name__}: {exc}")
    return _PROBED[key]


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


def _probe_triton(device_type: str) -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if device_type == "cpu":
        return True, "CPU tensors run under the Triton interpreter (TRITON_INTERPRET=1; slow)"
    return True, "triton is installed"


def _always(device_type: str) -> Tuple[bool, str]:
    return True, "plain PyTorch"


# -- runners (all take and return (B, L, H, Dh)) ---------------------------------------------------
def _first(out):
    """flash-attn 3 / 4 return (out, lse) in some versions."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_flash_attn2(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=False)


def _run_flash_attn3(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    import flash_attn_interface

    return _first(flash_attn_interface.flash_attn_func(q, k, v, causal=False))


def _run_flash_attn4(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn.cute import flash_attn_func

    # its kernels need a unit stride on the head dim (views of packed projections have one)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _first(flash_attn_func(q, k, v, causal=False))


def _run_sdpa(kernel: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def run(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # (B, L, H, Dh) -> (B, H, L, Dh) views; SDPA's kernels read the strides, no copies
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return run


def _run_triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from . import attention

    return attention.triton_attention(q, k, v)


# Conservative static rules; the CUDA libraries may accept more than listed.
BACKENDS: Dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        AttentionBackend(
            "flash_attn2", "flash-attention 2 (flash_attn.flash_attn_func)", _run_flash_attn2, _probe_flash_attn2,
            head_dim_multiple=8, min_capability=(8, 0),
        ),
        AttentionBackend(
            "flash_attn3", "flash-attention 3 (flash_attn_interface.flash_attn_func)", _run_flash_attn3,
            _probe_module("flash_attn_interface", "flash_attn_func", "flash-attn-3 (hopper/ of flash-attention)"),
            head_dim_multiple=8, min_capability=(9, 0), max_capability=(9, 0),
        ),
        AttentionBackend(
            "flash_attn4", "flash-attention 4 (flash_attn.cute.flash_attn_func)", _run_flash_attn4,
            _probe_module("flash_attn.cute", "flash_attn_func", "flash-attn-cute"),
            max_head_dim=128, head_dim_multiple=8, min_capability=(9, 0), max_capability=(10, 3),
        ),
        AttentionBackend(
            "sdpa_cudnn", "PyTorch SDPA, cuDNN kernel", _run_sdpa("CUDNN_ATTENTION"), _probe_sdpa("CUDNN_ATTENTION"),
            max_head_dim=128, head_dim_multiple=8, min_capability=(8, 0),
        ),
        AttentionBackend(
            "sdpa_flash", "PyTorch SDPA, flash kernel", _run_sdpa("FLASH_ATTENTION"), _probe_sdpa("FLASH_ATTENTION"),
            min_capability=(8, 0),
        ),
        AttentionBackend(
            "sdpa_efficient", "PyTorch SDPA, memory-efficient kernel", _run_sdpa("EFFICIENT_ATTENTION"),
            _probe_sdpa("EFFICIENT_ATTENTION"), dtypes=_ALL, max_head_dim=None, head_dim_multiple=8,
            min_capability=(5, 0),
        ),
        AttentionBackend(
            "sdpa_math", "PyTorch SDPA, math kernel", _run_sdpa("MATH"), _probe_sdpa("MATH"),
            devices=None, dtypes=_ANY, max_head_dim=None,
        ),
        AttentionBackend(
            "triton", "ditfast Triton flash attention (QK-norm + RoPE prologue, split streams)", _run_triton,
            _probe_triton, devices=("cuda", "cpu"), dtypes=_ALL, max_head_dim=256, min_capability=(8, 0),
        ),
        AttentionBackend(
            "reference", "ditfast.reference.joint_attention (plain PyTorch)", reference.joint_attention, _always,
            devices=None, dtypes=_ANY, max_head_dim=None,
        ),
    )
}
NAMES: Tuple[str, ...] = tuple(BACKENDS)
# backends that run float64 when asked for by name (ditfast.ops.joint_attention lets fp64 through then)
FP64_BACKENDS = frozenset(n for n, b in BACKENDS.items() if torch.float64 in b.dtypes)
_GENERIC = ("auto", "cuda")  # besides the backend names; "reference" and "triton" are both


# ------------------------------------------------------------------------------------------------
# Automatic choice
# ------------------------------------------------------------------------------------------------
def priority(spec: Spec) -> Tuple[str, ...]:
    """Backends to try, fastest first, for a device / GPU generation / dtype / head dim.

    A starting table, to be calibrated by ``ditfast.bench``: flash-attention 3 and cuDNN lead on
    Hopper, flash-attention 4 and cuDNN on datacenter Blackwell, flash-attention 2 on Ampere / Ada.
    ditfast's Triton kernel comes after the hand-written CUDA kernels, and after SDPA's flash kernel
    when the head dim is not a power of two (it pads 72 to 128). fp32 has no tensor-core kernel but
    the Triton one (which runs fp32 as exact fp32, no TF32) and SDPA's memory-efficient one.
    """
    if spec.device_type != "cuda":
        # the unpinned SDPA of the reference picks PyTorch's fastest CPU kernel
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
    if "triton" in order and spec.head_dim & (spec.head_dim - 1):
        order.remove("triton")
        order.insert(order.index("sdpa_flash") + 1 if "sdpa_flash" in order else len(order), "triton")
    order += ["sdpa_efficient", "sdpa_math", "reference"]
    return tuple(dict.fromkeys(order))


def choose_for(spec: Spec, *, exclude: Sequence[str] = ()) -> str:
    """The first backend of ``priority(spec)`` (minus ``exclude``) with nothing against it."""
    for name in priority(spec):
        if name not in exclude and not BACKENDS[name].reasons(spec):
            return name
    return "reference"


def choose_backend(q: Tensor, k: Tensor, v: Tensor) -> str:
    """The backend the automatic choice runs for (q, k, v): the first backend of :func:`priority`
    for their device, GPU generation, dtype and head dim that is installed and supports them (see
    :func:`explain` for why the ones before it were skipped)."""
    return choose_for(Spec.of(q, k, v))


def rejections(spec: Spec) -> Dict[str, List[str]]:
    """Every backend's reasons against ``spec`` (an empty list: usable)."""
    return {name: b.reasons(spec) for name, b in BACKENDS.items()}


def explain_choice(q: Tensor, k: Tensor, v: Tensor) -> str:
    """:func:`explain` for (q, k, v): why each backend can or cannot run them, and the choice."""
    return explain(Spec.of(q, k, v))


def explain(spec: Spec) -> str:
    """One line per backend: usable, or why not; then the priority list and the choice."""
    lines = [f"attention backends for {spec.describe()}:"]
    for name, why in rejections(spec).items():
        lines.append(f"  {name:15s} " + ("usable" if not why else "no: " + "; ".join(why)))
    lines.append(f"  priority: {', '.join(priority(spec))} -> {choose_for(spec)}")
    return "\n".join(lines)


def backend_report(device_type: str) -> List[Tuple[str, bool, str]]:
    """(name, available, reason) of every backend on a device type, for ``python -m ditfast.info``.
    'available' means installed and able to run on that device type; dtype, head dim and GPU
    generation are checked per call."""
    rows = []
    for name, b in BACKENDS.items():
        ok, why = b.availability(device_type)
        rows.append((name, ok, f"{b.description}: {why}"))
    return rows


# ------------------------------------------------------------------------------------------------
# Resolution of a request
# ------------------------------------------------------------------------------------------------
def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS and name not in _GENERIC:
        raise ValueError(
            f"{source}: unknown attention backend {name!r}; expected one of {', '.join(NAMES)} or 'auto' / 'cuda'"
        )
    return name


def requested(backend: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(name, where it came from); name None means the automatic choice."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
        return _check_name(backend, "backend"), "the backend= argument"
    stack = _backend._STACK  # innermost ditfast.use_backend block (None inside means automatic)
    if stack:
        return stack[-1], "ditfast.use_backend"
    if _ENV_REQUEST is not None:
        return _check_name(_ENV_REQUEST, ENV_VAR), ENV_VAR
    generic = _backend._ENV_BACKEND
    if generic is not None:
        return generic, "DITFAST_BACKEND"
    return None, "the automatic choice"


def resolve(backend: Optional[str], spec: Spec) -> str:
    """The backend to run for ``spec``: the requested one (see the module docstring) or the
    automatic choice. A requested backend that cannot run raises RuntimeError with every
    backend's reasons."""
    name, source = requested(backend)
    if name is None or name == "auto":
        return choose_for(spec)
    if name == "cuda":
        return choose_for(spec, exclude=("triton",))
    why = BACKENDS[name].reasons(spec)
    if why:
        raise RuntimeError(rejection_message(name, source, spec))
    return name


def rejection_message(name: str, source: str, spec: Spec) -> str:
    usable = [n for n, why in rejections(spec).items() if not why]
    return (
        f"attention backend {name!r} (asked for by {source}) cannot run {spec.describe()}. "
        f"Usable: {', '.join(usable) or 'none'}.\n{explain(spec)}"
    )
