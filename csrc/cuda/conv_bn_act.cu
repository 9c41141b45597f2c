// CUDA backend of conv_bn_act. The forward convolution runs in one of three kernels,
// picked by shape (csrc/common/conv_bn_act_kernel_choice.h): 1x1 convolutions as a GEMM
// with the BN epilogue fused (csrc/cuda/conv1x1_bn_act_kernels.cuh), ResNeXt grouped 3x3
// convolutions likewise (csrc/cuda/grouped_conv_bn_act_kernels.cuh), everything else
// through ATen (at::convolution -> cuDNN) in csrc/common/conv_bn_act_driver.h followed by
// the per-channel passes of csrc/cuda/conv_bn_act_kernels.cuh. The backward is always
// the driver's (ATen convolution_backward + those passes). All launches go to the
// current stream; the _native ops are registered for the CUDA dispatch key.
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
#include <type_traits>

#include "common/conv_bn_act_driver.h"
#include "common/conv_bn_act_kernel_choice.h"
#include "cuda/aten_launch.h"
#include "cuda/conv1x1_bn_act_kernels.cuh"
#include "cuda/conv_bn_act_kernels.cuh"
#include "cuda/grouped_conv_bn_act_kernels.cuh"

namespace cnnkernels {
namespace {

namespace k = conv_bn_act_cuda;

using cuda_launch::channel_ptr;
using cuda_launch::DeviceType;
using cuda_launch::in_ptr;
using cuda_launch::out_ptr;

// [N, C, H, W] dense NCHW or channels_last (the driver guarantees one of the two).
k::Geometry geometry(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.is_cuda(), name, " must be a 4-D CUDA tensor");
  const int64_t n = t.size(0), c = t.size(1), s = t.size(2) * t.size(3);
  if (t.is_contiguous()) return k::nchw_geometry(n, c, s);
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be contiguous or channels_last-contiguous, got strides ", t.strides());
  return k::nhwc_geometry(n, c, s);
}

// An optional activation tensor must share the layout and dtype of the first one.
void check_like(const at::Tensor& t, const at::Tensor& like, const k::Geometry& g, const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() && t.device() == like.device(),
              name, " must match the shape, dtype and device of the other activation tensors");
  const bool channels_last = g.stride_c == 1 && g.s > 1;  // NCHW has stride_c == 1 only when S == 1
  const bool ok = channels_last ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous();
  TORCH_CHECK(ok, name, " must have the memory format of the other activation tensors");
}

// Blocks that fill the GPU once; grids are capped here and loop over the rest.
int max_blocks() { return cuda_launch::max_blocks(k::kThreads); }

void batch_stats_cuda(const at::Tensor& y, at::Tensor& mean, at::Tensor& var) {
  const k::Geometry g = geometry(y, "y");
  if (g.c == 0) return;
  if (g.numel() == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const k::ReduceLaunch rl = k::reduce_launch(g, max_blocks());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_act_cuda_batch_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    const auto acc_opts = y.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor p_mean = at::empty({g.c * rl.partials}, acc_opts);
    at::Tensor p_m2 = at::empty({g.c * rl.partials}, acc_opts);
    at::Tensor p_count = at::empty({g.c * rl.partials}, y.options().dtype(at::kLong));
    k::batch_stats_partial_kernel<data_t, acc_t><<<rl.grid, rl.block, 0, stream>>>(
        in_ptr<scalar_t>(y), g, p_mean.mutable_data_ptr<acc_t>(), p_m2.mutable_data_ptr<acc_t>(),
        p_count.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    k::batch_stats_finalize_kernel<data_t, acc_t><<<k::elementwise_grid(g.c, max_blocks()), k::kThreads, 0, stream>>>(
        in_ptr<scalar_t>(y), g, p_mean.const_data_ptr<acc_t>(), p_m2.const_data_ptr<acc_t>(),
        p_count.const_data_ptr<int64_t>(), rl.partials, mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scale_shift_act_cuda(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                          const at::Tensor& residual, bool relu, at::Tensor& out) {
  const k::Geometry g = geometry(y, "y");
  check_like(residual, y, g, "residual");
  check_like(out, y, g, "out");
  if (g.numel() == 0) return;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_act_cuda_scale_shift_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    k::scale_shift_act_kernel<data_t, acc_t><<<k::elementwise_grid(g.numel(), max_blocks()), k::kThreads, 0, stream>>>(
        in_ptr<scalar_t>(y), channel_ptr<acc_t>(scale, g.c, "scale"), channel_ptr<acc_t>(shift, g.c, "shift"),
        in_ptr<scalar_t>(residual), g, relu, out_ptr<scalar_t>(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                          const at::Tensor& mean, const at::Tensor& invstd, bool relu, at::Tensor& sum_g,
                          at::Tensor& sum_g_xhat) {
  const k::Geometry g = geometry(grad_out, "grad_out");
  if (relu) {
    TORCH_CHECK(out.defined(), "out is required for relu");
    check_like(out, grad_out, g, "out");
  }
  check_like(y, grad_out, g, "y");
  const bool with_y = y.defined();
  TORCH_CHECK(!with_y || sum_g_xhat.defined(), "sum_g_xhat must be defined when y is");
  if (g.c == 0) return;
  if (g.numel() == 0) {
    sum_g.zero_();
    if (with_y) sum_g_xhat.zero_();
    return;
  }
  const k::ReduceLaunch rl = k::reduce_launch(g, max_blocks());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "conv_bn_act_cuda_backward_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    const auto acc_opts = grad_out.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor p_g = at::empty({g.c * rl.partials}, acc_opts);
    at::Tensor p_gx = with_y ? at::empty({g.c * rl.partials}, acc_opts) : at::Tensor();
    k::backward_reduce_partial_kernel<data_t, acc_t><<<rl.grid, rl.block, 0, stream>>>(
        in_ptr<scalar_t>(grad_out), relu ? in_ptr<scalar_t>(out) : nullptr, in_ptr<scalar_t>(y),
        with_y ? channel_ptr<acc_t>(mean, g.c, "mean") : nullptr,
        with_y ? channel_ptr<acc_t>(invstd, g.c, "invstd") : nullptr, g,
        relu, p_g.mutable_data_ptr<acc_t>(), with_y ? p_gx.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    k::backward_reduce_finalize_kernel<acc_t><<<k::elementwise_grid(g.c, max_blocks()), k::kThreads, 0, stream>>>(
        p_g.const_data_ptr<acc_t>(), with_y ? p_gx.const_data_ptr<acc_t>() : nullptr, g.c, rl.partials,
        sum_g.mutable_data_ptr<acc_t>(), with_y ? sum_g_xhat.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_elementwise_cuda(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                               const at::Tensor& mean, const at::Tensor& g_scale, const at::Tensor& y_scale,
                               const at::Tensor& shift, bool relu, at::Tensor& grad_y, at::Tensor& grad_pre) {
  const k::Geometry g = geometry(grad_out, "grad_out");
  if (relu) {
    TORCH_CHECK(out.defined(), "out is required for relu");
    check_like(out, grad_out, g, "out");
  }
  check_like(y, grad_out, g, "y");
  check_like(grad_y, grad_out, g, "grad_y");
  check_like(grad_pre, grad_out, g, "grad_pre");
  const bool with_y = y.defined();
  if (g.numel() == 0 || (!grad_y.defined() && !grad_pre.defined())) return;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "conv_bn_act_cuda_backward_elementwise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    k::backward_elementwise_kernel<data_t, acc_t><<<k::elementwise_grid(g.numel(), max_blocks()), k::kThreads, 0, stream>>>(
        in_ptr<scalar_t>(grad_out), relu ? in_ptr<scalar_t>(out) : nullptr, in_ptr<scalar_t>(y),
        with_y ? channel_ptr<acc_t>(mean, g.c, "mean") : nullptr, channel_ptr<acc_t>(g_scale, g.c, "g_scale"),
        with_y ? channel_ptr<acc_t>(y_scale, g.c, "y_scale") : nullptr, channel_ptr<acc_t>(shift, g.c, "shift"), g,
        relu,
        out_ptr<scalar_t>(grad_y), out_ptr<scalar_t>(grad_pre));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------
// The specialised forward convolutions.

// The kernel csrc/common/conv_bn_act_kernel_choice.h picks for this convolution.
ConvBnActKernel choose_kernel(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  ConvBnActDtype dtype;
  switch (x.scalar_type()) {
    case at::kHalf: dtype = ConvBnActDtype::kFloat16; break;
    case at::kBFloat16: dtype = ConvBnActDtype::kBFloat16; break;
    case at::kFloat: dtype = ConvBnActDtype::kFloat32; break;
    case at::kDouble: dtype = ConvBnActDtype::kFloat64; break;
    default: return ConvBnActKernel::kCudnnEpilogue;
  }
  if (x.dim() != 4 || weight.dim() != 4 || !x.is_cuda()) return ConvBnActKernel::kCudnnEpilogue;
  const ConvBnActShape shape{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2),
                             weight.size(3), stride[0], stride[1], padding[0], padding[1], dilation[0],
                             dilation[1], groups, dtype,
                             output_memory_format(x) == at::MemoryFormat::ChannelsLast,
                             at::globalContext().allowTF32CuDNN(at::Float32Op::CONV)};
  return choose_conv_bn_act_kernel(shape);
}

// Launches conv1x1_bn_act_kernel (float and double only: the choice never picks it for
// float16 / bfloat16, so those are not compiled).
template <typename data_t, typename acc_t, bool kTraining>
void launch_conv1x1(const data_t* x, const data_t* weight, const k::Conv1x1Geometry& g, dim3 grid,
                    const k::TileEpilogue<data_t, acc_t>& e, cudaStream_t stream) {
  if constexpr (std::is_same_v<data_t, acc_t>) {
    k::conv1x1_bn_act_kernel<data_t, acc_t, kTraining><<<grid, k::kConvThreads, 0, stream>>>(x, weight, g, e);
  } else {
    TORCH_CHECK(false, "conv1x1_gemm is built for float32 and float64 only");
  }
}

// Runs the specialised kernel `which` on x (channels_last, checked by the choice) and
// returns its output, channels_last [N, C_out, H_out, W_out]:
//   eval (train_mean == nullptr): act(conv(x) * scale + shift + residual);
//   training: y = conv(x) + bias, with the batch mean / biased variance of y merged from
//   the kernel's per-tile statistics into *train_mean / *train_var.
at::Tensor specialised_conv(ConvBnActKernel which, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                            int64_t groups, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& residual, bool relu, const at::Tensor& bias, at::Tensor* train_mean,
                            at::Tensor* train_var) {
  const bool training = train_mean != nullptr;
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3), c_out = weight.size(0);
  // 1x1 with padding 0 and 3x3 with padding 1 both give (size - 1) / stride + 1.
  at::Tensor result = at::empty({n, c_out, (h - 1) / stride + 1, (w - 1) / stride + 1},
                                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "x must be channels_last-contiguous here");
  if (residual.defined()) {
    TORCH_CHECK(residual.sizes() == result.sizes() && residual.scalar_type() == x.scalar_type() &&
                    residual.is_contiguous(at::MemoryFormat::ChannelsLast),
                "residual must be a channels_last-contiguous ", x.scalar_type(), " tensor of shape ", result.sizes());
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_bn_act_cuda_specialised", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor bias_acc = bias.defined() ? bias.to(acc_opts).contiguous() : at::Tensor();
    k::TileEpilogue<data_t, acc_t> e{};
    e.c_out = static_cast<int>(c_out);
    if (training) {
      e.bias = bias_acc.defined() ? channel_ptr<acc_t>(bias_acc, c_out, "bias") : nullptr;
      e.y = out_ptr<scalar_t>(result);
    } else {
      e.scale = channel_ptr<acc_t>(scale, c_out, "scale");
      e.shift = channel_ptr<acc_t>(shift, c_out, "shift");
      e.residual = in_ptr<scalar_t>(residual);
      e.relu = relu;
      e.out = out_ptr<scalar_t>(result);
    }
    at::Tensor p_mean, p_m2, p_count;
    auto partials = [&](int tiles) {
      if (!training) return;
      e.partials = tiles;
      p_mean = at::empty({c_out * tiles}, acc_opts);
      p_m2 = at::empty({c_out * tiles}, acc_opts);
      p_count = at::empty({tiles}, x.options().dtype(at::kInt));
      e.partial_mean = p_mean.mutable_data_ptr<acc_t>();
      e.partial_m2 = p_m2.mutable_data_ptr<acc_t>();
      e.partial_count = p_count.mutable_data_ptr<int>();
    };
    if (which == ConvBnActKernel::kConv1x1Gemm) {
      const at::Tensor wt = weight.contiguous();  // [C_out, C_in, 1, 1] = [C_out, C_in]
      const k::Conv1x1Geometry g = k::conv1x1_geometry(n, c_in, h, w, c_out, stride);
      const dim3 grid = k::conv1x1_grid(g);
      partials(static_cast<int>(grid.x));
      if (training) launch_conv1x1<data_t, acc_t, true>(in_ptr<scalar_t>(x), in_ptr<scalar_t>(wt), g, grid, e, stream);
      else launch_conv1x1<data_t, acc_t, false>(in_ptr<scalar_t>(x), in_ptr<scalar_t>(wt), g, grid, e, stream);
    } else {
      const at::Tensor wt = weight.contiguous(at::MemoryFormat::ChannelsLast);  // [C_out][3][3][C_in/groups]
      const k::GroupedConvGeometry g = k::grouped_conv_plan<acc_t>(n, c_in, h, w, c_out, groups, static_cast<int>(stride));
      const dim3 grid = k::grouped_conv_grid(g);
      partials(g.pixel_tiles());
      auto launch = [&](auto kernel) {
        kernel<<<grid, k::kConvThreads, 0, stream>>>(in_ptr<scalar_t>(x), in_ptr<scalar_t>(wt), g, e);
      };
      if (training) k::with_grouped_conv_kernel<data_t, acc_t, true>(g, launch);
      else k::with_grouped_conv_kernel<data_t, acc_t, false>(g, launch);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (training) {
      const int64_t blocks = c_out < max_blocks() ? c_out : max_blocks();
      k::tile_stats_merge_kernel<acc_t><<<static_cast<unsigned int>(blocks), k::merge_threads(e.partials), 0, stream>>>(
          p_mean.const_data_ptr<acc_t>(), p_m2.const_data_ptr<acc_t>(), p_count.const_data_ptr<int>(), e.partials,
          c_out, train_mean->mutable_data_ptr<acc_t>(), train_var->mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return result;
}

at::Tensor eval_conv_epilogue_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                   const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, const at::Tensor& residual, bool relu) {
  const ConvBnActKernel which = choose_kernel(x, weight, stride, padding, dilation, groups);
  if (which == ConvBnActKernel::kCudnnEpilogue) return at::Tensor();
  return specialised_conv(which, x, weight, stride[0], groups, scale, shift, residual, relu, at::Tensor(), nullptr,
                          nullptr);
}

at::Tensor train_conv_stats_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, at::Tensor& mean, at::Tensor& var) {
  const ConvBnActKernel which = choose_kernel(x, weight, stride, padding, dilation, groups);
  if (which == ConvBnActKernel::kCudnnEpilogue) return at::Tensor();
  return specialised_conv(which, x, weight, stride[0], groups, at::Tensor(), at::Tensor(), at::Tensor(), false, bias,
                          &mean, &var);
}

const ConvBnActKernels& cuda_kernels() {
  static const ConvBnActKernels kernels{&batch_stats_cuda,          &scale_shift_act_cuda,
                                        &backward_reduce_cuda,      &backward_elementwise_cuda,
                                        /*eval_fused_conv=*/nullptr, &eval_conv_epilogue_cuda,
                                        &train_conv_stats_cuda};
  return kernels;
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  using namespace cnnkernels;
  m.impl("_conv_bn_act_forward_native", with_kernels<&conv_bn_act_forward, &cuda_kernels>);
  m.impl("_conv_bn_act_backward_native", with_kernels<&conv_bn_act_backward, &cuda_kernels>);
}
