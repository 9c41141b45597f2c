// Host driver of op conv_bn_act, shared by the CPU and CUDA backends.
//
// All ATen-level logic lives here: argument checks, memory formats, dtypes, folding
// the eval BatchNorm into the convolution, at::convolution for the convolution,
// at::convolution_backward for its gradients, empty [0] tensors for unwanted
// gradients. A device supplies the four elementwise/reduction passes of
// ConvBnActKernels (csrc/cpu/conv_bn_act.cpp, csrc/cuda/conv_bn_act.cu), optionally its
// own forward convolutions for some shapes (fused eval, or conv + statistics), and wraps
// conv_bn_act_forward / conv_bn_act_backward in kernels with the schema signature.
// The contract (shapes, formats, dtypes of the results) is cnnkernels/reference.py's.
//
// Conventions every pass may rely on (the driver establishes them):
//  * "Activation tensors" (y, out, residual, grad_out, grad_y, grad_pre) have shape
//    [N, C, H, W], the input x's dtype, and are all dense in ONE memory format: either
//    NCHW-contiguous (t.is_contiguous()) or channels_last-contiguous
//    (t.is_contiguous(at::MemoryFormat::ChannelsLast)). Test t.is_contiguous() first;
//    when a tensor is both (H*W == 1 or C == 1) both index orders give the same address.
//  * "Per-channel tensors" (mean, var, invstd, scale, shift, sum_*, g_scale, ...) are
//    1-D, contiguous, C elements, in the statistics dtype: float64 for float64 input,
//    float32 otherwise. Accumulate reductions at least in that dtype.
//  * Outputs arrive allocated (torch.empty: garbage until written), on x's device, with
//    the current device set to it. An undefined at::Tensor means "absent".
#pragma once

#include <ATen/ATen.h>
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

struct ConvBnActKernels {
  // mean[c] = mean of y[:, c] over (N, H, W); var[c] = biased variance of the same.
  // Must stay accurate when |mean| >> std (e.g. y ~ 1e3 +- 1e-2): shift by a sample,
  // Welford/Chan, or accumulate in double.
  void (*batch_stats)(const at::Tensor& y, at::Tensor& mean, at::Tensor& var);

  // out = act(y * scale[c] + shift[c] + residual), computed in the statistics dtype and
  // rounded once to out's dtype. residual may be undefined; act is ReLU when relu,
  // identity otherwise. out may be the same tensor as y (in place).
  void (*scale_shift_act)(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor& residual, bool relu, at::Tensor& out);

  // g = relu ? (out > 0 ? grad_out : 0) : grad_out   (out is read only when relu).
  // sum_g[c] = sum of g over (N, H, W).
  // If y is defined: sum_g_xhat[c] = invstd[c] * sum of g * (y - mean[c]);
  // if y is undefined, sum_g_xhat is undefined too and mean/invstd are not read.
  void (*backward_reduce)(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                          const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                          at::Tensor& sum_g, at::Tensor& sum_g_xhat);

  // With g as in backward_reduce:
  //   grad_y = g * g_scale[c] - (y - mean[c]) * y_scale[c] + shift[c]   (if grad_y defined)
  //   grad_pre = g                                                      (if grad_pre defined)
  // The y term is present only when y is defined (training); then mean and y_scale are
  // defined too, otherwise neither is read. g_scale and shift are always defined. At
  // least one of grad_y, grad_pre is defined. Arithmetic in the statistics dtype.
  // (The driver sets, with M = N*H*W and k = gamma*invstd:
  //   training: g_scale = k, y_scale = k*invstd*sum_g_xhat/M, shift = -k*sum_g/M,
  //   eval:     g_scale = k, shift = 0, y undefined.)
  void (*backward_elementwise)(const at::Tensor& grad_out, const at::Tensor& out,
                               const at::Tensor& y, const at::Tensor& mean,
                               const at::Tensor& g_scale, const at::Tensor& y_scale,
                               const at::Tensor& shift, bool relu, at::Tensor& grad_y,
                               at::Tensor& grad_pre);

  // Optional (nullptr: unused). Eval fast path for a device library's fused
  // convolution: returns out = act(conv2d(x, weight) + bias + residual) in x's dtype
  // (any memory format; the driver converts), or an undefined tensor to decline, in
  // which case the driver runs at::convolution + scale_shift_act. weight is the
  // BN-folded weight in x's dtype; bias the folded bias [C_out] in the statistics dtype;
  // residual undefined or an activation tensor in x's output memory format.
  at::Tensor (*eval_fused_conv)(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, const at::Tensor& residual, bool relu) = nullptr;

  // Optional (nullptr: unused). The device's own convolution kernels with the BatchNorm
  // epilogue fused, for the shapes they cover (the CUDA backend's choice:
  // csrc/common/conv_bn_act_kernel_choice.h). Each returns an undefined tensor to
  // decline, and the driver then runs at::convolution and the passes above. weight is
  // the unfolded weight; residual is as for eval_fused_conv.
  // Eval: out = act(conv2d(x, weight) * scale[c] + shift[c] + residual) in x's dtype and
  // output memory format; scale, shift [C_out] in the statistics dtype (the conv bias is
  // folded into shift).
  at::Tensor (*eval_conv_epilogue)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                   const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, const at::Tensor& residual,
                                   bool relu) = nullptr;
  // Training: returns y = conv2d(x, weight) + bias (bias may be undefined) in x's dtype
  // and output memory format, and writes its biased batch statistics into mean and var
  // ([C_out], statistics dtype, allocated by the driver).
  at::Tensor (*train_conv_stats)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, at::Tensor& mean, at::Tensor& var) = nullptr;
};

namespace detail {

inline at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  return at::convolution(x, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                         stride, padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                         groups);
}

}  // namespace detail

// Forward of conv_bn_act; arguments and results exactly as the schema
// _conv_bn_act_forward_native and cnnkernels/reference.py:
//   x [N, C_in, H, W]; weight [C_out, C_in/groups, kH, kW]; bias, bn_* [C_out] or None;
//   residual [N, C_out, H_out, W_out] or None (any floating dtype and layout).
//   -> out [N, C_out, H_out, W_out] (x's dtype and output memory format),
//      conv_out (training: conv2d(x)+bias, like out; eval: empty [0]),
//      save_mean, save_var [C_out] (statistics dtype).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_act_forward(
    const ConvBnActKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias_opt, const std::optional<at::Tensor>& bn_weight_opt,
    const std::optional<at::Tensor>& bn_bias_opt, const std::optional<at::Tensor>& running_mean_opt,
    const std::optional<at::Tensor>& running_var_opt, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool training, double eps,
    const std::optional<at::Tensor>& residual_opt, std::string_view activation) {
  const bool relu = check_activation(activation);
  const at::Tensor bias = opt(bias_opt), bn_weight = opt(bn_weight_opt),
                   bn_bias = opt(bn_bias_opt), running_mean = opt(running_mean_opt),
                   running_var = opt(running_var_opt), residual = opt(residual_opt);
  const auto out_sizes = check_conv(x, weight, bias, stride, padding, dilation, groups);
  const auto effective = effective_dilation(weight, dilation);
  dilation = effective;
  const int64_t c_out = out_sizes[1];
  check_per_channel(bn_weight_opt, c_out, "bn_weight", x, "x");
  check_per_channel(bn_bias_opt, c_out, "bn_bias", x, "x");
  check_per_channel(running_mean_opt, c_out, "running_mean", x, "x");
  check_per_channel(running_var_opt, c_out, "running_var", x, "x");
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  if (training) {
    TORCH_CHECK(out_sizes[0] * out_sizes[2] * out_sizes[3] > 0,
                "training needs at least one value per channel, got output shape ", out_sizes);
  } else {
    TORCH_CHECK(running_mean.defined() && running_var.defined(),
                "running_mean and running_var are required when training=False");
  }
  if (residual.defined()) {
    check_same_shape(residual, out_sizes, "residual", "the output");
    check_floating(residual, "residual");
    check_same_device(x, "x", residual, "residual");
  }

  const c10::OptionalDeviceGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const auto sopts = x.options().dtype(stats_dtype(x.scalar_type()));
  const at::Tensor res =
      residual.defined() ? residual.to(x.scalar_type()).contiguous(fmt) : at::Tensor();
  const at::Tensor gamma = per_channel_or(bn_weight, 1.0, c_out, sopts);
  const at::Tensor beta = per_channel_or(bn_bias, 0.0, c_out, sopts);

  if (training) {
    at::Tensor mean = at::empty({c_out}, sopts), var = at::empty({c_out}, sopts);
    at::Tensor y;
    if (kernels.train_conv_stats != nullptr) {
      y = kernels.train_conv_stats(x, weight, bias, stride, padding, dilation, groups, mean, var);
    }
    if (!y.defined()) {
      y = detail::conv(x, weight, bias, stride, padding, dilation, groups).contiguous(fmt);
      kernels.batch_stats(y, mean, var);
    }
    const at::Tensor scale = gamma * at::rsqrt(var + eps);
    const at::Tensor shift = beta - mean * scale;
    at::Tensor out = at::empty(out_sizes, x.options().memory_format(fmt));
    kernels.scale_shift_act(y, scale, shift, res, relu, out);
    return {out, y, mean, var};
  }

  // Eval: out = act(conv(x, W) * scale + shift + residual), the conv bias inside shift.
  // float32/float64 fold scale into the weights (one conv, then one pass with scale = 1,
  // or no pass at all); float16/bfloat16 do not, since rounding W*scale to 16 bits costs
  // more accuracy than the conv itself.
  at::Tensor save_mean = running_mean.to(sopts.dtype(), false, /*copy=*/true).contiguous();
  at::Tensor save_var = running_var.to(sopts.dtype(), false, /*copy=*/true).contiguous();
  const at::Tensor scale = gamma * at::rsqrt(save_var + eps);
  at::Tensor shift = beta - save_mean * scale;
  if (bias.defined()) shift = shift + bias.to(sopts.dtype()) * scale;
  const at::Tensor empty = x.new_empty({0});
  if (kernels.eval_conv_epilogue != nullptr) {
    at::Tensor out = kernels.eval_conv_epilogue(x, weight, scale, shift, stride, padding, dilation, groups, res, relu);
    if (out.defined()) return {out.contiguous(fmt), empty, save_mean, save_var};
  }
  // A scale of exactly 1 everywhere (BatchNorm already folded into the weights, as
  // cnnkernels.nn.freeze does) leaves the weights as they are: no copy of them per call.
  at::Tensor folded_weight;
  auto fold = [&] {
    if (!folded_weight.defined()) {
      const bool identity = scale.device().is_cpu() && at::all(scale == 1).item<bool>();
      folded_weight = identity ? weight
                               : (weight.to(sopts.dtype()) * scale.view({-1, 1, 1, 1})).to(x.scalar_type());
    }
    return folded_weight;
  };
  if (kernels.eval_fused_conv != nullptr) {
    at::Tensor out = kernels.eval_fused_conv(x, fold(), shift, stride, padding, dilation, groups, res, relu);
    if (out.defined()) return {out.contiguous(fmt), empty, save_mean, save_var};
  }
  const bool folded = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  const at::Tensor conv_weight = folded ? fold() : weight;
  if (folded && !relu && !res.defined()) {
    at::Tensor out = detail::conv(x, conv_weight, shift.to(x.scalar_type()), stride, padding, dilation, groups);
    return {out.contiguous(fmt), empty, save_mean, save_var};
  }
  at::Tensor out =
      detail::conv(x, conv_weight, at::Tensor(), stride, padding, dilation, groups).contiguous(fmt);
  kernels.scale_shift_act(out, folded ? at::ones({c_out}, sopts) : scale, shift, res, relu, out);
  return {out, empty, save_mean, save_var};
}

// Backward of conv_bn_act; arguments and results exactly as the schema
// _conv_bn_act_backward_native and cnnkernels/reference.py:
//   grad_out, out [N, C_out, H_out, W_out]; conv_out like out (training) or empty [0]
//   (eval: recomputed from x when grad_bn_weight is wanted); save_mean, save_var [C_out].
//   -> grad_x (x's shape, dtype, output memory format), grad_weight (weight's layout),
//      grad_bias (contiguous, x's dtype), grad_bn_weight, grad_bn_bias ([C_out], statistics
//      dtype), grad_residual (like out). Unwanted (output_mask false) or absent (no bias)
//      grads: empty [0].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_act_backward(const ConvBnActKernels& kernels, const at::Tensor& grad_out,
                     const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias_opt, const at::Tensor& conv_out,
                     const std::optional<at::Tensor>& bn_weight_opt, const at::Tensor& save_mean,
                     const at::Tensor& save_var, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, bool training, double eps,
                     std::string_view activation, std::array<bool, 6> output_mask) {
  const bool relu = check_activation(activation);
  const at::Tensor bias = opt(bias_opt), bn_weight = opt(bn_weight_opt);
  const auto out_sizes = check_conv(x, weight, bias, stride, padding, dilation, groups);
  const auto effective = effective_dilation(weight, dilation);
  dilation = effective;
  const int64_t c_out = out_sizes[1];
  check_defined(grad_out, "grad_out");
  check_same_shape(grad_out, out_sizes, "grad_out", "the output");
  check_floating(grad_out, "grad_out");
  check_same_device(x, "x", grad_out, "grad_out");
  if (relu) {
    check_defined(out, "out");
    check_same_shape(out, out_sizes, "out", "the output");
    check_same_device(x, "x", out, "out");
  }
  check_per_channel(bn_weight_opt, c_out, "bn_weight", x, "x");
  check_defined(save_mean, "save_mean");
  check_defined(save_var, "save_var");
  check_per_channel(save_mean, c_out, "save_mean", x, "x");
  check_per_channel(save_var, c_out, "save_var", x, "x");
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  const bool have_conv_out = conv_out.defined() && conv_out.numel() > 0;
  if (have_conv_out) {
    check_same_shape(conv_out, out_sizes, "conv_out", "the output");
    check_same_device(x, "x", conv_out, "conv_out");
  } else {
    TORCH_CHECK(!training, "conv_out (the forward's conv2d(x) + bias) is required when training");
  }

  const c10::OptionalDeviceGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const auto sopts = x.options().dtype(stats_dtype(x.scalar_type()));
  const auto xopts = x.options().memory_format(fmt);
  const at::Tensor go = grad_out.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor o = relu ? out.to(x.scalar_type()).contiguous(fmt) : at::Tensor();
  const at::Tensor mean = save_mean.to(sopts.dtype()).contiguous();
  const at::Tensor invstd = at::rsqrt(save_var.to(sopts.dtype()) + eps);
  const at::Tensor gamma = per_channel_or(bn_weight, 1.0, c_out, sopts);

  at::Tensor y;
  if (training || output_mask[3]) {
    y = have_conv_out ? conv_out.to(x.scalar_type()).contiguous(fmt)
                      : detail::conv(x, weight, bias, stride, padding, dilation, groups).contiguous(fmt);
  }
  at::Tensor sum_g, sum_g_xhat;
  if (training || output_mask[3] || output_mask[4]) {
    sum_g = at::empty({c_out}, sopts);
    if (y.defined()) sum_g_xhat = at::empty({c_out}, sopts);
    kernels.backward_reduce(go, o, y, mean, invstd, relu, sum_g, sum_g_xhat);
  }

  const bool want_conv = output_mask[0] || output_mask[1] || output_mask[2];
  at::Tensor grad_y = want_conv ? at::empty(out_sizes, xopts) : at::Tensor();
  at::Tensor grad_pre = output_mask[5] ? at::empty(out_sizes, xopts) : at::Tensor();
  if (want_conv || output_mask[5]) {
    const at::Tensor g_scale = gamma * invstd;
    if (training) {
      const double count = static_cast<double>(go.numel() / c_out);
      const at::Tensor y_scale = g_scale * invstd * sum_g_xhat / count;
      const at::Tensor shift = -g_scale * sum_g / count;
      kernels.backward_elementwise(go, o, y, mean, g_scale, y_scale, shift, relu, grad_y, grad_pre);
    } else {
      kernels.backward_elementwise(go, o, at::Tensor(), at::Tensor(), g_scale, at::Tensor(),
                                   at::zeros({c_out}, sopts), relu, grad_y, grad_pre);
    }
  }

  const at::Tensor empty_x = x.new_empty({0}), empty_s = at::empty({0}, sopts);
  at::Tensor grad_x = empty_x, grad_w = empty_x, grad_b = empty_x;
  if (want_conv) {
    const bool want_bias = output_mask[2] && bias.defined();
    const std::array<int64_t, 1> bias_sizes{c_out};
    auto grads = at::convolution_backward(
        grad_y, x, weight, bias.defined() ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
        stride, padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
        {output_mask[0], output_mask[1], want_bias});
    if (output_mask[0]) grad_x = std::get<0>(grads).contiguous(fmt);
    if (output_mask[1]) grad_w = like_weight(std::get<1>(grads), weight);
    if (want_bias) grad_b = std::get<2>(grads).contiguous();
  }
  return {grad_x,
          grad_w,
          grad_b,
          output_mask[3] ? sum_g_xhat : empty_s,
          output_mask[4] ? sum_g : empty_s,
          output_mask[5] ? grad_pre : empty_x};
}

}  // namespace cnnkernels
