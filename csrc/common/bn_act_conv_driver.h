// Host driver of op bn_act_conv (pre-activation BatchNorm + activation + convolution,
// DenseNet / pre-act ResNet order), shared by the CPU and CUDA backends.
//
// All ATen-level logic lives here: argument checks, memory formats, dtypes, the BN
// scale/shift, at::convolution for the convolution (unless the device fuses it),
// at::convolution_backward for its gradients, empty [0] tensors for unwanted gradients.
// A device supplies the four passes of BnActConvKernels (csrc/cpu/bn_act_conv.cpp,
// csrc/cuda/bn_act_conv.cu), optionally a fused convolution, and wraps
// bn_act_conv_forward / bn_act_conv_into / bn_act_conv_backward in kernels with the
// schema signatures. The contract is cnnkernels/reference.py's.
//
// Conventions every pass may rely on (the driver establishes them):
//  * x is [N, C, H, W] with ANY strides (typically a channel-prefix view buf[:, :C] of a
//    wider NCHW or channels_last buffer); x is never written.
//  * "Dense tensors" (z, grad_z, grad_x) have x's shape and dtype and are dense in the
//    memory format bn_act_conv_memory_format(x): NCHW-contiguous (t.is_contiguous()) or
//    channels_last-contiguous. Test t.is_contiguous() first.
//  * "Per-channel tensors" (mean, var, invstd, scale, shift, sums, coefficients) are 1-D,
//    contiguous, C elements, in the statistics dtype: float64 for float64 input, float32
//    otherwise. Accumulate reductions at least in that dtype.
//  * The pre-activation is a = x * scale[c] + shift[c], computed in the statistics dtype
//    with exactly this expression in every pass, so the relu mask of the backward
//    (a > 0) is the forward's.
//  * Outputs arrive allocated (garbage until written), on x's device, with the current
//    device set to it. An undefined at::Tensor means "absent".
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/conv_checks.h"
#include "common/op_args.h"

namespace cnnkernels {

struct BnActConvKernels {
  // mean[c] = mean of x[:, c] over (N, H, W); var[c] = biased variance of the same.
  // Must stay accurate when |mean| >> std (shift by a sample, Welford/Chan, or double).
  void (*batch_stats)(const at::Tensor& x, at::Tensor& mean, at::Tensor& var);

  // z = act(x * scale[c] + shift[c]), rounded once to z's dtype; act is ReLU when relu.
  void (*scale_shift_act)(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                          bool relu, at::Tensor& z);

  // g = relu ? (x * scale[c] + shift[c] > 0 ? grad_z : 0) : grad_z.
  // sum_g[c] = sum of g over (N, H, W); if sum_g_xhat is defined:
  // sum_g_xhat[c] = invstd[c] * sum of g * (x - mean[c]) (else mean, invstd are not read).
  void (*backward_reduce)(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                          const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd,
                          bool relu, at::Tensor& sum_g, at::Tensor& sum_g_xhat);

  // With g as in backward_reduce:
  //   grad_x = g * g_scale[c] - (x - mean[c]) * x_scale[c] + g_shift[c]
  // The x term is present only when x_scale is defined (training; mean is defined then).
  // (The driver sets, with M = N*H*W and k = gamma*invstd:
  //   training: g_scale = k, x_scale = k*invstd*sum_g_xhat/M, g_shift = -k*sum_g/M;
  //   eval:     g_scale = k, g_shift = 0, x_scale undefined.)
  void (*backward_elementwise)(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& g_scale,
                               const at::Tensor& x_scale, const at::Tensor& g_shift, bool relu,
                               at::Tensor& grad_x);

  // Optional (nullptr: unused). A convolution that applies the BN + activation while
  // loading x (implicit GEMM with a prologue), so z is never written to memory:
  //   out = conv2d(act(x * scale[c] + shift[c]) rounded to x's dtype, weight) + bias
  // written into `out` ([N, C_out, H_out, W_out], x's dtype, ANY strides, e.g. a channel
  // slice of a bigger buffer; only its own elements may be written). bias is undefined
  // or [C_out] in x's dtype. Returns false to decline (nothing written), in which case the
  // driver runs scale_shift_act into a temporary and at::convolution.
  bool (*fused_conv)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& scale, const at::Tensor& shift, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                     at::Tensor& out) = nullptr;
};

// The memory format of the op's dense results (out, z, grad_x): channels_last when x's
// channel stride is 1 and x is not contiguous (a channel-prefix view of a channels_last
// buffer gives channels_last), NCHW otherwise. cnnkernels/reference.py's
// bn_act_conv_memory_format.
inline at::MemoryFormat bn_act_conv_memory_format(const at::Tensor& x) {
  return (x.stride(1) == 1 && !x.is_contiguous()) ? at::MemoryFormat::ChannelsLast
                                                  : at::MemoryFormat::Contiguous;
}

namespace bn_act_conv_detail {

// A per-input-channel parameter (bn_*, running_*, save_*): 1-D, floating, C_in elements.
inline void check_per_input_channel(const at::Tensor& t, int64_t c, const char* name,
                                    const at::Tensor& x) {
  if (!t.defined()) return;
  check_ndim(t, 1, name);
  TORCH_CHECK(t.size(0) == c, name, " must have C_in = ", c,
              " elements (one per channel of x), got ", t.size(0));
  check_floating(t, name);
  check_same_device(x, "x", t, name);
}

// Checks x, weight, bias, stride, padding, dilation, groups and the BN parameters;
// returns the conv output shape [N, C_out, H_out, W_out].
inline std::vector<int64_t> check_args(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& bias, const at::Tensor& bn_weight,
                                       const at::Tensor& bn_bias, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, double eps) {
  check_conv_operands(x, weight, bias, stride, padding, dilation, groups);
  check_per_input_channel(bn_weight, x.size(1), "bn_weight", x);
  check_per_input_channel(bn_bias, x.size(1), "bn_bias", x);
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  return conv_output_sizes(x, weight, stride, padding, dilation);
}

// BN as an affine map per channel: scale = gamma * invstd, shift = beta - mean * scale.
// Forward and backward build them with this one function, so both passes see the same
// pre-activation a = x * scale + shift, bit for bit.
inline std::pair<at::Tensor, at::Tensor> scale_shift(const at::Tensor& bn_weight,
                                                     const at::Tensor& bn_bias,
                                                     const at::Tensor& mean,
                                                     const at::Tensor& invstd, int64_t c,
                                                     const at::TensorOptions& sopts) {
  const at::Tensor scale = per_channel_or(bn_weight, 1.0, c, sopts) * invstd;
  const at::Tensor shift = per_channel_or(bn_bias, 0.0, c, sopts) - mean * scale;
  return {scale.contiguous(), shift.contiguous()};
}

// The statistics of the forward: training: batch mean and biased variance of x;
// eval: copies of the running statistics. Both in the statistics dtype.
inline std::pair<at::Tensor, at::Tensor> statistics(const BnActConvKernels& kernels,
                                                    const at::Tensor& x,
                                                    const at::Tensor& running_mean,
                                                    const at::Tensor& running_var, bool training,
                                                    const at::TensorOptions& sopts) {
  const int64_t c = x.size(1);
  check_per_input_channel(running_mean, c, "running_mean", x);
  check_per_input_channel(running_var, c, "running_var", x);
  if (training) {
    TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 0,
                "training needs at least one value per channel, got x of shape ", x.sizes());
    at::Tensor mean = at::empty({c}, sopts), var = at::empty({c}, sopts);
    kernels.batch_stats(x, mean, var);
    return {mean, var};
  }
  TORCH_CHECK(running_mean.defined() && running_var.defined(),
              "running_mean and running_var are required when training=False");
  return {running_mean.to(sopts.dtype(), false, /*copy=*/true).contiguous(),
          running_var.to(sopts.dtype(), false, /*copy=*/true).contiguous()};
}

// conv2d(act(x * scale + shift), weight) + bias. With `out` defined the result goes into
// it and it is returned; otherwise a new tensor in bn_act_conv_memory_format(x).
inline at::Tensor convolve(const BnActConvKernels& kernels, const at::Tensor& x,
                           const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& scale, const at::Tensor& shift,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, bool relu,
                           at::IntArrayRef out_sizes, at::Tensor out) {
  const auto fmt = bn_act_conv_memory_format(x);
  if (kernels.fused_conv != nullptr) {
    at::Tensor target = out.defined() ? out : at::empty(out_sizes, x.options().memory_format(fmt));
    if (kernels.fused_conv(x, weight, bias, scale, shift, stride, padding, dilation, groups, relu,
                           target)) {
      return target;
    }
  }
  at::Tensor z = at::empty(x.sizes(), x.options().memory_format(fmt));
  kernels.scale_shift_act(x, scale, shift, relu, z);
  at::Tensor y = at::convolution(z, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                                 stride, padding, dilation, /*transposed=*/false,
                                 /*output_padding=*/{0, 0}, groups);
  if (!out.defined()) return y.contiguous(fmt);
  out.copy_(y);
  return out;
}

// The forward shared by bn_act_conv_into (`into`: out given, checked here) and
// bn_act_conv_forward (out undefined: allocated) -> (out, save_mean, save_var).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const BnActConvKernels& kernels, bool into, const at::Tensor& out, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
    const std::optional<at::Tensor>& bn_weight_opt, const std::optional<at::Tensor>& bn_bias_opt,
    const std::optional<at::Tensor>& running_mean_opt, const std::optional<at::Tensor>& running_var_opt,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool training, double eps, std::string_view activation) {
  const bool relu = check_activation(activation);
  const at::Tensor bias = opt(bias_opt), bn_weight = opt(bn_weight_opt), bn_bias = opt(bn_bias_opt);
  const auto out_sizes = check_args(x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps);
  const auto effective = effective_dilation(weight, dilation);
  dilation = effective;
  if (into) {
    check_defined(out, "out");
    check_same_shape(out, out_sizes, "out", "the output");
    check_same_dtype(x, "x", out, "out");
    check_same_device(x, "x", out, "out");
    check_written_apart(out, "out", x, "x");
  }
  const c10::OptionalDeviceGuard guard(x.device());
  const auto sopts = x.options().dtype(stats_dtype(x.scalar_type()));
  auto [mean, var] = statistics(kernels, x, opt(running_mean_opt), opt(running_var_opt), training, sopts);
  const auto [scale, shift] = scale_shift(bn_weight, bn_bias, mean, at::rsqrt(var + eps), x.size(1), sopts);
  at::Tensor result = convolve(kernels, x, weight, bias, scale, shift, stride, padding, dilation, groups, relu,
                               out_sizes, out);
  return {result, mean, var};
}

}  // namespace bn_act_conv_detail

// Forward of bn_act_conv writing into `out`; arguments and results exactly as the schema
// _bn_act_conv_into_native and cnnkernels/reference.py:
//   out [N, C_out, H_out, W_out], x's dtype and device, any strides, not overlapping x;
//   x [N, C_in, H, W] (any strides); weight [C_out, C_in/groups, kH, kW]; bias [C_out] or
//   None; bn_*, running_* [C_in] or None (running_* required in eval).
//   -> save_mean, save_var [C_in] (statistics dtype).
inline std::tuple<at::Tensor, at::Tensor> bn_act_conv_into(
    const BnActConvKernels& kernels, at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias_opt, const std::optional<at::Tensor>& bn_weight_opt,
    const std::optional<at::Tensor>& bn_bias_opt, const std::optional<at::Tensor>& running_mean_opt,
    const std::optional<at::Tensor>& running_var_opt, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training, double eps,
    std::string_view activation) {
  auto [result, mean, var] = bn_act_conv_detail::forward(
      kernels, /*into=*/true, out, x, weight, bias_opt, bn_weight_opt, bn_bias_opt, running_mean_opt,
      running_var_opt, stride, padding, dilation, groups, training, eps, activation);
  return {mean, var};
}

// Functional forward of bn_act_conv; as the schema _bn_act_conv_forward_native:
//   -> out [N, C_out, H_out, W_out] (x's dtype, bn_act_conv_memory_format(x)),
//      save_mean, save_var [C_in] (statistics dtype).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_conv_forward(
    const BnActConvKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias_opt, const std::optional<at::Tensor>& bn_weight_opt,
    const std::optional<at::Tensor>& bn_bias_opt, const std::optional<at::Tensor>& running_mean_opt,
    const std::optional<at::Tensor>& running_var_opt, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training, double eps,
    std::string_view activation) {
  return bn_act_conv_detail::forward(kernels, /*into=*/false, at::Tensor(), x, weight, bias_opt, bn_weight_opt,
                                     bn_bias_opt, running_mean_opt, running_var_opt, stride, padding, dilation,
                                     groups, training, eps, activation);
}

// Backward of bn_act_conv; arguments and results exactly as the schema
// _bn_act_conv_backward_native and cnnkernels/reference.py. Recomputes
// z = act(x * scale + shift) from x and the saved statistics, runs
// at::convolution_backward, then the BN + activation backward over x.
//   -> grad_x (x's shape and dtype, bn_act_conv_memory_format(x)), grad_weight (weight's
//      layout), grad_bias (contiguous, x's dtype), grad_bn_weight, grad_bn_bias ([C_in],
//      statistics dtype).
//      Unwanted (output_mask false) or absent (no bias) grads: empty [0].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_conv_backward(
    const BnActConvKernels& kernels, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
    const std::optional<at::Tensor>& bn_weight_opt, const std::optional<at::Tensor>& bn_bias_opt,
    const at::Tensor& save_mean, const at::Tensor& save_var, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training, double eps,
    std::string_view activation, std::array<bool, 5> output_mask) {
  namespace d = bn_act_conv_detail;
  const bool relu = check_activation(activation);
  const at::Tensor bias = opt(bias_opt), bn_weight = opt(bn_weight_opt),
                   bn_bias = opt(bn_bias_opt);
  const auto out_sizes = d::check_args(x, weight, bias, bn_weight, bn_bias, stride, padding,
                                       dilation, groups, eps);
  const auto effective = effective_dilation(weight, dilation);
  dilation = effective;
  const int64_t c = x.size(1);
  check_defined(grad_out, "grad_out");
  check_same_shape(grad_out, out_sizes, "grad_out", "the output");
  check_floating(grad_out, "grad_out");
  check_same_device(x, "x", grad_out, "grad_out");
  check_defined(save_mean, "save_mean");
  check_defined(save_var, "save_var");
  d::check_per_input_channel(save_mean, c, "save_mean", x);
  d::check_per_input_channel(save_var, c, "save_var", x);

  const c10::OptionalDeviceGuard guard(x.device());
  const auto fmt = bn_act_conv_memory_format(x);
  const auto sopts = x.options().dtype(stats_dtype(x.scalar_type()));
  const at::Tensor mean = save_mean.to(sopts.dtype()).contiguous();
  const at::Tensor invstd = at::rsqrt(save_var.to(sopts.dtype()) + eps);
  const auto [scale, shift] = d::scale_shift(bn_weight, bn_bias, mean, invstd, c, sopts);

  const bool want_grad_z = output_mask[0] || output_mask[3] || output_mask[4];
  const bool want_bias = output_mask[2] && bias.defined();
  const at::Tensor empty_x = x.new_empty({0}), empty_s = at::empty({0}, sopts);
  at::Tensor grad_z, grad_w = empty_x, grad_b = empty_x;
  if (want_grad_z || output_mask[1] || want_bias) {
    at::Tensor z = at::empty(x.sizes(), x.options().memory_format(fmt));
    kernels.scale_shift_act(x, scale, shift, relu, z);
    const std::array<int64_t, 1> bias_sizes{weight.size(0)};
    auto grads = at::convolution_backward(
        grad_out.to(x.scalar_type()), z, weight,
        bias.defined() ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, stride, padding,
        dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
        {want_grad_z, output_mask[1], want_bias});
    if (want_grad_z) grad_z = std::get<0>(grads).contiguous(fmt);
    if (output_mask[1]) grad_w = like_weight(std::get<1>(grads), weight);
    if (want_bias) grad_b = std::get<2>(grads).contiguous();
  }

  at::Tensor sum_g, sum_g_xhat;
  const bool x_term = training && output_mask[0];
  if (output_mask[3] || output_mask[4] || x_term) {
    sum_g = at::empty({c}, sopts);
    if (output_mask[3] || x_term) sum_g_xhat = at::empty({c}, sopts);
    kernels.backward_reduce(grad_z, x, scale, shift, mean, invstd, relu, sum_g, sum_g_xhat);
  }
  at::Tensor grad_x = empty_x;
  if (output_mask[0]) {
    grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
    const at::Tensor g_scale = per_channel_or(bn_weight, 1.0, c, sopts) * invstd;
    if (training) {
      const double count = static_cast<double>(x.size(0) * x.size(2) * x.size(3));
      const at::Tensor x_scale = (g_scale * invstd * sum_g_xhat / count).contiguous();
      const at::Tensor g_shift = (-g_scale * sum_g / count).contiguous();
      kernels.backward_elementwise(grad_z, x, scale, shift, mean, g_scale, x_scale, g_shift, relu,
                                   grad_x);
    } else {
      kernels.backward_elementwise(grad_z, x, scale, shift, at::Tensor(), g_scale, at::Tensor(),
                                   at::zeros({c}, sopts), relu, grad_x);
    }
  }
  return {grad_x, grad_w, grad_b, output_mask[3] ? sum_g_xhat : empty_s,
          output_mask[4] ? sum_g : empty_s};
}

}  // namespace cnnkernels
