"""Each ditfast block against diffusers' own block with the same (random) weights.

The diffusers block is built and every parameter is randomized with a seeded generator; its state
dict is converted with ``ditfast.convert`` (diffusers -> original names) and loaded with
``strict=True`` into the ditfast block. Both run in fp32 on CPU, ditfast on the reference backend.
Forward outputs and the gradients of the inputs must agree to fp32 rounding:
``max|ditfast - diffusers| <= 1e-5 * max(1, max|diffusers|)`` per tensor.

Two sizes per block: a tiny one and an awkward one (D = 200, 5 heads of 40, 7 text and 36 image
tokens, RoPE axes (8, 16, 16)).
"""
from __future__ import annotations

import pytest
import torch

import ditfast
from ditfast import convert
from ditfast.nn import DoubleStreamBlock, JointBlock, LastLayer, SingleStreamBlock

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import JointTransformerBlock  # noqa: E402
from diffusers.models.normalization import AdaLayerNormContinuous  # noqa: E402
from diffusers.models.transformers.transformer_flux import (  # noqa: E402
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from helpers import assert_close, rand, randomize_  # noqa: E402


def leaf(*shape, seed: int) -> torch.Tensor:
    """A seeded random input whose gradient is compared."""
    return rand(*shape, seed=seed, grad=True)

# name: (D, heads, text tokens, image grid (h, w), rope axes, batch)
SIZES = {
    "tiny": (64, 2, 3, (2, 4), (4, 14, 14), 2),
    "awkward": (200, 5, 7, (6, 6), (8, 16, 16), 2),
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def compare(ours_out, ref_out, ours_in, ref_in, names, seed: int = 123) -> None:
    """Compare forward outputs, then the gradients of the inputs under one random cotangent."""
    for name, o, r in zip(names, ours_out, ref_out):
        assert_close(o, r, f"forward {name}")
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(r.shape, generator=g) for r in ref_out]
    gs_ours = torch.autograd.grad(ours_out, ours_in, cot)
    gs_ref = torch.autograd.grad(ref_out, ref_in, cot)
    for i, (a, b) in enumerate(zip(gs_ours, gs_ref)):
        assert a is not None and b is not None
        assert b.abs().max() > 0, f"gradient {i} of the reference is all zero: the test would be vacuous"
        assert_close(a, b, f"grad of input {i}")


def clones(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def flux_ids(n_txt: int, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids all zero; image ids (0, row, col) on the packed latent grid (FLUX's layout)."""
    h, w = grid
    txt_ids = torch.zeros(n_txt, 3)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return txt_ids, img_ids.reshape(h * w, 3)


@pytest.fixture(autouse=True)
def _reference_backend():
    with ditfast.use_backend("reference"):
        yield


# ---------------------------------------------------------------------------------------------
# FLUX
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(SIZES))
def test_double_stream_block_matches_diffusers(size):
    D, H, Lt, grid, axes, B = SIZES[size]
    Li = grid[0] * grid[1]
    ref = randomize_(FluxTransformerBlock(D, H, D // H), seed=1).eval()
    ours = DoubleStreamBlock(D, H, qkv_bias=True)
    ours.load_state_dict(convert.diffusers_to_flux_double_block(ref.state_dict()), strict=True)

    txt_ids, img_ids = flux_ids(Lt, grid)
    ids = torch.cat((txt_ids, img_ids))
    rope_diffusers = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)  # (cos, sin), each (L, Dh)
    rope_ours = ditfast.ops.rope_freqs(ids, axes)  # (cos, sin), each (L, Dh/2)

    img, txt, temb = leaf(B, Li, D, seed=2), leaf(B, Lt, D, seed=3), leaf(B, D, seed=4)
    r_in = clones(img, txt, temb)
    o_in = clones(img, txt, temb)
    r_txt, r_img = ref(hidden_states=r_in[0], encoder_hidden_states=r_in[1], temb=r_in[2],
                       image_rotary_emb=rope_diffusers)
    o_img, o_txt = ours(o_in[0], o_in[1], o_in[2], rope_ours)
    compare((o_img, o_txt), (r_img, r_txt), o_in, r_in, ("img", "txt"))


@pytest.mark.parametrize("size", list(SIZES))
def test_single_stream_block_matches_diffusers(size):
    D, H, Lt, grid, axes, B = SIZES[size]
    Li = grid[0] * grid[1]
    ref = randomize_(FluxSingleTransformerBlock(D, H, D // H), seed=5).eval()
    ours = SingleStreamBlock(D, H)
    ours.load_state_dict(convert.diffusers_to_flux_single_block(ref.state_dict()), strict=True)

    txt_ids, img_ids = flux_ids(Lt, grid)
    ids = torch.cat((txt_ids, img_ids))
    rope_diffusers = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)
    rope_ours = ditfast.ops.rope_freqs(ids, axes)

    img, txt, temb = leaf(B, Li, D, seed=6), leaf(B, Lt, D, seed=7), leaf(B, D, seed=8)
    r_in = clones(img, txt, temb)
    o_in = clones(img, txt, temb)
    # diffusers >= 0.35: takes the streams separately, concatenates [txt, img], returns (txt, img)
    r_txt, r_img = ref(hidden_states=r_in[0], encoder_hidden_states=r_in[1], temb=r_in[2],
                       image_rotary_emb=rope_diffusers)
    o_x = ours(torch.cat((o_in[1], o_in[0]), dim=1), o_in[2], rope_ours)
    o_txt, o_img = o_x[:, :Lt], o_x[:, Lt:]
    compare((o_img, o_txt), (r_img, r_txt), o_in, r_in, ("img", "txt"))


@pytest.mark.parametrize("size", list(SIZES))
def test_last_layer_matches_diffusers_norm_out(size):
    """FLUX LastLayer == diffusers' norm_out (AdaLayerNormContinuous, scale/shift order) + proj_out."""
    D, _, _, grid, _, B = SIZES[size]
    L, out_ch = grid[0] * grid[1], 12
    norm_out = randomize_(AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6), seed=9)
    proj_out = randomize_(torch.nn.Linear(D, out_ch), seed=10)
    diff_sd = {f"norm_out.{k}": v for k, v in norm_out.state_dict().items()}
    diff_sd.update({f"proj_out.{k}": v for k, v in proj_out.state_dict().items()})
    ours = LastLayer(D, 1, out_ch)
    ours.load_state_dict(convert.diffusers_to_flux_last_layer(diff_sd), strict=True)

    x, vec = leaf(B, L, D, seed=11), leaf(B, D, seed=12)
    r_in, o_in = clones(x, vec), clones(x, vec)
    ref_out = proj_out(norm_out(r_in[0], r_in[1]))
    compare((ours(*o_in),), (ref_out,), o_in, r_in, ("out",))


# ---------------------------------------------------------------------------------------------
# SD3 / SD3.5
# ---------------------------------------------------------------------------------------------
# (qk_norm, dual attention, context_pre_only): SD3-medium, SD3.5-large, SD3.5-medium and last blocks
JOINT_CONFIGS = [
    pytest.param(None, False, False, id="sd3-medium"),
    pytest.param(None, False, True, id="sd3-medium-last"),
    pytest.param("rms", False, False, id="sd3.5-large"),
    pytest.param("rms", False, True, id="sd3.5-large-last"),
    pytest.param("rms", True, False, id="sd3.5-medium-dual"),
    pytest.param("rms", True, True, id="dual-pre-only"),
]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("qk_norm,dual,pre_only", JOINT_CONFIGS)
def test_joint_block_matches_diffusers(size, qk_norm, dual, pre_only):
    D, H, Lc, grid, _, B = SIZES[size]
    Lx = grid[0] * grid[1]
    ref = JointTransformerBlock(D, H, D // H, context_pre_only=pre_only,
                                qk_norm="rms_norm" if qk_norm == "rms" else None, use_dual_attention=dual)
    ref = randomize_(ref, seed=13).eval()
    ours = JointBlock(D, H, pre_only=pre_only, qk_norm=qk_norm, x_block_self_attn=dual)
    ours.load_state_dict(convert.diffusers_to_sd3_joint_block(ref.state_dict()), strict=True)

    x, ctx, temb = leaf(B, Lx, D, seed=14), leaf(B, Lc, D, seed=15), leaf(B, D, seed=16)
    r_in, o_in = clones(x, ctx, temb), clones(x, ctx, temb)
    r_ctx, r_x = ref(hidden_states=r_in[0], encoder_hidden_states=r_in[1], temb=r_in[2])
    o_ctx, o_x = ours(o_in[1], o_in[0], o_in[2])
    if pre_only:
        assert r_ctx is None and o_ctx is None
        compare((o_x,), (r_x,), o_in, r_in, ("x",))
    else:
        compare((o_x, o_ctx), (r_x, r_ctx), o_in, r_in, ("x", "context"))


# ---------------------------------------------------------------------------------------------
# The converters themselves, block level
# ---------------------------------------------------------------------------------------------
def test_block_converters_round_trip_exactly():
    blocks = [
        (FluxTransformerBlock(64, 2, 32), convert.diffusers_to_flux_double_block,
         convert.flux_double_block_to_diffusers),
        (FluxSingleTransformerBlock(64, 2, 32), convert.diffusers_to_flux_single_block,
         convert.flux_single_block_to_diffusers),
        (JointTransformerBlock(64, 2, 32, context_pre_only=True, qk_norm="rms_norm", use_dual_attention=True),
         convert.diffusers_to_sd3_joint_block, convert.sd3_joint_block_to_diffusers),
        (JointTransformerBlock(64, 2, 32), convert.diffusers_to_sd3_joint_block, convert.sd3_joint_block_to_diffusers),
    ]
    for i, (block, to_orig, to_diff) in enumerate(blocks):
        sd = randomize_(block, seed=20 + i).state_dict()
        back = to_diff(to_orig(sd))
        assert back.keys() == sd.keys()
        for k in sd:
            assert torch.equal(back[k], sd[k]), k


def test_single_block_split_layout():
    """linear1's rows are [q | k | v | mlp_in]; the converter cuts them in that order."""
    blk = randomize_(SingleStreamBlock(48, 3, mlp_ratio=2.0), seed=30)
    d = convert.flux_single_block_to_diffusers(blk.state_dict())
    w = blk.linear1.weight
    assert torch.equal(d["attn.to_q.weight"], w[:48])
    assert torch.equal(d["attn.to_k.weight"], w[48:96])
    assert torch.equal(d["attn.to_v.weight"], w[96:144])
    assert torch.equal(d["proj_mlp.weight"], w[144:])
    assert torch.equal(d["attn.norm_q.weight"], blk.norm.query_norm.scale)
    assert torch.equal(d["proj_out.weight"], blk.linear2.weight)


def test_pre_only_context_modulation_is_swapped():
    blk = randomize_(JointBlock(32, 2, pre_only=True), seed=31)
    d = convert.sd3_joint_block_to_diffusers(blk.state_dict())
    w = blk.context_block.adaLN_modulation[1].weight
    b = blk.context_block.adaLN_modulation[1].bias
    assert torch.equal(d["norm1_context.linear.weight"], torch.cat((w[32:], w[:32])))
    assert torch.equal(d["norm1_context.linear.bias"], torch.cat((b[32:], b[:32])))
    # a full block's context modulation is AdaLayerNormZero (shift, scale, gate, ...): not swapped
    full = randomize_(JointBlock(32, 2), seed=32)
    d = convert.sd3_joint_block_to_diffusers(full.state_dict())
    assert torch.equal(d["norm1_context.linear.weight"], full.context_block.adaLN_modulation[1].weight)


def test_unknown_keys_are_rejected():
    sd = DoubleStreamBlock(32, 2).state_dict()
    sd["img_attn.bogus.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="bogus"):
        convert.flux_double_block_to_diffusers(sd)
    dsd = FluxTransformerBlock(32, 2, 16).state_dict()
    del dsd["attn.to_k.weight"]
    with pytest.raises(KeyError, match="to_k"):
        convert.diffusers_to_flux_double_block(dsd)
