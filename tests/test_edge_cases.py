"""Edge cases of every op on the "triton" backend, each with its defined behaviour.

Defined behaviour (checked below):

* **Empty problems** (B = 0 or L = 0): outputs are empty tensors of the right shape and dtype, no
  kernel runs, and backward gives gradients of the inputs' shapes (zeros, as the reference's).
* **One token** (L = 1) and the smallest sizes: equal to the reference by the tolerance rule (docs/numerics.md).
* **Row width limits**: the adaLN kernels hold a row of D <= 16384 (``MAX_D`` of
  ditfast/kernels/triton/modulate.py) and the RMSNorm/RoPE kernels one of <= 65536
  (ditfast/kernels/triton/rope.py); rows of exactly that width work, wider ones raise a ValueError
  naming the limit when "triton" is requested explicitly. Attention takes head dims <= 256; a larger
  one on an explicitly requested "triton" raises the dispatcher's RuntimeError naming the head dim.
* **Non-finite input** (NaN / ±Inf in one row): propagates exactly as in the eager reference run in
  the same dtypes (same NaN / +Inf / -Inf positions), stays inside the rows the math mixes (one
  LayerNorm / RMSNorm row, one attention query row; a key or value row reaches every query of its
  (batch, head) only) and never hangs; all other outputs are finite and equal to the reference by
  the rule. Garbage (NaN) in the parts of a strided input's storage that the view does not cover is
  never read.
* **fp16 overflow** behaves like the reference run in fp16: the kernels compute in fp32 and round
  once, so a result beyond 65504 becomes ±Inf exactly where the reference's does
  (``gated_residual`` of two 6e4 values is +Inf; ``gated_residual_norm_modulate`` then gives an Inf
  x_new and an all-NaN h row, the LayerNorm of an infinite row); inputs near the fp16 maximum whose
  *result* is representable stay finite (LayerNorm / RMSNorm of ~6e4 values: the statistics are fp32).
* **Mixed dtypes** promote like eager PyTorch for the adaLN ops (ditfast/ops/modulate.py: the output
  is the promotion of the inputs' dtypes); the RMSNorm / RoPE ops return the dtype of q / k / x.
* **Wrong device, integer or float64 inputs** (float64 only on the reference backend) are rejected
  before any kernel runs: ValueError / TypeError naming the argument and what it got and expected.
"""
from __future__ import annotations

import contextlib
import math
import re
import signal

import pytest
import torch

import ditfast
from ditfast import ops, reference
from ditfast.testing import assert_by_rule, check_op

from conftest import DEVICE, ON_GPU

EPS = 1e-6
D, H, DH = 40, 2, 24  # hidden size; heads x head dim of the (B, L, H, Dh) ops


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging) when the body runs longer than ``seconds`` (main thread, Unix)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- one description per op: leaves and how the op is called on them ------------------------------------
def _t(shape, dtype=torch.float32, grad=True, scale=1.0, offset=0.0):
    return (torch.randn(shape) * scale + offset).to(DEVICE, dtype).requires_grad_(grad)


def _angles(L, B=None):
    return _t((L, DH // 2) if B is None else (B, L, DH // 2), scale=3.0, grad=False)


class Spec:
    """make(B, L, dtype) -> leaves; call(lib, *leaves) -> outputs; ``x`` the index of the row input."""

    def __init__(self, make, call, x=0):
        self.make, self.call, self.x = make, call, x


SPECS = {
    "norm_modulate": Spec(
        lambda B, L, dt: [_t((B, L, D), dt), _t((B, 2 * D), dt, scale=0.5)],
        lambda lib, x, m: lib.norm_modulate(x, *m.chunk(2, -1), eps=EPS),
    ),
    "norm_modulate_dual": Spec(
        lambda B, L, dt: [_t((B, L, D), dt), _t((B, 2 * D), dt, scale=0.5), _t((B, L, 2 * D), dt, scale=0.5)],
        lambda lib, x, m1, m2: lib.norm_modulate_dual(x, *m1.chunk(2, -1), *m2.chunk(2, -1), eps=EPS),
    ),
    "gated_residual": Spec(
        lambda B, L, dt: [_t((B, L, D), dt), _t((B, L, D), dt), _t((B, D), dt, scale=0.5)],
        lambda lib, x, y, g: lib.gated_residual(x, y, g),
    ),
    "gated_residual_norm_modulate": Spec(
        lambda B, L, dt: [_t((B, L, D), dt), _t((B, L, D), dt), _t((B, 3 * D), dt, scale=0.5)],
        lambda lib, x, y, m: lib.gated_residual_norm_modulate(x, y, *m.chunk(3, -1), eps=EPS),
    ),
    "rms_norm": Spec(
        lambda B, L, dt: [_t((B, L, D), dt), _t((D,), dt, scale=0.2, offset=1.0)],
        lambda lib, x, w: lib.rms_norm(x, w, eps=EPS),
    ),
    "apply_rope": Spec(
        lambda B, L, dt: [_t((B, L, H, DH), dt), _angles(L)],
        lambda lib, x, a: lib.apply_rope(x, a.cos(), a.sin()),
    ),
    "qk_norm_rope": Spec(
        lambda B, L, dt: [_t((B, L, 3 * H * DH), dt), _t((DH,), dt, scale=0.2, offset=1.0),
                          _t((DH,), dt, scale=0.2, offset=1.0), _angles(L, B)],
        lambda lib, qkv, qw, kw, a: lib.qk_norm_rope(
            *qkv.view(*qkv.shape[:2], 3, H, DH).unbind(2)[:2], qw, kw, a.cos(), a.sin(), eps=EPS
        ),
    ),
    "joint_attention": Spec(
        lambda B, L, dt: [_t((B, L, H, DH), dt), _t((B, L, H, DH), dt), _t((B, L, H, DH), dt)],
        lambda lib, q, k, v: lib.joint_attention(q, k, v),
    ),
}
OP_NAMES = list(SPECS)


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [o for o in out if o is not None]


def _run(spec, lib, leaves, backend="triton"):
    with ditfast.use_backend(backend):
        return _flat(spec.call(lib, *leaves))


def _half(leaves):
    """fp16 leaves requiring grad, except the fp32 RoPE angle leaves (no grad), which stay as they are."""
    return [t.detach().half().requires_grad_() if t.requires_grad else t for t in leaves]


def _fresh(leaves):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]


# --- empty problems -----------------------------------------------------------------------------------
@pytest.mark.parametrize("B,L", [(0, 5), (2, 0)], ids=["B0", "L0"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_empty(name, B, L):
    """Empty outputs of the reference's shapes and dtypes; empty (or zero) gradients of every input."""
    spec = SPECS[name]
    leaves = spec.make(B, L, torch.float32)
    with time_limit(60):
        fast = _run(spec, ops, leaves)
        ref = _flat(spec.call(reference, *_fresh(leaves)))
    assert len(fast) == len(ref)
    for f, r in zip(fast, ref):
        assert f.shape == r.shape and f.dtype == r.dtype and f.numel() == 0
    want = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(sum(o.sum() for o in fast), want, allow_unused=True)
    for g, t in zip(grads, want):
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype
        assert torch.count_nonzero(g) == 0  # nothing flowed: zeros (per-sample / weight grads) or empty


def test_attention_without_keys_or_queries():
    """Lq = 0: an empty output. Lk = 0 (nothing to attend to): the reference's all-zero output."""
    q, kv = _t((2, 3, H, DH)), _t((2, 0, H, DH))
    with ditfast.use_backend("triton"):
        assert ops.joint_attention(q[:, :0], q, q).shape == (2, 0, H, DH)
        out = ops.joint_attention(q, kv, kv)
    torch.testing.assert_close(out, reference.joint_attention(q, kv, kv), rtol=0, atol=0)


# --- one token, smallest sizes ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", OP_NAMES)
def test_single_token(name):
    """L = 1 (one row per sample; per-sample modulation gradients are that row alone), fp32 forward
    and backward, bf16 forward."""
    spec = SPECS[name]
    for dtype, grad in ((torch.float32, True), (torch.bfloat16, False)):
        leaves = [t.detach().requires_grad_(grad and t.requires_grad) for t in spec.make(2, 1, dtype)]
        with ditfast.use_backend("triton"), time_limit(60):
            check_op(lambda *a: spec.call(ops, *a), lambda *a: spec.call(reference, *a), leaves,
                     name=f"{name} L=1 {dtype}")


def test_smallest_rows():
    """D = 2 / Dh = 2 (one RoPE pair) and an odd RMSNorm width, forward and backward in fp32."""
    x, m = _t((2, 3, 2)), _t((2, 4), scale=0.5)
    q, k, a = _t((2, 3, 1, 2)), _t((2, 3, 1, 2)), _t((3, 1), grad=False)
    cases = [
        ("norm_modulate D=2", lambda lib, x, m: lib.norm_modulate(x, *m.chunk(2, -1)), [x, m]),
        ("rms_norm D=7", lambda lib, x: lib.rms_norm(x, None), [_t((2, 3, 7))]),
        ("qk_norm_rope Dh=2", lambda lib, q, k, w: lib.qk_norm_rope(q, k, w, w, a.cos(), a.sin()),
         [q, k, _t((2,), offset=1.0)]),
        ("apply_rope half Dh=2", lambda lib, q: lib.apply_rope(q, a.cos(), a.sin(), interleaved=False), [q]),
    ]
    for name, fn, args in cases:
        with ditfast.use_backend("triton"), time_limit(60):
            check_op(lambda *t: fn(ops, *t), lambda *t: fn(reference, *t), args, name=name)


# --- problems that span several tiles --------------------------------------------------------------------
# The property tests' small shapes (L <= 9) fit one tile of every kernel, so the loops that carry state
# from tile to tile -- the adaLN backward's per-chunk partial sums, the RMSNorm/RoPE backward's
# persistent programs accumulating weight gradients, attention's online softmax over key blocks and its
# backward over q / key blocks, ragged and exactly divisible -- are exercised here. Sizes: several tiles
# of the interpreter's configurations (and of the larger GPU ones on CUDA).
MULTI = {  # name: (cpu sizes, cuda sizes)
    "norm_modulate": ((1, 70, 2000), (1, 1200, 2000)),  # (B, L, D): 2+ tiles per backward chunk
    "gated_residual_norm_modulate": ((1, 70, 2000), (1, 1200, 2000)),
    "rms_norm": ((1, 70, 4096), (1, 600, 4096)),  # more row tiles than persistent programs
    "qk_norm_rope": ((1, 200, 6, 256), (1, 2400, 6, 256)),  # (B, L, H, Dh)
    "joint_attention": ((1, 70, 2, 40), (1, 300, 2, 40)),  # ragged: 3 blocks of 32 (of 128 on CUDA)
    "joint_attention_even": ((1, 64, 2, 40), (1, 256, 2, 40)),  # a whole number of blocks
}


@pytest.mark.parametrize("name", list(MULTI))
def test_multi_tile_paths(name):
    sizes = MULTI[name][1 if ON_GPU else 0]
    if name in ("norm_modulate", "gated_residual_norm_modulate"):
        B, L, Dm = sizes
        args = [_t((B, L, Dm)), _t((B, L, Dm)), _t((B, 3 * Dm), scale=0.5)]
        if name == "norm_modulate":
            fn = lambda lib, x, y, m: lib.norm_modulate(x, *m.chunk(3, -1)[:2])  # noqa: E731
            args[1].requires_grad_(False)
        else:
            fn = lambda lib, x, y, m: lib.gated_residual_norm_modulate(x, y, *m.chunk(3, -1))  # noqa: E731
    elif name == "rms_norm":
        B, L, Dm = sizes
        args = [_t((B, L, Dm)), _t((Dm,), scale=0.2, offset=1.0)]
        fn = lambda lib, x, w: lib.rms_norm(x, w)  # noqa: E731
    elif name == "qk_norm_rope":
        B, L, Hh, Dh = sizes
        a = _t((L, Dh // 2), grad=False, scale=3.0)
        args = [_t((B, L, 3 * Hh * Dh)), _t((Dh,), scale=0.2, offset=1.0), _t((Dh,), scale=0.2, offset=1.0)]
        fn = lambda lib, qkv, qw, kw: lib.qk_norm_rope(  # noqa: E731
            *qkv.view(B, L, 3, Hh, Dh).unbind(2)[:2], qw, kw, a.cos(), a.sin())
    else:
        B, L, Hh, Dh = sizes
        args = [_t((B, L, Hh, Dh), scale=2.0), _t((B, L + 3, Hh, Dh)), _t((B, L + 3, Hh, Dh))]
        fn = lambda lib, q, k, v: lib.joint_attention(q, k[:, 3:], v[:, 3:])  # noqa: E731
    with ditfast.use_backend("triton"), time_limit(300):
        check_op(lambda *a: fn(ops, *a), lambda *a: fn(reference, *a), args, name=f"{name} {sizes}")


# --- row width limits ---------------------------------------------------------------------------------
MODULATE_AT_LIMIT = {
    "norm_modulate_dual": (lambda lib, x, y, m: lib.norm_modulate_dual(x, *m.chunk(3, -1)[:2], None, m.chunk(3, -1)[2])),
    "gated_residual": (lambda lib, x, y, m: lib.gated_residual(x, y, m.chunk(3, -1)[2])),
    "gated_residual_norm_modulate": (lambda lib, x, y, m: lib.gated_residual_norm_modulate(x, y, *m.chunk(3, -1))),
}


@pytest.mark.parametrize("name", list(MODULATE_AT_LIMIT))
def test_modulate_ops_at_max_d(name):
    """D = 16384 = MAX_D of the adaLN kernels, one token (norm_modulate itself: tests/test_modulate.py)."""
    Dm = 16384
    fn = MODULATE_AT_LIMIT[name]
    args = [_t((1, 1, Dm)), _t((1, 1, Dm)), _t((1, 3 * Dm), scale=0.5)]
    if name == "norm_modulate_dual":
        args[1].requires_grad_(False)
    with ditfast.use_backend("triton"), time_limit(120):
        check_op(lambda *a: fn(ops, *a), lambda *a: fn(reference, *a), args, name=f"{name} D={Dm}")


def test_rms_norm_at_and_above_max_d():
    """A hidden-state RMSNorm of D = 65536 (MAX_D of the RMSNorm/RoPE kernels) works; D = 65537 on an
    explicitly requested "triton" is the dispatcher's RuntimeError naming the limit (nothing is computed)."""
    from ditfast.kernels.triton import rope as rope_kernels

    Dm = rope_kernels.MAX_D
    assert Dm == 65536
    with ditfast.use_backend("triton"), time_limit(120):
        check_op(lambda x, w: ops.rms_norm(x, w), lambda x, w: reference.rms_norm(x, w),
                 [_t((1, 1, Dm)), _t((Dm,), offset=1.0)], name="rms_norm D=65536")
        with pytest.raises(RuntimeError, match="width 65537 > 65536"):
            ops.rms_norm(torch.randn(1, 1, Dm + 1, device=DEVICE), None)


def test_attention_head_dim_limit():
    """Dh = 256 (the kernel's MAX_HEAD_DIM) runs; Dh = 264 on an explicitly requested "triton" raises
    the dispatcher's RuntimeError naming the head dim (the automatic choice picks another backend)."""
    q, k, v = (_t((1, 3, 1, 256)) for _ in range(3))
    with ditfast.use_backend("triton"), time_limit(120):
        check_op(lambda *a: ops.joint_attention(*a), reference.joint_attention, [q, k, v], name="attention Dh=256")
        big = torch.randn(1, 3, 1, 264, device=DEVICE)
        with pytest.raises(RuntimeError, match="width 264 > 256"):
            ops.joint_attention(big, big, big)
    with ditfast.use_backend("auto"):
        torch.testing.assert_close(ops.joint_attention(big, big, big), reference.joint_attention(big, big, big))


# --- strided inputs: never read outside the view ---------------------------------------------------------
def _in_nan_storage(shape, make_view, scale=1.0):
    """A view of the given shape into a storage that is NaN everywhere the view does not cover."""
    base, view = make_view(shape)
    base.fill_(float("nan"))
    with torch.no_grad():
        view.copy_(torch.randn(shape) * scale)
    return view


def _strided_views():
    """(B, L, D)-like and (B, L, H, Dh)-like views with holes: slices at odd offsets, last-dim stride 2."""
    def x3(shape):
        B, L, Dx = shape
        base = torch.empty(B + 1, L + 2, 2 * Dx + 3, device=DEVICE)
        return base, base[1:, 1 : 1 + L, 3 : 3 + 2 * Dx : 2]  # feature stride 2, holes between

    def x4(shape):
        B, L, Hx, Dx = shape
        base = torch.empty(B, L + 1, Hx + 1, Dx + 5, device=DEVICE)
        return base, base[:, 1:, 1:, 2 : 2 + Dx]

    def mod(shape):
        Bm, Dm = shape
        base = torch.empty(Bm, 3 * Dm, device=DEVICE)
        return base, base[:, Dm : 2 * Dm]

    def vec(shape):
        base = torch.empty(2 * shape[0] + 1, device=DEVICE)
        return base, base[1::2]

    return x3, x4, mod, vec


def test_nothing_read_outside_the_view():
    """Every tensor argument is a view whose storage holds NaN outside it: outputs (and the input
    gradients) are finite and equal the reference, for every op."""
    x3, x4, mod, vec = _strided_views()
    B, L = 2, 5
    nan = lambda shape, how, scale=1.0: _in_nan_storage(shape, how, scale=scale)  # noqa: E731
    a = torch.randn(L, DH // 2, device=DEVICE)
    cos_base = torch.full((L, DH), float("nan"), device=DEVICE)
    sin_base = torch.full((L, DH), float("nan"), device=DEVICE)
    cos, sin = cos_base[:, ::2], sin_base[:, 1::2]
    cos.copy_(a.cos())
    sin.copy_(a.sin())
    calls = {
        "norm_modulate": lambda lib: lib.norm_modulate(X, S1, S2),
        "norm_modulate_dual": lambda lib: lib.norm_modulate_dual(X, S1, S2, None, S3),
        "gated_residual": lambda lib: lib.gated_residual(X, Y, S1),
        "gated_residual_norm_modulate": lambda lib: lib.gated_residual_norm_modulate(X, Y, S1, S2, S3),
        "rms_norm": lambda lib: lib.rms_norm(X, W),
        "apply_rope": lambda lib: lib.apply_rope(Q, cos, sin),
        "qk_norm_rope": lambda lib: lib.qk_norm_rope(Q, K, WH, WK, cos, sin),
        "joint_attention": lambda lib: lib.joint_attention(Q, K, V),
    }
    X, Y = nan((B, L, D), x3), nan((B, L, D), x3)
    S1, S2, S3 = (nan((B, D), mod, 0.5) for _ in range(3))
    W = nan((D,), vec)
    Q, K, V = (nan((B, L, H, DH), x4) for _ in range(3))
    WH, WK = nan((DH,), vec), nan((DH,), vec)
    for name, call in calls.items():
        with ditfast.use_backend("triton"), time_limit(60):
            got = _flat(call(ops))
        want = _flat(call(reference))
        for g, w in zip(got, want):
            assert torch.isfinite(g).all(), f"{name}: read outside the view (non-finite output)"
            assert_by_rule(g, w, w, name=name)


# --- non-finite inputs --------------------------------------------------------------------------------
def _nonfinite_like(fast, ref_lowp, ref32, name):
    """Same NaN / +Inf / -Inf positions as the reference in the same dtypes; the finite rest by the rule."""
    for i, (f, lp, r) in enumerate(zip(fast, ref_lowp, ref32)):
        assert f.shape == lp.shape and f.dtype == lp.dtype, f"{name}[{i}]: shape/dtype"
        for what, test in (("NaN", torch.isnan), ("+Inf", lambda t: t == math.inf), ("-Inf", lambda t: t == -math.inf)):
            assert torch.equal(test(f), test(lp)), (
                f"{name}[{i}]: {what} at {test(f).nonzero().tolist()[:8]}, reference at {test(lp).nonzero().tolist()[:8]}"
            )
        ok = torch.isfinite(lp)
        assert_by_rule(f[ok], r[ok], lp[ok], name=f"{name}[{i}] finite part")


def _nonfinite_case(name, leaves, poison, backward=True):
    """Run op ``name`` on triton and reference after ``poison(leaves)`` wrote non-finite values in
    place; compare forward outputs and, with ``backward``, the gradients of every floating leaf."""
    spec = SPECS[name]
    with torch.no_grad():
        poison(leaves)
    leaves = [t.detach().requires_grad_(backward and t.requires_grad) for t in leaves]
    runs = {}
    # PyTorch's CPU flash-attention kernel (what F.scaled_dot_product_attention picks on CPU) returns
    # zeros for a query row whose scores are NaN; the math kernel follows the definition (NaN). The
    # reference is pinned to the math kernel here so that NaN propagation is checked against the math.
    math_sdpa = lambda: torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)  # noqa: E731
    for key, backend, args in (("fast", "triton", _fresh(leaves)), ("low", "reference", _fresh(leaves)),
                               ("32", "reference", [t.detach().float().requires_grad_(t.requires_grad) for t in leaves])):
        with time_limit(60), (math_sdpa() if backend == "reference" else contextlib.nullcontext()):
            outs = _run(spec, ops, args, backend)
            grads = []
            if backward:
                gen = torch.Generator().manual_seed(1)
                ups = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
                want = [a for a in args if a.requires_grad]
                grads = list(torch.autograd.grad(outs, want, ups))
        runs[key] = (outs, grads)
    _nonfinite_like(runs["fast"][0], runs["low"][0], runs["32"][0], f"{name} forward")
    return runs


ROW = (1, 2)  # the (batch, token) row that receives the non-finite value


PER_ROW = ("norm_modulate", "norm_modulate_dual", "gated_residual", "gated_residual_norm_modulate", "rms_norm")


@pytest.mark.parametrize("value", [float("nan"), math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_nonfinite_row_is_confined(name, value):
    """A NaN / +Inf at one element of token (b=1, l=2) of x -- of head 1 of that token for the
    (B, L, H, Dh) ops (of q for qk_norm_rope and attention) -- propagates as in the reference and only
    into that row; every other output element is finite and equal to the reference. The gradient of
    the poisoned input behaves the same (its other rows finite and equal to the reference's)."""
    spec = SPECS[name]
    B, L = 3, 5
    leaves = spec.make(B, L, torch.float32)

    def poison(ls):
        t = ls[spec.x]
        if name in PER_ROW:
            t[1, 2, 3] = value
        elif name == "qk_norm_rope":  # q (part 0 of the packed qkv), head 1
            t.view(B, L, 3, H, DH)[1, 2, 0, 1, 3] = value
        else:
            t[1, 2, 1, 3] = value

    runs = _nonfinite_case(name, leaves, poison, backward=True)
    for i, o in enumerate(runs["fast"][0]):
        rows = (~torch.isfinite(o)).any(-1)  # (B, L) or (B, L, H)
        allowed = torch.zeros_like(rows)
        if not (name == "qk_norm_rope" and i == 1):  # k_out stays finite
            allowed[(1, 2) if name in PER_ROW else (1, 2, 1)] = True
        assert torch.equal(rows, allowed), f"{name} output {i}: non-finite rows {rows.nonzero().tolist()}"
    # the gradient of the poisoned input: the reference's non-finite pattern, the rest by the rule
    gi = [i for i, t in enumerate(leaves) if t.requires_grad].index(spec.x)
    _nonfinite_like([runs["fast"][1][gi]], [runs["low"][1][gi]], [runs["32"][1][gi]], f"{name} grad of x")


def test_nonfinite_key_and_value_rows():
    """Attention: a NaN in one key (or value) row reaches every query of its (batch, head) -- as in the
    reference -- and no other (batch, head)."""
    for which in (1, 2):  # k, v
        leaves = SPECS["joint_attention"].make(3, 5, torch.float32)

        def poison(ls):
            ls[which][1, 2, 1, 3] = float("nan")

        runs = _nonfinite_case("joint_attention", leaves, poison, backward=False)
        bad = ~torch.isfinite(runs["fast"][0][0])
        assert bad[1, :, 1].any(-1).all()
        bad[1, :, 1] = False
        assert not bad.any(), "NaN leaked into another (batch, head)"


def test_nonfinite_modulation_and_branch():
    """NaN in one token's per-token scale, in one row of y, or in one feature of a per-sample gate:
    the reference's pattern (that row; that row; that feature of every token of the sample)."""
    def scale_row(ls):
        ls[2][1, 2, D + 5] = float("nan")  # scale2 (second half of the per-token pair) at token (1, 2)

    _nonfinite_case("norm_modulate_dual", SPECS["norm_modulate_dual"].make(3, 5, torch.float32), scale_row)

    def y_row(ls):
        ls[1][1, 2, 7] = float("nan")

    runs = _nonfinite_case("gated_residual_norm_modulate", SPECS["gated_residual_norm_modulate"].make(3, 5, torch.float32), y_row)
    x_new, h = runs["fast"][0]
    assert torch.isnan(h[1, 2]).all() and torch.isfinite(h[[0, 2]]).all() and torch.isfinite(h[1, [0, 1, 3, 4]]).all()

    def gate_feature(ls):
        ls[2][1, 7] = float("nan")

    runs = _nonfinite_case("gated_residual", SPECS["gated_residual"].make(3, 5, torch.float32), gate_feature)
    bad = torch.isnan(runs["fast"][0][0])
    assert bad[1, :, 7].all() and bad.sum() == 5


# --- fp16 overflow ----------------------------------------------------------------------------------------
def test_fp16_overflow_gated_residual():
    """x + gate·y beyond the fp16 range is +Inf / -Inf exactly where the fp16 reference's is; in the
    fused op the Inf in x_new makes that row of h all NaN (the LayerNorm of an infinite row), as in the
    reference; every other element is finite and equal to the reference."""
    def big(ls):
        for b, l, cols, v in ((1, 2, slice(0, 5), 6e4), (0, 1, slice(7, 8), 6e4), (2, 3, slice(0, 1), -6e4)):
            ls[0][b, l, cols] = v
            ls[1][b, l, cols] = v
        ls[2][:, :D] = 1.0  # the gate (first chunk)

    for name in ("gated_residual", "gated_residual_norm_modulate"):
        leaves = _half(SPECS[name].make(3, 5, torch.float32))
        runs = _nonfinite_case(name, leaves, big, backward=False)
        x_new = runs["fast"][0][0]
        assert (x_new[1, 2, :5] == math.inf).all() and x_new[0, 1, 7] == math.inf and x_new[2, 3, 0] == -math.inf
        assert torch.isfinite(x_new).sum() == x_new.numel() - 7
        if name == "gated_residual_norm_modulate":
            h = runs["fast"][0][1]
            rows = torch.isnan(h).all(-1)
            assert rows[1, 2] and rows[0, 1] and rows[2, 3] and torch.isfinite(h).sum() == h.numel() - 3 * D


def test_fp16_huge_values_stay_finite():
    """LayerNorm / RMSNorm of rows of ~6e4 fp16 values: statistics are fp32, so the normalized outputs are
    finite and equal the reference; a modulation that pushes the output past 65504 gives Inf where the
    fp16 reference does."""
    def huge(ls):
        ls[0].copy_((ls[0].float() * 2000 + 60000).clamp(max=65000).half())

    for name in ("norm_modulate", "rms_norm", "qk_norm_rope"):
        leaves = _half(SPECS[name].make(3, 5, torch.float32))
        runs = _nonfinite_case(name, leaves, huge, backward=True)
        for o in runs["fast"][0]:
            assert torch.isfinite(o).all(), name

    # A modulated output past 65504: rows of ±c give LN(x) = ±1 (exactly, in fp16); with scale 1e4 and
    # shift 6e4 on features 10..19, LN·(1 + scale) + shift is 70001 (Inf) or 49999 (finite) there.
    def overflow(ls):
        x, m = ls
        x.copy_(torch.tensor([1.0, -1.0]).repeat(D // 2) * 3.0)
        m.zero_()
        m[:, 10:20] = 6e4  # shift
        m[:, D + 10 : D + 20] = 1e4  # scale

    leaves = _half(SPECS["norm_modulate"].make(3, 5, torch.float32))
    runs = _nonfinite_case("norm_modulate", leaves, overflow, backward=False)
    inf = runs["fast"][0][0] == math.inf
    assert inf[..., 10:20:2].all() and inf.sum() == 3 * 5 * 5


def test_fp16_rope_overflow():
    """RoPE of fp16 values near the maximum: the fp32 rotation rounds to ±Inf where the reference's does."""
    def huge(ls):
        ls[0][1, 2, :, :4] = 60000.0

    leaves = [SPECS["apply_rope"].make(3, 5, torch.float32)[0].detach().half().requires_grad_(),
              torch.full((5, DH // 2), math.pi / 4, device=DEVICE)]
    runs = _nonfinite_case("apply_rope", leaves, huge, backward=False)
    out = runs["fast"][0][0]
    assert torch.isinf(out[1, 2]).any() and torch.isfinite(out[[0, 2]]).all()


# --- mixed dtypes -----------------------------------------------------------------------------------------
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
PROMOTION = [
    # (op, leaf dtypes, expected output dtypes)
    ("norm_modulate", (bf16, f16, f16), (f32,)),
    ("norm_modulate", (f32, bf16, bf16), (f32,)),
    ("norm_modulate", (bf16, bf16, f32), (f32,)),
    ("norm_modulate", (f16, None, bf16), (f32,)),
    ("norm_modulate_dual", (bf16, bf16, f32), (bf16, f32)),
    ("gated_residual", (f16, f16, bf16), (f32,)),
    ("gated_residual", (bf16, f32, bf16), (f32,)),
    ("gated_residual_norm_modulate", (f16, f16, bf16, f16, f16), (f32, f32)),
    ("gated_residual_norm_modulate", (bf16, bf16, bf16, f32, f32), (bf16, f32)),
    ("rms_norm", (bf16, f32), (bf16,)),
    ("qk_norm_rope", (f16, bf16, f32, bf16), (f16, bf16)),
]


def _promotion_call(name, dts):
    B, L, Dm = 3, 7, 72
    t = lambda shape, dt, **kw: _t(shape, dt, **kw)  # noqa: E731
    if name == "norm_modulate":
        x, sh, sc = dts
        args = [t((B, L, Dm), x), None if sh is None else t((B, Dm), sh, scale=0.5), t((B, Dm), sc, scale=0.5)]
        return args, lambda lib, x, sh, sc: lib.norm_modulate(x, sh, sc)
    if name == "norm_modulate_dual":
        x, m1, m2 = dts
        args = [t((B, L, Dm), x), t((B, 2 * Dm), m1, scale=0.5), t((B, L, 2 * Dm), m2, scale=0.5)]
        return args, lambda lib, x, a, b: lib.norm_modulate_dual(x, *a.chunk(2, -1), *b.chunk(2, -1))
    if name == "gated_residual":
        x, y, g = dts
        return [t((B, L, Dm), x), t((B, L, Dm), y), t((B, Dm), g, scale=0.5)], lambda lib, *a: lib.gated_residual(*a)
    if name == "gated_residual_norm_modulate":
        x, y, g, sh, sc = dts
        args = [t((B, L, Dm), x), t((B, L, Dm), y), t((B, Dm), g, scale=0.5), t((B, L, Dm), sh, scale=0.5),
                t((B, Dm), sc, scale=0.5)]
        return args, lambda lib, *a: lib.gated_residual_norm_modulate(*a)
    if name == "rms_norm":
        x, w = dts
        return [t((B, L, Dm), x), t((Dm,), w, offset=1.0, scale=0.2)], lambda lib, x, w: lib.rms_norm(x, w)
    q, k, qw, kw = dts
    a = _angles(L)
    args = [t((B, L, H, DH), q), t((B, L, H, DH), k), t((DH,), qw, offset=1.0, scale=0.2), t((DH,), kw, offset=1.0, scale=0.2)]
    return args, lambda lib, q, k, qw, kw: lib.qk_norm_rope(q, k, qw, kw, a.cos(), a.sin())


@pytest.mark.parametrize("name,dtypes,expected", PROMOTION, ids=lambda v: "-".join(
    str(d).replace("torch.", "") for d in v) if isinstance(v, tuple) else str(v))
def test_mixed_dtypes_promote_as_documented(name, dtypes, expected):
    """adaLN ops: output dtype = torch.promote_types of the inputs (h of the fused op: of x_new, shift
    and scale); RMSNorm / RoPE ops: the dtype of x / q / k whatever the weights'. Values and gradients
    (each in its input's dtype) equal the reference by the rule."""
    args, fn = _promotion_call(name, dtypes)
    with ditfast.use_backend("triton"):
        outs = _flat(fn(ops, *args))
        assert tuple(o.dtype for o in outs) == expected
        check_op(lambda *a: fn(ops, *a), lambda *a: fn(reference, *a), args, name=f"{name} {dtypes}")


# Each adaLN op with all its modulations cut from one (1, k·D) row (or (1, L, k·D) per token): the
# way a batch that shares one conditioning vector calls them.
BROADCAST_OPS = {
    "norm_modulate": (2, lambda lib, x, y, m: lib.norm_modulate(x, *m.chunk(2, -1))),
    "norm_modulate_dual": (4, lambda lib, x, y, m: lib.norm_modulate_dual(x, *m.chunk(4, -1))),
    "gated_residual": (1, lambda lib, x, y, m: lib.gated_residual(x, y, m)),
    "gated_residual_norm_modulate": (3, lambda lib, x, y, m: lib.gated_residual_norm_modulate(x, y, *m.chunk(3, -1))),
}


def _op_backends():
    """(op, backend) pairs: every op on "triton"; on "cuda" (ditfast._C) the two ops it implements."""
    from ditfast import _ext

    no_c = pytest.mark.skipif(_ext.load() is None, reason="ditfast._C is not built")
    pairs = [(name, "triton") for name in BROADCAST_OPS]
    pairs += [pytest.param(name, "cuda", marks=no_c) for name in ("norm_modulate", "gated_residual_norm_modulate")]
    return pairs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["(1,D)", "(1,L,D)"])
@pytest.mark.parametrize("name,backend", _op_backends())
def test_broadcast_modulation_gradient_rounded_once(name, backend, per_token, dtype):
    """A modulation with batch 1 broadcast over B samples: its gradient sums over every sample (and,
    per sample, every token). The kernels must sum in fp32 and round once, so the gradient is within
    one unit in the last place of the fp32 gradient (plus fp32 summation-order slack) for the same
    bf16/fp16 inputs and output gradient. Rounding per-sample sums to bf16/fp16 and summing those
    again (what the expanded (B, D) view's backward would do) is off by many units where the batch
    sum cancels. Outputs and all other gradients are checked by the rule.

    The gated ops' x, y and gate lie on a coarse grid (at most 8 steps of 1/4 or 1/8 from 0) so
    that x_new = x + gate * y is exact in bf16/fp16: the fp32 gradient is then the exact one of the
    low-precision computation whichever x_new (stored or fp32) a backend normalizes."""
    k, fn = BROADCAST_OPS[name]
    B, L, D = 8, 9, 72
    g = torch.Generator().manual_seed(2)
    gated = name.startswith("gated")

    def draw(*shape, std=1.0, step=0.25):
        t = std * torch.randn(*shape, generator=g)
        if gated:
            t = (t / step).round().clamp(-8, 8) * step
        return t.to(DEVICE, dtype)

    x = draw(B, L, D).requires_grad_()
    y = draw(B, L, D).requires_grad_(gated)
    shape = (1, L, k * D) if per_token else (1, k * D)
    m = draw(*shape, std=0.5, step=0.125).requires_grad_()
    ref = lambda *a: fn(reference, *a)  # noqa: E731

    def grad_m(lib, cast):
        mm = m.detach().to(cast).requires_grad_()
        outs = _flat(fn(lib, x.detach().to(cast), y.detach().to(cast), mm))
        douts = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE, dtype).to(o.dtype)
                 for i, o in enumerate(outs)]
        return torch.autograd.grad(outs, [mm], douts)[0]

    with ditfast.use_backend(backend):
        dm = grad_m(ops, dtype)
        assert dm.shape == m.shape and dm.dtype == m.dtype
        check_op(lambda *a: fn(ops, *a), ref, [x, y, m], name=f"{name} {tuple(shape)} modulation")
    dm32 = grad_m(reference, torch.float32)
    finfo = torch.finfo(dtype)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    ulp = torch.exp2(torch.floor(torch.log2(dm32.abs().clamp_min(finfo.tiny))) - mantissa_bits)
    ulp = ulp.clamp_min(finfo.tiny * 2.0 ** -mantissa_bits)  # subnormals: the smallest spacing
    err = (dm.float() - dm32).abs()
    slack = 2.0 ** -20 * dm32.abs().max()
    worst = (err / (ulp + slack)).max().item()
    assert worst <= 1.0, f"{name}: gradient of the broadcast modulation is {worst:.1f} units off (rounded twice?)"


# --- wrong device / dtype ---------------------------------------------------------------------------------
def _valid_args(name):
    """A valid argument dict for each op (small CPU tensors, no grad)."""
    B, L = 2, 3
    r = lambda *s: torch.randn(*s, device=DEVICE)  # noqa: E731
    a = torch.randn(L, 4, device=DEVICE)
    return {
        "norm_modulate": dict(x=r(B, L, 8), shift=r(B, 8), scale=r(B, 8)),
        "norm_modulate_dual": dict(x=r(B, L, 8), shift1=r(B, 8), scale1=r(B, 8), shift2=r(B, L, 8), scale2=r(B, L, 8)),
        "gated_residual": dict(x=r(B, L, 8), y=r(B, L, 8), gate=r(B, 8)),
        "gated_residual_norm_modulate": dict(x=r(B, L, 8), y=r(B, L, 8), gate=r(B, 8), shift=r(B, 8), scale=r(B, 8)),
        "rms_norm": dict(x=r(B, L, 40), weight=r(40)),
        "apply_rope": dict(x=r(B, L, 1, 8), cos=a.cos(), sin=a.sin()),
        "qk_norm_rope": dict(q=r(B, L, 2, 8), k=r(B, L, 2, 8), q_weight=r(8), k_weight=r(8), cos=a.cos(), sin=a.sin()),
        "joint_attention": dict(q=r(B, L, 2, 8), k=r(B, L, 2, 8), v=r(B, L, 2, 8)),
    }[name]


def _call(name, kw):
    fn = getattr(ops, name)
    return fn(*kw.values())


ARGS = [(name, arg) for name in OP_NAMES for arg in _valid_args(name)]


@pytest.mark.parametrize("name,arg", ARGS)
def test_other_device_is_value_error(name, arg):
    """One argument on another device (the meta device stands in for a second one): ValueError naming it."""
    kw = _valid_args(name)
    kw[arg] = kw[arg].to("meta")
    first = next(iter(kw))
    with ditfast.use_backend("triton"):
        with pytest.raises(ValueError) as err:
            _call(name, kw)
    msg = str(err.value)
    # the moved argument is named -- or, when it is the one the others are compared with (the first),
    # the argument found on the other device is
    names = [arg] if arg != first else list(kw)
    assert any(re.search(rf"\b{n}\b", msg) for n in names) and "meta" in msg and DEVICE in msg, msg


@pytest.mark.parametrize("int_dtype", [torch.int32, torch.int64, torch.bool])
@pytest.mark.parametrize("name,arg", ARGS)
def test_integer_input_is_type_error(name, arg, int_dtype):
    """An integer (or bool) tensor anywhere: TypeError naming the argument and the dtype it got."""
    kw = _valid_args(name)
    kw[arg] = kw[arg].to(int_dtype)
    with ditfast.use_backend("triton"):
        with pytest.raises(TypeError) as err:
            _call(name, kw)
    msg = str(err.value)
    assert arg in msg and str(int_dtype).replace("torch.", "") in msg, msg


@pytest.mark.parametrize("name,arg", ARGS)
def test_float64_only_on_reference(name, arg):
    """float64 is for checking the fp32 paths against an fp64 truth: the triton backend rejects it with a
    TypeError naming the argument (cos / sin must be fp32 everywhere); the reference backend runs
    it (with everything but the RoPE tables in float64)."""
    kw = _valid_args(name)
    kw[arg] = kw[arg].double()
    with ditfast.use_backend("triton"):
        with pytest.raises(TypeError) as err:
            _call(name, kw)
    assert arg in str(err.value) and "float64" in str(err.value), str(err.value)
    if arg in ("cos", "sin"):
        return
    kw = {n: (t if n in ("cos", "sin") else t.double()) for n, t in _valid_args(name).items()}
    with ditfast.use_backend("reference"):
        out = _flat(_call(name, kw))
    assert all(o.dtype == torch.float64 for o in out)


# --- validation messages not covered by tests/test_validation.py ------------------------------------------
def _x(B=2, L=3, Dx=8, dtype=torch.float32):
    return torch.randn(B, L, Dx, dtype=dtype)


def _q(B=2, L=5, Hx=3, Dx=8, dtype=torch.float32):
    return torch.randn(B, L, Hx, Dx, dtype=dtype)


def _tab(L=5, P=4):
    a = torch.randn(L, P)
    return a.cos(), a.sin()


ERRORS = [
    # (call, exception, substrings the message must contain: argument, what it got, what it expects)
    (lambda: ops.norm_modulate_dual(_x(), torch.zeros(2, 9), torch.zeros(2, 8), None, torch.zeros(2, 8)),
     ValueError, ["shift1", "(2, 9)", "(B, D) = (2, 8)"]),
    (lambda: ops.norm_modulate_dual(_x(), None, torch.zeros(2, 3, 7), None, torch.zeros(2, 8)),
     ValueError, ["scale1", "(2, 3, 7)", "(B, L, D) = (2, 3, 8)"]),
    (lambda: ops.norm_modulate_dual(_x(), None, torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(2, 8)),
     ValueError, ["shift2", "(4, 8)", "(2, 8)"]),
    (lambda: ops.gated_residual_norm_modulate(_x(), _x(), torch.zeros(2, 4, 8), None, torch.zeros(2, 8)),
     ValueError, ["gate", "(2, 4, 8)", "(B, L, D) = (2, 3, 8)"]),
    (lambda: ops.gated_residual_norm_modulate(_x(), torch.zeros(2, 8), torch.zeros(2, 8), None, torch.zeros(2, 8)),
     ValueError, ["y", "(2, 8)", "(B, L, D)"]),
    (lambda: ops.gated_residual_norm_modulate(_x(), _x(), torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(2, 8)),
     ValueError, ["shift", "(3, 8)", "(B, D) = (2, 8)"]),
    (lambda: ops.gated_residual(torch.zeros(2, 3, 1, 8), _x(), torch.zeros(2, 8)),
     ValueError, ["x", "(2, 3, 1, 8)", "(B, L, D)"]),
    (lambda: ops.gated_residual(_x(), _x(), 0.5), TypeError, ["gate", "float", "torch.Tensor"]),
    (lambda: ops.norm_modulate(_x(), None, torch.zeros(8)), ValueError, ["scale", "(8,)", "(B, D) = (2, 8)"]),
    (lambda: ops.norm_modulate(_x(), None, torch.zeros(2, 8), eps=-1.0), ValueError, ["eps", "-1.0", "positive"]),
    (lambda: ops.norm_modulate(_x(), None, torch.zeros(2, 8), eps=float("nan")), ValueError, ["eps", "nan", "positive"]),
    (lambda: ops.rms_norm(_x(Dx=72), torch.ones(72, dtype=torch.int32)), TypeError, ["weight", "int32", "float32"]),
    (lambda: ops.rms_norm(torch.tensor(1.0), None), ValueError, ["x", "()", "at least one dim"]),
    (lambda: ops.rms_norm(_x(), torch.ones(1, 8)), ValueError, ["weight", "(1, 8)", "(8,)"]),
    (lambda: ops.rms_norm(_x(), None, eps=0.0), ValueError, ["eps", "0.0", "positive"]),
    (lambda: ops.apply_rope(_x(), *_tab()), ValueError, ["x", "(2, 3, 8)", "(B, L, H, Dh)"]),
    (lambda: ops.apply_rope(_q(), _tab()[0], torch.zeros(5, 3)), ValueError, ["sin", "(5, 3)", "(L, Dh/2) = (5, 4)"]),
    (lambda: ops.apply_rope(_q(), _tab()[0].half(), _tab()[1]), TypeError, ["cos", "float16", "float32"]),
    (lambda: ops.apply_rope(_q(), [1.0], _tab()[1]), TypeError, ["cos", "list", "torch.Tensor"]),
    (lambda: ops.apply_rope(_q(), torch.zeros(3, 5, 4), torch.zeros(3, 5, 4)), ValueError,
     ["cos", "(3, 5, 4)", "(B, L, Dh/2) = (2, 5, 4)"]),
    (lambda: ops.qk_norm_rope(_q(), _q(Dx=10), None, None, None, None), ValueError, ["k", "(2, 5, 3, 10)", "(2, 5, 3, 8)"]),
    (lambda: ops.qk_norm_rope(_q(), _q(), torch.ones(1, 8), None, None, None), ValueError, ["q_weight", "(1, 8)", "(8,)"]),
    (lambda: ops.qk_norm_rope(_q(), _q(), None, None, None, _tab()[1]), ValueError, ["cos", "sin", "both"]),
    (lambda: ops.qk_norm_rope(_q(), _q(), torch.ones(8), torch.ones(8), *_tab(), eps=0), ValueError, ["eps", "0", "positive"]),
    (lambda: ops.qk_norm_rope(_q(), _q(), torch.ones(8), None, None, None), ValueError, ["q_weight", "k_weight", "both"]),
    (lambda: ops.qk_norm_rope(_q(), torch.zeros(2, 5, 24), None, None, None, None), ValueError, ["k", "(2, 5, 24)", "(B, L, H, Dh)"]),
    (lambda: ops.joint_attention(torch.zeros(2, 5, 3, 8, 1), _q(), _q()), ValueError, ["q", "(2, 5, 3, 8, 1)", "(B, L, H, Dh)"]),
    (lambda: ops.joint_attention(_q(), _q(B=3), _q(B=3)), ValueError, ["k", "(3, 5, 3, 8)", "(B, Lk, H_kv, Dh)"]),
    (lambda: ops.joint_attention(_q(), _q(), _q().half()), TypeError, ["v", "float16", "float32"]),
    (lambda: ops.joint_attention(_q(), _q(), "v"), TypeError, ["v", "str", "torch.Tensor"]),
    (lambda: ops.joint_attention(_q(), _q(), _q(), backend=3), TypeError, ["backend", "int", "string"]),
    (lambda: ops.joint_attention(_q(), _q(), _q(), backend="nope"), ValueError, ["backend", "nope", "reference"]),
    (lambda: ops.rope_freqs(torch.zeros(5), (4,)), ValueError, ["ids", "(5,)", "(L, n_axes)"]),
]


@pytest.mark.parametrize("call,exc,parts", ERRORS, ids=[f"{i}-{e[2][0]}" for i, e in enumerate(ERRORS)])
def test_error_names_argument_got_and_expected(call, exc, parts):
    with pytest.raises(exc) as err:
        call()
    msg = str(err.value)
    missing = [p for p in parts if p not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"


# --- more than 2**31 elements (CUDA only) --------------------------------------------------------------
@pytest.mark.cuda
def test_more_than_2_31_elements():
    """norm_modulate and gated_residual on (1, 2**31 // 4096 + 8, 4096) bf16 (2**31 + 32768 elements):
    int64 indexing; the last rows (past element 2**31) equal the reference computed on those rows."""
    Dm = 4096
    L = 2**31 // Dm + 8
    n = L * Dm
    assert n > 2**31
    need = 4 * n * 2 + (1 << 30)  # x, out (and y, out for gated_residual, one at a time) + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB available")
    torch.manual_seed(0)
    x = torch.randn(1, L, Dm, device="cuda", dtype=torch.bfloat16)
    m = (0.5 * torch.randn(1, 3 * Dm, device="cuda")).to(torch.bfloat16)
    shift, scale, gate = m.chunk(3, -1)
    tail = slice(L - 40, L)  # rows past element 2**31
    with ditfast.use_backend("triton"):
        out = ops.norm_modulate(x, shift, scale)
    want = reference.norm_modulate(x[:, tail].float(), shift.float(), scale.float())
    low = reference.norm_modulate(x[:, tail], shift, scale)
    assert_by_rule(out[:, tail], want, low, name="norm_modulate tail")
    assert_by_rule(out[:, :40], reference.norm_modulate(x[:, :40].float(), shift.float(), scale.float()),
                   reference.norm_modulate(x[:, :40], shift, scale), name="norm_modulate head")
    del out
    with ditfast.use_backend("triton"):
        res = ops.gated_residual(x, x, gate)
    want = reference.gated_residual(x[:, tail].float(), x[:, tail].float(), gate.float())
    assert_by_rule(res[:, tail], want, reference.gated_residual(x[:, tail], x[:, tail], gate), name="gated_residual tail")
