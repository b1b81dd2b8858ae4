"""ditfast.patch on diffusers' Z-Image transformer (ditfast/integrations/_zimage.py).

A tiny random ``ZImageTransformer2DModel`` (1 noise refiner, 1 caption refiner, 2 main blocks; 2 heads
of 40; every parameter randomized), batch 2 with unequal timesteps, a 6 x 10 latent (15 image tokens)
and 7 caption tokens per sample:

* whole model, fp32, reference ops: output and the gradients of every parameter and input (latents,
  captions, timestep) to fp32 rounding; every block (refiners included) ran ditfast's attention;
  state_dict keys and storage unchanged; ``unpatch`` restores bit-identical results;
* one block (modulated, unmodulated, Omni's per-token modulation), fp32 and bf16, on the "reference"
  and "triton" (interpreter) backends, forward and backward by the rule of docs/numerics.md against
  diffusers' block in fp32 and in the low precision;
* captions of unequal length (the model's padding mask) run on ditfast as per-sample key lengths;
* the fallbacks (a mask that is not a prefix; float64; a hooked RMSNorm; a custom processor) equal
  diffusers exactly and warn once;
* the patched block runs ditfast's fused ops (recorded with a TorchDispatchMode), and compiles with
  torch.compile(fullgraph=True).
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
from diffusers import ZImageTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock  # noqa: E402

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

B, D, H, DH = 2, 80, 2, 40
AXES = [8, 16, 16]  # sum = DH
CFG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=D, n_layers=2, n_refiner_layers=1,
           n_heads=H, n_kv_heads=H, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24, axes_dims=AXES,
           axes_lens=[128, 32, 32])
N_BLOCKS = 4  # noise refiner + caption refiner + 2 main blocks
TOL = 1e-5  # fp32, one block on the reference ops


@pytest.fixture(autouse=True)
def _reference_ops_and_fresh_warnings(monkeypatch):
    monkeypatch.setattr(_common, "_WARNED_FALLBACKS", set())
    monkeypatch.setattr(_hooks, "_WARNED", set())
    with ditfast.use_backend("reference"):
        yield


def zimage_model() -> ZImageTransformer2DModel:
    return randomize_(ZImageTransformer2DModel(**CFG), seed=0).eval()


def model_inputs(cap_lens=(7, 7), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(4, 1, 6, 10, generator=g).requires_grad_() for _ in range(B)]
    cap = [torch.randn(n, 24, generator=g).requires_grad_() for n in cap_lens]
    return dict(x=x, t=torch.tensor([0.3, 0.85]).requires_grad_(), cap_feats=cap)


# ---------------------------------------------------------------------------------------------- whole model


def test_model_matches_diffusers(monkeypatch):
    model = zimage_model()
    inputs = model_inputs()
    ref = run_model(model, inputs)
    keys, store = list(model.state_dict()), [(n, p.data_ptr()) for n, p in model.named_parameters()]
    counter = CallCounter(monkeypatch, "attend")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback on this path
        assert patch(model) is model and is_patched(model)
        got = run_model(model, inputs)
    assert counter.calls == N_BLOCKS, f"ditfast ran {counter.calls} attentions"
    assert_same_run(got, ref, "patched")
    norm_grads = [g for n, g in ref[1].items() if "norm" in n and g is not None]
    assert norm_grads and all(g.abs().max() > 0 for g in norm_grads), "a norm weight got no gradient"
    assert list(model.state_dict()) == keys and [(n, p.data_ptr()) for n, p in model.named_parameters()] == store
    assert unpatch(model) is model and not is_patched(model)
    counter.calls = 0
    again = run_model(model, inputs)
    assert counter.calls == 0
    assert_same_run(again, ref, "after unpatch", exact=True)


# ---------------------------------------------------------------------------------------------- one block


def block_inputs(kind: str, L: int = 23, seed: int = 3):
    """Kwargs of one block call: x (B, L, D), no mask, per-sample complex64 RoPE tables (B, L, Dh/2), and
    the conditioning of ``kind``: "modulated" (adaln_input), "plain" (none), "omni" (noise mask, two)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    ang = torch.randn(B, L, DH // 2, generator=g)
    kw = dict(x=r(B, L, D), attn_mask=None, freqs_cis=torch.polar(torch.ones_like(ang), ang))
    if kind == "modulated":
        kw["adaln_input"] = r(B, 80)
    elif kind == "omni":
        kw.update(noise_mask=(torch.arange(L)[None] % 3 == 0).long().expand(B, L).contiguous(),
                  adaln_noisy=r(B, 80), adaln_clean=r(B, 80))
    return kw


def zimage_block(kind: str, seed: int = 2) -> ZImageTransformerBlock:
    blk = ZImageTransformerBlock(0, D, H, H, 1e-5, True, modulation=kind != "plain")
    return randomize_(blk, seed=seed).eval()


@pytest.mark.parametrize("kind", ["modulated", "plain", "omni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, kind, device):
    if backend == "triton" and not ON_GPU and not interpreter():
        pytest.skip("the Triton interpreter is not available (TRITON_INTERPRET=1 and triton needed)")
    kw = block_inputs(kind)
    red = lambda k, t: k != "x"  # noqa: E731  (the (B, ·) conditionings: sums over tokens)
    ref32 = block_run(zimage_block(kind).to(device), leaves_of(kw, torch.float32, device), reduced=red)
    low_block = zimage_block(kind).to(device, dtype)
    low = block_run(low_block, leaves_of(kw, dtype, device), reduced=red)
    patch(nn.ModuleList([low_block]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ditfast.use_backend(backend):
            fast = block_run(low_block, leaves_of(kw, dtype, device), reduced=red)
    assert_by_rule(fast[0], ref32[0], low[0], atol=1e-4, name="block")
    for n, f, r, lp, red in zip(fast[2], fast[1], ref32[1], low[1], fast[3]):
        assert f.dtype == dtype and r.abs().max() > 0, n
        assert_by_rule(f, r, lp, atol=1e-4, name=f"grad {n}", reduced=red)


# ---------------------------------------------------------------------------------------------- fallbacks


def test_unequal_caption_lengths_run_ditfast_with_key_lengths(monkeypatch):
    """Captions of 7 and 40 tokens: the caption refiner and the main blocks get the model's padding mask
    (a prefix per sample), run on ditfast as per-sample key lengths; equal to diffusers (outputs, every
    gradient), every block on ditfast, no warning."""
    model = zimage_model()
    inputs = model_inputs(cap_lens=(7, 40))
    ref = run_model(model, inputs)
    patch(model)
    counter = CallCounter(monkeypatch, "attend")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run_model(model, inputs)
    assert counter.calls == N_BLOCKS
    assert_same_run(got, ref, "padded batch")


def test_mask_that_is_not_a_prefix_runs_diffusers(monkeypatch):
    block = zimage_block("modulated")
    kw = block_inputs("modulated")
    mask = torch.ones(B, kw["x"].shape[1], dtype=torch.bool)
    mask[0, 3] = False
    with torch.no_grad():
        ref = block(**dict(kw, attn_mask=mask))
        patch(nn.ModuleList([block]))
        counter = CallCounter(monkeypatch, "attend")
        got, _ = one_warning(lambda: block(**dict(kw, attn_mask=mask)), "not a prefix")
    assert counter.calls == 0 and torch.equal(got, ref)


def test_all_true_mask_is_dropped(monkeypatch):
    block = zimage_block("modulated")
    kw = block_inputs("modulated")
    with torch.no_grad():
        ref = block(**kw)
        patch(nn.ModuleList([block]))
        counter = CallCounter(monkeypatch, "attend")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = block(**dict(kw, attn_mask=torch.ones(B, kw["x"].shape[1], dtype=torch.bool)))
    assert counter.calls == 1
    torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL)


def test_float64_custom_processor_and_hooked_norm_run_diffusers(monkeypatch):
    block = zimage_block("modulated")
    kw = block_inputs("modulated")
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        counter = CallCounter(monkeypatch, "attend")
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
        kw64["freqs_cis"] = kw["freqs_cis"]
        block.double()
        ref = type(block).forward(block, **kw64)
        got, _ = one_warning(lambda: block(**kw64), "float64")
        assert torch.equal(got, ref)
        block.float()
        ref = type(block).forward(block, **kw)
        block.attention_norm2.register_forward_hook(lambda *_: None)
        got, _ = one_warning(lambda: block(**kw), "attention_norm2")
        assert torch.equal(got, ref)
    assert counter.calls == 0


def test_signature_and_unsupported_blocks():
    import inspect

    block = zimage_block("modulated")
    patch(nn.ModuleList([block]))
    ours = inspect.signature(block.forward).parameters
    theirs = inspect.signature(type(block).forward.__get__(block)).parameters
    describe = lambda params: [(p.name, p.kind, p.default) for p in params.values()]  # noqa: E731
    assert describe(ours) == describe(theirs)
    bad = zimage_block("modulated")
    bad.ffn_norm2 = nn.LayerNorm(D)
    with pytest.raises(UnsupportedModelError, match="ffn_norm2 is LayerNorm"):
        patch(nn.ModuleList([bad]))
    assert "forward" not in bad.__dict__


# ---------------------------------------------------------------------------------------------- ditfast ops


def test_patched_block_runs_the_fused_ops():
    if not interpreter():
        pytest.skip("the Triton interpreter is not available")
    block = zimage_block("modulated")
    kw = leaves_of(block_inputs("modulated"), torch.float32)
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), DitfastOps() as rec:
        out = block(**kw)
        out.sum().backward()
    fwd = rec.forward_names()
    assert fwd == ["norm_modulate_x", "prepare_attention", "flash_attention", "gated_residual_norm_modulate_x",
                   "swiglu", "gated_residual_x"], fwd
    for n in ("norm_modulate_x_backward", "gated_residual_norm_modulate_x_backward", "gated_residual_x_backward",
              "flash_attention_backward", "swiglu_backward"):
        assert n in rec.names, (n, rec.names)


def test_patched_block_compiles_fullgraph():
    torch._dynamo.reset()
    block = zimage_block("modulated")
    kw = block_inputs("modulated")
    patch(nn.ModuleList([block]))
    with torch.no_grad():
        eager = block(**kw)
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
