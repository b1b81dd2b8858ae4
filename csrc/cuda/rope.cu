// CUDA kernels for per-head RMSNorm + RoPE on (B, L, H, Dh) tensors: qk_norm_rope (forward,
// backward) and apply_rope (forward; its backward is the same kernel rotating by -angle).
//
// A row is one head (Dh elements). Its tpr (<= 32, so a row lives in one warp) threads split it
// into units of P rotation pairs: interleaved layout, a unit is 2P consecutive elements
// (pairs (2i, 2i+1)); half-split layout, a unit is P elements at i and P at i + Dh/2 (pairs
// (i, i + Dh/2)). P = 4 gives 16-byte accesses (interleaved) or 8/16-byte ones (half-split, 16/32-bit);
// P = 1 is the scalar path for unaligned or Dh % 8 != 0 rows. Both q and k go in one launch
// (blockIdx.y picks the tensor).
#include "vec.cuh"

namespace ditfast {
namespace dev {

namespace {

constexpr int kThreads = 256;
constexpr int kBwdBlocksPerSM = 3;

struct HeadPos {
  int64_t b, l, h;
};

__device__ __forceinline__ HeadPos head_pos(int64_t row, int64_t L, int64_t H) {
  const int64_t lh = L * H;
  const int64_t b = row / lh, rem = row - b * lh;
  return {b, rem / H, rem % H};
}
__device__ __forceinline__ int64_t hoff(const Heads& t, const HeadPos& p) { return p.b * t.sb + p.l * t.sl + p.h * t.sh; }

// Element index of pair j (0 <= j < P) of unit u: first and second element.
template <bool INTER, int P>
__device__ __forceinline__ int pair_first(int u, int j, int half) {
  return INTER ? 2 * (u * P + j) : u * P + j;
}
template <bool INTER, int P>
__device__ __forceinline__ int pair_second(int u, int j, int half) {
  return INTER ? 2 * (u * P + j) + 1 : half + u * P + j;
}

// Load unit u of a head row (row starts at element `off`) as (first, second) of its P pairs.
template <bool INTER, int P>
__device__ __forceinline__ void load_unit(const void* p, DType dt, int64_t off, int u, int half, float* fa, float* fb) {
  constexpr bool VEC = P > 1;
  if constexpr (INTER) {
    float t[2 * P];
    load_n<2 * P, VEC>(p, dt, off + 2 * u * P, t);
#pragma unroll
    for (int j = 0; j < P; ++j) {
      fa[j] = t[2 * j];
      fb[j] = t[2 * j + 1];
    }
  } else {
    load_n<P, VEC>(p, dt, off + u * P, fa);
    load_n<P, VEC>(p, dt, off + half + u * P, fb);
  }
}
template <bool INTER, int P>
__device__ __forceinline__ void store_unit(void* p, DType dt, int64_t off, int u, int half, const float* fa, const float* fb) {
  constexpr bool VEC = P > 1;
  if constexpr (INTER) {
    float t[2 * P];
#pragma unroll
    for (int j = 0; j < P; ++j) {
      t[2 * j] = fa[j];
      t[2 * j + 1] = fb[j];
    }
    store_n<2 * P, VEC>(p, dt, off + 2 * u * P, t);
  } else {
    store_n<P, VEC>(p, dt, off + u * P, fa);
    store_n<P, VEC>(p, dt, off + half + u * P, fb);
  }
}

template <bool INTER, int P, int MAXU>
__global__ void __launch_bounds__(kThreads) rope_fwd_kernel(const RopeFwdArgs a, const int tpr) {
  constexpr bool VEC = P > 1;
  __shared__ float red[2 * kThreads / 32];
  const RowReducer rr{red, tpr};
  const int t = blockIdx.y;
  const Heads in = t == 0 ? a.in[0] : a.in[1];
  const Heads out = t == 0 ? a.out[0] : a.out[1];
  const void* weight = t == 0 ? a.weight[0] : a.weight[1];
  const DType wdt = t == 0 ? a.wdt[0] : a.wdt[1];
  const int tid = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.B * a.L * a.H;
  const HeadPos pos = head_pos(active ? row : 0, a.L, a.H);
  const int half = a.Dh / 2, nunit = a.Dh / (2 * P);
  const int64_t off_in = hoff(in, pos);

  float fa[MAXU][P], fb[MAXU][P];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < MAXU; ++k) {
    const int u = tid + k * tpr;
    if (active && u < nunit) {
      load_unit<INTER, P>(in.ptr, in.dt, off_in, u, half, fa[k], fb[k]);
#pragma unroll
      for (int j = 0; j < P; ++j) ss += fa[k][j] * fa[k][j] + fb[k][j] * fb[k][j];
    }
  }
  float rstd = 1.f;
  if (a.norm) rstd = rsqrtf(rr.sum(ss) / static_cast<float>(a.Dh) + a.eps);

  const int64_t off_out = hoff(out, pos);
  const int64_t off_cs = pos.b * a.cb + pos.l * a.cl;
#pragma unroll
  for (int k = 0; k < MAXU; ++k) {
    const int u = tid + k * tpr;
    if (active && u < nunit) {
      // FLUX's rounding (ditfast.reference.rms_norm): the normalized row is rounded to the output
      // dtype, multiplied by the weight rounded to that dtype, and rounded again.
      if (a.norm) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
          fa[k][j] = round_to(out.dt, fa[k][j] * rstd);
          fb[k][j] = round_to(out.dt, fb[k][j] * rstd);
        }
      }
      if (a.norm && weight != nullptr) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
          float wa, wb;
          load<1>(weight, wdt, pair_first<INTER, P>(u, j, half), &wa);
          load<1>(weight, wdt, pair_second<INTER, P>(u, j, half), &wb);
          fa[k][j] = round_to(out.dt, fa[k][j] * round_to(out.dt, wa));
          fb[k][j] = round_to(out.dt, fb[k][j] * round_to(out.dt, wb));
        }
      }
      if (a.cos != nullptr) {
        float c[P], s[P];
        load_n<P, VEC>(a.cos, DType::F32, off_cs + u * P, c);
        load_n<P, VEC>(a.sin, DType::F32, off_cs + u * P, s);
#pragma unroll
        for (int j = 0; j < P; ++j) {
          const float sn = a.inverse ? -s[j] : s[j];
          const float x0 = fa[k][j], x1 = fb[k][j];
          fa[k][j] = x0 * c[j] - x1 * sn;
          fb[k][j] = x0 * sn + x1 * c[j];
        }
      }
      store_unit<INTER, P>(out.ptr, out.dt, off_out, u, half, fa[k], fb[k]);
    }
  }
}

// Backward of qk_norm_rope. Grid (nblk, ntensor): block x walks rows x*rpb + ty, stepping by
// nblk*rpb; dweight sums stay in registers, then shared memory, then partial[t][x][:].
//   g' = rotate(g, -angle); n = x * rstd; dn = g' * w; dw += g' * n;
//   dx = rstd * (dn - n * mean(dn * n)).
template <bool INTER, int P, int MAXU>
__global__ void __launch_bounds__(kThreads) rope_bwd_kernel(const RopeBwdArgs a, const int tpr) {
  constexpr bool VEC = P > 1;
  extern __shared__ float cols[];  // rpb * Dh floats
  __shared__ float red[2 * kThreads / 32];
  const RowReducer rr{red, tpr};
  const int t = blockIdx.y;
  const Heads x = t == 0 ? a.x[0] : a.x[1];
  const Heads g = t == 0 ? a.g[0] : a.g[1];
  const Heads dx = t == 0 ? a.dx[0] : a.dx[1];
  const void* weight = t == 0 ? a.weight[0] : a.weight[1];
  const DType wdt = t == 0 ? a.wdt[0] : a.wdt[1];
  const int tid = threadIdx.x, ty = threadIdx.y, rpb = blockDim.y;
  const int half = a.Dh / 2, nunit = a.Dh / (2 * P);
  const int64_t rows = a.B * a.L * a.H;
  const float inv_dh = 1.f / static_cast<float>(a.Dh);

  float acc_a[MAXU][P], acc_b[MAXU][P];
#pragma unroll
  for (int k = 0; k < MAXU; ++k)
#pragma unroll
    for (int j = 0; j < P; ++j) acc_a[k][j] = acc_b[k][j] = 0.f;

  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * rpb; r0 < rows; r0 += static_cast<int64_t>(a.nblk) * rpb) {
    const int64_t row = r0 + ty;
    const bool active = row < rows;
    const HeadPos pos = head_pos(active ? row : 0, a.L, a.H);
    const int64_t off_cs = pos.b * a.cb + pos.l * a.cl;
    float xa[MAXU][P], xb[MAXU][P], ga[MAXU][P], gb[MAXU][P];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < MAXU; ++k) {
      const int u = tid + k * tpr;
      if (active && u < nunit) {
        load_unit<INTER, P>(x.ptr, x.dt, hoff(x, pos), u, half, xa[k], xb[k]);
        load_unit<INTER, P>(g.ptr, g.dt, hoff(g, pos), u, half, ga[k], gb[k]);
#pragma unroll
        for (int j = 0; j < P; ++j) ss += xa[k][j] * xa[k][j] + xb[k][j] * xb[k][j];
        if (a.cos != nullptr) {  // rotate the incoming grad back by -angle
          float c[P], s[P];
          load_n<P, VEC>(a.cos, DType::F32, off_cs + u * P, c);
          load_n<P, VEC>(a.sin, DType::F32, off_cs + u * P, s);
#pragma unroll
          for (int j = 0; j < P; ++j) {
            const float g0 = ga[k][j], g1 = gb[k][j];
            ga[k][j] = g0 * c[j] + g1 * s[j];
            gb[k][j] = g1 * c[j] - g0 * s[j];
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < P; ++j) xa[k][j] = xb[k][j] = ga[k][j] = gb[k][j] = 0.f;
      }
    }
    const float rstd = rsqrtf(rr.sum(ss) * inv_dh + a.eps);
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < MAXU; ++k) {
      const int u = tid + k * tpr;
      if (active && u < nunit) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
          xa[k][j] *= rstd;  // n
          xb[k][j] *= rstd;
          if (weight != nullptr) {
            float wa, wb;
            load<1>(weight, wdt, pair_first<INTER, P>(u, j, half), &wa);
            load<1>(weight, wdt, pair_second<INTER, P>(u, j, half), &wb);
            acc_a[k][j] = fmaf(ga[k][j], xa[k][j], acc_a[k][j]);
            acc_b[k][j] = fmaf(gb[k][j], xb[k][j], acc_b[k][j]);
            ga[k][j] *= wa;  // dn
            gb[k][j] *= wb;
          }
          dot += ga[k][j] * xa[k][j] + gb[k][j] * xb[k][j];
        }
      }
    }
    const float m = rr.sum(dot) * inv_dh;
#pragma unroll
    for (int k = 0; k < MAXU; ++k) {
      const int u = tid + k * tpr;
      if (active && u < nunit) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
          ga[k][j] = rstd * (ga[k][j] - xa[k][j] * m);
          gb[k][j] = rstd * (gb[k][j] - xb[k][j] * m);
        }
        store_unit<INTER, P>(dx.ptr, dx.dt, hoff(dx, pos), u, half, ga[k], gb[k]);
      }
    }
  }

  if (weight == nullptr) return;  // uniform over the block
  float* dst = a.partial + (static_cast<int64_t>(t) * a.nblk + blockIdx.x) * a.Dh;
#pragma unroll
  for (int k = 0; k < MAXU; ++k) {
    const int u = tid + k * tpr;
    if (u < nunit)
#pragma unroll
      for (int j = 0; j < P; ++j) {
        cols[ty * a.Dh + pair_first<INTER, P>(u, j, half)] = acc_a[k][j];
        cols[ty * a.Dh + pair_second<INTER, P>(u, j, half)] = acc_b[k][j];
      }
  }
  __syncthreads();
  const int nthreads = blockDim.x * blockDim.y;
  for (int col = ty * blockDim.x + tid; col < a.Dh; col += nthreads) {
    float s = 0.f;
    for (int r = 0; r < rpb; ++r) s += cols[r * a.Dh + col];
    dst[col] = s;
  }
}

struct Config {
  int tpr, rpb;
};

// tpr = smallest power of two with tpr * maxu units covering the row (<= 32 for Dh <= 512).
Config head_config(int Dh, int P, int maxu) {
  const int64_t nunit = Dh / (2 * P);
  const int tpr = next_pow2(ceil_div(nunit, maxu));
  return {tpr, kThreads / tpr};
}

bool vector_ok(int Dh, bool interleaved, std::initializer_list<const Heads*> ts, const float* cos,
               const float* sin, int64_t cb, int64_t cl) {
  if (Dh % 8 != 0) return false;
  for (const Heads* t : ts) {
    // interleaved units are 8 elements; half-split units are two runs of 4
    const int bytes = interleaved ? 16 : (4 * dtype_size(t->dt) < 16 ? 4 * dtype_size(t->dt) : 16);
    if (!aligned(*t, bytes)) return false;
  }
  return aligned(cos, cb, cl, 0, DType::F32, 16) && aligned(sin, cb, cl, 0, DType::F32, 16);
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <bool INTER>
void launch_fwd(const RopeFwdArgs& a, bool vec, cudaStream_t s) {
  const int64_t rows = a.B * a.L * a.H;
  if (vec) {
    const Config cfg = head_config(a.Dh, 4, 2);
    const dim3 block(cfg.tpr, cfg.rpb), grid(static_cast<unsigned>(ceil_div(rows, cfg.rpb)), a.ntensor);
    rope_fwd_kernel<INTER, 4, 2><<<grid, block, 0, s>>>(a, cfg.tpr);
  } else {
    const Config cfg = head_config(a.Dh, 1, 8);
    const dim3 block(cfg.tpr, cfg.rpb), grid(static_cast<unsigned>(ceil_div(rows, cfg.rpb)), a.ntensor);
    rope_fwd_kernel<INTER, 1, 8><<<grid, block, 0, s>>>(a, cfg.tpr);
  }
}

template <bool INTER>
void launch_bwd(const RopeBwdArgs& a, bool vec, cudaStream_t s) {
  const Config cfg = vec ? head_config(a.Dh, 4, 2) : head_config(a.Dh, 1, 8);
  const dim3 block(cfg.tpr, cfg.rpb), grid(a.nblk, a.ntensor);
  const size_t smem = static_cast<size_t>(cfg.rpb) * a.Dh * sizeof(float);
  if (vec) {
    rope_bwd_kernel<INTER, 4, 2><<<grid, block, smem, s>>>(a, cfg.tpr);
  } else {
    rope_bwd_kernel<INTER, 1, 8><<<grid, block, smem, s>>>(a, cfg.tpr);
  }
}

}  // namespace
}  // namespace dev

const char* rope_fwd_cuda(const RopeFwdArgs& a, void* stream) {
  using namespace dev;
  if (a.B * a.L * a.H == 0 || a.Dh == 0) return nullptr;
  if (a.Dh > kMaxHeadDimCuda || a.Dh % 2 != 0) return "head dim must be even and at most 512 for the CUDA kernels";
  // unused slots (ntensor == 1) have ptr == nullptr and pass the check
  const bool vec = vector_ok(a.Dh, a.interleaved, {&a.in[0], &a.out[0], &a.in[1], &a.out[1]}, a.cos, a.sin, a.cb, a.cl);
  auto s = static_cast<cudaStream_t>(stream);
  if (a.interleaved) {
    launch_fwd<true>(a, vec, s);
  } else {
    launch_fwd<false>(a, vec, s);
  }
  return last_error();
}

int32_t rope_bwd_cuda_nblk(int64_t rows, int32_t Dh, int device) {
  using namespace dev;
  int64_t n = static_cast<int64_t>(kBwdBlocksPerSM) * sm_count(device);
  const int64_t most = ceil_div(rows > 0 ? rows : 1, 8);
  if (n > most) n = most;
  return static_cast<int32_t>(n < 1 ? 1 : n);
}

const char* rope_bwd_cuda(const RopeBwdArgs& a, void* stream) {
  using namespace dev;
  if (a.B * a.L * a.H == 0 || a.Dh == 0) return nullptr;
  if (a.Dh > kMaxHeadDimCuda || a.Dh % 2 != 0) return "head dim must be even and at most 512 for the CUDA kernels";
  const bool vec = vector_ok(a.Dh, a.interleaved,
                             {&a.x[0], &a.g[0], &a.dx[0], &a.x[1], &a.g[1], &a.dx[1]}, a.cos, a.sin, a.cb, a.cl);
  auto s = static_cast<cudaStream_t>(stream);
  if (a.interleaved) {
    launch_bwd<true>(a, vec, s);
  } else {
    launch_bwd<false>(a, vec, s);
  }
  return last_error();
}

}  // namespace ditfast
