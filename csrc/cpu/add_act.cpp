// CPU kernels of op add_act: out = act(x + residual) and its backward
// grad = grad_out * (out > 0) (relu) / grad_out (none), and the registration of
// _add_act_forward_native / _add_act_backward_native for the CPU dispatch key.
//
// The tensors are made dense in the output's memory format (csrc/common/add_act_driver.h)
// and walked as one flat span: at::parallel_for over chunks of at least kGrain elements,
// an `omp simd` loop per chunk in float for the half types, in the type itself
// otherwise, the activation hoisted out of the loop as a template flag.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string_view>

#include "common/add_act_driver.h"
#include "cpu/simd_clones.h"

namespace cnnkernels {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task, at least

// How the loops read and write one element type: `storage` is what they load and
// store, `acc` what they compute in, positive(v) is v > 0 on the stored value. float
// and double are themselves. The half types are handled as their bits, so that the
// backward's mask and copy vectorise; BFloat16 also converts through its bits (the
// upper half of a float, rounding to nearest even exactly as c10::BFloat16 does), which
// GCC vectorises (c10::BFloat16's own conversions it does not: about 3x slower).
template <typename T>
struct Lane {
  using storage = T;
  using acc = T;
  static acc load(storage v) { return v; }
  static storage store(acc v) { return v; }
  static bool positive(storage v) { return v > T(0); }
};

template <>
struct Lane<c10::BFloat16> {
  using storage = uint16_t;
  using acc = float;
  static float load(uint16_t bits) {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static uint16_t store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? uint16_t(0x7FC0) : rounded;  // NaN -> quiet NaN
  }
  // Sign clear and 0 < bits <= +inf (0x7F80): positive and not NaN.
  static bool positive(uint16_t bits) { return uint16_t(bits - 1u) < uint16_t(0x7F80); }
};

template <>
struct Lane<c10::Half> {
  using storage = uint16_t;
  using acc = float;
  static float load(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }
  static uint16_t store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
  static bool positive(uint16_t bits) { return uint16_t(bits - 1u) < uint16_t(0x7C00); }  // up to +inf
};

template <typename T>
const typename Lane<T>::storage* lanes(const at::Tensor& t) {
  return reinterpret_cast<const typename Lane<T>::storage*>(t.const_data_ptr<T>());
}

template <typename T>
typename Lane<T>::storage* mutable_lanes(at::Tensor& t) {
  return reinterpret_cast<typename Lane<T>::storage*>(t.mutable_data_ptr<T>());
}

template <bool kRelu, typename scalar_t, typename S = typename Lane<scalar_t>::storage>
CNNKERNELS_SIMD_CLONES void add_act_span(const S* x, const S* r, S* out, int64_t len) {
  using L = Lane<scalar_t>;
  using acc_t = typename L::acc;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    acc_t v = L::load(x[i]) + L::load(r[i]);
    if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN, like torch.relu
    out[i] = L::store(v);
  }
}

template <bool kRelu, typename scalar_t, typename S = typename Lane<scalar_t>::storage>
CNNKERNELS_SIMD_CLONES void add_act_backward_span(const S* grad_out, const S* out, S* grad, int64_t len) {
  using L = Lane<scalar_t>;
  if constexpr (kRelu) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const S g = grad_out[i];  // loaded unconditionally: a select, not a branch
      grad[i] = L::positive(out[i]) ? g : S(0);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) grad[i] = grad_out[i];
  }
}

// Calls span(begin, end) over [0, numel) in parallel chunks of at least kGrain elements.
template <typename Span>
void for_chunks(int64_t numel, const Span& span) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) { span(begin, end); });
}

// out = act(first + second) (forward) or second * (first > 0) / second (backward).
at::Tensor run_cpu(const AddActCall& call) {
  const AddActBuffers& b = call.buffers;
  at::Tensor out = b.out;
  const int64_t numel = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "add_act_cpu", [&] {
    const auto* fp = lanes<scalar_t>(b.first);
    const auto* sp = lanes<scalar_t>(b.second);
    auto* op = mutable_lanes<scalar_t>(out);
    for_chunks(numel, [&](int64_t begin, int64_t end) {
      const int64_t len = end - begin;
      if (call.backward) {
        if (call.relu) add_act_backward_span<true, scalar_t>(sp + begin, fp + begin, op + begin, len);
        else add_act_backward_span<false, scalar_t>(sp + begin, fp + begin, op + begin, len);
      } else {
        if (call.relu) add_act_span<true, scalar_t>(fp + begin, sp + begin, op + begin, len);
        else add_act_span<false, scalar_t>(fp + begin, sp + begin, op + begin, len);
      }
    });
  });
  return out;
}

at::Tensor add_act_forward_cpu(const at::Tensor& x, const at::Tensor& residual, std::string_view activation) {
  return run_cpu(add_act_call(x, "x", residual, "residual", activation, /*backward=*/false));
}

at::Tensor add_act_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, std::string_view activation) {
  return run_cpu(add_act_call(out, "out", grad_out, "grad_out", activation, /*backward=*/true));
}

}  // namespace
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("_add_act_forward_native", &cnnkernels::add_act_forward_cpu);
  m.impl("_add_act_backward_native", &cnnkernels::add_act_backward_cpu);
}
