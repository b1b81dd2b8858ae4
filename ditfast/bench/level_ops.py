"""Variants of the "ops" and "attention" levels: one ditfast op against its reference (eager and
compiled), each forced ditfast backend, and the peers a user would otherwise reach for (SDPA's
kernels, flash-attn, Liger-Kernel) when they are installed."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from .. import ops, reference
from ..ops import attention_backends as attention_backends_mod
from .cases import Case
from .variants import (
    Built,
    VariantSpec,
    attention_choice,
    auto_backend,
    compile_fn,
    forced_backends,
    installed,
    leaf,
    skipped,
    with_backend,
)

Invoke = Callable[[Callable], object]


def rope_tables(L: int, Dh: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) of shape (L, Dh/2): FLUX's 3-axis layout for Dh = 128, else one axis."""
    axes = (16, 56, 56) if Dh == 128 else (Dh,)
    side = max(1, int(L ** 0.5))
    pos = torch.arange(L, device=device)
    ids = torch.stack([torch.zeros_like(pos), pos // side, pos % side], -1) if len(axes) == 3 else pos[:, None]
    return ops.rope_freqs(ids, axes)


def op_inputs(case: Case, device, dtype) -> Tuple[List[torch.Tensor], Invoke]:
    """The leaves of an op case and ``invoke(fn)``, which calls an op-shaped function on them."""
    name, d = case.name, case.dims
    if "H" not in d:
        B, L, D = d["B"], d["L"], d["D"]
        x = leaf((B, L, D), device, dtype)
        vec = lambda: leaf((B, D), device, dtype, scale=0.1)  # noqa: E731 - adaLN outputs are small
        if name == "norm_modulate":
            shift, scale = vec(), vec()
            return [x, shift, scale], lambda fn: fn(x, shift, scale)
        if name == "norm_modulate_dual":
            s1, c1, s2, c2 = vec(), vec(), vec(), vec()
            return [x, s1, c1, s2, c2], lambda fn: fn(x, s1, c1, s2, c2)
        y, gate = leaf((B, L, D), device, dtype), vec()
        if name == "gated_residual":
            return [x, y, gate], lambda fn: fn(x, y, gate)
        if name == "gated_residual_norm_modulate":
            shift, scale = vec(), vec()
            return [x, y, gate, shift, scale], lambda fn: fn(x, y, gate, shift, scale)
        raise ValueError(f"unknown op case {name!r}")
    B, L, H, Dh = d["B"], d["L"], d["H"], d["Dh"]
    w = lambda: (1 + 0.1 * torch.randn(Dh, device=device)).to(dtype).requires_grad_()  # noqa: E731
    if name == "rms_norm":
        x, weight = leaf((B, L, H, Dh), device, dtype), w()
        return [x, weight], lambda fn: fn(x, weight)
    cos, sin = rope_tables(L, Dh, device)
    if name == "apply_rope":
        x = leaf((B, L, H, Dh), device, dtype)
        return [x], lambda fn: fn(x, cos, sin)
    if name == "qk_norm_rope":
        # q and k are strided views of one packed qkv projection, as in the blocks
        qkv, qw, kw = leaf((B, L, 3, H, Dh), device, dtype), w(), w()

        def call(fn):
            q, k, _ = qkv.unbind(2)
            return fn(q, k, qw, kw, cos, sin)

        return [qkv, qw, kw], call
    raise ValueError(f"unknown op case {name!r}")


def _built(leaves, invoke: Invoke, fn: Callable) -> Callable[[], Built]:
    return lambda: Built(lambda: invoke(fn), list(leaves))


def op_variants(case: Case, ctx) -> List[VariantSpec]:
    leaves, invoke = op_inputs(case, ctx.device, ctx.dtype)
    op_fn, ref_fn = getattr(ops, case.name), getattr(reference, case.name)
    specs = [
        VariantSpec("ditfast", "ditfast", _built(leaves, invoke, op_fn),
                    backend=auto_backend(case.name, ctx.device, leaves[0]) or ctx.auto.get(case.name)),
        VariantSpec("eager", "peer", _built(leaves, invoke, ref_fn)),
    ]
    if ctx.compile_off(case.level):
        specs.append(skipped("compile", "peer", ctx.compile_off(case.level)))
    else:
        specs.append(VariantSpec("compile", "peer", _built(leaves, invoke, compile_fn(ref_fn)), compiled=True))
    for b, why in forced_backends(ctx.device, case.name, ctx.backends):
        name = f"ditfast:{b}"
        if why:
            specs.append(skipped(name, "backend", why, b))
        else:
            fn = op_fn
            specs.append(VariantSpec(name, "backend", lambda fn=fn, b=b: Built(with_backend(b, lambda: invoke(fn)),
                                                                                list(leaves)), backend=b))
    if case.name == "rms_norm":
        specs.append(_liger_rms_norm(case, ctx, leaves))
    return specs


def _liger_rms_norm(case: Case, ctx, leaves) -> VariantSpec:
    if ctx.device.type != "cuda":
        return skipped("liger", "peer", "Liger-Kernel runs on CUDA only")
    if not installed("liger_kernel"):
        return skipped("liger", "peer", "liger_kernel is not installed")

    def build():
        from liger_kernel.transformers import LigerRMSNorm

        x = leaves[0]
        norm = LigerRMSNorm(x.shape[-1], eps=1e-6).to(ctx.device, ctx.dtype)
        return Built(lambda: norm(x), [x] + list(norm.parameters()))

    return VariantSpec("liger", "peer", build)


# ------------------------------------------------------------------------------------------ attention
# every attention backend but the reference, which is measured as the "eager" peer
ATTENTION_BACKENDS = tuple(n for n in attention_backends_mod.NAMES if n != "reference")
SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                "math": "MATH"}


def attention_backends(device_type: str, allowed) -> List[Tuple[str, Optional[str]]]:
    """[(backend name, skip reason or None)] for ditfast's attention backends on ``device_type``."""
    out = []
    for name, ok, why in attention_backends_mod.backend_report(device_type):
        if name not in ATTENTION_BACKENDS:
            continue
        if allowed is not None and name not in allowed:
            out.append((name, "not selected (--backends)"))
        else:
            out.append((name, None if ok else (why or "unavailable")))
    return out


def attention_variants(case: Case, ctx) -> List[VariantSpec]:
    d = case.dims
    shape = (d["B"], d["L"], d["H"], d["Dh"])
    q, k, v = (leaf(shape, ctx.device, ctx.dtype) for _ in range(3))
    leaves = [q, k, v]

    def spec(name, kind, fn, **kw):
        return VariantSpec(name, kind, lambda: Built(lambda: fn(q, k, v), list(leaves)), **kw)

    specs = [
        spec("ditfast", "ditfast", ops.joint_attention, backend=attention_choice(ctx.device, ctx.dtype, d["H"], d["Dh"])),
        spec("eager", "peer", reference.joint_attention),
    ]
    if ctx.compile_off(case.level):
        specs.append(skipped("compile", "peer", ctx.compile_off(case.level)))
    else:
        specs.append(spec("compile", "peer", compile_fn(reference.joint_attention), compiled=True))
    for b, why in attention_backends(ctx.device.type, ctx.backends):
        name = f"ditfast:{b}"
        if why:
            specs.append(skipped(name, "backend", why, b))
        else:
            specs.append(spec(name, "backend", lambda q, k, v, b=b: ops.joint_attention(q, k, v, backend=b),
                              backend=b))
    specs += _sdpa_peers(ctx, spec)
    specs += _flash_attn_peers(ctx, spec)
    return specs


def _sdpa_peers(ctx, spec) -> List[VariantSpec]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return [skipped("sdpa:*", "peer", "torch.nn.attention.sdpa_kernel is not in this torch")]
    out = []
    for short, member in SDPA_KERNELS.items():
        if not hasattr(SDPBackend, member):
            out.append(skipped(f"sdpa:{short}", "peer", f"this torch has no SDPBackend.{member}"))
            continue
        if ctx.device.type != "cuda" and short in ("cudnn", "efficient"):
            out.append(skipped(f"sdpa:{short}", "peer", f"SDPA's {short} kernel runs on CUDA only"))
            continue
        kernel = getattr(SDPBackend, member)

        def fn(q, k, v, kernel=kernel):
            with sdpa_kernel([kernel]):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        out.append(spec(f"sdpa:{short}", "peer", fn))
    return out


def _flash_attn_peers(ctx, spec) -> List[VariantSpec]:
    """flash-attn 2 (flash_attn), 3 (flash_attn_interface) and 4 (flash_attn.cute), when installed."""
    candidates = [("flash_attn", "flash_attn", "flash_attn_func"),
                  ("flash_attn3", "flash_attn_interface", "flash_attn_func"),
                  ("flash_attn4", "flash_attn.cute", "flash_attn_func")]
    out = []
    for name, module, attr in candidates:
        if ctx.device.type != "cuda":
            out.append(skipped(name, "peer", "flash-attn runs on CUDA only"))
            continue
        if not installed(module.split(".")[0]) or (("." in module) and not installed(module)):
            out.append(skipped(name, "peer", f"{module} is not installed"))
            continue

        def fn(q, k, v, module=module, attr=attr):
            import importlib

            res = getattr(importlib.import_module(module), attr)(q, k, v)
            return res[0] if isinstance(res, tuple) else res

        out.append(spec(name, "peer", fn))
    return out
