// Host emulation of the small CUDA subset used by csrc/cuda/*_kernels.cuh, so that the
// real kernel source runs on the CPU in tests (g++ -std=c++20 -pthread).
//
// Model:
//   * launch(grid, block, kernel, args...) runs the blocks of the grid one after the
//     other, in blockIdx order (x fastest). A block is executed by blockDim.x*y*z host
//     threads, one per CUDA thread; the same host threads are reused for every block
//     of the launch.
//   * threadIdx / blockIdx / blockDim / gridDim are thread_local variables set by
//     launch() in each host thread.
//   * __syncthreads() is a std::barrier over the threads of the block.
//   * __shared__ is `static`: one copy per kernel instantiation, shared by all the
//     threads of the running block. Correct because blocks run one at a time and
//     launches are serialised by a mutex. Shared memory is NOT reset between blocks
//     (as on a GPU, kernels must write before they read).
//   * __global__ / __device__ / __host__ are empty, __forceinline__ is `inline`;
//     g++ understands __restrict__ natively.
//
// Not modelled: warps (no shuffles, votes, warp-synchronous code), atomics, dynamic
// shared memory, streams, concurrent blocks, memory spaces (device pointers are host
// pointers), half / bfloat16 types, __ldg, CUDA math intrinsics. A kernel that lets some
// threads return before a __syncthreads() the others reach deadlocks here (it is
// undefined behaviour on a GPU too).
#pragma once

#if defined(__CUDACC__)
#error "cuda_host_emulation.h is for host compilers only"
#endif

#include <barrier>
#include <cstddef>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emulation {

inline thread_local std::barrier<>* block_barrier = nullptr;

// Largest block CUDA accepts; bigger blocks are refused as the driver would.
inline constexpr unsigned int kMaxThreadsPerBlock = 1024;

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

namespace cuda_emulation {

// Runs kernel(args...) on a grid x block launch and returns when every block is done.
// Arguments are copied once and shared (read-only) by all threads, like kernel
// parameters on a GPU.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args... args) {
  const std::size_t threads = std::size_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    throw std::invalid_argument("cuda_emulation::launch: invalid launch configuration");
  }
  static std::mutex one_launch_at_a_time;
  std::lock_guard<std::mutex> lock(one_launch_at_a_time);

  std::barrier<> barrier(static_cast<std::ptrdiff_t>(threads));
  auto worker = [&](std::size_t t) {
    block_barrier = &barrier;
    blockDim = block;
    gridDim = grid;
    threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (std::size_t(block.x) * block.y));
    for (unsigned int bz = 0; bz < grid.z; ++bz) {
      for (unsigned int by = 0; by < grid.y; ++by) {
        for (unsigned int bx = 0; bx < grid.x; ++bx) {
          blockIdx = dim3(bx, by, bz);
          std::invoke(kernel, static_cast<Params>(args)...);
          barrier.arrive_and_wait();  // the block is over before the next one reuses __shared__
        }
      }
    }
    block_barrier = nullptr;
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (std::size_t t = 0; t < threads; ++t) pool.emplace_back(worker, t);
  for (auto& thread : pool) thread.join();
}

}  // namespace cuda_emulation
