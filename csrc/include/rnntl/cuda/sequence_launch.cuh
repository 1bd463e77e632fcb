// The host-side sequence drivers, one for every cell: choose the strategy, run the input
// projection, then either the persistent kernel (persistent_kernels.cuh) or the stepwise
// loop, and in the backward the whole-sequence gradient GEMMs. What differs between cells
// comes from a launch policy (LstmLaunch in lstm_launch.cuh, GruLaunch in gru_launch.cuh):
//   Cell                               the device policy of the persistent skeleton
//   ForwardParams, BackwardParams      the op's params (rnntl/params.h)
//   ForwardWorkspace<T>, BackwardWorkspace<T>  carved from env.workspace; .bytes its size
//   persistent_supported(p)            the persistent kernels cover these params
//   forward_args(p, w, plan), backward_args(p, w, plan)  the kernels' arguments, built once
//   forward_begin/forward_step/forward_end(s, p, w, gemm, stream)    stepwise forward: state
//                                      besides h in, one step after the recurrent GEMM, out
//   backward_begin/backward_step/backward_end(s, p, w, gemm, stream)  the same, backward
//                                      (begin / end: none for a cell that inherits
//                                      NoStateBesidesHidden)
//   input_gate_grads(w), hidden_gate_grads(w)  [N, G] dL/d(W_ih x), dL/d(W_hh h) (compact rows)
//   cell_gradients(p, w, gemm, stream) the cell's own whole-sequence gradients (biases, W_hr)
// Also the typed entry points behind rnntl/cuda_api.h (dtype dispatch, workspace size).
// Shapes: T steps, B batch, I input, H hidden, P out_size, G = Cell::kGates * H, N valid
// rows: the whole-sequence products run over the compact rows (rnntl/host_order.h), so a
// padded step costs nothing there and whatever the input holds at it (NaN, inf) reaches
// no output and no gradient.
#pragma once

#include "launch_common.cuh"
#include "persistent_kernels.cuh"

namespace rnntl {
namespace cuda {

template <typename Launch, typename T>
inline PersistentPlan forward_plan(const typename Launch::ForwardParams& p) {
  using Cell = typename Launch::Cell;
  if (!Launch::persistent_supported(p)) return PersistentPlan{};
  return plan_persistent(persistent_forward_kernel<Cell, T>, p.hidden, persistent_threads(p.env),
                         [&](int64_t units) { return persistent_forward_shared_bytes<Cell, T>(p.batch, p.hidden, units); });
}

template <typename Launch, typename T>
inline PersistentPlan backward_plan(const typename Launch::BackwardParams& p) {
  using Cell = typename Launch::Cell;
  if (!Launch::persistent_supported(p)) return PersistentPlan{};
  return plan_persistent(persistent_backward_kernel<Cell, T>, p.hidden, persistent_threads(p.env),
                         [&](int64_t units) { return persistent_backward_shared_bytes<Cell, T>(p.batch, p.hidden, units); });
}

// The input's valid rows [N, I]: the input itself when compact rows are padded rows, else
// gathered into `rows` ([N, I] workspace).
template <typename T>
inline const T* valid_input_rows(const SequenceParams& p, T* rows, void* stream) {
  if (p.order.compact_is_padded) return typed<T>(p.input);
  compact_from_padded(typed<T>(p.input), rows, p.order, p.steps, p.batch, p.input_size, stream);
  return rows;
}

template <typename Launch, typename T>
const char* forward_run(const typename Launch::ForwardParams& p) {
  using Cell = typename Launch::Cell;
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, H = p.hidden, P = p.out_size, G = Cell::kGates * H;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  const typename Launch::template ForwardWorkspace<T> w(p, p.env.workspace);
  const PersistentPlan plan = forward_plan<Launch, T>(p);
  bool persistent = false;
  if (const char* error = resolve_strategy(p.env.strategy, plan, B, &persistent)) return error;

  // Input projection of all valid rows at once: [N, I] @ W_ih^T.
  const T* input = valid_input_rows<T>(p, w.input_rows, stream);
  gemm(p.order.valid_rows, G, I, input, I, false, p.weight_ih, I, true, w.input_gates, G, false);
  auto s = Launch::template forward_args<T>(p, w, plan);

  if (persistent) {
    gather_rows(typed<T>(p.h0), w.hidden_exchange, p.order.order, B, H, stream);
    if (const char* error = launch_persistent(plan, stream, persistent_forward_kernel<Cell, T>, s)) return error;
    return launch_error();
  }

  gather_rows(typed<T>(p.h0), w.hidden_state, p.order.order, B, P, stream);
  Launch::forward_begin(s, p, w, gemm, stream);
  for (int64_t step = 0; step < T_; ++step) {
    const int64_t t = p.reverse ? T_ - 1 - step : step;
    const int64_t n = p.order.active_host[t];
    s.t = t;
    s.running = n;
    // Recurrent part of the running slots: [n, P] @ W_hh^T (h_{t-1} masked where there is a mask).
    gemm(n, G, P, recurrent_product_input(p, w, n, stream), P, false, p.weight_hh, P, true, w.recurrent_gates, G,
         false);
    Launch::forward_step(s, p, w, gemm, stream);
  }
  scatter_rows(static_cast<const T*>(w.hidden_state), typed<T>(p.h_n), p.order.order, B, P, stream);
  Launch::forward_end(s, p, w, gemm, stream);
  return launch_error();
}

template <typename Launch, typename T>
const char* backward_run(const typename Launch::BackwardParams& p) {
  using Cell = typename Launch::Cell;
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, P = p.out_size, G = Cell::kGates * p.hidden;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  const typename Launch::template BackwardWorkspace<T> w(p, p.env.workspace);
  const PersistentPlan plan = backward_plan<Launch, T>(p);
  bool persistent = false;
  if (const char* error = resolve_strategy(p.env.strategy, plan, B, &persistent)) return error;
  auto s = Launch::template backward_args<T>(p, w, plan);

  if (persistent) {
    if (const char* error = launch_persistent(plan, stream, persistent_backward_kernel<Cell, T>, s)) return error;
  } else {
    gather_rows(typed<T>(p.grad_h_n), w.grad_hidden_carry, p.order.order, B, P, stream);
    Launch::backward_begin(s, p, w, gemm, stream);
    for (int64_t step = T_ - 1; step >= 0; --step) {
      const int64_t t = p.reverse ? T_ - 1 - step : step;
      s.t = t;
      s.running = p.order.active_host[t];
      Launch::backward_step(s, p, w, gemm, stream);
    }
    if (p.grad_h0)
      scatter_rows(static_cast<const T*>(w.grad_hidden_carry), typed<T>(p.grad_h0), p.order.order, B, P, stream);
    Launch::backward_end(s, p, w, gemm, stream);
  }

  // Whole-sequence GEMMs over the valid rows, only for the gradients asked for.
  const int64_t rows = p.order.valid_rows;
  const T* input_side = Launch::input_gate_grads(w);
  if (p.grad_input) {
    // Scattered before dW_ih reuses the buffer (stream order).
    T* grad_rows = p.order.compact_is_padded ? typed<T>(p.grad_input) : w.input_rows;
    gemm(rows, I, G, input_side, G, false, p.weight_ih, I, false, grad_rows, I, false);
    if (!p.order.compact_is_padded)
      padded_from_compact(static_cast<const T*>(grad_rows), typed<T>(p.grad_input), p.order, T_, B, I, stream);
  }
  if (p.grad_weight_ih) {
    const T* input = valid_input_rows<T>(p, w.input_rows, stream);
    gemm(G, I, rows, input_side, G, true, input, I, false, p.grad_weight_ih, I, false);
  }
  if (p.grad_weight_hh)
    gemm(G, P, rows, Launch::hidden_gate_grads(w), G, true, w.hidden_prev_all, P, false, p.grad_weight_hh, P, false);
  Launch::cell_gradients(p, w, gemm, stream);
  return launch_error();
}

// The stepwise hooks of a cell that carries nothing but h between steps.
struct NoStateBesidesHidden {
  template <typename... Any>
  static void forward_begin(const Any&...) {}
  template <typename... Any>
  static void forward_end(const Any&...) {}
  template <typename... Any>
  static void backward_begin(const Any&...) {}
  template <typename... Any>
  static void backward_end(const Any&...) {}
};

constexpr const char* kUnsupportedDtype = "rnntl_fast: the CUDA kernels support float32, float16 and bfloat16";

// The entry points of rnntl/cuda_api.h for one cell: float32, float16 and bfloat16.
template <typename Launch>
size_t forward_workspace_bytes(const typename Launch::ForwardParams& p) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return typename Launch::template ForwardWorkspace<decltype(tag)>(p, nullptr).bytes;
  });
}

template <typename Launch>
const char* forward(const typename Launch::ForwardParams& p) {
  if (p.dtype == DType::kFloat64) return kUnsupportedDtype;
  return dispatch_dtype(p.dtype, [&](auto tag) { return forward_run<Launch, decltype(tag)>(p); });
}

template <typename Launch>
size_t backward_workspace_bytes(const typename Launch::BackwardParams& p) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return typename Launch::template BackwardWorkspace<decltype(tag)>(p, nullptr).bytes;
  });
}

template <typename Launch>
const char* backward(const typename Launch::BackwardParams& p) {
  if (p.dtype == DType::kFloat64) return kUnsupportedDtype;
  return dispatch_dtype(p.dtype, [&](auto tag) { return backward_run<Launch, decltype(tag)>(p); });
}

}  // namespace cuda
}  // namespace rnntl
