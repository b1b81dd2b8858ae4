"""Triton kernels for RMSNorm, RoPE and fused per-head QK-RMSNorm + RoPE, forward and backward.

One kernel family serves the three ops ``rms_norm``, ``apply_rope`` and ``qk_norm_rope``
(ditfast/reference/rope.py defines the math). A tensor is seen as (B, L, H, D) (any strides, last dim
D) and a *row* is one (b, l, h), numbered r = (b * L + l) * H + h. A program owns a tile of BLOCK_R
consecutive rows -- for qk_norm_rope the same rows of q *and* k in one launch, so each tile's cos/sin
(per row, from its token) and the weights are loaded once for both. Rows are read through strides
(q, k may be views of a packed qkv projection); outputs are new contiguous (B, L, H, D) tensors.

Rows are handled in *pair space*: each row is split into two halves x0, x1 of shape (BLOCK_P,):
  interleaved RoPE   x0 = row[2i],  x1 = row[2i + 1]   (FLUX)
  half-split RoPE    x0 = row[i],   x1 = row[P + i]    (GPT-NeoX "rotate_half"), P = D / 2
  no RoPE            the half-split view with P = ceil(D / 2) (so odd D works for rms_norm)
which makes the rotation elementwise: y0 = x0 cos - x1 sin, y1 = x0 sin + x1 cos.

Rounding follows the reference (FLUX's): n = x * rstd in fp32, rounded to x's dtype; times the weight
rounded to x's dtype, rounded again; RoPE in fp32 on that, rounded to x's dtype.

Backward (the roundings taken as identity), with a = R(-theta) g the gradient before the rotation:
  dw = sum_rows a * n,  dn = a * w,  dx = rstd * (dn - n * mean(dn * n))
  dcos = sum_heads (g0 u0 + g1 u1),  dsin = sum_heads (g1 u0 - g0 u1),  u = n * w (RoPE's input).
Weight grads are reduced deterministically: each of G persistent programs accumulates its tiles in
registers and writes one fp32 partial row; the launcher sums the (G, D) partials with torch. Table
grads (only when cos/sin require grad) are written per row and summed over heads (and over the batch
for an (L, P) table) with torch. Saved for backward: the inputs and the fp32 per-row rstd; everything
else is recomputed.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import on_device

Tensor = torch.Tensor

MAX_D = 65536  # widest row one program holds (rms_norm over a hidden dim); wider rows are rejected
_TILE_ELEMS = 2048  # target elements per (BLOCK_R, 2 * BLOCK_P) tile of a forward on a GPU (see _Plan)
_TILE_ELEMS_INTERPRETER = 32768  # ... and under the Triton interpreter


# ----------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_pairs(
    ptr,  # base pointer of the tensor
    rows,  # (BLOCK_R, 1) int64 element offsets of the rows
    row_mask,  # (BLOCK_R, 1) which rows exist
    stride_d,  # element stride of the last dim
    D,  # row width
    P0,  # number of x0 entries (see module docstring); D - P0 is the number of x1 entries
    INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """(x0, x1), each (BLOCK_R, BLOCK_P) in the tensor's dtype; padding reads as 0."""
    if INTERLEAVED:
        # one contiguous (BLOCK_R, 2 * BLOCK_P) load, then de-interleave in registers
        d = tl.arange(0, 2 * BLOCK_P)[None, :]
        x = tl.load(ptr + rows + d * stride_d, mask=row_mask & (d < D), other=0.0)
        x0, x1 = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_P, 2)))
    else:
        i = tl.arange(0, BLOCK_P)[None, :]
        x0 = tl.load(ptr + rows + i * stride_d, mask=row_mask & (i < P0), other=0.0)
        x1 = tl.load(ptr + rows + (i + P0) * stride_d, mask=row_mask & (i < D - P0), other=0.0)
    return x0, x1


@triton.jit
def _store_pairs(
    ptr,  # base pointer of the output
    rows,  # (BLOCK_R, 1) int64 element offsets of the rows
    row_mask,  # (BLOCK_R, 1)
    stride_d,  # element stride of the last dim
    y0,  # (BLOCK_R, BLOCK_P) values for the x0 positions, already in the output dtype
    y1,  # (BLOCK_R, BLOCK_P) values for the x1 positions
    D,
    P0,
    INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_P)[None, :]
        y = tl.reshape(tl.join(y0, y1), (BLOCK_R, 2 * BLOCK_P))
        tl.store(ptr + rows + d * stride_d, y, mask=row_mask & (d < D))
    else:
        i = tl.arange(0, BLOCK_P)[None, :]
        tl.store(ptr + rows + i * stride_d, y0, mask=row_mask & (i < P0))
        tl.store(ptr + rows + (i + P0) * stride_d, y1, mask=row_mask & (i < D - P0))


@triton.jit
def _cast(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """x (fp32) rounded to ``dtype`` (round to nearest even, as torch and the GPU do).

    SOFT_BF16 (the Triton interpreter, CPU tensors): the interpreter's fp32 -> bf16 cast truncates,
    so bf16 is rounded here with integer ops first (NaN kept), which makes the final cast exact.
    """
    if SOFT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        r = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.where(x == x, r, x).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _round(x, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """x (fp32) rounded to ``dtype`` and back to fp32: the reference's intermediate ``.to(x.dtype)``."""
    return _cast(x, dtype, SOFT_BF16).to(tl.float32)


@triton.jit
def _load_weight(w_ptr, like_ptr, stride_w, D, P0,
                 INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr, SOFT_BF16: tl.constexpr):
    """The weight in pair space as (1, BLOCK_P) fp32 tiles, rounded first to the dtype that
    ``like_ptr`` points to (the reference's ``weight.to(x.dtype)``)."""
    zero = tl.zeros((1, 1), dtype=tl.int64)
    w0, w1 = _load_pairs(w_ptr, zero, zero == 0, stride_w, D, P0, INTERLEAVED, 1, BLOCK_P)
    dt = like_ptr.dtype.element_ty
    return _round(w0.to(tl.float32), dt, SOFT_BF16), _round(w1.to(tl.float32), dt, SOFT_BF16)


@triton.jit
def _row_offsets(t, N, L, H, BLOCK_R: tl.constexpr):
    """Tile t -> its BLOCK_R flat row ids r = (b * L + l) * H + h (int64), their mask, and b, l, h."""
    r = tl.cast(t, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # (BLOCK_R,)
    h = r % H
    bl = r // H
    return r, r < N, bl // L, bl % L, h


@triton.jit
def _load_tables(cos_ptr, sin_ptr, b, l, rmask, sc_b, sc_l, sc_p, ss_b, ss_l, ss_p, P0, PH,
                 BLOCK_P: tl.constexpr, ACROSS: tl.constexpr):
    """cos/sin of each row's token, (BLOCK_R, BLOCK_P) fp32 (rows of one token hit the same lines);
    0 for padding rows (r >= N, whose (b, l) lie outside the tables) and padding pairs. ACROSS: a row
    holds all heads of a token (P0 = heads * PH pairs) and pair i takes table column i % PH."""
    i = tl.arange(0, BLOCK_P)[None, :]
    m = rmask[:, None] & (i < P0)
    if ACROSS:
        col = i % PH
    else:
        col = i
    c = tl.load(cos_ptr + (b * sc_b + l * sc_l)[:, None] + col * sc_p, mask=m, other=0.0)
    s = tl.load(sin_ptr + (b * ss_b + l * ss_l)[:, None] + col * ss_p, mask=m, other=0.0)
    return c, s


@triton.jit
def _tile_fwd(
    x_ptr, o_ptr, rstd_ptr,  # input (strided), contiguous output, fp32 rstd per row
    x_rows, o_rows, r, rmask,  # (BLOCK_R, 1) int64 offsets of the x rows / output rows; (BLOCK_R,) row ids, mask
    stride_d, w0, w1, c, s, D, P0, eps,
    DO_NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    dt = o_ptr.dtype.element_ty
    x0, x1 = _load_pairs(x_ptr, x_rows, rmask[:, None], stride_d, D, P0, INTERLEAVED, BLOCK_R, BLOCK_P)
    x0, x1 = x0.to(tl.float32), x1.to(tl.float32)
    if DO_NORM:
        rstd = tl.rsqrt(tl.sum(x0 * x0 + x1 * x1, axis=1) / D + eps)  # (BLOCK_R,)
        tl.store(rstd_ptr + r, rstd, mask=rmask)
        x0 = _round(x0 * rstd[:, None], dt, SOFT_BF16)
        x1 = _round(x1 * rstd[:, None], dt, SOFT_BF16)
        if HAS_W:
            x0 = _round(x0 * w0, dt, SOFT_BF16)
            x1 = _round(x1 * w1, dt, SOFT_BF16)
    if HAS_ROPE:
        y0 = x0 * c - x1 * s
        y1 = x0 * s + x1 * c
    else:
        y0 = x0
        y1 = x1
    _store_pairs(o_ptr, o_rows, rmask[:, None], 1, _cast(y0, dt, SOFT_BF16), _cast(y1, dt, SOFT_BF16),
                 D, P0, INTERLEAVED, BLOCK_R, BLOCK_P)


@triton.jit
def _tile_bwd(
    x_ptr, g_ptr, dx_ptr, rstd_ptr, dcos_ptr, dsin_ptr,  # input, grad of output (both strided), contiguous dx,
                                                        # rstd, (N, P) fp32 per-row table grads
    x_rows, g_rows, dx_rows, r, rmask,
    sx_d, sg_d, w0, w1, c, s, D, P0,
    DO_NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr, TABLE_GRAD: tl.constexpr,
    INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """Writes dx (and, with TABLE_GRAD, this tensor's per-row cos/sin grads); returns the tile's
    weight-grad terms (dw0, dw1), each (BLOCK_R, BLOCK_P), for the caller to accumulate."""
    dt = dx_ptr.dtype.element_ty
    m2 = rmask[:, None]
    g0, g1 = _load_pairs(g_ptr, g_rows, m2, sg_d, D, P0, INTERLEAVED, BLOCK_R, BLOCK_P)
    g0, g1 = g0.to(tl.float32), g1.to(tl.float32)
    if HAS_ROPE:  # rotate the gradient back by -theta
        a0 = g0 * c + g1 * s
        a1 = g1 * c - g0 * s
    else:
        a0 = g0
        a1 = g1
    dw0 = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    if DO_NORM or TABLE_GRAD:
        x0, x1 = _load_pairs(x_ptr, x_rows, m2, sx_d, D, P0, INTERLEAVED, BLOCK_R, BLOCK_P)
        x0, x1 = x0.to(tl.float32), x1.to(tl.float32)
    if DO_NORM:
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)[:, None]  # (BLOCK_R, 1)
        n0 = x0 * rstd
        n1 = x1 * rstd
        if HAS_W:
            dw0 = a0 * n0
            dw1 = a1 * n1
            a0 = a0 * w0
            a1 = a1 * w1
        dot = tl.sum(a0 * n0 + a1 * n1, axis=1)[:, None] / D  # mean(dn * n) per row
        dx0 = rstd * (a0 - n0 * dot)
        dx1 = rstd * (a1 - n1 * dot)
    else:
        dx0 = a0
        dx1 = a1
    _store_pairs(dx_ptr, dx_rows, m2, 1, _cast(dx0, dt, SOFT_BF16), _cast(dx1, dt, SOFT_BF16),
                 D, P0, INTERLEAVED, BLOCK_R, BLOCK_P)
    if TABLE_GRAD:
        if DO_NORM:  # u: what RoPE rotated
            u0 = n0
            u1 = n1
            if HAS_W:
                u0 = n0 * w0
                u1 = n1 * w1
        else:
            u0 = x0
            u1 = x1
        i = tl.arange(0, BLOCK_P)[None, :]
        t_offs = (r * P0)[:, None] + i
        tm = m2 & (i < P0)
        tl.store(dcos_ptr + t_offs, g0 * u0 + g1 * u1, mask=tm)
        tl.store(dsin_ptr + t_offs, g1 * u0 - g0 * u1, mask=tm)
    return dw0, dw1


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _norm_rope_fwd_kernel(
    q_ptr, k_ptr,  # inputs (B, L, H, D), any strides (k only read when HAS_K)
    qo_ptr, ko_ptr,  # outputs (B, L, H, D), contiguous
    qw_ptr, kw_ptr,  # norm weights (D,) (read when HAS_QW / HAS_KW)
    q_rstd_ptr, k_rstd_ptr,  # (B, L, H) fp32 per-row 1/rms (written when DO_NORM)
    cos_ptr, sin_ptr,  # (B or 1, L, P) fp32 tables (read when HAS_ROPE)
    N, L, H, D, P0,  # N = B * L * H rows of width D; P0 pairs (see the module docstring)
    PH,  # with ACROSS: pairs per head (the tables' width)
    sq_b, sq_l, sq_h, sq_d,  # q strides
    sk_b, sk_l, sk_h, sk_d,  # k strides
    s_qw, s_kw,  # weight strides
    sc_b, sc_l, sc_p,  # cos strides (sc_b = 0 for an (L, P) table)
    ss_b, ss_l, ss_p,  # sin strides
    eps,
    HAS_K: tl.constexpr, DO_NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
    HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    ACROSS: tl.constexpr,  # a row is one token's heads side by side: one rstd over all heads, RoPE per head
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round bf16 in software (the interpreter; see _cast)
):
    # one program per tile of BLOCK_R consecutive rows, of q and of k
    r, rmask, b, l, h = _row_offsets(tl.program_id(0), N, L, H, BLOCK_R)
    o_rows = (r * D)[:, None]
    if HAS_ROPE:
        c, s = _load_tables(cos_ptr, sin_ptr, b, l, rmask, sc_b, sc_l, sc_p, ss_b, ss_l, ss_p, P0, PH, BLOCK_P, ACROSS)
    else:
        c = 0.0
        s = 0.0
    if HAS_QW:
        qw0, qw1 = _load_weight(qw_ptr, qo_ptr, s_qw, D, P0, INTERLEAVED, BLOCK_P, SOFT_BF16)
    else:
        qw0 = 1.0
        qw1 = 1.0
    q_rows = (b * sq_b + l * sq_l + h * sq_h)[:, None]
    _tile_fwd(q_ptr, qo_ptr, q_rstd_ptr, q_rows, o_rows, r, rmask, sq_d, qw0, qw1, c, s, D, P0, eps,
              DO_NORM, HAS_QW, HAS_ROPE, INTERLEAVED, BLOCK_R, BLOCK_P, SOFT_BF16)
    if HAS_K:
        if HAS_KW:
            kw0, kw1 = _load_weight(kw_ptr, ko_ptr, s_kw, D, P0, INTERLEAVED, BLOCK_P, SOFT_BF16)
        else:
            kw0 = 1.0
            kw1 = 1.0
        k_rows = (b * sk_b + l * sk_l + h * sk_h)[:, None]
        _tile_fwd(k_ptr, ko_ptr, k_rstd_ptr, k_rows, o_rows, r, rmask, sk_d, kw0, kw1, c, s, D, P0, eps,
                  DO_NORM, HAS_KW, HAS_ROPE, INTERLEAVED, BLOCK_R, BLOCK_P, SOFT_BF16)


@triton.jit
def _norm_rope_bwd_kernel(
    q_ptr, k_ptr,  # forward inputs (B, L, H, D), any strides
    dqo_ptr, dko_ptr,  # grads of the outputs (B, L, H, D), any strides (stride 0 allowed)
    dq_ptr, dk_ptr,  # grads of the inputs (B, L, H, D), contiguous
    qw_ptr, kw_ptr,  # norm weights (D,)
    q_rstd_ptr, k_rstd_ptr,  # (B, L, H) fp32 saved by the forward
    cos_ptr, sin_ptr,  # (B or 1, L, P) fp32 tables
    dqw_ptr, dkw_ptr,  # (G, D) fp32 partial weight grads, one row per program
    dcq_ptr, dsq_ptr, dck_ptr, dsk_ptr,  # (N, P) fp32 per-row cos/sin grads from q and from k
    N, n_tiles, L, H, D, P0,
    PH,  # with ACROSS: pairs per head
    sq_b, sq_l, sq_h, sq_d,
    sk_b, sk_l, sk_h, sk_d,
    sdq_b, sdq_l, sdq_h, sdq_d,  # strides of the q output's grad
    sdk_b, sdk_l, sdk_h, sdk_d,  # strides of the k output's grad
    s_qw, s_kw,
    sc_b, sc_l, sc_p,
    ss_b, ss_l, ss_p,
    HAS_K: tl.constexpr, DO_NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
    HAS_ROPE: tl.constexpr, TABLE_GRAD: tl.constexpr, INTERLEAVED: tl.constexpr,
    ACROSS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round bf16 in software (the interpreter; see _cast)
):
    # G persistent programs; program pid takes tiles pid, pid + G, ... (a fixed order: deterministic)
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    if HAS_QW:
        qw0, qw1 = _load_weight(qw_ptr, dq_ptr, s_qw, D, P0, INTERLEAVED, BLOCK_P, SOFT_BF16)
    else:
        qw0 = 1.0
        qw1 = 1.0
    if HAS_KW:
        kw0, kw1 = _load_weight(kw_ptr, dk_ptr, s_kw, D, P0, INTERLEAVED, BLOCK_P, SOFT_BF16)
    else:
        kw0 = 1.0
        kw1 = 1.0
    acc_q0 = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    acc_q1 = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    acc_k0 = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    acc_k1 = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    for t in range(pid, n_tiles, G):
        r, rmask, b, l, h = _row_offsets(t, N, L, H, BLOCK_R)
        o_rows = (r * D)[:, None]
        if HAS_ROPE:
            c, s = _load_tables(cos_ptr, sin_ptr, b, l, rmask, sc_b, sc_l, sc_p, ss_b, ss_l, ss_p, P0, PH, BLOCK_P,
                                ACROSS)
        else:
            c = 0.0
            s = 0.0
        q_rows = (b * sq_b + l * sq_l + h * sq_h)[:, None]
        g_rows = (b * sdq_b + l * sdq_l + h * sdq_h)[:, None]
        dw0, dw1 = _tile_bwd(
            q_ptr, dqo_ptr, dq_ptr, q_rstd_ptr, dcq_ptr, dsq_ptr, q_rows, g_rows, o_rows, r, rmask, sq_d, sdq_d,
            qw0, qw1, c, s, D, P0, DO_NORM, HAS_QW, HAS_ROPE, TABLE_GRAD, INTERLEAVED, BLOCK_R, BLOCK_P, SOFT_BF16)
        if HAS_QW:
            acc_q0 += dw0
            acc_q1 += dw1
        if HAS_K:
            k_rows = (b * sk_b + l * sk_l + h * sk_h)[:, None]
            g_rows = (b * sdk_b + l * sdk_l + h * sdk_h)[:, None]
            dw0, dw1 = _tile_bwd(
                k_ptr, dko_ptr, dk_ptr, k_rstd_ptr, dck_ptr, dsk_ptr, k_rows, g_rows, o_rows, r, rmask, sk_d, sdk_d,
                kw0, kw1, c, s, D, P0, DO_NORM, HAS_KW, HAS_ROPE, TABLE_GRAD, INTERLEAVED, BLOCK_R, BLOCK_P, SOFT_BF16)
            if HAS_KW:
                acc_k0 += dw0
                acc_k1 += dw1
    # one partial weight-grad row per program
    zero = tl.zeros((1, 1), dtype=tl.int64)
    prow = zero + pid.to(tl.int64) * D
    if HAS_QW:
        _store_pairs(dqw_ptr, prow, zero == 0, 1, tl.sum(acc_q0, axis=0)[None, :], tl.sum(acc_q1, axis=0)[None, :],
                     D, P0, INTERLEAVED, 1, BLOCK_P)
    if HAS_KW:
        _store_pairs(dkw_ptr, prow, zero == 0, 1, tl.sum(acc_k0, axis=0)[None, :], tl.sum(acc_k1, axis=0)[None, :],
                     D, P0, INTERLEAVED, 1, BLOCK_P)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
class _Plan:
    """Block sizes, grid and warps for N rows of width D.

    On a GPU a tile holds about ``tile`` elements (BLOCK_R * 2 * BLOCK_P) per tensor, spread to about
    ``per_thread`` elements per thread (rows wider than a tile get one row per program and up to 16
    warps). Compiled offline for sm_90 these defaults use 80-150 registers and never spill; the
    backward keeps weight-grad accumulators in registers, hence its smaller share per thread.
    """

    def __init__(self, N: int, D: int, rope: bool, device: torch.device, backward: bool = False):
        if D > MAX_D:
            raise ValueError(f"the triton backend handles rows up to {MAX_D} wide, got last dim {D}")
        self.P0 = D // 2 if rope else (D + 1) // 2
        self.BLOCK_P = triton.next_power_of_2(max(self.P0, 1))
        if device.type == "cuda":
            tile, per_thread = (_TILE_ELEMS // 2, 4) if backward else (_TILE_ELEMS, 8)
        else:  # the interpreter pays per program and per op, not per element: big tiles
            tile, per_thread = _TILE_ELEMS_INTERPRETER, _TILE_ELEMS_INTERPRETER
        width = 2 * self.BLOCK_P
        self.BLOCK_R = min(triton.next_power_of_2(N), max(1, tile // width))
        self.n_tiles = triton.cdiv(N, self.BLOCK_R)
        self.num_warps = min(16, max(4, self.BLOCK_R * width // (32 * per_thread)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _n_programs(n_tiles: int, device: torch.device) -> int:
    """Persistent programs for the backward (each writes one partial weight-grad row)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(n_tiles, 4 * _sm_count(index)))
    return max(1, min(n_tiles, 8))  # interpreter: programs run one after another anyway


def _table_strides(t: Optional[Tensor]) -> Tuple[int, int, int]:
    if t is None:
        return 0, 0, 0
    return (0,) + tuple(t.stride()) if t.dim() == 2 else tuple(t.stride())


def as_rows_4d(*ts: Tensor) -> Tuple[Tensor, ...]:
    """(B, L, H, D) views of same-shaped tensors (..., D), rows in row-major order of the leading dims.

    Leading dims are merged where every tensor's strides allow it; no copy is made unless more than
    three strided dims remain (then the tensors are reshaped, which copies).
    """
    shape = ts[0].shape
    groups = []  # [(size, [stride per tensor])], outermost first
    for d in range(len(shape) - 1):
        n = shape[d]
        if n == 1:
            continue
        st = [t.stride(d) for t in ts]
        if groups and all(g == n * s for g, s in zip(groups[-1][1], st)):
            groups[-1] = (groups[-1][0] * n, st)
        else:
            groups.append((n, st))
    if len(groups) > 3:
        return as_rows_4d(*(t.reshape(-1, shape[-1]) for t in ts))
    groups = [(1, [0] * len(ts))] * (3 - len(groups)) + groups
    sizes = [n for n, _ in groups] + [shape[-1]]
    return tuple(
        t.as_strided(sizes, [g[1][j] for g in groups] + [t.stride(-1)], t.storage_offset()) for j, t in enumerate(ts)
    )


def norm_rope_fwd(
    q: Tensor,
    k: Optional[Tensor],
    q_weight: Optional[Tensor],
    k_weight: Optional[Tensor],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    eps: float,
    do_norm: bool,
    interleaved: bool,
    head_pairs: Optional[int] = None,
):
    """Forward of the family on 4-D (B, L, H, D) q (and k, same shape). Returns
    (q_out, k_out, q_rstd, k_rstd): contiguous outputs in the inputs' dtypes (k_out None without k) and
    fp32 (B, L, H) rstd (None without norm). The tensors may be empty (nothing is launched).
    head_pairs: None, or a row holds one token's heads side by side (H = 1, D = heads · 2 · head_pairs:
    the norm runs over all heads, RoPE per head with (.., head_pairs) tables; interleaved pairs only)."""
    B, L, H, D = q.shape
    dev = q.device
    rope = cos is not None
    q_out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    k_out = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=dev)
    q_rstd = torch.empty((B, L, H), dtype=torch.float32, device=dev) if do_norm else None
    k_rstd = torch.empty((B, L, H), dtype=torch.float32, device=dev) if do_norm and k is not None else None
    if q.numel() == 0:
        return q_out, k_out, q_rstd, k_rstd
    N = B * L * H
    plan = _Plan(N, D, rope, dev)
    kk = q if k is None else k  # unused stand-ins for absent tensors keep the signature fixed
    with on_device(q):
        _norm_rope_fwd_kernel[(plan.n_tiles,)](
            q, kk, q_out, q_out if k_out is None else k_out,
            q if q_weight is None else q_weight, q if k_weight is None else k_weight,
            q_out if q_rstd is None else q_rstd, q_out if k_rstd is None else k_rstd,
            q if cos is None else cos, q if sin is None else sin,
            N, L, H, D, plan.P0, head_pairs or plan.P0,
            *q.stride(), *kk.stride(),
            0 if q_weight is None else q_weight.stride(0), 0 if k_weight is None else k_weight.stride(0),
            *_table_strides(cos), *_table_strides(sin),
            eps,
            HAS_K=k is not None, DO_NORM=do_norm, HAS_QW=q_weight is not None, HAS_KW=k_weight is not None,
            HAS_ROPE=rope, INTERLEAVED=rope and interleaved, ACROSS=rope and head_pairs is not None,
            BLOCK_R=plan.BLOCK_R, BLOCK_P=plan.BLOCK_P, SOFT_BF16=dev.type != "cuda", num_warps=plan.num_warps,
        )
    return q_out, k_out, q_rstd, k_rstd


def norm_rope_bwd(
    dq_out: Tensor,
    dk_out: Optional[Tensor],
    q: Tensor,
    k: Optional[Tensor],
    q_weight: Optional[Tensor],
    k_weight: Optional[Tensor],
    q_rstd: Optional[Tensor],
    k_rstd: Optional[Tensor],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    interleaved: bool,
    table_grad: bool,
    head_pairs: Optional[int] = None,
):
    """Backward of :func:`norm_rope_fwd` (norm when q_rstd is given; ``head_pairs`` as there). Returns
    (dq, dk, dq_weight, dk_weight, dcos, dsin); an entry is None when its input is None (the tables'
    also without table_grad). Grads have their inputs' dtypes and shapes; dq / dk are contiguous."""
    B, L, H, D = q.shape
    dev = q.device
    rope = cos is not None
    table_grad = table_grad and rope
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=dev)
    if q.numel() == 0:
        zeros = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
        tables = (zeros(cos), zeros(sin)) if table_grad else (None, None)
        return (dq, dk, zeros(q_weight), zeros(k_weight)) + tables
    N = B * L * H
    plan = _Plan(N, D, rope, dev, backward=True)
    G = _n_programs(plan.n_tiles, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    dqw_part = torch.empty((G, D), **f32) if q_weight is not None else None
    dkw_part = torch.empty((G, D), **f32) if k_weight is not None else None
    # per-row (cos, sin) grads from q (and from k): (parts, 2, N, P), summed over parts and heads below
    n_parts = 1 if k is None else 2
    tab = torch.empty((n_parts, 2, N, plan.P0), **f32) if table_grad else dq.new_empty((1, 2, 0))
    kk = q if k is None else k
    dkk = dq_out if dk_out is None else dk_out
    with on_device(q):
        _norm_rope_bwd_kernel[(G,)](
            q, kk, dq_out, dkk, dq, dq if dk is None else dk,
            q if q_weight is None else q_weight, q if k_weight is None else k_weight,
            dq if q_rstd is None else q_rstd, dq if k_rstd is None else k_rstd,
            q if cos is None else cos, q if sin is None else sin,
            dq if dqw_part is None else dqw_part, dq if dkw_part is None else dkw_part,
            tab[0, 0], tab[0, 1], tab[-1, 0], tab[-1, 1],
            N, plan.n_tiles, L, H, D, plan.P0, head_pairs or plan.P0,
            *q.stride(), *kk.stride(), *dq_out.stride(), *dkk.stride(),
            0 if q_weight is None else q_weight.stride(0), 0 if k_weight is None else k_weight.stride(0),
            *_table_strides(cos), *_table_strides(sin),
            HAS_K=k is not None, DO_NORM=q_rstd is not None, HAS_QW=q_weight is not None, HAS_KW=k_weight is not None,
            HAS_ROPE=rope, TABLE_GRAD=table_grad, INTERLEAVED=rope and interleaved,
            ACROSS=rope and head_pairs is not None,
            BLOCK_R=plan.BLOCK_R, BLOCK_P=plan.BLOCK_P, SOFT_BF16=dev.type != "cuda", num_warps=plan.num_warps,
        )
    dqw = None if dqw_part is None else dqw_part.sum(0).to(q_weight.dtype)
    dkw = None if dkw_part is None else dkw_part.sum(0).to(k_weight.dtype)
    dcos = dsin = None
    if table_grad:
        # (a row of all heads side by side: its pairs are (heads, head_pairs), summed over the heads too)
        ph = head_pairs or plan.P0
        per_row = tab.view(n_parts, 2, B, L, H * (plan.P0 // ph), ph)
        # sum over parts and heads (and batch for an (L, P) table); two separate (non-aliasing) results
        dcos = per_row[:, 0].sum(dim=(0, 1, 3) if cos.dim() == 2 else (0, 3)).to(cos.dtype)
        dsin = per_row[:, 1].sum(dim=(0, 1, 3) if sin.dim() == 2 else (0, 3)).to(sin.dtype)
    return dq, dk, dqw, dkw, dcos, dsin
