"""Small, awkwardly sized block configurations shared by the block-level tests.

Each case builds a block with every parameter randomized (not left at zero/one init) and its inputs;
sizes are not powers of two (D 72 / 80 / 120, Dh 24 / 40, L 7 / 9 / 5) but small enough for the
Triton interpreter.
"""
from __future__ import annotations

import copy

import torch

from ditfast import ops
from ditfast.nn import DiTBlock, DoubleStreamBlock, FinalLayer, JointBlock, LastLayer, SingleStreamBlock

B = 2


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("scale" in name.split(".")[-1] or name.endswith("ln_q.weight") or name.endswith("ln_k.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))  # norm weights around 1
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 16
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return module


def _rope(L_txt, L_img, axes):
    ids = torch.zeros(L_txt + L_img, len(axes))
    ids[L_txt:, 1] = torch.arange(L_img) // 3
    ids[L_txt:, 2] = torch.arange(L_img) % 3
    return ops.rope_freqs(ids, axes)


def _dit():
    return DiTBlock(72, 3), lambda: (torch.randn(B, 7, 72), torch.randn(B, 72)), None


def _final():
    return FinalLayer(72, 2, 5), lambda: (torch.randn(B, 7, 72), torch.randn(B, 72)), None


def _double():
    rope = _rope(5, 9, (8, 16, 16))
    return DoubleStreamBlock(80, 2), lambda: (torch.randn(B, 9, 80), torch.randn(B, 5, 80), torch.randn(B, 80)), rope


def _single():
    rope = _rope(5, 9, (8, 16, 16))
    return SingleStreamBlock(80, 2), lambda: (torch.randn(B, 14, 80), torch.randn(B, 80)), rope


def _last():
    return LastLayer(80, 2, 3), lambda: (torch.randn(B, 9, 80), torch.randn(B, 80)), None


def _joint(**kw):
    def make():
        return JointBlock(72, 3, **kw), lambda: (torch.randn(B, 5, 72), torch.randn(B, 9, 72), torch.randn(B, 72)), None
    return make


CASES = {
    "dit": _dit,
    "final_layer": _final,
    "flux_double": _double,
    "flux_single": _single,
    "flux_last": _last,
    "sd3_joint": _joint(),
    "sd35_joint_qknorm": _joint(qk_norm="rms"),
    "sd35_joint_dual": _joint(qk_norm="rms", x_block_self_attn=True),
    "sd3_joint_pre_only": _joint(qk_norm="rms", pre_only=True),
}


def build(case: str, seed: int = 0):
    """(block fp32, inputs fp32, rope or None) for a case; deterministic in ``seed``."""
    torch.manual_seed(seed)
    block, make_inputs, rope = CASES[case]()
    randomize(block, seed)
    return block, make_inputs(), rope


def call(block, inputs, rope):
    """Run the block; returns a tuple of its (non-None) outputs."""
    args = list(inputs)
    if rope is not None:
        args.append(rope)
    out = block(*args)
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o for o in out if o is not None)


def variant(block, inputs, dtype, device):
    """A copy of block and leaf inputs in ``dtype`` on ``device`` (inputs require grad)."""
    b = copy.deepcopy(block).to(device=device, dtype=dtype)
    xs = tuple(t.detach().to(device=device, dtype=dtype).requires_grad_(True) for t in inputs)
    return b, xs
