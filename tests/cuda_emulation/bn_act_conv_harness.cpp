// Runs the real kernels of csrc/cuda/bn_act_conv_kernels.cuh on the CPU through
// csrc/emulation/cuda_host_emulation.h, with the launch shapes the CUDA launcher
// (csrc/cuda/bn_act_conv.cu) uses: reduce_launch, elementwise_grid, make_walk,
// conv_launch. max_blocks stands in for the GPU's block budget so that tests can force
// grid-stride loops and several partials per channel.
//
// extern "C" entry points for ctypes, suffixed _f32 / _f64 (data and statistics both
// float or both double). 4-D tensors come as a data pointer (of the first element) plus
// int64 shape [N, C, H, W] and element strides (n, c, h, w): any strides. Per-channel
// arrays are contiguous. A null pointer means "absent". Each returns 0 on success, 1 if
// a launch was refused or the grid is too large.
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cuda/bn_act_conv_kernels.cuh"
#include "harness_common.h"

namespace {

using namespace cnnkernels::bn_act_conv_cuda;
using cnnkernels_harness::guarded;
using cuda_emulation::launch;

Shape shape_of(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }
Strides strides_of(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }

// Partial buffers start as NaN / -1 so that a partial the first pass fails to write
// poisons the result.
template <typename T>
std::vector<T> poisoned(int64_t size) {
  const T poison = std::numeric_limits<T>::has_quiet_NaN ? std::numeric_limits<T>::quiet_NaN() : T(-1);
  return std::vector<T>(static_cast<size_t>(size), poison);
}

template <typename T>
void batch_stats(const T* x, const int64_t* shape, const int64_t* strides, int max_blocks, T* mean, T* var) {
  const Shape s = shape_of(shape);
  const Strides xs = strides_of(strides);
  const ReduceLaunch rl = reduce_launch(s, channels_fast(s, xs), max_blocks);
  auto p_mean = poisoned<T>(s.c * rl.partials), p_m2 = poisoned<T>(s.c * rl.partials);
  auto p_count = poisoned<int64_t>(s.c * rl.partials);
  launch(rl.grid, rl.block, batch_stats_partial_kernel<T, T>, x, s, xs, p_mean.data(), p_m2.data(),
         p_count.data());
  launch(elementwise_grid(s.c, max_blocks), dim3(kThreads), batch_stats_finalize_kernel<T, T>, x, s, xs,
         p_mean.data(), p_m2.data(), p_count.data(), rl.partials, mean, var);
}

// weight is [C_out, kH, kW, Cg] contiguous; w_shape is the conv2d weight shape
// [C_out, Cg, kH, kW]; geometry = stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups.
// tile: 0 as the launcher picks, 1 WideTile, 2 NarrowTile.
template <typename T>
void conv(const T* x, const int64_t* x_shape, const int64_t* x_strides, const T* scale, const T* shift, int relu,
          const T* weight, const int64_t* w_shape, const T* bias, const int64_t* geometry, T* out,
          const int64_t* out_strides, int tile) {
  const Shape xsh = shape_of(x_shape);
  const Strides xs = strides_of(x_strides), os = strides_of(out_strides);
  const ConvShape cs = conv_shape(xsh, w_shape[0], static_cast<int>(w_shape[2]), static_cast<int>(w_shape[3]),
                                  static_cast<int>(geometry[0]), static_cast<int>(geometry[1]),
                                  static_cast<int>(geometry[2]), static_cast<int>(geometry[3]),
                                  static_cast<int>(geometry[4]), static_cast<int>(geometry[5]),
                                  static_cast<int>(geometry[6]));
  const Shape osh{cs.n, w_shape[0], cs.h_out, cs.w_out};
  const ConvLaunch cl = conv_launch(cs, xsh, xs, osh, os, tile);
  if (!cl.ok) throw std::invalid_argument("conv grid too large");
  const ConvArgs<T, T> args{x, xs, scale, shift, relu != 0, weight, bias, out, os, cs, cl.out_pixel_fast};
  launch(cl.grid, dim3(kThreads), conv_kernel_of<T, T>(cl.variant), args);
}

// The variant conv() would run: 0..3 in ConvVariant order, + 4 when out_pixel_fast.
int plan(const int64_t* x_shape, const int64_t* x_strides, const int64_t* w_shape, const int64_t* geometry,
         const int64_t* out_strides, int tile) {
  const Shape xsh = shape_of(x_shape);
  const ConvShape cs = conv_shape(xsh, w_shape[0], static_cast<int>(w_shape[2]), static_cast<int>(w_shape[3]),
                                  static_cast<int>(geometry[0]), static_cast<int>(geometry[1]),
                                  static_cast<int>(geometry[2]), static_cast<int>(geometry[3]),
                                  static_cast<int>(geometry[4]), static_cast<int>(geometry[5]),
                                  static_cast<int>(geometry[6]));
  const ConvLaunch cl = conv_launch(cs, xsh, strides_of(x_strides), Shape{cs.n, w_shape[0], cs.h_out, cs.w_out},
                                    strides_of(out_strides), tile);
  return static_cast<int>(cl.variant) + (cl.out_pixel_fast ? 4 : 0);
}

template <typename T>
void bn_act(const T* x, const int64_t* shape, const int64_t* x_strides, const T* scale, const T* shift, int relu,
            int max_blocks, T* a, const int64_t* a_strides) {
  const Shape s = shape_of(shape);
  const Strides as = strides_of(a_strides);
  const Walk walk = make_walk(s, channels_fast(s, as));
  launch(elementwise_grid(s.n * s.c * s.h * s.w, max_blocks), dim3(kThreads), bn_act_kernel<T, T>, x,
         walk_strides(strides_of(x_strides), walk), scale, shift, relu != 0, walk, a, walk_strides(as, walk));
}

template <typename T>
void backward_reduce(const T* grad_a, const int64_t* g_strides, const T* x, const int64_t* x_strides,
                     const int64_t* shape, const T* scale, const T* shift, const T* mean, const T* invstd, int relu,
                     int max_blocks, T* sum_g, T* sum_g_xhat) {
  const Shape s = shape_of(shape);
  const Strides xs = strides_of(x_strides);
  const ReduceLaunch rl = reduce_launch(s, channels_fast(s, xs), max_blocks);
  auto p_g = poisoned<T>(s.c * rl.partials), p_gx = poisoned<T>(s.c * rl.partials);
  T* partial_gx = sum_g_xhat != nullptr ? p_gx.data() : nullptr;
  launch(rl.grid, rl.block, backward_reduce_partial_kernel<T, T>, grad_a, strides_of(g_strides), x, xs, s, scale,
         shift, mean, invstd, relu != 0, p_g.data(), partial_gx);
  launch(elementwise_grid(s.c, max_blocks), dim3(kThreads), backward_reduce_finalize_kernel<T>, p_g.data(),
         static_cast<const T*>(partial_gx), s.c, rl.partials, sum_g, sum_g_xhat);
}

template <typename T>
void backward_elementwise(const T* grad_a, const int64_t* g_strides, const T* x, const int64_t* x_strides,
                          const int64_t* shape, const T* scale, const T* shift, const T* g_scale,
                          const T* g_shift, const T* mean, const T* x_scale, int relu, int max_blocks, T* grad_x,
                          const int64_t* gx_strides) {
  const Shape s = shape_of(shape);
  const Strides gxs = strides_of(gx_strides);
  const Walk walk = make_walk(s, channels_fast(s, gxs));
  launch(elementwise_grid(s.n * s.c * s.h * s.w, max_blocks), dim3(kThreads), backward_elementwise_kernel<T, T>,
         grad_a, walk_strides(strides_of(g_strides), walk), x, walk_strides(strides_of(x_strides), walk), walk,
         scale, shift, g_scale, g_shift, mean, x_scale, relu != 0, grad_x, walk_strides(gxs, walk));
}

}  // namespace

extern "C" int conv_plan(const int64_t* x_shape, const int64_t* x_strides, const int64_t* w_shape,
                         const int64_t* geometry, const int64_t* out_strides, int tile) {
  return plan(x_shape, x_strides, w_shape, geometry, out_strides, tile);
}

#define CNNKERNELS_HARNESS(SUFFIX, T)                                                                         \
  extern "C" int batch_stats_##SUFFIX(const T* x, const int64_t* shape, const int64_t* strides,              \
                                      int max_blocks, T* mean, T* var) {                                    \
    return guarded([&] { batch_stats(x, shape, strides, max_blocks, mean, var); });                         \
  }                                                                                                           \
  extern "C" int conv_##SUFFIX(const T* x, const int64_t* x_shape, const int64_t* x_strides, const T* scale, \
                               const T* shift, int relu, const T* weight, const int64_t* w_shape,            \
                               const T* bias, const int64_t* geometry, T* out, const int64_t* out_strides,   \
                               int tile) {                                                                   \
    return guarded([&] {                                                                                      \
      conv(x, x_shape, x_strides, scale, shift, relu, weight, w_shape, bias, geometry, out, out_strides,     \
           tile);                                                                                             \
    });                                                                                                       \
  }                                                                                                           \
  extern "C" int bn_act_##SUFFIX(const T* x, const int64_t* shape, const int64_t* x_strides, const T* scale, \
                                 const T* shift, int relu, int max_blocks, T* a, const int64_t* a_strides) { \
    return guarded([&] { bn_act(x, shape, x_strides, scale, shift, relu, max_blocks, a, a_strides); });     \
  }                                                                                                           \
  extern "C" int backward_reduce_##SUFFIX(const T* grad_a, const int64_t* g_strides, const T* x,             \
                                          const int64_t* x_strides, const int64_t* shape, const T* scale,    \
                                          const T* shift, const T* mean, const T* invstd, int relu,          \
                                          int max_blocks, T* sum_g, T* sum_g_xhat) {                         \
    return guarded([&] {                                                                                      \
      backward_reduce(grad_a, g_strides, x, x_strides, shape, scale, shift, mean, invstd, relu, max_blocks,  \
                      sum_g, sum_g_xhat);                                                                     \
    });                                                                                                       \
  }                                                                                                           \
  extern "C" int backward_elementwise_##SUFFIX(                                                               \
      const T* grad_a, const int64_t* g_strides, const T* x, const int64_t* x_strides, const int64_t* shape, \
      const T* scale, const T* shift, const T* g_scale, const T* g_shift, const T* mean, const T* x_scale,   \
      int relu, int max_blocks, T* grad_x, const int64_t* gx_strides) {                                       \
    return guarded([&] {                                                                                      \
      backward_elementwise(grad_a, g_strides, x, x_strides, shape, scale, shift, g_scale, g_shift, mean,     \
                           x_scale, relu, max_blocks, grad_x, gx_strides);                                    \
    });                                                                                                       \
  }

CNNKERNELS_HARNESS(f32, float)
CNNKERNELS_HARNESS(f64, double)
