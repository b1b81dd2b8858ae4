"""Joint attention: ditfast's Triton flash attention (plain, split streams, QK-norm + RoPE prologue)
and every attention backend against ditfast.reference, by the tolerance rule (docs/numerics.md) (ditfast.testing.check_op),
forward and backward, fp32 / bf16 / fp16.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors: small, odd shapes
(L 1 / 7 / 37, Dh 40 / 64 / 72, uneven streams). With one, the same tests run on CUDA at larger sizes.
Dispatch (descriptors, automatic choice, messages) is tested in test_attention_dispatch.py.
"""
from __future__ import annotations

import pytest
import torch

from ditfast import ops, reference
from ditfast.ops import attention as attn
from ditfast.ops import attention_backends as backends
from ditfast.testing import check_op

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AXES = {32: (8, 12, 12), 40: (8, 16, 16), 64: (16, 24, 24), 72: (8, 32, 32), 128: (16, 56, 56)}

needs_triton = pytest.mark.skipif(
    bool(backends.BACKENDS["triton"].reasons(backends.Spec(DEVICE, torch.float32, 64, (8, 0) if ON_GPU else None))),
    reason="the triton backend cannot run here (no triton, or CPU without TRITON_INTERPRET=1)",
)

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
        return ops_streams(qs, ks, vs, backend="triton", **kw)

    def ref(*a):
        qs, ks, vs, kw = unpack(a)
        return ref_streams(qs, ks, vs, **kw)

    return fast, ref, args


ops_streams = attn.joint_attention_streams


# ------------------------------------------------------------------------------------------------
# The Triton kernel, one stream, no prologue
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype, Dh, L", [(torch.float32, 72, 37), (torch.bfloat16, 40, 37), (torch.float16, 64, 64)])
def test_triton_joint_attention(dtype, Dh, L):
    B, L, H = (3, 5 * L, 3) if ON_GPU else (2, L, 2)  # L = 64: whole key blocks (no masks)
    fast = lambda q, k, v: ops.joint_attention(q, k, v, backend="triton")  # noqa: E731
    check_op(fast, reference.joint_attention, qkv(B, L, H, Dh, dtype), name=f"triton {dtype} Dh={Dh}")


@needs_triton
@pytest.mark.parametrize("Lq, Lk", [(1, 1), (7, 37)])
def test_triton_query_and_key_lengths_differ(Lq, Lk):
    B, H, Dh = 2, 2, 40
    q, _, _ = qkv(B, Lq, H, Dh, torch.float16)
    _, k, v = qkv(B, Lk, H, Dh, torch.float16)
    fast = lambda q, k, v: ops.joint_attention(q, k, v, backend="triton")  # noqa: E731
    check_op(fast, reference.joint_attention, [q, k, v], name=f"triton Lq={Lq} Lk={Lk}")


# ------------------------------------------------------------------------------------------------
# Split streams with the QK-norm + RoPE prologue, in one kernel
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize(
    "dtype, Dh, kw",
    [
        (torch.float32, 72, dict(B=1)),
        (torch.bfloat16, 40, dict(per_batch=True, weight_dtype=torch.float32)),  # (B, L, Dh/2) tables
        (torch.float16, 40, dict(B=1)),
    ],
)
def test_triton_streams_flux(dtype, Dh, kw):
    """FLUX's double block: text + image streams, per-stream QK-RMSNorm, interleaved RoPE."""
    fast, ref, args = stream_case(2, dtype, Dh, **kw)
    check_op(fast, ref, args, name=f"streams {dtype}")


SMALL = dict(B=1, lengths=(5, 19))


@needs_triton
@pytest.mark.parametrize(
    "case",
    [
        dict(name="half-split RoPE", dtype=torch.bfloat16, kw=dict(SMALL, interleaved=False)),
        dict(name="norm only (SD3.5)", dtype=torch.float16, kw=dict(SMALL, rope=False)),
        dict(name="RoPE only, stream 0 of whole blocks", dtype=torch.float16, kw=dict(B=1, lengths=(32, 19), norm=False)),
        dict(name="no prologue (SD3)", dtype=torch.float16, kw=dict(SMALL, norm=False, rope=False)),
        dict(name="one stream (FLUX single block)", dtype=torch.bfloat16, n=1, kw=dict(B=1, lengths=(23,))),
        dict(name="three streams (concatenated)", dtype=torch.float16, n=3, kw=dict(B=1, lengths=(5, 9, 3))),
    ],
    ids=lambda c: c["name"],
)
def test_triton_streams_variants(case):
    fast, ref, args = stream_case(case.get("n", 2), case["dtype"], 40, **case["kw"])
    check_op(fast, ref, args, name=case["name"])


@needs_triton
def test_triton_streams_rope_tables_with_grad():
    """Tables that require grad take the unfused path (per-stream qk_norm_rope, then the Triton kernel)."""
    fast, ref, args = stream_case(2, torch.float32, 40, B=1, lengths=(5, 9))
    args[-2].requires_grad_()
    args[-1].requires_grad_()
    check_op(fast, ref, args, name="tables with grad")


# ------------------------------------------------------------------------------------------------
# A stream without QK-norm beside one with it
# ------------------------------------------------------------------------------------------------
@needs_triton
def test_stream_without_qk_norm_matches_on_every_backend():
    """q_weights=(w, None), k_weights=(w, None): stream 0 is normalized, stream 1 only rotated (the
    qk_norm_rope contract for None weights), whichever backend runs."""
    B, H, Dh, (L0, L1) = 1, 2, 40, (5, 11)
    q0, k0, v0 = qkv(B, L0, H, Dh, torch.float32)
    q1, k1, v1 = qkv(B, L1, H, Dh, torch.float32)
    wq, wk = weight(Dh, torch.float32), weight(Dh, torch.float32)
    cos, sin = tables(B, L0 + L1, Dh)
    args = [q0, k0, v0, q1, k1, v1, wq, wk]

    def run(backend):
        def fn(q0, k0, v0, q1, k1, v1, wq, wk):
            return attn.joint_attention_streams((q0, q1), (k0, k1), (v0, v1), q_weights=(wq, None),
                                                k_weights=(wk, None), rope=(cos, sin), backend=backend)
        return fn

    def ref(q0, k0, v0, q1, k1, v1, wq, wk):
        return ref_streams((q0, q1), (k0, k1), (v0, v1), q_weights=(wq, None), k_weights=(wk, None), rope=(cos, sin))

    for backend in ("triton", "reference"):
        check_op(run(backend), ref, args, name=f"streams with one unnormalized ({backend})")


# ------------------------------------------------------------------------------------------------
# Layout: strided views of packed projections go in as they are
# ------------------------------------------------------------------------------------------------
@needs_triton
def test_triton_streams_read_packed_projections_without_copies(monkeypatch):
    B, H, Dh, (L0, L1) = 1, 2, 40, (5, 19)
    dtype = torch.float16
    txt = torch.randn(B, L0, 3 * H * Dh, device=DEVICE, dtype=dtype, requires_grad=True)  # [q | k | v]
    img = torch.randn(B, L1, 7 * H * Dh, device=DEVICE, dtype=dtype, requires_grad=True)  # FLUX linear1: [q | k | v | mlp]
    ws = [weight(Dh, dtype) for _ in range(4)]
    cos, sin = tables(B, L0 + L1, Dh)

    def views(txt, img):
        q0, k0, v0 = txt.view(B, L0, 3, H, Dh).unbind(2)
        q1, k1, v1 = (img[..., i * H * Dh : (i + 1) * H * Dh].view(B, L1, H, Dh) for i in range(3))
        return (q0, q1), (k0, k1), (v0, v1)

    def fast(txt, img, *w):
        return attn.joint_attention_streams(*views(txt, img), q_weights=w[0::2], k_weights=w[1::2], rope=(cos, sin), backend="triton")

    def ref(txt, img, *w):
        return ref_streams(*views(txt, img), q_weights=w[0::2], k_weights=w[1::2], rope=(cos, sin))

    seen = []
    kernels = attn._kernels()
    launch = kernels.attention_forward

    def spy(*args):
        seen.append([(t.data_ptr(), t.stride()) for t in args[:6]])
        return launch(*args)

    monkeypatch.setattr(kernels, "attention_forward", spy)
    check_op(fast, ref, [txt, img, *ws], name="packed projections")
    with torch.no_grad():
        fast(txt, img, *ws)
    qs, ks, vs = views(txt, img)
    assert seen[-1] == [(t.data_ptr(), t.stride()) for t in (qs[0], ks[0], vs[0], qs[1], ks[1], vs[1])]


# ------------------------------------------------------------------------------------------------
# The unfused path and every attention backend against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "sdpa_math"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_unfused_streams_match_the_reference(backend, interleaved):
    _, ref, args = stream_case(2, torch.float32, 40, interleaved=interleaved)
    with torch.no_grad():
        a = [t.detach() for t in args]
        qs, ks, vs = a[0:6:3], a[1:6:3], a[2:6:3]
        w, rope = a[6:10], tuple(a[10:])
        got = attn.joint_attention_streams(
            qs, ks, vs, q_weights=w[0::2], k_weights=w[1::2], rope=rope, interleaved=interleaved, backend=backend
        )
        want = ref_streams(qs, ks, vs, q_weights=w[0::2], k_weights=w[1::2], rope=rope, interleaved=interleaved)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _backend_cases():
    for name in backends.NAMES:
        if name == "triton" and not ON_GPU:
            continue  # covered above, at interpreter-friendly sizes
        for dtype in DTYPES:
            if dtype in backends.BACKENDS[name].dtypes:
                yield pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")


@pytest.mark.parametrize("name, dtype", list(_backend_cases()))
def test_every_backend_matches_the_reference(name, dtype):
    B, L, H, Dh = (2, 333, 3, 72) if ON_GPU else (2, 37, 2, 72)
    q, k, v = qkv(B, L, H, Dh, dtype)
    why = backends.BACKENDS[name].not_supported_reasons(q, k, v)
    if why:
        pytest.skip(f"{name} cannot run here: {'; '.join(why)}")
    fast = lambda q, k, v: ops.joint_attention(q, k, v, backend=name)  # noqa: E731
    check_op(fast, reference.joint_attention, [q, k, v], name=name)


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------
def _opcheck_cases():
    B, H, Dh, L0, L1 = 1, 2, 32, 3, 5
    f32 = torch.float32
    q0, k0, v0 = qkv(B, L0, H, Dh, f32)
    q1, k1, v1 = qkv(B, L1, H, Dh, f32)
    ws = [weight(Dh, f32) for _ in range(4)]
    cos, sin = tables(B, L0 + L1, Dh)
    o0, o1, lse = (t.detach() for t in attn._attention_op(q0, k0, v0, q1, k1, v1, *ws, cos, sin, True, 1, 1e-6))
    g0, g1 = torch.randn_like(o0), torch.randn_like(o1)
    d = lambda t: t.detach()  # noqa: E731
    op, bwd = torch.ops.ditfast.joint_attention.default, torch.ops.ditfast.joint_attention_backward.default
    return {
        "two streams, norm + rope": (op, (q0, k0, v0, q1, k1, v1, *ws, cos, sin, True, 1, 1e-6)),
        "one stream, Lq != Lk": (op, (q0, k1, v1, None, None, None, None, None, None, None, None, None, False, 0, 1e-6)),
        "backward": (bwd, (g0, g1, *map(d, (q0, k0, v0, q1, k1, v1)), o0, o1, lse, *map(d, ws), cos, sin, True, 2, 1e-6)),
    }


@needs_triton
@pytest.mark.parametrize("case", ["two streams, norm + rope", "one stream, Lq != Lk", "backward"])
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


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
        a = ops.joint_attention(q0, k1, v1, backend="triton")
        t, i = attn.joint_attention_streams(
            (q0, q1), (k0, k1), (v0, v1), q_weights=(wq, wq), k_weights=(wk, wk), rope=(cos, sin), backend="triton"
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
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    want = f(*inputs)
    g_want = torch.autograd.grad(want, inputs)
    got = compiled(*inputs)
    g_got = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    if not ON_GPU:  # the forward and the backward graph each call the custom ops
        assert "ditfast.joint_attention.default" in graphs["fw"], graphs["fw"]
        assert "ditfast.joint_attention_backward.default" in graphs["bw"], graphs["bw"]


# ------------------------------------------------------------------------------------------------
# Validation: errors name the argument, before any kernel runs
# ------------------------------------------------------------------------------------------------
def _streams_inputs(Dh=40):
    B, H = 2, 2
    qs = tuple(torch.randn(B, L, H, Dh) for L in (3, 5))
    return qs, tuple(torch.randn_like(q) for q in qs), tuple(torch.randn_like(q) for q in qs)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(qs=a["qs"][0]), TypeError, "qs must be a non-empty tuple"),
        (lambda a: a.update(ks=a["ks"][:1]), ValueError, "one tensor per stream"),
        (lambda a: a.update(vs=(a["vs"][0], a["vs"][1][:, :4])), ValueError, r"vs\[1\] must have shape"),
        (lambda a: a.update(ks=(a["ks"][0].half(), a["ks"][1])), TypeError, r"ks\[0\] has dtype"),
        (lambda a: a.update(qs=(a["qs"][0][:, :, :1], a["qs"][1])), ValueError, r"ks\[0\] must have shape"),
        (lambda a: a.update(qs=(a["qs"][0][:, :0], a["qs"][1]), ks=(a["ks"][0][:, :0], a["ks"][1]), vs=(a["vs"][0][:, :0], a["vs"][1])), ValueError, "stream 0 is empty"),
        (lambda a: a.update(q_weights=(None, None)), ValueError, "q_weights and k_weights must both"),
        (lambda a: a.update(q_weights=(None,), k_weights=(None,)), ValueError, "q_weights must be a tuple"),
        (lambda a: a.update(q_weights=(torch.ones(40), None), k_weights=(None, None)), ValueError,
         r"q_weights\[0\] and k_weights\[0\] must both be tensors"),
        (lambda a: a.update(q_weights=(torch.ones(39), None), k_weights=(None, None)), ValueError, r"q_weights\[0\] must have shape"),
        (lambda a: a.update(rope=(torch.ones(2, 9, 20), torch.ones(2, 9, 20))), ValueError, "must cover the joint sequence"),
        (lambda a: a.update(rope=(torch.ones(8, 20), torch.ones(2, 8, 20))), ValueError, "cos and sin must have one shape"),
        (lambda a: a.update(rope=(torch.ones(7, 20), torch.ones(7, 20))), ValueError, r"rope\[0\] \(cos\) must cover"),
        (lambda a: a.update(rope=(torch.ones(8, 20).half(), torch.ones(8, 20))), TypeError, "must be float32"),
        (lambda a: a.update(rope=torch.ones(8, 20)), TypeError, "rope must be None or a"),
        (lambda a: a.update(eps=0.0), ValueError, "eps must be a positive"),
        (lambda a: a.update(backend="flash"), ValueError, "unknown attention backend 'flash'"),
    ],
)
def test_streams_validation(mutate, error, match):
    qs, ks, vs = _streams_inputs()
    a = dict(qs=qs, ks=ks, vs=vs)
    mutate(a)
    with pytest.raises(error, match=match):
        attn.joint_attention_streams(a.pop("qs"), a.pop("ks"), a.pop("vs"), **a)


def test_streams_rope_needs_an_even_head_dim():
    qs, ks, vs = _streams_inputs(Dh=41)
    with pytest.raises(ValueError, match="even head dim"):
        attn.joint_attention_streams(qs, ks, vs, rope=(torch.ones(8, 20), torch.ones(8, 20)))


def test_joint_attention_validation():
    q = torch.randn(2, 5, 2, 40)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.joint_attention(q, torch.randn(2, 5, 3, 40), torch.randn(2, 5, 3, 40))
    with pytest.raises(TypeError, match="share one dtype"):
        ops.joint_attention(q, q.half(), q.half())
    with pytest.raises(TypeError, match="backend must be a string"):
        ops.joint_attention(q, q, q, backend=3)
