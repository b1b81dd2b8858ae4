// Plain argument structs shared by the CPU loops (csrc/cpu/*.cpp), the CUDA kernels
// (csrc/cuda/*.cu) and the torch-facing glue (csrc/ops.cpp).
//
// This header includes no torch and no CUDA headers on purpose: the .cu files only see these
// structs, so nvcc never parses the (large) ATen headers and the build stays short. Tensors are
// passed as a data pointer, a dtype code and element strides; the last dim always has stride 1
// (the glue guarantees it). Strides of size-1 dims are set to 0 by the glue, so "stride 0" means
// "broadcast" (a (B, D) shift/scale/gate is a (B, L, D) row tensor with sl = 0).
#pragma once

#include <cstdint>

namespace ditfast {

// I/O element type; all math is fp32.
enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// Largest row (D for the modulate ops, Dh for the rope ops) the CUDA kernels keep in registers.
// Larger rows are rejected by the glue with a clear error (the Python backend falls back to the
// reference for them). The CPU loops have no limit.
constexpr int kMaxRowCuda = 8192;
constexpr int kMaxHeadDimCuda = 512;

// A (B, L, D) tensor with unit stride on D. ptr == nullptr: absent (e.g. shift=None).
struct Rows {
  void* ptr = nullptr;
  int64_t sb = 0, sl = 0;  // element strides of the B and L dims (0 = broadcast)
  DType dt = DType::F32;
};

// norm_modulate / gated_residual_norm_modulate forward:
//   xn = x (+ gate * y when gate.ptr), h = LN(xn) * (1 + scale) + shift.
// The gated op rounds xn to xn_dt (x_new's dtype) before the LayerNorm, so h is the LN of the x_new
// it returns, as the two-step eager computation (and the Triton kernel) gives.
struct ModFwdArgs {
  int64_t B = 0, L = 0;
  int32_t D = 0;
  float eps = 1e-6f;
  Rows x, y, gate, shift, scale;  // y/gate absent for norm_modulate; shift may be absent
  DType xn_dt = DType::F32;       // x_new's dtype (gated op only)
  Rows out_xn;                    // x_new output (gated op only), else absent
  Rows out_h;                     // h output
};

// Backward of the same two ops (gate absent: plain norm_modulate).
// Per-element grads of gate/scale/shift go straight to d*_tok when that modulation is per token;
// when it is per sample (sl == 0) each block writes a partial sum over its rows into
// partial[k][b][blk][D] (k = 0 gate, 1 scale, 2 shift; fp32) and the glue sums over blk.
struct ModBwdArgs {
  int64_t B = 0, L = 0;
  int32_t D = 0;
  float eps = 1e-6f;
  Rows x, y, gate, shift, scale;
  DType xn_dt = DType::F32;  // x_new's dtype: the recomputed xn is rounded as in the forward
  Rows g_xn;  // grad of x_new (gated op only; may be absent)
  Rows g_h;   // grad of h (may be absent in the gated op)
  Rows dx, dy;
  Rows dgate_tok, dscale_tok, dshift_tok;  // absent unless the modulation is per token and needed
  bool need_dgate = false, need_dscale = false, need_dshift = false;
  float* partial = nullptr;  // (3, B, nblk, D) fp32, for the per-sample grads
  int32_t nblk = 1;          // blocks (CUDA) / row chunks (CPU) per batch element
};

// A (B, L, H, Dh) tensor with unit stride on Dh.
struct Heads {
  void* ptr = nullptr;
  int64_t sb = 0, sl = 0, sh = 0;
  DType dt = DType::F32;
};

// qk_norm_rope / apply_rope: for each of ntensor tensors (q, k) and each head row:
//   n = x * rsqrt(mean(x^2) + eps) * weight   (when norm; weight optional)
//   out = rotate(n, angle)                     (when cos: interleaved or half-split pairs)
// inverse: rotate by -angle (the backward of apply_rope).
struct RopeFwdArgs {
  int64_t B = 0, L = 0, H = 0;
  int32_t Dh = 0;
  float eps = 1e-6f;
  int32_t ntensor = 1;
  Heads in[2], out[2];
  const void* weight[2] = {nullptr, nullptr};  // (Dh,), unit stride
  DType wdt[2] = {DType::F32, DType::F32};
  const float* cos = nullptr;  // fp32 (B, L, Dh/2) with cb = 0 for an (L, Dh/2) table
  const float* sin = nullptr;
  int64_t cb = 0, cl = 0;  // shared by cos and sin (the glue checks they match)
  bool norm = false, interleaved = true, inverse = false;
};

// Backward of qk_norm_rope with the norm on (without it the glue runs RopeFwdArgs with inverse).
// dweight: partial[t][blk][Dh] fp32 when weight[t].
struct RopeBwdArgs {
  int64_t B = 0, L = 0, H = 0;
  int32_t Dh = 0;
  float eps = 1e-6f;
  int32_t ntensor = 2;
  Heads x[2], g[2], dx[2];
  const void* weight[2] = {nullptr, nullptr};
  DType wdt[2] = {DType::F32, DType::F32};
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t cb = 0, cl = 0;
  bool interleaved = true;
  float* partial = nullptr;  // (ntensor, nblk, Dh)
  int32_t nblk = 1;
};

// CPU implementations (csrc/cpu/*.cpp).
void mod_fwd_cpu(const ModFwdArgs& a);
void mod_bwd_cpu(const ModBwdArgs& a);
void rope_fwd_cpu(const RopeFwdArgs& a);
void rope_bwd_cpu(const RopeBwdArgs& a);

// CUDA launchers (csrc/cuda/*.cu); stream is a cudaStream_t. They return an error string
// (nullptr on success) so the glue can raise it as a torch error.
const char* mod_fwd_cuda(const ModFwdArgs& a, void* stream);
const char* mod_bwd_cuda(const ModBwdArgs& a, void* stream);
const char* rope_fwd_cuda(const RopeFwdArgs& a, void* stream);
const char* rope_bwd_cuda(const RopeBwdArgs& a, void* stream);
// Number of blocks per batch element (mod) / per tensor (rope) the backward launches use, so the
// glue can size the partial-sum buffers.
int32_t mod_bwd_cuda_nblk(int64_t B, int64_t L, int32_t D, int device);
int32_t rope_bwd_cuda_nblk(int64_t rows, int32_t Dh, int device);
int32_t cuda_runtime_version();  // CUDART_VERSION the kernels were compiled with

}  // namespace ditfast
