// The Python module object of ditfast._C. The operators live in torch.ops.ditfast (registered
// when this library loads, csrc/registration.cpp); the module itself only reports how it was
// built. Plain CPython API: no pybind11 needed for a few constants, and no heavy headers.
#include <Python.h>
#include <torch/version.h>

#include "kernels.h"

#define DITFAST_STR2(x) #x
#define DITFAST_STR(x) DITFAST_STR2(x)

static PyModuleDef ditfast_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "ditfast compiled operators (torch.ops.ditfast.*_c, CPU and CUDA kernels); loaded by ditfast._ext.", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&ditfast_c_module);
  if (m == nullptr) return nullptr;
#ifdef DITFAST_WITH_CUDA
  PyObject* devices = Py_BuildValue("(ss)", "cpu", "cuda");
  const int cuda_version = ditfast::cuda_runtime_version();
#else
  PyObject* devices = Py_BuildValue("(s)", "cpu");
  const int cuda_version = 0;
#endif
  PyObject* ops = Py_BuildValue("(sssssssss)", "norm_modulate_c", "norm_modulate_c_backward",
                                "gated_residual_norm_modulate_c", "gated_residual_norm_modulate_c_backward",
                                "apply_rope_c", "qk_norm_rope_c", "qk_norm_rope_c_backward",
                                "prepare_attention_c", "prepare_attention_c_backward");
  const bool ok =
      devices != nullptr && ops != nullptr && PyModule_AddObjectRef(m, "DEVICES", devices) == 0 &&
      PyModule_AddObjectRef(m, "OPS", ops) == 0 &&
      PyModule_AddIntConstant(m, "CUDA_RUNTIME_VERSION", cuda_version) == 0 &&
      PyModule_AddStringConstant(m, "TORCH_VERSION",
                                 DITFAST_STR(TORCH_VERSION_MAJOR) "." DITFAST_STR(TORCH_VERSION_MINOR) "." DITFAST_STR(
                                     TORCH_VERSION_PATCH)) == 0 &&
      PyModule_AddIntConstant(m, "MAX_ROW_CUDA", ditfast::kMaxRowCuda) == 0 &&
      PyModule_AddIntConstant(m, "MAX_HEAD_DIM_CUDA", ditfast::kMaxHeadDimCuda) == 0;
  Py_XDECREF(devices);
  Py_XDECREF(ops);
  if (!ok) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
