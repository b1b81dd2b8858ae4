"""Tests of the benchmark harness (ditfast.bench) on CPU: the bytes / FLOPs formulas, the timer (CPU
median; on CUDA the call into triton.testing.do_bench), the JSON schema, the targets, the table and
README renderers, the plot, the sm_90 report lookup, and one end-to-end ``--quick`` smoke. Nothing here
asserts a speed."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from ditfast import reference
from ditfast.bench import cases as C
from ditfast.bench import report, runner, timing
from ditfast.bench.cli import main
from ditfast.bench.variants import Built, VariantSpec, attention_backends, count_linear_flops, op_inputs

ROOT = Path(__file__).resolve().parents[1]
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------------------- formulas
def test_modulate_bytes_by_hand():
    # N = 2*3*4 = 24 activation elements, V = 2*4 = 8 vector elements, 2-byte elements
    b = C.modulate_bytes("norm_modulate", 2, 3, 4, 2)
    assert b["fwd"] == (2 * 24 + 2 * 8) * 2 == 128
    assert b["fwd_bwd"] == 128 + (3 * 24 + 3 * 8) * 2 == 320
    g = C.modulate_bytes("gated_residual", 2, 3, 4, 4)
    assert g == {"fwd": (3 * 24 + 8) * 4, "fwd_bwd": (3 * 24 + 8 + 3 * 24 + 2 * 8) * 4}
    with pytest.raises(ValueError, match="no byte count"):
        C.modulate_bytes("softmax", 1, 1, 1, 2)


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("op", ["norm_modulate", "norm_modulate_dual", "gated_residual",
                                "gated_residual_norm_modulate", "rms_norm", "apply_rope"])
def test_forward_bytes_are_inputs_plus_outputs(op):
    """The forward count must equal reading every input tensor once and writing every output once."""
    dims = dict(B=2, L=5, H=3, Dh=8) if op in ("rms_norm", "apply_rope") else dict(B=2, L=5, D=12)
    case = C._op_case(op, "t", dims, 4)
    seen = []

    def spy(*args):
        seen.extend(a for a in args if isinstance(a, torch.Tensor))
        return getattr(reference, op)(*args)

    leaves, invoke = op_inputs(case, "cpu", torch.float32)
    out = invoke(spy)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    assert case.work["fwd"] == _nbytes(seen) + _nbytes(outs)


def test_qk_norm_rope_bytes_by_hand():
    B, L, H, Dh, elt = 1, 10, 2, 8, 2
    N = B * L * H * Dh
    tables = 2 * L * (Dh // 2) * 4
    b = C.head_op_bytes("qk_norm_rope", B, L, H, Dh, elt)
    assert b["fwd"] == (4 * N + 2 * Dh) * elt + tables
    assert b["fwd_bwd"] == b["fwd"] + (6 * N + 4 * Dh) * elt + tables
    # per-sample tables (B, L, Dh/2) count B times the rows
    assert C.head_op_bytes("apply_rope", 3, L, H, Dh, elt, table_rows=3 * L)["fwd"] == 2 * 3 * N * elt + 3 * tables


def test_attention_flops():
    f = C.attention_flops(2, 3, 5, 7, 8)
    # QK^T and PV: two matmuls of 2*B*H*Lq*Lk*Dh each
    assert f["fwd"] == 2 * (2 * 2 * 3 * 5 * 7 * 8)
    assert f["fwd_bwd"] == pytest.approx(3.5 * f["fwd"])
    flux = C.attention_flops(1, 24, 4608, 4608, 128)["fwd"]
    assert flux == pytest.approx(4 * 24 * 4608 ** 2 * 128)


@pytest.mark.parametrize("case", C.block_cases(tiny=True, quick=False), ids=lambda c: c.name)
def test_block_linear_flops_match_hooks(case):
    """The block formula's linear part equals the matmul FLOPs counted on the real module."""
    from ditfast.bench.variants import block_callers, ditfast_block

    m = ditfast_block(case, "cpu", torch.float32)
    _, call, _ = block_callers(case, "cpu", torch.float32)
    counted = count_linear_flops(m, lambda: call(m))
    f = C.block_flops(case.name, case.dims)
    assert f["linear_fwd"] == pytest.approx(counted)
    d = case.dims
    L = d.get("L") or d.get("Li", 0) + d.get("Lt", 0) or d["Lx"] + d["Lc"]
    assert f["attention_fwd"] == C.attention_flops(d["B"], d["H"], L, L, d["D"] // d["H"])["fwd"]
    assert f["fwd_bwd"] == pytest.approx(3 * f["linear_fwd"] + 3.5 * f["attention_fwd"])


def test_rate_units():
    assert C.rate(1e9, 1.0, "GB/s") == pytest.approx(1000.0)  # 1 GB in 1 ms
    assert C.rate(1e12, 2.0, "TFLOP/s") == pytest.approx(500.0)
    assert C.rate(None, 1.0, "GB/s") is None and C.rate(1.0, 0.0, "GB/s") is None


def test_plan_targets_first_and_real_shapes():
    plan = C.plan(C.LEVELS, 2, tiny=False, quick=False)
    flags = [c.target for c in plan]
    assert flags == sorted(flags, reverse=True), "target cases must come first"
    keys = {c.key for c in plan}
    assert "ops/norm_modulate/FLUX-dev" in keys
    att = {(c.dims["B"], c.dims["L"], c.dims["H"], c.dims["Dh"]) for c in plan if c.level == "attention"}
    assert {(1, 4608, 24, 128), (2, 4429, 38, 64), (8, 256, 16, 72), (8, 1024, 16, 72)} <= att
    flux = next(c for c in plan if c.key == "ops/norm_modulate/FLUX-dev")
    assert flux.dims == dict(B=1, L=4608, D=3072)
    assert any(c.graph for c in plan if c.level == "ops"), "the text-stream shapes need the graph column"


# ----------------------------------------------------------------------------------------- timing
def test_cpu_timer_takes_a_median():
    calls = []
    t = timing.bench(lambda: calls.append(1), torch.device("cpu"), quick=True)
    assert len(calls) == 3 and t["ms"] >= 0 and t["p20_ms"] <= t["ms"] <= t["p80_ms"]
    assert "wall clock" in t["method"]
    slow = timing.bench(lambda: __import__("time").sleep(0.06), torch.device("cpu"), quick=True)
    assert slow["ms"] >= 60 and "median of 1" in slow["method"]  # one call when a call outlasts the budget
    assert timing.peak_memory_mb(lambda: None, torch.device("cpu")) is None


def test_cuda_timer_is_triton_do_bench(monkeypatch):
    """On CUDA the harness times with triton.testing.do_bench (L2 flush + CUDA events) and reports its
    median; launch-bound forwards use do_bench_cudagraph. Faked here: no GPU is needed to check the call."""
    tt = pytest.importorskip("triton.testing")
    seen = {}

    def fake(fn, warmup=None, rep=None, quantiles=None, **kw):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [2.0, 1.5, 3.0]

    monkeypatch.setattr(tt, "do_bench", fake)
    monkeypatch.setattr(tt, "do_bench_cudagraph", lambda fn, rep=None, quantiles=None: [0.5, 0.4, 0.6])
    t = timing.bench(lambda: None, torch.device("cuda"))
    assert (t["ms"], t["p20_ms"], t["p80_ms"]) == (2.0, 1.5, 3.0) and "do_bench" in t["method"]
    assert seen == {"warmup": 25, "rep": 100, "quantiles": [0.5, 0.2, 0.8]}
    assert timing.bench(lambda: None, torch.device("cuda"), graph=True)["ms"] == 0.5


# ----------------------------------------------------------------------------------------- runner pieces
def test_classify():
    assert runner.classify(NotImplementedError("no"))[0] == "skipped"
    assert runner.classify(RuntimeError("ditfast backend 'cuda' has no implementation of x"))[0] == "skipped"
    status, reason = runner.classify(ValueError("boom\nsecond line"))
    assert status == "error" and reason == "ValueError: boom"


def _ctx(**kw):
    return runner.Context(runner.Options(device="cpu", quick=True, backends=[], **kw))


def test_measure_variant_records_failures():
    ctx = _ctx()
    ctx.peaks = {"copy": {"gbps": 10.0}, "matmul": {"tflops": 1.0}}
    case = C._op_case("norm_modulate", "t", dict(B=1, L=4, D=8), 4)
    x = torch.randn(1, 4, 8, requires_grad=True)

    def boom():
        raise RuntimeError("build failed")

    rec = runner.measure_variant(ctx, case, VariantSpec("bad", "peer", boom), None)
    assert rec["status"] == "error" and "build failed" in rec["reason"]

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx_, t):
            return t * 2

        @staticmethod
        def backward(ctx_, g):
            raise RuntimeError("no backward here")

    spec = VariantSpec("fwd-only", "peer", lambda: Built(lambda: NoBackward.apply(x), [x]))
    rec = runner.measure_variant(ctx, case, spec, None)
    assert rec["status"] == "ok" and rec["fwd"]["ms"] > 0
    assert rec["fwd"]["rate"] == pytest.approx(C.rate(case.work["fwd"], rec["fwd"]["ms"], "GB/s"))
    assert rec["fwd"]["pct_peak"] is None  # CPU: tiny cache-resident tensors, a % of copy bandwidth means nothing
    assert rec["fwd_bwd"]["ms"] is None and "no backward here" in rec["fwd_bwd"]["reason"]
    rec = runner.measure_variant(ctx, case, VariantSpec("late", "peer", lambda: Built(lambda: x)), 0.0)
    assert rec["status"] == "skipped" and "time limit" in rec["reason"]


def test_add_speedups():
    def v(name, fwd, bwd=None):
        return {"name": name, "speedup": {}, "fwd": {"ms": fwd}, "fwd_bwd": {"ms": bwd} if bwd else None}

    rec = {"variants": [v("ditfast", 2.0, 6.0), v("eager", 8.0, 12.0), v("compile", 1.0)]}
    runner.add_speedups(rec)
    by = {x["name"]: x["speedup"] for x in rec["variants"]}
    assert by["ditfast"]["fwd"] == 1.0
    assert by["eager"] == {"fwd": 4.0, "fwd_bwd": 2.0, "graph": None}
    assert by["compile"]["fwd"] == 0.5 and by["compile"]["fwd_bwd"] is None
    assert rec["fastest"] == {"fwd": "compile", "fwd_bwd": "ditfast"}


def test_attention_backends_listed_from_the_dispatcher():
    from ditfast.ops import attention_backends as backends

    got = dict(attention_backends(torch.device("cpu"), None))
    assert set(got) == set(backends.NAMES) - {"reference"}  # the reference is the "eager" peer
    assert got["sdpa_math"] is None and got["sdpa_flash"]  # a reason why SDPA's flash kernel cannot run on CPU
    assert dict(attention_backends(torch.device("cpu"), {"sdpa_math"}))["triton"] == "not selected (--backends)"


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CPU --quick run of every level (no forced backends: the harness, not the kernels)."""
    out = tmp_path_factory.mktemp("bench")
    path = out / "bench_test.json"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["--quick", "--device", "cpu", "--backends", "none", "--json", str(path)])
    return rc, buf.getvalue(), json.loads(path.read_text()), out


def test_smoke_run(smoke):
    rc, text, res, out = smoke
    assert rc == 0
    assert report.validate(res) == []
    meta = res["meta"]
    assert meta["mode"] == "cpu-smoke" and meta["device"]["type"] == "cpu"
    for k in ("torch", "triton", "cuda", "ditfast", "python"):
        assert k in meta["versions"]
    assert meta["commit"] and meta["date"].endswith("Z") and meta["dtype"] == "float32"
    assert res["peaks"]["copy"]["gbps"] > 0 and res["peaks"]["matmul"]["tflops"] > 0
    assert {c["level"] for c in res["results"]} == set(C.LEVELS)
    for case in res["results"]:
        names = [v["name"] for v in case["variants"]]
        assert names[0] == "ditfast", case["key"]
        if case["level"] != "models":  # ditfast.patch may not exist yet
            assert case["variants"][0]["status"] == "ok", (case["key"], case["variants"][0]["reason"])
        if case["level"] != "models":  # the models level needs diffusers, which may be absent
            comp = next(v for v in case["variants"] if v["name"] == "compile")
            assert comp["status"] == "skipped" and "--quick" in comp["reason"]
            assert [v["kind"] for v in case["variants"]][-1] == "peer"  # the costly peers come last
        base = case["variants"][0]
        for v in case["variants"]:
            if v["status"] == "ok" and base["status"] == "ok":
                assert v["speedup"]["fwd"] == pytest.approx(v["fwd"]["ms"] / base["fwd"]["ms"])
    # the terminal output says loudly what it is, and ends with the summary
    assert "NOT a speed claim" in text
    assert "Summary: performance targets" in text
    assert "== ops | norm_modulate | tiny" in text
    assert all(t["met"] is None for t in res["targets"]), "a CPU smoke never judges targets"
    assert "no offline report" in text or "sm_90" in text  # the register report, or why there is none
    # the plot is on by default; without matplotlib it is skipped with a message
    pngs = sorted(p.name for p in out.glob("*.png"))
    if HAVE_MPL:
        assert pngs == ["bench_test.png"]
    else:
        assert pngs == [] and "matplotlib is not installed" in text


def test_time_limit_zero_skips_everything(tmp_path):
    opts = runner.Options(device="cpu", quick=True, backends=[], levels=("ops",), time_limit=0.0)
    res = runner.run(opts, out_json=str(tmp_path / "r.json"))
    assert res["results"] and all(not c["variants"] and "time limit" in c["notes"][0] for c in res["results"])
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    assert report.validate(report.load_json(str(tmp_path / "r.json"))) == []


# ----------------------------------------------------------------------------------------- schema
def test_validate_catches_problems(smoke):
    res = smoke[2]
    bad = copy.deepcopy(res)
    del bad["meta"]["versions"]["torch"]
    assert any("meta.versions: missing 'torch'" in e for e in report.validate(bad))
    bad = copy.deepcopy(res)
    bad["meta"]["mode"] = "laptop"
    assert any("meta.mode" in e for e in report.validate(bad))
    bad = copy.deepcopy(res)
    v = bad["results"][0]["variants"][0]
    v["fwd"] = None
    assert any("without a forward time" in e for e in report.validate(bad))
    bad = copy.deepcopy(res)
    bad["results"][0]["variants"][1].update(status="skipped", reason=None)
    assert any("without a reason" in e for e in report.validate(bad))
    assert report.validate({"meta": {}}) != []


def test_json_is_strict(tmp_path):
    path = str(tmp_path / "x.json")
    report.write_json({"a": float("nan"), "b": (1, float("inf")), "c": 1.5}, path)
    text = Path(path).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1, None], "c": 1.5}


# ----------------------------------------------------------------------------------------- rendering
def gpu_results() -> dict:
    """A small synthetic GPU results dict (numbers invented for the renderer, never published)."""
    def meas(ms, rate=None, pct=None, mem=None):
        return {"ms": ms, "p20_ms": ms, "p80_ms": ms, "method": "triton.testing.do_bench",
                "rate": rate, "pct_peak": pct, "peak_mem_mb": mem, "first_call_s": 0.01}

    def var(name, kind, fwd, bwd, backend=None, status="ok", reason=None):
        return {"name": name, "kind": kind, "backend": backend, "compiled": name == "compile", "status": status,
                "reason": reason, "fwd": meas(*fwd) if fwd else None, "fwd_bwd": meas(*bwd) if bwd else None,
                "graph": None, "compile_s": {"fwd": 3.0} if name == "compile" else None, "speedup": {}, "notes": []}

    op = {"level": "ops", "case": "norm_modulate", "label": "FLUX-dev", "key": "ops/norm_modulate/FLUX-dev",
          "dims": {"B": 1, "L": 4608, "D": 3072}, "dtype": "bfloat16", "metric": "GB/s", "target": True,
          "graph": False, "work": {"fwd": 1.0, "fwd_bwd": 2.0}, "notes": [], "variants": [
              var("ditfast", "ditfast", (0.02, 2800, 90.0), (0.05, 2600, 84.0), backend="triton"),
              var("eager", "peer", (0.08, 700, 22.0), (0.2, 650, 20.0)),
              var("compile", "peer", (0.025, 2200, 70.0), (0.06, 2100, 68.0)),
              var("ditfast:cuda", "backend", None, None, status="skipped", reason="ditfast._C is not built")]}
    att = {"level": "attention", "case": "joint_attention", "label": "FLUX-dev", "key": "attention/joint_attention/FLUX-dev",
           "dims": {"B": 1, "L": 4608, "H": 24, "Dh": 128}, "dtype": "bfloat16", "metric": "TFLOP/s", "target": True,
           "graph": False, "work": {"fwd": 1.0, "fwd_bwd": 3.5}, "notes": [], "variants": [
               var("ditfast", "ditfast", (1.0, 500, 70.0), (3.0, 400, 55.0), backend="sdpa_cudnn"),
               var("ditfast:triton", "backend", (1.1, 450, 62.0), (3.2, 380, 52.0), backend="triton"),
               var("sdpa:flash", "peer", (1.2, 420, 60.0), (2.9, 410, 57.0))]}
    res = {"schema": runner.SCHEMA, "meta": {
        "device": {"type": "cuda", "name": "Test GPU 80GB"}, "date": "2030-01-02T03:04:05Z", "dtype": "bfloat16",
        "versions": {"python": "3.12", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "ditfast": "0.1.0"},
        "commit": "0123456789abcdef", "dirty": False, "mode": "gpu", "shapes": "default",
        "timing": timing.METHOD[True]},
        "peaks": {"copy": {"gbps": 3100.0, "what": "copy"}, "matmul": {"tflops": 720.0, "dtype": "bfloat16",
                                                                        "what": "mm"}},
        "results": [op, att], "targets": []}
    for case in res["results"]:
        runner.add_speedups(case)
    res["targets"] = report.compute_targets(res)
    return res


def test_targets_are_measured_ratios():
    res = gpu_results()
    assert report.validate(res) == []
    t = {x["name"]: x for x in res["targets"]}
    copy_t = t["norm_modulate [FLUX-dev]: % of copy bandwidth"]
    assert copy_t["values"] == {"fwd": 90.0, "fwd_bwd": 84.0} and copy_t["met"] is False  # 84 < 85
    eager_t = t["norm_modulate [FLUX-dev]: vs eager reference"]
    assert eager_t["values"]["fwd"] == pytest.approx(4.0) and eager_t["met"] is True
    comp_t = t["norm_modulate [FLUX-dev]: vs compiled reference"]
    assert comp_t["values"] == {"fwd": pytest.approx(1.25), "fwd_bwd": pytest.approx(1.2)} and comp_t["met"] is True
    auto = t["joint_attention [FLUX-dev]: automatic choice vs fastest backend"]
    assert auto["values"]["fwd"] == pytest.approx(1.0)  # ditfast is the fastest forward
    assert auto["values"]["fwd_bwd"] == pytest.approx(2.9 / 3.0) and auto["met"] is False
    assert "sdpa_cudnn" in auto["note"]


def test_format_table_alignment():
    text = report.format_table(["name", "ms", "note"], [["a", "1.5", "x"], ["longer", "10.25", ""]])
    lines = text.splitlines()
    assert lines[0].startswith("name  ") and set(lines[1]) <= {"-", " "}
    assert lines[2].index("1.5") + len("1.5") == lines[3].index("10.25") + len("10.25")  # right-aligned
    assert report.fmt(None) == "-" and report.fmt(1.234, "x") == "1.23x" and report.fmt(85.4, "%") == "85%"


def test_render_table_labels_and_reasons():
    res = gpu_results()
    text = report.render_table(res)
    assert "Test GPU 80GB" in text and "NOT a speed claim" not in text
    assert "ditfast (triton)" in text and "skipped: ditfast._C is not built" in text
    assert "4.00x/4.00x" in text  # eager: 0.08/0.02 fwd, 0.2/0.05 fwd+bwd
    assert "sm_90: no offline report" in text  # next to the Triton kernel's row
    assert text.rstrip().splitlines()[-1].startswith("joint_attention [FLUX-dev]")  # the summary is last
    res["meta"]["mode"] = "cpu-smoke"
    assert "NOT a speed claim" in report.render_table(res)


def test_markdown_and_readme_markers():
    res = gpu_results()
    md = report.render_markdown(res, source="benchmarks/results/x.json")
    for needle in ("Test GPU 80GB", "torch 2.11.0", "triton 3.6.0", "CUDA 13.0", "`0123456789`",
                   "2030-01-02T03:04:05Z", "3,100 GB/s", "norm_modulate FLUX-dev (triton)", "4.00x / 4.00x"):
        assert needle in md, needle
    readme = f"# ditfast\n\nintro\n{report.MARK_START}\nold table\n{report.MARK_END}\n\nafter\n"
    new = report.update_readme(readme, md)
    assert "old table" not in new and new.startswith("# ditfast\n\nintro\n") and new.endswith("\n\nafter\n")
    assert report.update_readme(new, md) == new  # idempotent
    with pytest.raises(ValueError, match="ditfast-bench"):
        report.update_readme("# no markers\n", md)


def test_sm90_report_next_to_the_triton_kernels(tmp_path):
    entries = [{"kernel": "_norm_modulate_fwd", "config": {}, "shape": "FLUX:1x4608x3072", "registers": 40, "spills": 0,
                "shared_bytes": 0, "ctas_per_sm": 12, "waves": 0.3},
               {"kernel": "_attn_fwd_kernel", "config": {}, "shape": "FLUX:1x4608x24x128", "registers": 255, "spills": 16,
                "shared_bytes": 98304, "ctas_per_sm": 1, "waves": 2.1},
               {"kernel": "_attn_fwd_kernel", "config": {}, "shape": "SD3.5:1x4429x38x64", "registers": 168, "spills": 0,
                "shared_bytes": 65536, "ctas_per_sm": 2, "waves": 1.3}]
    path = tmp_path / "sm90.json"
    path.write_text(json.dumps(entries))
    sm90 = report.load_sm90(str(path))
    assert sm90["source"] == str(path) and len(sm90["entries"]) == 3
    assert report.sm90_for("norm_modulate", sm90) == "_norm_modulate_fwd: 40 regs/0 spills/12 CTA/SM"
    assert report.sm90_for("gated_residual", sm90) == "not in the offline report"  # not the norm_modulate kernel
    assert report.sm90_for("joint_attention", sm90, "FLUX-dev") == "_attn_fwd_kernel: 255 regs/16 spills/1 CTA/SM"
    assert report.sm90_for("joint_attention", sm90, "SD3.5-large CFG") == "_attn_fwd_kernel: 168 regs/0 spills/2 CTA/SM"
    assert report.sm90_for("apply_rope", sm90) == "not in the offline report"
    assert report.sm90_for("apply_rope", None) == "no offline report"
    text = report.render_table(gpu_results(), sm90)
    assert "sm_90: _norm_modulate_fwd: 40 regs/0 spills/12 CTA/SM" in text and str(path) in text
    assert "sm_90: _attn_fwd_kernel: 255 regs/16 spills/1 CTA/SM" in text  # the FLUX row of gpu_results()


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
def test_plot(tmp_path):
    msg = report.make_plot(gpu_results(), str(tmp_path / "t.png"))
    assert "written" in msg and (tmp_path / "t.png").stat().st_size > 1000


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert "matplotlib is not installed" in report.make_plot(gpu_results(), str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_render_readme_script(tmp_path):
    results = tmp_path / "results" / "test-gpu"
    results.mkdir(parents=True)
    report.write_json(gpu_results(), str(results / "bench_20300102T030405Z_0123456.json"))
    smoke = gpu_results()
    smoke["meta"].update(mode="cpu-smoke", date="2031-01-01T00:00:00Z")
    report.write_json(smoke, str(tmp_path / "results" / "bench_smoke.json"))
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{report.MARK_START}\n{report.MARK_END}\nbottom\n")
    spec = importlib.util.spec_from_file_location("render_readme_table", ROOT / "scripts" / "render_readme_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # in-process: a subprocess would pay torch's import again
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme)]
    assert script.main(args + ["--check"]) == 1  # out of date
    assert script.main(args) == 0
    text = readme.read_text()
    assert "Test GPU 80GB" in text and "2030-01-02T03:04:05Z" in text and "CPU smoke" not in text
    assert "bench_20300102T030405Z_0123456.json" in text
    assert text.startswith("top\n") and text.endswith("bottom\n")
    assert script.main(args + ["--check"]) == 0
    # the newer CPU smoke is only taken when asked for, and then says what it is
    assert script.main(args + ["--allow-smoke"]) == 0
    assert "NOT a speed claim" in readme.read_text()
    assert script.main(["--results", str(tmp_path / "nothing"), "--readme", str(readme)]) == 2


def test_backend_table_script(tmp_path, monkeypatch):
    """scripts/backend_table.py: the faster of the forced triton / cuda backends per measured op,
    dtype and width becomes a table entry that the automatic choice then reads; a case where one
    backend did not run gives no entry; a CPU smoke run is refused."""
    from ditfast.ops import cuda_impl

    res = gpu_results()
    op = res["results"][0]
    by = {v["name"]: v for v in op["variants"]}
    by["ditfast:cuda"].update(status="ok", reason=None, fwd=dict(by["ditfast"]["fwd"], ms=0.018),
                              fwd_bwd=dict(by["ditfast"]["fwd_bwd"], ms=0.06))
    op["variants"].append(dict(by["ditfast"], name="ditfast:triton", kind="backend"))  # fwd 0.02, fwd_bwd 0.05
    rope = dict(op, case="qk_norm_rope", dims={"B": 1, "L": 4608, "H": 24, "Dh": 128},
                variants=[dict(v, name=n, fwd=dict(v["fwd"], ms=ms), fwd_bwd=None)
                          for v, n, ms in ((by["ditfast"], "ditfast:triton", 0.03), (by["ditfast"], "ditfast:cuda", 0.02))])
    unmeasured = dict(op, case="apply_rope", dims={"B": 1, "L": 4608, "H": 24, "Dh": 64},
                      variants=[dict(by["ditfast"], name="ditfast:triton")])
    # a second shape of the same width (FLUX's text tokens): cuda a little faster there, triton in total
    text = dict(op, label="FLUX text", dims={"B": 1, "L": 512, "D": 3072},
                variants=[dict(v, fwd_bwd=dict(v["fwd_bwd"], ms={"ditfast:triton": 0.021, "ditfast:cuda": 0.02}[v["name"]]))
                          if v["name"] in ("ditfast:triton", "ditfast:cuda") else v for v in op["variants"]])
    res["results"] += [rope, unmeasured, text]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(res))
    spec = importlib.util.spec_from_file_location("backend_table", ROOT / "scripts" / "backend_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table = tmp_path / "table.json"
    assert script.main([str(path), "--table", str(table)]) == 0
    entries = cuda_impl.load_table(table)["Test GPU 80GB"]["entries"]
    picks = {(e["op"], e["dtype"], e["width_min"], e["width_max"]): e["backend"] for e in entries}
    # norm_modulate: cuda is faster forward, triton forward + backward (training decides), summed over
    # both shapes of D = 3072 (the text shape alone would pick cuda)
    assert picks == {("norm_modulate", "bfloat16", 3072, 3072): "triton",
                     ("qk_norm_rope", "bfloat16", 128, 128): "compiled"}  # the rows' old name "ditfast:cuda" is read too
    monkeypatch.setenv(cuda_impl.TABLE_ENV, str(table))
    monkeypatch.setattr(cuda_impl, "_device_name", lambda index: "Test GPU 80GB")
    assert cuda_impl.table_choice("qk_norm_rope", torch.device("cuda", 0), torch.bfloat16, 128) == "compiled"
    res["meta"]["mode"] = "cpu-smoke"
    path.write_text(json.dumps(res))
    assert script.main([str(path), "--table", str(tmp_path / "other.json")]) == 2
    assert not (tmp_path / "other.json").exists()


def test_git_commit(monkeypatch):
    monkeypatch.setenv("DITFAST_BENCH_COMMIT", "abc")
    assert timing.git_commit() == ("abc", None)
    monkeypatch.delenv("DITFAST_BENCH_COMMIT")
    sha, _ = timing.git_commit()
    assert sha == "unknown" or len(sha) == 40
    assert timing.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3" and timing.slug("NVIDIA H200") == "h200"


def test_merge_of_the_gpu_run_tiers():
    """The peers tier re-measures a case with its compile peers: merged, the case keeps tier 4's ditfast
    time, gains the compile variant, and its speedups and targets are recomputed."""
    ops_tier = gpu_results()
    peers = copy.deepcopy(ops_tier)
    peers["results"] = [peers["results"][0]]
    case = peers["results"][0]
    case["variants"] = [dict(v, fwd=dict(v["fwd"], ms=0.03)) if v["name"] == "ditfast" else v for v in case["variants"]]
    for v in ops_tier["results"][0]["variants"]:
        if v["name"] == "compile":
            v.update(status="skipped", reason="off (--no-compile)", fwd=None, fwd_bwd=None)
    merged = report.merge([ops_tier, peers], ["bench_ops.json", "bench_peers.json"])
    assert report.validate(merged) == []
    assert [c["key"] for c in merged["results"]] == [c["key"] for c in ops_tier["results"]]
    by = {v["name"]: v for v in merged["results"][0]["variants"]}
    assert by["ditfast"]["fwd"]["ms"] == 0.02 and by["compile"]["status"] == "ok"
    assert by["compile"]["speedup"]["fwd"] == pytest.approx(0.025 / 0.02)
    assert merged["meta"]["merged_from"] == ["bench_ops.json", "bench_peers.json"]
    assert any("compiled reference" in t["name"] and t["values"]["fwd"] for t in merged["targets"])


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_run_output_check(tmp_path):
    """benchmarks/outcome.py check: what the GPU machine sends back (<= 8 plain files, <= 16 MB, at most
    two folders deep, no temporary file, valid schemas, a readable log archive)."""
    import sys
    import tarfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    outcome = _script("outcome")
    out = tmp_path / "out"
    (tmp_path / "logs").mkdir()
    for name in ("install.log", "smoke.log", "tests.log"):
        (tmp_path / "logs" / name).write_text("x\n")
    out.mkdir()
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "logs", arcname="logs")
    report.write_json(gpu_results(), str(out / "bench_ops.json"))
    (out / "summary.txt").write_text("table\n")
    assert outcome.check(str(out), ["bench_ops.json", "logs.tar.gz"]) == []
    assert outcome.check(str(out), ["smoke.json"]) == ["smoke.json: missing"]
    (out / "bench_ops.json.tmp").write_text("{}")
    bad = gpu_results()
    del bad["meta"]["versions"]["torch"]
    report.write_json(bad, str(out / "bench_blocks.json"))
    deep = out / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for i in range(6):
        (deep / f"f{i}.txt").write_text("y")
    problems = "\n".join(outcome.check(str(out), []))
    for needle in ("bench_ops.json.tmp: a temporary", "more than 8", "more than 2 folders deep",
                   "bench_blocks.json: meta.versions: missing 'torch'"):
        assert needle in problems, needle


def test_smoke_rule_and_schema(tmp_path):
    """benchmarks/smoke.py judges each output and gradient by ditfast.testing's rule (a wrong result fails)
    and writes a JSON its own schema check accepts (one op at tiny shapes, reference and Triton)."""
    smoke = _script("smoke")
    ref32 = torch.linspace(-1, 1, 50)
    low = ref32.to(torch.bfloat16)
    good = smoke.judge([low.clone()], [ref32], [low], ["out[0]"])["out[0]"]
    assert good["ok"] and good["err"] == good["yard"]
    bad = smoke.judge([low + 0.1], [ref32], [low], ["out[0]"])["out[0]"]
    assert not bad["ok"] and bad["err"] > bad["bound"] and "bound" in bad["why"]
    path = tmp_path / "smoke.json"
    assert smoke.main(["--out", str(path), "--tiny", "--ops", "gated_residual"]) == 0
    res = json.loads(path.read_text())
    assert smoke.validate(res) == []
    rows = {(r["shape"], r["backend"]): r for r in res["rows"]}
    assert {s for s, _ in rows} == set(smoke.TINY)
    for (shape, backend), r in rows.items():
        if r["status"] == "ok":
            assert set(r["checks"]) == {"out[0]", "grad[0]", "grad[1]", "grad[2]"} and r["fwd"]["ms"] > 0
    assert all(r["status"] == "ok" for (s, b), r in rows.items() if b in ("reference", "triton"))
    res["summary"]["counts"]["ok"] += 1
    assert any("summary.counts" in p for p in smoke.validate(res))


# ----------------------------------------------------------------------------------------- the GPU run, hardened
def test_sticky_cuda_error_names_the_culprit_and_stops(monkeypatch):
    """After an exception the context is probed; a dead one makes that variant the culprit, and nothing
    more runs in the process (every later variant is recorded as not run, never re-hits the kernel)."""
    ctx = _ctx()
    ctx.peaks = {"copy": {"gbps": 10.0}, "matmul": {"tflops": 1.0}}
    case = C._op_case("norm_modulate", "FLUX-dev", dict(B=1, L=4, D=8), 4)
    dead = {}

    def crash():
        dead["yes"] = True
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner, "context_error", lambda c: "AcceleratorError: illegal address" if dead else None)
    ok = runner.measure_variant(ctx, case, VariantSpec("eager", "peer", lambda: Built(lambda: torch.ones(1))), None)
    assert ok["status"] == "ok" and ctx.aborted is None
    rec = runner.measure_variant(ctx, case, VariantSpec("ditfast:triton", "backend", crash, backend="triton"), None)
    assert rec["status"] == "error" and "culprit" in rec["reason"]
    assert ctx.aborted["op"] == "norm_modulate" and ctx.aborted["backend"] == "triton"
    assert ctx.aborted["case"] == case.key and "illegal" in ctx.aborted["error"]
    after = runner.measure_variant(ctx, case, VariantSpec("eager", "peer", lambda: Built(lambda: torch.ones(1))), None)
    assert after["status"] == "skipped" and "lost earlier" in after["reason"]


def test_free_survives_a_dead_context(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def boom():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", boom)
    runner._free(collect=True)  # must not re-raise the sticky error


def test_exclusions_from_an_earlier_tier():
    rules = runner.parse_exclude("joint_attention:triton, norm_modulate:compiled;bad")
    assert rules == [("joint_attention", "triton"), ("norm_modulate", "compiled")]
    att = C._attn_case("FLUX-dev", 1, 8, 2, 16)
    op = C._op_case("norm_modulate", "FLUX-dev", dict(B=1, L=4, D=8), 4)
    blk = C._block_case("DoubleStreamBlock", "FLUX-dev", dict(B=1, Li=4, Lt=2, D=8, H=2, M=16))
    spec = lambda name, kind, backend: VariantSpec(name, kind, lambda: None, backend=backend)  # noqa: E731
    assert runner.excluded_by(rules, att, spec("ditfast:triton", "backend", "triton")) == "joint_attention:triton"
    assert runner.excluded_by(rules, att, spec("ditfast", "ditfast", "triton")) == "joint_attention:triton"
    assert runner.excluded_by(rules, att, spec("ditfast:sdpa_math", "backend", "sdpa_math")) is None
    assert runner.excluded_by(rules, op, spec("ditfast:triton", "backend", "triton")) is None  # another op
    assert runner.excluded_by(rules, op, spec("ditfast", "ditfast", "compiled CUDA")) == "norm_modulate:compiled"
    assert runner.excluded_by(rules, blk, spec("ditfast", "ditfast", "compiled+triton | attn sdpa")) is not None
    assert runner.excluded_by(rules, blk, spec("eager", "peer", None)) is None  # peers never run ditfast kernels


def test_resume_keeps_the_measured_cases(tmp_path):
    """--resume (a fresh process after a lost context): complete cases are kept as they were, the culprit's
    case is measured again, and the earlier culprit is recorded."""
    first = runner.run(runner.Options(device="cpu", quick=True, backends=[], levels=("ops",), time_limit=0.0))
    done_key, lost_key = first["results"][0]["key"], first["results"][1]["key"]
    first["results"][0]["variants"] = [{"name": "marker", "status": "ok"}]
    first["results"][1]["variants"] = [{"name": "partial", "status": "error"}]
    first["meta"]["aborted"] = {"op": "x", "backend": "triton", "case": lost_key, "error": "illegal address"}
    opts = runner.Options(device="cpu", quick=True, backends=[], levels=("ops",), time_limit=0.0, resume=first)
    res = runner.run(opts)
    by = {c["key"]: c for c in res["results"]}
    assert by[done_key]["variants"] == [{"name": "marker", "status": "ok"}]
    assert by[lost_key]["variants"] == [] and "time limit" in by[lost_key]["notes"][0]  # measured again (here: cut)
    assert res["meta"]["aborted_runs"][0]["case"] == lost_key and "aborted" not in res["meta"]


def test_smoke_sticky_error_rerun(tmp_path, monkeypatch):
    """benchmarks/smoke.py: a (simulated) sticky error exits 3 with the culprit in the JSON; the rerun with
    --resume keeps the rows measured and skips the excluded culprit."""
    smoke = _script("smoke")
    path = tmp_path / "smoke.json"
    monkeypatch.setenv(smoke.INJECT_ENV, "gated_residual:triton")
    assert smoke.main(["--out", str(path), "--tiny", "--ops", "norm_modulate,gated_residual"]) == smoke.EXIT_CONTEXT_LOST
    res = json.loads(path.read_text())
    assert smoke.validate(res) == []
    assert res["aborted"]["op"] == "gated_residual" and res["aborted"]["backend"] == "triton"
    culprit = [r for r in res["rows"] if r["status"] == "error"]
    assert len(culprit) == 1 and "culprit" in culprit[0]["reason"]
    assert res["rows"][-1] is not None and res["rows"][-1]["status"] == "error"  # nothing ran after the culprit
    assert {r["shape"] for r in res["rows"]} == {next(iter(smoke.TINY))}  # not the second shape either
    monkeypatch.delenv(smoke.INJECT_ENV)
    smoke = _script("smoke")  # a fresh process
    assert smoke.main(["--out", str(path), "--tiny", "--ops", "norm_modulate,gated_residual", "--resume",
                       "--exclude", "gated_residual:triton"]) == 0
    res = json.loads(path.read_text())
    assert smoke.validate(res) == [] and "aborted" not in res
    assert res["aborted_runs"][0]["backend"] == "triton" and res["excluded"] == ["gated_residual:triton"]
    rows = {(r["shape"], r["op"], r["backend"]): r for r in res["rows"]}
    assert len(rows) == len(res["rows"])  # no row twice
    for shape in smoke.TINY:
        assert rows[(shape, "gated_residual", "triton")]["status"] == "skipped"
        assert "excluded" in rows[(shape, "gated_residual", "triton")]["reason"]
        assert rows[(shape, "gated_residual", "reference")]["status"] == "ok"
        assert rows[(shape, "norm_modulate", "triton")]["status"] == "ok"
    assert all(r["fwd"]["pct_peak"] is None for r in res["rows"] if r["status"] == "ok")  # CPU: no % of peak


def test_capped_tests_end_with_summary_and_xml_under_xdist(tmp_path):
    """benchmarks/run_tests.py under pytest-xdist: the cap is enforced in the workers (tests/conftest.py),
    so pytest ends normally -- XML and summary -- and a test running past the hard cap is failed, not lost."""
    pytest.importorskip("xdist")
    import subprocess
    import sys
    import time as _time
    import xml.etree.ElementTree as ET

    (tmp_path / "test_capdemo.py").write_text(
        "import time, pytest\n"
        "def test_a_long():\n    time.sleep(300)\n"
        "@pytest.mark.parametrize('i', range(30))\ndef test_short(i):\n    time.sleep(0.2)\n")
    xml = tmp_path / "t.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    t0 = _time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_tests.py"), "12", "--hard", "18", "-p", "conftest",
                           "-q", "-ra", "-p", "no:cacheprovider", "-n", "2", f"--junitxml={xml}", "--rootdir", str(tmp_path),
                           "-c", os.devnull, str(tmp_path / "test_capdemo.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    took = _time.monotonic() - t0
    assert xml.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert took < 120, took  # not the 300 s of the long test
    cases = ET.parse(xml).getroot().iter("testcase")
    status = {c.get("name"): ("failed" if c.find("failure") is not None or c.find("error") is not None
                              else "skipped" if c.find("skipped") is not None else "passed") for c in cases}
    assert len(status) == 31 and " in " in proc.stdout.splitlines()[-1]  # pytest's own summary line
    if status["test_a_long"] != "skipped":  # it started (the workers came up within the cap): the alarm failed it
        assert status["test_a_long"] == "failed" and "hard time cap" in xml.read_text()
    if any(v == "passed" for v in status.values()):
        assert status["test_a_long"] == "failed"
    assert "time cap reached" in xml.read_text() or all(v != "skipped" for k, v in status.items() if k != "test_a_long")


def test_run_tests_only_and_lost(tmp_path):
    """--only runs just the listed ids (the tests a dead CUDA context skipped); ``lost`` extracts them."""
    import subprocess
    import sys

    culprits = tmp_path / "c.jsonl"
    culprits.write_text('{"culprit": "t.py::test_x", "error": "illegal address"}\n{"lost": "t.py::test_b"}\n'
                        '{"lost": "t.py::test_b"}\nnot json\n')
    rt = _script("run_tests")
    assert rt.lost_tests(str(culprits)) == ([("t.py::test_x", "illegal address")], ["t.py::test_b"])
    (tmp_path / "test_few.py").write_text("def test_a():\n    pass\ndef test_b():\n    pass\ndef test_c():\n    assert 0\n")
    (tmp_path / "only.txt").write_text("test_few.py::test_b\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_tests.py"), "60", "--only", "only.txt", "-q",
                           "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(tmp_path), "test_few.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 passed, 2 deselected" in proc.stdout, proc.stdout[-1500:]


def _tier_folder(tmp_path, tiers):
    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)
    lines = ["tier\tname\tstatus\trc\tstart_s\tend_s\tnote"] + [f"{t}\tx\t{st}\t0\t0\t5\t" for t, st in tiers]
    (folder / "logs" / "tiers.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_digest_names_failures_and_the_rerun(tmp_path):
    outcome = _script("outcome")
    folder = _tier_folder(tmp_path, [(1, "ok"), (2, "ok"), (3, "failed"), (4, "ok")])
    report.write_json(gpu_results(), str(folder / "bench_ops.json"))
    (folder / "logs" / "excluded.txt").write_text("joint_attention:triton\n")
    text = outcome.digest(str(folder), {1, 2, 3, 4, 5, 6}, budget=430, elapsed=400, slices=[60, 100, 60, 90, 70, 40, 10])
    lines = text.splitlines()
    assert lines[0].startswith("DIGEST Test GPU 80GB") and "commit 0123456789ab" in lines[0]
    assert "tier 3 tests: FAILED" in text and "tier 5 blocks: NOT REACHED" in text and "tier 6 peers: NOT REACHED" in text
    assert "2 cases, ditfast measured in 2" in text
    rerun = lines[-1]
    assert rerun.startswith("RERUN") and "DITFAST_GPU_RUN_EXCLUDE=joint_attention:triton" in rerun
    assert "--tiers 1,3,5,6 --seconds 240" in rerun  # 60 + 70 + 40 + the end's 10, plus tier 1 (60) on a fresh machine
    assert len(text) < 4000  # the digest is what survives a truncated console
    ok = _tier_folder(tmp_path / "b", [(2, "ok")])
    assert outcome.digest(str(ok), {2}).splitlines()[-1] == "every selected tier passed: nothing to rerun"


def test_tree_hash_and_device_slug(tmp_path):
    outcome = _script("outcome")
    for rel in ("ditfast/a.py", "csrc/k.cu", "setup.py", "ditfast/__pycache__/a.pyc", "ditfast/_C.so", "benchmarks/results/x.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    h, rows = outcome.tree_hash(str(tmp_path))
    assert [r for r, _ in rows] == ["csrc/k.cu", "ditfast/a.py", "setup.py"]  # no caches, builds or results
    (tmp_path / "ditfast" / "_C.so").write_text("rebuilt")
    assert outcome.tree_hash(str(tmp_path))[0] == h
    (tmp_path / "csrc" / "k.cu").write_text("changed")
    assert outcome.tree_hash(str(tmp_path))[0] != h
    assert outcome.device_slug("NVIDIA H100 80GB HBM3") == "h100" and outcome.device_slug("NVIDIA H200") == "h200"
    assert outcome.device_slug("NVIDIA A100-SXM4-80GB") == "a100"


def test_file_run_under_the_device_it_reports(tmp_path):
    """outcome.py file: results go to results/<gpu slug>/ named by the run's own date and commit; a CPU
    smoke, a dirty or unknown commit are refused; a rerun folder's file wins over the first run's."""
    outcome = _script("outcome")
    run1, run2, results = tmp_path / "r1", tmp_path / "r2", tmp_path / "results"
    run1.mkdir()
    run2.mkdir()
    res = gpu_results()
    res["meta"]["device"]["name"] = "NVIDIA H100 80GB HBM3"
    report.write_json(res, str(run1 / "bench_ops.json"))
    (run1 / "summary.txt").write_text("first\n")
    (run2 / "summary.txt").write_text("rerun\n")
    assert outcome.file_run([str(run1), str(run2)], str(results)) == 0
    dest = results / "h100"
    assert sorted(p.name for p in dest.iterdir()) == ["bench_20300102T030405Z_0123456.json", "summary_20300102T030405Z_0123456.txt"]
    assert (dest / "summary_20300102T030405Z_0123456.txt").read_text() == "rerun\n"
    assert report.validate(report.load_json(str(dest / "bench_20300102T030405Z_0123456.json"))) == []
    res["meta"]["commit"] = "unknown"
    report.write_json(res, str(run1 / "bench_ops.json"))
    assert outcome.file_run([str(run1)], str(tmp_path / "other")) == 2
    res["meta"].update(commit="abc", mode="cpu-smoke")
    report.write_json(res, str(run1 / "bench_ops.json"))
    assert outcome.file_run([str(run1)], str(tmp_path / "other")) == 2 and not (tmp_path / "other").exists()


def _setup_functions():
    """setup.py's functions without running setup() (the text before its command-line part)."""
    text = (ROOT / "setup.py").read_text()
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "setup_under_test"}
    exec(compile(text.split('\nif __name__ == "__main__" and sys.argv')[0], "setup.py", "exec"), ns)
    return ns


def test_setup_finds_the_toolkit_behind_a_wrapper(tmp_path, monkeypatch):
    """A wrapper script as the first nvcc on PATH (its folder is no toolkit): the TOP= line of its dry run
    names the real one; an explicit CUDA_HOME that is no toolkit is refused with the reason."""
    ns = _setup_functions()
    real = tmp_path / "cuda-13.0"
    (real / "bin").mkdir(parents=True)
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime.h").write_text("")
    (real / "bin" / "nvcc").write_text(f"#!/bin/sh\necho '#$ _HERE_={real}/bin' >&2\necho '#$ TOP={real}/bin/..' >&2\n")
    (real / "bin" / "nvcc").chmod(0o755)
    wrap = tmp_path / "local" / "bin"
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrap}:/usr/bin:/bin")
    home, how, rejected = ns["resolve_cuda_home"]()
    assert home == str(real) and "TOP=" in how and rejected == []
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "local"))
    home, how, rejected = ns["resolve_cuda_home"]()
    assert home is None and "cuda_runtime.h" in rejected[0] and "$CUDA_HOME" in rejected[0]
    a = ns["source_hash"]("2.11.0")
    assert a == ns["source_hash"]("2.11.0") and a != ns["source_hash"]("2.14.1")
    monkeypatch.setenv("DITFAST_CUDA_ARCHS", "9.0")
    assert ns["source_hash"]("2.11.0") != a


def test_interpreter_workaround_lives_in_the_package():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off")
    from ditfast.kernels.triton import _interpreter

    assert _interpreter.STATUS is not None and not _interpreter.STATUS.startswith("failed"), _interpreter.STATUS
    assert _interpreter.apply() == _interpreter.STATUS  # once per process


def test_a_broken_diffusers_costs_only_its_own_rows(monkeypatch):
    """A diffusers that is present but fails to import leaves ditfast's FLUX block rows measured."""
    from ditfast.bench import variants as V

    monkeypatch.setattr(V, "installed", lambda m: True)
    monkeypatch.setattr(V, "diffusers_problem", lambda: "diffusers is installed but fails to import (ImportError: x)")
    case = C.block_cases(tiny=True, quick=False)[1]  # the FLUX double-stream block
    assert case.name == "DoubleStreamBlock"
    specs = {s.name: s for s in V.block_variants(case, _ctx())}
    assert specs["ditfast"].build is not None and specs["eager"].build is not None
    assert specs["diffusers"].build is None and "fails to import" in specs["diffusers"].reason


def test_unfused_prepare_is_labelled(monkeypatch):
    """Where the extension's prepare_attention runs the reference under autograd (the torch < 2.12 gate of
    ditfast/ops/cuda_impl.py in earlier checkouts), block fwd+bwd rows say so; without the gate, nothing."""
    from ditfast import _backend
    from ditfast.bench import variants as V
    from ditfast.ops import cuda_impl

    ext = [n for n in _backend.implemented("prepare_attention")
           if _backend.impl("prepare_attention", n).fn is getattr(cuda_impl, "prepare_attention", None)]
    if not ext:
        pytest.skip("no extension implementation of prepare_attention registered")
    monkeypatch.setattr(cuda_impl, "_OLD_LIST_AUTOGRAD", False, raising=False)
    assert V.unfused_prepare_note(torch.device("cpu"), torch.float32, 64) is None
    monkeypatch.setattr(cuda_impl, "_OLD_LIST_AUTOGRAD", True, raising=False)
    monkeypatch.setattr(_backend, "chosen_name", lambda op, device, like=None, features=(): ext[0])
    note = V.unfused_prepare_note(torch.device("cpu"), torch.float32, 64)
    assert note and "UNFUSED prepare_attention" in note
    case = C.block_cases(tiny=True, quick=False)[1]
    specs = {s.name: s for s in V.block_variants(case, _ctx())}
    assert any("UNFUSED" in n for n in specs["ditfast"].build().notes)
    assert not specs["eager"].build().notes  # the reference block runs no extension
