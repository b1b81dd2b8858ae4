"""The ops and blocks on the "triton" backend under PyTorch's execution modes.

* CUDA graphs (CUDA only): a DiT block captured once and replayed on new inputs equals eager.
* ``torch.compile(fullgraph=True, dynamic=True)`` over a DiT block: one compilation serves several
  sequence lengths (no recompile per length), outputs and gradients equal eager.
* ``torch.inference_mode()``: every op runs and returns what it returns outside it.
* CPU autocast (bf16) over a block: the ops are not autocast themselves, so the block under autocast
  equals the same block with the casts autocast inserts (bf16 Linear layers) written out by hand;
  and it equals the reference backend under autocast by the tolerance rule (docs/numerics.md).
* Determinism: two runs of every op give bitwise-identical outputs (forward) and gradients.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import ditfast
from ditfast import ops, reference
from ditfast.nn import DiTBlock
from ditfast.testing import assert_by_rule

from block_cases import build, randomize
from conftest import DEVICE
from test_edge_cases import OP_NAMES, SPECS, _flat


# --- CUDA graphs --------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_dit_block():
    """Capture a DiT block (triton ops: norm_modulate, attention, gated residuals) in a CUDA graph;
    replays on fresh inputs copied into the static buffers equal eager runs on the same inputs."""
    block, _, _ = build("dit")
    block = block.to("cuda")
    x_static = torch.randn(2, 77, 72, device="cuda")
    c_static = torch.randn(2, 72, device="cuda")
    with ditfast.use_backend("triton"), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up: compile the kernels, settle the allocator
                block(x_static, c_static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_static = block(x_static, c_static)
        for seed in range(3):
            g = torch.Generator(device="cuda").manual_seed(seed)
            x = torch.randn(2, 77, 72, device="cuda", generator=g)
            c = torch.randn(2, 72, device="cuda", generator=g)
            x_static.copy_(x)
            c_static.copy_(c)
            graph.replay()
            eager = block(x, c)
            torch.cuda.synchronize()
            assert torch.equal(out_static, eager), f"replay {seed}: max diff {(out_static - eager).abs().max().item()}"


# --- torch.compile with dynamic shapes ----------------------------------------------------------------
def _counting_aot_eager():
    """(backend, compiled graphs): aot_eager (dynamo + AOTAutograd, no C++ compiler) that records every
    graph it finished compiling (dynamo's internal restarts, which raise, are not compilations)."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")
    graphs = []

    def backend(gm, example_inputs):
        out = aot_eager(gm, example_inputs)
        graphs.append(gm)
        return out

    return backend, graphs


def _compile_dit_over_lengths(lengths=(5, 7, 9)):
    """Compile a DiT block (fullgraph, dynamic) and run it at each length; outputs and the gradients of
    the inputs must equal eager. Returns the graphs compiled."""
    backend, graphs = _counting_aot_eager()
    torch._dynamo.reset()
    block = randomize(DiTBlock(72, 3)).to(DEVICE)
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=backend)
    with ditfast.use_backend("triton"):
        for L in lengths:
            x = torch.randn(2, L, 72, device=DEVICE, requires_grad=True)
            c = torch.randn(2, 72, device=DEVICE, requires_grad=True)
            got, want = compiled(x, c), block(x, c)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            g_got = torch.autograd.grad(got.square().sum(), [x, c])
            g_want = torch.autograd.grad(want.square().sum(), [x, c])
            for a, b in zip(g_got, g_want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    return graphs


def test_compile_dynamic_no_recompile_per_length():
    """After one eager call (the dispatcher has probed its backends), one compilation of a DiT block with
    fullgraph=True, dynamic=True serves L = 5, 7 and 9; the graph calls the ditfast custom ops."""
    block = randomize(DiTBlock(72, 3)).to(DEVICE)
    with ditfast.use_backend("triton"):
        block(torch.randn(2, 3, 72, device=DEVICE), torch.randn(2, 72, device=DEVICE))
    graphs = _compile_dit_over_lengths()
    assert len(graphs) == 1, f"{len(graphs)} compilations for 3 sequence lengths"
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("ditfast.norm_modulate" in t for t in targets), targets
    assert any("ditfast.gated_residual_norm_modulate" in t for t in targets), targets


def test_compile_dynamic_cold_start(monkeypatch):
    """From a fresh process -- the dispatcher's lazily filled probe and choice caches empty, as right
    after ``import ditfast`` -- a compiled op still compiles once for L = 5 and 7 (no recompile when the
    caches fill during the first call)."""
    from ditfast import _backend

    monkeypatch.setattr(_backend, "_PROBED", {})
    monkeypatch.setattr(_backend, "_CACHE", {})
    backend, graphs = _counting_aot_eager()
    torch._dynamo.reset()
    fn = torch.compile(lambda x, m: ops.norm_modulate(x, *m.chunk(2, -1)), fullgraph=True, dynamic=True,
                       backend=backend)
    with ditfast.use_backend("triton"):
        for L in (5, 7):
            x, m = torch.randn(2, L, 40, device=DEVICE), torch.randn(2, 80, device=DEVICE)
            torch.testing.assert_close(fn(x, m), ops.norm_modulate(x, *m.chunk(2, -1)), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert len(graphs) == 1, f"{len(graphs)} compilations for 2 sequence lengths on a cold start"


# --- inference_mode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OP_NAMES)
def test_inference_mode(name):
    """Inside torch.inference_mode() every op runs (inputs that require grad, and inputs created inside
    inference mode), returns inference tensors without grad, bitwise equal to the normal run."""
    spec = SPECS[name]
    leaves = spec.make(2, 5, torch.bfloat16)
    with ditfast.use_backend("triton"):
        want = _flat(spec.call(ops, *leaves))
        with torch.inference_mode():
            got = _flat(spec.call(ops, *leaves))
            inside = [t.detach().clone() for t in leaves]  # inference tensors
            got_inside = _flat(spec.call(ops, *inside))
    for g, gi, w in zip(got, got_inside, want):
        assert g.is_inference() and not g.requires_grad
        assert torch.equal(g, w) and torch.equal(gi, w)


# --- autocast ----------------------------------------------------------------------------------------------
def _bf16_linear(orig):
    def linear(x, weight, bias=None):
        return orig(x.bfloat16(), weight.bfloat16(), None if bias is None else bias.bfloat16())

    return linear


@pytest.mark.parametrize("case", ["dit", "flux_double"])
def test_cpu_autocast_matches_explicit_casts(case, monkeypatch):
    """CPU autocast (bf16) over a block on the triton backend: autocast makes the Linear layers bf16 and
    leaves the ditfast ops alone (they promote: an fp32 residual stream stays fp32). The result is
    bitwise the same block run with those casts written out, and equals the reference backend under
    autocast by the rule (yardstick: the reference under autocast against the fp32 reference)."""
    block, inputs, rope = build(case)
    args = list(inputs) + ([rope] if rope is not None else [])

    def run(backend, autocast):
        with ditfast.use_backend(backend), torch.no_grad():
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return _flat(copy.deepcopy(block)(*args))
            return _flat(copy.deepcopy(block)(*args))

    got = run("triton", autocast=True)
    want_ref_autocast = run("reference", autocast=True)
    want_fp32 = run("reference", autocast=False)
    monkeypatch.setattr(F, "linear", _bf16_linear(F.linear))
    explicit = run("triton", autocast=False)
    monkeypatch.undo()
    for g, e in zip(got, explicit):
        assert g.dtype == e.dtype == torch.float32  # the residual stream stays fp32
        assert torch.equal(g, e), f"max diff {(g - e).abs().max().item()}"
    assert_by_rule(got, want_fp32, want_ref_autocast, atol=1e-4, name=f"{case} under autocast")


# --- determinism ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OP_NAMES)
def test_run_to_run_bitwise(name):
    """Two runs of each op (bf16, per-sample modulation / weights reduced over rows) give bitwise-equal
    outputs and gradients of every input."""
    spec = SPECS[name]
    leaves = spec.make(3, 9, torch.bfloat16)
    runs = []
    for _ in range(2):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        with ditfast.use_backend("triton"):
            outs = _flat(spec.call(ops, *xs))
        ups = [torch.ones_like(o) * 0.5 + torch.arange(o.numel(), device=o.device).view(o.shape).to(o.dtype) % 3
               for o in outs]
        want = [x for x in xs if x.requires_grad]
        runs.append((outs, torch.autograd.grad(outs, want, ups)))
    for a, b in zip(runs[0][0] + list(runs[0][1]), runs[1][0] + list(runs[1][1])):
        assert torch.equal(a, b)


def test_reference_is_what_the_ops_compare_to():
    """Guard: the reference backend really runs ditfast.reference (so the comparisons above mean something)."""
    spec = SPECS["norm_modulate"]
    leaves = spec.make(2, 3, torch.float32)
    with ditfast.use_backend("reference"):
        a = _flat(spec.call(ops, *leaves))
    b = _flat(spec.call(reference, *leaves))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
