"""Without a GPU the interpreter runs the Triton kernels but never compiles them: compile every kernel
for sm_90 offline (tests/compile_sm90.py), which catches typing and lowering errors before a GPU run
does, and check the resource report at the FLUX.1 and SD3.5-large shapes: no forward attention
configuration spills registers, neither do the adaLN / rope kernels, and the attention backward
(one fused 5-matmul kernel) spills nothing either (the prologue kernels it replaces spilled 336-984
bytes per thread in dq and dk/dv)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(tests / "compile_sm90.py"), "--report", str(out)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]
    return json.loads(out.read_text())


def _rows(report, prefix):
    rows = [r for r in report if r["kernel"].startswith(prefix)]
    assert rows, f"no {prefix}* rows in the report"
    return rows


@pytest.mark.skipif(ON_GPU, reason="with a GPU every kernel test compiles and runs the kernels")
def test_report_rows_are_complete(report):
    keys = {"kernel", "config", "shape", "registers", "spills", "shared_bytes", "ctas_per_sm", "waves"}
    for r in report:
        assert set(r) == keys, r
        assert 0 < r["registers"] <= 255 and r["ctas_per_sm"] >= 1 and r["shared_bytes"] <= 227 * 1024, r
    for shape in ("flux", "sd35_large"):
        kernels = {r["kernel"] for r in report if r["shape"].startswith(shape)}
        assert {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_kernel"} <= kernels, kernels


@pytest.mark.skipif(ON_GPU, reason="with a GPU every kernel test compiles and runs the kernels")
def test_no_forward_attention_config_spills(report):
    for r in _rows(report, "_attn_fwd"):
        assert r["spills"] == 0, r


@pytest.mark.skipif(ON_GPU, reason="with a GPU every kernel test compiles and runs the kernels")
def test_attention_backward_does_not_spill(report):
    for r in _rows(report, "_attn_bwd"):
        assert r["spills"] == 0, r


@pytest.mark.skipif(ON_GPU, reason="with a GPU every kernel test compiles and runs the kernels")
def test_modulate_and_rope_kernels_do_not_spill(report):
    for prefix in ("_norm_modulate", "_gated_residual", "_norm_rope", "_gelu_tanh_bwd", "_swiglu"):
        for r in _rows(report, prefix):
            assert r["spills"] == 0, r


@pytest.mark.skipif(ON_GPU, reason="with a GPU every kernel test compiles and runs the kernels")
def test_prepare_forward_does_not_spill(report):
    rows = _rows(report, "_prepare_fwd")
    assert {r["shape"].split(":")[0] for r in rows} == {"flux", "sd35_large"}
    for r in rows:
        assert r["spills"] == 0, r
