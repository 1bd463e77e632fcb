// What the kernel headers (rnntl/cuda/*.cuh) need from CUDA, in one place, so that the
// same sources compile with nvcc for the GPU and with g++ against the CPU emulation of the
// tests (tests/cuda_emulation/cuda_emulation.h, on the include path that build adds):
// dynamic shared memory, accumulation types and conversions, coherent loads of data other
// blocks wrote, the grid-wide barrier and launches.
// No inline PTX anywhere, so that nothing here needs a GPU-only twin.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define RNNTL_DEVICE __device__ __forceinline__
#define RNNTL_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
// One extern array for every kernel (same name, type and alignment, as nvcc requires).
#define RNNTL_DYNAMIC_SHARED(type, name)                               \
  extern __shared__ __align__(16) unsigned char rnntl_dynamic_smem[]; \
  type* name = reinterpret_cast<type*>(rnntl_dynamic_smem)
#else
#include <thread>

#include <cuda_emulation.h>
#define RNNTL_DEVICE inline
#define RNNTL_HOST_DEVICE_INLINE inline
#define RNNTL_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::rnntl::emu::dynamic_shared())
#endif

namespace rnntl {
namespace cuda {

// Accumulation type: float for float / half / bfloat16, double for double (emulation tests).
template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulateType<T>::type;

RNNTL_HOST_DEVICE_INLINE float to_acc(float v) { return v; }
RNNTL_HOST_DEVICE_INLINE double to_acc(double v) { return v; }
template <typename T>
RNNTL_HOST_DEVICE_INLINE T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}
// (The emulation provides __half, __nv_bfloat16 and their conversions too.)
RNNTL_DEVICE float to_acc(__half v) { return __half2float(v); }
RNNTL_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
RNNTL_DEVICE __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
RNNTL_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Load of a value another block wrote before the last grid barrier. On the GPU it goes
// to L2 (ld.cg), bypassing this SM's L1, which is not coherent with other SMs' writes.
template <typename A>
RNNTL_DEVICE A load_coherent(const A* p) {
#if defined(__CUDACC__)
  return __ldcg(p);
#else
  return *p;
#endif
}

// Acquire load of the barrier counter.
RNNTL_DEVICE unsigned int load_acquire(const unsigned int* p) {
#if defined(__CUDACC__)
  // volatile keeps the load in the loop; the __threadfence after the loop orders the
  // data loads after it (the classic pre-sm_70 cooperative-groups pattern, no PTX).
  return *reinterpret_cast<const volatile unsigned int*>(p);
#else
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

RNNTL_DEVICE void spin_pause() {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  __nanosleep(32);
#endif
#else
  std::this_thread::yield();  // hundreds of emulated threads share two cores
#endif
}

// Grid-wide barrier for a persistent kernel. `arrived` is a counter zeroed before the
// launch and only ever incremented: barrier number `round` (1-based) waits until every
// block of the grid has arrived `round` times, so no reset (and no second counter) is
// needed between rounds. Requires every block of the grid to be resident at once
// (checked on the host with the occupancy API; the launch is cooperative).
RNNTL_DEVICE void grid_barrier(unsigned int* arrived, unsigned int round) {
  __syncthreads();  // the whole block has finished the step
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    __threadfence();  // release: this block's global writes before its arrival
    atomicAdd(arrived, 1u);
    const unsigned int target = round * gridDim.x * gridDim.y * gridDim.z;
    while (load_acquire(arrived) < target) spin_pause();
    __threadfence();  // acquire: later loads after every block's arrival
  }
  __syncthreads();
}

RNNTL_HOST_DEVICE_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Plain launch of kernel<<<grid, block, shared_bytes, stream>>>(args...).
template <typename... KernelArgs, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, size_t shared_bytes, void* stream, void (*kernel)(KernelArgs...),
                          const Args&... args) {
#if defined(__CUDACC__)
  kernel<<<grid, block, shared_bytes, static_cast<cudaStream_t>(stream)>>>(args...);
#else
  (void)stream;
  ::rnntl::emu::launch(grid, block, shared_bytes, kernel, args...);
#endif
}

// Cooperative launch of a kernel taking one argument struct: fails (instead of hanging)
// when the grid cannot be co-resident.
template <typename Arg>
inline cudaError_t launch_cooperative(dim3 grid, dim3 block, size_t shared_bytes, void* stream,
                                      void (*kernel)(Arg), const Arg& arg) {
#if defined(__CUDACC__)
  void* args[] = {const_cast<Arg*>(&arg)};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, args, shared_bytes,
                                     static_cast<cudaStream_t>(stream));
#else
  (void)stream;
  return ::rnntl::emu::launch_cooperative(grid, block, shared_bytes, kernel, arg);
#endif
}

}  // namespace cuda
}  // namespace rnntl
