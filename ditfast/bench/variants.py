"""The variants measured for each case: ditfast (automatic backend), each forced ditfast backend, and the
peers a user would otherwise run, in this order so that a time limit cuts the costly peers first:

  "ditfast"             ditfast with its automatic backend choice (what a user gets by default)
  "ditfast:<backend>"   one ditfast backend forced (triton, compiled, or an attention backend); the
                        automatic row's label names what ran by device ("compiled C++ CPU" for
                        ditfast._C's CPU kernels, "compiled CUDA" for its CUDA kernels)
  "eager"               the plain-PyTorch reference (ditfast.reference; blocks under use_backend("reference"))
  "diffusers"           diffusers' own block / transformer, when diffusers is installed
  "sdpa"                torch's scaled_dot_product_attention with its own kernel choice
  "compile", "diffusers+compile"   the same under torch.compile (static shapes; compile time reported)
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from .. import _backend, ops, reference
from .cases import Case, attention_flops


@dataclass
class Built:
    """A ready-to-time variant: ``forward()`` runs it once; ``leaves`` get gradients in fwd+bwd."""

    forward: Callable[[], Any]
    leaves: List[torch.Tensor] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


@dataclass
class VariantSpec:
    """A variant to measure, or (``build`` None) one skipped for ``reason``."""

    name: str
    kind: str  # "ditfast" | "backend" | "peer"
    build: Optional[Callable[[], Built]] = None
    reason: Optional[str] = None
    backend: Optional[str] = None
    compiled: bool = False
    fwd_only: Optional[str] = None  # why fwd+bwd is not measured


def skipped(name: str, kind: str, reason: str, backend: Optional[str] = None) -> VariantSpec:
    return VariantSpec(name, kind, None, reason, backend)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def diffusers_problem() -> Optional[str]:
    """Why diffusers' blocks cannot be measured (None: they can). A diffusers that is installed but fails to
    import (a carried wheel next to the wrong torch) costs its own peer rows only, never ditfast's."""
    if not installed("diffusers"):
        return "diffusers is not installed"
    try:
        import diffusers.models.attention  # noqa: F401
        import diffusers.models.transformers.transformer_flux  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure
        return f"diffusers is installed but fails to import ({type(exc).__name__}: {str(exc).strip()[:160]})"
    return None


def unfused_prepare_note(device: torch.device, dtype: torch.dtype, Dh: int) -> Optional[str]:
    """On torch < 2.12 the extension's prepare_attention runs the reference whenever gradients are needed
    (ditfast/ops/cuda_impl.py, ``_OLD_LIST_AUTOGRAD``): a block's forward + backward then includes an unfused
    prepare. The label its fwd+bwd numbers carry, or None when the fused one runs."""
    try:
        from ..ops import cuda_impl

        if not getattr(cuda_impl, "_OLD_LIST_AUTOGRAD", False):
            return None
        name = _backend.chosen_name("prepare_attention", device, torch.empty(1, 1, 1, Dh, device=device, dtype=dtype))
        if _backend.impl("prepare_attention", name).fn is not getattr(cuda_impl, "prepare_attention", None):
            return None
    except Exception:  # noqa: BLE001 - a label, never fatal
        return None
    return (f"fwd+bwd includes an UNFUSED prepare_attention: on torch {torch.__version__.split('+')[0]} the extension's "
            "prepare runs the reference when gradients are needed (_OLD_LIST_AUTOGRAD)")


def leaf(shape: Sequence[int], device, dtype, *, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()


def with_backend(backend: Optional[str], fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run inside ``ditfast.use_backend(backend)`` (None: the automatic choice, no context)."""
    if backend is None:
        return fn

    def run():
        with _backend.use_backend(backend):
            return fn()
    return run


def compiled(fn):
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------------------- backends
def op_backends(op: Optional[str], device: torch.device, allowed) -> List[tuple]:
    """[(backend, skip reason or None)] of ditfast's non-reference op families (``op`` None: a block).
    ``allowed`` may name a family by its alias ("cuda" selects "compiled")."""
    allowed = None if allowed is None else {_backend.canonical(a) for a in allowed}
    out = []
    for b in _backend.FAMILIES:
        if b == "reference":  # measured as the "eager" peer
            continue
        if allowed is not None and b not in allowed:
            out.append((b, "not selected (--backends)"))
        elif op is not None and b not in _backend.families(op):
            out.append((b, f"ditfast has no {b} implementation of {op}"))
        else:
            ok, why = _backend.availability(b, device.type)
            out.append((b, None if ok else why))
    return out


def attention_backends(device: torch.device, allowed) -> List[tuple]:
    """[(backend, skip reason or None)] of ditfast's attention backends but the reference (= "eager")."""
    out = []
    for name, ok, why in ops.backend_report(device.type):
        if name != "reference":
            out.append((name, "not selected (--backends)" if allowed is not None and name not in allowed
                        else (None if ok else why or "unavailable")))
    return out


def _like(device: torch.device, dtype: torch.dtype, width: int) -> torch.Tensor:
    return torch.empty(1, 1, 1, width, device=device, dtype=dtype)


def auto_label(device: torch.device, dtype: torch.dtype, op: Optional[str] = None, H=None, Dh=None,
               width: Optional[int] = None, features=()) -> Optional[str]:
    """What ditfast's automatic row runs, labelled by device (``compiled C++ CPU`` / ``compiled CUDA``
    for the extension): for ``op`` at row width ``width`` (D, or Dh for the rope ops), or
    "<ops> | attn <attention>" for a block. The same resolution the ops make (request included)."""
    try:
        if op is not None:
            like = _like(device, dtype, width) if width else None
            return _backend.label(op, _backend.chosen_name(op, device, like, features), device.type)
        w = {"rms_norm": Dh, "apply_rope": Dh, "qk_norm_rope": Dh, "prepare_attention": Dh}
        names = sorted({_backend.label(o, _backend.chosen_name(o, device, _like(device, dtype, w.get(o) or H * Dh)),
                                       device.type)
                        for o in _backend.ops() if o != "joint_attention"})
        t = torch.empty(1, 1, H, Dh, device=device, dtype=dtype)
        return f"{'+'.join(names)} | attn {ops.choose_backend(t, t, t)}"
    except Exception:  # noqa: BLE001 - a label, never fatal
        return None


# ----------------------------------------------------------------------------------------- ops
def rope_tables(L: int, Dh: int, device):
    """fp32 (cos, sin) of shape (L, Dh/2): FLUX's 3-axis layout for Dh = 128, else one axis."""
    side, pos = max(1, int(L ** 0.5)), torch.arange(L, device=device)
    if Dh == 128:
        return ops.rope_freqs(torch.stack([torch.zeros_like(pos), pos // side, pos % side], -1), (16, 56, 56))
    return ops.rope_freqs(pos[:, None], (Dh,))


def op_inputs(case: Case, device, dtype):
    """(leaves, invoke): the op's inputs and ``invoke(fn)``, which calls an op-shaped function on them."""
    name, d = case.name, case.dims
    if name == "gelu_tanh_backward":  # a backward op: plain inputs, nothing to differentiate
        dy, pre = (torch.randn(d["T"], d["N"], device=device).to(dtype) for _ in range(2))
        return [], lambda fn: fn(dy, pre)
    if name == "swiglu":  # the packed [gate | up] columns of one projection
        x = leaf((d["T"], 2 * d["N"]), device, dtype)
        return [x], lambda fn: fn(x)
    if "H" not in d:
        B, L, D = d["B"], d["L"], d["D"]
        x, vecs = leaf((B, L, D), device, dtype), [leaf((B, D), device, dtype, scale=0.1) for _ in range(4)]
        if name == "norm_modulate":
            args = [x] + vecs[:2]
        elif name == "norm_modulate_dual":
            args = [x] + vecs
        elif name in ("gated_residual", "gated_residual_norm_modulate"):
            args = [x, leaf((B, L, D), device, dtype)] + vecs[: 1 if name == "gated_residual" else 3]
        else:
            raise ValueError(f"unknown op case {name!r}")
        if case.params.get("sandwich"):  # Z-Image's options: RMSNorm with weights, tanh gates, the branch's post-norm
            w, wy = (1 + 0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_(), \
                (1 + 0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_()
            if name == "norm_modulate":
                args = [x, None, vecs[1]]
                opts = dict(norm="rms", weight=w)
            elif name == "gated_residual":
                opts = dict(gate_act="tanh", y_weight=wy)
            else:
                args = args[:3] + [None, args[4]]
                opts = dict(norm="rms", weight=w, gate_act="tanh", y_weight=wy)
            leaves = [a for a in args if a is not None] + [t for t in (w, wy) if any(t is o for o in opts.values())]
            return leaves, lambda fn: fn(*args, **opts)
        return args, lambda fn: fn(*args)
    B, L, H, Dh = d["B"], d["L"], d["H"], d["Dh"]
    w = lambda: (1 + 0.1 * torch.randn(Dh, device=device)).to(dtype).requires_grad_()  # noqa: E731
    if name == "rms_norm":
        x, weight = leaf((B, L, H, Dh), device, dtype), w()
        return [x, weight], lambda fn: fn(x, weight)
    cos, sin = rope_tables(L, Dh, device)
    if name == "apply_rope":
        x = leaf((B, L, H, Dh), device, dtype)
        return [x], lambda fn: fn(x, cos, sin)
    if name == "qk_norm_rope":  # q and k: strided views of one packed qkv projection, as in the blocks
        qkv, qw, kw = leaf((B, L, 3, H, Dh), device, dtype), w(), w()
        return [qkv, qw, kw], lambda fn: fn(*qkv.unbind(2)[:2], qw, kw, cos, sin)
    raise ValueError(f"unknown op case {name!r}")


def op_variants(case: Case, ctx) -> List[VariantSpec]:
    leaves, invoke = op_inputs(case, ctx.device, ctx.dtype)
    op_fn, ref_fn = getattr(ops, case.name), getattr(reference, case.name)

    def spec(name, kind, fn, backend=None, **kw):
        return VariantSpec(name, kind, lambda: Built(with_backend(backend, lambda: invoke(fn)), leaves),
                           backend=backend, **kw)

    width = case.dims.get("Dh", case.dims.get("D", case.dims.get("N")))
    # the options a sandwich case sets are implementation features (ditfast/ops/modulate.py)
    features = _SANDWICH_FEATURES[case.name] if case.params.get("sandwich") else ()
    specs = [VariantSpec("ditfast", "ditfast", lambda: Built(lambda: invoke(op_fn), leaves),
                         backend=auto_label(ctx.device, ctx.dtype, case.name, width=width, features=features))]
    for b, why in op_backends(case.name, ctx.device, ctx.backends):
        if why is None and features and b not in _backend.families(case.name, features):
            why = f"ditfast's {b} family has no {'+'.join(features)} option of {case.name}"
        specs.append(skipped(f"ditfast:{b}", "backend", why, b) if why else spec(f"ditfast:{b}", "backend", op_fn, b))
    if case.name == "gelu_tanh_backward":  # what autograd runs unfused: aten's gelu_backward, then the sum
        ref_fn = _autograd_gelu_bias_backward
    cfn = compiled(ref_fn)
    return specs + [spec("eager", "peer", ref_fn),
                    ctx.compile_spec("compile", case, lambda: Built(lambda: invoke(cfn), leaves))]


_SANDWICH_FEATURES = {"norm_modulate": ("rms", "norm_weight"), "gated_residual": ("tanh_gate", "post_norm"),
                      "gated_residual_norm_modulate": ("rms", "norm_weight", "tanh_gate", "post_norm")}


def _autograd_gelu_bias_backward(dy, pre):
    d = torch.ops.aten.gelu_backward(dy, pre, approximate="tanh")
    return d, d.sum(0)


def attention_variants(case: Case, ctx) -> List[VariantSpec]:
    d = case.dims
    q, k, v = (leaf((d["B"], d["L"], d["H"], d["Dh"]), ctx.device, ctx.dtype) for _ in range(3))

    def spec(name, kind, fn, **kw):
        return VariantSpec(name, kind, lambda: Built(lambda: fn(q, k, v), [q, k, v]), **kw)

    # a key-padding mask (case.params["key_lengths"]): ditfast takes the counts; the peers SDPA's boolean
    # mask, as diffusers passes it
    lengths, mask = case.params.get("key_lengths"), None
    if lengths:
        keep = torch.arange(d["L"], device=ctx.device)[None, :] < torch.tensor(lengths, device=ctx.device)[:, None]
        mask = keep[:, None, None, :]

    def sdpa(q, k, v):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        return t(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask))

    def attend(q, k, v, backend=None):
        return ops.joint_attention(q, k, v, backend=backend, key_lengths=lengths)

    t = torch.empty(1, 1, d["H"], d["Dh"], device=ctx.device, dtype=ctx.dtype)
    specs = [spec("ditfast", "ditfast", attend, backend=ops.choose_backend(t, t, t))]
    for b, why in attention_backends(ctx.device, ctx.backends):
        specs.append(skipped(f"ditfast:{b}", "backend", why, b) if why else
                     spec(f"ditfast:{b}", "backend", lambda q, k, v, b=b: attend(q, k, v, b), backend=b))
    if lengths:  # eager: what diffusers runs with a padding mask (SDPA, boolean mask); compiled: the same
        cfn = compiled(sdpa)
        return specs + [spec("eager", "peer", sdpa),
                        ctx.compile_spec("compile", case, lambda: Built(lambda: cfn(q, k, v), [q, k, v]))]
    cfn = compiled(reference.joint_attention)
    return specs + [spec("eager", "peer", reference.joint_attention), spec("sdpa", "peer", sdpa),
                    ctx.compile_spec("compile", case, lambda: Built(lambda: cfn(q, k, v), [q, k, v]))]


# ----------------------------------------------------------------------------------------- blocks
class Stack(nn.Module):
    """``depth`` blocks applied in turn (the train level's DiT stack)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, *cond):
        for blk in self.blocks:
            x = blk(x, *cond)
        return x


def _make(device, dtype, ctor) -> nn.Module:
    with torch.device(device):
        return ctor().to(dtype)


def ditfast_block(case: Case, device, dtype) -> nn.Module:
    from .. import nn as dnn

    d = case.dims
    r = d["M"] / d["D"]
    ctor = {"DiTBlock": lambda: dnn.DiTBlock(d["D"], d["H"], r),
            "DoubleStreamBlock": lambda: dnn.DoubleStreamBlock(d["D"], d["H"], r, qkv_bias=True),
            "SingleStreamBlock": lambda: dnn.SingleStreamBlock(d["D"], d["H"], r),
            "JointBlock": lambda: dnn.JointBlock(d["D"], d["H"], r, qk_norm=case.params.get("qk_norm"))}[case.name]
    depth = case.params.get("depth")
    return _make(device, dtype, (lambda: Stack([ctor() for _ in range(depth)])) if depth else ctor)


def diffusers_block(case: Case, device, dtype) -> nn.Module:
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    d = case.dims
    D, H = d["D"], d["H"]
    ctor = {  # diffusers' DiT block embeds timestep and class label inside every block
        "DiTBlock": lambda: BasicTransformerBlock(D, H, D // H, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                                  attention_bias=True, norm_type="ada_norm_zero",
                                                  norm_elementwise_affine=False, norm_eps=1e-6),
        "DoubleStreamBlock": lambda: FluxTransformerBlock(D, H, D // H),
        "SingleStreamBlock": lambda: FluxSingleTransformerBlock(D, H, D // H, mlp_ratio=d["M"] / D),
        "JointBlock": lambda: JointTransformerBlock(D, H, D // H, context_pre_only=False,
                                                    qk_norm="rms_norm" if case.params.get("qk_norm") else None),
    }[case.name]
    depth = case.params.get("depth")
    return _make(device, dtype, (lambda: nn.ModuleList([ctor() for _ in range(depth)])) if depth else ctor)


def _ids(Lt: int, Li: int, device) -> torch.Tensor:
    """FLUX position ids [txt (zeros); img (0, row, col)] as floats, (Lt + Li, 3)."""
    side, p = max(1, int(Li ** 0.5)), torch.arange(Li, device=device)
    img = torch.stack([torch.zeros_like(p), p // side, p % side], -1)
    return torch.cat([torch.zeros(Lt, 3, device=device, dtype=img.dtype), img]).float()


def block_callers(case: Case, device, dtype):
    """(leaves, call_ditfast(module), call_diffusers(module) or None) for a block case."""
    d, n = case.dims, case.name
    B, D = d["B"], d["D"]
    cond = leaf((B, D), device, dtype)
    if n in ("DiTBlock", "SingleStreamBlock"):
        x = leaf((B, d["L"], D), device, dtype)
        leaves, streams = [x, cond], None
    elif n == "DoubleStreamBlock":
        img, txt = leaf((B, d["Li"], D), device, dtype), leaf((B, d["Lt"], D), device, dtype)
        leaves = [img, txt, cond]
    else:
        ctx_, x = leaf((B, d["Lc"], D), device, dtype), leaf((B, d["Lx"], D), device, dtype)
        leaves = [ctx_, x, cond]
    ids = None
    if n == "SingleStreamBlock":
        ids = _ids(case.params["txt"], d["L"] - case.params["txt"], device)
    elif n == "DoubleStreamBlock":
        ids = _ids(d["Lt"], d["Li"], device)
    rope = ops.rope_freqs(ids, case.params["axes_dim"]) if ids is not None else None
    call = {"DiTBlock": lambda m: m(x, cond), "DoubleStreamBlock": lambda m: m(img, txt, cond, rope),
            "SingleStreamBlock": lambda m: m(x, cond, rope), "JointBlock": lambda m: m(ctx_, x, cond)}[n]
    if diffusers_problem():
        return leaves, call, None
    if n == "DiTBlock":
        t, y = (torch.randint(0, 1000, (B,), device=device) for _ in range(2))

        def diff(m):
            h = x
            for blk in (m if isinstance(m, nn.ModuleList) else [m]):
                h = blk(h, timestep=t, class_labels=y)
            return h
    elif n == "JointBlock":
        diff = lambda m: m(hidden_states=x, encoder_hidden_states=ctx_, temb=cond)  # noqa: E731
    else:
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed

        drope = FluxPosEmbed(theta=10000, axes_dim=list(case.params["axes_dim"]))(ids)
        if n == "DoubleStreamBlock":
            diff = lambda m: m(hidden_states=img, encoder_hidden_states=txt, temb=cond, image_rotary_emb=drope)  # noqa: E731
        else:
            Lt = case.params["txt"]
            diff = lambda m: m(hidden_states=x[:, Lt:], encoder_hidden_states=x[:, :Lt], temb=cond,  # noqa: E731
                               image_rotary_emb=drope)
    return leaves, call, diff


def regional_compile(module: nn.Module) -> nn.Module:
    """A stack is compiled block by block (as diffusers' compile_repeated_blocks does), else whole."""
    if isinstance(module, (Stack, nn.ModuleList)):
        blocks = [compiled(b) for b in (module.blocks if isinstance(module, Stack) else module)]
        return Stack(blocks) if isinstance(module, Stack) else nn.ModuleList(blocks)
    return compiled(module)


def block_variants(case: Case, ctx) -> List[VariantSpec]:
    leaves, call, diff = block_callers(case, ctx.device, ctx.dtype)
    shared = {}

    def module():  # one ditfast module shared by ditfast / backends / eager / compile
        if "m" not in shared:
            shared["m"] = ditfast_block(case, ctx.device, ctx.dtype)
        return shared["m"]

    d = case.dims
    unfused = unfused_prepare_note(ctx.device, ctx.dtype, d["D"] // d["H"]) if case.name != "DiTBlock" else None

    def built(backend, wrap=None):
        def build():
            m = module()
            target = wrap(m) if wrap else m
            notes = [unfused] if unfused and backend != "reference" and wrap is None else []
            return Built(with_backend(backend, lambda: call(target)), leaves + list(m.parameters()), notes)
        return build

    def diffusers(wrap=None):
        def build():
            m = diffusers_block(case, ctx.device, ctx.dtype)
            target = wrap(m) if wrap else m
            return Built(lambda: diff(target), leaves + list(m.parameters()))
        return build

    d = case.dims
    specs = [VariantSpec("ditfast", "ditfast", built(None), backend=auto_label(ctx.device, ctx.dtype, H=d["H"], Dh=d["D"] // d["H"]))]
    for b, why in op_backends(None, ctx.device, ctx.backends):
        specs.append(skipped(f"ditfast:{b}", "backend", why, b) if why else VariantSpec(f"ditfast:{b}", "backend", built(b), backend=b))
    specs.append(VariantSpec("eager", "peer", built("reference")))
    no_diff = diffusers_problem() or "diffusers is not installed"
    specs.append(VariantSpec("diffusers", "peer", diffusers()) if diff else skipped("diffusers", "peer", no_diff))
    specs.append(ctx.compile_spec("compile", case, built("reference", regional_compile)))
    specs.append(ctx.compile_spec("diffusers+compile", case, diffusers(regional_compile)) if diff
                 else skipped("diffusers+compile", "peer", no_diff))
    return specs


# ----------------------------------------------------------------------------------------- models
FWD_ONLY = "the models level measures inference; training steps are the train level"


def count_linear_flops(module: nn.Module, run: Callable[[], object]) -> float:
    """2·tokens·in·out summed over every nn.Linear call made by ``run()`` (forward hooks)."""
    total = [0.0]

    def hook(mod, args, _out):
        total[0] += 2.0 * args[0].numel() * mod.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def build_model(case: Case, device, dtype):
    """(model, inputs) of a diffusers transformer with random weights at the case's widths."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.utils import logging as dlog

    p, d = case.params, case.dims
    B, D, H = d["B"], d["D"], d["H"]
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    common = dict(in_channels=p["in_channels"], attention_head_dim=D // H, num_attention_heads=H,
                  joint_attention_dim=p["ctx"], pooled_projection_dim=p["pooled"])
    if case.name == "FluxTransformer2DModel":
        ctor = lambda: FluxTransformer2DModel(patch_size=1, num_layers=p["double"], num_single_layers=p["single"],  # noqa: E731
                                              guidance_embeds=True, axes_dims_rope=tuple(p["axes_dim"]), **common)
        Li, Lt = d["Li"], d["Lt"]
        inputs = dict(hidden_states=rnd(B, Li, p["in_channels"]), encoder_hidden_states=rnd(B, Lt, p["ctx"]),
                      pooled_projections=rnd(B, p["pooled"]), timestep=torch.full((B,), 0.5, device=device, dtype=dtype),
                      img_ids=_ids(0, Li, device), txt_ids=torch.zeros(Lt, 3, device=device),
                      guidance=torch.full((B,), 3.5, device=device, dtype=dtype), return_dict=False)
        L, blocks = Li + Lt, p["double"] + p["single"]
    else:
        S = d["S"]
        ctor = lambda: SD3Transformer2DModel(sample_size=S, patch_size=2, num_layers=p["layers"],  # noqa: E731
                                             caption_projection_dim=D, out_channels=p["in_channels"],
                                             pos_embed_max_size=p["pos_max"], qk_norm=p.get("qk_norm"), **common)
        inputs = dict(hidden_states=rnd(B, p["in_channels"], S, S), encoder_hidden_states=rnd(B, d["Lc"], p["ctx"]),
                      pooled_projections=rnd(B, p["pooled"]), timestep=torch.full((B,), 500.0, device=device, dtype=dtype),
                      return_dict=False)
        L, blocks = (S // 2) ** 2 + d["Lc"], p["layers"]
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its "modules to keep in float32" warning is about from_pretrained
    try:
        model = _make(device, dtype, ctor).eval()
    finally:
        dlog.set_verbosity(level)
    case.work = {"fwd": count_linear_flops(model, lambda: model(**inputs)) +
                 blocks * attention_flops(B, H, L, L, D // H)["fwd"], "fwd_bwd": None}
    return model, inputs


def model_variants(case: Case, ctx) -> List[VariantSpec]:
    problem = diffusers_problem()
    if problem:
        why = f"{problem} (the models level runs diffusers' transformers)"
        return [skipped(n, k, why) for n, k in (("ditfast", "ditfast"), ("diffusers", "peer"), ("diffusers+compile", "peer"))]
    import ditfast

    model, inputs = build_model(case, ctx.device, ctx.dtype)
    d = case.dims

    def patched() -> Built:
        target = copy.deepcopy(model)  # the eager model stays unpatched
        ditfast.patch(target)
        return Built(lambda: target(**inputs), notes=["ditfast.patch on a copy of the diffusers model"])

    def compiled_model() -> Built:  # mutates the model: this variant runs last
        if hasattr(model, "compile_repeated_blocks"):
            model.compile_repeated_blocks(dynamic=False)
            return Built(lambda: model(**inputs), notes=["torch.compile: diffusers' compile_repeated_blocks"])
        whole = compiled(model)
        return Built(lambda: whole(**inputs), notes=["torch.compile of the whole model"])

    return [VariantSpec("ditfast", "ditfast", patched, backend=auto_label(ctx.device, ctx.dtype, H=d["H"], Dh=d["D"] // d["H"]),
                        fwd_only=FWD_ONLY),
            VariantSpec("diffusers", "peer", lambda: Built(lambda: model(**inputs)), fwd_only=FWD_ONLY),
            ctx.compile_spec("diffusers+compile", case, compiled_model, fwd_only=FWD_ONLY)]
