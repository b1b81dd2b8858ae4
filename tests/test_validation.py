"""Every public op rejects bad input with a TypeError/ValueError naming the argument."""
import pytest
import torch

from ditfast import ops


def _x(B=2, L=3, D=8, dtype=torch.float32):
    return torch.randn(B, L, D, dtype=dtype)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.norm_modulate(_x().int(), None, torch.zeros(2, 8)), TypeError, "x must be float32"),
        (lambda: ops.norm_modulate(torch.randn(3, 8), None, torch.zeros(3, 8)), ValueError, r"x must be \(B, L, D\)"),
        (lambda: ops.norm_modulate(_x(), None, torch.zeros(2, 9)), ValueError, r"scale must have shape \(B, D\) = \(2, 8\)"),
        (lambda: ops.norm_modulate(_x(), torch.zeros(3, 8), torch.zeros(2, 8)), ValueError, "shift must have shape"),
        (lambda: ops.norm_modulate(_x(), None, torch.zeros(2, 4, 8)), ValueError, r"\(B, L, D\) = \(2, 3, 8\)"),
        (lambda: ops.norm_modulate(_x(), None, torch.zeros(2, 8, dtype=torch.int64)), TypeError, "scale must be float32"),
        (lambda: ops.norm_modulate(_x(), None, "scale"), TypeError, "scale must be a torch.Tensor"),
        (lambda: ops.norm_modulate(_x(), None, torch.zeros(2, 8), eps=0), ValueError, "eps must be a positive"),
        (lambda: ops.norm_modulate(_x(), None, torch.zeros(2, 8, device="meta")), ValueError, "scale is on meta"),
        (lambda: ops.gated_residual(_x(), _x(L=4), torch.zeros(2, 8)), ValueError, "y must have the shape of x"),
        (lambda: ops.gated_residual(_x(), _x(), torch.zeros(8)), ValueError, "gate must have shape"),
        (lambda: ops.gated_residual(_x(), _x().to("meta"), torch.zeros(2, 8)), ValueError, "y is on meta"),
        (lambda: ops.gated_residual_norm_modulate(_x(), _x(), torch.zeros(2, 8), None, torch.zeros(2, 7)), ValueError, "scale must have shape"),
        (lambda: ops.norm_modulate_dual(_x(), None, torch.zeros(2, 8), None, torch.zeros(1, 5)), ValueError, "scale2 must have shape"),
    ],
)
def test_modulate_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_modulation_batch_one_broadcasts():
    x = _x(B=3)
    shift, scale = torch.randn(1, 8), torch.randn(1, 8)
    torch.testing.assert_close(ops.norm_modulate(x, shift, scale), ops.norm_modulate(x, shift.expand(3, 8), scale.expand(3, 8)))


def test_mixed_dtypes_promote_like_eager():
    x = _x()
    out = ops.norm_modulate(x, torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    assert ops.gated_residual(x.half(), x.half(), torch.zeros(2, 8)).dtype == torch.float32


def _q(B=2, L=5, H=3, Dh=8, dtype=torch.float32):
    return torch.randn(B, L, H, Dh, dtype=dtype)


def _rope(L=5, half=4):
    a = torch.randn(L, half)
    return a.cos(), a.sin()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.qk_norm_rope(_q(), _q(L=6), None, None, None, None), ValueError, "k must have the shape of q"),
        (lambda: ops.qk_norm_rope(_q(), _q(), torch.ones(7), None, None, None), ValueError, r"q_weight must have shape \(8,\)"),
        (lambda: ops.qk_norm_rope(_q(), _q(), None, torch.ones(8, dtype=torch.int32), None, None), TypeError, "k_weight must be"),
        (lambda: ops.qk_norm_rope(_q(), _q(), None, None, torch.ones(5, 4), None), ValueError, "both be given"),
        (lambda: ops.qk_norm_rope(_q(), _q(), torch.ones(8), None, None, None), ValueError, "q_weight and k_weight must both"),
        (lambda: ops.qk_norm_rope(_q(), _q(), None, None, *(t.double() for t in _rope())), TypeError, "cos must be float32"),
        (lambda: ops.qk_norm_rope(_q(), _q(), None, None, *_rope(L=4)), ValueError, r"cos must have shape \(L, Dh/2\) = \(5, 4\)"),
        (lambda: ops.qk_norm_rope(_q(Dh=7), _q(Dh=7), None, None, *_rope(half=3)), ValueError, "even head dim"),
        (lambda: ops.qk_norm_rope(torch.randn(2, 5, 24), _q(), None, None, None, None), ValueError, r"q must be \(B, L, H, Dh\)"),
        (lambda: ops.apply_rope(_q(), *_rope(half=3)), ValueError, "cos must have shape"),
        (lambda: ops.apply_rope(_q().long(), *_rope()), TypeError, "x must be float32"),
        (lambda: ops.rms_norm(_q(), torch.ones(3)), ValueError, r"weight must have shape \(8,\)"),
        (lambda: ops.rms_norm(torch.arange(4), None), TypeError, "x must be"),
        (lambda: ops.rope_freqs(torch.zeros(5, 2), (4, 4, 4)), ValueError, "n_axes = len"),
        (lambda: ops.rope_freqs(torch.zeros(5, 2), (4, 3)), ValueError, "positive even"),
        (lambda: ops.rope_freqs(torch.zeros(5, 2, dtype=torch.bool), (4, 4)), TypeError, "ids must be"),
        (lambda: ops.joint_attention(_q(), _q(), _q(L=4)), ValueError, "v must have the shape of k"),
        (lambda: ops.joint_attention(_q(), _q(H=2), _q(H=2)), ValueError, "k must have shape"),
        (lambda: ops.joint_attention(_q(), _q().half(), _q().half()), TypeError, "share one dtype"),
        (lambda: ops.joint_attention(_q(), _q().to("meta"), _q().to("meta")), ValueError, "k is on meta"),
    ],
)
def test_rope_and_attention_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
