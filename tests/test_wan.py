"""ditfast.patch on diffusers' Wan 2.x transformer (ditfast/integrations/_wan.py).

A tiny random ``WanTransformer3DModel`` (2 blocks, 2 heads of 40, every parameter randomized), batch 2
with unequal timesteps, a 3 x 6 x 10 latent (45 tokens), 512 text tokens:

* whole model, fp32, reference ops: output and the gradients of every parameter and input to fp32
  rounding for T2V, I2V (a second cross-attention over image tokens) and TI2V (per-token timesteps),
  with separate and fused projections; every block ran ditfast; state_dict keys unchanged;
  ``unpatch`` restores bit-identical results;
* one block, fp32 and bf16, on the "reference" and "triton" (interpreter) backends, forward and
  backward by the rule of docs/numerics.md against diffusers' block in fp32 and in the low precision;
* the fallbacks (float64, a custom processor, a hooked LayerNorm) equal diffusers exactly and warn once;
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
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformerBlock  # noqa: E402

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
FRAMES, HEIGHT, WIDTH = 3, 6, 10  # latent; patch (1, 2, 2): 3 x 3 x 5 = 45 tokens
TOKENS = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
CFG = dict(patch_size=(1, 2, 2), num_attention_heads=H, attention_head_dim=DH, in_channels=4, out_channels=4, text_dim=24,
           freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=64)
VARIANTS = {"t2v": {}, "i2v": dict(image_dim=16, added_kv_proj_dim=D), "ti2v": {}}


@pytest.fixture(autouse=True)
def _reference_ops_and_fresh_warnings(monkeypatch):
    monkeypatch.setattr(_common, "_WARNED_FALLBACKS", set())
    monkeypatch.setattr(_hooks, "_WARNED", set())
    with ditfast.use_backend("reference"):
        yield


def wan_model(variant: str, fused: bool = False):
    m = randomize_(WanTransformer3DModel(**CFG, **VARIANTS[variant]), seed=0).eval()
    if fused:
        for blk in m.blocks:
            blk.attn1.fuse_projections()
            blk.attn2.fuse_projections()
    return m


def model_inputs(variant: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    t = torch.tensor([300, 800]) if variant != "ti2v" else torch.randint(0, 1000, (B, TOKENS), generator=g)
    kw = dict(hidden_states=r(B, 4, FRAMES, HEIGHT, WIDTH), timestep=t, encoder_hidden_states=r(B, 512, 24))
    if variant == "i2v":
        kw["encoder_hidden_states_image"] = r(B, 9, 16)
    return kw


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_matches_diffusers(variant, fused, monkeypatch):
    model = wan_model(variant, fused)
    inputs = model_inputs(variant)
    ref = run_model(model, inputs)
    keys = list(model.state_dict())
    counter = CallCounter(monkeypatch, "cross_block")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch(model) is model and is_patched(model)
        got = run_model(model, inputs)
    assert counter.calls == CFG["num_layers"]
    assert_same_run(got, ref, variant)
    norms = [g for n, g in got[1].items() if ("norm_q" in n or "norm_k" in n or "norm_added_k" in n) and g is not None]
    assert norms and all(g.abs().max() > 0 for g in norms), "a QK-norm weight got no gradient"
    assert list(model.state_dict()) == keys
    unpatch(model)
    counter.calls = 0
    again = run_model(model, inputs)
    assert counter.calls == 0
    assert_same_run(again, ref, "after unpatch", exact=True)


def block_inputs(i2v: bool, per_token: bool, L: int = 23, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ang = torch.randn(L, DH // 2, generator=g)
    cos, sin = (f(ang).repeat_interleave(2, -1).view(1, L, 1, DH) for f in (torch.cos, torch.sin))
    return dict(hidden_states=r(B, L, D), encoder_hidden_states=r(B, 512 + (7 if i2v else 0), D),
                temb=0.5 * r(*((B, L, 6, D) if per_token else (B, 6, D))), rotary_emb=(cos, sin))


def wan_block(i2v: bool, seed: int = 2):
    blk = WanTransformerBlock(D, 96, H, cross_attn_norm=True, eps=1e-6, added_kv_proj_dim=D if i2v else None)
    return randomize_(blk, seed=seed).eval()


@pytest.mark.parametrize("case", ["t2v", "i2v", "ti2v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, case, device):
    if backend == "triton" and not ON_GPU and not interpreter():
        pytest.skip("the Triton interpreter is not available")
    i2v = case == "i2v"
    kw = block_inputs(i2v, per_token=case == "ti2v")
    red = lambda k, t: k == "temb" and t.dim() == 3  # noqa: E731  (a per-sample temb: sums over tokens)
    ref32 = block_run(wan_block(i2v).to(device), leaves_of(kw, torch.float32, device, ("temb",)), reduced=red)
    low_block = wan_block(i2v).to(device, dtype)
    low = block_run(low_block, leaves_of(kw, dtype, device, ("temb",)), reduced=red)
    patch(nn.ModuleList([low_block]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ditfast.use_backend(backend):
            fast = block_run(low_block, leaves_of(kw, dtype, device, ("temb",)), reduced=red)
    assert fast[0][0].dtype == dtype
    assert_by_rule(fast[0], ref32[0], low[0], atol=1e-4, name="block")
    for n, f, r, lp, red in zip(fast[2], fast[1], ref32[1], low[1], fast[3]):
        assert r.abs().max() > 0, n
        assert_by_rule(f, r, lp, atol=1e-4, name=f"grad {n}", reduced=red)


def test_float64_custom_processor_and_hooked_norm_run_diffusers(monkeypatch):
    block = wan_block(False)
    kw = block_inputs(False, False)
    counter = CallCounter(monkeypatch, "cross_block")
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        block.double()
        kw64 = {k: (v if isinstance(v, tuple) else v.double()) for k, v in kw.items()}
        ref = type(block).forward(block, **kw64)
        got, _ = one_warning(lambda: block(**kw64), "float64")
        assert torch.equal(got, ref)
        block.float()

        class MyProcessor(WanAttnProcessor):
            pass

        block.attn2.set_processor(MyProcessor())
        ref = type(block).forward(block, **kw)
        got, _ = one_warning(lambda: block(**kw), "processor")
        assert torch.equal(got, ref)
        block.attn2.set_processor(WanAttnProcessor())
        ref = type(block).forward(block, **kw)
        block.norm2.register_forward_hook(lambda *_: None)
        got, _ = one_warning(lambda: block(**kw), "norm2")
        assert torch.equal(got, ref)
    assert counter.calls == 0


def test_unsupported_blocks_are_refused():
    bad = wan_block(False)
    bad.attn1.norm_q = nn.RMSNorm(DH)  # per head: not Wan's across-heads norm
    with pytest.raises(UnsupportedModelError, match="attn1.norm_q"):
        patch(nn.ModuleList([bad]))
    assert "forward" not in bad.__dict__


def test_patched_block_runs_the_fused_ops():
    if not interpreter():
        pytest.skip("the Triton interpreter is not available")
    block = wan_block(False)
    kw = leaves_of(block_inputs(False, False), torch.bfloat16, keep_dtype=("temb",))  # diffusers' temb is fp32
    block.bfloat16()
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), DitfastOps() as rec:
        out = block(**kw)
        out.float().sum().backward()
    fwd = rec.forward_names()
    # self-attention: QK-norm over all heads + RoPE in one op (no prepare pass: one stream, v read in place)
    assert fwd == ["norm_modulate_x", "qk_norm_rope", "flash_attention",
                   "gated_residual_x", "norm_modulate_x", "rms_norm", "rms_norm", "flash_attention",
                   "gated_residual_norm_modulate_x", "gated_residual_x"], fwd
    assert "gelu_tanh_backward" in rec.names and "gated_residual_norm_modulate_x_backward" in rec.names
    assert "qk_norm_rope_backward" in rec.names and "prepare_attention_backward" not in rec.names


def test_patched_block_compiles_fullgraph():
    torch._dynamo.reset()
    block = wan_block(True)
    kw = block_inputs(True, False)
    patch(nn.ModuleList([block]))
    with torch.no_grad():
        eager = block(**kw)
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
