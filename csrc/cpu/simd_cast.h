// Conversions between a tensor's dtype and its arithmetic type (acc_t) that compilers
// vectorise inside `omp simd` loops. Private to csrc/cpu.
//
// static_cast between c10::BFloat16 and float keeps GCC from vectorising the loop around
// it: a channels_last pass in bfloat16 ran about 8x slower than in float32. Here
// bfloat16 is widened by a 16-bit shift and narrowed with round-to-nearest-even, NaN to
// 0x7FC0: bit for bit c10's conversions (c10/util/BFloat16.h), written as integer
// arithmetic that vectorises. Other types keep static_cast.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cnnkernels {

template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
    return c10::BFloat16(v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded),
                         c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

}  // namespace cnnkernels
