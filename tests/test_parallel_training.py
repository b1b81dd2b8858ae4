"""Data-parallel training of a tiny ditfast.nn model (2 CPU processes, gloo): DDP and FSDP2
``fully_shard`` (with and without activation checkpointing) reach the same weights as one process
training on the whole batch."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ditfast.parallel.testing import Ranks
import conftest  # noqa: F401,E402  (also in the spawned ranks: TRITON_INTERPRET and the interpreter work-around)

pytestmark = pytest.mark.distributed

D, HEADS, B, L, STEPS = 32, 4, 4, 6, 3


@pytest.fixture(scope="module")
def ranks():
    with Ranks(2) as r:
        yield r


class Tiny(nn.Module):
    """Two DiT blocks and a final layer: forward(x (B, L, D), c (B, D)) -> (B, L, 4)."""

    def __init__(self):
        super().__init__()
        from ditfast import nn as dnn

        self.blocks = nn.ModuleList([dnn.DiTBlock(D, HEADS, mlp_ratio=2.0) for _ in range(2)])
        self.final = dnn.FinalLayer(D, 1, 4)

    def forward(self, x, c):
        for blk in self.blocks:
            x = blk(x, c)
        return self.final(x, c)


def _model():
    torch.manual_seed(7)
    m = Tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return m


def _data():
    torch.manual_seed(8)
    return [(torch.randn(B, L, D), torch.randn(B, D), torch.randn(B, L, 4)) for _ in range(STEPS)]


def _train(model, data, rank=None, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, c, y in data:
        if rank is not None:  # this rank's half of the batch
            n = B // world
            x, c, y = x[rank * n:(rank + 1) * n], c[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        loss = ((model(x, c) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def run_data_parallel(kind: str):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    ref = _train(_model(), _data())
    model = _model()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if kind == "fsdp_ac":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            model.blocks = nn.ModuleList([checkpoint_wrapper(b) for b in model.blocks])
        mesh = init_device_mesh("cpu", (world,))
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    _train(wrapped, _data(), rank, world)
    worst = 0.0
    ref_params = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), ref_params[name].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{kind}: {name} after {STEPS} steps: {m}")
        worst = max(worst, (full.detach() - ref_params[name].detach()).abs().max().item())
    moved = max((p.detach() - q.detach()).abs().max().item()
                for p, q in zip(ref.parameters(), _model().parameters()))
    return worst, moved


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "fsdp_ac"])
def test_data_parallel_training_matches_one_process(ranks, kind):
    for worst, moved in ranks.run(run_data_parallel, kind):
        assert moved > 1e-3, "training must change the weights for the comparison to mean anything"
        assert worst <= 1e-5
