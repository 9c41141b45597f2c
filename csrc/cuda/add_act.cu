// CUDA backend of add_act: launches the kernels of csrc/cuda/add_act_kernels.cuh on the
// current stream and registers _add_act_forward_native / _add_act_backward_native for
// the CUDA dispatch key. Checks and the layout convention: csrc/common/add_act_driver.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <string_view>

#include "common/add_act_driver.h"
#include "cuda/aten_launch.h"
#include "cuda/add_act_kernels.cuh"

namespace cnnkernels {
namespace {

namespace k = add_act_cuda;

using cuda_launch::DeviceType;
using cuda_launch::in_ptr;
using cuda_launch::out_ptr;

// Blocks that fill the GPU once; the grid is capped here and loops over the rest.
int max_blocks() { return cuda_launch::max_blocks(k::kThreads); }

// out = act(first + second) (forward) or second * (first > 0) / second (backward), on
// first's device.
at::Tensor run_cuda(const AddActCall& call, const char* first_name) {
  const AddActBuffers& b = call.buffers;
  TORCH_CHECK(b.first.is_cuda(), first_name, " must be a CUDA tensor, got ", b.first.device());
  const c10::cuda::CUDAGuard guard(b.first.device());
  at::Tensor out = b.out;
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using data_t = typename DeviceType<scalar_t>::type;
    const dim3 grid = k::add_act_grid(numel, max_blocks());
    if (call.backward) {
      k::add_act_backward_kernel<data_t, acc_t><<<grid, k::kThreads, 0, stream>>>(
          in_ptr<scalar_t>(b.second), in_ptr<scalar_t>(b.first), numel, call.relu, out_ptr<scalar_t>(out));
    } else {
      k::add_act_forward_kernel<data_t, acc_t><<<grid, k::kThreads, 0, stream>>>(
          in_ptr<scalar_t>(b.first), in_ptr<scalar_t>(b.second), numel, call.relu, out_ptr<scalar_t>(out));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor add_act_forward_cuda(const at::Tensor& x, const at::Tensor& residual, std::string_view activation) {
  return run_cuda(add_act_call(x, "x", residual, "residual", activation, /*backward=*/false), "x");
}

at::Tensor add_act_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, std::string_view activation) {
  return run_cuda(add_act_call(out, "out", grad_out, "grad_out", activation, /*backward=*/true), "out");
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("_add_act_forward_native", &cnnkernels::add_act_forward_cuda);
  m.impl("_add_act_backward_native", &cnnkernels::add_act_backward_cuda);
}
