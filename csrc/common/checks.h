// Argument checks shared by the CPU and CUDA sources: TORCH_CHECK wrappers whose
// messages name the offending argument. ATen/c10 headers only (also compiled by nvcc).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace cnnkernels {

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
}

inline void check_ndim(const at::Tensor& t, int64_t ndim, const char* name) {
  TORCH_CHECK(t.dim() == ndim, name, " must be a ", ndim, "-D tensor, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              " must be a floating-point tensor (float32, float64, float16, bfloat16), got ",
              t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name,
              " (", a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), b_name, " must be on the device of ", a_name, " (",
              a.device(), "), got ", b.device());
}

inline void check_same_shape(const at::Tensor& t, at::IntArrayRef sizes, const char* name,
                             const char* what) {
  TORCH_CHECK(t.sizes() == sizes, name, " must have the shape of ", what, " ", sizes, ", got ",
              t.sizes());
}

// x [N, C_in, H, W] and weight [C_out, C_in / groups, kH, kW] agree on channels and groups.
inline void check_channels(const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(groups >= 1, "groups must be >= 1, got ", groups);
  TORCH_CHECK(x.size(1) % groups == 0, "x has ", x.size(1),
              " channels, which groups=", groups, " does not divide");
  TORCH_CHECK(weight.size(0) % groups == 0, "weight has ", weight.size(0),
              " output channels, which groups=", groups, " does not divide");
  TORCH_CHECK(weight.size(1) * groups == x.size(1), "weight must have C_in / groups = ",
              x.size(1) / groups, " input channels (dim 1), got ", weight.size(1),
              " (x has ", x.size(1), " channels, groups=", groups, ")");
}

// A per-output-channel parameter: 1-D, floating point, c elements, on `like`'s device.
inline void check_per_channel(const at::Tensor& t, int64_t c, const char* name,
                              const at::Tensor& like, const char* like_name) {
  check_ndim(t, 1, name);
  TORCH_CHECK(t.size(0) == c, name, " must have C_out = ", c, " elements, got ", t.size(0));
  check_floating(t, name);
  check_same_device(like, like_name, t, name);
}

inline void check_per_channel(const std::optional<at::Tensor>& t, int64_t c, const char* name,
                              const at::Tensor& like, const char* like_name) {
  if (t.has_value() && t->defined()) check_per_channel(*t, c, name, like, like_name);
}

// A pair such as stride, padding or dilation: two values, each >= min_value.
inline void check_pair(at::IntArrayRef v, int64_t min_value, const char* name) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 values (height, width), got ", v);
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, name, " values must be >= ", min_value,
              ", got ", v);
}

// An output written by a kernel that reads `in` meanwhile: no internal overlap, and not
// overlapping `in`. Overlap is decidable for dense tensors; views (a prefix input and a
// slice output of one buffer) are only checked for starting at the same element.
inline void check_written_apart(const at::Tensor& out, const char* out_name, const at::Tensor& in,
                                const char* in_name) {
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, out_name,
              " must not have internally overlapping memory (such as an expanded tensor)");
  const auto overlap = at::get_overlap_status(out, in);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial &&
                  !(out.numel() > 0 && in.numel() > 0 && out.const_data_ptr() == in.const_data_ptr()),
              out_name, " must not overlap ", in_name, " in memory");
}

// Returns true for "relu", false for "none"; anything else is an error.
inline bool check_activation(std::string_view activation) {
  const bool relu = activation == "relu";
  TORCH_CHECK(relu || activation == "none", "activation must be \"relu\" or \"none\", got \"",
              activation, "\"");
  return relu;
}

}  // namespace cnnkernels
