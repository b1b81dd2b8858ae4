"""ditfast.nn blocks against from-the-formula computations, and their upstream state-dict keys.

The formulas are written here in plain torch (docs/upstream.md): LayerNorm without affine, eps 1e-6;
``modulate(x) = LN(x) * (1 + scale) + shift``; attention by an explicit softmax with scale Dh**-0.5;
GELU(tanh) MLP; gates applied after the output projection. Weights are random (seeded), fp32, CPU,
ditfast on the reference backend; outputs must agree within ``1e-5 * max(1, max|ref|)``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ditfast
from ditfast.nn import DiTBlock, DoubleStreamBlock, FinalLayer, JointBlock, LastLayer, SingleStreamBlock

from helpers import assert_close, rand, randomize_

@pytest.fixture(autouse=True)
def _reference_backend():
    with ditfast.use_backend("reference"):
        yield


# ---------------------------------------------------------------------------------------------
# formulas (plain torch, written from docs/upstream.md)
# ---------------------------------------------------------------------------------------------
def ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, shift, scale):
    return ln(x) * (1 + scale[:, None]) + shift[:, None]


def linear(x, lin: torch.nn.Linear):
    y = x @ lin.weight.T
    return y + lin.bias if lin.bias is not None else y


def attention(x, qkv: torch.nn.Linear, proj: torch.nn.Linear, heads: int):
    B, L, D = x.shape
    q, k, v = linear(x, qkv).view(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh) each
    p = torch.softmax(q @ k.transpose(-1, -2) * (D // heads) ** -0.5, dim=-1)
    return linear((p @ v).transpose(1, 2).reshape(B, L, D), proj)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


def silu(x):
    return x * torch.sigmoid(x)


def dit_block_formula(blk: DiTBlock, x, c, heads):
    mod = linear(silu(c), blk.adaLN_modulation[1])
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    x = x + gate_msa[:, None] * attention(modulate(x, shift_msa, scale_msa), blk.attn.qkv, blk.attn.proj, heads)
    h = modulate(x, shift_mlp, scale_mlp)
    return x + gate_mlp[:, None] * linear(gelu_tanh(linear(h, blk.mlp.fc1)), blk.mlp.fc2)


def final_formula(layer, x, c):
    shift, scale = linear(silu(c), layer.adaLN_modulation[1]).chunk(2, dim=1)
    return linear(modulate(x, shift, scale), layer.linear)


# ---------------------------------------------------------------------------------------------
# forward against the formulas
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D,heads,L,B", [(64, 4, 16, 2), (72, 1, 9, 1), (200, 5, 37, 3)])
def test_dit_block_matches_formula(D, heads, L, B):
    blk = randomize_(DiTBlock(D, heads), seed=D)
    x, c = rand(B, L, D, seed=1), rand(B, D, seed=2)
    with torch.no_grad():
        assert_close(blk(x, c), dit_block_formula(blk, x, c, heads))


def test_dit_block_gradients_match_formula():
    D, heads, L, B = 200, 5, 37, 3
    blk = randomize_(DiTBlock(D, heads), seed=3)
    x, c = rand(B, L, D, seed=4), rand(B, D, seed=5)
    cot = rand(B, L, D, seed=6)
    grads = []
    for fn in (lambda x, c: blk(x, c), lambda x, c: dit_block_formula(blk, x, c, heads)):
        xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
        params = list(blk.parameters())
        grads.append(torch.autograd.grad(fn(xi, ci), [xi, ci] + params, cot))
    names = ["x", "c"] + [n for n, _ in blk.named_parameters()]
    for name, a, b in zip(names, *grads):
        assert_close(a, b, f"grad {name}")


@pytest.mark.parametrize("layer_cls", [FinalLayer, LastLayer])
@pytest.mark.parametrize("D,p,C,L,B", [(64, 2, 8, 16, 2), (200, 1, 64, 36, 3)])
def test_final_layers_match_formula(layer_cls, D, p, C, L, B):
    layer = randomize_(layer_cls(D, p, C), seed=7)
    x, c = rand(B, L, D, seed=8), rand(B, D, seed=9)
    with torch.no_grad():
        out = layer(x, c)
    assert out.shape == (B, L, p * p * C)
    assert_close(out, final_formula(layer, x, c))


def test_dit_block_with_zero_gates_is_identity():
    """adaLN-Zero: with the modulation Linear zeroed (DiT's init) the block returns its input."""
    blk = randomize_(DiTBlock(64, 4), seed=10)
    with torch.no_grad():
        blk.adaLN_modulation[1].weight.zero_()
        blk.adaLN_modulation[1].bias.zero_()
        x = rand(2, 5, 64, seed=11)
        assert torch.equal(blk(x, rand(2, 64, seed=12)), x)


# ---------------------------------------------------------------------------------------------
# state-dict keys: exactly the upstream names, and strict round trips
# ---------------------------------------------------------------------------------------------
def _wb(*modules):
    return {f"{m}.{p}" for m in modules for p in ("weight", "bias")}


DIT_BLOCK_KEYS = _wb("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
FINAL_LAYER_KEYS = _wb("linear", "adaLN_modulation.1")
DOUBLE_KEYS = (
    _wb("img_mod.lin", "img_attn.proj", "img_mlp.0", "img_mlp.2",
        "txt_mod.lin", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
    | {"img_attn.qkv.weight", "txt_attn.qkv.weight"}  # FLUX default qkv_bias=False
    | {f"{s}_attn.norm.{n}_norm.scale" for s in ("img", "txt") for n in ("query", "key")}
)
SINGLE_KEYS = _wb("linear1", "linear2", "modulation.lin") | {"norm.query_norm.scale", "norm.key_norm.scale"}


def _roundtrip(make, seed, *inputs):
    """state_dict -> fresh block (strict) -> identical outputs."""
    a = randomize_(make(), seed)
    b = make()
    b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        oa, ob = a(*inputs), b(*inputs)
    oa = oa if isinstance(oa, tuple) else (oa,)
    ob = ob if isinstance(ob, tuple) else (ob,)
    for x, y in zip(oa, ob):
        assert (x is None and y is None) or torch.equal(x, y)


def test_dit_keys_and_round_trip():
    assert set(DiTBlock(64, 4).state_dict()) == DIT_BLOCK_KEYS
    assert set(FinalLayer(64, 2, 8).state_dict()) == FINAL_LAYER_KEYS
    assert set(LastLayer(64, 1, 8).state_dict()) == FINAL_LAYER_KEYS
    x, c = rand(2, 6, 64, seed=13), rand(2, 64, seed=14)
    _roundtrip(lambda: DiTBlock(64, 4), 15, x, c)
    _roundtrip(lambda: FinalLayer(64, 2, 8), 16, x, c)
    _roundtrip(lambda: LastLayer(64, 1, 8), 17, x, c)


def test_flux_keys_and_round_trip():
    assert set(DoubleStreamBlock(64, 2).state_dict()) == DOUBLE_KEYS
    assert set(DoubleStreamBlock(64, 2, qkv_bias=True).state_dict()) == DOUBLE_KEYS | {
        "img_attn.qkv.bias", "txt_attn.qkv.bias"}
    assert set(SingleStreamBlock(64, 2).state_dict()) == SINGLE_KEYS
    img, txt, vec = rand(2, 6, 64, seed=18), rand(2, 3, 64, seed=19), rand(2, 64, seed=20)
    img_ids = torch.stack([torch.zeros(6), torch.arange(6.0) // 3, torch.arange(6.0) % 3], 1)  # (0, row, col)
    ids = torch.cat((torch.zeros(3, 3), img_ids))
    rope = ditfast.ops.rope_freqs(ids, (8, 12, 12))
    _roundtrip(lambda: DoubleStreamBlock(64, 2, qkv_bias=True), 21, img, txt, vec, rope)
    _roundtrip(lambda: SingleStreamBlock(64, 2), 22, torch.cat((txt, img), 1), vec, rope)


def _joint_keys(pre_only: bool, qk_norm, dual: bool) -> set:
    keys = _wb("x_block.adaLN_modulation.1", "x_block.attn.qkv", "x_block.attn.proj",
               "x_block.mlp.fc1", "x_block.mlp.fc2", "context_block.adaLN_modulation.1", "context_block.attn.qkv")
    if not pre_only:
        keys |= _wb("context_block.attn.proj", "context_block.mlp.fc1", "context_block.mlp.fc2")
    if dual:
        keys |= _wb("x_block.attn2.qkv", "x_block.attn2.proj")
    if qk_norm == "rms":
        attns = ["x_block.attn", "context_block.attn"] + (["x_block.attn2"] if dual else [])
        keys |= {f"{a}.{n}.weight" for a in attns for n in ("ln_q", "ln_k")}
    return keys


@pytest.mark.parametrize("pre_only", [False, True])
@pytest.mark.parametrize("qk_norm", [None, "rms"])
@pytest.mark.parametrize("dual", [False, True])
def test_joint_block_keys_shapes_and_round_trip(pre_only, qk_norm, dual):
    D, H = 64, 2
    blk = JointBlock(D, H, pre_only=pre_only, qk_norm=qk_norm, x_block_self_attn=dual)
    sd = blk.state_dict()
    assert set(sd) == _joint_keys(pre_only, qk_norm, dual)
    # adaLN widths: context 2·D when pre_only else 6·D; x 9·D with dual attention else 6·D
    assert sd["context_block.adaLN_modulation.1.weight"].shape == ((2 if pre_only else 6) * D, D)
    assert sd["x_block.adaLN_modulation.1.weight"].shape == ((9 if dual else 6) * D, D)
    assert sd["x_block.attn.qkv.weight"].shape == (3 * D, D)
    if qk_norm:
        assert sd["x_block.attn.ln_q.weight"].shape == (D // H,)
    ctx, x, c = rand(2, 3, D, seed=23), rand(2, 6, D, seed=24), rand(2, D, seed=25)
    _roundtrip(lambda: JointBlock(D, H, pre_only=pre_only, qk_norm=qk_norm, x_block_self_attn=dual), 26, ctx, x, c)


def test_strict_load_rejects_other_layouts():
    """A pre-only block's state dict does not load into a full block and vice versa (strict=True)."""
    with pytest.raises(RuntimeError, match="Missing key"):
        JointBlock(32, 2).load_state_dict(JointBlock(32, 2, pre_only=True).state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        JointBlock(32, 2).load_state_dict(JointBlock(32, 2, x_block_self_attn=True).state_dict(), strict=True)
