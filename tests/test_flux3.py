"""ditfast.patch on diffusers' FLUX.3 transformer (ditfast/integrations/_flux3.py).

A tiny random ``Flux3Transformer2DModel`` (1 per-mode block per mode, 2 joint single blocks; 2 heads of
40; every parameter randomized), batch 2 with unequal timesteps, 15 image, 7 text and 9 reference-image
tokens:

* whole model, fp32, reference ops: output and the gradients of every parameter and input to fp32
  rounding, with and without reference images; every block ran ditfast; state_dict keys and storage
  unchanged; ``unpatch`` restores bit-identical results;
* each block, fp32 and bf16, on the "reference" and "triton" (interpreter) backends, forward and
  backward by the rule of docs/numerics.md against diffusers' block in fp32 and in the low precision,
  with separate and fused (``to_qkv``) projections;
* the fallbacks (float64, a custom processor, a hooked LayerNorm) equal diffusers exactly and warn once;
* the patched blocks run ditfast's ops (recorded), and compile with torch.compile(fullgraph=True).
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
from diffusers import Flux3Transformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux3 import (  # noqa: E402
    Flux3ModeTransformerBlock,
    Flux3PosEmbed,
    Flux3SingleTransformerBlock,
)

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
AXES = (8, 8, 8, 16)  # sum = DH
LI, LT, LC = 15, 7, 9
CFG = dict(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=DH,
           num_attention_heads=H, joint_attention_dim=24, timestep_channels=32, axes_dims_rope=AXES)


@pytest.fixture(autouse=True)
def _reference_ops_and_fresh_warnings(monkeypatch):
    monkeypatch.setattr(_common, "_WARNED_FALLBACKS", set())
    monkeypatch.setattr(_hooks, "_WARNED", set())
    with ditfast.use_backend("reference"):
        yield


def flux3_model():
    return randomize_(Flux3Transformer2DModel(**CFG), seed=0).eval()


def _ids(n, seed):
    return torch.randint(0, 8, (n, 4), generator=torch.Generator().manual_seed(seed)).float()


def model_inputs(cond: bool, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    kw = dict(hidden_states=r(B, LI, 8), encoder_hidden_states=r(B, LT, 24), timestep=torch.tensor([0.3, 0.8]),
              img_ids=_ids(LI, 2), txt_ids=_ids(LT, 3))
    if cond:
        kw.update(image_cond_hidden_states=r(B, LC, 8), image_cond_ids=_ids(LC, 4))
    return kw


@pytest.mark.parametrize("cond", [False, True], ids=["t2i", "with-reference-images"])
def test_model_matches_diffusers(cond, monkeypatch):
    model = flux3_model()
    inputs = model_inputs(cond)
    ref = run_model(model, inputs)
    keys = list(model.state_dict())
    store = [(n, p.data_ptr()) for n, p in model.named_parameters()]
    counter = CallCounter(monkeypatch, "parallel_block")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch(model) is model and is_patched(model)
        got = run_model(model, inputs)
    assert counter.calls == (3 if cond else 2) + 2, counter.calls  # per-mode blocks of the modes present + 2 joint
    assert_same_run(got, ref, "patched")
    assert list(model.state_dict()) == keys and [(n, p.data_ptr()) for n, p in model.named_parameters()] == store
    unpatch(model)
    counter.calls = 0
    again = run_model(model, inputs)
    assert counter.calls == 0
    assert_same_run(again, ref, "after unpatch", exact=True)


def _rope(n, seed):
    return Flux3PosEmbed(10000, list(AXES))(_ids(n, seed))


def block_case(kind: str, seed: int = 3):
    """(block constructor, kwargs builder) for "mode" or "single"."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if kind == "mode":
        kw = dict(hidden_states=r(B, LI, D), temb_mod=r(B, LI, 3 * D), image_rotary_emb=_rope(LI, 5))
        return Flux3ModeTransformerBlock, kw
    cos, sin = _rope(LT + LI, 6)
    kw = dict(hidden_states=r(B, LI, D), encoder_hidden_states=r(B, LT, D), temb_mod=r(B, LI, 3 * D),
              temb_mod_context=r(B, LT, 3 * D), image_rotary_emb=(cos, sin))
    return Flux3SingleTransformerBlock, kw


def make_block(cls, fused: bool, seed: int = 2):
    blk = randomize_(cls(D, H, DH), seed=seed).eval()
    if fused:
        blk.attn.fuse_projections()
    return blk


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-qkv"])
@pytest.mark.parametrize("kind", ["mode", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, kind, fused, device):
    if backend == "triton" and not ON_GPU and not interpreter():
        pytest.skip("the Triton interpreter is not available")
    cls, kw = block_case(kind)
    ref32 = block_run(make_block(cls, fused).to(device), leaves_of(kw, torch.float32, device))
    low_block = make_block(cls, fused).to(device, dtype)
    low = block_run(low_block, leaves_of(kw, dtype, device))
    patch(nn.ModuleList([low_block]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ditfast.use_backend(backend):
            fast = block_run(low_block, leaves_of(kw, dtype, device))
    assert_by_rule(fast[0], ref32[0], low[0], atol=1e-4, name="block")
    for n, f, r, lp, red in zip(fast[2], fast[1], ref32[1], low[1], fast[3]):
        assert f.dtype == dtype and r.abs().max() > 0, n
        assert_by_rule(f, r, lp, atol=1e-4, name=f"grad {n}", reduced=red)


def test_float64_custom_processor_and_hooked_norm_run_diffusers():
    cls, kw = block_case("single")
    block = make_block(cls, False)
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        block.double()
        kw64 = {k: (v if isinstance(v, tuple) else v.double()) for k, v in kw.items()}
        ref = type(block).forward(block, **kw64)
        got, _ = one_warning(lambda: block(**kw64), "float64")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.float()

        from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

        class MyProcessor(Flux3AttnProcessor):  # a user's processor: ditfast cannot know its math
            pass

        block.attn.set_processor(MyProcessor())
        ref = type(block).forward(block, **kw)
        got, _ = one_warning(lambda: block(**kw), "processor")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.attn.set_processor(Flux3AttnProcessor())
        ref = type(block).forward(block, **kw)
        block.norm.register_forward_hook(lambda *_: None)
        got, _ = one_warning(lambda: block(**kw), "norm")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_unsupported_blocks_are_refused():
    bad = make_block(Flux3ModeTransformerBlock, False)
    bad.norm = nn.LayerNorm(D)  # affine: not FLUX.3's norm
    with pytest.raises(UnsupportedModelError, match="norm"):
        patch(nn.ModuleList([bad]))
    assert "forward" not in bad.__dict__


def test_patched_single_block_runs_ditfast_ops():
    if not interpreter():
        pytest.skip("the Triton interpreter is not available")
    cls, kw = block_case("single")
    block = make_block(cls, False)
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), DitfastOps() as rec:
        c, x = block(**leaves_of(kw, torch.float32))
        (c.sum() + x.sum()).backward()
    fwd = rec.forward_names()
    assert fwd == ["norm_modulate", "norm_modulate", "prepare_attention", "flash_attention", "swiglu",
                   "gated_residual", "swiglu", "gated_residual"], fwd
    assert {"flash_attention_backward", "norm_modulate_backward", "swiglu_backward"} <= set(rec.names)


def test_patched_blocks_compile_fullgraph():
    torch._dynamo.reset()
    for kind in ("mode", "single"):
        cls, kw = block_case(kind)
        block = make_block(cls, False)
        patch(nn.ModuleList([block]))
        with torch.no_grad():
            eager = block(**kw)
            out = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
        for a, b in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
