// CUDA backend of se_excite: launches the kernels of csrc/cuda/se_excite_kernels.cuh on
// the current stream and registers _se_excite_forward_native /
// _se_excite_backward_native for the CUDA dispatch key.
//
// Forward: squeeze_gate_kernel (one block per sample: squeeze, fc1 + relu, fc2 +
// sigmoid) then scale_kernel (out = act(x * gate + residual)).
// Backward: backward_sample_kernel (one block per sample: d_z2, d_z1, d_squeezed), the
// weight_grad_kernel for each wanted fc gradient, backward_elementwise_kernel (grad_x,
// grad_residual).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "common/checks.h"
#include "common/op_args.h"
#include "common/se_excite_args.h"
#include "cuda/aten_launch.h"
#include "cuda/se_excite_kernels.cuh"

namespace cnnkernels {
namespace {

namespace k = se_excite_cuda;

using cuda_launch::DeviceType;
using cuda_launch::in_ptr;
using cuda_launch::out_ptr;

template <typename T>
const T* acc_in(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* acc_out(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

int max_blocks() { return cuda_launch::max_blocks(k::kThreads); }

at::Tensor fc_param(const std::optional<at::Tensor>& t, at::IntArrayRef sizes, const at::Tensor& x,
                    const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_same_dtype(x, "x", *t, name);
  check_same_device(x, "x", *t, name);
  check_same_shape(*t, sizes, name, "the fc layer");
  return t->contiguous();
}

at::Tensor per_sample(const at::Tensor& t, int64_t n, int64_t kk, at::ScalarType acc, const at::Tensor& x,
                      const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == kk, name, " must have shape [", n, ", ", kk,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, name, " must be in the statistics dtype ", acc, ", got ", t.scalar_type());
  check_same_device(x, "x", t, name);
  return t.contiguous();
}

struct Shape {
  int64_t n, c, s, r;
};

Shape check_shapes(const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight) {
  const SeExciteSizes sizes = check_se_excite_x(x);
  const int64_t n = sizes.n, c = sizes.c, s = sizes.s;
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  check_defined(fc1_weight, "fc1_weight");
  check_ndim(fc1_weight, 2, "fc1_weight");
  const int64_t r = fc1_weight.size(0);
  TORCH_CHECK(r >= 1 && fc1_weight.size(1) == c, "fc1_weight must have shape [R, ", c, "] with R >= 1, got ",
              fc1_weight.sizes());
  check_defined(fc2_weight, "fc2_weight");
  check_ndim(fc2_weight, 2, "fc2_weight");
  TORCH_CHECK(fc2_weight.size(0) == c && fc2_weight.size(1) == r, "fc2_weight must have shape [", c, ", ", r,
              "], got ", fc2_weight.sizes());
  return {n, c, s, r};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x_in, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
    const std::optional<at::Tensor>& residual_in, std::string_view activation) {
  const bool relu = check_activation(activation);
  const Shape sh = check_shapes(x_in, fc1_weight, fc2_weight);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor residual = like_x(residual_in, x, fmt, "residual");
  const at::Tensor w1 = fc_param(fc1_weight, {sh.r, sh.c}, x, "fc1_weight");
  const at::Tensor w2 = fc_param(fc2_weight, {sh.c, sh.r}, x, "fc2_weight");
  const at::Tensor b1 = fc_param(fc1_bias, {sh.r}, x, "fc1_bias");
  const at::Tensor b2 = fc_param(fc2_bias, {sh.c}, x, "fc2_bias");
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor out = at::empty_like(x, x.options(), fmt);
  at::Tensor squeezed = at::empty({sh.n, sh.c}, acc_opts), hidden = at::empty({sh.n, sh.r}, acc_opts),
             gate = at::empty({sh.n, sh.c}, acc_opts);
  if (sh.n == 0) return {out, squeezed, hidden, gate};
  const k::Geometry g{sh.n, sh.c, sh.s, fmt == at::MemoryFormat::ChannelsLast};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_excite_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    k::squeeze_gate_kernel<data_t, acc_t><<<k::sample_grid(sh.n, max_blocks()), k::kThreads, 0, stream>>>(
        in_ptr<scalar_t>(x), g, in_ptr<scalar_t>(w1), in_ptr<scalar_t>(b1), in_ptr<scalar_t>(w2),
        in_ptr<scalar_t>(b2), sh.r, acc_out<acc_t>(squeezed), acc_out<acc_t>(hidden), acc_out<acc_t>(gate));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    k::scale_kernel<data_t, acc_t><<<k::elementwise_grid(g, max_blocks()), k::kThreads, 0, stream>>>(
        in_ptr<scalar_t>(x), acc_in<acc_t>(gate), in_ptr<scalar_t>(residual), g, relu, out_ptr<scalar_t>(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, squeezed, hidden, gate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& out_in, const at::Tensor& x_in, const at::Tensor& fc1_weight,
    const at::Tensor& fc2_weight, const at::Tensor& squeezed_in, const at::Tensor& hidden_in,
    const at::Tensor& gate_in, std::string_view activation, std::array<bool, 6> mask) {
  const bool relu = check_activation(activation);
  const Shape sh = check_shapes(x_in, fc1_weight, fc2_weight);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const SeExciteGrads grads = se_excite_backward_inputs(grad_out_in, out_in, x, fmt, relu);
  const at::Tensor &grad_out = grads.grad_out, &out = grads.out;
  const at::Tensor w1 = fc_param(fc1_weight, {sh.r, sh.c}, x, "fc1_weight");
  const at::Tensor w2 = fc_param(fc2_weight, {sh.c, sh.r}, x, "fc2_weight");
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  const at::Tensor squeezed = per_sample(squeezed_in, sh.n, sh.c, acc, x, "squeezed");
  const at::Tensor hidden = per_sample(hidden_in, sh.n, sh.r, acc, x, "hidden");
  const at::Tensor gate = per_sample(gate_in, sh.n, sh.c, acc, x, "gate");

  const bool need_fc = mask[0] || mask[1] || mask[2] || mask[3] || mask[4];
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor grad_x = mask[0] ? at::empty_like(x, x.options(), fmt) : at::Tensor();
  at::Tensor grad_res = mask[5] ? at::empty_like(x, x.options(), fmt) : at::Tensor();
  at::Tensor gw1 = mask[1] ? at::empty({sh.r, sh.c}, x.options()) : at::Tensor();
  at::Tensor gb1 = mask[2] ? at::empty({sh.r}, x.options()) : at::Tensor();
  at::Tensor gw2 = mask[3] ? at::empty({sh.c, sh.r}, x.options()) : at::Tensor();
  at::Tensor gb2 = mask[4] ? at::empty({sh.c}, x.options()) : at::Tensor();
  const at::Tensor empty = x.new_empty({0});
  auto result = [&] {
    auto pick = [&](const at::Tensor& t) { return t.defined() ? t : empty; };
    return std::make_tuple(pick(grad_x), pick(gw1), pick(gb1), pick(gw2), pick(gb2), pick(grad_res));
  };
  if (sh.n == 0) {
    for (at::Tensor* t : {&gw1, &gb1, &gw2, &gb2}) {
      if (t->defined()) t->zero_();
    }
    return result();
  }
  const k::Geometry g{sh.n, sh.c, sh.s, fmt == at::MemoryFormat::ChannelsLast};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "se_excite_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    at::Tensor d_sq;
    if (need_fc) {
      at::Tensor d_z2 = at::empty({sh.n, sh.c}, acc_opts), d_z1 = at::empty({sh.n, sh.r}, acc_opts);
      if (mask[0]) d_sq = at::empty({sh.n, sh.c}, acc_opts);
      k::backward_sample_kernel<data_t, acc_t><<<k::sample_grid(sh.n, max_blocks()), k::kThreads, 0, stream>>>(
          in_ptr<scalar_t>(grad_out), in_ptr<scalar_t>(out), in_ptr<scalar_t>(x), g, in_ptr<scalar_t>(w1),
          in_ptr<scalar_t>(w2), sh.r, acc_in<acc_t>(hidden), acc_in<acc_t>(gate), relu, acc_out<acc_t>(d_z2),
          acc_out<acc_t>(d_z1), acc_out<acc_t>(d_sq));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (mask[1] || mask[2]) {
        k::weight_grad_kernel<data_t, acc_t><<<k::flat_grid(sh.r * sh.c, max_blocks()), k::kThreads, 0, stream>>>(
            acc_in<acc_t>(d_z1), acc_in<acc_t>(squeezed), sh.n, sh.r, sh.c, out_ptr<scalar_t>(gw1),
            out_ptr<scalar_t>(gb1));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (mask[3] || mask[4]) {
        k::weight_grad_kernel<data_t, acc_t><<<k::flat_grid(sh.c * sh.r, max_blocks()), k::kThreads, 0, stream>>>(
            acc_in<acc_t>(d_z2), acc_in<acc_t>(hidden), sh.n, sh.c, sh.r, out_ptr<scalar_t>(gw2),
            out_ptr<scalar_t>(gb2));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (mask[0] || mask[5]) {
      k::backward_elementwise_kernel<data_t, acc_t><<<k::elementwise_grid(g, max_blocks()), k::kThreads, 0, stream>>>(
          in_ptr<scalar_t>(grad_out), in_ptr<scalar_t>(out), acc_in<acc_t>(gate), acc_in<acc_t>(d_sq), g, relu,
          out_ptr<scalar_t>(grad_x), out_ptr<scalar_t>(grad_res));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return result();
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("_se_excite_forward_native", &cnnkernels::forward_cuda);
  m.impl("_se_excite_backward_native", &cnnkernels::backward_cuda);
}
