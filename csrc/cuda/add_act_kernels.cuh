// Device code of the CUDA backend of add_act: out = act(x + residual) and its backward
// grad = grad_out * (out > 0) (relu) / grad_out (none).
//
// No torch / ATen here, so that the same source compiles under nvcc (for
// csrc/cuda/add_act.cu) and under g++ with csrc/emulation/cuda_host_emulation.h (for
// tests/cuda_emulation/test_add_act_kernels.py).
//
// The launcher makes every tensor dense in the output's memory format
// (csrc/common/add_act_driver.h), so the kernels walk one flat index: a grid-stride
// loop in which each thread handles kUnroll elements kThreads apart per step (loads
// issued before the stores, coalesced across the block), then a plain tail loop.
//
// Types: scalar_t is the data type (float, double, __half, __nv_bfloat16 under nvcc;
// float, double under the emulation); acc_t is float, or double for double data.
#pragma once

#include <cstdint>

#include "cuda/device_io.cuh"

namespace cnnkernels {
namespace add_act_cuda {

using namespace device_io;  // load_value, store_value, masked_grad, grid_stride_blocks

constexpr int kThreads = 256;  // threads per block
constexpr int kUnroll = 4;     // elements per thread and grid-stride step

// Grid of the kernels: enough blocks for every element once (kUnroll per thread),
// capped at max_blocks (the GPU's resident-block budget); the grid-stride loop covers
// the rest.
inline dim3 add_act_grid(int64_t numel, int max_blocks) {
  return grid_stride_blocks(numel, int64_t(kThreads) * kUnroll, max_blocks);
}

template <typename acc_t>
__device__ __forceinline__ acc_t relu_if(acc_t v, bool relu) {
  return (relu && v < acc_t(0)) ? acc_t(0) : v;  // keeps NaN, like torch.relu
}

// out = act(x + residual). out may alias x or residual (each element is read before it
// is written by the same thread), hence no __restrict__.
template <typename scalar_t, typename acc_t>
__global__ void add_act_forward_kernel(const scalar_t* x, const scalar_t* residual, int64_t numel, bool relu,
                                       scalar_t* out) {
  const int64_t tile = int64_t(blockDim.x) * kUnroll;
  const int64_t step = tile * gridDim.x;
  int64_t base = int64_t(blockIdx.x) * tile + threadIdx.x;
  for (; base + (kUnroll - 1) * int64_t(blockDim.x) < numel; base += step) {
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * int64_t(blockDim.x);
      v[u] = static_cast<acc_t>(load_value(x + i)) + static_cast<acc_t>(load_value(residual + i));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_value(out + base + u * int64_t(blockDim.x), relu_if(v[u], relu));
  }
  for (int u = 0; u < kUnroll; ++u) {  // the last, partial tile of this thread
    const int64_t i = base + u * int64_t(blockDim.x);
    if (i < numel) {
      const acc_t v = static_cast<acc_t>(load_value(x + i)) + static_cast<acc_t>(load_value(residual + i));
      store_value(out + i, relu_if(v, relu));
    }
  }
}

// grad = grad_out * (out > 0) for relu, grad_out for none. grad may alias grad_out.
template <typename scalar_t, typename acc_t>
__global__ void add_act_backward_kernel(const scalar_t* grad_out, const scalar_t* __restrict__ out,
                                        int64_t numel, bool relu, scalar_t* grad) {
  const int64_t tile = int64_t(blockDim.x) * kUnroll;
  const int64_t step = tile * gridDim.x;
  int64_t base = int64_t(blockIdx.x) * tile + threadIdx.x;
  auto masked = [&](int64_t i) { return masked_grad<scalar_t, acc_t>(grad_out, out, i, relu); };
  for (; base + (kUnroll - 1) * int64_t(blockDim.x) < numel; base += step) {
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = masked(base + u * int64_t(blockDim.x));
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_value(grad + base + u * int64_t(blockDim.x), v[u]);
  }
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + u * int64_t(blockDim.x);
    if (i < numel) store_value(grad + i, masked(i));
  }
}

}  // namespace add_act_cuda
}  // namespace cnnkernels
