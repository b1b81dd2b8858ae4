"""DTensor calls of ``ops.prepare_attention``, forward and backward: run on the local shards.

prepare_attention's backward returns lists of per-stream gradients, which DTensor's propagator
cannot wrap (torch 2.14: an operator's outputs must be tensors or a flat list of them), so its
backward ops have no sharding rule (ditfast/parallel/sharding.py, ``_LIST_OUTPUTS``). Its DTensor
calls therefore apply the operator's sharding rule at the Python autograd level instead:

1. one mode per mesh dim (the rule's modes: ``replicate``, ``batch``, ``head``) is chosen from the
   placement of ``qs[0]`` on that dim: Replicate -> replicate, Shard(0) -> batch, Shard(2) ->
   head. Any other placement (Shard(1): the sequence; Shard(3); Partial) is gathered to Replicate
   first: the joint sequence interleaves the streams, so a sequence shard of each stream is no
   shard of the joint sequence (split the joint sequence afterwards, or use context parallelism);
2. every input is redistributed to the mode's placement (the rule's roles: activations sharded on
   the mode's dim, weights replicated, RoPE tables replicated or batch-sharded when they have a
   batch dim) and taken as its local shard with ``to_local(grad_placements=...)``: the gradient of
   a replicated weight or table that the local shards only partly see (a sum over the sharded
   batch or heads) comes back ``Partial``; every other gradient is placed like its input;
3. the backend runs on the local tensors (any backend; its own autograd on plain tensors), and
   the joint q, k, v are wrapped with ``DTensor.from_local`` in the mode's placements, with their
   global shape and strides given (uneven shards included).

Both directions are differentiable DTensor conversions, so a loss that uses any subset of q, k, v
gets the single-process gradients, and nothing here needs the propagator.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from . import sharding

__all__ = ["prepare_attention", "prepare_modes"]

R = Replicate()
_BY_DIM = {0: "batch", 2: "head"}


def prepare_modes(q0: DTensor) -> Tuple[str, ...]:
    """The mode of prepare_attention's rule that each mesh dim runs in, from ``qs[0]``'s placements."""
    accepted = sharding.RULES["ditfast::prepare_attention"][2]
    modes = []
    for p in q0.placements:
        mode = _BY_DIM.get(p.dim, "replicate") if isinstance(p, Shard) else "replicate"
        modes.append(mode if mode in accepted else "replicate")
    return tuple(modes)


def _placements(role, modes, t) -> List:
    return [role(m, t, None) for m in modes]


def _table_grad(modes, t) -> List:
    """Gradient placement of a RoPE table: replicated where the mode keeps every row of it
    (replicate, or a batched table sharded on batch), else a partial sum."""
    out = []
    for m in modes:
        if m == "replicate":
            out.append(R)
        elif m == "batch" and t.dim() == 3:
            out.append(Shard(0))
        else:
            out.append(Partial())
    return out


def _local(t: Optional[DTensor], mesh, placements, grad_placements) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if t.device_mesh != mesh:
        raise ValueError(
            f"ditfast.ops.prepare_attention: every DTensor argument must be on the mesh of qs[0] ({mesh}), "
            f"got one on {t.device_mesh}"
        )
    if tuple(t.placements) != tuple(placements):
        t = t.redistribute(mesh, placements)
    return t.to_local(grad_placements=grad_placements)


def prepare_attention(
    impl, qs: Sequence[DTensor], ks: Sequence[DTensor], vs: Sequence[DTensor],
    q_weights: Sequence[Optional[DTensor]], k_weights: Sequence[Optional[DTensor]],
    cos: Optional[DTensor], sin: Optional[DTensor], eps: float, interleaved: bool,
) -> Tuple[DTensor, DTensor, DTensor]:
    """``impl`` (a backend's prepare_attention, plain-tensor signature) on DTensor inputs: see the
    module docstring. The inputs were validated (global shapes) and are all DTensors."""
    q0 = qs[0]
    mesh = q0.device_mesh
    modes = prepare_modes(q0)
    act = _placements(sharding.act, modes, q0)
    w_grad = [R if m == "replicate" else Partial() for m in modes]

    def acts(xs):
        return [_local(x, mesh, act, act) for x in xs]

    def weights(ws):
        return [_local(w, mesh, [R] * len(modes), w_grad) for w in ws]

    def table(t):
        if t is None:
            return None
        pl = _placements(sharding.table, modes, t)
        return _local(t, mesh, pl, _table_grad(modes, t))

    lq, lk, lv = acts(qs), acts(ks), acts(vs)
    lcos, lsin = table(cos), table(sin)
    outs = impl(lq, lk, lv, q_weights=weights(q_weights), k_weights=weights(k_weights),
                rope=None if lcos is None else (lcos, lsin), eps=eps, interleaved=interleaved)
    B, _, H, Dh = q0.shape
    shape = torch.Size((B, sum(q.shape[1] for q in qs), H, Dh))
    stride = (shape[1] * H * Dh, H * Dh, Dh, 1)
    return tuple(DTensor.from_local(o.contiguous(), mesh, act, run_check=False, shape=shape, stride=stride)
                 for o in outs)
