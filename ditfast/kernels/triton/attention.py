"""ditfast's Triton flash attention on the (B, L, H, Dh) layout: forward and backward, non-causal.

Math (ditfast/reference/attention.py): ``O = softmax(q kᵀ · Dh**-0.5) v`` over the joint key sequence.

Two fusions no library backend has:

* **Split streams.** Up to two token streams (text, image), each with its own q, k, v tensors (any
  (b, l, h) strides, e.g. views of a packed qkv projection), are attended as ONE joint sequence
  ``[stream 0; stream 1]`` without concatenating them; each stream's output goes to its own tensor.
  A q tile never straddles two streams: the grid has ``cdiv(Lq0, BM) + cdiv(Lq1, BM)`` q tiles and a
  program picks its stream's pointers with scalar selects; the key loop runs over stream 0's blocks,
  then stream 1's. Joint positions (for the RoPE tables, the logsumexp rows) are stream 1's offset
  by stream 0's length.
* **Prologue.** QK-RMSNorm (per head, FLUX rounding: normalize in fp32, round to the input dtype,
  times the weight, round) and RoPE (interleaved or half-split pairs, in fp32, rounded) are applied
  to each q / k tile as it is loaded. The backward recomputes them and chains the gradient through.

Head dim: Dh is padded to DP = max(32, next_pow2(Dh)) with masks. With RoPE a tile is held as two
halves (a, b) of width DP/2 -- the first and second member of each rotated pair -- so the rotation
is elementwise; ``q·k = qa·ka + qb·kb`` is unchanged by that permutation of the head dim. Without
RoPE a tile is one (rows, DP) block and ``b`` is ``a``.

Softmax runs in base 2: scores are scaled by ``Dh**-0.5 · log2(e)``, and the saved logsumexp (one fp32
per query row, (B, H, Lq0 + Lq1)) is in the same units.

Backward (S scaled scores, P = softmax, dO given): ``Δ = rowsum(dO ∘ O)``, ``dV = Pᵀ dO``,
``dP = dO vᵀ``, ``dS = P ∘ (dP − Δ)``, ``dq = dS k · scale``, ``dk = dSᵀ q · scale``. Two kernels,
no atomics (deterministic): the dq kernel (one program per q tile, which also writes Δ for its rows)
and the dk/dv kernel (one program per key tile). With the prologue each then maps the gradient of
the rotated-normalized tile back to the raw input (RoPE⁻¹, then the RMSNorm backward) and writes one
fp32 row of weight-gradient partials per program, which the launcher sums (deterministic, no atomics).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._common import on_device

Tensor = torch.Tensor

ROPE_NONE, ROPE_INTERLEAVED, ROPE_HALF = 0, 1, 2
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------------
# The Triton interpreter (CPU tensors, TRITON_INTERPRET=1), which runs the tests without a GPU:
# * it converts fp32 -> bf16 by truncation (GPUs round to nearest even), so _round / _to / _to_mm
#   round bf16 in fp32 arithmetic first;
# * its tl.dot multiplies bf16 operands as raw integers, so bf16 dot operands are fp32 there (the MM
#   dtype; exact, since they hold bf16-rounded values);
# * it re-patches triton.language on every call of a jit helper (~1.5 ms, which dominated the CPU
#   tests), so there the helpers below are plain Python functions -- the interpreter runs jit code
#   as Python anyway. On GPUs all three are no-ops: the helpers are @triton.jit, the casts plain.
# ------------------------------------------------------------------------------------------------
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET = tl.constexpr(_INTERPRETING)


def _device_fn(fn):
    """@triton.jit for the kernels' helpers; the plain function under the interpreter."""
    return fn if _INTERPRETING else triton.jit(fn)


@_device_fn
def _round(x, dtype: tl.constexpr):
    """fp32 x rounded to ``dtype`` (to nearest, like torch and the GPU), returned as fp32."""
    if _INTERPRET and dtype == tl.bfloat16:
        # Veltkamp split: hi = x rounded to 8 significant bits (the truncating cast of hi is exact)
        t = x * 65537.0
        hi = t - (t - x)
        return tl.where(tl.abs(x) < 1e30, hi, x)
    else:
        return x.to(dtype).to(tl.float32)


@_device_fn
def _to(x, dtype: tl.constexpr):
    """fp32 x rounded to ``dtype``, as ``dtype``."""
    if _INTERPRET and dtype == tl.bfloat16:
        return _round(x, dtype).to(dtype)
    else:
        return x.to(dtype)


@_device_fn
def _to_mm(x, dtype: tl.constexpr):
    """fp32 x rounded to ``dtype``, as the dot-operand dtype MM: ``dtype``, except fp32 for bf16
    under the interpreter."""
    if _INTERPRET and dtype == tl.bfloat16:
        return _round(x, dtype)
    else:
        return x.to(dtype)


@_device_fn
def _pick(in0, a, b, TWO_STREAMS: tl.constexpr):
    """What a program uses from its stream: a in stream 0 (in0), b in stream 1; a with one stream."""
    if TWO_STREAMS:
        return tl.where(in0, a, b)
    else:
        return a


# ------------------------------------------------------------------------------------------------
# Tile helpers. Per-head-dim vectors (columns, masks, weights) are computed once per program and
# passed down, so the loops only load and compute.
# ------------------------------------------------------------------------------------------------
@_device_fn
def _head_cols(D: tl.constexpr, DP: tl.constexpr, ROPE: tl.constexpr):
    """Head-dim column of every element of the a / b halves (of the whole tile without RoPE), and
    which of them are real (not padding)."""
    if ROPE == 0:
        ca = tl.arange(0, DP)
        cb = ca
        ok = ca < D
    else:
        j = tl.arange(0, DP // 2)
        ok = j < D // 2
        if ROPE == 1:  # interleaved pairs (2j, 2j + 1)
            ca = 2 * j
            cb = 2 * j + 1
        else:  # half-split pairs (j, j + Dh/2)
            ca = j
            cb = j + D // 2
    return ca, cb, ok


@_device_fn
def _load_weights(
    W,  # RMSNorm weight (Dh,), any float dtype
    X,  # any pointer of the activations' dtype (the weight is rounded to it, as in the reference)
    ca, cb, cok,  # from _head_cols
    ROPE: tl.constexpr,
    NORM: tl.constexpr,
):
    """(wa, wb) fp32 halves of the weight (placeholders without NORM)."""
    if NORM:
        dt = X.dtype.element_ty
        wa = _round(tl.load(W + ca, mask=cok, other=0.0).to(tl.float32), dt)
        if ROPE != 0:
            wb = _round(tl.load(W + cb, mask=cok, other=0.0).to(tl.float32), dt)
        else:
            wb = wa
    else:
        wa = 0.0
        wb = 0.0
    return wa, wb


@_device_fn
def _load_heads(
    ptr,  # pointer to element (token 0, col 0) of this (batch, head) of the tensor
    rows,  # (R,) int64 token indices of the tile
    row_ok,  # (R,) which rows exist
    stride_l,  # element stride between tokens
    ca, cb, cok,  # from _head_cols
    R: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    ROPE: tl.constexpr,
):
    """(a, b) halves of an (R, Dh) tile in the tensor's dtype (b is a without RoPE); padding is 0."""
    if ROPE == 1:
        # one contiguous (R, DP) load, de-interleaved in registers
        d = tl.arange(0, DP)
        x = tl.load(ptr + rows[:, None] * stride_l + d[None, :], mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        a, b = tl.split(tl.reshape(x, (R, DP // 2, 2)))
    else:
        m = row_ok[:, None] & cok[None, :]
        a = tl.load(ptr + rows[:, None] * stride_l + ca[None, :], mask=m, other=0.0)
        if ROPE == 2:
            b = tl.load(ptr + rows[:, None] * stride_l + cb[None, :], mask=m, other=0.0)
        else:
            b = a
    return a, b


@_device_fn
def _store_heads(
    ptr,  # pointer to element (token 0, col 0) of this (batch, head) of the output
    a, b,  # halves, already in the output dtype (b ignored without RoPE)
    rows, row_ok, stride_l, ca, cb, cok,
    R: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    ROPE: tl.constexpr,
):
    """Inverse of _load_heads."""
    if ROPE == 1:
        d = tl.arange(0, DP)
        x = tl.reshape(tl.join(a, b), (R, DP))
        tl.store(ptr + rows[:, None] * stride_l + d[None, :], x, mask=row_ok[:, None] & (d < D)[None, :])
    else:
        m = row_ok[:, None] & cok[None, :]
        tl.store(ptr + rows[:, None] * stride_l + ca[None, :], a, mask=m)
        if ROPE == 2:
            tl.store(ptr + rows[:, None] * stride_l + cb[None, :], b, mask=m)


@_device_fn
def _prologue(
    a, b,  # raw halves of the tile, input dtype
    wa, wb,  # fp32 weight halves (NORM)
    C, S,  # cos / sin tables at this batch (ROPE != 0)
    pos,  # (R,) int64 joint positions of the rows
    pos_ok,  # (R,)
    cok,  # (DP/2,) real pair columns (ROPE != 0)
    stride_cl,  # element stride between positions of the tables
    eps,
    D: tl.constexpr,
    DP: tl.constexpr,
    ROPE: tl.constexpr,
    NORM: tl.constexpr,
):
    """RoPE(RMSNorm(x) · w) of the tile as (a, b) in the MM dtype, rounded to the input dtype at
    the reference's steps: after the normalization, after the weight, after the rotation."""
    dt = a.dtype
    af = a.to(tl.float32)
    bf = b.to(tl.float32)
    if NORM:
        ss = tl.sum(af * af, 1)
        if ROPE != 0:
            ss += tl.sum(bf * bf, 1)
        r = (1.0 / tl.sqrt(ss / D + eps))[:, None]
        af = _round(af * r, dt) * wa[None, :]
        if ROPE != 0:
            bf = _round(bf * r, dt) * wb[None, :]
        if ROPE == 0:
            a = _to_mm(af, dt)
            b = a
        else:
            af = _round(af, dt)
            bf = _round(bf, dt)
    if ROPE != 0:
        j = tl.arange(0, DP // 2)
        off = pos[:, None] * stride_cl + j[None, :]
        m = pos_ok[:, None] & cok[None, :]
        c = tl.load(C + off, mask=m, other=0.0)
        s = tl.load(S + off, mask=m, other=0.0)
        a = _to_mm(af * c - bf * s, dt)
        b = _to_mm(af * s + bf * c, dt)
    return a, b


@_device_fn
def _prologue_bwd(
    ga, gb,  # fp32 gradient w.r.t. the prologue's output halves
    a, b,  # raw input halves (input dtype)
    wa, wb, C, S, pos, pos_ok, cok, stride_cl, eps,
    D: tl.constexpr,
    DP: tl.constexpr,
    ROPE: tl.constexpr,
    NORM: tl.constexpr,
):
    """(dxa, dxb, dwa, dwb): the gradient w.r.t. the raw input halves (fp32) and the rows' summed
    weight-gradient halves (fp32; zeros without NORM). The forward's roundings count as identity.

    RoPE⁻¹ rotates by −θ. RMSNorm with n = x · rstd, y = n · w: dw = Σ_rows g · n, dn = g · w,
    dx = rstd · dn − x · rstd³ · mean(dn · x).
    """
    if ROPE != 0:
        j = tl.arange(0, DP // 2)
        off = pos[:, None] * stride_cl + j[None, :]
        m = pos_ok[:, None] & cok[None, :]
        c = tl.load(C + off, mask=m, other=0.0)
        s = tl.load(S + off, mask=m, other=0.0)
        ga_rot = ga * c + gb * s
        gb = gb * c - ga * s
        ga = ga_rot
        dwa = tl.zeros((DP // 2,), dtype=tl.float32)
    else:
        dwa = tl.zeros((DP,), dtype=tl.float32)
    dwb = dwa
    if NORM:
        dt = a.dtype
        af = a.to(tl.float32)
        ss = tl.sum(af * af, 1)
        if ROPE != 0:
            bf = b.to(tl.float32)
            ss += tl.sum(bf * bf, 1)
        r = (1.0 / tl.sqrt(ss / D + eps))[:, None]
        dwa = tl.sum(ga * _round(af * r, dt), 0)
        ga = ga * wa[None, :]
        dot = tl.sum(ga * af, 1)
        if ROPE != 0:
            dwb = tl.sum(gb * _round(bf * r, dt), 0)
            gb = gb * wb[None, :]
            dot += tl.sum(gb * bf, 1)
        coef = (r * r * r) * (dot / D)[:, None]
        ga = r * ga - af * coef
        if ROPE != 0:
            gb = r * gb - bf * coef
        else:
            gb = ga
    return ga, gb, dwa, dwb


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@_device_fn
def _fwd_inner(
    acc, m_i, l_i,  # running output (BM, DP) fp32, row max (BM,), row sum (BM,)
    qa, qb,  # the q tile (after the prologue)
    K, V,  # this key stream's k, v at (batch, head)
    sk_l, sv_l,  # their token strides
    wa, wb,  # k's RMSNorm weight halves of this stream
    C, S,  # the RoPE tables at this batch
    pos0,  # joint position of this stream's token 0
    LK,  # this stream's length
    ca, cb, cok, sc_l, qk_scale, eps,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, NORM: tl.constexpr, PROLOGUE: tl.constexpr, PREC: tl.constexpr, MM: tl.constexpr,
    EVEN: tl.constexpr,  # LK is a multiple of BLOCK_N: no key masks
):
    """Online softmax over the key blocks of one stream."""
    d = tl.arange(0, DP)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if EVEN:
            col_ok = tl.full((BLOCK_N,), 1, tl.int1)
        else:
            col_ok = cols < LK
        cols = cols.to(tl.int64)
        ka, kb = _load_heads(K, cols, col_ok, sk_l, ca, cb, cok, BLOCK_N, D, DP, ROPE)
        if PROLOGUE:
            ka, kb = _prologue(ka, kb, wa, wb, C, S, pos0 + cols, col_ok, cok, sc_l, eps, D, DP, ROPE, NORM)
        else:
            ka = ka.to(MM)
            kb = kb.to(MM)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        if ROPE != 0:
            s = tl.dot(qb, tl.trans(kb), s, input_precision=PREC)
        s = s * qk_scale
        if not EVEN:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * sv_l + d[None, :], mask=col_ok[:, None] & (d < D)[None, :], other=0.0)
        acc = tl.dot(_to_mm(p, V.dtype.element_ty), v.to(MM), acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    # stream 0: q, k, v (B, L, H, Dh) inputs and o (B, Lq0, H, Dh) output; stream 1 likewise
    Q0, K0, V0, O0, Q1, K1, V1, O1,
    LSE,  # (B, H, Lq0 + Lq1) fp32 output: base-2 logsumexp of each query row's scaled scores
    WQ0, WK0, WQ1, WK1,  # RMSNorm weights (Dh,) of each stream's q and k (NORM)
    COS, SIN,  # (B or 1, Lk0 + Lk1, Dh/2) fp32 RoPE tables (ROPE != 0)
    # (batch, token, head) strides of q0, k0, v0, o0, q1, k1, v1, o1, in elements
    sq0_b, sq0_l, sq0_h, sk0_b, sk0_l, sk0_h, sv0_b, sv0_l, sv0_h, so0_b, so0_l, so0_h,
    sq1_b, sq1_l, sq1_h, sk1_b, sk1_l, sk1_h, sv1_b, sv1_l, sv1_h, so1_b, so1_l, so1_h,
    sc_b, sc_l,  # RoPE table strides (sc_b = 0: one table for the whole batch)
    LQ0, LQ1, LK0, LK1,  # stream lengths (queries, keys)
    H,  # heads
    qk_scale,  # Dh**-0.5 * log2(e)
    eps,  # RMSNorm epsilon
    D: tl.constexpr,  # head dim
    DP: tl.constexpr,  # head dim padded to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr,  # 0 none, 1 interleaved, 2 half-split
    NORM: tl.constexpr,  # apply QK-RMSNorm
    PROLOGUE: tl.constexpr,  # NORM or ROPE != 0
    TWO_STREAMS: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    MM: tl.constexpr,  # dtype of the tl.dot operands (the inputs'; fp32 for bf16 under the interpreter)
    EVEN_K0: tl.constexpr,  # Lk0 (Lk1) is a multiple of BLOCK_N
    EVEN_K1: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    # this program's q stream: tiles [0, n0) are stream 0's, the rest stream 1's
    n0 = tl.cdiv(LQ0, BLOCK_M)
    in0 = pid_m < n0
    Q = _pick(in0, Q0 + off_b * sq0_b + off_h * sq0_h, Q1 + off_b * sq1_b + off_h * sq1_h, TWO_STREAMS)
    O = _pick(in0, O0 + off_b * so0_b + off_h * so0_h, O1 + off_b * so1_b + off_h * so1_h, TWO_STREAMS)
    WQ = _pick(in0, WQ0, WQ1, TWO_STREAMS)
    sq_l = _pick(in0, sq0_l, sq1_l, TWO_STREAMS)
    so_l = _pick(in0, so0_l, so1_l, TWO_STREAMS)
    LQ = _pick(in0, LQ0, LQ1, TWO_STREAMS)
    q_pos0 = _pick(in0, 0, LQ0, TWO_STREAMS)
    start_m = _pick(in0, pid_m, pid_m - n0, TWO_STREAMS) * BLOCK_M
    C = COS + off_b * sc_b
    S = SIN + off_b * sc_b
    ca, cb, cok = _head_cols(D, DP, ROPE)

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    rows = rows.to(tl.int64)
    qa, qb = _load_heads(Q, rows, row_ok, sq_l, ca, cb, cok, BLOCK_M, D, DP, ROPE)
    if PROLOGUE:
        wa, wb = _load_weights(WQ, Q0, ca, cb, cok, ROPE, NORM)
        qa, qb = _prologue(qa, qb, wa, wb, C, S, q_pos0 + rows, row_ok, cok, sc_l, eps, D, DP, ROPE, NORM)
    else:
        qa = qa.to(MM)
        qb = qb.to(MM)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DP), dtype=tl.float32)
    wa, wb = _load_weights(WK0, Q0, ca, cb, cok, ROPE, NORM)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, qa, qb, K0 + off_b * sk0_b + off_h * sk0_h, V0 + off_b * sv0_b + off_h * sv0_h,
        sk0_l, sv0_l, wa, wb, C, S, 0, LK0, ca, cb, cok, sc_l, qk_scale, eps,
        D, DP, BLOCK_N, ROPE, NORM, PROLOGUE, PREC, MM, EVEN_K0,
    )
    if TWO_STREAMS:
        wa, wb = _load_weights(WK1, Q0, ca, cb, cok, ROPE, NORM)
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, qa, qb, K1 + off_b * sk1_b + off_h * sk1_h, V1 + off_b * sv1_b + off_h * sv1_h,
            sk1_l, sv1_l, wa, wb, C, S, LK0, LK1, ca, cb, cok, sc_l, qk_scale, eps,
            D, DP, BLOCK_N, ROPE, NORM, PROLOGUE, PREC, MM, EVEN_K1,
        )

    o = acc / l_i[:, None]
    d = tl.arange(0, DP)
    tl.store(O + rows[:, None] * so_l + d[None, :], _to(o, O.dtype.element_ty), mask=row_ok[:, None] & (d < D)[None, :])
    lse_rows = pid_bh.to(tl.int64) * (LQ0 + LQ1) + q_pos0 + rows
    tl.store(LSE + lse_rows, m_i + tl.log2(l_i), mask=row_ok)


# ------------------------------------------------------------------------------------------------
# Backward: dq (and Δ)
# ------------------------------------------------------------------------------------------------
@_device_fn
def _bwd_dq_inner(
    dqa, dqb,  # fp32 accumulators (halves)
    qa, qb, do, lse, delta,  # the q tile (after the prologue), its dO, logsumexp and Δ rows
    K, V, sk_l, sv_l, wa, wb, C, S, pos0, LK, ca, cb, cok, sc_l, qk_scale, eps,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, NORM: tl.constexpr, PROLOGUE: tl.constexpr, PREC: tl.constexpr, MM: tl.constexpr,
):
    """Accumulate dq over the key blocks of one stream."""
    d = tl.arange(0, DP)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < LK
        cols = cols.to(tl.int64)
        ka, kb = _load_heads(K, cols, col_ok, sk_l, ca, cb, cok, BLOCK_N, D, DP, ROPE)
        if PROLOGUE:
            ka, kb = _prologue(ka, kb, wa, wb, C, S, pos0 + cols, col_ok, cok, sc_l, eps, D, DP, ROPE, NORM)
        else:
            ka = ka.to(MM)
            kb = kb.to(MM)
        v = tl.load(V + cols[:, None] * sv_l + d[None, :], mask=col_ok[:, None] & (d < D)[None, :], other=0.0).to(MM)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        if ROPE != 0:
            s = tl.dot(qb, tl.trans(kb), s, input_precision=PREC)
        p = tl.where(col_ok[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = _to_mm(p * (dp - delta[:, None]), K.dtype.element_ty)
        dqa = tl.dot(ds, ka, dqa, input_precision=PREC)
        if ROPE != 0:
            dqb = tl.dot(ds, kb, dqb, input_precision=PREC)
    return dqa, dqb


@triton.jit
def _attn_bwd_dq_kernel(
    Q0, K0, V0, O0, DO0, DQ0, Q1, K1, V1, O1, DO1, DQ1,  # per stream: inputs, output, its grad, dq out
    LSE,  # (B, H, Lq0 + Lq1) fp32 from the forward
    DELTA,  # (B, H, Lq0 + Lq1) fp32 output: rowsum(dO ∘ O)
    WQ0, WK0, WQ1, WK1, COS, SIN,
    DWQ,  # (B·H·n_q_tiles, Dh) fp32 output: per-program partials of the q weights' gradient (NORM)
    sq0_b, sq0_l, sq0_h, sk0_b, sk0_l, sk0_h, sv0_b, sv0_l, sv0_h,
    so0_b, so0_l, so0_h, sdo0_b, sdo0_l, sdo0_h, sdq0_b, sdq0_l, sdq0_h,
    sq1_b, sq1_l, sq1_h, sk1_b, sk1_l, sk1_h, sv1_b, sv1_l, sv1_h,
    so1_b, so1_l, so1_h, sdo1_b, sdo1_l, sdo1_h, sdq1_b, sdq1_l, sdq1_h,
    sc_b, sc_l, LQ0, LQ1, LK0, LK1, H, sm_scale, qk_scale, eps,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, NORM: tl.constexpr, PROLOGUE: tl.constexpr, TWO_STREAMS: tl.constexpr,
    PREC: tl.constexpr, MM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    n0 = tl.cdiv(LQ0, BLOCK_M)
    in0 = pid_m < n0
    Q = _pick(in0, Q0 + off_b * sq0_b + off_h * sq0_h, Q1 + off_b * sq1_b + off_h * sq1_h, TWO_STREAMS)
    O = _pick(in0, O0 + off_b * so0_b + off_h * so0_h, O1 + off_b * so1_b + off_h * so1_h, TWO_STREAMS)
    DO = _pick(in0, DO0 + off_b * sdo0_b + off_h * sdo0_h, DO1 + off_b * sdo1_b + off_h * sdo1_h, TWO_STREAMS)
    DQ = _pick(in0, DQ0 + off_b * sdq0_b + off_h * sdq0_h, DQ1 + off_b * sdq1_b + off_h * sdq1_h, TWO_STREAMS)
    WQ = _pick(in0, WQ0, WQ1, TWO_STREAMS)
    sq_l = _pick(in0, sq0_l, sq1_l, TWO_STREAMS)
    so_l = _pick(in0, so0_l, so1_l, TWO_STREAMS)
    sdo_l = _pick(in0, sdo0_l, sdo1_l, TWO_STREAMS)
    sdq_l = _pick(in0, sdq0_l, sdq1_l, TWO_STREAMS)
    LQ = _pick(in0, LQ0, LQ1, TWO_STREAMS)
    q_pos0 = _pick(in0, 0, LQ0, TWO_STREAMS)
    start_m = _pick(in0, pid_m, pid_m - n0, TWO_STREAMS) * BLOCK_M
    C = COS + off_b * sc_b
    S = SIN + off_b * sc_b
    ca, cb, cok = _head_cols(D, DP, ROPE)

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    rows = rows.to(tl.int64)
    d = tl.arange(0, DP)
    dmask = row_ok[:, None] & (d < D)[None, :]
    do = tl.load(DO + rows[:, None] * sdo_l + d[None, :], mask=dmask, other=0.0)
    o = tl.load(O + rows[:, None] * so_l + d[None, :], mask=dmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_rows = pid_bh.to(tl.int64) * (LQ0 + LQ1) + q_pos0 + rows
    tl.store(DELTA + lse_rows, delta, mask=row_ok)
    lse = tl.load(LSE + lse_rows, mask=row_ok, other=0.0)

    xa, xb = _load_heads(Q, rows, row_ok, sq_l, ca, cb, cok, BLOCK_M, D, DP, ROPE)
    wqa, wqb = _load_weights(WQ, Q0, ca, cb, cok, ROPE, NORM)
    if PROLOGUE:
        qa, qb = _prologue(xa, xb, wqa, wqb, C, S, q_pos0 + rows, row_ok, cok, sc_l, eps, D, DP, ROPE, NORM)
    else:
        qa = xa.to(MM)
        qb = xb.to(MM)
    do = do.to(MM)
    if ROPE != 0:
        dqa = tl.zeros((BLOCK_M, DP // 2), dtype=tl.float32)
    else:
        dqa = tl.zeros((BLOCK_M, DP), dtype=tl.float32)
    dqb = dqa
    wa, wb = _load_weights(WK0, Q0, ca, cb, cok, ROPE, NORM)
    dqa, dqb = _bwd_dq_inner(
        dqa, dqb, qa, qb, do, lse, delta,
        K0 + off_b * sk0_b + off_h * sk0_h, V0 + off_b * sv0_b + off_h * sv0_h, sk0_l, sv0_l,
        wa, wb, C, S, 0, LK0, ca, cb, cok, sc_l, qk_scale, eps, D, DP, BLOCK_N, ROPE, NORM, PROLOGUE, PREC, MM,
    )
    if TWO_STREAMS:
        wa, wb = _load_weights(WK1, Q0, ca, cb, cok, ROPE, NORM)
        dqa, dqb = _bwd_dq_inner(
            dqa, dqb, qa, qb, do, lse, delta,
            K1 + off_b * sk1_b + off_h * sk1_h, V1 + off_b * sv1_b + off_h * sv1_h, sk1_l, sv1_l,
            wa, wb, C, S, LK0, LK1, ca, cb, cok, sc_l, qk_scale, eps, D, DP, BLOCK_N, ROPE, NORM, PROLOGUE, PREC, MM,
        )
    dqa *= sm_scale
    dqb *= sm_scale
    if PROLOGUE:
        dqa, dqb, dwa, dwb = _prologue_bwd(
            dqa, dqb, xa, xb, wqa, wqb, C, S, q_pos0 + rows, row_ok, cok, sc_l, eps, D, DP, ROPE, NORM
        )
        if NORM:  # this program's row of weight-gradient partials
            DW = DWQ + (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m) * D
            tl.store(DW + ca, dwa, mask=cok)
            if ROPE != 0:
                tl.store(DW + cb, dwb, mask=cok)
    dt = DQ.dtype.element_ty
    _store_heads(DQ, _to(dqa, dt), _to(dqb, dt), rows, row_ok, sdq_l, ca, cb, cok, BLOCK_M, D, DP, ROPE)


# ------------------------------------------------------------------------------------------------
# Backward: dk, dv
# ------------------------------------------------------------------------------------------------
@_device_fn
def _bwd_dkdv_inner(
    dka, dkb, dv,  # fp32 accumulators
    ka, kb, v,  # the key tile (after the prologue) and its values
    col_ok,  # (BLOCK_N,) which key rows exist
    Q, DO, sq_l, sdo_l, wa, wb, C, S, pos0, LQ, lse_row, LSE, DELTA, ca, cb, cok, sc_l, qk_scale, eps,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
    ROPE: tl.constexpr, NORM: tl.constexpr, PROLOGUE: tl.constexpr, PREC: tl.constexpr, MM: tl.constexpr,
):
    """Accumulate dk, dv over the q blocks of one stream (scores held transposed: (keys, queries))."""
    d = tl.arange(0, DP)
    for start_m in range(0, LQ, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < LQ
        rows = rows.to(tl.int64)
        qa, qb = _load_heads(Q, rows, row_ok, sq_l, ca, cb, cok, BLOCK_M, D, DP, ROPE)
        if PROLOGUE:
            qa, qb = _prologue(qa, qb, wa, wb, C, S, pos0 + rows, row_ok, cok, sc_l, eps, D, DP, ROPE, NORM)
        else:
            qa = qa.to(MM)
            qb = qb.to(MM)
        do = tl.load(DO + rows[:, None] * sdo_l + d[None, :], mask=row_ok[:, None] & (d < D)[None, :], other=0.0).to(MM)
        lse = tl.load(LSE + lse_row + pos0 + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + lse_row + pos0 + rows, mask=row_ok, other=0.0)
        st = tl.dot(ka, tl.trans(qa), input_precision=PREC)
        if ROPE != 0:
            st = tl.dot(kb, tl.trans(qb), st, input_precision=PREC)
        pt = tl.where(col_ok[:, None] & row_ok[None, :], tl.exp2(st * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(_to_mm(pt, Q.dtype.element_ty), do, dv, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = _to_mm(pt * (dpt - delta[None, :]), Q.dtype.element_ty)
        dka = tl.dot(dst, qa, dka, input_precision=PREC)
        if ROPE != 0:
            dkb = tl.dot(dst, qb, dkb, input_precision=PREC)
    return dka, dkb, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q0, K0, V0, DO0, DK0, DV0, Q1, K1, V1, DO1, DK1, DV1,  # per stream: inputs, dO, dk and dv out
    LSE, DELTA,  # (B, H, Lq0 + Lq1) fp32 inputs
    WQ0, WK0, WQ1, WK1, COS, SIN,
    DWK,  # (B·H·n_k_tiles, Dh) fp32 output: per-program partials of the k weights' gradient (NORM)
    sq0_b, sq0_l, sq0_h, sk0_b, sk0_l, sk0_h, sv0_b, sv0_l, sv0_h,
    sdo0_b, sdo0_l, sdo0_h, sdk0_b, sdk0_l, sdk0_h, sdv0_b, sdv0_l, sdv0_h,
    sq1_b, sq1_l, sq1_h, sk1_b, sk1_l, sk1_h, sv1_b, sv1_l, sv1_h,
    sdo1_b, sdo1_l, sdo1_h, sdk1_b, sdk1_l, sdk1_h, sdv1_b, sdv1_l, sdv1_h,
    sc_b, sc_l, LQ0, LQ1, LK0, LK1, H, sm_scale, qk_scale, eps,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROPE: tl.constexpr, NORM: tl.constexpr, PROLOGUE: tl.constexpr, TWO_STREAMS: tl.constexpr,
    PREC: tl.constexpr, MM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    n0 = tl.cdiv(LK0, BLOCK_N)
    in0 = pid_n < n0
    K = _pick(in0, K0 + off_b * sk0_b + off_h * sk0_h, K1 + off_b * sk1_b + off_h * sk1_h, TWO_STREAMS)
    V = _pick(in0, V0 + off_b * sv0_b + off_h * sv0_h, V1 + off_b * sv1_b + off_h * sv1_h, TWO_STREAMS)
    DK = _pick(in0, DK0 + off_b * sdk0_b + off_h * sdk0_h, DK1 + off_b * sdk1_b + off_h * sdk1_h, TWO_STREAMS)
    DV = _pick(in0, DV0 + off_b * sdv0_b + off_h * sdv0_h, DV1 + off_b * sdv1_b + off_h * sdv1_h, TWO_STREAMS)
    WK = _pick(in0, WK0, WK1, TWO_STREAMS)
    sk_l = _pick(in0, sk0_l, sk1_l, TWO_STREAMS)
    sv_l = _pick(in0, sv0_l, sv1_l, TWO_STREAMS)
    sdk_l = _pick(in0, sdk0_l, sdk1_l, TWO_STREAMS)
    sdv_l = _pick(in0, sdv0_l, sdv1_l, TWO_STREAMS)
    LK = _pick(in0, LK0, LK1, TWO_STREAMS)
    k_pos0 = _pick(in0, 0, LK0, TWO_STREAMS)
    start_n = _pick(in0, pid_n, pid_n - n0, TWO_STREAMS) * BLOCK_N
    C = COS + off_b * sc_b
    S = SIN + off_b * sc_b
    ca, cb, cok = _head_cols(D, DP, ROPE)

    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < LK
    cols = cols.to(tl.int64)
    d = tl.arange(0, DP)
    dmask = col_ok[:, None] & (d < D)[None, :]
    xa, xb = _load_heads(K, cols, col_ok, sk_l, ca, cb, cok, BLOCK_N, D, DP, ROPE)
    wka, wkb = _load_weights(WK, Q0, ca, cb, cok, ROPE, NORM)
    if PROLOGUE:
        ka, kb = _prologue(xa, xb, wka, wkb, C, S, k_pos0 + cols, col_ok, cok, sc_l, eps, D, DP, ROPE, NORM)
    else:
        ka = xa.to(MM)
        kb = xb.to(MM)
    v = tl.load(V + cols[:, None] * sv_l + d[None, :], mask=dmask, other=0.0).to(MM)

    if ROPE != 0:
        dka = tl.zeros((BLOCK_N, DP // 2), dtype=tl.float32)
    else:
        dka = tl.zeros((BLOCK_N, DP), dtype=tl.float32)
    dkb = dka
    dv = tl.zeros((BLOCK_N, DP), dtype=tl.float32)
    lse_row = pid_bh.to(tl.int64) * (LQ0 + LQ1)
    wa, wb = _load_weights(WQ0, Q0, ca, cb, cok, ROPE, NORM)
    dka, dkb, dv = _bwd_dkdv_inner(
        dka, dkb, dv, ka, kb, v, col_ok,
        Q0 + off_b * sq0_b + off_h * sq0_h, DO0 + off_b * sdo0_b + off_h * sdo0_h, sq0_l, sdo0_l,
        wa, wb, C, S, 0, LQ0, lse_row, LSE, DELTA, ca, cb, cok, sc_l, qk_scale, eps,
        D, DP, BLOCK_M, ROPE, NORM, PROLOGUE, PREC, MM,
    )
    if TWO_STREAMS:
        wa, wb = _load_weights(WQ1, Q0, ca, cb, cok, ROPE, NORM)
        dka, dkb, dv = _bwd_dkdv_inner(
            dka, dkb, dv, ka, kb, v, col_ok,
            Q1 + off_b * sq1_b + off_h * sq1_h, DO1 + off_b * sdo1_b + off_h * sdo1_h, sq1_l, sdo1_l,
            wa, wb, C, S, LQ0, LQ1, lse_row, LSE, DELTA, ca, cb, cok, sc_l, qk_scale, eps,
            D, DP, BLOCK_M, ROPE, NORM, PROLOGUE, PREC, MM,
        )
    dka *= sm_scale
    dkb *= sm_scale
    if PROLOGUE:
        dka, dkb, dwa, dwb = _prologue_bwd(
            dka, dkb, xa, xb, wka, wkb, C, S, k_pos0 + cols, col_ok, cok, sc_l, eps, D, DP, ROPE, NORM
        )
        if NORM:  # this program's row of weight-gradient partials
            DW = DWK + (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_n) * D
            tl.store(DW + ca, dwa, mask=cok)
            if ROPE != 0:
                tl.store(DW + cb, dwb, mask=cok)
    dt = DK.dtype.element_ty
    _store_heads(DK, _to(dka, dt), _to(dkb, dt), cols, col_ok, sdk_l, ca, cb, cok, BLOCK_N, D, DP, ROPE)
    tl.store(DV + cols[:, None] * sdv_l + d[None, :], _to(dv, DV.dtype.element_ty), mask=dmask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
_MM_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def padded_head_dim(head_dim: int) -> int:
    """The power of two (≥ 32, so RoPE halves are ≥ 16 wide for tl.dot) the head dim is padded to."""
    return max(32, triton.next_power_of_2(head_dim))


def _configs(dp: int, dtype: torch.dtype, device: torch.device, kernel: str, prologue: bool) -> List[dict]:
    """Tile sizes and launch options, preferred first; the launcher falls back along the list when
    a GPU lacks the shared memory / registers (OutOfResources). Starting points, to be tuned.

    Under the interpreter (CPU tensors) every op costs about the same whatever the tile, while its
    tl.dot is a cubic NumPy loop: 32 x 32 tiles are the fastest, and still give the CPU tests
    streams of several blocks and partial tiles."""
    if device.type != "cuda":
        return [dict(BLOCK_M=32, BLOCK_N=32)]
    wide = dtype == torch.float32 or dp > 128
    warps = 8 if dp >= 128 else 4
    if kernel == "fwd":  # BLOCK_M q rows per program, streaming BLOCK_N keys
        first = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2) if wide else \
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=warps, num_stages=2 if prologue else 3)
    elif kernel == "dq":  # BLOCK_M q rows per program, streaming BLOCK_N keys
        first = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2) if wide else \
            dict(BLOCK_M=128, BLOCK_N=32, num_warps=warps, num_stages=2)
    else:  # dkdv: BLOCK_N keys per program, streaming BLOCK_M q rows
        first = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2) if wide else \
            dict(BLOCK_M=32, BLOCK_N=128, num_warps=warps, num_stages=2)
    out = [first, dict(first, num_stages=1)]
    small = dict(BLOCK_M=min(first["BLOCK_M"], 64), BLOCK_N=min(first["BLOCK_N"], 32), num_warps=4, num_stages=1)
    if small != out[-1]:
        out.append(small)
    return out


def _launch(configs: List[dict], launch_one, like: Tensor):
    """launch_one(cfg) on like's device with the first config the GPU has the resources for
    (nothing is written before a launch succeeds, so retrying is safe)."""
    with on_device(like):
        for i, cfg in enumerate(configs):
            try:
                return launch_one(cfg)
            except OutOfResources:
                if i == len(configs) - 1:
                    raise


def _s(t: Tensor) -> Tuple[int, int, int]:
    """(batch, token, head) strides of a (B, L, H, Dh) tensor, in elements."""
    return t.stride(0), t.stride(1), t.stride(2)


class _Problem:
    """What the three kernels share: streams, lengths, prologue settings and the tensors it needs."""

    def __init__(self, q0, k0, v0, q1, k1, v1, wq0, wk0, wq1, wk1, cos, sin, norm, rope, eps):
        self.two = q1 is not None
        self.q0, self.k0, self.v0 = q0, k0, v0
        # with one stream, stream 1's pointers alias stream 0's and are never read
        self.q1, self.k1, self.v1 = (q1, k1, v1) if self.two else (q0, k0, v0)
        B, _, H, Dh = q0.shape
        self.B, self.H, self.D, self.DP = B, H, Dh, padded_head_dim(Dh)
        self.LQ0, self.LK0 = q0.shape[1], k0.shape[1]
        self.LQ1, self.LK1 = (q1.shape[1], k1.shape[1]) if self.two else (0, 0)
        self.norm, self.rope, self.eps = bool(norm), int(rope), float(eps)
        self.prologue = self.norm or self.rope != 0
        self.sm_scale = Dh ** -0.5
        self.prec = "ieee" if q0.dtype == torch.float32 else "tf32"
        self.mm = _MM_DTYPE[q0.dtype]
        if q0.dtype == torch.bfloat16 and _INTERPRETING:
            self.mm = tl.float32
        # weights: one dtype for all four (they are selected between at run time); a missing one is
        # ones (x · 1 rounds to x, so that is exact). Unused pointers alias q0.
        if self.norm:
            ws = [wq0, wk0, wq1, wk1]
            dtypes = {w.dtype for w in ws if w is not None}
            wdtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            self.weights = [
                torch.ones(Dh, dtype=wdtype, device=q0.device) if w is None else w.to(wdtype).contiguous()
                for w in ws
            ]
        else:
            self.weights = [q0] * 4
        if self.rope:
            self.cos, self.sin = cos.contiguous(), sin.contiguous()
            self.sc_b = self.cos.stride(0) if self.cos.dim() == 3 else 0
            self.sc_l = self.cos.stride(-2)
        else:
            self.cos = self.sin = q0
            self.sc_b = self.sc_l = 0

    def consts(self, cfg: dict) -> dict:
        return dict(
            D=self.D, DP=self.DP, ROPE=self.rope, NORM=self.norm, PROLOGUE=self.prologue,
            TWO_STREAMS=self.two, PREC=self.prec, MM=self.mm, **cfg,
        )

    def tail(self, *, with_sm_scale: bool) -> list:
        """The scalar arguments every kernel ends with."""
        out = [self.sc_b, self.sc_l, self.LQ0, self.LQ1, self.LK0, self.LK1, self.H]
        if with_sm_scale:
            out.append(self.sm_scale)
        return out + [self.sm_scale * LOG2E, self.eps]


def attention_forward(
    q0: Tensor, k0: Tensor, v0: Tensor,
    q1: Optional[Tensor], k1: Optional[Tensor], v1: Optional[Tensor],
    wq0: Optional[Tensor], wk0: Optional[Tensor], wq1: Optional[Tensor], wk1: Optional[Tensor],
    cos: Optional[Tensor], sin: Optional[Tensor], norm: bool, rope: int, eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(o0, o1, lse). o_i (B, Lq_i, H, Dh) contiguous (o1 is (B, 0, H, Dh) with one stream);
    lse (B, H, Lq0 + Lq1) fp32 base-2. Inputs: (B, L, H, Dh) with last-dim stride 1 (validated by
    ditfast.ops); streams share B, H, Dh, dtype and device."""
    p = _Problem(q0, k0, v0, q1, k1, v1, wq0, wk0, wq1, wk1, cos, sin, norm, rope, eps)
    B, H, Dh = p.B, p.H, p.D
    o0 = q0.new_empty((B, p.LQ0, H, Dh))
    o1 = q0.new_empty((B, p.LQ1, H, Dh))
    lse = q0.new_empty((B, H, p.LQ0 + p.LQ1), dtype=torch.float32)
    o1_ = o1 if p.two else o0
    if B * H == 0 or p.LQ0 + p.LQ1 == 0:
        return o0, o1, lse

    def launch(cfg):
        grid = (triton.cdiv(p.LQ0, cfg["BLOCK_M"]) + triton.cdiv(p.LQ1, cfg["BLOCK_M"]), B * H)
        _attn_fwd_kernel[grid](
            p.q0, p.k0, p.v0, o0, p.q1, p.k1, p.v1, o1_, lse, *p.weights, p.cos, p.sin,
            *_s(p.q0), *_s(p.k0), *_s(p.v0), *_s(o0),
            *_s(p.q1), *_s(p.k1), *_s(p.v1), *_s(o1_),
            *p.tail(with_sm_scale=False), **p.consts(cfg),
            EVEN_K0=p.LK0 % cfg["BLOCK_N"] == 0, EVEN_K1=p.LK1 % cfg["BLOCK_N"] == 0,
        )

    _launch(_configs(p.DP, q0.dtype, q0.device, "fwd", p.prologue), launch, q0)
    return o0, o1, lse


def attention_backward(
    do0: Tensor, do1: Optional[Tensor],
    q0: Tensor, k0: Tensor, v0: Tensor,
    q1: Optional[Tensor], k1: Optional[Tensor], v1: Optional[Tensor],
    o0: Tensor, o1: Optional[Tensor], lse: Tensor,
    wq0: Optional[Tensor], wk0: Optional[Tensor], wq1: Optional[Tensor], wk1: Optional[Tensor],
    cos: Optional[Tensor], sin: Optional[Tensor], norm: bool, rope: int, eps: float,
) -> Tuple[Tensor, ...]:
    """(dq0, dk0, dv0, dq1, dk1, dv1, dwq0, dwk0, dwq1, dwk1): grads like the inputs (contiguous);
    a stream-1 grad is None with one stream, a weight grad None without NORM (or with no weight)."""
    p = _Problem(q0, k0, v0, q1, k1, v1, wq0, wk0, wq1, wk1, cos, sin, norm, rope, eps)
    B, H, Dh = p.B, p.H, p.D
    o1 = o1 if p.two else o0
    do1 = do1 if p.two else do0
    dq0, dk0, dv0 = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (p.q0, p.k0, p.v0))
    dq1, dk1, dv1 = (
        (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (p.q1, p.k1, p.v1))
        if p.two else (dq0, dk0, dv0)
    )
    delta = torch.empty_like(lse)
    f32 = dict(dtype=torch.float32, device=q0.device)

    parts = {}

    def launch_dq(cfg):
        nq0 = triton.cdiv(p.LQ0, cfg["BLOCK_M"])
        nq = nq0 + triton.cdiv(p.LQ1, cfg["BLOCK_M"])
        dwq = torch.empty((B * H * nq, Dh) if p.norm else (1,), **f32)
        if nq and B * H:
            _attn_bwd_dq_kernel[(nq, B * H)](
                p.q0, p.k0, p.v0, o0, do0, dq0, p.q1, p.k1, p.v1, o1, do1, dq1,
                lse, delta, *p.weights, p.cos, p.sin, dwq,
                *_s(p.q0), *_s(p.k0), *_s(p.v0), *_s(o0), *_s(do0), *_s(dq0),
                *_s(p.q1), *_s(p.k1), *_s(p.v1), *_s(o1), *_s(do1), *_s(dq1),
                *p.tail(with_sm_scale=True), **p.consts(cfg),
            )
        if p.norm:  # rows are (b·h, tile) with stream 0's tiles first
            parts["q"] = dwq.view(B * H, nq, Dh).split([nq0, nq - nq0], dim=1)

    def launch_dkdv(cfg):
        nk0 = triton.cdiv(p.LK0, cfg["BLOCK_N"])
        nk = nk0 + triton.cdiv(p.LK1, cfg["BLOCK_N"])
        dwk = torch.empty((B * H * nk, Dh) if p.norm else (1,), **f32)
        if nk and B * H:
            _attn_bwd_dkdv_kernel[(nk, B * H)](
                p.q0, p.k0, p.v0, do0, dk0, dv0, p.q1, p.k1, p.v1, do1, dk1, dv1,
                lse, delta, *p.weights, p.cos, p.sin, dwk,
                *_s(p.q0), *_s(p.k0), *_s(p.v0), *_s(do0), *_s(dk0), *_s(dv0),
                *_s(p.q1), *_s(p.k1), *_s(p.v1), *_s(do1), *_s(dk1), *_s(dv1),
                *p.tail(with_sm_scale=True), **p.consts(cfg),
            )
        if p.norm:
            parts["k"] = dwk.view(B * H, nk, Dh).split([nk0, nk - nk0], dim=1)

    _launch(_configs(p.DP, q0.dtype, q0.device, "dq", p.prologue), launch_dq, q0)  # writes Δ first
    _launch(_configs(p.DP, q0.dtype, q0.device, "dkdv", p.prologue), launch_dkdv, q0)

    dws: list = [None] * 4
    if p.norm:  # sum each stream's per-program partials
        per_weight = [parts["q"][0], parts["k"][0], parts["q"][1], parts["k"][1]]
        for i, (w, part) in enumerate(zip((wq0, wk0, wq1, wk1), per_weight)):
            if w is not None:
                dws[i] = part.sum((0, 1)).to(w.dtype)
    if not p.two:
        dq1 = dk1 = dv1 = None
    return (dq0, dk0, dv0, dq1, dk1, dv1, *dws)


def rope_mode(rope: bool, interleaved: bool) -> int:
    return ROPE_NONE if not rope else (ROPE_INTERLEAVED if interleaved else ROPE_HALF)


__all__: Sequence[str] = [
    "attention_forward",
    "attention_backward",
    "padded_head_dim",
    "rope_mode",
    "ROPE_NONE",
    "ROPE_INTERLEAVED",
    "ROPE_HALF",
    "MAX_HEAD_DIM",
]
