"""ditfast.ops.gelu_tanh_backward: the GELU(tanh) backward with the bias gradient, every backend.

Against PyTorch's own autograd of ``gelu(x @ Wᵀ + b, approximate="tanh")`` in fp32 (the rule of
docs/numerics.md, with the low-precision reference computed by eager PyTorch in that dtype), at
awkward shapes: token counts that are not a multiple of a row tile, widths not a multiple of a
column block, strided rows (a column slice of a wider tensor), leading dimensions of any rank.
"""
import pytest
import torch

from ditfast import ops, reference, use_backend
from ditfast.testing import assert_by_rule

BACKENDS = ("reference", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _eager(dy, pre, bias_grad=True):
    """What autograd of eager PyTorch computes in pre's dtype: gelu_backward, then the bias sum."""
    d = torch.ops.aten.gelu_backward(dy, pre, approximate="tanh")
    return d, (d.reshape(-1, d.shape[-1]).sum(0) if bias_grad else None)


def _inputs(shape, dtype, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = shape[:-1] + (shape[-1] + 7,) if strided else shape
    pre = (3 * torch.randn(wide, generator=g)).to(dtype)[..., : shape[-1]]  # strided rows when `strided`
    dy = torch.randn(shape, generator=g).to(dtype)
    return dy, pre


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,strided", [((37, 200), False), ((2, 19, 131), True), ((1, 300), False), ((3, 5, 7, 9), True)])
def test_matches_autograd_by_the_rule(backend, dtype, shape, strided):
    dy, pre = _inputs(shape, dtype, strided)
    with use_backend(backend, strict=True):
        dx, db = ops.gelu_tanh_backward(dy, pre)
    ref32 = _eager(dy.float(), pre.float())
    lowp = _eager(dy, pre)
    assert dx.dtype == dtype and db.dtype == dtype and dx.shape == pre.shape and db.shape == (shape[-1],)
    assert_by_rule(dx, ref32[0], lowp[0], name="dpre")
    assert_by_rule(db, ref32[1], lowp[1], name="dbias", reduced=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_is_exact_to_rounding_and_without_bias(backend):
    """fp32: against an fp64 truth, both outputs to fp32 rounding of the formula's O(1) terms (where
    gelu' is near 0, ½(1 + tanh u) cancels: the error is some ulps of 1, not of the result, as aten's
    own fp32 gelu_backward shows); bias_grad=False returns None."""
    dy, pre = _inputs((67, 145), torch.float32, strided=True, seed=1)
    with use_backend(backend, strict=True):
        dx, db = ops.gelu_tanh_backward(dy, pre)
        dx2, none = ops.gelu_tanh_backward(dy, pre, bias_grad=False)
    truth = _eager(dy.double(), pre.double())
    ulps_of_one = 64 * torch.finfo(torch.float32).eps  # 7.6e-6
    torch.testing.assert_close(dx.double(), truth[0], rtol=1e-5, atol=ulps_of_one)
    torch.testing.assert_close(db.double(), truth[1], rtol=1e-5, atol=ulps_of_one * pre.shape[0])
    assert none is None and torch.equal(dx2, dx)


def test_saturated_and_zero_inputs():
    """Large |pre| (tanh saturates: the kernel's exp form must not overflow into NaN) and zeros."""
    pre = torch.tensor([[-60.0, -9.0, 0.0, 9.0, 60.0, 1e4, -1e4, 0.5]])
    dy = torch.ones_like(pre)
    with use_backend("triton", strict=True):
        dx, db = ops.gelu_tanh_backward(dy, pre)
    want = _eager(dy.double(), pre.double())
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx.double(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db.double(), want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tokens(backend):
    dy, pre = torch.zeros(0, 40), torch.zeros(0, 40)
    with use_backend(backend, strict=True):
        dx, db = ops.gelu_tanh_backward(dy, pre)
    assert dx.shape == (0, 40) and torch.equal(db, torch.zeros(40))


def test_reference_is_the_ground_truth_formula():
    """The reference's sum is of the unrounded fp32 gradient, rounded once (bf16)."""
    dy, pre = _inputs((50, 33), torch.bfloat16)
    dx, db = reference.gelu_tanh_backward(dy, pre)
    d32 = torch.ops.aten.gelu_backward(dy.float(), pre.float(), approximate="tanh")
    assert torch.equal(dx, d32.bfloat16()) and torch.equal(db, d32.sum(0).bfloat16())


def test_bad_inputs_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="dy"):
        ops.gelu_tanh_backward(torch.randn(4, 7), x)
    with pytest.raises(TypeError, match="pre"):
        ops.gelu_tanh_backward(x, x.int())
    with pytest.raises(TypeError, match="dy"):
        ops.gelu_tanh_backward(x.numpy(), x)
    with pytest.raises(ValueError, match="scalar"):
        ops.gelu_tanh_backward(torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize("bias_grad", [True, False])
def test_opcheck(bias_grad):
    dy, pre = _inputs((2, 9, 24), torch.float32, strided=True)
    torch.library.opcheck(torch.ops.ditfast.gelu_tanh_backward.default, (dy, pre, bias_grad))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    dy, pre = _inputs((13, 40), torch.float32)
    with use_backend("triton", strict=True):
        got = torch.compile(lambda a, b: ops.gelu_tanh_backward(a, b), fullgraph=True)(dy, pre)
    want = _eager(dy, pre)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
