"""The compiled extension ditfast._C (csrc/) and the "cuda" backend (ditfast/ops/cuda_impl.py).

_C registers torch.ops.ditfast.<op>_c with CPU kernels (always) and CUDA kernels (when built
with nvcc). The CPU kernels are checked here on every machine where _C is built: forward and
backward against ditfast.reference by the tolerance rule (docs/numerics.md) (ditfast.testing.check_op), in fp32 / bf16 /
fp16, on awkward widths (D = 72, 200; Dh = 40, 72) and the strided views the ops layer hands over
(x a slice or transpose of a wider tensor; shift/scale/gate chunks of one adaLN output, per sample,
per token or expanded over the batch; q/k unbound from a packed qkv). The same tests run on the
CUDA kernels (marker ``cuda``) when a GPU is present, plus real DiT/FLUX widths and both the
16-byte vector path and the scalar fallback. Also: torch.library.opcheck on every C++ op,
torch.compile(fullgraph=True), coexistence with Python ops in the "ditfast" namespace, argument
errors, determinism, and the measured backend table. Tests that need _C skip with the reason
when it is not built.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ditfast
from ditfast import _backend, _ext, ops, reference
from ditfast.ops import cuda_impl
from ditfast.testing import check_op

from conftest import DTYPES

EPS = 1e-6
_C = _ext.load()
needs_c = pytest.mark.skipif(_C is None, reason=f"ditfast._C is not built: {_ext.error()}")
HAS_CUDA_KERNELS = _C is not None and "cuda" in getattr(_C, "DEVICES", ())

# Every test that runs the ops takes a device: "cpu" always, "cuda" where a GPU and the CUDA
# kernels are present (skipped otherwise, with the reason).
CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="ditfast._C was built without CUDA kernels"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]

OPS = torch.ops.ditfast


# --- input builders (leaves are what check_op differentiates; views are made inside the fns) ----------
def x_leaf(layout, B, L, D, dtype, device):
    shape = {"contig": (B, L, D), "slice": (B, L, D + 11), "tokmajor": (L, B, D)}[layout]
    return (torch.randn(shape, device=device) * 2 + 0.5).to(dtype).requires_grad_()


def x_view(leaf, layout, D):
    if layout == "slice":  # a window of a wider tensor at an odd offset: rows not 16-byte aligned
        return leaf[..., 3 : 3 + D]
    if layout == "tokmajor":  # (L, B, D) storage: batch stride D, token stride B*D
        return leaf.transpose(0, 1)
    return leaf


def mod_leaf(kind, n, B, L, D, dtype, device):
    """The adaLN output n modulations are chunks of: per "sample" (B, n*D), per "token" (B, L, n*D),
    one row "expand"ed over the batch (1, n*D), or one "row" / "tokrow" the op broadcasts itself
    ((1, n*D) / (1, L, n*D))."""
    shape = {"sample": (B, n * D), "token": (B, L, n * D), "expand": (1, n * D), "row": (1, n * D),
             "tokrow": (1, L, n * D)}[kind]
    return (0.5 * torch.randn(shape, device=device)).to(dtype).requires_grad_()


def mod_views(leaf, kind, n, B):
    views = leaf.chunk(n, -1)  # row stride n*D
    if kind == "expand":
        views = [t.expand(B, -1) for t in views]  # batch stride 0
    return views


def case_id(c):
    return "-".join(str(v) for v in c)


def device_cases(cpu_cases, gpu_cases):
    """(device, case) pairs: the small cases on every device, the real sizes on CUDA only (the CPU
    kernels would take minutes on them)."""
    pairs = [pytest.param("cpu", c, id=f"cpu-{case_id(c)}") for c in cpu_cases]
    pairs += [pytest.param("cuda", c, marks=CUDA_MARKS, id=f"cuda-{case_id(c)}") for c in cpu_cases + gpu_cases]
    return pairs


# (B, L, D, x layout, modulation kind). D = 72 and 1152, 3072 take the 16-byte path on CUDA when
# aligned; D = 200 and the "slice" layout take the scalar path.
NM_CASES = [
    (3, 77, 72, "contig", "sample"),
    (3, 77, 200, "slice", "sample"),
    (3, 7, 72, "tokmajor", "token"),
    (3, 7, 200, "contig", "expand"),
    (3, 7, 72, "contig", "row"),
    (3, 7, 72, "slice", "tokrow"),
    (2, 5, 8, "contig", "sample"),
]
NM_GPU_CASES = [
    (2, 1024, 1152, "contig", "sample"),  # DiT-XL
    (2, 333, 3072, "contig", "token"),  # FLUX width, multi-warp rows
    (2, 256, 3072, "slice", "sample"),  # FLUX width, scalar path
    (1, 64, 8192, "contig", "sample"),  # the largest row the CUDA kernels keep in registers
]


# --- norm_modulate --------------------------------------------------------------------------------------
@needs_c
@pytest.mark.parametrize("device,case", device_cases(NM_CASES, NM_GPU_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "noshift"])
def test_norm_modulate(device, dtype, case, with_shift):
    B, L, D, layout, kind = case

    def fn(impl, xl, ml):
        shift, scale = mod_views(ml, kind, 6, B)[:2]
        x = x_view(xl, layout, D)
        if impl is None:
            return reference.norm_modulate(x, shift if with_shift else None, scale, eps=EPS)
        return OPS.norm_modulate_c(x, shift if with_shift else None, scale, EPS)

    args = [x_leaf(layout, B, L, D, dtype, device), mod_leaf(kind, 6, B, L, D, dtype, device)]
    check_op(lambda *a: fn("c", *a), lambda *a: fn(None, *a), args, name="norm_modulate_c")


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_norm_modulate_mixed_dtypes(device):
    """An fp32 residual stream modulated by bf16 shift/scale: output fp32 (PyTorch's promotion)."""
    B, L, D = 2, 9, 72
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    mod = (0.5 * torch.randn(B, 2 * D, device=device)).bfloat16().requires_grad_()

    def fn(impl, x, mod):
        shift, scale = mod.chunk(2, -1)
        return impl(x, shift, scale)

    out = fn(lambda x, sh, sc: OPS.norm_modulate_c(x, sh, sc, EPS), x, mod)
    assert out.dtype == torch.float32
    check_op(
        lambda *a: fn(lambda x, sh, sc: OPS.norm_modulate_c(x, sh, sc, EPS), *a),
        lambda *a: fn(lambda x, sh, sc: reference.norm_modulate(x, sh, sc, eps=EPS), *a),
        [x, mod],
        name="norm_modulate_c mixed",
    )


# --- gated_residual_norm_modulate -----------------------------------------------------------------------
@needs_c
@pytest.mark.parametrize("device,case", device_cases(NM_CASES, NM_GPU_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "noshift"])
def test_gated_residual_norm_modulate(device, dtype, case, with_shift):
    B, L, D, layout, kind = case

    def fn(impl, xl, yl, ml):
        # gate of the previous half-block, shift/scale of the next one: chunks 2, 3, 4 of 6
        gate, shift, scale = mod_views(ml, kind, 6, B)[2:5]
        x, y = x_view(xl, layout, D), x_view(yl, layout, D)
        sh = shift if with_shift else None
        if impl is None:
            return reference.gated_residual_norm_modulate(x, y, gate, sh, scale, eps=EPS)
        return OPS.gated_residual_norm_modulate_c(x, y, gate, sh, scale, EPS)

    args = [
        x_leaf(layout, B, L, D, dtype, device),
        x_leaf(layout, B, L, D, dtype, device),
        mod_leaf(kind, 6, B, L, D, dtype, device),
    ]
    check_op(lambda *a: fn("c", *a), lambda *a: fn(None, *a), args, name="gated_residual_norm_modulate_c")


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_gated_residual_norm_modulate_mixed_and_one_output(device):
    """fp32 residual + bf16 branch output and modulations; and a backward where only h is used
    (the grad of x_new arrives as zeros) or only x_new is used."""
    B, L, D = 2, 9, 200
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    y = torch.randn(B, L, D, device=device).bfloat16().requires_grad_()
    mod = (0.5 * torch.randn(B, 3 * D, device=device)).bfloat16().requires_grad_()

    def fn(impl, x, y, mod):
        gate, shift, scale = mod.chunk(3, -1)
        return impl(x, y, gate, shift, scale)

    c_impl = lambda x, y, g, sh, sc: OPS.gated_residual_norm_modulate_c(x, y, g, sh, sc, EPS)  # noqa: E731
    r_impl = lambda x, y, g, sh, sc: reference.gated_residual_norm_modulate(x, y, g, sh, sc, eps=EPS)  # noqa: E731
    x_new, h = fn(c_impl, x, y, mod)
    assert x_new.dtype == torch.float32 and h.dtype == torch.float32
    check_op(lambda *a: fn(c_impl, *a), lambda *a: fn(r_impl, *a), [x, y, mod], name="grnm mixed")
    for pick in (0, 1):
        check_op(
            lambda *a: fn(c_impl, *a)[pick],
            lambda *a: fn(r_impl, *a)[pick],
            [x, y, mod],
            name=f"grnm output {pick} only",
        )


# --- apply_rope / qk_norm_rope ---------------------------------------------------------------------------
AXES = {40: (8, 16, 16), 64: (16, 24, 24), 72: (8, 32, 32), 128: (16, 56, 56)}


def rope_tables(B, L, Dh, per_batch, device):
    g = torch.Generator().manual_seed(1)
    shape = (B, L, 3) if per_batch else (L, 3)
    ids = torch.randint(0, 64, shape, generator=g).float().to(device)
    return reference.rope_freqs(ids, AXES[Dh])


def qkv_leaf(layout, B, L, H, Dh, dtype, device):
    shape = {"packed": (B, L, 3 * H * Dh), "contig": (2, B, L, H, Dh), "slice": (B, L, 3 * H * Dh + 4)}[layout]
    return (torch.randn(shape, device=device) + 0.3).to(dtype).requires_grad_()


def qk_views(leaf, layout, B, L, H, Dh):
    if layout == "contig":
        return leaf.unbind(0)
    if layout == "slice":  # packed qkv at an odd offset: heads not 16-byte aligned
        leaf = leaf[..., 1 : 1 + 3 * H * Dh]
    q, k, _ = leaf.view(B, L, 3, H, Dh).unbind(2) if layout == "packed" else leaf.unflatten(-1, (3, H, Dh)).unbind(2)
    return q, k


# (B, L, H, Dh, qkv layout, per-batch tables)
ROPE_CASES = [
    (3, 7, 2, 72, "packed", False),
    (2, 5, 3, 40, "contig", True),
    (3, 7, 2, 72, "slice", False),
    (2, 6, 2, 64, "packed", True),
]
ROPE_GPU_CASES = [(2, 512, 24, 128, "packed", False), (2, 333, 24, 64, "contig", True), (2, 256, 16, 72, "slice", False)]


@needs_c
@pytest.mark.parametrize("device,case", device_cases(ROPE_CASES, ROPE_GPU_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halfsplit"])
def test_apply_rope(device, dtype, case, interleaved):
    B, L, H, Dh, layout, per_batch = case
    cos, sin = rope_tables(B, L, Dh, per_batch, device)

    def fn(impl, leaf):
        q, _ = qk_views(leaf, layout, B, L, H, Dh)
        if impl is None:
            return reference.apply_rope(q, cos, sin, interleaved=interleaved)
        return OPS.apply_rope_c(q, cos, sin, interleaved, False)

    args = [qkv_leaf(layout, B, L, H, Dh, dtype, device)]
    check_op(lambda *a: fn("c", *a), lambda *a: fn(None, *a), args, name="apply_rope_c")


@needs_c
@pytest.mark.parametrize("device,case", device_cases(ROPE_CASES, ROPE_GPU_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant,interleaved", [
    (variant, interleaved)
    for variant in ("full", "noweight", "oneweight", "norope")
    for interleaved in ((True, False) if variant != "norope" else (True,))  # pairs only matter with RoPE
], ids=lambda v: v if isinstance(v, str) else ("interleaved" if v else "halfsplit"))
def test_qk_norm_rope(device, dtype, case, interleaved, variant):
    """full: norm with both weights, then RoPE; noweight: both weights None = RoPE only (no norm);
    oneweight: norm both, only q's weight; norope: norm only."""
    B, L, H, Dh, layout, per_batch = case
    cos, sin = rope_tables(B, L, Dh, per_batch, device) if variant != "norope" else (None, None)
    use_q_w, use_k_w = {"full": (1, 1), "noweight": (0, 0), "oneweight": (1, 0), "norope": (1, 1)}[variant]

    def fn(impl, leaf, wq, wk):
        q, k = qk_views(leaf, layout, B, L, H, Dh)
        wq, wk = (wq if use_q_w else None), (wk if use_k_w else None)
        if impl is None:
            return reference.qk_norm_rope(q, k, wq, wk, cos, sin, eps=EPS, interleaved=interleaved)
        return OPS.qk_norm_rope_c(q, k, wq, wk, cos, sin, EPS, interleaved)

    args = [
        qkv_leaf(layout, B, L, H, Dh, dtype, device),
        (1 + 0.3 * torch.randn(Dh, device=device)).to(dtype).requires_grad_(bool(use_q_w)),
        (1 + 0.3 * torch.randn(Dh, device=device)).to(dtype).requires_grad_(bool(use_k_w)),
    ]
    check_op(lambda *a: fn("c", *a), lambda *a: fn(None, *a), args, name=f"qk_norm_rope_c {variant}")


# --- the "cuda" backend through the public ops -----------------------------------------------------------
@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_public_ops_on_cuda_backend(device):
    """ditfast.ops.* with use_backend("cuda") run the C++ ops (checked by the op names in the autograd
    graph) and match the reference; gradients reach the leaves through expand/chunk views."""
    B, L, D, H, Dh = 2, 9, 72, 2, 36
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    y = torch.randn(B, L, D, device=device, requires_grad=True)
    mod = (0.5 * torch.randn(1, 3 * D, device=device)).requires_grad_()  # batch 1: expanded by ops
    qkv = torch.randn(B, L, 3 * H * Dh, device=device, requires_grad=True)
    w = torch.ones(Dh, device=device, requires_grad=True)
    ids = torch.stack([torch.zeros(L), torch.arange(L) // 3, torch.arange(L) % 3], -1).to(device)
    cos, sin = ops.rope_freqs(ids, (4, 16, 16))

    def run(lib_ops):
        gate, shift, scale = mod.chunk(3, -1)
        h = lib_ops.norm_modulate(x, shift, scale)
        xn, h2 = lib_ops.gated_residual_norm_modulate(x, y, gate, shift, scale)
        q, k, _ = qkv.view(B, L, 3, H, Dh).unbind(2)
        qo, ko = lib_ops.qk_norm_rope(q, k, w, w, cos, sin)
        r = lib_ops.apply_rope(q, cos, sin, interleaved=False)
        return h, xn, h2, qo, ko, r

    with ditfast.use_backend("cuda"):
        outs = run(ops)
    names = {o.grad_fn.name() for o in outs}
    assert all("ditfast" in n and "_c_" in n for n in names), names
    ref = run(reference)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    gs = torch.autograd.grad(sum(o.square().sum() for o in outs), [x, y, mod, qkv, w])
    gr = torch.autograd.grad(sum(o.square().sum() for o in ref), [x, y, mod, qkv, w])
    for a, b in zip(gs, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_modulation_gradient_rounded_once(device):
    """A (1, D) shift/scale that ditfast.ops expands over the batch: the "cuda" backend hands the C++
    op the single row, whose grad is summed over every token of every sample in fp32 and rounded to
    fp16 once (per-sample fp16 grads summed again by expand's backward would round twice)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 72, generator=g).to(device, torch.float16).requires_grad_()
    y = torch.randn(2, 9, 72, generator=g).to(device, torch.float16).requires_grad_()
    m = (0.5 * torch.randn(1, 216, generator=g)).to(device, torch.float16).requires_grad_()
    with ditfast.use_backend("cuda"):
        check_op(lambda x, m: ops.norm_modulate(x, *m.chunk(3, -1)[:2]),
                 lambda x, m: reference.norm_modulate(x, *m.chunk(3, -1)[:2]), [x, m], name="norm_modulate (1, D)")
        check_op(lambda x, y, m: ops.gated_residual_norm_modulate(x, y, *m.chunk(3, -1)),
                 lambda x, y, m: reference.gated_residual_norm_modulate(x, y, *m.chunk(3, -1)), [x, y, m],
                 name="gated_residual_norm_modulate (1, D)")
    # the C++ op itself: (1, D) in, (1, D) grad out
    dx, dscale, dshift = OPS.norm_modulate_c_backward(torch.ones_like(x), x, m[:, :72], m[:, 72:144], EPS)
    assert dscale.shape == (1, 72) and dshift.shape == (1, 72) and dshift.dtype == torch.float16


@needs_c
def test_loading_c_stays_light():
    """Importing the "cuda" backend and loading _C (fresh interpreter) imports neither triton nor
    torch._dynamo, and queries no GPU."""
    code = ("import sys, torch, ditfast; from ditfast.ops import cuda_impl; from ditfast import _ext; "
            "assert _ext.load() is not None, _ext.error(); "
            "print('triton' in sys.modules, 'torch._dynamo' in sys.modules, torch.cuda.is_initialized())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["False", "False", "False"], res.stdout + res.stderr[-2000:]


@needs_c
def test_cuda_backend_is_automatic_on_cpu():
    """On CPU the automatic choice takes the compiled kernels (the Triton interpreter never is)."""
    ok, why = _backend.availability("cuda", "cpu")
    assert ok, why
    x = torch.randn(2, 3, 8)
    assert _backend.select("norm_modulate", x.device) is cuda_impl.norm_modulate
    assert _backend.select("qk_norm_rope", x.device) is cuda_impl.qk_norm_rope


@needs_c
def test_rope_tables_requiring_grad_use_the_reference():
    """The C++ ops give no grad to cos/sin; calls whose tables need one go to the reference."""
    B, L, H, Dh = 1, 4, 1, 40
    x = torch.randn(B, L, H, Dh, requires_grad=True)
    cos, sin = rope_tables(B, L, Dh, False, "cpu")
    cos.requires_grad_()
    out = cuda_impl.apply_rope(x, cos, sin)
    out.sum().backward()
    assert cos.grad is not None


# --- opcheck / torch.compile ----------------------------------------------------------------------------
def _opcheck_samples(device):
    B, L, D, H, Dh = 2, 5, 16, 2, 8
    t = lambda *s, rg=True: torch.randn(*s, device=device).requires_grad_(rg)  # noqa: E731
    cos, sin = rope_tables(B, L, 40, False, device)
    cos, sin = cos[:, : Dh // 2].contiguous(), sin[:, : Dh // 2].contiguous()
    mod = torch.randn(B, 3 * D, device=device)
    gate, shift, scale = [c.requires_grad_() for c in (mod[:, :D].clone(), mod[:, D : 2 * D].clone(), mod[:, 2 * D :].clone())]
    x, y = t(B, L, D), t(B, L, D)
    q, k = t(B, L, H, Dh), t(B, L, H, Dh)
    wq, wk = t(Dh), t(Dh)
    g = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    packed = [t(B, n, 3 * H * Dh) for n in (2, L - 2)]
    views = [p.view(B, p.shape[1], 3, H, Dh).unbind(2) for p in packed]
    qkv2 = [views[0][0], views[1][0], views[0][1], views[1][1], views[0][2], views[1][2]]  # qs, ks, vs
    none = torch.empty(0, device=device)
    return [
        (OPS.norm_modulate_c, (x, shift, scale, EPS)),
        (OPS.norm_modulate_c, (x, None, t(B, L, D), EPS)),
        (OPS.norm_modulate_c_backward, (g(B, L, D), x.detach(), shift.detach(), scale.detach(), EPS)),
        (OPS.gated_residual_norm_modulate_c, (x, y, gate, shift, scale, EPS)),
        (OPS.gated_residual_norm_modulate_c_backward,
         (g(B, L, D), g(B, L, D), x.detach(), y.detach(), gate.detach(), None, scale.detach(), EPS)),
        (OPS.apply_rope_c, (q, cos, sin, True, False)),
        (OPS.apply_rope_c, (q, cos, sin, False, True)),
        (OPS.qk_norm_rope_c, (q, k, wq, wk, cos, sin, EPS, True)),
        (OPS.qk_norm_rope_c, (q, k, None, wk, None, None, EPS, False)),
        (OPS.qk_norm_rope_c, (q, k, None, None, cos, sin, EPS, False)),
        (OPS.qk_norm_rope_c_backward,
         (g(B, L, H, Dh), g(B, L, H, Dh), q.detach(), k.detach(), wq.detach(), None, cos, sin, EPS, True)),
        (OPS.qk_norm_rope_c_backward,
         (g(B, L, H, Dh), None, q.detach(), k.detach(), None, None, cos, sin, EPS, True)),
        # prepare_attention_c: two streams of a packed qkv (L 2 + 3 = L), joint tables; empty weight = no norm
        (OPS.prepare_attention_c, (list(qkv2[:2]), list(qkv2[2:4]), list(qkv2[4:]), [none, wq], [none, wk],
                                   cos, sin, EPS, True)),
        (OPS.prepare_attention_c, ([q], [k], [q], [wq], [wk], None, None, EPS, False)),
        (OPS.prepare_attention_c_backward,
         (g(B, L, H, Dh), None, [x.detach() for x in qkv2[:2]], [x.detach() for x in qkv2[2:4]], [none, wq.detach()],
          [none, wk.detach()], cos, sin, EPS, True)),
    ]


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


@needs_c
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """A block-like function over the public ops on the "cuda" backend compiles without graph breaks
    and matches eager, forward and backward."""
    B, L, D, H = 2, 7, 64, 2
    Dh = D // H
    torch._dynamo.reset()

    def block(x, y, mod, qkv, w, cos, sin):
        shift, scale, gate = mod.chunk(3, -1)
        xn, h = ops.gated_residual_norm_modulate(x, y, gate, shift, scale)
        q, k, _ = qkv.view(B, L, 3, H, Dh).unbind(2)
        q, k = ops.qk_norm_rope(q, k, w, w, cos, sin)
        return ops.norm_modulate(xn, shift, scale) + h, q + ops.apply_rope(k, cos, sin)

    def leaves():
        g = torch.Generator().manual_seed(3)
        shapes = [(B, L, D), (B, L, D), (B, 3 * D), (B, L, 3 * D), (Dh,)]
        return [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]

    ids = torch.stack([torch.zeros(L), torch.arange(L) // 3, torch.arange(L) % 3], -1)
    cos, sin = [t.to(device) for t in ops.rope_freqs(ids, (8, 12, 12))]
    with ditfast.use_backend("cuda"):
        eager_in, comp_in = leaves(), leaves()
        eager = block(*eager_in, cos, sin)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*comp_in, cos, sin)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    sum(o.square().sum() for o in eager).backward()
    sum(o.square().sum() for o in compiled).backward()
    for a, b in zip(eager_in, comp_in):
        torch.testing.assert_close(a.grad, b.grad)


@needs_c
def test_torch_compile_dynamic_shapes_compile_once():
    """dynamic=True: one graph serves several sequence lengths (the wrappers' shape checks and the fake
    kernels stay symbolic), for the modulate and the rope ops."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    H, Dh = 2, 40

    def f(x, m, qkv, cos, sin):
        shift, scale = m.chunk(2, -1)
        q, k, _ = qkv.unflatten(-1, (3, H, Dh)).unbind(2)
        q, k = ops.qk_norm_rope(q, k, m[0, :Dh], m[1, :Dh], cos, sin)
        return ops.norm_modulate(x, shift, scale), q, k

    fn = torch.compile(f, fullgraph=True, dynamic=True, backend=counting)
    with ditfast.use_backend("cuda"):
        for L in (5, 7, 11):
            x, m, qkv = torch.randn(2, L, 40), torch.randn(2, 80), torch.randn(2, L, 3 * H * Dh)
            cos, sin = rope_tables(2, L, Dh, False, "cpu")
            for a, b in zip(fn(x, m, qkv, cos, sin), f(x, m, qkv, cos, sin)):
                torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 sequence lengths"


@needs_c
def test_torch_compile_inductor_cpu():
    """The C++ ops called directly inside an inductor-compiled function (fake kernels + autograd)."""
    torch._dynamo.reset()

    def f(x, shift, scale):
        return torch.ops.ditfast.norm_modulate_c(x * 2, shift, scale, EPS).sum(-1)

    x, shift, scale = torch.randn(2, 5, 24, requires_grad=True), torch.randn(2, 24), torch.randn(2, 24)
    out = torch.compile(f, fullgraph=True)(x, shift, scale)
    torch.testing.assert_close(out, f(x, shift, scale))
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(f(x, shift, scale).sum(), x)
    torch.testing.assert_close(g, g_ref)


# --- namespace coexistence, errors, determinism -----------------------------------------------------------
_COEXIST = textwrap.dedent(
    """
    import torch, importlib
    order = {order!r}

    def python_side():  # a custom_op (a FRAGMENT library) and a library that claims the namespace
        @torch.library.custom_op("ditfast::coexist_probe", mutates_args=())
        def probe(x: torch.Tensor) -> torch.Tensor:
            return x + 1
        return torch.library.Library("ditfast", "DEF")

    if order == "python_first":
        keep = python_side()
        importlib.import_module("ditfast._C")
    else:
        importlib.import_module("ditfast._C")
        keep = python_side()
    import ditfast.ops  # the Triton custom ops live in the same namespace
    x = torch.ones(2, 3, 4)
    assert torch.ops.ditfast.coexist_probe(x).sum() == 48
    h = torch.ops.ditfast.norm_modulate_c(x, None, torch.zeros(2, 4), 1e-6)
    assert h.shape == x.shape
    print("OK")
    """
)


@needs_c
@pytest.mark.parametrize("order", ["python_first", "c_first"])
def test_namespace_coexists_with_python_ops(order):
    """_C's TORCH_LIBRARY_FRAGMENT(ditfast) loads next to Python custom_ops in the same namespace and
    even next to a Python Library("ditfast", "DEF"), in either import order (fresh interpreters)."""
    code = _COEXIST.format(order=order)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")})
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@needs_c
def test_argument_errors_name_the_argument():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="scale"):
        OPS.norm_modulate_c(x, None, torch.randn(2, 7), EPS)
    with pytest.raises(ValueError, match="shift"):
        OPS.norm_modulate_c(x, torch.randn(3, 8), torch.randn(2, 8), EPS)
    with pytest.raises(TypeError, match="x"):
        OPS.norm_modulate_c(x.double(), None, torch.randn(2, 8), EPS)
    with pytest.raises(ValueError, match="y"):
        OPS.gated_residual_norm_modulate_c(x, torch.randn(2, 3, 9), torch.randn(2, 8), None, torch.randn(2, 8), EPS)
    q = torch.randn(1, 4, 2, 8)
    cos, sin = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(TypeError, match="cos"):
        OPS.apply_rope_c(q, cos.double(), sin, True, False)
    with pytest.raises(ValueError, match="sin"):
        OPS.apply_rope_c(q, cos, torch.randn(5, 4), True, False)
    with pytest.raises(ValueError, match="k_weight"):
        OPS.qk_norm_rope_c(q, q, None, torch.randn(7), None, None, EPS, True)
    with pytest.raises(ValueError, match="cos and sin"):
        OPS.qk_norm_rope_c(q, q, None, None, cos, None, EPS, True)
    with pytest.raises(ValueError, match="even"):
        OPS.apply_rope_c(torch.randn(1, 4, 2, 7), cos[:, :3], sin[:, :3], True, False)


@needs_c
def test_backward_is_deterministic_across_thread_counts():
    """Per-sample grads are summed per fixed row chunk, then over chunks: identical bits whatever
    the number of threads."""
    B, L, D = 2, 300, 72
    x, y = torch.randn(B, L, D), torch.randn(B, L, D)
    gate, shift, scale = torch.randn(3, B, D).unbind(0)
    g1, g2 = torch.randn(B, L, D), torch.randn(B, L, D)
    q = torch.randn(2, 300, 3, 40)
    w = torch.randn(40)
    gq = torch.randn_like(q)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            r = OPS.gated_residual_norm_modulate_c_backward(g1, g2, x, y, gate, shift, scale, EPS)
            r2 = OPS.qk_norm_rope_c_backward(gq, gq, q, q, w, None, None, None, EPS, True)
            results.append(list(r) + list(r2))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_c
def test_module_reports_its_build():
    assert "cpu" in _C.DEVICES
    assert set(_C.OPS) >= {"norm_modulate_c", "gated_residual_norm_modulate_c", "apply_rope_c", "qk_norm_rope_c",
                           "prepare_attention_c", "prepare_attention_c_backward"}
    assert cuda_impl._HAS_PREPARE  # this build has the prepare ops, so the backend does not fall back
    assert _C.MAX_ROW_CUDA == cuda_impl._MAX_ROW_CUDA and _C.MAX_HEAD_DIM_CUDA == cuda_impl._MAX_HEAD_DIM_CUDA
    assert torch.__version__.startswith(_C.TORCH_VERSION)
    assert "built for torch" in _ext.build_info()
    info = _ext.record()
    if info is not None:  # installed through setup.py: the record matches the module
        assert info["EXT_BUILT"] and info["WITH_CUDA"] == ("cuda" in _C.DEVICES)


# --- the measured backend table (no _C needed) -------------------------------------------------------------
def test_backend_table_roundtrip_and_choice(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    monkeypatch.setenv(cuda_impl.TABLE_ENV, str(path))
    monkeypatch.setattr(cuda_impl, "_device_name", lambda index: "Fake GPU")
    cuda = torch.device("cuda", 0)
    assert cuda_impl.table_choice("norm_modulate", cuda, torch.bfloat16, 1152) is None  # no file yet
    entries = [
        {"op": "norm_modulate", "dtype": "bfloat16", "width_min": 1, "width_max": 2048, "backend": "cuda",
         "gbps": {"cuda": 3000.0, "triton": 2800.0}},
        {"op": "norm_modulate", "dtype": "bfloat16", "width_min": 2049, "width_max": 8192, "backend": "triton"},
    ]
    cuda_impl.save_table(entries, "Fake GPU", measured={"torch": "x", "commit": "y"})
    cuda_impl.save_table([{"op": "apply_rope", "dtype": "float16", "width_min": 64, "width_max": 64,
                           "backend": "triton"}], "Other GPU")
    data = json.loads(path.read_text())
    assert data["format"] == cuda_impl.TABLE_FORMAT and set(data["devices"]) == {"Fake GPU", "Other GPU"}
    assert cuda_impl.table_choice("norm_modulate", cuda, torch.bfloat16, 1152) == "cuda"
    assert cuda_impl.table_choice("norm_modulate", cuda, torch.bfloat16, 3072) == "triton"
    assert cuda_impl.table_choice("norm_modulate", cuda, torch.float16, 1152) is None  # no fp16 entry
    assert cuda_impl.table_choice("apply_rope", cuda, torch.float16, 64) is None  # other device's entry
    assert cuda_impl.table_choice("norm_modulate", torch.device("cpu"), torch.bfloat16, 1152) is None


def test_backend_table_choice_is_a_constant_under_compile(tmp_path, monkeypatch):
    """table_choice is evaluated at trace time (its file reads never reach Dynamo): fullgraph works and
    the measured answer is baked in."""
    path = tmp_path / "table.json"
    monkeypatch.setenv(cuda_impl.TABLE_ENV, str(path))
    monkeypatch.setattr(cuda_impl, "_device_name", lambda index: "Fake GPU")
    cuda_impl.save_table([{"op": "norm_modulate", "dtype": "bfloat16", "width_min": 1, "width_max": 4096,
                           "backend": "cuda"}], "Fake GPU")
    torch._dynamo.reset()

    def f(x):
        pick = cuda_impl.table_choice("norm_modulate", torch.device("cuda", 0), torch.bfloat16, 1152)
        return x + (1 if pick == "cuda" else 2)

    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(3)), torch.ones(3))


def test_info_reports_the_backend_table(tmp_path, monkeypatch):
    from ditfast import info

    monkeypatch.setenv(cuda_impl.TABLE_ENV, str(tmp_path / "table.json"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    assert "no entries for this GPU" in info._table_line()
    cuda_impl.save_table([{"op": "norm_modulate", "dtype": "bfloat16", "width_min": 1, "width_max": 4096,
                           "backend": "cuda"}], "Fake GPU")
    assert "1 entries for this GPU" in info._table_line()
    (tmp_path / "table.json").write_text("{}")
    assert "unreadable" in info._table_line()


def test_backend_table_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else", "devices": {}}))
    with pytest.raises(ValueError, match="not a ditfast backend table"):
        cuda_impl.load_table(bad)
    bad.write_text(json.dumps({"format": cuda_impl.TABLE_FORMAT, "devices": {"G": {"entries": [{"op": "x"}]}}}))
    with pytest.raises(ValueError, match="bad entry"):
        cuda_impl.load_table(bad)
    with pytest.raises(ValueError, match="lacks"):
        cuda_impl.save_table([{"op": "norm_modulate"}], "G", path=tmp_path / "t.json")
    assert cuda_impl.load_table(tmp_path / "missing.json") == {}


def test_import_without_c_extension():
    """`import ditfast` and the ops work when ditfast._C cannot be imported; the "cuda" backend is
    then reported unavailable with the reason (fresh interpreter, _C import blocked)."""
    code = textwrap.dedent(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ditfast._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, ditfast
        from ditfast import _backend, _ext
        from ditfast.ops import cuda_impl
        assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules  # import stays light
        ok, why = _backend.availability("cuda", "cpu")
        assert not ok and "blocked for the test" in why, why
        x = torch.randn(2, 3, 8)
        out = ditfast.ops.norm_modulate(x, None, torch.zeros(2, 8))
        assert out.shape == x.shape
        print("OK", why)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_arch_coverage_rule():
    """Which DITFAST_CUDA_ARCHS builds run on which GPU (used to report the "cuda" backend
    unavailable instead of failing with "no kernel image" at the first launch)."""
    covered = _ext.arch_covered
    assert covered(("8.0", "9.0"), (9, 0)) and covered(("8.0", "9.0"), (8, 6))
    assert not covered(("8.0",), (9, 0))  # sm_80 SASS does not run on Hopper
    assert covered(("8.0+PTX",), (9, 0))  # PTX is JIT-compiled for newer GPUs
    assert covered(("9.0a",), (9, 0)) and not covered(("9.0a",), (10, 0))
    assert not covered(("8.6",), (8, 0)) and not covered(("9.0",), (8, 9))
