// The torch operators of ditfast._C (schemas in csrc/registration.cpp). Each works on CPU and,
// when built with CUDA, on CUDA tensors; they check their arguments, allocate outputs and call
// the CPU loops or the CUDA launchers of csrc/kernels.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace ditfast {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Tensor norm_modulate_c(const Tensor& x, const OptTensor& shift, const Tensor& scale, double eps);

// -> (dx, dscale, dshift); dshift is an empty tensor when shift is None.
std::tuple<Tensor, Tensor, Tensor> norm_modulate_c_backward(const Tensor& grad_out, const Tensor& x,
                                                            const OptTensor& shift, const Tensor& scale, double eps);

// -> (x_new, h)
std::tuple<Tensor, Tensor> gated_residual_norm_modulate_c(const Tensor& x, const Tensor& y, const Tensor& gate,
                                                          const OptTensor& shift, const Tensor& scale, double eps);

// -> (dx, dy, dgate, dscale, dshift); dshift empty when shift is None.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_norm_modulate_c_backward(
    const OptTensor& grad_x_new, const OptTensor& grad_h, const Tensor& x, const Tensor& y, const Tensor& gate,
    const OptTensor& shift, const Tensor& scale, double eps);

Tensor apply_rope_c(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, bool inverse);

// -> (q_out, k_out): per-head RMSNorm (times the weight where one is given), then RoPE when cos/sin
// are given. Both weights None: no norm (RoPE only), as ditfast.reference.qk_norm_rope.
std::tuple<Tensor, Tensor> qk_norm_rope_c(const Tensor& q, const Tensor& k, const OptTensor& q_weight,
                                          const OptTensor& k_weight, const OptTensor& cos, const OptTensor& sin,
                                          double eps, bool interleaved);

// -> (dq, dk, dq_weight, dk_weight); a weight grad is an empty tensor when that weight is None.
std::tuple<Tensor, Tensor, Tensor, Tensor> qk_norm_rope_c_backward(const OptTensor& grad_q, const OptTensor& grad_k,
                                                                   const Tensor& q, const Tensor& k,
                                                                   const OptTensor& q_weight, const OptTensor& k_weight,
                                                                   const OptTensor& cos, const OptTensor& sin,
                                                                   double eps, bool interleaved);

// -> joint (q, k, v), contiguous (B, L_total, H, Dh): per stream, RMSNorm (weights given; an empty
// weight tensor means no norm for that stream) + RoPE with the stream's rows of the joint tables,
// written straight into the joint buffers; v copied.
std::tuple<Tensor, Tensor, Tensor> prepare_attention_c(at::TensorList qs, at::TensorList ks, at::TensorList vs,
                                                       at::TensorList q_weights, at::TensorList k_weights,
                                                       const OptTensor& cos, const OptTensor& sin, double eps,
                                                       bool interleaved);

// -> (dqs, dks, dq_weights, dk_weights) per stream from the joint grads (absent: zeros); weight
// grads are empty for a stream without norm.
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
prepare_attention_c_backward(const OptTensor& grad_q, const OptTensor& grad_k, at::TensorList qs, at::TensorList ks,
                             at::TensorList q_weights, at::TensorList k_weights, const OptTensor& cos,
                             const OptTensor& sin, double eps, bool interleaved);

}  // namespace ditfast
