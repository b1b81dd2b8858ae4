"""DTensor sharding rules for ditfast's custom operators (forward and backward).

Each ``torch.ops.ditfast.*`` operator gets a strategy for DTensor's sharding propagator: the list of
placements (per output, per input) it accepts on one mesh dimension, expanded to the whole mesh by
DTensor. DTensor picks the cheapest accepted one for the inputs it is given, redistributes the
inputs to it, runs the operator on the local shards and wraps the outputs. The accepted layouts
are named by *modes*:

* ``replicate``: everything replicated.
* ``batch``: activations sharded on dim 0 (B); per-sample modulations (B, D) and per-token ones
  (B, L, D) sharded on dim 0 too; a batch-1 modulation (1, D) replicated (its gradient, a sum over
  the batch, comes back ``Partial``); RoPE tables (L, Dh/2) replicated, (B, L, Dh/2) sharded.
* ``seq``: activations sharded on dim 1 (L); per-sample modulations replicated (their gradients, sums
  over tokens, come back ``Partial``), per-token ones sharded on dim 1; RoPE tables on their L dim.
* ``head``: (B, L, H, Dh) tensors sharded on dim 2 (H); RoPE tables and QK-norm weights replicated
  (weight gradients ``Partial``).

Which modes each operator accepts is declared in :data:`RULES` (one entry per operator, one line
per mode family): the modulate family and norm ops take replicate / batch / seq; rope and
qk_norm_rope also head; attention replicate / batch / head (a query-sequence split needs the whole
key sequence: that is context parallelism, not a per-op rule). Statistics the forward returns for
the backward (mean, rstd, lse) follow their activation. prepare_attention's backward returns lists of
per-stream gradients, which DTensor's propagator cannot wrap, so its backward ops have no entry here:
``ops.prepare_attention`` on DTensors applies the forward rule's modes at the Python autograd level
instead, running the backend on the local shards (ditfast/parallel/local.py); its forward rule below
serves direct calls of the operator. When a loss uses only some outputs of a multi-output op, the
backward ops get no gradient (None) for the others, not plain zeros (ditfast/parallel/guard.py,
``dtensor_outputs``): an optional output-gradient argument is then absent (placement None).

Registration goes through DTensor's op-strategy registry, as
``torch.distributed.tensor.experimental.register_sharding`` does, but with every argument part of
the propagation cache key (register_sharding leaves bool / dtype arguments out of it, and the
backward ops' outputs depend on them). Operators that are not loaded yet (the compiled extension,
a backend imported on first use) are registered when :func:`register` runs again, which
``ditfast.parallel.guard`` does whenever it sees a DTensor.

Adding an operator is one entry in RULES: ``"ditfast::my_op": _rule(ins={...}, outs=[...], modes)``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._op_schema import OpStrategy, RuntimeSchemaInfo, TupleStrategy
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy

__all__ = ["register", "registered", "RULES", "MODES"]

R, P = Replicate(), Partial()
MODES = ("replicate", "batch", "seq", "head")
_DIM = {"batch": 0, "seq": 1, "head": 2}


# ---- placement of one argument in one mode ------------------------------------------------------
# Each role is f(mode, spec, args) -> Placement or None (None: this argument is absent / not a tensor),
# or raises _NotIn when the mode cannot hold this argument (that mode is then not offered).
class _NotIn(Exception):
    pass


def _shape(spec) -> Tuple[int, ...]:
    return tuple(spec.shape)


def act(mode, spec, a):
    """An activation (B, L, ...): sharded on the mode's dim (which must not be its last)."""
    if spec is None:
        return None
    if mode == "replicate":
        return R
    d = _DIM[mode]
    if d >= len(_shape(spec)) - 1:
        raise _NotIn
    return Shard(d)


def stat(mode, spec, a):
    """Row statistics (B, L) or (B, L, H) of an activation: sharded like it (all dims are rows)."""
    if spec is None:
        return None
    if mode == "replicate":
        return R
    d = _DIM[mode]
    if d >= len(_shape(spec)):
        raise _NotIn
    return Shard(d)


def lse(mode, spec, a):
    """Attention log-sum-exp (B, H, Lq)."""
    if spec is None:
        return None
    return {"replicate": R, "batch": Shard(0), "head": Shard(1)}.get(mode) or _raise()


def mod(mode, spec, a):
    """A shift / scale / gate: (B, D) per sample or (B, L, D) per token; batch 1 broadcasts."""
    if spec is None:
        return None
    shape = _shape(spec)
    if mode == "replicate":
        return R
    if mode == "batch":
        return R if shape[0] == 1 else Shard(0)
    if mode == "seq":
        return Shard(1) if len(shape) == 3 else R
    raise _NotIn


def _mod_grad(mode, present: bool, per_token: bool, one_row: bool):
    """The gradient of a modulation: what ``mod`` gives, except a sum over the sharded dim is Partial."""
    if not present or mode == "replicate":
        return R  # absent: an empty placeholder tensor
    if mode == "batch":
        return P if one_row else Shard(0)
    if mode == "seq":
        return Shard(1) if per_token else P
    raise _NotIn


def mod_grad_of(name):
    """Gradient of the modulation passed as argument ``name`` (its shape is known)."""
    def role(mode, spec, a):
        s = a[name]
        return _mod_grad(mode, s is not None, s is not None and len(_shape(s)) == 3,
                         s is not None and _shape(s)[0] == 1)
    return role


def mod_grad_flags(dtype, per_token, one_row):
    """Gradient of a modulation described by the backward op's (dtype, per_token, one_row) arguments."""
    def role(mode, spec, a):
        return _mod_grad(mode, a[dtype] is not None, a[per_token], a[one_row])
    return role


def table(mode, spec, a):
    """RoPE cos / sin: (L, Dh/2) or (B, L, Dh/2)."""
    if spec is None:
        return None
    nd = len(_shape(spec))
    if mode == "replicate" or mode == "head":
        return R
    if mode == "batch":
        return Shard(0) if nd == 3 else R
    return Shard(nd - 2)


def table_grad_if(flag: Optional[str], like: str):
    """Gradient of a RoPE table ``like`` (empty unless ``flag`` holds, or the op always gives it)."""
    def role(mode, spec, a):
        s = a[like]
        wanted = s is not None and (flag is None or (a[flag] is not None and a[flag] is not False))
        if not wanted or mode == "replicate":
            return R
        nd = len(_shape(s))
        if mode == "batch":
            return Shard(0) if nd == 3 else P
        if mode == "seq":
            return Shard(nd - 2)
        return P
    return role


def weight(mode, spec, a):
    """A per-channel weight (QK-norm, RMSNorm): replicated."""
    return None if spec is None else R


def weight_grad(name):
    """Gradient of weight ``name``: a sum over every sharded row, so Partial (empty if no weight)."""
    def role(mode, spec, a):
        return R if (a[name] is None or mode == "replicate") else P
    return role


def weight_grads(name):
    """Per-stream weight gradients (a list argument)."""
    def role(mode, spec, a):
        return [R if (w is None or mode == "replicate") else P for w in a[name]]
    return role


def act_if(name: str):
    """An output shaped like activation argument ``name``, or an empty placeholder (replicated) without it."""
    def role(mode, spec, a):
        return R if a[name] is None else act(mode, spec, a)
    return role


def bias_grad_if(flag: str):
    """A bias gradient (N,), a sum over the rows: Partial when the rows are sharded; an empty placeholder
    (``flag`` False) is replicated."""
    def role(mode, spec, a):
        return R if (not a[flag] or mode == "replicate") else P
    return role


def flat_rows(mode, spec, a):
    """prepare_attention's (2, rows) rstd buffer: its rows are (B, L, H) per stream, so no placement
    describes a shard of it exactly; it is labelled Shard(1) (rows) when the rows are split. Only the
    backward reads it, and that has no DTensor rule (see _LIST_OUTPUTS: ops.prepare_attention runs on
    local shards instead), so it is never redistributed."""
    return R if mode == "replicate" else Shard(1)


def _raise():
    raise _NotIn


# ---- rules --------------------------------------------------------------------------------------
Rule = Tuple[Dict[str, Callable], List[Callable], Tuple[str, ...]]


def _rule(ins: Dict[str, Callable], outs: Sequence[Callable], modes: Iterable[str]) -> Rule:
    return dict(ins), list(outs), tuple(modes)


_MOD_MODES = ("replicate", "batch", "seq")
_ROPE_MODES = ("replicate", "batch", "seq", "head")
_ATTN_MODES = ("replicate", "batch", "head")

RULES: Dict[str, Rule] = {
    # --- adaLN family (ditfast/ops/modulate.py, triton backend) ---
    "ditfast::norm_modulate": _rule({"x": act, "shift": mod, "scale": mod}, [act, stat, stat], _MOD_MODES),
    "ditfast::norm_modulate_backward": _rule(
        {"dout": act, "x": act, "mean": stat, "rstd": stat, "scale": mod},
        [act, mod_grad_flags("shift_dtype", "shift_per_token", "shift_one_row"), mod_grad_of("scale")], _MOD_MODES),
    "ditfast::norm_modulate_dual": _rule(
        {"x": act, "shift1": mod, "scale1": mod, "shift2": mod, "scale2": mod}, [act, act, stat, stat], _MOD_MODES),
    "ditfast::norm_modulate_dual_backward": _rule(
        {"dout1": act, "dout2": act, "x": act, "mean": stat, "rstd": stat, "scale1": mod, "scale2": mod},
        [act, mod_grad_flags("shift1_dtype", "shift1_per_token", "shift1_one_row"), mod_grad_of("scale1"),
         mod_grad_flags("shift2_dtype", "shift2_per_token", "shift2_one_row"), mod_grad_of("scale2")], _MOD_MODES),
    "ditfast::gated_residual": _rule({"x": act, "y": act, "gate": mod}, [act], _MOD_MODES),
    "ditfast::gated_residual_backward": _rule({"dout": act, "y": act, "gate": mod}, [act, mod_grad_of("gate")],
                                              _MOD_MODES),
    "ditfast::gated_residual_norm_modulate": _rule(
        {"x": act, "y": act, "gate": mod, "shift": mod, "scale": mod}, [act, act, stat, stat], _MOD_MODES),
    "ditfast::gated_residual_norm_modulate_backward": _rule(
        {"dx_new": act, "dh": act, "x_new": act, "mean": stat, "rstd": stat, "y": act, "gate": mod, "scale": mod},
        [act, act, mod_grad_of("gate"), mod_grad_flags("shift_dtype", "shift_per_token", "shift_one_row"),
         mod_grad_of("scale")], _MOD_MODES),
    # --- the family's options (RMSNorm, norm weights, tanh gates, post-norm): (D,) weights replicated,
    # their gradients (sums over every row) Partial when rows are sharded ---
    "ditfast::norm_modulate_x": _rule({"x": act, "shift": mod, "scale": mod, "weight": weight}, [act, stat, stat],
                                      _MOD_MODES),
    "ditfast::norm_modulate_x_backward": _rule(
        {"dout": act, "x": act, "mean": stat, "rstd": stat, "scale": mod, "weight": weight},
        [act, mod_grad_flags("shift_dtype", "shift_per_token", "shift_one_row"), mod_grad_of("scale"),
         weight_grad("weight")], _MOD_MODES),
    "ditfast::gated_residual_x": _rule({"x": act, "y": act, "gate": mod, "y_weight": weight}, [act], _MOD_MODES),
    "ditfast::gated_residual_x_backward": _rule(
        {"dout": act, "y": act, "gate": mod, "y_weight": weight},
        [act, mod_grad_of("gate"), weight_grad("y_weight")], _MOD_MODES),
    "ditfast::gated_residual_norm_modulate_x": _rule(
        {"x": act, "y": act, "gate": mod, "shift": mod, "scale": mod, "weight": weight, "y_weight": weight},
        [act, act, stat, stat], _MOD_MODES),
    "ditfast::gated_residual_norm_modulate_x_backward": _rule(
        {"dx_new": act, "dh": act, "x_new": act, "mean": stat, "rstd": stat, "y": act, "gate": mod, "scale": mod,
         "weight": weight, "y_weight": weight},
        [act, act, mod_grad_of("gate"), mod_grad_flags("shift_dtype", "shift_per_token", "shift_one_row"),
         mod_grad_of("scale"), weight_grad("weight"), weight_grad("y_weight")], _MOD_MODES),
    # --- RMSNorm / RoPE (ditfast/ops/rope.py, triton backend) ---
    "ditfast::rms_norm": _rule({"x": act, "weight": weight}, [act, stat], _ROPE_MODES),
    "ditfast::rms_norm_backward": _rule({"dy": act, "x": act, "weight": weight, "rstd": stat},
                                        [act, weight_grad("weight")], _ROPE_MODES),
    "ditfast::apply_rope": _rule({"x": act, "cos": table, "sin": table}, [act], _ROPE_MODES),
    "ditfast::apply_rope_backward": _rule(
        {"dy": act, "x": act, "cos": table, "sin": table},
        [act, table_grad_if("x", "cos"), table_grad_if("x", "sin")], _ROPE_MODES),
    "ditfast::qk_norm_rope": _rule(
        {"q": act, "k": act, "q_weight": weight, "k_weight": weight, "cos": table, "sin": table},
        [act, act, stat, stat], _ROPE_MODES),
    "ditfast::qk_norm_rope_backward": _rule(
        {"dq_out": act, "dk_out": act, "q": act, "k": act, "q_weight": weight, "k_weight": weight,
         "q_rstd": stat, "k_rstd": stat, "cos": table, "sin": table},
        [act, act, weight_grad("q_weight"), weight_grad("k_weight"),
         table_grad_if("table_grad", "cos"), table_grad_if("table_grad", "sin")], _ROPE_MODES),
    # --- the compiled extension ditfast._C (csrc/registration.cpp; "cuda" backend, CPU kernels too) ---
    "ditfast::norm_modulate_c": _rule({"x": act, "shift": mod, "scale": mod}, [act], _MOD_MODES),
    "ditfast::norm_modulate_c_backward": _rule(
        {"grad_out": act, "x": act, "shift": mod, "scale": mod}, [act, mod_grad_of("scale"), mod_grad_of("shift")],
        _MOD_MODES),
    "ditfast::gated_residual_norm_modulate_c": _rule(
        {"x": act, "y": act, "gate": mod, "shift": mod, "scale": mod}, [act, act], _MOD_MODES),
    "ditfast::gated_residual_norm_modulate_c_backward": _rule(
        {"grad_x_new": act, "grad_h": act, "x": act, "y": act, "gate": mod, "shift": mod, "scale": mod},
        [act, act, mod_grad_of("gate"), mod_grad_of("scale"), mod_grad_of("shift")], _MOD_MODES),
    "ditfast::apply_rope_c": _rule({"x": act, "cos": table, "sin": table}, [act], _ROPE_MODES),
    "ditfast::qk_norm_rope_c": _rule(
        {"q": act, "k": act, "q_weight": weight, "k_weight": weight, "cos": table, "sin": table}, [act, act],
        _ROPE_MODES),
    "ditfast::qk_norm_rope_c_backward": _rule(
        {"grad_q": act, "grad_k": act, "q": act, "k": act, "q_weight": weight, "k_weight": weight,
         "cos": table, "sin": table},
        [act, act, weight_grad("q_weight"), weight_grad("k_weight")], _ROPE_MODES),
    # --- attention (ditfast/ops/_attention_triton.py) ---
    # key_lengths (absent on DTensors: ops.joint_attention refuses it there) is declared replicated
    "ditfast::flash_attention": _rule({"q": act, "k": act, "v": act, "key_lengths": weight}, [act, lse],
                                      _ATTN_MODES),
    "ditfast::flash_attention_backward": _rule(
        {"do": act, "q": act, "k": act, "v": act, "o": act, "lse": lse, "key_lengths": weight}, [act, act, act],
        _ATTN_MODES),
    # --- GELU(tanh) backward + bias gradient (ditfast/ops/gelu.py) on (T, N) rows: T = the flattened
    # B·L, so a batch- or sequence-sharded activation is a row-sharded one ("batch" = dim 0 here) ---
    "ditfast::gelu_tanh_backward": _rule({"dy": act, "pre": act}, [act, bias_grad_if("bias_grad")],
                                         ("replicate", "batch")),
    # --- SwiGLU (ditfast/ops/swiglu.py): elementwise over rows; the packed form's last dim is never sharded ---
    "ditfast::swiglu": _rule({"x": act, "up": act}, [act], _MOD_MODES),
    "ditfast::swiglu_backward": _rule({"dy": act, "x": act, "up": act}, [act, act_if("up")], _MOD_MODES),
    # --- prepare (ditfast/ops/prepare.py): forward only, see _LIST_OUTPUTS (ops.prepare_attention: local.py) ---
    "ditfast::prepare_attention": _rule(
        {"qs": act, "ks": act, "vs": act, "q_weights": weight, "k_weights": weight, "cos": table, "sin": table},
        [act, act, act, flat_rows], ("replicate", "batch", "head")),
    "ditfast::prepare_attention_c": _rule(
        {"qs": act, "ks": act, "vs": act, "q_weights": weight, "k_weights": weight, "cos": table, "sin": table},
        [act, act, act], ("replicate", "batch", "head")),
}

# Operators whose outputs are nested lists of tensors, which DTensor's propagator cannot wrap
# (torch 2.14): prepare_attention_backward returns per-stream gradient lists. ops.prepare_attention never
# calls them with DTensors: its DTensor calls run the backend on local shards (ditfast/parallel/local.py).
_LIST_OUTPUTS = ("ditfast::prepare_attention_backward", "ditfast::prepare_attention_c_backward")


# ---- registration -------------------------------------------------------------------------------
def _to_spec(x):
    if isinstance(x, OpStrategy):
        return x.strategies[0].output_spec
    if isinstance(x, TupleStrategy):
        return [_to_spec(c) for c in x.children]
    if isinstance(x, (list, tuple)):
        return [_to_spec(c) for c in x]
    return x


def _apply(role, mode, value, a):
    if isinstance(value, list):
        return [role(mode, v, a) for v in value]
    return role(mode, value, a)


def _strategy(op_name: str, op_schema):
    ins, outs, modes = RULES[op_name]
    schema = op_schema.op._schema
    names = [arg.name for arg in schema.arguments]
    a = {n: None for n in names}
    a.update(zip(names, (_to_spec(x) for x in op_schema.args_schema)))
    a.update({k: _to_spec(x) for k, x in op_schema.kwargs_schema.items()})
    # outputs are placed like the first tensor input (their roles read its rank only)
    primary = next(v for n in names if n in ins and (v := a[n]) is not None)
    primary = primary[0] if isinstance(primary, list) else primary
    rows = []
    for mode in modes:
        try:
            row = [role(mode, primary, a) for role in outs]
            for n in names:
                if n in ins:
                    p = _apply(ins[n], mode, a[n], a)
                    row.extend(p if isinstance(p, list) else [p])
        except _NotIn:
            continue
        rows.append(row)
    if not rows:
        raise NotImplementedError(f"ditfast: no sharding of {op_name} fits these inputs")
    return expand_to_full_mesh_op_strategy(op_schema.get_mesh_from_args(), op_schema, rows,
                                           input_index=len(schema.returns))


_REGISTERED: Dict[str, bool] = {}


def _overload(op_name: str):
    ns, name = op_name.split("::")
    try:
        return getattr(getattr(torch.ops, ns), name).default
    except (AttributeError, RuntimeError):
        return None


# modules that define ditfast custom ops; imported by register() (none imports triton or loads a GPU)
_OP_MODULES = ("ditfast.ops.modulate", "ditfast.ops.rope", "ditfast.ops.prepare", "ditfast.ops._attention_triton",
               "ditfast.ops.attention", "ditfast.ops.gelu",
               "ditfast.ops.swiglu")
_IMPORTED = False


def _load_op_modules() -> None:
    global _IMPORTED
    if _IMPORTED:
        return
    import importlib

    for name in _OP_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    try:  # the compiled extension's operators exist once ditfast._C is loaded (probing loads it)
        from .. import _ext

        _ext.availability("cpu")
    except Exception:  # noqa: BLE001 - a broken or absent extension only means no *_c rules
        pass
    _IMPORTED = True


def register() -> Tuple[str, ...]:
    """Register the rules of every ditfast operator that is loaded and has none yet; returns the
    names registered now. Safe to call often: an operator is registered once."""
    if len(_REGISTERED) == len(RULES):
        return ()
    _load_op_modules()
    propagator = DTensor._op_dispatcher.sharding_propagator
    done = []
    for name in RULES:
        if name in _REGISTERED:
            continue
        overload = _overload(name)
        if overload is None:
            continue
        _check_rule(name, overload)
        propagator.register_op_strategy(overload, partial(_strategy, name),
                                        RuntimeSchemaInfo(static_argnum=0, needs_pytree=True))
        _REGISTERED[name] = True
        done.append(name)
    return tuple(done)


def registered() -> Tuple[str, ...]:
    """Operators with a ditfast sharding rule registered."""
    return tuple(_REGISTERED)


def _check_rule(name: str, overload) -> None:
    """A rule must name every tensor argument and every output of the operator's schema, so a
    changed operator signature fails here, not with a wrong placement."""
    ins, outs, _ = RULES[name]
    schema = overload._schema
    tensor_args = {a.name for a in schema.arguments if "Tensor" in str(a.type)}
    if set(ins) != tensor_args or len(outs) != len(schema.returns):
        raise RuntimeError(
            f"ditfast.parallel.sharding: the rule for {name} does not match its schema {schema} "
            f"(rule inputs {sorted(ins)}, {len(outs)} outputs); update RULES"
        )
