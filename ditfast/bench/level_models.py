"""Variants of the "models" level: a whole diffusers transformer (FLUX- or SD3.5-shaped, random
weights) eager, compiled (regional compilation of its repeated blocks), and patched with
``ditfast.patch`` when that function exists. Inference only: forward under no_grad.

Default GPU depth is reduced (a few blocks of each kind at the real widths; ``--full`` runs the full
depth); time grows linearly with depth. FLOPs are counted on the model: every nn.Linear's matmul
(by forward hooks) plus the attention formula for every joint-attention block.
"""
from __future__ import annotations

import copy
from typing import Callable, List

import torch
from torch import nn

from .cases import Case, attention_flops
from .variants import Built, VariantSpec, installed, skipped

FWD_ONLY = "the models level measures inference; training steps are the train level"


def count_linear_flops(module: nn.Module, run: Callable[[], object]) -> float:
    """2·tokens·in·out summed over every nn.Linear call made by ``run()`` (forward hooks)."""
    total = [0.0]

    def hook(mod, args, _out):
        x = args[0]
        total[0] += 2.0 * (x.numel() // mod.in_features) * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def build_model(case: Case, device, dtype) -> nn.Module:
    p, d = case.params, case.dims
    if case.name == "FluxTransformer2DModel":
        from diffusers import FluxTransformer2DModel

        ctor = lambda: FluxTransformer2DModel(  # noqa: E731
            patch_size=1, in_channels=p["in_channels"], num_layers=p["double"], num_single_layers=p["single"],
            attention_head_dim=d["D"] // d["H"], num_attention_heads=d["H"], joint_attention_dim=p["ctx"],
            pooled_projection_dim=p["pooled"], guidance_embeds=True, axes_dims_rope=tuple(p["axes_dim"]))
    elif case.name == "SD3Transformer2DModel":
        from diffusers import SD3Transformer2DModel

        ctor = lambda: SD3Transformer2DModel(  # noqa: E731
            sample_size=d["S"], patch_size=2, in_channels=p["in_channels"], num_layers=p["layers"],
            attention_head_dim=d["D"] // d["H"], num_attention_heads=d["H"], joint_attention_dim=p["ctx"],
            caption_projection_dim=d["D"], pooled_projection_dim=p["pooled"], out_channels=p["in_channels"],
            pos_embed_max_size=p["pos_max"], qk_norm=p.get("qk_norm"))
    else:
        raise ValueError(f"unknown model {case.name!r}")
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its "modules to keep in float32" warning is about from_pretrained
    try:
        with torch.device(device):
            model = ctor()
        return model.to(dtype).eval()
    finally:
        dlog.set_verbosity(verbosity)


def model_inputs(case: Case, device, dtype) -> dict:
    p, d = case.params, case.dims
    B = d["B"]
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    if case.name == "FluxTransformer2DModel":
        Li, Lt = d["Li"], d["Lt"]
        side = max(1, int(Li ** 0.5))
        pos = torch.arange(Li, device=device)
        img_ids = torch.stack([torch.zeros_like(pos), pos // side, pos % side], -1).float()
        return dict(hidden_states=rnd(B, Li, p["in_channels"]), encoder_hidden_states=rnd(B, Lt, p["ctx"]),
                    pooled_projections=rnd(B, p["pooled"]), timestep=torch.full((B,), 0.5, device=device, dtype=dtype),
                    img_ids=img_ids, txt_ids=torch.zeros(Lt, 3, device=device),
                    guidance=torch.full((B,), 3.5, device=device, dtype=dtype), return_dict=False)
    S = d["S"]
    return dict(hidden_states=rnd(B, p["in_channels"], S, S), encoder_hidden_states=rnd(B, d["Lc"], p["ctx"]),
                pooled_projections=rnd(B, p["pooled"]), timestep=torch.full((B,), 500.0, device=device, dtype=dtype),
                return_dict=False)


def attention_part(case: Case) -> float:
    d, p = case.dims, case.params
    Dh = d["D"] // d["H"]
    if case.name == "FluxTransformer2DModel":
        L, blocks = d["Li"] + d["Lt"], p["double"] + p["single"]
    else:
        L, blocks = (d["S"] // 2) ** 2 + d["Lc"], p["layers"]
    return blocks * attention_flops(d["B"], d["H"], L, L, Dh)["fwd"]


def compile_model(model: nn.Module) -> tuple:
    """Regional compilation: diffusers' compile_repeated_blocks where the model declares its blocks,
    else each of its transformer blocks, else the whole model. Returns (callable, how)."""
    if getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(dynamic=False)
        return model, "compile_repeated_blocks"
    lists = [getattr(model, n) for n in ("transformer_blocks", "single_transformer_blocks") if hasattr(model, n)]
    if lists:
        for blocks in lists:
            for blk in blocks:
                blk.compile(dynamic=False)
        return model, "each transformer block compiled"
    return torch.compile(model, dynamic=False), "whole model compiled"


def patch_function():
    """``ditfast.patch``, or ``ditfast.integrations.patch`` where the top-level name is not there yet."""
    import ditfast

    fn = getattr(ditfast, "patch", None)
    if fn is None:
        try:
            from ditfast.integrations import patch as fn
        except ImportError:
            return None
    return fn


def model_variants(case: Case, ctx) -> List[VariantSpec]:
    if not installed("diffusers"):
        why = "diffusers is not installed (the models level runs diffusers' transformers)"
        return [skipped(n, k, why) for n, k in (("ditfast", "ditfast"), ("diffusers", "peer"),
                                                   ("diffusers+compile", "peer"))]
    state = {"model": build_model(case, ctx.device, ctx.dtype)}
    inputs = model_inputs(case, ctx.device, ctx.dtype)
    model = state["model"]
    case.work = {"fwd": count_linear_flops(model, lambda: model(**inputs)) + attention_part(case), "fwd_bwd": None}

    def run(m):
        return lambda: m(**inputs)

    patch = patch_function()

    def patched() -> Built:
        target = copy.deepcopy(model)  # a copy: the eager model stays unpatched
        patch(target)
        return Built(run(target), [], graphable=False, notes=["ditfast.patch on a copy of the diffusers model"])

    def compiled() -> Built:
        target, how = compile_model(model)  # mutates the model: this variant runs last
        return Built(run(target), [], graphable=False, notes=[f"torch.compile: {how}"])

    specs = []
    if patch is not None:
        specs.append(VariantSpec("ditfast", "ditfast", patched, backend=ctx.auto_label(case.dims["H"], case.dims["D"] // case.dims["H"]), fwd_bwd_reason=FWD_ONLY))
    else:
        specs.append(skipped("ditfast", "ditfast", "ditfast.patch is not available in this version"))
    specs.append(VariantSpec("diffusers", "peer", lambda: Built(run(model), [], graphable=False),
                             fwd_bwd_reason=FWD_ONLY))
    if ctx.compile_off(case.level):
        specs.append(skipped("diffusers+compile", "peer", ctx.compile_off(case.level)))
    else:
        specs.append(VariantSpec("diffusers+compile", "peer", compiled, compiled=True, fwd_bwd_reason=FWD_ONLY))
    return specs
