"""Lazy access to the compiled extension ``ditfast._C`` (built by setup.py when CUDA is present).

Importing ditfast never imports ``_C``; the first op that asks for the "cuda" backend does, and a
failure is remembered and reported as the reason the backend is unavailable.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

_LOADED: Optional[object] = None
_ERROR: Optional[str] = None


def load():
    """Import ``ditfast._C`` once; return the module or None (see :func:`error`)."""
    global _LOADED, _ERROR
    if _LOADED is None and _ERROR is None:
        try:
            _LOADED = importlib.import_module("ditfast._C")
        except ImportError as exc:  # not built, or built against another torch
            _ERROR = f"ditfast._C is not importable ({exc}); install with a CUDA toolkit present"
    return _LOADED


def error() -> Optional[str]:
    return _ERROR


def availability(device_type: str) -> Tuple[bool, str]:
    mod = load()
    if mod is None:
        return False, _ERROR or "ditfast._C is not built"
    devices = getattr(mod, "DEVICES", ("cuda",))
    if device_type not in devices:
        return False, f"ditfast._C has no {device_type} kernels (built for {tuple(devices)})"
    return True, "ditfast._C is built"
