"""Backend selection: use_backend, DITFAST_BACKEND, automatic choice, explanations."""
import os
import subprocess
import sys

import pytest
import torch

import ditfast
from ditfast import _backend


def test_use_backend_nests_and_restores():
    assert _backend.requested_backend() == _backend._ENV_BACKEND
    with ditfast.use_backend("reference"):
        assert _backend.requested_backend() == "reference"
        with ditfast.use_backend("auto"):
            assert _backend.requested_backend() is None
        assert _backend.requested_backend() == "reference"
    assert _backend.requested_backend() == _backend._ENV_BACKEND


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown ditfast backend 'tritonn'"):
        with ditfast.use_backend("tritonn"):
            pass


def test_reference_backend_runs_the_reference():
    x, shift, scale = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)
    with ditfast.use_backend("reference"):
        out = ditfast.ops.norm_modulate(x, shift, scale)
    assert torch.equal(out, ditfast.reference.norm_modulate(x, shift, scale))


def test_unavailable_backend_explains(monkeypatch):
    monkeypatch.setitem(_backend._AVAILABILITY, ("cuda", "cpu"), (False, "ditfast._C is not built"))
    monkeypatch.setitem(_backend._IMPLS["norm_modulate"], "cuda", lambda *a, **k: None)
    x = torch.randn(1, 2, 4)
    with ditfast.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run norm_modulate on cpu: ditfast._C is not built"):
        ditfast.ops.norm_modulate(x, None, torch.zeros(1, 4))


def test_backend_without_the_op_explains(monkeypatch):
    monkeypatch.setitem(_backend._IMPLS, "fake_op", {"reference": lambda: None})
    with ditfast.use_backend("triton"), pytest.raises(RuntimeError, match="has no implementation of fake_op"):
        _backend.select("fake_op", torch.device("cpu"))


def test_automatic_choice_prefers_order(monkeypatch):
    calls = []
    monkeypatch.setitem(_backend._IMPLS, "fake_op", {"reference": lambda: calls.append("reference"),
                                                    "cuda": lambda: calls.append("cuda")})
    monkeypatch.setattr(_backend, "_STACK", [])
    monkeypatch.setattr(_backend, "_ENV_BACKEND", None)
    monkeypatch.setitem(_backend._AVAILABILITY, ("cuda", "cpu"), (True, "faked"))
    _backend.select("fake_op", torch.device("cpu"))()
    monkeypatch.setitem(_backend._AVAILABILITY, ("cuda", "cpu"), (False, "faked"))
    _backend.select("fake_op", torch.device("cpu"))()
    assert calls == ["cuda", "reference"]


def test_measured_table_steers_the_automatic_choice_on_cuda(monkeypatch):
    """On CUDA tensors the chooser (the measured table) is asked first, keyed by the main input's dtype
    and row width; no entry, a backend without the op or an unavailable one falls back to AUTO_ORDER;
    an explicitly requested backend wins; CPU tensors never consult it."""
    asked = []

    def chooser(op, device, dtype, width):
        asked.append((op, device.type, dtype, width))
        return {1152: "cuda", 64: "cuda"}.get(width)

    monkeypatch.setattr(_backend, "_STACK", [])
    monkeypatch.setattr(_backend, "_ENV_BACKEND", None)
    monkeypatch.setattr(_backend, "_CHOOSER", chooser)
    for backend in ("triton", "cuda", "reference"):
        monkeypatch.setitem(_backend._AVAILABILITY, (backend, "cuda"), (True, "faked"))
    monkeypatch.setitem(_backend._AVAILABILITY, ("cuda", "cpu"), (True, "faked"))
    cuda = torch.device("cuda", 0)
    x = torch.empty(2, 3, 1152, dtype=torch.bfloat16, device="meta")
    assert _backend.chosen_name("norm_modulate", cuda, x) == "cuda"
    assert asked == [("norm_modulate", "cuda", torch.bfloat16, 1152)]
    assert _backend.chosen_name("norm_modulate", cuda, x[..., :1000]) == "triton"  # no entry: AUTO_ORDER
    assert _backend.chosen_name("norm_modulate", cuda) == "triton"  # no input given: AUTO_ORDER
    assert _backend.chosen_name("gated_residual", cuda, x) == "triton"  # the table's pick lacks the op
    monkeypatch.setitem(_backend._AVAILABILITY, ("cuda", "cuda"), (False, "faked"))
    assert _backend.chosen_name("norm_modulate", cuda, x) == "triton"  # the table's pick cannot run
    with ditfast.use_backend("reference"):
        assert _backend.chosen_name("norm_modulate", cuda, x) == "reference"
    asked.clear()
    assert _backend.chosen_name("norm_modulate", torch.device("cpu"), x) == "cuda"  # AUTO_ORDER on CPU
    assert asked == []


def test_the_ops_pass_their_input_to_the_chooser(monkeypatch):
    """Each op with a "cuda" implementation hands its main input to the automatic choice, and the
    installed chooser is cuda_impl's measured table."""
    from ditfast.ops import cuda_impl

    assert _backend._CHOOSER is cuda_impl.table_choice
    seen = []
    real = _backend.chosen_name

    def spy(op, device, like=None):
        seen.append((op, None if like is None else tuple(like.shape)))
        return real(op, device, like)

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
