// CPU implementation of the adaLN family (the same math as csrc/cuda/modulate.cu): fp32 row
// buffers, two-pass LayerNorm statistics, at::parallel_for over rows. Results do not depend on
// the number of threads (per-sample grads are summed per fixed row chunk, then over chunks).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "row_io.h"

namespace ditfast {

namespace {

struct Stats {
  float mean, rstd;
};

Stats layer_norm_stats(const float* v, int64_t D, float eps) {
  float s = 0.f;
  for (int64_t i = 0; i < D; ++i) s += v[i];
  const float mean = s / static_cast<float>(D);
  float s2 = 0.f;
  for (int64_t i = 0; i < D; ++i) {
    const float d = v[i] - mean;
    s2 += d * d;
  }
  return {mean, 1.f / std::sqrt(s2 / static_cast<float>(D) + eps)};
}

// xn = x (+ gate * y, rounded to x_new's dtype) for row (b, l); `tmp` has room for 2 * D floats.
void load_xn(const ModFwdArgs& a, int64_t b, int64_t l, float* xn, float* tmp) {
  const int64_t D = a.D;
  cpu::load(a.x.ptr, a.x.dt, cpu::roff(a.x, b, l), D, xn);
  if (a.gate.ptr != nullptr) {
    float* g = tmp;
    float* y = tmp + D;
    cpu::load(a.gate.ptr, a.gate.dt, cpu::roff(a.gate, b, l), D, g);
    cpu::load(a.y.ptr, a.y.dt, cpu::roff(a.y, b, l), D, y);
    for (int64_t i = 0; i < D; ++i) xn[i] += g[i] * y[i];
    cpu::round_to(a.xn_dt, D, xn);
  }
}

}  // namespace

void mod_fwd_cpu(const ModFwdArgs& a) {
  const int64_t rows = a.B * a.L, D = a.D;
  if (rows == 0 || D == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / D);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(4 * D);
    float *xn = buf.data(), *tmp = xn + D, *sc = tmp, *sh = tmp + D, *h = tmp + 2 * D;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / a.L, l = r % a.L;
      load_xn(a, b, l, xn, tmp);
      if (a.out_xn.ptr != nullptr) cpu::store(a.out_xn.ptr, a.out_xn.dt, cpu::roff(a.out_xn, b, l), D, xn);
      const Stats st = layer_norm_stats(xn, D, a.eps);
      cpu::load(a.scale.ptr, a.scale.dt, cpu::roff(a.scale, b, l), D, sc);
      if (a.shift.ptr != nullptr) {
        cpu::load(a.shift.ptr, a.shift.dt, cpu::roff(a.shift, b, l), D, sh);
      } else {
        std::fill(sh, sh + D, 0.f);
      }
      for (int64_t i = 0; i < D; ++i) h[i] = (xn[i] - st.mean) * st.rstd * (1.f + sc[i]) + sh[i];
      cpu::store(a.out_h.ptr, a.out_h.dt, cpu::roff(a.out_h, b, l), D, h);
    }
  });
}

// Task (b, blk) handles rows [blk * chunk, (blk + 1) * chunk) of batch element b and owns
// partial[k][b][blk][:] for the per-sample grads k (0 gate, 1 scale, 2 shift).
void mod_bwd_cpu(const ModBwdArgs& a) {
  const int64_t D = a.D, nblk = a.nblk;
  if (a.B * a.L == 0 || D == 0) return;
  const int64_t chunk = (a.L + nblk - 1) / nblk;
  const bool gated = a.gate.ptr != nullptr, has_gh = a.g_h.ptr != nullptr;
  const bool ps[3] = {gated && a.need_dgate && a.dgate_tok.ptr == nullptr,
                      has_gh && a.need_dscale && a.dscale_tok.ptr == nullptr,
                      has_gh && a.need_dshift && a.dshift_tok.ptr == nullptr};
  const bool tok_dgate = gated && a.dgate_tok.ptr != nullptr;
  ModFwdArgs fa;  // for load_xn
  fa.D = a.D;
  fa.x = a.x;
  fa.y = a.y;
  fa.gate = a.gate;
  fa.xn_dt = a.xn_dt;

  at::parallel_for(0, a.B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(9 * D);
    float *xn = buf.data(), *gh = xn + D, *tmp = gh + D, *d = tmp + 2 * D, *t0 = d + D, *t1 = t0 + D, *t2 = t1 + D,
          *t3 = t2 + D;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, blk = task % nblk;
      float* acc[3];
      for (int k = 0; k < 3; ++k) {
        acc[k] = ps[k] ? a.partial + ((k * a.B + b) * nblk + blk) * D : nullptr;
        if (acc[k] != nullptr) std::fill(acc[k], acc[k] + D, 0.f);
      }
      const int64_t l_end = std::min(a.L, (blk + 1) * chunk);
      for (int64_t l = blk * chunk; l < l_end; ++l) {
        load_xn(fa, b, l, xn, tmp);
        const Stats st = layer_norm_stats(xn, D, a.eps);
        for (int64_t i = 0; i < D; ++i) xn[i] = (xn[i] - st.mean) * st.rstd;  // xhat
        float m1 = 0.f, m2 = 0.f;
        if (has_gh) {
          cpu::load(a.g_h.ptr, a.g_h.dt, cpu::roff(a.g_h, b, l), D, gh);
          cpu::load(a.scale.ptr, a.scale.dt, cpu::roff(a.scale, b, l), D, t0);
          float s_g = 0.f, s_gx = 0.f;
          for (int64_t i = 0; i < D; ++i) {
            t1[i] = gh[i] * xn[i];  // dscale element
            if (ps[1]) acc[1][i] += t1[i];
            if (ps[2]) acc[2][i] += gh[i];
          }
          if (a.dscale_tok.ptr != nullptr) cpu::store(a.dscale_tok.ptr, a.dscale_tok.dt, cpu::roff(a.dscale_tok, b, l), D, t1);
          if (a.dshift_tok.ptr != nullptr) cpu::store(a.dshift_tok.ptr, a.dshift_tok.dt, cpu::roff(a.dshift_tok, b, l), D, gh);
          for (int64_t i = 0; i < D; ++i) {
            gh[i] *= 1.f + t0[i];  // gs
            s_g += gh[i];
            s_gx += gh[i] * xn[i];
          }
          m1 = s_g / static_cast<float>(D);
          m2 = s_gx / static_cast<float>(D);
        }
        for (int64_t i = 0; i < D; ++i) d[i] = has_gh ? st.rstd * (gh[i] - m1 - xn[i] * m2) : 0.f;
        if (a.g_xn.ptr != nullptr) {
          cpu::load(a.g_xn.ptr, a.g_xn.dt, cpu::roff(a.g_xn, b, l), D, t2);
          for (int64_t i = 0; i < D; ++i) d[i] += t2[i];
        }
        cpu::store(a.dx.ptr, a.dx.dt, cpu::roff(a.dx, b, l), D, d);
        if (gated) {
          cpu::load(a.gate.ptr, a.gate.dt, cpu::roff(a.gate, b, l), D, t2);
          for (int64_t i = 0; i < D; ++i) t3[i] = t2[i] * d[i];
          cpu::store(a.dy.ptr, a.dy.dt, cpu::roff(a.dy, b, l), D, t3);
          if (ps[0] || tok_dgate) {
            cpu::load(a.y.ptr, a.y.dt, cpu::roff(a.y, b, l), D, t2);
            for (int64_t i = 0; i < D; ++i) t3[i] = t2[i] * d[i];
            if (ps[0]) {
              for (int64_t i = 0; i < D; ++i) acc[0][i] += t3[i];
            } else {
              cpu::store(a.dgate_tok.ptr, a.dgate_tok.dt, cpu::roff(a.dgate_tok, b, l), D, t3);
            }
          }
        }
      }
    }
  });
}

}  // namespace ditfast
