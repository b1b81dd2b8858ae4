"""ditfast's Triton FlashAttention on the (B, L, H, Dh) layout: forward, backward, log-sum-exp.

Math (ditfast/reference/attention.py): ``O = softmax(S) V`` with ``S = Q Kᵀ · scale``, non-causal;
``scale`` is a run-time argument (default Dh**-0.5, flash-attn's ``softmax_scale``).
The kernels read prepared q, k, v (QK-norm and RoPE already applied by ``ops.prepare_attention``):
there is no prologue in any loop; each K / V tile is loaded once per query block and goes straight
into the matmuls.

Design
------
* Layout. q (B, Lq, H, Dh), k and v (B, Lk, H_kv, Dh), any (batch, token, head) strides with a unit
  stride on Dh (views of a packed qkv projection are read in place). Grouped-query attention
  (H_kv < H, H % H_kv == 0, as flash-attn): query head h reads k / v head h // (H // H_kv) -- pointer
  math only, k and v are never repeated. Dh is padded to DP = the next power of two (at least 16,
  tl.dot's minimum) with masks, so Dh 40 / 72 run as 64 / 128 tiles.
* Forward (one program per (query block, batch·head)): online softmax in fp32 and base 2. The scale
  and log2(e) are one constant c, so each score costs one FFMA, ``s·c − m``, before exp2;
  the running max m is kept in those scaled units. Full key blocks run without key masks; only the
  last, partial block masks its columns (a constexpr flag picks the loop body). The output is stored
  in q's dtype; ``lse = (m + log2 l) · ln 2`` (natural log, fp32, (B, H, Lq), flash-attn's
  ``softmax_lse`` convention) is stored for the backward and for callers that merge partial results.
* Precision. fp16 / bf16 tiles feed the tensor cores with fp32 accumulation; fp32 inputs use
  ``input_precision="ieee"`` (exact fp32, no TF32). P and dS are rounded to the input dtype before
  their matmuls, as every FlashAttention does.
* Backward, FlashAttention-2 style, 5 matmuls: a preprocess kernel computes Δ = rowsum(dO ∘ O);
  then one program per key block of one (batch, k / v head) (per split, below) holds K, V and the
  fp32 dK, dV accumulators and loops over the query heads of its group (one head without GQA) and
  their query blocks, so dK, dV are reduced over the group in registers, in a fixed order:
  Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ·c − lse₂), dV += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − Δ), dK += dSᵀ Q,
  and dQ's share dS K is added into an fp32 accumulator.
  Deterministic by default: the key blocks of one (batch, k / v head) are dealt round-robin to N_SPLITS
  programs, each owning one fp32 slice of the accumulator (a slice is updated by one program only,
  in program order, so the sum is the same on every run); the launcher sums the slices in a fixed
  order and scales them into dq. With ``deterministic=False`` every key block is its own program
  and all add into a single slice with fp32 atomics (order-dependent rounding, less memory).
  N_SPLITS is chosen so split programs fill whole waves of the GPU (see :func:`num_splits`).
* Tiles per head dim and dtype: :func:`configs`; chosen so that no forward configuration spills
  registers on sm_90 at the FLUX / SD3.5 shapes (tests/compile_sm90.py reports registers, spills,
  shared memory, occupancy and waves; docs/attention.md has the table). Hopper-only features
  (TMA descriptors, warp specialization) are not used: the same code runs under the interpreter.

The Triton interpreter (CPU tensors, TRITON_INTERPRET=1) multiplies bf16 tl.dot operands as raw
integers and converts fp32 to bf16 by truncation: there the bf16 dot operands are fp32 (MM, exact:
they hold bf16 values) and bf16 results are rounded to nearest in fp32 arithmetic before the cast
(ROUND_BF16). On GPUs both are off.
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

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _cast(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 x as ``dtype``; with ROUND_BF16 (interpreter only) rounded to bf16's 8 significant bits
    to nearest first (Veltkamp split: the interpreter's truncating cast of the result is exact)."""
    if ROUND_BF16:
        t = x * 65537.0
        x = tl.where(tl.abs(x) < 1e30, t - (t - x), x)
    return x.to(dtype)


@triton.jit
def _tile_mask(rows, n_rows, D: tl.constexpr, DP: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Mask of a (rows, DP) tile, broadcastable: rows < n_rows (if MASK_ROWS) and the real head-dim
    columns (if Dh is padded); a constant (all true) when nothing is masked, which the compiler drops."""
    d = tl.arange(0, DP)
    if D == DP:
        cols_ok = tl.full((1, DP), 1, tl.int1)
    else:
        cols_ok = (d < D)[None, :]
    if MASK_ROWS:
        return (rows < n_rows)[:, None] & cols_ok
    else:
        return cols_ok


@triton.jit
def _fwd_block(
    acc, m_i, l_i,  # running output (BM, DP) fp32, row max (BM,) in scaled base-2 units, row sum (BM,)
    q,  # (BM, DP) query tile, MM dtype
    K, V,  # k, v at this (batch, head)
    sk_l, sv_l,  # their token strides
    start_n,  # first key of this block
    LK,
    qk_scale,  # softmax scale * log2(e)
    D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,  # the block is partial: mask its missing keys
    PREC: tl.constexpr, MM: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, DP)
    kv_mask = _tile_mask(cols, LK, D, DP, MASK_N)
    rows64 = cols.to(tl.int64)[:, None]
    k = tl.load(K + rows64 * sk_l + d[None, :], mask=kv_mask, other=0.0).to(MM)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK_N:
        s = tl.where((cols < LK)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])  # one FFMA per score, then exp2
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + rows64 * sv_l + d[None, :], mask=kv_mask, other=0.0).to(MM)
    acc = tl.dot(p.to(MM), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, Lq, H, Dh), (B, Lk, H, Dh) x 2 inputs; unit stride on Dh
    O,  # (B, Lq, H, Dh) output, q's dtype
    LSE,  # (B, H, Lq) fp32 output: natural-log logsumexp of each query row's scaled scores
    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, so_b, so_l, so_h,  # strides, in elements
    KLEN,  # (B,) int32 per-sample key counts, each in [1, LK] (read only with HAS_KLEN)
    LQ, LK,  # sequence lengths (LK >= 1)
    H,  # query heads
    GROUP,  # query heads per k / v head (grouped-query attention; 1 without it)
    qk_scale,  # softmax scale (default Dh**-0.5) * log2(e)
    D: tl.constexpr,  # head dim
    DP: tl.constexpr,  # head dim padded to a power of two
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    EVEN_N: tl.constexpr,  # LK % BLOCK_N == 0 and no key lengths: no partial key block
    HAS_KLEN: tl.constexpr,  # sample b attends its first KLEN[b] keys: the loop stops there
    PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    MM: tl.constexpr,  # dtype of the tl.dot operands
    ROUND_BF16: tl.constexpr,  # interpreter with bf16 output: round before the cast
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP  # the k / v head this query head reads
    Q += off_b * sq_b + off_h * sq_h
    K += off_b * sk_b + off_hk * sk_h
    V += off_b * sv_b + off_hk * sv_h
    O += off_b * so_b + off_h * so_h

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    rows64 = rows.to(tl.int64)
    d = tl.arange(0, DP)
    qmask = _tile_mask(rows, LQ, D, DP, True)
    q = tl.load(Q + rows64[:, None] * sq_l + d[None, :], mask=qmask, other=0.0).to(MM)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DP), dtype=tl.float32)
    n_keys = LK
    if HAS_KLEN:  # this sample's valid keys: the blocks past them are never loaded (clamped: never past LK)
        n_keys = tl.minimum(tl.load(KLEN + off_b).to(tl.int32), LK)
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, sk_l, sv_l, start_n, n_keys, qk_scale,
                                   D, DP, BLOCK_N, False, PREC, MM)
    if not EVEN_N:  # with key lengths on a block edge this block is all masked: it adds exactly nothing
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, sk_l, sv_l, n_full, n_keys, qk_scale,
                                   D, DP, BLOCK_N, True, PREC, MM)

    o = acc / l_i[:, None]
    tl.store(O + rows64[:, None] * so_l + d[None, :], _cast(o, O.dtype.element_ty, ROUND_BF16), mask=qmask)
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + rows64, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # (B, Lq, H, Dh) forward output and its gradient
    DELTA,  # (B, H, Lq) fp32 output: rowsum(dO * O)
    so_b, so_l, so_h, sdo_b, sdo_l, sdo_h,
    LQ, H,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    rows64 = rows.to(tl.int64)
    d = tl.arange(0, DP)
    mask = _tile_mask(rows, LQ, D, DP, True)
    o = tl.load(O + off_b * so_b + off_h * so_h + rows64[:, None] * so_l + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * sdo_b + off_h * sdo_h + rows64[:, None] * sdo_l + d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + rows64, delta, mask=row_ok)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO,  # inputs (B, Lq, H, Dh), (B, Lk, HKV, Dh) x 2 and the output's gradient (B, Lq, H, Dh)
    DK, DV,  # (B, Lk, HKV, Dh) outputs, the inputs' dtype
    DQ_ACC,  # (slices, B, Lq, H, Dh) fp32 accumulator of dS K (zero-initialized), unscaled
    LSE, DELTA,  # (B, H, Lq) fp32: natural-log logsumexp from the forward, rowsum(dO * O)
    KLEN,  # (B,) int32 per-sample key counts (with HAS_KLEN; dk, dv arrive zeroed and keep 0 past them)
    sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, sdo_b, sdo_l, sdo_h,
    sdk_b, sdk_l, sdk_h, sdv_b, sdv_l, sdv_h,
    sacc_s, sacc_b, sacc_l, sacc_h,  # accumulator strides (slice, batch, token, head)
    LQ, LK, H,  # H: query heads
    HKV,  # k / v heads (H = HKV * GROUP)
    GROUP,  # query heads per k / v head: a program reduces dK, dV over its group
    N_SPLITS,  # programs per (batch, kv head) along the keys; program s takes key blocks s, s + N_SPLITS, ...
    sm_scale,  # the softmax scale (default Dh**-0.5)
    qk_scale,  # sm_scale * log2(e)
    D: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program step
    DETERMINISTIC: tl.constexpr,  # each split adds into its own accumulator slice (else all into slice 0)
    HAS_KLEN: tl.constexpr,
    PREC: tl.constexpr, MM: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)  # (batch, kv head)
    off_b = (pid_bh // HKV).to(tl.int64)
    off_hk = (pid_bh % HKV).to(tl.int64)
    K += off_b * sk_b + off_hk * sk_h
    V += off_b * sv_b + off_hk * sv_h
    DK += off_b * sdk_b + off_hk * sdk_h
    DV += off_b * sdv_b + off_hk * sdv_h
    Q += off_b * sq_b
    DO += off_b * sdo_b
    if DETERMINISTIC:
        DQ_ACC += pid_s.to(tl.int64) * sacc_s
    DQ_ACC += off_b * sacc_b
    d = tl.arange(0, DP)
    n_keys = LK
    if HAS_KLEN:  # key blocks past this sample's keys are skipped (their dk, dv stay the launcher's zeros)
        n_keys = tl.minimum(tl.load(KLEN + off_b).to(tl.int32), LK)

    for start_n in range(pid_s * BLOCK_N, n_keys, N_SPLITS * BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        cols64 = cols.to(tl.int64)[:, None]
        # padded keys load as zero rows and are not stored: their P reaches nothing kept
        kv_mask = _tile_mask(cols, n_keys, D, DP, True)
        k = tl.load(K + cols64 * sk_l + d[None, :], mask=kv_mask, other=0.0).to(MM)
        v = tl.load(V + cols64 * sv_l + d[None, :], mask=kv_mask, other=0.0).to(MM)
        dk = tl.zeros((BLOCK_N, DP), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, DP), dtype=tl.float32)
        for g in range(0, GROUP):  # the query heads that read this k / v head, in a fixed order
            off_h = off_hk * GROUP + g
            q_h = Q + off_h * sq_h
            do_h = DO + off_h * sdo_h
            acc_h = DQ_ACC + off_h * sacc_h
            lse_h = LSE + (off_b * H + off_h) * LQ
            delta_h = DELTA + (off_b * H + off_h) * LQ
            for start_m in range(0, LQ, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                row_ok = rows < LQ
                rows64 = rows.to(tl.int64)
                qmask = _tile_mask(rows, LQ, D, DP, True)
                q = tl.load(q_h + rows64[:, None] * sq_l + d[None, :], mask=qmask, other=0.0).to(MM)
                do = tl.load(do_h + rows64[:, None] * sdo_l + d[None, :], mask=qmask, other=0.0).to(MM)
                # missing rows get lse = +inf, so their P is exactly 0; missing keys are zero rows of k
                # and v, so their (nonzero) P reaches nothing that is stored
                lse2 = tl.load(lse_h + rows64, mask=row_ok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(delta_h + rows64, mask=row_ok, other=0.0)
                st = tl.dot(k, tl.trans(q), input_precision=PREC)  # (BN, BM) scores, transposed
                pt = tl.exp2(st * qk_scale - lse2[None, :])
                dv = tl.dot(pt.to(MM), do, dv, input_precision=PREC)
                dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
                dst = (pt * (dpt - delta[None, :])).to(MM)
                dk = tl.dot(dst, q, dk, input_precision=PREC)
                dq = tl.dot(tl.trans(dst), k, input_precision=PREC)  # (BM, DP) this key block's share
                tl.atomic_add(acc_h + rows64[:, None] * sacc_l + d[None, :], dq, mask=qmask, sem="relaxed")
        tl.store(DK + cols64 * sdk_l + d[None, :], _cast(dk * sm_scale, DK.dtype.element_ty, ROUND_BF16), mask=kv_mask)
        tl.store(DV + cols64 * sdv_l + d[None, :], _cast(dv, DV.dtype.element_ty, ROUND_BF16), mask=kv_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
_MM_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def padded_head_dim(head_dim: int) -> int:
    """The power of two (at least 16, tl.dot's minimum) the head dim is padded to."""
    return max(16, triton.next_power_of_2(head_dim))


def configs(kernel: str, dp: int, dtype: torch.dtype, on_gpu: bool = True) -> List[dict]:
    """Tile sizes and launch options for ``kernel`` ("fwd" or "bwd") at padded head dim ``dp``,
    preferred first; the launcher falls back along the list on OutOfResources.

    Chosen from the sm_90 compile report (tests/compile_sm90.py), run with triton 3.6 and 3.8: no
    register spills in any first choice (Dh 64 / 128 / 256, bf16 / fp16 / fp32, forward and
    backward) nor in the forward fallbacks. Under the interpreter
    every tile costs about the same, so small tiles (several blocks and partial tiles in small
    tests) are used there."""
    if not on_gpu:
        return [dict(BLOCK_M=16, BLOCK_N=16)] if kernel != "pre" else [dict(BLOCK_M=16)]
    if kernel == "pre":
        return [dict(BLOCK_M=64 if dp <= 128 else 32, num_warps=4, num_stages=1)]
    if dtype == torch.float32:  # exact fp32 dots run on the FMA units: narrow tiles, 8 warps
        table = {"fwd": [(64, dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)),
                         (128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)),
                         (256, dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1))],
                 "bwd": [(64, dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)),
                         (128, dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)),
                         (256, dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1))]}
    else:  # fwd: BLOCK_M queries per program, BLOCK_N keys streamed; bwd: the other way round
        table = {"fwd": [(64, dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)),
                         (128, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
                         (256, dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2))],
                 # Dh 128 with BLOCK_M 64 would take 255 registers and spill; Dh 256 with BLOCK_N 64 too;
                 # Dh 64 with 64 x 64 tiles and 4 warps spills with triton 3.6 (255 registers, 32 B)
                 "bwd": [(64, dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)),
                         (128, dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)),
                         (256, dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1))]}
    first = next(cfg for limit, cfg in table[kernel] if dp <= limit)
    out = [first]
    # the last resort: 64 x 32 tiles with 8 warps (32 x 32 with 4 warps spilled 12 B with triton 3.6)
    for fallback in (dict(first, num_stages=1), dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)):
        if fallback not in out:
            out.append(fallback)
    return out


def num_splits(n_key_blocks: int, batch_heads: int, slots: int, max_splits: int = 8) -> int:
    """Programs per (batch, head) for the deterministic backward: the split count (at most
    ``max_splits``, the number of fp32 dq slices, and at most the key blocks) that keeps the most of
    ``slots`` (SMs x resident programs) busy over whole waves; ties go to fewer splits."""
    best, best_eff = 1, -1.0
    for s in range(1, max(1, min(max_splits, n_key_blocks)) + 1):
        programs = s * batch_heads
        eff = programs / (triton.cdiv(programs, slots) * slots)
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def _launch(cfgs: List[dict], launch_one, like: Tensor):
    """launch_one(cfg) on like's device with the first config the GPU has the resources for
    (nothing is written before a launch succeeds, so retrying is safe)."""
    with on_device(like):
        for i, cfg in enumerate(cfgs):
            try:
                return launch_one(cfg)
            except OutOfResources:
                if i == len(cfgs) - 1:
                    raise


def _s(t: Tensor) -> Tuple[int, int, int]:
    """(batch, token, head) strides of a (B, L, H, Dh) tensor, in elements."""
    return t.stride(0), t.stride(1), t.stride(2)


def _mm(dtype: torch.dtype) -> dict:
    """The MM and ROUND_BF16 constexprs for inputs of ``dtype`` (module docstring)."""
    quirk = dtype == torch.bfloat16 and _INTERPRETING
    return dict(MM=tl.float32 if quirk else _MM_DTYPE[dtype], ROUND_BF16=quirk)


def _split_cfg(cfg: dict) -> Tuple[dict, dict]:
    """(constexpr block sizes, launch options) of a config."""
    return ({k: v for k, v in cfg.items() if k.startswith("BLOCK")},
            {k: v for k, v in cfg.items() if not k.startswith("BLOCK")})


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def attention_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: Optional[float] = None,
                      key_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(o, lse): o (B, Lq, H, Dh) contiguous in q's dtype, lse (B, H, Lq) fp32 natural log of the
    scaled scores ``q kᵀ · softmax_scale`` (default Dh**-0.5). k, v (B, Lk, H_kv, Dh) with
    H % H_kv == 0: query head h reads k / v head h // (H // H_kv) (grouped-query attention).
    key_lengths: None, or a (B,) int32 tensor on q's device, each count in [1, Lk]: sample b attends
    keys [0, key_lengths[b]) and its programs stop there (the padded key blocks are never read).
    q, k, v (and the counts) validated by the caller (ditfast/ops/_attention_triton.py): one dtype
    and device, unit stride on Dh, Dh <= MAX_HEAD_DIM. Lk = 0 gives o = 0 and lse = -inf."""
    B, LQ, H, Dh = q.shape
    LK, HKV = k.shape[1], k.shape[2]
    scale = default_scale(Dh) if softmax_scale is None else float(softmax_scale)
    o = q.new_empty((B, LQ, H, Dh))
    lse = q.new_empty((B, H, LQ), dtype=torch.float32)
    if B * H * LQ == 0:
        return o, lse
    if LK == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    dp = padded_head_dim(Dh)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"

    def launch(cfg):
        blocks, opts = _split_cfg(cfg)
        grid = (triton.cdiv(LQ, blocks["BLOCK_M"]), B * H)
        _attn_fwd_kernel[grid](
            q, k, v, o, lse, *_s(q), *_s(k), *_s(v), *_s(o), lse if key_lengths is None else key_lengths,
            LQ, LK, H, H // HKV, scale * LOG2E, D=Dh, DP=dp,
            EVEN_N=LK % blocks["BLOCK_N"] == 0 and key_lengths is None, HAS_KLEN=key_lengths is not None,
            PREC=prec, **_mm(q.dtype), **blocks, **opts,
        )

    _launch(configs("fwd", dp, q.dtype, q.is_cuda), launch, q)
    return o, lse


def _slots(t: Tensor, cfg: dict) -> int:
    """SMs x (an estimate of) resident backward programs per SM; 3 slots without a GPU (so the CPU
    tests run the deterministic backward with several splits)."""
    if not t.is_cuda:
        return 3
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count
    return sms * (2 if cfg.get("num_warps", 4) <= 4 else 1)


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                       deterministic: bool = True, softmax_scale: Optional[float] = None,
                       key_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous, in the inputs' dtype, from dO (B, Lq, H, Dh) and the forward's o and
    lse (computed with the same ``softmax_scale`` and ``key_lengths``). Same input contract as
    :func:`attention_forward` (grouped k / v heads included: dk, dv sum over the query heads of each
    group); do needs a unit stride on Dh too. With key lengths, the padded keys' dk, dv are exactly 0
    (their blocks are skipped: dk, dv start zeroed)."""
    B, LQ, H, Dh = q.shape
    LK, HKV = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    new_kv = torch.empty if key_lengths is None else torch.zeros
    dk = new_kv(k.shape, dtype=k.dtype, device=k.device)
    dv = new_kv(v.shape, dtype=v.dtype, device=v.device)
    if B * H == 0 or LQ == 0 or LK == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dp = padded_head_dim(Dh)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    sm_scale = default_scale(Dh) if softmax_scale is None else float(softmax_scale)

    delta = torch.empty_like(lse)

    def launch_pre(cfg):
        blocks, opts = _split_cfg(cfg)
        _attn_bwd_preprocess_kernel[(triton.cdiv(LQ, blocks["BLOCK_M"]), B * H)](
            o, do, delta, *_s(o), *_s(do), LQ, H, D=Dh, DP=dp, **blocks, **opts,
        )

    _launch(configs("pre", dp, q.dtype, q.is_cuda), launch_pre, q)

    result = {}

    def launch(cfg):
        blocks, opts = _split_cfg(cfg)
        n_blocks = triton.cdiv(LK, blocks["BLOCK_N"])
        splits = num_splits(n_blocks, B * HKV, _slots(q, cfg)) if deterministic else n_blocks
        acc = torch.zeros((splits if deterministic else 1, B, LQ, H, Dh), dtype=torch.float32, device=q.device)
        _attn_bwd_kernel[(splits, B * HKV)](
            q, k, v, do, dk, dv, acc, lse, delta, lse if key_lengths is None else key_lengths,
            *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv), *acc.stride()[:4],
            LQ, LK, H, HKV, H // HKV, splits, sm_scale, sm_scale * LOG2E,
            D=Dh, DP=dp, DETERMINISTIC=bool(deterministic), HAS_KLEN=key_lengths is not None, PREC=prec, **_mm(q.dtype), **blocks, **opts,
        )
        result["acc"] = acc

    _launch(configs("bwd", dp, q.dtype, q.is_cuda), launch, q)
    acc = result["acc"]
    total = acc[0] if acc.shape[0] == 1 else acc.sum(0)  # a fixed-order sum: deterministic
    dq.copy_(total.mul_(sm_scale))
    return dq, dk, dv


__all__: Sequence[str] = [
    "attention_forward",
    "attention_backward",
    "configs",
    "default_scale",
    "num_splits",
    "padded_head_dim",
    "MAX_HEAD_DIM",
]
