"""ditfast ops on DTensors (2 CPU processes, gloo): replicated, batch-, sequence- and head-sharded
inputs give the single-process result, forward and backward, on every backend that has custom ops
(triton under the interpreter, the compiled extension's CPU kernels) and on the reference.

Each rank builds the same global inputs (same seed), runs the op on plain tensors (the
single-process result), then on DTensors distributed as the case says, and compares the gathered
outputs and input gradients. Row-wise ops on a subset of rows are bit-identical; gradients summed
over the sharded dim (Partial) are summed in another order, hence the fp32-rounding tolerance.
"""
from __future__ import annotations

import pytest
import torch

from ditfast.parallel.testing import Ranks
import conftest  # noqa: F401,E402  (also in the spawned ranks: TRITON_INTERPRET and the interpreter work-around)

pytestmark = pytest.mark.distributed

B, L, D, H, Dh = 2, 5, 24, 2, 8  # L odd: uneven sequence shards (3 + 2)


@pytest.fixture(scope="module")
def ranks():
    with Ranks(2) as r:
        yield r


# ---- cases: name -> (fn(*tensors) -> outputs, make() -> global inputs, placements per mode) --------------
def _mod_inputs(per_token=False, one_row=False):
    x = torch.randn(B, L, D)
    shape = (1 if one_row else B,) + ((L,) if per_token else ()) + (D,)
    return [x, torch.randn(shape), torch.randn(shape)]


def _rope_inputs(batched_table=False):
    q, k = torch.randn(B, L, H, Dh), torch.randn(B, L, H, Dh)
    qw, kw = 1 + 0.1 * torch.randn(Dh), 1 + 0.1 * torch.randn(Dh)
    ang = torch.randn((B, L, Dh // 2) if batched_table else (L, Dh // 2))
    return [q, k, qw, kw, ang.cos(), ang.sin()]


def _cases():
    from ditfast import ops

    S0, S1, S2 = ("S", 0), ("S", 1), ("S", 2)
    Rp = ("R",)
    tbl = lambda m: {"seq": ("S", 0), "batch": Rp, "head": Rp, "replicate": Rp}[m]  # noqa: E731
    c = {}
    c["norm_modulate"] = (
        lambda x, sh, sc: ops.norm_modulate(x, sh, sc), _mod_inputs,
        {"replicate": [Rp, Rp, Rp], "batch": [S0, S0, S0], "seq": [S1, Rp, Rp]})
    c["norm_modulate/per_token"] = (
        lambda x, sh, sc: ops.norm_modulate(x, sh, sc), lambda: _mod_inputs(per_token=True),
        {"seq": [S1, S1, S1], "batch": [S0, S0, S0]})
    c["norm_modulate/one_row"] = (
        lambda x, sh, sc: ops.norm_modulate(x, sh, sc), lambda: _mod_inputs(one_row=True),
        {"batch": [S0, Rp, Rp]})
    c["gated_residual_norm_modulate"] = (
        lambda x, sh, sc, y, g: ops.gated_residual_norm_modulate(x, y, g, sh, sc),
        lambda: _mod_inputs() + [torch.randn(B, L, D), torch.randn(B, D)],
        {"seq": [S1, Rp, Rp, S1, Rp], "batch": [S0, S0, S0, S0, S0]})
    c["norm_modulate_dual"] = (
        lambda x, sh, sc, sh2, sc2: ops.norm_modulate_dual(x, sh, sc, sh2, sc2),
        lambda: _mod_inputs() + [torch.randn(B, L, D), torch.randn(B, D)],
        {"seq": [S1, Rp, Rp, S1, Rp], "batch": [S0] * 5})
    c["gated_residual"] = (
        lambda x, y, g: ops.gated_residual(x, y, g), lambda: [torch.randn(B, L, D), torch.randn(B, L, D),
                                                           torch.randn(B, D)],
        {"seq": [S1, S1, Rp], "batch": [S0, S0, S0]})
    c["rms_norm"] = (
        lambda x, w: ops.rms_norm(x, w), lambda: [torch.randn(B, L, H, Dh), 1 + 0.1 * torch.randn(Dh)],
        {"head": [S2, Rp], "seq": [S1, Rp]})
    c["apply_rope"] = (
        lambda x, cos, sin: ops.apply_rope(x, cos, sin), lambda: [_rope_inputs()[0]] + _rope_inputs()[4:],
        {m: [("S", {"batch": 0, "seq": 1, "head": 2}[m]), tbl(m), tbl(m)] for m in ("batch", "seq", "head")})
    c["qk_norm_rope"] = (
        lambda q, k, qw, kw, cos, sin: ops.qk_norm_rope(q, k, qw, kw, cos, sin), _rope_inputs,
        {m: [("S", {"batch": 0, "seq": 1, "head": 2}[m])] * 2 + [Rp, Rp, tbl(m), tbl(m)]
         for m in ("batch", "seq", "head")})
    c["qk_norm_rope/table_grad"] = (
        lambda q, k, qw, kw, cos, sin: ops.qk_norm_rope(q, k, qw, kw, cos, sin), _rope_inputs,
        {"head": [S2, S2, Rp, Rp, Rp, Rp], "seq": [S1, S1, Rp, Rp, S0, S0], "batch": [S0, S0, Rp, Rp, Rp, Rp]})
    c["qk_norm_rope/batched_table"] = (
        lambda q, k, qw, kw, cos, sin: ops.qk_norm_rope(q, k, qw, kw, cos, sin), lambda: _rope_inputs(True),
        {"batch": [S0, S0, Rp, Rp, S0, S0], "seq": [S1, S1, Rp, Rp, S1, S1]})
    c["flash_attention"] = (
        lambda q, k, v: _triton_attention()(q, k, v),
        lambda: [torch.randn(B, L, H, Dh), torch.randn(B, L + 2, H, Dh), torch.randn(B, L + 2, H, Dh)],
        {"head": [S2, S2, S2], "batch": [S0, S0, S0], "replicate": [Rp, Rp, Rp]})
    c["prepare_attention/fwd"] = (  # forward only: its backward returns lists DTensor cannot wrap
        lambda q0, k0, v0, q1, k1, v1, w0, w1, cos, sin: ops.prepare_attention(
            (q0, q1), (k0, k1), (v0, v1), q_weights=(w0, w1), k_weights=(w1, w0), rope=(cos, sin)),
        lambda: [torch.randn(B, n, H, Dh) for n in (3, 3, 3, L, L, L)] + [1 + 0.1 * torch.randn(Dh) for _ in "ab"]
        + [t(a) for a in [torch.randn(L + 3, Dh // 2)] for t in (torch.cos, torch.sin)],
        {"head": [S2] * 6 + [Rp] * 4, "batch": [S0] * 6 + [Rp] * 4})
    return c


def _triton_attention():
    from ditfast.ops._attention_triton import triton_attention

    return triton_attention


# backends whose fast path is a custom op on CPU, and the ops each implements
_BACKEND_OPS = {
    "reference": ("norm_modulate", "gated_residual_norm_modulate", "rms_norm", "qk_norm_rope"),
    "triton": ("norm_modulate", "norm_modulate_dual", "gated_residual", "gated_residual_norm_modulate", "rms_norm", "apply_rope", "qk_norm_rope",
               "qk_norm_rope/table_grad", "flash_attention", "prepare_attention", "prepare_attention/fwd"),
    "cuda": ("norm_modulate", "gated_residual_norm_modulate", "apply_rope", "qk_norm_rope", "prepare_attention",
             "prepare_attention/fwd"),
}


def _placement(p):
    from torch.distributed.tensor import Replicate, Shard

    return Replicate() if p[0] == "R" else Shard(p[1])


def _compare(got, want, name, tol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if want.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
    return err


def run_case(case: str, mode: str, backend: str):
    """On each rank: single-process result vs the DTensor run, forward and input grads."""
    import ditfast
    import ditfast.parallel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor

    if backend == "cuda":
        import ditfast._C  # noqa: F401  (the CPU kernels of the compiled extension)
    ditfast.parallel.register_sharding_rules()
    fn, make, modes = _cases()[case]
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(1)
    inputs = make()
    as_tuple = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    with ditfast.use_backend(backend):
        # RoPE tables (cos, sin: the last two inputs of the rope cases) are constants unless asked
        n_const = 2 if (("rope" in case or "prepare" in case) and "table_grad" not in case) else 0
        fwd_only = case.endswith("/fwd")
        grad_on = [i < len(inputs) - n_const for i in range(len(inputs))]
        leaves = [t.clone().requires_grad_(g) for t, g in zip(inputs, grad_on)]
        ref = as_tuple(fn(*leaves))
        grads_out = [torch.randn_like(o) for o in ref]
        torch.autograd.backward(ref, grads_out)
        dleaves = [distribute_tensor(t.detach().clone(), mesh, [_placement(p)]).requires_grad_(g)
                   for t, p, g in zip(inputs, modes[mode], grad_on)]
        out = as_tuple(fn(*dleaves))
        assert all(isinstance(o, DTensor) for o in out), "outputs must be DTensors"
        if not fwd_only:
            dgo = [distribute_tensor(g, mesh, o.placements) for g, o in zip(grads_out, out)]
            torch.autograd.backward(out, dgo)
    errs = []
    for i, (o, r) in enumerate(zip(out, ref)):
        errs.append(_compare(o.full_tensor(), r.detach(), f"{case}[{mode}] out{i}", 1e-6))
    for i, (dl, l) in enumerate(zip(dleaves, leaves)):
        if not l.requires_grad or fwd_only:
            continue
        assert dl.grad is not None, f"{case}[{mode}]: input {i} got no gradient"
        errs.append(_compare(dl.grad.full_tensor(), l.grad, f"{case}[{mode}] grad{i}", 1e-5))
    return max(errs)


_PARAMS = [
    (case, mode, backend)
    for backend, names in _BACKEND_OPS.items()
    for case, (_, _, modes) in _cases().items()
    if case.split("/")[0] in names and (not case.endswith("table_grad") or case in names)
    for mode in modes
]


@pytest.mark.parametrize("case,mode,backend", _PARAMS, ids=["-".join(p) for p in _PARAMS])
def test_op_on_dtensor(ranks, case, mode, backend):
    if backend == "cuda":
        from ditfast import _ext

        ok, why = _ext.availability("cpu")
        if not ok:
            pytest.skip(f"compiled extension unavailable: {why}")
    errs = ranks.run(run_case, case, mode, backend)
    assert len(errs) == 2


def run_mixed_inputs():
    """A DTensor next to a plain tensor: ditfast's guard names the plain ones and says how to wrap."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from ditfast.parallel.guard import dtensor_inputs

    mesh = init_device_mesh("cpu", (2,))
    x = distribute_tensor(torch.randn(B, L, D), mesh, [Replicate()])
    plain = torch.randn(B, D)
    assert dtensor_inputs("norm_modulate", x=x, shift=None, scale=x) is True
    assert dtensor_inputs("norm_modulate", x=plain, shift=None, scale=plain) is False
    try:
        dtensor_inputs("norm_modulate", x=x, shift=plain, scale=plain)
    except TypeError as e:
        return str(e)
    return None


def test_mixed_plain_and_dtensor_inputs_raise(ranks):
    for msg in ranks.run(run_mixed_inputs):
        assert msg is not None, "a mix of DTensor and plain tensors must raise"
        assert "shift, scale are plain" in msg and "DTensor.from_local" in msg and "x is a DTensor" in msg


def test_guard_without_torch_distributed_tensor_is_a_no_op():
    import subprocess
    import sys

    code = ("import sys, torch; from ditfast.parallel.guard import dtensor_inputs; "
            "assert dtensor_inputs('op', x=torch.ones(1)) is False; "
            "assert 'torch.distributed.tensor' not in sys.modules, 'the guard imported DTensor'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_ditfast_operator_has_a_rule():
    """A custom op added to ditfast without a DTensor rule fails here (list-output backwards excepted)."""
    from ditfast import _ext
    from ditfast.parallel import sharding

    sharding._load_op_modules()
    if not _ext.availability("cpu")[0]:
        pytest.skip("compiled extension unavailable: its operators cannot be listed")
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ditfast::")}
    missing = names - set(sharding.RULES) - set(sharding._LIST_OUTPUTS)
    assert not missing, f"ditfast operators without a DTensor sharding rule: {sorted(missing)}"
    sharding.register()
    assert set(sharding.registered()) == set(sharding.RULES) & names


def run_inference_on_dtensor():
    """Forward without autograd through the public ops, triton backend: the custom op must run."""
    import ditfast
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ditfast import ops

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(1)
    x, sh, sc = _mod_inputs()
    with ditfast.use_backend("triton"), torch.no_grad():
        want = ops.norm_modulate(x, sh, sc)
        got = ops.norm_modulate(distribute_tensor(x, mesh, [Shard(1)]), distribute_tensor(sh, mesh, [Replicate()]),
                                distribute_tensor(sc, mesh, [Replicate()]))
    return _compare(got.full_tensor(), want, "norm_modulate no_grad", 1e-6)


def test_triton_inference_on_dtensor(ranks):
    """The user's path: no explicit ditfast.parallel call; the op itself must register the rules."""
    ranks.run(run_inference_on_dtensor)
