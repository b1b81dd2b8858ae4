"""Work-around for a Triton interpreter bug (triton 3.6 with numpy >= 2.4; docs/numerics.md).

The interpreter (``TRITON_INTERPRET=1``, the CPU mode of the tests and of the GPU run's rehearsal) hands a
kernel's runtime scalar arguments around as one-element numpy arrays, and Triton 3.6 implements the
language tensor's ``__index__`` (used by a Python ``range(n)`` whose bound ``n`` is a kernel argument) as
``int(array)``. numpy 2.4 refuses ``int()`` of an array that is not 0-dimensional ("only 0-dimensional
arrays can be converted to Python scalars"). Later Triton releases read the element explicitly.

``apply()`` runs one tiny kernel with such a loop; only when it fails with that error is the interpreter's
patch of ``__index__`` extended to read the element with ``.item()``, and the probe is re-run to prove the
fix. Compiled kernels on a GPU never take this path, and a Triton without the bug is left untouched.
ditfast.kernels.triton calls ``apply()`` when it is imported with the interpreter on, so every user of the
kernels (the tests, benchmarks/smoke.py, ``python -m ditfast.bench``) gets the same fix; ``STATUS`` says
what was done.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

STATUS: Optional[str] = None  # None: apply() not run yet


def _probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        acc = 0
        for _ in range(n):  # runtime bound: the interpreter calls __index__ on n
            acc += 1
        tl.store(out_ptr, acc)

    return _count


def _probe(kernel) -> None:
    import torch

    out = torch.zeros(1, dtype=torch.int32)
    kernel[(1,)](out, 3)
    if out.item() != 3:
        raise AssertionError(f"interpreter probe counted {out.item()} iterations, expected 3")


def apply() -> str:
    """Probe and, if needed, patch (once per process); returns what was done (also in ``STATUS``)."""
    global STATUS
    if STATUS is not None:
        return STATUS
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "not needed (Triton interpreter off)"  # not cached: the variable may be set later
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        STATUS = "not needed (no Triton)"
        return STATUS
    kernel = _probe_kernel()
    try:
        _probe(kernel)
        STATUS = "not needed (range() with a runtime bound works)"
        return STATUS
    except Exception as exc:  # noqa: BLE001 - the interpreter wraps the TypeError in its own error type
        if "0-dimensional arrays" not in str(exc):
            STATUS = f"failed: the interpreter probe raised {type(exc).__name__}: {str(exc)[:200]}"
            warnings.warn(f"ditfast: {STATUS}", RuntimeWarning, stacklevel=2)
            return STATUS
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        STATUS = ("failed: the Triton interpreter fails range() with a runtime bound and has no "
                  "_patch_lang_tensor to fix (ditfast/kernels/triton/_interpreter.py)")
        warnings.warn(f"ditfast: {STATUS}", RuntimeWarning, stacklevel=2)
        return STATUS

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)  # Triton's own patches, then the fixed __index__ over its one
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        _probe(kernel)  # must pass now
    except Exception as exc:  # noqa: BLE001
        interpreter._patch_lang_tensor = original
        STATUS = f"failed: the work-around no longer fits triton {triton.__version__} ({type(exc).__name__}: {str(exc)[:200]})"
        warnings.warn(f"ditfast: {STATUS}", RuntimeWarning, stacklevel=2)
        return STATUS
    STATUS = f"applied (triton {triton.__version__}: interpreter __index__ on one-element arrays)"
    return STATUS
