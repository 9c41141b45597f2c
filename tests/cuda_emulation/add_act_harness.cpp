// Runs the real kernels of csrc/cuda/add_act_kernels.cuh on the CPU through
// csrc/emulation/cuda_host_emulation.h, with the launch shape the CUDA launcher uses
// (add_act_grid); max_blocks stands in for the GPU's block budget so that tests can
// force the grid-stride loop.
//
// extern "C" entry points for ctypes, suffixed _f32 / _f64. Tensors are dense flat
// buffers of numel elements (the launcher makes them dense in one memory format).
// Each returns 0 on success, 1 if the launch was refused.
#include <cstdint>

#include "cuda/add_act_kernels.cuh"
#include "harness_common.h"

namespace {

using namespace cnnkernels::add_act_cuda;
using cnnkernels_harness::guarded;
using cuda_emulation::launch;

}  // namespace

#define CNNKERNELS_ADD_ACT_HARNESS(SUFFIX, T)                                                          \
  extern "C" int add_act_forward_##SUFFIX(const T* x, const T* residual, int64_t numel, int relu,    \
                                          int max_blocks, T* out) {                                  \
    return guarded([&] {                                                                             \
      launch(add_act_grid(numel, max_blocks), dim3(kThreads), add_act_forward_kernel<T, T>, x,       \
             residual, numel, relu != 0, out);                                                       \
    });                                                                                              \
  }                                                                                                  \
  extern "C" int add_act_backward_##SUFFIX(const T* grad_out, const T* out, int64_t numel, int relu, \
                                           int max_blocks, T* grad) {                                \
    return guarded([&] {                                                                             \
      launch(add_act_grid(numel, max_blocks), dim3(kThreads), add_act_backward_kernel<T, T>,        \
             grad_out, out, numel, relu != 0, grad);                                                 \
    });                                                                                              \
  }

CNNKERNELS_ADD_ACT_HARNESS(f32, float)
CNNKERNELS_ADD_ACT_HARNESS(f64, double)
