"""Every public op rejects bad input with a TypeError/ValueError naming the argument."""
import warnings

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


# -- messages that say what was expected and how to fix it (issue 27, item 8) ----------------------
def _ids(L=6):
    return torch.stack([torch.zeros(L), torch.arange(L) // 3, torch.arange(L) % 3], -1)


@pytest.mark.parametrize("axes_dim", [16, 16.0])
def test_rope_freqs_scalar_axes_dim_says_to_pass_a_tuple(axes_dim):
    with pytest.raises(TypeError) as e:
        ops.rope_freqs(torch.zeros(6, 1), axes_dim=axes_dim)
    msg = str(e.value)
    assert "axes_dim must be a sequence" in msg and "one per column of ids" in msg
    assert f"axes_dim=({axes_dim!r},)" in msg and "not iterable" not in msg


def test_rope_freqs_non_int_entries_and_ids_layout():
    with pytest.raises(TypeError, match=r"every entry of axes_dim must be an int, got \(4\.0, 4\)"):
        ops.rope_freqs(torch.zeros(6, 2), (4.0, 4))
    with pytest.raises(ValueError, match=r"one row per token, one column per RoPE axis"):
        ops.rope_freqs(torch.zeros(6, 2), (4, 4, 4))
    # numpy-style integers and int tensors keep working
    cos, _ = ops.rope_freqs(torch.zeros(6, 2), (torch.tensor(4), 4))
    assert cos.shape == (6, 4)


def _rope_calls(cos, sin, Dh):
    q = torch.randn(1, 6, 2, Dh)
    return {
        "apply_rope": lambda: ops.apply_rope(q, cos, sin),
        "qk_norm_rope": lambda: ops.qk_norm_rope(q, q, torch.ones(Dh), torch.ones(Dh), cos, sin),
        "prepare_attention": lambda: ops.prepare_attention((q,), (q,), (q,), rope=(cos, sin)),
    }


@pytest.mark.parametrize("op", ["apply_rope", "qk_norm_rope", "prepare_attention"])
def test_rope_table_for_another_head_dim_names_sum_of_axes_dim(op):
    cos, sin = ops.rope_freqs(_ids(), (8, 8, 8))  # built for Dh = 24
    with pytest.raises(ValueError) as e:
        _rope_calls(cos, sin, 32)[op]()
    msg = str(e.value)
    assert "got (6, 12)" in msg and "head dim of 24" in msg and "the head dim is 32" in msg
    assert "sum(axes_dim) == 32" in msg


@pytest.mark.parametrize("op", ["apply_rope", "qk_norm_rope", "prepare_attention"])
def test_diffusers_rope_tables_say_how_to_convert(op):
    from diffusers.models.embeddings import FluxPosEmbed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FluxPosEmbed's deprecation notice
        cos, sin = FluxPosEmbed(theta=10000, axes_dim=[8, 12, 12])(_ids())  # diffusers: (L, Dh) = (6, 32)
    with pytest.raises(ValueError) as e:
        _rope_calls(cos, sin, 32)[op]()
    msg = str(e.value)
    assert "diffusers' format" in msg and "cos[..., 0::2], sin[..., 0::2]" in msg and "rope_freqs" in msg
    # ... and the conversion it names is right: it equals ditfast's own tables
    ours = ops.rope_freqs(_ids(), (8, 12, 12))
    torch.testing.assert_close(cos[..., 0::2].float(), ours[0])
    torch.testing.assert_close(sin[..., 0::2].float(), ours[1])
    _rope_calls(cos[..., 0::2].float(), sin[..., 0::2].float(), 32)[op]()


def test_rope_table_with_wrong_length_names_tokens():
    cos, sin = ops.rope_freqs(_ids(5), (8, 12, 12))
    with pytest.raises(ValueError, match=r"the table has 5 positions but the sequence has 6 tokens"):
        _rope_calls(cos, sin, 32)["apply_rope"]()


@pytest.mark.parametrize(
    "shape, fix",
    [((2, 1, 64), "pass c.squeeze(1)"), ((64,), "pass c.unsqueeze(0)"), ((2, 32), "hidden size 64")],
)
def test_dit_block_conditioning_shape(shape, fix):
    from ditfast.nn import DiTBlock, FinalLayer

    x = torch.randn(2, 5, 64)
    for module, name in ((DiTBlock(64, 4), "DiTBlock"), (FinalLayer(64, 2, 4), "FinalLayer")):
        with pytest.raises(ValueError) as e:
            module(x, torch.randn(*shape))
        msg = str(e.value)
        assert f"{name}: c must have shape (B, D) = (B, 64), got {shape}" in msg and fix in msg
        assert "unpack" not in msg
