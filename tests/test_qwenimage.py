"""ditfast.patch on diffusers' Qwen-Image transformer (ditfast/integrations/_qwenimage.py).

A tiny random ``QwenImageTransformer2DModel`` (2 blocks, 2 heads of 40, every parameter randomized,
batch 2, 7 text tokens, a 3 x 5 image grid, unequal timesteps), patched vs unpatched:

* whole model, fp32, reference ops: output and the gradients of every parameter (QK-norm weights,
  the timestep embedder) and of every input (latents, text, timestep) to fp32 rounding, for plain
  Qwen-Image, Edit-2511's ``zero_cond_t`` (per-token modulation rows) and the layered RoPE with the
  additional timestep condition; state_dict keys and storage unchanged; every block ran ditfast;
  ``unpatch`` restores bit-identical results;
* one block, fp32 and bf16, on the "reference" and "triton" (interpreter) backends, forward and
  backward by the tolerance rule of docs/numerics.md (atol 1e-4, reduced-gradient bound for the
  parameter and temb gradients), against diffusers' block in fp32 and in the low precision;
* a text padding mask (a kept prefix per sample) runs ditfast as key lengths over [image, text], whole
  model and one block by the rule;
* the fallbacks (a mask that is not a prefix, attention kwargs, a custom processor, float64, a
  ``modulate_index`` ditfast does not run, a hooked LayerNorm) equal diffusers exactly and warn once;
  an all-True mask is dropped and runs ditfast;
* the patched block runs the same ditfast ops, in the same order, forward and backward, as
  ``ditfast.nn.DoubleStreamBlock`` with the same weights (recorded with a TorchDispatchMode);
* torch.compile(fullgraph=True) of a patched block.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ditfast
from conftest import ON_GPU
from ditfast.integrations import UnsupportedModelError, _common, _hooks, is_patched, patch, unpatch
from ditfast.integrations._qwenimage import rope_tables
from ditfast.nn import DoubleStreamBlock
from ditfast.testing import assert_by_rule

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_qwenimage import (  # noqa: E402
    QwenDoubleStreamAttnProcessor2_0,
    QwenEmbedRope,
    QwenImageTransformerBlock,
)

from helpers import randomize_  # noqa: E402
from test_op_sequence import assert_same_sequence  # noqa: E402

B, LT = 2, 7  # batch, text tokens
D, H, DH = 80, 2, 40  # hidden size, heads, head dim
AXES = (8, 16, 16)  # RoPE axes, sum = DH
GRID = (1, 3, 5)  # (frames, rows, cols) of the target image: 15 tokens
COND = (1, 3, 3)  # an Edit model's condition image: 9 more tokens
CFG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=DH, num_attention_heads=H,
           joint_attention_dim=24, axes_dims_rope=AXES)
VARIANTS = {
    "qwen-image": dict(),
    "edit-2511": dict(zero_cond_t=True),  # per-token choice between two modulation rows (modulate_index)
    "layered": dict(use_layer3d_rope=True, use_additional_t_cond=True),
}
TOL = 1e-5  # fp32: max |patched - unpatched| <= TOL * max(1, max |unpatched|)


@pytest.fixture(autouse=True)
def _reference_ops_and_fresh_warnings(monkeypatch):
    """Exact fp32 comparisons run the reference ops (the rule tests nest use_backend("triton") inside);
    the one-time fallback warnings start unseen in every test."""
    monkeypatch.setattr(_common, "_WARNED_FALLBACKS", set())
    monkeypatch.setattr(_hooks, "_WARNED", set())
    with ditfast.use_backend("reference"):
        yield


# ---------------------------------------------------------------------------------------------- helpers


def qwen_model(variant: str = "qwen-image") -> QwenImageTransformer2DModel:
    return randomize_(QwenImageTransformer2DModel(**CFG, **VARIANTS[variant]), seed=0).eval()


def img_shapes(variant: str):
    if variant == "edit-2511":  # target image, then a condition image (modulate_index 0 / 1)
        return [[GRID, COND]] * B
    if variant == "layered":  # two layers, then the condition image
        return [[GRID, GRID, COND]] * B
    return [GRID] * B


def n_image_tokens(variant: str) -> int:
    shapes = img_shapes(variant)[0]
    shapes = shapes if isinstance(shapes, list) else [shapes]
    return sum(f * h * w for f, h, w in shapes)


def model_inputs(variant: str = "qwen-image", seed: int = 1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    out = dict(hidden_states=r(B, n_image_tokens(variant), CFG["in_channels"]),
               encoder_hidden_states=r(B, LT, CFG["joint_attention_dim"]),
               timestep=torch.tensor([0.3, 0.85], dtype=dtype).requires_grad_(),  # unequal timesteps
               img_shapes=img_shapes(variant))
    if VARIANTS[variant].get("use_additional_t_cond"):
        out["additional_t_cond"] = torch.tensor([0, 1])
    return out


def run(model: nn.Module, inputs: dict, seed: int = 7, **kwargs):
    """Output and the gradients of a fixed random projection of it w.r.t. every parameter and input leaf."""
    out = model(**inputs, **kwargs, return_dict=False)[0]
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"input:{k}", v) for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad((out * cot).sum(), [t for _, t in named], allow_unused=True)
    return out.detach(), {n: g for (n, _), g in zip(named, grads)}


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, \
        f"{what}: {got.shape}/{got.dtype} vs {ref.shape}/{ref.dtype}"
    err = (got.double() - ref.double()).abs().max().item()
    bound = TOL * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def assert_same_run(got, ref, what: str, exact: bool = False) -> None:
    (out_g, grads_g), (out_r, grads_r) = got, ref
    assert grads_g.keys() == grads_r.keys()
    for name, g, r in [("output", out_g, out_r)] + [(f"grad {n}", grads_g[n], grads_r[n]) for n in grads_r]:
        assert (g is None) == (r is None), f"{what}: {name} is None in one run only"
        if r is None:  # the last block's text-stream output is unused: its text MLP and to_add_out get none
            assert name.startswith(f"grad transformer_blocks.{CFG['num_layers'] - 1}.") and any(
                s in name for s in ("txt_mlp.", "to_add_out.")), f"{what}: no {name}"
            continue
        if exact:
            assert torch.equal(g, r), f"{what}: {name} is not bit-identical"
        else:
            assert_close(g, r, f"{what}: {name}")


class AttentionCounter:
    """Counts ditfast attention steps (ditfast.nn.functional.attend; one per patched Qwen block)."""

    def __init__(self, monkeypatch):
        from ditfast.nn import functional

        self.calls = 0
        real = functional.attend

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(functional, "attend", counting)


def storage(model: nn.Module):
    return [(n, p.data_ptr(), p.shape) for n, p in model.named_parameters()]


def block_inputs(zero_cond: bool = False, seed: int = 3):
    """(block kwargs, image tokens) for one block: hidden, text, temb (2B rows with zero_cond_t), diffusers'
    RoPE tables and, with zero_cond_t, the modulate_index the model builds (0: target, 1: condition tokens)."""
    shapes = [GRID, COND] if zero_cond else [GRID]
    li = sum(f * h * w for f, h, w in shapes)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    kw = dict(hidden_states=r(B, li, D), encoder_hidden_states=r(B, LT, D), encoder_hidden_states_mask=None,
              temb=r(2 * B if zero_cond else B, D),
              image_rotary_emb=QwenEmbedRope(10000, list(AXES), scale_rope=True)([shapes], max_txt_seq_len=LT))
    if zero_cond:
        kw["modulate_index"] = torch.tensor([[0] * 15 + [1] * 9] * B, dtype=torch.int)
    return kw, li


def qwen_block(zero_cond: bool = False, seed: int = 2) -> QwenImageTransformerBlock:
    return randomize_(QwenImageTransformerBlock(D, H, DH, zero_cond_t=zero_cond), seed=seed).eval()


def leaves_of(kw: dict, dtype, device: str = "cpu"):
    """A copy of the block kwargs on ``device`` with fresh leaves (cast to dtype) for every float tensor input."""
    out = dict(kw)
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().to(device, dtype).requires_grad_()
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
    out["image_rotary_emb"] = tuple(t.to(device) for t in kw["image_rotary_emb"])
    return out


def block_run(block, kw, seed: int = 11):
    """(txt, img) outputs, then the gradients of hidden, text, temb and every parameter under a fixed cotangent."""
    outs = block(**kw)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    ins = [kw["hidden_states"], kw["encoder_hidden_states"], kw["temb"]]
    params = [p for _, p in block.named_parameters()]
    grads = torch.autograd.grad(loss, ins + params)
    names = ["input hidden_states", "input encoder_hidden_states", "input temb"]
    names += [n for n, _ in block.named_parameters()]
    reduced = [False, False, True] + [True] * len(params)  # parameter and (B, D) temb gradients sum over tokens
    return [o.detach().cpu() for o in outs], [g.cpu() for g in grads], names, reduced


def _interpreter() -> bool:
    """Whether the Triton kernels can run on CPU tensors (TRITON_INTERPRET=1, set by conftest without a GPU)."""
    return ditfast._backend.availability("triton", "cpu")[0]


# ---------------------------------------------------------------------------------------------- whole model, fp32


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_matches_diffusers(variant, monkeypatch):
    model = qwen_model(variant)
    inputs = model_inputs(variant)
    ref = run(model, inputs)
    keys, store = list(model.state_dict()), storage(model)

    counter = AttentionCounter(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback (and so no fallback warning) on this path
        assert patch(model) is model and is_patched(model)
        got = run(model, inputs)
    assert counter.calls == CFG["num_layers"], f"ditfast ran {counter.calls} attentions"
    assert_same_run(got, ref, variant)
    # every QK-norm weight gets a gradient, except the last block's text queries' (they reach only its text output)
    zero = {n for n, g in ref[1].items() if "norm" in n and g is not None and not g.abs().max() > 0}
    assert zero <= {f"transformer_blocks.{CFG['num_layers'] - 1}.attn.norm_added_q.weight"}, zero
    assert list(model.state_dict()) == keys, "state_dict keys changed"
    assert storage(model) == store, "parameters were added, removed or reallocated"

    assert unpatch(model) is model and not is_patched(model)
    counter.calls = 0
    again = run(model, inputs)
    assert counter.calls == 0, "the unpatched model still calls ditfast"
    assert_same_run(again, ref, "after unpatch", exact=True)


def test_controlnet_patches_and_matches(monkeypatch):
    """QwenImageControlNetModel is built from the same blocks: patched on its own, its block samples feed the
    patched transformer; both equal the unpatched pair."""
    from diffusers import QwenImageControlNetModel

    controlnet = randomize_(QwenImageControlNetModel(**CFG), seed=5).eval()
    model = qwen_model()
    inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in model_inputs().items()}
    cond = torch.randn(B, 15, CFG["in_channels"], generator=torch.Generator().manual_seed(4))

    def both():
        samples = controlnet(**inputs, controlnet_cond=cond, return_dict=False)
        return samples, model(**inputs, controlnet_block_samples=samples, return_dict=False)[0]

    with torch.no_grad():
        ref_samples, ref = both()
        patch(controlnet)
        patch(model)
        counter = AttentionCounter(monkeypatch)
        samples, out = both()
    assert counter.calls == 2 * CFG["num_layers"]
    for i, (g, r) in enumerate(zip(samples, ref_samples)):
        assert_close(g, r, f"controlnet block sample {i}")
    assert_close(out, ref, "transformer output")


def test_diffusers_attention_backend_is_honoured(monkeypatch):
    """model.set_attention_backend(name): the patched blocks run ditfast's prepare, then attend through
    diffusers' dispatch_attention_fn with that backend (ditfast/integrations/_context_parallel.py)."""
    import diffusers.models.attention_dispatch as dispatch

    model = qwen_model()
    inputs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in model_inputs().items()}
    # set_attention_backend also sets diffusers' process-wide active backend: restored after the test
    monkeypatch.setattr(dispatch._AttentionBackendRegistry, "_active_backend",
                        dispatch._AttentionBackendRegistry._active_backend)
    model.set_attention_backend("_native_math")
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        patch(model)
        backends, real = [], dispatch.dispatch_attention_fn

        def spy(*args, **kwargs):
            backends.append(kwargs.get("backend"))
            return real(*args, **kwargs)

        monkeypatch.setattr(dispatch, "dispatch_attention_fn", spy)
        counter = AttentionCounter(monkeypatch)
        out = model(**inputs, return_dict=False)[0]
    assert counter.calls == CFG["num_layers"]
    assert [b.value for b in backends] == ["_native_math"] * CFG["num_layers"]
    assert_close(out, ref, "patched, diffusers' _native_math attention")


def test_rope_tables_are_diffusers_tables():
    """cos / sin are the real / imaginary parts of diffusers' complex tables, text rows first; anything else
    (another dtype, a shape that does not match the streams) is refused (diffusers' forward runs then)."""
    (img, txt) = QwenEmbedRope(10000, list(AXES), scale_rope=True)([GRID], max_txt_seq_len=LT)
    cos, sin = rope_tables((img, txt), LT, 15, DH)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (LT + 15, DH // 2)
    assert torch.equal(cos[:LT], txt.real) and torch.equal(sin[LT:], img.imag)
    assert rope_tables(None, LT, 15, DH) is None
    cos_f, sin_f = rope_tables((img, txt), LT, 15, DH, image_first=True)  # [image, text]: a padded text
    assert torch.equal(cos_f[:15], img.real) and torch.equal(sin_f[15:], txt.imag)
    assert rope_tables((img, txt), 15, LT, DH) is False  # streams swapped
    assert rope_tables((img.to(torch.complex128), txt), LT, 15, DH) is False
    assert rope_tables((img.real, txt.real), LT, 15, DH) is False


# ---------------------------------------------------------------------------------------------- one block, by the rule


@pytest.mark.parametrize("zero_cond", [False, True], ids=["per-sample", "modulate_index"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, zero_cond, device):
    """On CUDA when present (the GPU kernels), else on CPU (triton: the kernels under the interpreter)."""
    if backend == "triton" and not ON_GPU and not _interpreter():
        pytest.skip("the Triton interpreter is not available (TRITON_INTERPRET=1 and triton needed)")
    kw, _ = block_inputs(zero_cond)
    ref32 = block_run(qwen_block(zero_cond).to(device), leaves_of(kw, torch.float32, device))
    low_block = qwen_block(zero_cond).to(device, dtype)
    low = block_run(low_block, leaves_of(kw, dtype, device))
    patch(nn.ModuleList([low_block]))
    with ditfast.use_backend(backend):
        fast = block_run(low_block, leaves_of(kw, dtype, device))
    assert_by_rule(fast[0], ref32[0], low[0], atol=1e-4, name="block (txt, img)")
    for n, f, r, lp, red in zip(fast[2], fast[1], ref32[1], low[1], fast[3]):
        assert f.dtype == dtype and r.abs().max() > 0, n
        assert_by_rule(f, r, lp, atol=1e-4, name=f"grad {n}", reduced=red)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padded_text_block_by_the_rule(backend, dtype, device):
    """One block with a text padding mask (sample 1 keeps 4 of 7 text tokens): [image, text] with per-sample
    key lengths (on triton: one kernel launch that stops at each sample's count), by the rule."""
    if backend == "triton" and not ON_GPU and not _interpreter():
        pytest.skip("the Triton interpreter is not available (TRITON_INTERPRET=1 and triton needed)")
    kw, _ = block_inputs()
    kw["encoder_hidden_states_mask"] = torch.arange(LT)[None, :] < torch.tensor([LT, 4])[:, None]
    ref32 = block_run(qwen_block().to(device), leaves_of(kw, torch.float32, device))
    low_block = qwen_block().to(device, dtype)
    low = block_run(low_block, leaves_of(kw, dtype, device))
    patch(nn.ModuleList([low_block]))
    with ditfast.use_backend(backend):
        fast = block_run(low_block, leaves_of(kw, dtype, device))
    assert_by_rule(fast[0], ref32[0], low[0], atol=1e-4, name="block (txt, img)")
    for n, f, r, lp, red in zip(fast[2], fast[1], ref32[1], low[1], fast[3]):
        assert f.dtype == dtype and r.abs().max() > 0, n
        assert_by_rule(f, r, lp, atol=1e-4, name=f"grad {n}", reduced=red)


# ---------------------------------------------------------------------------------------------- fallbacks


def _one_warning(fn, match: str):
    """Run fn() twice: the first call warns once (matching), the second not at all. Returns both results."""
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        a = fn()
    ours = [w for w in first if "ditfast" in str(w.message)]
    assert len(ours) >= 1 and all(match in str(w.message) for w in ours), [str(w.message) for w in first]
    assert len({str(w.message) for w in ours}) == 1, [str(w.message) for w in ours]
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        b = fn()
    assert not [w for w in second if "ditfast" in str(w.message)], "the fallback warned twice"
    return a, b


@pytest.mark.parametrize("kept", [(7, 5), (3, 0)], ids=["one-padded", "one-without-text"])
def test_padded_text_runs_ditfast_with_key_lengths(kept, monkeypatch):
    """A mask keeping a prefix of each sample's text (tokenizer padding; a sample may keep none): ditfast runs
    it as key lengths over [image, text] (one attention per block, no warning), equal to diffusers' masked
    attention: output and every gradient. The padding changes the result (the test can fail)."""
    model = qwen_model()
    inputs = model_inputs()
    mask = torch.arange(LT)[None, :] < torch.tensor(kept)[:, None]
    ref = run(model, inputs, encoder_hidden_states_mask=mask)
    unmasked = run(model, inputs)
    assert not torch.allclose(ref[0], unmasked[0], atol=1e-3), "the mask should change the output"
    patch(model)
    counter = AttentionCounter(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(model, inputs, encoder_hidden_states_mask=mask)
    assert counter.calls == CFG["num_layers"]
    assert_same_run(got, ref, f"text kept {kept}")


def test_mask_that_is_not_a_prefix_runs_diffusers(monkeypatch):
    model = qwen_model()
    inputs = model_inputs()
    mask = torch.ones(B, LT, dtype=torch.bool)
    mask[1, 2] = False  # a hole: the kept keys are not a prefix of sample 1's text
    ref = run(model, inputs, encoder_hidden_states_mask=mask)
    patch(model)
    counter = AttentionCounter(monkeypatch)
    got, again = _one_warning(lambda: run(model, inputs, encoder_hidden_states_mask=mask), "not a prefix")
    assert counter.calls == 0
    assert_same_run(got, ref, "masked", exact=True)
    assert_same_run(again, ref, "masked, second call", exact=True)


def test_all_true_mask_is_dropped(monkeypatch):
    model = qwen_model()
    inputs = model_inputs()
    ref = run(model, inputs)
    ref_masked = run(model, inputs, encoder_hidden_states_mask=torch.ones(B, LT))  # the model makes it bool
    assert_same_run(ref_masked, ref, "diffusers with an all-True mask")
    patch(model)
    counter = AttentionCounter(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(model, inputs, encoder_hidden_states_mask=torch.ones(B, LT))
    assert counter.calls == CFG["num_layers"]
    assert_same_run(got, ref_masked, "all-True mask")


def test_attention_kwargs_custom_processor_and_float64_run_diffusers(monkeypatch):
    model = qwen_model()
    inputs = model_inputs()
    counter = AttentionCounter(monkeypatch)

    ref = run(model, inputs, attention_kwargs={"unused": 1.0})  # diffusers' Attention drops it (with a log line)
    patch(model)
    got, _ = _one_warning(lambda: run(model, inputs, attention_kwargs={"unused": 1.0}), "joint_attention_kwargs")
    assert counter.calls == 0
    assert_same_run(got, ref, "attention kwargs", exact=True)

    calls = []

    class MyProcessor(QwenDoubleStreamAttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    unpatch(model)
    model.transformer_blocks[0].attn.processor = MyProcessor()  # block 0 runs diffusers, block 1 ditfast
    ref = run(model, inputs)
    calls.clear()
    patch(model)
    got, _ = _one_warning(lambda: run(model, inputs), "MyProcessor")
    assert len(calls) == 2 and counter.calls == 2  # each of the two runs: block 0 in diffusers, block 1 in ditfast
    assert_same_run(got, ref, "custom processor")

    model64 = qwen_model().double()
    inputs64 = {k: v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in model_inputs().items()}
    ref = run(model64, inputs64)
    patch(model64)
    counter.calls = 0
    got, _ = _one_warning(lambda: run(model64, inputs64), "float64")
    assert counter.calls == 0
    assert_same_run(got, ref, "float64", exact=True)


def test_modulate_index_ditfast_does_not_run_falls_back(monkeypatch):
    """A modulate_index given to a block without zero_cond_t (diffusers then splits temb's batch in halves)."""
    block = qwen_block(zero_cond=False)
    kw, _ = block_inputs(False)
    kw["modulate_index"] = torch.tensor([[0] * 10 + [1] * 5] * B, dtype=torch.int)
    with torch.no_grad():
        ref = block(**kw)
        patch(nn.ModuleList([block]))
        counter = AttentionCounter(monkeypatch)
        got, _ = _one_warning(lambda: block(**kw), "modulate_index")
    assert counter.calls == 0
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_hooks_on_attention_and_on_a_layer_norm(monkeypatch):
    """A hook on the attention module: the block calls it (the hook sees it) and stays on ditfast for the
    rest; a hook on a LayerNorm ditfast bypasses: diffusers' forward, warned once."""
    block = qwen_block()
    kw, _ = block_inputs(False)
    with torch.no_grad():
        ref = block(**kw)
        patch(nn.ModuleList([block]))
        seen = []
        handle = block.attn.register_forward_hook(lambda *_: seen.append(1))
        counter = AttentionCounter(monkeypatch)
        got = block(**kw)
        assert seen == [1] and counter.calls == 0
        for g, r in zip(got, ref):
            assert_close(g, r, "hooked attention")
        # with a padded text the hooked attention module gets the mask (diffusers' masked attention)
        kw_masked = dict(kw, encoder_hidden_states_mask=torch.arange(LT)[None, :] < torch.tensor([LT, 3])[:, None])
        handle.remove()
        patched_forward = block.forward
        del block.forward  # diffusers' forward for the reference
        ref_masked = block(**kw_masked)
        block.forward = patched_forward
        handle = block.attn.register_forward_hook(lambda *_: seen.append(1))
        got = block(**kw_masked)
        assert seen == [1, 1] and counter.calls == 0
        for g, r in zip(got, ref_masked):
            assert_close(g, r, "hooked attention, padded text")
        handle.remove()
        seen.clear()
        block.img_norm1.register_forward_hook(lambda *_: seen.append(2))
        got, _ = _one_warning(lambda: block(**kw), "img_norm1")
    assert counter.calls == 0 and seen == [2, 2]
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


# ---------------------------------------------------------------------------------------------- structure


def test_signature_and_unsupported_blocks():
    import inspect

    block = qwen_block()
    patch(nn.ModuleList([block]))
    ours = inspect.signature(block.forward).parameters
    theirs = inspect.signature(type(block).forward.__get__(block)).parameters
    describe = lambda params: [(p.name, p.kind, p.default) for p in params.values()]  # noqa: E731
    assert describe(ours) == describe(theirs)

    bad = nn.ModuleList([QwenImageTransformerBlock(D, H, DH, qk_norm="layer_norm")])
    with pytest.raises(UnsupportedModelError, match=r"0 \(QwenImageTransformerBlock\): attn\.norm_q is LayerNorm"):
        patch(bad)
    assert not any("forward" in m.__dict__ for m in bad.modules()), "partially patched"


# ---------------------------------------------------------------------------------------------- ditfast ops


def _to_double_block(block: QwenImageTransformerBlock) -> DoubleStreamBlock:
    """ditfast.nn's FLUX double block with the Qwen block's weights (Qwen names -> diffusers FLUX names ->
    FLUX names, through ditfast.convert)."""
    rename = {"img_mod.1.": "norm1.linear.", "txt_mod.1.": "norm1_context.linear.", "img_mlp.": "ff.",
              "txt_mlp.": "ff_context."}
    flux_sd = {}
    for k, v in block.state_dict().items():
        for a, b in rename.items():
            if k.startswith(a):
                k = b + k[len(a):]
        flux_sd[k] = v
    ours = DoubleStreamBlock(D, H, qkv_bias=True)
    ours.load_state_dict(ditfast.convert.diffusers_to_flux_double_block(flux_sd), strict=True)
    return ours


def test_patched_block_runs_the_ditfast_double_block_ops():
    if not _interpreter():  # tests/test_op_sequence.py's recorder works on CPU tensors
        pytest.skip("the Triton interpreter is not available (TRITON_INTERPRET=1 and triton needed)")
    block = qwen_block()
    ours = _to_double_block(block)
    patch(nn.ModuleList([block]))
    kw, _ = block_inputs(False)
    img_t, txt_t = kw["image_rotary_emb"]
    rope = (torch.cat((txt_t.real, img_t.real)), torch.cat((txt_t.imag, img_t.imag)))  # [text, image] rows
    x, c, e = (kw[k].detach().clone().requires_grad_() for k in ("hidden_states", "encoder_hidden_states", "temb"))
    d_in = [t.detach().clone().requires_grad_() for t in (x, c, e)]

    def qwen(x, c, e):
        txt, img = block(x, c, None, e, image_rotary_emb=kw["image_rotary_emb"])
        return img, txt

    with ditfast.use_backend("triton"):
        assert_same_sequence(qwen, d_in, lambda x, c, e: ours(x, c, e, rope), [x, c, e], attention_steps=1)


def test_patched_block_compiles_fullgraph():
    """The patched block traces with torch.compile(fullgraph=True) (aot_eager: no C++ toolchain needed), as
    the patched FLUX model does in tests/test_patch.py; forward only (the backward of the same ops is traced
    in tests/test_blocks_backends.py)."""
    torch._dynamo.reset()
    block = qwen_block()
    kw, _ = block_inputs(False)
    patch(nn.ModuleList([block]))
    with torch.no_grad():
        eager = block(**kw)
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(**kw)
    for o, e in zip(out, eager):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
