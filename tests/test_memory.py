"""Memory behaviour of the ops on the "triton" backend.

* Repeated calls do not accumulate anything: after a warm-up, many calls of norm_modulate and
  qk_norm_rope (with autograd graphs built and dropped, and some backward passes) leave the number of
  live Python objects and tensors unchanged (up to a small noise allowance far below one object per
  call), and no module-level container or functools cache in ``ditfast.*`` (nor a Triton kernel
  cache) grows.
* Outputs and the tensors saved for backward are freed as soon as the caller drops them (no
  reference cycles through the autograd context).
* The fused ops save only what their backward needs: for norm_modulate, gated_residual_norm_modulate
  and qk_norm_rope, the bytes autograd keeps are at most the inputs' plus fp32 per-row statistics,
  and strictly fewer than the reference backend keeps for the same call.

1000 calls per op (``DITFAST_MEMORY_CALLS`` overrides it: under the Triton interpreter a call costs
about 30-60 ms, so the two loops take most of this file's time). A per-call leak of a single object
shows up as hundreds of objects even with far fewer calls.
"""
import collections
import gc
import os
import sys
import weakref

import pytest
import torch

import ditfast
from ditfast import ops

from conftest import DEVICE

CALLS = int(os.environ.get("DITFAST_MEMORY_CALLS", 1000))
NOISE = 64  # objects that may come and go between two snapshots (interpreter / gc bookkeeping)


def _containers():
    """Sizes of the module-level containers and caches of every loaded ditfast module (one level of
    nesting counted: a dict of dicts reports the total of the inner sizes too)."""
    sizes = {}
    for mname, mod in list(sys.modules.items()):
        if mod is None or not (mname == "ditfast" or mname.startswith("ditfast.")):
            continue
        for attr, val in list(vars(mod).items()):
            if attr.startswith("__"):
                continue
            key = f"{mname}.{attr}"
            if isinstance(val, (dict, list, set, collections.deque)):
                inner = val.values() if isinstance(val, dict) else val
                sizes[key] = len(val) + sum(len(v) for v in inner if isinstance(v, (dict, list, set)))
            elif hasattr(val, "cache_info"):  # functools.lru_cache / cache
                sizes[key] = val.cache_info().currsize
            elif isinstance(getattr(val, "cache", None), dict):  # a triton.jit kernel's compiled variants
                sizes[key] = sum(len(v) if isinstance(v, dict) else 1 for v in val.cache.values())
    return sizes


def _live():
    """(live gc-tracked objects, live tensors) after a full collection."""
    gc.collect()
    objs = gc.get_objects()
    return len(objs), sum(1 for o in objs if isinstance(o, torch.Tensor))


def _norm_modulate_call():
    x = torch.randn(1, 2, 8, device=DEVICE, requires_grad=True)
    m = torch.randn(1, 16, device=DEVICE, requires_grad=True)

    def call(backward):
        out = ops.norm_modulate(x, *m.chunk(2, -1))
        if backward:
            out.sum().backward()
            x.grad = m.grad = None

    return call


def _qk_norm_rope_call():
    qkv = torch.randn(1, 2, 3 * 2 * 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    a = torch.randn(2, 4, device=DEVICE)
    cos, sin = a.cos(), a.sin()

    def call(backward):
        q, k, _ = qkv.view(1, 2, 3, 2, 8).unbind(2)
        q_out, k_out = ops.qk_norm_rope(q, k, w, w, cos, sin)
        if backward:
            (q_out.sum() + k_out.sum()).backward()
            qkv.grad = w.grad = None

    return call


@pytest.mark.parametrize("make", [_norm_modulate_call, _qk_norm_rope_call], ids=["norm_modulate", "qk_norm_rope"])
def test_no_growth_over_repeated_calls(make):
    call = make()
    with ditfast.use_backend("triton"):
        for i in range(10):  # warm up: lazy imports, backend probes, kernel caches
            call(backward=i % 2 == 0)
        objs0, tensors0 = _live()
        caches0 = _containers()
        for i in range(CALLS):
            call(backward=i % 25 == 0)  # every call builds (and drops) an autograd graph; some run backward
        objs1, tensors1 = _live()
        caches1 = _containers()
    grown = {k: (caches0.get(k), v) for k, v in caches1.items() if caches0.get(k) != v}
    assert not grown, f"module-level containers / caches changed size over {CALLS} calls: {grown}"
    assert tensors1 <= tensors0, f"{tensors1 - tensors0} more live tensors after {CALLS} calls"
    assert objs1 - objs0 <= NOISE, f"{objs1 - objs0} more live objects after {CALLS} calls"


def test_leak_check_detects_a_leak():
    """Guard for the test above: a deliberately leaking call (one tensor kept per call) is caught."""
    kept = []
    call = _norm_modulate_call()
    with ditfast.use_backend("triton"):
        call(False)
        objs0, tensors0 = _live()
        for _ in range(20):
            kept.append(ops.norm_modulate(torch.randn(1, 1, 8), None, torch.zeros(1, 8)))
        objs1, tensors1 = _live()
    assert tensors1 - tensors0 >= 20 and objs1 - objs0 >= 20


# --- freed when dropped -----------------------------------------------------------------------------------
FREE_CASES = {
    "norm_modulate": lambda x, y, m: [ops.norm_modulate(x, *m.chunk(3, -1)[:2])],
    "norm_modulate_dual": lambda x, y, m: list(ops.norm_modulate_dual(x, *m.chunk(3, -1)[:2], None, m.chunk(3, -1)[2])),
    "gated_residual": lambda x, y, m: [ops.gated_residual(x, y, m.chunk(3, -1)[2])],
    "gated_residual_norm_modulate": lambda x, y, m: list(ops.gated_residual_norm_modulate(x, y, *m.chunk(3, -1))),
    "rms_norm": lambda x, y, m: [ops.rms_norm(x, m[:, :8].mean(0))],
    "qk_norm_rope": lambda x, y, m: list(ops.qk_norm_rope(x.view(2, 3, 1, 8), y.view(2, 3, 1, 8), m[0, :8], m[1, :8], None, None)),
    "joint_attention": lambda x, y, m: [ops.joint_attention(x.view(2, 3, 1, 8), y.view(2, 3, 1, 8), y.view(2, 3, 1, 8))],
}


@pytest.mark.parametrize("name", list(FREE_CASES))
def test_outputs_and_saved_tensors_freed_when_dropped(name):
    """Without gc: dropping the outputs frees them and every tensor the op saved for backward (reference
    counting alone suffices: no cycles through the autograd context); after a backward too."""
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    y = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    m = torch.randn(2, 24, device=DEVICE, requires_grad=True)
    with ditfast.use_backend("triton"):
        FREE_CASES[name](x, y, m)  # a first call (lazy imports and probes) may leave collectable cycles
    gc.collect()
    for backward in (False, True):
        saved = []

        def pack(t):
            # keep a detached alias, not t: returning an output itself from a pack hook would make the
            # cycle output -> grad_fn -> saved output that this test is looking for
            alias = t.detach()
            saved.append(weakref.ref(alias))
            return alias

        gc.disable()
        try:
            with ditfast.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(pack, lambda a: a):
                outs = FREE_CASES[name](x, y, m)
            refs = [weakref.ref(o) for o in outs]
            if backward:
                sum(o.float().sum() for o in outs).backward()
            del outs
            alive = [r for r in refs if r() is not None]
            assert not alive, f"{name}: {len(alive)} outputs still alive after del"
            kept = [r() for r in saved if r() is not None]
            assert saved and not kept, f"{name}: saved tensors still alive: {[tuple(t.shape) for t in kept]}"
        finally:
            gc.enable()


# --- what autograd keeps ----------------------------------------------------------------------------------
def _saved_bytes(fn):
    """(outputs, bytes autograd saved while fn() ran): each saved tensor's own numel × element size,
    counted once per distinct (storage, offset, shape, strides, dtype)."""
    seen = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


B, L, Dm, H, Dh = 3, 7, 72, 3, 24
SAVED_CASES = {
    # name: (inputs builder, call, bytes of the fp32 per-row statistics the kernel keeps)
    "norm_modulate": (
        lambda dt: [torch.randn(B, L, Dm, dtype=dt), torch.randn(B, Dm, dtype=dt), torch.randn(B, Dm, dtype=dt)],
        lambda x, sh, sc: ops.norm_modulate(x, sh, sc),
        2 * B * L * 4,  # mean, rstd
    ),
    "norm_modulate_per_token": (
        lambda dt: [torch.randn(B, L, Dm, dtype=dt), torch.randn(B, L, Dm, dtype=dt), torch.randn(B, L, Dm, dtype=dt)],
        lambda x, sh, sc: ops.norm_modulate(x, sh, sc),
        2 * B * L * 4,
    ),
    "gated_residual_norm_modulate": (
        lambda dt: [torch.randn(B, L, Dm, dtype=dt), torch.randn(B, L, Dm, dtype=dt), torch.randn(B, Dm, dtype=dt),
                    torch.randn(B, Dm, dtype=dt), torch.randn(B, Dm, dtype=dt)],
        lambda x, y, g, sh, sc: ops.gated_residual_norm_modulate(x, y, g, sh, sc),
        2 * B * L * 4,
    ),
    "qk_norm_rope": (
        lambda dt: [torch.randn(B, L, H, Dh, dtype=dt), torch.randn(B, L, H, Dh, dtype=dt), torch.ones(Dh, dtype=dt),
                    torch.ones(Dh, dtype=dt), torch.randn(L, Dh // 2), torch.randn(L, Dh // 2)],
        lambda q, k, qw, kw, c, s: ops.qk_norm_rope(q, k, qw, kw, c, s),
        2 * B * L * H * 4,  # q and k rstd
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SAVED_CASES))
def test_saved_for_backward_is_minimal(name, dtype):
    """Saved bytes <= the inputs' bytes + fp32 per-row statistics, and < the reference backend's."""
    make, call, stats = SAVED_CASES[name]
    inputs = [t.to(DEVICE).requires_grad_() for t in make(dtype)]
    if name == "qk_norm_rope":  # the RoPE tables are constants (no grad)
        inputs[4].requires_grad_(False)
        inputs[5].requires_grad_(False)
    with ditfast.use_backend("triton"):
        _, fast = _saved_bytes(lambda: call(*inputs))
    with ditfast.use_backend("reference"):
        _, ref = _saved_bytes(lambda: call(*inputs))
    bound = _nbytes(*inputs) + stats
    assert fast <= bound, f"{name}: saved {fast} bytes > inputs + statistics = {bound}"
    assert fast < ref, f"{name}: saved {fast} bytes, the reference backend {ref}"
