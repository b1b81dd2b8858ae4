"""Cheap checks the ops run on their inputs for DTensor use (no torch.distributed import here).

``dtensor_inputs(op, **tensors)`` returns whether the call has DTensor inputs. When it has, it makes
sure ditfast's sharding rules are registered (ditfast.parallel.sharding) and that *every* tensor
input is a DTensor: a mix raises a TypeError that names the plain tensors and says how to wrap
them. When torch.distributed.tensor was never imported no tensor can be a DTensor, and the check
is one dict lookup.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

__all__ = ["dtensor_inputs", "is_dtensor"]


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
