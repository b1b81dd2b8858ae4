"""Triton backend of rms_norm, apply_rope and qk_norm_rope against ditfast.reference.rope.

Every numerical test runs the op under ``ditfast.use_backend("triton")`` and compares it with the
reference by the tolerance rule (docs/numerics.md) (ditfast.testing.check_op), forward and backward, in fp32 / bf16 / fp16.
Without a GPU the kernels run under the Triton interpreter on CPU tensors (small, awkward shapes);
with one, the same tests run on CUDA and add model-sized cases.
"""
from __future__ import annotations

import pytest
import torch

import ditfast
from ditfast import _backend, ops, reference
from ditfast.ops import rope as rope_ops
from ditfast.testing import check_op

pytest.importorskip("triton")  # the triton backend's tests need triton (the reference's do not)

from ditfast.kernels.triton import rope as rope_kernels  # noqa: E402

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AXES = {40: (8, 16, 16), 64: (16, 24, 24), 72: (8, 32, 32), 128: (16, 56, 56)}  # FLUX-style split of Dh


def triton_backend():
    return ditfast.use_backend("triton")


def tables(B, L, Dh, device, per_batch=False, requires_grad=False):
    """fp32 (cos, sin) from random multi-axis ids: (L, Dh/2), or (B, L, Dh/2) per batch."""
    ids = torch.randint(0, 64, (B, L, 3) if per_batch else (L, 3), device=device)
    cos, sin = reference.rope_freqs(ids, AXES[Dh])
    return cos.requires_grad_(requires_grad), sin.requires_grad_(requires_grad)


def weight(Dh, dtype, device):
    return (1 + 0.3 * torch.randn(Dh, device=device)).to(dtype).requires_grad_()


def split_qk(src, layout, B, L, H, Dh):
    """q, k (B, L, H, Dh) taken from one source tensor the way the blocks do.

    packed: ``qkv.view(B, L, 3, H, Dh).unbind(2)`` of a (B, L, 3·H·Dh) projection; wide: FLUX's
    single-stream ``linear1`` row [q | k | v | mlp] of width 7·H·Dh; separate: two halves of a
    (2, B, L, H, Dh) tensor (contiguous q and k).
    """
    D = H * Dh
    if layout == "packed":
        q, k, _ = src.view(B, L, 3, H, Dh).unbind(2)
    elif layout == "wide":
        q, k = src[..., :D].view(B, L, H, Dh), src[..., D : 2 * D].view(B, L, H, Dh)
    else:
        q, k = src.unbind(0)
    return q, k


def qk_source(layout, B, L, H, Dh, dtype, device):
    D = H * Dh
    shape = {"packed": (B, L, 3 * D), "wide": (B, L, 7 * D), "separate": (2, B, L, H, Dh)}[layout]
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_()


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
def test_triton_backend_is_selected(device):
    with triton_backend():
        assert _backend.select("rms_norm", torch.device(device)) is rope_ops._rms_norm_triton
        assert _backend.select("apply_rope", torch.device(device)) is rope_ops._apply_rope_triton
        assert _backend.select("qk_norm_rope", torch.device(device)) is rope_ops._qk_norm_rope_triton


# --------------------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------------------
def _rms_inputs(case, dtype, device):
    """(x, weight) for the named case; x may be a non-contiguous view."""
    if case == "hidden":  # (B, L, D) with an awkward D
        return torch.randn(3, 7, 200, device=device, dtype=dtype).requires_grad_(), weight(200, dtype, device)
    if case == "odd_no_weight":  # 2-D, odd D, no weight
        return torch.randn(77, 77, device=device, dtype=dtype).requires_grad_(), None
    if case == "fp32_weight":  # low-precision x with an fp32 weight (mixed precision)
        return torch.randn(2, 7, 72, device=device, dtype=dtype).requires_grad_(), weight(72, torch.float32, device)
    if case == "transposed":  # leading dims not mergeable: (3, 7, 72) view of a (7, 3, 72) tensor
        base = torch.randn(7, 3, 72, device=device, dtype=dtype)
        return base.transpose(0, 1).requires_grad_(), weight(72, dtype, device)
    if case == "five_dims":  # more leading dims than the kernel's three: merged (or copied)
        base = torch.randn(2, 3, 2, 5, 40, device=device, dtype=dtype)
        return base.transpose(1, 2).requires_grad_(), weight(40, dtype, device)
    raise AssertionError(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["hidden", "odd_no_weight", "fp32_weight", "transposed", "five_dims"])
def test_rms_norm(case, dtype, device):
    x, w = _rms_inputs(case, dtype, device)
    args = [x] if w is None else [x, w]
    with triton_backend():
        check_op(
            lambda x, w=None: ops.rms_norm(x, w, eps=1e-6),
            lambda x, w=None: reference.rms_norm(x, w, eps=1e-6),
            args,
            name=f"rms_norm[{case}]",
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_of_packed_qkv(dtype, device):
    """Per-head RMSNorm on a strided (B, L, H, Dh) view of a packed projection."""
    B, L, H, Dh = 2, 7, 3, 40
    qkv = torch.randn(B, L, 3 * H * Dh, device=device, dtype=dtype).requires_grad_()
    w = weight(Dh, dtype, device)

    def run(fn):
        return lambda qkv, w: fn(qkv.view(B, L, 3, H, Dh)[:, :, 1], w, eps=1e-6)

    with triton_backend():
        check_op(run(ops.rms_norm), run(reference.rms_norm), [qkv, w], name="rms_norm[packed]")


# --------------------------------------------------------------------------------------------------
# apply_rope
# --------------------------------------------------------------------------------------------------
ROPE_CASES = [  # (B, L, H, Dh, per-batch tables, x a strided view)
    (3, 7, 2, 40, False, False),
    (1, 77, 3, 72, True, True),
    (2, 1, 5, 64, True, False),
    (1, 7, 4, 128, False, True),
]
if ON_GPU:
    ROPE_CASES += [(2, 1024 + 77, 24, 128, False, True), (3, 256, 16, 72, True, False)]


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", ROPE_CASES, ids=lambda c: "x".join(map(str, c[:4])) + ("-bt" if c[4] else "") + ("-view" if c[5] else "")
)
def test_apply_rope(case, dtype, interleaved, device):
    B, L, H, Dh, per_batch, strided = case
    cos, sin = tables(B, L, Dh, device, per_batch)
    src = torch.randn(B, L, H, 2 * Dh if strided else Dh, device=device, dtype=dtype).requires_grad_()

    def run(fn):
        def f(src):
            x = src[..., Dh:] if strided else src  # a view with row stride 2·Dh and an offset
            return fn(x, cos, sin, interleaved=interleaved)

        return f

    with triton_backend():
        check_op(run(ops.apply_rope), run(reference.apply_rope), [src], name="apply_rope")


# --------------------------------------------------------------------------------------------------
# qk_norm_rope
# --------------------------------------------------------------------------------------------------
QK_CASES = [  # (B, L, H, Dh, layout of q/k, per-batch tables)
    (3, 7, 2, 40, "packed", False),
    (1, 77, 3, 72, "wide", True),
    (2, 1, 5, 64, "separate", True),
    (1, 7, 4, 128, "packed", False),
]
if ON_GPU:
    QK_CASES += [  # FLUX-dev at 1024 px, FLUX single-stream rows, SD3.5-large
        (1, 4096 + 512, 24, 128, "packed", False),
        (2, 1024, 24, 128, "wide", True),
        (2, 1024, 38, 64, "packed", False),
    ]


def _qk_fns(layout, B, L, H, Dh, cos, sin, interleaved):
    def run(fn):
        def f(src, qw=None, kw=None):
            q, k = split_qk(src, layout, B, L, H, Dh)
            return fn(q, k, qw, kw, cos, sin, eps=1e-6, interleaved=interleaved)

        return f

    return run(ops.qk_norm_rope), run(reference.qk_norm_rope)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", QK_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-{c[4]}" + ("-bt" if c[5] else "")
)
def test_qk_norm_rope(case, dtype, interleaved, device):
    B, L, H, Dh, layout, per_batch = case
    cos, sin = tables(B, L, Dh, device, per_batch)
    src = qk_source(layout, B, L, H, Dh, dtype, device)
    q, k = split_qk(src, layout, B, L, H, Dh)
    assert layout == "separate" or not (q.is_contiguous() or k.is_contiguous())  # really strided views
    fast, ref = _qk_fns(layout, B, L, H, Dh, cos, sin, interleaved)
    with triton_backend():
        check_op(fast, ref, [src, weight(Dh, dtype, device), weight(Dh, dtype, device)], name=f"qk_norm_rope[{layout}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["no_weights", "no_rope"])
def test_qk_norm_rope_optional_inputs(variant, dtype, device):
    B, L, H, Dh = 2, 7, 3, 72
    cos, sin = (None, None) if "no_rope" in variant else tables(B, L, Dh, device)
    src = qk_source("packed", B, L, H, Dh, dtype, device)
    fast, ref = _qk_fns("packed", B, L, H, Dh, cos, sin, True)
    if variant == "no_weights":  # RoPE only, no norm (docs/design.md, section 3)
        args = [src]
    else:
        args = [src, weight(Dh, dtype, device), weight(Dh, dtype, device)]
    with triton_backend():
        check_op(fast, ref, args, name=f"qk_norm_rope[{variant}]")


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["packed-BLP", "separate-LP", "no-rope", "table-grad"])
def test_qk_norm_rope_across_heads(case, dtype, interleaved, device):
    """across_heads=True (Wan's QK-norm: one rstd per token over H·Dh, weights (H·Dh,), RoPE per head), forward
    and backward by the rule against the reference, views of a packed projection included; the table
    gradients summed over the heads; half-split pairs (per head) run the reference."""
    B, L, H, Dh = 2, 7, 3, 40
    layout = "packed" if case.startswith("packed") else "separate"
    src = qk_source(layout, B, L, H, Dh, dtype, device)
    cos, sin = (None, None) if case == "no-rope" else tables(B, L, Dh, device, per_batch=case == "packed-BLP",
                                                             requires_grad=case == "table-grad")

    def fns(op):
        def f(src, qw, kw, *tabs):
            q, k = split_qk(src, layout, B, L, H, Dh)
            c, s_ = tabs if tabs else (cos, sin)
            return op(q, k, qw, kw, c, s_, interleaved=interleaved, across_heads=True)
        return f

    args = [src, weight(H * Dh, dtype, device), weight(H * Dh, dtype, device)]
    if case == "table-grad":
        args += [cos, sin]
    with triton_backend():
        check_op(fns(ops.qk_norm_rope), fns(reference.qk_norm_rope), args, name=f"qk_norm_rope[across {case}]")


def test_qk_norm_rope_across_heads_is_not_per_head(device):
    """The norm really spans the heads: scaling one head changes the others' outputs (per head it would not)."""
    B, L, H, Dh = 1, 5, 3, 40
    q = torch.randn(B, L, H, Dh, device=device)
    cos, sin = tables(B, L, Dh, device)
    w = torch.ones(H * Dh, device=device)
    with triton_backend():
        base, _ = ops.qk_norm_rope(q, q, w, w, cos, sin, across_heads=True)
        q2 = q.clone()
        q2[:, :, 0] *= 3
        moved, _ = ops.qk_norm_rope(q2, q2, w, w, cos, sin, across_heads=True)
    assert not torch.allclose(base[:, :, 1:], moved[:, :, 1:])
    with pytest.raises(ValueError, match=rf"\({H * Dh},\)"):
        ops.qk_norm_rope(q, q, w[:Dh], w[:Dh], cos, sin, across_heads=True)


def test_qk_norm_rope_mixed_dtypes(device):
    """q and k of different dtypes (and weights of a third) in one launch."""
    B, L, H, Dh = 2, 7, 3, 72
    cos, sin = tables(B, L, Dh, device)
    q = torch.randn(B, L, H, Dh, device=device, dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(B, L, H, Dh, device=device, dtype=torch.float16).requires_grad_()
    args = [q, k, weight(Dh, torch.float32, device), weight(Dh, torch.bfloat16, device)]
    with triton_backend():
        check_op(
            lambda q, k, qw, kw: ops.qk_norm_rope(q, k, qw, kw, cos, sin, interleaved=False),
            lambda q, k, qw, kw: reference.qk_norm_rope(q, k, qw, kw, cos, sin, interleaved=False),
            args,
            name="qk_norm_rope[mixed]",
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flux_rounding_convention(dtype, device):
    """Low-precision outputs equal the same-dtype reference (normalize in fp32, round, times the
    rounded weight, round, rotate in fp32, round) up to rare one-ulp flips from fp32 reassociation;
    skipping the intermediate roundings would change about a quarter of the elements."""
    B, L, H, Dh = 2, 7, 5, 72
    q, k = torch.randn(2, B, L, H, Dh, device=device, dtype=dtype).unbind(0)
    qw, kw = weight(Dh, dtype, device).detach(), weight(Dh, dtype, device).detach()
    cos, sin = tables(B, L, Dh, device)
    with triton_backend():
        outs = (ops.rms_norm(q, qw),) + ops.qk_norm_rope(q, k, qw, kw, cos, sin)
    refs = (reference.rms_norm(q, qw),) + reference.qk_norm_rope(q, k, qw, kw, cos, sin)
    for out, ref in zip(outs, refs):
        assert out.dtype == dtype
        assert (out != ref).float().mean().item() < 0.01


# --------------------------------------------------------------------------------------------------
# cos / sin gradients (supported: tables that require grad get their gradients)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_batch", [False, True], ids=["LP", "BLP"])
@pytest.mark.parametrize("op", ["apply_rope", "qk_norm_rope"])
def test_table_gradients(op, per_batch, dtype, device):
    B, L, H, Dh = 2, 7, 3, 40
    cos, sin = tables(B, L, Dh, device, per_batch, requires_grad=True)
    if op == "apply_rope":
        x = torch.randn(B, L, H, Dh, device=device, dtype=dtype).requires_grad_()
        fast = lambda x, c, s: ops.apply_rope(x, c, s, interleaved=False)  # noqa: E731
        ref = lambda x, c, s: reference.apply_rope(x, c, s, interleaved=False)  # noqa: E731
        args = [x, cos, sin]
    else:
        src = qk_source("packed", B, L, H, Dh, dtype, device)

        def run(fn):
            return lambda s, qw, kw, c, sn: fn(*split_qk(s, "packed", B, L, H, Dh), qw, kw, c, sn)

        fast, ref = run(ops.qk_norm_rope), run(reference.qk_norm_rope)
        args = [src, weight(Dh, dtype, device), weight(Dh, dtype, device), cos, sin]
    with triton_backend():
        check_op(fast, ref, args, name=f"{op} table grads")


# --------------------------------------------------------------------------------------------------
# Many tiles: small tiles force several tiles per persistent backward program and a ragged last tile
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 rows (for Dh = 40) and at most 3 backward programs."""
    monkeypatch.setattr(rope_kernels, "_TILE_ELEMS", 256)
    monkeypatch.setattr(rope_kernels, "_TILE_ELEMS_INTERPRETER", 256)
    monkeypatch.setattr(rope_kernels, "_n_programs", lambda n_tiles, device: min(n_tiles, 3))


def test_many_tiles(small_tiles, device):
    B, L, H, Dh = 3, 3, 3, 40  # 27 rows: 7 tiles (the last one ragged, tiles span tokens), 3 programs
    plan = rope_kernels._Plan(B * L * H, Dh, True, torch.device(device))
    assert plan.BLOCK_R == 4 and plan.n_tiles == 7
    cos, sin = tables(B, L, Dh, device, per_batch=True, requires_grad=True)
    src = qk_source("wide", B, L, H, Dh, torch.float32, device)
    fast, ref = _qk_fns("wide", B, L, H, Dh, cos, sin, True)
    x = torch.randn(B * L, 3 * Dh + 1, device=device).requires_grad_()  # odd D, one row per tile
    with triton_backend():
        ws = [weight(Dh, torch.float32, device), weight(Dh, torch.float32, device)]
        check_op(fast, ref, [src] + ws, name="qk tiles")
        check_op(ops.rms_norm, reference.rms_norm, [x, weight(3 * Dh + 1, torch.float32, device)], name="rms tiles")


def test_backward_is_deterministic(small_tiles, device):
    B, L, H, Dh = 3, 3, 3, 40
    cos, sin = tables(B, L, Dh, device)
    src = qk_source("packed", B, L, H, Dh, torch.float32, device)
    qw, kw = weight(Dh, torch.float32, device), weight(Dh, torch.float32, device)
    grads = []
    with triton_backend():
        for _ in range(2):
            q, k = split_qk(src, "packed", B, L, H, Dh)
            qo, ko = ops.qk_norm_rope(q, k, qw, kw, cos, sin)
            grads.append(torch.autograd.grad((qo * ko).sum(), [src, qw, kw]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------------
def test_empty_inputs(device):
    cos, sin = tables(2, 0, 40, device)
    q = torch.randn(2, 0, 3, 40, device=device).requires_grad_()
    k = torch.randn(2, 0, 3, 40, device=device).requires_grad_()
    qw = weight(40, torch.float32, device)
    x = torch.randn(0, 72, device=device, dtype=torch.bfloat16).requires_grad_()
    with triton_backend():
        qo, ko = ops.qk_norm_rope(q, k, qw, qw, cos, sin)
        r = ops.apply_rope(q, cos, sin, interleaved=False)
        y = ops.rms_norm(x, None)
        assert qo.shape == ko.shape == r.shape == q.shape and y.shape == x.shape and y.dtype == x.dtype
        (qo.sum() + ko.sum() + r.sum() + y.float().sum()).backward()
    assert q.grad.shape == q.shape and x.grad.shape == x.shape
    assert torch.equal(qw.grad, torch.zeros_like(qw))


def test_outputs_are_new_contiguous_tensors_and_inputs_untouched(device):
    B, L, H, Dh = 2, 7, 3, 40
    qkv = torch.randn(B, L, 3 * H * Dh, device=device, dtype=torch.bfloat16)
    before = qkv.clone()
    q, k, _ = qkv.view(B, L, 3, H, Dh).unbind(2)
    cos, sin = tables(B, L, Dh, device)
    with triton_backend():
        qo, ko = ops.qk_norm_rope(q, k, None, None, cos, sin)
        r = ops.apply_rope(q, cos, sin)
    for t in (qo, ko, r):
        assert t.is_contiguous() and t.shape == (B, L, H, Dh) and t.dtype == torch.bfloat16
        assert t.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()
    assert torch.equal(qkv, before)


def test_only_one_input_requires_grad(device):
    """k frozen, q trainable: the q grad matches the reference and k gets none."""
    B, L, H, Dh = 2, 7, 3, 40
    cos, sin = tables(B, L, Dh, device)
    q = torch.randn(B, L, H, Dh, device=device).requires_grad_()
    k = torch.randn(B, L, H, Dh, device=device)
    with triton_backend():
        qo, ko = ops.qk_norm_rope(q, k, None, None, cos, sin)
    (gq,) = torch.autograd.grad(qo.pow(2).sum() + ko.sum(), [q])
    q2 = q.detach().requires_grad_()
    qr, kr = reference.qk_norm_rope(q2, k, None, None, cos, sin)
    (gr,) = torch.autograd.grad(qr.pow(2).sum() + kr.sum(), [q2])
    torch.testing.assert_close(gq, gr, rtol=1e-4, atol=1e-5)
    assert k.grad is None


def test_rows_wider_than_a_tile_are_rejected(device):
    """The triton implementations declare max_width = the kernels' MAX_D: asked for by name, a wider row
    is the dispatcher's RuntimeError naming the width; the kernel launcher refuses it too."""
    assert rope_ops._TRITON_MAX_ROW == rope_kernels.MAX_D
    x = torch.randn(1, rope_kernels.MAX_D + 2, device=device)
    with triton_backend(), pytest.raises(RuntimeError, match=f"width {rope_kernels.MAX_D + 2} > {rope_kernels.MAX_D}"):
        ops.rms_norm(x, None)
    with pytest.raises(ValueError, match="rows up to"):
        rope_kernels._Plan(1, rope_kernels.MAX_D + 2, False, x.device)


# --------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------
def _opcheck_cases(device):
    B, L, H, Dh = 2, 3, 2, 40
    qkv = torch.randn(B, L, 3 * H * Dh, device=device, dtype=torch.bfloat16)
    q, k, _ = qkv.view(B, L, 3, H, Dh).unbind(2)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()  # detach keeps the strides
    qw, kw = weight(Dh, torch.bfloat16, device), weight(Dh, torch.float32, device)
    cos, sin = tables(B, L, Dh, device, per_batch=True)
    cos_g, sin_g = tables(B, L, Dh, device, requires_grad=True)
    x = torch.randn(3, 5, 72, device=device, dtype=torch.float16).requires_grad_()
    rstd = torch.rand(3, 5, device=device) + 0.5
    qr = torch.rand(B, L, H, device=device) + 0.5
    tr = torch.rand(B, L, 1, device=device) + 0.5  # per token (across heads)
    wide_qw, wide_kw = weight(H * Dh, torch.bfloat16, device), weight(H * Dh, torch.float32, device)
    g = torch.randn(B, L, H, Dh, device=device, dtype=torch.bfloat16)
    d = torch.ops.ditfast
    # backward ops are called on detached tensors: they have no autograd formula (no double backward)
    return [
        (d.rms_norm.default, (x, weight(72, torch.float16, device), 1e-6)),
        (d.rms_norm.default, (x, None, 1e-6)),
        (d.rms_norm_backward.default, (torch.randn_like(x), x.detach(), weight(72, torch.float16, device).detach(), rstd)),
        (d.apply_rope.default, (q, cos_g, sin_g, False)),
        (d.apply_rope_backward.default, (g, None, cos, sin, True)),
        (d.apply_rope_backward.default, (g, q.detach(), cos, sin, False)),
        (d.qk_norm_rope.default, (q, k, qw, kw, cos, sin, 1e-6, True, False)),
        (d.qk_norm_rope.default, (q, k, None, kw, cos_g, sin_g, 1e-6, False, False)),
        (d.qk_norm_rope.default, (q, k, None, None, None, None, 1e-6, True, False)),
        (d.qk_norm_rope_backward.default, (g, g, q.detach(), k.detach(), qw.detach(), None, qr, qr, cos, sin, True, True,
                                           False)),
        # across heads (Wan): weights of H·Dh, one rstd per token
        (d.qk_norm_rope.default, (q, k, wide_qw, wide_kw, cos_g, sin_g, 1e-6, True, True)),
        (d.qk_norm_rope_backward.default, (g, g, q.detach(), k.detach(), wide_qw.detach(), wide_kw.detach(), tr, tr,
                                           cos, sin, True, False, True)),
    ]


@pytest.mark.parametrize("i", range(12))
def test_opcheck(i, device):
    op, args = _opcheck_cases(device)[i]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    B, L, H, Dh = 2, 7, 3, 40
    cos, sin = tables(B, L, Dh, device)

    def f(qkv, qw, kw):
        q, k, _ = qkv.view(B, L, 3, H, Dh).unbind(2)
        qo, ko = ops.qk_norm_rope(q, k, qw, kw, cos, sin)
        return ops.apply_rope(qo, cos, sin, interleaved=False) * ops.rms_norm(ko, kw)

    qkv = torch.randn(B, L, 3 * H * Dh, device=device)
    qw, kw = weight(Dh, torch.float32, device), weight(Dh, torch.float32, device)
    results = []
    with triton_backend():
        f(qkv, qw, kw)  # eager first: backend probes are cached before tracing
        for fn in (f, torch.compile(f, fullgraph=True, dynamic=False)):
            inputs = [t.detach().clone().requires_grad_() for t in (qkv, qw, kw)]
            out = fn(*inputs)
            grads = torch.autograd.grad(out.pow(2).sum(), inputs)
            results.append((out,) + grads)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
