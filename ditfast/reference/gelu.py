"""Reference of the GELU(tanh) backward with the bias gradient of the Linear before it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["gelu_tanh_backward"]


def gelu_tanh_backward(
    dy: torch.Tensor, pre: torch.Tensor, *, bias_grad: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dpre, dbias)`` for ``y = gelu(pre, approximate="tanh")`` with ``pre = x @ Wᵀ + bias``.

    dy, pre: (..., N). dpre = dy · gelu'(pre), in dy's dtype; dbias = the sum of dpre over every
    leading dimension, (N,) in pre's dtype, from the unrounded fp32 dpre (None when ``bias_grad`` is
    False). Math in fp32.
    """
    d32 = torch.ops.aten.gelu_backward(dy.float(), pre.float(), approximate="tanh")
    dbias = d32.reshape(-1, d32.shape[-1]).sum(0).to(pre.dtype) if bias_grad else None
    return d32.to(dy.dtype), dbias
