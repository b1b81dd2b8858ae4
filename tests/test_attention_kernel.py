"""ditfast's Triton FlashAttention (ditfast/ops/_attention_triton.py, ditfast/kernels/triton/attention.py)
against ditfast.reference.joint_attention by the tolerance rule (docs/numerics.md) (ditfast.testing.check_op), forward and
backward, fp32 / bf16 / fp16; its log-sum-exp against torch.logsumexp of the scaled scores; the custom
ops under torch.library.opcheck and torch.compile(fullgraph=True).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), with 16 x 16 tiles: tiny but awkward shapes (odd L 77 / 33, Lq != Lk, Dh 40 /
64 / 72, batch 3, strided views of a packed qkv) still give several blocks and partial tiles.
"""
from __future__ import annotations

import pytest
import torch

from ditfast import reference
from ditfast.ops import _attention_triton as attn_triton
from ditfast.ops._attention_triton import triton_attention
from ditfast.testing import assert_by_rule, check_op

from conftest import DEVICE, DTYPES, ON_GPU

triton = pytest.importorskip("triton")

# (B, Lq, Lk, H, Dh): odd lengths, Lq != Lk both ways, padded head dims (40 -> 64, 72 -> 128)
SHAPES = [(3, 77, 33, 2, 40), (1, 33, 77, 2, 72), (2, 16, 16, 1, 64)]
if ON_GPU:
    SHAPES += [(2, 333, 1029, 3, 128), (1, 511, 300, 2, 256)]


def qkv(B, Lq, Lk, H, Dh, dtype, grad=True):
    q = torch.randn(B, Lq, H, Dh, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Lk, H, Dh, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Lk, H, Dh, device=DEVICE, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def ref_lse(q, k, v):
    """(o, lse) of the reference; lse = torch.logsumexp of the scaled scores, computed in q's dtype
    (the low-precision yardstick) and returned in fp32 like the kernel's."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return reference.joint_attention(q, k, v), torch.logsumexp(s, -1).float()


# ------------------------------------------------------------------------------------------------
# Equivalence
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Lq{}_Lk{}_H{}_Dh{}".format(*s))
def test_forward_backward(dtype, shape):
    check_op(triton_attention, reference.joint_attention, qkv(*shape, dtype), name="triton_attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "B{}_Lq{}_Lk{}_H{}_Dh{}".format(*s))
def test_lse(dtype, shape):
    q, k, v = qkv(*shape, dtype, grad=False)
    o, lse = triton_attention(q, k, v, return_lse=True)
    B, Lq, Lk, H, Dh = shape
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32 and o.dtype == dtype
    o32, lse32 = ref_lse(q.float(), k.float(), v.float())
    olp, lselp = ref_lse(q, k, v)
    assert_by_rule(lse, lse32, lselp, name="lse")
    assert_by_rule(o, o32, olp, name="o")


def test_lse_fp32_is_logsumexp_of_scaled_scores():
    """Natural log, fp32, (B, H, Lq): equal to torch.logsumexp to fp32 rounding (no base-2 units)."""
    q, k, v = qkv(2, 19, 45, 3, 40, torch.float32, grad=False)
    _, lse = triton_attention(q, k, v, return_lse=True)
    want = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 40 ** 0.5, -1)
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_of_packed_qkv(dtype):
    """q, k, v as views of one packed (B, L, 3, H, Dh) projection (token stride 3·H·Dh), k and v of a
    shorter second packed tensor: read in place, results by the rule."""
    B, Lq, Lk, H, Dh = 3, 37, 21, 2, 72
    packed_q = torch.randn(B, Lq, 3, H, Dh, device=DEVICE, dtype=dtype)
    packed_kv = torch.randn(B, Lk, 3, H, Dh, device=DEVICE, dtype=dtype)
    q_view = packed_q[:, :, 1]
    k, v = packed_kv[:, :, 0], packed_kv[:, :, 2]
    assert not q_view.is_contiguous() and not k.is_contiguous()

    def fast(qv, kk, vv):
        return triton_attention(qv, kk, vv)

    # views as arguments (gradients flow to the packed tensors' slices)
    args = [t.detach().requires_grad_() for t in (packed_q, packed_kv)]

    def f(pq, pkv):
        return triton_attention(pq[:, :, 1], pkv[:, :, 0], pkv[:, :, 2])

    def r(pq, pkv):
        return reference.joint_attention(pq[:, :, 1], pkv[:, :, 0], pkv[:, :, 2])

    check_op(f, r, args, name="packed views")
    # a view whose head dim is not unit-stride is copied, not misread
    qt = torch.randn(B, Lq, Dh, H, device=DEVICE, dtype=dtype).transpose(-1, -2)
    assert qt.stride(-1) != 1
    check_op(fast, reference.joint_attention, [qt, k, v], name="non-unit Dh stride")


def test_no_keys_gives_zeros_and_minus_inf():
    q = torch.randn(2, 5, 2, 40, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 0, 2, 40, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 0, 2, 40, device=DEVICE, requires_grad=True)
    o, lse = triton_attention(q, k, v, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all() and lse.shape == (2, 2, 5)
    (dq,) = torch.autograd.grad(o.sum(), [q])
    assert torch.equal(dq, torch.zeros_like(q))


def test_lse_has_no_gradient():
    q, k, v = qkv(1, 7, 9, 1, 40, torch.float32)
    o, lse = triton_attention(q, k, v, return_lse=True)
    assert o.requires_grad and not lse.requires_grad


# ------------------------------------------------------------------------------------------------
# Backward variants
# ------------------------------------------------------------------------------------------------
def _bwd_inputs(dtype=torch.bfloat16, shape=(2, 45, 77, 2, 40)):
    from ditfast.kernels.triton import attention as K

    q, k, v = qkv(*shape, dtype, grad=False)
    o, lse = K.attention_forward(q, k, v)
    return K, torch.randn_like(o), q, k, v, o, lse


def test_backward_is_deterministic_and_matches_atomic_variant():
    K, do, q, k, v, o, lse = _bwd_inputs()
    if not ON_GPU:  # several programs per (batch, head), each with its own dq slice
        cfg = K.configs("bwd", 64, q.dtype, on_gpu=False)[0]
        assert K.num_splits(triton.cdiv(77, cfg["BLOCK_N"]), 4, K._slots(q, cfg)) == 3
    first = K.attention_backward(do, q, k, v, o, lse, True)
    second = K.attention_backward(do, q, k, v, o, lse, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = K.attention_backward(do, q, k, v, o, lse, False)
    assert torch.equal(first[1], atomic[1]) and torch.equal(first[2], atomic[2])  # dk, dv: same order
    # dq sums the same fp32 terms in another order: equal to fp32 reassociation, then one rounding
    torch.testing.assert_close(atomic[0].float(), first[0].float(), rtol=0, atol=2 * 2 ** -8 * first[0].abs().max().item())


def test_num_splits_fills_waves():
    from ditfast.kernels.triton.attention import num_splits

    assert num_splits(72, 24, 132) == 5  # FLUX, one program per SM: 120 of 132 SMs busy
    assert num_splits(72, 264, 132) == 1  # already two full waves
    assert num_splits(2, 1, 132) == 2  # never more splits than key blocks
    assert num_splits(72, 1, 132, max_splits=8) == 8  # capped: at most 8 fp32 dq slices


def test_head_dim_limit_agrees_with_kernel():
    from ditfast.kernels.triton import attention as K

    assert attn_triton.MAX_HEAD_DIM == K.MAX_HEAD_DIM
    assert [K.padded_head_dim(d) for d in (8, 40, 64, 72, 128, 200, 256)] == [16, 64, 64, 128, 128, 256, 256]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "q must be float32"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must be \(B, L, H, Dh\)"),
        (lambda q, k, v: (q, k, v[:, :3]), ValueError, "v must have the shape of k"),
        (lambda q, k, v: (q, k[..., :32], v[..., :32]), ValueError, "k must have shape"),
        (lambda q, k, v: (q.repeat(1, 1, 3, 1), k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1)), ValueError, "H_kv dividing"),
        (lambda q, k, v: (q.repeat(1, 1, 1, 8), k.repeat(1, 1, 1, 8), v.repeat(1, 1, 1, 8)), ValueError, "head dims"),
        (lambda q, k, v: (q, k.tolist(), v), TypeError, "k must be a torch.Tensor"),
    ],
)
def test_validation_names_the_argument(mutate, error, match):
    q, k, v = qkv(1, 4, 5, 1, 40, torch.float32, grad=False)
    with pytest.raises(error, match=match):
        triton_attention(*mutate(q, k, v))


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_opcheck(dtype, heads):
    """Both ops, with softmax_scale left at its default (not passed) and given; grouped k / v heads."""
    H, Hk = heads
    q = torch.randn(2, 9, H, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 13, Hk, 40, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    fwd, bwd = torch.ops.ditfast.flash_attention.default, torch.ops.ditfast.flash_attention_backward.default
    for extra in ((), (0.3,)):
        torch.library.opcheck(fwd, (q, k, v) + extra)
        o, lse = (t.detach() for t in fwd(q, k, v, *extra))
        args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, True)
        torch.library.opcheck(bwd, args + extra)
    torch.library.opcheck(fwd, (q, k, v), {"softmax_scale": 0.3})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 21, 6, 2, 40, 0.3), (1, 19, 45, 4, 1, 72, None), (1, 33, 17, 4, 2, 64, 2.0)],
                         ids=lambda s: "B{}_Lq{}_Lk{}_H{}_Hkv{}_Dh{}_scale{}".format(*s))
def test_grouped_heads_and_scale(dtype, shape):
    """GQA / MQA (k, v with H_kv heads, dk, dv reduced over each group) and a softmax scale, forward
    and backward, by the rule against PyTorch SDPA on k / v repeated per query head."""
    B, Lq, Lk, H, Hk, Dh, scale = shape
    q = torch.randn(B, Lq, H, Dh, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Lk, Hk, Dh, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))

    def ref(q, k, v):
        g = H // Hk
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        return t(torch.nn.functional.scaled_dot_product_attention(
            t(q), t(k.repeat_interleave(g, 2)), t(v.repeat_interleave(g, 2)), scale=scale))

    check_op(lambda q, k, v: triton_attention(q, k, v, softmax_scale=scale), ref, [q, k, v], name="triton GQA")


def test_grouped_backward_is_deterministic():
    from ditfast.kernels.triton import attention as K

    q = torch.randn(2, 45, 4, 40, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 77, 2, 40, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    o, lse = K.attention_forward(q, k, v, 0.25)
    do = torch.randn_like(o)
    first = K.attention_backward(do, q, k, v, o, lse, True, 0.25)
    second = K.attention_backward(do, q, k, v, o, lse, True, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[1].shape == k.shape and first[2].shape == v.shape


def test_torch_compile_fullgraph():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    q, k, v = qkv(2, 11, 7, 2, 40, torch.float16)

    def f(q, k, v):
        o, lse = triton_attention(q * 2, k, v, return_lse=True)
        return o.float().pow(2).sum() + lse.sum()

    graphs = {}

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)

        return compiler

    backend = "inductor" if ON_GPU else aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    want = f(q, k, v)
    g_want = torch.autograd.grad(want, (q, k, v))
    got = compiled(q, k, v)
    g_got = torch.autograd.grad(got, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    if not ON_GPU:  # the forward and the backward graph each call the custom ops
        assert "ditfast.flash_attention.default" in graphs["fw"], graphs["fw"]
        assert "ditfast.flash_attention_backward.default" in graphs["bw"], graphs["bw"]


# ------------------------------------------------------------------------------------------------
# Per-sample key lengths: one launch whose programs stop at each sample's count
# ------------------------------------------------------------------------------------------------
# (lengths, Lq, Lk, H, H_kv, Dh, scale). Under the interpreter's 16-key blocks the counts cover a partial
# first block (5, 1), every key (40, 29), a count on a block edge (16), several blocks and a partial one (33).
KLEN_CASES = [((5, 40, 16, 33), 21, 40, 4, 2, 40, None), ((1, 29, 17), 18, 29, 2, 1, 72, 0.3)]
if ON_GPU:
    KLEN_CASES += [((77, 300, 129, 256), 301, 300, 4, 4, 128, None)]


def masked_reference(lengths, scale):
    """SDPA with the key-padding mask of ``lengths`` on k / v repeated per query head: (o, lse)."""
    def ref(q, k, v):
        B, Lq, H, _ = q.shape
        Lk, g = k.shape[1], H // k.shape[2]
        keep = torch.arange(Lk, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        return t(torch.nn.functional.scaled_dot_product_attention(
            t(q), t(k.repeat_interleave(g, 2)), t(v.repeat_interleave(g, 2)), attn_mask=keep[:, None, None, :],
            scale=scale))

    return ref


def _klen_qkv(case, dtype):
    lengths, Lq, Lk, H, Hk, Dh, scale = case
    B = len(lengths)
    q = torch.randn(B, Lq, H, Dh, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Lk, Hk, Dh, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    counts = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q, k, v, counts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KLEN_CASES, ids=lambda c: "len{}_Lq{}_Lk{}_H{}_Hkv{}_Dh{}_scale{}".format(*c))
def test_key_lengths_by_the_rule(dtype, case):
    """Forward and backward by the rule against SDPA with the padding mask (grouped heads, a scale)."""
    lengths, *_, scale = case
    q, k, v, counts = _klen_qkv(case, dtype)
    fast = lambda q, k, v: triton_attention(q, k, v, softmax_scale=scale, key_lengths=counts)  # noqa: E731
    check_op(fast, masked_reference(lengths, scale), [q, k, v], name=f"triton key lengths {lengths}")


@pytest.mark.parametrize("case", KLEN_CASES[:2], ids=["gqa", "mqa-scale"])
def test_key_lengths_lse_and_padded_gradients(case):
    """The lse of each row covers its sample's keys only; padded keys get exactly zero dk, dv (their blocks
    are skipped, the partial block's padded rows are not stored), whatever values they hold."""
    lengths, Lq, Lk, H, Hk, Dh, scale = case
    q, k, v, counts = _klen_qkv(case, torch.float32)
    o, lse = triton_attention(q, k, v, softmax_scale=scale, key_lengths=counts, return_lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(H // Hk, 2)) * (Dh ** -0.5 if scale is None else scale)
    keep = torch.arange(Lk, device=DEVICE)[None, :] < counts[:, None].long()
    want = torch.logsumexp(s.masked_fill(~keep[:, None, None, :], float("-inf")), -1)
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5)
    dq, dk, dv = torch.autograd.grad((o * torch.randn_like(o)).sum(), (q, k, v))
    for b, n in enumerate(lengths):
        assert torch.count_nonzero(dk[b, n:]) == 0 and torch.count_nonzero(dv[b, n:]) == 0
        if n < Lk:  # the kept keys do get gradients (the test could fail the other way)
            assert torch.count_nonzero(dk[b, :n]) > 0 and torch.count_nonzero(dv[b, :n]) > 0
    # the padded keys' values do not matter: overwrite them and nothing changes, bit for bit
    k2, v2 = k.detach().clone(), v.detach().clone()
    for b, n in enumerate(lengths):
        k2[b, n:], v2[b, n:] = 1e4, -1e4
    o2 = triton_attention(q.detach(), k2, v2, softmax_scale=scale, key_lengths=counts)
    assert torch.equal(o2, o.detach())


def test_key_lengths_opcheck_and_validation():
    q, k, v, counts = _klen_qkv(KLEN_CASES[0], torch.float16)
    fwd, bwd = torch.ops.ditfast.flash_attention.default, torch.ops.ditfast.flash_attention_backward.default
    torch.library.opcheck(fwd, (q, k, v, None, counts))
    o, lse = (t.detach() for t in fwd(q, k, v, None, counts))
    torch.library.opcheck(bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, True, 0.2, counts))
    with pytest.raises(TypeError, match="int32"):
        triton_attention(q, k, v, key_lengths=counts.long())
    with pytest.raises(ValueError, match="must hold 4 counts"):
        triton_attention(q, k, v, key_lengths=counts[:3])


def test_joint_attention_sends_unequal_lengths_to_one_launch():
    """ops.joint_attention(backend="triton", key_lengths=...) with unequal counts: one forward and one
    backward kernel call carrying the counts (not one call per sample), equal to the per-sample slices."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ditfast import ops

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "ditfast" in str(func):
                self.seen.append((str(func), len(args) + len(kwargs or {})))
            return func(*args, **(kwargs or {}))

    lengths, Lq, Lk, H, Hk, Dh, _ = KLEN_CASES[0]
    q, k, v, _ = _klen_qkv(KLEN_CASES[0], torch.float32)
    with Calls() as calls:
        out = ops.joint_attention(q, k, v, backend="triton", key_lengths=list(lengths))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert calls.seen == [("ditfast.flash_attention.default", 5), ("ditfast.flash_attention_backward.default", 9)], calls.seen
    for b, n in enumerate(lengths):
        qb, kb, vb = (t[b:b + 1, :L].detach().requires_grad_() for t, L in ((q, Lq), (k, n), (v, n)))
        ob = triton_attention(qb, kb, vb)
        torch.testing.assert_close(out[b:b + 1], ob, rtol=1e-5, atol=1e-6)
        want = torch.autograd.grad(ob.sum(), (qb, kb, vb))
        for g, w, L in zip(grads, want, (Lq, n, n)):
            torch.testing.assert_close(g[b:b + 1, :L], w, rtol=1e-4, atol=1e-5)
