// CNNKERNELS_SIMD_CLONES: put before a function whose `omp simd` loop does the work of a
// pass. The extension is compiled for baseline x86-64 (SSE2), so that one wheel runs on
// every x86 CPU; GCC's target_clones adds AVX2 (x86-64-v3) and AVX-512 (x86-64-v4)
// copies of the function, and the loader picks the best one for the CPU once (an ifunc).
// bfloat16 passes gain most: their widening/narrowing (simd_cast.h) runs 4x faster with
// AVX-512 than with SSE2 (a bfloat16 scale-shift-ReLU pass over [8, 224, 56, 56] rows:
// 1.9 ms -> 0.5 ms, 2 threads, AMD EPYC); float32 passes are bound by memory either way.
// A clone may contract a * b + c into one FMA, so results can differ from the SSE2 copy
// in the last bit of float arithmetic; on one machine they are the same from run to run.
// Elsewhere (clang, other architectures) the functions are compiled once, as before.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CNNKERNELS_SIMD_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define CNNKERNELS_SIMD_CLONES
#endif
