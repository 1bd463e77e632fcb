// Elman RNN kernels (torch.nn.RNN's cell, docs/semantics.md section 10), one layer and one
// direction: the stepwise strategy's kernels and the cell policy of the persistent skeleton
// (persistent_kernels.cuh); same structure as gru_kernels.cuh. Launches and workspaces:
// rnn_launch.cuh.
//   a_t = W_ih x_t + b_ih + W_hh (m * h_{t-1}) + b_hh,  h~_t = f(a_t)  (f = tanh or relu),
//   h_t = d_t * h_{t-1} + (1 - d_t) * h~_t  with zoneout keep weights d, else h_t = h~_t.
// The element math is rnntl/cell_math.h's (rnn_activation, zoneout_blend,
// rnn_preactivation_gradient), shared with csrc/cpu/rnn_cpu.cpp.
// The saved reserve (ForwardArgs::gates / BackwardArgs::gates) is the CPU op's
// `activations`: h~_t [T, B, H] as T*B rows of H, the N compact rows first, then zeros
// (one row per padded (step, slot)); only with zoneout, since without it h~_t is the output.
// Shapes: T steps, B batch, I input, H hidden (P = H, G = H), N valid rows; `row` indexes
// the [T, B, *] tensors, `compact` the [N, *] work buffers (as gru_kernels.cuh).
#pragma once

#include "persistent_kernels.cuh"

namespace rnntl {
namespace cuda {

// The RNN's forward kernel arguments beyond ForwardArgs (filled by RnnLaunch::forward_args).
// ForwardArgs::gates is the activations reserve, or null (not saving, or no zoneout).
template <typename T>
struct RnnForwardArgs : ForwardArgs<T> {
  bool relu;                    // f = relu, else tanh
  const T* zoneout;             // [T, B, H] keep weights d, or null
  const int64_t* slot;          // [B] slot of batch row b (the reserve's padding rows)
  int64_t valid_rows;           // N
};

// The RNN's backward kernel arguments beyond BackwardArgs (filled by RnnLaunch::backward_args).
// BackwardArgs::gates is the activations reserve, read only with zoneout.
template <typename T>
struct RnnBackwardArgs : BackwardArgs<T> {
  bool relu;
  const T* zoneout;             // [T, B, H] keep weights d, or null
  T* grad_preactivation_all;    // [N, H] dL/da per compact row
  T* grad_preactivation;        // [B, H] slot-major dL/da of this step (stepwise)
};

// h_t of a running item from its pre-activation a and its unmasked h_{t-1}; saves h~_t
// with zoneout.
template <typename T>
RNNTL_DEVICE T rnn_forward_item(const RnnForwardArgs<T>& s, int64_t row, int64_t compact, int64_t u, acc_t<T> a,
                                acc_t<T> hidden_prev) {
  using A = acc_t<T>;
  const int64_t H = s.hidden;
  const A fresh = s.relu ? rnn_activation<true>(a) : rnn_activation<false>(a);
  if (!s.zoneout) return from_acc<T>(fresh);
  if (s.gates) s.gates[compact * H + u] = from_acc<T>(fresh);
  return from_acc<T>(zoneout_blend(to_acc(s.zoneout[row * H + u]), hidden_prev, fresh));
}

// A padded (step t, batch row b) item: zero in the reserve row that the CPU op's layout
// gives it. The padded (step, slot) pairs follow the N compact rows in the same order
// (time, then slot): before step t come t*B - first_row[t] of them.
template <typename T>
RNNTL_DEVICE void rnn_forward_padding(const RnnForwardArgs<T>& s, int64_t t, int64_t b, int64_t u) {
  if (!s.gates) return;
  const int64_t padding_row = s.valid_rows + t * s.batch - s.first_row[t] + (s.slot[b] - s.active[t]);
  s.gates[padding_row * s.hidden + u] = from_acc<T>(acc_t<T>(0));
}

// dL/da of a running item from its clamped dL/dh_t; `direct` gets the part of dL/dh_{t-1}
// that bypasses W_hh (d * dL/dh_t with zoneout, else 0).
template <typename T>
RNNTL_DEVICE acc_t<T> rnn_backward_item(const RnnBackwardArgs<T>& s, int64_t row, int64_t compact, int64_t u,
                                        acc_t<T> dh, acc_t<T>& direct) {
  using A = acc_t<T>;
  const int64_t H = s.hidden;
  A grad_fresh = dh, fresh;
  if (s.zoneout) {
    const A keep = to_acc(s.zoneout[row * H + u]);
    grad_fresh = dh * (A(1) - keep);
    direct = dh * keep;
    fresh = to_acc(s.gates[compact * H + u]);
  } else {
    direct = A(0);
    fresh = to_acc(s.output[row * H + u]);
  }
  return s.relu ? rnn_preactivation_gradient<true>(fresh, grad_fresh, s.gate_clip)
                : rnn_preactivation_gradient<false>(fresh, grad_fresh, s.gate_clip);
}

// ---------------------------------------------------------------------------------------
// Stepwise
// ---------------------------------------------------------------------------------------
template <typename T>
__global__ void rnn_forward_step_kernel(RnnForwardArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * H) {
    const int64_t j = index / H, k = index % H;
    const int64_t b = s.order[j];
    const int64_t row = s.t * s.batch + b;
    if (j < s.running) {
      const int64_t compact = s.first_row[s.t] + j;
      const A a = (to_acc(s.input_gates[compact * H + k]) + (s.bias_ih ? to_acc(s.bias_ih[k]) : A(0))) +
                  (to_acc(s.recurrent_gates[j * H + k]) + (s.bias_hh ? to_acc(s.bias_hh[k]) : A(0)));
      const T out = rnn_forward_item(s, row, compact, k, a, to_acc(s.hidden_state[index]));
      s.hidden_state[index] = out;
      s.output[row * H + k] = out;
    } else {
      s.output[row * H + k] = from_acc<T>(A(0));
      rnn_forward_padding(s, s.t, b, k);
    }
  }
}

// dL/da of the running slots into grad_preactivation (the recurrent GEMM's input) and
// its compact rows; the carry keeps the direct part d * dL/dh_t (the launch then adds
// m * (dL/da @ W_hh) with zoneout, or writes it without); finished slots clamp their carry.
template <typename T>
__global__ void rnn_backward_step_kernel(RnnBackwardArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * H) {
    const int64_t j = index / H, k = index % H;
    const int64_t b = s.order[j];
    const int64_t row = s.t * s.batch + b;
    if (j < s.running) {
      const int64_t compact = s.first_row[s.t] + j;
      A dh = to_acc(s.grad_hidden_carry[index]);
      if (s.grad_output) dh += to_acc(s.grad_output[row * H + k]);
      dh = clip_value(dh, s.state_clip);
      A direct;
      const T da = from_acc<T>(rnn_backward_item(s, row, compact, k, dh, direct));
      s.grad_preactivation[index] = da;
      s.grad_preactivation_all[compact * H + k] = da;
      s.grad_hidden_carry[index] = from_acc<T>(direct);
      if (s.hidden_prev_all) {
        const bool first = s.reverse ? s.t == s.length[b] - 1 : s.t == 0;
        const int64_t prev_row = (s.reverse ? s.t + 1 : s.t - 1) * s.batch + b;
        const T h_prev = first ? (s.h0 ? s.h0[b * H + k] : from_acc<T>(A(0))) : s.output[prev_row * H + k];
        s.hidden_prev_all[compact * H + k] = masked_value(s.recurrent_mask, b, H, k, h_prev);
      }
    } else {
      s.grad_hidden_carry[index] = from_acc<T>(clip_value(to_acc(s.grad_hidden_carry[index]), s.state_clip));
    }
  }
}

// ---------------------------------------------------------------------------------------
// The RNN item of the persistent skeleton
// ---------------------------------------------------------------------------------------
struct RnnCell {
  static constexpr int kGates = 1;
  template <typename T>
  using ForwardArgs = RnnForwardArgs<T>;
  template <typename T>
  using BackwardArgs = RnnBackwardArgs<T>;

  // Forward: no state besides h.
  static constexpr int kForwardUnitState = 0;

  template <typename T>
  RNNTL_DEVICE static T forward_unit(const RnnForwardArgs<T>& s, int64_t row, int64_t compact, int64_t u,
                                     acc_t<T>* recurrent, acc_t<T> hidden_prev, acc_t<T>* /*state*/) {
    using A = acc_t<T>;
    const A a = (to_acc(s.input_gates[compact * s.hidden + u]) + (s.bias_ih ? to_acc(s.bias_ih[u]) : A(0))) +
                (recurrent[0] + (s.bias_hh ? to_acc(s.bias_hh[u]) : A(0)));
    return rnn_forward_item(s, row, compact, u, a, hidden_prev);
  }

  template <typename T>
  RNNTL_DEVICE static void forward_finished(const RnnForwardArgs<T>& s, int64_t row, int64_t u) {
    rnn_forward_padding(s, row / s.batch, row % s.batch, u);
  }

  // Backward: no cell carry; the direct part of dL/dh_{t-1} is d * dL/dh_t (0 without zoneout).
  static constexpr bool kCellCarry = false;
  static constexpr bool kReadsPreviousHidden = false;

  template <typename T>
  RNNTL_DEVICE static void backward_unit(const RnnBackwardArgs<T>& s, int64_t row, int64_t compact,
                                         int64_t /*prev_row*/, bool /*first*/, int64_t /*b*/, int64_t u,
                                         acc_t<T> dh, T /*hidden_prev*/, acc_t<T>& /*cell_carry*/, acc_t<T>& direct,
                                         acc_t<T>* exchange) {
    const T da = from_acc<T>(rnn_backward_item(s, row, compact, u, dh, direct));
    s.grad_preactivation_all[compact * s.hidden + u] = da;
    exchange[u] = to_acc(da);
  }
};

}  // namespace cuda
}  // namespace rnntl
