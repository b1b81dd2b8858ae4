"""Context parallelism (diffusers' ``enable_parallelism``) with ditfast: 2 CPU processes on gloo.

* ``context_parallel_attention`` (ditfast/integrations/_context_parallel.py): each rank holds a
  sequence shard of q, k, v; Ulysses and ring attention over the shards (2 and 4 ranks) equal the
  single-process attention of the whole sequence, forward and backward, and the backward runs no
  attention forward (it is a flash backward from the saved output and the merged lse).
* ``chunk_backward``, both paths (the blockwise PyTorch one and ditfast's Triton kernel, under the
  interpreter here), against autograd of the whole attention, for keys split into chunks.
* Peak memory of the ring (and Ulysses) backward at three sequence lengths, counted by a
  TorchDispatchMode that tracks the bytes of live tensor storages: it grows linearly in L (the
  numbers are in docs/attention.md); the former implementation's score matrices grew it by 4x per
  doubling, which the same meter sees (``test_memory_meter_sees_quadratic_growth``).
* A patched tiny FLUX.1 transformer under ``ContextParallelConfig(ulysses_degree=2 | 4)`` and
  ``(ring_degree=2 | 4)`` and unified (2 x 2), patched before or after ``enable_parallelism``, gives
  the single-process unpatched output; parameter gradients summed over the ranks give the
  single-process gradients. (The unpatched model cannot run ring attention on CPU: diffusers'
  "native" backend has no lse.)

diffusers picks the rank's device as ``rank % torch.accelerator.device_count()``, which divides by
zero on a machine without accelerators; the workers stand in one device slot
(``device_count = 1``) so that the device resolves to ``cpu`` -- nothing else reads it on CPU.
The 4-rank cases share one set of 4 processes. diffusers' "ring anything" /
"Ulysses anything" modes exchange sizes on an accelerator device and cannot run on CPU.
"""
from __future__ import annotations

import types
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

pytest.importorskip("diffusers")
from ditfast.parallel.testing import Ranks  # noqa: E402
from helpers import randomize_  # noqa: E402
import conftest  # noqa: F401,E402  (also in the spawned ranks: TRITON_INTERPRET and the interpreter work-around)

pytestmark = pytest.mark.distributed

TOL = 1e-5  # fp32 on the reference ops: max |cp - single| <= TOL * max(1, max |single|)
MODES = {"ulysses": dict(ulysses_degree=2), "ring": dict(ring_degree=2),
         "ulysses4": dict(ulysses_degree=4), "ring4": dict(ring_degree=4),
         "unified": dict(ring_degree=2, ulysses_degree=2)}  # the last three: 4 ranks
CFG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def ranks():
    with Ranks(2) as r:
        yield r


@pytest.fixture(scope="module")
def four():
    with Ranks(4) as r:
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
def attention_case(mode: str, L: int = 12, H: int = 4, Dh: int = 8):
    import ditfast
    from ditfast.integrations import _context_parallel
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
        calls, attend = [], _context_parallel.ops.joint_attention
        _context_parallel.ops.joint_attention = lambda *a, **kw: calls.append(1) or attend(*a, **kw)
        try:
            grads = torch.autograd.grad((out * cot.chunk(world, dim=1)[rank]).sum(), part)
        finally:
            _context_parallel.ops.joint_attention = attend
    errs = {"out": _err(out, ref.chunk(world, dim=1)[rank]), "forwards in the backward": float(len(calls))}
    # the gradient of the shard's q is the shard of dq; k and v gradients of every rank's loss reach the owner
    for name, gr, full_gr in zip("qkv", grads, ref_grads):
        errs[f"d{name}"] = _err(gr, full_gr.chunk(world, dim=1)[rank])
    return errs


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_context_parallel_attention(ranks, mode):
    for rank, errs in enumerate(ranks.run(attention_case, mode)):
        bad = {k: e for k, e in errs.items() if e > TOL}
        assert not bad, f"rank {rank} ({mode}): relative errors {bad}"


@pytest.mark.parametrize("mode", ["ulysses4", "ring4", "unified"])
def test_context_parallel_attention_four_ranks(four, mode):
    for rank, errs in enumerate(four.run(attention_case, mode)):
        bad = {k: e for k, e in errs.items() if e > TOL}
        assert not bad, f"rank {rank} ({mode}): relative errors {bad}"


# ---- the per-chunk flash backward ------------------------------------------------------------------
@pytest.mark.parametrize("path", ["blockwise", "triton"])
def test_chunk_backward_matches_autograd(path, monkeypatch):
    """Keys split in chunks (as a ring passes them around), each chunk's gradients from the merged o
    and lse; dq summed over the chunks and dk, dv concatenated equal autograd of the whole attention."""
    import ditfast
    from ditfast.integrations import _context_parallel as cp

    monkeypatch.setattr(cp, "KEY_BLOCK", 8)  # several key blocks per chunk, a partial last one
    g = torch.Generator().manual_seed(2)
    q, do = (torch.randn(2, 19, 3, 24, generator=g) for _ in range(2))
    k, v = (torch.randn(2, 29, 3, 24, generator=g) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    with ditfast.use_backend("reference"):
        o, lse = ditfast.ops.joint_attention(*full, return_lse=True)
    ref = torch.autograd.grad(o, full, do)
    o, lse = o.detach(), lse.detach().transpose(1, 2)  # diffusers' (B, L, H) layout
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for lo, hi in ((0, 13), (13, 29)):
        gq, gk, gv = cp.chunk_backward(do, q, k[:, lo:hi], v[:, lo:hi], o, lse, path=path)
        assert gq.dtype == gk.dtype == gv.dtype == torch.float32
        dq += gq
        dks.append(gk)
        dvs.append(gv)
    for name, got, want in (("dq", dq, ref[0]), ("dk", torch.cat(dks, 1), ref[1]), ("dv", torch.cat(dvs, 1), ref[2])):
        assert _err(got, want) <= TOL, f"{path} {name}: relative error {_err(got, want)}"


def test_chunk_backward_path_choice():
    from ditfast.integrations._context_parallel import backward_path, chunk_backward

    q = torch.randn(1, 4, 2, 8)
    assert backward_path(q) == "blockwise"  # CPU: never the Triton interpreter
    assert backward_path(q.double()) == "blockwise"
    with pytest.raises(ValueError, match="path must be"):
        chunk_backward(q, q, q, q, q, torch.zeros(1, 4, 2), path="flash")


# ---- peak memory of the backward ---------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages allocated under it that are still alive: ``peak`` is
    the most at any time, ``largest`` the biggest single storage. A storage counts from the op that
    returned it until the last tensor on it (every view returned by a later op included) is freed;
    storages from before the mode (the inputs) and views of them are not counted, nor are wrapper
    subclasses without a storage of their own (a collective's pending result: the plain tensor the
    collective allocated is counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._views = {}  # storage data_ptr -> live tensors on it
        self._seen = WeakIdKeyDictionary()

    @staticmethod
    def _storage(t):
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        before = {self._storage(t)[0] for t in tree_leaves((args, kwargs)) if type(t) is torch.Tensor}
        for t in tree_leaves(out):
            if type(t) is not torch.Tensor or t in self._seen:
                continue
            ptr, nbytes = self._storage(t)
            if nbytes == 0 or (ptr not in self._views and ptr in before):
                continue  # empty, or a view / in-place result of a tensor the mode did not see allocated
            if ptr not in self._views:
                self._views[ptr] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
            self._views[ptr] += 1
            self._seen[t] = ptr
            weakref.finalize(t, self._release, ptr, nbytes)
        return out

    def _release(self, ptr, nbytes):
        self._views[ptr] -= 1
        if not self._views[ptr]:
            del self._views[ptr]
            self.live -= nbytes


LENGTHS = (1024, 2048, 4096)  # global sequence lengths of the memory measurement
MEM_SHAPE = dict(B=1, H=2, Dh=16)


def memory_case(mode: str, lengths=LENGTHS):
    """Peak live bytes (and the largest tensor) of the backward of context-parallel attention, per L."""
    import ditfast
    from ditfast.integrations._context_parallel import context_parallel_attention

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    B, H, Dh = MEM_SHAPE["B"], MEM_SHAPE["H"], MEM_SHAPE["Dh"]
    rows = []
    for L in lengths:
        g = torch.Generator().manual_seed(L)
        part = [torch.randn(B, L // world, H, Dh, generator=g).requires_grad_() for _ in range(3)]
        cot = torch.randn(B, L // world, H, Dh, generator=g)
        with ditfast.use_backend("reference"):
            out = context_parallel_attention(*part, _config(mode))
            meter = LiveBytes()
            with meter:
                grads = torch.autograd.grad(out, part, cot)
        assert all(gr.shape == p.shape for gr, p in zip(grads, part))
        rows.append((L, meter.peak, meter.largest))
        del out, grads
    return rows


def _check_linear(rows, what):
    B, H = MEM_SHAPE["B"], MEM_SHAPE["H"]
    for (l0, p0, _), (l1, p1, _) in zip(rows, rows[1:]):
        assert l1 == 2 * l0
        assert p1 <= 2.2 * p0, f"{what}: peak {p0} B at L={l0}, {p1} B at L={l1} ({p1 / p0:.2f}x): not linear"
    L, peak, largest = rows[-1]
    scores = B * H * (L // 2) ** 2 * 4  # one fp32 score matrix of a local (L/2 x L/2) chunk pair
    assert peak < scores / 2, f"{what}: peak {peak} B at L={L}, vs {scores} B for one chunk's score matrix"


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_backward_peak_memory_is_linear(ranks, mode):
    results = ranks.run(memory_case, mode)
    for rank, rows in enumerate(results):
        print(f"{mode} rank {rank}: " + ", ".join(f"L={L}: peak {p / 2**20:.2f} MiB (largest tensor "
                                                   f"{big / 2**20:.2f} MiB)" for L, p, big in rows))
        _check_linear(rows, f"{mode} rank {rank}")


def _materialized_backward(do, q, k, v, o, lse):
    """The former ring backward: the full fp32 score matrix of the chunk pair (quadratic memory)."""
    s = q.shape[-1] ** -0.5
    qf, kf, vf, of, gf = (t.float() for t in (q, k, v, o, do))
    p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * s - lse.float().transpose(1, 2).unsqueeze(-1))
    dv = torch.einsum("bhqk,bqhd->bkhd", p, gf)
    delta = (gf * of).sum(-1).transpose(1, 2).unsqueeze(-1)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", gf, vf) - delta)
    return torch.einsum("bhqk,bkhd->bqhd", ds, kf) * s, torch.einsum("bhqk,bqhd->bkhd", ds, qf) * s, dv


def test_memory_meter_sees_quadratic_growth():
    """The meter is not blind to score matrices: the former backward grows 4x per doubling of L under
    it, the blockwise one 2x, at the same shapes (one process, one chunk pair)."""
    from ditfast.integrations._context_parallel import chunk_backward

    peaks = {"blockwise": [], "materialized": []}
    for L in (512, 1024, 2048):
        g = torch.Generator().manual_seed(0)
        q, k, v, do, o = (torch.randn(1, L, 2, 16, generator=g) for _ in range(5))
        lse = torch.randn(1, L, 2, generator=g) + 5
        for name, fn in (("blockwise", chunk_backward), ("materialized", _materialized_backward)):
            meter = LiveBytes()
            with meter:
                fn(do, q, k, v, o, lse)
            peaks[name].append(meter.peak)
    for a, b in zip(peaks["materialized"], peaks["materialized"][1:]):
        assert b >= 3.5 * a, peaks
    for a, b in zip(peaks["blockwise"], peaks["blockwise"][1:]):
        assert b <= 2.2 * a, peaks


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
def _flux(heads: int = 2):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**{**CFG, "num_attention_heads": heads})
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


def model_case(mode: str, when: str, text: int = 6, heads: int = 2):
    import ditfast
    from diffusers import ContextParallelConfig
    from ditfast.integrations import _context_parallel

    _stand_in_device_slot()
    calls = []
    local = _context_parallel._local_attention
    _context_parallel._local_attention = lambda *a, **k: calls.append(1) or local(*a, **k)
    try:
        inputs = _inputs(text=text)
        model = _flux(heads)
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
        _context_parallel._local_attention = local


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_patched_flux_context_parallel(ranks, mode, when):
    blocks = CFG["num_layers"] + CFG["num_single_layers"]
    for rank, (errs, calls) in enumerate(ranks.run(model_case, mode, when)):
        bad = {k: e for k, e in errs.items() if e > TOL}
        assert not bad, f"rank {rank} ({mode}, patched {when}): relative errors {bad}"
        # every block ran ditfast's context-parallel attention (ring: one local attention per rank's chunk),
        # and no backward recomputed one
        assert calls == blocks * (2 if mode == "ring" else 1), calls


@pytest.mark.parametrize("mode", ["unified", "ring4", "ulysses4"])
def test_patched_flux_four_ranks(four, mode):
    """4 processes: ring (2) x Ulysses (2), ring of 4, Ulysses over 4 (a model with 4 heads);
    8 text + 16 image tokens split in 4."""
    blocks = CFG["num_layers"] + CFG["num_single_layers"]
    ring = {"unified": 2, "ring4": 4, "ulysses4": 1}[mode]
    for rank, (errs, calls) in enumerate(four.run(model_case, mode, "before", text=8, heads=4)):
        bad = {k: e for k, e in errs.items() if e > TOL}
        assert not bad, f"rank {rank} ({mode}): relative errors {bad}"
        assert calls == ring * blocks, calls  # one local attention per ring step


# ---- a patched Wan model (video: where context parallelism is used) ----------------------------------
WAN_CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=12, freq_dim=16, ffn_dim=48, num_layers=2, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=32)


def wan_case(mode: str):
    """A tiny random WanTransformer3DModel (2 blocks, 2 x 4 x 4 = 32 tokens: 16 per rank), patched, with
    diffusers' context parallelism: output and gradients equal one process's unpatched run."""
    import ditfast
    from diffusers import ContextParallelConfig, WanTransformer3DModel
    from ditfast.integrations import _context_parallel

    _stand_in_device_slot()
    calls = []
    local = _context_parallel._local_attention
    _context_parallel._local_attention = lambda *a, **k: calls.append(1) or local(*a, **k)
    try:
        g = torch.Generator().manual_seed(1)
        # per-token timesteps (Wan 2.2 TI2V's form): diffusers' plan splits a (B, L) timestep; a (B,) one takes a
        # warning path of diffusers' that fails in 0.42 (logger.warning_once)
        inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g),
                      timestep=torch.randint(0, 1000, (2, 32), generator=g),
                      encoder_hidden_states=torch.randn(2, 512, 12, generator=g))
        model = randomize_(WanTransformer3DModel(**WAN_CFG), 0).eval()
        names = ["blocks.0.attn1.to_q.weight", "blocks.0.attn1.norm_k.weight", "blocks.1.attn2.norm_q.weight",
                 "blocks.1.norm2.weight", "blocks.1.scale_shift_table", "patch_embedding.weight"]
        with ditfast.use_backend("reference"):
            out0 = model(**inputs, return_dict=False)[0]
            cot = torch.randn(out0.shape, generator=torch.Generator().manual_seed(5))
            ref, ref_grads = _out_and_grads(model, inputs, cot, names)
            ditfast.patch(model)
            model.enable_parallelism(config=ContextParallelConfig(**MODES[mode]))
            out, grads = _out_and_grads(model, inputs, cot, names)
        errs = {"out": _err(out, ref)}
        for n, gr, rg in zip(names, grads, ref_grads):  # each rank's gradient covers its own tokens: sum them
            gr = gr.clone()
            torch.distributed.all_reduce(gr)
            errs[n] = _err(gr, rg)
        return errs, len(calls)
    finally:
        _context_parallel._local_attention = local


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_patched_wan_context_parallel(ranks, mode):
    for rank, (errs, calls) in enumerate(ranks.run(wan_case, mode)):
        bad = {k: e for k, e in errs.items() if e > TOL}
        assert not bad, f"rank {rank} ({mode}): relative errors {bad}"
        # the self-attention of every block ran ditfast's context-parallel attention (the cross-attention
        # attends the whole text locally, as in diffusers)
        assert calls == WAN_CFG["num_layers"] * (2 if mode == "ring" else 1), calls
