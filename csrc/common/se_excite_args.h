// Argument checks and layouts shared by the CPU and CUDA backends of se_excite
// (csrc/cpu/se_excite.cpp, csrc/cuda/se_excite.cu). ATen/c10 headers only (also
// compiled by nvcc).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace cnnkernels {

// x [N, C, H, W] as the op sees it: N samples of C channels and S = H * W pixels.
struct SeExciteSizes {
  int64_t n, c, s;
};

// x: defined, 4-D, floating, at least one channel and one pixel.
inline SeExciteSizes check_se_excite_x(const at::Tensor& x) {
  check_defined(x, "x");
  check_ndim(x, 4, "x");
  check_floating(x, "x");
  const int64_t n = x.size(0), c = x.size(1), s = x.size(2) * x.size(3);
  TORCH_CHECK(c >= 1 && s >= 1, "x must have at least one channel and one pixel, got shape ", x.sizes());
  return {n, c, s};
}

// An optional activation tensor: x's shape, dtype and device, made dense in memory format
// fmt (x's); undefined when absent.
inline at::Tensor like_x(const std::optional<at::Tensor>& t, const at::Tensor& x, at::MemoryFormat fmt,
                         const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_same_dtype(x, "x", *t, name);
  check_same_device(x, "x", *t, name);
  check_same_shape(*t, x.sizes(), name, "x");
  return t->contiguous(fmt);
}

// The activation inputs of the backward, like_x: grad_out, and out (read only for relu;
// undefined otherwise).
struct SeExciteGrads {
  at::Tensor grad_out, out;
};

inline SeExciteGrads se_excite_backward_inputs(const at::Tensor& grad_out_in, const at::Tensor& out_in,
                                               const at::Tensor& x, at::MemoryFormat fmt, bool relu) {
  const at::Tensor grad_out = like_x(grad_out_in, x, fmt, "grad_out");
  TORCH_CHECK(grad_out.defined(), "grad_out must be a defined tensor");
  const at::Tensor out = relu ? like_x(out_in, x, fmt, "out") : at::Tensor();
  TORCH_CHECK(!relu || out.defined(), "out must be a defined tensor for activation \"relu\"");
  return {grad_out, out};
}

}  // namespace cnnkernels
