"""Tensor parallelism for ditfast.nn models (Megatron-style, over a 1-D device mesh).

``tensor_parallel(model, mesh)`` splits, in place, every ditfast.nn attention and MLP of ``model``
across the ``mesh.size()`` ranks; everything else stays replicated (a plain tensor every rank
holds in full). Per block stream: one all-reduce after the attention's output projection and one
after the MLP, forward and backward.

* Packed ``qkv`` Linear (output rows [q | k | v], each num_heads * head_dim): sharded so rank r holds
  the rows of its heads of q, k and v, [q_r | k_r | v_r]: DTensor's ``_StridedShard(0, split_factor=3)``
  placement, under which ``full_tensor()`` / a gathered state_dict is the original layout. A plain
  ``ColwiseParallel`` would give rank r a contiguous row slice, which straddles q and k: the head
  split misreads it (``check_qkv_heads`` detects both the width and that placement). The module's
  ``num_heads`` becomes the local head count; its input is all-reduced in backward.
* ``proj`` (attention output): ``RowwiseParallel`` (input sharded over heads, output all-reduced).
* MLP: ``fc1`` / ``Sequential[0]`` ``ColwiseParallel``, ``fc2`` / ``Sequential[2]`` ``RowwiseParallel``.
* adaLN modulation Linears, norms, final layers: replicated, untouched. Their gradients are complete
  on every rank (they see the full activations and full activation gradients).
* Per-head QK-RMSNorm weights (Dh,): replicated; each rank's gradient covers its heads only, so a
  gradient hook all-reduces (sums) it over the mesh.

FLUX's SingleStreamBlock is refused with NotImplementedError: its ``linear1`` packs
[q | k | v | mlp] of unequal widths and ``linear2`` reads [attn | mlp]; splitting them needs an
uneven strided layout DTensor has no placement for.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from . import sharding

__all__ = ["tensor_parallel", "tp_plan", "packed_qkv_placement"]


def packed_qkv_placement(chunks: int = 3):
    """The placement of a packed [q | k | v] weight's output rows: rank r holds chunk r of each part."""
    return _StridedShard(0, split_factor=chunks)


def _shard_packed_linear(lin: nn.Linear, mesh, chunks: int = 3) -> None:
    pl = [packed_qkv_placement(chunks)]
    for name, p in list(lin.named_parameters(recurse=False)):
        lin.register_parameter(name, nn.Parameter(distribute_tensor(p.detach(), mesh, pl),
                                                  requires_grad=p.requires_grad))

    def to_dtensor(mod, args):  # input: the same full tensor on every rank (its grad all-reduced)
        x = args[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return (x,) + tuple(args[1:])

    def to_local(mod, args, out):  # output: this rank's [q_r | k_r | v_r] as a plain tensor
        return out.to_local() if isinstance(out, DTensor) else out

    lin.register_forward_pre_hook(to_dtensor)
    lin.register_forward_hook(to_local)


def _allreduce_grad_hook(group):
    def hook(g):
        g = g.clone()
        dist.all_reduce(g, group=group)
        return g
    return hook


def _is_flux_mlp(m: nn.Module) -> bool:
    return (isinstance(m, nn.Sequential) and len(m) == 3 and isinstance(m[0], nn.Linear)
            and isinstance(m[1], nn.GELU) and isinstance(m[2], nn.Linear))


def tp_plan(model: nn.Module) -> List[str]:
    """What :func:`tensor_parallel` does to ``model``, one line per module (for logging / tests)."""
    plan = []
    for name, m in model.named_modules():
        if _is_single_stream(m):
            plan.append(f"{name}: refused (FLUX single-stream block)")
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads"):
            plan.append(f"{name}.qkv: packed colwise [q_r|k_r|v_r]; {name}.num_heads local")
            if isinstance(getattr(m, "proj", None), nn.Linear):
                plan.append(f"{name}.proj: rowwise")
        elif isinstance(getattr(m, "fc1", None), nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear):
            plan.append(f"{name}.fc1: colwise; {name}.fc2: rowwise")
        elif _is_flux_mlp(m):
            plan.append(f"{name}.0: colwise; {name}.2: rowwise")
    return plan


def _is_single_stream(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Linear) for a in ("linear1", "linear2")) and hasattr(m, "num_heads")


def strided_shard_works() -> bool:
    """Whether this torch's DTensor runs a Linear on a _StridedShard weight (torch 2.11 cannot)."""
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)


def tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Split the ditfast.nn attentions and MLPs of ``model`` over the 1-D ``mesh`` (see the module
    docstring); returns ``model``, changed in place. Every rank must call it with the same model
    (same initial weights) and then feed it the same inputs."""
    if mesh.ndim != 1:
        raise ValueError(f"tensor_parallel takes a 1-D device mesh, got {mesh.ndim} dims; pass mesh['tp'] "
                         "of a larger mesh")
    if getattr(model, "_ditfast_tp", None) is not None:
        raise ValueError("tensor_parallel was already applied to this model")
    sharding.register()
    tp = mesh.size()
    group = mesh.get_group()
    for name, m in model.named_modules():
        if _is_single_stream(m):
            raise NotImplementedError(
                f"{name or 'model'}: ditfast.parallel.tensor_parallel does not split FLUX single-stream blocks "
                "(linear1 packs [q | k | v | mlp] of unequal widths); keep them replicated by splitting only "
                "the other blocks: tensor_parallel(block, mesh) per block"
            )
    if not strided_shard_works():
        raise RuntimeError(
            f"ditfast.parallel.tensor_parallel needs torch >= 2.12 (this is {torch.__version__}): the packed "
            "qkv weight is a DTensor with a strided shard placement, which older DTensor cannot redistribute "
            "in a Linear forward"
        )
    split_heads = {}
    for name, m in list(model.named_modules()):
        if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads"):
            H = m.num_heads
            if H % tp:
                raise ValueError(f"{name}: {H} heads cannot be split over {tp} ranks")
            _shard_packed_linear(m.qkv, mesh)
            if isinstance(getattr(m, "proj", None), nn.Linear):
                parallelize_module(m.proj, mesh, RowwiseParallel())
            for pname, p in m.named_parameters():
                if not isinstance(p, DTensor) and p.requires_grad:  # QK-norm weights: per-rank partial grads
                    p.register_hook(_allreduce_grad_hook(group))
            m.num_heads = H // tp
            split_heads[H] = H // tp
        elif isinstance(getattr(m, "fc1", None), nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear):
            parallelize_module(m, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        elif _is_flux_mlp(m):
            parallelize_module(m, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    # blocks that record the head count too (e.g. DoubleStreamBlock.num_heads) get the local one
    for name, m in model.named_modules():
        H = getattr(m, "num_heads", None)
        if isinstance(H, int) and H in split_heads and not isinstance(getattr(m, "qkv", None), nn.Module):
            m.num_heads = split_heads[H]
    model._ditfast_tp = tp
    return model
