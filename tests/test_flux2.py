"""ditfast.patch on diffusers' FLUX.2 transformer (ditfast/integrations/_flux2.py).

A tiny random ``Flux2Transformer2DModel`` (2 double + 2 single blocks, 2 heads of 40, every parameter
randomized), batch 2 with unequal timesteps, 15 image and 7 text tokens, 4-axis RoPE:

* whole model, fp32, reference ops: output and the gradients of every parameter and input to fp32
  rounding, with separate and fused projections; every block ran ditfast; state_dict keys unchanged;
  ``unpatch`` restores bit-identical results;
* each block, fp32 and bf16, on the "reference" and "triton" (interpreter) backends, forward and backward
  by the rule of docs/numerics.md against diffusers' block in fp32 and in the low precision; the single
  block both with the joint sequence (as the model calls it) and with separate streams + split;
* the fallbacks (the KV-cache kwargs, float64, a custom processor, a hooked LayerNorm) equal diffusers
  exactly and warn once;
* the patched blocks run ditfast's fused ops (SwiGLU included), and compile with torch.compile(fullgraph=True).
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
from diffusers import Flux2Transformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux2 import (  # noqa: E402
    Flux2AttnProcessor,
    Flux2PosEmbed,
    Flux2SingleTransformerBlock,
    Flux2TransformerBlock,
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
AXES = (8, 8, 8, 16)
LI, LT = 15, 7
CFG = dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=DH, num_attention_heads=H,
           joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=AXES)


@pytest.fixture(autouse=True)
def _reference_ops_and_fresh_warnings(monkeypatch):
    monkeypatch.setattr(_common, "_WARNED_FALLBACKS", set())
    monkeypatch.setattr(_hooks, "_WARNED", set())
    with ditfast.use_backend("reference"):
        yield


def flux2_model(fused: bool = False):
    m = randomize_(Flux2Transformer2DModel(**CFG), seed=0).eval()
    if fused:
        for blk in m.transformer_blocks:
            blk.attn.fuse_projections()
    return m


def _ids(n, seed):
    return torch.randint(0, 8, (n, 4), generator=torch.Generator().manual_seed(seed)).float()


def model_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, LI, 8, generator=g).requires_grad_(),
                encoder_hidden_states=torch.randn(B, LT, 24, generator=g).requires_grad_(),
                timestep=torch.tensor([0.3, 0.8]), img_ids=_ids(LI, 2), txt_ids=_ids(LT, 3),
                guidance=torch.tensor([3.5, 4.0]))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_model_matches_diffusers(fused, monkeypatch):
    model = flux2_model(fused)
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


def _rope(n, seed):
    return Flux2PosEmbed(2000, list(AXES))(_ids(n, seed))


def block_case(kind: str, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    rope = _rope(LT + LI, 6)
    if kind == "double":
        kw = dict(hidden_states=r(B, LI, D), encoder_hidden_states=r(B, LT, D), temb_mod_img=r(B, 6 * D),
                  temb_mod_txt=r(B, 6 * D), image_rotary_emb=rope)
        return Flux2TransformerBlock, kw
    if kind == "single-split":
        kw = dict(hidden_states=r(B, LI, D), encoder_hidden_states=r(B, LT, D), temb_mod=r(B, 3 * D),
                  image_rotary_emb=rope, split_hidden_states=True)
        return Flux2SingleTransformerBlock, kw
    kw = dict(hidden_states=r(B, LT + LI, D), encoder_hidden_states=None, temb_mod=r(B, 3 * D), image_rotary_emb=rope)
    return Flux2SingleTransformerBlock, kw


def make_block(cls, seed: int = 2):
    return randomize_(cls(D, H, DH), seed=seed).eval()


@pytest.mark.parametrize("kind", ["double", "single", "single-split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, kind, device):
    if backend == "triton" and not ON_GPU and not interpreter():
        pytest.skip("the Triton interpreter is not available")
    cls, kw = block_case(kind)
    red = lambda k, t: k.startswith("temb")  # noqa: E731  (the shared (B, ·) modulations: sums over tokens)
    ref32 = block_run(make_block(cls).to(device), leaves_of(kw, torch.float32, device), reduced=red)
    low_block = make_block(cls).to(device, dtype)
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


def test_fallbacks_run_diffusers():
    cls, kw = block_case("double")
    block = make_block(cls)
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        ref = type(block).forward(block, **kw, joint_attention_kwargs={"kv_cache": None})
        got, _ = one_warning(lambda: block(**kw, joint_attention_kwargs={"kv_cache": None}), "joint_attention_kwargs")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.double()
        kw64 = {k: (v if isinstance(v, tuple) else v.double()) for k, v in kw.items()}
        ref = type(block).forward(block, **kw64)
        got, _ = one_warning(lambda: block(**kw64), "float64")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.float()

        class MyProcessor(Flux2AttnProcessor):
            pass

        block.attn.set_processor(MyProcessor())
        ref = type(block).forward(block, **kw)
        got, _ = one_warning(lambda: block(**kw), "processor")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.attn.set_processor(Flux2AttnProcessor())
        ref = type(block).forward(block, **kw)
        block.norm2.register_forward_hook(lambda *_: None)
        got, _ = one_warning(lambda: block(**kw), "norm2")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_unsupported_blocks_are_refused():
    bad = make_block(Flux2SingleTransformerBlock)
    bad.norm = nn.LayerNorm(D)  # affine
    with pytest.raises(UnsupportedModelError, match="norm"):
        patch(nn.ModuleList([bad]))
    assert "forward" not in bad.__dict__


@pytest.mark.parametrize("kind", ["double", "single"])
def test_patched_blocks_run_ditfast_ops(kind):
    if not interpreter():
        pytest.skip("the Triton interpreter is not available")
    cls, kw = block_case(kind)
    block = make_block(cls)
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), DitfastOps() as rec:
        outs = block(**leaves_of(kw, torch.float32))
        sum(o.sum() for o in (outs if isinstance(outs, tuple) else (outs,))).backward()
    fwd = rec.forward_names()
    if kind == "double":
        assert fwd == ["norm_modulate", "norm_modulate", "prepare_attention", "flash_attention",
                       "gated_residual_norm_modulate", "swiglu", "gated_residual", "gated_residual_norm_modulate",
                       "swiglu", "gated_residual"], fwd
    else:
        assert fwd == ["norm_modulate", "swiglu", "prepare_attention", "flash_attention", "gated_residual"], fwd
    assert "swiglu_backward" in rec.names and "flash_attention_backward" in rec.names


def test_patched_blocks_compile_fullgraph():
    torch._dynamo.reset()
    for kind in ("double", "single"):
        cls, kw = block_case(kind)
        block = make_block(cls)
        patch(nn.ModuleList([block]))
        with torch.no_grad():
            eager = block(**kw)
            out = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
        for a, b in zip(out if isinstance(out, tuple) else (out,), eager if isinstance(eager, tuple) else (eager,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()


class _LowRank(nn.Linear):
    """A LoRA-style Linear: the base matmul plus a low-rank update (a subclass, as PEFT's layers are)."""

    def __init__(self, base: nn.Linear, rank: int = 2, seed: int = 9):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(0.1 * torch.randn(rank, base.in_features, generator=g))
        self.up = nn.Parameter(0.1 * torch.randn(base.out_features, rank, generator=g))

    def forward(self, x):
        return super().forward(x) + (x @ self.down.t()) @ self.up.t()


def test_lora_style_layers_are_called_as_modules(monkeypatch):
    """Subclassed (LoRA-style) Linears in both block kinds are called as modules: the update counts, in
    the output and in its own parameters' gradients, equal to the unpatched model. (diffusers' first-block
    cache fails on FLUX.2 in 0.42.1 without ditfast: ``Tensor - list`` in its hook, so it is not tested here.)"""
    model = flux2_model()
    model.single_transformer_blocks[0].attn.to_qkv_mlp_proj = _LowRank(model.single_transformer_blocks[0].attn.to_qkv_mlp_proj)
    model.transformer_blocks[1].ff.linear_in = _LowRank(model.transformer_blocks[1].ff.linear_in)
    inputs = model_inputs()
    ref = run_model(model, inputs)
    patch(model)
    counter = CallCounter(monkeypatch, "attend")
    got = run_model(model, inputs)
    assert counter.calls == CFG["num_layers"] + CFG["num_single_layers"]
    assert_same_run(got, ref, "LoRA-style layers")
    assert got[1]["single_transformer_blocks.0.attn.to_qkv_mlp_proj.up"].abs().max() > 0
    unpatch(model)
