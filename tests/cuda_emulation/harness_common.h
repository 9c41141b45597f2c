// Shared by the CUDA-emulation harnesses (tests/cuda_emulation/*_harness.cpp), which
// include it by a relative path; emulation_build.py hashes it with their sources.
#pragma once

#include <exception>

namespace cnnkernels_harness {

// Runs f and turns an exception (a launch the emulation refused) into the return
// code of the extern "C" entry points: 0 = success, 1 = refused.
template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception&) {
    return 1;
  }
}

}  // namespace cnnkernels_harness
