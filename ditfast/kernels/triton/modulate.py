"""Triton kernels for the adaLN family: LayerNorm + modulate, gated residual, and the fused seam.

Math (ditfast/reference/modulate.py; docs/upstream.md), per row of D features, LN without affine parameters:
    norm_modulate                 y  = xhat * (1 + scale) + shift,   xhat = (x - mean) * rstd
    norm_modulate_dual            y1, y2 from one xhat with two (shift, scale) pairs
    gated_residual                out = x + gate * y
    gated_residual_norm_modulate  x_new = x + gate * y;  h = LN(x_new) * (1 + scale) + shift

Layout. x, y are (B, L, D) with any strides (read through them, never copied). A modulation tensor
(shift / scale / gate) is (B, D) per sample or (B, L, D) per token; both are read as (B, L, D) with a
token stride of 0 for the per-sample case, so chunks of one adaLN Linear output (row stride 6·D) and
expanded stride-0 batch views work as they are. A modulation with a batch of 1 ((1, D) or (1, L, D))
is broadcast over the B samples (batch stride 0), and its gradient is summed over them in fp32. Outputs are new contiguous (B, L, D) tensors in the
promotion of the inputs' dtypes; math is fp32; mean and rstd are saved as fp32 (B, L).

Tiles. A program works on (BLOCK_R, BLOCK_D) tiles: BLOCK_R rows (tokens) of one power-of-two block
covering all D features. Forward: one tile of the flattened B·L rows per program. Backward: one
program per chunk of ROWS consecutive tokens of one sample, walked BLOCK_R rows at a time; per-sample
(B, D) gradients are summed over the chunk in fp32 registers, written as partial sums
(B, NCHUNK, D) and reduced afterwards with one deterministic ``sum`` (no atomics); per-token gradients
are written tile by tile. The normalized activations are recomputed from the saved x (or x_new) and
the saved fp32 mean and rstd. D is limited to MAX_D (a row lives in registers); wider rows raise
ValueError here.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import on_device

Tensor = torch.Tensor

MAX_D = 16384  # widest row a kernel holds in one block of registers

# The interpreter converts fp32 -> bf16 by truncation; GPUs round to nearest even. _round() emulates
# the GPU under the interpreter so CPU tests see the same rounding as CUDA runs.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


# ---------------------------------------------------------------------------------------------------
# jit helpers shared by the kernels. A tile is (BLOCK_R, BLOCK_D); b and l are the tile rows' sample
# and token indices (b may be a scalar), cols = arange(BLOCK_D), mask the tile's valid lanes.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _round(v, dtype: tl.constexpr):
    """fp32 v converted to dtype, rounding to nearest even."""
    out = v.to(dtype)
    if _INTERPRET:
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return out


@triton.jit
def _load_tile(PTR, b, l, stride_b, stride_l, stride_d, cols, mask):
    """Rows (b, l) of a (B, L, D) tensor (token stride 0 for a per-sample (B, D) one), as fp32."""
    rows = b.to(tl.int64) * stride_b + l.to(tl.int64) * stride_l
    off = rows[:, None] + cols.to(tl.int64)[None, :] * stride_d
    return tl.load(PTR + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(PTR, row, D, cols, val, mask):
    """Store val into rows ``row`` (= b·L + l) of a contiguous (B, L, D) tensor, in its dtype."""
    off = row.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(PTR + off, _round(val, PTR.dtype.element_ty), mask=mask)


@triton.jit
def _normalize(x, mask, D, eps):
    """Per-row LayerNorm of a tile (masked lanes 0): mean, rstd (BLOCK_R,), xhat (0 off the rows)."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd, xc * rstd[:, None]


@triton.jit
def _ln_backward(g, xhat, rstd, D):
    """d(loss)/dx of xhat = LN(x), given g = d(loss)/d(xhat) (both 0 off the rows)."""
    c_xhat = tl.sum(g * xhat, axis=1) / D
    c_one = tl.sum(g, axis=1) / D
    return (g - c_one[:, None] - xhat * c_xhat[:, None]) * rstd[:, None]


@triton.jit
def _grad_out(acc, val, GRAD, row, D, cols, mask, PER_TOKEN: tl.constexpr):
    """A modulation gradient term of a tile: stored into GRAD (B, L, D) per token, else summed over
    the tile's rows into acc (BLOCK_D,). val must be 0 off the rows."""
    if PER_TOKEN:
        _store_tile(GRAD, row, D, cols, val, mask)
    else:
        acc += tl.sum(val, axis=0)
    return acc


@triton.jit
def _flush(acc, PARTIAL, b, chunk, NCHUNK, D, cols, PER_TOKEN: tl.constexpr):
    """Write a chunk's per-sample partial sum into PARTIAL (B, NCHUNK, D) fp32 (nothing per token)."""
    if not PER_TOKEN:
        tl.store(PARTIAL + (b * NCHUNK + chunk).to(tl.int64) * D + cols, acc, mask=cols < D)


# ---------------------------------------------------------------------------------------------------
# forward kernels: program p takes rows p·BLOCK_R ... of the flattened (B·L) rows
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _norm_modulate_fwd_kernel(
    X, sxb, sxl, sxd,  # input (B, L, D), any strides
    SHIFT1, sh1b, sh1l, sh1d,  # (B, L, D) view of shift1 (token stride 0 per sample); unused if not HAS_SHIFT1
    SCALE1, sc1b, sc1l, sc1d,  # scale1, same layout rules
    SHIFT2, sh2b, sh2l, sh2d,  # second pair: used only when DUAL
    SCALE2, sc2b, sc2l, sc2d,
    OUT1, OUT2,  # (B, L, D) contiguous outputs (OUT2 only when DUAL)
    MEAN, RSTD,  # (B, L) fp32 statistics, saved for backward
    N_ROWS, L, D, eps,  # N_ROWS = B·L
    HAS_SHIFT1: tl.constexpr, HAS_SHIFT2: tl.constexpr, DUAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # = b·L + l
    rmask = row < N_ROWS
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]

    x = _load_tile(X, b, l, sxb, sxl, sxd, cols, mask)
    mean, rstd, xhat = _normalize(x, mask, D, eps)
    tl.store(MEAN + row, mean, mask=rmask)
    tl.store(RSTD + row, rstd, mask=rmask)

    y = xhat * (1.0 + _load_tile(SCALE1, b, l, sc1b, sc1l, sc1d, cols, mask))
    if HAS_SHIFT1:
        y += _load_tile(SHIFT1, b, l, sh1b, sh1l, sh1d, cols, mask)
    _store_tile(OUT1, row, D, cols, y, mask)
    if DUAL:
        y2 = xhat * (1.0 + _load_tile(SCALE2, b, l, sc2b, sc2l, sc2d, cols, mask))
        if HAS_SHIFT2:
            y2 += _load_tile(SHIFT2, b, l, sh2b, sh2l, sh2d, cols, mask)
        _store_tile(OUT2, row, D, cols, y2, mask)


@triton.jit
def _gated_residual_fwd_kernel(
    X, sxb, sxl, sxd,  # residual stream (B, L, D), any strides
    Y, syb, syl, syd,  # branch output (B, L, D), any strides
    GATE, sgb, sgl, sgd,  # (B, L, D) view of gate (token stride 0 per sample)
    OUT,  # (B, L, D) contiguous
    N_ROWS, L, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = (row < N_ROWS)[:, None] & (cols < D)[None, :]
    x = _load_tile(X, b, l, sxb, sxl, sxd, cols, mask)
    y = _load_tile(Y, b, l, syb, syl, syd, cols, mask)
    g = _load_tile(GATE, b, l, sgb, sgl, sgd, cols, mask)
    _store_tile(OUT, row, D, cols, x + g * y, mask)


@triton.jit
def _gated_residual_norm_modulate_fwd_kernel(
    X, sxb, sxl, sxd,  # residual stream (B, L, D), any strides
    Y, syb, syl, syd,  # branch output (B, L, D), any strides
    GATE, sgb, sgl, sgd,  # (B, L, D) views of the modulation (token stride 0 per sample)
    SHIFT, shb, shl, shd,  # unused if not HAS_SHIFT
    SCALE, scb, scl, scd,
    XNEW, H,  # (B, L, D) contiguous outputs: the new residual stream and the modulated norm of it
    MEAN, RSTD,  # (B, L) fp32 statistics of x_new
    N_ROWS, L, D, eps,
    HAS_SHIFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = row < N_ROWS
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]

    x = _load_tile(X, b, l, sxb, sxl, sxd, cols, mask)
    y = _load_tile(Y, b, l, syb, syl, syd, cols, mask)
    g = _load_tile(GATE, b, l, sgb, sgl, sgd, cols, mask)
    # Round x_new to its storage dtype before normalizing: h is the LN of the x_new returned (and saved
    # for backward), as in the two-step eager computation.
    x_new = _round(x + g * y, XNEW.dtype.element_ty)
    tl.store(XNEW + row.to(tl.int64)[:, None] * D + cols[None, :], x_new, mask=mask)

    mean, rstd, xhat = _normalize(x_new.to(tl.float32), mask, D, eps)
    tl.store(MEAN + row, mean, mask=rmask)
    tl.store(RSTD + row, rstd, mask=rmask)
    h = xhat * (1.0 + _load_tile(SCALE, b, l, scb, scl, scd, cols, mask))
    if HAS_SHIFT:
        h += _load_tile(SHIFT, b, l, shb, shl, shd, cols, mask)
    _store_tile(H, row, D, cols, h, mask)


# ---------------------------------------------------------------------------------------------------
# backward kernels: program (b, chunk) walks tokens chunk·ROWS ... chunk·ROWS + ROWS - 1 (< L) of
# sample b, BLOCK_R at a time (ROWS is a multiple of BLOCK_R)
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _norm_modulate_bwd_kernel(
    X, sxb, sxl, sxd,  # saved input (B, L, D), any strides
    MEAN, RSTD,  # (B, L) fp32
    DOUT1, sd1b, sd1l, sd1d,  # incoming gradient of out1 (B, L, D), any strides
    SCALE1, sc1b, sc1l, sc1d,  # (B, L, D) view of scale1
    DOUT2, sd2b, sd2l, sd2d,  # DUAL only
    SCALE2, sc2b, sc2l, sc2d,  # DUAL only
    DX,  # (B, L, D) contiguous, x's dtype
    DSCALE1, DSHIFT1, DSCALE2, DSHIFT2,  # per token: (B, L, D), input's dtype; per sample: fp32 (B, NCHUNK, D)
    L, D, ROWS, NCHUNK,
    HAS_SHIFT1: tl.constexpr, HAS_SHIFT2: tl.constexpr, DUAL: tl.constexpr,
    SCALE1_TOK: tl.constexpr, SHIFT1_TOK: tl.constexpr, SCALE2_TOK: tl.constexpr, SHIFT2_TOK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NCHUNK
    chunk = pid % NCHUNK
    cols = tl.arange(0, BLOCK_D)
    acc_sc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sh1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sh2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_R):
        l = chunk * ROWS + start + tl.arange(0, BLOCK_R)
        lmask = l < L
        mask = lmask[:, None] & (cols < D)[None, :]
        row = b * L + l
        mean = tl.load(MEAN + row, mask=lmask, other=0.0)
        rstd = tl.load(RSTD + row, mask=lmask, other=0.0)
        x = _load_tile(X, b, l, sxb, sxl, sxd, cols, mask)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)

        dy1 = _load_tile(DOUT1, b, l, sd1b, sd1l, sd1d, cols, mask)
        g = dy1 * (1.0 + _load_tile(SCALE1, b, l, sc1b, sc1l, sc1d, cols, mask))
        acc_sc1 = _grad_out(acc_sc1, dy1 * xhat, DSCALE1, row, D, cols, mask, SCALE1_TOK)
        if HAS_SHIFT1:
            acc_sh1 = _grad_out(acc_sh1, dy1, DSHIFT1, row, D, cols, mask, SHIFT1_TOK)
        if DUAL:
            dy2 = _load_tile(DOUT2, b, l, sd2b, sd2l, sd2d, cols, mask)
            g += dy2 * (1.0 + _load_tile(SCALE2, b, l, sc2b, sc2l, sc2d, cols, mask))
            acc_sc2 = _grad_out(acc_sc2, dy2 * xhat, DSCALE2, row, D, cols, mask, SCALE2_TOK)
            if HAS_SHIFT2:
                acc_sh2 = _grad_out(acc_sh2, dy2, DSHIFT2, row, D, cols, mask, SHIFT2_TOK)
        _store_tile(DX, row, D, cols, _ln_backward(g, xhat, rstd, D), mask)

    _flush(acc_sc1, DSCALE1, b, chunk, NCHUNK, D, cols, SCALE1_TOK)
    if HAS_SHIFT1:
        _flush(acc_sh1, DSHIFT1, b, chunk, NCHUNK, D, cols, SHIFT1_TOK)
    if DUAL:
        _flush(acc_sc2, DSCALE2, b, chunk, NCHUNK, D, cols, SCALE2_TOK)
        if HAS_SHIFT2:
            _flush(acc_sh2, DSHIFT2, b, chunk, NCHUNK, D, cols, SHIFT2_TOK)


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT, sdb, sdl, sdd,  # incoming gradient (B, L, D), any strides
    Y, syb, syl, syd,  # saved branch output (B, L, D), any strides
    GATE, sgb, sgl, sgd,  # (B, L, D) view of gate
    DY,  # (B, L, D) contiguous, y's dtype
    DGATE,  # per token: (B, L, D), gate's dtype; per sample: fp32 (B, NCHUNK, D)
    L, D, ROWS, NCHUNK,
    GATE_TOK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NCHUNK
    chunk = pid % NCHUNK
    cols = tl.arange(0, BLOCK_D)
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_R):
        l = chunk * ROWS + start + tl.arange(0, BLOCK_R)
        mask = (l < L)[:, None] & (cols < D)[None, :]
        row = b * L + l
        dout = _load_tile(DOUT, b, l, sdb, sdl, sdd, cols, mask)
        y = _load_tile(Y, b, l, syb, syl, syd, cols, mask)
        g = _load_tile(GATE, b, l, sgb, sgl, sgd, cols, mask)
        _store_tile(DY, row, D, cols, dout * g, mask)
        acc_g = _grad_out(acc_g, dout * y, DGATE, row, D, cols, mask, GATE_TOK)
    _flush(acc_g, DGATE, b, chunk, NCHUNK, D, cols, GATE_TOK)


@triton.jit
def _gated_residual_norm_modulate_bwd_kernel(
    XNEW, MEAN, RSTD,  # saved x_new (B, L, D) contiguous and its (B, L) fp32 statistics
    DXNEW, sxb, sxl, sxd,  # gradient reaching x_new from outside (B, L, D); unused if not HAS_DXNEW
    DH, shb, shl, shd,  # gradient of h (B, L, D), any strides
    Y, syb, syl, syd,  # saved branch output (B, L, D), any strides
    GATE, sgb, sgl, sgd,  # (B, L, D) views of the modulation
    SCALE, scb, scl, scd,
    DX, DY,  # (B, L, D) contiguous, in x's and y's dtypes
    DGATE, DSHIFT, DSCALE,  # per token: (B, L, D), input's dtype; per sample: fp32 (B, NCHUNK, D)
    L, D, ROWS, NCHUNK,
    HAS_DXNEW: tl.constexpr, HAS_SHIFT: tl.constexpr,
    GATE_TOK: tl.constexpr, SHIFT_TOK: tl.constexpr, SCALE_TOK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NCHUNK
    chunk = pid % NCHUNK
    cols = tl.arange(0, BLOCK_D)
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sh = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_R):
        l = chunk * ROWS + start + tl.arange(0, BLOCK_R)
        lmask = l < L
        mask = lmask[:, None] & (cols < D)[None, :]
        row = b * L + l
        mean = tl.load(MEAN + row, mask=lmask, other=0.0)
        rstd = tl.load(RSTD + row, mask=lmask, other=0.0)
        x_new = tl.load(XNEW + row.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        xhat = tl.where(mask, (x_new.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)

        dh = _load_tile(DH, b, l, shb, shl, shd, cols, mask)
        acc_sc = _grad_out(acc_sc, dh * xhat, DSCALE, row, D, cols, mask, SCALE_TOK)
        if HAS_SHIFT:
            acc_sh = _grad_out(acc_sh, dh, DSHIFT, row, D, cols, mask, SHIFT_TOK)
        g = dh * (1.0 + _load_tile(SCALE, b, l, scb, scl, scd, cols, mask))
        # total gradient of x_new: through h, plus what reached x_new from later in the network
        dxn = _ln_backward(g, xhat, rstd, D)
        if HAS_DXNEW:
            dxn += _load_tile(DXNEW, b, l, sxb, sxl, sxd, cols, mask)
        _store_tile(DX, row, D, cols, dxn, mask)
        _store_tile(DY, row, D, cols, dxn * _load_tile(GATE, b, l, sgb, sgl, sgd, cols, mask), mask)
        y = _load_tile(Y, b, l, syb, syl, syd, cols, mask)
        acc_g = _grad_out(acc_g, dxn * y, DGATE, row, D, cols, mask, GATE_TOK)

    _flush(acc_g, DGATE, b, chunk, NCHUNK, D, cols, GATE_TOK)
    if HAS_SHIFT:
        _flush(acc_sh, DSHIFT, b, chunk, NCHUNK, D, cols, SHIFT_TOK)
    _flush(acc_sc, DSCALE, b, chunk, NCHUNK, D, cols, SCALE_TOK)


# ---------------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------------
def _check_d(x: Tensor) -> int:
    D = x.shape[-1]
    if D > MAX_D:
        raise ValueError(
            f"x has D = {D} features; the Triton adaLN kernels hold a row in registers and support "
            f"D <= {MAX_D} (use the 'reference' backend for wider rows)"
        )
    return D


def _config(D: int, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps). One power-of-two block covers a row; narrow rows are stacked
    BLOCK_R to a tile (about 4K elements on a GPU; larger tiles under the interpreter, where each
    program costs Python time)."""
    block_d = triton.next_power_of_2(max(D, 1))
    tile = 4096 if device.type == "cuda" else 16384
    block_r = max(1, min(16 if device.type == "cuda" else 32, tile // block_d))
    elems = block_r * block_d
    num_warps = 4 if elems < 2048 else 8 if elems < 8192 else 16
    return block_r, block_d, num_warps


def _strides(t: Optional[Tensor]) -> Tuple[int, int, int]:
    """(stride_b, stride_l, stride_d) of a (B, L, D) tensor, or of a (B, D) one read as (B, L, D).
    A batch of one (a modulation shared by every sample) gets batch stride 0: it is broadcast."""
    if t is None:
        return 0, 0, 0
    stride_b = 0 if t.shape[0] == 1 else t.stride(0)
    if t.dim() == 2:
        return stride_b, 0, t.stride(1)
    return stride_b, t.stride(1), t.stride(2)


def _per_token(t: Optional[Tensor]) -> bool:
    return t is not None and t.dim() == 3


def _per_sample(*tensors: Optional[Tensor]) -> bool:
    return any(t is not None and t.dim() == 2 for t in tensors)


def _dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    out = None
    for t in tensors:
        if t is not None:
            out = t.dtype if out is None else torch.promote_types(out, t.dtype)
    return out


@functools.lru_cache(maxsize=None)
def _target_programs(device_type: str, index: Optional[int]) -> int:
    """About how many backward programs keep the device busy (queried on first use, then cached)."""
    if device_type == "cuda":
        return 2 * torch.cuda.get_device_properties(index).multi_processor_count
    return 8  # interpreter: a few chunks per sample, so the partial-sum path is exercised


def _chunks(B: int, L: int, block_r: int, device: torch.device, reduce: bool) -> Tuple[int, int]:
    """(ROWS, NCHUNK): tokens per backward program (a multiple of block_r) and chunks per sample.

    Without per-sample reductions each program takes one tile. With them, a sample's L tokens are
    split into as few chunks as keep about _target_programs() programs in flight, which bounds the
    fp32 partial-sum buffers to B·NCHUNK rows.
    """
    nchunk = -(-L // block_r)
    if reduce:
        index = device.index
        if device.type == "cuda" and index is None:
            index = torch.cuda.current_device()
        want = -(-_target_programs(device.type, index) // B)
        nchunk = max(1, min(nchunk, want))
    rows = -(-L // nchunk)
    rows = -(-rows // block_r) * block_r
    return rows, -(-L // rows)


def _grad_buffer(t: Optional[Tensor], B: int, L: int, D: int, nchunk: int, like: Tensor) -> Tensor:
    """Where the kernel writes a modulation gradient: (B, L, D) per token, fp32 partial sums
    (B, NCHUNK, D) per sample; an empty placeholder when t is None. A per-token gradient is written in
    t's dtype, except when t is one row broadcast over B > 1 samples: then in fp32, summed by _finish."""
    if t is None:
        return like.new_empty(0)
    if t.dim() == 3:
        broadcast = t.shape[0] == 1 and B > 1
        return torch.empty((B, L, D), dtype=torch.float32 if broadcast else t.dtype, device=like.device)
    return torch.empty((B, nchunk, D), dtype=torch.float32, device=like.device)


def _finish(buf: Tensor, t: Optional[Tensor]) -> Tensor:
    """The gradient from a _grad_buffer: per-sample partial sums are reduced over chunks here, and the
    per-sample gradients of a row broadcast over the batch are summed over it, in fp32, rounded once."""
    if t is None:
        return buf
    if t.dim() == 3:
        return buf if buf.shape[0] == t.shape[0] else buf.sum(0, keepdim=True).to(t.dtype)
    if t.shape[0] == 1:
        return buf.sum((0, 1)).unsqueeze(0).to(t.dtype)
    return buf.sum(1).to(t.dtype)


def _zero_grad(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Gradient of a modulation when there are no rows (B·L·D = 0): zeros of its shape."""
    if t is None:
        return like.new_empty(0)
    return torch.zeros(t.shape, dtype=t.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------------
# launchers (called by the torch.library custom ops in ditfast.ops.modulate)
# ---------------------------------------------------------------------------------------------------
def norm_modulate_fwd(
    x: Tensor,
    shift1: Optional[Tensor],
    scale1: Tensor,
    shift2: Optional[Tensor] = None,
    scale2: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """(out1, out2 or None, mean, rstd); the second pair is used when scale2 is given (dual)."""
    B, L, D = x.shape
    _check_d(x)
    dual = scale2 is not None
    out1 = torch.empty((B, L, D), dtype=_dtype(x, shift1, scale1), device=x.device)
    out2 = torch.empty((B, L, D), dtype=_dtype(x, shift2, scale2), device=x.device) if dual else None
    stats = torch.empty if x.numel() else torch.zeros  # the kernel writes every row's statistics
    mean = stats((B, L), dtype=torch.float32, device=x.device)
    rstd = stats((B, L), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out1, out2, mean, rstd
    block_r, block_d, warps = _config(D, x.device)
    with on_device(x):
        _norm_modulate_fwd_kernel[(triton.cdiv(B * L, block_r),)](
            x, *_strides(x),
            x if shift1 is None else shift1, *_strides(shift1),
            scale1, *_strides(scale1),
            x if shift2 is None else shift2, *_strides(shift2),
            x if scale2 is None else scale2, *_strides(scale2),
            out1, out1 if out2 is None else out2,
            mean, rstd,
            B * L, L, D, eps,
            HAS_SHIFT1=shift1 is not None, HAS_SHIFT2=shift2 is not None, DUAL=dual,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return out1, out2, mean, rstd


def norm_modulate_bwd(
    dout1: Tensor,
    dout2: Optional[Tensor],
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    shift1: Optional[Tensor],
    scale1: Tensor,
    shift2: Optional[Tensor] = None,
    scale2: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dshift1, dscale1, dshift2, dscale2); the gradient of an absent tensor is an empty tensor.

    shift1 / shift2 only describe their gradients (shape, dtype, per token or not): they may be meta
    tensors, their data is never read.
    """
    B, L, D = x.shape
    _check_d(x)
    dual = scale2 is not None
    if x.numel() == 0:
        dx = torch.zeros((B, L, D), dtype=x.dtype, device=x.device)
        return (dx,) + tuple(_zero_grad(t, x) for t in (shift1, scale1, shift2, scale2))
    block_r, block_d, warps = _config(D, x.device)
    rows, nchunk = _chunks(B, L, block_r, x.device, _per_sample(scale1, shift1, scale2, shift2))
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    dsc1, dsh1, dsc2, dsh2 = (_grad_buffer(t, B, L, D, nchunk, x) for t in (scale1, shift1, scale2, shift2))
    with on_device(x):
        _norm_modulate_bwd_kernel[(B * nchunk,)](
            x, *_strides(x),
            mean, rstd,
            dout1, *_strides(dout1),
            scale1, *_strides(scale1),
            dout1 if dout2 is None else dout2, *_strides(dout2),
            scale1 if scale2 is None else scale2, *_strides(scale2),
            dx,
            dsc1, dx if shift1 is None else dsh1, dx if scale2 is None else dsc2, dx if shift2 is None else dsh2,
            L, D, rows, nchunk,
            HAS_SHIFT1=shift1 is not None, HAS_SHIFT2=shift2 is not None, DUAL=dual,
            SCALE1_TOK=_per_token(scale1), SHIFT1_TOK=_per_token(shift1),
            SCALE2_TOK=_per_token(scale2), SHIFT2_TOK=_per_token(shift2),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return dx, _finish(dsh1, shift1), _finish(dsc1, scale1), _finish(dsh2, shift2), _finish(dsc2, scale2)


def gated_residual_fwd(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + gate * y as a new contiguous (B, L, D) tensor."""
    B, L, D = x.shape
    _check_d(x)
    out = torch.empty((B, L, D), dtype=_dtype(x, y, gate), device=x.device)
    if out.numel() == 0:
        return out
    block_r, block_d, warps = _config(D, x.device)
    with on_device(x):
        _gated_residual_fwd_kernel[(triton.cdiv(B * L, block_r),)](
            x, *_strides(x), y, *_strides(y), gate, *_strides(gate), out,
            B * L, L, D,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return out


def gated_residual_bwd(dout: Tensor, y: Tensor, gate: Tensor) -> Tuple[Tensor, Tensor]:
    """(dy, dgate) of out = x + gate * y (dx is dout itself, cast to x's dtype by the caller)."""
    B, L, D = y.shape
    _check_d(y)
    if y.numel() == 0:
        return torch.zeros((B, L, D), dtype=y.dtype, device=y.device), _zero_grad(gate, y)
    block_r, block_d, warps = _config(D, y.device)
    rows, nchunk = _chunks(B, L, block_r, y.device, _per_sample(gate))
    dy = torch.empty((B, L, D), dtype=y.dtype, device=y.device)
    dgate = _grad_buffer(gate, B, L, D, nchunk, y)
    with on_device(y):
        _gated_residual_bwd_kernel[(B * nchunk,)](
            dout, *_strides(dout), y, *_strides(y), gate, *_strides(gate), dy, dgate,
            L, D, rows, nchunk,
            GATE_TOK=_per_token(gate), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return dy, _finish(dgate, gate)


def gated_residual_norm_modulate_fwd(
    x: Tensor, y: Tensor, gate: Tensor, shift: Optional[Tensor], scale: Tensor, eps: float = 1e-6
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_new, h, mean, rstd) with x_new = x + gate * y and h = LN(x_new) * (1 + scale) + shift."""
    B, L, D = x.shape
    _check_d(x)
    x_new = torch.empty((B, L, D), dtype=_dtype(x, y, gate), device=x.device)
    h = torch.empty((B, L, D), dtype=_dtype(x_new, shift, scale), device=x.device)
    stats = torch.empty if x.numel() else torch.zeros  # the kernel writes every row's statistics
    mean = stats((B, L), dtype=torch.float32, device=x.device)
    rstd = stats((B, L), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return x_new, h, mean, rstd
    block_r, block_d, warps = _config(D, x.device)
    with on_device(x):
        _gated_residual_norm_modulate_fwd_kernel[(triton.cdiv(B * L, block_r),)](
            x, *_strides(x), y, *_strides(y), gate, *_strides(gate),
            x if shift is None else shift, *_strides(shift), scale, *_strides(scale),
            x_new, h, mean, rstd,
            B * L, L, D, eps,
            HAS_SHIFT=shift is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return x_new, h, mean, rstd


def gated_residual_norm_modulate_bwd(
    dx_new: Optional[Tensor],
    dh: Tensor,
    x_new: Tensor,
    mean: Tensor,
    rstd: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Optional[Tensor],
    scale: Tensor,
    x_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dgate, dshift, dscale); dshift is empty when shift is None (shift: metadata only).

    x_new is the forward's own (contiguous) output; dx_new the gradient reaching it from outside.
    """
    B, L, D = x_new.shape
    _check_d(x_new)
    if x_new.numel() == 0:
        dx = torch.zeros((B, L, D), dtype=x_dtype, device=x_new.device)
        dy = torch.zeros((B, L, D), dtype=y.dtype, device=x_new.device)
        return (dx, dy) + tuple(_zero_grad(t, x_new) for t in (gate, shift, scale))
    x_new = x_new.contiguous()  # no copy: it is the forward's output
    block_r, block_d, warps = _config(D, x_new.device)
    rows, nchunk = _chunks(B, L, block_r, x_new.device, _per_sample(gate, shift, scale))
    dx = torch.empty((B, L, D), dtype=x_dtype, device=x_new.device)
    dy = torch.empty((B, L, D), dtype=y.dtype, device=x_new.device)
    dgate, dshift, dscale = (_grad_buffer(t, B, L, D, nchunk, x_new) for t in (gate, shift, scale))
    with on_device(x_new):
        _gated_residual_norm_modulate_bwd_kernel[(B * nchunk,)](
            x_new, mean, rstd,
            dh if dx_new is None else dx_new, *_strides(dx_new),
            dh, *_strides(dh),
            y, *_strides(y),
            gate, *_strides(gate),
            scale, *_strides(scale),
            dx, dy,
            dgate, dx if shift is None else dshift, dscale,
            L, D, rows, nchunk,
            HAS_DXNEW=dx_new is not None, HAS_SHIFT=shift is not None,
            GATE_TOK=_per_token(gate), SHIFT_TOK=_per_token(shift), SCALE_TOK=_per_token(scale),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return dx, dy, _finish(dgate, gate), _finish(dshift, shift), _finish(dscale, scale)


# ===================================================================================================
# The options of the family (ditfast/ops/modulate.py): RMSNorm instead of LayerNorm, a norm weight,
# tanh gates and the post-norm of the branch output (Z-Image's "sandwich" blocks, Lumina 2):
#     norm_modulate_x                 h = N(x)·w·(1 + scale) + shift
#     gated_residual_x                out = x + act(gate)·P(y)
#     gated_residual_norm_modulate_x  x_new = x + act(gate)·P(y);  h = N(x_new)·w·(1 + scale) + shift
# N is LayerNorm (no affine) or RMSNorm (RMS: a mean of 0 is saved, so xhat = (x - mean)·rstd holds for
# both); w is the norm weight (HAS_W; else 1); act is tanh (TANH) or the identity; P(y) is
# RMSNorm(y)·w_y (POST) or y. The layout, tiling, saved statistics and partial sums are those of the
# kernels above; the weight gradients Σ_rows are written as per-chunk partial sums (B, NCHUNK, D) and
# reduced over samples and chunks by the launcher. The post-norm's row statistics are recomputed in
# the backward from y (a row is in registers anyway), so nothing more is saved.
# ===================================================================================================
@triton.jit
def _tanh(v):
    u = tl.minimum(tl.maximum(v, -15.0), 15.0)  # tanh(±15) is ±1 in fp32: no exp overflow
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _stats(x, mask, D, eps, RMS: tl.constexpr):
    """mean (0 for RMSNorm), rstd and the normalized tile (0 off the rows)."""
    if RMS:
        xm = tl.where(mask, x, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xm * xm, axis=1) / D + eps)
        mean = rstd * 0.0
        xhat = xm * rstd[:, None]
    else:
        mean, rstd, xhat = _normalize(x, mask, D, eps)
    return mean, rstd, xhat


@triton.jit
def _norm_bwd(g, xhat, rstd, D, RMS: tl.constexpr):
    """d(loss)/dx of xhat = N(x) given g = d(loss)/d(xhat)."""
    if RMS:
        c = tl.sum(g * xhat, axis=1) / D
        dx = (g - xhat * c[:, None]) * rstd[:, None]
    else:
        dx = _ln_backward(g, xhat, rstd, D)
    return dx


@triton.jit
def _row_weight(W, cols, D, HAS: tl.constexpr):
    """A (D,) weight as a (1, BLOCK_D) fp32 row (ones without one)."""
    if HAS:
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    else:
        w = tl.where(cols < D, 1.0, 0.0)
    return w[None, :]


@triton.jit
def _branch(y, mask, D, WY, cols, y_eps, POST: tl.constexpr):
    """(P(y), yhat, rstd_y): the post-normed branch RMSNorm(y)·w_y, or y itself (then yhat = y)."""
    if POST:
        _, rstd_y, yhat = _stats(y, mask, D, y_eps, True)
        yn = yhat * _row_weight(WY, cols, D, True)
    else:
        rstd_y = tl.sum(y, axis=1) * 0.0
        yhat = y
        yn = y
    return yn, yhat, rstd_y


@triton.jit
def _act(g, TANH: tl.constexpr):
    """(act(g), act'(g))."""
    if TANH:
        a = _tanh(g)
        da = 1.0 - a * a
    else:
        a = g
        da = g * 0.0 + 1.0
    return a, da


@triton.jit
def _norm_modulate_x_fwd_kernel(
    X, sxb, sxl, sxd,  # input (B, L, D), any strides
    SHIFT, shb, shl, shd,  # (B, L, D) view of shift; unused if not HAS_SHIFT
    SCALE, scb, scl, scd,
    W,  # (D,) norm weight; unused if not HAS_W
    OUT, MEAN, RSTD,  # (B, L, D) contiguous; (B, L) fp32 statistics
    N_ROWS, L, D, eps,
    HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = row < N_ROWS
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    x = _load_tile(X, b, l, sxb, sxl, sxd, cols, mask)
    mean, rstd, xhat = _stats(x, mask, D, eps, RMS)
    tl.store(MEAN + row, mean, mask=rmask)
    tl.store(RSTD + row, rstd, mask=rmask)
    h = xhat * _row_weight(W, cols, D, HAS_W) * (1.0 + _load_tile(SCALE, b, l, scb, scl, scd, cols, mask))
    if HAS_SHIFT:
        h += _load_tile(SHIFT, b, l, shb, shl, shd, cols, mask)
    _store_tile(OUT, row, D, cols, h, mask)


@triton.jit
def _gated_residual_x_fwd_kernel(
    X, sxb, sxl, sxd,  # residual stream (B, L, D), any strides
    Y, syb, syl, syd,  # branch output (B, L, D), any strides
    GATE, sgb, sgl, sgd,  # (B, L, D) view of gate
    WY,  # (D,) post-norm weight; unused if not POST
    OUT,  # (B, L, D) contiguous
    N_ROWS, L, D, y_eps,
    TANH: tl.constexpr, POST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = (row < N_ROWS)[:, None] & (cols < D)[None, :]
    x = _load_tile(X, b, l, sxb, sxl, sxd, cols, mask)
    yn, _, _ = _branch(_load_tile(Y, b, l, syb, syl, syd, cols, mask), mask, D, WY, cols, y_eps, POST)
    a, _ = _act(_load_tile(GATE, b, l, sgb, sgl, sgd, cols, mask), TANH)
    _store_tile(OUT, row, D, cols, x + a * yn, mask)


@triton.jit
def _gated_residual_norm_modulate_x_fwd_kernel(
    X, sxb, sxl, sxd,
    Y, syb, syl, syd,
    GATE, sgb, sgl, sgd,
    SHIFT, shb, shl, shd,  # unused if not HAS_SHIFT
    SCALE, scb, scl, scd,
    W, WY,  # (D,) weights of N and of the post-norm; unused unless HAS_W / POST
    XNEW, H, MEAN, RSTD,
    N_ROWS, L, D, eps, y_eps,
    HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr, TANH: tl.constexpr, POST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = row < N_ROWS
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    x = _load_tile(X, b, l, sxb, sxl, sxd, cols, mask)
    yn, _, _ = _branch(_load_tile(Y, b, l, syb, syl, syd, cols, mask), mask, D, WY, cols, y_eps, POST)
    a, _ = _act(_load_tile(GATE, b, l, sgb, sgl, sgd, cols, mask), TANH)
    x_new = _round(x + a * yn, XNEW.dtype.element_ty)  # h is the norm of the x_new returned (see above)
    tl.store(XNEW + row.to(tl.int64)[:, None] * D + cols[None, :], x_new, mask=mask)
    mean, rstd, xhat = _stats(x_new.to(tl.float32), mask, D, eps, RMS)
    tl.store(MEAN + row, mean, mask=rmask)
    tl.store(RSTD + row, rstd, mask=rmask)
    h = xhat * _row_weight(W, cols, D, HAS_W) * (1.0 + _load_tile(SCALE, b, l, scb, scl, scd, cols, mask))
    if HAS_SHIFT:
        h += _load_tile(SHIFT, b, l, shb, shl, shd, cols, mask)
    _store_tile(H, row, D, cols, h, mask)


@triton.jit
def _norm_modulate_x_bwd_kernel(
    X, sxb, sxl, sxd, MEAN, RSTD,  # saved input and its fp32 statistics
    DOUT, sdb, sdl, sdd,
    SCALE, scb, scl, scd,
    W,
    DX,  # (B, L, D) contiguous, x's dtype
    DSCALE, DSHIFT,  # per token (B, L, D) or per-sample fp32 partials (B, NCHUNK, D)
    DW,  # fp32 partials (B, NCHUNK, D) of the weight gradient; unused if not HAS_W
    L, D, ROWS, NCHUNK,
    HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr,
    SCALE_TOK: tl.constexpr, SHIFT_TOK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NCHUNK
    chunk = pid % NCHUNK
    cols = tl.arange(0, BLOCK_D)
    w = _row_weight(W, cols, D, HAS_W)
    acc_sc = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sh = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_R):
        l = chunk * ROWS + start + tl.arange(0, BLOCK_R)
        lmask = l < L
        mask = lmask[:, None] & (cols < D)[None, :]
        row = b * L + l
        mean = tl.load(MEAN + row, mask=lmask, other=0.0)
        rstd = tl.load(RSTD + row, mask=lmask, other=0.0)
        x = _load_tile(X, b, l, sxb, sxl, sxd, cols, mask)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dh = _load_tile(DOUT, b, l, sdb, sdl, sdd, cols, mask)
        acc_sc = _grad_out(acc_sc, dh * xhat * w, DSCALE, row, D, cols, mask, SCALE_TOK)
        if HAS_SHIFT:
            acc_sh = _grad_out(acc_sh, dh, DSHIFT, row, D, cols, mask, SHIFT_TOK)
        gw = dh * (1.0 + _load_tile(SCALE, b, l, scb, scl, scd, cols, mask))  # d(loss)/d(xhat·w)
        if HAS_W:
            acc_w += tl.sum(gw * xhat, axis=0)
        _store_tile(DX, row, D, cols, _norm_bwd(gw * w, xhat, rstd, D, RMS), mask)
    _flush(acc_sc, DSCALE, b, chunk, NCHUNK, D, cols, SCALE_TOK)
    if HAS_SHIFT:
        _flush(acc_sh, DSHIFT, b, chunk, NCHUNK, D, cols, SHIFT_TOK)
    if HAS_W:
        _flush(acc_w, DW, b, chunk, NCHUNK, D, cols, False)


@triton.jit
def _gated_residual_x_bwd_kernel(
    DOUT, sdb, sdl, sdd,
    Y, syb, syl, syd,
    GATE, sgb, sgl, sgd,
    WY,
    DY,  # (B, L, D) contiguous, y's dtype
    DGATE,  # per token (B, L, D) or per-sample fp32 partials (B, NCHUNK, D)
    DWY,  # fp32 partials (B, NCHUNK, D); unused if not POST
    L, D, ROWS, NCHUNK, y_eps,
    TANH: tl.constexpr, POST: tl.constexpr, GATE_TOK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NCHUNK
    chunk = pid % NCHUNK
    cols = tl.arange(0, BLOCK_D)
    wy = _row_weight(WY, cols, D, POST)
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_wy = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_R):
        l = chunk * ROWS + start + tl.arange(0, BLOCK_R)
        mask = (l < L)[:, None] & (cols < D)[None, :]
        row = b * L + l
        dout = _load_tile(DOUT, b, l, sdb, sdl, sdd, cols, mask)
        yn, yhat, rstd_y = _branch(_load_tile(Y, b, l, syb, syl, syd, cols, mask), mask, D, WY, cols, y_eps, POST)
        a, da = _act(_load_tile(GATE, b, l, sgb, sgl, sgd, cols, mask), TANH)
        acc_g = _grad_out(acc_g, dout * yn * da, DGATE, row, D, cols, mask, GATE_TOK)
        dyn = dout * a
        if POST:
            acc_wy += tl.sum(dyn * yhat, axis=0)
            dyn = _norm_bwd(dyn * wy, yhat, rstd_y, D, True)
        _store_tile(DY, row, D, cols, dyn, mask)
    _flush(acc_g, DGATE, b, chunk, NCHUNK, D, cols, GATE_TOK)
    if POST:
        _flush(acc_wy, DWY, b, chunk, NCHUNK, D, cols, False)


@triton.jit
def _gated_residual_norm_modulate_x_bwd_kernel(
    XNEW, MEAN, RSTD,  # saved x_new (B, L, D) contiguous and its statistics
    DXNEW, sxb, sxl, sxd,  # gradient reaching x_new from outside; unused if not HAS_DXNEW
    DH, shb, shl, shd,
    Y, syb, syl, syd,
    GATE, sgb, sgl, sgd,
    SCALE, scb, scl, scd,
    W, WY,
    DX, DY,
    DGATE, DSHIFT, DSCALE,  # per token (B, L, D) or per-sample fp32 partials (B, NCHUNK, D)
    DW, DWY,  # fp32 partials (B, NCHUNK, D); unused unless HAS_W / POST
    L, D, ROWS, NCHUNK, y_eps,
    HAS_DXNEW: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr,
    TANH: tl.constexpr, POST: tl.constexpr,
    GATE_TOK: tl.constexpr, SHIFT_TOK: tl.constexpr, SCALE_TOK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NCHUNK
    chunk = pid % NCHUNK
    cols = tl.arange(0, BLOCK_D)
    w = _row_weight(W, cols, D, HAS_W)
    wy = _row_weight(WY, cols, D, POST)
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sh = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sc = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_wy = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_R):
        l = chunk * ROWS + start + tl.arange(0, BLOCK_R)
        lmask = l < L
        mask = lmask[:, None] & (cols < D)[None, :]
        row = b * L + l
        mean = tl.load(MEAN + row, mask=lmask, other=0.0)
        rstd = tl.load(RSTD + row, mask=lmask, other=0.0)
        x_new = tl.load(XNEW + row.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
        xhat = tl.where(mask, (x_new.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        dh = _load_tile(DH, b, l, shb, shl, shd, cols, mask)
        acc_sc = _grad_out(acc_sc, dh * xhat * w, DSCALE, row, D, cols, mask, SCALE_TOK)
        if HAS_SHIFT:
            acc_sh = _grad_out(acc_sh, dh, DSHIFT, row, D, cols, mask, SHIFT_TOK)
        gw = dh * (1.0 + _load_tile(SCALE, b, l, scb, scl, scd, cols, mask))
        if HAS_W:
            acc_w += tl.sum(gw * xhat, axis=0)
        dxn = _norm_bwd(gw * w, xhat, rstd, D, RMS)  # through h
        if HAS_DXNEW:
            dxn += _load_tile(DXNEW, b, l, sxb, sxl, sxd, cols, mask)
        _store_tile(DX, row, D, cols, dxn, mask)
        # the residual branch x + act(gate)·P(y), with dxn reaching its output
        yn, yhat, rstd_y = _branch(_load_tile(Y, b, l, syb, syl, syd, cols, mask), mask, D, WY, cols, y_eps, POST)
        a, da = _act(_load_tile(GATE, b, l, sgb, sgl, sgd, cols, mask), TANH)
        acc_g = _grad_out(acc_g, dxn * yn * da, DGATE, row, D, cols, mask, GATE_TOK)
        dyn = dxn * a
        if POST:
            acc_wy += tl.sum(dyn * yhat, axis=0)
            dyn = _norm_bwd(dyn * wy, yhat, rstd_y, D, True)
        _store_tile(DY, row, D, cols, dyn, mask)
    _flush(acc_g, DGATE, b, chunk, NCHUNK, D, cols, GATE_TOK)
    if HAS_SHIFT:
        _flush(acc_sh, DSHIFT, b, chunk, NCHUNK, D, cols, SHIFT_TOK)
    _flush(acc_sc, DSCALE, b, chunk, NCHUNK, D, cols, SCALE_TOK)
    if HAS_W:
        _flush(acc_w, DW, b, chunk, NCHUNK, D, cols, False)
    if POST:
        _flush(acc_wy, DWY, b, chunk, NCHUNK, D, cols, False)


# --- launchers of the options ----------------------------------------------------------------------
def _weight_buffer(w: Optional[Tensor], B: int, nchunk: int, D: int, like: Tensor) -> Tensor:
    """fp32 partial sums (B, NCHUNK, D) of a (D,) weight's gradient; an empty placeholder without one."""
    return like.new_empty(0) if w is None else torch.empty((B, nchunk, D), dtype=torch.float32, device=like.device)


def _weight_grad(buf: Tensor, w: Optional[Tensor]) -> Tensor:
    return buf if w is None else buf.sum((0, 1)).to(w.dtype)


def _zero_weight_grad(w: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if w is None else torch.zeros_like(w)


def norm_modulate_x_fwd(x: Tensor, shift: Optional[Tensor], scale: Tensor, weight: Optional[Tensor], *,
                        eps: float, rms: bool, out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(h, mean, rstd) of h = N(x)·w·(1 + scale) + shift, in out_dtype (default: the inputs' promotion)."""
    B, L, D = x.shape
    _check_d(x)
    out = torch.empty((B, L, D), dtype=out_dtype or _dtype(x, shift, scale, weight), device=x.device)
    stats = torch.empty if x.numel() else torch.zeros
    mean = stats((B, L), dtype=torch.float32, device=x.device)
    rstd = stats((B, L), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out, mean, rstd
    block_r, block_d, warps = _config(D, x.device)
    with on_device(x):
        _norm_modulate_x_fwd_kernel[(triton.cdiv(B * L, block_r),)](
            x, *_strides(x), x if shift is None else shift, *_strides(shift), scale, *_strides(scale),
            x if weight is None else weight, out, mean, rstd, B * L, L, D, eps,
            HAS_SHIFT=shift is not None, HAS_W=weight is not None, RMS=rms,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return out, mean, rstd


def norm_modulate_x_bwd(dout: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, shift: Optional[Tensor], scale: Tensor,
                        weight: Optional[Tensor], *, rms: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale, dweight); a gradient of an absent tensor is empty (shift: metadata only)."""
    B, L, D = x.shape
    _check_d(x)
    if x.numel() == 0:
        dx = torch.zeros((B, L, D), dtype=x.dtype, device=x.device)
        return dx, _zero_grad(shift, x), _zero_grad(scale, x), _zero_weight_grad(weight, x)
    block_r, block_d, warps = _config(D, x.device)
    rows, nchunk = _chunks(B, L, block_r, x.device, weight is not None or _per_sample(scale, shift))
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    dscale, dshift = _grad_buffer(scale, B, L, D, nchunk, x), _grad_buffer(shift, B, L, D, nchunk, x)
    dw = _weight_buffer(weight, B, nchunk, D, x)
    with on_device(x):
        _norm_modulate_x_bwd_kernel[(B * nchunk,)](
            x, *_strides(x), mean, rstd, dout, *_strides(dout), scale, *_strides(scale),
            x if weight is None else weight, dx, dscale, dx if shift is None else dshift, dx if weight is None else dw,
            L, D, rows, nchunk,
            HAS_SHIFT=shift is not None, HAS_W=weight is not None, RMS=rms,
            SCALE_TOK=_per_token(scale), SHIFT_TOK=_per_token(shift), BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=warps,
        )
    return dx, _finish(dshift, shift), _finish(dscale, scale), _weight_grad(dw, weight)


def gated_residual_x_fwd(x: Tensor, y: Tensor, gate: Tensor, y_weight: Optional[Tensor], *, y_eps: float,
                         tanh: bool, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """x + act(gate)·P(y) as a new contiguous (B, L, D) tensor in out_dtype (default: the promotion)."""
    B, L, D = x.shape
    _check_d(x)
    out = torch.empty((B, L, D), dtype=out_dtype or _dtype(x, y, gate, y_weight), device=x.device)
    if out.numel() == 0:
        return out
    block_r, block_d, warps = _config(D, x.device)
    with on_device(x):
        _gated_residual_x_fwd_kernel[(triton.cdiv(B * L, block_r),)](
            x, *_strides(x), y, *_strides(y), gate, *_strides(gate), x if y_weight is None else y_weight, out,
            B * L, L, D, y_eps, TANH=tanh, POST=y_weight is not None,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return out


def gated_residual_x_bwd(dout: Tensor, y: Tensor, gate: Tensor, y_weight: Optional[Tensor], *, y_eps: float,
                         tanh: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dy, dgate, dy_weight) of out = x + act(gate)·P(y) (dx is dout itself)."""
    B, L, D = y.shape
    _check_d(y)
    if y.numel() == 0:
        return torch.zeros((B, L, D), dtype=y.dtype, device=y.device), _zero_grad(gate, y), _zero_weight_grad(y_weight, y)
    block_r, block_d, warps = _config(D, y.device)
    rows, nchunk = _chunks(B, L, block_r, y.device, y_weight is not None or _per_sample(gate))
    dy = torch.empty((B, L, D), dtype=y.dtype, device=y.device)
    dgate, dwy = _grad_buffer(gate, B, L, D, nchunk, y), _weight_buffer(y_weight, B, nchunk, D, y)
    with on_device(y):
        _gated_residual_x_bwd_kernel[(B * nchunk,)](
            dout, *_strides(dout), y, *_strides(y), gate, *_strides(gate), y if y_weight is None else y_weight,
            dy, dgate, dy if y_weight is None else dwy, L, D, rows, nchunk, y_eps,
            TANH=tanh, POST=y_weight is not None, GATE_TOK=_per_token(gate),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return dy, _finish(dgate, gate), _weight_grad(dwy, y_weight)


def gated_residual_norm_modulate_x_fwd(
    x: Tensor, y: Tensor, gate: Tensor, shift: Optional[Tensor], scale: Tensor, weight: Optional[Tensor],
    y_weight: Optional[Tensor], *, eps: float, y_eps: float, rms: bool, tanh: bool,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_new, h, mean, rstd): x_new = x + act(gate)·P(y), h = N(x_new)·w·(1 + scale) + shift; both in
    out_dtype when given (else each in its inputs' promotion)."""
    B, L, D = x.shape
    _check_d(x)
    x_new = torch.empty((B, L, D), dtype=out_dtype or _dtype(x, y, gate, y_weight), device=x.device)
    h = torch.empty((B, L, D), dtype=out_dtype or _dtype(x_new, shift, scale, weight), device=x.device)
    stats = torch.empty if x.numel() else torch.zeros
    mean = stats((B, L), dtype=torch.float32, device=x.device)
    rstd = stats((B, L), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return x_new, h, mean, rstd
    block_r, block_d, warps = _config(D, x.device)
    with on_device(x):
        _gated_residual_norm_modulate_x_fwd_kernel[(triton.cdiv(B * L, block_r),)](
            x, *_strides(x), y, *_strides(y), gate, *_strides(gate),
            x if shift is None else shift, *_strides(shift), scale, *_strides(scale),
            x if weight is None else weight, x if y_weight is None else y_weight,
            x_new, h, mean, rstd, B * L, L, D, eps, y_eps,
            HAS_SHIFT=shift is not None, HAS_W=weight is not None, RMS=rms, TANH=tanh, POST=y_weight is not None,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return x_new, h, mean, rstd


def gated_residual_norm_modulate_x_bwd(
    dx_new: Optional[Tensor], dh: Tensor, x_new: Tensor, mean: Tensor, rstd: Tensor, y: Tensor, gate: Tensor,
    shift: Optional[Tensor], scale: Tensor, weight: Optional[Tensor], y_weight: Optional[Tensor], x_dtype: torch.dtype,
    *, y_eps: float, rms: bool, tanh: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, dgate, dshift, dscale, dweight, dy_weight); absent tensors get empty gradients."""
    B, L, D = x_new.shape
    _check_d(x_new)
    if x_new.numel() == 0:
        dx = torch.zeros((B, L, D), dtype=x_dtype, device=x_new.device)
        dy = torch.zeros((B, L, D), dtype=y.dtype, device=x_new.device)
        return (dx, dy) + tuple(_zero_grad(t, x_new) for t in (gate, shift, scale)) + (
            _zero_weight_grad(weight, x_new), _zero_weight_grad(y_weight, x_new))
    x_new = x_new.contiguous()  # no copy: the forward's output
    block_r, block_d, warps = _config(D, x_new.device)
    reduce = weight is not None or y_weight is not None or _per_sample(gate, shift, scale)
    rows, nchunk = _chunks(B, L, block_r, x_new.device, reduce)
    dx = torch.empty((B, L, D), dtype=x_dtype, device=x_new.device)
    dy = torch.empty((B, L, D), dtype=y.dtype, device=x_new.device)
    dgate, dshift, dscale = (_grad_buffer(t, B, L, D, nchunk, x_new) for t in (gate, shift, scale))
    dw, dwy = _weight_buffer(weight, B, nchunk, D, x_new), _weight_buffer(y_weight, B, nchunk, D, x_new)
    with on_device(x_new):
        _gated_residual_norm_modulate_x_bwd_kernel[(B * nchunk,)](
            x_new, mean, rstd,
            dh if dx_new is None else dx_new, *_strides(dx_new),
            dh, *_strides(dh), y, *_strides(y), gate, *_strides(gate), scale, *_strides(scale),
            x_new if weight is None else weight, x_new if y_weight is None else y_weight,
            dx, dy, dgate, dx if shift is None else dshift, dscale,
            dx if weight is None else dw, dx if y_weight is None else dwy,
            L, D, rows, nchunk, y_eps,
            HAS_DXNEW=dx_new is not None, HAS_SHIFT=shift is not None, HAS_W=weight is not None, RMS=rms,
            TANH=tanh, POST=y_weight is not None,
            GATE_TOK=_per_token(gate), SHIFT_TOK=_per_token(shift), SCALE_TOK=_per_token(scale),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return (dx, dy, _finish(dgate, gate), _finish(dshift, shift), _finish(dscale, scale),
            _weight_grad(dw, weight), _weight_grad(dwy, y_weight))
