"""Input checks shared by the ops. Each raises TypeError (wrong type/dtype) or ValueError (wrong
shape or device) naming the argument, what it got and what it expected, before any kernel runs."""
from __future__ import annotations

import sys
from typing import Optional

import torch

from ..parallel.guard import dtensor_inputs, dtensor_outputs  # noqa: F401  (dtensor_outputs: for the ops)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def float_dtype(name: str, t: torch.Tensor, *, fp64_ok: bool = False) -> None:
    """fp32/bf16/fp16 everywhere; fp64 too, but only on the reference backend (for checking the
    fp32 paths against an fp64 truth). ``fp64_ok``: the caller already knows a backend that runs
    fp64 was requested (attention's own ``backend=`` argument)."""
    if t.dtype in FLOAT_DTYPES:
        return
    if t.dtype == torch.float64:
        from .._backend import requested_backend

        if fp64_ok or requested_backend() == "reference":
            return
        raise TypeError(
            f"{name} is float64, which only the reference backend runs (ditfast.use_backend('reference')); "
            "the kernels take float32, bfloat16 or float16"
        )
    raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def tensor(name: str, t, ndim: int, layout: str, *, fp64_ok: bool = False) -> torch.Tensor:
    """t must be a floating-point tensor (fp32/bf16/fp16) with ``ndim`` dims laid out as ``layout``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    float_dtype(name, t, fp64_ok=fp64_ok)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim} dims), got shape {tuple(t.shape)}")
    return t


def dtensor_possible() -> bool:
    """Whether any tensor can be a DTensor: torch.distributed.tensor has been imported."""
    return sys.modules.get("torch.distributed.tensor") is not None


def dtensor(op: str, **tensors: Optional[torch.Tensor]) -> bool:
    """DTensor inputs: register ditfast's sharding rules on first use and refuse a mix of DTensors and
    plain tensors, naming them (ditfast/parallel/guard.py; one dict lookup when DTensor is not in use).
    Returns whether the inputs are DTensors."""
    return dtensor_inputs(op, **tensors)


def rope_table(name: str, t, B: int, L: int, Dh: int, like: torch.Tensor, *, seq: str = "L") -> None:
    """A RoPE table: an fp32 tensor (L, Dh/2) or (B, L, Dh/2) (``seq`` names L in the message), on
    the device of ``like``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (from rope_freqs), got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (as rope_freqs returns), got {t.dtype}")
    if not ((t.dim() == 2 and t.shape == (L, Dh // 2)) or (t.dim() == 3 and t.shape == (B, L, Dh // 2))):
        raise ValueError(
            f"{name} must have shape ({seq}, Dh/2) = ({L}, {Dh // 2}) or (B, {seq}, Dh/2) = ({B}, {L}, {Dh // 2}), "
            f"got {tuple(t.shape)}{_rope_table_hint(t, B, L, Dh)}"
        )
    same_device("the input", like, **{name: t})


def _rope_table_hint(t: torch.Tensor, B: int, L: int, Dh: int) -> str:
    """Why a RoPE table of the right rank has the wrong shape, and how to get the right one."""
    if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] not in (1, B)):
        return ""
    rows, width = t.shape[-2], t.shape[-1]
    if rows != L:
        return (f": the table has {rows} positions but the sequence has {L} tokens (build it from ids with "
                f"one row per token, in the order of the sequence)")
    if width == Dh:
        return (f": this looks like diffusers' format, (L, Dh) with every angle repeated for both elements of "
                f"a pair; convert it with cos[..., 0::2], sin[..., 0::2] (interleaved pairs, as FLUX's "
                f"FluxPosEmbed) or cos[..., :{Dh // 2}] (half-split tables, with interleaved=False), "
                f"or compute ditfast's tables with ops.rope_freqs(ids, axes_dim)")
    return (f": a table of width {width} is built for a head dim of {2 * width} (rope_freqs makes Dh/2 = "
            f"sum(axes_dim)/2 columns), but the head dim is {Dh}; choose axes_dim with sum(axes_dim) == {Dh}")


def same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def modulation(name: str, t, x: torch.Tensor) -> torch.Tensor:
    """A shift/scale/gate for x (B, L, D): (B, D) per sample or (B, L, D) per token.

    A batch dim of 1 broadcasts over B; it is passed on as it is (every backend broadcasts it, and the
    kernels sum its gradient over the batch in fp32, rounding once).
    """
    B, L, D = x.shape
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    float_dtype(name, t)
    ok = (t.dim() == 2 and t.shape[1] == D) or (t.dim() == 3 and t.shape[1:] == (L, D))
    if not ok or t.shape[0] not in (1, B):
        raise ValueError(
            f"{name} must have shape (B, D) = ({B}, {D}) or (B, L, D) = ({B}, {L}, {D}) to match x "
            f"{tuple(x.shape)}, got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    return t


def eps(value) -> float:
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"eps must be a positive number, got {value!r}")
    return float(value)


def result_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """PyTorch's promotion of the inputs' dtypes (what the eager reference would return)."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype
