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
from torch.utils._python_dispatch import TorchDispatchMode

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

from helpers import randomize_  # noqa: E402

B, D, H, DH = 2, 80, 2, 40
AXES = (8, 8, 8, 16)  # sum = DH
LI, LT, LC = 15, 7, 9
CFG = dict(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=DH,
           num_attention_heads=H, joint_attention_dim=24, timestep_channels=32, axes_dims_rope=AXES)
TOL = 1e-5


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


class ParallelBlockCounter:
    def __init__(self, monkeypatch):
        from ditfast.nn import functional

        self.calls = 0
        real = functional.parallel_block

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(functional, "parallel_block", counting)


@pytest.mark.parametrize("cond", [False, True], ids=["t2i", "with-reference-images"])
def test_model_matches_diffusers(cond, monkeypatch):
    model = flux3_model()
    inputs = model_inputs(cond)
    ref = run(model, inputs)
    keys = list(model.state_dict())
    store = [(n, p.data_ptr()) for n, p in model.named_parameters()]
    counter = ParallelBlockCounter(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patch(model) is model and is_patched(model)
        got = run(model, inputs)
    assert counter.calls == (3 if cond else 2) + 2, counter.calls  # per-mode blocks of the modes present + 2 joint
    assert_same_run(got, ref, "patched")
    assert list(model.state_dict()) == keys and [(n, p.data_ptr()) for n, p in model.named_parameters()] == store
    unpatch(model)
    counter.calls = 0
    again = run(model, inputs)
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


def leaves_of(kw, dtype, device="cpu"):
    return {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.detach().to(device, dtype).requires_grad_())
            for k, v in kw.items()}


def block_run(block, kw, seed: int = 11):
    outs = block(**kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    ins = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    params = list(block.named_parameters())
    # allow_unused: after fuse_projections, to_q / to_k / to_v are kept but unused (by diffusers too)
    grads = torch.autograd.grad(loss, [kw[k] for k in ins] + [p for _, p in params], allow_unused=True)
    names = [f"input {k}" for k in ins] + [n for n, _ in params]
    reduced = [False] * len(ins) + [True] * len(params)
    kept = [i for i, gr in enumerate(grads) if gr is not None]
    assert all(names[i].split(".")[-2] in ("to_q", "to_k", "to_v") for i in range(len(grads)) if i not in kept)
    return ([o.detach().cpu() for o in outs], [grads[i].cpu() for i in kept], [names[i] for i in kept],
            [reduced[i] for i in kept])


def _interpreter() -> bool:
    return ditfast._backend.availability("triton", "cpu")[0]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-qkv"])
@pytest.mark.parametrize("kind", ["mode", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_by_the_rule(backend, dtype, kind, fused, device):
    if backend == "triton" and not ON_GPU and not _interpreter():
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


def test_float64_custom_processor_and_hooked_norm_run_diffusers():
    cls, kw = block_case("single")
    block = make_block(cls, False)
    with torch.no_grad():
        patch(nn.ModuleList([block]))
        block.double()
        kw64 = {k: (v if isinstance(v, tuple) else v.double()) for k, v in kw.items()}
        ref = type(block).forward(block, **kw64)
        got, _ = _one_warning(lambda: block(**kw64), "float64")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.float()

        from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

        class MyProcessor(Flux3AttnProcessor):  # a user's processor: ditfast cannot know its math
            pass

        block.attn.set_processor(MyProcessor())
        ref = type(block).forward(block, **kw)
        got, _ = _one_warning(lambda: block(**kw), "processor")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        block.attn.set_processor(Flux3AttnProcessor())
        ref = type(block).forward(block, **kw)
        block.norm.register_forward_hook(lambda *_: None)
        got, _ = _one_warning(lambda: block(**kw), "norm")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_unsupported_blocks_are_refused():
    bad = make_block(Flux3ModeTransformerBlock, False)
    bad.norm = nn.LayerNorm(D)  # affine: not FLUX.3's norm
    with pytest.raises(UnsupportedModelError, match="norm"):
        patch(nn.ModuleList([bad]))
    assert "forward" not in bad.__dict__


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("ditfast::"):
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


def test_patched_single_block_runs_ditfast_ops():
    if not _interpreter():
        pytest.skip("the Triton interpreter is not available")
    cls, kw = block_case("single")
    block = make_block(cls, False)
    patch(nn.ModuleList([block]))
    with ditfast.use_backend("triton"), _Ops() as rec:
        c, x = block(**leaves_of(kw, torch.float32))
        (c.sum() + x.sum()).backward()
    fwd = [n for n in rec.names if not n.endswith("backward")]
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
