"""Triton kernels: SwiGLU ``silu(gate) * up`` forward and backward (ditfast/reference/swiglu.py).

    y      = silu(g) · u = g·σ(g) · u
    dg     = dy · u · σ(g) · (1 + g·(1 - σ(g)))
    du     = dy · silu(g)

Layout. gate, up, dy and the gradients are 2-D (T, H) views whose rows may be strided (unit column
stride): the halves of one packed (T, 2H) tensor are two such views, so the packed form reads and
writes its halves in place (the backward writes dg and du straight into the halves of one (T, 2H)
gradient: no concatenation). Tiles are (BLOCK_T, BLOCK_H); math in fp32, one rounding per output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import on_device
from .modulate import _round

Tensor = torch.Tensor
BLOCK_T, BLOCK_H, NUM_WARPS = 16, 128, 4


@triton.jit
def _sigmoid(g):
    return 1.0 / (1.0 + tl.exp(-tl.maximum(tl.minimum(g, 80.0), -80.0)))  # clamped: no exp overflow


@triton.jit
def _swiglu_fwd_kernel(
    G, sg,  # gate (T, H), row stride sg
    U, su,  # up (T, H), row stride su
    Y,  # (T, H) contiguous output
    T, H,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    r = rows.to(tl.int64)[:, None]
    g = tl.load(G + r * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r * su + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + r * H + cols[None, :], _round(g * _sigmoid(g) * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, sdy,
    G, sg,
    U, su,
    DG, sdg,  # gradients (T, H), row strides (the halves of one (T, 2H) tensor in the packed form)
    DU, sdu,
    T, H,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < T)[:, None] & (cols < H)[None, :]
    r = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + r * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + r * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r * su + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    tl.store(DG + r * sdg + cols[None, :], _round(dy * u * s * (1.0 + g * (1.0 - s)), DG.dtype.element_ty), mask=mask)
    tl.store(DU + r * sdu + cols[None, :], _round(dy * g * s, DU.dtype.element_ty), mask=mask)


def _rows(t: Tensor) -> Tensor:
    """t as a (T, H) view with a unit column stride (a copy only where none exists)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _halves(x: Tensor, gate_first: bool) -> Tuple[Tensor, Tensor]:
    a, b = x.chunk(2, dim=-1)
    return (a, b) if gate_first else (b, a)


def swiglu_fwd(x: Tensor, up: Optional[Tensor], gate_first: bool) -> Tensor:
    """silu(gate) · up in x's dtype and the shape of one half."""
    gate, up = _halves(x, gate_first) if up is None else (x, up)
    shape = gate.shape
    g2, u2 = _rows(gate), _rows(up)
    T, H = g2.shape
    y = torch.empty((T, H), dtype=x.dtype, device=x.device)
    if T and H:
        with on_device(x):
            _swiglu_fwd_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))](
                g2, g2.stride(0), u2, u2.stride(0), y, T, H, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS)
    return y.view(shape)


def swiglu_bwd(dy: Tensor, x: Tensor, up: Optional[Tensor], gate_first: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(dx, dup): the packed form's (T, 2H) gradient of x (halves written in place) and None, or the
    gradients of gate and up."""
    gate, u = _halves(x, gate_first) if up is None else (x, up)
    shape = gate.shape
    g2, u2, dy2 = _rows(gate), _rows(u), _rows(dy)
    T, H = g2.shape
    if up is None:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dgate, dup = _halves(dx, gate_first)
        dg2, du2 = dgate.reshape(T, H), dup.reshape(T, H)  # views (dx is contiguous)
    else:
        dx, dup = torch.empty(shape, dtype=x.dtype, device=x.device), torch.empty(shape, dtype=up.dtype, device=x.device)
        dg2, du2 = dx.view(T, H), dup.view(T, H)
    if T and H:
        with on_device(x):
            _swiglu_bwd_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))](
                dy2, dy2.stride(0), g2, g2.stride(0), u2, u2.stride(0), dg2, dg2.stride(0), du2, du2.stride(0), T, H,
                BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS)
    return (dx, None) if up is None else (dx, dup)
