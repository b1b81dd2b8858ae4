"""Lazy access to the compiled extension ``ditfast._C`` (csrc/, built by setup.py).

Importing ditfast never imports ``_C``; the first op that asks for the "cuda" backend does (or
:func:`load`), and a failure is remembered and reported as the reason the backend is unavailable.
``_C`` registers the ``torch.ops.ditfast.*_c`` operators with CPU kernels and, when it was built
with CUDA, CUDA kernels; its module attributes say which (``DEVICES``). What setup.py decided
(and why a part was not built) is recorded in the generated ``ditfast/_build_info.py``.

Modules that extend the operators from Python (fake kernels, autograd: ditfast.ops.cuda_impl)
register a callback with :func:`on_load`; it runs right after ``_C`` is imported.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

_LOADED: Optional[object] = None
_ERROR: Optional[str] = None
_ON_LOAD: List[Callable[[object], None]] = []


def _not_built_reason() -> str:
    info = record()
    if info is None:
        return "ditfast._C is not built (no build record: ditfast was not installed through setup.py)"
    if not info.get("EXT_BUILT"):
        return f"ditfast._C was not built: {info.get('REASON') or 'unknown reason'}"
    return "ditfast._C was built but is missing (a stale install? reinstall ditfast)"


def load():
    """Import ``ditfast._C`` once; return the module or None (see :func:`error`)."""
    global _LOADED, _ERROR
    if _LOADED is None and _ERROR is None:
        try:
            import torch  # noqa: F401  (_C links against libtorch: load it first)

            _LOADED = importlib.import_module("ditfast._C")
        except ModuleNotFoundError as exc:
            if exc.name not in (None, "ditfast._C"):
                _ERROR = f"ditfast._C is not importable ({exc})"
            else:
                _ERROR = _not_built_reason()
        except (ImportError, OSError) as exc:  # built against another torch, missing libraries, ...
            _ERROR = f"ditfast._C is not importable ({exc}); rebuild it against this torch"
        else:
            try:
                for fn in list(_ON_LOAD):
                    fn(_LOADED)
            except Exception as exc:  # e.g. fake/autograd registration failed: do not use the ops
                _LOADED = None
                _ERROR = f"ditfast._C loaded but its Python registration failed ({type(exc).__name__}: {exc})"
    return _LOADED


def on_load(fn: Callable[[object], None]) -> None:
    """Call ``fn(_C)`` once ``_C`` is loaded (now, if it already is)."""
    _ON_LOAD.append(fn)
    if _LOADED is not None:
        fn(_LOADED)
    elif "ditfast._C" in sys.modules:  # imported directly by a user: finish the registration
        load()


def error() -> Optional[str]:
    return _ERROR


def availability(device_type: str) -> Tuple[bool, str]:
    mod = load()
    if mod is None:
        return False, _ERROR or "ditfast._C is not built"
    devices = tuple(getattr(mod, "DEVICES", ("cuda",)))
    if device_type not in devices:
        why = ""
        info = record()
        if device_type == "cuda" and info is not None and info.get("REASON"):
            why = f"; {info['REASON']}"
        return False, f"ditfast._C has no {device_type} kernels (built for {devices}){why}"
    if device_type == "cuda":
        why = _arch_problem()
        if why:
            return False, why
    return True, f"ditfast._C is built ({', '.join(devices)} kernels)"


def arch_covered(archs, capability: Tuple[int, int]) -> bool:
    """Whether code built for ``archs`` (setup.py's DITFAST_CUDA_ARCHS entries) runs on a GPU of
    compute ``capability``: SASS runs on the same major version with an equal or higher minor
    ("9.0a" only on 9.0 itself), PTX ("+PTX") on any equal or newer GPU."""
    for a in archs:
        ptx = a.endswith("+PTX")
        base = a.replace("+PTX", "")
        specific = base.endswith("a")
        major, minor = (int(p) for p in base.rstrip("a").split("."))
        if specific:
            if (major, minor) == tuple(capability):
                return True
        elif major == capability[0] and minor <= capability[1]:
            return True
        if ptx and (major, minor) <= tuple(capability):
            return True
    return False


def _arch_problem() -> Optional[str]:
    """Why the CUDA kernels cannot run on the current GPU (None if they can or we cannot tell)."""
    info = record()
    archs = tuple(info.get("CUDA_ARCHS") or ()) if info else ()
    if not archs:
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is available"
    cap = torch.cuda.get_device_capability()
    if arch_covered(archs, cap):
        return None
    return (
        f"ditfast._C was compiled for CUDA archs {';'.join(archs)}, which do not run on this GPU "
        f"(sm_{cap[0]}{cap[1]}); rebuild with DITFAST_CUDA_ARCHS=\"{cap[0]}.{cap[1]}\""
    )


def record() -> Optional[Dict[str, object]]:
    """setup.py's build record (ditfast/_build_info.py) as a dict, or None without one."""
    try:
        info = importlib.import_module("ditfast._build_info")
    except ImportError:
        return None
    return {k: getattr(info, k) for k in dir(info) if k.isupper()}


def build_info() -> str:
    """One line on what ditfast._C has (for ``python -m ditfast.info``); loads it."""
    mod = load()
    if mod is None:
        return f"not available: {_ERROR}"
    import torch

    devices = tuple(getattr(mod, "DEVICES", ()))
    parts = [f"{' + '.join(devices)} kernels"]
    info = record() or {}
    if "cuda" in devices:
        archs = ";".join(info.get("CUDA_ARCHS") or ()) or "?"
        runtime = int(getattr(mod, "CUDA_RUNTIME_VERSION", 0))
        parts.append(f"CUDA archs {archs}, CUDA {runtime // 1000}.{runtime % 1000 // 10}")
    elif info.get("REASON"):
        parts.append(str(info["REASON"]))
    built_for = getattr(mod, "TORCH_VERSION", "?")
    parts.append(f"built for torch {built_for}")
    if not torch.__version__.startswith(str(built_for)):
        parts.append(f"WARNING: running torch {torch.__version__}; rebuild ditfast._C")
    return "; ".join(parts)
