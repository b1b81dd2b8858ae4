"""Compile the Triton kernels for sm_90 offline (Triton's own ptxas; no GPU or driver needed).

The CPU tests run the kernels under the Triton interpreter, which never compiles them; this catches
typing and lowering errors a GPU would hit first. Run by tests/test_sm90_compile.py in a fresh
interpreter without TRITON_INTERPRET (the kernels' helpers are jit functions only then); prints one
line per kernel variant and "ok" at the end. The variants are the main specializations: two
streams with the QK-norm + RoPE prologue and a plain single stream for attention, every optional
input present for the adaLN kernels, the rope kernels with and without norm / table gradients.
"""
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ditfast.kernels.triton import attention as A
from ditfast.kernels.triton import modulate as M
from ditfast.kernels.triton import rope as R

# Upper-case kernel arguments are pointers (default bf16) except these integer scalars; lower-case
# ones are integer scalars except the float ones.
INT_SCALARS = {A: {"LQ0", "LQ1", "LK0", "LK1", "H"}, M: {"N_ROWS", "L", "D", "ROWS", "NCHUNK"}}
FLOAT_SCALARS = {"sm_scale", "qk_scale", "eps"}
FP32_POINTERS = {"LSE", "DELTA", "DWQ", "DWK", "COS", "SIN", "MEAN", "RSTD", "WQ0", "WK0", "WQ1", "WK1"}
# rope.py names its pointers *_ptr: bf16 activations, fp32 statistics / tables / weight grads
ROPE_BF16 = {"q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "dqo_ptr", "dko_ptr", "dq_ptr", "dk_ptr", "kw_ptr"}


def signature(kernel, module, consts, fp32_pointers=()):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        elif module is R:
            sig[name] = ("*bf16" if name in ROPE_BF16 else "*fp32") if name.endswith("_ptr") else "i32"
        elif name in INT_SCALARS[module] or not name.isupper():
            sig[name] = "i32"
        else:
            sig[name] = "*fp32" if name in FP32_POINTERS or name in fp32_pointers else "*bf16"
    return sig


def compile_sm90(module, kernel, consts, num_warps=8, num_stages=2, fp32_pointers=()):
    start = time.time()
    src = ASTSource(kernel, signature(kernel, module, consts, fp32_pointers), consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    print(f"{kernel.fn.__name__} {time.time() - start:.1f}s", flush=True)


def main():
    joint = dict(D=72, DP=128, ROPE=1, NORM=True, PROLOGUE=True, TWO_STREAMS=True, PREC="tf32", MM=tl.bfloat16)
    plain = dict(joint, D=64, DP=64, ROPE=0, NORM=False, PROLOGUE=False, TWO_STREAMS=False)
    for c in (joint, plain):
        compile_sm90(A, A._attn_fwd_kernel, dict(c, BLOCK_M=128, BLOCK_N=64, EVEN_K0=False, EVEN_K1=True))
        compile_sm90(A, A._attn_bwd_dq_kernel, dict(c, BLOCK_M=128, BLOCK_N=32))
        compile_sm90(A, A._attn_bwd_dkdv_kernel, dict(c, BLOCK_M=32, BLOCK_N=128))

    row = dict(BLOCK_R=1, BLOCK_D=4096)
    compile_sm90(M, M._norm_modulate_fwd_kernel, dict(row, HAS_SHIFT1=True, HAS_SHIFT2=True, DUAL=True))
    compile_sm90(M, M._norm_modulate_bwd_kernel,
                 dict(row, HAS_SHIFT1=True, HAS_SHIFT2=False, DUAL=True, SCALE1_TOK=False, SHIFT1_TOK=True,
                      SCALE2_TOK=False, SHIFT2_TOK=False),
                 fp32_pointers={"DSCALE1", "DSCALE2", "DSHIFT2"})
    compile_sm90(M, M._gated_residual_fwd_kernel, dict(row))
    compile_sm90(M, M._gated_residual_bwd_kernel, dict(row, GATE_TOK=False), fp32_pointers={"DGATE"})
    compile_sm90(M, M._gated_residual_norm_modulate_fwd_kernel, dict(row, HAS_SHIFT=True))
    compile_sm90(M, M._gated_residual_norm_modulate_bwd_kernel,
                 dict(row, HAS_DXNEW=True, HAS_SHIFT=True, GATE_TOK=False, SHIFT_TOK=True, SCALE_TOK=False),
                 fp32_pointers={"DGATE", "DSCALE"})

    for kernel, flags, block_r, block_p in [
        (R._norm_rope_fwd_kernel, dict(HAS_K=1, DO_NORM=1, HAS_QW=1, HAS_KW=1, HAS_ROPE=1, INTERLEAVED=1), 16, 64),
        (R._norm_rope_bwd_kernel,
         dict(HAS_K=1, DO_NORM=1, HAS_QW=1, HAS_KW=0, HAS_ROPE=1, INTERLEAVED=0, TABLE_GRAD=1), 8, 64),
        (R._norm_rope_fwd_kernel, dict(HAS_K=0, DO_NORM=1, HAS_QW=1, HAS_KW=0, HAS_ROPE=0, INTERLEAVED=0), 1, 2048),
        (R._norm_rope_bwd_kernel,
         dict(HAS_K=0, DO_NORM=0, HAS_QW=0, HAS_KW=0, HAS_ROPE=1, INTERLEAVED=1, TABLE_GRAD=0), 8, 32),
    ]:
        consts = {k: bool(v) for k, v in flags.items()}
        consts.update(BLOCK_R=block_r, BLOCK_P=block_p, SOFT_BF16=False)
        compile_sm90(R, kernel, consts)
    print("ok")


if __name__ == "__main__":
    main()
