"""ditfast.patch on diffusers' PixArt-α / Σ transformer (ditfast/integrations/_pixart.py).

A tiny random ``PixArtTransformer2DModel`` (2 blocks, 2 heads of 24, every parameter randomized), batch 2
with unequal timesteps, an 8 x 10 latent (20 tokens), 7 caption tokens of width 32:

* whole model, fp32, reference ops: output and the gradients of every parameter and input to fp32
  rounding, with no mask and with an all-ones T5 mask (dropped); every block ran ditfast; state_dict
  keys unchanged; ``unpatch`` restores bit-identical results;
* one block, fp32 and bf16, on the "reference" and "triton" (interpreter) backends, forward and backward
  by the rule of docs/numerics.md against diffusers' block in fp32 and in the low precision;
* the fallbacks (a mask that masks caption tokens, float64, a custom processor, a hooked norm) equal
  diffusers exactly and warn once; DiT's configuration of the same block class still patches;
* the patched block runs ditfast's fused ops (recorded), and compiles with torch.compile(fullgraph=True).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ditfast
from conftest import ON_GPU
from ditfast.integrations import UnsupportedModelError, _common, _hooks, is_patched, patch, unpatch
from ditfast.testing import assert_by_rule

diffusers = pytest.importorskip("diffusers")
from diffusers import PixArtTransformer2DModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from helpers import randomize_  # noqa: E402

B, H, DH = 2, 2, 24
D = H * DH
LT, CAP = 7, 32
CFG = dict(num_attention_heads=H, attention_head_dim=DH, in_channels=4, out_channels=8, num_layers=2,
           cross_attention_dim=D, sample_size=8, patch_size=2, caption_channels=CAP, norm_num_groups=4)
TOL = 1e-5


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


def run(model, inputs, seed: int = 7):
    out = model(**inputs, return_dict=False)[0]
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"input:{k}", v) for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad((out * cot).sum(), [t for _, t in named], allow_unused=True)
    return out.detach(), {n: gr for (n, _), gr in zip(named, grads)}


def assert_same_run(got, ref, what: str, exact: bool = False) -> None:
    (out_g, grads_g), (out_r, grads_r) = got, ref
    for name, a, b in [("output", out_g, out_r)] + [(f"grad {n}", grads_g[n], grads_r[n]) for n in grads_r]:
        assert (a is None) == (b is None), f"{what}: {name} is None in one run only"
        if b is None:
            continue
        if exact:
            assert torch.equal(a, b), f"{what}: {name} is not bit-identical"
        else:
            err = (a.double() - b.double()).abs().max().item()
            assert err <= TOL * max(1.0, b.abs().max().item()), f"{what}: {name}: max error {err:.3g}"


class BlockCounter:
    def __init__(self, monkeypatch):
        from ditfast.nn import functional

        self.calls = 0
        real = functional.cross_block

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(functional, "cross_block", counting)


@pytest.mark.parametrize("mask", [None, "all-ones"])
def test_model_matches_diffusers(mask, monkeypatch):
    model = pixart_model()
    inputs = model_inputs(None if mask is None else torch.ones(B, LT))
    ref = run(model, inputs)
    keys = list(model.state_dict())
    counter = BlockCounter(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch(model) is model and is_patched(model)
        got = run(model, inputs)
    assert counter.calls == CFG["num_layers"]
    assert_same_run(got, ref, f"mask={mask}")
    assert list(model.state_dict()) == keys
    unpatch(model)
    counter.calls = 0
    again = run(model, inputs)
    assert counter.calls == 0
    assert_same_run(again, ref, "after unpatch", exact=True)


def test_mask_that_masks_tokens_runs_diffusers(monkeypatch):
    model = pixart_model()
    mask = torch.ones(B, LT)
    mask[1, 4:] = 0  # sample 1 has 4 caption tokens
    inputs = model_inputs(mask)
    ref = run(model, inputs)
    patch(model)
    counter = BlockCounter(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(model, inputs)
    assert counter.calls == 0
    assert [str(w.message) for w in caught if "ditfast" in str(w.message)] and all(
        "encoder_attention_mask" in str(w.message) for w in caught if "ditfast" in str(w.message))
    assert_same_run(got, ref, "masked", exact=True)


def pixart_block(seed: int = 2):
    blk = BasicTransformerBlock(D, H, DH, cross_attention_dim=D, activation_fn="gelu-approximate",
                                num_embeds_ada_norm=1000, attention_bias=True, norm_type="ada_norm_single",
                                norm_elementwise_affine=False, norm_eps=1e-6)
    return randomize_(blk, seed=seed).eval()


def block_inputs(L: int = 23, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, L, D, generator=g), encoder_hidden_states=torch.randn(B, LT, D, generator=g),
                timestep=0.5 * torch.randn(B, 6 * D, generator=g))


def leaves_of(kw, dtype, device="cpu"):
    return {k: v.detach().to(device, dtype).requires_grad_() for k, v in kw.items()}


def block_run(block, kw, seed: int = 11):
    out = block(**kw)
    g = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum()
    ins = list(kw)
    params = list(block.named_parameters())
    grads = torch.autograd.grad(loss, [kw[k] for k in ins] + [p for _, p in params])
    names = [f"input {k}" for k in ins] + [n for n, _ in params]
    reduced = [k == "timestep" for k in ins] + [True] * len(params)
    return out.detach().cpu(), [gr.cpu() for gr in grads], names, reduced


def _interpreter() -> bool:
    return ditfast._backend.availability("triton", "cpu")[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, device):
    if backend == "triton" and not ON_GPU and not _interpreter():
        pytest.skip("the Triton interpreter is not available")
    kw = block_inputs()
    ref32 = block_run(pixart_block().to(device), leaves_of(kw, torch.float32, device))
    low_block = pixart_block().to(device, dtype)
    low = block_run(low_block, leaves_of(kw, dtype, device))
    patch(nn.ModuleList([low_block]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ditfast.use_backend(backend):
            fast = block_run(low_block, leaves_of(kw, dtype, device))
    assert fast[0].dtype == dtype
    assert_by_rule(fast[0], ref32[0], low[0], atol=1e-4, name="block")
    for n, f, r, lp, red in zip(fast[2], fast[1], ref32[1], low[1], fast[3]):
        assert r.abs().max() > 0, n
        assert_by_rule(f, r, lp, atol=1e-4, name=f"grad {n}", reduced=red)


def _one_warning(fn, match: str):
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        a = fn()
    ours = [w for w in first if "ditfast" in str(w.message)]
    assert ours and all(match in str(w.message) for w in ours), [str(w.message) for w in first]
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        b = fn()
    assert not [w for w in second if "ditfast" in str(w.message)], "the fallback warned twice"
    return a, b


def test_float64_custom_processor_and_hooked_norm_run_diffusers(monkeypatch):
    block = pixart_block()
    kw = block_inputs()
    counter = BlockCounter(monkeypatch)
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        block.double()
        kw64 = {k: v.double() for k, v in kw.items()}
        ref = type(block).forward(block, **kw64)
        got, _ = _one_warning(lambda: block(**kw64), "float64")
        assert torch.equal(got, ref)
        block.float()

        class MyProcessor(AttnProcessor2_0):
            pass

        block.attn2.set_processor(MyProcessor())
        ref = type(block).forward(block, **kw)
        got, _ = _one_warning(lambda: block(**kw), "processor")
        assert torch.equal(got, ref)
        block.attn2.set_processor(AttnProcessor2_0())
        ref = type(block).forward(block, **kw)
        block.norm2.register_forward_hook(lambda *_: None)
        got, _ = _one_warning(lambda: block(**kw), "norm2")
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


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("ditfast::"):
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


def test_patched_block_runs_the_fused_ops():
    if not _interpreter():
        pytest.skip("the Triton interpreter is not available")
    block = pixart_block()
    kw = leaves_of(block_inputs(), torch.float32)
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), _Ops() as rec:
        block(**kw).sum().backward()
    fwd = [n for n in rec.names if not n.endswith("backward")]
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
