// CPU implementation of per-head RMSNorm + RoPE (the same math as csrc/cuda/rope.cu).
// Pair i of a head row: interleaved (2i, 2i + 1), half-split (i, i + Dh/2).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "row_io.h"

namespace ditfast {

namespace {

struct Pos {
  int64_t b, l, h;
};

Pos head_pos(int64_t row, int64_t L, int64_t H) {
  const int64_t b = row / (L * H), rem = row % (L * H);
  return {b, rem / H, rem % H};
}
int64_t hoff(const Heads& t, const Pos& p) { return p.b * t.sb + p.l * t.sl + p.h * t.sh; }

// Element indices of pair i.
inline int64_t first(int64_t i, int64_t half, bool inter) { return inter ? 2 * i : i; }
inline int64_t second(int64_t i, int64_t half, bool inter) { return inter ? 2 * i + 1 : i + half; }

// Rotate the pairs of v by the angles whose cos/sin are c, s (sign = -1: by minus the angle).
void rotate(float* v, const float* c, const float* s, int64_t half, bool inter, float sign) {
  for (int64_t i = 0; i < half; ++i) {
    const int64_t i0 = first(i, half, inter), i1 = second(i, half, inter);
    const float x0 = v[i0], x1 = v[i1], sn = sign * s[i];
    v[i0] = x0 * c[i] - x1 * sn;
    v[i1] = x0 * sn + x1 * c[i];
  }
}

float rms_rstd(const float* v, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += v[i] * v[i];
  return 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
}

}  // namespace

void rope_fwd_cpu(const RopeFwdArgs& a) {
  const int64_t rows = a.B * a.L * a.H, Dh = a.Dh, half = Dh / 2;
  if (rows == 0 || Dh == 0) return;
  const int64_t grain = std::max<int64_t>(1, 16384 / Dh);
  at::parallel_for(0, a.ntensor * rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> v(Dh), w(Dh);
    int loaded_w = -1;  // which tensor's weight is in w
    for (int64_t task = begin; task < end; ++task) {
      const int t = static_cast<int>(task / rows);
      const Pos p = head_pos(task % rows, a.L, a.H);
      cpu::load(a.in[t].ptr, a.in[t].dt, hoff(a.in[t], p), Dh, v.data());
      if (a.norm) {  // FLUX's rounding: normalize, round, times the rounded weight, round
        const DType odt = a.out[t].dt;
        const float rstd = rms_rstd(v.data(), Dh, a.eps);
        for (int64_t i = 0; i < Dh; ++i) v[i] *= rstd;
        cpu::round_to(odt, Dh, v.data());
        if (a.weight[t] != nullptr) {
          if (loaded_w != t) {
            cpu::load(a.weight[t], a.wdt[t], 0, Dh, w.data());
            cpu::round_to(odt, Dh, w.data());
            loaded_w = t;
          }
          for (int64_t i = 0; i < Dh; ++i) v[i] *= w[i];
          cpu::round_to(odt, Dh, v.data());
        }
      }
      if (a.cos != nullptr) {
        const int64_t cs = p.b * a.cb + p.l * a.cl;
        rotate(v.data(), a.cos + cs, a.sin + cs, half, a.interleaved, a.inverse ? -1.f : 1.f);
      }
      cpu::store(a.out[t].ptr, a.out[t].dt, hoff(a.out[t], p), Dh, v.data());
    }
  });
}

// Task (t, blk) handles rows [blk * chunk, (blk + 1) * chunk) of tensor t and owns partial[t][blk][:].
void rope_bwd_cpu(const RopeBwdArgs& a) {
  const int64_t rows = a.B * a.L * a.H, Dh = a.Dh, half = Dh / 2, nblk = a.nblk;
  if (rows == 0 || Dh == 0) return;
  const int64_t chunk = (rows + nblk - 1) / nblk;
  at::parallel_for(0, a.ntensor * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(Dh), g(Dh), w(Dh);
    for (int64_t task = begin; task < end; ++task) {
      const int t = static_cast<int>(task / nblk);
      const int64_t blk = task % nblk;
      const bool has_w = a.weight[t] != nullptr;
      float* acc = has_w ? a.partial + (t * nblk + blk) * Dh : nullptr;
      if (has_w) {
        std::fill(acc, acc + Dh, 0.f);
        cpu::load(a.weight[t], a.wdt[t], 0, Dh, w.data());
      }
      const int64_t r_end = std::min(rows, (blk + 1) * chunk);
      for (int64_t r = blk * chunk; r < r_end; ++r) {
        const Pos p = head_pos(r, a.L, a.H);
        cpu::load(a.x[t].ptr, a.x[t].dt, hoff(a.x[t], p), Dh, x.data());
        cpu::load(a.g[t].ptr, a.g[t].dt, hoff(a.g[t], p), Dh, g.data());
        if (a.cos != nullptr) {
          const int64_t cs = p.b * a.cb + p.l * a.cl;
          rotate(g.data(), a.cos + cs, a.sin + cs, half, a.interleaved, -1.f);
        }
        const float rstd = rms_rstd(x.data(), Dh, a.eps);
        float dot = 0.f;
        for (int64_t i = 0; i < Dh; ++i) {
          x[i] *= rstd;  // n
          if (has_w) {
            acc[i] += g[i] * x[i];
            g[i] *= w[i];  // dn
          }
          dot += g[i] * x[i];
        }
        const float m = dot / static_cast<float>(Dh);
        for (int64_t i = 0; i < Dh; ++i) g[i] = rstd * (g[i] - x[i] * m);
        cpu::store(a.dx[t].ptr, a.dx[t].dt, hoff(a.dx[t], p), Dh, g.data());
      }
    }
  });
}

}  // namespace ditfast
