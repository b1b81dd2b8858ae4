"""ditfast.reference against independent, hand-checkable formulas."""
import math

import pytest
import torch

from ditfast import reference as ref


def test_norm_modulate_with_zero_shift_scale_is_layer_norm():
    x = torch.randn(2, 5, 72, dtype=torch.float64)
    zeros = torch.zeros(2, 72, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6)
    torch.testing.assert_close(ref.norm_modulate(x, zeros, zeros), expected)
    torch.testing.assert_close(ref.norm_modulate(x, None, zeros), expected)


def test_norm_modulate_per_sample_equals_per_token_broadcast():
    x = torch.randn(3, 7, 40)
    shift, scale = torch.randn(3, 40), torch.randn(3, 40)
    per_token = ref.norm_modulate(x, shift[:, None].expand(3, 7, 40), scale[:, None].expand(3, 7, 40))
    torch.testing.assert_close(ref.norm_modulate(x, shift, scale), per_token)
    ln = torch.nn.functional.layer_norm(x, (40,), eps=1e-6)
    torch.testing.assert_close(ref.norm_modulate(x, shift, scale), ln * (1 + scale[:, None]) + shift[:, None])


def test_gated_residual_and_seam():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    gate, shift, scale = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(ref.gated_residual(x, y, gate), x + gate[:, None] * y)
    x_new, h = ref.gated_residual_norm_modulate(x, y, gate, shift, scale)
    torch.testing.assert_close(x_new, x + gate[:, None] * y)
    torch.testing.assert_close(h, ref.norm_modulate(x_new, shift, scale))


def test_norm_modulate_dual_shares_one_normalization():
    x = torch.randn(2, 4, 16)
    s1, c1, s2, c2 = (torch.randn(2, 16) for _ in range(4))
    a, b = ref.norm_modulate_dual(x, s1, c1, s2, c2)
    torch.testing.assert_close(a, ref.norm_modulate(x, s1, c1))
    torch.testing.assert_close(b, ref.norm_modulate(x, s2, c2))


def test_rms_norm_formula():
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    w = torch.randn(40, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(ref.rms_norm(x, w), expected)
    torch.testing.assert_close(ref.rms_norm(x, None), expected / w)


def test_rms_norm_rounds_like_flux_in_low_precision():
    # FLUX: normalize in fp32, cast to the input dtype, then multiply by the weight.
    x = torch.randn(4, 64).bfloat16()
    w = (torch.rand(64) + 0.5).bfloat16()
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * w
    assert torch.equal(ref.rms_norm(x, w), expected)


def test_rope_freqs_known_angles_and_per_axis_restart():
    axes_dim = (4, 6)  # axis 0 owns 2 pairs, axis 1 owns 3 pairs; Dh = 10
    ids = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    cos, sin = ref.rope_freqs(ids, axes_dim, theta=10000.0)
    assert cos.shape == sin.shape == (3, 5) and cos.dtype == torch.float32
    for row, (p0, p1) in enumerate(ids.tolist()):
        # frequencies restart at theta**0 = 1 for each axis
        omegas = [10000 ** (-0 / 4), 10000 ** (-2 / 4)] + [10000 ** (-2 * j / 6) for j in range(3)]
        positions = [p0, p0, p1, p1, p1]
        for j, (om, pos) in enumerate(zip(omegas, positions)):
            assert cos[row, j].item() == pytest.approx(math.cos(pos * om), abs=1e-6)
            assert sin[row, j].item() == pytest.approx(math.sin(pos * om), abs=1e-6)


def test_rope_freqs_batched_ids():
    ids = torch.randint(0, 9, (2, 5, 3)).float()
    cos, sin = ref.rope_freqs(ids, (4, 6, 6))
    assert cos.shape == (2, 5, 8)
    c0, s0 = ref.rope_freqs(ids[1], (4, 6, 6))
    torch.testing.assert_close(cos[1], c0)
    torch.testing.assert_close(sin[1], s0)


def _rotate(a, b, angle):
    return a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rope_matches_its_pair_formula(interleaved):
    B, L, H, Dh = 1, 2, 1, 6
    x = torch.randn(B, L, H, Dh, dtype=torch.float64)
    angles = torch.tensor([[0.0, 0.0, 0.0], [0.3, -1.2, 2.0]])
    out = ref.apply_rope(x, angles.cos(), angles.sin(), interleaved=interleaved)
    for t in range(L):
        for i in range(Dh // 2):
            a_idx, b_idx = (2 * i, 2 * i + 1) if interleaved else (i, i + Dh // 2)
            ea, eb = _rotate(x[0, t, 0, a_idx].item(), x[0, t, 0, b_idx].item(), angles[t, i].item())
            assert out[0, t, 0, a_idx].item() == pytest.approx(ea, abs=1e-6)
            assert out[0, t, 0, b_idx].item() == pytest.approx(eb, abs=1e-6)


def test_rope_layouts_differ_and_zero_angle_is_identity():
    x = torch.randn(2, 3, 2, 8)
    angles = torch.rand(3, 4) * 3
    a = ref.apply_rope(x, angles.cos(), angles.sin(), interleaved=True)
    b = ref.apply_rope(x, angles.cos(), angles.sin(), interleaved=False)
    assert (a - b).abs().max() > 1e-2
    zero = torch.zeros(3, 4)
    for layout in (True, False):
        torch.testing.assert_close(ref.apply_rope(x, zero.cos(), zero.sin(), interleaved=layout), x)
    # a rotation preserves the norm of each pair, hence of each head
    torch.testing.assert_close(a.norm(dim=-1), x.norm(dim=-1))


def test_qk_norm_rope_composes():
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)
    wq, wk = torch.randn(8), torch.randn(8)
    cos, sin = ref.rope_freqs(torch.arange(5.0)[:, None], (8,))
    q2, k2 = ref.qk_norm_rope(q, k, wq, wk, cos, sin)
    torch.testing.assert_close(q2, ref.apply_rope(ref.rms_norm(q, wq), cos, sin))
    torch.testing.assert_close(k2, ref.apply_rope(ref.rms_norm(k, wk), cos, sin))
    q3, _ = ref.qk_norm_rope(q, k, wq, wk, None, None)
    torch.testing.assert_close(q3, ref.rms_norm(q, wq))


def test_joint_attention_explicit_softmax():
    q, k, v = (torch.randn(2, 9, 3, 40, dtype=torch.float64) for _ in range(3))
    s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(40)
    expected = torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v)
    torch.testing.assert_close(ref.joint_attention(q, k, v), expected)
