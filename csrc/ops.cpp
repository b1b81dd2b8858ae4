// Torch-facing glue: argument checks (errors name the argument: TORCH_CHECK_TYPE raises a Python
// TypeError, TORCH_CHECK_VALUE a ValueError), output allocation, and the call into the CPU loops
// or the CUDA launchers. Only the glue sees ATen; the kernels see the plain structs of kernels.h.
//
// Strides: x/y/q/k/grads may have any strides on every dim but the last; a last dim with a stride
// other than 1 is the one case that is copied (unit_last). Modulations may be (B, D) or (B, L, D),
// including chunk views (row stride != D) and stride-0 expanded batches. Size-1 dims get stride 0.
#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"

#ifdef DITFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ditfast {

namespace {

constexpr int64_t kCpuRowsPerChunk = 64;    // rows per partial-sum chunk (CPU modulate backward)
constexpr int64_t kCpuHeadsPerChunk = 256;  // heads per partial-sum chunk (CPU rope backward)

DType dtype_code(at::ScalarType st, const char* name) {
  switch (st) {
    case at::kFloat:
      return DType::F32;
    case at::kBFloat16:
      return DType::BF16;
    case at::kHalf:
      return DType::F16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", st);
  }
  return DType::F32;  // unreachable
}

DType dtype_code(const Tensor& t, const char* name) { return dtype_code(t.scalar_type(), name); }

Tensor unit_last(const Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

int64_t stride_or_0(const Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

void check_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

at::ScalarType promote(std::initializer_list<const Tensor*> ts) {
  at::ScalarType out = at::ScalarType::Undefined;
  for (const Tensor* t : ts) {
    if (t == nullptr || !t->defined()) continue;
    out = out == at::ScalarType::Undefined ? t->scalar_type() : c10::promoteTypes(out, t->scalar_type());
  }
  return out;
}

// ---- modulate family ----------------------------------------------------------------------------

// The sizes of a (B, L, D) row tensor into ModFwdArgs / ModBwdArgs.
template <class Args>
void set_rows_shape(Args& a, const Tensor& x, double eps) {
  a.B = x.size(0);
  a.L = x.size(1);
  a.D = static_cast<int32_t>(x.size(2));
  a.eps = static_cast<float>(eps);
}

void check_x(const Tensor& x, const char* name) {
  dtype_code(x, name);
  TORCH_CHECK_VALUE(x.dim() == 3, name, " must be (B, L, D) (3 dims), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) <= std::numeric_limits<int32_t>::max(), name, ": D too large");
}

void check_same(const Tensor& t, const char* name, const Tensor& x, const char* x_name) {
  dtype_code(t, name);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have the shape of ", x_name, " ", x.sizes(), ", got ",
                    t.sizes());
  check_device(t, name, x, x_name);
}

// A modulation for x (B, L, D): (B, D) / (1, D) per sample or (B, L, D) / (1, L, D) per token. A batch
// of 1 broadcasts over B (read with batch stride 0) and its grad sums over the batch in fp32, so
// it is rounded once (an expanded stride-0 (B, D) view would get per-sample grads that autograd's
// expand backward sums again in the low precision).
void check_mod(const Tensor& t, const char* name, const Tensor& x) {
  dtype_code(t, name);
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const bool batch_ok = t.dim() >= 1 && (t.size(0) == B || t.size(0) == 1);
  const bool ok = batch_ok && ((t.dim() == 2 && t.size(1) == D) || (t.dim() == 3 && t.size(1) == L && t.size(2) == D));
  TORCH_CHECK_VALUE(ok, name, " must be (B, D) = (", B, ", ", D, ") or (B, L, D) = ", x.sizes(),
                    " (or with a batch of 1), got ", t.sizes());
  check_device(t, name, x, "x");
}

Rows rows_of(const Tensor& t, const char* name) {  // (B, L, D) or (B, D)
  Rows r;
  r.ptr = t.data_ptr();
  r.dt = dtype_code(t, name);
  r.sb = stride_or_0(t, 0);
  r.sl = t.dim() == 3 ? stride_or_0(t, 1) : 0;
  return r;
}

bool per_token(const Tensor& t) { return t.dim() == 3; }

void run(const ModFwdArgs& a, const Tensor& x) {
  if (x.is_cuda()) {
#ifdef DITFAST_WITH_CUDA
    TORCH_CHECK_VALUE(a.D <= kMaxRowCuda, "ditfast._C CUDA kernels support D <= ", kMaxRowCuda, ", got D = ", a.D);
    c10::cuda::CUDAGuard guard(x.device());
    const char* err = mod_fwd_cuda(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == nullptr, "ditfast._C modulate forward kernel failed: ", err);
#else
    TORCH_CHECK(false, "ditfast._C was built without CUDA kernels");
#endif
  } else {
    mod_fwd_cpu(a);
  }
}

int32_t mod_nblk(const Tensor& x) {
  const int64_t B = x.size(0), L = x.size(1);
#ifdef DITFAST_WITH_CUDA
  if (x.is_cuda()) return mod_bwd_cuda_nblk(B, L, static_cast<int32_t>(x.size(2)), x.device().index());
#endif
  (void)B;
  return static_cast<int32_t>(std::max<int64_t>(1, (L + kCpuRowsPerChunk - 1) / kCpuRowsPerChunk));
}

void run(const ModBwdArgs& a, const Tensor& x) {
  if (x.is_cuda()) {
#ifdef DITFAST_WITH_CUDA
    TORCH_CHECK_VALUE(a.D <= kMaxRowCuda, "ditfast._C CUDA kernels support D <= ", kMaxRowCuda, ", got D = ", a.D);
    c10::cuda::CUDAGuard guard(x.device());
    const char* err = mod_bwd_cuda(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == nullptr, "ditfast._C modulate backward kernel failed: ", err);
#else
    TORCH_CHECK(false, "ditfast._C was built without CUDA kernels");
#endif
  } else {
    mod_bwd_cpu(a);
  }
}

// Shared backward of both modulate ops (gate undefined: norm_modulate).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mod_backward(const Tensor& g_xn_in, const Tensor& g_h_in,
                                                                const Tensor& x_in, const Tensor& y_in,
                                                                const Tensor& gate_in, const OptTensor& shift_in,
                                                                const Tensor& scale_in, double eps) {
  const bool gated = gate_in.defined();
  const Tensor x = unit_last(x_in), scale = unit_last(scale_in);
  const Tensor y = gated ? unit_last(y_in) : Tensor(), gate = gated ? unit_last(gate_in) : Tensor();
  const Tensor shift = shift_in.has_value() ? unit_last(*shift_in) : Tensor();
  const Tensor g_xn = g_xn_in.defined() ? unit_last(g_xn_in) : Tensor();
  const Tensor g_h = g_h_in.defined() ? unit_last(g_h_in) : Tensor();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);

  ModBwdArgs a;
  set_rows_shape(a, x, eps);
  a.x = rows_of(x, "x");
  a.scale = rows_of(scale, "scale");
  if (shift.defined()) a.shift = rows_of(shift, "shift");
  if (gated) {
    a.y = rows_of(y, "y");
    a.gate = rows_of(gate, "gate");
    a.xn_dt = dtype_code(promote({&x, &y, &gate}), "x_new");
  }
  if (g_xn.defined()) a.g_xn = rows_of(g_xn, "grad_x_new");
  if (g_h.defined()) a.g_h = rows_of(g_h, "grad_h");

  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dy = gated ? at::empty(y.sizes(), y.options()) : Tensor();
  a.dx = rows_of(dx, "dx");
  if (gated) a.dy = rows_of(dy, "dy");

  // Grads of the modulations: per token -> written by the kernel (into an fp32 (B, L, D) buffer
  // summed over the batch when the modulation has a batch of 1); per sample -> partial sums;
  // without grad_h the scale/shift grads are zero.
  const bool has_gh = g_h.defined();
  a.need_dgate = gated;
  a.need_dscale = has_gh;
  a.need_dshift = has_gh && shift.defined();
  Tensor tok[3];  // kernel outputs of the per-token grads (gate, scale, shift)
  auto tok_target = [&](const Tensor& m, int k, Rows& rows, const char* name) {
    tok[k] = m.size(0) == B ? at::empty(m.sizes(), m.options()) : at::empty({B, L, D}, m.options().dtype(at::kFloat));
    rows = rows_of(tok[k], name);
  };
  if (gated && per_token(gate)) tok_target(gate, 0, a.dgate_tok, "dgate");
  if (has_gh && per_token(scale)) tok_target(scale, 1, a.dscale_tok, "dscale");
  if (a.need_dshift && per_token(shift)) tok_target(shift, 2, a.dshift_tok, "dshift");
  const bool ps_gate = gated && !per_token(gate), ps_scale = has_gh && !per_token(scale),
             ps_shift = a.need_dshift && !per_token(shift);
  a.nblk = mod_nblk(x);  // the grid (CUDA) / the row chunks (CPU), also without partial sums
  Tensor partial;
  if (ps_gate || ps_scale || ps_shift) {
    partial = at::empty({3, B, a.nblk, D}, x.options().dtype(at::kFloat));
    a.partial = partial.data_ptr<float>();
  }
  run(a, x);

  // The grad of modulation m (slot k), in m's shape and dtype, rounded once.
  auto finish = [&](const Tensor& m, int k, bool per_sample) -> Tensor {
    if (per_sample) {
      const Tensor p = partial.select(0, k);  // (B, nblk, D) fp32
      return (m.size(0) == B ? p.sum(1) : p.sum(at::IntArrayRef{0, 1}).unsqueeze(0)).to(m.scalar_type());
    }
    return m.size(0) == B ? tok[k] : tok[k].sum(0, /*keepdim=*/true).to(m.scalar_type());
  };
  Tensor dgate, dscale, dshift;
  if (gated) dgate = finish(gate, 0, ps_gate);
  if (has_gh) {
    dscale = finish(scale, 1, ps_scale);
    if (shift.defined()) dshift = finish(shift, 2, ps_shift);
  } else {
    dscale = at::zeros(scale.sizes(), scale.options());
    if (shift.defined()) dshift = at::zeros(shift.sizes(), shift.options());
  }
  if (!shift.defined()) dshift = at::empty({0}, scale.options());
  return {dx, dy, dgate, dscale, dshift};
}

// ---- rope family ---------------------------------------------------------------------------------

void check_heads(const Tensor& t, const char* name) {
  dtype_code(t, name);
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be (B, L, H, Dh) (4 dims), got shape ", t.sizes());
}

Heads heads_of(const Tensor& t, const char* name) {
  Heads h;
  h.ptr = t.data_ptr();
  h.dt = dtype_code(t, name);
  h.sb = stride_or_0(t, 0);
  h.sl = stride_or_0(t, 1);
  h.sh = stride_or_0(t, 2);
  return h;
}

Tensor weight_of(const OptTensor& w, const char* name, const Tensor& ref) {
  if (!w.has_value() || !w->defined()) return Tensor();
  dtype_code(*w, name);
  TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == ref.size(3), name, " must have shape (", ref.size(3),
                    ",) (the head dim), got ", w->sizes());
  check_device(*w, name, ref, "q");
  return w->contiguous();  // a (Dh,) parameter: contiguous already, this is no copy
}

// The sizes of a (B, L, H, Dh) head tensor into RopeFwdArgs / RopeBwdArgs.
template <class Args>
void set_heads_shape(Args& a, const Tensor& x, int32_t ntensor, double eps) {
  a.B = x.size(0);
  a.L = x.size(1);
  a.H = x.size(2);
  a.Dh = static_cast<int32_t>(x.size(3));
  a.ntensor = ntensor;
  a.eps = static_cast<float>(eps);
}

// The optional RMSNorm weights of q (slot 0) and k (slot 1).
template <class Args>
void set_weights(Args& a, const Tensor& qw, const Tensor& kw) {
  if (qw.defined()) {
    a.weight[0] = qw.data_ptr();
    a.wdt[0] = dtype_code(qw, "q_weight");
  }
  if (kw.defined()) {
    a.weight[1] = kw.data_ptr();
    a.wdt[1] = dtype_code(kw, "k_weight");
  }
}

// cos/sin tables: fp32 (L, Dh/2) or (B, L, Dh/2). Both are read with one pair of strides.
struct Tables {
  Tensor cos, sin;
  int64_t cb = 0, cl = 0;
};

Tables tables_of(const OptTensor& cos_in, const OptTensor& sin_in, const Tensor& x) {
  const bool has_cos = cos_in.has_value() && cos_in->defined(), has_sin = sin_in.has_value() && sin_in->defined();
  TORCH_CHECK_VALUE(has_cos == has_sin, "cos and sin must both be given or both be None");
  Tables tb;
  if (!has_cos) return tb;
  const int64_t B = x.size(0), L = x.size(1), half = x.size(3) / 2;
  const std::pair<const char*, const Tensor*> items[] = {{"cos", &*cos_in}, {"sin", &*sin_in}};
  for (const auto& [name, t] : items) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must be float32 (as rope_freqs returns), got ",
                     t->scalar_type());
    const bool ok = (t->dim() == 2 && t->size(0) == L && t->size(1) == half) ||
                    (t->dim() == 3 && t->size(0) == B && t->size(1) == L && t->size(2) == half);
    TORCH_CHECK_VALUE(ok, name, " must have shape (L, Dh/2) = (", L, ", ", half, ") or (B, L, Dh/2) = (", B, ", ",
                      L, ", ", half, "), got ", t->sizes());
    check_device(*t, name, x, "the input");
  }
  tb.cos = unit_last(*cos_in);
  tb.sin = unit_last(*sin_in);
  auto strides = [](const Tensor& t) {
    return std::pair<int64_t, int64_t>{t.dim() == 3 ? stride_or_0(t, 0) : 0, stride_or_0(t, t.dim() - 2)};
  };
  if (strides(tb.cos) != strides(tb.sin)) {  // rare: give both one layout
    tb.cos = tb.cos.expand({B, L, half}).contiguous();
    tb.sin = tb.sin.expand({B, L, half}).contiguous();
  }
  std::tie(tb.cb, tb.cl) = strides(tb.cos);
  return tb;
}

void run(const RopeFwdArgs& a, const Tensor& x) {
  if (x.is_cuda()) {
#ifdef DITFAST_WITH_CUDA
    TORCH_CHECK_VALUE(a.Dh <= kMaxHeadDimCuda, "ditfast._C CUDA kernels support Dh <= ", kMaxHeadDimCuda,
                      ", got Dh = ", a.Dh);
    c10::cuda::CUDAGuard guard(x.device());
    const char* err = rope_fwd_cuda(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == nullptr, "ditfast._C rope forward kernel failed: ", err);
#else
    TORCH_CHECK(false, "ditfast._C was built without CUDA kernels");
#endif
  } else {
    rope_fwd_cpu(a);
  }
}

void run(const RopeBwdArgs& a, const Tensor& x) {
  if (x.is_cuda()) {
#ifdef DITFAST_WITH_CUDA
    TORCH_CHECK_VALUE(a.Dh <= kMaxHeadDimCuda, "ditfast._C CUDA kernels support Dh <= ", kMaxHeadDimCuda,
                      ", got Dh = ", a.Dh);
    c10::cuda::CUDAGuard guard(x.device());
    const char* err = rope_bwd_cuda(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == nullptr, "ditfast._C rope backward kernel failed: ", err);
#else
    TORCH_CHECK(false, "ditfast._C was built without CUDA kernels");
#endif
  } else {
    rope_bwd_cpu(a);
  }
}

void set_tables(const Tables& tb, const float*& cos, const float*& sin, int64_t& cb, int64_t& cl) {
  if (!tb.cos.defined()) return;
  cos = tb.cos.data_ptr<float>();
  sin = tb.sin.data_ptr<float>();
  cb = tb.cb;
  cl = tb.cl;
}

// RMSNorm + RoPE backward of one (q, k) pair from grads gq, gk (unit last stride): the norm
// backward when a weight is given, else the inverse rotation (or a copy without tables).
// -> (dq, dk, dq_weight, dk_weight), weight grads empty without weights.
std::tuple<Tensor, Tensor, Tensor, Tensor> qk_backward(const Tensor& q, const Tensor& k, const Tensor& gq,
                                                       const Tensor& gk, const Tensor& qw, const Tensor& kw,
                                                       const Tables& tb, double eps, bool interleaved) {
  Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  if (!qw.defined() && !kw.defined()) {
    // No norm: the forward was RoPE only (or a copy), so the backward rotates the grads back.
    RopeFwdArgs r;
    set_heads_shape(r, q, 2, 0.0);
    r.in[0] = heads_of(gq, "grad_q");
    r.in[1] = heads_of(gk, "grad_k");
    r.out[0] = heads_of(dq, "dq");
    r.out[1] = heads_of(dk, "dk");
    set_tables(tb, r.cos, r.sin, r.cb, r.cl);
    r.norm = false;
    r.interleaved = interleaved;
    r.inverse = true;
    run(r, q);
    return {dq, dk, at::empty({0}, q.options()), at::empty({0}, k.options())};
  }
  RopeBwdArgs a;
  set_heads_shape(a, q, 2, eps);
  a.x[0] = heads_of(q, "q");
  a.x[1] = heads_of(k, "k");
  a.g[0] = heads_of(gq, "grad_q");
  a.g[1] = heads_of(gk, "grad_k");
  a.dx[0] = heads_of(dq, "dq");
  a.dx[1] = heads_of(dk, "dk");
  set_weights(a, qw, kw);
  set_tables(tb, a.cos, a.sin, a.cb, a.cl);
  a.interleaved = interleaved;
  const int64_t rows = a.B * a.L * a.H;
  // blocks per tensor (CUDA) / row chunks (CPU); also the work split when there is no weight
#ifdef DITFAST_WITH_CUDA
  if (q.is_cuda()) a.nblk = rope_bwd_cuda_nblk(rows, a.Dh, q.device().index());
#endif
  if (!q.is_cuda())
    a.nblk = static_cast<int32_t>(std::max<int64_t>(1, (rows + kCpuHeadsPerChunk - 1) / kCpuHeadsPerChunk));
  Tensor partial;
  if (qw.defined() || kw.defined()) {  // zeros for no rows: the kernels then write nothing
    const auto f32 = q.options().dtype(at::kFloat);
    partial = rows == 0 ? at::zeros({2, a.nblk, a.Dh}, f32) : at::empty({2, a.nblk, a.Dh}, f32);
    a.partial = partial.data_ptr<float>();
  }
  run(a, q);
  Tensor dqw = qw.defined() ? partial.select(0, 0).sum(0).to(qw.scalar_type()) : at::empty({0}, q.options());
  Tensor dkw = kw.defined() ? partial.select(0, 1).sum(0).to(kw.scalar_type()) : at::empty({0}, k.options());
  return {dq, dk, dqw, dkw};
}


// ---- prepare_attention ---------------------------------------------------------------------------

// A stream's weight as the ops pass it: an empty tensor means "no norm for this stream".
Tensor stream_weight(const Tensor& w, const std::string& name, const Tensor& ref) {
  if (!w.defined() || w.numel() == 0) return Tensor();
  return weight_of(w, name.c_str(), ref);
}

std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// Checks the per-stream lists; returns L_total. Every q, k, v is (B, L_i, H, Dh) with the B, H, Dh
// and the dtype and device of qs[0]; a stream's two weights are both given or both empty.
int64_t check_streams(at::TensorList qs, at::TensorList ks, const at::TensorList* vs, at::TensorList q_weights,
                      at::TensorList k_weights) {
  const size_t n = qs.size();
  TORCH_CHECK_VALUE(n > 0, "qs must hold at least one stream");
  TORCH_CHECK_VALUE(ks.size() == n && (vs == nullptr || vs->size() == n), "qs, ks and vs must have the same number "
                    "of streams, got ", n, ", ", ks.size(), vs == nullptr ? "" : ", ", vs == nullptr ? 0 : vs->size());
  TORCH_CHECK_VALUE(q_weights.size() == n && k_weights.size() == n, "q_weights and k_weights must have one entry "
                    "per stream (", n, "), got ", q_weights.size(), " and ", k_weights.size());
  const Tensor& q0 = qs[0];
  check_heads(q0, "qs[0]");
  int64_t L_total = 0;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& q = qs[i];
    const std::string qn = item("qs", i);
    check_heads(q, qn.c_str());
    TORCH_CHECK_VALUE(q.size(0) == q0.size(0) && q.size(2) == q0.size(2) && q.size(3) == q0.size(3), qn,
                      " must have shape (B, L_i, H, Dh) with the B, H, Dh of qs[0] ", q0.sizes(), ", got ", q.sizes());
    std::vector<std::pair<std::string, const Tensor*>> others = {{item("ks", i), &ks[i]}};
    if (vs != nullptr) others.emplace_back(item("vs", i), &(*vs)[i]);
    for (const auto& [name, t] : others) check_same(*t, name.c_str(), q, qn.c_str());
    others.emplace_back(qn, &q);
    for (const auto& [name, t] : others) {
      TORCH_CHECK_TYPE(t->scalar_type() == q0.scalar_type(), name, " is ", t->scalar_type(), " but qs[0] is ",
                       q0.scalar_type(), "; every q, k, v must have one dtype");
      check_device(*t, name.c_str(), q0, "qs[0]");
    }
    const bool has_q = q_weights[i].defined() && q_weights[i].numel() > 0;
    const bool has_k = k_weights[i].defined() && k_weights[i].numel() > 0;
    TORCH_CHECK_VALUE(has_q == has_k, "stream ", i, ": q_weights[", i, "] and k_weights[", i,
                      "] must both be given (norm) or both be empty (no norm)");
    L_total += q.size(1);
  }
  return L_total;
}

// The rows [off, off + L) of a joint-sequence table (None stays None).
OptTensor table_rows(const OptTensor& t, int64_t off, int64_t L) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->narrow(-2, off, L);
}

// Validates the joint tables once against a (B, L_total, H, Dh) stand-in.
void check_joint_tables(const OptTensor& cos, const OptTensor& sin, const Tensor& q0, int64_t L_total) {
  const bool rope = cos.has_value() && cos->defined();
  if (rope) TORCH_CHECK_VALUE(q0.size(3) % 2 == 0, "rope needs an even head dim, got Dh = ", q0.size(3));
  const Tensor shape_only =  // one element seen as (B, L_total, H, Dh): tables_of reads sizes and device only
      at::empty({1}, q0.options()).as_strided({q0.size(0), L_total, q0.size(2), q0.size(3)}, {0, 0, 0, 0});
  tables_of(cos, sin, shape_only);
}
}  // namespace

// ---- the operators -------------------------------------------------------------------------------

Tensor norm_modulate_c(const Tensor& x_in, const OptTensor& shift_in, const Tensor& scale_in, double eps) {
  check_x(x_in, "x");
  check_mod(scale_in, "scale", x_in);
  if (shift_in.has_value()) check_mod(*shift_in, "shift", x_in);
  const Tensor x = unit_last(x_in), scale = unit_last(scale_in);
  const Tensor shift = shift_in.has_value() ? unit_last(*shift_in) : Tensor();
  Tensor h = at::empty(x.sizes(), x.options().dtype(promote({&x, &shift, &scale})));
  ModFwdArgs a;
  set_rows_shape(a, x, eps);
  a.x = rows_of(x, "x");
  a.scale = rows_of(scale, "scale");
  if (shift.defined()) a.shift = rows_of(shift, "shift");
  a.out_h = rows_of(h, "out");
  run(a, x);
  return h;
}

std::tuple<Tensor, Tensor, Tensor> norm_modulate_c_backward(const Tensor& grad_out, const Tensor& x,
                                                            const OptTensor& shift, const Tensor& scale, double eps) {
  check_x(x, "x");
  check_same(grad_out, "grad_out", x, "x");
  check_mod(scale, "scale", x);
  if (shift.has_value()) check_mod(*shift, "shift", x);
  auto r = mod_backward(Tensor(), grad_out, x, Tensor(), Tensor(), shift, scale, eps);
  return {std::get<0>(r), std::get<3>(r), std::get<4>(r)};
}

std::tuple<Tensor, Tensor> gated_residual_norm_modulate_c(const Tensor& x_in, const Tensor& y_in,
                                                          const Tensor& gate_in, const OptTensor& shift_in,
                                                          const Tensor& scale_in, double eps) {
  check_x(x_in, "x");
  check_same(y_in, "y", x_in, "x");
  check_mod(gate_in, "gate", x_in);
  check_mod(scale_in, "scale", x_in);
  if (shift_in.has_value()) check_mod(*shift_in, "shift", x_in);
  const Tensor x = unit_last(x_in), y = unit_last(y_in), gate = unit_last(gate_in), scale = unit_last(scale_in);
  const Tensor shift = shift_in.has_value() ? unit_last(*shift_in) : Tensor();
  const at::ScalarType xn_dtype = promote({&x, &y, &gate});
  Tensor x_new = at::empty(x.sizes(), x.options().dtype(xn_dtype));
  Tensor h = at::empty(x.sizes(), x.options().dtype(promote({&x_new, &shift, &scale})));
  ModFwdArgs a;
  set_rows_shape(a, x, eps);
  a.x = rows_of(x, "x");
  a.y = rows_of(y, "y");
  a.gate = rows_of(gate, "gate");
  a.scale = rows_of(scale, "scale");
  if (shift.defined()) a.shift = rows_of(shift, "shift");
  a.out_xn = rows_of(x_new, "x_new");
  a.xn_dt = a.out_xn.dt;
  a.out_h = rows_of(h, "h");
  run(a, x);
  return {x_new, h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_norm_modulate_c_backward(
    const OptTensor& grad_x_new, const OptTensor& grad_h, const Tensor& x, const Tensor& y, const Tensor& gate,
    const OptTensor& shift, const Tensor& scale, double eps) {
  check_x(x, "x");
  check_same(y, "y", x, "x");
  check_mod(gate, "gate", x);
  check_mod(scale, "scale", x);
  if (shift.has_value()) check_mod(*shift, "shift", x);
  const Tensor gxn = grad_x_new.has_value() ? *grad_x_new : Tensor();
  const Tensor gh = grad_h.has_value() ? *grad_h : Tensor();
  if (gxn.defined()) check_same(gxn, "grad_x_new", x, "x");
  if (gh.defined()) check_same(gh, "grad_h", x, "x");
  return mod_backward(gxn, gh, x, y, gate, shift, scale, eps);
}

Tensor apply_rope_c(const Tensor& x_in, const Tensor& cos, const Tensor& sin, bool interleaved, bool inverse) {
  check_heads(x_in, "x");
  TORCH_CHECK_VALUE(x_in.size(3) % 2 == 0, "RoPE needs an even head dim, got Dh = ", x_in.size(3));
  const Tables tb = tables_of(cos, sin, x_in);
  const Tensor x = unit_last(x_in);
  Tensor out = at::empty(x.sizes(), x.options());
  RopeFwdArgs a;
  set_heads_shape(a, x, 1, 0.0);
  a.in[0] = heads_of(x, "x");
  a.out[0] = heads_of(out, "out");
  set_tables(tb, a.cos, a.sin, a.cb, a.cl);
  a.norm = false;
  a.interleaved = interleaved;
  a.inverse = inverse;
  run(a, x);
  return out;
}

std::tuple<Tensor, Tensor> qk_norm_rope_c(const Tensor& q_in, const Tensor& k_in, const OptTensor& q_weight,
                                          const OptTensor& k_weight, const OptTensor& cos, const OptTensor& sin,
                                          double eps, bool interleaved) {
  check_heads(q_in, "q");
  check_same(k_in, "k", q_in, "q");
  TORCH_CHECK_VALUE(q_in.size(3) % 2 == 0, "q and k need an even head dim, got Dh = ", q_in.size(3));
  const Tensor qw = weight_of(q_weight, "q_weight", q_in), kw = weight_of(k_weight, "k_weight", q_in);
  const Tables tb = tables_of(cos, sin, q_in);
  const Tensor q = unit_last(q_in), k = unit_last(k_in);
  Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  RopeFwdArgs a;
  set_heads_shape(a, q, 2, eps);
  a.in[0] = heads_of(q, "q");
  a.in[1] = heads_of(k, "k");
  a.out[0] = heads_of(q_out, "q_out");
  a.out[1] = heads_of(k_out, "k_out");
  set_weights(a, qw, kw);
  set_tables(tb, a.cos, a.sin, a.cb, a.cl);
  a.norm = qw.defined() || kw.defined();  // both weights None: RoPE only (docs/design.md, section 3)
  a.interleaved = interleaved;
  run(a, q);
  return {q_out, k_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_norm_rope_c_backward(const OptTensor& grad_q, const OptTensor& grad_k,
                                                                   const Tensor& q_in, const Tensor& k_in,
                                                                   const OptTensor& q_weight, const OptTensor& k_weight,
                                                                   const OptTensor& cos, const OptTensor& sin,
                                                                   double eps, bool interleaved) {
  check_heads(q_in, "q");
  check_same(k_in, "k", q_in, "q");
  TORCH_CHECK_VALUE(q_in.size(3) % 2 == 0, "q and k need an even head dim, got Dh = ", q_in.size(3));
  const Tensor qw = weight_of(q_weight, "q_weight", q_in), kw = weight_of(k_weight, "k_weight", q_in);
  const Tables tb = tables_of(cos, sin, q_in);
  const Tensor q = unit_last(q_in), k = unit_last(k_in);
  Tensor gq, gk;
  if (grad_q.has_value() && grad_q->defined()) {
    check_same(*grad_q, "grad_q", q, "q");
    gq = unit_last(*grad_q);
  } else {
    gq = at::zeros(q.sizes(), q.options());
  }
  if (grad_k.has_value() && grad_k->defined()) {
    check_same(*grad_k, "grad_k", k, "k");
    gk = unit_last(*grad_k);
  } else {
    gk = at::zeros(k.sizes(), k.options());
  }
  return qk_backward(q, k, gq, gk, qw, kw, tb, eps, interleaved);
}

std::tuple<Tensor, Tensor, Tensor> prepare_attention_c(at::TensorList qs, at::TensorList ks, at::TensorList vs,
                                                       at::TensorList q_weights, at::TensorList k_weights,
                                                       const OptTensor& cos, const OptTensor& sin, double eps,
                                                       bool interleaved) {
  const int64_t L_total = check_streams(qs, ks, &vs, q_weights, k_weights);
  const Tensor& q0 = qs[0];
  check_joint_tables(cos, sin, q0, L_total);
  const int64_t B = q0.size(0), H = q0.size(2), Dh = q0.size(3);
  Tensor q_out = at::empty({B, L_total, H, Dh}, q0.options());
  Tensor k_out = at::empty({B, L_total, H, Dh}, q0.options());
  Tensor v_out = at::empty({B, L_total, H, Dh}, q0.options());
  int64_t off = 0;
  for (size_t i = 0; i < qs.size(); ++i) {
    const int64_t L = qs[i].size(1);
    v_out.narrow(1, off, L).copy_(vs[i]);  // v: a strided copy into the joint buffer
    const Tensor q = unit_last(qs[i]), k = unit_last(ks[i]);
    const Tensor qw = stream_weight(q_weights[i], item("q_weights", i), q);
    const Tensor kw = stream_weight(k_weights[i], item("k_weights", i), q);
    const Tables tb = tables_of(table_rows(cos, off, L), table_rows(sin, off, L), q);
    const Tensor qo = q_out.narrow(1, off, L), ko = k_out.narrow(1, off, L);  // views into the joint buffers
    RopeFwdArgs a;
    set_heads_shape(a, q, 2, eps);
    a.in[0] = heads_of(q, "q");
    a.in[1] = heads_of(k, "k");
    a.out[0] = heads_of(qo, "q_out");
    a.out[1] = heads_of(ko, "k_out");
    set_weights(a, qw, kw);
    set_tables(tb, a.cos, a.sin, a.cb, a.cl);
    a.norm = qw.defined();
    a.interleaved = interleaved;
    run(a, q);
    off += L;
  }
  return {q_out, k_out, v_out};
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
prepare_attention_c_backward(const OptTensor& grad_q, const OptTensor& grad_k, at::TensorList qs, at::TensorList ks,
                             at::TensorList q_weights, at::TensorList k_weights, const OptTensor& cos,
                             const OptTensor& sin, double eps, bool interleaved) {
  const int64_t L_total = check_streams(qs, ks, nullptr, q_weights, k_weights);
  const Tensor& q0 = qs[0];
  check_joint_tables(cos, sin, q0, L_total);
  const int64_t B = q0.size(0), H = q0.size(2), Dh = q0.size(3);
  auto grad = [&](const OptTensor& g, const char* name) {
    if (!g.has_value() || !g->defined()) return at::zeros({B, L_total, H, Dh}, q0.options());
    dtype_code(*g, name);
    TORCH_CHECK_VALUE(g->dim() == 4 && g->size(0) == B && g->size(1) == L_total && g->size(2) == H &&
                          g->size(3) == Dh,
                      name, " must have the joint shape (", B, ", ", L_total, ", ", H, ", ", Dh, "), got ", g->sizes());
    check_device(*g, name, q0, "qs[0]");
    return *g;
  };
  const Tensor gq_all = grad(grad_q, "grad_q"), gk_all = grad(grad_k, "grad_k");
  std::vector<Tensor> dqs, dks, dqws, dkws;
  int64_t off = 0;
  for (size_t i = 0; i < qs.size(); ++i) {
    const int64_t L = qs[i].size(1);
    const Tensor q = unit_last(qs[i]), k = unit_last(ks[i]);
    const Tensor qw = stream_weight(q_weights[i], item("q_weights", i), q);
    const Tensor kw = stream_weight(k_weights[i], item("k_weights", i), q);
    const Tables tb = tables_of(table_rows(cos, off, L), table_rows(sin, off, L), q);
    const Tensor gq = unit_last(gq_all.narrow(1, off, L)), gk = unit_last(gk_all.narrow(1, off, L));
    auto [dq, dk, dqw, dkw] = qk_backward(q, k, gq, gk, qw, kw, tb, eps, interleaved);
    dqs.push_back(dq);
    dks.push_back(dk);
    dqws.push_back(dqw);
    dkws.push_back(dkw);
    off += L;
  }
  return {dqs, dks, dqws, dkws};
}

}  // namespace ditfast
