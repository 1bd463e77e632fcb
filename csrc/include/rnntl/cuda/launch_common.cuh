// Host code shared by the LSTM and GRU launches: launch shapes, the launches of the
// shared kernels of device_common.cuh, the typed GEMM hook, the persistent plan, the
// workspace carver and the parts of the workspaces and kernel arguments every cell has.
#pragma once

#include "device_common.cuh"

namespace rnntl {
namespace cuda {

constexpr int kPointwiseThreads = 128;

// Grid of a grid-stride element-wise kernel over `total` elements.
inline dim3 pointwise_grid(int64_t total) {
  const int64_t blocks = ceil_div(total > 0 ? total : 1, kPointwiseThreads);
  return dim3(static_cast<unsigned int>(blocks < 4096 ? blocks : 4096));
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

// The valid rows of a [T, B, width] input as compact rows [N, width], and back (zeros at
// the padded steps); see rnntl/host_order.h.
template <typename T>
inline void compact_from_padded(const T* src, T* dst, const OrderView& order, int64_t steps, int64_t batch,
                                int64_t width, void* stream) {
  launch_kernel(pointwise_grid(steps * batch * width), dim3(kPointwiseThreads), 0, stream,
                compact_from_padded_kernel<T>, src, dst, order.slot, order.active, order.first_row, steps, batch,
                width);
}

template <typename T>
inline void padded_from_compact(const T* src, T* dst, const OrderView& order, int64_t steps, int64_t batch,
                                int64_t width, void* stream) {
  launch_kernel(pointwise_grid(steps * batch * width), dim3(kPointwiseThreads), 0, stream,
                padded_from_compact_kernel<T>, src, dst, order.slot, order.active, order.first_row, steps, batch,
                width);
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

// Null when every launch so far succeeded, else the CUDA error message.
inline const char* launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// Zeroes the grid barrier's counter and launches a persistent kernel cooperatively.
// Null on success, else the CUDA error message.
template <typename Args>
inline const char* launch_persistent(const PersistentPlan& plan, void* stream, void (*kernel)(Args),
                                     const Args& args) {
  cudaMemsetAsync(args.barrier, 0, sizeof(unsigned int), static_cast<cudaStream_t>(stream));
  const cudaError_t error =
      launch_cooperative(dim3(plan.blocks), dim3(plan.threads), plan.shared_bytes, stream, kernel, args);
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// Runs f(T{}) with T the element type of `dtype`. float64 exists only in the CPU
// emulation of the tests (the reference dtype there); the GPU entry points reject it.
template <typename F>
auto dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
#if !defined(__CUDACC__)
    case DType::kFloat64: return f(double{});
#endif
    default: return f(float{});
  }
}

// Bump allocator over the caller's workspace; with a null base it only measures.
struct WorkspaceCarver {
  unsigned char* base;
  size_t offset = 0;
  template <typename V>
  V* take(int64_t count) {
    offset = (offset + 255) / 256 * 256;
    V* p = base ? reinterpret_cast<V*>(base + offset) : nullptr;
    offset += size_t(count > 0 ? count : 0) * sizeof(V);
    return p;
  }
};


template <typename T>
inline const T* typed(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
inline T* typed(void* p) {
  return static_cast<T*>(p);
}

// The buffers every cell's forward needs; each cell's workspace carves these first
// (take_common) and then its own. G = gates * H; N = valid rows (compact rows,
// rnntl/host_order.h).
template <typename T>
struct ForwardWorkspace {
  T* input_rows;                // [N, I] the input's valid rows, or null (compact_is_padded: the input itself)
  T* input_gates;               // [N, G]
  T* hidden_state;              // [B, P]
  T* recurrent_gates;           // [B, G]
  acc_t<T>* hidden_exchange;    // [2, B, H]
  unsigned int* barrier;        // [1]
  T* masked_hidden;             // [B, P] mask * h_{t-1}, or null (no recurrent_mask)
  size_t bytes = 0;             // the whole workspace, set by the cell's constructor

 protected:
  void take_common(const SequenceParams& p, int64_t gates, WorkspaceCarver& c) {
    const int64_t B = p.batch, H = p.hidden, G = gates * H, N = p.order.valid_rows;
    input_rows = p.order.compact_is_padded ? nullptr : c.take<T>(N * p.input_size);
    input_gates = c.take<T>(N * G);
    hidden_state = c.take<T>(B * p.out_size);
    recurrent_gates = c.take<T>(B * G);
    hidden_exchange = c.take<acc_t<T>>(2 * B * H);
    barrier = c.take<unsigned int>(1);
    masked_hidden = p.recurrent_mask ? c.take<T>(B * p.out_size) : nullptr;
  }
};

template <typename T>
struct BackwardWorkspace {
  T* input_rows;                // [N, I] dL/dx of the valid rows, then the input's valid rows (for
                                // dW_ih); null when compact_is_padded or neither is wanted
  T* grad_hidden_carry;         // [B, P]
  T* hidden_prev_all;           // [N, P] or null (no dW_hh)
  acc_t<T>* gate_exchange;      // [2, B, G]
  unsigned int* barrier;        // [1]
  T* grad_hidden_product;       // [B, P] dL/da W_hh before the mask, or null (no recurrent_mask)
  size_t bytes = 0;

 protected:
  void take_common(const BackwardParams& p, int64_t gates, WorkspaceCarver& c) {
    const int64_t B = p.batch, P = p.out_size, N = p.order.valid_rows, I = p.input_size;
    const bool gather = !p.order.compact_is_padded;  // else x and dL/dx are their own compact rows
    input_rows = gather && (p.grad_input || p.grad_weight_ih) ? c.take<T>(N * I) : nullptr;
    grad_hidden_carry = c.take<T>(B * P);
    hidden_prev_all = p.grad_weight_hh ? c.take<T>(N * P) : nullptr;
    gate_exchange = c.take<acc_t<T>>(2 * B * gates * p.hidden);
    barrier = c.take<unsigned int>(1);
    grad_hidden_product = p.recurrent_mask ? c.take<T>(B * P) : nullptr;
  }
};

// Stepwise: the input of step t's recurrent GEMM for the first n slots, [n, P]: h_{t-1}
// itself, or mask * h_{t-1} written to w.masked_hidden.
template <typename T>
inline const T* recurrent_product_input(const SequenceParams& p, const ForwardWorkspace<T>& w, int64_t n,
                                        void* stream) {
  if (!p.recurrent_mask) return w.hidden_state;
  launch_kernel(pointwise_grid(n * p.out_size), dim3(kPointwiseThreads), 0, stream, masked_rows_kernel<T>,
                static_cast<const T*>(w.hidden_state), w.masked_hidden, typed<T>(p.recurrent_mask), p.order.order, n,
                p.out_size, false);
  return w.masked_hidden;
}

// Stepwise: dL/dh_{t-1} of the first n slots from their gate gradients grad_gates [n, G]:
// the product's part grad_gates @ W_hh, times the mask where there is one, written to the
// carry, or added to it (accumulate: the GRU's direct part z * dL/dh_t is there, unmasked).
template <typename T>
inline void recurrent_hidden_gradient(const SequenceParams& p, const BackwardWorkspace<T>& w, const Gemm& gemm,
                                      int64_t n, int64_t G, const T* grad_gates, bool accumulate, void* stream) {
  const int64_t P = p.out_size;
  if (!p.recurrent_mask) {
    gemm(n, P, G, grad_gates, G, false, p.weight_hh, P, false, w.grad_hidden_carry, P, accumulate);
    return;
  }
  gemm(n, P, G, grad_gates, G, false, p.weight_hh, P, false, w.grad_hidden_product, P, false);
  launch_kernel(pointwise_grid(n * P), dim3(kPointwiseThreads), 0, stream, masked_rows_kernel<T>,
                static_cast<const T*>(w.grad_hidden_product), w.grad_hidden_carry, typed<T>(p.recurrent_mask),
                p.order.order, n, P, accumulate);
}

// The kernels' arguments from the params, the workspace and the persistent plan.
inline void fill_sequence_args(SequenceArgs& s, const SequenceParams& p, const PersistentPlan& plan) {
  s.steps = p.steps;
  s.batch = p.batch;
  s.hidden = p.hidden;
  s.out_size = p.out_size;
  s.reverse = p.reverse;
  s.units_per_block = plan.units_per_block;
  s.t = 0;
  s.running = 0;
  s.order = p.order.order;
  s.length = p.order.length;
  s.active = p.order.active;
  s.first_row = p.order.first_row;
}

template <typename T>
inline void fill_forward_args(ForwardArgs<T>& s, const ForwardParams& p, const ForwardWorkspace<T>& w,
                              const PersistentPlan& plan) {
  fill_sequence_args(s, p, plan);
  s.input_gates = w.input_gates;
  s.bias_ih = typed<T>(p.bias_ih);
  s.bias_hh = typed<T>(p.bias_hh);
  s.weight_hh = typed<T>(p.weight_hh);
  s.recurrent_gates = w.recurrent_gates;
  s.hidden_state = w.hidden_state;
  s.hidden_exchange = w.hidden_exchange;
  s.barrier = w.barrier;
  s.output = typed<T>(p.output);
  s.h_n = typed<T>(p.h_n);
  s.gates = p.save ? typed<T>(p.gates) : nullptr;
  s.recurrent_mask = typed<T>(p.recurrent_mask);
}

template <typename T>
inline void fill_backward_args(BackwardArgs<T>& s, const BackwardParams& p, const BackwardWorkspace<T>& w,
                               const PersistentPlan& plan) {
  fill_sequence_args(s, p, plan);
  s.grad_output = typed<T>(p.grad_output);
  s.grad_h_n = typed<T>(p.grad_h_n);
  s.weight_hh = typed<T>(p.weight_hh);
  s.h0 = typed<T>(p.h0);
  s.output = typed<T>(p.output);
  s.gates = typed<T>(p.gates);
  s.grad_hidden_carry = w.grad_hidden_carry;
  s.gate_exchange = w.gate_exchange;
  s.barrier = w.barrier;
  s.hidden_prev_all = w.hidden_prev_all;
  s.grad_h0 = typed<T>(p.grad_h0);
  s.recurrent_mask = typed<T>(p.recurrent_mask);
  s.state_clip = acc_t<T>(p.state_clip);
  s.gate_clip = acc_t<T>(p.gate_clip);
}

}  // namespace cuda
}  // namespace rnntl
