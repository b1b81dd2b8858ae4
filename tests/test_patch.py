"""ditfast.patch / ditfast.unpatch on diffusers models (ditfast/integrations).

Tiny random configurations of diffusers' FLUX.1, SD3 / SD3.5 and DiT transformers, every parameter
randomized (nothing left at its zero init, so every gate, modulation and QK-norm weight matters).
In fp32 a patched model's output and all parameter / input gradients must equal the unpatched
model's to fp32 rounding (ditfast's integration logic is checked exactly; on CPU the ops run their
reference backend), state_dict keys and parameter storage are unchanged, every block actually ran
ditfast (counted attention steps), and unpatch restores bit-identical outputs.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import ditfast
from conftest import ON_GPU
from ditfast.integrations import UnsupportedModelError, is_patched, patch, unpatch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402

B = 2


@pytest.fixture(autouse=True)
def _reference_ops():
    """The exact fp32 comparisons check the patch's wiring, on the reference ops (on CPU the automatic
    choice would be the compiled extension's kernels, whose fp32 rounding differs); the fast-path tests
    below ask for the triton backend explicitly, which nests inside this."""
    with ditfast.use_backend("reference"):
        yield


TOL = 1e-5  # fp32: max |patched - unpatched| <= TOL * max(1, max |unpatched|), per tensor

FLUX_CFG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))
SD3_CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=3,
               joint_attention_dim=12, caption_projection_dim=24, pooled_projection_dim=10, out_channels=4,
               pos_embed_max_size=8)
SD3_VARIANTS = {  # SD3-medium; SD3.5-large (RMS QK-norm); SD3.5-medium (QK-norm + dual attention in block 0)
    "sd3-medium": dict(qk_norm=None, dual_attention_layers=()),
    "sd3.5-large": dict(qk_norm="rms_norm", dual_attention_layers=()),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),
}
DIT_CFG = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
               sample_size=8, patch_size=2, num_embeds_ada_norm=10)
RESOLUTIONS = [(4, 4), (3, 5)]  # token grid (rows, cols): square and non-square
TEXT_LENGTHS = [5, 7]


# ---------------------------------------------------------------------------------------------- helpers


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random with unit-scale activations: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2²),
    other vectors (biases) ~ N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()  # eval: DiT's label dropout would make runs differ


def flux_model(**overrides):
    return randomize(FluxTransformer2DModel(**{**FLUX_CFG, **overrides}))


def flux_inputs(rows: int, cols: int, text_len: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat((torch.zeros(rows * cols, 1), grid.float()), dim=1)
    # non-zero text ids (FLUX uses zeros) so a mix-up of the text and image RoPE rows cannot pass
    txt_ids = torch.randint(0, 4, (text_len, 3), generator=g).float()
    return dict(hidden_states=r(B, rows * cols, FLUX_CFG["in_channels"]).requires_grad_(),
                encoder_hidden_states=r(B, text_len, FLUX_CFG["joint_attention_dim"]).requires_grad_(),
                pooled_projections=r(B, FLUX_CFG["pooled_projection_dim"]),
                timestep=torch.rand(B, generator=g).to(dtype), guidance=(1 + 4 * torch.rand(B, generator=g)).to(dtype),
                img_ids=img_ids, txt_ids=txt_ids)


def sd3_model(variant: str, **overrides):
    return randomize(SD3Transformer2DModel(**{**SD3_CFG, **SD3_VARIANTS[variant], **overrides}))


def sd3_inputs(rows: int, cols: int, text_len: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    p = SD3_CFG["patch_size"]
    return dict(hidden_states=torch.randn(B, SD3_CFG["in_channels"], rows * p, cols * p, generator=g).requires_grad_(),
                encoder_hidden_states=torch.randn(B, text_len, SD3_CFG["joint_attention_dim"],
                                                  generator=g).requires_grad_(),
                pooled_projections=torch.randn(B, SD3_CFG["pooled_projection_dim"], generator=g),
                timestep=1000 * torch.rand(B, generator=g))


def dit_model():
    return randomize(DiTTransformer2DModel(**DIT_CFG))


def dit_inputs(side: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    p = DIT_CFG["patch_size"]
    return dict(hidden_states=torch.randn(B, DIT_CFG["in_channels"], side * p, side * p, generator=g).requires_grad_(),
                timestep=torch.randint(0, 1000, (B,), generator=g),
                class_labels=torch.randint(0, DIT_CFG["num_embeds_ada_norm"], (B,), generator=g))


def run(model: nn.Module, inputs: dict, seed: int = 7):
    """Output and the gradients of a fixed random projection of it w.r.t. every parameter and input."""
    out = model(**inputs, return_dict=False)[0]
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"input:{k}", v) for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad((out * cot).sum(), [t for _, t in named], allow_unused=True)
    return out.detach(), {n: g for (n, _), g in zip(named, grads)}


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, \
        f"{what}: {got.shape}/{got.dtype} vs {ref.shape}/{ref.dtype}"
    err = (got.double() - ref.double()).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def assert_same_run(got, ref, what: str, exact: bool = False) -> None:
    (out_g, grads_g), (out_r, grads_r) = got, ref
    assert grads_g.keys() == grads_r.keys()
    pairs = [("output", out_g, out_r)] + [(f"grad {n}", grads_g[n], grads_r[n]) for n in grads_r]
    for name, g, r in pairs:
        assert (g is None) == (r is None), f"{what}: {name} is None in only one run"
        if r is None:
            continue
        if exact:
            assert torch.equal(g, r), f"{what}: {name} is not bit-identical"
        else:
            assert_close(g, r, f"{what}: {name}")
    assert all(g is not None for n, g in grads_r.items() if not n.startswith("input")), "a parameter got no gradient"


class AttentionCounter:
    """Counts attention steps (ditfast.nn.functional.attend, where every block attends; each patched
    block makes one, two with SD3.5's dual attention)."""

    def __init__(self, monkeypatch):
        from ditfast.nn import functional

        self.calls = 0
        real = functional.attend

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(functional, "attend", counting)


def storage(model: nn.Module):
    return ([(n, p.data_ptr(), p.shape) for n, p in model.named_parameters()],
            [(n, b.data_ptr(), b.shape) for n, b in model.named_buffers()])


def check_roundtrip(model: nn.Module, inputs: dict, attention_calls: int, monkeypatch) -> None:
    """patch -> same outputs and gradients, same state_dict and storage, ditfast really ran;
    unpatch -> bit-identical outputs and gradients."""
    ref = run(model, inputs)
    keys, store = list(model.state_dict()), storage(model)

    counter = AttentionCounter(monkeypatch)
    assert patch(model) is model and is_patched(model)
    got = run(model, inputs)
    assert counter.calls == attention_calls, f"ditfast ran {counter.calls} attentions, expected {attention_calls}"
    assert_same_run(got, ref, type(model).__name__)
    assert list(model.state_dict()) == keys, "state_dict keys changed"
    assert storage(model) == store, "parameters or buffers were added, removed or reallocated"

    assert unpatch(model) is model and not is_patched(model)
    counter.calls = 0
    again = run(model, inputs)
    assert counter.calls == 0, "unpatched model still calls ditfast"
    assert_same_run(again, ref, "after unpatch", exact=True)


# ---------------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("text_len", TEXT_LENGTHS)
@pytest.mark.parametrize("grid", RESOLUTIONS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_flux_matches_diffusers(grid, text_len, monkeypatch):
    model = flux_model()
    check_roundtrip(model, flux_inputs(*grid, text_len), FLUX_CFG["num_layers"] + FLUX_CFG["num_single_layers"],
                    monkeypatch)


@pytest.mark.parametrize("text_len", TEXT_LENGTHS)
@pytest.mark.parametrize("grid", RESOLUTIONS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("variant", list(SD3_VARIANTS))
def test_sd3_matches_diffusers(variant, grid, text_len, monkeypatch):
    model = sd3_model(variant)
    calls = SD3_CFG["num_layers"] + len(SD3_VARIANTS[variant]["dual_attention_layers"])
    check_roundtrip(model, sd3_inputs(*grid, text_len), calls, monkeypatch)


@pytest.mark.parametrize("side", [4, 6])
def test_dit_matches_diffusers(side, monkeypatch):
    model = dit_model()
    check_roundtrip(model, dit_inputs(side), DIT_CFG["num_layers"], monkeypatch)


def test_sd3_pre_only_last_block_and_dual_attention_are_patched():
    model = sd3_model("sd3.5-medium")
    patch(model)
    first, last = model.transformer_blocks
    assert first.use_dual_attention and first.attn2 is not None and last.context_pre_only
    assert "forward" in first.__dict__ and "forward" in last.__dict__


def test_flux_without_guidance_and_with_zero_text_ids(monkeypatch):
    model = flux_model(guidance_embeds=False)
    inputs = flux_inputs(3, 5, 5)
    inputs.pop("guidance")
    inputs["txt_ids"] = torch.zeros_like(inputs["txt_ids"])  # what the FLUX pipelines pass
    check_roundtrip(model, inputs, FLUX_CFG["num_layers"] + FLUX_CFG["num_single_layers"], monkeypatch)


def test_flux_rope_tables_are_views_not_copies():
    """The patched FLUX blocks take diffusers' fp32 (L, Dh) repeat-interleaved tables as strided
    (L, Dh/2) views: no copy per block call (a FLUX forward has 57 blocks)."""
    from ditfast.integrations._flux import rope_tables

    L, Dh = 7, 16
    angles = torch.randn(L, Dh // 2)
    cos, sin = (f(angles).repeat_interleave(2, dim=1) for f in (torch.cos, torch.sin))
    tc, ts = rope_tables((cos, sin), L, Dh)
    assert tc.data_ptr() == cos.data_ptr() and ts.data_ptr() == sin.data_ptr()
    assert torch.equal(tc, angles.cos()) and torch.equal(ts, angles.sin())
    assert rope_tables((cos, sin), L + 1, Dh) is False and rope_tables(None, L, Dh) is None


def test_flux_fused_qkv_projections(monkeypatch):
    """After fuse_qkv_projections() the patched blocks read the packed to_qkv / to_added_qkv."""
    model = flux_model()
    inputs = flux_inputs(3, 5, 7)
    out_ref = model(**inputs, return_dict=False)[0].detach()
    model.fuse_qkv_projections()
    assert model.transformer_blocks[0].attn.fused_projections
    counter = AttentionCounter(monkeypatch)
    patch(model)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert counter.calls == FLUX_CFG["num_layers"] + FLUX_CFG["num_single_layers"]
    assert_close(out, out_ref, "fused qkv")


def test_gradient_checkpointing_and_forward_chunking(monkeypatch):
    flux = flux_model()
    inputs = flux_inputs(3, 5, 5)
    ref = run(flux, inputs)
    flux.enable_gradient_checkpointing()
    patch(flux)
    assert_same_run(run(flux, inputs), ref, "flux with gradient checkpointing")

    sd3 = sd3_model("sd3.5-medium")
    inputs = sd3_inputs(3, 5, 5)
    sd3.enable_forward_chunking(chunk_size=1, dim=0)
    ref = run(sd3, inputs)
    counter = AttentionCounter(monkeypatch)
    patch(sd3)
    assert_same_run(run(sd3, inputs), ref, "sd3 with feed-forward chunking")
    assert counter.calls == 3


# ---------------------------------------------------------------------------------------------- API contract


def test_signatures_unchanged():
    for model in (flux_model(), sd3_model("sd3.5-medium"), dit_model()):
        patch(model)
        blocks = [m for m in model.modules() if "forward" in m.__dict__]
        assert blocks
        for block in blocks:
            ours = inspect.signature(block.forward).parameters
            theirs = inspect.signature(type(block).forward.__get__(block)).parameters
            assert [(p.name, p.kind, p.default) for p in ours.values()] == \
                   [(p.name, p.kind, p.default) for p in theirs.values()], type(block).__name__


def test_double_patch_is_harmless():
    model = sd3_model("sd3.5-large")
    inputs = sd3_inputs(4, 4, 5)
    ref = run(model, inputs)
    patch(model)
    forwards = {id(m): m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__}
    patch(model)
    assert {id(m): m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__} == forwards
    assert_same_run(run(model, inputs), ref, "patched twice")
    unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert_same_run(run(model, inputs), ref, "after one unpatch", exact=True)
    assert unpatch(model) is model  # unpatching an unpatched model is a no-op


def test_pipeline_and_compiled_wrapper():
    model = flux_model()
    pipe = types.SimpleNamespace(transformer=model)
    assert patch(pipe) is pipe and is_patched(model) and is_patched(pipe)
    assert unpatch(pipe) is pipe and not is_patched(model)
    wrapper = types.SimpleNamespace()
    with pytest.raises(TypeError, match="transformer"):
        patch(wrapper)
    with pytest.raises(TypeError, match="transformer is None"):
        patch(types.SimpleNamespace(transformer=None))
    compiled = torch.compile(model)  # patch reaches the wrapped module; nothing is compiled here
    assert patch(compiled) is compiled and is_patched(model)


def test_deepcopy_of_patched_model_is_patched():
    model = dit_model()
    inputs = dit_inputs(4)
    patch(model)
    clone = copy.deepcopy(model)
    for block in clone.transformer_blocks:
        assert block.forward.args[0] is block  # bound to the copy, not to the original
    assert_close(clone(**inputs).sample, model(**inputs).sample, "deepcopy")
    unpatch(clone)
    assert is_patched(model) and not is_patched(clone)


def test_torch_save_of_patched_model_round_trips(tmp_path):
    model = flux_model()
    inputs = flux_inputs(3, 5, 5)
    patch(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert is_patched(loaded) and loaded.transformer_blocks[0].forward.args[0] is loaded.transformer_blocks[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, return_dict=False)[0], model(**inputs, return_dict=False)[0])
    unpatch(loaded)
    assert not any("forward" in m.__dict__ for m in loaded.modules())


def test_import_ditfast_integrations_does_not_import_diffusers():
    code = "import sys, ditfast, ditfast.integrations; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- errors and fallbacks


def test_unsupported_models_raise_clear_errors():
    with pytest.raises(UnsupportedModelError, match=r"no block.*Linear.*FluxTransformerBlock"):
        patch(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="got object"):
        patch(object())

    bad = sd3_model("sd3-medium", qk_norm="layer_norm")  # diffusers allows it; ditfast has no LayerNorm QK-norm
    msg = r"transformer_blocks\.0 \(JointTransformerBlock\): attn\.norm_q is LayerNorm"
    with pytest.raises(UnsupportedModelError, match=msg):
        patch(bad)
    assert not is_patched(bad) and not any("forward" in m.__dict__ for m in bad.modules()), "partially patched"

    weightless = sd3_model("sd3.5-large")
    weightless.transformer_blocks[1].attn.norm_q.weight = None  # RMSNorm(elementwise_affine=False)
    with pytest.raises(UnsupportedModelError, match=r"attn\.norm_q is an RMSNorm without a weight"):
        patch(weightless)

    from diffusers.models.attention import BasicTransformerBlock

    unet_like = nn.ModuleList([BasicTransformerBlock(16, 2, 8)])  # norm_type="layer_norm", as in UNets
    with pytest.raises(UnsupportedModelError, match="norm_type is 'layer_norm'"):
        patch(unet_like)


def test_hooked_blocks_are_refused():
    model = dit_model()
    block = model.transformer_blocks[1]
    block.forward = lambda *a, **k: None  # what accelerate / diffusers hooks do
    with pytest.raises(UnsupportedModelError, match=r"transformer_blocks\.1 .*already replaced"):
        patch(model)
    assert "forward" not in model.transformer_blocks[0].__dict__


def test_unhandled_calls_fall_back_to_diffusers(monkeypatch):
    """IP-adapter style kwargs and custom processors run the original forward, with its result."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    counter = AttentionCounter(monkeypatch)
    model = sd3_model("sd3.5-medium")
    inputs = sd3_inputs(3, 5, 5)
    ref = run(model, inputs)
    patch(model)
    calls = []

    class MyProcessor(JointAttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    model.transformer_blocks[0].attn.processor = MyProcessor()  # block 0 falls back, block 1 stays on ditfast
    got = run(model, inputs)
    assert calls and counter.calls == 1
    assert_same_run(got, ref, "custom processor")

    flux = flux_model()
    inputs = flux_inputs(3, 5, 5)
    with torch.no_grad():
        ref = flux(**inputs, joint_attention_kwargs={"ip_unused": 1}, return_dict=False)[0]
        patch(flux)
        counter.calls = 0
        out = flux(**inputs, joint_attention_kwargs={"ip_unused": 1}, return_dict=False)[0]
    assert counter.calls == 0
    assert torch.equal(out, ref)
    assert type(flux.transformer_blocks[0].attn.processor) is FluxAttnProcessor


@pytest.mark.parametrize("which", ["single", "double"])
def test_fp16_clipping_matches_diffusers(which):
    """diffusers clips fp16 FLUX outputs to +-65504 (single block: the joint stream, double block: the text)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    cls = FluxSingleTransformerBlock if which == "single" else FluxTransformerBlock
    block = randomize(cls(dim=32, num_attention_heads=2, attention_head_dim=16)).half()
    g = torch.Generator().manual_seed(3)
    # residual streams with entries at fp16's limit and large gates, so the last residual sum overflows
    x, c = (torch.randn(1, n, 32, generator=g) for n in (6, 4))
    x, c = (torch.where(t.abs() > 1, 65504 * t.sign(), t).half() for t in (x, c))
    temb = (20 * torch.randn(1, 32, generator=g)).half()
    if which == "double":  # only the text stream's final (MLP) residual is clipped: keep the rest finite
        x = x.clamp(-4, 4)
        with torch.no_grad():
            block.norm1_context.linear.weight[64:96] = 0  # c_gate_msa = 0: the attention residual cannot overflow
            block.norm1_context.linear.bias[64:96] = 0
    with torch.no_grad():
        ref = block(x, c, temb)
        patch(nn.ModuleList([block]))
        got = block(x, c, temb)
    saturated = ref[0].abs() == 65504
    assert saturated.any(), "test inputs did not reach the clipping"
    for g_, r_ in zip(got, ref):
        assert torch.isfinite(g_).all() == torch.isfinite(r_).all()
    assert torch.equal(got[0].abs() == 65504, saturated)
    mask = ~saturated
    assert_close(got[0][mask].float(), ref[0][mask].float(), "fp16 unsaturated values", tol=1e-2)


# ---------------------------------------------------------------------------------------------- GPU


def _fast_backend_context():
    """The fast path to test: the default backend on CUDA; the Triton kernels under the interpreter on CPU."""
    if ON_GPU:
        return contextlib.nullcontext()
    ops = ("norm_modulate", "norm_modulate_dual", "gated_residual", "gated_residual_norm_modulate", "qk_norm_rope",
           "joint_attention")
    missing = [op for op in ops if "triton" not in ditfast._backend.implemented(op)]
    if missing or not ditfast._backend.availability("triton", "cpu")[0]:
        pytest.skip(f"no Triton path to run on CPU (missing: {missing or 'TRITON_INTERPRET=1'})")
    return ditfast.use_backend("triton")


@pytest.mark.parametrize("family", ["flux", "sd3.5-medium", "dit"])
def test_patched_bf16_fast_path_by_the_rule(family):
    """The fast kernels inside a patched model, in bf16, by the tolerance rule (docs/numerics.md): |patched bf16 - unpatched fp32|
    <= 2 |unpatched bf16 - unpatched fp32| + atol on the output. CUDA: realistic token counts, default
    backend; CPU: tiny shapes, the Triton kernels under the interpreter.

    Forward only: gradients are checked exactly in fp32 above (integration logic) and op by op by the rule in
    the ops' tests. A whole bf16 model's gradient compounds rounding through every block and the conditioning
    path, so its max-element error ratio is dominated by chance (DiT: up to 2.6x on norm1.linear grads while
    every op passes the rule on the same tensors), which makes it no test of the kernels."""
    from ditfast.testing import assert_by_rule

    dev = "cuda" if ON_GPU else "cpu"
    rows, cols, text = (16, 24, 77) if ON_GPU else (3, 5, 5)
    if family == "flux":
        model, inputs = flux_model(num_layers=1, num_single_layers=1), flux_inputs(rows, cols, text)
    elif family == "dit":
        model, inputs = dit_model(), dit_inputs(rows)
    else:
        model, inputs = sd3_model(family, pos_embed_max_size=max(8, rows, cols)), sd3_inputs(rows, cols, text)
    model.to(dev)
    f32 = {k: v.detach().to(dev) for k, v in inputs.items()}
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in f32.items()}
    with torch.no_grad():
        ref32 = model(**f32, return_dict=False)[0]
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        ref_low = model_bf16(**low, return_dict=False)[0]
        patch(model_bf16)
        with _fast_backend_context():
            fast = model_bf16(**low, return_dict=False)[0]
    assert_by_rule(fast, ref32, ref_low, name=f"{family} patched bf16 output")


def test_patched_model_compiles_without_graph_breaks():
    """The patched FLUX forward traces with torch.compile(fullgraph=True) (aot_eager: no C++ toolchain needed)."""
    torch._dynamo.reset()
    model = flux_model(num_layers=1, num_single_layers=1)
    inputs = flux_inputs(3, 5, 5)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        patch(model)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs, return_dict=False)[0]
    assert_close(out, ref, "compiled patched model")


def test_every_supported_block_is_described_for_users():
    """python -m ditfast.info lists each block ditfast.patch runs, with what it serves and what falls back."""
    from ditfast import info
    from ditfast.integrations import diffusers as integration

    assert set(integration.FAMILIES) == set(integration.SUPPORTED_BLOCKS)
    text = "\n".join(info.patch_lines())
    for block in integration.SUPPORTED_BLOCKS:
        assert block in text
