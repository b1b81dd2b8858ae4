"""Triton kernel: the GELU(tanh) backward fused with the bias gradient of the Linear before it.

Math (ditfast/reference/gelu.py), for y = gelu(p) = ½·p·(1 + tanh(u)), u = √(2/π)·(p + 0.044715·p³):
    dp    = dy · (½·(1 + t) + ½·p·(1 - t²)·√(2/π)·(1 + 3·0.044715·p²)),   t = tanh(u)
    dbias = Σ_rows dp        (fp32, from the unrounded dp)

Why fused: in training, the MLP's first Linear needs both dp (for its input and weight gradients)
and Σ dp (its bias gradient). Unfused, autograd writes dp and reads it back whole for the sum: for
FLUX.1-dev that is 6.5 GB of a training step's traffic (the model-step ledger, ditfast/bench).

Layout. dy and pre are read as 2-D (T, N) row-major views whose rows may be strided (last dimension
contiguous). Tiles are (BLOCK_T, BLOCK_N); a program owns one column block and ROW_TILES
consecutive row tiles, sums its dp columns in fp32 registers and writes one row of partial sums
(n_row_programs, N), reduced afterwards with one deterministic ``sum`` (no atomics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import on_device
from .modulate import _round

Tensor = torch.Tensor

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_COEF = tl.constexpr(0.044715)


@triton.jit
def _gelu_tanh_bwd_kernel(
    DY, stride_dy,           # (T, N) upstream gradient, row stride stride_dy, unit column stride
    PRE, stride_pre,         # (T, N) pre-activation
    DX,                      # (T, N) contiguous output: dp, in DY's dtype
    PART,                    # (n_row_programs, N) fp32 partial column sums (unused without BIAS)
    T, N,
    BIAS: tl.constexpr, ROW_TILES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(ROW_TILES):
        rows = (pid_t * ROW_TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (rows < T)[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.load(PRE + r64 * stride_pre + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = _SQRT_2_OVER_PI * (p + _COEF * p * p * p)
        u = tl.minimum(tl.maximum(u, -15.0), 15.0)  # tanh(±15) is ±1 in fp32: no exp overflow
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # tanh(u)
        grad = 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _COEF * p * p)
        dp = dy * grad  # 0 on masked lanes (dy = 0 there)
        tl.store(DX + r64 * N + cols[None, :], _round(dp, DX.dtype.element_ty), mask=mask)
        if BIAS:
            acc += tl.sum(dp, axis=0)
    if BIAS:
        tl.store(PART + pid_t.to(tl.int64) * N + cols, acc, mask=col_ok)


def _rows(t: Tensor) -> Tensor:
    """t as a (T, N) view with a unit column stride (a copy only where none exists)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


BLOCK_T, BLOCK_N, NUM_WARPS = 32, 128, 4


def plan(T: int) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_N, ROW_TILES, row programs) for T rows: about 8 row programs per column block
    (each sums up to 16 row tiles), so the partial sums are ~8 rows of N, not one per row tile."""
    row_tiles = max(1, min(16, triton.cdiv(T, BLOCK_T * 8)))
    return BLOCK_T, BLOCK_N, row_tiles, triton.cdiv(max(T, 1), BLOCK_T * row_tiles)


def gelu_tanh_bwd(dy: Tensor, pre: Tensor, *, bias_grad: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """(dpre in dy's dtype and pre's shape, dbias (N,) in pre's dtype or None)."""
    shape, N = pre.shape, pre.shape[-1]
    dy2, pre2 = _rows(dy), _rows(pre)
    T = pre2.shape[0]
    dx = torch.empty((T, N), dtype=dy.dtype, device=dy.device)
    block_t, block_n, row_tiles, n_row = plan(T)
    part = torch.empty((n_row if bias_grad else 1, N if bias_grad else 1), dtype=torch.float32, device=dy.device)
    if T and N:
        with on_device(dy):
            _gelu_tanh_bwd_kernel[(n_row, triton.cdiv(N, block_n))](
                dy2, dy2.stride(0), pre2, pre2.stride(0), dx, part, T, N,
                BIAS=bias_grad, ROW_TILES=row_tiles, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=NUM_WARPS,
            )
    if not bias_grad:
        return dx.view(shape), None
    dbias = part.sum(0).to(pre.dtype) if T else torch.zeros(N, dtype=pre.dtype, device=pre.device)
    return dx.view(shape), dbias
