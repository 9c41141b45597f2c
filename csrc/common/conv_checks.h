// The convolution arguments' checks shared by the drivers of conv_bn_act and bn_act_conv
// (csrc/common/*_driver.h): x, weight, bias, stride, padding, dilation, groups, and the
// output shape they give. ATen/c10 headers only (also compiled by nvcc).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <vector>

#include "common/checks.h"

namespace cnnkernels {

// x [N, C_in, H, W] and weight [C_out, C_in / groups, kH, kW]: defined, 4-D, floating, the
// same dtype and device, channels and groups agreeing; stride, dilation >= 1, padding >= 0;
// bias undefined or [C_out] in x's dtype.
inline void check_conv_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  check_defined(x, "x");
  check_defined(weight, "weight");
  check_ndim(x, 4, "x");
  check_ndim(weight, 4, "weight");
  check_floating(x, "x");
  check_same_dtype(x, "x", weight, "weight");
  check_same_device(x, "x", weight, "weight");
  check_channels(x, weight, groups);
  check_pair(stride, 1, "stride");
  check_pair(padding, 0, "padding");
  check_pair(dilation, 1, "dilation");
  if (bias.defined()) {
    check_per_channel(bias, weight.size(0), "bias", x, "x");
    check_same_dtype(x, "x", bias, "bias");
  }
}

// The output shape [N, C_out, H_out, W_out] of the convolution of checked operands; an
// error when the padded input is smaller than the dilated kernel.
inline std::vector<int64_t> conv_output_sizes(const at::Tensor& x, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation) {
  std::vector<int64_t> sizes{x.size(0), weight.size(0), 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t k = weight.size(2 + d);
    const int64_t in = x.size(2 + d) + 2 * padding[d];
    const int64_t extent = dilation[d] * (k - 1) + 1;
    TORCH_CHECK(in >= extent, "x's padded ", d == 0 ? "height" : "width", " (", in,
                ") is smaller than the dilated kernel (", extent, ")");
    sizes[2 + d] = (in - extent) / stride[d] + 1;
  }
  return sizes;
}

// dilation with 1 on each axis where the kernel is 1 wide: the same convolution (a single tap
// has nothing to space), and it keeps oneDNN's brgemm convolution (torch 2.14) off a path
// that crashes the process (1-wide dilated kernels, channels_last, bias, groups, stride 2).
// Checked operands only.
inline std::array<int64_t, 2> effective_dilation(const at::Tensor& weight, at::IntArrayRef dilation) {
  return {weight.size(2) == 1 ? 1 : dilation[0], weight.size(3) == 1 ? 1 : dilation[1]};
}

// check_conv_operands, then the output shape.
inline std::vector<int64_t> check_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups) {
  check_conv_operands(x, weight, bias, stride, padding, dilation, groups);
  return conv_output_sizes(x, weight, stride, padding, dilation);
}

// grad_weight in weight's layout (at::empty_like(weight)'s strides), as autograd keeps
// parameter gradients; the convolution's backward usually gives it so already (no copy).
inline at::Tensor like_weight(const at::Tensor& grad_weight, const at::Tensor& weight) {
  if (grad_weight.strides() == weight.strides()) return grad_weight;
  return at::empty_like(weight).copy_(grad_weight);
}

}  // namespace cnnkernels
