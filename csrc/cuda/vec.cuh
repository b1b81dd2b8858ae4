// Device helpers shared by the CUDA kernels: vectorized loads/stores that convert to/from fp32,
// the runtime dtype dispatch, alignment checks, and row reductions over a group of threads.
//
// Dtype dispatch happens at run time on a kernel argument (DType), not through templates: every
// thread of a launch takes the same branch, so the cost is a few uniform instructions per 16-byte
// access, and one kernel instantiation serves every mix of fp32/bf16/fp16 inputs (an fp32 residual
// stream with bf16 branch outputs and modulations, for example) instead of 27 instantiations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels.h"

namespace ditfast {
namespace dev {

// ---- raw memory moves ---------------------------------------------------------------------------
// Copy BYTES bytes with the widest access the size allows (16-byte accesses for 16 and more bytes).
// The caller guarantees the alignment: min(BYTES, 16) bytes.
template <int BYTES>
__device__ __forceinline__ void copy_bytes(void* dst, const void* src) {
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else if constexpr (BYTES == 8) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
  } else if constexpr (BYTES == 4) {
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
  } else {
    static_assert(BYTES == 2, "unsupported access size");
    *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
  }
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);  // exact
}
__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));  // round to nearest even
}
__device__ __forceinline__ float f16_bits_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
__device__ __forceinline__ uint16_t float_to_f16_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }

// fp32 v rounded to what dtype dt holds (nearest even), back as fp32.
__device__ __forceinline__ float round_to(DType dt, float v) {
  if (dt == DType::BF16) return bf16_bits_to_float(float_to_bf16_bits(v));
  if (dt == DType::F16) return f16_bits_to_float(float_to_f16_bits(v));
  return v;
}

// ---- typed vector load/store ------------------------------------------------------------------
// Load N consecutive elements of dtype dt starting at element `off` of `base`, as fp32.
// Alignment needed: min(16, N * sizeof(element)) bytes.
template <int N>
__device__ __forceinline__ void load(const void* base, DType dt, int64_t off, float* out) {
  if (dt == DType::F32) {
    float raw[N];
    copy_bytes<4 * N>(raw, static_cast<const float*>(base) + off);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = raw[i];
  } else {
    uint16_t raw[N];
    copy_bytes<2 * N>(raw, static_cast<const uint16_t*>(base) + off);
    if (dt == DType::BF16) {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = bf16_bits_to_float(raw[i]);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = f16_bits_to_float(raw[i]);
    }
  }
}

// Store N fp32 values as dtype dt at element `off` of `base` (round to nearest even).
template <int N>
__device__ __forceinline__ void store(void* base, DType dt, int64_t off, const float* in) {
  if (dt == DType::F32) {
    float raw[N];
#pragma unroll
    for (int i = 0; i < N; ++i) raw[i] = in[i];
    copy_bytes<4 * N>(static_cast<float*>(base) + off, raw);
  } else {
    uint16_t raw[N];
    if (dt == DType::BF16) {
#pragma unroll
      for (int i = 0; i < N; ++i) raw[i] = float_to_bf16_bits(in[i]);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) raw[i] = float_to_f16_bits(in[i]);
    }
    copy_bytes<2 * N>(static_cast<uint16_t*>(base) + off, raw);
  }
}

// Load/store N elements either as one vector access (VEC) or element by element (any alignment).
template <int N, bool VEC>
__device__ __forceinline__ void load_n(const void* base, DType dt, int64_t off, float* out) {
  if constexpr (VEC) {
    load<N>(base, dt, off, out);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) load<1>(base, dt, off + i, out + i);
  }
}
template <int N, bool VEC>
__device__ __forceinline__ void store_n(void* base, DType dt, int64_t off, const float* in) {
  if constexpr (VEC) {
    store<N>(base, dt, off, in);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) store<1>(base, dt, off + i, in + i);
  }
}

// ---- reductions over the tpr threads of one row ---------------------------------------------------
// Threads are laid out as blockDim = (tpr, rows per block), tpr a power of two; a row's threads
// are consecutive in the linear thread id, so for tpr <= 32 they share a warp and reduce with
// shuffles; for tpr > 32 each warp reduces, then the row's warps combine through shared memory.
// Every thread of the block must call these (they contain __syncthreads for tpr > 32).
struct RowReducer {
  float* smem;  // >= 2 * (blockDim.x * blockDim.y / 32) floats
  int tpr;

  __device__ __forceinline__ float2 sum2(float a, float b) const {
    const int width = tpr < 32 ? tpr : 32;
    for (int o = width / 2; o > 0; o >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, o);
      b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    if (tpr > 32) {
      const int lin = threadIdx.y * blockDim.x + threadIdx.x;
      const int warp = lin >> 5, wpr = tpr >> 5;
      if ((lin & 31) == 0) {
        smem[2 * warp] = a;
        smem[2 * warp + 1] = b;
      }
      __syncthreads();
      const int first = threadIdx.y * wpr;
      a = 0.f;
      b = 0.f;
      for (int w = 0; w < wpr; ++w) {  // same order in every thread: identical results
        a += smem[2 * (first + w)];
        b += smem[2 * (first + w) + 1];
      }
      __syncthreads();  // smem is reused by the next reduction
    }
    return make_float2(a, b);
  }
  __device__ __forceinline__ float sum(float a) const { return sum2(a, 0.f).x; }
};

// ---- host-side helpers (compiled by nvcc for the launchers) ----------------------------------------
inline bool aligned(const void* p, int64_t stride_a, int64_t stride_b, int64_t stride_c, DType dt, int bytes) {
  if (p == nullptr) return true;
  const int64_t es = dtype_size(dt);
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 && (stride_a * es) % bytes == 0 &&
         (stride_b * es) % bytes == 0 && (stride_c * es) % bytes == 0;
}
inline bool aligned(const Rows& t, int bytes) { return aligned(t.ptr, t.sb, t.sl, 0, t.dt, bytes); }
inline bool aligned(const Heads& t, int bytes) { return aligned(t.ptr, t.sb, t.sl, t.sh, t.dt, bytes); }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(int device);  // cached cudaDevAttrMultiProcessorCount (defined in modulate.cu)

}  // namespace dev
}  // namespace ditfast
