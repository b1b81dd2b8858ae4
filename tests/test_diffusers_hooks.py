"""diffusers' caches, hooks and offloading on patched models (ditfast/integrations/_hooks.py).

A tiny random FLUX.1 transformer runs a short denoising loop (timesteps changing, inside
``cache_context``) with a diffusers cache enabled: the patched model (patched before or after the
cache is enabled) must give the unpatched cached model's outputs at every step (fp32, reference ops:
1e-5), every cache hook must see its module called on every step (its pre-forward counted), and the
cached outputs must differ from the uncached ones at some step (the cache really acted).

Offloading runs with CPU as both devices, so the hooks' onload / offload logic runs without a GPU:
outputs equal to the unpatched offloaded run, every group-offloading hook entered on every forward,
and the ditfast block math counted on every block (leaf level: the QK-norm weights sit behind
per-module hooks, so the patched blocks call the attention module, whose processor calls the norms).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import ditfast
from ditfast.integrations import patch, unpatch
from ditfast.nn import functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    FasterCacheConfig,
    FirstBlockCacheConfig,
    FluxTransformer2DModel,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks import HookRegistry  # noqa: E402
from helpers import randomize_  # noqa: E402

CFG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))
TIMESTEPS = [999, 900, 800, 700, 600, 500]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _reference_ops():
    with ditfast.use_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' experimental-feature and ditfast's fallback notices
        yield


def flux_model(seed: int = 0) -> FluxTransformer2DModel:
    return randomize_(FluxTransformer2DModel(**CFG), seed).eval()


def inputs(t: int, rows: int = 4, cols: int = 4, text: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return dict(hidden_states=torch.randn(2, rows * cols, CFG["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(2, text, CFG["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(2, CFG["pooled_projection_dim"], generator=g),
                timestep=torch.full((2,), t / 1000), guidance=torch.full((2,), 3.5),
                img_ids=torch.cat((torch.zeros(rows * cols, 1), grid.float()), 1),
                txt_ids=torch.randint(0, 4, (text, 3), generator=g).float())


class Counts:
    """Counts the ditfast block-math calls (functional.flux_double / flux_single) while active."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("flux_double", "flux_single"):
            orig = getattr(F, name)

            def counted(*a, _orig=orig, **k):
                self.n += 1
                return _orig(*a, **k)

            monkeypatch.setattr(F, name, counted)


def count_hook_calls(model, hook_name: str) -> dict:
    """Wrap the pre-forward of every ``hook_name`` hook in ``model``: {module name: call count}."""
    counts = {}
    for name, m in model.named_modules():
        reg = m.__dict__.get("_diffusers_hook")
        if reg is None or hook_name not in reg.hooks:
            continue
        ref = reg._fn_refs[reg._hook_order.index(hook_name)]
        counts[name] = 0

        def pre(module, *a, _orig=ref.pre_forward, _name=name, **k):
            counts[_name] += 1
            return _orig(module, *a, **k)

        ref.pre_forward = pre
    assert counts, f"no {hook_name} hook found"
    return counts


def denoise(model, clock=None):
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            if clock is not None:
                clock["t"] = t
            with model.cache_context("cond"):
                outs.append(model(**inputs(t), return_dict=False)[0])
    return outs


def close(a, b) -> bool:
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())


# ---- caches -------------------------------------------------------------------------------------
def _faster(clock):
    return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
                             current_timestep_callback=lambda: clock["t"], attention_weight_callback=lambda _: 0.5,
                             is_guidance_distilled=True)


def _pab(clock):
    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_timestep_skip_range=(100, 950),
                                           current_timestep_callback=lambda: clock["t"])


def _taylor(clock):
    return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                 taylor_factors_dtype=torch.float32)


def _taylor_lite(clock):
    return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                 taylor_factors_dtype=torch.float32, use_lite_mode=True)


def _fbc(clock):
    return FirstBlockCacheConfig(threshold=10.0)  # always reuse after the first step


CACHES = {  # name -> (config factory, hook name, hooks on attention modules)
    "faster_cache": (_faster, "faster_cache_block", True),
    "pyramid_attention_broadcast": (_pab, "pyramid_attention_broadcast", True),
    "taylorseer": (_taylor, "taylorseer_cache", True),
    "taylorseer_lite": (_taylor_lite, "taylorseer_cache", False),
    "first_block_cache": (_fbc, "fbc_block_hook", False),
}


@pytest.mark.parametrize("order", ["patch_then_cache", "cache_then_patch"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_cache_on_patched_model(cache, order, monkeypatch):
    make, hook_name, on_attention = CACHES[cache]
    base = flux_model()
    uncached = denoise(copy.deepcopy(base))

    ref, ref_clock = copy.deepcopy(base), {"t": TIMESTEPS[0]}
    ref.enable_cache(make(ref_clock))
    expected = denoise(ref, ref_clock)
    assert any(not close(e, u) for e, u in zip(expected, uncached)), "the cache did not change any output"

    model, clock = copy.deepcopy(base), {"t": TIMESTEPS[0]}
    if order == "patch_then_cache":
        patch(model)
        model.enable_cache(make(clock))
    else:
        model.enable_cache(make(clock))
        patch(model)
    calls = count_hook_calls(model, hook_name)
    ran = Counts(monkeypatch)
    got = denoise(model, clock)

    for i, (g, e) in enumerate(zip(got, expected)):
        assert close(g, e), f"step {i}: patched cached output differs from the unpatched cached run " \
                            f"by {(g - e).abs().max().item():.3g}"
    assert all(n == len(TIMESTEPS) for n in calls.values()), f"hooks not entered on every step: {calls}"
    blocks = CFG["num_layers"] + CFG["num_single_layers"]
    if on_attention:  # ditfast runs every block and calls the (hooked) attention modules in it
        assert ran.n == blocks * len(TIMESTEPS)
    else:  # block-level hooks wrap ditfast's forward: the ditfast math runs whenever the block is computed
        assert 0 < ran.n <= blocks * len(TIMESTEPS)

    # the cache state is reset and the model keeps working; unpatch removes ditfast from under the hooks
    model.disable_cache()
    unpatch(model)
    with torch.no_grad():
        out = model(**inputs(TIMESTEPS[0]), return_dict=False)[0]
    assert close(out, uncached[0])


def test_hooked_adaln_falls_back_with_one_warning(monkeypatch):
    """A hook on a module ditfast does not call and cannot route (the adaLN module norm1): that
    block runs diffusers' forward, the hook runs, the output is the unpatched one, warned once."""
    from ditfast.integrations import _hooks

    monkeypatch.setattr(_hooks, "_WARNED", set())  # once per process: forget earlier tests' warnings
    model, ref = patch(flux_model()), flux_model()
    seen = []
    model.transformer_blocks[0].norm1.register_forward_hook(lambda m, a, out: seen.append(1))
    ran = Counts(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for _ in range(2):
                out = model(**inputs(500), return_dict=False)[0]
        exp = ref(**inputs(500), return_dict=False)[0]
    msgs = [str(w.message) for w in caught if "ditfast" in str(w.message)]
    assert len(msgs) == 1 and "FluxTransformerBlock.norm1 carries hooks" in msgs[0], msgs
    assert len(seen) == 2 and close(out, exp)
    assert ran.n == 2 * (CFG["num_layers"] + CFG["num_single_layers"] - 1)  # all blocks but the hooked one


def test_torch_forward_hook_on_attention_runs(monkeypatch):
    """Plain PyTorch forward hooks on attention modules (double and single block) see every call after
    the patch, and their blocks still run ditfast around the attention module."""
    model = patch(flux_model())
    seen = []
    model.transformer_blocks[0].attn.register_forward_hook(lambda m, a, out: seen.append(type(out)))
    model.single_transformer_blocks[1].attn.register_forward_hook(lambda m, a, out: seen.append(type(out)))
    ref = flux_model()
    ran = Counts(monkeypatch)
    with torch.no_grad():
        out = model(**inputs(500), return_dict=False)[0]
        exp = ref(**inputs(500), return_dict=False)[0]
    assert seen == [tuple, torch.Tensor] and close(out, exp)
    assert ran.n == CFG["num_layers"] + CFG["num_single_layers"]


def test_disable_cache_restores_ditfast(monkeypatch):
    """After disable_cache() the attention modules carry no hooks: every block runs ditfast again."""
    model = patch(flux_model())
    model.enable_cache(_pab({"t": 500}))
    model.disable_cache()
    ran = Counts(monkeypatch)
    with torch.no_grad():
        model(**inputs(500), return_dict=False)
    assert ran.n == CFG["num_layers"] + CFG["num_single_layers"]


# ---- offloading (CPU as onload and offload device) ------------------------------------------------
def _send_to_device(obj, device, non_blocking=False, **_):
    """Stand-in for accelerate.utils.send_to_device (diffusers' group offloading imports it only when
    accelerate is installed; this venv has no accelerate): tensors in nested containers moved."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_send_to_device(o, device, non_blocking) for o in obj)
    if isinstance(obj, dict):
        return {k: _send_to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


@pytest.fixture
def offload_ready(monkeypatch):
    from diffusers.hooks import group_offloading

    if not hasattr(group_offloading, "send_to_device"):
        monkeypatch.setattr(group_offloading, "send_to_device", _send_to_device, raising=False)


@pytest.mark.parametrize("order", ["patch_then_offload", "offload_then_patch"])
@pytest.mark.parametrize("level", ["block_level", "leaf_level"])
def test_group_offload_cpu(level, order, monkeypatch, offload_ready):
    base = flux_model()
    with torch.no_grad():
        expected = base(**inputs(500), return_dict=False)[0]
    model = copy.deepcopy(base)
    kw = dict(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=level)
    if level == "block_level":
        kw["num_blocks_per_group"] = 1
    if order == "patch_then_offload":
        patch(model)
        model.enable_group_offload(**kw)
    else:
        model.enable_group_offload(**kw)
        patch(model)
    calls = count_hook_calls(model, "group_offloading")
    ran = Counts(monkeypatch)
    with torch.no_grad():
        for _ in range(2):
            out = model(**inputs(500), return_dict=False)[0]
            assert close(out, expected)
    blocks = CFG["num_layers"] + CFG["num_single_layers"]
    # every group's hook entered on each forward: its weights were onloaded before anything read them
    # (leaf level: the QK-norms' hooks too, as the patched blocks call the attention modules then)
    missed = {n: c for n, c in calls.items() if c < 2}
    assert not missed, f"group-offloading hooks not entered on every forward: {missed}"
    assert any(n.endswith("attn.norm_q") for n in calls) == (level == "leaf_level")
    assert ran.n == 2 * blocks


def test_layerwise_casting_patched():
    """Layerwise casting (hooks on the Linear layers, which the patched blocks call as modules)."""
    base = flux_model()
    ref, model = copy.deepcopy(base), patch(copy.deepcopy(base))
    for m in (ref, model):
        m.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    with torch.no_grad():
        assert close(model(**inputs(500), return_dict=False)[0], ref(**inputs(500), return_dict=False)[0])


def test_unpatch_beneath_block_hooks(monkeypatch):
    """patch under existing block hooks, then unpatch: the class forward is back under the hooks."""
    model = flux_model()
    model.enable_cache(_fbc(None))
    patch(model)
    block = model.transformer_blocks[1]
    reg = HookRegistry.check_if_exists_or_initialize(block)
    ref = reg._fn_refs[0]
    inner = ref.original_forward if ref.original_forward is not None else ref.forward
    assert getattr(inner, "func", None) is not None, "ditfast's forward should sit beneath the cache hook"
    unpatch(model)
    inner = ref.original_forward if ref.original_forward is not None else ref.forward
    assert getattr(inner, "__func__", None) is type(block).forward
    ran = Counts(monkeypatch)
    with torch.no_grad(), model.cache_context("cond"):
        model(**inputs(500), return_dict=False)
    assert ran.n == 0


# ---- SD3 / DiT blocks ------------------------------------------------------------------------------
SD3_CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=3,
               joint_attention_dim=12, caption_projection_dim=24, pooled_projection_dim=10, out_channels=4,
               pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))


def _sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**SD3_CFG)
    return randomize_(model, 0).eval()


def _sd3_inputs(t: int):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
                pooled_projections=torch.randn(2, 10, generator=g), timestep=torch.full((2,), float(t)))


def test_sd3_attention_cache_on_patched_model(monkeypatch):
    """PAB hooks on SD3's attention modules (attn and SD3.5's attn2): the patched model gives the
    unpatched cached outputs, the hooks run on every step, and the blocks fall back to diffusers."""
    from diffusers.hooks import apply_pyramid_attention_broadcast

    base = _sd3()
    runs = []
    for patched in (False, True):
        model, clock = copy.deepcopy(base), {"t": TIMESTEPS[0]}
        if patched:
            patch(model)
        apply_pyramid_attention_broadcast(model, _pab(clock))  # SD3's model has no enable_cache
        calls = count_hook_calls(model, "pyramid_attention_broadcast")
        outs = []
        with torch.no_grad():
            for t in TIMESTEPS:
                clock["t"] = t
                outs.append(model(**_sd3_inputs(t), return_dict=False)[0])
        assert all(n == len(TIMESTEPS) for n in calls.values()), calls
        runs.append(outs)
    for i, (g, e) in enumerate(zip(runs[1], runs[0])):
        assert close(g, e), f"step {i}: {(g - e).abs().max().item():.3g}"


def test_context_parallel_model_refuses_blocks_without_cp_processor():
    """On a model running diffusers' context parallelism, patch refuses blocks whose attention
    processor has no context-parallel config (SD3's JointAttnProcessor2_0): neither diffusers nor
    ditfast could attend across the ranks there. FLUX's processors carry the config: accepted."""
    import types

    from ditfast.integrations import UnsupportedModelError

    cp = types.SimpleNamespace(context_parallel_config=object())
    sd3 = _sd3()
    sd3._parallel_config = cp
    with pytest.raises(UnsupportedModelError, match="no context-parallel config"):
        patch(sd3)
    flux = flux_model()
    flux._parallel_config = cp
    for m in flux.modules():
        if hasattr(getattr(m, "processor", None), "_parallel_config"):
            m.processor._parallel_config = cp
    patch(flux)  # accepted
    assert ditfast.integrations.is_patched(flux)
