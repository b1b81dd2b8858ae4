"""Attention dispatch through the one registry (ditfast/_backend.py): the implementations'
declarations, the automatic choice per GPU generation / dtype / head dim, the lse feature, requests
(backend=, ditfast.use_backend, environment variables) and the messages when a request cannot run.
Implementations are faked present or absent, and GPUs described by a Spec, so all of it runs without a
GPU or any attention library installed. Numerics are in test_attention.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ditfast
from ditfast import _backend, ops, reference
from ditfast._backend import Spec
from ditfast.ops import attention as attn
from ditfast.ops import attention_backends as backends

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
HOPPER, BLACKWELL, AMPERE, ADA, TURING = (9, 0), (10, 0), (8, 0), (8, 9), (7, 5)
OP = backends.OP


def impl(name):
    return _backend.impl(OP, name)


@pytest.fixture
def fake(monkeypatch):
    """fake(present) makes exactly the implementations in ``present`` installed (on every device they list)."""
    monkeypatch.setattr(_backend, "_PROBED", {})
    monkeypatch.setattr(_backend, "_CACHE", {})
    monkeypatch.setattr(_backend, "_CHOOSER", None)
    monkeypatch.setitem(_backend._ENV_REQUEST, OP, None)
    monkeypatch.setattr(_backend, "_ENV_BACKEND", None)

    def set_present(present):
        for name in backends.NAMES:
            ok = name in present
            monkeypatch.setattr(impl(name), "probe", lambda device_type, ok=ok: (ok, "faked present" if ok else "faked absent"))
        _backend._PROBED.clear()
        _backend._CACHE.clear()

    set_present(set(backends.NAMES))
    return set_present


def cuda(cap, dtype=BF16, head_dim=128, features=()):
    return Spec("cuda", dtype, head_dim, cap, 0, tuple(features))


def auto(spec):
    return _backend.resolve_name(OP, _backend.Request(None), spec)


def resolve(backend, spec):
    return _backend.resolve_name(OP, _backend.current_request(OP, backend), spec)


ALL = set(backends.NAMES)


# ------------------------------------------------------------------------------------------------
# Automatic choice
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, absent, expected",
    [
        (cuda(HOPPER), (), "flash_attn3"),
        (cuda(HOPPER), ("flash_attn3",), "sdpa_cudnn"),
        (cuda(HOPPER), ("flash_attn3", "sdpa_cudnn"), "flash_attn4"),
        (cuda(HOPPER), ("flash_attn3", "sdpa_cudnn", "flash_attn4"), "triton"),
        (cuda(HOPPER), ("flash_attn3", "sdpa_cudnn", "flash_attn4", "triton"), "flash_attn2"),
        (cuda(HOPPER, F16, 256), ("flash_attn3",), "triton"),  # cuDNN and FA4 stop at 128
        (cuda(HOPPER, BF16, 72), ("flash_attn3", "sdpa_cudnn", "flash_attn4", "flash_attn2"), "sdpa_flash"),  # Triton pads 72
        (cuda(HOPPER, BF16, 72), ("flash_attn3", "sdpa_cudnn", "flash_attn4", "flash_attn2", "sdpa_flash"), "triton"),
        (cuda(BLACKWELL), (), "flash_attn4"),
        (cuda(BLACKWELL), ("flash_attn4",), "sdpa_cudnn"),
        (cuda(AMPERE), (), "flash_attn2"),  # FA3 / FA4 need Hopper
        (cuda(ADA, F16, 64), ("flash_attn2",), "sdpa_flash"),
        (cuda(AMPERE), ("flash_attn2", "sdpa_flash"), "triton"),
        (cuda(HOPPER, F32, 64), (), "sdpa_efficient"),  # no fp32 in the flash kernels
        (cuda(HOPPER, F32, 64), ("sdpa_efficient",), "triton"),
        (cuda(TURING, F16, 64), (), "sdpa_efficient"),  # flash, cuDNN and Triton need sm80
        (cuda(HOPPER, F16, 300), (), "sdpa_math"),  # 300 > 256 and not a multiple of 8
        (cuda(HOPPER), ALL - {"reference"}, "reference"),
        (Spec("cpu", BF16, 72), (), "sdpa_cpu"),  # SDPA's CPU flash kernel: the fastest forward measured
        (Spec("cpu", F16, 72), ("sdpa_cpu",), "reference"),
        (Spec("cpu", F32, 72), ("sdpa_cpu", "reference"), "sdpa_math"),
    ],
)
def test_automatic_choice(fake, spec, absent, expected):
    fake(ALL - set(absent))
    assert auto(spec) == expected
    assert resolve(None, spec) == expected


def test_every_priority_list_holds_the_reference():
    """The reference runs everything, so the automatic choice never fails (on CUDA it comes last;
    on CPU after SDPA's CPU flash kernel)."""
    for cap in (None, TURING, AMPERE, ADA, HOPPER, BLACKWELL, (12, 0)):
        for dtype in (F32, BF16, F16):
            for dh in (40, 64, 72, 128, 256):
                order = _backend.priority(OP, Spec("cuda" if cap else "cpu", dtype, dh, cap))
                assert order[-1 if cap else 1] == "reference" and len(set(order)) == len(order), order
                assert set(order) <= set(backends.NAMES)


def test_choose_backend_on_real_tensors():
    q = torch.randn(2, 5, 2, 40)
    assert backends.choose_backend(q, q, q) == "sdpa_cpu"  # CPU
    assert ops.joint_attention(q, q, q).shape == q.shape


# ------------------------------------------------------------------------------------------------
# Descriptors
# ------------------------------------------------------------------------------------------------
def test_descriptor_reasons(fake):
    fake(ALL - {"flash_attn3"})
    fa3 = impl("flash_attn3")
    why = fa3.reasons(cuda(AMPERE, F32, 300))
    assert any("faked absent" in w for w in why)
    assert any("takes float16/bfloat16, not float32" in w for w in why)
    assert any("width 300 > 256" in w for w in why)
    assert any("not a multiple of 8" in w for w in why)
    assert any("needs compute capability >= 9.0, the GPU has 8.0" in w for w in why)
    assert "needs compute capability <= 9.0, the GPU has 10.0" in " ".join(fa3.reasons(cuda(BLACKWELL)))
    assert impl("reference").reasons(cuda(TURING, F32, 300)) == []
    q = torch.randn(1, 3, 1, 64)
    assert "runs on cuda tensors only, not cpu" in impl("flash_attn2").not_supported_reasons(q)
    assert impl("sdpa_math").not_supported_reasons(q) == []


def test_real_probes_find_no_flash_attention_here():
    # this machine has no flash-attn packages: the probes say so, without raising
    for name in ("flash_attn2", "flash_attn3", "flash_attn4"):
        ok, why = impl(name).probe("cuda")
        if not ok:
            assert "not installed" in why or "not flash-attention 2" in why or "no flash_attn_func" in why


def test_a_broken_install_is_reported_not_raised(fake, monkeypatch):
    def broken(device_type):
        raise OSError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(impl("flash_attn2"), "probe", broken)
    ok, why = impl("flash_attn2").availability("cuda")
    assert not ok and "probing it failed: OSError: libcudart" in why
    assert auto(cuda(AMPERE)) == "sdpa_flash"


def test_backend_report(fake):
    fake(ALL - {"flash_attn4"})
    rows = backends.backend_report("cuda")
    assert [r[0] for r in rows] == list(backends.NAMES)
    table = {name: (ok, why) for name, ok, why in rows}
    assert table["flash_attn4"][0] is False and "faked absent" in table["flash_attn4"][1]
    assert table["sdpa_flash"][0] is True
    cpu = {name: (ok, why) for name, ok, why in backends.backend_report("cpu")}
    assert cpu["flash_attn2"] == (False, cpu["flash_attn2"][1]) and "cuda tensors only" in cpu["flash_attn2"][1]
    assert cpu["reference"][0] and cpu["sdpa_math"][0]
    assert attn.backend_report is backends.backend_report and attn.choose_backend is backends.choose_backend


# ------------------------------------------------------------------------------------------------
# Requests and their error messages
# ------------------------------------------------------------------------------------------------
def test_impossible_request_says_why_and_how_to_fix(fake):
    """One paragraph: why the requested implementation cannot run, what can, and how to get it (no table)."""
    fake(ALL - {"flash_attn3", "flash_attn4"})
    spec = cuda(AMPERE, F32, 72)
    with pytest.raises(RuntimeError) as info:
        resolve("flash_attn3", spec)
    msg = str(info.value)
    assert "ditfast backend 'flash_attn3' (asked for by the backend= argument) cannot run joint_attention on float32" in msg
    for reason in impl("flash_attn3").reasons(spec):
        assert reason in msg, (reason, msg)
    usable = [n for n in backends.NAMES if not impl(n).reasons(spec)]
    assert usable and f"Usable for these inputs: {', '.join(n for n in _backend.implemented('joint_attention') if n in usable)}" in msg
    assert "drop the request to get the automatic choice (sdpa_efficient)" in msg
    assert "python -m ditfast.info" in msg and "\n" not in msg, msg


def test_impossible_request_on_real_tensors():
    q = torch.randn(2, 5, 2, 40)
    with pytest.raises(RuntimeError, match="'sdpa_cudnn'.*sdpa_cudnn: runs on cuda tensors only, not cpu.*Usable for "
                                           "these inputs: .*reference"):
        ops.joint_attention(q, q, q, backend="sdpa_cudnn")


def test_unknown_names_are_rejected(fake, monkeypatch):
    q = torch.randn(1, 3, 1, 32)
    with pytest.raises(ValueError, match="unknown ditfast backend 'fa3' \\(the backend= argument\\)"):
        ops.joint_attention(q, q, q, backend="fa3")
    monkeypatch.setitem(_backend._ENV_REQUEST, OP, "flash")
    with pytest.raises(ValueError, match="unknown ditfast backend 'flash' \\(DITFAST_ATTENTION_BACKEND\\)"):
        ops.joint_attention(q, q, q)


def test_request_precedence(fake, monkeypatch):
    spec = cuda(HOPPER)
    assert resolve(None, spec) == "flash_attn3"
    monkeypatch.setattr(_backend, "_ENV_BACKEND", "triton")  # DITFAST_BACKEND
    assert resolve(None, spec) == "triton"
    monkeypatch.setitem(_backend._ENV_REQUEST, OP, "sdpa_flash")  # DITFAST_ATTENTION_BACKEND beats it
    assert resolve(None, spec) == "sdpa_flash"
    with ditfast.use_backend("reference"):  # a use_backend block beats both
        assert resolve(None, spec) == "reference"
        assert resolve("sdpa_cudnn", spec) == "sdpa_cudnn"  # backend= beats everything
        with ditfast.use_backend(None):  # an explicit automatic block
            assert resolve(None, spec) == "flash_attn3"
    with ditfast.use_backend("cuda"):  # the CUDA family: the compiled libraries, in priority order
        assert resolve(None, spec) == "flash_attn3"
        assert resolve(None, cuda(HOPPER, F32, 64)) == "sdpa_efficient"
    monkeypatch.setitem(_backend._ENV_REQUEST, OP, "auto")
    assert resolve(None, spec) == "flash_attn3"


def test_cuda_generic_request_never_picks_triton(fake):
    fake(ALL - {"flash_attn3", "sdpa_cudnn", "flash_attn4"})
    with ditfast.use_backend("cuda"):
        assert resolve(None, cuda(HOPPER)) == "flash_attn2"
    assert resolve(None, cuda(HOPPER)) == "triton"


# ------------------------------------------------------------------------------------------------
# The lse feature, fallbacks and strict requests
# ------------------------------------------------------------------------------------------------
def test_lse_requests_skip_implementations_without_it(fake):
    spec = cuda(HOPPER, BF16, 128, ("lse",))
    assert auto(spec) == "flash_attn3"
    fake(ALL - {"flash_attn3", "flash_attn4"})
    assert auto(cuda(HOPPER)) == "sdpa_cudnn"
    assert auto(spec) == "triton"  # cuDNN's lse is not exposed: skipped when lse is asked for
    assert "cannot return lse" in " ".join(impl("sdpa_cudnn").reasons(spec))
    assert auto(Spec("cpu", F32, 64, None, -1, ("lse",))) == "sdpa_cpu"  # through its aten op
    fake(ALL - {"sdpa_cpu"})
    assert auto(Spec("cpu", F32, 64, None, -1, ("lse",))) == "reference"  # sdpa_math has no lse


def test_use_backend_routes_joint_attention(monkeypatch):
    calls = []
    for name in ("reference", "sdpa_math"):
        fn = impl(name).fn
        monkeypatch.setattr(impl(name), "fn", lambda *a, name=name, fn=fn, **k: calls.append(name) or fn(*a, **k))
    q = torch.randn(1, 3, 2, 32)
    with ditfast.use_backend("reference"):
        ops.joint_attention(q, q, q)
    with ditfast.use_backend("sdpa_math"):
        ops.joint_attention(q, q, q)
    ops.joint_attention(q, q, q, backend="sdpa_math")
    assert calls == ["reference", "sdpa_math", "sdpa_math"]


def test_family_without_the_op_on_this_device_falls_back_with_one_warning(fake, monkeypatch):
    """use_backend("compiled") on CPU tensors where no compiled attention runs on CPU (SDPA's CPU
    kernel declared CUDA-only here): attention takes its automatic choice (warned once, naming what
    runs and which families implement the op on CPU), while the modulate ops run the extension's
    CPU kernels."""
    fake(ALL - {"sdpa_cpu"})
    monkeypatch.setattr(impl("sdpa_cpu"), "devices", ("cuda",))
    monkeypatch.setattr(_backend, "_WARNED", set())
    q = torch.randn(1, 3, 2, 32)
    with ditfast.use_backend("compiled"), pytest.warns(RuntimeWarning) as record:
        out = ops.joint_attention(q, q, q)
    msg = str(record[0].message)
    assert "ditfast backend 'compiled'" in msg and "usable" not in msg
    assert ("on cpu tensors joint_attention is implemented by the reference family (sdpa_math, reference) and "
            "the triton family (triton)") in msg
    assert "running the automatic choice (reference) instead" in msg
    torch.testing.assert_close(out, reference.joint_attention(q, q, q))
    _backend._CACHE.clear()
    import warnings
    with ditfast.use_backend("cuda"), warnings.catch_warnings():  # the alias: the same request, warned once
        warnings.simplefilter("error")
        ops.joint_attention(q, q, q)
    with ditfast.use_backend("compiled", strict=True), pytest.raises(RuntimeError, match="no implementation of joint_attention"):
        ops.joint_attention(q, q, q)


def test_compiled_family_on_cpu_is_sdpas_cpu_kernel(monkeypatch):
    """With every package present, use_backend("compiled") / its alias "cuda" on CPU tensors runs
    SDPA's CPU flash kernel, the compiled family's member there."""
    q = torch.randn(1, 3, 2, 32)
    for name in ("compiled", "cuda"):
        with ditfast.use_backend(name):
            assert ops.choose_backend(q, q, q) == "sdpa_cpu"


def test_registered_in_the_one_registry():
    assert set(_backend.implemented("joint_attention")) == set(backends.NAMES) >= {"reference", "triton", "sdpa_math"}
    assert set(_backend.families("joint_attention")) == {"reference", "triton", "compiled"}


# ------------------------------------------------------------------------------------------------
# Optional packages
# ------------------------------------------------------------------------------------------------
def test_import_and_run_without_triton_or_flash_attention():
    code = r"""
import sys
for name in ("triton", "flash_attn", "flash_attn_interface"):
    sys.modules[name] = None  # import raises ImportError, find_spec says "not installed"
import torch, ditfast
from ditfast.ops import attention_backends as b
q = torch.randn(1, 4, 2, 16)
assert ditfast.ops.joint_attention(q, q, q).shape == q.shape
report = {name: (ok, why) for name, ok, why in b.backend_report("cuda")}
assert not report["triton"][0] and "triton package is not installed" in report["triton"][1], report["triton"]
assert not report["flash_attn2"][0] and "not installed" in report["flash_attn2"][1], report["flash_attn2"]
assert sys.modules["triton"] is None
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_float64_runs_on_attention_backends_asked_for_by_name():
    """fp64 (the truth for fp32 checks) runs where the attention backend is named: backend="reference"
    or "sdpa_math"; the automatic choice rejects it, naming the dtype."""
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = reference.joint_attention(q, k, v)
    for name in ("reference", "sdpa_math"):
        got = ops.joint_attention(q, k, v, backend=name)
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-12), name
    with pytest.raises(TypeError, match="q is float64"):
        ops.joint_attention(q, k, v)


# ------------------------------------------------------------------------------------------------
# Introspection reports what the next call runs (issue 27.3): each function against a spy
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    """Every attention implementation's callable wrapped to record its name when it runs."""
    calls = []
    for name in backends.NAMES:
        fn = impl(name).fn
        monkeypatch.setattr(impl(name), "fn", lambda *a, name=name, fn=fn, **k: calls.append(name) or fn(*a, **k))
    monkeypatch.setattr(_backend, "_CACHE", {})
    monkeypatch.setitem(_backend._ENV_REQUEST, OP, None)
    monkeypatch.setattr(_backend, "_ENV_BACKEND", None)
    return calls


def _ran(calls, q, k, v, **kw):
    calls.clear()
    ops.joint_attention(q, k, v, **kw)
    assert len(calls) == 1, calls
    return calls[0]


def _explained(q, k, v, **kw):
    last = backends.explain_choice(q, k, v, **kw).splitlines()[-1]
    return last.rsplit(" ", 1)[-1]  # "... -> automatic choice X" or "... -> runs X"


REQUESTS = [  # (how the request is made, its argument)
    ("auto", None), ("use_backend", "sdpa_math"), ("use_backend", "reference"), ("use_backend", "compiled"),
    ("use_backend", "cuda"), ("use_backend", "triton"), ("env_attention", "sdpa_math"), ("env_attention", "reference"),
    ("env_backend", "reference"), ("argument", "sdpa_math"), ("argument", "auto"),
]


@pytest.mark.parametrize("how, name", REQUESTS, ids=lambda x: str(x).replace("cuda", "alias"))
@pytest.mark.parametrize("return_lse", [False, True], ids=["o", "lse"])
def test_introspection_reports_what_runs(spy, monkeypatch, how, name, return_lse):
    """ops.choose_backend, ops.explain_choice, _backend.chosen_name and python -m ditfast.info's
    choice each name exactly the implementation the next joint_attention call runs, under every
    kind of request (DITFAST_ATTENTION_BACKEND, DITFAST_BACKEND, use_backend, backend=, none)."""
    import contextlib
    from ditfast import info

    if how == "use_backend" and name == "triton" and _backend.impl(OP, "triton").reasons(Spec("cpu", F32, 128)):
        pytest.skip("the triton backend cannot run on CPU here (no TRITON_INTERPRET=1)")
    if how == "env_attention":
        monkeypatch.setitem(_backend._ENV_REQUEST, OP, name)
    if how == "env_backend":
        monkeypatch.setattr(_backend, "_ENV_BACKEND", name)
    ctx = ditfast.use_backend(name) if how == "use_backend" else contextlib.nullcontext()
    kw = {"backend": name} if how == "argument" else {}
    q = torch.randn(1, 5, 2, 128)
    k, v = torch.randn(1, 7, 2, 128), torch.randn(1, 7, 2, 128)
    features = ("lse",) if return_lse else ()
    with ctx:
        try:
            said = backends.choose_backend(q, k, v, return_lse=return_lse, **kw)
        except RuntimeError as exc:  # the request cannot run these inputs: the call raises the same
            with pytest.raises(RuntimeError, match="cannot run"):
                ops.joint_attention(q, k, v, return_lse=return_lse, **kw)
            assert "cannot run" in str(exc) and return_lse and name == "sdpa_math"
            return
        ran = _ran(spy, q, k, v, return_lse=return_lse, **kw)
        assert said == ran
        assert _explained(q, k, v, return_lse=return_lse, **kw) == ran
        if how != "argument":  # these read the request in force (no backend= argument)
            assert _backend.chosen_name(OP, q.device, q, features) == ran
            if not return_lse:
                assert info._choice(OP, Spec("cpu", F32, 128)) == ran
                report = info.report()
                line = next(l for l in report.splitlines() if l.strip().startswith(OP + " "))
                assert f"-> {ran} / " in line, line
                assert f"runs: {ran}" in report
                if how == "env_attention":
                    assert f"  {OP}: {name} (DITFAST_ATTENTION_BACKEND)" in report


def test_grouped_and_scaled_calls_report_what_runs(spy):
    """GQA and softmax_scale do not change the resolution: choose_backend still names what runs."""
    q, k = torch.randn(1, 5, 4, 16), torch.randn(1, 3, 2, 16)
    for kw in ({}, {"backend": "reference"}, {"backend": "sdpa_math"}):
        assert backends.choose_backend(q, k, k, **kw) == _ran(spy, q, k, k, softmax_scale=0.3, **kw)
