"""ditfast.ops.swiglu: ``silu(gate) * up``, packed (both halves of one tensor, either order) and as two
tensors, on every backend: by the rule of docs/numerics.md against the fp32 reference, forward and
backward, fp32 / bf16 / fp16, at awkward shapes (odd token counts, H not a multiple of the column
block, strided rows); opcheck, torch.compile, validation."""
import pytest
import torch

from ditfast import ops, reference, use_backend
from ditfast.testing import assert_by_rule

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _run(mod, x, up, gate_first, dtype, seed=3):
    xs = x.to(dtype).requires_grad_()
    ups = None if up is None else up.to(dtype).requires_grad_()
    y = mod.swiglu(xs, ups, gate_first=gate_first)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    grads = torch.autograd.grad(y, [xs] + ([] if ups is None else [ups]), dy)
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["packed-gate-first", "packed-up-first", "two-tensors", "strided-rows"])
def test_by_the_rule(form, backend, dtype):
    g = torch.Generator().manual_seed(0)
    up = None
    if form == "two-tensors":
        x, up = 3 * torch.randn(2, 19, 136, generator=g), torch.randn(2, 19, 136, generator=g)
    elif form == "strided-rows":  # the MLP columns of a [q | k | v | gate | up] projection
        x = (3 * torch.randn(37, 24 + 2 * 70, generator=g))[:, 24:]
    else:
        x = 3 * torch.randn(2, 19, 2 * 136, generator=g)
    gate_first = form != "packed-up-first"
    with use_backend(backend, strict=True):
        fast = _run(ops, x, up, gate_first, dtype)
    ref32 = _run(reference, x, up, gate_first, torch.float32)
    lowp = _run(reference, x, up, gate_first, dtype)
    assert fast[0].dtype == dtype and fast[0].shape == lowp[0].shape
    assert_by_rule(fast[0], ref32[0], lowp[0], name="y")
    assert_by_rule(tuple(fast[1]), tuple(ref32[1]), tuple(lowp[1]), name="grads")


def test_halves_order_matters_and_large_gates_saturate():
    x = torch.tensor([[-100.0, 0.5, 100.0, 2.0]])  # gate [-100, 0.5], up [100, 2]
    with use_backend("triton", strict=True):
        a = ops.swiglu(x)
        b = ops.swiglu(x, gate_first=False)
    torch.testing.assert_close(a, torch.nn.functional.silu(x[:, :2]) * x[:, 2:])
    torch.testing.assert_close(b, torch.nn.functional.silu(x[:, 2:]) * x[:, :2])
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="even"):
        ops.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="up"):
        ops.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="one dtype"):
        ops.swiglu(torch.randn(3, 4), torch.randn(3, 4).bfloat16())
    with pytest.raises(TypeError, match="x"):
        ops.swiglu([1.0, 2.0])


@pytest.mark.parametrize("packed", [True, False])
def test_opcheck(packed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 48, generator=g, requires_grad=True)
    up = None if packed else torch.randn(2, 7, 48, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.ditfast.swiglu.default, (x, up, True))
    torch.library.opcheck(torch.ops.ditfast.swiglu.default, (x, up, False))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(5, 64, requires_grad=True)
    with use_backend("triton", strict=True):
        y = torch.compile(lambda t: ops.swiglu(t), fullgraph=True)(x)
        torch.testing.assert_close(y, reference.swiglu(x))
        (gx,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(reference.swiglu(x).sum(), x)
    torch.testing.assert_close(gx, want)
