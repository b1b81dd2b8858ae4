"""ditfast.patch on diffusers' HunyuanVideo 1.0 transformer (ditfast/integrations/_hunyuanvideo.py).

A tiny random ``HunyuanVideoTransformer3DModel`` (2 double + 2 single blocks, 2 heads of 40, every parameter
randomized), batch 2 with unequal timesteps and text lengths (9 and 5 valid of 9 tokens: the model's
attention mask keeps a prefix of [video; text]), a 3 x 6 x 10 latent (45 video tokens):

* whole model, fp32, reference ops: output and the gradients of every parameter and input to fp32
  rounding; every block ran ditfast (per-sample key lengths); unpatch restores bit-identical results;
* each block, fp32 and bf16, on the "reference" and "triton" (interpreter) backends, with a padded text
  mask, forward and backward by the rule of docs/numerics.md against diffusers' block;
* a mask that is not a prefix, float64 and a hooked norm run diffusers' forward exactly, warned once;
* the patched blocks run ditfast's ops (recorded) and compile with torch.compile(fullgraph=True).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ditfast
from conftest import ON_GPU
from ditfast.integrations import _common, _hooks, is_patched, patch, unpatch
from ditfast.testing import assert_by_rule

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_hunyuan_video import (  # noqa: E402
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock,
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
LV, LT = 45, 9
CFG = dict(in_channels=4, out_channels=4, num_attention_heads=H, attention_head_dim=DH, num_layers=2,
           num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=24,
           pooled_projection_dim=16, rope_axes_dim=(8, 16, 16))


@pytest.fixture(autouse=True)
def _reference_ops_and_fresh_warnings(monkeypatch):
    monkeypatch.setattr(_common, "_WARNED_FALLBACKS", set())
    monkeypatch.setattr(_hooks, "_WARNED", set())
    with ditfast.use_backend("reference"):
        yield


def model_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, LT)
    mask[1, 5:] = 0
    return dict(hidden_states=torch.randn(B, 4, 3, 6, 10, generator=g).requires_grad_(), timestep=torch.tensor([300, 800]),
                encoder_hidden_states=torch.randn(B, LT, 24, generator=g).requires_grad_(), encoder_attention_mask=mask,
                pooled_projections=torch.randn(B, 16, generator=g).requires_grad_(),
                guidance=torch.tensor([3000.0, 4000.0]))


def test_model_matches_diffusers(monkeypatch):
    model = randomize_(HunyuanVideoTransformer3DModel(**CFG), seed=0).eval()
    inputs = model_inputs()
    ref = run_model(model, inputs)
    keys = list(model.state_dict())
    counter = CallCounter(monkeypatch, "attend")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch(model) is model and is_patched(model)
        got = run_model(model, inputs)
    assert counter.calls == CFG["num_layers"] + CFG["num_single_layers"]
    assert_same_run(got, ref, "patched")
    assert list(model.state_dict()) == keys
    unpatch(model)
    counter.calls = 0
    again = run_model(model, inputs)
    assert counter.calls == 0
    assert_same_run(again, ref, "after unpatch", exact=True)


def _mask(valid=(LT, 5)):
    keep = torch.zeros(B, LV + LT, dtype=torch.bool)
    for b, n in enumerate(valid):
        keep[b, :LV + n] = True
    return keep[:, None, None]


def block_case(kind: str, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ang = torch.randn(LV, DH // 2, generator=g)
    rope = (ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1))
    kw = dict(hidden_states=r(B, LV, D), encoder_hidden_states=r(B, LT, D), temb=r(B, D), attention_mask=_mask())
    if kind == "double":
        return HunyuanVideoTransformerBlock(H, DH, 2.0), dict(kw, freqs_cis=rope)
    return HunyuanVideoSingleTransformerBlock(H, DH, 2.0), dict(kw, image_rotary_emb=rope)


def make(kind, seed=2):
    blk, kw = block_case(kind)
    return randomize_(blk, seed=seed).eval(), kw


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, kind, device):
    if backend == "triton" and not ON_GPU and not interpreter():
        pytest.skip("the Triton interpreter is not available")
    red = lambda k, t: k == "temb"  # noqa: E731
    blk32, kw = make(kind)
    ref32 = block_run(blk32.to(device), leaves_of(kw, torch.float32, device), reduced=red)
    low_block, _ = make(kind)
    low_block = low_block.to(device, dtype)
    low = block_run(low_block, leaves_of(kw, dtype, device), reduced=red)
    patch(nn.ModuleList([low_block]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ditfast.use_backend(backend):
            fast = block_run(low_block, leaves_of(kw, dtype, device), reduced=red)
    assert_by_rule(fast[0], ref32[0], low[0], atol=1e-4, name="block")
    for n, f, r, lp, rd in zip(fast[2], fast[1], ref32[1], low[1], fast[3]):
        assert f.dtype == dtype and r.abs().max() > 0, n
        assert_by_rule(f, r, lp, atol=1e-4, name=f"grad {n}", reduced=rd)


def test_fallbacks_run_diffusers(monkeypatch):
    block, kw = make("double")
    holed = _mask()
    holed[0, 0, 0, 3] = False  # a masked video token: not a prefix
    counter = CallCounter(monkeypatch, "attend")
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        ref = type(block).forward(block, **dict(kw, attention_mask=holed))
        got, _ = one_warning(lambda: block(**dict(kw, attention_mask=holed)), "not a prefix")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.double()
        kw64 = {k: (v if isinstance(v, tuple) or v.dtype == torch.bool else v.double()) for k, v in kw.items()}
        ref = type(block).forward(block, **kw64)
        got, _ = one_warning(lambda: block(**kw64), "float64")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.float()
        ref = type(block).forward(block, **kw)
        block.norm2.register_forward_hook(lambda *_: None)
        got, _ = one_warning(lambda: block(**kw), "norm2")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert counter.calls == 0


@pytest.mark.parametrize("kind", ["double", "single"])
def test_patched_blocks_run_ditfast_ops(kind):
    if not interpreter():
        pytest.skip("the Triton interpreter is not available")
    block, kw = make(kind)
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), DitfastOps() as rec:
        outs = block(**leaves_of(kw, torch.float32))
        sum(o.sum() for o in outs).backward()
    fwd = rec.forward_names()
    assert "prepare_attention" in fwd and fwd.count("flash_attention") == 1  # one launch for unequal text lengths (key_lengths)
    assert "flash_attention_backward" in rec.names


def test_patched_blocks_compile_fullgraph():
    torch._dynamo.reset()
    for kind in ("double", "single"):
        block, kw = make(kind)
        kw = dict(kw, attention_mask=None)  # a mask is read on the host (key lengths): compile runs without one
        patch(nn.ModuleList([block]))
        with torch.no_grad():
            eager = block(**kw)
            out = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
        for a, b in zip(out, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
