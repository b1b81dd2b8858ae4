"""Reference of SwiGLU: ``silu(gate) * up``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["swiglu"]


def swiglu(x: torch.Tensor, up: Optional[torch.Tensor] = None, *, gate_first: bool = True) -> torch.Tensor:
    """``silu(gate) * up``: with ``up`` given, ``gate = x``; else x's last dim holds both halves,
    ``[gate | up]`` (``gate_first``, FLUX.2 / FLUX.3) or ``[up | gate]``. Computed as eager PyTorch does,
    in the inputs' dtype (on fp32 copies it is the exact answer)."""
    if up is None:
        a, b = x.chunk(2, dim=-1)
        gate, up = (a, b) if gate_first else (b, a)
    else:
        gate = x
    return F.silu(gate) * up
