"""The packed-qkv check: a projection whose output is [q | k | v] must be split into heads only
when its width is 3 * num_heads * head_dim and, when its weight is a DTensor, only when the weight
is sharded so each rank holds [q_r | k_r | v_r] (ditfast.parallel.tensor_parallel's layout).

Light to import (no torch.distributed import): the blocks can call it on every forward.
"""
from __future__ import annotations

from typing import Optional

import torch

from .guard import is_dtensor

__all__ = ["check_qkv_heads"]


def check_qkv_heads(width: int, num_heads: int, head_dim: int, weight: Optional[torch.Tensor] = None,
                    *, name: str = "qkv") -> None:
    """Raise ValueError unless a packed [q | k | v] projection output of ``width`` features holds
    ``num_heads`` heads of ``head_dim`` each (``num_heads``: the heads this process computes, the
    local count under tensor parallelism), and unless ``weight`` (the projection's weight, optional)
    is a DTensor split contiguously over its output rows, which gives each rank a slice that straddles
    q, k and v."""
    if width != 3 * num_heads * head_dim:
        hint = ""
        if width * 2 == 3 * num_heads * head_dim or (width < 3 * num_heads * head_dim and
                                                    (3 * num_heads * head_dim) % width == 0):
            hint = (" (a fraction of the full width: the projection looks column-sharded while num_heads is "
                    "the global head count; use ditfast.parallel.tensor_parallel(model, mesh), which splits "
                    "[q | k | v] per rank and sets the local head count)")
        raise ValueError(
            f"{name}: the packed projection output has {width} features, expected 3 * num_heads * head_dim = "
            f"3 * {num_heads} * {head_dim} = {3 * num_heads * head_dim}{hint}"
        )
    if weight is not None and is_dtensor(weight):
        from torch.distributed.tensor import Shard

        if any(type(p) is Shard and p.dim in (0, -2) for p in weight.placements):
            raise ValueError(
                f"{name}: the packed [q | k | v] weight is a DTensor sharded contiguously over its output rows "
                f"({weight.placements}), so each rank holds a slice straddling q, k and v, not its heads' "
                "[q_r | k_r | v_r]; shard it with ditfast.parallel.tensor_parallel(model, mesh) (a plain "
                "ColwiseParallel is wrong for a packed projection)"
            )
