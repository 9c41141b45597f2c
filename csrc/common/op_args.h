// Argument unpacking shared by the op drivers (csrc/common/*_driver.h) and backends:
// optional tensors, the statistics dtype, per-channel parameters with a default, the
// output memory format, and the binding of a driver to one backend's kernels. ATen
// headers only (also compiled by nvcc).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace cnnkernels {

// The tensor, or an undefined one for an absent optional.
inline at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// The dtype of BN statistics and per-channel vectors: float64 for float64 data, else float32.
inline at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// t in sopts' dtype, contiguous; a [c] tensor of `fill` when t is undefined.
inline at::Tensor per_channel_or(const at::Tensor& t, double fill, int64_t c, const at::TensorOptions& sopts) {
  return t.defined() ? t.to(sopts.dtype()).contiguous() : at::full({c}, fill, sopts);
}

// reference.output_memory_format: channels_last when x is channels-last and not contiguous.
inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

namespace detail {
template <auto kDriver, auto kKernels, typename = decltype(kDriver)>
struct BoundDriver;
template <auto kDriver, auto kKernels, typename Kernels, typename R, typename... Args>
struct BoundDriver<kDriver, kKernels, R (*)(const Kernels&, Args...)> {
  static R call(Args... args) { return kDriver(kKernels(), args...); }
};
}  // namespace detail

// The schema function of a driver (`R driver(const Kernels&, Args...)`) for one backend
// (`const Kernels& kernels()`): `R (*)(Args...)` calling driver(kernels(), args...), for
// m.impl in the backend's TORCH_LIBRARY_IMPL block.
template <auto kDriver, auto kKernels>
constexpr auto with_kernels = &detail::BoundDriver<kDriver, kKernels>::call;

}  // namespace cnnkernels
