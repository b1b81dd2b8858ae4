"""Triton kernels of the attention prepare op (ditfast/reference/prepare.py defines the math).

Design. The prepare op writes each stream's normalized and rotated q, k and its v straight into
the joint (B, L_total, H, Dh) buffers that attention reads, so no ``torch.cat`` copy is made.

Forward: one launch per stream (a launch's flags -- norm or not, RoPE or not -- are constexpr, and
streams differ in them: FLUX's text and image streams have their own norm weights, a stream can have
none). A program owns a tile of BLOCK_R consecutive rows (b, l, h) of the stream, numbered
r = (b * L_i + l) * H + h, and for each row reads q, k and v through their strides (views of a packed
qkv projection are fine), applies RMSNorm + RoPE to q and k with the row helpers of
ditfast/kernels/triton/rope.py (same pair space, same FLUX rounding), and writes all three at token
``offset + l`` of the joint buffers. The cos/sin row is the joint sequence's row ``offset + l``.
Each normalized row's fp32 rstd is stored for the backward, stream i's rows in one consecutive region
(stream-local order) of a flat buffer, so the backward sees a plain (B, L_i, H) tensor per stream.

Backward: per stream, the grads of the joint outputs are strided (B, L_i, H, Dh) views of the joint
grads, and the rows of the tables are a narrowed view; ditfast/kernels/triton/rope.py's
``norm_rope_bwd`` already reads strided grads and tables, rotates back (RoPE transpose), runs the
RMSNorm backward and reduces the weight grads deterministically in fp32 -- so the backward launches
it once per stream. v's grad is a slice of the joint grad and needs no kernel (the op layer handles it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import on_device
from .rope import _Plan, _load_tables, _load_weight, _row_offsets, _table_strides, _tile_fwd, norm_rope_bwd

Tensor = torch.Tensor


def prepare_plan(N: int, D: int, rope: bool, device: torch.device) -> _Plan:
    """The forward's tiles: rope.py's plan with half the rows per program on a GPU (the prepare
    kernel holds q, k and v of each row: at rope's full tile it spilled 16 B per thread at the FLUX
    shape with triton 3.6, compiled for sm_90a)."""
    plan = _Plan(N, D, rope, device)
    if device.type == "cuda" and plan.BLOCK_R > 1:
        plan.BLOCK_R //= 2
        plan.n_tiles = triton.cdiv(N, plan.BLOCK_R)
    return plan


@triton.jit
def _prepare_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # one stream's inputs (B, L, H, D), any strides
    qo_ptr, ko_ptr, vo_ptr,  # joint outputs (B, L_total, H, D), contiguous
    qw_ptr, kw_ptr,  # the stream's norm weights (D,) (read when DO_NORM)
    q_rstd_ptr, k_rstd_ptr,  # the stream's (B * L * H,) fp32 rstd regions (written when DO_NORM)
    cos_ptr, sin_ptr,  # (B or 1, L_total, P) fp32 tables (read when HAS_ROPE)
    N, L, H, D, P0,  # N = B * L * H rows of width D in this stream; P0 pairs
    offset, L_total,  # the stream's first token in the joint sequence; joint length
    sq_b, sq_l, sq_h, sq_d,  # q strides
    sk_b, sk_l, sk_h, sk_d,  # k strides
    sv_b, sv_l, sv_h, sv_d,  # v strides
    s_qw, s_kw,  # weight strides
    sc_b, sc_l, sc_p,  # cos strides (sc_b = 0 for an (L_total, P) table)
    ss_b, ss_l, ss_p,  # sin strides
    eps,
    DO_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PV: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # round bf16 in software (the interpreter; see rope._cast)
):
    r, rmask, b, l, h = _row_offsets(tl.program_id(0), N, L, H, BLOCK_R)
    lj = l + offset  # token in the joint sequence
    o_rows = (((b * L_total + lj) * H + h) * D)[:, None]
    if HAS_ROPE:
        c, s = _load_tables(cos_ptr, sin_ptr, b, lj, rmask, sc_b, sc_l, sc_p, ss_b, ss_l, ss_p, P0, P0, BLOCK_P, False)
    else:
        c = 0.0
        s = 0.0
    if DO_NORM:
        qw0, qw1 = _load_weight(qw_ptr, qo_ptr, s_qw, D, P0, INTERLEAVED, BLOCK_P, SOFT_BF16)
        kw0, kw1 = _load_weight(kw_ptr, ko_ptr, s_kw, D, P0, INTERLEAVED, BLOCK_P, SOFT_BF16)
    else:
        qw0 = 1.0
        qw1 = 1.0
        kw0 = 1.0
        kw1 = 1.0
    q_rows = (b * sq_b + l * sq_l + h * sq_h)[:, None]
    _tile_fwd(q_ptr, qo_ptr, q_rstd_ptr, q_rows, o_rows, r, rmask, sq_d, qw0, qw1, c, s, D, P0, eps,
              DO_NORM, DO_NORM, HAS_ROPE, INTERLEAVED, BLOCK_R, BLOCK_P, SOFT_BF16)
    k_rows = (b * sk_b + l * sk_l + h * sk_h)[:, None]
    _tile_fwd(k_ptr, ko_ptr, k_rstd_ptr, k_rows, o_rows, r, rmask, sk_d, kw0, kw1, c, s, D, P0, eps,
              DO_NORM, DO_NORM, HAS_ROPE, INTERLEAVED, BLOCK_R, BLOCK_P, SOFT_BF16)
    # v: a plain copy, read as one contiguous run of 2 * BLOCK_PV >= D elements per row
    v_rows = (b * sv_b + l * sv_l + h * sv_h)[:, None]
    _tile_fwd(v_ptr, vo_ptr, q_rstd_ptr, v_rows, o_rows, r, rmask, sv_d, 1.0, 1.0, 0.0, 0.0, D, D, eps,
              False, False, False, True, BLOCK_R, BLOCK_PV, SOFT_BF16)


def prepare_fwd(
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    vs: Sequence[Tensor],
    q_weights: Sequence[Optional[Tensor]],
    k_weights: Sequence[Optional[Tensor]],
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    eps: float,
    interleaved: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v, rstd): contiguous joint (B, L_total, H, D) outputs in the inputs' dtype and the
    fp32 rstd buffer (2, B * L_total * H): row 0 for q, row 1 for k, stream i's rows at
    [B * H * sum_{j<i} L_j, B * H * sum_{j<=i} L_j) in stream-local order (zeros for a stream
    without norm). Streams are normalized when their weights are given (both or neither)."""
    B, _, H, D = qs[0].shape
    lengths = [q.shape[1] for q in qs]
    L_total = sum(lengths)
    dev, dtype = qs[0].device, qs[0].dtype
    shape = (B, L_total, H, D)
    q_out = torch.empty(shape, dtype=dtype, device=dev)
    k_out = torch.empty(shape, dtype=dtype, device=dev)
    v_out = torch.empty(shape, dtype=dtype, device=dev)
    rstd = torch.empty((2, B * L_total * H), dtype=torch.float32, device=dev)
    rope = cos is not None
    base = offset = 0  # the stream's first rstd entry and first token in the joint sequence
    for q, k, v, qw, kw, L in zip(qs, ks, vs, q_weights, k_weights, lengths):
        N = B * L * H
        do_norm = qw is not None
        if not do_norm:
            rstd[:, base : base + N].zero_()
        if N == 0 or D == 0:
            base, offset = base + N, offset + L
            continue
        plan = prepare_plan(N, D, rope, dev)
        block_pv = triton.next_power_of_2(max((D + 1) // 2, 1))
        with on_device(q):
            _prepare_fwd_kernel[(plan.n_tiles,)](
                q, k, v, q_out, k_out, v_out,
                q if qw is None else qw, q if kw is None else kw,
                rstd[0, base:], rstd[1, base:],
                q if cos is None else cos, q if sin is None else sin,
                N, L, H, D, plan.P0, offset, L_total,
                *q.stride(), *k.stride(), *v.stride(),
                0 if qw is None else qw.stride(0), 0 if kw is None else kw.stride(0),
                *_table_strides(cos), *_table_strides(sin),
                eps,
                DO_NORM=do_norm, HAS_ROPE=rope, INTERLEAVED=rope and interleaved,
                BLOCK_R=plan.BLOCK_R, BLOCK_P=plan.BLOCK_P, BLOCK_PV=block_pv,
                SOFT_BF16=dev.type != "cuda", num_warps=plan.num_warps,
            )
        base, offset = base + N, offset + L
    return q_out, k_out, v_out, rstd


def prepare_bwd(
    dq: Tensor,
    dk: Tensor,
    qs: Sequence[Tensor],
    ks: Sequence[Tensor],
    q_weights: Sequence[Optional[Tensor]],
    k_weights: Sequence[Optional[Tensor]],
    rstd: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    interleaved: bool,
) -> Tuple[List[Tensor], List[Tensor], List[Optional[Tensor]], List[Optional[Tensor]]]:
    """Grads of each stream's q and k (contiguous, the inputs' shapes and dtype) and of its weights
    (None without norm), from the grads dq, dk of the joint outputs (any strides)."""
    B, _, H, _ = qs[0].shape
    dqs, dks, dqws, dkws = [], [], [], []
    start = 0
    for q, k, qw, kw in zip(qs, ks, q_weights, k_weights):
        L = q.shape[1]
        N = B * L * H
        base = B * H * start
        norm = qw is not None
        q_rstd = rstd[0, base : base + N].view(B, L, H) if norm else None
        k_rstd = rstd[1, base : base + N].view(B, L, H) if norm else None
        c = None if cos is None else cos.narrow(-2, start, L)
        s = None if sin is None else sin.narrow(-2, start, L)
        gq, gk = dq.narrow(1, start, L), dk.narrow(1, start, L)
        dqi, dki, dqw, dkw, _, _ = norm_rope_bwd(gq, gk, q, k, qw, kw, q_rstd, k_rstd, c, s, interleaved, False)
        dqs.append(dqi)
        dks.append(dki)
        dqws.append(dqw)
        dkws.append(dkw)
        start += L
    return dqs, dks, dqws, dkws
