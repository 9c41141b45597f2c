// Device I/O shared by every csrc/cuda/*_kernels.cuh: loads and stores of the data
// types through the accumulation type, the rounding of a value to the data type, the
// relu-masked gradient read of the backward passes, and the grid of a grid-stride loop.
//
// No torch / ATen here, so that the same source compiles under nvcc and under g++ with
// csrc/emulation/cuda_host_emulation.h (tests/cuda_emulation), where only float and
// double exist.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include <cmath>

#include "emulation/cuda_host_emulation.h"
#endif

namespace cnnkernels {
namespace device_io {

// Overloads instead of casts: torch builds with __CUDA_NO_HALF_CONVERSIONS__, so __half
// has no implicit float conversion.
__device__ __forceinline__ float load_value(const float* p) { return *p; }
__device__ __forceinline__ double load_value(const double* p) { return *p; }
__device__ __forceinline__ void store_value(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_value(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_value(float* p, double v) { *p = static_cast<float>(v); }
#if defined(__CUDACC__)
__device__ __forceinline__ float load_value(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_value(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_value(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_value(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
#endif

// *p in the accumulation type acc_t.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_acc(const scalar_t* p) {
  return static_cast<acc_t>(load_value(p));
}

// The value a store of v into scalar_t leaves in memory, read back as acc_t (v itself for
// float and double): what an unfused path reads after writing v in the data type.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rounded(acc_t v) {
  scalar_t stored;
  store_value(&stored, v);
  return load_acc<acc_t>(&stored);
}

__device__ __forceinline__ float exp_value(float v) { return expf(v); }
__device__ __forceinline__ double exp_value(double v) { return exp(v); }

// The gradient behind an activation, read at element i: grad_out[i] where the output
// passed (out > 0 for relu, everywhere for none), else 0. out is read only for relu.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_grad(const scalar_t* grad_out, const scalar_t* out, int64_t i, bool relu) {
  const acc_t go = load_acc<acc_t>(grad_out + i);
  return (relu && !(load_acc<acc_t>(out + i) > acc_t(0))) ? acc_t(0) : go;
}

// Grid of a grid-stride loop over `work` items, `per_block` items per block and pass:
// enough blocks for every item once, capped at max_blocks, at least one.
inline dim3 grid_stride_blocks(int64_t work, int64_t per_block, int max_blocks) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return dim3(static_cast<unsigned int>(blocks));
}

}  // namespace device_io
}  // namespace cnnkernels
