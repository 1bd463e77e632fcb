// GRU ("reset after") kernels, one layer and one direction: the stepwise strategy's
// kernels and the cell policy of the persistent skeleton (persistent_kernels.cuh); same
// structure as lstm_kernels.cuh. Launches and workspaces: gru_launch.cuh.
// Shapes: T steps, B batch, I input, H hidden (P = H), G = 3H (gates r, z, n), N valid rows;
// `row` indexes the [T, B, *] tensors, `compact` the [N, *] work buffers (as lstm_kernels.cuh).
// Zoneout (docs/semantics.md section 10): with keep weights d the carried
// h_t = d * h_{t-1} + (1 - d) * h~_t, h~_t the cell's new state; nothing more is saved
// (the backward needs only r, z, n and h_{t-1}).
#pragma once

#include "persistent_kernels.cuh"

namespace rnntl {
namespace cuda {

// The GRU's forward kernel arguments beyond ForwardArgs (filled by gru_forward_args).
template <typename T>
struct GruForwardArgs : ForwardArgs<T> {
  T* hidden_n;                  // [T, B, H] W_hn h_{t-1} + b_hn, or null (not saving)
  const T* zoneout;             // [T, B, H] keep weights d, or null
};

// The GRU's backward kernel arguments beyond BackwardArgs (filled by gru_backward_args).
template <typename T>
struct GruBackwardArgs : BackwardArgs<T> {
  const T* hidden_n;            // [T, B, H]
  const T* zoneout;             // [T, B, H] keep weights d, or null
  T* grad_input_gates_all;      // [N, 3H] dL/d(W_ih x + b_ih)
  T* grad_hidden_gates_all;     // [N, 3H] dL/d(W_hh h + b_hh), or null (no dW_hh, db_hh)
  T* grad_hidden_gates;         // [B, 3H] slot-major dL/d(W_hh h + b_hh) (stepwise)
};

// ---------------------------------------------------------------------------------------
// The element math both strategies share
// ---------------------------------------------------------------------------------------
// h_t of a running item (unit u of [T, B, *] row `row`) from its input-side x[3] and
// hidden-side hg[3] pre-activations (biases included) and the unmasked h_{t-1}: writes the
// reserve, and with zoneout blends h~_t with h_{t-1}.
template <typename T>
RNNTL_DEVICE T gru_forward_item(const GruForwardArgs<T>& s, int64_t row, int64_t u, const acc_t<T>* x,
                                const acc_t<T>* hg, acc_t<T> hidden_prev) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 3 * H;
  const GruForwardElement<A> e = gru_element_forward<A>(x[0], x[1], x[2], hg[0], hg[1], hg[2], hidden_prev);
  if (s.gates) {
    s.gates[row * G + u] = from_acc<T>(e.r);
    s.gates[row * G + H + u] = from_acc<T>(e.z);
    s.gates[row * G + 2 * H + u] = from_acc<T>(e.n);
    s.hidden_n[row * H + u] = from_acc<T>(hg[2]);
  }
  return from_acc<T>(s.zoneout ? zoneout_blend(to_acc(s.zoneout[row * H + u]), hidden_prev, e.hidden) : e.hidden);
}

// A padded item's zeros in the reserve.
template <typename T>
RNNTL_DEVICE void gru_forward_padding(const GruForwardArgs<T>& s, int64_t row, int64_t u) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 3 * H;
  if (s.gates) {
    for (int g = 0; g < 3; ++g) s.gates[row * G + g * H + u] = from_acc<T>(A(0));
    s.hidden_n[row * H + u] = from_acc<T>(A(0));
  }
}

// Gate gradients of a running item from its clamped dL/dh_t; grad_hidden_prev is the part
// of dL/dh_{t-1} that bypasses W_hh: z * dL/dh~_t, plus d * dL/dh_t with zoneout (where
// only (1 - d) * dL/dh_t reaches h~_t).
template <typename T>
RNNTL_DEVICE GruBackwardElement<acc_t<T>> gru_backward_item(const GruBackwardArgs<T>& s, int64_t row, int64_t u,
                                                             acc_t<T> dh, acc_t<T> hidden_prev) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 3 * H;
  const A keep = s.zoneout ? to_acc(s.zoneout[row * H + u]) : A(0);
  const A grad_fresh = s.zoneout ? (A(1) - keep) * dh : dh;
  const T* act = s.gates + row * G;
  GruBackwardElement<A> e = gru_element_backward<A>(to_acc(act[u]), to_acc(act[H + u]), to_acc(act[2 * H + u]),
                                                    to_acc(s.hidden_n[row * H + u]), hidden_prev, grad_fresh,
                                                    s.gate_clip);
  if (s.zoneout) e.grad_hidden_prev += keep * dh;
  return e;
}

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
      const T out = gru_forward_item(s, row, k, x, h, to_acc(s.hidden_state[index]));
      s.hidden_state[index] = out;
      s.output[row * H + k] = out;
    } else {
      s.output[row * H + k] = from_acc<T>(A(0));
      gru_forward_padding(s, row, k);
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
      const GruBackwardElement<A> e = gru_backward_item(s, row, k, dh, to_acc(h_prev));
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
    return gru_forward_item(s, row, u, x, hg, hidden_prev);
  }

  template <typename T>
  RNNTL_DEVICE static void forward_finished(const GruForwardArgs<T>& s, int64_t row, int64_t u) {
    gru_forward_padding(s, row, u);
  }

  // Backward: no cell carry; the direct part of dL/dh_{t-1} is z * dL/dh~_t (+ d * dL/dh_t).
  static constexpr bool kCellCarry = false;
  static constexpr bool kReadsPreviousHidden = true;

  template <typename T>
  RNNTL_DEVICE static void backward_unit(const GruBackwardArgs<T>& s, int64_t row, int64_t compact,
                                         int64_t /*prev_row*/, bool /*first*/, int64_t /*b*/, int64_t u,
                                         acc_t<T> dh, T hidden_prev, acc_t<T>& /*cell_carry*/, acc_t<T>& direct,
                                         acc_t<T>* exchange) {
    using A = acc_t<T>;
    const int64_t H = s.hidden, G = 3 * H;
    const GruBackwardElement<A> e = gru_backward_item(s, row, u, dh, to_acc(hidden_prev));
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
};

}  // namespace cuda
}  // namespace rnntl
