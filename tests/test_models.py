"""Whole models (ditfast.nn.models) against diffusers' models, state-dict round trips, factory sizes.

Tiny random configs in fp32 on CPU (ditfast on the reference backend). Every diffusers parameter is
randomized with a seeded generator, its state dict converted with ``ditfast.convert`` (diffusers ->
original names) and loaded with ``strict=True``. Outputs must agree within
``1e-5 * max(1, max|diffusers|)``. Full-size configs are only built on the meta device.
"""
from __future__ import annotations

import pytest
import torch

import ditfast
from ditfast import convert
from ditfast.nn.models import DIT_CONFIGS, DiT, Flux, MMDiT, dit_models, flux_models, mmdit_models
from ditfast.nn.models.dit import timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402

from helpers import assert_close, rand, randomize_  # noqa: E402

def assert_round_trip(model: torch.nn.Module, make, to_diffusers, to_orig, *inputs):
    """original -> diffusers -> original is bit-exact, and loads strictly into a fresh model."""
    sd = model.state_dict()
    back = to_orig(to_diffusers(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    fresh = make()
    fresh.load_state_dict(back, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), model(*inputs))


@pytest.fixture(autouse=True)
def _reference_backend():
    with ditfast.use_backend("reference"):
        yield


# ---------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------
DIT_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=2, num_heads=3, num_classes=10)


def _diffusers_dit(seed: int, *, original_timestep: bool = True):
    ref = DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=24, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_eps=1e-6)  # the original DiT's LayerNorm eps (diffusers' default is 1e-5)
    randomize_(ref, seed).eval()
    blocks = ref.transformer_blocks
    for b in blocks[1:]:  # diffusers duplicates the shared embedders into every block
        b.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    if original_timestep:
        for b in blocks:
            # diffusers' DiT uses downscale_freq_shift=1 (frequencies exp(-ln(1e4)·j/(half-1)));
            # the original DiT divides by half: set the shift to 0 to compare everything else.
            b.norm1.emb.time_proj.downscale_freq_shift = 0
    return ref


def test_dit_matches_diffusers():
    ref = _diffusers_dit(seed=1)
    ours = DiT(**DIT_TINY)
    ours.load_state_dict(convert.diffusers_to_dit(ref.state_dict(), input_size=8), strict=True)
    ours.eval()
    x, t, y = rand(3, 4, 8, 8, seed=2), torch.tensor([0, 417, 999]), torch.tensor([3, 10, 7])  # 10 = null label
    with torch.no_grad():
        out = ours(x, t, y)
        expected = ref(x, timestep=t, class_labels=y).sample
    assert out.shape == (3, 8, 8, 8)
    assert_close(out, expected)


def test_diffusers_dit_timestep_embedding_differs_from_original():
    """Documents a diffusers deviation: its DiT timestep frequencies use half-1, not half."""
    t = torch.tensor([1.0, 250.0, 999.0])
    emb = _diffusers_dit(seed=3, original_timestep=False).transformer_blocks[0].norm1.emb.time_proj(t)
    ours = timestep_embedding(t, 256)
    assert (emb - ours).abs().max() > 1e-2
    half = torch.arange(128.0)
    f = torch.exp(-torch.log(torch.tensor(10000.0)) * half / 127)  # shift 1
    assert torch.allclose(emb, torch.cat((torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)), 1), atol=1e-4)


def test_dit_pos_embed_matches_upstream_table():
    ours = DiT(**DIT_TINY).pos_embed[0]
    ref = get_2d_sincos_pos_embed(72, 4, base_size=4, output_type="pt").float()
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    assert not DiT(**DIT_TINY).pos_embed.requires_grad


def test_dit_round_trip_and_cfg():
    model = randomize_(DiT(**DIT_TINY), seed=4).eval()
    x, t, y = rand(2, 4, 8, 8, seed=5), torch.tensor([5, 600]), torch.tensor([1, 2])
    assert_round_trip(model, lambda: DiT(**DIT_TINY).eval(), convert.dit_to_diffusers,
                      lambda sd: convert.diffusers_to_dit(sd, input_size=8), x, t, y)
    # forward_with_cfg: first half conditional, second half null labels; guided = u + s (c - u)
    xx, tt, yy = torch.cat((x[:1], x[:1])), torch.tensor([300, 300]), torch.tensor([4, 10])
    with torch.no_grad():
        out = model(xx, tt, yy)
        for ch, n in ((3, 3), (None, 4)):
            g = model.forward_with_cfg(xx, tt, yy, 4.0, cfg_channels=ch)
            guided = out[1, :n] + 4.0 * (out[0, :n] - out[1, :n])
            assert torch.allclose(g[0, :n], guided, atol=1e-5) and torch.allclose(g[1, :n], guided, atol=1e-5)
            assert torch.equal(g[:, n:], out[:, n:])


def test_dit_initialization_is_adaln_zero():
    model = DiT(**DIT_TINY)
    x, t, y = rand(2, 4, 8, 8, seed=6), torch.tensor([1, 2]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), torch.zeros(2, 8, 8, 8))  # zeroed final layer
    assert all(b.adaLN_modulation[1].weight.abs().sum() == 0 for b in model.blocks)


# ---------------------------------------------------------------------------------------------
# SD3 / SD3.5
# ---------------------------------------------------------------------------------------------
SD3_CASES = [  # (qk_norm, dual-attention layers): SD3-medium, SD3.5-large, SD3.5-medium shapes
    pytest.param(None, (), id="sd3-medium"),
    pytest.param("rms", (), id="sd3.5-large"),
    pytest.param("rms", (0, 1), id="sd3.5-medium"),
]


def _sd3_pair(qk_norm, dual, seed):
    ref = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                                num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=48,
                                pooled_projection_dim=12, out_channels=4, pos_embed_max_size=12,
                                dual_attention_layers=dual, qk_norm="rms_norm" if qk_norm else None)
    make = lambda: MMDiT(3, hidden_size=48, num_heads=3, patch_size=2, in_channels=4, out_channels=4,  # noqa: E731
                         adm_in_channels=12, context_dim=20, pos_embed_max_size=12, qk_norm=qk_norm,
                         x_block_self_attn_layers=dual, sample_size=16)
    return ref, make


@pytest.mark.parametrize("qk_norm,dual", SD3_CASES)
def test_mmdit_matches_diffusers(qk_norm, dual):
    ref, make = _sd3_pair(qk_norm, dual, seed=7)
    ours = make()
    # the initial position table already equals diffusers' (before randomization)
    assert torch.allclose(ours.pos_embed, ref.pos_embed.pos_embed, atol=1e-6, rtol=0)
    randomize_(ref, seed=7).eval()
    ref.pos_embed.pos_embed.copy_(rand(*ref.pos_embed.pos_embed.shape, seed=8))  # a buffer: randomize too
    ours.load_state_dict(convert.diffusers_to_sd3(ref.state_dict()), strict=True)
    # a non-square latent (5 x 7 patches) inside the 12 x 12 table exercises the center crop
    x, t = rand(2, 4, 10, 14, seed=9), torch.tensor([3.0, 871.5])
    y, ctx = rand(2, 12, seed=10), rand(2, 7, 20, seed=11)
    with torch.no_grad():
        out = ours(x, t, y, ctx)
        expected = ref(x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    assert out.shape == (2, 4, 10, 14)
    assert_close(out, expected)


@pytest.mark.parametrize("qk_norm,dual", SD3_CASES)
def test_mmdit_round_trip(qk_norm, dual):
    _, make = _sd3_pair(qk_norm, dual, seed=12)
    model = randomize_(make(), seed=12)
    x, t, y, ctx = rand(1, 4, 8, 8, seed=13), torch.tensor([500.0]), rand(1, 12, seed=14), rand(1, 5, 20, seed=15)
    assert_round_trip(model, make, convert.sd3_to_diffusers, convert.diffusers_to_sd3, x, t, y, ctx)
    # the last block is pre-only, the dual-attention blocks have attn2
    sd = model.state_dict()
    assert "joint_blocks.2.context_block.attn.proj.weight" not in sd
    assert "joint_blocks.1.context_block.attn.proj.weight" in sd
    assert ("joint_blocks.0.x_block.attn2.qkv.weight" in sd) == bool(dual)
    assert "joint_blocks.2.x_block.attn2.qkv.weight" not in sd
    # single-file checkpoints carry a "model.diffusion_model." prefix; it is stripped
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    assert convert.sd3_to_diffusers(prefixed).keys() == convert.sd3_to_diffusers(sd).keys()


def test_mmdit_crop_rejects_oversized_latent():
    _, make = _sd3_pair(None, (), seed=0)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        make()(rand(1, 4, 26, 8, seed=0), torch.tensor([1.0]), rand(1, 12, seed=0), rand(1, 3, 20, seed=0))


# ---------------------------------------------------------------------------------------------
# FLUX
# ---------------------------------------------------------------------------------------------
def _flux_pair(guidance: bool):
    ref = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                 attention_head_dim=40, num_attention_heads=2, joint_attention_dim=24,
                                 pooled_projection_dim=12, guidance_embeds=guidance, axes_dims_rope=(8, 16, 16))
    make = lambda: Flux(in_channels=16, vec_in_dim=12, context_in_dim=24, hidden_size=80, num_heads=2,  # noqa: E731
                        depth=2, depth_single_blocks=2, axes_dim=(8, 16, 16), guidance_embed=guidance)
    return ref, make


def _flux_inputs(batch=2, n_txt=7, grid=(4, 6)):
    h, w = grid
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(img=rand(batch, h * w, 16, seed=20), img_ids=img_ids.reshape(h * w, 3),
                txt=rand(batch, n_txt, 24, seed=21), txt_ids=torch.zeros(n_txt, 3),
                timesteps=torch.tensor([0.25, 0.9])[:batch], y=rand(batch, 12, seed=22),
                guidance=torch.tensor([3.5, 1.0])[:batch])


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_matches_diffusers(guidance):
    ref, make = _flux_pair(guidance)
    randomize_(ref, seed=23).eval()
    ours = make()
    ours.load_state_dict(convert.diffusers_to_flux(ref.state_dict()), strict=True)
    a = _flux_inputs()
    with torch.no_grad():
        expected = ref(hidden_states=a["img"], encoder_hidden_states=a["txt"], pooled_projections=a["y"],
                       timestep=a["timesteps"], img_ids=a["img_ids"], txt_ids=a["txt_ids"],
                       guidance=a["guidance"] if guidance else None).sample
        out = ours(a["img"], a["img_ids"], a["txt"], a["txt_ids"], a["timesteps"], a["y"],
                   a["guidance"] if guidance else None)
        # upstream FLUX passes batched ids (N, L, 3): same result
        out_batched = ours(a["img"], a["img_ids"].expand(2, -1, -1), a["txt"], a["txt_ids"].expand(2, -1, -1),
                           a["timesteps"], a["y"], a["guidance"] if guidance else None)
    assert out.shape == (2, 24, 16)
    assert_close(out, expected)
    assert_close(out_batched, expected, "batched ids")


def test_flux_rope_computed_once_per_forward(monkeypatch):
    _, make = _flux_pair(True)
    model = randomize_(make(), seed=24)
    calls = []
    real = ditfast.ops.rope_freqs

    def counting(*args, **kw):
        out = real(*args, **kw)
        calls.append(out)
        return out

    monkeypatch.setattr(ditfast.ops, "rope_freqs", counting)
    seen = set()
    for blk in list(model.double_blocks) + list(model.single_blocks):
        blk.register_forward_pre_hook(lambda m, args: seen.add(id(args[-1][0])))
    a = _flux_inputs()
    with torch.no_grad():
        model(**a)
    assert len(calls) == 1
    assert seen == {id(calls[0][0])}  # every block got the very same cos table


def test_flux_round_trip_and_guidance_required():
    _, make = _flux_pair(True)
    model = randomize_(make(), seed=25)
    a = _flux_inputs(batch=1)
    args = (a["img"], a["img_ids"], a["txt"], a["txt_ids"], a["timesteps"], a["y"], a["guidance"])
    assert_round_trip(model, make, convert.flux_to_diffusers, convert.diffusers_to_flux, *args)
    with pytest.raises(ValueError, match="guidance"):
        model(*args[:-1])
    assert not any(k.startswith("guidance_in") for k in _flux_pair(False)[1]().state_dict())


# ---------------------------------------------------------------------------------------------
# Factory configs: documented sizes, checked on the meta device (nothing allocated)
# ---------------------------------------------------------------------------------------------
def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_dit_factories():
    assert len(DIT_CONFIGS) == 12 and set(dit_models) == set(DIT_CONFIGS)
    expect = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
    with torch.device("meta"):
        for size, (depth, D, heads) in expect.items():
            for p in (2, 4, 8):
                m = dit_models[f"DiT-{size}/{p}"]()
                assert len(m.blocks) == depth and m.blocks[0].attn.num_heads == heads
                assert m.pos_embed.shape == (1, (32 // p) ** 2, D)
                assert m.x_embedder.proj.weight.shape == (D, 4, p, p)
                assert m.final_layer.linear.weight.shape == (p * p * 8, D)  # learn_sigma: 2·4 channels
                assert m.y_embedder.embedding_table.weight.shape == (1001, D)
        xl = DiT.from_config("DiT-XL/2")
        assert sum(p.numel() for p in xl.parameters()) == 675_129_632  # DiT-XL/2's published count
        # the same sizes as diffusers' DiTTransformer2DModel defaults (DiT-XL/2 256px)
        ref = DiTTransformer2DModel(out_channels=8, norm_eps=1e-6)
    conv = convert.diffusers_to_dit(ref.state_dict(), input_size=32)
    assert _shapes(conv) == _shapes(xl.state_dict())


@pytest.mark.parametrize("name,diffusers_cfg", [
    ("sd3-medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                        pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)),
    ("sd3.5-medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                          pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    ("sd3.5-large", dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm")),
])
def test_mmdit_factories(name, diffusers_cfg):
    with torch.device("meta"):
        m = mmdit_models[name]()
        ref = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64,
                                    joint_attention_dim=4096, pooled_projection_dim=2048, out_channels=16,
                                    **diffusers_cfg)
    D, depth = diffusers_cfg["caption_projection_dim"], diffusers_cfg["num_layers"]
    assert m.hidden_size == D and len(m.joint_blocks) == depth
    assert m.joint_blocks[-1].pre_only and not m.joint_blocks[-2].pre_only
    assert m.pos_embed.shape == (1, diffusers_cfg["pos_embed_max_size"] ** 2, D)
    assert _shapes(convert.diffusers_to_sd3(ref.state_dict())) == _shapes(m.state_dict())
    assert MMDiT.from_config(name, depth=2, hidden_size=64, num_heads=1, pos_embed_max_size=4).hidden_size == 64


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_flux_factories(name):
    dev = name == "flux-dev"
    with torch.device("meta"):
        m = flux_models[name]()
        ref = FluxTransformer2DModel(guidance_embeds=dev)  # diffusers' defaults are FLUX.1's sizes
    assert len(m.double_blocks) == 19 and len(m.single_blocks) == 38
    assert m.img_in.weight.shape == (3072, 64) and m.txt_in.weight.shape == (3072, 4096)
    assert m.single_blocks[0].linear1.weight.shape == (3 * 3072 + 12288, 3072)
    assert m.final_layer.linear.weight.shape == (64, 3072)
    assert _shapes(convert.diffusers_to_flux(ref.state_dict())) == _shapes(m.state_dict())
    if dev:
        assert sum(p.numel() for p in m.parameters()) == 11_901_408_320  # FLUX.1 [dev]'s count
    assert m.guidance_embed is dev


def test_unknown_config_names():
    for factory in (DiT.from_config, MMDiT.from_config, Flux.from_config):
        with pytest.raises(KeyError, match="unknown"):
            factory("no-such-model")
