"""Helpers for checking a fast path against the reference (the tolerance rule of docs/numerics.md).

The rule, per output tensor: ``max|fast − ref_fp32| ≤ 2 · max|ref_lowp − ref_fp32| + atol``, where
ref_fp32 is the reference run on fp32 copies of the inputs and ref_lowp is the reference run on the
inputs as given (bf16 / fp16 / fp32). The error of plain PyTorch in the low precision is the
yardstick; atol only absorbs fp32 reassociation noise.

A tensor that is a *reduction over many tokens* (a parameter gradient, the gradient of a per-sample
modulation vector) is checked with ``reduced=True``: the same rule applied to the values each path
held before its final rounding to the output dtype, which the test bounds from the rounded outputs
it sees (docs/numerics.md, "Reduced gradients", has the derivation).
"""
from __future__ import annotations

from typing import Callable, Collection, Sequence

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2**-p for a float dtype with p significand bits (the implicit bit counted): bf16 2**-8,
    fp16 2**-11, fp32 2**-24, fp64 2**-53. Round-to-nearest gives |fl(x) − x| ≤ u·|fl(x)| for a
    normal result."""
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return torch.finfo(dtype).eps / 2


def rounding_bound(y: torch.Tensor) -> torch.Tensor:
    """Element-wise bound on |y − x| for y = fl(x), x the value before rounding to y's dtype:
    u·|y| + u·smallest_normal (the second term covers subnormal results, whose spacing is
    2u·smallest_normal). Returned in float64."""
    fi = torch.finfo(y.dtype)
    u = fi.eps / 2
    return u * y.double().abs() + u * fi.smallest_normal


def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if t is not None]


def rule_margin(fast: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor, *, atol: float = 1e-5,
                rtol_scale: bool = True, reduced: bool = False) -> tuple:
    """(err, bound, yard, scale) of the rule for one tensor; the check passes when err <= bound.

    Plain rule: err = max|fast − ref32|, yard = max|ref_lowp − ref32|, bound = 2·yard + atol·scale.
    reduced: err = max(|fast − ref32| − ρ(fast)), yard = max(|ref_lowp − ref32| + ρ(ref_lowp)) with
    ρ = :func:`rounding_bound` -- the rule on the values before each path's final rounding, bounded
    from the rounded outputs. scale = max(1, max|ref32|) with ``rtol_scale``, else 1.
    """
    r = ref32.double()
    if not fast.numel():
        return 0.0, 0.0, 0.0, 1.0
    e = (fast.double() - r).abs().nan_to_num(nan=float("inf"))
    y = (ref_lowp.double() - r).abs()
    if reduced:
        e = e - rounding_bound(fast)
        y = y + rounding_bound(ref_lowp)
    err, yard = e.max().item(), y.max().item()
    scale = max(1.0, r.abs().max().item()) if rtol_scale else 1.0
    return err, 2 * yard + atol * scale, yard, scale


def assert_by_rule(fast, ref32, ref_lowp, *, atol: float = 1e-5, rtol_scale: bool = True, name: str = "out",
                   reduced: bool = False) -> None:
    """Assert the tolerance rule for each tensor of (possibly tuples of) outputs.

    With ``rtol_scale`` the atol is multiplied by ``max(1, max|ref_fp32|)`` so large-magnitude outputs
    (e.g. gradients summed over many tokens) get the same relative slack. ``reduced=True`` for tensors
    that are reductions over many tokens (see the module docstring and docs/numerics.md).
    """
    fast, ref32, ref_lowp = _flat(fast), _flat(ref32), _flat(ref_lowp)
    assert len(fast) == len(ref32) == len(ref_lowp), "output arity differs"
    for i, (f, r, lp) in enumerate(zip(fast, ref32, ref_lowp)):
        assert f.shape == r.shape, f"{name}[{i}]: shape {tuple(f.shape)} != reference {tuple(r.shape)}"
        err, bound, yard, scale = rule_margin(f, r, lp, atol=atol, rtol_scale=rtol_scale, reduced=reduced)
        if reduced:
            detail = f"reduced-gradient bound: max(|err| − ρ(fast)) {err:.3g} > 2·max(|lowp err| + ρ(lowp))"
        else:
            detail = f"max error {err:.3g} > bound"
        assert err <= bound, f"{name}[{i}]: {detail} {bound:.3g} (2·{yard:.3g} + {atol:g}·{scale:.3g})"


def to_fp32(args: Sequence):
    """fp32 leaf copies of the tensor arguments (requires_grad kept); other arguments unchanged."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().float().requires_grad_(a.requires_grad)
        out.append(a)
    return out


def check_op(fast_fn: Callable, ref_fn: Callable, args: Sequence, *, grad_seed: int = 0, atol: float = 1e-5,
             name: str = "op", reduced_args: Collection[int] = ()) -> None:
    """Run fast_fn and ref_fn (in the given precision and in fp32) on ``args`` and compare outputs and
    gradients of every floating tensor argument that requires grad, by the rule.

    reduced_args: indices of arguments whose gradient is a reduction over many tokens (e.g. a (B, D)
    modulation broadcast over L); their gradients are checked with ``reduced=True``."""
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
        assert_by_rule(gf, g3, gl, atol=atol, name=f"{name} grad[arg {i}]", reduced=i in reduced_args)
