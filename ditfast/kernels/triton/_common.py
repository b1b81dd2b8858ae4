"""Host-side helpers shared by the Triton kernel launchers."""
from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Context for launching on t's GPU: Triton launches on the current device and its stream, and
    torch.library custom ops add no device guard, so tensors on cuda:1 need this."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
