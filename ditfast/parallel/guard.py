"""Cheap checks the ops run on their inputs for DTensor use (no torch.distributed import here).

``dtensor_inputs(op, **tensors)`` returns whether the call has DTensor inputs. When it has, it makes
sure ditfast's sharding rules are registered (ditfast.parallel.sharding) and that *every* tensor
input is a DTensor: a mix raises a TypeError that names the plain tensors and says how to wrap
them. When torch.distributed.tensor was never imported no tensor can be a DTensor, and the check
is one dict lookup.

``dtensor_outputs(outputs)`` is for the outputs of a multi-output op called on DTensors: when the
loss uses only some of them, autograd hands the op's backward formula a *plain* zero tensor (of the
global shape) as the gradient of each unused output (torch's InputMetadata::zeros_like keeps no
tensor subclass; torch 2.14), and the backward op then refuses the mix of plain tensors and
DTensors ("got mixed torch.Tensor and DTensor"). It turns that materialization off for the op's
autograd node, so the formula sees None, which the formulas of every op that calls it handle (the
gradient is passed on as absent, or zeros of the DTensor kind are made); an op added here must too
(tests/test_parallel_dtensor.py::test_unused_outputs_on_dtensor runs every subset of the outputs).
A node pre-hook cannot do it: autograd refuses to replace a None gradient. ops.prepare_attention
needs none of this: on DTensors it runs on the local shards (ditfast/parallel/local.py).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

__all__ = ["dtensor_inputs", "dtensor_outputs", "is_dtensor"]


def is_dtensor(t) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def dtensor_inputs(op: str, **tensors: Optional[torch.Tensor]) -> bool:
    """True when the tensors are DTensors (rules registered); False when none is; TypeError on a mix."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None:
        return False
    present = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    dt = [k for k, t in present.items() if isinstance(t, mod.DTensor)]
    if not dt:
        return False
    plain = [k for k in present if k not in dt]
    if plain:
        raise TypeError(
            f"ditfast.ops.{op}: {', '.join(dt)} {'is a DTensor' if len(dt) == 1 else 'are DTensors'} but "
            f"{', '.join(plain)} {'is a plain torch.Tensor' if len(plain) == 1 else 'are plain torch.Tensors'}; "
            "give every tensor argument as a DTensor on the same mesh: wrap a tensor every rank holds "
            "in full with DTensor.from_local(t, mesh, [Replicate()]) (or distribute_tensor(t, mesh, "
            "[Replicate()]) / [Shard(dim)] to split it), or pass all of them as local tensors "
            "(DTensor.to_local())"
        )
    from . import sharding

    sharding.register()
    return True


def dtensor_outputs(outputs):
    """``outputs`` (the tuple a multi-output ditfast op returned for DTensor inputs), as they are.
    Where two or more of them come from one custom-op autograd node, that node is told not to
    materialize the gradients of unused outputs (``set_materialize_grads(False)``): its backward
    formula then gets None for them and passes it on as "no gradient" (the backward ops take
    optional output gradients) or makes zeros of the DTensor kind (``zeros_like`` of a saved
    DTensor), instead of the plain global-shape zeros autograd would make (module docstring).
    Nothing is changed for plain tensors, for nodes of ATen ops (the reference backend: their
    formulas take undefined gradients), without grad mode, or under torch.compile (AOTAutograd makes
    the backward's tangents itself)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return outputs
    seen = {}
    for o in outputs:
        node = o.grad_fn if is_dtensor(o) else None
        if node is not None:
            n = seen.setdefault(id(node), [node, 0])
            n[1] += 1
    for node, count in seen.values():
        if count > 1 and hasattr(node, "set_materialize_grads"):  # a custom op's (Python) autograd node
            node.set_materialize_grads(False)
    return outputs
