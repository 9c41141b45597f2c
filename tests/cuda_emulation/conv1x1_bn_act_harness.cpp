// Runs the real kernels of csrc/cuda/conv1x1_bn_act_kernels.cuh (and the tile-statistics
// merge of conv_bn_act_tile_epilogue.cuh) on the CPU through
// csrc/emulation/cuda_host_emulation.h, with the launch shapes of csrc/cuda/conv_bn_act.cu.
//
// extern "C" entry points for ctypes, suffixed _f32 / _f64 (data and statistics both
// float or both double). x is dense channels_last [n, c_in, h, w], weight [c_out, c_in]
// contiguous, residual / out / y dense channels_last [n, c_out, h_out, w_out];
// per-channel arrays have c_out entries; a null pointer means "absent". Each returns 0
// on success, 1 if a launch was refused.
#include <cstdint>

#include "cuda/conv1x1_bn_act_kernels.cuh"
#include "harness_common.h"

namespace {

using namespace cnnkernels::conv_bn_act_cuda;
using cnnkernels_harness::guarded;
using cuda_emulation::launch;

// eval:     out = act(conv(x) * scale + shift + residual)
// training: y = conv(x) + bias, partial_{mean,m2} [c_out][P] and partial_count [P] of the
//           tiles, mean / biased var of y merged from them.
template <typename T>
void conv1x1(const T* x, const T* weight, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out,
             int64_t stride, int training, const T* scale, const T* shift, const T* residual, int relu, T* out,
             const T* bias, T* y, T* partial_mean, T* partial_m2, int* partial_count, T* mean, T* var) {
  const Conv1x1Geometry g = conv1x1_geometry(n, c_in, h, w, c_out, stride);
  const dim3 grid = conv1x1_grid(g);
  TileEpilogue<T, T> e{static_cast<int>(c_out), scale, shift, residual, relu != 0, out, bias, y, partial_mean, partial_m2,
                       partial_count, static_cast<int>(grid.x)};
  if (!training) {
    launch(grid, dim3(kConvThreads), conv1x1_bn_act_kernel<T, T, false>, x, weight, g, e);
    return;
  }
  launch(grid, dim3(kConvThreads), conv1x1_bn_act_kernel<T, T, true>, x, weight, g, e);
  launch(dim3(static_cast<unsigned int>(c_out)), dim3(merge_threads(e.partials)), tile_stats_merge_kernel<T>,
         static_cast<const T*>(partial_mean), static_cast<const T*>(partial_m2),
         static_cast<const int*>(partial_count), e.partials, c_out, mean, var);
}

// tile_stats_merge_kernel alone, on a (blocks x threads) launch of the caller's choice.
template <typename T>
void merge(const T* partial_mean, const T* partial_m2, const int* partial_count, int64_t partials, int64_t channels,
           int blocks, int threads, T* mean, T* var) {
  launch(dim3(blocks), dim3(threads), tile_stats_merge_kernel<T>, partial_mean, partial_m2, partial_count, partials,
         channels, mean, var);
}

}  // namespace

// The number P of pixel tiles (= partials per channel) of a launch.
extern "C" int64_t conv1x1_partials(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t stride) {
  return conv1x1_grid(conv1x1_geometry(n, c_in, h, w, c_out, stride)).x;
}

#define CNNKERNELS_HARNESS(SUFFIX, T)                                                                   \
  extern "C" int conv1x1_bn_act_##SUFFIX(                                                               \
      const T* x, const T* weight, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out,        \
      int64_t stride, int training, const T* scale, const T* shift, const T* residual, int relu, T* out, \
      const T* bias, T* y, T* partial_mean, T* partial_m2, int* partial_count, T* mean, T* var) {       \
    return guarded([&] {                                                                                \
      conv1x1(x, weight, n, c_in, h, w, c_out, stride, training, scale, shift, residual, relu, out,     \
              bias, y, partial_mean, partial_m2, partial_count, mean, var);                             \
    });                                                                                                 \
  }                                                                                                     \
  extern "C" int tile_stats_merge_##SUFFIX(const T* partial_mean, const T* partial_m2,                  \
                                           const int* partial_count, int64_t partials, int64_t channels, \
                                           int blocks, int threads, T* mean, T* var) {                  \
    return guarded([&] {                                                                                \
      merge(partial_mean, partial_m2, partial_count, partials, channels, blocks, threads, mean, var);   \
    });                                                                                                 \
  }

CNNKERNELS_HARNESS(f32, float)
CNNKERNELS_HARNESS(f64, double)
