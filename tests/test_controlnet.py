"""ditfast.patch on diffusers' ControlNets: FLUX ControlNets (FluxTransformerBlock +
FluxSingleTransformerBlock) and SD3 ControlNets with joint blocks (JointTransformerBlock) patch and
give the unpatched outputs (fp32, CPU); SD3.5 ControlNets, built from SD3SingleTransformerBlock, are
refused with UnsupportedModelError. ``patch(pipe)`` patches ``pipe.transformer`` only: a pipeline's
ControlNet is patched by ``ditfast.patch(pipe.controlnet)`` (README, "Using ditfast with diffusers")."""
import pytest
import torch

import ditfast
from ditfast.integrations.diffusers import UnsupportedModelError

pytest.importorskip("diffusers")
from diffusers import FluxControlNetModel, SD3ControlNetModel  # noqa: E402

from helpers import randomize_  # noqa: E402


def _flat(out):
    return [t for x in out for t in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(t, torch.Tensor)]


def _patched_matches(model, inputs):
    with torch.no_grad():
        want = _flat(model(**inputs, return_dict=False))
        ditfast.patch(model)
        assert ditfast.is_patched(model)
        got = _flat(model(**inputs, return_dict=False))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_flux_controlnet_patches():
    model = randomize_(FluxControlNetModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)), 0).eval()
    g = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), controlnet_cond=torch.randn(1, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), pooled_projections=torch.randn(1, 32, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=torch.cat([torch.zeros(16, 1), grid.float()], 1),
                  txt_ids=torch.zeros(8, 3))
    _patched_matches(model, inputs)


def _sd3_controlnet(**kw):
    return SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, caption_projection_dim=32, pooled_projection_dim=32,
                              out_channels=4, pos_embed_max_size=8, **kw)


def test_sd3_controlnet_patches():
    model = randomize_(_sd3_controlnet(joint_attention_dim=32), 0).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), controlnet_cond=torch.randn(1, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), pooled_projections=torch.randn(1, 32, generator=g),
                  timestep=torch.tensor([500.0]))
    _patched_matches(model, inputs)


def test_sd35_controlnet_is_refused():
    model = _sd3_controlnet(joint_attention_dim=None, use_pos_embed=False)  # SD3.5 ControlNets: SD3SingleTransformerBlock
    with pytest.raises(UnsupportedModelError, match="SD3SingleTransformerBlock"):
        ditfast.patch(model)
    assert not ditfast.is_patched(model)
