// The one TORCH_LIBRARY of cnnkernels: every schema lives here.
//
// Public ops (conv_bn_act, conv_bn_act_backward) get their CPU/CUDA kernels from
// Python (cnnkernels/ops/<op>.py), which picks a backend (reference, cpu, triton,
// cuda) per call. The `_native` ops are the C++ backends: CPU kernels in
// csrc/cpu/<op>.cpp, CUDA kernels in csrc/cuda/<op>.cu, same schema, chosen by the
// dispatcher from the tensors' device.
#include <Python.h>
#include <torch/library.h>

#include "common/build_info.h"

// A bare module so that `import cnnkernels._C` loads this library and runs the
// registrations below; build facts are exposed as ops, not pybind functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace {
bool built_with_cuda() { return cnnkernels::kBuiltWithCuda; }
}  // namespace

#define CONV_BN_ACT_FORWARD_ARGS                                                        \
  "(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "        \
  "Tensor? running_mean, Tensor? running_var, int[2] stride, int[2] padding, "          \
  "int[2] dilation, int groups, bool training, float eps, Tensor? residual, "           \
  "str activation) -> (Tensor out, Tensor conv_out, Tensor save_mean, Tensor save_var)"

#define CONV_BN_ACT_BACKWARD_ARGS                                                       \
  "(Tensor grad_out, Tensor out, Tensor x, Tensor weight, Tensor? bias, "               \
  "Tensor conv_out, Tensor? bn_weight, Tensor save_mean, Tensor save_var, "             \
  "int[2] stride, int[2] padding, int[2] dilation, int groups, bool training, "         \
  "float eps, str activation, bool[6] output_mask) -> (Tensor grad_x, "                 \
  "Tensor grad_weight, Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias, "  \
  "Tensor grad_residual)"

#define ADD_ACT_FORWARD_ARGS "(Tensor x, Tensor residual, str activation) -> Tensor"
#define ADD_ACT_BACKWARD_ARGS "(Tensor grad_out, Tensor out, str activation) -> Tensor"

#define SE_EXCITE_FORWARD_ARGS                                                          \
  "(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "  \
  "Tensor? residual, str activation) -> (Tensor out, Tensor squeezed, Tensor hidden, "     \
  "Tensor gate)"
#define SE_EXCITE_BACKWARD_ARGS                                                         \
  "(Tensor grad_out, Tensor out, Tensor x, Tensor fc1_weight, Tensor fc2_weight, "         \
  "Tensor squeezed, Tensor hidden, Tensor gate, str activation, bool[6] output_mask) -> "  \
  "(Tensor grad_x, Tensor grad_fc1_weight, Tensor grad_fc1_bias, Tensor grad_fc2_weight, " \
  "Tensor grad_fc2_bias, Tensor grad_residual)"

#define BN_ACT_CONV_ARGS                                                                \
  "Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "         \
  "Tensor? running_mean, Tensor? running_var, int[2] stride, int[2] padding, "          \
  "int[2] dilation, int groups, bool training, float eps, str activation"
#define BN_ACT_CONV_FORWARD_ARGS \
  "(" BN_ACT_CONV_ARGS ") -> (Tensor out, Tensor save_mean, Tensor save_var)"
#define BN_ACT_CONV_INTO_ARGS \
  "(Tensor(a!) out, " BN_ACT_CONV_ARGS ") -> (Tensor save_mean, Tensor save_var)"
#define BN_ACT_CONV_BACKWARD_ARGS                                                       \
  "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, "        \
  "Tensor? bn_bias, Tensor save_mean, Tensor save_var, int[2] stride, int[2] padding, " \
  "int[2] dilation, int groups, bool training, float eps, str activation, "             \
  "bool[5] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "      \
  "Tensor grad_bn_weight, Tensor grad_bn_bias)"

TORCH_LIBRARY(cnnkernels, m) {
  m.def("_built_with_cuda() -> bool", &built_with_cuda);
  m.def("conv_bn_act" CONV_BN_ACT_FORWARD_ARGS);
  m.def("conv_bn_act_backward" CONV_BN_ACT_BACKWARD_ARGS);
  m.def("_conv_bn_act_forward_native" CONV_BN_ACT_FORWARD_ARGS);
  m.def("_conv_bn_act_backward_native" CONV_BN_ACT_BACKWARD_ARGS);
  m.def("add_act" ADD_ACT_FORWARD_ARGS);
  m.def("add_act_backward" ADD_ACT_BACKWARD_ARGS);
  m.def("_add_act_forward_native" ADD_ACT_FORWARD_ARGS);
  m.def("_add_act_backward_native" ADD_ACT_BACKWARD_ARGS);
  m.def("se_excite" SE_EXCITE_FORWARD_ARGS);
  m.def("se_excite_backward" SE_EXCITE_BACKWARD_ARGS);
  m.def("_se_excite_forward_native" SE_EXCITE_FORWARD_ARGS);
  m.def("_se_excite_backward_native" SE_EXCITE_BACKWARD_ARGS);
  m.def("bn_act_conv" BN_ACT_CONV_FORWARD_ARGS);
  m.def("bn_act_conv_into" BN_ACT_CONV_INTO_ARGS);
  m.def("bn_act_conv_backward" BN_ACT_CONV_BACKWARD_ARGS);
  m.def("_bn_act_conv_forward_native" BN_ACT_CONV_FORWARD_ARGS);
  m.def("_bn_act_conv_into_native" BN_ACT_CONV_INTO_ARGS);
  m.def("_bn_act_conv_backward_native" BN_ACT_CONV_BACKWARD_ARGS);
}
