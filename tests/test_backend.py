"""Backend selection: use_backend, DITFAST_BACKEND, automatic choice, explanations."""
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import ditfast
from ditfast import _backend


def test_use_backend_nests_and_restores():
    base = _backend.requested_backend()
    assert base == _backend._ENV_BACKEND
    with ditfast.use_backend("reference"):
        assert _backend.requested_backend() == "reference"
        with ditfast.use_backend("auto"):
            assert _backend.requested_backend() is None
        assert _backend.requested_backend() == "reference"
    assert _backend.requested_backend() == base


def test_use_backend_is_per_thread():
    """A ContextVar: a use_backend block in one thread does not leak into another."""
    seen = {}

    def other():
        seen["other"] = _backend.requested_backend()

    with ditfast.use_backend("reference"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        seen["here"] = _backend.requested_backend()
    assert seen == {"other": _backend._ENV_BACKEND, "here": "reference"}


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown ditfast backend 'tritonn'"):
        with ditfast.use_backend("tritonn"):
            pass


def test_reference_backend_runs_the_reference():
    x, shift, scale = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)
    with ditfast.use_backend("reference"):
        out = ditfast.ops.norm_modulate(x, shift, scale)
    assert torch.equal(out, ditfast.reference.norm_modulate(x, shift, scale))


@pytest.fixture
def fresh(monkeypatch):
    """Private probe results and choice cache, no measured table, no environment request."""
    monkeypatch.setattr(_backend, "_PROBED", {})
    monkeypatch.setattr(_backend, "_CACHE", {})
    monkeypatch.setattr(_backend, "_WARNED", set())
    monkeypatch.setattr(_backend, "_CHOOSER", None)
    monkeypatch.setattr(_backend, "_ENV_BACKEND", None)


def _fake_probe(monkeypatch, op, name, ok):
    monkeypatch.setattr(_backend.impl(op, name), "probe", lambda device_type: (ok, "faked"))
    _backend._PROBED.clear()
    _backend._CACHE.clear()


def test_unavailable_backend_explains(fresh, monkeypatch):
    monkeypatch.setattr(_backend.impl("norm_modulate", "cuda"), "probe", lambda d: (False, "ditfast._C is not built"))
    x = torch.randn(1, 2, 4)
    with ditfast.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run norm_modulate on float32 .*ditfast._C is not built"):
        ditfast.ops.norm_modulate(x, None, torch.zeros(1, 4))


def test_backend_without_the_op_falls_back_with_a_warning_or_raises_when_strict(fresh):
    """A whole model runs under use_backend("cuda"): gated_residual has no CUDA kernel, so it takes its
    automatic choice (warned once); strict=True raises instead."""
    x, g = torch.randn(2, 3, 8), torch.randn(2, 8)
    with ditfast.use_backend("cuda"), pytest.warns(RuntimeWarning, match="'compiled' .* has no implementation of gated_residual"):
        out = ditfast.ops.gated_residual(x, x, g)
    torch.testing.assert_close(out, ditfast.reference.gated_residual(x, x, g))
    with ditfast.use_backend("cuda", strict=True), pytest.raises(RuntimeError, match="has no implementation of gated_residual"):
        ditfast.ops.gated_residual(x, x, g)


def test_a_model_runs_under_every_family_request(fresh):
    """Every op of a DiT block under use_backend(family): nothing raises for an op the family lacks."""
    from ditfast.nn import DiTBlock

    blk = DiTBlock(16, 2)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    want = blk(x, c)
    for family in ("reference", "cuda"):
        with ditfast.use_backend(family), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            torch.testing.assert_close(blk(x, c), want, atol=1e-5, rtol=1e-5)


def test_width_limits_steer_the_choice(fresh, monkeypatch):
    """An implementation's max_width: the automatic choice skips it for wider rows; asked for by
    name it raises, naming the width."""
    _fake_probe(monkeypatch, "rms_norm", "triton", True)
    spec = _backend.Spec("cuda", torch.bfloat16, 65537, (9, 0), 0)
    assert _backend.resolve_name("rms_norm", _backend.Request(None), spec) == "reference"
    with pytest.raises(RuntimeError, match="width 65537 > 65536"):
        _backend.resolve_name("rms_norm", _backend.Request("triton"), spec)
    assert _backend.resolve_name("rms_norm", _backend.Request(None), spec._replace(width=65536)) == "triton"


def test_automatic_choice_prefers_order(fresh, monkeypatch):
    _fake_probe(monkeypatch, "norm_modulate", "compiled", True)
    assert _backend.chosen_name("norm_modulate", torch.device("cpu")) == "compiled"
    assert _backend.label("norm_modulate", "compiled", "cpu") == "compiled C++ CPU"
    assert _backend.label("norm_modulate", "compiled", "cuda") == "compiled CUDA"
    _fake_probe(monkeypatch, "norm_modulate", "cuda", False)  # the alias names the same implementation
    assert _backend.chosen_name("norm_modulate", torch.device("cpu")) == "reference"


def test_choice_is_cached_per_op_request_and_spec(fresh, monkeypatch):
    calls = []
    real = _backend._resolve
    monkeypatch.setattr(_backend, "_resolve", lambda *a: calls.append(a[0]) or real(*a))
    x = torch.randn(2, 3, 8)
    for _ in range(3):
        ditfast.ops.norm_modulate(x, None, x[:, 0])
    assert calls == ["norm_modulate"]
    ditfast.ops.norm_modulate(x[..., :4], None, x[:, 0, :4])  # another width: resolved once more
    assert calls == ["norm_modulate", "norm_modulate"]


def test_measured_table_steers_the_automatic_choice_on_cuda(fresh, monkeypatch):
    """The chooser (the measured table) is asked first, on every device type, keyed by the main
    input's dtype and row width; no entry, a backend without the op or an unavailable one falls back
    to the priority order; an explicitly requested backend wins. The table may name a family by its
    alias ("cuda")."""
    asked = []

    def chooser(op, device, dtype, width):
        asked.append((op, device.type, dtype, width))
        return {1152: "cuda", 64: "cuda"}.get(width)

    monkeypatch.setattr(_backend, "_CHOOSER", chooser)
    for op in ("norm_modulate", "gated_residual"):
        for name in _backend.implemented(op):
            _fake_probe(monkeypatch, op, name, True)

    def spec(width, dtype=torch.bfloat16):
        return _backend.Spec("cuda", dtype, width, (9, 0), 0)

    def auto(op, s):
        return _backend.resolve_name(op, _backend.current_request(op), s)

    assert auto("norm_modulate", spec(1152)) == "compiled"
    assert asked == [("norm_modulate", "cuda", torch.bfloat16, 1152)]
    assert auto("norm_modulate", spec(1000)) == "triton"  # no entry: the priority order
    assert auto("gated_residual", spec(1152)) == "triton"  # the table's pick lacks the op
    _fake_probe(monkeypatch, "norm_modulate", "cuda", False)
    assert auto("norm_modulate", spec(1152)) == "triton"  # the table's pick cannot run
    with ditfast.use_backend("reference"):
        assert auto("norm_modulate", spec(1152)) == "reference"
    asked.clear()
    _fake_probe(monkeypatch, "norm_modulate", "cuda", True)
    assert auto("norm_modulate", _backend.Spec("cpu", torch.float32, 1000)) == "compiled"  # priority on CPU
    assert asked == [("norm_modulate", "cpu", torch.float32, 1000)]
    monkeypatch.setattr(_backend, "_CACHE", {})
    _fake_probe(monkeypatch, "norm_modulate", "reference", True)
    monkeypatch.setattr(_backend, "_CHOOSER", lambda op, device, dtype, width: "reference")
    assert auto("norm_modulate", _backend.Spec("cpu", torch.float32, 1000)) == "reference"  # a CPU entry wins


def test_the_ops_pass_their_input_to_the_chooser(monkeypatch):
    """Each op with a "cuda" implementation hands its main input to the automatic choice, and the
    installed chooser is cuda_impl's measured table."""
    from ditfast.ops import cuda_impl

    assert _backend._CHOOSER is cuda_impl.table_choice
    seen = []
    real = _backend.chosen_name

    def spy(op, device, like=None, features=()):
        seen.append((op, None if like is None else tuple(like.shape)))
        return real(op, device, like, features)

    monkeypatch.setattr(_backend, "chosen_name", spy)
    x, m = torch.randn(2, 3, 8), torch.randn(2, 8)
    q = torch.randn(2, 3, 2, 8)
    tables = torch.ones(3, 4), torch.zeros(3, 4)
    with ditfast.use_backend("reference"):
        ditfast.ops.norm_modulate(x, m, m)
        ditfast.ops.gated_residual_norm_modulate(x, x, m, m, m)
        ditfast.ops.apply_rope(q, *tables)
        ditfast.ops.qk_norm_rope(q, q, torch.ones(8), torch.ones(8), *tables)
    assert seen == [("norm_modulate", (2, 3, 8)), ("gated_residual_norm_modulate", (2, 3, 8)),
                    ("apply_rope", (2, 3, 2, 8)), ("qk_norm_rope", (2, 3, 2, 8))]


def test_env_var_is_read_at_import():
    code = "import ditfast; from ditfast import _backend; print(_backend.requested_backend())"
    env = dict(os.environ, DITFAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["DITFAST_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown ditfast backend 'bogus'" in bad.stderr


def test_import_does_not_import_triton_or_touch_cuda():
    code = ("import sys, ditfast, ditfast.nn; import torch; "
            "print('triton' in sys.modules, torch.cuda.is_initialized(), 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_compiled_code_follows_use_backend():
    """torch.compile traces read the request through a global Dynamo guards on: a compiled function
    entered under another use_backend block is traced again and runs that backend's ops."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda x, m: ditfast.ops.gated_residual_norm_modulate(x, x, m, m, m)[1], fullgraph=True,
                      backend=backend)
    x, m = torch.randn(2, 3, 8), torch.randn(2, 8)
    with ditfast.use_backend("reference"):
        want = f(x, m)
    with ditfast.use_backend("cuda", strict=True):
        if not _backend.availability("cuda", "cpu")[0]:
            pytest.skip("ditfast._C is not built")
        got = f(x, m)
    torch._dynamo.reset()
    assert len(graphs) == 2
    assert not any("ditfast" in t for t in graphs[0]), graphs[0]
    assert any("ditfast" in t for t in graphs[1]), graphs[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_is_an_alias_of_compiled(fresh):
    """The compiled family was called "cuda": that name keeps working wherever a family is named."""
    with ditfast.use_backend("cuda"):
        assert _backend.requested_backend() == "compiled"
    assert _backend.impl("norm_modulate", "cuda") is _backend.impl("norm_modulate", "compiled")
    assert _backend.availability("cuda", "cpu") == _backend.availability("compiled", "cpu")
    assert _backend.check_name("cuda") == "compiled" and "cuda" in _backend.BACKENDS
    env = dict(os.environ, DITFAST_BACKEND="cuda")
    code = "import ditfast; from ditfast import _backend; print(_backend.requested_backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "compiled"


@pytest.mark.parametrize("request_name", [None, "reference", "compiled", pytest.param("cuda", id="alias"), "triton"])
def test_introspection_reports_what_runs_for_the_elementwise_ops(fresh, monkeypatch, request_name):
    """chosen_name, select and ditfast.info's choice name the implementation norm_modulate runs
    (a spy on every implementation), under no request and each family request; info labels the
    extension's kernels by device, never "cuda" for CPU kernels."""
    from ditfast import info

    if request_name == "triton" and not _backend.availability("triton", "cpu")[0]:
        pytest.skip("no Triton interpreter here")
    calls = []
    for name in _backend.implemented("norm_modulate"):
        fn = _backend.impl("norm_modulate", name).fn
        monkeypatch.setattr(_backend.impl("norm_modulate", name), "fn",
                            lambda *a, name=name, fn=fn, **k: calls.append(name) or fn(*a, **k))
    x, m = torch.randn(2, 3, 128), torch.randn(2, 128)
    with ditfast.use_backend(request_name):
        said = _backend.chosen_name("norm_modulate", x.device, x)
        ditfast.ops.norm_modulate(x, m, m)
        assert calls == [said]
        assert info._choice("norm_modulate", _backend.Spec("cpu", torch.float32, 128)) == _backend.label(
            "norm_modulate", said, "cpu")
        report = info.report()
    cpu_ops = report.split("ops on cpu", 1)[1].split("joint_attention implementations", 1)[0]
    for line in cpu_ops.splitlines()[1:]:
        choice = line.split("->", 1)[1].split("[", 1)[0]
        assert "cuda" not in choice, line
    if said == "compiled":
        assert "-> compiled C++ CPU / compiled C++ CPU" in report
