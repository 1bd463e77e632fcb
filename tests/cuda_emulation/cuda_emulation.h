// A CPU emulation of the parts of the CUDA execution model the rnntl kernels use, so that
// the real kernel sources (csrc/include/rnntl/cuda/*.cuh) run under g++ in tests, also
// under ThreadSanitizer. Included by rnntl/cuda_compat.h when __CUDACC__ is not defined.
//
// Model:
//   * a launch runs every CUDA thread of a block as one std::thread; blocks run one after
//     another, except cooperative launches (the persistent kernels), whose blocks all run
//     at once, as the grid-wide barrier requires (all blocks co-resident);
//   * __syncthreads is a barrier of the block's threads (mutex + condition variable, so
//     that TSan sees the happens-before it gives);
//   * dynamic __shared__ memory is one buffer per block (RNNTL_DYNAMIC_SHARED);
//   * warps are groups of 32 consecutive threads; shuffles and votes exchange values
//     through a per-warp buffer between two warp barriers (every lane of the warp must
//     take part, as with a full mask);
//   * atomics are GCC __atomic builtins (sequentially consistent RMWs), fences are
//     std::atomic_thread_fence;
//   * "device memory" is host memory; streams are ignored (launches are synchronous).
// Device properties (SM count, shared memory) are configurable so that the host-side
// occupancy check of the persistent strategy can be exercised.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrCooperativeLaunch = 95,
};

namespace rnntl {
namespace emu {

// Properties of the emulated device (tests may change them before a launch).
struct DeviceConfig {
  int multiprocessors = 4;
  int shared_per_block_optin = 96 * 1024;
  int shared_per_multiprocessor = 100 * 1024;
  int max_threads_per_multiprocessor = 2048;
  int max_threads_per_launch = 4096;  // emulation limit: one std::thread each
};
inline DeviceConfig& device_config() {
  static DeviceConfig config;
  return config;
}

// Barrier of `count` threads, reusable; generation counting tells rounds apart.
class ThreadBarrier {
 public:
  explicit ThreadBarrier(unsigned count = 1) : count_(count) {}
  void set_count(unsigned count) { count_ = count; }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned count_;
  unsigned waiting_ = 0;
  unsigned generation_ = 0;
};

constexpr int kWarpSize = 32;

struct WarpState {
  ThreadBarrier barrier;
  uint64_t slots[kWarpSize];
};

struct BlockState {
  ThreadBarrier barrier;
  std::unique_ptr<unsigned char[]> shared;
  std::vector<std::unique_ptr<WarpState>> warps;
};

struct ThreadContext {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
  unsigned linear_thread = 0;  // x-fastest index inside the block
  BlockState* block = nullptr;
};

inline ThreadContext& context() {
  thread_local ThreadContext ctx;
  return ctx;
}

inline void* dynamic_shared() { return context().block->shared.get(); }

inline WarpState& warp() { return *context().block->warps[context().linear_thread / kWarpSize]; }
inline unsigned lane_id() { return context().linear_thread % kWarpSize; }

// Runs one group of blocks concurrently (each CUDA thread a std::thread) and joins them.
template <typename Kernel, typename... Args>
void run_blocks(dim3 grid, dim3 block, size_t shared_bytes, const std::vector<uint3>& block_ids, Kernel kernel,
                const Args&... args) {
  const unsigned threads = block.x * block.y * block.z;
  std::vector<std::unique_ptr<BlockState>> states;
  for (size_t i = 0; i < block_ids.size(); ++i) {
    auto state = std::make_unique<BlockState>();
    state->barrier.set_count(threads);
    // Shared memory starts as garbage on a GPU: fill with a pattern, not zeros.
    state->shared.reset(new unsigned char[std::max<size_t>(shared_bytes, 16)]);
    std::memset(state->shared.get(), 0xA5, std::max<size_t>(shared_bytes, 16));
    const unsigned warps = (threads + kWarpSize - 1) / kWarpSize;
    for (unsigned w = 0; w < warps; ++w) {
      auto ws = std::make_unique<WarpState>();
      ws->barrier.set_count(std::min<unsigned>(kWarpSize, threads - w * kWarpSize));
      state->warps.push_back(std::move(ws));
    }
    states.push_back(std::move(state));
  }
  std::vector<std::thread> pool;
  pool.reserve(block_ids.size() * threads);
  for (size_t i = 0; i < block_ids.size(); ++i) {
    for (unsigned linear = 0; linear < threads; ++linear) {
      BlockState* state = states[i].get();
      const uint3 bid = block_ids[i];
      pool.emplace_back([=]() {
        ThreadContext& ctx = context();
        ctx.thread_idx = uint3{linear % block.x, (linear / block.x) % block.y, linear / (block.x * block.y)};
        ctx.block_idx = bid;
        ctx.block_dim = block;
        ctx.grid_dim = grid;
        ctx.linear_thread = linear;
        ctx.block = state;
        kernel(args...);
        ctx.block = nullptr;
      });
    }
  }
  for (auto& t : pool) t.join();
}

inline std::vector<uint3> all_blocks(dim3 grid) {
  std::vector<uint3> ids;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) ids.push_back(uint3{x, y, z});
  return ids;
}

// kernel<<<grid, block, shared_bytes>>>(args...): blocks one after another.
template <typename... KernelArgs, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(KernelArgs...), const Args&... args) {
  for (const uint3& id : all_blocks(grid)) run_blocks(grid, block, shared_bytes, {id}, kernel, args...);
}

// A cooperative launch: all blocks co-resident, as a grid-wide barrier needs.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_cooperative(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(KernelArgs...),
                               const Args&... args) {
  const size_t threads = size_t(grid.x) * grid.y * grid.z * block.x * block.y * block.z;
  if (threads > size_t(device_config().max_threads_per_launch)) return cudaErrorCooperativeLaunchTooLarge;
  run_blocks(grid, block, shared_bytes, all_blocks(grid), kernel, args...);
  return cudaSuccess;
}

// Warp exchange: every lane publishes a value, then reads the one of `source(lane)`.
template <typename V, typename Source>
V warp_exchange(V value, Source source) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "warp exchange of at most 8 bytes");
  WarpState& w = warp();
  const unsigned lane = lane_id();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  w.slots[lane] = bits;
  w.barrier.arrive_and_wait();
  // A source lane past the end of a partial warp has no value: keep one's own, as the
  // CUDA shuffles do for out-of-range sources.
  const unsigned threads = context().block_dim.x * context().block_dim.y * context().block_dim.z;
  const unsigned lanes = std::min<unsigned>(kWarpSize, threads - (context().linear_thread / kWarpSize) * kWarpSize);
  unsigned src = source(lane);
  if (src >= lanes) src = lane;
  V result;
  std::memcpy(&result, &w.slots[src], sizeof(V));
  w.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return result;
}

inline unsigned warp_ballot(bool predicate) {
  WarpState& w = warp();
  const unsigned lane = lane_id();
  w.slots[lane] = predicate ? 1u : 0u;
  w.barrier.arrive_and_wait();
  const unsigned lanes = std::min<unsigned>(
      kWarpSize, context().block_dim.x * context().block_dim.y * context().block_dim.z -
                     (context().linear_thread / kWarpSize) * kWarpSize);
  unsigned mask = 0;
  for (unsigned l = 0; l < lanes; ++l) mask |= unsigned(w.slots[l] != 0) << l;
  w.barrier.arrive_and_wait();
  return mask;
}

}  // namespace emu
}  // namespace rnntl

// Built-in variables.
#define threadIdx (::rnntl::emu::context().thread_idx)
#define blockIdx (::rnntl::emu::context().block_idx)
#define blockDim (::rnntl::emu::context().block_dim)
#define gridDim (::rnntl::emu::context().grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { ::rnntl::emu::context().block->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::rnntl::emu::warp().barrier.arrive_and_wait(); }
// TSan does not model fences; there the ordering comes from the seq_cst atomics the
// kernels pair every fence with (the barrier counter's RMW and acquire load).
#if defined(__SANITIZE_THREAD__)
inline void __threadfence() {}
inline void __threadfence_block() {}
#else
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
#endif

template <typename V>
inline V __shfl_sync(unsigned, V value, int src_lane, int width = warpSize) {
  return ::rnntl::emu::warp_exchange(value, [=](unsigned lane) {
    return (lane / width) * width + (unsigned(src_lane) % width);
  });
}
template <typename V>
inline V __shfl_xor_sync(unsigned, V value, int lane_mask, int width = warpSize) {
  return ::rnntl::emu::warp_exchange(value, [=](unsigned lane) {
    const unsigned src = lane ^ unsigned(lane_mask);
    return src / width == lane / width ? src : lane;
  });
}
template <typename V>
inline V __shfl_down_sync(unsigned, V value, unsigned delta, int width = warpSize) {
  return ::rnntl::emu::warp_exchange(value, [=](unsigned lane) {
    const unsigned src = lane + delta;
    return src / width == lane / width ? src : lane;
  });
}
inline unsigned __ballot_sync(unsigned, bool predicate) { return ::rnntl::emu::warp_ballot(predicate); }
inline bool __any_sync(unsigned mask, bool predicate) { return __ballot_sync(mask, predicate) != 0; }
inline bool __all_sync(unsigned mask, bool predicate) {
  const unsigned lanes = __ballot_sync(mask, true);
  return __ballot_sync(mask, predicate) == lanes;
}

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline unsigned int atomicCAS(unsigned int* address, unsigned int expected, unsigned int desired) {
  __atomic_compare_exchange_n(address, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
inline unsigned int atomicExch(unsigned int* address, unsigned int value) {
  return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* address, float value) {
  unsigned int* bits = reinterpret_cast<unsigned int*>(address);
  unsigned int old = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    float current;
    std::memcpy(&current, &old, sizeof(float));
    const float sum = current + value;
    unsigned int desired;
    std::memcpy(&desired, &sum, sizeof(float));
    if (__atomic_compare_exchange_n(bits, &old, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return current;
  }
}

// Reduced-precision types with the conversions of cuda_fp16.h / cuda_bf16.h:
// IEEE half is GCC's _Float16 (storage and round-to-nearest-even conversion); bfloat16
// is its bit pattern with round-to-nearest-even from float.
using __half = _Float16;
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return static_cast<__half>(v); }
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

// Runtime API subset.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "emulated CUDA error";
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const auto& c = ::rnntl::emu::device_config();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = c.multiprocessors; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = c.shared_per_block_optin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = c.shared_per_multiprocessor; break;
    case cudaDevAttrCooperativeLaunch: *value = 1; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int block_size,
                                                                 size_t shared_bytes) {
  const auto& c = ::rnntl::emu::device_config();
  int by_threads = c.max_threads_per_multiprocessor / std::max(block_size, 1);
  int by_shared = shared_bytes ? int(c.shared_per_multiprocessor / shared_bytes) : by_threads;
  *blocks = std::max(0, std::min(by_threads, by_shared));
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int, cudaStream_t = nullptr) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
