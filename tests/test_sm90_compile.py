"""Without a GPU the interpreter runs the Triton kernels but never compiles them: compile the main
variants of every kernel for sm_90 offline (tests/compile_sm90.py), which catches typing and lowering
errors before a GPU run does."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU


@pytest.mark.skipif(ON_GPU, reason="with a GPU every kernel test compiles and runs the kernels")
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(tests / "compile_sm90.py")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]
