#pragma once

namespace cnnkernels {
#ifdef CNNKERNELS_WITH_CUDA
inline constexpr bool kBuiltWithCuda = true;
#else
inline constexpr bool kBuiltWithCuda = false;
#endif
}  // namespace cnnkernels
