"""ditfast.parallel.tensor_parallel on ditfast.nn blocks (2 CPU processes, gloo): forward and all
gradients equal the single-process block; the packed-qkv check catches a plain ColwiseParallel."""
from __future__ import annotations

import copy

import pytest
import torch

from ditfast.parallel.heads import check_qkv_heads
from ditfast.parallel.testing import Ranks
from ditfast.parallel.tp import strided_shard_works, tensor_parallel
import conftest  # noqa: F401,E402  (also in the spawned ranks: TRITON_INTERPRET and the interpreter work-around)

pytestmark = pytest.mark.distributed

D, HEADS, B, L, LT = 32, 4, 2, 7, 5


@pytest.fixture(scope="module")
def ranks():
    with Ranks(2) as r:
        yield r


def _block(kind: str):
    from ditfast import nn as dnn

    torch.manual_seed(3)
    block = {"dit": lambda: dnn.DiTBlock(D, HEADS, mlp_ratio=2.0),
             "double": lambda: dnn.DoubleStreamBlock(D, HEADS, mlp_ratio=2.0, qkv_bias=True),
             "sd3": lambda: dnn.JointBlock(D, HEADS, mlp_ratio=2.0, qk_norm="rms"),
             "sd35_dual": lambda: dnn.JointBlock(D, HEADS, mlp_ratio=2.0, qk_norm="rms", x_block_self_attn=True),
             "sd3_last": lambda: dnn.JointBlock(D, HEADS, mlp_ratio=2.0, pre_only=True)}[kind]()
    with torch.no_grad():
        for p in block.parameters():  # no zero-initialized gates: every path carries signal
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.numel() == D // HEADS else 0.0))
    return block


def _inputs(kind: str):
    from ditfast import ops

    torch.manual_seed(4)
    if kind == "dit":
        return [torch.randn(B, L, D), torch.randn(B, D)], None
    if kind.startswith("sd3"):
        return [torch.randn(B, LT, D), torch.randn(B, L, D), torch.randn(B, D)], None
    ids = torch.stack([torch.zeros(LT + L), torch.arange(LT + L) % 3, torch.arange(LT + L) // 3], -1)
    rope = ops.rope_freqs(ids, (4, 2, 2))
    return [torch.randn(B, L, D), torch.randn(B, LT, D), torch.randn(B, D)], rope


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def run_tp(kind: str):
    from torch.distributed.device_mesh import init_device_mesh

    import ditfast.parallel as dp

    mesh = init_device_mesh("cpu", (2,))
    block = _block(kind)
    tp_block = dp.tensor_parallel(copy.deepcopy(block), mesh)
    xs, rope = _inputs(kind)
    extra = (rope,) if rope is not None else ()

    def run(m):
        leaves = [x.clone().requires_grad_() for x in xs]
        out = m(*leaves, *extra)
        out = tuple(o for o in (out if isinstance(out, tuple) else (out,)) if o is not None)
        torch.manual_seed(5)
        torch.autograd.backward(out, [torch.randn_like(o) for o in out])
        return [o.detach() for o in out], [x.grad for x in leaves]

    ref_out, ref_dx = run(block)
    out, dx = run(tp_block)
    errs = {}
    for i, (a, b) in enumerate(zip(out, ref_out)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind} out{i}: {m}")
        errs[f"out{i}"] = (a - b).abs().max().item()
    for i, (a, b) in enumerate(zip(dx, ref_dx)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind} dx{i}: {m}")
    ref_params = dict(block.named_parameters())
    for name, p in tp_block.named_parameters():
        assert p.grad is not None, f"{kind}: {name} got no gradient"
        torch.testing.assert_close(_full(p.grad), ref_params[name].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{kind} grad of {name}: {m}")
        torch.testing.assert_close(_full(p.detach()), ref_params[name].detach(), rtol=0, atol=0,
                                   msg=lambda m: f"{kind} gathered {name} is not the original layout: {m}")
    heads = [m.num_heads for m in tp_block.modules() if hasattr(m, "qkv")]
    return errs, heads


def run_old_torch_refused():
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    try:
        tensor_parallel(_block("dit"), mesh)
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.skipif(strided_shard_works(), reason="this torch runs the plan (tested below)")
def test_old_torch_refuses_tensor_parallel(ranks):
    for msg in ranks.run(run_old_torch_refused):
        assert "needs torch >= 2.12" in msg, msg


@pytest.mark.skipif(not strided_shard_works(), reason="torch <= 2.11: tensor_parallel refuses (tested above)")
@pytest.mark.parametrize("kind", ["dit", "double", "sd3", "sd35_dual", "sd3_last"])
def test_tensor_parallel_block_matches_one_process(ranks, kind):
    results = ranks.run(run_tp, kind)
    for errs, heads in results:
        assert heads and all(h == HEADS // 2 for h in heads), heads


def run_naive_colwise():
    """The usual plan, ColwiseParallel on the packed qkv with the global head count: the check raises."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    attn = _block("dit").attn
    parallelize_module(attn, mesh, {"qkv": ColwiseParallel()})
    out = attn.qkv(torch.randn(B, L, D))
    msgs = []
    for heads in (attn.num_heads, attn.num_heads // 2):  # global count, and local count set by hand
        try:
            check_qkv_heads(out.shape[-1], heads, attn.head_dim, attn.qkv.weight)
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_naive_colwise_qkv_fails_the_check(ranks):
    for msgs in ranks.run(run_naive_colwise):
        assert len(msgs) == 2, msgs
        assert "3 * num_heads * head_dim" in msgs[0] and "tensor_parallel" in msgs[0]
        assert "sharded contiguously" in msgs[1]


def run_naive_colwise_block():
    """The same plan on a whole block: its forward raises the check's error instead of mixing q and k."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    blk = _block("dit")
    parallelize_module(blk.attn, mesh, {"qkv": ColwiseParallel()})
    try:
        blk(torch.randn(B, L, D), torch.randn(B, D))
    except ValueError as e:
        return str(e)
    return "no error"


def test_naive_colwise_qkv_fails_in_the_block_forward(ranks):
    for msg in ranks.run(run_naive_colwise_block):
        assert "sharded contiguously" in msg and "tensor_parallel" in msg, msg


def test_check_qkv_heads_plain():
    check_qkv_heads(3 * 4 * 8, 4, 8)
    with pytest.raises(ValueError, match="expected 3 \\* num_heads \\* head_dim"):
        check_qkv_heads(3 * 4 * 8 // 2, 4, 8)


def run_single_stream_refused():
    from torch.distributed.device_mesh import init_device_mesh

    import ditfast.parallel as dp
    from ditfast import nn as dnn

    mesh = init_device_mesh("cpu", (2,))
    try:
        dp.tensor_parallel(dnn.SingleStreamBlock(D, HEADS), mesh)
    except NotImplementedError as e:
        return str(e)
    return None


def test_single_stream_block_refused(ranks):
    for msg in ranks.run(run_single_stream_refused):
        assert msg is not None and "single-stream" in msg


def test_tp_plan_lists_what_is_split():
    from ditfast import nn as dnn
    from ditfast.parallel import tp_plan

    plan = tp_plan(dnn.DoubleStreamBlock(D, HEADS, mlp_ratio=2.0))
    assert "img_attn.qkv: packed colwise [q_r|k_r|v_r]; img_attn.num_heads local" in plan
    assert "img_attn.proj: rowwise" in plan and "txt_mlp.0: colwise; txt_mlp.2: rowwise" in plan
    assert not any("mod" in line for line in plan), "adaLN modulation stays replicated"
