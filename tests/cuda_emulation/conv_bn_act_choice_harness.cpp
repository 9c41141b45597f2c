// Exposes csrc/common/conv_bn_act_kernel_choice.h (the rule that picks the CUDA kernel of
// conv_bn_act) to ctypes, so that tests/cuda_emulation/test_conv_bn_act_choice.py can
// compare it with its Python mirror in cnnkernels/ops/_conv_bn_act_choice.py.
#include <cstdint>

#include "common/conv_bn_act_kernel_choice.h"

// Returns the ConvBnActKernel value for the shape; dtype is a ConvBnActDtype value.
extern "C" int conv_bn_act_kernel_choice(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
                                         int64_t kw, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                         int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, int dtype,
                                         int channels_last, int tf32) {
  using namespace cnnkernels;
  const ConvBnActShape shape{n,     c_in,  h,     w,      c_out, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h,
                             dil_w, groups, static_cast<ConvBnActDtype>(dtype), channels_last != 0, tf32 != 0};
  return static_cast<int>(choose_conv_bn_act_kernel(shape));
}

// The name the rule gives a ConvBnActKernel value.
extern "C" const char* conv_bn_act_kernel_choice_name(int kernel) {
  return cnnkernels::conv_bn_act_kernel_name(static_cast<cnnkernels::ConvBnActKernel>(kernel));
}
