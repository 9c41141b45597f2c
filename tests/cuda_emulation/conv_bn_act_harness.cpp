// Runs the real kernels of csrc/cuda/conv_bn_act_kernels.cuh on the CPU through
// csrc/emulation/cuda_host_emulation.h, with the launch shapes the CUDA launchers use
// (reduce_launch, elementwise_grid); max_blocks stands in for the GPU's block budget so
// that tests can force grid-stride loops and several partials per channel.
//
// extern "C" entry points for ctypes, suffixed _f32 / _f64 (data and statistics both
// float or both double). Tensors are dense [N, C, S] (S = H*W), NCHW when
// channels_last == 0, NHWC otherwise; per-channel arrays have C entries; a null pointer
// means "absent" exactly as an undefined tensor does in conv_bn_act_driver.h.
// Each returns 0 on success, 1 if the launch was refused.
#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/conv_bn_act_kernels.cuh"
#include "harness_common.h"

namespace {

using namespace cnnkernels::conv_bn_act_cuda;
using cnnkernels_harness::guarded;
using cuda_emulation::launch;

Geometry geometry(int64_t n, int64_t c, int64_t s, int channels_last) {
  return channels_last ? nhwc_geometry(n, c, s) : nchw_geometry(n, c, s);
}

// Partial buffers start as NaN / -1 so that a partial the first pass fails to write
// poisons the result.
template <typename T>
std::vector<T> poisoned(int64_t size) {
  const T poison = std::numeric_limits<T>::has_quiet_NaN ? std::numeric_limits<T>::quiet_NaN() : T(-1);
  return std::vector<T>(static_cast<size_t>(size), poison);
}

template <typename T>
void batch_stats(const T* y, int64_t n, int64_t c, int64_t s, int channels_last, int max_blocks,
                 T* mean, T* var) {
  const Geometry g = geometry(n, c, s, channels_last);
  const ReduceLaunch rl = reduce_launch(g, max_blocks);
  auto p_mean = poisoned<T>(c * rl.partials), p_m2 = poisoned<T>(c * rl.partials);
  auto p_count = poisoned<int64_t>(c * rl.partials);
  launch(rl.grid, rl.block, batch_stats_partial_kernel<T, T>, y, g, p_mean.data(), p_m2.data(),
         p_count.data());
  launch(elementwise_grid(c, max_blocks), dim3(kThreads), batch_stats_finalize_kernel<T, T>, y, g,
         p_mean.data(), p_m2.data(), p_count.data(), rl.partials, mean, var);
}

template <typename T>
void scale_shift_act(const T* y, const T* scale, const T* shift, const T* residual, int64_t n,
                     int64_t c, int64_t s, int channels_last, int relu, int max_blocks, T* out) {
  const Geometry g = geometry(n, c, s, channels_last);
  launch(elementwise_grid(g.numel(), max_blocks), dim3(kThreads), scale_shift_act_kernel<T, T>, y,
         scale, shift, residual, g, relu != 0, out);
}

template <typename T>
void backward_reduce(const T* grad_out, const T* out, const T* y, const T* mean, const T* invstd,
                     int64_t n, int64_t c, int64_t s, int channels_last, int relu, int max_blocks,
                     T* sum_g, T* sum_g_xhat) {
  const Geometry g = geometry(n, c, s, channels_last);
  const ReduceLaunch rl = reduce_launch(g, max_blocks);
  auto p_g = poisoned<T>(c * rl.partials), p_gx = poisoned<T>(c * rl.partials);
  launch(rl.grid, rl.block, backward_reduce_partial_kernel<T, T>, grad_out, out, y, mean, invstd, g,
         relu != 0, p_g.data(), y != nullptr ? p_gx.data() : nullptr);
  launch(elementwise_grid(c, max_blocks), dim3(kThreads), backward_reduce_finalize_kernel<T>,
         p_g.data(), y != nullptr ? p_gx.data() : nullptr, c, rl.partials, sum_g,
         y != nullptr ? sum_g_xhat : nullptr);
}

template <typename T>
void backward_elementwise(const T* grad_out, const T* out, const T* y, const T* mean,
                          const T* g_scale, const T* y_scale, const T* shift, int64_t n, int64_t c,
                          int64_t s, int channels_last, int relu, int max_blocks, T* grad_y,
                          T* grad_pre) {
  const Geometry g = geometry(n, c, s, channels_last);
  launch(elementwise_grid(g.numel(), max_blocks), dim3(kThreads), backward_elementwise_kernel<T, T>,
         grad_out, out, y, mean, g_scale, y_scale, shift, g, relu != 0, grad_y, grad_pre);
}

}  // namespace

#define CNNKERNELS_HARNESS(SUFFIX, T)                                                              \
  extern "C" int batch_stats_##SUFFIX(const T* y, int64_t n, int64_t c, int64_t s,              \
                                      int channels_last, int max_blocks, T* mean, T* var) {       \
    return guarded([&] { batch_stats(y, n, c, s, channels_last, max_blocks, mean, var); });      \
  }                                                                                                \
  extern "C" int scale_shift_act_##SUFFIX(const T* y, const T* scale, const T* shift,             \
                                          const T* residual, int64_t n, int64_t c, int64_t s,     \
                                          int channels_last, int relu, int max_blocks, T* out) {  \
    return guarded([&] {                                                                           \
      scale_shift_act(y, scale, shift, residual, n, c, s, channels_last, relu, max_blocks, out);  \
    });                                                                                            \
  }                                                                                                \
  extern "C" int backward_reduce_##SUFFIX(const T* grad_out, const T* out, const T* y,            \
                                          const T* mean, const T* invstd, int64_t n, int64_t c,   \
                                          int64_t s, int channels_last, int relu, int max_blocks, \
                                          T* sum_g, T* sum_g_xhat) {                               \
    return guarded([&] {                                                                           \
      backward_reduce(grad_out, out, y, mean, invstd, n, c, s, channels_last, relu, max_blocks,   \
                      sum_g, sum_g_xhat);                                                          \
    });                                                                                            \
  }                                                                                                \
  extern "C" int backward_elementwise_##SUFFIX(                                                    \
      const T* grad_out, const T* out, const T* y, const T* mean, const T* g_scale,               \
      const T* y_scale, const T* shift, int64_t n, int64_t c, int64_t s, int channels_last,       \
      int relu, int max_blocks, T* grad_y, T* grad_pre) {                                          \
    return guarded([&] {                                                                           \
      backward_elementwise(grad_out, out, y, mean, g_scale, y_scale, shift, n, c, s,              \
                           channels_last, relu, max_blocks, grad_y, grad_pre);                     \
    });                                                                                            \
  }

CNNKERNELS_HARNESS(f32, float)
CNNKERNELS_HARNESS(f64, double)
