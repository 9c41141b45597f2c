// Runs the real kernels of csrc/cuda/grouped_conv_bn_act_kernels.cuh (and the
// tile-statistics merge of conv_bn_act_tile_epilogue.cuh) on the CPU through
// csrc/emulation/cuda_host_emulation.h, with the plan and launch shapes of
// csrc/cuda/conv_bn_act.cu.
//
// extern "C" entry points for ctypes, suffixed _f32 / _f64 (data and statistics both
// float or both double). x is dense channels_last [n, c_in, h, w], weight
// [c_out, 3, 3, c_in / groups] (channels_last weights), residual / out / y dense
// channels_last [n, c_out, h_out, w_out]; per-channel arrays have c_out entries; a null
// pointer means "absent". Each returns 0 on success, 1 if a launch was refused.
#include <cstdint>

#include "cuda/grouped_conv_bn_act_kernels.cuh"
#include "harness_common.h"

namespace {

using namespace cnnkernels::conv_bn_act_cuda;
using cnnkernels_harness::guarded;
using cuda_emulation::launch;

// eval:     out = act(conv(x) * scale + shift + residual)
// training: y = conv(x) + bias, partial_{mean,m2} [c_out][P] and partial_count [P] of the
//           tiles, mean / biased var of y merged from them.
template <typename T>
void grouped(const T* x, const T* weight, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out,
             int64_t groups, int stride, int training, const T* scale, const T* shift, const T* residual, int relu,
             T* out, const T* bias, T* y, T* partial_mean, T* partial_m2, int* partial_count, T* mean, T* var) {
  const GroupedConvGeometry g = grouped_conv_plan<T>(n, c_in, h, w, c_out, groups, stride);
  const dim3 grid = grouped_conv_grid(g);
  TileEpilogue<T, T> e{static_cast<int>(c_out), scale, shift, residual, relu != 0, out, bias, y, partial_mean, partial_m2,
                       partial_count, g.pixel_tiles()};
  if (!training) {
    with_grouped_conv_kernel<T, T, false>(g, [&](auto kernel) { launch(grid, dim3(kConvThreads), kernel, x, weight, g, e); });
    return;
  }
  with_grouped_conv_kernel<T, T, true>(g, [&](auto kernel) { launch(grid, dim3(kConvThreads), kernel, x, weight, g, e); });
  launch(dim3(static_cast<unsigned int>(c_out)), dim3(merge_threads(e.partials)), tile_stats_merge_kernel<T>,
         static_cast<const T*>(partial_mean), static_cast<const T*>(partial_m2),
         static_cast<const int*>(partial_count), e.partials, c_out, mean, var);
}

}  // namespace

// The plan of a launch: plan[0] = groups per block (GB), plan[1] = input channels per
// group staged at once (KC), plan[2] = pixel tiles P (partials per channel).
#define CNNKERNELS_PLAN(SUFFIX, T)                                                                          \
  extern "C" void grouped_conv_plan_##SUFFIX(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out,  \
                                            int64_t groups, int stride, int64_t* plan) {                   \
    const GroupedConvGeometry g = grouped_conv_plan<T>(n, c_in, h, w, c_out, groups, stride);              \
    plan[0] = g.groups_per_block;                                                                            \
    plan[1] = g.chunk;                                                                                       \
    plan[2] = g.pixel_tiles();                                                                               \
  }

#define CNNKERNELS_HARNESS(SUFFIX, T)                                                                      \
  CNNKERNELS_PLAN(SUFFIX, T)                                                                               \
  extern "C" int grouped_conv_bn_act_##SUFFIX(                                                             \
      const T* x, const T* weight, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out,           \
      int64_t groups, int stride, int training, const T* scale, const T* shift, const T* residual, int relu, \
      T* out, const T* bias, T* y, T* partial_mean, T* partial_m2, int* partial_count, T* mean, T* var) {  \
    return guarded([&] {                                                                                   \
      grouped(x, weight, n, c_in, h, w, c_out, groups, stride, training, scale, shift, residual, relu, out, \
              bias, y, partial_mean, partial_m2, partial_count, mean, var);                                \
    });                                                                                                    \
  }

CNNKERNELS_HARNESS(f32, float)
CNNKERNELS_HARNESS(f64, double)
