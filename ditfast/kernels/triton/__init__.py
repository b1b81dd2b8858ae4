"""Triton kernels, one module per op family (``modulate``, ...), each with its launchers.

Importing a module here imports triton; ditfast.ops does that lazily, on the first call that runs
the "triton" backend. On CPU tensors the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported); with the interpreter on, importing this package
applies the work-around of ``_interpreter`` (a Triton 3.6 + numpy >= 2.4 bug) before any kernel runs.
"""
import importlib
import os
from types import ModuleType
from typing import Dict

if os.environ.get("TRITON_INTERPRET") == "1":  # only then is triton imported here: it is about to be used
    from . import _interpreter

    _interpreter.apply()

_LOADED: Dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """The kernel module ``name`` ("modulate", "rope", "prepare", "attention"), imported on first use
    (this is what imports triton)."""
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = importlib.import_module(f"{__name__}.{name}")
    return mod

