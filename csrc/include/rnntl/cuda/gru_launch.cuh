// GRU launches: the workspaces, the kernel arguments built from the params, and the
// GRU's part of the sequence drivers of sequence_launch.cuh (separate input-side and
// hidden-side gate gradients, two bias gradients). Kernels: gru_kernels.cuh.
// Shapes: T steps, B batch, H hidden (P = H), G = 3H, N valid (compact) rows.
#pragma once

#include "gru_kernels.cuh"
#include "sequence_launch.cuh"

namespace rnntl {
namespace cuda {

template <typename T>
struct GruForwardWorkspace : ForwardWorkspace<T> {
  GruForwardWorkspace(const GruForwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 3, c);
    this->bytes = c.offset;
  }
};

template <typename T>
struct GruBackwardWorkspace : BackwardWorkspace<T> {
  T* grad_hidden_gates;         // [B, 3H]
  T* grad_input_gates_all;      // [N, 3H]
  T* grad_hidden_gates_all;     // [N, 3H] or null (no dW_hh, db_hh)

  GruBackwardWorkspace(const GruBackwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 3, c);
    const int64_t N = p.order.valid_rows, B = p.batch, G = 3 * p.hidden;
    grad_hidden_gates = c.take<T>(B * G);
    grad_input_gates_all = c.take<T>(N * G);
    grad_hidden_gates_all = (p.grad_weight_hh || p.grad_bias_hh) ? c.take<T>(N * G) : nullptr;
    this->bytes = c.offset;
  }
};

struct GruLaunch : NoStateBesidesHidden {
  using Cell = GruCell;
  using ForwardParams = GruForwardParams;
  using BackwardParams = GruBackwardParams;
  template <typename T>
  using ForwardWorkspace = GruForwardWorkspace<T>;
  template <typename T>
  using BackwardWorkspace = GruBackwardWorkspace<T>;

  template <typename Params>
  static bool persistent_supported(const Params&) {
    return true;
  }

  template <typename T>
  static GruForwardArgs<T> forward_args(const GruForwardParams& p, const GruForwardWorkspace<T>& w,
                                        const PersistentPlan& plan) {
    GruForwardArgs<T> s;
    fill_forward_args(s, p, w, plan);
    s.hidden_n = p.save ? typed<T>(p.hidden_n) : nullptr;
    s.zoneout = typed<T>(p.zoneout);
    return s;
  }

  template <typename T>
  static void forward_step(const GruForwardArgs<T>& s, const GruForwardParams& p, const GruForwardWorkspace<T>&,
                           const Gemm&, void* stream) {
    launch_kernel(pointwise_grid(p.batch * p.hidden), dim3(kPointwiseThreads), 0, stream, gru_forward_step_kernel<T>,
                  s);
  }

  template <typename T>
  static GruBackwardArgs<T> backward_args(const GruBackwardParams& p, const GruBackwardWorkspace<T>& w,
                                          const PersistentPlan& plan) {
    GruBackwardArgs<T> s;
    fill_backward_args(s, p, w, plan);
    s.hidden_n = typed<T>(p.hidden_n);
    s.zoneout = typed<T>(p.zoneout);
    s.grad_input_gates_all = w.grad_input_gates_all;
    s.grad_hidden_gates_all = w.grad_hidden_gates_all;
    s.grad_hidden_gates = w.grad_hidden_gates;
    return s;
  }

  template <typename T>
  static void backward_step(const GruBackwardArgs<T>& s, const GruBackwardParams& p,
                            const GruBackwardWorkspace<T>& w, const Gemm& gemm, void* stream) {
    const int64_t H = p.hidden, G = 3 * H;
    launch_kernel(pointwise_grid(p.batch * H), dim3(kPointwiseThreads), 0, stream, gru_backward_step_kernel<T>, s);
    // dL/dh_{t-1} = z*dL/dh~_t (+ d*dL/dh_t with zoneout; already in the carry)
    //             + mask * (dL/d(W_hh h) W_hh), [n, 3H] @ [3H, H].
    recurrent_hidden_gradient(p, w, gemm, s.running, G, static_cast<const T*>(w.grad_hidden_gates), true, stream);
  }

  template <typename T>
  static const T* input_gate_grads(const GruBackwardWorkspace<T>& w) {
    return w.grad_input_gates_all;
  }
  template <typename T>
  static const T* hidden_gate_grads(const GruBackwardWorkspace<T>& w) {
    return w.grad_hidden_gates_all;
  }

  template <typename T>
  static void cell_gradients(const GruBackwardParams& p, const GruBackwardWorkspace<T>& w, const Gemm&,
                             void* stream) {
    const int64_t rows = p.order.valid_rows, G = 3 * p.hidden;
    if (p.grad_bias_ih)
      column_sum(static_cast<const T*>(w.grad_input_gates_all), typed<T>(p.grad_bias_ih), rows, G, stream);
    if (p.grad_bias_hh)
      column_sum(static_cast<const T*>(w.grad_hidden_gates_all), typed<T>(p.grad_bias_hh), rows, G, stream);
  }
};

}  // namespace cuda
}  // namespace rnntl
