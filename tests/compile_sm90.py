"""Compile the Triton kernels for sm_90 offline and report their resources at real shapes.

No GPU or driver is needed: Triton lowers each kernel to PTX and its bundled ptxas assembles it for
sm_90a, which catches typing and lowering errors a GPU would hit first. Run in a fresh interpreter
without TRITON_INTERPRET (tests/test_sm90_compile.py does): under the interpreter nothing compiles.

    python tests/compile_sm90.py                    # prints the table and "ok"
    python tests/compile_sm90.py --report out.json  # also writes the rows as JSON

One row per (kernel, config, shape): the attention kernels (forward, backward preprocess, backward in
its deterministic and atomic-dq forms) at each config ditfast/kernels/triton/attention.py uses for
bf16 at the FLUX.1 shape (B 1, 512 + 4096 tokens, 24 heads, Dh 128) and the SD3.5-large shape
(B 1, 333 + 4096 tokens, 38 heads, Dh 64) -- the forward also with its fallbacks and its fp32 tiles; grouped
heads at the FLUX shape; per-sample key lengths (HAS_KLEN) at HunyuanVideo 720p's joint length --
and the adaLN / rope / GELU-backward / SwiGLU kernels at their launchers' configs for those models' widths. Columns:

* registers: per thread; spills: bytes of spill stores + spill loads per thread (ptxas -v);
* shared_bytes: Triton's dynamic shared memory + ptxas' static shared memory per program;
* ctas_per_sm: resident programs per SM on H100 / H200 (65536 registers allocated per warp in
  256-register units, 228 KB shared memory with 1 KB reserved per program, 2048 threads, 32
  programs);
* waves: grid size / (132 SMs x ctas_per_sm).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ditfast.kernels.triton import attention as A
from ditfast.kernels.triton import gelu as G
from ditfast.kernels.triton import swiglu as S
from ditfast.kernels.triton import modulate as M
from ditfast.kernels.triton import prepare as P
from ditfast.kernels.triton import rope as R

SMS, REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, CTAS_MAX = 132, 65536, 228 * 1024, 2048, 32
SHAPES = {  # name: (B, Lq = Lk, H, Dh, hidden width)
    "flux": (1, 512 + 4096, 24, 128, 3072),
    "sd35_large": (1, 333 + 4096, 38, 64, 2432),
}

# Upper-case kernel arguments are pointers (default bf16) except the integer scalars listed; lower-case
# ones are integer scalars except the float ones.
INT_SCALARS = {A: {"LQ", "LK", "H", "HKV", "GROUP", "N_SPLITS"}, M: {"N_ROWS", "L", "D", "ROWS", "NCHUNK"},
               G: {"T", "N"}, S: {"T", "H"}}
FLOAT_SCALARS = {"sm_scale", "qk_scale", "eps", "y_eps"}
FP32_POINTERS = {"LSE", "DELTA", "DQ_ACC", "MEAN", "RSTD", "PART"}
# rope.py names its pointers *_ptr: bf16 activations, fp32 statistics / tables / weight grads
ROPE_BF16 = {"q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "dqo_ptr", "dko_ptr", "dq_ptr", "dk_ptr", "kw_ptr"}
# prepare.py: bf16 q / k / v and weights, fp32 rstd and tables
PREPARE_FP32 = {"q_rstd_ptr", "k_rstd_ptr", "cos_ptr", "sin_ptr"}


def signature(kernel, module, consts, fp32_pointers=(), dtype="bf16"):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        elif module is R:
            sig[name] = ("*bf16" if name in ROPE_BF16 else "*fp32") if name.endswith("_ptr") else "i32"
        elif module is P:
            sig[name] = ("*fp32" if name in PREPARE_FP32 else "*bf16") if name.endswith("_ptr") else "i32"
        elif name == "KLEN":  # attention's per-sample key counts
            sig[name] = "*i32"
        elif name in INT_SCALARS[module] or not name.isupper():
            sig[name] = "i32"
        else:
            sig[name] = "*fp32" if name in FP32_POINTERS or name in fp32_pointers else f"*{dtype}"
    return sig


def attrs(kernel, sig, values):
    """Triton's run-time specialization: 16-byte aligned pointers and integers divisible by 16 are
    marked so (what enables vectorized loads). Integers with a known value at the shape are marked
    by it; other integers (strides) are multiples of the head dim or width at these shapes."""
    out = {}
    for i, name in enumerate(kernel.arg_names):
        kind = sig[name]
        if kind.startswith("*") or (kind == "i32" and (values[name] % 16 == 0 if name in values else name[0].islower())):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def _ptxas_info(ptx: str):
    """(registers, spill bytes, static shared bytes) from ptxas -v with Triton's own flags."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = re.search(r"\.target\s+(\w+)", ptx).group(1)
        res = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    smem = re.search(r"(\d+) bytes smem", log)
    return regs, spill, int(smem.group(1)) if smem else 0


def ctas_per_sm(registers: int, shared: int, num_warps: int) -> int:
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM // (shared + 1024)
    by_threads = THREADS_PER_SM // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, CTAS_MAX))


ROWS = []


def compile_sm90(module, kernel, consts, num_warps=8, num_stages=2, fp32_pointers=(), *, label=None, grid=None,
                 shape=None, values=None, dtype="bf16"):
    """Compile one variant; with a label, add its row (grid: programs launched at ``shape``; values:
    integer arguments known at that shape)."""
    start = time.time()
    sig = signature(kernel, module, consts, fp32_pointers, dtype)
    src = ASTSource(kernel, sig, consts, attrs(kernel, sig, values or {}))
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, spills, static_smem = _ptxas_info(compiled.asm["ptx"])
    shared = compiled.metadata.shared + static_smem
    name = kernel.fn.__name__
    print(f"{name} {time.time() - start:.1f}s", flush=True)
    if label is None:
        return
    ctas = ctas_per_sm(regs, shared, num_warps)
    ROWS.append(dict(
        kernel=name, config=dict(label, num_warps=num_warps, num_stages=num_stages), shape=shape,
        registers=regs, spills=spills, shared_bytes=shared, ctas_per_sm=ctas,
        waves=round(grid / (SMS * ctas), 2) if grid is not None and ctas else None,
    ))


def _launch_opts(cfg):
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    return blocks, cfg.get("num_warps", 4), cfg.get("num_stages", 2)


def attention_rows():
    import torch

    for shape_name, (B, L, H, Dh, _) in SHAPES.items():
        dp = A.padded_head_dim(Dh)
        shape = f"{shape_name}: B={B} L={L} H={H} Dh={Dh} bf16"
        # GROUP = 1 (no grouped heads): Triton specializes an integer argument equal to 1 as a constant
        base = dict(D=Dh, DP=dp, PREC="tf32", MM=tl.bfloat16, ROUND_BF16=False, GROUP=1, HAS_KLEN=False)
        vals = dict(LQ=L, LK=L, H=H, HKV=H)
        for i, cfg in enumerate(A.configs("fwd", dp, torch.bfloat16)):  # the forward and its fallbacks
            blocks, warps, stages = _launch_opts(cfg)
            compile_sm90(A, A._attn_fwd_kernel, dict(base, EVEN_N=L % blocks["BLOCK_N"] == 0, **blocks),
                         warps, stages, label=dict(blocks, fallback=i), shape=shape, values=vals,
                         grid=triton.cdiv(L, blocks["BLOCK_M"]) * B * H)
        cfg = A.configs("fwd", dp, torch.float32)[0]  # fp32 inputs: exact fp32 dots, own tiles
        blocks, warps, stages = _launch_opts(cfg)
        compile_sm90(A, A._attn_fwd_kernel, dict(base, PREC="ieee", MM=tl.float32, EVEN_N=L % blocks["BLOCK_N"] == 0,
                                                 **blocks), warps, stages, label=dict(blocks, fallback=0),
                     shape=shape.replace("bf16", "fp32"), grid=triton.cdiv(L, blocks["BLOCK_M"]) * B * H, values=vals,
                     dtype="fp32")
        blocks, warps, stages = _launch_opts(A.configs("pre", dp, torch.bfloat16)[0])
        compile_sm90(A, A._attn_bwd_preprocess_kernel, dict(D=Dh, DP=dp, **blocks), warps, stages,
                     label=dict(blocks), shape=shape, grid=triton.cdiv(L, blocks["BLOCK_M"]) * B * H, values=vals)
        cfg = A.configs("bwd", dp, torch.bfloat16)[0]
        blocks, warps, stages = _launch_opts(cfg)
        n_blocks = triton.cdiv(L, blocks["BLOCK_N"])
        for det in (True, False):
            splits = A.num_splits(n_blocks, B * H, SMS * (2 if warps <= 4 else 1)) if det else n_blocks
            compile_sm90(A, A._attn_bwd_kernel, dict(base, DETERMINISTIC=det, **blocks), warps, stages,
                         label=dict(blocks, deterministic=det, splits=splits), shape=shape, grid=splits * B * H,
                         values=dict(vals, N_SPLITS=splits))
    # grouped-query attention (Lumina 2 style: 24 query heads over 8 k / v heads): GROUP is a run-time
    # integer there, the backward loops over the group
    B, L, H, Dh, _ = SHAPES["flux"]
    Hk, dp = 8, A.padded_head_dim(Dh)
    shape = f"flux_gqa: B={B} L={L} H={H} H_kv={Hk} Dh={Dh} bf16"
    base = dict(D=Dh, DP=dp, PREC="tf32", MM=tl.bfloat16, ROUND_BF16=False, HAS_KLEN=False)
    vals = dict(LQ=L, LK=L, H=H, HKV=Hk, GROUP=H // Hk)
    blocks, warps, stages = _launch_opts(A.configs("fwd", dp, torch.bfloat16)[0])
    compile_sm90(A, A._attn_fwd_kernel, dict(base, EVEN_N=L % blocks["BLOCK_N"] == 0, **blocks), warps, stages,
                 label=dict(blocks, fallback=0), shape=shape, values=vals, grid=triton.cdiv(L, blocks["BLOCK_M"]) * B * H)
    blocks, warps, stages = _launch_opts(A.configs("bwd", dp, torch.bfloat16)[0])
    n_blocks = triton.cdiv(L, blocks["BLOCK_N"])
    splits = A.num_splits(n_blocks, B * Hk, SMS * (2 if warps <= 4 else 1))
    compile_sm90(A, A._attn_bwd_kernel, dict(base, DETERMINISTIC=True, **blocks), warps, stages,
                 label=dict(blocks, deterministic=True, splits=splits), shape=shape, grid=splits * B * Hk,
                 values=dict(vals, N_SPLITS=splits))
    # per-sample key lengths (HunyuanVideo's padded text, Qwen-Image's, T5 padding): the loop bound is
    # loaded per program and the last key block masked at it (EVEN_N off), at HunyuanVideo 720p's
    # joint length (129 frames: 33 x 45 x 80 video tokens + 256 text) for B = 2
    B, Lv, H, Dh = 2, 33 * 45 * 80 // 4, 24, 128
    L, dp = Lv + 256, A.padded_head_dim(Dh)
    shape = f"hunyuanvideo_klen: B={B} L={L} H={H} Dh={Dh} bf16, key lengths"
    base = dict(D=Dh, DP=dp, PREC="tf32", MM=tl.bfloat16, ROUND_BF16=False, GROUP=1, HAS_KLEN=True)
    vals = dict(LQ=L, LK=L, H=H, HKV=H)
    blocks, warps, stages = _launch_opts(A.configs("fwd", dp, torch.bfloat16)[0])
    compile_sm90(A, A._attn_fwd_kernel, dict(base, EVEN_N=False, **blocks), warps, stages,
                 label=dict(blocks, fallback=0), shape=shape, values=vals, grid=triton.cdiv(L, blocks["BLOCK_M"]) * B * H)
    blocks, warps, stages = _launch_opts(A.configs("bwd", dp, torch.bfloat16)[0])
    splits = A.num_splits(triton.cdiv(L, blocks["BLOCK_N"]), B * H, SMS * (2 if warps <= 4 else 1))
    compile_sm90(A, A._attn_bwd_kernel, dict(base, DETERMINISTIC=True, **blocks), warps, stages,
                 label=dict(blocks, deterministic=True, splits=splits), shape=shape, grid=splits * B * H,
                 values=dict(vals, N_SPLITS=splits))


def unit(kernel) -> dict:
    """Stride arguments that are 1 at run time (the last-dim strides), which Triton specializes as
    the constant 1: modulate.py names them ``s..d``, rope.py ``s?_d`` / ``s?_p`` / ``s_?w``."""
    names = kernel.arg_names
    if kernel.fn.__module__.endswith("rope"):
        return {n: 1 for n in names if n[0] == "s" and (n[-2:] in ("_d", "_p") or n.startswith("s_"))}
    return {n: 1 for n in names if n[0] == "s" and n.endswith("d") and n.islower() and n != "sd"}


def modulate_rows():
    import torch

    for shape_name, (B, L, H, Dh, width) in SHAPES.items():
        block_r, block_d, warps = M._config(width, torch.device("cuda"))
        row = dict(BLOCK_R=block_r, BLOCK_D=block_d)
        vals = dict(N_ROWS=B * L, L=L, D=width)
        shape = f"{shape_name}: rows={B * L} D={width} bf16"
        fwd_grid = triton.cdiv(B * L, block_r)
        bwd_grid = B * max(1, min(triton.cdiv(L, block_r), triton.cdiv(2 * SMS, B)))  # M._chunks on a GPU
        lab = dict(row)
        compile_sm90(M, M._norm_modulate_fwd_kernel, dict(unit(M._norm_modulate_fwd_kernel), **row, HAS_SHIFT1=True, HAS_SHIFT2=True, DUAL=True), warps,
                     label=lab, shape=shape, grid=fwd_grid, values=vals)
        compile_sm90(M, M._norm_modulate_bwd_kernel,
                     dict(unit(M._norm_modulate_bwd_kernel), **row, HAS_SHIFT1=True, HAS_SHIFT2=False, DUAL=True, SCALE1_TOK=False, SHIFT1_TOK=True,
                          SCALE2_TOK=False, SHIFT2_TOK=False),
                     warps, fp32_pointers={"DSCALE1", "DSCALE2", "DSHIFT2"}, label=lab, shape=shape, grid=bwd_grid, values=vals)
        compile_sm90(M, M._gated_residual_fwd_kernel, dict(unit(M._gated_residual_fwd_kernel), **row), warps, label=lab, shape=shape, grid=fwd_grid, values=vals)
        compile_sm90(M, M._gated_residual_bwd_kernel, dict(unit(M._gated_residual_bwd_kernel), **row, GATE_TOK=False), warps, fp32_pointers={"DGATE"},
                     label=lab, shape=shape, grid=bwd_grid, values=vals)
        compile_sm90(M, M._gated_residual_norm_modulate_fwd_kernel, dict(unit(M._gated_residual_norm_modulate_fwd_kernel), **row, HAS_SHIFT=True), warps,
                     label=lab, shape=shape, grid=fwd_grid, values=vals)
        compile_sm90(M, M._gated_residual_norm_modulate_bwd_kernel,
                     dict(unit(M._gated_residual_norm_modulate_bwd_kernel), **row, HAS_DXNEW=True, HAS_SHIFT=True, GATE_TOK=False, SHIFT_TOK=True, SCALE_TOK=False),
                     warps, fp32_pointers={"DGATE", "DSCALE"}, label=lab, shape=shape, grid=bwd_grid, values=vals)


def modulate_option_rows():
    """The family's options at Z-Image's width (D 3840, 4096 image + 512 caption tokens at 1024²), bf16:
    the sandwich blocks' RMSNorm + weight modulate, the tanh-gated post-norm residual, and their fused
    seam, forward and backward (per-sample modulations, bf16 weights)."""
    import torch

    B, L, width = 1, 4096 + 512, 3840
    block_r, block_d, warps = M._config(width, torch.device("cuda"))
    row = dict(BLOCK_R=block_r, BLOCK_D=block_d)
    vals = dict(N_ROWS=B * L, L=L, D=width)
    shape = f"zimage: rows={B * L} D={width} bf16"
    fwd_grid = triton.cdiv(B * L, block_r)
    bwd_grid = B * max(1, min(triton.cdiv(L, block_r), triton.cdiv(2 * SMS, B)))
    opts = dict(RMS=True, HAS_W=True)
    for kernel, consts, fp32 in [
        (M._norm_modulate_x_fwd_kernel, dict(HAS_SHIFT=False, **opts), ()),
        (M._norm_modulate_x_bwd_kernel, dict(HAS_SHIFT=False, SCALE_TOK=False, SHIFT_TOK=False, **opts),
         {"DSCALE", "DW"}),
        (M._gated_residual_x_fwd_kernel, dict(TANH=True, POST=True), ()),
        (M._gated_residual_x_bwd_kernel, dict(TANH=True, POST=True, GATE_TOK=False), {"DGATE", "DWY"}),
        (M._gated_residual_norm_modulate_x_fwd_kernel, dict(HAS_SHIFT=False, TANH=True, POST=True, **opts), ()),
        (M._gated_residual_norm_modulate_x_bwd_kernel,
         dict(HAS_DXNEW=True, HAS_SHIFT=False, TANH=True, POST=True, GATE_TOK=False, SHIFT_TOK=False, SCALE_TOK=False,
              **opts), {"DGATE", "DSCALE", "DW", "DWY"}),
    ]:
        backward = "bwd" in kernel.fn.__name__
        compile_sm90(M, kernel, dict(unit(kernel), **row, **consts), warps, fp32_pointers=fp32, label=dict(row),
                     shape=shape, grid=bwd_grid if backward else fwd_grid, values=vals)


def _rope_row(kernel, flags, backward, rows, D, ph, shape, values):
    """One row of the rope family at its launcher's plan for ``rows`` rows of width D (ph: pairs per table row)."""
    import torch

    plan = R._Plan(rows, D, True, torch.device("cuda"), backward=backward)
    consts = {k: bool(v) for k, v in flags.items()}
    consts.update(unit(kernel), BLOCK_R=plan.BLOCK_R, BLOCK_P=plan.BLOCK_P, SOFT_BF16=False)
    grid = min(plan.n_tiles, 2 * SMS) if backward else plan.n_tiles  # the backward is persistent
    compile_sm90(R, kernel, consts, plan.num_warps, label=dict(BLOCK_R=plan.BLOCK_R, BLOCK_P=plan.BLOCK_P),
                 shape=shape, grid=grid, values=dict(values, N=rows, D=D, P0=D // 2, PH=ph))


def rope_rows():
    qk = dict(HAS_K=1, DO_NORM=1, HAS_QW=1, HAS_KW=1, HAS_ROPE=1, INTERLEAVED=1)
    for shape_name, (B, L, H, Dh, _) in SHAPES.items():
        N = B * L * H  # one row per (token, head)
        shape = f"{shape_name}: rows={N} Dh={Dh} bf16"
        _rope_row(R._norm_rope_fwd_kernel, dict(qk, ACROSS=0), False, N, Dh, Dh // 2, shape, dict(L=L, H=H))
        _rope_row(R._norm_rope_bwd_kernel, dict(qk, TABLE_GRAD=0, ACROSS=0), True, N, Dh, Dh // 2, shape,
                  dict(L=L, H=H))
    # Wan 2.1-14B's self-attention QK-norm (qk_norm_rope(across_heads=True)): one row per token of 40 heads x
    # 128, one rstd over the row, RoPE per head (pair i takes table column i % 64); 720p, 81 frames. The
    # backward runs q and k in two launches (one tensor's weight and accumulators per program: with both,
    # 128 registers and 128 B of spills at 16 warps)
    B, L, heads, Dh = 1, 21 * 45 * 80, 40, 128
    shape = f"wan_14b: tokens={B * L} rows of {heads} heads x Dh={Dh} bf16, across heads"
    _rope_row(R._norm_rope_fwd_kernel, dict(qk, ACROSS=1), False, B * L, heads * Dh, Dh // 2, shape, dict(L=L, H=1))
    _rope_row(R._norm_rope_bwd_kernel, dict(qk, HAS_K=0, HAS_KW=0, TABLE_GRAD=0, ACROSS=1), True, B * L, heads * Dh,
              Dh // 2, shape, dict(L=L, H=1))
    # variants not on the FLUX / SD3.5 path: compiled for lowering errors only
    for kernel, flags, block_r, block_p in [
        (R._norm_rope_bwd_kernel,
         dict(HAS_K=1, DO_NORM=1, HAS_QW=1, HAS_KW=0, HAS_ROPE=1, INTERLEAVED=0, TABLE_GRAD=1, ACROSS=0), 8, 64),
        (R._norm_rope_bwd_kernel,
         dict(HAS_K=1, DO_NORM=1, HAS_QW=1, HAS_KW=1, HAS_ROPE=1, INTERLEAVED=1, TABLE_GRAD=1, ACROSS=1), 1, 2048),
        (R._norm_rope_fwd_kernel, dict(HAS_K=0, DO_NORM=1, HAS_QW=1, HAS_KW=0, HAS_ROPE=0, INTERLEAVED=0, ACROSS=0),
         1, 2048),
    ]:
        consts = {k: bool(v) for k, v in flags.items()}
        consts.update(BLOCK_R=block_r, BLOCK_P=block_p, SOFT_BF16=False)
        compile_sm90(R, kernel, consts)


def prepare_rows():
    """The prepare pass's forward at both shapes: the image stream (the larger launch) with QK-norm and
    RoPE (FLUX: interleaved pairs; SD3.5-large: norm only, as that model has no RoPE). Its backward
    is rope.py's norm_rope_bwd, reported above."""
    import torch

    for shape_name, (B, L, H, Dh, _) in SHAPES.items():
        rope = shape_name == "flux"
        L_txt, L_img = (512, 4096) if rope else (333, 4096)
        N = B * L_img * H
        plan = P.prepare_plan(N, Dh, rope, torch.device("cuda"))
        consts = dict(DO_NORM=True, HAS_ROPE=rope, INTERLEAVED=rope, BLOCK_R=plan.BLOCK_R, BLOCK_P=plan.BLOCK_P,
                      BLOCK_PV=triton.next_power_of_2((Dh + 1) // 2), SOFT_BF16=False)
        compile_sm90(P, P._prepare_fwd_kernel, consts, plan.num_warps,
                     label=dict(BLOCK_R=plan.BLOCK_R, BLOCK_P=plan.BLOCK_P, rope=rope),
                     shape=f"{shape_name}: image stream rows={N} Dh={Dh} bf16", grid=plan.n_tiles,
                     values=dict(N=N, L=L_img, H=H, D=Dh, P0=plan.P0, offset=L_txt, L_total=L_txt + L_img))


def gelu_rows():
    """The GELU(tanh) backward + bias gradient of the MLP's first Linear (hidden 4·width) over all the
    tokens of both streams (FLUX's single blocks; the largest launch)."""
    for shape_name, (B, L, H, Dh, width) in SHAPES.items():
        T, N = B * L, 4 * width
        block_t, block_n, row_tiles, n_row = G.plan(T)
        compile_sm90(G, G._gelu_tanh_bwd_kernel, dict(BIAS=True, ROW_TILES=row_tiles, BLOCK_T=block_t, BLOCK_N=block_n),
                     G.NUM_WARPS, label=dict(BLOCK_T=block_t, BLOCK_N=block_n, ROW_TILES=row_tiles),
                     shape=f"{shape_name}: rows={T} N={N} bf16", grid=n_row * triton.cdiv(N, block_n),
                     values=dict(T=T, N=N))


def swiglu_rows():
    """SwiGLU forward and backward at FLUX.2-dev's single-block MLP (4096 + 512 tokens,
    hidden 3 x 6144 = 18432 per half) and Z-Image's (4608 tokens, hidden 10240), bf16."""
    for shape_name, T, H in (("flux2", 4096 + 512, 18432), ("zimage", 4096 + 512, 10240)):
        grid = triton.cdiv(T, S.BLOCK_T) * triton.cdiv(H, S.BLOCK_H)
        for kernel in (S._swiglu_fwd_kernel, S._swiglu_bwd_kernel):
            compile_sm90(S, kernel, dict(BLOCK_T=S.BLOCK_T, BLOCK_H=S.BLOCK_H), S.NUM_WARPS,
                         label=dict(BLOCK_T=S.BLOCK_T, BLOCK_H=S.BLOCK_H), shape=f"{shape_name}: rows={T} H={H} bf16",
                         grid=grid, values=dict(T=T, H=H))


def table(rows) -> str:
    head = f"{'kernel':32} {'config':76} {'shape':12} {'regs':>4} {'spill':>5} {'smem':>7} {'CTA/SM':>6} {'waves':>6}"
    out = [head, "-" * len(head)]
    for r in rows:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
        out.append(f"{r['kernel']:32} {cfg:76} {r['shape'].split(':')[0]:12} {r['registers']:4d} {r['spills']:5d} "
                   f"{r['shared_bytes']:7d} {r['ctas_per_sm']:6d} {r['waves'] if r['waves'] is not None else '-':>6}")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", metavar="FILE.json", help="write the rows as a JSON list")
    parser.add_argument("--only", choices=["attention", "modulate", "rope", "prepare", "gelu", "swiglu"], help="one kernel family only")
    args = parser.parse_args(argv)
    for family, fn in (("attention", attention_rows), ("modulate", modulate_rows),
                       ("modulate", modulate_option_rows), ("rope", rope_rows),
                       ("prepare", prepare_rows), ("gelu", gelu_rows), ("swiglu", swiglu_rows)):
        if args.only in (None, family):
            fn()
    print(table(ROWS))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(ROWS, f, indent=1)
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
