"""The adaLN family on the "triton" backend (ditfast.ops.modulate ↔ ditfast.kernels.triton.modulate).

Every op is compared with ditfast.reference by the tolerance rule (docs/numerics.md) (ditfast.testing.check_op), forward and
backward with gradients for every input, in fp32 / bf16 / fp16. Inputs are built inside the compared
functions as the views a DiT block passes (x a slice / transpose of a wider tensor; shift, scale, gate
chunks of one adaLN Linear output, per sample or per token, or (1, D) rows expanded over the batch), so
the kernels read them through their strides while the gradients land on the leaf tensors.
Runs on CUDA when present (larger shapes) and on CPU under the Triton interpreter otherwise.
"""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import ditfast
from ditfast import _backend
from ditfast import ops, reference
from ditfast.ops import modulate as modulate_ops
from ditfast.testing import check_op

from conftest import DEVICE, DTYPES, ON_GPU

EPS = 1e-6


# --- input builders ---------------------------------------------------------------------------------
def x_leaf(layout, B, L, D, dtype, device=DEVICE):
    """A leaf tensor whose view (x_view) is the (B, L, D) input in the given memory layout."""
    shape = {"contig": (B, L, D), "slice": (B, L, D + 11), "tokmajor": (L, B, D), "dstride": (B, D, L)}[layout]
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_()


def x_view(leaf, layout, D):
    if layout == "slice":  # a column window of a wider tensor, at an odd offset
        return leaf[..., 3 : 3 + D]
    if layout == "tokmajor":  # (L, B, D) storage: batch stride D, token stride B·D
        return leaf.transpose(0, 1)
    if layout == "dstride":  # feature stride L
        return leaf.transpose(1, 2)
    return leaf


def mod_leaf(kind, n, B, L, D, dtype, device=DEVICE):
    """The adaLN Linear output that n modulation tensors are chunks of: per "sample" (B, n·D), per
    "token" (B, L, n·D), or one row "expand"ed over the batch by the op (1, n·D)."""
    shape = {"sample": (B, n * D), "token": (B, L, n * D), "expand": (1, n * D)}[kind]
    return (0.5 * torch.randn(shape, device=device)).to(dtype).requires_grad_()


def xlayout_id(case):
    return "-".join(str(c) for c in case)


def run_check(fn, args, name):
    """check_op of fn(ops) on the triton backend against fn(reference)."""
    with ditfast.use_backend("triton"):
        check_op(lambda *a: fn(ops, *a), lambda *a: fn(reference, *a), args, name=name)


# Shapes: D in {72, 200} (plus 1152 once), L in {1, 7, 77}, batch 3 on the interpreter; on CUDA also
# real widths and token counts.
GPU_EXTRA = [(2, 1024, 1152, "slice", "sample"), (2, 333, 3072, "contig", "token")] if ON_GPU else []

# (B, L, D, x layout, modulation kind)
NM_CASES = [
    (3, 7, 72, "contig", "sample"),
    (3, 77, 200, "slice", "sample"),
    (3, 1, 72, "tokmajor", "token"),
    (3, 7, 200, "dstride", "expand"),
] + GPU_EXTRA


# --- norm_modulate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NM_CASES, ids=xlayout_id)
def test_norm_modulate(case, dtype):
    B, L, D, layout, kind = case
    with_shift = layout != "tokmajor"  # one case per dtype without shift

    def fn(lib, xl, ml):
        shift, scale = ml.chunk(6, -1)[:2]  # chunks of a (.., 6·D) adaLN output: row stride 6·D
        return lib.norm_modulate(x_view(xl, layout, D), shift if with_shift else None, scale, eps=EPS)

    run_check(fn, [x_leaf(layout, B, L, D, dtype), mod_leaf(kind, 6, B, L, D, dtype)], "norm_modulate")


def test_norm_modulate_mixed_dtypes():
    """An fp32 residual stream modulated by bf16 shift/scale gives fp32, with grads in each input's dtype."""
    B, L, D = 3, 7, 72

    def fn(lib, xl, ml):
        shift, scale = ml.chunk(2, -1)
        return lib.norm_modulate(xl, shift, scale, eps=EPS)

    xl, ml = x_leaf("contig", B, L, D, torch.float32), mod_leaf("sample", 2, B, L, D, torch.bfloat16)
    with ditfast.use_backend("triton"):
        assert ops.norm_modulate(xl, *ml.chunk(2, -1)).dtype == torch.float32
    run_check(fn, [xl, ml], "norm_modulate mixed")


# --- norm_modulate_dual -----------------------------------------------------------------------------
DUAL_CASES = [(3, 7, 72, "contig", "sample"), (3, 77, 200, "slice", "token")] + GPU_EXTRA[:1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DUAL_CASES, ids=xlayout_id)
def test_norm_modulate_dual(case, dtype):
    B, L, D, layout, kind = case
    # per-sample case: second shift absent; per-token case: first shift absent
    drop1, drop2 = kind == "token", kind == "sample"

    def fn(lib, xl, ml):
        c = ml.chunk(9, -1)  # SD3.5 dual block order: shift1, scale1, gate1, ..., shift2, scale2, gate2
        return lib.norm_modulate_dual(
            x_view(xl, layout, D), None if drop1 else c[0], c[1], None if drop2 else c[6], c[7], eps=EPS
        )

    run_check(fn, [x_leaf(layout, B, L, D, dtype), mod_leaf(kind, 9, B, L, D, dtype)], "norm_modulate_dual")


def test_norm_modulate_dual_mixed_per_sample_and_token():
    """One pair per sample, the other per token, from different dtypes."""
    B, L, D = 3, 7, 72

    def fn(lib, xl, m1, m2):
        return lib.norm_modulate_dual(xl, *m1.chunk(2, -1), *m2.chunk(2, -1), eps=EPS)

    args = [
        x_leaf("contig", B, L, D, torch.bfloat16),
        mod_leaf("sample", 2, B, L, D, torch.float32),
        mod_leaf("token", 2, B, L, D, torch.bfloat16),
    ]
    run_check(fn, args, "norm_modulate_dual mixed")


# --- gated_residual ---------------------------------------------------------------------------------
GR_CASES = [
    (3, 7, 72, "contig", "sample"),
    (3, 77, 200, "slice", "token"),
    (3, 1, 200, "tokmajor", "expand"),
] + GPU_EXTRA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GR_CASES, ids=xlayout_id)
def test_gated_residual(case, dtype):
    B, L, D, layout, kind = case

    def fn(lib, xl, yl, ml):
        gate = ml.chunk(3, -1)[2]
        return lib.gated_residual(x_view(xl, layout, D), x_view(yl, "dstride", D), gate)

    args = [x_leaf(layout, B, L, D, dtype), x_leaf("dstride", B, L, D, dtype), mod_leaf(kind, 3, B, L, D, dtype)]
    run_check(fn, args, "gated_residual")


def test_gated_residual_mixed_dtypes():
    B, L, D = 3, 7, 200

    def fn(lib, x, y, ml):
        return lib.gated_residual(x, y, ml.chunk(3, -1)[2])

    args = [
        x_leaf("contig", B, L, D, torch.float32),
        x_leaf("contig", B, L, D, torch.bfloat16),
        mod_leaf("sample", 3, B, L, D, torch.float16),
    ]
    run_check(fn, args, "gated_residual mixed")


# --- gated_residual_norm_modulate -------------------------------------------------------------------
GRNM_CASES = [
    (3, 7, 72, "contig", "sample"),
    (3, 77, 200, "slice", "sample"),
    (3, 1, 72, "dstride", "token"),
] + GPU_EXTRA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GRNM_CASES, ids=xlayout_id)
def test_gated_residual_norm_modulate(case, dtype):
    """Both outputs get gradients, so dx combines the gradient into x_new from outside and through h."""
    B, L, D, layout, kind = case
    with_shift = L != 77

    def fn(lib, xl, yl, ml):
        c = ml.chunk(6, -1)  # gate of the previous branch (chunk 2), shift/scale of the next (3, 4)
        y = x_view(yl, "tokmajor", D)
        return lib.gated_residual_norm_modulate(
            x_view(xl, layout, D), y, c[2], c[3] if with_shift else None, c[4], eps=EPS
        )

    args = [x_leaf(layout, B, L, D, dtype), x_leaf("tokmajor", B, L, D, dtype), mod_leaf(kind, 6, B, L, D, dtype)]
    run_check(fn, args, "gated_residual_norm_modulate")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_norm_modulate_wide(dtype):
    """DiT-XL's D = 1152 (a 2048-lane block with a masked tail)."""
    B, L, D = 3, 7, 1152

    def fn(lib, x, y, ml):
        c = ml.chunk(6, -1)
        return lib.gated_residual_norm_modulate(x, y, c[2], c[3], c[4], eps=EPS)

    args = [x_leaf("contig", B, L, D, dtype), x_leaf("contig", B, L, D, dtype), mod_leaf("sample", 6, B, L, D, dtype)]
    run_check(fn, args, "gated_residual_norm_modulate D=1152")


def test_gated_residual_norm_modulate_mixed_dtypes():
    """fp32 stream, bf16 branch output and modulation: x_new and h are fp32."""
    B, L, D = 3, 7, 72

    def fn(lib, x, y, ml):
        c = ml.chunk(3, -1)
        return lib.gated_residual_norm_modulate(x, y, c[0], c[1], c[2], eps=EPS)

    args = [
        x_leaf("contig", B, L, D, torch.float32),
        x_leaf("contig", B, L, D, torch.bfloat16),
        mod_leaf("token", 3, B, L, D, torch.bfloat16),
    ]
    run_check(fn, args, "gated_residual_norm_modulate mixed")


def _fused_backends():
    from ditfast import _ext

    no_c = pytest.mark.skipif(_ext.load() is None, reason="ditfast._C is not built")
    return ["triton", pytest.param("cuda", marks=no_c)]


@pytest.mark.parametrize("backend", _fused_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gated_residual_norm_modulate_normalizes_the_returned_x_new(backend, dtype):
    """h is the LayerNorm of the x_new the fused op returns (rounded to its dtype), as the two-step
    eager computation gives, not of the unrounded fp32 sum: the same backend's norm_modulate of the
    returned x_new reproduces h bit for bit."""
    g = torch.Generator().manual_seed(0)
    B, L, D = 2, 33, 200
    x, y = (torch.randn(B, L, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    gate, shift, scale = torch.randn(3, B, D, generator=g).to(DEVICE, dtype).unbind(0)
    with ditfast.use_backend(backend):
        x_new, h = ops.gated_residual_norm_modulate(x, y, gate, shift, scale, eps=EPS)
        assert torch.equal(h, ops.norm_modulate(x_new, shift, scale, eps=EPS))


def test_gated_residual_norm_modulate_one_output_used():
    """Only h (or only x_new) feeds the loss: the other output's gradient is absent."""
    B, L, D = 3, 7, 72
    x = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    y = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    mod = torch.randn(B, 3 * D, device=DEVICE, requires_grad=True)
    for which in (0, 1):
        grads = []
        for backend in ("reference", "triton"):
            with ditfast.use_backend(backend):
                out = ops.gated_residual_norm_modulate(x, y, *mod.chunk(3, -1))[which]
            grads.append(torch.autograd.grad((out * out).sum(), [x, y, mod]))
        for g_ref, g_tri in zip(*grads):
            torch.testing.assert_close(g_tri, g_ref, rtol=1e-5, atol=1e-5)


# --- edge cases -------------------------------------------------------------------------------------
def _all_ops(x, y, mod):
    shift, scale, gate = mod.chunk(3, -1)
    return [
        ops.norm_modulate(x, shift, scale),
        *ops.norm_modulate_dual(x, shift, scale, None, gate),
        ops.gated_residual(x, y, gate),
        *ops.gated_residual_norm_modulate(x, y, gate, shift, scale),
    ]


def test_inference_path_matches_autograd_path():
    """Without autograd (no_grad / inference_mode) the kernels launch without the custom-op dispatch;
    the numbers are the same kernels' (bitwise), and no graph is recorded."""
    B, L, D = 3, 7, 72
    x = torch.randn(B, L, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(B, L, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    mod = torch.randn(B, 3 * D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with ditfast.use_backend("triton"):
        with_grad = _all_ops(x, y, mod)
        with torch.no_grad():
            no_grad = _all_ops(x, y, mod)
        with torch.inference_mode():
            inference = _all_ops(x, y, mod)
    for a, b, c in zip(with_grad, no_grad, inference):
        assert a.grad_fn is not None and b.grad_fn is None and c.grad_fn is None
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("needs", ["x", "mod"])
def test_some_inputs_need_grad(needs):
    """Gradients reach exactly the inputs that require them (frozen modulation, or frozen stream).
    The loss is a plain sum, so the incoming gradients are stride-0 expanded views."""
    B, L, D = 3, 7, 72
    x = torch.randn(B, L, D, device=DEVICE, requires_grad=needs == "x")
    y = torch.randn(B, L, D, device=DEVICE)
    mod = torch.randn(B, 3 * D, device=DEVICE, requires_grad=needs == "mod")
    leaf = x if needs == "x" else mod
    grads = []
    for backend in ("reference", "triton"):
        with ditfast.use_backend(backend):
            outs = _all_ops(x, y, mod)
        grads.append(torch.autograd.grad(sum(o.sum() for o in outs), leaf))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,L", [(3, 0), (0, 7)])
def test_empty_input(B, L):
    """No rows: empty outputs, no launch, and per-sample gradients are zeros of their shape."""
    D = 72
    x = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    y = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    mod = torch.randn(B, 3 * D, device=DEVICE, requires_grad=True)
    with ditfast.use_backend("triton"):
        outs = _all_ops(x, y, mod)
    for o in outs:
        assert o.shape == (B, L, D)
    gx, gy, gm = torch.autograd.grad(sum(o.sum() for o in outs), [x, y, mod])
    assert gx.shape == x.shape and gy.shape == y.shape and gm.shape == mod.shape
    assert torch.count_nonzero(gm) == 0


def test_max_d_constant_agrees():
    pytest.importorskip("triton")
    from ditfast.kernels.triton import modulate as kernels

    assert modulate_ops._TRITON_MAX_D == kernels.MAX_D == 16384


def test_d_at_limit_runs():
    """D = 16384, the widest row the kernels take, forward and backward."""
    B, L, D = 1, 2, 16384
    args = [torch.randn(B, L, D, device=DEVICE, requires_grad=True), mod_leaf("sample", 2, B, L, D, torch.float32)]
    run_check(lambda lib, x, m: lib.norm_modulate(x, *m.chunk(2, -1), eps=EPS), args, "norm_modulate D=16384")


def test_d_above_limit():
    """D > 16384: the triton implementations declare max_width 16384, so the explicitly requested
    triton backend raises the dispatcher's RuntimeError naming the width, and the automatic choice
    runs another implementation (the reference or the extension), with the right result."""
    D = 16385
    x = torch.randn(1, 2, D, device=DEVICE)
    y = torch.randn(1, 2, D, device=DEVICE)
    shift, scale, gate = torch.randn(3, 1, D, device=DEVICE).unbind(0)
    calls = {
        "norm_modulate": lambda lib: lib.norm_modulate(x, shift, scale),
        "norm_modulate_dual": lambda lib: lib.norm_modulate_dual(x, shift, scale, None, gate),
        "gated_residual": lambda lib: lib.gated_residual(x, y, gate),
        "gated_residual_norm_modulate": lambda lib: lib.gated_residual_norm_modulate(x, y, gate, shift, scale),
    }
    for name, call in calls.items():
        with ditfast.use_backend("triton"), pytest.raises(RuntimeError, match="width 16385 > 16384"):
            call(ops)
        with ditfast.use_backend("auto"):
            assert _backend.chosen_name(name, x.device, x) != "triton"
            got = call(ops)
        want = call(reference)
        for g, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            torch.testing.assert_close(g, w)


def test_backward_is_deterministic():
    """Per-sample gradients come from partial sums and one reduction: bitwise equal across runs."""
    B, L, D = 3, 77, 200
    x = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    y = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    mod = torch.randn(B, 3 * D, device=DEVICE, requires_grad=True)
    runs = []
    for _ in range(2):
        with ditfast.use_backend("triton"):
            shift, scale, gate = mod.chunk(3, -1)
            x_new, h = ops.gated_residual_norm_modulate(x, y, gate, shift, scale)
        runs.append(torch.autograd.grad((h * h).sum() + x_new.sum(), [x, y, mod]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- what autograd keeps ----------------------------------------------------------------------------
def saved_tensors(fn):
    """The tensors autograd saves while fn() runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_norm_modulate_saves_only_x_scale_and_stats():
    B, L, D = 3, 7, 72
    x = torch.randn(B, L, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    mod = torch.randn(B, 2 * D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with ditfast.use_backend("triton"):
        out, saved = saved_tensors(lambda: ops.norm_modulate(x, *mod.chunk(2, -1)))
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself, not the output
    stats = [t for t in saved if t.shape == (B, L)]
    assert len(stats) == 2 and all(t.dtype == torch.float32 for t in stats)  # mean, rstd
    rest = [t for t in saved if t.numel() not in (x.numel(), B * L)]
    assert len(rest) == 1 and rest[0].shape == (B, D)  # scale (a view of mod); shift is not saved
    assert not any(t.data_ptr() == out.data_ptr() for t in saved)


def test_gated_residual_norm_modulate_saves_x_new_not_h():
    B, L, D = 3, 7, 72
    x = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    y = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    mod = torch.randn(B, 3 * D, device=DEVICE, requires_grad=True)
    with ditfast.use_backend("triton"):
        (x_new, h), saved = saved_tensors(lambda: ops.gated_residual_norm_modulate(x, y, *mod.chunk(3, -1)))
    big = {t.data_ptr() for t in saved if t.numel() == x.numel()}
    assert big == {x_new.data_ptr(), y.data_ptr()}  # x_new (to recompute LN) and y (for d gate)
    assert sum(t.numel() for t in saved) == 2 * B * L * D + 2 * B * L + 2 * B * D  # + mean, rstd, gate, scale


# --- torch.library: opcheck and torch.compile --------------------------------------------------------
def _opcheck_cases():
    B, L, D = 2, 5, 40
    d = DEVICE

    def t(*shape, dtype=torch.float32, grad=False):
        return torch.randn(shape, dtype=dtype, device=d).requires_grad_(grad)

    x = t(B, L, D + 4, grad=True)[..., :D]  # strided
    mod = t(B, 6 * D, dtype=torch.bfloat16, grad=True)
    sh, sc, g, sh2, sc2, _ = mod.chunk(6, -1)
    y, tok = t(B, L, D, grad=True), t(B, L, D, dtype=torch.bfloat16, grad=True)
    xs = x.detach().contiguous()
    stats = torch.rand(2, B, L, device=d) + 0.5
    return {
        "norm_modulate": (x, sh, sc, EPS),
        "norm_modulate_noshift": (torch.ops.ditfast.norm_modulate, (x, None, tok, EPS)),
        "norm_modulate_dual": (x, sh, sc, None, tok, EPS),
        "gated_residual": (x, y, g),
        "gated_residual_norm_modulate": (x, y, g, sh2, sc2, EPS),
        # one modulation row broadcast over the batch (per sample and per token)
        "norm_modulate_one_row": (torch.ops.ditfast.norm_modulate, (x, sh[:1], sc[:1], EPS)),
        "gated_residual_norm_modulate_one_row": (
            torch.ops.ditfast.gated_residual_norm_modulate, (x, y, g[:1], tok[:1], sc[:1], EPS)
        ),
        "norm_modulate_backward": (t(B, L, D), xs, stats[0], stats[1], sc.detach(), torch.bfloat16, False, False),
        "norm_modulate_backward_one_row": (
            torch.ops.ditfast.norm_modulate_backward,
            (t(B, L, D), xs, stats[0], stats[1], sc[:1].detach(), torch.bfloat16, True, True),
        ),
        "norm_modulate_dual_backward": (
            t(B, L, D), t(B, L, D), xs, stats[0], stats[1], sc.detach(), tok.detach(),
            None, False, False, torch.float32, True, False,
        ),
        "gated_residual_backward": (t(B, L, D), y.detach(), g.detach()),
        "gated_residual_norm_modulate_backward": (
            t(B, L, D), t(B, L, D), xs, stats[0], stats[1], y.detach(), g.detach(), sc.detach(),
            torch.bfloat16, torch.bfloat16, False, False,
        ),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    pytest.importorskip("triton")
    case = _opcheck_cases()[name]
    op, args = case if isinstance(case[0], torch._ops.OpOverloadPacket) else (getattr(torch.ops.ditfast, name), case)
    torch.library.opcheck(op.default, args)


COMPILE_FNS = {
    "norm_modulate": lambda x, y, m: ops.norm_modulate(x, m[0], m[1]),
    "norm_modulate_dual": lambda x, y, m: ops.norm_modulate_dual(x, m[0], m[1], None, m[2]),
    "gated_residual": lambda x, y, m: ops.gated_residual(x, y, m[2]),
    "gated_residual_norm_modulate": lambda x, y, m: ops.gated_residual_norm_modulate(x, y, m[2], m[0], m[1]),
}


@pytest.mark.parametrize("name", list(COMPILE_FNS))
def test_compile_fullgraph(name):
    """fullgraph=True: no graph break around the custom ops, forward and backward, same numbers as eager.
    On CPU the aot_eager backend traces the same graphs (dynamo + AOTAutograd) without a C++ build."""
    pytest.importorskip("triton")
    B, L, D = 3, 7, 72
    x = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    y = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    mod = torch.randn(B, 3 * D, device=DEVICE, requires_grad=True)
    op = COMPILE_FNS[name]

    def loss(x, y, mod):
        outs = op(x, y, mod.chunk(3, -1))
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum((o * o).sum() for o in outs)

    inputs = [x, mod] if name.startswith("norm_modulate") else [x, y, mod]
    graphs = {}

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)

        return compiler

    # On CPU, AOTAutograd with recording compilers (what aot_eager does, plus a look at the graphs);
    # on CUDA, inductor.
    backend = "inductor" if ON_GPU else aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    with ditfast.use_backend("triton"):
        want = loss(x, y, mod)
        g_want = torch.autograd.grad(want, inputs)
        got = compiled(x, y, mod)
        g_got = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    if not ON_GPU:  # the forward and the backward graph each call the custom op
        assert f"ditfast.{name}.default" in graphs["fw"], graphs["fw"]
        assert f"ditfast.{name}_backward.default" in graphs["bw"], graphs["bw"]
