// Small kernels shared by the LSTM and GRU sequence drivers: moving rows between batch
// order and slot order, column sums (bias gradients) and the launch shape of
// element-wise kernels.
#pragma once

#include "../cell_math.h"
#include "../cuda_compat.h"
#include "../params.h"

namespace rnntl {
namespace cuda {

constexpr int kPointwiseThreads = 128;

// Grid of a grid-stride element-wise kernel over `total` elements.
inline dim3 pointwise_grid(int64_t total) {
  const int64_t blocks = ceil_div(total > 0 ? total : 1, kPointwiseThreads);
  return dim3(static_cast<unsigned int>(blocks < 4096 ? blocks : 4096));
}

#define RNNTL_GRID_STRIDE_LOOP(index, total)                                                     \
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < (total);        \
       index += int64_t(gridDim.x) * blockDim.x)

// dst[j, k] = src[order[j], k] (slot order from batch order), or 0 where src is null.
//   src: [rows, width] in batch order, or null;  dst: [rows, width] slot-major.
template <typename Src, typename Dst>
__global__ void gather_rows_kernel(const Src* src, Dst* dst, const int64_t* order, int64_t rows, int64_t width) {
  RNNTL_GRID_STRIDE_LOOP(index, rows * width) {
    const int64_t j = index / width, k = index % width;
    dst[index] = src ? from_acc<Dst>(to_acc(src[order[j] * width + k])) : from_acc<Dst>(0);
  }
}

// dst[order[j], k] = src[j, k] (batch order from slot order).
//   src: [rows, width] slot-major;  dst: [rows, width] batch order.
template <typename Src, typename Dst>
__global__ void scatter_rows_kernel(const Src* src, Dst* dst, const int64_t* order, int64_t rows, int64_t width) {
  RNNTL_GRID_STRIDE_LOOP(index, rows * width) {
    const int64_t j = index / width, k = index % width;
    dst[order[j] * width + k] = from_acc<Dst>(to_acc(src[index]));
  }
}

// out[c] = sum_r in[r, c], one warp per column (lanes split the rows, then a shuffle
// reduction), float accumulation.  in: [rows, cols];  out: [cols].
template <typename T>
__global__ void column_sum_kernel(const T* in, T* out, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  const int64_t warps_per_block = blockDim.x / warpSize;
  const int64_t lane = threadIdx.x % warpSize;
  for (int64_t c = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / warpSize; c < cols;
       c += int64_t(gridDim.x) * warps_per_block) {
    A sum = A(0);
    for (int64_t r = lane; r < rows; r += warpSize) sum += to_acc(in[r * cols + c]);
    for (int offset = warpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[c] = from_acc<T>(sum);
  }
}

// Sum of v over the 32 lanes of a warp, every lane gets it (all lanes must call).
template <typename A>
RNNTL_DEVICE A warp_sum(A v) {
  for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename Src, typename Dst>
inline void gather_rows(const Src* src, Dst* dst, const int64_t* order, int64_t rows, int64_t width, void* stream) {
  launch_kernel(pointwise_grid(rows * width), dim3(kPointwiseThreads), 0, stream, gather_rows_kernel<Src, Dst>, src,
                dst, order, rows, width);
}

template <typename Src, typename Dst>
inline void scatter_rows(const Src* src, Dst* dst, const int64_t* order, int64_t rows, int64_t width, void* stream) {
  launch_kernel(pointwise_grid(rows * width), dim3(kPointwiseThreads), 0, stream, scatter_rows_kernel<Src, Dst>, src,
                dst, order, rows, width);
}

template <typename T>
inline void column_sum(const T* in, T* out, int64_t rows, int64_t cols, void* stream) {
  const int64_t warps = kPointwiseThreads / 32;
  const int64_t blocks = ceil_div(cols, warps);
  launch_kernel(dim3(static_cast<unsigned int>(blocks < 1024 ? blocks : 1024)), dim3(kPointwiseThreads), 0, stream,
                column_sum_kernel<T>, in, out, rows, cols);
}

// The GEMM hook with typed pointers. C[m, n] = op(A) @ op(B) (+ C).
struct Gemm {
  GemmHook hook;
  DType dtype;
  void operator()(int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, bool a_transposed, const void* b,
                  int64_t ldb, bool b_transposed, void* c, int64_t ldc, bool accumulate) const {
    if (m <= 0 || n <= 0) return;
    GemmCall call{m, n, k, a, lda, a_transposed, b, ldb, b_transposed, c, ldc, accumulate};
    hook.run(hook.context, dtype, call);
  }
};

// Plan of a persistent launch: how many hidden units each block owns, the grid, and the
// shared memory per block. supported == false: the sizes do not fit on chip or the grid
// cannot be co-resident; the driver then uses the stepwise strategy.
struct PersistentPlan {
  bool supported = false;
  int64_t units_per_block = 0;
  int blocks = 0;
  int threads = 0;
  size_t shared_bytes = 0;
};

// Smallest slice of hidden units per block (so the most blocks, each with the least work
// per step) whose shared memory fits and whose grid is co-resident on this device.
template <typename Kernel, typename SharedBytes>
inline PersistentPlan plan_persistent(Kernel kernel, int64_t hidden, int threads, SharedBytes shared_bytes_for) {
  PersistentPlan plan;
  int device = 0, sms = 0, smem_optin = 0, cooperative = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return plan;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (!cooperative || sms <= 0) return plan;
  for (int64_t units = ceil_div(hidden, sms); units <= hidden; ++units) {
    const int64_t blocks = ceil_div(hidden, units);
    const size_t bytes = shared_bytes_for(units);
    if (bytes > size_t(smem_optin)) return plan;  // only grows with units
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) != cudaSuccess) {
      cudaGetLastError();
      return plan;
    }
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, bytes) != cudaSuccess) {
      cudaGetLastError();
      return plan;
    }
    if (int64_t(per_sm) * sms >= blocks) {
      plan.supported = true;
      plan.units_per_block = units;
      plan.blocks = static_cast<int>(blocks);
      plan.threads = threads;
      plan.shared_bytes = bytes;
      return plan;
    }
  }
  return plan;
}

// Threads per block of the persistent kernels: whole warps (a warp owns an item).
inline int persistent_threads(const LaunchEnv& env) {
  const int threads = env.threads_per_block > 0 ? env.threads_per_block : 256;
  return (threads + 31) / 32 * 32;
}

// Persistent where supported and the batch is small enough that per-step GEMM launches
// dominate the stepwise strategy; an explicit request that cannot be met is an error.
inline const char* resolve_strategy(Strategy requested, const PersistentPlan& plan, int64_t batch, bool* persistent) {
  if (requested == Strategy::kPersistent) {
    if (!plan.supported) return "rnntl_fast: the persistent CUDA strategy does not support these sizes";
    *persistent = true;
    return nullptr;
  }
  *persistent = requested == Strategy::kAuto && plan.supported && batch <= 64;
  return nullptr;
}

inline const char* launch_error(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error == cudaSuccess) return nullptr;
  (void)what;
  return cudaGetErrorString(error);
}

}  // namespace cuda
}  // namespace rnntl
