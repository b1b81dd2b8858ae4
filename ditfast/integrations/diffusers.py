"""``patch(model)`` / ``unpatch(model)``: run a diffusers DiT / SD3 / FLUX transformer on ditfast, in place.

``patch`` gives every supported block of the model an instance attribute ``forward``: a ditfast
forward bound to that block (a ``functools.partial``), with the block's diffusers signature and
return convention, reading the block's own modules and parameters (no copies, no new parameters
or buffers, state_dict keys unchanged). ``unpatch`` deletes those attributes, so the class forward
runs again, bit for bit.

Supported blocks (exact diffusers classes, diffusers >= 0.35):

================================  ==================================================================
``FluxTransformerBlock``          FLUX.1 double-stream block (``FluxTransformer2DModel``)
``FluxSingleTransformerBlock``    FLUX.1 single-stream block
``JointTransformerBlock``         SD3 / SD3.5 block, QK-norm, dual attention, pre-only last block
                                  (``SD3Transformer2DModel``)
``BasicTransformerBlock``         ``norm_type="ada_norm_zero"`` (``DiTTransformer2DModel``) and
                                  ``"ada_norm_single"`` (``PixArtTransformer2DModel``, in ``_pixart``)
``QwenImageTransformerBlock``     Qwen-Image double-stream block (``QwenImageTransformer2DModel``,
                                  Qwen-Image-Edit / 2509 / 2511, 2512, ``QwenImageControlNetModel``)
``ZImageTransformerBlock``        Z-Image single-stream "sandwich" block, its refiners included
                                  (``ZImageTransformer2DModel``: Turbo, Base, Omni)
``Flux2TransformerBlock``         FLUX.2 double-stream block (``Flux2Transformer2DModel``)
``Flux2SingleTransformerBlock``   FLUX.2 single-stream block (packed ``[q|k|v|gate|up]`` projection)
``Flux3ModeTransformerBlock``     FLUX.3 per-mode parallel-residual block (``Flux3Transformer2DModel``)
``Flux3SingleTransformerBlock``   FLUX.3 joint single block over [text; content]
``HunyuanVideoTransformerBlock``  HunyuanVideo 1.0 double / single blocks (``HunyuanVideoTransformer3DModel``)
``HunyuanVideoSingleTransformerBlock``
``HunyuanVideo15TransformerBlock``
                                  HunyuanVideo 1.5 double-stream block (``HunyuanVideo15Transformer3DModel``)
``WanTransformerBlock``           Wan 2.x self-attention + cross-attention block (``WanTransformer3DModel``)
================================  ==================================================================

What stays diffusers: the embedders, ``norm_out`` / ``proj_out``, every Linear and MLP module
(called as modules, so LoRA / PEFT and quantized layers keep working) and every forward call a
block cannot take (IP-adapter kwargs, attention masks, a changed attention processor, float64):
those calls run the original forward. Each family's module (``_flux``, ``_sd3``, ``_dit``) says
exactly when.

Hooks (ditfast/integrations/_hooks.py): hooks on a patched block wrap ditfast's forward (diffusers'
first-block cache, block-level group offloading). A block that already carries diffusers or
accelerate hooks when ``patch`` runs is patched beneath them (its hook chain then ends in ditfast's
forward; ``unpatch`` restores the class forward there); any other instance ``forward`` is refused.
When a submodule a block does not call carries hooks, the hooks still see it called: FLUX blocks
call their attention module (hooks and processor) in place of ditfast's attention step when the
hooks sit on it or its QK-norms (FasterCache, Pyramid Attention Broadcast, TaylorSeer, leaf-level
offloading); any other such hook (and any on SD3 / DiT blocks' attention) makes the block run
diffusers' forward for that call, with a one-time warning.

Errors: ``patch`` raises :class:`UnsupportedModelError` naming each block it cannot run and why
(nothing is patched then), or when the model has no supported blocks at all; ``TypeError`` for an
object that is neither a module nor a pipeline with a ``transformer``. Patching twice is a no-op.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

from torch import nn

from . import (_context_parallel, _dit, _flux, _flux2, _flux3, _hooks, _hunyuanvideo, _hunyuanvideo15, _qwenimage, _sd3,
               _wan, _zimage)
from ._common import BlockSpec

__all__ = ["patch", "unpatch", "is_patched", "UnsupportedModelError", "SUPPORTED_BLOCKS"]

_SPECS: Dict[str, BlockSpec] = {s.name: s for s in _flux.SPECS + _sd3.SPECS + _dit.SPECS + _qwenimage.SPECS
                                 + _zimage.SPECS + _flux2.SPECS + _flux3.SPECS + _wan.SPECS + _hunyuanvideo.SPECS
                                 + _hunyuanvideo15.SPECS}
_FORWARDS = frozenset(s.forward for s in _SPECS.values())
SUPPORTED_BLOCKS: Tuple[str, ...] = tuple(_SPECS)
# what each block class serves, and what runs diffusers' forward instead (python -m ditfast.info prints it)
FAMILIES: Dict[str, Tuple[str, str]] = {
    "FluxTransformerBlock": ("FLUX.1 double-stream (FluxTransformer2DModel, FluxControlNetModel)",
                             "IP-adapter kwargs, masks, custom processors, float64"),
    "FluxSingleTransformerBlock": ("FLUX.1 single-stream", "as the double-stream block"),
    "JointTransformerBlock": ("SD3 / SD3.5 MM-DiT (SD3Transformer2DModel, SD3ControlNetModel)",
                              "masks, custom processors, hooked attention, float64"),
    "BasicTransformerBlock": ("DiT, norm_type='ada_norm_zero' (DiTTransformer2DModel); PixArt-α / Σ, "
                              "norm_type='ada_norm_single' (PixArtTransformer2DModel)",
                              "other norm types (refused at patch), a T5 mask that is not a prefix, hooked attention, "
                              "float64"),
    "QwenImageTransformerBlock": ("Qwen-Image, 2512, Edit / 2509 / 2511, Layered (QwenImageTransformer2DModel, "
                                  "QwenImageControlNetModel)", "a text mask that masks tokens, kwargs, float64"),
    "ZImageTransformerBlock": ("Z-Image Turbo / Base / Omni, refiners included (ZImageTransformer2DModel)",
                               "an attn_mask that is not a prefix per sample, float64"),
    "Flux2TransformerBlock": ("FLUX.2 dev / klein double-stream (Flux2Transformer2DModel)",
                              "joint_attention_kwargs (the KV-cache modes), custom processors, float64"),
    "Flux2SingleTransformerBlock": ("FLUX.2 single-stream ([q|k|v|gate|up] in one projection)",
                                    "as the double-stream block"),
    "Flux3ModeTransformerBlock": ("FLUX.3 per-mode blocks (Flux3Transformer2DModel)",
                                  "custom processors, hooked attention / norm, float64"),
    "Flux3SingleTransformerBlock": ("FLUX.3 joint single blocks over [text; image; reference images]",
                                    "as the per-mode blocks"),
    "HunyuanVideoTransformerBlock": ("HunyuanVideo 1.0 double-stream, [video; text] with the text padding as "
                                     "key lengths (HunyuanVideoTransformer3DModel)",
                                     "masks that are not a prefix, the token-replace (I2V) blocks, float64"),
    "HunyuanVideoSingleTransformerBlock": ("HunyuanVideo 1.0 single-stream", "as the double-stream block"),
    "HunyuanVideo15TransformerBlock": ("HunyuanVideo 1.5 double-stream, [video; image / ByT5 / MLLM tokens] with "
                                       "the padding as key lengths (HunyuanVideo15Transformer3DModel)",
                                       "masks that are not a prefix, custom processors, hooked attention / norms, "
                                       "float64"),
    "WanTransformerBlock": ("Wan 2.1 / 2.2 T2V, I2V, TI2V (WanTransformer3DModel)",
                            "custom processors, hooked attention / norms, float64"),
}
_MARK = "_ditfast_patched"


class UnsupportedModelError(TypeError):
    """The model (or one of its blocks) has a structure ditfast cannot run; the message says what."""


def _spec(module: nn.Module):
    t = type(module)
    return _SPECS.get(t.__name__) if t.__module__.startswith("diffusers.") else None


def _bind(spec: BlockSpec, block: nn.Module) -> functools.partial:
    """``spec.forward`` with the block bound first: unlike a bound method, a partial survives pickling
    (torch.save of a whole model) and deepcopy, and inspect.signature reports the diffusers signature."""
    return functools.partial(spec.forward, block)


def _is_ditfast_forward(f, module: nn.Module) -> bool:
    return isinstance(f, functools.partial) and f.func in _FORWARDS and len(f.args) == 1 and f.args[0] is module


def _is_ours(module: nn.Module) -> bool:
    return _is_ditfast_forward(module.__dict__.get("forward"), module)


def _resolve(obj) -> nn.Module:
    """The nn.Module to patch: a pipeline's ``transformer``; a torch.compile wrapper's original module."""
    if not isinstance(obj, nn.Module):
        transformer = getattr(obj, "transformer", None)
        if transformer is None:
            raise TypeError(
                f"ditfast.patch expects a diffusers transformer model or a pipeline with a .transformer, "
                f"got {type(obj).__name__}" + (" whose transformer is None" if hasattr(obj, "transformer") else "")
            )
        obj = transformer
    if not isinstance(obj, nn.Module):
        raise TypeError(f"ditfast.patch: the pipeline's transformer is a {type(obj).__name__}, not an nn.Module")
    inner = getattr(obj, "_orig_mod", None)  # torch.compile's OptimizedModule
    return inner if isinstance(inner, nn.Module) else obj


def _block_types(model: nn.Module) -> List[str]:
    """Class names of the entries of the model's ModuleLists (its blocks), for error messages."""
    names = {type(m).__name__ for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst}
    return sorted(names) or sorted({type(m).__name__ for m in model.children()})


def _plan(model: nn.Module) -> List[Tuple[nn.Module, BlockSpec]]:
    """The blocks to patch, after checking all of them; raises UnsupportedModelError listing every problem."""
    todo, problems = [], []
    cp_on = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None) is not None
    for name, module in model.named_modules():
        spec = _spec(module)
        if spec is None or _is_ours(module):
            continue
        where = f"{name or '<model>'} ({spec.name})"
        if "forward" in module.__dict__ and _hooks.bottom_forward(module) is None:
            problems.append(f"{where}: its forward is already replaced on the instance (a hook from accelerate, "
                            f"diffusers' cache/offload hooks or another patch); call ditfast.patch before adding hooks")
            continue
        found = spec.check(module)
        if cp_on:
            found = found + _cp_problems(module)
        if found:
            problems.extend(f"{where}: {p}" for p in found)
        else:
            todo.append((module, spec))
    cls = type(model).__name__
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UnsupportedModelError(f"ditfast.patch cannot run {cls} (nothing was patched):\n  {shown}")
    if not todo and not any(_is_ours(m) for m in model.modules()):
        raise UnsupportedModelError(
            f"ditfast.patch found no block it can run in {cls} "
            f"(its blocks: {', '.join(_block_types(model)) or 'none'}); "
            f"supported diffusers blocks: {', '.join(SUPPORTED_BLOCKS)}"
        )
    return todo


def _cp_problems(block: nn.Module) -> List[str]:
    """Under diffusers' context parallelism every attention of a patched block must carry the config
    (its processor's ``_parallel_config``): ditfast's attention then spans the ranks. diffusers only
    gives it to processors that can run context-parallel attention (FLUX's, not SD3's or DiT's)."""
    out = []
    for name in ("attn", "attn1", "attn2"):
        attn = getattr(block, name, None)
        if attn is not None and _context_parallel.parallel_config(attn) is None:
            out.append(f"{name}: the model runs diffusers' context parallelism but this attention's processor "
                       f"({type(getattr(attn, 'processor', None)).__name__}) has no context-parallel config, so "
                       f"neither diffusers nor ditfast can attend across ranks here")
    return out


def patch(model):
    """Run ``model``'s DiT / SD3 / FLUX blocks on ditfast, in place; returns ``model``.

    ``model``: a diffusers ``FluxTransformer2DModel``, ``SD3Transformer2DModel``,
    ``DiTTransformer2DModel`` (or another model built from the same blocks), a torch.compile wrapper
    of one, or a pipeline, whose ``.transformer`` is patched. Patching a patched model does nothing.
    """
    target = _resolve(model)
    if getattr(target, _MARK, False):
        return model
    for block, spec in _plan(target):
        if "forward" in block.__dict__:  # beneath diffusers' / accelerate's hooks (checked by _plan)
            _hooks.set_bottom_forward(block, _bind(spec, block),
                                      expect=lambda f, b=block: _hooks.is_class_forward(f, b))
        else:
            block.forward = _bind(spec, block)
    setattr(target, _MARK, True)
    return model


def unpatch(model):
    """Undo :func:`patch`: every block runs its diffusers forward again. Returns ``model``; a model
    that was never patched is returned unchanged."""
    target = _resolve(model)
    for module in target.modules():
        if _is_ours(module):
            del module.forward
        elif "forward" in module.__dict__:  # ditfast's forward beneath diffusers' / accelerate's hooks
            _hooks.set_bottom_forward(module, None, expect=lambda f, m=module: _is_ditfast_forward(f, m))
    if _MARK in target.__dict__:
        delattr(target, _MARK)
    return model


def is_patched(model) -> bool:
    """Whether :func:`patch` has been applied to ``model`` (or the pipeline's transformer)."""
    return bool(getattr(_resolve(model), _MARK, False))
