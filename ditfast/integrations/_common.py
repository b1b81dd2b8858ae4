"""Helpers shared by the diffusers block replacements: structure checks (run once, at patch time)
and the argument adaptation of the forward pass (run on every call); the block math itself is
:mod:`ditfast.nn.functional`.

Nothing here imports diffusers: diffusers classes are recognised by name and module
(:func:`is_diffusers`), so ``import ditfast`` stays free of it and several diffusers versions work.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import ops
from ..nn import functional as F

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what ditfast.ops accept

# ----------------------------------------------------------------------------------------------
# Patch-time structure checks. Each ``check_*`` appends a readable problem to ``problems`` and
# returns False when the module is not what the ditfast forward expects.
# ----------------------------------------------------------------------------------------------


def is_diffusers(obj, *names: str) -> bool:
    """True when ``obj`` is an instance of exactly the diffusers class called one of ``names``."""
    t = type(obj)
    return t.__name__ in names and t.__module__.startswith("diffusers.")


def describe(obj) -> str:
    return "None" if obj is None else type(obj).__name__


def check_layer_norm(norm, dim: int, where: str, problems: List[str]) -> bool:
    """``norm`` must be an nn.LayerNorm over (dim,) without affine parameters (what ops.norm_modulate does)."""
    if not isinstance(norm, nn.LayerNorm):
        problems.append(f"{where} is {describe(norm)}, expected a LayerNorm without affine parameters")
        return False
    if tuple(norm.normalized_shape) != (dim,):
        problems.append(f"{where} normalizes over {tuple(norm.normalized_shape)}, expected ({dim},)")
        return False
    if norm.weight is not None or norm.bias is not None:
        problems.append(f"{where} has affine parameters (elementwise_affine=True), which ditfast does not apply")
        return False
    return True


def check_ada_norm(norm, names: Sequence[str], chunks: int, dim: int, where: str, problems: List[str]) -> bool:
    """An adaLN module (AdaLayerNormZero & co.): ``linear`` Linear(·, chunks·dim), ``silu``, ``norm``."""
    if not is_diffusers(norm, *names):
        problems.append(f"{where} is {describe(norm)}, expected {' or '.join(names)}")
        return False
    lin = getattr(norm, "linear", None)
    out = getattr(lin, "out_features", None)
    if out != chunks * dim or not hasattr(norm, "silu"):
        problems.append(f"{where}.linear has {out} outputs, expected {chunks} x {dim}")
        return False
    return check_layer_norm(getattr(norm, "norm", None), dim, f"{where}.norm", problems)


def check_rms_pair(attn, q_name: str, k_name: str, head_dim: int, where: str, problems: List[str]) -> bool:
    """attn.<q_name> and attn.<k_name> must both be None or both be per-head RMSNorms with one eps."""
    nq, nk = getattr(attn, q_name, None), getattr(attn, k_name, None)
    if nq is None and nk is None:
        return True
    ok = True
    for name, norm in ((q_name, nq), (k_name, nk)):
        rms = isinstance(norm, nn.RMSNorm) or is_diffusers(norm, "RMSNorm")
        if not rms:
            problems.append(f"{where}.{name} is {describe(norm)}; ditfast supports RMSNorm QK-norm (or none)")
            ok = False
            continue
        if getattr(norm, "weight", None) is None:  # ops.qk_norm_rope reads weights None as "no norm"
            problems.append(f"{where}.{name} is an RMSNorm without a weight (elementwise_affine=False); "
                            "ditfast supports QK-norm with weights")
            ok = False
            continue
        shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
        if tuple(shape) != (head_dim,):
            problems.append(f"{where}.{name} normalizes over {tuple(shape)}, expected the head dim ({head_dim},)")
            ok = False
        if getattr(norm, "eps", None) is None:
            problems.append(f"{where}.{name} has eps=None (dtype-dependent eps), which ditfast does not reproduce")
            ok = False
        if getattr(norm, "bias", None) is not None:
            problems.append(f"{where}.{name} has a bias, which ditfast does not apply")
            ok = False
    if ok and nq.eps != nk.eps:
        problems.append(f"{where}.{q_name} and {k_name} have different eps ({nq.eps} vs {nk.eps})")
        ok = False
    return ok


def check_qk_eps(norms: Sequence[Tuple[str, object]], where: str, problems: List[str]) -> bool:
    """The QK-RMSNorms of one attention call (``(name, norm or None)`` pairs) must share one eps:
    ditfast's attention takes one."""
    eps = {name: float(n.eps) for name, n in norms if n is not None and getattr(n, "eps", None) is not None}
    if len(set(eps.values())) > 1:
        shown = ", ".join(f"{name}={e}" for name, e in eps.items())
        problems.append(f"{where}: the QK-norms have different eps ({shown}); ditfast runs them with one eps")
        return False
    return True


def check_linears(mod, names: Sequence[str], where: str, problems: List[str]) -> bool:
    missing = [n for n in names if getattr(mod, n, None) is None]
    if missing:
        problems.append(f"{where} lacks {', '.join(missing)}")
        return False
    return True


def check_signature(cls, replacement: Callable, problems: List[str]) -> bool:
    """The class forward must take the parameters the replacement takes (same names, same order)."""
    theirs = list(inspect.signature(cls.forward).parameters)[1:]
    ours = list(inspect.signature(replacement).parameters)[1:]
    if theirs != ours:
        problems.append(
            f"{cls.__name__}.forward takes ({', '.join(theirs)}) but ditfast's replacement takes "
            f"({', '.join(ours)}): this diffusers version is not supported"
        )
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Forward-pass pieces.
# ----------------------------------------------------------------------------------------------


def ada_chunks(norm, emb: torch.Tensor, chunks: int) -> Tuple[torch.Tensor, ...]:
    """``norm.linear(SiLU(emb)).chunk(chunks)``: the modulation vectors of an adaLN(-Zero) module,
    in the module's own order (shift, scale, gate, ...). Each is a strided (B, D) view."""
    return norm.linear(norm.silu(emb)).chunk(chunks, dim=1)


def ada_continuous(norm, cond: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of a diffusers AdaLayerNormContinuous, which splits its projection (scale, shift)."""
    scale, shift = norm.linear(norm.silu(cond).to(dtype)).chunk(2, dim=1)
    return shift, scale


def stream(attn, added: bool, proj, mlp, eps: float, eps2: float = 1e-6) -> F.Stream:
    """One stream of a diffusers attention: its q/k/v projections (the packed ``to_qkv`` /
    ``to_added_qkv`` after ``fuse_projections()``, else ``to_q/k/v`` / ``add_q/k/v_proj``) and QK-norm
    weights (None without), with the given output projection, MLP and LayerNorm eps."""
    fused = getattr(attn, "fused_projections", False)
    if added:
        qkv = attn.to_added_qkv if fused else (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        nq, nk = attn.norm_added_q, attn.norm_added_k
    else:
        qkv = attn.to_qkv if fused else (attn.to_q, attn.to_k, attn.to_v)
        nq, nk = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    return F.Stream(qkv, proj, mlp, rms_weight(nq), rms_weight(nk), eps, eps2)


def rms_weight(norm) -> Optional[torch.Tensor]:
    return None if norm is None else getattr(norm, "weight", None)


def rms_eps(*norms, default: float = 1e-6) -> float:
    """The eps of the first given QK-norm (check_qk_eps made them equal), ``default`` without one."""
    return next((float(n.eps) for n in norms if n is not None), default)


def out_proj(attn, o: torch.Tensor) -> torch.Tensor:
    """attn.to_out: Linear then Dropout (the dropout module is called so training behaves as upstream)."""
    o = attn.to_out[0](o)
    return attn.to_out[1](o) if len(attn.to_out) > 1 else o


def gelu_tanh_ff(ff: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``ff(h)`` for diffusers' ``FeedForward``. When it is an unhooked diffusers ``FeedForward`` whose
    first module is an unhooked diffusers ``GELU(approximate="tanh")`` (FLUX, SD3, DiT), that module
    runs as :func:`ditfast.nn.functional.linear_gelu_tanh` of its ``proj`` (the GELU in the matmul's
    epilogue in CUDA inference for a plain ``nn.Linear``; the module and the GELU otherwise) and the
    other modules (dropout, output Linear) are called as modules. Anything else: ``ff`` is called."""
    net = getattr(ff, "net", None)
    act = net[0] if isinstance(net, nn.ModuleList) and len(net) > 0 else None
    if not (is_diffusers(ff, "FeedForward") and F.unhooked(ff) and is_diffusers(act, "GELU")
            and getattr(act, "approximate", None) == "tanh" and F.unhooked(act) and "gelu" not in act.__dict__):
        return ff(h)
    h = F.linear_gelu_tanh(act.proj, h)
    for module in net[1:]:
        h = module(h)
    return h


def swiglu_ff(ff: nn.Module, h: torch.Tensor, ff_class: str, act_class: str) -> torch.Tensor:
    """``ff(h)`` for diffusers' packed-SwiGLU feed-forwards (``Flux2FeedForward`` / ``Flux3FeedForward``:
    ``linear_in``, SwiGLU over ``[gate | up]``, ``linear_out``): the Linears called as modules around
    :func:`ditfast.ops.swiglu` (one pass) when the feed-forward is ``ff_class`` and its activation
    ``act_class``, both diffusers' own and unhooked; anything else: ``ff`` is called."""
    act = getattr(ff, "act_fn", None)
    if not (is_diffusers(ff, ff_class) and F.unhooked(ff) and is_diffusers(act, act_class) and F.unhooked(act)):
        return ff(h)
    return ff.linear_out(ops.swiglu(ff.linear_in(h)))


def feed_forward(block, ff: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``ff(h)`` (:func:`gelu_tanh_ff`), chunked along ``block._chunk_dim`` when diffusers' forward
    chunking is enabled."""
    size = getattr(block, "_chunk_size", None)
    if size is None:
        return gelu_tanh_ff(ff, h)
    dim = block._chunk_dim
    if h.shape[dim] % size:
        raise ValueError(
            f"feed-forward chunking: dim {dim} of the hidden states ({h.shape[dim]}) is not divisible by "
            f"the chunk size {size}"
        )
    return torch.cat([gelu_tanh_ff(ff, part) for part in h.chunk(h.shape[dim] // size, dim=dim)], dim=dim)


def fast_dtypes(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether every given tensor has a dtype the ditfast ops take (fp64 models use the original forward)."""
    return all(t is None or (isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES) for t in tensors)


def no_kwargs(kwargs) -> bool:
    """True for a missing or empty attention-kwargs dict (IP-adapters and masks need the original forward)."""
    return not kwargs


_WARNED_FALLBACKS = set()


def warn_fallback_once(block: nn.Module, key: str, why: str) -> None:
    """Warn, once per (block class, ``key``), that ``block`` runs diffusers' own forward for a call
    because ``why`` (a call ditfast cannot run exactly); the caller then runs that forward."""
    k = (type(block).__name__, key)
    if k not in _WARNED_FALLBACKS:
        _WARNED_FALLBACKS.add(k)
        warnings.warn(f"ditfast: {type(block).__name__} runs diffusers' forward for calls with {why}", stacklevel=3)


class BlockSpec(NamedTuple):
    """A diffusers block class ditfast can run: its class name, a patch-time ``check(block) -> problems``
    and the replacement ``forward`` (a plain function taking the block first, with the diffusers signature)."""

    name: str
    check: Callable[[nn.Module], List[str]]
    forward: Callable


def joint_sequence(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.cat((c, x), dim=1)`` of the (B, Lt, D) text and (B, Li, D) image streams, without the copy
    where ``c`` and ``x`` are exactly the two halves of one contiguous (B, Lt + Li, D) tensor -- what a
    patched FLUX single block returns (its output split into views) and the next one receives: then
    that tensor itself (same values; autograd follows it, so the split's backward concatenation of the
    two gradients goes too). Any other pair (a ControlNet residual added, detached or reentrant
    checkpoint inputs, DTensors, torch.compile, which plans the buffers itself) is concatenated."""
    base = c._base
    if (
        base is None or x._base is not base or torch.compiler.is_compiling()
        or base.dim() != 3 or not base.is_contiguous()
        or base.shape != (c.shape[0], c.shape[1] + x.shape[1], c.shape[2])
        or c.stride() != base.stride() or x.stride() != base.stride()
        or c.storage_offset() != base.storage_offset()
        or x.storage_offset() != base.storage_offset() + c.shape[1] * base.stride(1)
    ):
        return torch.cat((c, x), dim=1)
    return base


_VALUELESS_MASKS: List[Callable[[torch.Tensor], object]] = []


@contextlib.contextmanager
def assume_prefix_lengths(lengths_of: Callable[[torch.Tensor], object]):
    """For masks without values only (FakeTensorMode, as the byte ledger runs models): what
    :func:`prefix_lengths` returns for them, ``lengths_of(mask)`` (counts, None or False), stated by the
    caller who built the real mask. Masks with values are read as always."""
    _VALUELESS_MASKS.append(lengths_of)
    try:
        yield
    finally:
        _VALUELESS_MASKS.pop()


def prefix_lengths(keep: torch.Tensor, allow_empty: bool = False):
    """A (B, L) bool key-padding mask as per-sample key counts: None when it keeps every key, the counts
    (a tuple of ints) when each sample keeps a prefix, False for any other mask (diffusers' forward runs
    then). A sample keeping no key is refused unless ``allow_empty`` (the caller attends other keys too).
    Reading the mask costs one device sync, as deciding on any mask does."""
    if _VALUELESS_MASKS:
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(keep):
            return _VALUELESS_MASKS[-1](keep)
    B, L = keep.shape
    counts = keep.sum(dim=1)
    prefix = torch.arange(L, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
    if not bool(torch.equal(prefix, keep)) or (not allow_empty and bool((counts == 0).any())):
        return False
    lengths = tuple(int(n) for n in counts.tolist())
    return None if all(n == L for n in lengths) else lengths
