"""ditfast.patch on diffusers' PixArt-α / Σ transformer (ditfast/integrations/_pixart.py).

A tiny random ``PixArtTransformer2DModel`` (2 blocks, 2 heads of 24, every parameter randomized), batch 2
with unequal timesteps, an 8 x 10 latent (20 tokens), 7 caption tokens of width 32:

* whole model, fp32, reference ops: output and the gradients of every parameter and input to fp32
  rounding, with no mask and with an all-ones T5 mask (dropped); every block ran ditfast; state_dict
  keys unchanged; ``unpatch`` restores bit-identical results;
* one block, fp32 and bf16, on the "reference" and "triton" (interpreter) backends, forward and backward
  by the rule of docs/numerics.md against diffusers' block in fp32 and in the low precision;
* a T5 mask with caption padding runs on ditfast (per-sample key lengths) and equals diffusers' masked run;
* the fallbacks (a mask that is not a prefix, float64, a custom processor, a hooked norm) equal
  diffusers exactly and warn once; DiT's configuration of the same block class still patches;
* the patched block runs ditfast's fused ops (recorded), and compiles with torch.compile(fullgraph=True).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ditfast
from conftest import ON_GPU
from ditfast.integrations import UnsupportedModelError, _common, _hooks, is_patched, patch, unpatch
from ditfast.testing import assert_by_rule

diffusers = pytest.importorskip("diffusers")
from diffusers import PixArtTransformer2DModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from family_helpers import (  # noqa: E402
    CallCounter,
    DitfastOps,
    assert_same_run,
    block_run,
    interpreter,
    leaves_of,
    one_warning,
    run_model,
)
from helpers import randomize_  # noqa: E402

B, H, DH = 2, 2, 24
D = H * DH
LT, CAP = 7, 32
CFG = dict(num_attention_heads=H, attention_head_dim=DH, in_channels=4, out_channels=8, num_layers=2,
           cross_attention_dim=D, sample_size=8, patch_size=2, caption_channels=CAP, norm_num_groups=4)


@pytest.fixture(autouse=True)
def _reference_ops_and_fresh_warnings(monkeypatch):
    monkeypatch.setattr(_common, "_WARNED_FALLBACKS", set())
    monkeypatch.setattr(_hooks, "_WARNED", set())
    with ditfast.use_backend("reference"):
        yield


def pixart_model():
    return randomize_(PixArtTransformer2DModel(**CFG), seed=0).eval()


def model_inputs(mask=None, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(B, 4, 8, 10, generator=g).requires_grad_(),
              encoder_hidden_states=torch.randn(B, LT, CAP, generator=g).requires_grad_(),
              timestep=torch.tensor([100, 700]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if mask is not None:
        kw["encoder_attention_mask"] = mask
    return kw


@pytest.mark.parametrize("mask", [None, "all-ones"])
def test_model_matches_diffusers(mask, monkeypatch):
    model = pixart_model()
    inputs = model_inputs(None if mask is None else torch.ones(B, LT))
    ref = run_model(model, inputs)
    keys = list(model.state_dict())
    counter = CallCounter(monkeypatch, "cross_block")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch(model) is model and is_patched(model)
        got = run_model(model, inputs)
    assert counter.calls == CFG["num_layers"]
    assert_same_run(got, ref, f"mask={mask}")
    assert list(model.state_dict()) == keys
    unpatch(model)
    counter.calls = 0
    again = run_model(model, inputs)
    assert counter.calls == 0
    assert_same_run(again, ref, "after unpatch", exact=True)


def test_caption_padding_runs_ditfast_with_key_lengths(monkeypatch):
    """A T5 mask that keeps a prefix per sample (4 of 7 tokens for sample 1) runs on ditfast as per-sample
    key lengths of the cross-attention, equal to diffusers' masked attention (outputs, every gradient)."""
    model = pixart_model()
    mask = torch.ones(B, LT)
    mask[1, 4:] = 0
    inputs = model_inputs(mask)
    ref = run_model(model, inputs)
    patch(model)
    counter = CallCounter(monkeypatch, "cross_block")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run_model(model, inputs)
    assert counter.calls == CFG["num_layers"]
    assert_same_run(got, ref, "masked")


def test_mask_that_is_not_a_prefix_runs_diffusers(monkeypatch):
    model = pixart_model()
    mask = torch.ones(B, LT)
    mask[1, 2] = 0  # a hole: not padding
    inputs = model_inputs(mask)
    ref = run_model(model, inputs)
    patch(model)
    counter = CallCounter(monkeypatch, "cross_block")
    got, _ = one_warning(lambda: run_model(model, inputs), "not a prefix")
    assert counter.calls == 0
    assert_same_run(got, ref, "holed mask", exact=True)


def pixart_block(seed: int = 2):
    blk = BasicTransformerBlock(D, H, DH, cross_attention_dim=D, activation_fn="gelu-approximate",
                                num_embeds_ada_norm=1000, attention_bias=True, norm_type="ada_norm_single",
                                norm_elementwise_affine=False, norm_eps=1e-6)
    return randomize_(blk, seed=seed).eval()


def block_inputs(L: int = 23, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, L, D, generator=g), encoder_hidden_states=torch.randn(B, LT, D, generator=g),
                timestep=0.5 * torch.randn(B, 6 * D, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, device):
    if backend == "triton" and not ON_GPU and not interpreter():
        pytest.skip("the Triton interpreter is not available")
    kw = block_inputs()
    red = lambda k, t: k == "timestep"  # noqa: E731  (the (B, 6·D) projection: sums over tokens)
    ref32 = block_run(pixart_block().to(device), leaves_of(kw, torch.float32, device), reduced=red)
    low_block = pixart_block().to(device, dtype)
    low = block_run(low_block, leaves_of(kw, dtype, device), reduced=red)
    patch(nn.ModuleList([low_block]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ditfast.use_backend(backend):
            fast = block_run(low_block, leaves_of(kw, dtype, device), reduced=red)
    assert fast[0][0].dtype == dtype
    assert_by_rule(fast[0], ref32[0], low[0], atol=1e-4, name="block")
    for n, f, r, lp, red in zip(fast[2], fast[1], ref32[1], low[1], fast[3]):
        assert r.abs().max() > 0, n
        assert_by_rule(f, r, lp, atol=1e-4, name=f"grad {n}", reduced=red)


def test_float64_custom_processor_and_hooked_norm_run_diffusers(monkeypatch):
    block = pixart_block()
    kw = block_inputs()
    counter = CallCounter(monkeypatch, "cross_block")
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        block.double()
        kw64 = {k: v.double() for k, v in kw.items()}
        ref = type(block).forward(block, **kw64)
        got, _ = one_warning(lambda: block(**kw64), "float64")
        assert torch.equal(got, ref)
        block.float()

        class MyProcessor(AttnProcessor2_0):
            pass

        block.attn2.set_processor(MyProcessor())
        ref = type(block).forward(block, **kw)
        got, _ = one_warning(lambda: block(**kw), "processor")
        assert torch.equal(got, ref)
        block.attn2.set_processor(AttnProcessor2_0())
        ref = type(block).forward(block, **kw)
        block.norm2.register_forward_hook(lambda *_: None)
        got, _ = one_warning(lambda: block(**kw), "norm2")
        assert torch.equal(got, ref)
    assert counter.calls == 0


def test_unsupported_configurations_are_refused():
    bad = pixart_block()
    bad.norm1 = nn.LayerNorm(D)  # affine: not PixArt's
    with pytest.raises(UnsupportedModelError, match="norm1"):
        patch(nn.ModuleList([bad]))
    other = BasicTransformerBlock(D, H, DH, norm_type="layer_norm")
    with pytest.raises(UnsupportedModelError, match="ada_norm_single"):
        patch(nn.ModuleList([other]))


def test_patched_block_runs_the_fused_ops():
    if not interpreter():
        pytest.skip("the Triton interpreter is not available")
    block = pixart_block()
    kw = leaves_of(block_inputs(), torch.float32)
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), DitfastOps() as rec:
        block(**kw).sum().backward()
    fwd = rec.forward_names()
    assert fwd == ["norm_modulate", "flash_attention", "gated_residual", "flash_attention",
                   "gated_residual_norm_modulate", "gated_residual"], fwd
    assert "gelu_tanh_backward" in rec.names


def test_patched_block_compiles_fullgraph():
    torch._dynamo.reset()
    block = pixart_block()
    kw = block_inputs()
    patch(nn.ModuleList([block]))
    with torch.no_grad():
        eager = block(**kw)
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
