"""The adaLN family's options (ditfast/ops/modulate.py): RMSNorm, a norm weight, tanh gates and the
post-norm of the branch (Z-Image's "sandwich" blocks), on every backend that has them.

By the rule of docs/numerics.md: each backend in fp32 / bf16 / fp16 against the reference run on fp32
copies, with the reference in the low dtype as the yardstick; outputs and the gradients of every input
(x, y, shift, scale, gate, and both norm weights; the weight and per-sample modulation gradients are
reductions over tokens). Awkward shapes: L odd, D not a power of two; per-sample, per-token and
batch-1 modulations.
"""
import itertools
import warnings

import pytest
import torch

import ditfast
from ditfast import ops, reference
from ditfast.testing import assert_by_rule

B, L, D = 2, 7, 40
BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mod(kind, g):
    shape = {"sample": (B, D), "token": (B, L, D), "one_row": (1, D)}[kind]
    return 0.5 * torch.randn(shape, generator=g)


def _weight(g):
    return 1 + 0.2 * torch.randn(D, generator=g)


def _cases():
    """(op name, kwargs of options, the tensors' names) -> a small matrix that covers each flag."""
    out = []
    for norm, w, shift, kind in itertools.product(("layer", "rms"), (False, True), (False, True), ("sample", "token")):
        if norm == "layer" and not w:
            continue  # the plain LayerNorm path: tests/test_modulate.py
        out.append(("norm_modulate", dict(norm=norm, weight=w, shift=shift, kind=kind)))
    for act, post, kind in itertools.product((None, "tanh"), (False, True), ("sample", "token", "one_row")):
        if act is None and not post:
            continue
        out.append(("gated_residual", dict(gate_act=act, y_weight=post, kind=kind)))
    for norm, w, act, post, shift in [("rms", True, "tanh", True, False), ("rms", True, "tanh", True, True),
                                      ("layer", False, "tanh", False, True), ("rms", False, None, True, False),
                                      ("layer", True, "tanh", True, True)]:
        out.append(("gated_residual_norm_modulate", dict(norm=norm, weight=w, gate_act=act, y_weight=post,
                                                         shift=shift, kind="sample")))
    return out


CASES = _cases()


def _inputs(op, o, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    t = {"x": x}
    if op != "norm_modulate":
        t["y"] = 2 * torch.randn(B, L, D, generator=g)
        t["gate"] = _mod(o["kind"], g)
    if op != "gated_residual":
        t["scale"] = _mod(o["kind"], g)
        if o.get("shift"):
            t["shift"] = _mod(o["kind"], g)
        if o.get("weight"):
            t["weight"] = _weight(g)
    if o.get("y_weight"):
        t["y_weight"] = _weight(g)
    return t


def _call(mod, op, o, t):
    if op == "norm_modulate":
        return mod.norm_modulate(t["x"], t.get("shift"), t["scale"], eps=1e-5, norm=o["norm"], weight=t.get("weight"))
    if op == "gated_residual":
        return mod.gated_residual(t["x"], t["y"], t["gate"], gate_act=o["gate_act"], y_weight=t.get("y_weight"),
                                  y_eps=1e-5)
    return mod.gated_residual_norm_modulate(t["x"], t["y"], t["gate"], t.get("shift"), t["scale"], eps=1e-5,
                                            norm=o["norm"], weight=t.get("weight"), gate_act=o["gate_act"],
                                            y_weight=t.get("y_weight"), y_eps=1e-5)


def _run(mod, op, o, t, dtype, seed=3):
    leaves = {k: v.to(dtype).requires_grad_() for k, v in t.items()}
    out = _call(mod, op, o, leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(z.shape, generator=g).to(z.dtype) for z in outs]
    names = list(leaves)
    grads = torch.autograd.grad(outs, [leaves[n] for n in names], cot)
    return outs, dict(zip(names, grads))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,o", CASES, ids=[f"{op}-" + "-".join(f"{k}={v}" for k, v in o.items()) for op, o in CASES])
def test_by_the_rule(op, o, backend, dtype):
    t = _inputs(op, o)
    with ditfast.use_backend(backend, strict=True):
        fast, fast_g = _run(ops, op, o, t, dtype)
    ref32, ref32_g = _run(reference, op, o, t, torch.float32)
    lowp, lowp_g = _run(reference, op, o, t, dtype)
    assert all(f.dtype == r.dtype for f, r in zip(fast, lowp)), "output dtypes differ from the reference's"
    assert_by_rule(fast, ref32, lowp, name=f"{op} out")
    for name in fast_g:
        reduced = name in ("weight", "y_weight") or (name in ("shift", "scale", "gate") and o["kind"] != "token")
        assert_by_rule(fast_g[name], ref32_g[name], lowp_g[name], name=f"{op} d{name}", reduced=reduced)


def test_fp64_reference_and_fp32_triton_agree_closely():
    """fp32 Triton against the fp64 reference, tight: catches a wrong formula the rule's slack could hide."""
    op, o = "gated_residual_norm_modulate", dict(norm="rms", weight=True, gate_act="tanh", y_weight=True, shift=True,
                                                 kind="token")
    t = _inputs(op, o, seed=5)
    with ditfast.use_backend("triton", strict=True):
        fast, fast_g = _run(ops, op, o, t, torch.float32)
    with ditfast.use_backend("reference"):
        truth, truth_g = _run(reference, op, o, t, torch.float64)
    for f, r in zip(fast, truth):
        torch.testing.assert_close(f.double(), r, rtol=1e-5, atol=1e-5)
    for name in fast_g:
        torch.testing.assert_close(fast_g[name].double(), truth_g[name], rtol=1e-4, atol=1e-4)


def test_options_change_the_result():
    """Each option is applied (a mutation check of the tests above)."""
    t = _inputs("gated_residual_norm_modulate", dict(kind="sample", shift=True, weight=True, y_weight=True))
    base = ops.gated_residual_norm_modulate(t["x"], t["y"], t["gate"], t["shift"], t["scale"])
    for kw in (dict(norm="rms"), dict(weight=t["weight"]), dict(gate_act="tanh"), dict(y_weight=t["y_weight"])):
        with ditfast.use_backend("triton", strict=True):
            got = ops.gated_residual_norm_modulate(t["x"], t["y"], t["gate"], t["shift"], t["scale"], **kw)
        assert not torch.allclose(got[0], base[0]) or not torch.allclose(got[1], base[1]), kw


def test_compiled_family_lacks_the_options_and_falls_back():
    """The C++ extension implements LayerNorm without weights only: asked for, it warns once and the
    automatic choice (which has the option) runs; strict raises."""
    t = _inputs("norm_modulate", dict(kind="sample", weight=True))
    want = reference.norm_modulate(t["x"], None, t["scale"], eps=1e-5, norm="rms", weight=t["weight"])
    from ditfast import _backend

    _backend._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ditfast.use_backend("cuda"):
            got = ops.norm_modulate(t["x"], None, t["scale"], eps=1e-5, norm="rms", weight=t["weight"])
    assert any("with rms+norm_weight" in str(w.message) for w in caught), [str(w.message) for w in caught]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="rms"):
        with ditfast.use_backend("cuda", strict=True):
            ops.norm_modulate(t["x"], None, t["scale"], norm="rms")


def test_bad_options_are_named():
    x, s = torch.randn(B, L, D), torch.randn(B, D)
    with pytest.raises(ValueError, match="norm must be one of"):
        ops.norm_modulate(x, None, s, norm="group")
    with pytest.raises(ValueError, match="gate_act"):
        ops.gated_residual(x, x, s, gate_act="sigmoid")
    with pytest.raises(ValueError, match=r"weight must be a \(D,\)"):
        ops.norm_modulate(x, None, s, weight=torch.ones(D + 1))
    with pytest.raises(ValueError, match="y_weight"):
        ops.gated_residual(x, x, s, y_weight=torch.ones(3, D))
    with pytest.raises(TypeError, match="weight"):
        ops.norm_modulate(x, None, s, weight=[1.0] * D)


@pytest.mark.parametrize("name", ["norm_modulate_x", "gated_residual_x", "gated_residual_norm_modulate_x"])
def test_opcheck(name):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, L, D, generator=g, requires_grad=True), torch.randn(B, L, D, generator=g, requires_grad=True)
    gate, shift, scale = (torch.randn(B, D, generator=g, requires_grad=True) for _ in range(3))
    w, wy = (_weight(g).requires_grad_() for _ in range(2))
    op = getattr(torch.ops.ditfast, name).default
    bf = torch.bfloat16
    samples = {
        "norm_modulate_x": [(x, shift, scale, w, 1e-5, True, None), (x, None, scale, None, 1e-6, True, None),
                            (x, shift, scale, w, 1e-6, False, bf)],
        "gated_residual_x": [(x, y, gate, wy, 1e-5, True, None), (x, y, gate, None, 1e-6, True, bf),
                             (x, y, gate, wy, 1e-6, False, None)],
        "gated_residual_norm_modulate_x": [(x, y, gate, shift, scale, w, wy, 1e-5, 1e-5, True, True, None),
                                           (x, y, gate, None, scale, None, wy, 1e-6, 1e-6, True, False, None),
                                           (x, y, gate, shift, scale, w, None, 1e-6, 1e-6, False, True, bf)],
    }[name]
    for args in samples:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    t = _inputs("gated_residual_norm_modulate", dict(kind="sample", shift=False, weight=True, y_weight=True))

    def f(x, y, gate, scale, w, wy):
        return ops.gated_residual_norm_modulate(x, y, gate, None, scale, norm="rms", weight=w, gate_act="tanh",
                                                y_weight=wy)

    args = [t[k] for k in ("x", "y", "gate", "scale", "weight", "y_weight")]
    with ditfast.use_backend("triton", strict=True):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
        want = f(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["norm_modulate", "gated_residual", "gated_residual_norm_modulate"])
def test_out_dtype_is_one_rounding_of_the_fp32_math(op, backend):
    """Wan's rule: bf16 activations, fp32 modulations, the fp32 result cast back to bf16 (``.type_as(x)``).
    With out_dtype=bf16 the op returns bf16 within one bf16 rounding of the fp32 reference, and its
    gradients keep the inputs' dtypes (fp32 for the fp32 modulations)."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(B, L, D, generator=g).bfloat16(), torch.randn(B, L, D, generator=g).bfloat16()
    mods = [0.5 * torch.randn(B, D, generator=g) for _ in range(3)]  # fp32
    w = _weight(g)  # fp32 affine LayerNorm weight (Wan's norm2)

    def call(mod, x, y, m, w, **kw):
        if op == "norm_modulate":
            return mod.norm_modulate(x, m[0], m[1], weight=w, **kw)
        if op == "gated_residual":
            return mod.gated_residual(x, y, m[2], **kw)
        return mod.gated_residual_norm_modulate(x, y, torch.ones_like(m[2], dtype=x.dtype), m[0], m[1], **kw)

    leaves = [t.clone().requires_grad_() for t in (x, y, *mods, w)]
    with ditfast.use_backend(backend, strict=True):
        out = call(ops, leaves[0], leaves[1], leaves[2:5], leaves[5], out_dtype=torch.bfloat16)
    outs = out if isinstance(out, tuple) else (out,)
    want = call(reference, x.float(), y.float(), mods, w)
    wants = want if isinstance(want, tuple) else (want,)
    for o, r in zip(outs, wants):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), r, rtol=2 ** -7, atol=2 ** -7 * max(1.0, r.abs().max().item()) / 8)
    sum(o.float().sum() for o in outs).backward()
    for t in leaves:
        assert t.grad is None or t.grad.dtype == t.dtype
