// Operator schemas and kernel registrations of ditfast._C (the one registration file).
//
// Namespace: the Python side registers its Triton ops in the same "ditfast" namespace with
// torch.library.custom_op (ditfast::norm_modulate, ...), which creates FRAGMENT libraries. The C++
// ops therefore get distinct names (suffix _c) and are declared with TORCH_LIBRARY_FRAGMENT, not
// TORCH_LIBRARY: TORCH_LIBRARY claims the namespace and would fail to load next to any other
// owner of "ditfast" (a Python torch.library.Library("ditfast", "DEF"), a second extension),
// while fragments coexist in any import order (tests/test_cuda_ext.py checks both orders).
//
// Fake (meta) kernels and autograd are registered from Python in ditfast/ops/cuda_impl.py
// (set_python_module below tells torch where to find them).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_FRAGMENT(ditfast, m) {
  m.set_python_module("ditfast.ops.cuda_impl");
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("norm_modulate_c(Tensor x, Tensor? shift, Tensor scale, float eps) -> Tensor", tags);
  m.def(
      "norm_modulate_c_backward(Tensor grad_out, Tensor x, Tensor? shift, Tensor scale, float eps)"
      " -> (Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "gated_residual_norm_modulate_c(Tensor x, Tensor y, Tensor gate, Tensor? shift, Tensor scale, float eps)"
      " -> (Tensor, Tensor)",
      tags);
  m.def(
      "gated_residual_norm_modulate_c_backward(Tensor? grad_x_new, Tensor? grad_h, Tensor x, Tensor y,"
      " Tensor gate, Tensor? shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def("apply_rope_c(Tensor x, Tensor cos, Tensor sin, bool interleaved, bool inverse) -> Tensor", tags);
  m.def(
      "qk_norm_rope_c(Tensor q, Tensor k, Tensor? q_weight, Tensor? k_weight, Tensor? cos, Tensor? sin,"
      " float eps, bool interleaved) -> (Tensor, Tensor)",
      tags);
  m.def(
      "qk_norm_rope_c_backward(Tensor? grad_q, Tensor? grad_k, Tensor q, Tensor k, Tensor? q_weight,"
      " Tensor? k_weight, Tensor? cos, Tensor? sin, float eps, bool interleaved)"
      " -> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "prepare_attention_c(Tensor[] qs, Tensor[] ks, Tensor[] vs, Tensor[] q_weights, Tensor[] k_weights,"
      " Tensor? cos, Tensor? sin, float eps, bool interleaved) -> (Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "prepare_attention_c_backward(Tensor? grad_q, Tensor? grad_k, Tensor[] qs, Tensor[] ks, Tensor[] q_weights,"
      " Tensor[] k_weights, Tensor? cos, Tensor? sin, float eps, bool interleaved)"
      " -> (Tensor[], Tensor[], Tensor[], Tensor[])",
      tags);
}

#define DITFAST_IMPLS(m)                                                                         \
  m.impl("norm_modulate_c", &ditfast::norm_modulate_c);                                          \
  m.impl("norm_modulate_c_backward", &ditfast::norm_modulate_c_backward);                        \
  m.impl("gated_residual_norm_modulate_c", &ditfast::gated_residual_norm_modulate_c);            \
  m.impl("gated_residual_norm_modulate_c_backward", &ditfast::gated_residual_norm_modulate_c_backward); \
  m.impl("apply_rope_c", &ditfast::apply_rope_c);                                                \
  m.impl("qk_norm_rope_c", &ditfast::qk_norm_rope_c);                                            \
  m.impl("qk_norm_rope_c_backward", &ditfast::qk_norm_rope_c_backward);                        \
  m.impl("prepare_attention_c", &ditfast::prepare_attention_c);                                  \
  m.impl("prepare_attention_c_backward", &ditfast::prepare_attention_c_backward)

TORCH_LIBRARY_IMPL(ditfast, CPU, m) { DITFAST_IMPLS(m); }

#ifdef DITFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ditfast, CUDA, m) { DITFAST_IMPLS(m); }
#endif
