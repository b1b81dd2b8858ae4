"""ditfast.patch on diffusers' HunyuanVideo 1.5 transformer (ditfast/integrations/_hunyuanvideo15.py).

A tiny random ``HunyuanVideo15Transformer3DModel`` (2 double-stream blocks, 1 refiner block, 2 heads of 40,
every parameter randomized), batch 2 with unequal timesteps, a 3 x 5 x 7 latent (105 video tokens), MLLM
text masks with holes (the model moves each sample's valid tokens first), ByT5 masks and image embeddings
(I2V: 3 valid image tokens; T2V: all-zero embeddings, so the image tokens are masked): the blocks get a
(B, 15) text mask whose kept tokens are a prefix of [video; text], of unequal length per sample.

* whole model, fp32, reference ops, I2V and T2V: output and the gradients of every parameter and input to
  fp32 rounding; every block ran ditfast; unpatch restores bit-identical results; state_dict keys unchanged;
* the block, fp32 and bf16, on the "reference" and "triton" (interpreter) backends, with a padded text
  mask, forward and backward by the rule of docs/numerics.md against diffusers' block;
* the other mask forms the processor takes (integer dtype, joint length cutting into the video tokens, an
  all-True mask) and ``attention_mask=None`` against diffusers;
* a mask that is not a prefix, float64, a hooked norm, another processor, a mask shape the processor
  cannot take and a mask under context parallelism run diffusers' forward (exactly), warned once;
  a block ditfast cannot run is refused at patch time;
* the patched block runs ditfast's ops (recorded) and compiles with torch.compile(fullgraph=True).
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import nn

import ditfast
from conftest import ON_GPU
from ditfast.integrations import UnsupportedModelError, _common, _hooks, is_patched, patch, unpatch
from ditfast.testing import assert_by_rule

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideo15Transformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_hunyuan_video15 import (  # noqa: E402
    HunyuanVideo15AttnProcessor2_0,
    HunyuanVideo15TransformerBlock,
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
CFG = dict(in_channels=4, out_channels=4, num_attention_heads=H, attention_head_dim=DH, num_layers=2,
           num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=24, text_embed_2_dim=20,
           image_embed_dim=16, rope_axes_dim=(8, 16, 16))


@pytest.fixture(autouse=True)
def _reference_ops_and_fresh_warnings(monkeypatch):
    monkeypatch.setattr(_common, "_WARNED_FALLBACKS", set())
    monkeypatch.setattr(_hooks, "_WARNED", set())
    with ditfast.use_backend("reference"):
        yield


def model_inputs(task: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0, 1]])  # MLLM: 7 and 4 valid, with holes
    mask_2 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # ByT5: 3 and 5 valid
    image = r(B, 3, 16) if task == "i2v" else torch.zeros(B, 3, 16).requires_grad_()
    return dict(hidden_states=r(B, 4, 3, 5, 7), timestep=torch.tensor([300.0, 800.0]),
                encoder_hidden_states=r(B, 7, 24), encoder_attention_mask=mask,
                encoder_hidden_states_2=r(B, 5, 20), encoder_attention_mask_2=mask_2, image_embeds=image)


@pytest.mark.parametrize("task", ["i2v", "t2v"])
def test_model_matches_diffusers(monkeypatch, task):
    model = randomize_(HunyuanVideo15Transformer3DModel(**CFG), seed=0).eval()
    inputs = model_inputs(task)
    ref = run_model(model, inputs)
    keys = list(model.state_dict())
    counter = CallCounter(monkeypatch, "attend")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch(model) is model and is_patched(model)
        got = run_model(model, inputs)
    assert counter.calls == CFG["num_layers"]  # every block ran ditfast (the refiner stays diffusers')
    assert_same_run(got, ref, "patched")
    assert list(model.state_dict()) == keys
    unpatch(model)
    counter.calls = 0
    again = run_model(model, inputs)
    assert counter.calls == 0
    assert_same_run(again, ref, "after unpatch", exact=True)


LV, LT = 45, 9  # one block: a 3 x 3 x 5 video, 9 text tokens (5 valid in sample 1)


def _text_mask(valid=(LT, 5)):
    keep = torch.zeros(B, LT, dtype=torch.bool)
    for b, n in enumerate(valid):
        keep[b, :n] = True
    return keep


def make(seed: int = 2, data_seed: int = 3):
    g = torch.Generator().manual_seed(data_seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ang = torch.randn(LV, DH // 2, generator=g)
    rope = (ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1))
    kw = dict(hidden_states=r(B, LV, D), encoder_hidden_states=r(B, LT, D), temb=r(B, D), attention_mask=_text_mask(),
              freqs_cis=rope)
    return randomize_(HunyuanVideo15TransformerBlock(H, DH, 2.0), seed=seed).eval(), kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, device):
    if backend == "triton" and not ON_GPU and not interpreter():
        pytest.skip("the Triton interpreter is not available")
    red = lambda k, t: k == "temb"  # noqa: E731
    blk32, kw = make()
    ref32 = block_run(blk32.to(device), leaves_of(kw, torch.float32, device), reduced=red)
    low_block, _ = make()
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


def _close(got, ref, what):
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}, output {i}: {m}")


def test_mask_forms_match_diffusers(monkeypatch):
    """The masks the processor takes besides the model's bool text mask, and None (as every token kept)."""
    block, kw = make()
    joint = torch.ones(B, LV + LT, dtype=torch.bool)
    joint[1, LV - 4:] = False  # sample 1 keeps a prefix that ends inside the video: masked video queries too
    forms = {"long text mask": _text_mask().long(), "joint-length mask": joint,
             "all-True mask": torch.ones(B, LT, dtype=torch.bool), "float 0/1 mask": _text_mask().float()}
    counter = CallCounter(monkeypatch, "attend")
    patch(nn.ModuleList([block]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for what, mask in forms.items():
            ref = type(block).forward(block, **dict(kw, attention_mask=mask))
            _close(block(**dict(kw, attention_mask=mask)), ref, what)
        ref = type(block).forward(block, **dict(kw, attention_mask=forms["all-True mask"]))
        _close(block(**dict(kw, attention_mask=None)), ref, "None (every token kept)")
    assert counter.calls == len(forms) + 1


class _OtherProcessor(HunyuanVideo15AttnProcessor2_0):
    """A user's processor (same math, another class): ditfast does not know what it computes."""


def test_fallbacks_run_diffusers(monkeypatch):
    block, kw = make()
    counter = CallCounter(monkeypatch, "attend")
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        holed = _text_mask()
        holed[0, 3] = False  # a masked text token followed by kept ones: not a prefix
        ref = type(block).forward(block, **dict(kw, attention_mask=holed))
        got, _ = one_warning(lambda: block(**dict(kw, attention_mask=holed)), "not a prefix")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))

        block.double()
        kw64 = {k: (v if isinstance(v, tuple) or v.dtype == torch.bool else v.double()) for k, v in kw.items()}
        ref = type(block).forward(block, **kw64)
        got, _ = one_warning(lambda: block(**kw64), "float64")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.float()

        block.attn.set_processor(_OtherProcessor())
        ref = type(block).forward(block, **kw)
        got, _ = one_warning(lambda: block(**kw), "_OtherProcessor")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.attn.set_processor(HunyuanVideo15AttnProcessor2_0())

        ref = type(block).forward(block, **kw)
        handle = block.norm2.register_forward_hook(lambda *_: None)
        got, _ = one_warning(lambda: block(**kw), "norm2")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        handle.remove()

        # a (B, 1, L_text) mask: diffusers' processor cannot view it as (B, 1, 1, L); the same error, warned
        bad = _text_mask()[:, None]
        with pytest.raises(RuntimeError) as theirs:
            type(block).forward(block, **dict(kw, attention_mask=bad))
        with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError) as ours:
            warnings.simplefilter("always")
            block(**dict(kw, attention_mask=bad))
        assert str(ours.value) == str(theirs.value)
        assert [str(w.message) for w in caught if "(2, 1, 9)" in str(w.message)]
    assert counter.calls == 0


def test_mask_under_context_parallelism_runs_diffusers(monkeypatch):
    """The routing (diffusers' forward, one warning) of a masked call when the processor carries a
    context-parallel config; diffusers' forward is replaced by a stand-in (no process group here)."""
    block, kw = make()
    patch(nn.ModuleList([block]))
    block.attn.processor._parallel_config = types.SimpleNamespace(context_parallel_config=object())
    calls = []
    monkeypatch.setattr(HunyuanVideo15TransformerBlock, "forward", lambda self, *a, **k: calls.append(a) or "theirs")
    got, again = one_warning(lambda: block(**kw), "context parallelism")
    assert got == again == "theirs" and len(calls) == 2


def test_unsupported_block_is_refused():
    block = HunyuanVideo15TransformerBlock(H, DH, 2.0, qk_norm="layer_norm")
    with pytest.raises(UnsupportedModelError, match="norm_q"):
        patch(nn.ModuleList([block]))
    assert "forward" not in block.__dict__


def test_patched_block_runs_ditfast_ops():
    if not interpreter():
        pytest.skip("the Triton interpreter is not available")
    block, kw = make()
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), DitfastOps() as rec:
        outs = block(**leaves_of(kw, torch.float32))
        sum(o.sum() for o in outs).backward()
    fwd = rec.forward_names()
    assert fwd.count("norm_modulate") == 2 and fwd.count("gated_residual_norm_modulate") == 2
    assert "prepare_attention" in fwd and fwd.count("flash_attention") == 1  # one launch for unequal text lengths (key_lengths)
    assert "flash_attention_backward" in rec.names


def test_patched_block_compiles_fullgraph():
    torch._dynamo.reset()
    block, kw = make()
    kw = dict(kw, attention_mask=None)  # a mask is read on the host (key lengths): compile runs without one
    patch(nn.ModuleList([block]))
    with torch.no_grad():
        eager = block(**kw)
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
