"""Property-based tests: the "triton" backend equals the reference by the tolerance rule (docs/numerics.md) for every op.

Hypothesis draws small, awkward problems (B 1–3, L 1–9, D in {8, 24, 40, 72, 200}, H 1–3,
Dh in {8, 24, 40, 72}), the memory layout of every tensor argument (slices of wider tensors at odd
offsets, transposed and transposed-then-viewed storage, stride-0 expanded batches, chunks of a packed
projection), per-sample or per-token modulation, optional shift / weights / RoPE tables, and the
dtypes (fp32 / bf16 / fp16, mixed where the op promotes). Each example runs
:func:`ditfast.testing.check_op`: forward always, backward (gradients of every leaf) when the drawn
``backward`` flag is set. Leaves are plain tensors and the layouts are built inside the compared
functions, so the kernels read the views through their strides while the gradients land on the leaves.

``derandomize=True`` and no example database: the same examples on every run and machine.
"""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st

import ditfast
from ditfast import ops, reference
from ditfast.testing import check_op

from conftest import DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DS = [8, 24, 40, 72, 200]
DHS = [8, 24, 40, 72]
EPS = 1e-6

PROPS = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: the interpreter is slow
    suppress_health_check=list(HealthCheck),
)


# --- drawing problems ---------------------------------------------------------------------------------
class Problem:
    """Leaf tensors plus how to turn them into the op's arguments (for check_op)."""

    def __init__(self, seed: int, backward: bool):
        self.gen = torch.Generator().manual_seed(seed)
        self.backward = backward
        self.leaves = []

    def leaf(self, shape, dtype, *, scale=1.0, offset=0.0, grad=None):
        t = torch.randn(shape, generator=self.gen) * scale + offset
        t = t.to(device=DEVICE, dtype=dtype)
        self.leaves.append(t.requires_grad_(self.backward if grad is None else grad))
        return len(self.leaves) - 1


def _other_dtype(data, dtype, label):
    """Mostly ``dtype``; sometimes another float dtype (the ops promote like eager PyTorch)."""
    return data.draw(st.sampled_from([dtype, dtype, dtype] + [d for d in DTYPES if d != dtype]), label=label)


# x-like (B, L, D) tensors: leaf shape and the view taken of it
X_LAYOUTS = ["contig", "slice", "tokmajor", "dstride", "tview", "expand"]


def x_leaf_shape(layout, B, L, D):
    return {
        "contig": (B, L, D),
        "slice": (B, L + 2, D + 5),  # a window of a wider tensor at an odd offset
        "tokmajor": (L, B, D),  # (L, B, D) storage
        "dstride": (B, D, L),  # feature stride L
        "tview": (D, B * L),  # transposed, then viewed: strides (L, 1, B·L)
        "expand": (1, L, D),  # one sample broadcast over the batch (batch stride 0)
    }[layout]


def x_view(t, layout, B, L, D):
    if layout == "slice":
        return t[:, 1 : 1 + L, 2 : 2 + D]
    if layout == "tokmajor":
        return t.transpose(0, 1)
    if layout == "dstride":
        return t.transpose(1, 2)
    if layout == "tview":
        return t.t().view(B, L, D)
    if layout == "expand":
        return t.expand(B, L, D)
    return t


# shift / scale / gate: the middle chunk of a (.., 3·D) adaLN output, per sample or per token
MOD_KINDS = ["sample", "sample_t", "expand", "token", "token_expand", "token_t"]


def mod_leaf_shape(kind, B, L, D):
    return {
        "sample": (B, 3 * D),
        "sample_t": (3 * D, B),  # transposed storage: feature stride B
        "expand": (1, 3 * D),  # (1, D): broadcast over the batch by the op
        "token": (B, L, 3 * D),
        "token_expand": (1, L, 3 * D),
        "token_t": (3 * D, B, L),  # per token with feature stride B·L
    }[kind]


def mod_view(t, kind, D):
    if kind == "sample_t":
        t = t.t()
    elif kind == "token_t":
        t = t.permute(1, 2, 0)
    return t[..., D : 2 * D]


def draw_x(data, p, name, B, L, D, dtype, *, big=False):
    layout = data.draw(st.sampled_from(X_LAYOUTS), label=f"{name} layout")
    # LayerNorm inputs sometimes with a large mean / spread (cancellation in the variance)
    scale, offset = data.draw(st.sampled_from([(1.0, 0.0), (1.0, 0.0), (4.0, 3.0)]), label=f"{name} scale/offset") \
        if big else (1.0, 0.0)
    i = p.leaf(x_leaf_shape(layout, B, L, D), dtype, scale=scale, offset=offset)
    return lambda a: x_view(a[i], layout, B, L, D)


def draw_mod(data, p, name, B, L, D, dtype, *, optional=False):
    if optional and data.draw(st.booleans(), label=f"{name} is None"):
        return lambda a: None
    kind = data.draw(st.sampled_from(MOD_KINDS), label=f"{name} kind")
    mdtype = _other_dtype(data, dtype, f"{name} dtype")
    i = p.leaf(mod_leaf_shape(kind, B, L, D), mdtype, scale=0.5)
    return lambda a: mod_view(a[i], kind, D)


def problem(data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    backward = data.draw(st.booleans(), label="backward")
    return Problem(seed, backward)


def sizes(data):
    B = data.draw(st.integers(1, 3), label="B")
    L = data.draw(st.integers(1, 9), label="L")
    D = data.draw(st.sampled_from(DS), label="D")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    return B, L, D, dtype


class Replay:
    """Stands in for hypothesis' ``data`` to re-run one reported example: ``case_x(Replay(**draws))``
    with the labels hypothesis printed, e.g. ``Replay(**{"seed": 0, "backward": True, "B": 1, ...})``."""

    def __init__(self, **draws):
        self.draws = draws

    def draw(self, strategy, label=None):
        return self.draws[label]


def correctly_rounded(ref_fn):
    """The best any implementation can do with the given (rounded) inputs: ``ref_fn`` computed in fp32
    and each output rounded once to the dtype the low-precision reference returns (gradients, through
    the casts, are rounded once to the inputs' dtypes)."""
    def fn(*args):
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        out32 = ref_fn(*up)
        with torch.no_grad():
            low = ref_fn(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        if isinstance(out32, torch.Tensor):
            return out32.to(low.dtype)
        return tuple(None if o is None else o.to(lo.dtype) for o, lo in zip(out32, low))

    return fn


def run(p, fn, name, backend="triton"):
    """check_op of fn(ops, leaves) on ``backend`` against fn(reference, leaves).

    The tolerance rule's yardstick (docs/numerics.md) is the largest error of the low-precision reference over the output, which
    on a tensor of a few dozen elements can fall below the rounding any implementation must do: a
    fast path that is off by 0.7 ulp where the reference happened to land 0.2 ulp away fails
    ``2·yard``. When the triton result fails the rule, the example is therefore checked once more
    with the correctly rounded fp32 computation in place of the fast path; if even that fails the rule, the
    rule cannot be met for these inputs and hypothesis discards the example (it is not counted, and
    another is drawn). Otherwise the failure stands.
    """
    fast, ref = (lambda *a: fn(ops, a)), (lambda *a: fn(reference, a))
    with ditfast.use_backend(backend):
        try:
            check_op(fast, ref, p.leaves, name=f"{name} [{backend}]")
        except AssertionError:
            try:
                check_op(correctly_rounded(ref), ref, p.leaves, name=f"{name} (correctly rounded fp32)")
            except AssertionError:
                reject()
            raise


# --- adaLN family -------------------------------------------------------------------------------------
def case_norm_modulate(data, backend="triton"):
    p = problem(data)
    B, L, D, dtype = sizes(data)
    x = draw_x(data, p, "x", B, L, D, dtype, big=True)
    shift = draw_mod(data, p, "shift", B, L, D, dtype, optional=True)
    scale = draw_mod(data, p, "scale", B, L, D, dtype)
    run(p, lambda lib, a: lib.norm_modulate(x(a), shift(a), scale(a), eps=EPS), "norm_modulate", backend)


def case_norm_modulate_dual(data):
    p = problem(data)
    B, L, D, dtype = sizes(data)
    x = draw_x(data, p, "x", B, L, D, dtype, big=True)
    shift1 = draw_mod(data, p, "shift1", B, L, D, dtype, optional=True)
    scale1 = draw_mod(data, p, "scale1", B, L, D, dtype)
    shift2 = draw_mod(data, p, "shift2", B, L, D, dtype, optional=True)
    scale2 = draw_mod(data, p, "scale2", B, L, D, dtype)

    def fn(lib, a):
        return lib.norm_modulate_dual(x(a), shift1(a), scale1(a), shift2(a), scale2(a), eps=EPS)

    run(p, fn, "norm_modulate_dual")


def case_gated_residual(data):
    p = problem(data)
    B, L, D, dtype = sizes(data)
    x = draw_x(data, p, "x", B, L, D, dtype)
    y = draw_x(data, p, "y", B, L, D, _other_dtype(data, dtype, "y dtype"))
    gate = draw_mod(data, p, "gate", B, L, D, dtype)
    run(p, lambda lib, a: lib.gated_residual(x(a), y(a), gate(a)), "gated_residual")


def case_gated_residual_norm_modulate(data, backend="triton"):
    p = problem(data)
    B, L, D, dtype = sizes(data)
    x = draw_x(data, p, "x", B, L, D, dtype, big=True)
    y = draw_x(data, p, "y", B, L, D, _other_dtype(data, dtype, "y dtype"))
    gate = draw_mod(data, p, "gate", B, L, D, dtype)
    shift = draw_mod(data, p, "shift", B, L, D, dtype, optional=True)
    scale = draw_mod(data, p, "scale", B, L, D, dtype)

    def fn(lib, a):
        return lib.gated_residual_norm_modulate(x(a), y(a), gate(a), shift(a), scale(a), eps=EPS)

    run(p, fn, "gated_residual_norm_modulate", backend)


# --- (B, L, H, Dh) layouts ------------------------------------------------------------------------------
HEAD_LAYOUTS = ["contig", "packed", "headmajor", "slice", "dstride", "tview", "expand"]


def head_leaf_shape(layout, B, L, H, Dh):
    return {
        "contig": (B, L, H, Dh),
        "packed": (B, L, 3 * H * Dh),  # a fused qkv projection output, [q; k; v] head-major
        "headmajor": (B, H, L, Dh),  # the SDPA layout, transposed back
        "slice": (B, L, H, Dh + 6),  # a window of each head at an odd offset
        "dstride": (B, L, Dh, H),  # head-dim stride H
        "tview": (Dh, B * L * H),  # transposed, then viewed: head-dim stride B·L·H
        "expand": (1, L, H, Dh),  # batch stride 0
    }[layout]


def head_view(t, layout, B, L, H, Dh, part=0):
    if layout == "packed":
        return t.view(B, L, 3, H, Dh)[:, :, part]
    if layout == "headmajor":
        return t.transpose(1, 2)
    if layout == "slice":
        return t[..., 3 : 3 + Dh]
    if layout == "dstride":
        return t.transpose(2, 3)
    if layout == "tview":
        return t.t().view(B, L, H, Dh)
    if layout == "expand":
        return t.expand(B, L, H, Dh)
    return t


def draw_heads(data, p, name, B, L, H, Dh, dtype, layouts=HEAD_LAYOUTS, n=1, scale=1.0):
    """n (B, L, H, Dh) tensors; with the "packed" layout all n are parts of one packed leaf."""
    layout = data.draw(st.sampled_from(layouts), label=f"{name} layout")
    if layout == "packed":
        i = p.leaf(head_leaf_shape(layout, B, L, H, Dh), dtype, scale=scale)
        return [lambda a, j=j: head_view(a[i], layout, B, L, H, Dh, part=j) for j in range(n)]
    idx = [p.leaf(head_leaf_shape(layout, B, L, H, Dh), dtype, scale=scale) for _ in range(n)]
    return [lambda a, i=i: head_view(a[i], layout, B, L, H, Dh) for i in idx]


def draw_tables(data, p, B, L, Dh, *, optional=False):
    """(cos, sin) fp32 of shape (L, Dh/2) or (B, L, Dh/2), from a leaf of angles (gradients reach it
    through cos and sin when the example runs backward and ``table grads`` is drawn)."""
    if optional and data.draw(st.booleans(), label="no rope"):
        return lambda a: (None, None)
    P = Dh // 2
    kind = data.draw(st.sampled_from(["rows", "rows_t", "batched", "batch_expand"]), label="table kind")
    grad = p.backward and data.draw(st.booleans(), label="table grads")
    shape = {"rows": (L, P), "rows_t": (P, L), "batched": (B, L, P), "batch_expand": (1, L, P)}[kind]
    i = p.leaf(shape, torch.float32, scale=3.0, grad=grad)

    def tables(a):
        ang = a[i]
        if kind == "rows_t":
            ang = ang.t()  # (L, P) with strides (1, L)
        cos, sin = ang.cos(), ang.sin()
        if kind == "batch_expand":
            cos, sin = cos.expand(B, L, P), sin.expand(B, L, P)
        return cos, sin

    return tables


def draw_weight(data, p, name, Dh, dtype, *, optional=True):
    if optional and data.draw(st.booleans(), label=f"{name} is None"):
        return lambda a: None
    i = p.leaf((Dh,), _other_dtype(data, dtype, f"{name} dtype"), scale=0.2, offset=1.0)
    return lambda a: a[i]


def head_sizes(data):
    B = data.draw(st.integers(1, 3), label="B")
    L = data.draw(st.integers(1, 9), label="L")
    H = data.draw(st.integers(1, 3), label="H")
    Dh = data.draw(st.sampled_from(DHS), label="Dh")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    return B, L, H, Dh, dtype


# --- RMSNorm / RoPE family ------------------------------------------------------------------------------
def case_rms_norm(data):
    p = problem(data)
    if data.draw(st.booleans(), label="per head"):  # QK-norm: (B, L, H, Dh) rows
        B, L, H, D, dtype = head_sizes(data)
        (x,) = draw_heads(data, p, "x", B, L, H, D, dtype, scale=3.0)
    else:  # a hidden-state RMSNorm: (B, L, D) rows
        B, L, D, dtype = sizes(data)
        x = draw_x(data, p, "x", B, L, D, dtype, big=True)
    w = draw_weight(data, p, "weight", D, dtype)
    run(p, lambda lib, a: lib.rms_norm(x(a), w(a), eps=EPS), "rms_norm")


def case_apply_rope(data, backend="triton"):
    p = problem(data)
    B, L, H, Dh, dtype = head_sizes(data)
    (x,) = draw_heads(data, p, "x", B, L, H, Dh, dtype)
    tables = draw_tables(data, p, B, L, Dh)
    interleaved = data.draw(st.booleans(), label="interleaved")
    run(p, lambda lib, a: lib.apply_rope(x(a), *tables(a), interleaved=interleaved), "apply_rope", backend)


def case_qk_norm_rope(data, backend="triton"):
    p = problem(data)
    B, L, H, Dh, dtype = head_sizes(data)
    if data.draw(st.booleans(), label="q, k share a layout"):
        q, k = draw_heads(data, p, "qk", B, L, H, Dh, dtype, n=2, scale=2.0)
    else:
        (q,) = draw_heads(data, p, "q", B, L, H, Dh, dtype, scale=2.0)
        (k,) = draw_heads(data, p, "k", B, L, H, Dh, _other_dtype(data, dtype, "k dtype"), scale=2.0)
    if data.draw(st.booleans(), label="norm"):  # both weights given (norm + RoPE), or both None (RoPE only)
        qw = draw_weight(data, p, "q_weight", Dh, dtype, optional=False)
        kw = draw_weight(data, p, "k_weight", Dh, dtype, optional=False)
        tables = draw_tables(data, p, B, L, Dh, optional=True)
    else:
        qw = kw = lambda a: None  # noqa: E731
        tables = draw_tables(data, p, B, L, Dh)
    interleaved = data.draw(st.booleans(), label="interleaved")

    def fn(lib, a):
        return lib.qk_norm_rope(q(a), k(a), qw(a), kw(a), *tables(a), eps=EPS, interleaved=interleaved)

    run(p, fn, "qk_norm_rope", backend)


# --- attention -------------------------------------------------------------------------------------------
def case_joint_attention(data):
    p = problem(data)
    B, Lq, H, Dh, dtype = head_sizes(data)
    if data.draw(st.booleans(), label="self-attention on a packed qkv"):
        q, k, v = draw_heads(data, p, "qkv", B, Lq, H, Dh, dtype, n=3)
    else:
        Lk = data.draw(st.integers(1, 9), label="Lk")
        (q,) = draw_heads(data, p, "q", B, Lq, H, Dh, dtype, scale=2.0)  # peaky softmax
        k, v = draw_heads(data, p, "kv", B, Lk, H, Dh, dtype, n=2)
    run(p, lambda lib, a: lib.joint_attention(q(a), k(a), v(a)), "joint_attention")


def test_layouts_are_really_strided():
    """The layouts drawn above are the non-contiguous views they claim to be (guards the test itself)."""
    B, L, D = 2, 3, 8
    for layout in X_LAYOUTS:
        t = torch.zeros(x_leaf_shape(layout, B, L, D))
        v = x_view(t, layout, B, L, D)
        assert v.shape == (B, L, D)
        assert v.is_contiguous() == (layout == "contig"), layout
    assert x_view(torch.zeros(x_leaf_shape("tview", B, L, D)), "tview", B, L, D).stride() == (L, 1, B * L)
    assert x_view(torch.zeros(x_leaf_shape("expand", B, L, D)), "expand", B, L, D).stride(0) == 0
    H, Dh = 2, 8
    for layout in HEAD_LAYOUTS:
        v = head_view(torch.zeros(head_leaf_shape(layout, B, L, H, Dh)), layout, B, L, H, Dh)
        assert v.shape == (B, L, H, Dh)
        assert v.is_contiguous() == (layout == "contig"), layout
    for kind in MOD_KINDS:
        v = mod_view(torch.zeros(mod_leaf_shape(kind, B, L, D)), kind, D)
        assert v.shape[-1] == D and v.storage_offset() > 0, kind  # the middle chunk
        assert v.is_contiguous() == (kind == "expand"), kind  # (1, D): a single row is contiguous


# --- the hypothesis tests (each replays a case function on drawn data) ----------------------------
@PROPS
@given(st.data())
def test_norm_modulate(data):
    case_norm_modulate(data)


@PROPS
@given(st.data())
def test_norm_modulate_dual(data):
    case_norm_modulate_dual(data)


@PROPS
@given(st.data())
def test_gated_residual(data):
    case_gated_residual(data)


@PROPS
@given(st.data())
def test_gated_residual_norm_modulate(data):
    case_gated_residual_norm_modulate(data)


@PROPS
@given(st.data())
def test_rms_norm(data):
    case_rms_norm(data)


@PROPS
@given(st.data())
def test_apply_rope(data):
    case_apply_rope(data)


@PROPS
@given(st.data())
def test_qk_norm_rope(data):
    case_qk_norm_rope(data)


@PROPS
@given(st.data())
def test_joint_attention(data):
    case_joint_attention(data)


# --- the compiled extension's CPU kernels (the "cuda" backend), for the ops it implements -----------------
# Native CPU code is fast, so these draw more examples than the interpreter tests above.
PROPS_C = settings(PROPS, max_examples=60)


def _needs_c():
    from ditfast import _ext

    return pytest.mark.skipif(_ext.load() is None, reason=f"ditfast._C is not built: {_ext.error()}")


@_needs_c()
@PROPS_C
@given(st.data())
def test_cuda_backend_norm_modulate(data):
    case_norm_modulate(data, backend="cuda")


@_needs_c()
@PROPS_C
@given(st.data())
def test_cuda_backend_gated_residual_norm_modulate(data):
    case_gated_residual_norm_modulate(data, backend="cuda")


@_needs_c()
@PROPS_C
@given(st.data())
def test_cuda_backend_apply_rope(data):
    case_apply_rope(data, backend="cuda")


@_needs_c()
@PROPS_C
@given(st.data())
def test_cuda_backend_qk_norm_rope(data):
    case_qk_norm_rope(data, backend="cuda")
