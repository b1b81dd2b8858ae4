"""Helpers shared by the fp32 equivalence tests of blocks and models (test_blocks.py,
test_blocks_diffusers.py, test_models.py): seeded random parameters and inputs, and the
``max|ours - ref| <= RTOL * max(1, max|ref|)`` comparison those tests use."""
from __future__ import annotations

import torch

RTOL = 1e-5


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every trainable parameter with seeded random values of a sensible scale, so nothing
    stays at its (often zero) initial value: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.3²),
    other vectors (biases) N(0, 0.3²). Frozen parameters (DiT's fixed sin-cos ``pos_embed``) keep
    their values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(r / p[0].numel() ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.3 * r)
            else:
                p.copy_(0.3 * r)
    return module


def rand(*shape, seed: int, grad: bool = False) -> torch.Tensor:
    """A seeded standard-normal fp32 tensor (a leaf that requires grad when ``grad``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).requires_grad_(grad)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str = "out") -> None:
    """Same shape, and max |ours - ref| <= RTOL * max(1, max |ref|) (computed in fp64)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = (ours.double() - ref.double()).abs().max().item()
    bound = RTOL * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"
