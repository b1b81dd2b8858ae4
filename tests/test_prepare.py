"""The attention prepare op (ops.prepare_attention) against ditfast.reference.prepare_attention.

Each case builds per-stream q, k, v the way the blocks do (strided views of a packed qkv projection,
or separate projections), runs the op on the "triton" backend (the Triton interpreter without a GPU)
and on the "cuda" backend (the compiled ditfast._C kernels: CPU loops here, CUDA kernels on a GPU),
and compares outputs and gradients with the reference by the tolerance rule (docs/numerics.md) (ditfast.testing.check_op)
in fp32, bf16 and fp16.

Weight grads are sums over all of a stream's rows, rounded once to the low precision: they are
checked with the reduced-gradient bound of docs/numerics.md (``check_op(..., reduced_args=...)``),
the factor-2 rule applied before that final rounding.
"""
from __future__ import annotations

import pytest
import torch

import ditfast
from ditfast import _backend, reference
from ditfast.ops.prepare import prepare_attention
from ditfast.reference.prepare import prepare_attention as ref_prepare
from ditfast.testing import check_op

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AXES = {40: (8, 16, 16), 72: (8, 32, 32), 128: (16, 56, 56)}
ON_GPU = torch.cuda.is_available()


def _backends():
    out = []
    if _backend.availability("triton", "cuda" if ON_GPU else "cpu")[0]:
        out.append("triton")
    out.append("cuda")  # the compiled extension must be built (scripts/test.sh builds it)
    return out


BACKENDS = _backends()
BACKEND_IDS = [f"{b}-backend" for b in BACKENDS]  # not plain "cuda": conftest skips tests with that keyword on CPU

# (B, stream lengths, H, Dh, norm per stream, rope: None / "LP" (L, Dh/2) / "BLP" (B, L, Dh/2),
#  interleaved, layout: "packed" qkv views / "separate" projections)
CASES = [
    (3, (5, 7), 2, 40, (True, True), "LP", True, "packed"),
    (1, (77,), 2, 72, (True,), "BLP", False, "packed"),
    (2, (5, 11), 3, 128, (False, True), "LP", False, "separate"),
    (2, (3, 5, 4), 2, 72, (True, False, True), "BLP", True, "packed"),
    (2, (5, 7), 2, 40, (True, True), None, True, "packed"),
    (1, (4, 6), 2, 40, (False, False), "LP", False, "separate"),
    (2, (3, 6), 2, 40, (False, False), None, True, "packed"),
]
if ON_GPU:
    CASES += [(1, (512, 4096), 24, 128, (True, True), "LP", True, "packed"),
              (2, (333, 1024), 38, 64, (True, True), None, True, "packed")]


def case_id(c):
    B, Ls, H, Dh, norm, rope, inter, layout = c
    n = "".join("n" if f else "-" for f in norm)
    return f"B{B}-L{'+'.join(map(str, Ls))}-H{H}-Dh{Dh}-{n}-{rope or 'norope'}-{'inter' if inter else 'half'}-{layout}"


def make_tables(B, L_total, Dh, kind, device):
    if kind is None:
        return None
    axes = AXES.get(Dh, (Dh // 4 * 2, Dh // 4, Dh - Dh // 4 * 2 - Dh // 4))
    ids = torch.randint(0, 64, (B, L_total, 3) if kind == "BLP" else (L_total, 3), device=device)
    return reference.rope_freqs(ids, axes)


def make_sources(B, Ls, H, Dh, layout, dtype, device):
    """One leaf per stream: a packed (B, L, 3·H·Dh) projection or a (3, B, L, H, Dh) stack."""
    shape = (lambda L: (B, L, 3 * H * Dh)) if layout == "packed" else (lambda L: (3, B, L, H, Dh))
    return [torch.randn(shape(L), device=device, dtype=dtype).requires_grad_() for L in Ls]


def split(src, layout, H, Dh):
    if layout == "packed":
        B, L, _ = src.shape
        return src.view(B, L, 3, H, Dh).unbind(2)
    return src.unbind(0)


def make_weights(norm, Dh, dtype, device):
    ws = []
    for f in norm:
        for _ in range(2):
            ws.append((1 + 0.3 * torch.randn(Dh, device=device)).to(dtype).requires_grad_() if f else None)
    return ws


def runner(fn, case, tables):
    """fn(*sources, *weights) -> (q, k, v) with the case's streams; None weights stay None."""
    B, Ls, H, Dh, norm, _, inter, layout = case
    n = len(Ls)

    def run(*args):
        srcs, ws = args[:n], list(args[n:])
        parts = [split(s, layout, H, Dh) for s in srcs]
        it = iter(ws)
        qw, kw = [], []
        for f in norm:
            qw.append(next(it) if f else None)
            kw.append(next(it) if f else None)
        return fn([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                  q_weights=qw, k_weights=kw, rope=tables, eps=1e-6, interleaved=inter)

    return run


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_prepare_attention(case, dtype, backend, device):
    B, Ls, H, Dh, norm, rope_kind, inter, layout = case
    tables = make_tables(B, sum(Ls), Dh, rope_kind, device)
    srcs = make_sources(B, Ls, H, Dh, layout, dtype, device)
    ws = [w for w in make_weights(norm, Dh, dtype, device) if w is not None]
    fast, ref = runner(prepare_attention, case, tables), runner(ref_prepare, case, tables)
    with ditfast.use_backend(backend):
        q, k, v = fast(*srcs, *ws)
        assert q.shape == k.shape == v.shape == (B, sum(Ls), H, Dh)
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and q.dtype == dtype
        # weight grads are sums over every row of a stream: the reduced-gradient bound (docs/numerics.md)
        idx = list(range(len(srcs), len(srcs) + len(ws)))
        check_op(fast, ref, srcs + ws, name=f"prepare[{backend}]", reduced_args=idx)
    # v is a plain copy
    parts = [split(s, layout, H, Dh) for s in srcs]
    assert torch.equal(v, torch.cat([p[2] for p in parts], 1))


# --------------------------------------------------------------------------------------------------
# Dispatch, empty streams, determinism
# --------------------------------------------------------------------------------------------------
def test_backends_are_selected(device):
    from ditfast.ops import cuda_impl
    from ditfast.ops import prepare as prepare_ops

    expected = {"triton": prepare_ops._prepare_triton, "cuda": cuda_impl.prepare_attention,
                "reference": ref_prepare}
    for backend in BACKENDS + ["reference"]:
        with ditfast.use_backend(backend):
            assert _backend.select("prepare_attention", torch.device(device)) is expected[backend]


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_empty_stream(backend, device):
    """A stream of length 0 (and its weights) is allowed: it adds nothing, its grads are zeros."""
    B, H, Dh = 2, 2, 40
    case = (B, (0, 6), H, Dh, (True, True), "LP", True, "packed")
    tables = make_tables(B, 6, Dh, "LP", device)
    srcs = make_sources(B, (0, 6), H, Dh, "packed", torch.float32, device)
    ws = make_weights((True, True), Dh, torch.float32, device)
    fast, ref = runner(prepare_attention, case, tables), runner(ref_prepare, case, tables)
    with ditfast.use_backend(backend):
        check_op(fast, ref, srcs + ws, name=f"prepare empty stream [{backend}]")
        out = fast(*srcs, *ws)
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    assert torch.equal(ws[0].grad, torch.zeros_like(ws[0])) and torch.equal(ws[1].grad, torch.zeros_like(ws[1]))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_backward_is_deterministic(backend, device):
    case = CASES[0]
    B, Ls, H, Dh, norm, rope_kind, _, layout = case
    tables = make_tables(B, sum(Ls), Dh, rope_kind, device)
    srcs = make_sources(B, Ls, H, Dh, layout, torch.float32, device)
    ws = make_weights(norm, Dh, torch.float32, device)
    fast = runner(prepare_attention, case, tables)
    grads = []
    with ditfast.use_backend(backend):
        for _ in range(2):
            q, k, v = fast(*srcs, *ws)
            grads.append(torch.autograd.grad((q * k).sum() + (v * q).sum(), srcs + ws))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------
def _op_samples(device):
    """(q lists, k lists, v lists, q weights, k weights, cos, sin) samples; empty weight = no norm."""
    B, H, Dh = 2, 2, 40
    g = torch.Generator().manual_seed(5)

    def t(*shape, grad=True):
        return torch.randn(shape, generator=g).to(device).requires_grad_(grad)

    packed = [t(B, L, 3 * H * Dh) for L in (3, 5)]
    qs, ks, vs = zip(*(p.view(B, p.shape[1], 3, H, Dh).unbind(2) for p in packed))
    cos, sin = make_tables(B, 8, Dh, "BLP", device)
    none = torch.empty(0, device=device)
    return [
        (list(qs), list(ks), list(vs), [none, t(Dh)], [none, t(Dh)], cos, sin, 1e-6, True),
        (list(qs), list(ks), list(vs), [t(Dh), t(Dh)], [t(Dh), t(Dh)], None, None, 1e-6, False),
        ([t(B, 7, H, Dh)], [t(B, 7, H, Dh)], [t(B, 7, H, Dh)], [none], [none], cos[:, :7], sin[:, :7], 1e-6, False),
    ]


def _detached(args):
    """Backward ops have no autograd formula: check them on tensors that do not require grad."""
    def d(a):
        if isinstance(a, torch.Tensor):
            return a.detach()
        if isinstance(a, (list, tuple)):
            return type(a)(d(x) for x in a)
        return a

    return tuple(d(a) for a in args)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_opcheck(backend, device):
    if backend == "triton":
        from ditfast.ops import prepare as mod

        op, bwd = torch.ops.ditfast.prepare_attention.default, torch.ops.ditfast.prepare_attention_backward.default
        for args in _op_samples(device):
            torch.library.opcheck(op, args)
            qs, ks, _, qw, kw, cos, sin, eps, inter = args
            q, _, _, rstd = op(*args)
            d = _detached((torch.randn_like(q), torch.randn_like(q), qs, ks, qw, kw, rstd, cos, sin, inter))
            torch.library.opcheck(bwd, d)
        assert mod is not None
    else:
        from ditfast import _ext

        assert _ext.load() is not None, _ext.error()
        op, bwd = torch.ops.ditfast.prepare_attention_c.default, torch.ops.ditfast.prepare_attention_c_backward.default
        for args in _op_samples(device):
            torch.library.opcheck(op, args)
            qs, ks, _, qw, kw, cos, sin, eps, inter = args
            q = op(*args)[0]
            torch.library.opcheck(bwd, _detached((torch.randn_like(q), None, qs, ks, qw, kw, cos, sin, eps, inter)))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_torch_compile_fullgraph(backend, device):
    """prepare -> a stand-in attention -> split: compiles without graph breaks, matches eager (fwd, bwd)."""
    B, H, Dh, Ls = 2, 2, 40, (3, 5)
    torch._dynamo.reset()
    cos, sin = make_tables(B, sum(Ls), Dh, "LP", device)

    def block(txt, img, wq0, wk0, wq1, wk1):
        parts = [p.view(B, p.shape[1], 3, H, Dh).unbind(2) for p in (txt, img)]
        q, k, v = prepare_attention([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                                    q_weights=(wq0, wq1), k_weights=(wk0, wk1), rope=(cos, sin))
        o = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k), -1)
        o = torch.einsum("bhlm,bmhd->blhd", o, v)
        return o[:, : Ls[0]], o[:, Ls[0]:]

    def leaves():
        g = torch.Generator().manual_seed(3)
        shapes = [(B, L, 3 * H * Dh) for L in Ls] + [(Dh,)] * 4
        return [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]

    with ditfast.use_backend(backend):
        eager_in, comp_in = leaves(), leaves()
        eager = block(*eager_in)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*comp_in)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    sum(o.square().sum() for o in eager).backward()
    sum(o.square().sum() for o in compiled).backward()
    for a, b in zip(eager_in, comp_in):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
def test_errors_name_the_argument(device):
    B, H, Dh = 2, 2, 40
    q, k, v = torch.randn(3, B, 5, H, Dh, device=device).unbind(0)
    q2 = torch.randn(B, 4, H, Dh, device=device)
    w = torch.ones(Dh, device=device)
    cos, sin = make_tables(B, 9, Dh, "LP", device)
    P = prepare_attention
    with pytest.raises(TypeError, match="qs must be a tuple or list"):
        P(q, (k,), (v,))
    with pytest.raises(ValueError, match="qs must hold at least one stream"):
        P((), (), ())
    with pytest.raises(ValueError, match="same number of streams"):
        P((q, q2), (k,), (v, q2))
    with pytest.raises(ValueError, match=r"ks\[0\] must have the shape of qs\[0\]"):
        P((q,), (k[:, :4],), (v,))
    with pytest.raises(ValueError, match=r"qs\[1\] must have shape \(B, L_i, H, Dh\)"):
        P((q, torch.randn(B, 4, H + 1, Dh)), (k, k), (v, v))
    with pytest.raises(ValueError, match=r"vs\[0\] must be \(B, L_i, H, Dh\)"):
        P((q,), (k,), (v[0],))
    with pytest.raises(TypeError, match=r"ks\[0\] is torch.float16 but qs\[0\] is torch.float32"):
        P((q,), (k.half(),), (v,))
    with pytest.raises(TypeError, match=r"qs\[0\] must be float32, bfloat16 or float16"):
        P((q.int(),), (k,), (v,))
    with pytest.raises(ValueError, match=r"q_weights must have one entry per stream \(2\)"):
        P((q, q2), (k, q2), (v, q2), q_weights=(w,), k_weights=(w,))
    with pytest.raises(ValueError, match=r"k_weights\[0\] must have shape \(40,\)"):
        P((q,), (k,), (v,), q_weights=(w,), k_weights=(w[:3],))
    with pytest.raises(ValueError, match=r"q_weights\[1\] and k_weights\[1\] must both be given"):
        P((q, q2), (k, q2), (v, q2), q_weights=(w, w), k_weights=(w, None))
    with pytest.raises(ValueError, match=r"q_weights\[0\] and k_weights\[0\] must both be given"):
        P((q,), (k,), (v,), k_weights=(w,))
    with pytest.raises(TypeError, match=r"q_weights\[0\] must be a \(40,\) tensor or None"):
        P((q,), (k,), (v,), q_weights=(1.0,), k_weights=(w,))
    with pytest.raises(TypeError, match="rope must be None or a"):
        P((q,), (k,), (v,), rope=cos)
    with pytest.raises(ValueError, match=r"rope\[0\] \(cos\) must have shape \(L_total \(the joint sequence\), Dh/2\).*\(9, 20\)"):
        P((q,), (k,), (v,), rope=(cos, sin))  # tables of 9 tokens for a 5-token sequence
    with pytest.raises(TypeError, match=r"rope\[1\] \(sin\) must be float32"):
        P((q, q2), (k, q2), (v, q2), rope=(cos, sin.double()))
    with pytest.raises(ValueError, match="rope needs an even head dim"):
        odd = torch.randn(B, 9, H, 7, device=device)
        P((odd,), (odd,), (odd,), rope=(cos[:, :3], sin[:, :3]))
    with pytest.raises(ValueError, match="eps must be a positive number"):
        P((q,), (k,), (v,), eps=0.0)


def test_c_op_errors_name_the_argument():
    from ditfast import _ext

    assert _ext.load() is not None, _ext.error()
    op = torch.ops.ditfast.prepare_attention_c
    q = torch.randn(2, 5, 2, 8)
    none = torch.empty(0)
    with pytest.raises(ValueError, match=r"ks\[0\] must have the shape of qs\[0\]"):
        op([q], [q[:, :4]], [q], [none], [none], None, None, 1e-6, True)
    with pytest.raises(ValueError, match=r"q_weights\[0\] and k_weights\[0\] must both be given"):
        op([q], [q], [q], [torch.ones(8)], [none], None, None, 1e-6, True)
    with pytest.raises(TypeError, match=r"vs\[0\] is c10::Half|vs\[0\] is Half"):
        op([q], [q], [q.half()], [none], [none], None, None, 1e-6, True)
    with pytest.raises(ValueError, match=r"cos must have shape"):
        op([q], [q], [q], [none], [none], torch.ones(4, 4), torch.ones(4, 4), 1e-6, True)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flux_rounding_convention(dtype, backend, device):
    """Low-precision q, k equal the same-dtype reference (normalize in fp32, round, times the rounded
    weight, round, rotate in fp32, round) up to rare one-ulp flips from fp32 reassociation; skipping
    the intermediate roundings would change about a quarter of the elements. fp32 weights are rounded
    to the activations' dtype first, as the reference does."""
    case = (2, (5, 7), 5, 72, (True, True), "LP", True, "packed")
    B, Ls, H, Dh = case[:4]
    tables = make_tables(B, sum(Ls), Dh, "LP", device)
    srcs = [s.detach() for s in make_sources(B, Ls, H, Dh, "packed", dtype, device)]
    ws = [w.detach().float() for w in make_weights((True, True), Dh, torch.float32, device)]
    with ditfast.use_backend(backend):
        outs = runner(prepare_attention, case, tables)(*srcs, *ws)
    refs = runner(ref_prepare, case, tables)(*srcs, *ws)
    for out, ref in zip(outs, refs):
        assert out.dtype == dtype
        assert (out != ref).float().mean().item() < 0.01
