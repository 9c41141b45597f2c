// Runs the real kernels of csrc/cuda/se_excite_kernels.cuh on the CPU through
// csrc/emulation/cuda_host_emulation.h, with the launch shapes csrc/cuda/se_excite.cu
// uses (sample_grid, elementwise_grid, flat_grid); max_blocks stands in for the GPU's
// block budget so that tests can force the grid-stride loops over samples and elements.
//
// extern "C" entry points for ctypes, suffixed _f32 / _f64 (data and statistics both
// float or both double). x-like tensors are dense [N, C, S] (S = H*W), NCHW when
// channels_last == 0, NHWC otherwise; w1 [R, C], w2 [C, R], per-sample buffers [N, K]
// contiguous; a null pointer means "absent" (no bias, no residual, gradient not wanted).
// The backward's intermediate buffers start as NaN, so a value the per-sample kernel
// fails to write poisons the results. Each returns 0 on success, 1 if a launch was refused.
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/se_excite_kernels.cuh"
#include "harness_common.h"

namespace {

using namespace cnnkernels::se_excite_cuda;
using cnnkernels_harness::guarded;
using cuda_emulation::launch;

template <typename T>
std::vector<T> poisoned(int64_t size) {
  return std::vector<T>(static_cast<size_t>(size), std::numeric_limits<T>::quiet_NaN());
}

template <typename T>
void forward(const T* x, const T* w1, const T* b1, const T* w2, const T* b2, const T* residual, int64_t n,
             int64_t c, int64_t s, int64_t r, int channels_last, int relu, int max_blocks, T* out, T* squeezed,
             T* hidden, T* gate) {
  const Geometry g{n, c, s, channels_last != 0};
  launch(sample_grid(n, max_blocks), dim3(kThreads), squeeze_gate_kernel<T, T>, x, g, w1, b1, w2, b2, r, squeezed,
         hidden, gate);
  launch(elementwise_grid(g, max_blocks), dim3(kThreads), scale_kernel<T, T>, x, static_cast<const T*>(gate),
         residual, g, relu != 0, out);
}

template <typename T>
void backward(const T* grad_out, const T* out, const T* x, const T* w1, const T* w2, const T* squeezed,
              const T* hidden, const T* gate, int64_t n, int64_t c, int64_t s, int64_t r, int channels_last,
              int relu, int max_blocks, T* grad_x, T* gw1, T* gb1, T* gw2, T* gb2, T* grad_res) {
  const Geometry g{n, c, s, channels_last != 0};
  auto d_z2 = poisoned<T>(n * c), d_z1 = poisoned<T>(n * r), d_sq = poisoned<T>(n * c);
  T* dsq = grad_x != nullptr ? d_sq.data() : nullptr;
  launch(sample_grid(n, max_blocks), dim3(kThreads), backward_sample_kernel<T, T>, grad_out, out, x, g, w1, w2, r,
         hidden, gate, relu != 0, d_z2.data(), d_z1.data(), dsq);
  if (gw1 != nullptr || gb1 != nullptr) {
    launch(flat_grid(r * c, max_blocks), dim3(kThreads), weight_grad_kernel<T, T>,
           static_cast<const T*>(d_z1.data()), squeezed, n, r, c, gw1, gb1);
  }
  if (gw2 != nullptr || gb2 != nullptr) {
    launch(flat_grid(c * r, max_blocks), dim3(kThreads), weight_grad_kernel<T, T>,
           static_cast<const T*>(d_z2.data()), hidden, n, c, r, gw2, gb2);
  }
  if (grad_x != nullptr || grad_res != nullptr) {
    launch(elementwise_grid(g, max_blocks), dim3(kThreads), backward_elementwise_kernel<T, T>, grad_out, out, gate,
           static_cast<const T*>(dsq), g, relu != 0, grad_x, grad_res);
  }
}

}  // namespace

#define CNNKERNELS_SE_HARNESS(SUFFIX, T)                                                                  \
  extern "C" int se_forward_##SUFFIX(const T* x, const T* w1, const T* b1, const T* w2, const T* b2,     \
                                     const T* residual, int64_t n, int64_t c, int64_t s, int64_t r,      \
                                     int channels_last, int relu, int max_blocks, T* out, T* squeezed,   \
                                     T* hidden, T* gate) {                                               \
    return guarded([&] {                                                                                  \
      forward(x, w1, b1, w2, b2, residual, n, c, s, r, channels_last, relu, max_blocks, out, squeezed,   \
              hidden, gate);                                                                              \
    });                                                                                                   \
  }                                                                                                       \
  extern "C" int se_backward_##SUFFIX(const T* grad_out, const T* out, const T* x, const T* w1,          \
                                      const T* w2, const T* squeezed, const T* hidden, const T* gate,    \
                                      int64_t n, int64_t c, int64_t s, int64_t r, int channels_last,     \
                                      int relu, int max_blocks, T* grad_x, T* gw1, T* gb1, T* gw2,       \
                                      T* gb2, T* grad_res) {                                             \
    return guarded([&] {                                                                                  \
      backward(grad_out, out, x, w1, w2, squeezed, hidden, gate, n, c, s, r, channels_last, relu,        \
               max_blocks, grad_x, gw1, gb1, gw2, gb2, grad_res);                                        \
    });                                                                                                   \
  }

CNNKERNELS_SE_HARNESS(f32, float)
CNNKERNELS_SE_HARNESS(f64, double)
