"""Test configuration shared by every test file.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter; TRITON_INTERPRET=1
must be set before triton is first imported, which is why it is set here, at collection time.
Tests use the ``device`` fixture: "cuda" when a GPU is present (real sizes), else "cpu".
A capped run (benchmarks/run_tests.py) is stopped here, test by test, in every pytest-xdist worker.
"""
import os
import signal
import threading
import time

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


# The Triton interpreter's range() work-around (triton 3.6 with numpy >= 2.4) lives in the package,
# ditfast/kernels/triton/_interpreter.py, applied when ditfast.kernels.triton is imported with the
# interpreter on (so benchmarks/smoke.py and python -m ditfast.bench get it too); imported here first.
if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from ditfast.kernels.triton import _interpreter

        INTERPRETER_WORKAROUND = _interpreter.apply()
    except ImportError:
        INTERPRETER_WORKAROUND = "not needed (no Triton)"
    if INTERPRETER_WORKAROUND.startswith("failed"):
        raise RuntimeError(f"Triton interpreter work-around: {INTERPRETER_WORKAROUND}")
else:
    INTERPRETER_WORKAROUND = "not needed (Triton interpreter off)"


def pytest_report_header(config):
    return f"triton interpreter range() work-around: {INTERPRETER_WORKAROUND}"


# ------------------------------------------------------------------------------------------------
# The time cap of a capped run (benchmarks/run_tests.py; the GPU run's tier 3, often under pytest-xdist).
# The cap is enforced where the tests run, in every xdist worker: after DITFAST_TEST_DEADLINE (epoch
# seconds) no test starts -- each is skipped at once, so the workers' queues drain in milliseconds and
# pytest ends with its summary and JUnit XML; a test still running at DITFAST_TEST_HARD_DEADLINE is failed
# by a SIGALRM (when the interpreter gets control back), so a slow test cannot take the summary with it.
# ------------------------------------------------------------------------------------------------
DEADLINE_ENV, HARD_DEADLINE_ENV = "DITFAST_TEST_DEADLINE", "DITFAST_TEST_HARD_DEADLINE"
CAP_REASON = "time cap reached: not started (benchmarks/run_tests.py)"
# A sticky CUDA error (illegal address, launch failure) kills the process's CUDA context: every later
# test in it would fail for that one. The first test after which torch.cuda.synchronize() raises is
# named in DITFAST_TEST_CULPRITS (a file, one JSON line per event), and this process's later tests are
# skipped and listed there, to be rerun in a fresh process (benchmarks/run_tests.py --rerun-lost).
CULPRITS_ENV = "DITFAST_TEST_CULPRITS"
_DEAD_CONTEXT = {}


def _env_time(name):
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


def _note_culprit(record: dict) -> None:
    path = os.environ.get(CULPRITS_ENV)
    if not path:
        return
    import json

    record = dict(record, worker=os.environ.get("PYTEST_XDIST_WORKER", "main"), pid=os.getpid())
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _cuda_context_error():
    """The error of a dead CUDA context (None: alive, or CUDA never used in this process)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    try:
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - any error here means the context cannot run more work
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


def _on_alarm(signum, frame):
    pytest.fail(f"test still running at the hard time cap (${HARD_DEADLINE_ENV})", pytrace=False)


def pytest_runtest_setup(item):
    if _DEAD_CONTEXT:
        _note_culprit({"lost": item.nodeid})
        pytest.skip(f"CUDA context lost after {_DEAD_CONTEXT['culprit']} ({_DEAD_CONTEXT['error']}): rerun in a fresh process")
    deadline = _env_time(DEADLINE_ENV)
    if deadline is not None and time.time() >= deadline:
        pytest.skip(CAP_REASON)
    hard = _env_time(HARD_DEADLINE_ENV)
    if hard is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, hard - time.time()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if _env_time(HARD_DEADLINE_ENV) is not None and hasattr(signal, "setitimer") \
            and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and not _DEAD_CONTEXT:
        err = _cuda_context_error()
        if err is not None:
            _DEAD_CONTEXT.update(culprit=item.nodeid, error=err)
            _note_culprit({"culprit": item.nodeid, "error": err, "when": report.when})


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
