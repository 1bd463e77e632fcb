// GRU ("reset after") kernels, one layer and one direction: the stepwise strategy's
// kernels and the cell policy of the persistent skeleton (persistent_kernels.cuh); same
// structure as lstm_kernels.cuh. Launches and workspaces: gru_launch.cuh.
// Shapes: T steps, B batch, I input, H hidden (P = H), G = 3H (gates r, z, n), N valid rows;
// `row` indexes the [T, B, *] tensors, `compact` the [N, *] work buffers (as lstm_kernels.cuh).
#pragma once

#include "persistent_kernels.cuh"

namespace rnntl {
namespace cuda {

// The GRU's forward kernel arguments beyond ForwardArgs (filled by gru_forward_args).
template <typename T>
struct GruForwardArgs : ForwardArgs<T> {
  T* hidden_n;                  // [T, B, H] W_hn h_{t-1} + b_hn, or null (not saving)
};

// The GRU's backward kernel arguments beyond BackwardArgs (filled by gru_backward_args).
template <typename T>
struct GruBackwardArgs : BackwardArgs<T> {
  const T* hidden_n;            // [T, B, H]
  T* grad_input_gates_all;      // [N, 3H] dL/d(W_ih x + b_ih)
  T* grad_hidden_gates_all;     // [N, 3H] dL/d(W_hh h + b_hh), or null (no dW_hh, db_hh)
  T* grad_hidden_gates;         // [B, 3H] slot-major dL/d(W_hh h + b_hh) (stepwise)
};

// ---------------------------------------------------------------------------------------
// Stepwise
// ---------------------------------------------------------------------------------------
template <typename T>
__global__ void gru_forward_step_kernel(GruForwardArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 3 * H;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * H) {
    const int64_t j = index / H, k = index % H;
    const int64_t row = s.t * s.batch + s.order[j];
    if (j < s.running) {
      const int64_t compact = s.first_row[s.t] + j;
      A x[3], h[3];
      for (int g = 0; g < 3; ++g) {
        const int64_t col = g * H + k;
        x[g] = to_acc(s.input_gates[compact * G + col]) + (s.bias_ih ? to_acc(s.bias_ih[col]) : A(0));
        h[g] = to_acc(s.recurrent_gates[j * G + col]) + (s.bias_hh ? to_acc(s.bias_hh[col]) : A(0));
      }
      const GruForwardElement<A> e =
          gru_element_forward<A>(x[0], x[1], x[2], h[0], h[1], h[2], to_acc(s.hidden_state[index]));
      const T out = from_acc<T>(e.hidden);
      s.hidden_state[index] = out;
      s.output[row * H + k] = out;
      if (s.gates) {
        s.gates[row * G + k] = from_acc<T>(e.r);
        s.gates[row * G + H + k] = from_acc<T>(e.z);
        s.gates[row * G + 2 * H + k] = from_acc<T>(e.n);
        s.hidden_n[row * H + k] = from_acc<T>(h[2]);
      }
    } else {
      s.output[row * H + k] = from_acc<T>(A(0));
      if (s.gates) {
        for (int g = 0; g < 3; ++g) s.gates[row * G + g * H + k] = from_acc<T>(A(0));
        s.hidden_n[row * H + k] = from_acc<T>(A(0));
      }
    }
  }
}

template <typename T>
__global__ void gru_backward_step_kernel(GruBackwardArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 3 * H;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * H) {
    const int64_t j = index / H, k = index % H;
    const int64_t b = s.order[j];
    const int64_t row = s.t * s.batch + b;
    if (j < s.running) {
      const bool first = s.reverse ? s.t == s.length[b] - 1 : s.t == 0;
      const int64_t prev_row = (s.reverse ? s.t + 1 : s.t - 1) * s.batch + b;
      const int64_t compact = s.first_row[s.t] + j;
      const T h_prev = first ? (s.h0 ? s.h0[b * H + k] : from_acc<T>(A(0))) : s.output[prev_row * H + k];
      A dh = to_acc(s.grad_hidden_carry[index]);
      if (s.grad_output) dh += to_acc(s.grad_output[row * H + k]);
      dh = clip_value(dh, s.state_clip);
      const T* act = s.gates + row * G;
      const GruBackwardElement<A> e =
          gru_element_backward<A>(to_acc(act[k]), to_acc(act[H + k]), to_acc(act[2 * H + k]),
                                  to_acc(s.hidden_n[row * H + k]), to_acc(h_prev), dh, s.gate_clip);
      const A di[3] = {e.d_r, e.d_z, e.d_n};
      const A dg[3] = {e.d_r, e.d_z, e.d_hidden_n};
      for (int g = 0; g < 3; ++g) {
        s.grad_input_gates_all[compact * G + g * H + k] = from_acc<T>(di[g]);
        s.grad_hidden_gates[j * G + g * H + k] = from_acc<T>(dg[g]);
        if (s.grad_hidden_gates_all) s.grad_hidden_gates_all[compact * G + g * H + k] = from_acc<T>(dg[g]);
      }
      s.grad_hidden_carry[index] = from_acc<T>(e.grad_hidden_prev);
      if (s.hidden_prev_all) s.hidden_prev_all[compact * H + k] = masked_value(s.recurrent_mask, b, H, k, h_prev);
    } else {
      s.grad_hidden_carry[index] = from_acc<T>(clip_value(to_acc(s.grad_hidden_carry[index]), s.state_clip));
    }
  }
}

// ---------------------------------------------------------------------------------------
// The GRU item of the persistent skeleton
// ---------------------------------------------------------------------------------------
struct GruCell {
  static constexpr int kGates = 3;
  template <typename T>
  using ForwardArgs = GruForwardArgs<T>;
  template <typename T>
  using BackwardArgs = GruBackwardArgs<T>;

  // Forward: no state besides h.
  static constexpr int kForwardUnitState = 0;

  template <typename T>
  RNNTL_DEVICE static T forward_unit(const GruForwardArgs<T>& s, int64_t row, int64_t compact, int64_t u,
                                     acc_t<T>* hg, acc_t<T> hidden_prev, acc_t<T>* /*state*/) {
    using A = acc_t<T>;
    const int64_t H = s.hidden, G = 3 * H;
    A x[3];
    for (int g = 0; g < 3; ++g) {
      const int64_t col = g * H + u;
      x[g] = to_acc(s.input_gates[compact * G + col]) + (s.bias_ih ? to_acc(s.bias_ih[col]) : A(0));
      if (s.bias_hh) hg[g] += to_acc(s.bias_hh[col]);
    }
    const GruForwardElement<A> e = gru_element_forward<A>(x[0], x[1], x[2], hg[0], hg[1], hg[2], hidden_prev);
    if (s.gates) {
      s.gates[row * G + u] = from_acc<T>(e.r);
      s.gates[row * G + H + u] = from_acc<T>(e.z);
      s.gates[row * G + 2 * H + u] = from_acc<T>(e.n);
      s.hidden_n[row * H + u] = from_acc<T>(hg[2]);
    }
    return from_acc<T>(e.hidden);
  }

  template <typename T>
  RNNTL_DEVICE static void forward_finished(const GruForwardArgs<T>& s, int64_t row, int64_t u) {
    using A = acc_t<T>;
    const int64_t H = s.hidden, G = 3 * H;
    if (s.gates) {
      for (int g = 0; g < 3; ++g) s.gates[row * G + g * H + u] = from_acc<T>(A(0));
      s.hidden_n[row * H + u] = from_acc<T>(A(0));
    }
  }

  // Backward: the per-unit value is the direct part z * dL/dh_t of dL/dh_{t-1}.
  static constexpr bool kCellCarry = false;
  static constexpr bool kDirectHiddenPath = true;
  static constexpr bool kReadsPreviousHidden = true;

  template <typename T>
  RNNTL_DEVICE static void backward_unit(const GruBackwardArgs<T>& s, int64_t row, int64_t compact,
                                         int64_t /*prev_row*/, bool /*first*/, int64_t /*b*/, int64_t u,
                                         acc_t<T> dh, T hidden_prev, acc_t<T>& direct, acc_t<T>* exchange) {
    using A = acc_t<T>;
    const int64_t H = s.hidden, G = 3 * H;
    const T* act = s.gates + row * G;
    const GruBackwardElement<A> e =
        gru_element_backward<A>(to_acc(act[u]), to_acc(act[H + u]), to_acc(act[2 * H + u]),
                                to_acc(s.hidden_n[row * H + u]), to_acc(hidden_prev), dh, s.gate_clip);
    const A di[3] = {e.d_r, e.d_z, e.d_n};
    const A dg[3] = {e.d_r, e.d_z, e.d_hidden_n};
    for (int g = 0; g < 3; ++g) {
      s.grad_input_gates_all[compact * G + g * H + u] = from_acc<T>(di[g]);
      const T rounded = from_acc<T>(dg[g]);
      if (s.grad_hidden_gates_all) s.grad_hidden_gates_all[compact * G + g * H + u] = rounded;
      exchange[g * H + u] = to_acc(rounded);
    }
    direct = e.grad_hidden_prev;
  }

  // A finished row: nothing besides the skeleton's clamp of its dL/dh carry.
  template <typename T>
  RNNTL_DEVICE static void backward_finished(const GruBackwardArgs<T>&, acc_t<T>& /*direct*/) {}
};

}  // namespace cuda
}  // namespace rnntl
