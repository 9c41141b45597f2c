// Host-side helpers shared by the CUDA launchers (csrc/cuda/*.cu): ATen tensors handed
// to the kernels of csrc/cuda/*_kernels.cuh as raw device pointers, and the block budget
// that caps their grids. Private to csrc/cuda; included by the .cu files only (it needs
// ATen, which the kernel headers must not).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace cnnkernels {
namespace cuda_launch {

// ATen's element types -> the CUDA types the kernels are written for (same bits).
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Pointer to t's data (its first element, storage offset included) as the device type of
// T (dtype-checked by ATen), or nullptr if t is undefined.
template <typename T>
const typename DeviceType<T>::type* in_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const typename DeviceType<T>::type*>(t.const_data_ptr<T>()) : nullptr;
}
template <typename T>
typename DeviceType<T>::type* out_ptr(at::Tensor& t) {
  return t.defined() ? reinterpret_cast<typename DeviceType<T>::type*>(t.mutable_data_ptr<T>()) : nullptr;
}

// A per-channel vector: C contiguous values of the statistics type (dtype-checked by
// ATen), or nullptr when t is undefined and optional.
template <typename acc_t>
const acc_t* channel_ptr(const at::Tensor& t, int64_t c, const char* name, bool optional = false) {
  if (optional && !t.defined()) return nullptr;
  TORCH_CHECK(t.defined(), name, " is required here");
  TORCH_CHECK(t.dim() == 1 && t.numel() == c && t.is_contiguous(), name, " must be a contiguous [", c,
              "] tensor, got shape ", t.sizes());
  return t.const_data_ptr<acc_t>();
}

// Blocks of `threads` threads that fill the current GPU once; grids are capped at this
// and loop over the rest.
inline int max_blocks(int threads) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->multiProcessorCount * (prop->maxThreadsPerMultiProcessor / threads);
}

}  // namespace cuda_launch
}  // namespace cnnkernels
