"""Context parallelism (diffusers' ``enable_parallelism``) with ditfast: 2 CPU processes on gloo.

* ``context_parallel_attention`` (ditfast/integrations/_context_parallel.py): each rank holds a
  sequence shard of q, k, v; Ulysses and ring attention over the shards equal the single-process
  attention of the whole sequence, forward and backward (ring's backward uses the merged lse).
* A patched tiny FLUX.1 transformer under ``ContextParallelConfig(ulysses_degree=2)`` and
  ``(ring_degree=2)``, patched before or after ``enable_parallelism``, gives the single-process
  unpatched output; parameter gradients summed over the ranks give the single-process gradients.
  (The unpatched model cannot run ring attention on CPU: diffusers' "native" backend has no lse.)

diffusers picks the rank's device as ``rank % torch.accelerator.device_count()``, which divides by
zero on a machine without accelerators; the workers stand in one device slot
(``device_count = 1``) so that the device resolves to ``cpu`` -- nothing else reads it on CPU.
"Unified" attention (ring and Ulysses both > 1) runs on 4 ranks. diffusers' "ring anything" /
"Ulysses anything" modes exchange sizes on an accelerator device and cannot run on CPU.
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("diffusers")
from ditfast.parallel.testing import Ranks  # noqa: E402
from helpers import randomize_  # noqa: E402
import conftest  # noqa: F401,E402  (also in the spawned ranks: TRITON_INTERPRET and the interpreter work-around)

pytestmark = pytest.mark.distributed

TOL = 1e-5  # fp32 on the reference ops: max |cp - single| <= TOL * max(1, max |single|)
MODES = {"ulysses": dict(ulysses_degree=2), "ring": dict(ring_degree=2),
         "unified": dict(ring_degree=2, ulysses_degree=2)}  # unified: 4 ranks
CFG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def ranks():
    with Ranks(2) as r:
        yield r


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max(1, max |b|)."""
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.abs().max().item())


def _stand_in_device_slot() -> None:
    torch.accelerator.device_count = lambda: 1  # see the module docstring


def _config(mode: str):
    from diffusers import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    cp = ContextParallelConfig(**MODES[mode])
    cfg = ParallelConfig(context_parallel_config=cp)
    mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    cfg.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device("cpu"), mesh=mesh)
    return cfg


# ---- the attention alone ---------------------------------------------------------------------------
def attention_case(mode: str, L: int = 10, H: int = 4, Dh: int = 8):
    import ditfast
    from ditfast.integrations._context_parallel import context_parallel_attention

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    g = torch.Generator().manual_seed(3)
    q, k, v, cot = (torch.randn(2, L, H, Dh, generator=g) for _ in range(4))
    with ditfast.use_backend("reference"):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = ditfast.ops.joint_attention(*full)
        ref_grads = torch.autograd.grad((ref * cot).sum(), full)

        part = [t.chunk(world, dim=1)[rank].clone().requires_grad_() for t in (q, k, v)]
        out = context_parallel_attention(*part, _config(mode))
        grads = torch.autograd.grad((out * cot.chunk(world, dim=1)[rank]).sum(), part)
    errs = {"out": _err(out, ref.chunk(world, dim=1)[rank])}
    # the gradient of the shard's q is the shard of dq; k and v gradients of every rank's loss reach the owner
    for name, gr, full_gr in zip("qkv", grads, ref_grads):
        errs[f"d{name}"] = _err(gr, full_gr.chunk(world, dim=1)[rank])
    return errs


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_context_parallel_attention(ranks, mode):
    for rank, errs in enumerate(ranks.run(attention_case, mode)):
        bad = {k: e for k, e in errs.items() if e > TOL}
        assert not bad, f"rank {rank} ({mode}): relative errors {bad}"


def test_errors_for_unsupported_settings():
    from ditfast.integrations._context_parallel import _forward_op, context_parallel_attention

    cp = types.SimpleNamespace(ulysses_degree=2, ring_degree=1, ulysses_anything=False, _mesh=object())
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="3 heads over ulysses_degree=2"):
        context_parallel_attention(q, q, q, types.SimpleNamespace(context_parallel_config=cp))
    with pytest.raises(RuntimeError, match="no device mesh"):
        cp._mesh = None
        context_parallel_attention(q, q, q, types.SimpleNamespace(context_parallel_config=cp))
    with pytest.raises(ValueError, match="no mask"):
        _forward_op(None, q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        _forward_op(None, q, q, q, scale=0.5)


# ---- a patched FLUX model ----------------------------------------------------------------------------
def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**CFG)
    return randomize_(model, 0).eval()


def _inputs(rows=4, cols=4, text=6):
    g = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return dict(hidden_states=torch.randn(2, rows * cols, CFG["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(2, text, CFG["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(2, CFG["pooled_projection_dim"], generator=g),
                timestep=torch.rand(2, generator=g), guidance=1 + 4 * torch.rand(2, generator=g),
                img_ids=torch.cat((torch.zeros(rows * cols, 1), grid.float()), 1),
                txt_ids=torch.randint(0, 4, (text, 3), generator=g).float())


def _out_and_grads(model, inputs, cot, names):
    out = model(**inputs, return_dict=False)[0]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad((out * cot).sum(), [params[n] for n in names])
    return out.detach(), grads


def model_case(mode: str, when: str, text: int = 6):
    import ditfast
    from diffusers import ContextParallelConfig
    from ditfast.integrations import _context_parallel

    _stand_in_device_slot()
    calls = []
    fwd = _context_parallel._forward_op
    _context_parallel._forward_op = lambda *a, **k: calls.append(1) or fwd(*a, **k)
    try:
        inputs = _inputs(text=text)
        model = _flux()
        names = ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.norm_added_k.weight",
                 "single_transformer_blocks.1.attn.norm_q.weight", "single_transformer_blocks.1.proj_mlp.weight",
                 "x_embedder.weight"]
        with ditfast.use_backend("reference"):
            out0 = model(**inputs, return_dict=False)[0]
            cot = torch.randn(out0.shape, generator=torch.Generator().manual_seed(5))
            ref, ref_grads = _out_and_grads(model, inputs, cot, names)
            if when == "before":
                ditfast.patch(model)
            model.enable_parallelism(config=ContextParallelConfig(**MODES[mode]))
            if when == "after":
                ditfast.patch(model)
            out, grads = _out_and_grads(model, inputs, cot, names)
        errs = {"out": _err(out, ref)}
        for n, gr, rg in zip(names, grads, ref_grads):  # each rank's gradient covers its own tokens: sum them
            gr = gr.clone()
            torch.distributed.all_reduce(gr)
            errs[n] = _err(gr, rg)
        return errs, len(calls)
    finally:
        _context_parallel._forward_op = fwd


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_patched_flux_context_parallel(ranks, mode, when):
    blocks = CFG["num_layers"] + CFG["num_single_layers"]
    for rank, (errs, calls) in enumerate(ranks.run(model_case, mode, when)):
        bad = {k: e for k, e in errs.items() if e > TOL}
        assert not bad, f"rank {rank} ({mode}, patched {when}): relative errors {bad}"
        # every block ran ditfast's context-parallel attention (ring: one local attention per rank's chunk)
        assert calls == blocks * (2 if mode == "ring" else 1), calls


def test_patched_flux_unified_four_ranks():
    """Ring (2) x Ulysses (2) on 4 processes; 8 text + 16 image tokens split in 4."""
    blocks = CFG["num_layers"] + CFG["num_single_layers"]
    with Ranks(4) as four:
        results = four.run(model_case, "unified", "before", text=8)
    for rank, (errs, calls) in enumerate(results):
        bad = {k: e for k, e in errs.items() if e > TOL}
        assert not bad, f"rank {rank} (unified): relative errors {bad}"
        assert calls == 2 * blocks, calls  # the ring of 2 inside each Ulysses group
