"""Helpers shared by the tests of the diffusers families ditfast.patch runs (test_flux2.py, test_flux3.py,
test_zimage.py, test_wan.py, test_pixart.py): a model run with the gradients of every parameter and input,
the fp32 comparison of two runs, counting ditfast's block calls, the one-time-warning check, the
ditfast-op recorder and a block run for the tolerance rule."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ditfast

TOL = 1e-5  # fp32 on the reference ops: max |patched - unpatched| <= TOL * max(1, max |unpatched|)


def _input_leaves(inputs: dict) -> List[tuple]:
    """(name, tensor) of every input leaf that needs a gradient, lists (Z-Image's per-sample inputs) included."""
    out = []
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            out.append((f"input:{k}", v))
        elif isinstance(v, (list, tuple)):
            out += [(f"input:{k}{i}", t) for i, t in enumerate(v) if isinstance(t, torch.Tensor) and t.requires_grad]
    return out


def run_model(model, inputs: dict, seed: int = 7):
    """(outputs, {name: gradient}) of a fixed random projection of the model's output(s) w.r.t. every
    trainable parameter and input leaf (None where one gets none)."""
    out = model(**inputs, return_dict=False)[0]
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() for o in outs)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + _input_leaves(inputs)
    grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    return [o.detach() for o in outs], {n: gr for (n, _), gr in zip(named, grads)}


def assert_same_run(got, ref, what: str, exact: bool = False, tol: float = TOL) -> None:
    """Both runs' outputs and gradients equal: to ``tol`` relative to max(1, max|ref|), or bit for bit."""
    (outs_g, grads_g), (outs_r, grads_r) = got, ref
    assert grads_g.keys() == grads_r.keys()
    pairs = [(f"output {i}", a, b) for i, (a, b) in enumerate(zip(outs_g, outs_r))]
    pairs += [(f"grad {n}", grads_g[n], grads_r[n]) for n in grads_r]
    for name, a, b in pairs:
        assert (a is None) == (b is None), f"{what}: {name} is None in one run only"
        if b is None:
            continue
        if exact:
            assert torch.equal(a, b), f"{what}: {name} is not bit-identical"
        else:
            err = (a.double() - b.double()).abs().max().item()
            bound = tol * max(1.0, b.abs().max().item())
            assert err <= bound, f"{what}: {name}: max error {err:.3g} > {bound:.3g}"


class CallCounter:
    """Counts calls of ``ditfast.nn.functional.<name>`` (the block function a patched family runs)."""

    def __init__(self, monkeypatch, name: str):
        from ditfast.nn import functional

        self.calls = 0
        real = getattr(functional, name)

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(functional, name, counting)


def one_warning(fn: Callable, match: str):
    """Run fn() twice: the first call warns (every ditfast warning matching, one message), the second
    not at all. Returns both results."""
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        a = fn()
    ours = [w for w in first if "ditfast" in str(w.message)]
    assert ours and all(match in str(w.message) for w in ours), [str(w.message) for w in first]
    assert len({str(w.message) for w in ours}) == 1, [str(w.message) for w in ours]
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        b = fn()
    assert not [w for w in second if "ditfast" in str(w.message)], "the fallback warned twice"
    return a, b


class DitfastOps(TorchDispatchMode):
    """The names of the ``torch.ops.ditfast`` operators run inside it, in order."""

    def __init__(self):
        super().__init__()
        self.names: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("ditfast::"):
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))

    def forward_names(self) -> List[str]:
        return [n for n in self.names if not n.endswith("backward")]


def leaves_of(kw: dict, dtype, device="cpu", keep_dtype=()) -> Dict[str, object]:
    """A copy of block kwargs with fresh leaves in ``dtype`` on ``device`` for every float tensor (those
    named in ``keep_dtype`` keep their dtype); tuples (RoPE tables) moved as they are; other values as is."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, tuple):
            out[k] = tuple(t.to(device) for t in v)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().to(device, v.dtype if k in keep_dtype else dtype).requires_grad_()
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


def block_run(block, kw: dict, seed: int = 11, reduced: Callable[[str, torch.Tensor], bool] = lambda k, t: False):
    """(outputs, gradients, names, reduced flags) of a block call under a fixed cotangent: the gradients of
    every input leaf and every parameter that gets one (after ``fuse_projections`` the unfused Linears get
    none, in diffusers too). ``reduced(name, tensor)``: whether an input's gradient is a reduction over
    tokens (parameters' always are)."""
    outs = block(**kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    ins = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    params = list(block.named_parameters())
    grads = torch.autograd.grad(loss, [kw[k] for k in ins] + [p for _, p in params], allow_unused=True)
    names = [f"input {k}" for k in ins] + [n for n, _ in params]
    flags = [reduced(k, kw[k]) for k in ins] + [True] * len(params)
    kept = [i for i, gr in enumerate(grads) if gr is not None]
    assert all(i < len(ins) or names[i].split(".")[-2] in ("to_q", "to_k", "to_v")
               for i in range(len(grads)) if i not in kept), [names[i] for i in range(len(grads)) if i not in kept]
    return ([o.detach().cpu() for o in outs], [grads[i].cpu() for i in kept], [names[i] for i in kept],
            [flags[i] for i in kept])


def interpreter() -> bool:
    """Whether the Triton kernels can run on CPU tensors (TRITON_INTERPRET=1, set by conftest without a GPU)."""
    return ditfast._backend.availability("triton", "cpu")[0]
