// CUDA backend of bn_act_conv: out = conv2d(act(batch_norm(x)), weight, bias).
//
// The ATen-level logic (checks, statistics dtype, memory formats, BN scale/shift, the
// recomputation for backward, at::convolution_backward) is the shared host driver
// csrc/common/bn_act_conv_driver.h. This file supplies its passes, launched on the
// current stream from csrc/cuda/bn_act_conv_kernels.cuh:
//   batch_stats           per-channel mean / biased variance of x (any strides)
//   fused_conv            implicit-GEMM convolution whose x-tile loads apply BN + act,
//                         so act(bn(x)) is never written; writes `out` with any strides
//                         (a channel slice of a bigger buffer for the into form)
//   scale_shift_act       act(bn(x)) into a temporary (backward: the input of ATen's
//                         convolution_backward)
//   backward_reduce / backward_elementwise   the fused BN + activation backward
// and registers the three _native ops for the CUDA dispatch key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "common/bn_act_conv_driver.h"
#include "cuda/aten_launch.h"
#include "cuda/bn_act_conv_kernels.cuh"

namespace cnnkernels {
namespace {

namespace k = bn_act_conv_cuda;

using cuda_launch::channel_ptr;
using cuda_launch::DeviceType;
using cuda_launch::in_ptr;
using cuda_launch::out_ptr;

// A per-channel output vector (see channel_ptr), or nullptr when t is undefined.
template <typename acc_t>
acc_t* channel_out(at::Tensor& t, int64_t c, const char* name) {
  if (!t.defined()) return nullptr;
  TORCH_CHECK(t.dim() == 1 && t.numel() == c && t.is_contiguous(), name, " must be a contiguous [", c,
              "] tensor, got shape ", t.sizes());
  return t.mutable_data_ptr<acc_t>();
}

k::Shape shape_of(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2), t.size(3)}; }
k::Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// A 4-D CUDA tensor of x's shape, dtype and device (any strides).
void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.dim() == 4, name, " must be a 4-D CUDA tensor");
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(), name,
              " must have the shape, dtype and device of x");
}

// Blocks that fill the GPU once; grids are capped here and loop over the rest.
int max_blocks() { return cuda_launch::max_blocks(k::kThreads); }

void batch_stats_cuda(const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x must be a 4-D CUDA tensor");
  const k::Shape s = shape_of(x);
  const k::Strides xs = strides_of(x);
  if (s.c == 0) return;
  if (x.numel() == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const k::ReduceLaunch rl = k::reduce_launch(s, k::channels_fast(s, xs), max_blocks());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_conv_cuda_batch_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor p_mean = at::empty({s.c * rl.partials}, acc_opts);
    at::Tensor p_m2 = at::empty({s.c * rl.partials}, acc_opts);
    at::Tensor p_count = at::empty({s.c * rl.partials}, x.options().dtype(at::kLong));
    k::batch_stats_partial_kernel<data_t, acc_t><<<rl.grid, rl.block, 0, stream>>>(
        in_ptr<scalar_t>(x), s, xs, p_mean.mutable_data_ptr<acc_t>(), p_m2.mutable_data_ptr<acc_t>(),
        p_count.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    k::batch_stats_finalize_kernel<data_t, acc_t><<<k::elementwise_grid(s.c, max_blocks()), k::kThreads, 0, stream>>>(
        in_ptr<scalar_t>(x), s, xs, p_mean.const_data_ptr<acc_t>(), p_m2.const_data_ptr<acc_t>(),
        p_count.const_data_ptr<int64_t>(), rl.partials, channel_out<acc_t>(mean, s.c, "mean"),
        channel_out<acc_t>(var, s.c, "var"));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scale_shift_act_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                          at::Tensor& z) {
  check_like_x(x, x, "x");
  check_like_x(z, x, "z");
  if (x.numel() == 0) return;
  const k::Shape s = shape_of(x);
  const k::Walk walk = k::make_walk(s, k::channels_fast(s, strides_of(z)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_conv_cuda_scale_shift_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    k::bn_act_kernel<data_t, acc_t><<<k::elementwise_grid(x.numel(), max_blocks()), k::kThreads, 0, stream>>>(
        in_ptr<scalar_t>(x), k::walk_strides(strides_of(x), walk), channel_ptr<acc_t>(scale, s.c, "scale"),
        channel_ptr<acc_t>(shift, s.c, "shift"), relu, walk, out_ptr<scalar_t>(z),
        k::walk_strides(strides_of(z), walk));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_reduce_cuda(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                          const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                          at::Tensor& sum_g, at::Tensor& sum_g_xhat) {
  check_like_x(x, x, "x");
  check_like_x(grad_z, x, "grad_z");
  const k::Shape s = shape_of(x);
  const k::Strides xs = strides_of(x);
  const bool with_xhat = sum_g_xhat.defined();
  if (s.c == 0) return;
  if (x.numel() == 0) {
    sum_g.zero_();
    if (with_xhat) sum_g_xhat.zero_();
    return;
  }
  const k::ReduceLaunch rl = k::reduce_launch(s, k::channels_fast(s, xs), max_blocks());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_conv_cuda_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor p_g = at::empty({s.c * rl.partials}, acc_opts);
    at::Tensor p_gx = with_xhat ? at::empty({s.c * rl.partials}, acc_opts) : at::Tensor();
    k::backward_reduce_partial_kernel<data_t, acc_t><<<rl.grid, rl.block, 0, stream>>>(
        in_ptr<scalar_t>(grad_z), strides_of(grad_z), in_ptr<scalar_t>(x), xs, s,
        channel_ptr<acc_t>(scale, s.c, "scale"), channel_ptr<acc_t>(shift, s.c, "shift"),
        with_xhat ? channel_ptr<acc_t>(mean, s.c, "mean") : nullptr,
        with_xhat ? channel_ptr<acc_t>(invstd, s.c, "invstd") : nullptr, relu, p_g.mutable_data_ptr<acc_t>(),
        with_xhat ? p_gx.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    k::backward_reduce_finalize_kernel<acc_t><<<k::elementwise_grid(s.c, max_blocks()), k::kThreads, 0, stream>>>(
        p_g.const_data_ptr<acc_t>(), with_xhat ? p_gx.const_data_ptr<acc_t>() : nullptr, s.c, rl.partials,
        channel_out<acc_t>(sum_g, s.c, "sum_g"), channel_out<acc_t>(sum_g_xhat, s.c, "sum_g_xhat"));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_elementwise_cuda(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& g_scale,
                               const at::Tensor& x_scale, const at::Tensor& g_shift, bool relu, at::Tensor& grad_x) {
  check_like_x(x, x, "x");
  check_like_x(grad_z, x, "grad_z");
  check_like_x(grad_x, x, "grad_x");
  if (x.numel() == 0) return;
  const k::Shape s = shape_of(x);
  const bool with_x = x_scale.defined();
  const k::Walk walk = k::make_walk(s, k::channels_fast(s, strides_of(grad_x)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_conv_cuda_backward_elementwise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    k::backward_elementwise_kernel<data_t, acc_t><<<k::elementwise_grid(x.numel(), max_blocks()), k::kThreads, 0, stream>>>(
        in_ptr<scalar_t>(grad_z), k::walk_strides(strides_of(grad_z), walk), in_ptr<scalar_t>(x),
        k::walk_strides(strides_of(x), walk), walk, channel_ptr<acc_t>(scale, s.c, "scale"),
        channel_ptr<acc_t>(shift, s.c, "shift"), channel_ptr<acc_t>(g_scale, s.c, "g_scale"),
        channel_ptr<acc_t>(g_shift, s.c, "g_shift"), with_x ? channel_ptr<acc_t>(mean, s.c, "mean") : nullptr,
        channel_ptr<acc_t>(x_scale, s.c, "x_scale", /*optional=*/true), relu, out_ptr<scalar_t>(grad_x),
        k::walk_strides(strides_of(grad_x), walk));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The kernel indexes input rows and taps with int: decline (ATen runs the conv) when a
// size could overflow it.
bool fits_int(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
              at::IntArrayRef dilation, int64_t groups) {
  constexpr int64_t kLimit = int64_t(1) << 30;
  const int64_t cg = x.size(1) / groups, cog = weight.size(0) / groups;
  const int64_t depth = cg * weight.size(2) * weight.size(3);
  bool ok = depth < kLimit && cog < kLimit && groups < kLimit;
  for (int d = 0; d < 2; ++d) {
    ok = ok && x.size(2 + d) + 2 * padding[d] + stride[d] < kLimit && dilation[d] * weight.size(2 + d) < kLimit;
  }
  return ok;
}

bool fused_conv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& scale,
                     const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, bool relu, at::Tensor& out) {
  check_like_x(x, x, "x");
  TORCH_CHECK(out.is_cuda() && out.dim() == 4 && out.scalar_type() == x.scalar_type(),
              "out must be a 4-D CUDA tensor of x's dtype");
  if (!fits_int(x, weight, stride, padding, dilation, groups)) return false;
  if (out.numel() == 0) return true;
  const k::Shape xsh = shape_of(x), osh = shape_of(out);
  const k::Strides xs = strides_of(x), os = strides_of(out);
  const k::ConvShape cs =
      k::conv_shape(xsh, weight.size(0), static_cast<int>(weight.size(2)), static_cast<int>(weight.size(3)),
                    static_cast<int>(stride[0]), static_cast<int>(stride[1]), static_cast<int>(padding[0]),
                    static_cast<int>(padding[1]), static_cast<int>(dilation[0]), static_cast<int>(dilation[1]),
                    static_cast<int>(groups));
  TORCH_CHECK(cs.h_out == osh.h && cs.w_out == osh.w && osh.n == xsh.n && osh.c == weight.size(0),
              "out must have the conv output shape");
  if (cs.cg == 0) {  // no input channels: the output is the bias
    if (bias.defined()) {
      out.copy_(bias.view({1, -1, 1, 1}).expand_as(out));
    } else {
      out.zero_();
    }
    return true;
  }
  const k::ConvLaunch cl = k::conv_launch(cs, xsh, xs, osh, os);
  if (!cl.ok) return false;
  const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous();  // [C_out, kH, kW, Cg]
  const at::Tensor b = bias.defined() ? bias.contiguous() : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(k::kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_conv_cuda_fused_conv", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    const k::ConvArgs<data_t, acc_t> args{in_ptr<scalar_t>(x),
                                          xs,
                                          channel_ptr<acc_t>(scale, xsh.c, "scale"),
                                          channel_ptr<acc_t>(shift, xsh.c, "shift"),
                                          relu,
                                          in_ptr<scalar_t>(w),
                                          in_ptr<scalar_t>(b),
                                          out_ptr<scalar_t>(out),
                                          os,
                                          cs,
                                          cl.out_pixel_fast};
    k::conv_kernel_of<data_t, acc_t>(cl.variant)<<<cl.grid, block, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

const BnActConvKernels& cuda_kernels() {
  static const BnActConvKernels kernels{&batch_stats_cuda, &scale_shift_act_cuda, &backward_reduce_cuda,
                                        &backward_elementwise_cuda, &fused_conv_cuda};
  return kernels;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  using namespace cnnkernels;
  m.impl("_bn_act_conv_forward_native", with_kernels<&bn_act_conv_forward, &cuda_kernels>);
  m.impl("_bn_act_conv_into_native", with_kernels<&bn_act_conv_into, &cuda_kernels>);
  m.impl("_bn_act_conv_backward_native", with_kernels<&bn_act_conv_backward, &cuda_kernels>);
}
