// Host-side part of op add_act shared by the CPU and CUDA backends: argument checks and
// the layout convention. ATen/c10 headers only (also compiled by nvcc).
//
// add_act(x, residual, activation) -> act(x + residual); add_act_backward(grad_out, out,
// activation) -> grad_out * (out > 0) for relu, grad_out for none (see
// cnnkernels/reference.py). Tensors of any ndim >= 1 and any strides are accepted; the
// kernels see dense buffers walked by flat index, all in the output's memory format:
// channels_last when a 4-D x (resp. out) is channels_last and not contiguous, else
// contiguous (reference.output_memory_format). An input in another layout is copied
// into that one first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <string_view>

#include "common/checks.h"

namespace cnnkernels {

inline at::MemoryFormat add_act_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// a and b: defined, floating, ndim >= 1, same dtype, device and shape.
inline void check_add_act_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                               const char* b_name) {
  check_defined(a, a_name);
  check_defined(b, b_name);
  TORCH_CHECK(a.dim() >= 1, a_name, " must have at least 1 dimension, got a 0-D tensor");
  check_floating(a, a_name);
  check_same_dtype(a, a_name, b, b_name);
  check_same_device(a, a_name, b, b_name);
  check_same_shape(b, a.sizes(), b_name, a_name);
}

// Dense copies (or the tensors themselves) of the two inputs in `first`'s output memory
// format, and an uninitialised output of that shape, dtype and format.
struct AddActBuffers {
  at::Tensor first, second, out;
};

inline AddActBuffers add_act_buffers(const at::Tensor& first, const at::Tensor& second) {
  const at::MemoryFormat fmt = add_act_memory_format(first);
  at::Tensor a = first.contiguous(fmt);
  at::Tensor b = second.contiguous(fmt);
  at::Tensor out = at::empty(first.sizes(), first.options().memory_format(fmt));
  return {a, b, out};
}

// Both ops' host steps before the kernel: the activation and the pair checked, the
// buffers made. first / second: x / residual (forward) or out / grad_out (backward).
struct AddActCall {
  AddActBuffers buffers;
  bool relu;
  bool backward;
};

inline AddActCall add_act_call(const at::Tensor& first, const char* first_name, const at::Tensor& second,
                               const char* second_name, std::string_view activation, bool backward) {
  const bool relu = check_activation(activation);
  check_add_act_pair(first, first_name, second, second_name);
  return {add_act_buffers(first, second), relu, backward};
}

}  // namespace cnnkernels
