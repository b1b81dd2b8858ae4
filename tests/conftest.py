"""Test configuration shared by every test file.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter; TRITON_INTERPRET=1
must be set before triton is first imported, which is why it is set here, at collection time.
Tests use the ``device`` fixture: "cuda" when a GPU is present (real sizes), else "cpu".
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


# ------------------------------------------------------------------------------------------------
# Work-around for a Triton interpreter bug (triton 3.6 with numpy >= 2.4; docs/numerics.md).
# The interpreter hands a kernel's runtime scalar arguments around as one-element numpy arrays, and
# Triton 3.6 implements the language tensor's __index__ (used by a Python ``range(n)`` whose bound
# ``n`` is a kernel argument) as ``int(array)``. numpy 2.4 refuses int() of an array that is not
# 0-dimensional: "TypeError: only 0-dimensional arrays can be converted to Python scalars". Later
# Triton releases read the element explicitly. The probe below runs one tiny kernel with such a loop;
# only when it fails with that error is the interpreter's patch of __index__ extended to read the
# element with ``.item()``, and the probe is re-run to prove the fix. Compiled kernels on a GPU never
# take this path, and a Triton without the bug is left untouched.
# ------------------------------------------------------------------------------------------------
def _interpreter_index_workaround() -> str:
    """Probe and, if needed, patch; returns what was done (shown in pytest's header)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "not needed (Triton interpreter off)"
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return "not needed (no Triton)"

    @triton.jit
    def _count(out_ptr, n):
        acc = 0
        for _ in range(n):  # runtime bound: the interpreter calls __index__ on n
            acc += 1
        tl.store(out_ptr, acc)

    def probe() -> None:
        out = torch.zeros(1, dtype=torch.int32)
        _count[(1,)](out, 3)
        if out.item() != 3:
            raise AssertionError(f"interpreter probe counted {out.item()} iterations, expected 3")

    try:
        probe()
        return "not needed (range() with a runtime bound works)"
    except Exception as exc:  # the interpreter wraps the TypeError in its own error type
        if "0-dimensional arrays" not in str(exc):
            raise
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        raise RuntimeError("Triton interpreter fails range() with a runtime bound and has no "
                           "_patch_lang_tensor to fix; see tests/conftest.py")

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)  # Triton's own patches, then the fixed __index__ over its one
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    probe()  # must pass now; an exception here means the work-around no longer fits this Triton
    return f"applied (triton {triton.__version__}: interpreter __index__ on one-element arrays)"


INTERPRETER_WORKAROUND = _interpreter_index_workaround()


def pytest_report_header(config):
    return f"triton interpreter range() work-around: {INTERPRETER_WORKAROUND}"


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
