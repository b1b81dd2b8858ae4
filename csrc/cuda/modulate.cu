// CUDA kernels for the adaLN family: norm_modulate and gated_residual_norm_modulate, forward and
// backward. One kernel pair serves both ops (gate absent = plain norm_modulate).
//
// Layout: a block is (tpr, rpb) threads; the tpr threads of a row split it into chunks of W
// elements (W = 8: one or two 16-byte accesses per tensor; W = 1: the scalar path for rows that
// are not 16-byte aligned or D % 8 != 0) and keep up to MAXC chunks each in registers, so x is read
// once. Statistics are two-pass (mean, then the centred sum of squares) in fp32.
#include "vec.cuh"

namespace ditfast {
namespace dev {

namespace {

constexpr int kThreads = 256;       // threads per block (more when one row needs more)
constexpr int kMaxThreads = 512;    // largest block (and __launch_bounds__)
constexpr int kBwdBlocksPerSM = 3;  // backward grid size target

__device__ __forceinline__ int64_t roff(const Rows& t, int64_t b, int64_t l) { return b * t.sb + l * t.sl; }

template <int W, int MAXC>
__global__ void __launch_bounds__(kMaxThreads) mod_fwd_kernel(const ModFwdArgs a, const int tpr) {
  constexpr bool VEC = W > 1;
  __shared__ float red[2 * kMaxThreads / 32];
  const RowReducer rr{red, tpr};
  const int tid = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < a.B * a.L;
  const int64_t b = active ? row / a.L : 0, l = active ? row % a.L : 0;
  const int nch = a.D / W;
  const bool gated = a.gate.ptr != nullptr;

  // Pass 1: xn = x (+ gate * y, rounded to x_new's dtype), kept in registers; store x_new; sum for the mean.
  float v[MAXC][W];
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int ch = tid + c * tpr;
    if (active && ch < nch) {
      const int64_t col = static_cast<int64_t>(ch) * W;
      load_n<W, VEC>(a.x.ptr, a.x.dt, roff(a.x, b, l) + col, v[c]);
      if (gated) {
        float g[W], y[W];
        load_n<W, VEC>(a.gate.ptr, a.gate.dt, roff(a.gate, b, l) + col, g);
        load_n<W, VEC>(a.y.ptr, a.y.dt, roff(a.y, b, l) + col, y);
#pragma unroll
        for (int i = 0; i < W; ++i) v[c][i] = round_to(a.xn_dt, fmaf(g[i], y[i], v[c][i]));
        if (a.out_xn.ptr != nullptr) store_n<W, VEC>(a.out_xn.ptr, a.out_xn.dt, roff(a.out_xn, b, l) + col, v[c]);
      }
#pragma unroll
      for (int i = 0; i < W; ++i) s += v[c][i];
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) v[c][i] = 0.f;
    }
  }
  const float inv_d = 1.f / static_cast<float>(a.D);
  const float mean = rr.sum(s) * inv_d;

  // Pass 2 (registers): centred sum of squares.
  float s2 = 0.f;
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    if (active && tid + c * tpr < nch) {
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const float d = v[c][i] - mean;
        s2 = fmaf(d, d, s2);
      }
    }
  }
  const float rstd = rsqrtf(rr.sum(s2) * inv_d + a.eps);

  // Pass 3: modulate and store h.
#pragma unroll
  for (int c = 0; c < MAXC; ++c) {
    const int ch = tid + c * tpr;
    if (active && ch < nch) {
      const int64_t col = static_cast<int64_t>(ch) * W;
      float sc[W], sh[W], h[W];
      load_n<W, VEC>(a.scale.ptr, a.scale.dt, roff(a.scale, b, l) + col, sc);
      if (a.shift.ptr != nullptr) {
        load_n<W, VEC>(a.shift.ptr, a.shift.dt, roff(a.shift, b, l) + col, sh);
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) sh[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < W; ++i) h[i] = fmaf((v[c][i] - mean) * rstd, 1.f + sc[i], sh[i]);
      store_n<W, VEC>(a.out_h.ptr, a.out_h.dt, roff(a.out_h, b, l) + col, h);
    }
  }
}

// Backward. Grid (nblk, B): block (x, b) walks rows l = x*rpb + ty, stepping by nblk*rpb, of batch
// element b, so per-sample grads (sums over l) accumulate in each thread's registers for the
// columns it owns, then across the block's rows in shared memory, then into partial[k][b][x][:].
template <int W, int MAXC>
__global__ void __launch_bounds__(kMaxThreads) mod_bwd_kernel(const ModBwdArgs a, const int tpr) {
  constexpr bool VEC = W > 1;
  extern __shared__ float cols[];  // rpb * D floats, for the per-sample reductions
  __shared__ float red[2 * kMaxThreads / 32];
  const RowReducer rr{red, tpr};
  const int tid = threadIdx.x, ty = threadIdx.y, rpb = blockDim.y;
  const int64_t b = blockIdx.y;
  const int nch = a.D / W;
  const float inv_d = 1.f / static_cast<float>(a.D);
  const bool gated = a.gate.ptr != nullptr;
  const bool has_gh = a.g_h.ptr != nullptr;
  // ps[k]: grad k (gate, scale, shift) is needed and per sample, so it is summed over rows here.
  // (The glue sets d*_tok only for per-token modulations whose grad is needed.)
  const bool ps[3] = {gated && a.need_dgate && a.dgate_tok.ptr == nullptr,
                      has_gh && a.need_dscale && a.dscale_tok.ptr == nullptr,
                      has_gh && a.need_dshift && a.dshift_tok.ptr == nullptr};

  float acc[3][MAXC][W];
#pragma unroll
  for (int k = 0; k < 3; ++k)
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
#pragma unroll
      for (int i = 0; i < W; ++i) acc[k][c][i] = 0.f;

  // Same trip count for every thread of the block (the reductions synchronize).
  for (int64_t l0 = static_cast<int64_t>(blockIdx.x) * rpb; l0 < a.L; l0 += static_cast<int64_t>(a.nblk) * rpb) {
    const int64_t l = l0 + ty;
    const bool active = l < a.L;
    float xn[MAXC][W], gh[MAXC][W];
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int ch = tid + c * tpr;
      if (active && ch < nch) {
        const int64_t col = static_cast<int64_t>(ch) * W;
        load_n<W, VEC>(a.x.ptr, a.x.dt, roff(a.x, b, l) + col, xn[c]);
        if (gated) {
          float g[W], y[W];
          load_n<W, VEC>(a.gate.ptr, a.gate.dt, roff(a.gate, b, l) + col, g);
          load_n<W, VEC>(a.y.ptr, a.y.dt, roff(a.y, b, l) + col, y);
#pragma unroll
          for (int i = 0; i < W; ++i) xn[c][i] = round_to(a.xn_dt, fmaf(g[i], y[i], xn[c][i]));
        }
        if (has_gh) {
          load_n<W, VEC>(a.g_h.ptr, a.g_h.dt, roff(a.g_h, b, l) + col, gh[c]);
        } else {
#pragma unroll
          for (int i = 0; i < W; ++i) gh[c][i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < W; ++i) s += xn[c][i];
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) xn[c][i] = gh[c][i] = 0.f;
      }
    }
    const float mean = rr.sum(s) * inv_d;
    float s2 = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      if (active && tid + c * tpr < nch) {
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const float d = xn[c][i] - mean;
          s2 = fmaf(d, d, s2);
        }
      }
    }
    const float rstd = rsqrtf(rr.sum(s2) * inv_d + a.eps);

    // xhat = (xn - mean) * rstd overwrites xn; gs = gh * (1 + scale) overwrites gh; the
    // per-element grads of scale (gh * xhat) and shift (gh) are summed or stored on the way.
    float m1 = 0.f, m2 = 0.f;
    if (has_gh) {
      float s_g = 0.f, s_gx = 0.f;
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int ch = tid + c * tpr;
        if (active && ch < nch) {
          const int64_t col = static_cast<int64_t>(ch) * W;
          float sc[W], dsc[W], dsh[W];
          load_n<W, VEC>(a.scale.ptr, a.scale.dt, roff(a.scale, b, l) + col, sc);
#pragma unroll
          for (int i = 0; i < W; ++i) {
            const float xh = (xn[c][i] - mean) * rstd;
            const float g = gh[c][i];
            const float gs = g * (1.f + sc[i]);
            xn[c][i] = xh;
            gh[c][i] = gs;
            dsc[i] = g * xh;
            dsh[i] = g;
            s_g += gs;
            s_gx = fmaf(gs, xh, s_gx);
          }
          if (ps[1]) {
#pragma unroll
            for (int i = 0; i < W; ++i) acc[1][c][i] += dsc[i];
          }
          if (ps[2]) {
#pragma unroll
            for (int i = 0; i < W; ++i) acc[2][c][i] += dsh[i];
          }
          if (a.dscale_tok.ptr != nullptr)
            store_n<W, VEC>(a.dscale_tok.ptr, a.dscale_tok.dt, roff(a.dscale_tok, b, l) + col, dsc);
          if (a.dshift_tok.ptr != nullptr)
            store_n<W, VEC>(a.dshift_tok.ptr, a.dshift_tok.dt, roff(a.dshift_tok, b, l) + col, dsh);
        }
      }
      const float2 m = rr.sum2(s_g, s_gx);
      m1 = m.x * inv_d;
      m2 = m.y * inv_d;
    }

    // dxn = rstd * (gs - m1 - xhat * m2) + g_xn; dx = dxn; dy = gate * dxn; dgate = y * dxn.
#pragma unroll
    for (int c = 0; c < MAXC; ++c) {
      const int ch = tid + c * tpr;
      if (active && ch < nch) {
        const int64_t col = static_cast<int64_t>(ch) * W;
        float d[W];
#pragma unroll
        for (int i = 0; i < W; ++i) d[i] = has_gh ? rstd * (gh[c][i] - m1 - xn[c][i] * m2) : 0.f;
        if (a.g_xn.ptr != nullptr) {
          float gx[W];
          load_n<W, VEC>(a.g_xn.ptr, a.g_xn.dt, roff(a.g_xn, b, l) + col, gx);
#pragma unroll
          for (int i = 0; i < W; ++i) d[i] += gx[i];
        }
        store_n<W, VEC>(a.dx.ptr, a.dx.dt, roff(a.dx, b, l) + col, d);
        if (gated) {
          float g[W], y[W], t[W];
          load_n<W, VEC>(a.gate.ptr, a.gate.dt, roff(a.gate, b, l) + col, g);
#pragma unroll
          for (int i = 0; i < W; ++i) t[i] = g[i] * d[i];
          store_n<W, VEC>(a.dy.ptr, a.dy.dt, roff(a.dy, b, l) + col, t);
          if (ps[0] || a.dgate_tok.ptr != nullptr) {
            load_n<W, VEC>(a.y.ptr, a.y.dt, roff(a.y, b, l) + col, y);
#pragma unroll
            for (int i = 0; i < W; ++i) t[i] = y[i] * d[i];
            if (ps[0]) {
#pragma unroll
              for (int i = 0; i < W; ++i) acc[0][c][i] += t[i];
            } else {
              store_n<W, VEC>(a.dgate_tok.ptr, a.dgate_tok.dt, roff(a.dgate_tok, b, l) + col, t);
            }
          }
        }
      }
    }
  }

  // Per-sample grads: combine the block's rows, write this block's partial sums.
  const int nthreads = blockDim.x * blockDim.y;
  const int lin = ty * blockDim.x + tid;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (!ps[k]) continue;  // uniform over the block
    float* dst = a.partial + ((static_cast<int64_t>(k) * a.B + b) * a.nblk + blockIdx.x) * a.D;
    if (rpb == 1) {
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int ch = tid + c * tpr;
        if (ch < nch) store_n<W, VEC>(dst, DType::F32, static_cast<int64_t>(ch) * W, acc[k][c]);
      }
    } else {
#pragma unroll
      for (int c = 0; c < MAXC; ++c) {
        const int ch = tid + c * tpr;
        if (ch < nch)
#pragma unroll
          for (int i = 0; i < W; ++i) cols[ty * a.D + ch * W + i] = acc[k][c][i];
      }
      __syncthreads();
      for (int col = lin; col < a.D; col += nthreads) {
        float t = 0.f;
        for (int r = 0; r < rpb; ++r) t += cols[r * a.D + col];
        dst[col] = t;
      }
      __syncthreads();
    }
  }
}

struct Config {
  int tpr, rpb;
};

Config row_config(int D, int W, int MAXC) {
  const int64_t nch = D / W;
  const int tpr = next_pow2(ceil_div(nch, MAXC));
  const int threads = tpr > kThreads ? tpr : kThreads;
  return {tpr, threads / tpr};
}

bool vector_ok(int D, std::initializer_list<const Rows*> ts) {
  if (D % 8 != 0) return false;
  for (const Rows* t : ts)
    if (!aligned(*t, 16)) return false;
  return true;
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

int sm_count(int device) {
  static int cache[128] = {0};
  if (device < 0 || device >= 128) device = 0;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = 108;
    }
    cache[device] = n;
  }
  return cache[device];
}

}  // namespace dev

const char* mod_fwd_cuda(const ModFwdArgs& a, void* stream) {
  using namespace dev;
  const int64_t rows = a.B * a.L;
  if (rows == 0 || a.D == 0) return nullptr;
  if (a.D > kMaxRowCuda) return "row too long for the CUDA kernels";
  const bool vec = vector_ok(a.D, {&a.x, &a.y, &a.gate, &a.shift, &a.scale, &a.out_xn, &a.out_h});
  auto s = static_cast<cudaStream_t>(stream);
  if (vec) {
    const Config cfg = row_config(a.D, 8, 4);
    const dim3 block(cfg.tpr, cfg.rpb), grid(static_cast<unsigned>(ceil_div(rows, cfg.rpb)));
    mod_fwd_kernel<8, 4><<<grid, block, 0, s>>>(a, cfg.tpr);
  } else {
    const Config cfg = row_config(a.D, 1, 16);
    const dim3 block(cfg.tpr, cfg.rpb), grid(static_cast<unsigned>(ceil_div(rows, cfg.rpb)));
    mod_fwd_kernel<1, 16><<<grid, block, 0, s>>>(a, cfg.tpr);
  }
  return last_error();
}

int32_t mod_bwd_cuda_nblk(int64_t B, int64_t L, int32_t D, int device) {
  using namespace dev;
  const int64_t target = static_cast<int64_t>(kBwdBlocksPerSM) * sm_count(device);
  int64_t n = ceil_div(target, B > 0 ? B : 1);
  if (n > L) n = L;
  return static_cast<int32_t>(n < 1 ? 1 : n);
}

const char* mod_bwd_cuda(const ModBwdArgs& a, void* stream) {
  using namespace dev;
  if (a.B * a.L == 0 || a.D == 0) return nullptr;
  if (a.D > kMaxRowCuda) return "row too long for the CUDA kernels";
  if (a.B > 65535) return "batch too large for the CUDA backward grid (B > 65535)";
  const bool vec = vector_ok(a.D, {&a.x, &a.y, &a.gate, &a.shift, &a.scale, &a.g_xn, &a.g_h, &a.dx, &a.dy,
                                   &a.dgate_tok, &a.dscale_tok, &a.dshift_tok});
  auto s = static_cast<cudaStream_t>(stream);
  const Config cfg = vec ? row_config(a.D, 8, 2) : row_config(a.D, 1, 16);
  const dim3 block(cfg.tpr, cfg.rpb), grid(a.nblk, static_cast<unsigned>(a.B));
  const size_t smem = cfg.rpb > 1 ? static_cast<size_t>(cfg.rpb) * a.D * sizeof(float) : 0;
  if (vec) {
    mod_bwd_kernel<8, 2><<<grid, block, smem, s>>>(a, cfg.tpr);
  } else {
    mod_bwd_kernel<1, 16><<<grid, block, smem, s>>>(a, cfg.tpr);
  }
  return last_error();
}

int32_t cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace ditfast
