"""Hooks on patched diffusers models: which modules carry them, and patching beneath a block's hooks.

Design note. diffusers' caches (FasterCache, Pyramid Attention Broadcast, TaylorSeer, MagCache, ...)
and its offloading (group offloading, layerwise casting) register hooks through its ``HookRegistry``,
which replaces a module's ``forward`` on the instance; accelerate's hooks do the same (keeping the
old one as ``_old_forward``); plain PyTorch hooks live in ``_forward_hooks`` & co. A hook only runs
when its module is *called*. A patched block calls its Linear and MLP modules, but not the modules
whose work the ditfast ops take over: the adaLN modules (it calls their ``linear`` and ``silu``),
the attention module and its QK-RMSNorms (whose weights the prepare pass reads directly), the
parameter-free LayerNorms. So each patched forward asks, on every call, whether one of those
*bypassed* modules is hooked (:func:`hooked_names`, a few dictionary look-ups). FLUX blocks whose
hooks sit only on the attention module or its QK-norms (FasterCache, Pyramid Attention Broadcast,
TaylorSeer, leaf-level offloading) keep ditfast for the rest of the block and call the attention
module itself, with its processor, in place of ditfast's attention step; any other hooked bypassed
module (and SD3 / DiT blocks with any) makes the block run diffusers' forward for that call, with
a one-time warning. Either way the hooks see their modules called exactly as without ditfast (a
cache skips or reuses work; an offload hook onloads the weights before they are read).
Hooks on the block itself wrap ditfast's forward and need nothing (first-block cache, block-level
group offloading, TaylorSeer's lite mode).

A block that already carries diffusers or accelerate hooks when ``patch`` runs is patched beneath
them (:func:`bottom_forward` / :func:`set_bottom_forward`): the innermost forward of the hook
chain, the class forward, is replaced by ditfast's, so the hooks keep running around it; ``unpatch``
puts the class forward back there.
"""
from __future__ import annotations

import types
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

from torch import nn

__all__ = ["hooked", "hooked_names", "first_hooked", "falls_back", "warn_fallback", "is_class_forward",
           "bottom_forward", "set_bottom_forward"]

_WARNED = set()


def hooked(module: Optional[nn.Module]) -> bool:
    """Whether calling ``module`` would run anything besides its class forward: an instance
    ``forward`` (diffusers' HookRegistry, accelerate, any wrapper) or PyTorch module hooks."""
    if module is None:
        return False
    d = module.__dict__
    f = d.get("forward")
    if f is not None and not is_class_forward(f, module):  # (a removed diffusers hook leaves the bound class forward)
        return True
    return bool(d.get("_hf_hook") is not None or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def hooked_names(root: nn.Module, names: Sequence[str]) -> List[str]:
    """Those of the dotted submodule ``names`` of ``root`` that are :func:`hooked`, in order.
    Missing modules (an optional QK-norm set to None) are skipped."""
    out = []
    for name in names:
        m = root
        for part in name.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if m is not None and hooked(m):
            out.append(name)
    return out


def first_hooked(root: nn.Module, names: Sequence[str]) -> Optional[str]:
    """The first of ``names`` that is hooked (see :func:`hooked_names`), or None."""
    found = hooked_names(root, names)
    return found[0] if found else None


def falls_back(block: nn.Module, bypassed: Sequence[str]) -> bool:
    """Whether a patched ``block`` must run diffusers' forward for this call because one of the
    modules its ditfast forward does not call (``bypassed``) carries hooks. Warns once per block
    class and module name, so a cache or offload setting that turns ditfast off is not silent."""
    name = first_hooked(block, bypassed)
    if name is None:
        return False
    warn_fallback(block, name)
    return True


def warn_fallback(block: nn.Module, name: str) -> None:
    """The once-per-(block class, module name) warning of :func:`falls_back`."""
    key = (type(block).__name__, name)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"ditfast: {type(block).__name__}.{name} carries hooks (a diffusers cache such as FasterCache, "
            f"Pyramid Attention Broadcast or TaylorSeer, leaf-level offloading, or PyTorch module hooks); "
            f"such blocks run diffusers' forward so that the hooks see their module called "
            f"(ditfast's forward reads the {name} weights / does its work directly)",
            stacklevel=4,
        )


def is_class_forward(f, module: nn.Module) -> bool:
    """Whether ``f`` is ``module``'s class forward bound to it (what a hook chain starts from)."""
    return (isinstance(f, types.MethodType) and f.__self__ is module
            and f.__func__ is type(module).forward)


def bottom_forward(module: nn.Module) -> Optional[Tuple[str, object, str]]:
    """Where the innermost forward of ``module``'s hook chain is stored, when that forward is the
    class forward: ``(kind, holder, attribute)`` with ``getattr(holder, attribute)`` that forward.
    None when the module has no instance forward, or the chain is not one this module knows
    (diffusers' HookRegistry, accelerate's ``_old_forward``), or its bottom is something else."""
    d = module.__dict__
    if "forward" not in d:
        return None
    registry = d.get("_diffusers_hook")
    if registry is not None and getattr(registry, "_fn_refs", None):
        ref = registry._fn_refs[0]
        attr = "original_forward" if getattr(ref, "original_forward", None) is not None else "forward"
        if is_class_forward(getattr(ref, attr), module):
            return "diffusers", ref, attr
        return None
    if "_old_forward" in d and is_class_forward(d["_old_forward"], module):
        return "accelerate", module, "_old_forward"
    return None


def set_bottom_forward(module: nn.Module, forward: Optional[Callable], *, expect: Callable[[object], bool]) -> bool:
    """Replace the innermost forward of ``module``'s hook chain by ``forward`` (None: the class
    forward, bound to the module) when the current one satisfies ``expect``. True if replaced."""
    d = module.__dict__
    registry = d.get("_diffusers_hook")
    spots = []
    if registry is not None and getattr(registry, "_fn_refs", None):
        ref = registry._fn_refs[0]
        spots.append((ref, "original_forward" if getattr(ref, "original_forward", None) is not None else "forward"))
    if "_old_forward" in d:
        spots.append((module, "_old_forward"))
    for holder, attr in spots:
        if expect(getattr(holder, attr)):
            setattr(holder, attr, forward if forward is not None else types.MethodType(type(module).forward, module))
            return True
    return False
