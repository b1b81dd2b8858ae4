"""The one registry of implementations for every ditfast op, attention included.

Each op (``"norm_modulate"``, ``"qk_norm_rope"``, ``"joint_attention"``, ...) has implementations,
each an :class:`Impl`: a name, the *family* it belongs to, the callable, and what it can run -- the
device types, dtypes, a limit on the row width (D for the adaLN ops, Dh for the rope and attention
ops), the CUDA compute capabilities, extra features (``"lse"``: attention that returns the
log-sum-exp) and a probe that says whether its package is installed. :meth:`Impl.reasons` lists
everything that stops it from running given inputs (xformers' ``not_supported_reasons``).

Families are the names users ask for with ``ditfast.use_backend`` / ``DITFAST_BACKEND``:

==============  ==================================================================================
``reference``   plain PyTorch (``ditfast.reference``; for attention also SDPA's math kernel)
``triton``      ditfast's Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)
``compiled``    compiled kernels: ditfast's extension ``ditfast._C`` (C++ loops on CPU tensors, CUDA
                kernels on CUDA tensors) and, for attention, flash-attention 2/3/4 and PyTorch
                SDPA's kernels (its CPU flash kernel on CPU tensors)
==============  ==================================================================================

``"cuda"`` is an alias of ``"compiled"`` (its name before 0.2, kept working everywhere a family is
named: ``use_backend``, ``DITFAST_BACKEND``, ``backend=``, the measured table, :func:`impl`,
:func:`availability`). :func:`label` names an implementation with the device it runs on
(``compiled C++ CPU``, ``compiled CUDA``), as ``python -m ditfast.info`` and the benchmark
rows print it. An implementation's own name may also be asked for (``use_backend("sdpa_cudnn")``,
or attention's ``backend=`` argument).

Which implementation runs (:func:`resolve_name`):

1. a request -- the op's ``backend=`` argument, else the innermost ``use_backend`` block, else the
   op's own environment variable (``DITFAST_ATTENTION_BACKEND`` for attention), else
   ``DITFAST_BACKEND`` (both read once, at import):

   * a family: its first implementation of the op, in the op's priority order, that can run the
     inputs; if the family implements the op but none can, a ``RuntimeError`` says why;
   * an implementation name: that implementation, or a ``RuntimeError`` saying why it can't;
   * a family or name that has no implementation of this op for the inputs' device type: the
     automatic choice for this op, with a one-time warning -- so a whole model runs under
     ``use_backend("compiled")`` even though some ops have no compiled kernel.
     ``use_backend(name, strict=True)`` raises instead.

2. automatic: the backend a measured table names (:func:`set_chooser`; asked on every device) if
   it can run; else the first implementation of the op's priority list (:func:`set_priority`; by
   default triton, compiled, reference on CUDA tensors and compiled, reference on CPU tensors --
   the Triton interpreter is a test tool, never an automatic choice) that can run the inputs. The
   reference is in every list, so the automatic choice never fails.

Every introspection function answers with this same resolution, request included:
:func:`chosen_name`, :func:`select`, :func:`explain` (given the request), ``ops.choose_backend``,
``ops.explain_choice`` and ``python -m ditfast.info`` report what the next call runs.

The result is cached per (op, request, device, dtype, width, features): a call does no string or
environment parsing, and under ``torch.compile`` the lookup is a constant of the trace. Nothing here
touches the GPU, or imports triton, at import time.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.util
import operator
import os
import warnings
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ._compile import constant_for_compile

FAMILIES = ("reference", "triton", "compiled")
ALIASES = {"cuda": "compiled"}  # old family names, still accepted wherever a family is named
BACKENDS = FAMILIES + tuple(ALIASES)  # the family names ditfast.use_backend accepts
DEVICE_LABELS = {"cpu": "C++ CPU", "cuda": "CUDA"}  # what the compiled extension runs per device type
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
ENV_VAR = "DITFAST_BACKEND"

Probe = Callable[[str], Tuple[bool, str]]  # device type -> (usable, why)


# ------------------------------------------------------------------------------------------------
# What an implementation is asked about
# ------------------------------------------------------------------------------------------------
class Spec(NamedTuple):
    """The properties of an op's inputs that decide which implementations can run them."""

    device_type: str
    dtype: torch.dtype
    width: int = 0  # row width: D (adaLN ops) or Dh (rope, attention); 0 when unknown
    capability: Optional[Tuple[int, int]] = None  # CUDA compute capability; None off CUDA
    device_index: int = -1  # CUDA device index (-1: current), for the measured table
    features: Tuple[str, ...] = ()  # e.g. ("lse",)

    @staticmethod
    def of(like: torch.Tensor, features: Sequence[str] = ()) -> "Spec":
        dev = like.device
        cuda = dev.type == "cuda"
        index = dev.index if dev.index is not None else -1
        # operator.index: under torch.compile(dynamic=True) this specializes a symbolic row width to
        # the int it is (with a guard), so the cached choice stays a constant of the trace
        width = operator.index(like.shape[-1]) if like.dim() else 0
        return Spec(dev.type, like.dtype, width, capability_of(index) if cuda else None, index if cuda else -1,
                    tuple(features))

    def describe(self) -> str:
        gpu = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        feats = f", with {'+'.join(self.features)}" if self.features else ""
        return f"{DTYPE_NAMES.get(self.dtype, self.dtype)} tensors of width {self.width} on {self.device_type}{gpu}{feats}"


_CAPABILITY: Dict[int, Tuple[int, int]] = {}


@constant_for_compile
def capability_of(index: int) -> Tuple[int, int]:
    """Compute capability of a CUDA device (-1: the current one), queried on first use, never at import."""
    if index not in _CAPABILITY:
        _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(None if index < 0 else index))
    return _CAPABILITY[index]


# ------------------------------------------------------------------------------------------------
# Probes shared by many implementations
# ------------------------------------------------------------------------------------------------
def probe_reference(device_type: str) -> Tuple[bool, str]:
    return True, "plain PyTorch, always available"


def _triton_version_reason() -> Optional[str]:
    """Why the installed Triton is too old for ditfast's kernels (read from its metadata, not imported)."""
    import importlib.metadata

    from . import _versions

    try:
        return _versions.triton_unsupported_reason(importlib.metadata.version("triton"))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None  # a source build without metadata: let the kernels try


def probe_triton(device_type: str) -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed (pip install triton)"
    reason = _triton_version_reason()
    if reason is not None:
        return False, reason
    if device_type == "cuda":
        return True, "triton is installed"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "CPU tensors run under the Triton interpreter (TRITON_INTERPRET=1; slow)"
        return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    return False, f"Triton kernels do not run on {device_type!r} tensors"


def probe_extension(device_type: str) -> Tuple[bool, str]:
    from . import _ext

    return _ext.availability(device_type)


_FAMILY_DEFAULTS = {  # family -> (probe, device types, dtypes)
    "reference": (probe_reference, None, FLOATS + (torch.float64,)),
    "triton": (probe_triton, ("cuda", "cpu"), FLOATS),
    "compiled": (probe_extension, ("cuda", "cpu"), FLOATS),
}


def canonical(name: Optional[str]) -> Optional[str]:
    """A family's current name (``"cuda"`` -> ``"compiled"``); other names unchanged."""
    return ALIASES.get(name, name) if isinstance(name, str) else name


# ------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Impl:
    """One way to run an op."""

    op: str
    name: str
    family: str
    fn: Callable
    probe: Probe
    devices: Optional[Tuple[str, ...]] = None  # None: any device type
    dtypes: Tuple[torch.dtype, ...] = FLOATS
    max_width: Optional[int] = None
    width_multiple: int = 1
    min_capability: Optional[Tuple[int, int]] = None  # CUDA only, inclusive
    max_capability: Optional[Tuple[int, int]] = None  # CUDA only, inclusive
    features: Tuple[str, ...] = ()
    description: str = ""

    def availability(self, device_type: str) -> Tuple[bool, str]:
        """(usable, why) on a device type: the device type is supported and the package is installed."""
        if self.devices is not None and device_type not in self.devices:
            return False, f"runs on {' / '.join(self.devices)} tensors only, not {device_type}"
        return probed(self.probe, device_type)

    def reasons(self, spec: Spec) -> List[str]:
        """Everything that stops this implementation from running inputs described by ``spec``."""
        ok, why = self.availability(spec.device_type)
        out = [] if ok else [why]
        if spec.dtype not in self.dtypes:
            names = "/".join(DTYPE_NAMES[d] for d in self.dtypes)
            out.append(f"takes {names}, not {DTYPE_NAMES.get(spec.dtype, spec.dtype)}")
        if self.max_width is not None and spec.width > self.max_width:
            out.append(f"width {spec.width} > {self.max_width}")
        if spec.width % self.width_multiple:
            out.append(f"width {spec.width} is not a multiple of {self.width_multiple}")
        if spec.capability is not None:
            cap, lo, hi = spec.capability, self.min_capability, self.max_capability
            if lo is not None and cap < lo:
                out.append(f"needs compute capability >= {lo[0]}.{lo[1]}, the GPU has {cap[0]}.{cap[1]}")
            if hi is not None and cap > hi:
                out.append(f"needs compute capability <= {hi[0]}.{hi[1]}, the GPU has {cap[0]}.{cap[1]}")
        for feature in spec.features:
            if feature not in self.features:
                out.append(f"cannot return {feature}")
        return out

    def not_supported_reasons(self, like: torch.Tensor, features: Sequence[str] = ()) -> List[str]:
        """Why this implementation cannot run inputs like ``like`` (the op's main input); empty when it can."""
        return self.reasons(Spec.of(like, features))


_IMPLS: Dict[str, Dict[str, Impl]] = {}  # op -> implementation name -> Impl (registration order)
_PRIORITY: Dict[str, Callable[[Spec], Sequence[str]]] = {}  # op -> spec -> implementation names
_ENV_BY_OP: Dict[str, str] = {}  # op -> its own request variable (read at registration)
_ENV_REQUEST: Dict[str, Optional[str]] = {}
_PROBED: Dict[Tuple[int, str], Tuple[bool, str]] = {}


def register(op: str, backend: str, fn: Callable, *, name: Optional[str] = None, **limits) -> Impl:
    """Declare that family ``backend`` implements ``op`` with ``fn`` (the public op's signature).

    ``name`` defaults to the family; ``limits`` are :class:`Impl` fields (devices, dtypes, max_width,
    width_multiple, min/max_capability, features, probe, description), defaulting to the family's."""
    backend = canonical(backend)
    if backend not in FAMILIES:
        raise ValueError(f"unknown ditfast backend family {backend!r}; expected one of {FAMILIES}")
    probe, devices, dtypes = _FAMILY_DEFAULTS[backend]
    fields = dict(probe=probe, devices=devices, dtypes=dtypes)
    fields.update(limits)
    impl = Impl(op, name or backend, backend, fn, **fields)
    _IMPLS.setdefault(op, {})[impl.name] = impl
    clear_cache()
    return impl


def set_priority(op: str, order: Callable[[Spec], Sequence[str]], *, env_var: Optional[str] = None) -> None:
    """The automatic choice's order of implementation names for ``op`` given a :class:`Spec`, and
    optionally an environment variable that requests a backend for this op alone (read now)."""
    _PRIORITY[op] = order
    if env_var is not None:
        _ENV_BY_OP[op] = env_var
        _ENV_REQUEST[op] = os.environ.get(env_var) or None
    clear_cache()


def _default_priority(op: str, spec: Spec) -> Tuple[str, ...]:
    families = ("triton", "compiled", "reference") if spec.device_type == "cuda" else ("compiled", "reference")
    impls = _IMPLS[op].values()
    return tuple(i.name for fam in families for i in impls if i.family == fam)


def priority(op: str, spec: Spec) -> Tuple[str, ...]:
    """The automatic choice's order for ``op``; the reference implementation always ends it."""
    order = list(_PRIORITY[op](spec)) if op in _PRIORITY else list(_default_priority(op, spec))
    order = [n for n in order if n in _IMPLS[op]]
    if "reference" in _IMPLS[op] and "reference" not in order:
        order.append("reference")
    return tuple(dict.fromkeys(order))


@constant_for_compile  # probes (imports, build flags) run eagerly, once
def probed(probe: Probe, device_type: str) -> Tuple[bool, str]:
    key = (id(probe), device_type)
    if key not in _PROBED:
        try:
            _PROBED[key] = probe(device_type)
        except Exception as exc:  # a broken install must not break the dispatcher
            _PROBED[key] = (False, f"probing it failed: {type(exc).__name__}: {exc}")
    return _PROBED[key]


def availability(backend: str, device_type: str) -> Tuple[bool, str]:
    """(available, why) of a family (or its alias) on a device type (whether its package is installed there)."""
    probe, devices, _ = _FAMILY_DEFAULTS[canonical(backend)]
    if devices is not None and device_type not in devices:
        return False, f"runs on {' / '.join(devices)} tensors only, not {device_type}"
    return probed(probe, device_type)


# ------------------------------------------------------------------------------------------------
# Requests: use_backend (a ContextVar) and the environment
# ------------------------------------------------------------------------------------------------
class Request(NamedTuple):
    name: Optional[str]  # None: automatic
    strict: bool = False
    source: str = "the automatic choice"


_AUTO = Request(None)
_REQUEST: contextvars.ContextVar[Optional[Request]] = contextvars.ContextVar("ditfast_backend", default=None)
# What torch.compile traces read instead of the ContextVar (Dynamo in torch <= 2.11 cannot trace
# ContextVar.get): the innermost use_backend request of the process, a global Dynamo guards on.
# Eager calls always read the ContextVar, so they are per thread / task.
_TRACED_REQUEST: Optional[Request] = None


def known_names() -> set:
    """Every name a request may use: the families, their aliases and every implementation name."""
    return set(BACKENDS) | {n for impls in _IMPLS.values() for n in impls}


def check_name(name: Optional[str], source: str = "ditfast backend") -> Optional[str]:
    """The canonical form of ``name`` if it is a family (or alias) or an implementation name
    (None and "auto" mean automatic)."""
    if name is None or name == "auto":
        return None
    if not isinstance(name, str):
        raise TypeError(f"{source}: a backend is a string or None, got {type(name).__name__}")
    if name not in known_names():
        others = sorted(known_names() - set(BACKENDS))
        raise ValueError(f"unknown ditfast backend {name!r} ({source}); expected one of {FAMILIES} "
                         f"('cuda' = 'compiled'), 'auto', or an implementation name: {', '.join(others)}")
    return canonical(name)


_ENV_BACKEND: Optional[str] = os.environ.get(ENV_VAR) or None
if _ENV_BACKEND is not None and _ENV_BACKEND not in BACKENDS + ("auto",):
    raise ValueError(f"unknown ditfast backend {_ENV_BACKEND!r} ({ENV_VAR}); expected one of {FAMILIES} "
                     "('cuda' = 'compiled') or 'auto'")
_ENV_BACKEND = None if _ENV_BACKEND == "auto" else canonical(_ENV_BACKEND)


@contextlib.contextmanager
def use_backend(name: Optional[str], *, strict: bool = False) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name``: a family ("reference", "triton",
    "compiled"; "cuda" is an alias of "compiled"), an implementation name, or None / "auto" for the automatic choice. An op the backend
    does not implement takes its automatic choice with a one-time warning; ``strict=True`` raises
    instead. Per thread and per asyncio task (a ContextVar) in eager mode; code compiled with
    torch.compile sees the innermost block of the process."""
    global _TRACED_REQUEST
    req = Request(check_name(name, "ditfast.use_backend"), bool(strict), "ditfast.use_backend")
    token, outer = _REQUEST.set(req), _TRACED_REQUEST
    _TRACED_REQUEST = req
    try:
        yield
    finally:
        _REQUEST.reset(token)
        _TRACED_REQUEST = outer


def current_request(op: Optional[str] = None, backend: Optional[str] = None) -> Request:
    """The request in force for ``op``: ``backend=`` argument, use_backend, the op's variable, DITFAST_BACKEND."""
    if backend is not None and backend != "auto":
        return Request(check_name(backend, "the backend= argument"), True, "the backend= argument")
    req = _TRACED_REQUEST if torch.compiler.is_compiling() else _REQUEST.get()
    if req is not None:
        return req
    if op is not None and _ENV_REQUEST.get(op) is not None:
        return Request(check_name(_ENV_REQUEST[op], _ENV_BY_OP[op]), True, _ENV_BY_OP[op])
    if _ENV_BACKEND is not None:
        return Request(_ENV_BACKEND, False, ENV_VAR)
    return _AUTO


def requested_backend(op: Optional[str] = None) -> Optional[str]:
    """The backend name in force (use_backend(), for ``op`` also its own variable, DITFAST_BACKEND);
    None means automatic."""
    return current_request(op).name


# ------------------------------------------------------------------------------------------------
# The choice
# ------------------------------------------------------------------------------------------------
Chooser = Callable[[str, torch.device, torch.dtype, int], Optional[str]]
_CHOOSER: Optional[Chooser] = None
_CACHE: Dict[tuple, str] = {}
_WARNED: set = set()


def set_chooser(fn: Optional[Chooser]) -> None:
    """Install (None: remove) the measured-table hook of the automatic choice: ``fn(op, device, dtype,
    width)`` names the preferred family or implementation for tensors on ``device`` (any device
    type), or None."""
    global _CHOOSER
    _CHOOSER = fn
    clear_cache()


def clear_cache() -> None:
    """Forget resolved choices (after a registration, a probe or table change)."""
    _CACHE.clear()


def _usable(op: str, name: str, spec: Spec) -> bool:
    return not _IMPLS[op][name].reasons(spec)


def _automatic(op: str, spec: Spec) -> str:
    if _CHOOSER is not None and spec.width:
        if spec.device_type == "cuda":
            dev = torch.device("cuda", spec.device_index) if spec.device_index >= 0 else torch.device("cuda")
        else:
            dev = torch.device(spec.device_type)
        pick = _CHOOSER(op, dev, spec.dtype, spec.width)
        for name in _members(op, pick, spec):
            if _usable(op, name, spec):
                return name
    for name in priority(op, spec):
        if _usable(op, name, spec):
            return name
    raise RuntimeError(f"no implementation of {op} can run {spec.describe()}:\n{explain(op, spec)}")


def _members(op: str, name: Optional[str], spec: Spec) -> List[str]:
    """The implementations of ``op`` that a request for ``name`` covers, in priority order."""
    if name is None:
        return []
    name = canonical(name)
    impls = _IMPLS[op]
    if name in FAMILIES:  # the family's namesake first (use_backend("reference") runs ditfast.reference)
        order = [name] * (name in impls) + list(priority(op, spec)) + list(impls)
        return [n for n in dict.fromkeys(order) if impls[n].family == name]
    return [name] if name in impls else []


@constant_for_compile  # the cached lookup is a constant of a torch.compile trace
def _resolve_cached(op: str, request: tuple, spec: tuple) -> str:
    key = (op, request, spec)
    name = _CACHE.get(key)
    if name is None:
        name = _CACHE[key] = _resolve(op, Request(*request), Spec(*spec))
    return name


def resolve_name(op: str, request: Request, spec: Spec) -> str:
    """The name of the implementation that runs ``op`` for ``spec`` under ``request`` (cached per
    (op, request, spec); plain tuples cross into the cached function, which torch.compile treats
    as a constant of the trace)."""
    return _resolve_cached(op, tuple(request), tuple(spec))


def _resolve(op: str, request: Request, spec: Spec) -> str:
    if op not in _IMPLS:
        raise KeyError(f"ditfast has no op named {op!r}")
    if request.name is None:
        return _automatic(op, spec)
    members = _members(op, request.name, spec)
    if request.name in FAMILIES:  # a family counts as lacking the op when none of it runs on this device type
        # (or has the options asked for: the features of spec)
        members = [n for n in members if (_IMPLS[op][n].devices is None or spec.device_type in _IMPLS[op][n].devices)
                   and all(f in _IMPLS[op][n].features for f in spec.features)]
    if not members:
        with_features = f" with {'+'.join(spec.features)}" if spec.features else ""
        msg = (f"ditfast backend {request.name!r} (asked for by {request.source}) has no implementation of {op}"
               f"{with_features} for {spec.device_type} tensors; {_implemented_by(op, spec.device_type)}")
        if request.strict:
            raise RuntimeError(msg)
        chosen = _automatic(op, spec)
        if (op, request.name, spec.device_type, spec.features) not in _WARNED:
            _WARNED.add((op, request.name, spec.device_type, spec.features))
            warnings.warn(f"{msg}; running the automatic choice ({label(op, chosen, spec.device_type)}) instead",
                          RuntimeWarning, stacklevel=4)
        return chosen
    for name in members:
        if _usable(op, name, spec):
            return name
    why = "; ".join(f"{n}: {', '.join(_IMPLS[op][n].reasons(spec))}" for n in members)
    usable = [n for n in _IMPLS[op] if _usable(op, n, spec)]
    try:
        fix = f"drop the request to get the automatic choice ({label(op, _automatic(op, spec), spec.device_type)})"
    except RuntimeError:
        fix = "no implementation can run these inputs"
    raise RuntimeError(
        f"ditfast backend {request.name!r} (asked for by {request.source}) cannot run {op} on "
        f"{spec.describe()}: {why}. Usable for these inputs: {', '.join(usable) or 'none'}; {fix}, or ask for "
        f"one of those. `python -m ditfast.info` lists every implementation and why it is or is not usable."
    )


def select(op: str, device: torch.device, like: Optional[torch.Tensor] = None,
           features: Sequence[str] = ()) -> Callable:
    """The callable that runs ``op`` for ``like`` (or, without it, fp32 tensors on ``device``), among the
    implementations that have every one of ``features`` (an op's options, e.g. ``"rms"``)."""
    return _IMPLS[op][chosen_name(op, device, like, features)].fn


def chosen_name(op: str, device: torch.device, like: Optional[torch.Tensor] = None,
                features: Sequence[str] = ()) -> str:
    """The name of the implementation that runs ``op``: what ``python -m ditfast.info`` prints."""
    if like is None:
        spec = Spec(device.type, torch.float32, 0, None, -1, tuple(features))
    else:
        spec = Spec.of(like, features)
    return resolve_name(op, current_request(op), spec)


# ------------------------------------------------------------------------------------------------
# Introspection
# ------------------------------------------------------------------------------------------------
def implemented(op: str) -> Tuple[str, ...]:
    """Names of the implementations of ``op``, in registration order."""
    return tuple(_IMPLS.get(op, {}))


def families(op: str, features: Sequence[str] = ()) -> Tuple[str, ...]:
    """Families that implement ``op`` (with every one of ``features``)."""
    return tuple(f for f in FAMILIES if any(i.family == f and all(x in i.features for x in features)
                                            for i in _IMPLS.get(op, {}).values()))


def impl(op: str, name: str) -> Impl:
    """The implementation ``name`` of ``op`` (a family alias names the family's namesake)."""
    impls = _IMPLS[op]
    return impls[name] if name in impls else impls[canonical(name)]


def label(op: str, name: str, device_type: str) -> str:
    """``name`` as reports print it: the compiled extension's implementation with the device it runs
    on (``compiled C++ CPU`` / ``compiled CUDA``: ditfast._C's kernels for that device type); other
    implementations by their own name (``sdpa_cpu``, ``flash_attn3``)."""
    if name == "compiled" and device_type in DEVICE_LABELS:
        return f"compiled {DEVICE_LABELS[device_type]}"
    return name


def _implemented_by(op: str, device_type: str) -> str:
    """Which families implement ``op`` for ``device_type`` tensors, each with its implementations."""
    on = {}
    for name, i in _IMPLS[op].items():
        if i.devices is None or device_type in i.devices:
            on.setdefault(i.family, []).append(name)
    if not on:
        return f"nothing implements {op} for {device_type} tensors"
    parts = [f"the {fam} family ({', '.join(names)})" for fam in FAMILIES if (names := on.get(fam))]
    return f"on {device_type} tensors {op} is implemented by " + " and ".join(parts)


def ops() -> Tuple[str, ...]:
    return tuple(_IMPLS)


def explain(op: str, spec: Spec, request: Optional[Request] = None) -> str:
    """One line per implementation of ``op``: usable, or why not; then the automatic choice (the
    measured table's pick or the priority list) and, given ``request`` (e.g. :func:`current_request`),
    the request in force and what it runs: the last line names what the next call runs."""
    lines = [f"{op} implementations for {spec.describe()}:"]
    for name, i in _IMPLS[op].items():
        why = i.reasons(spec)
        lines.append(f"  {name:15s} [{i.family}] " + ("usable" if not why else "no: " + "; ".join(why)))
    try:
        auto = _automatic(op, spec)
    except RuntimeError:
        auto = "none"
    lines.append(f"  priority: {', '.join(priority(op, spec))} -> automatic choice {auto}")
    if request is not None and request.name is not None:
        try:
            runs = resolve_name(op, request, spec)
        except RuntimeError as exc:
            runs = f"error: {str(exc).splitlines()[0]}"
        lines.append(f"  requested: {request.name} (by {request.source}) -> runs {runs}")
    return "\n".join(lines)
