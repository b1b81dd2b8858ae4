"""ditfast.parallel: ditfast under torch.distributed (DTensor sharding rules, tensor parallel).

* ``ditfast.parallel.register_sharding_rules()``: DTensor sharding rules for every loaded ditfast
  custom operator (ditfast/parallel/sharding.py). Done automatically: on the first access to
  anything here but ``guard``, and by the ops when they first see DTensor inputs.
* ``ditfast.parallel.tensor_parallel(model, mesh)``: shard the ditfast.nn blocks of ``model`` over a
  1-D device mesh (Megatron-style: heads and MLP hidden units split, one all-reduce per attention
  and per MLP); see ditfast/parallel/tp.py.
* ``ditfast.parallel.check_qkv_heads(...)``: the packed-qkv width check (see tp.py).
* ``ditfast/parallel/local.py``: ``ops.prepare_attention`` on DTensors (its backward returns tensor
  lists DTensor cannot wrap), run on the local shards under its rule's modes, forward and backward.

This package imports torch.distributed lazily: ``import ditfast`` does not pay for it.
"""
from __future__ import annotations

import importlib

__all__ = ["register_sharding_rules", "tensor_parallel", "check_qkv_heads", "tp_plan"]

_LAZY = {
    "tensor_parallel": ".tp",
    "tp_plan": ".tp",
    "check_qkv_heads": ".heads",
}


def register_sharding_rules():
    """Register ditfast's DTensor sharding rules for the operators loaded now; returns their names."""
    from . import sharding

    sharding.register()
    return sharding.registered()


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name], __name__)
        return getattr(mod, name)
    raise AttributeError(f"module 'ditfast.parallel' has no attribute {name!r}")
