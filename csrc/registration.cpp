// The one TORCH_LIBRARY of cnnkernels. Every schema is written once, in
// cnnkernels/schemas.def (shared with the Python fallback in cnnkernels/_library.py).
//
// Public ops (conv_bn_act, conv_bn_act_backward, ...) get their CPU/CUDA kernels from
// Python (cnnkernels/ops/<op>.py), which picks a backend (reference, cpu, triton,
// cuda) per call. The `_native` ops are the C++ backends: CPU kernels in
// csrc/cpu/<op>.cpp, CUDA kernels in csrc/cuda/<op>.cu, same schema, chosen by the
// dispatcher from the tensors' device.
#include <Python.h>
#include <torch/library.h>

#include "common/build_info.h"

// A module so that `import cnnkernels._C` loads this library and runs the registrations
// below; build facts are exposed as ops. Its one Python attribute is ReplayPlan
// (csrc/plan_replay.cpp), the frozen-forward replay of cnnkernels/nn/frozen_plan.py.
namespace cnnkernels {
void add_plan_replay(PyObject* module);  // csrc/plan_replay.cpp: the ReplayPlan class
}  // namespace cnnkernels

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    try {
      cnnkernels::add_plan_replay(module);
    } catch (const std::exception& error) {
      PyErr_SetString(PyExc_ImportError, error.what());
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}

namespace {
bool built_with_cuda() { return cnnkernels::kBuiltWithCuda; }
}  // namespace

TORCH_LIBRARY(cnnkernels, m) {
  m.def("_built_with_cuda() -> bool", &built_with_cuda);
#define CNNKERNELS_OP(name, native_name, schema) \
  m.def(#name schema);                           \
  m.def(#native_name schema);
#define CNNKERNELS_NATIVE_HELPER(name, schema) m.def(#name schema);
#include "../cnnkernels/schemas.def"
#undef CNNKERNELS_NATIVE_HELPER
#undef CNNKERNELS_OP
}
