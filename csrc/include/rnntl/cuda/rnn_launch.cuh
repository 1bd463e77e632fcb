// Elman RNN launches: the workspaces, the kernel arguments built from the params, and the
// RNN's part of the sequence drivers of sequence_launch.cuh (one pre-activation gradient
// for both weights and both biases). Kernels: rnn_kernels.cuh.
// Shapes: T steps, B batch, H hidden (P = H, G = H), N valid (compact) rows.
#pragma once

#include "rnn_kernels.cuh"
#include "sequence_launch.cuh"

namespace rnntl {
namespace cuda {

template <typename T>
struct RnnForwardWorkspace : ForwardWorkspace<T> {
  RnnForwardWorkspace(const RnnForwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 1, c);
    this->bytes = c.offset;
  }
};

template <typename T>
struct RnnBackwardWorkspace : BackwardWorkspace<T> {
  T* grad_preactivation;        // [B, H]
  T* grad_preactivation_all;    // [N, H]

  RnnBackwardWorkspace(const RnnBackwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 1, c);
    grad_preactivation = c.take<T>(p.batch * p.hidden);
    grad_preactivation_all = c.take<T>(p.order.valid_rows * p.hidden);
    this->bytes = c.offset;
  }
};

struct RnnLaunch : NoStateBesidesHidden {
  using Cell = RnnCell;
  using ForwardParams = RnnForwardParams;
  using BackwardParams = RnnBackwardParams;
  template <typename T>
  using ForwardWorkspace = RnnForwardWorkspace<T>;
  template <typename T>
  using BackwardWorkspace = RnnBackwardWorkspace<T>;

  template <typename Params>
  static bool persistent_supported(const Params&) {
    return true;
  }

  template <typename T>
  static RnnForwardArgs<T> forward_args(const RnnForwardParams& p, const RnnForwardWorkspace<T>& w,
                                        const PersistentPlan& plan) {
    RnnForwardArgs<T> s;
    fill_forward_args(s, p, w, plan);
    s.gates = p.save && p.zoneout ? typed<T>(p.gates) : nullptr;  // without zoneout h~_t is the output
    s.relu = p.relu;
    s.zoneout = typed<T>(p.zoneout);
    s.slot = p.order.slot;
    s.valid_rows = p.order.valid_rows;
    return s;
  }

  template <typename T>
  static void forward_step(const RnnForwardArgs<T>& s, const RnnForwardParams& p, const RnnForwardWorkspace<T>&,
                           const Gemm&, void* stream) {
    launch_kernel(pointwise_grid(p.batch * p.hidden), dim3(kPointwiseThreads), 0, stream, rnn_forward_step_kernel<T>,
                  s);
  }

  template <typename T>
  static RnnBackwardArgs<T> backward_args(const RnnBackwardParams& p, const RnnBackwardWorkspace<T>& w,
                                          const PersistentPlan& plan) {
    RnnBackwardArgs<T> s;
    fill_backward_args(s, p, w, plan);
    s.relu = p.relu;
    s.zoneout = typed<T>(p.zoneout);
    s.grad_preactivation_all = w.grad_preactivation_all;
    s.grad_preactivation = w.grad_preactivation;
    return s;
  }

  template <typename T>
  static void backward_step(const RnnBackwardArgs<T>& s, const RnnBackwardParams& p,
                            const RnnBackwardWorkspace<T>& w, const Gemm& gemm, void* stream) {
    const int64_t H = p.hidden;
    launch_kernel(pointwise_grid(p.batch * H), dim3(kPointwiseThreads), 0, stream, rnn_backward_step_kernel<T>, s);
    // dL/dh_{t-1} = mask * (dL/da W_hh), [n, H] @ [H, H], plus d * dL/dh_t (already in the carry) with zoneout.
    recurrent_hidden_gradient(p, w, gemm, s.running, H, static_cast<const T*>(w.grad_preactivation),
                              p.zoneout != nullptr, stream);
  }

  // Both weights' gradients read the same dL/da.
  template <typename T>
  static const T* input_gate_grads(const RnnBackwardWorkspace<T>& w) {
    return w.grad_preactivation_all;
  }
  template <typename T>
  static const T* hidden_gate_grads(const RnnBackwardWorkspace<T>& w) {
    return w.grad_preactivation_all;
  }

  // Both biases' gradients are the column sums of dL/da (two outputs, which must not alias).
  template <typename T>
  static void cell_gradients(const RnnBackwardParams& p, const RnnBackwardWorkspace<T>& w, const Gemm&,
                             void* stream) {
    const int64_t rows = p.order.valid_rows, H = p.hidden;
    const T* grad_a = w.grad_preactivation_all;
    if (p.grad_bias_ih) column_sum(grad_a, typed<T>(p.grad_bias_ih), rows, H, stream);
    if (p.grad_bias_hh) column_sum(grad_a, typed<T>(p.grad_bias_hh), rows, H, stream);
  }
};

}  // namespace cuda
}  // namespace rnntl
