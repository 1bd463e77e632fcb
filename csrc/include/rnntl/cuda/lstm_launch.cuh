// LSTM launches: the workspaces, the kernel arguments built from the params, and the
// LSTM's part of the sequence drivers of sequence_launch.cuh (the cell state, the
// projection, the bias and W_hr gradients). Kernels: lstm_kernels.cuh.
// Shapes: T steps, B batch, H hidden, P = proj_size or H, G = 4H, N valid (compact) rows.
#pragma once

#include "lstm_kernels.cuh"
#include "sequence_launch.cuh"

namespace rnntl {
namespace cuda {

template <typename T>
struct LstmForwardWorkspace : ForwardWorkspace<T> {
  acc_t<T>* cell_state;         // [B, H]
  T* hidden_unprojected;        // [B, H]
  T* projected;                 // [B, P]

  LstmForwardWorkspace(const LstmForwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 4, c);
    cell_state = c.take<acc_t<T>>(p.batch * p.hidden);
    hidden_unprojected = c.take<T>(p.batch * p.hidden);
    projected = c.take<T>(p.batch * p.out_size);
    this->bytes = c.offset;
  }
};

template <typename T>
struct LstmBackwardWorkspace : BackwardWorkspace<T> {
  acc_t<T>* grad_cell_carry;    // [B, H]
  T* grad_pre_clip;             // [B, P]
  T* grad_hidden_unprojected;   // [B, H]
  T* grad_gates;                // [B, 4H]
  T* grad_gates_all;            // [N, 4H]
  T* grad_pre_clip_all;         // [N, P] or null (no dW_hr)
  T* hidden_unprojected_all;    // [N, H] or null (no dW_hr)

  LstmBackwardWorkspace(const LstmBackwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 4, c);
    const int64_t N = p.order.valid_rows, B = p.batch, H = p.hidden, P = p.out_size, G = 4 * H;
    const bool want_weight_hr = p.weight_hr != nullptr && p.grad_weight_hr != nullptr;
    grad_cell_carry = c.take<acc_t<T>>(B * H);
    grad_pre_clip = c.take<T>(B * P);
    grad_hidden_unprojected = c.take<T>(B * H);
    grad_gates = c.take<T>(B * G);
    grad_gates_all = c.take<T>(N * G);
    grad_pre_clip_all = want_weight_hr ? c.take<T>(N * P) : nullptr;
    hidden_unprojected_all = want_weight_hr ? c.take<T>(N * H) : nullptr;
    this->bytes = c.offset;
  }
};

struct LstmLaunch {
  using Cell = LstmCell;
  using ForwardParams = LstmForwardParams;
  using BackwardParams = LstmBackwardParams;
  template <typename T>
  using ForwardWorkspace = LstmForwardWorkspace<T>;
  template <typename T>
  using BackwardWorkspace = LstmBackwardWorkspace<T>;

  // The persistent kernels have no projection.
  template <typename Params>
  static bool persistent_supported(const Params& p) {
    return p.weight_hr == nullptr && p.out_size == p.hidden;
  }

  template <typename T>
  static LstmForwardArgs<T> forward_args(const LstmForwardParams& p, const LstmForwardWorkspace<T>& w,
                                         const PersistentPlan& plan) {
    LstmForwardArgs<T> s;
    fill_forward_args(s, p, w, plan);
    s.project = p.weight_hr != nullptr;
    s.c0 = typed<T>(p.c0);
    s.c_n = typed<T>(p.c_n);
    s.cells = p.save ? typed<T>(p.cells) : nullptr;
    s.hidden_pre_clip = (p.save && p.proj_clip > 0) ? typed<T>(p.hidden_pre_clip) : nullptr;
    s.zoneout_h = typed<T>(p.zoneout_h);
    s.zoneout_c = typed<T>(p.zoneout_c);
    s.carried_cells = (p.save && p.zoneout_c) ? typed<T>(p.carried_cells) : nullptr;
    s.cell_state = w.cell_state;
    s.hidden_unprojected = w.hidden_unprojected;
    s.cell_clip = acc_t<T>(p.cell_clip);
    s.proj_clip = acc_t<T>(p.proj_clip);
    return s;
  }

  template <typename T>
  static void forward_begin(const LstmForwardArgs<T>& s, const LstmForwardParams& p, const LstmForwardWorkspace<T>&,
                            const Gemm&, void* stream) {
    gather_rows(s.c0, s.cell_state, p.order.order, p.batch, p.hidden, stream);
  }

  // After the recurrent GEMM: the cell update, then with a projection h = clip(W_hr m)
  // (zoned in the epilogue with zoneout_h).
  template <typename T>
  static void forward_step(const LstmForwardArgs<T>& s, const LstmForwardParams& p, const LstmForwardWorkspace<T>& w,
                           const Gemm& gemm, void* stream) {
    const int64_t B = p.batch, H = p.hidden, P = p.out_size, n = s.running;
    const int64_t width = H > P ? H : P;
    launch_kernel(pointwise_grid(B * width), dim3(kPointwiseThreads), 0, stream, lstm_forward_step_kernel<T>, s);
    if (s.project && n > 0) {
      gemm(n, P, H, w.hidden_unprojected, H, false, p.weight_hr, H, true, w.projected, P, false);
      launch_kernel(pointwise_grid(n * P), dim3(kPointwiseThreads), 0, stream, lstm_projection_epilogue_kernel<T>, s,
                    static_cast<const T*>(w.projected));
    }
  }

  template <typename T>
  static void forward_end(const LstmForwardArgs<T>& s, const LstmForwardParams& p, const LstmForwardWorkspace<T>&,
                          const Gemm&, void* stream) {
    scatter_rows(static_cast<const acc_t<T>*>(s.cell_state), s.c_n, p.order.order, p.batch, p.hidden, stream);
  }

  template <typename T>
  static LstmBackwardArgs<T> backward_args(const LstmBackwardParams& p, const LstmBackwardWorkspace<T>& w,
                                           const PersistentPlan& plan) {
    LstmBackwardArgs<T> s;
    fill_backward_args(s, p, w, plan);
    s.grad_c_n = typed<T>(p.grad_c_n);
    s.c0 = typed<T>(p.c0);
    s.cells = typed<T>(p.cells);
    s.hidden_pre_clip = p.proj_clip > 0 ? typed<T>(p.hidden_pre_clip) : nullptr;
    s.zoneout_h = typed<T>(p.zoneout_h);
    s.zoneout_c = typed<T>(p.zoneout_c);
    s.carried_cells = p.zoneout_c ? typed<T>(p.carried_cells) : nullptr;
    s.grad_c0 = typed<T>(p.grad_c0);
    s.grad_gates_all = w.grad_gates_all;
    s.grad_pre_clip = w.grad_pre_clip;
    s.grad_pre_clip_all = w.grad_pre_clip_all;
    s.grad_hidden_unprojected = p.weight_hr != nullptr ? w.grad_hidden_unprojected : w.grad_pre_clip;
    s.grad_cell_carry = w.grad_cell_carry;
    s.grad_gates = w.grad_gates;
    s.hidden_unprojected_all = w.hidden_unprojected_all;
    s.cell_clip = acc_t<T>(p.cell_clip);
    s.proj_clip = acc_t<T>(p.proj_clip);
    return s;
  }

  template <typename T>
  static void backward_begin(const LstmBackwardArgs<T>& s, const LstmBackwardParams& p,
                             const LstmBackwardWorkspace<T>&, const Gemm&, void* stream) {
    gather_rows(s.grad_c_n, s.grad_cell_carry, p.order.order, p.batch, p.hidden, stream);
  }

  template <typename T>
  static void backward_step(const LstmBackwardArgs<T>& s, const LstmBackwardParams& p,
                            const LstmBackwardWorkspace<T>& w, const Gemm& gemm, void* stream) {
    const int64_t B = p.batch, H = p.hidden, P = p.out_size, G = 4 * H, n = s.running;
    const int64_t width = H > P ? H : P;
    launch_kernel(pointwise_grid(B * P), dim3(kPointwiseThreads), 0, stream, lstm_hidden_gradient_kernel<T>, s);
    // Through the projection: dL/dm = dL/dh W_hr, [n, P] @ [P, H].
    if (p.weight_hr) gemm(n, H, P, w.grad_pre_clip, P, false, p.weight_hr, H, false, w.grad_hidden_unprojected, H, false);
    launch_kernel(pointwise_grid(B * width), dim3(kPointwiseThreads), 0, stream, lstm_backward_step_kernel<T>, s);
    // dL/dh_{t-1} of the running slots: [n, 4H] @ W_hh [4H, P] (times the mask), added to
    // d * dL/dh_t (in the carry) with zoneout_h.
    recurrent_hidden_gradient(p, w, gemm, n, G, static_cast<const T*>(w.grad_gates), p.zoneout_h != nullptr,
                              stream);
  }

  template <typename T>
  static void backward_end(const LstmBackwardArgs<T>& s, const LstmBackwardParams& p,
                           const LstmBackwardWorkspace<T>&, const Gemm&, void* stream) {
    if (p.grad_c0)
      scatter_rows(static_cast<const acc_t<T>*>(s.grad_cell_carry), s.grad_c0, p.order.order, p.batch, p.hidden,
                   stream);
  }

  // dL/da of every row drives both sides: W_ih x and W_hh h enter the same pre-activation.
  template <typename T>
  static const T* input_gate_grads(const LstmBackwardWorkspace<T>& w) {
    return w.grad_gates_all;
  }
  template <typename T>
  static const T* hidden_gate_grads(const LstmBackwardWorkspace<T>& w) {
    return w.grad_gates_all;
  }

  template <typename T>
  static void cell_gradients(const LstmBackwardParams& p, const LstmBackwardWorkspace<T>& w, const Gemm& gemm,
                             void* stream) {
    const int64_t rows = p.order.valid_rows, H = p.hidden, P = p.out_size;
    if (p.grad_bias)
      column_sum(static_cast<const T*>(w.grad_gates_all), typed<T>(p.grad_bias), rows, 4 * H, stream);
    if (p.weight_hr && p.grad_weight_hr)
      gemm(P, H, rows, w.grad_pre_clip_all, P, true, w.hidden_unprojected_all, H, false, p.grad_weight_hr, H, false);
  }
};

}  // namespace cuda
}  // namespace rnntl
