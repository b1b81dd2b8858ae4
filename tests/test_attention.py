"""Joint attention through ops: ``joint_attention`` on every backend (output, gradients and the
log-sum-exp) and ``joint_attention_streams`` (prepare_attention -> joint_attention -> per-stream
views) against ditfast.reference, by the tolerance rule (docs/numerics.md; ditfast.testing.check_op),
forward and backward, fp32 / bf16 / fp16.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors: small, odd shapes
(L 5 / 19 / 37, Dh 40 / 64 / 72, uneven streams). With one, the same tests run on CUDA at larger sizes.
The kernel itself: test_attention_kernel.py; the prepare op: test_prepare.py; dispatch: test_attention_dispatch.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ditfast
from ditfast import _backend, ops, reference
from ditfast.ops import attention as attn
from ditfast.ops import attention_backends as backends
from ditfast.testing import assert_by_rule, check_op

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AXES = {32: (8, 12, 12), 40: (8, 16, 16), 64: (16, 24, 24), 72: (8, 32, 32), 128: (16, 56, 56)}

def _triton_ok():
    return not _backend.impl(backends.OP, "triton").reasons(_backend.Spec(DEVICE, torch.float32, 64, (8, 0) if ON_GPU else None))


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="the triton backend cannot run here (no triton, or CPU without TRITON_INTERPRET=1)")

# (stream lengths, heads): small and uneven under the interpreter, larger on a GPU
STREAMS = ((77, 300), 3) if ON_GPU else ((7, 37), 2)


# ------------------------------------------------------------------------------------------------
# Inputs and the reference composition
# ------------------------------------------------------------------------------------------------
def qkv(B, L, H, Dh, dtype, grad=True):
    return [torch.randn(B, L, H, Dh, device=DEVICE, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def weight(Dh, dtype):
    return (1 + 0.3 * torch.randn(Dh, device=DEVICE)).to(dtype).requires_grad_()


def tables(B, L, Dh, per_batch=False):
    """fp32 (cos, sin) of random FLUX-style multi-axis ids: (L, Dh/2) or (B, L, Dh/2)."""
    ids = torch.randint(0, 64, (B, L, 3) if per_batch else (L, 3), device=DEVICE)
    return reference.rope_freqs(ids, AXES[Dh])


def ref_streams(qs, ks, vs, q_weights=None, k_weights=None, rope=None, interleaved=True):
    """ditfast.reference: per-stream QK-norm + RoPE, one attention over the concatenation, split."""
    lengths = [q.shape[1] for q in qs]
    qs2, ks2, start = [], [], 0
    for i, (q, k) in enumerate(zip(qs, ks)):
        n = q.shape[1]
        if q_weights is not None and q_weights[i] is not None:  # a stream's None weights: no QK-norm
            q, k = reference.rms_norm(q, q_weights[i]), reference.rms_norm(k, k_weights[i])
        if rope is not None:
            cos, sin = (t[..., start : start + n, :] for t in rope)
            q = reference.apply_rope(q, cos, sin, interleaved=interleaved)
            k = reference.apply_rope(k, cos, sin, interleaved=interleaved)
        qs2.append(q)
        ks2.append(k)
        start += n
    out = reference.joint_attention(torch.cat(qs2, 1), torch.cat(ks2, 1), torch.cat(list(vs), 1))
    return tuple(out.split(lengths, 1))


def stream_case(
    n, dtype, Dh, *, lengths=None, norm=True, rope=True, interleaved=True, per_batch=False, weight_dtype=None, B=2
):
    """(fast_fn, ref_fn, args) for check_op over n streams; args are flat: q_i, k_i, v_i, weights, tables."""
    lengths = lengths or (STREAMS[0] + (5,))[:n]
    H = STREAMS[1]
    args = []
    for L in lengths:
        args += qkv(B, L, H, Dh, dtype)
    nw = 2 * n if norm else 0
    args += [weight(Dh, weight_dtype or dtype) for _ in range(nw)]
    if rope:
        args += list(tables(B, sum(lengths), Dh, per_batch))

    def unpack(a):
        qs, ks, vs = a[0 : 3 * n : 3], a[1 : 3 * n : 3], a[2 : 3 * n : 3]
        w = a[3 * n : 3 * n + nw]
        kw = dict(q_weights=tuple(w[0::2]), k_weights=tuple(w[1::2])) if norm else {}
        if rope:
            kw["rope"] = tuple(a[3 * n + nw :])
        return qs, ks, vs, dict(kw, interleaved=interleaved)

    def fast(*a):
        qs, ks, vs, kw = unpack(a)
        return attn.joint_attention_streams(qs, ks, vs, **kw)

    def ref(*a):
        qs, ks, vs, kw = unpack(a)
        return ref_streams(qs, ks, vs, **kw)

    return fast, ref, args



# ------------------------------------------------------------------------------------------------
# ops.joint_attention on the Triton backend (the kernel itself: tests/test_attention_kernel.py)
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype, Dh, L", [(torch.float32, 72, 37), (torch.bfloat16, 40, 37), (torch.float16, 64, 64)])
def test_triton_joint_attention(dtype, Dh, L):
    B, L, H = (3, 5 * L, 3) if ON_GPU else (2, L, 2)  # L = 64: whole key blocks (no masks)
    fast = lambda q, k, v: ops.joint_attention(q, k, v, backend="triton")  # noqa: E731
    check_op(fast, reference.joint_attention, qkv(B, L, H, Dh, dtype), name=f"triton {dtype} Dh={Dh}")


# ------------------------------------------------------------------------------------------------
# joint_attention_streams = prepare_attention -> joint_attention -> per-stream views
# ------------------------------------------------------------------------------------------------
SMALL = dict(B=1, lengths=(5, 19))


@needs_triton
@pytest.mark.parametrize(
    "case",
    [
        dict(name="FLUX double (norm + interleaved RoPE)", dtype=torch.float32, Dh=72, kw=dict(B=1)),
        dict(name="per-batch tables, fp32 weights", dtype=torch.bfloat16, kw=dict(per_batch=True, weight_dtype=torch.float32)),
        dict(name="half-split RoPE", dtype=torch.bfloat16, kw=dict(SMALL, interleaved=False)),
        dict(name="norm only (SD3.5)", dtype=torch.float16, kw=dict(SMALL, rope=False)),
        dict(name="no norm, no RoPE (SD3)", dtype=torch.float16, kw=dict(SMALL, norm=False, rope=False)),
        dict(name="one stream (FLUX single block)", dtype=torch.bfloat16, n=1, kw=dict(B=1, lengths=(23,))),
        dict(name="three streams", dtype=torch.float16, n=3, kw=dict(B=1, lengths=(5, 9, 3))),
    ],
    ids=lambda c: c["name"],
)
def test_streams_on_triton(case):
    fast, ref, args = stream_case(case.get("n", 2), case["dtype"], case.get("Dh", 40), **case["kw"])
    with ditfast.use_backend("triton"):
        check_op(fast, ref, args, name=case["name"])


@needs_triton
def test_streams_rope_tables_with_grad():
    """Tables that require grad get their gradient (the prepare pass runs the reference for them)."""
    fast, ref, args = stream_case(2, torch.float32, 40, B=1, lengths=(5, 9))
    args[-2].requires_grad_()
    args[-1].requires_grad_()
    with ditfast.use_backend("triton"):
        check_op(fast, ref, args, name="tables with grad")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_stream_without_qk_norm_matches(backend):
    """q_weights=(w, None), k_weights=(w, None): stream 0 is normalized, stream 1 only rotated (the
    qk_norm_rope contract for None weights), whichever backend runs."""
    if backend == "triton" and not _triton_ok():
        pytest.skip("the triton backend cannot run here")
    B, H, Dh, (L0, L1) = 1, 2, 40, (5, 11)
    q0, k0, v0 = qkv(B, L0, H, Dh, torch.float32)
    q1, k1, v1 = qkv(B, L1, H, Dh, torch.float32)
    wq, wk = weight(Dh, torch.float32), weight(Dh, torch.float32)
    cos, sin = tables(B, L0 + L1, Dh)

    def fast(q0, k0, v0, q1, k1, v1, wq, wk):
        return attn.joint_attention_streams((q0, q1), (k0, k1), (v0, v1), q_weights=(wq, None),
                                            k_weights=(wk, None), rope=(cos, sin))

    def ref(q0, k0, v0, q1, k1, v1, wq, wk):
        return ref_streams((q0, q1), (k0, k1), (v0, v1), q_weights=(wq, None), k_weights=(wk, None), rope=(cos, sin))

    with ditfast.use_backend(backend):
        check_op(fast, ref, [q0, k0, v0, q1, k1, v1, wq, wk], name=f"streams with one unnormalized ({backend})")


class _AtenLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", id="extension"), "reference"])
def test_streams_of_packed_projections_make_no_concatenation(backend):
    """Packed [q | k | v] projections go in as strided views; on the kernel backends no aten.cat runs
    and the per-stream outputs are views of one joint output (the reference may concatenate)."""
    if backend == "triton" and not _triton_ok():
        pytest.skip("the triton backend cannot run here")
    if backend == "cuda" and not _backend.availability("cuda", DEVICE)[0]:
        pytest.skip("ditfast._C is not built")
    B, H, Dh, (L0, L1) = 1, 2, 40, (5, 19)
    txt = torch.randn(B, L0, 3 * H * Dh, device=DEVICE, requires_grad=True)  # [q | k | v]
    img = torch.randn(B, L1, 7 * H * Dh, device=DEVICE, requires_grad=True)  # FLUX linear1: [q | k | v | mlp]
    ws = [weight(Dh, torch.float32) for _ in range(4)]
    cos, sin = tables(B, L0 + L1, Dh)

    def views(txt, img):
        q0, k0, v0 = txt.view(B, L0, 3, H, Dh).unbind(2)
        q1, k1, v1 = (img[..., i * H * Dh : (i + 1) * H * Dh].view(B, L1, H, Dh) for i in range(3))
        return (q0, q1), (k0, k1), (v0, v1)

    def fast(txt, img, *w):
        return attn.joint_attention_streams(*views(txt, img), q_weights=w[0::2], k_weights=w[1::2], rope=(cos, sin))

    def ref(txt, img, *w):
        return ref_streams(*views(txt, img), q_weights=w[0::2], k_weights=w[1::2], rope=(cos, sin))

    with ditfast.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "cuda" has no CPU attention: falls back
        check_op(fast, ref, [txt, img, *ws], name=f"packed projections ({backend})")
        log = _AtenLog()
        with log:
            t, i = fast(txt, img, *ws)
    assert t._base is not None and t._base is i._base, "the stream outputs are views of one joint output"
    if backend != "reference":
        assert not [c for c in log.calls if c.startswith("aten.cat")], log.calls


# ------------------------------------------------------------------------------------------------
# Every attention backend against the reference, output and log-sum-exp
# ------------------------------------------------------------------------------------------------
def _backend_cases():
    for name in backends.NAMES:
        if name == "triton" and not ON_GPU:
            continue  # covered above and in test_attention_kernel.py, at interpreter-friendly sizes
        for dtype in DTYPES:
            if dtype in _backend.impl(backends.OP, name).dtypes:
                yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")


def _skip_unless_runs(name, q, features=()):
    why = _backend.impl(backends.OP, name).not_supported_reasons(q, features)
    if why:
        pytest.skip(f"{name} cannot run here: {'; '.join(why)}")


@pytest.mark.parametrize("name, dtype", list(_backend_cases()))
def test_every_backend_matches_the_reference(name, dtype):
    B, L, H, Dh = (2, 333, 3, 72) if ON_GPU else (2, 37, 2, 72)
    q, k, v = qkv(B, L, H, Dh, dtype)
    _skip_unless_runs(name, q)
    fast = lambda q, k, v: ops.joint_attention(q, k, v, backend=name)  # noqa: E731
    check_op(fast, reference.joint_attention, [q, k, v], name=name)


def _lse_cases():
    for name in backends.NAMES:
        if "lse" in _backend.impl(backends.OP, name).features:
            for dtype in DTYPES:
                if dtype in _backend.impl(backends.OP, name).dtypes:
                    yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")


@pytest.mark.parametrize("name, dtype", list(_lse_cases()))
def test_lse_on_every_backend_that_declares_it(name, dtype):
    """return_lse=True: (o, lse) with lse (B, H, Lq) fp32, the natural-log logsumexp of the scaled
    scores, by the tolerance rule against the fp32 reference; o as without lse."""
    B, Lq, Lk, H, Dh = (2, 333, 517, 3, 64) if ON_GPU else (2, 13, 37, 2, 40)
    q, _, _ = qkv(B, Lq, H, Dh, dtype, grad=False)
    _, k, v = qkv(B, Lk, H, Dh, dtype, grad=False)
    _skip_unless_runs(name, q, ("lse",))
    o, lse = ops.joint_attention(q, k, v, backend=name, return_lse=True)
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32 and o.dtype == dtype
    o32, lse32 = reference.joint_attention(q.float(), k.float(), v.float(), return_lse=True)
    s_low = torch.einsum("bqhd,bkhd->bhqk", q, k) * Dh**-0.5  # the low-precision yardstick
    assert_by_rule(lse, lse32, torch.logsumexp(s_low, -1).float(), name=f"{name} lse")
    assert_by_rule(o, o32, reference.joint_attention(q, k, v), name=f"{name} out")


def test_lse_request_skips_backends_without_it():
    q = torch.randn(1, 5, 2, 16)
    assert backends.choose_backend(q, q, q, return_lse=True) == "sdpa_cpu"  # through its aten op
    with pytest.raises(RuntimeError, match="sdpa_math.*cannot return lse"):
        ops.joint_attention(q, q, q, backend="sdpa_math", return_lse=True)


def test_lse_without_keys_is_minus_infinity():
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 0, 2, 8)
    o, lse = ops.joint_attention(q, k, k, return_lse=True)
    assert torch.equal(o, torch.zeros_like(q)) and lse.shape == (2, 2, 3) and torch.isneginf(lse).all()


def test_reference_lse_gradient_is_exact():
    """On the reference the lse is an autograd graph: its gradient w.r.t. q is softmax-weighted k / sqrt(Dh)."""
    q, k, v = (torch.randn(1, 4, 1, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _, lse = reference.joint_attention(q, k, v, return_lse=True)
    (gq,) = torch.autograd.grad(lse.sum(), q)
    p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, -1)
    torch.testing.assert_close(gq, torch.einsum("bhqk,bkhd->bqhd", p, k) / 8**0.5)


# ------------------------------------------------------------------------------------------------
# torch.compile: the prepare and attention custom ops appear in the graphs
# ------------------------------------------------------------------------------------------------
@needs_triton
def test_torch_compile_fullgraph():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    B, H, Dh, (L0, L1) = 1, 2, 40, (5, 11)
    q0, k0, v0 = qkv(B, L0, H, Dh, torch.float16)
    q1, k1, v1 = qkv(B, L1, H, Dh, torch.float16)
    wq, wk = weight(Dh, torch.float16), weight(Dh, torch.float16)
    cos, sin = tables(B, L0 + L1, Dh)
    inputs = [q0, k0, v0, q1, k1, v1, wq, wk]

    def f(q0, k0, v0, q1, k1, v1, wq, wk):
        a = ops.joint_attention(q0, k1, v1)
        t, i = attn.joint_attention_streams(
            (q0, q1), (k0, k1), (v0, v1), q_weights=(wq, wq), k_weights=(wk, wk), rope=(cos, sin)
        )
        return (a * t).float().sum() + i.float().pow(2).sum()

    graphs = {}

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)

        return compiler

    backend = "inductor" if ON_GPU else aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))
    torch._dynamo.reset()
    with ditfast.use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        want = f(*inputs)
        g_want = torch.autograd.grad(want, inputs)
        got = compiled(*inputs)
        g_got = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    if not ON_GPU:  # the forward and the backward graph each call the custom ops
        assert {"ditfast.flash_attention.default", "ditfast.prepare_attention.default"} <= graphs["fw"], graphs["fw"]
        assert {"ditfast.flash_attention_backward.default", "ditfast.prepare_attention_backward.default"} <= graphs["bw"], graphs["bw"]


# ------------------------------------------------------------------------------------------------
# Validation: errors name the argument, before any kernel runs
# ------------------------------------------------------------------------------------------------
def _streams_inputs(Dh=40):
    B, H = 2, 2
    qs = tuple(torch.randn(B, L, H, Dh) for L in (3, 5))
    return qs, tuple(torch.randn_like(q) for q in qs), tuple(torch.randn_like(q) for q in qs)


def test_streams_validation_comes_from_prepare_attention():
    """joint_attention_streams validates through ops.prepare_attention (its own error tests:
    tests/test_prepare.py) and the attention backend name through the registry."""
    qs, ks, vs = _streams_inputs()
    with pytest.raises(ValueError, match="one entry per stream|one tensor per stream|must have"):
        attn.joint_attention_streams(qs, ks[:1], vs)
    with pytest.raises(ValueError, match="even head dim"):
        attn.joint_attention_streams(*_streams_inputs(Dh=41), rope=(torch.ones(8, 20), torch.ones(8, 20)))
    with pytest.raises(ValueError, match="unknown ditfast backend 'flash'"):
        attn.joint_attention_streams(qs, ks, vs, backend="flash")


def test_joint_attention_validation():
    q = torch.randn(2, 5, 2, 40)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.joint_attention(q, torch.randn(2, 5, 3, 40), torch.randn(2, 5, 3, 40))
    with pytest.raises(TypeError, match="share one dtype"):
        ops.joint_attention(q, q.half(), q.half())
    with pytest.raises(TypeError, match="a backend is a string or None"):
        ops.joint_attention(q, q, q, backend=3)


# ------------------------------------------------------------------------------------------------
# softmax_scale and grouped-query attention on every backend (issue 27.6)
# ------------------------------------------------------------------------------------------------
def gqa_reference(scale):
    """PyTorch's own answer: unpinned SDPA on k / v repeated per query head, with the scale."""
    def ref(q, k, v):
        g = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    return ref


def _gqa_cases():
    for name in backends.NAMES:
        for dtype in DTYPES:
            if dtype in _backend.impl(backends.OP, name).dtypes:
                yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")


# (B, Lq, Lk, H, H_kv, Dh, scale): odd lengths, Lq != Lk, padded head dims, GQA 3:1 and MQA, scales
GQA_SHAPES = [(2, 19, 13, 6, 2, 40, 0.3), (1, 13, 21, 4, 1, 72, None), (2, 11, 11, 2, 2, 24, 1.7)]


@pytest.mark.parametrize("shape", GQA_SHAPES, ids=lambda s: "B{}_Lq{}_Lk{}_H{}_Hkv{}_Dh{}_scale{}".format(*s))
@pytest.mark.parametrize("name, dtype", list(_gqa_cases()))
def test_scale_and_grouped_heads_on_every_backend(name, dtype, shape):
    """joint_attention(q, k, v, softmax_scale=s) with fewer k / v heads, forward and backward, by the
    rule against PyTorch SDPA on repeated k / v: every backend that runs here (the Triton kernel
    under the interpreter on CPU)."""
    B, Lq, Lk, H, Hk, Dh, scale = shape
    if ON_GPU:
        Lq, Lk = Lq * 17, Lk * 23
    q = torch.randn(B, Lq, H, Dh, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Lk, Hk, Dh, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    _skip_unless_runs(name, q)
    fast = lambda q, k, v: ops.joint_attention(q, k, v, backend=name, softmax_scale=scale)  # noqa: E731
    check_op(fast, gqa_reference(scale), [q, k, v], name=f"{name} GQA {H}:{Hk} scale {scale}")


@pytest.mark.parametrize("name", [n for n in backends.NAMES if "lse" in _backend.impl(backends.OP, n).features])
def test_lse_with_scale_and_grouped_heads(name):
    """lse (B, H, Lq) of the scaled scores of each query head against its k / v head."""
    B, Lq, Lk, H, Hk, Dh, scale = 2, 13, 29, 6, 3, 40, 0.2
    q = torch.randn(B, Lq, H, Dh, device=DEVICE)
    k, v = torch.randn(B, Lk, Hk, Dh, device=DEVICE), torch.randn(B, Lk, Hk, Dh, device=DEVICE)
    _skip_unless_runs(name, q, ("lse",))
    o, lse = ops.joint_attention(q, k, v, backend=name, softmax_scale=scale, return_lse=True)
    kk = k.double().repeat_interleave(H // Hk, 2)
    want = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale, -1)
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(o, gqa_reference(scale)(q, k, v), rtol=1e-5, atol=1e-5)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = qkv(1, 7, 2, 40, torch.float32, grad=False)
    for name in ("reference", "sdpa_math", "sdpa_cpu") + (("triton",) if _triton_ok() else ()):
        if _backend.impl(backends.OP, name).not_supported_reasons(q):
            continue
        torch.testing.assert_close(ops.joint_attention(q, k, v, backend=name),
                                   ops.joint_attention(q, k, v, backend=name, softmax_scale=40 ** -0.5))


def test_sdpa_layout_is_caught_with_a_hint():
    """(B, H, L, Dh) tensors (SDPA's layout) whose (B, L, H, Dh) reading is inconsistent but whose
    transposed reading fits: the error says to transpose. Mismatches that no transpose fixes get
    the plain message; valid grouped heads pass."""
    B, H, Lq, Lk, Dh = 2, 4, 9, 7, 16
    q, k = torch.randn(B, H, Lq, Dh), torch.randn(B, H, Lk, Dh)  # SDPA layout, Lq % Lk != 0
    with pytest.raises(ValueError, match=r"look like PyTorch SDPA's \(B, H, L, Dh\) layout.*q.transpose\(1, 2\)"):
        ops.joint_attention(q, k, k)
    q2, k2 = torch.randn(B, 2, 9, Dh), torch.randn(B, 2 * 3, 2, Dh)  # no reading fits: H_q 9, H_kv 2; 2 vs 6
    with pytest.raises(ValueError, match="H_kv dividing") as info:
        ops.joint_attention(q2, k2, k2)
    assert "SDPA" not in str(info.value)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.joint_attention(torch.randn(B, 5, 4, Dh), torch.randn(B, 5, 4, Dh + 1), torch.randn(B, 5, 4, Dh + 1))
    assert ops.joint_attention(torch.randn(B, 5, 4, Dh), torch.randn(B, 3, 2, Dh), torch.randn(B, 3, 2, Dh)).shape == (B, 5, 4, Dh)
    with pytest.raises(TypeError, match="softmax_scale must be a float"):
        ops.joint_attention(q, q, q, softmax_scale="0.1")


# ------------------------------------------------------------------------------------------------
# Per-sample key lengths (a key-padding mask whose valid keys are a prefix)
# ------------------------------------------------------------------------------------------------
def _per_sample_truth(q, k, v, lengths, **kw):
    """Each sample attending its valid keys alone, on the reference in fp64: the oracle."""
    with ditfast.use_backend("reference"):
        outs = [ops.joint_attention(q[b:b + 1].double(), k[b:b + 1, :n].double(), v[b:b + 1, :n].double(),
                                    backend="reference", **kw) for b, n in enumerate(lengths)]
    if kw.get("return_lse"):
        return torch.cat([o for o, _ in outs]), torch.cat([l for _, l in outs])
    return torch.cat(outs)


@pytest.mark.parametrize("name", ["reference", "sdpa_math", "sdpa_cpu", "triton"])
@pytest.mark.parametrize("lengths", [(5, 13), (13, 13), (1, 7)], ids=["unequal", "equal-short", "one-key"])
def test_key_lengths_on_every_backend(name, lengths):
    """Sample b attends keys [0, lengths[b]) only: equal to each sample attending its prefix alone, output
    and lse; the padded keys' k / v gradients are exactly zero; the others match the oracle's."""
    torch.manual_seed(0)
    B, Lq, Lk, H, Dh = 2, 9, 16, 2, 40
    q, k, v = (torch.randn(B, L, H, Dh, requires_grad=True) for L in (Lq, Lk, Lk))
    _skip_unless_runs(name, q)
    out = ops.joint_attention(q, k, v, backend=name, key_lengths=list(lengths))
    want = _per_sample_truth(q, k, v, lengths)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    for b, n in enumerate(lengths):
        assert torch.equal(dk[b, n:], torch.zeros_like(dk[b, n:])) and torch.equal(dv[b, n:], torch.zeros_like(dv[b, n:]))
        qb, kb, vb = (t[b:b + 1].detach().double().requires_grad_() for t in (q, k[:, :n], v[:, :n]))
        wq, wk, wv = torch.autograd.grad(ops.joint_attention(qb, kb, vb, backend="reference").sum(), (qb, kb, vb))
        torch.testing.assert_close(dq[b:b + 1].double(), wq, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dk[b:b + 1, :n].double(), wk, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dv[b:b + 1, :n].double(), wv, rtol=1e-4, atol=1e-5)
    if "lse" in _backend.impl(backends.OP, name).features:
        o, lse = ops.joint_attention(q, k, v, backend=name, key_lengths=torch.tensor(lengths), return_lse=True)
        wo, wl = _per_sample_truth(q, k, v, lengths, return_lse=True)
        torch.testing.assert_close(lse.double(), wl, rtol=1e-5, atol=1e-5)


def test_key_lengths_full_is_the_plain_call_and_bad_lengths_are_named():
    q, k, v = qkv(2, 6, 2, 16, torch.float32)
    torch.testing.assert_close(ops.joint_attention(q, k, v, key_lengths=(6, 6)), ops.joint_attention(q, k, v),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="one count per sample"):
        ops.joint_attention(q, k, v, key_lengths=[3])
    with pytest.raises(ValueError, match=r"in \[1, 6\]"):
        ops.joint_attention(q, k, v, key_lengths=[0, 6])
    with pytest.raises(ValueError, match=r"in \[1, 6\]"):
        ops.joint_attention(q, k, v, key_lengths=[7, 6])
    with pytest.raises(TypeError, match="integer"):
        ops.joint_attention(q, k, v, key_lengths=torch.tensor([2.0, 3.0]))
    with pytest.raises(TypeError, match="ints"):
        ops.joint_attention(q, k, v, key_lengths=[2.5, 3])
    with pytest.raises(ValueError, match="default attention only"):
        ops.joint_attention_streams((q,), (k,), (v,), attention=lambda a, b, c: a, key_lengths=[2, 3])


def test_key_lengths_under_torch_compile():
    torch._dynamo.reset()
    q, k, v = qkv(2, 6, 2, 16, torch.float32)
    fn = torch.compile(lambda q, k, v: ops.joint_attention(q, k, v, key_lengths=[3, 5]), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), ops.joint_attention(q, k, v, key_lengths=[3, 5]))
    torch._dynamo.reset()
