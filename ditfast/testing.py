"""Helpers for checking a fast path against the reference (DESIGN.md's tolerance rule).

The rule, per output tensor: ``max|fast − ref_fp32| ≤ 2 · max|ref_lowp − ref_fp32| + atol``, where
ref_fp32 is the reference run on fp32 copies of the inputs and ref_lowp is the reference run on the
inputs as given (bf16 / fp16 / fp32). The error of plain PyTorch in the low precision is the
yardstick; atol only absorbs fp32 reassociation noise.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# fp32 reassociation noise, relative to the output's magnitude.
DEFAULT_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if t is not None]


def assert_by_rule(fast, ref32, ref_lowp, *, atol: float = 1e-5, rtol_scale: bool = True, name: str = "out") -> None:
    """Assert DESIGN.md's rule for each tensor of (possibly tuples of) outputs.

    With ``rtol_scale`` the atol is multiplied by ``max(1, max|ref_fp32|)`` so large-magnitude outputs
    (e.g. gradients summed over many tokens) get the same relative slack.
    """
    fast, ref32, ref_lowp = _flat(fast), _flat(ref32), _flat(ref_lowp)
    assert len(fast) == len(ref32) == len(ref_lowp), "output arity differs"
    for i, (f, r, lp) in enumerate(zip(fast, ref32, ref_lowp)):
        assert f.shape == r.shape, f"{name}[{i}]: shape {tuple(f.shape)} != reference {tuple(r.shape)}"
        r = r.double()
        err = (f.double() - r).abs().nan_to_num(nan=float("inf")).max().item() if f.numel() else 0.0
        yard = (lp.double() - r).abs().max().item() if lp.numel() else 0.0
        scale = max(1.0, r.abs().max().item()) if (rtol_scale and r.numel()) else 1.0
        bound = 2 * yard + atol * scale
        assert err <= bound, f"{name}[{i}]: max error {err:.3g} > bound {bound:.3g} (2·{yard:.3g} + {atol:g}·{scale:.3g})"


def to_fp32(args: Sequence):
    """fp32 leaf copies of the tensor arguments (requires_grad kept); other arguments unchanged."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().float().requires_grad_(a.requires_grad)
        out.append(a)
    return out


def check_op(fast_fn: Callable, ref_fn: Callable, args: Sequence, *, grad_seed: int = 0, atol: float = 1e-5,
             name: str = "op") -> None:
    """Run fast_fn and ref_fn (in the given precision and in fp32) on ``args`` and compare outputs and
    gradients of every floating tensor argument that requires grad, by the rule."""
    def leaves(xs):
        return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in xs]

    a_fast, a_low, a_32 = leaves(args), leaves(args), to_fp32(args)
    out_fast, out_low, out_32 = fast_fn(*a_fast), ref_fn(*a_low), ref_fn(*a_32)
    assert_by_rule(out_fast, out_32, out_low, atol=atol, name=f"{name} forward")
    for f, lp in zip(_flat(out_fast), _flat(out_low)):
        assert f.dtype == lp.dtype, f"{name}: output dtype {f.dtype} != reference {lp.dtype}"

    grad_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if not grad_args:
        return
    g = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float32) for o in _flat(out_32)]

    def backward(outs, inputs):
        outs = _flat(outs)
        gs = [gr.to(o.device, o.dtype) for gr, o in zip(grads, outs)]
        return torch.autograd.grad(outs, [inputs[i] for i in grad_args], gs, allow_unused=True)

    g_fast, g_low, g_32 = backward(out_fast, a_fast), backward(out_low, a_low), backward(out_32, a_32)
    for i, gf, gl, g3 in zip(grad_args, g_fast, g_low, g_32):
        assert gf is not None, f"{name}: no gradient for argument {i}"
        assert gf.dtype == args[i].dtype, f"{name}: grad of argument {i} has dtype {gf.dtype}, input {args[i].dtype}"
        assert_by_rule(gf, g3, gl, atol=atol, name=f"{name} grad[arg {i}]")
