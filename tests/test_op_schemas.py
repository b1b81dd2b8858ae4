"""Every ditfast custom op keeps its gradients' structure whatever the arguments are left at.

Torch's boxed dispatcher drops trailing arguments equal to their schema default before a Python
autograd formula registered with ``torch.library.register_autograd`` sees them, on some torch
releases and not others (torch 2.11 and 2.13 did, 2.14 did not). A backward that returns one gradient
per declared input then returns one too many: "Expected the return from backward to be of the same
structure as the inputs". The extension's ``prepare_attention_c`` (``bool interleaved=True``) crashed
every patched training step that way on 2.13. The cause is a default in the schema, so the rule is:
no ditfast op declares a default. The public Python functions keep their keyword defaults and always
pass every argument to the op.

Two checks: the rule itself, over every registered ``ditfast::`` op, and the case that crashed (the
public functions called with their defaults left alone, with gradients, on the compiled backend),
which fails on an offending torch if a default comes back.
"""
from __future__ import annotations

import pytest
import torch

import ditfast
from ditfast import _ext, reference
from ditfast.testing import check_op

needs_c = pytest.mark.skipif(_ext.load() is None, reason=f"ditfast._C is not built: {_ext.error()}")


def _ditfast_ops():
    # import every module that registers ops: the Triton custom ops and the extension's fakes
    import ditfast.ops.modulate, ditfast.ops.prepare, ditfast.ops.rope, ditfast.ops._attention_triton  # noqa: E401,F401

    _ext.load()
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ditfast::"))
    assert len(names) >= 20, names  # the Triton ops alone are 20
    return names


def _schema(name):
    ns, op = name.split("::")
    packet = getattr(getattr(torch.ops, ns), op)
    return [getattr(packet, o)._schema for o in packet.overloads()]


def test_no_op_declares_a_default():
    offenders = []
    for name in _ditfast_ops():
        for schema in _schema(name):
            defaults = [a.name for a in schema.arguments if a.default_value is not None]
            # Tensor? arguments without "=None" have no default; a declared "=None" would count too
            if defaults:
                offenders.append(f"{schema}  (defaults: {', '.join(defaults)})")
    assert not offenders, (
        "ditfast op schemas must not declare defaults (the dispatcher drops arguments equal to them "
        "before the autograd formula sees the inputs):\n" + "\n".join(offenders)
    )


@needs_c
def test_extension_ops_are_covered():
    names = _ditfast_ops()
    for op in ("prepare_attention_c", "apply_rope_c", "qk_norm_rope_c", "norm_modulate_c"):
        assert f"ditfast::{op}" in names


def _rope(L, Dh):
    pos = torch.arange(L, dtype=torch.float64)[:, None] * (0.7 ** torch.arange(Dh // 2, dtype=torch.float64))[None]
    return pos.cos().float(), pos.sin().float()


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepare_with_defaults_trains_on_the_extension(dtype):
    """The crash of issue 23: the extension's prepare, interleaved left at its default, with gradients.

    It must run the compiled op (not quietly the reference) and give the reference's gradients."""
    B, H, Dh, Ls = 2, 2, 40, (3, 6)
    g = torch.Generator().manual_seed(11)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    qs, ks, vs = ([t(B, L, H, Dh) for L in Ls] for _ in range(3))
    wq, wk = [t(Dh) for _ in Ls], [t(Dh) for _ in Ls]
    cos, sin = _rope(sum(Ls), Dh)

    def fast(q0, q1, k0, k1, v0, v1, a, b, c, d):
        with ditfast.use_backend("cuda"):
            return ditfast.ops.prepare_attention((q0, q1), (k0, k1), (v0, v1), q_weights=(a, b), k_weights=(c, d),
                                                 rope=(cos, sin))

    def ref(q0, q1, k0, k1, v0, v1, a, b, c, d):
        return reference.prepare_attention((q0, q1), (k0, k1), (v0, v1), q_weights=(a, b), k_weights=(c, d),
                                           rope=(cos, sin))

    args = [*qs, *ks, *vs, *wq, *wk]
    log = _OpLog()
    with log:
        out = fast(*args)
        sum(o.float().sum() for o in out).backward()
    assert "ditfast.prepare_attention_c" in log.names, sorted(set(log.names))
    check_op(fast, ref, args, name=f"prepare_attention (extension, defaults, {dtype})", reduced_args=range(6, 10))


@needs_c
def test_rope_ops_with_defaults_train_on_the_extension():
    """apply_rope / qk_norm_rope with interleaved left at its default, with gradients, on the extension."""
    B, L, H, Dh = 2, 5, 2, 8
    g = torch.Generator().manual_seed(3)
    t = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    q, k, wq, wk = t(B, L, H, Dh), t(B, L, H, Dh), t(Dh), t(Dh)
    cos, sin = _rope(L, Dh)

    def fast_rope(x):
        with ditfast.use_backend("cuda"):
            return ditfast.ops.apply_rope(x, cos, sin)

    def fast_qk(q, k, a, b):
        with ditfast.use_backend("cuda"):
            return ditfast.ops.qk_norm_rope(q, k, a, b, cos, sin)

    log = _OpLog()
    with log:
        fast_rope(q).sum().backward()
        sum(o.sum() for o in fast_qk(q, k, wq, wk)).backward()
    assert {"ditfast.apply_rope_c", "ditfast.qk_norm_rope_c"} <= set(log.names), sorted(set(log.names))
    check_op(fast_rope, lambda x: reference.apply_rope(x, cos, sin), [q], name="apply_rope (extension, defaults)")
    check_op(fast_qk, lambda q, k, a, b: reference.qk_norm_rope(q, k, a, b, cos, sin), [q, k, wq, wk],
             name="qk_norm_rope (extension, defaults)", reduced_args=(2, 3))
