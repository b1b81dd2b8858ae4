"""Variants of the "blocks" and "train" levels: ditfast.nn blocks (automatic and forced backends)
against the same block on the reference ops (eager and torch.compile) and diffusers' equivalent
block (eager and compiled) when diffusers is installed.

"eager" and "compile" run the very same ditfast.nn module under ``use_backend("reference")``: the
plain-PyTorch composition of the block. The "train" level times a stack of blocks (a training
step's forward + backward) and records its peak memory.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn

from .. import ops
from .cases import Case
from .variants import (
    Built,
    VariantSpec,
    compile_fn,
    forced_backends,
    installed,
    leaf,
    skipped,
    with_backend,
)


class Stack(nn.Module):
    """``depth`` blocks applied in turn: forward(x, *cond) -> x (the train level's DiT stack)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, *cond, **kw):
        for blk in self.blocks:
            x = blk(x, *cond, **kw)
        return x


def _make(device, dtype, ctor: Callable[[], nn.Module]) -> nn.Module:
    with torch.device(device):
        module = ctor()
    return module.to(dtype)


def ditfast_block(case: Case, device, dtype) -> nn.Module:
    from .. import nn as dnn

    d, name = case.dims, case.name
    ratio = d["M"] / d["D"]
    ctors = {
        "DiTBlock": lambda: dnn.DiTBlock(d["D"], d["H"], ratio),
        "DoubleStreamBlock": lambda: dnn.DoubleStreamBlock(d["D"], d["H"], ratio, qkv_bias=True),
        "SingleStreamBlock": lambda: dnn.SingleStreamBlock(d["D"], d["H"], ratio),
        "JointBlock": lambda: dnn.JointBlock(d["D"], d["H"], ratio, qk_norm=case.params.get("qk_norm")),
    }
    depth = case.params.get("depth")
    if depth:
        return _make(device, dtype, lambda: Stack([ctors[name]() for _ in range(depth)]))
    return _make(device, dtype, ctors[name])


def diffusers_block(case: Case, device, dtype) -> nn.Module:
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    d, name = case.dims, case.name
    D, H = d["D"], d["H"]
    ctors = {
        # diffusers' DiT block embeds timestep and class label inside every block (its DiT port does)
        "DiTBlock": lambda: BasicTransformerBlock(D, H, D // H, activation_fn="gelu-approximate",
                                                  num_embeds_ada_norm=1000, attention_bias=True,
                                                  norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                                  norm_eps=1e-6),
        "DoubleStreamBlock": lambda: FluxTransformerBlock(D, H, D // H),
        "SingleStreamBlock": lambda: FluxSingleTransformerBlock(D, H, D // H, mlp_ratio=d["M"] / D),
        "JointBlock": lambda: JointTransformerBlock(D, H, D // H, context_pre_only=False,
                                                    qk_norm="rms_norm" if case.params.get("qk_norm") else None),
    }
    depth = case.params.get("depth")
    if depth:
        return _make(device, dtype, lambda: nn.ModuleList([ctors[name]() for _ in range(depth)]))
    return _make(device, dtype, ctors[name])


def _ids(Lt: int, Li: int, device) -> torch.Tensor:
    """FLUX position ids [txt (zeros); img (0, row, col)] as floats, (Lt + Li, 3)."""
    side = max(1, int(Li ** 0.5))
    p = torch.arange(Li, device=device)
    img = torch.stack([torch.zeros_like(p), p // side, p % side], -1)
    return torch.cat([torch.zeros(Lt, 3, device=device, dtype=img.dtype), img]).float()


class BlockInputs:
    """The activations of a block case (leaves with grad), shared by every variant of the case."""

    def __init__(self, case: Case, device, dtype):
        d, self.name = case.dims, case.name
        B, D = d["B"], d["D"]
        self.case, self.device = case, device
        self.cond = leaf((B, D), device, dtype)
        if case.name in ("DiTBlock", "SingleStreamBlock"):
            L = d["L"]
            self.x = leaf((B, L, D), device, dtype)
            self.leaves = [self.x, self.cond]
            if case.name == "SingleStreamBlock":
                Lt = case.params["txt"]
                self.ids = _ids(Lt, L - Lt, device)
        elif case.name == "DoubleStreamBlock":
            self.img, self.txt = leaf((B, d["Li"], D), device, dtype), leaf((B, d["Lt"], D), device, dtype)
            self.leaves = [self.img, self.txt, self.cond]
            self.ids = _ids(d["Lt"], d["Li"], device)
        elif case.name == "JointBlock":
            self.x, self.ctx = leaf((B, d["Lx"], D), device, dtype), leaf((B, d["Lc"], D), device, dtype)
            self.leaves = [self.ctx, self.x, self.cond]
        else:
            raise ValueError(f"unknown block {case.name!r}")
        self.rope = ops.rope_freqs(self.ids, case.params["axes_dim"]) if hasattr(self, "ids") else None

    def call_ditfast(self, m: nn.Module):
        n = self.name
        if n == "DiTBlock":
            return m(self.x, self.cond)
        if n == "DoubleStreamBlock":
            return m(self.img, self.txt, self.cond, self.rope)
        if n == "SingleStreamBlock":
            return m(self.x, self.cond, self.rope)
        return m(self.ctx, self.x, self.cond)

    def diffusers_caller(self) -> Callable[[nn.Module], object]:
        """f(module) calling a diffusers block (or a ModuleList stack of them) on these inputs."""
        n, d = self.name, self.case.dims
        if n == "DiTBlock":
            B = d["B"]
            t = torch.randint(0, 1000, (B,), device=self.device)
            y = torch.randint(0, 1000, (B,), device=self.device)

            def one(m, x):
                return m(x, timestep=t, class_labels=y)

            def call(m):
                x = self.x
                for blk in (m if isinstance(m, nn.ModuleList) else [m]):
                    x = one(blk, x)
                return x

            return call
        if n in ("DoubleStreamBlock", "SingleStreamBlock"):
            from diffusers.models.transformers.transformer_flux import FluxPosEmbed

            rope = FluxPosEmbed(theta=10000, axes_dim=list(self.case.params["axes_dim"]))(self.ids)
            if n == "DoubleStreamBlock":
                return lambda m: m(hidden_states=self.img, encoder_hidden_states=self.txt, temb=self.cond,
                                   image_rotary_emb=rope)
            Lt = self.case.params["txt"]
            txt, img = self.x[:, :Lt], self.x[:, Lt:]
            return lambda m: m(hidden_states=img, encoder_hidden_states=txt, temb=self.cond, image_rotary_emb=rope)
        return lambda m: m(hidden_states=self.x, encoder_hidden_states=self.ctx, temb=self.cond)


def regional_compile(module: nn.Module) -> nn.Module:
    """A compiled view of ``module`` that leaves it untouched: a stack is compiled block by block
    (regional compilation, as diffusers' compile_repeated_blocks does), anything else whole."""
    if isinstance(module, Stack):
        return Stack([compile_fn(b) for b in module.blocks])
    if isinstance(module, nn.ModuleList):
        return nn.ModuleList([compile_fn(b) for b in module])
    return compile_fn(module)


def block_variants(case: Case, ctx) -> List[VariantSpec]:
    inputs = BlockInputs(case, ctx.device, ctx.dtype)
    shared = {}

    def module() -> nn.Module:  # one ditfast module shared by ditfast / eager / compile / backends
        if "m" not in shared:
            shared["m"] = ditfast_block(case, ctx.device, ctx.dtype)
        return shared["m"]

    def built(backend, make=None) -> Callable[[], Built]:
        def build():
            m = module()
            target = make(m) if make else m
            return Built(with_backend(backend, lambda: inputs.call_ditfast(target)),
                         inputs.leaves + list(m.parameters()))
        return build

    specs = [
        VariantSpec("ditfast", "ditfast", built(None), backend=ctx.auto_label(case.dims["H"], case.dims["D"] // case.dims["H"])),
        VariantSpec("eager", "peer", built("reference")),
    ]
    compiler = regional_compile
    if ctx.compile_off(case.level):
        specs.append(skipped("compile", "peer", ctx.compile_off(case.level)))
    else:
        specs.append(VariantSpec("compile", "peer", built("reference", compiler), compiled=True))
    specs += _diffusers_variants(case, ctx, inputs, compiler)
    for b, why in forced_backends(ctx.device, None, ctx.backends):
        name = f"ditfast:{b}"
        specs.append(skipped(name, "backend", why, b) if why else
                     VariantSpec(name, "backend", built(b), backend=b))
    return specs


def _diffusers_variants(case: Case, ctx, inputs: BlockInputs, compiler) -> List[VariantSpec]:
    if not installed("diffusers"):
        why = "diffusers is not installed"
        return [skipped("diffusers", "peer", why), skipped("diffusers+compile", "peer", why)]
    call = inputs.diffusers_caller()

    def build(compiled: bool):
        def make():
            m = diffusers_block(case, ctx.device, ctx.dtype)
            target = compiler(m) if compiled else m
            return Built(lambda: call(target), inputs.leaves + list(m.parameters()))
        return make

    specs = [VariantSpec("diffusers", "peer", build(False))]
    if ctx.compile_off(case.level):
        specs.append(skipped("diffusers+compile", "peer", ctx.compile_off(case.level)))
    else:
        specs.append(VariantSpec("diffusers+compile", "peer", build(True), compiled=True))
    return specs

