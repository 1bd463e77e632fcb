// LSTM kernels, one layer and one direction: the stepwise strategy's kernels and the
// cell policy of the persistent skeleton (persistent_kernels.cuh). Their launches and
// workspaces are in lstm_launch.cuh. Compiled by nvcc from csrc/cuda/lstm_kernels.cu and
// by g++ against the CPU emulation of tests/cuda_emulation/.
//
// Stepwise (see rnntl/params.h, docs/cuda.md): per step a recurrent GEMM through the
// GemmHook (cuBLAS) over the running rows, then one fused pointwise kernel; with
// proj_size a second GEMM and an epilogue kernel. The persistent strategy has no
// projection (P == H).
// Gate math comes from rnntl/cell_math.h, in acc_t<T> (float for half/bfloat16).
// Zoneout (docs/semantics.md section 10): with keep weights d (zoneout_h) and e (zoneout_c)
// the carried h_t = d * h_{t-1} + (1 - d) * h~_t (h~_t after W_hr and proj_clip) and
// c_t = e * c_{t-1} + (1 - e) * c~_t (c~_t after cell_clip), while h~_t reads c~_t; the
// forward saves the carried c_t (carried_cells), which the backward's dL/df needs.
// Shapes: T steps, B batch, I input, H hidden, P = proj_size or H, G = 4H (gates i,f,g,o),
// N valid rows. `row` = t * B + b indexes the [T, B, *] tensors, `compact` = first_row[t] + j
// the [N, *] work buffers (device_common.cuh).
#pragma once

#include "persistent_kernels.cuh"

namespace rnntl {
namespace cuda {

// The LSTM's forward kernel arguments beyond ForwardArgs (filled by lstm_forward_args).
template <typename T>
struct LstmForwardArgs : ForwardArgs<T> {
  bool project;                 // weight_hr given
  const T* c0;                  // [B, H] batch order, or null (persistent)
  T* c_n;                       // [B, H] (persistent)
  T* cells;                     // [T, B, H] cell before clip, or null (not saving)
  T* hidden_pre_clip;           // [T, B, P] hidden before proj_clip, or null
  const T* zoneout_h;           // [T, B, P] keep weights d of h, or null
  const T* zoneout_c;           // [T, B, H] keep weights e of c, or null
  T* carried_cells;             // [T, B, H] the zoned c_t, or null (not saving, or no zoneout_c)
  acc_t<T>* cell_state;         // [B, H] slot-major carried c (stepwise)
  T* hidden_unprojected;        // [B, H] slot-major o*tanh(c) (stepwise with projection)
  acc_t<T> cell_clip, proj_clip;
};

// The LSTM's backward kernel arguments beyond BackwardArgs (filled by lstm_backward_args).
template <typename T>
struct LstmBackwardArgs : BackwardArgs<T> {
  const T* grad_c_n;                // [B, H] or null
  const T* c0;                      // [B, H] or null
  const T* cells;                   // [T, B, H] before clip
  const T* hidden_pre_clip;         // [T, B, P] or null (no proj_clip)
  const T* zoneout_h;               // [T, B, P] keep weights d of h, or null
  const T* zoneout_c;               // [T, B, H] keep weights e of c, or null
  const T* carried_cells;           // [T, B, H] the forward's zoned c_t (with zoneout_c)
  T* grad_c0;                       // [B, H] or null
  T* grad_gates_all;                // [N, 4H] dL/da per compact row
  // Stepwise only:
  T* grad_pre_clip;                 // [B, P] slot-major dL/d(hidden before proj_clip)
  T* grad_pre_clip_all;             // [N, P] or null (only for dW_hr)
  const T* grad_hidden_unprojected; // [B, H] slot-major dL/dm (grad_pre_clip without projection)
  acc_t<T>* grad_cell_carry;        // [B, H] slot-major dL/dc_t in, dL/dc_{t-1} out
  T* grad_gates;                    // [B, 4H] slot-major dL/da (input of the recurrent GEMM)
  T* hidden_unprojected_all;        // [N, H] m per compact row, or null (no dW_hr)
  acc_t<T> cell_clip, proj_clip;
};

// ---------------------------------------------------------------------------------------
// The element math both strategies share
// ---------------------------------------------------------------------------------------
// The cell update of a running item (unit u of [T, B, *] row `row`) from its full
// pre-activations a[4]: writes the reserve (gates, the cell before clip, the carried cell),
// replaces `cell` (the carried c_{t-1} in, the carried c_t out) and returns
// m = o * tanh(c~_t), which reads the fresh cell.
template <typename T>
RNNTL_DEVICE acc_t<T> lstm_cell_item(const LstmForwardArgs<T>& s, int64_t row, int64_t u, const acc_t<T>* a,
                                     acc_t<T>& cell) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 4 * H;
  const LstmForwardElement<A> e = lstm_element_forward<A>(a[0], a[1], a[2], a[3], cell, s.cell_clip);
  cell = s.zoneout_c ? zoneout_blend(to_acc(s.zoneout_c[row * H + u]), cell, e.cell) : e.cell;
  if (s.gates) {
    s.gates[row * G + u] = from_acc<T>(e.i);
    s.gates[row * G + H + u] = from_acc<T>(e.f);
    s.gates[row * G + 2 * H + u] = from_acc<T>(e.g);
    s.gates[row * G + 3 * H + u] = from_acc<T>(e.o);
    s.cells[row * H + u] = from_acc<T>(e.cell_before_clip);
  }
  if (s.carried_cells) s.carried_cells[row * H + u] = from_acc<T>(cell);
  return e.hidden;
}

// h_t (column k of P) of a running item from h~ before proj_clip (m, or W_hr m with a
// projection) and the unmasked h_{t-1}: the clip, then with zoneout_h the blend.
template <typename T>
RNNTL_DEVICE T lstm_hidden_item(const LstmForwardArgs<T>& s, int64_t row, int64_t k, acc_t<T> hidden,
                                acc_t<T> hidden_prev) {
  const int64_t P = s.out_size;
  if (s.hidden_pre_clip) s.hidden_pre_clip[row * P + k] = from_acc<T>(hidden);
  const acc_t<T> fresh = clip_value(hidden, s.proj_clip);
  return from_acc<T>(s.zoneout_h ? zoneout_blend(to_acc(s.zoneout_h[row * P + k]), hidden_prev, fresh) : fresh);
}

// A padded item's zeros in the [T, B, H] reserve (unit u).
template <typename T>
RNNTL_DEVICE void lstm_cell_padding(const LstmForwardArgs<T>& s, int64_t row, int64_t u) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 4 * H;
  if (s.gates) {
    for (int g = 0; g < 4; ++g) s.gates[row * G + g * H + u] = from_acc<T>(A(0));
    s.cells[row * H + u] = from_acc<T>(A(0));
  }
  if (s.carried_cells) s.carried_cells[row * H + u] = from_acc<T>(A(0));
}

// Gate gradients of a running item from dL/dm (`grad_hidden`: through the projection,
// proj_clip and zoneout_h's 1 - d) and `grad_cell` (dL/dc_t of the carried cell in, dL/dc_{t-1}
// out). c_{t-1} is c0 (not clipped) at the first step, else the saved carried cell with
// zoneout_c, else the clip of the saved cell before clip.
template <typename T>
RNNTL_DEVICE LstmBackwardElement<acc_t<T>> lstm_backward_item(const LstmBackwardArgs<T>& s, int64_t row,
                                                               int64_t prev_row, bool first, int64_t b, int64_t u,
                                                               acc_t<T> grad_hidden, acc_t<T>& grad_cell) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 4 * H;
  const T* act = s.gates + row * G;
  const A i = to_acc(act[u]), f = to_acc(act[H + u]), g = to_acc(act[2 * H + u]), o = to_acc(act[3 * H + u]);
  const A cell = to_acc(s.cells[row * H + u]);
  const A cell_prev = first         ? (s.c0 ? to_acc(s.c0[b * H + u]) : A(0))
                      : s.zoneout_c ? to_acc(s.carried_cells[prev_row * H + u])
                                    : clip_value(to_acc(s.cells[prev_row * H + u]), s.cell_clip);
  LstmBackwardElement<A> e;
  if (s.zoneout_c) {
    const A tanh_cell = tanh_activation(clip_value(cell, s.cell_clip));
    e = lstm_element_backward_zoneout<A>(i, f, g, o, cell, tanh_cell, cell_prev, grad_hidden, grad_cell,
                                         to_acc(s.zoneout_c[row * H + u]), s.cell_clip, s.state_clip, s.gate_clip);
  } else {
    e = lstm_element_backward<A>(i, f, g, o, cell, cell_prev, grad_hidden, grad_cell, s.cell_clip, s.state_clip,
                                 s.gate_clip);
  }
  grad_cell = e.grad_cell_prev;
  return e;
}

// ---------------------------------------------------------------------------------------
// Stepwise forward
// ---------------------------------------------------------------------------------------
// One step over all B slots x max(H, P) columns: running slots update their state, the
// others write zeros to this step's output and reserve rows and keep their state.
template <typename T>
__global__ void lstm_forward_step_kernel(LstmForwardArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, P = s.out_size, G = 4 * H, W = H > P ? H : P;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * W) {
    const int64_t j = index / W, k = index % W;
    const int64_t row = s.t * s.batch + s.order[j];
    if (j < s.running) {
      if (k >= H) continue;
      const int64_t compact = s.first_row[s.t] + j;
      A a[4];
      for (int g = 0; g < 4; ++g) {
        const int64_t col = g * H + k;
        a[g] = to_acc(s.input_gates[compact * G + col]) + to_acc(s.recurrent_gates[j * G + col]);
        if (s.bias_ih) a[g] += to_acc(s.bias_ih[col]);
        if (s.bias_hh) a[g] += to_acc(s.bias_hh[col]);
      }
      const A m = lstm_cell_item(s, row, k, a, s.cell_state[j * H + k]);
      if (s.project) {
        s.hidden_unprojected[j * H + k] = from_acc<T>(m);
      } else {
        const T h = lstm_hidden_item(s, row, k, m, to_acc(s.hidden_state[j * P + k]));
        s.hidden_state[j * P + k] = h;
        s.output[row * P + k] = h;
      }
    } else {
      if (k < P) {
        s.output[row * P + k] = from_acc<T>(A(0));
        if (s.hidden_pre_clip) s.hidden_pre_clip[row * P + k] = from_acc<T>(A(0));
      }
      if (k < H) lstm_cell_padding(s, row, k);
    }
  }
}

// After the projection GEMM: h = clip(W_hr m) (zoned with zoneout_h) for the running slots.
//   projected: [B, P] slot-major W_hr m; s.hidden_state [B, P] holds h_{t-1} in, h_t out.
template <typename T>
__global__ void lstm_projection_epilogue_kernel(LstmForwardArgs<T> s, const T* projected) {
  const int64_t P = s.out_size;
  RNNTL_GRID_STRIDE_LOOP(index, s.running * P) {
    const int64_t j = index / P, k = index % P;
    const int64_t row = s.t * s.batch + s.order[j];
    const T h = lstm_hidden_item(s, row, k, to_acc(projected[index]), to_acc(s.hidden_state[index]));
    s.hidden_state[index] = h;
    s.output[row * P + k] = h;
  }
}

// ---------------------------------------------------------------------------------------
// Stepwise backward
// ---------------------------------------------------------------------------------------
// dL/dh_t = clip(carry + grad_output) (state mode), then through proj_clip's mask; with
// zoneout_h (1 - d) of it reaches h~_t and the carry keeps d * dL/dh_t, to which the
// recurrent GEMM then adds.
template <typename T>
__global__ void lstm_hidden_gradient_kernel(LstmBackwardArgs<T> s) {
  using A = acc_t<T>;
  const int64_t P = s.out_size;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * P) {
    const int64_t j = index / P, k = index % P;
    const int64_t row = s.t * s.batch + s.order[j];
    if (j < s.running) {
      A g = to_acc(s.grad_hidden_carry[index]);
      if (s.grad_output) g += to_acc(s.grad_output[row * P + k]);
      g = clip_value(g, s.state_clip);
      if (s.zoneout_h) {
        const A keep = to_acc(s.zoneout_h[row * P + k]);
        s.grad_hidden_carry[index] = from_acc<T>(keep * g);
        g = (A(1) - keep) * g;
      }
      if (s.hidden_pre_clip) g = clip_gradient(g, to_acc(s.hidden_pre_clip[row * P + k]), s.proj_clip);
      s.grad_pre_clip[index] = from_acc<T>(g);
      if (s.grad_pre_clip_all) s.grad_pre_clip_all[(s.first_row[s.t] + j) * P + k] = from_acc<T>(g);
    } else {
      // A row past its length passes its state gradient on, clamped as the reference's hook does.
      s.grad_hidden_carry[index] = from_acc<T>(clip_value(to_acc(s.grad_hidden_carry[index]), s.state_clip));
    }
  }
}

template <typename T>
__global__ void lstm_backward_step_kernel(LstmBackwardArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, P = s.out_size, G = 4 * H, W = H > P ? H : P;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * W) {
    const int64_t j = index / W, k = index % W;
    const int64_t b = s.order[j];
    const int64_t row = s.t * s.batch + b;
    if (j < s.running) {
      const bool first = s.reverse ? s.t == s.length[b] - 1 : s.t == 0;
      const int64_t prev_row = (s.reverse ? s.t + 1 : s.t - 1) * s.batch + b;
      const int64_t compact = s.first_row[s.t] + j;
      if (k < H) {
        const LstmBackwardElement<A> e = lstm_backward_item(s, row, prev_row, first, b, k,
                                                            to_acc(s.grad_hidden_unprojected[j * H + k]),
                                                            s.grad_cell_carry[j * H + k]);
        const A d[4] = {e.d_i, e.d_f, e.d_g, e.d_o};
        for (int g = 0; g < 4; ++g) {
          s.grad_gates[j * G + g * H + k] = from_acc<T>(d[g]);
          s.grad_gates_all[compact * G + g * H + k] = from_acc<T>(d[g]);
        }
        if (s.hidden_unprojected_all) {  // m = o * tanh(c~_t) for dW_hr
          const A tanh_cell = tanh_activation(clip_value(to_acc(s.cells[row * H + k]), s.cell_clip));
          s.hidden_unprojected_all[compact * H + k] = from_acc<T>(to_acc(s.gates[row * G + 3 * H + k]) * tanh_cell);
        }
      }
      if (k < P && s.hidden_prev_all) {
        const T h_prev = first ? (s.h0 ? s.h0[b * P + k] : from_acc<T>(A(0))) : s.output[prev_row * P + k];
        s.hidden_prev_all[compact * P + k] = masked_value(s.recurrent_mask, b, P, k, h_prev);
      }
    } else if (k < H) {
      s.grad_cell_carry[j * H + k] = clip_value(s.grad_cell_carry[j * H + k], s.state_clip);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The LSTM item of the persistent skeleton (P == H)
// ---------------------------------------------------------------------------------------
struct LstmCell {
  static constexpr int kGates = 4;
  template <typename T>
  using ForwardArgs = LstmForwardArgs<T>;
  template <typename T>
  using BackwardArgs = LstmBackwardArgs<T>;

  // Forward: the block keeps each item's cell state in shared memory.
  static constexpr int kForwardUnitState = 1;

  template <typename T>
  RNNTL_DEVICE static acc_t<T> initial_unit_state(const LstmForwardArgs<T>& s, int64_t j, int64_t u, bool owned) {
    return (owned && s.c0) ? to_acc(s.c0[s.order[j] * s.hidden + u]) : acc_t<T>(0);
  }

  template <typename T>
  RNNTL_DEVICE static void final_unit_state(const LstmForwardArgs<T>& s, int64_t b, int64_t u, acc_t<T> cell) {
    s.c_n[b * s.hidden + u] = from_acc<T>(cell);
  }

  template <typename T>
  RNNTL_DEVICE static T forward_unit(const LstmForwardArgs<T>& s, int64_t row, int64_t compact, int64_t u,
                                     acc_t<T>* a, acc_t<T> hidden_prev, acc_t<T>* cell) {
    const int64_t H = s.hidden, G = 4 * H;
    for (int g = 0; g < 4; ++g) {
      const int64_t col = g * H + u;
      a[g] += to_acc(s.input_gates[compact * G + col]);
      if (s.bias_ih) a[g] += to_acc(s.bias_ih[col]);
      if (s.bias_hh) a[g] += to_acc(s.bias_hh[col]);
    }
    return lstm_hidden_item(s, row, u, lstm_cell_item(s, row, u, a, *cell), hidden_prev);
  }

  template <typename T>
  RNNTL_DEVICE static void forward_finished(const LstmForwardArgs<T>& s, int64_t row, int64_t u) {
    lstm_cell_padding(s, row, u);
    if (s.hidden_pre_clip) s.hidden_pre_clip[row * s.hidden + u] = from_acc<T>(acc_t<T>(0));
  }

  // Backward: the cell's carry is dL/dc_t; the direct part of dL/dh_{t-1} is d * dL/dh_t
  // with zoneout_h, else 0.
  static constexpr bool kCellCarry = true;
  static constexpr bool kReadsPreviousHidden = false;

  template <typename T>
  RNNTL_DEVICE static acc_t<T> initial_cell_carry(const LstmBackwardArgs<T>& s, int64_t b, int64_t u, bool owned) {
    return (owned && s.grad_c_n) ? to_acc(s.grad_c_n[b * s.hidden + u]) : acc_t<T>(0);
  }

  template <typename T>
  RNNTL_DEVICE static void final_cell_carry(const LstmBackwardArgs<T>& s, int64_t b, int64_t u, acc_t<T> carry) {
    if (s.grad_c0) s.grad_c0[b * s.hidden + u] = from_acc<T>(carry);
  }

  template <typename T>
  RNNTL_DEVICE static void backward_unit(const LstmBackwardArgs<T>& s, int64_t row, int64_t compact,
                                         int64_t prev_row, bool first, int64_t b, int64_t u, acc_t<T> dh,
                                         T /*hidden_prev*/, acc_t<T>& grad_cell, acc_t<T>& direct,
                                         acc_t<T>* exchange) {
    using A = acc_t<T>;
    const int64_t H = s.hidden, G = 4 * H;
    direct = A(0);
    if (s.zoneout_h) {
      const A keep = to_acc(s.zoneout_h[row * H + u]);
      direct = keep * dh;
      dh = (A(1) - keep) * dh;
    }
    if (s.hidden_pre_clip) dh = clip_gradient(dh, to_acc(s.hidden_pre_clip[row * H + u]), s.proj_clip);
    const LstmBackwardElement<A> e = lstm_backward_item(s, row, prev_row, first, b, u, dh, grad_cell);
    const A d[4] = {e.d_i, e.d_f, e.d_g, e.d_o};
    for (int g = 0; g < 4; ++g) {
      const T rounded = from_acc<T>(d[g]);
      s.grad_gates_all[compact * G + g * H + u] = rounded;
      exchange[g * H + u] = to_acc(rounded);
    }
  }

  // A finished row passes its cell gradient on, clamped as the reference's hook does.
  template <typename T>
  RNNTL_DEVICE static void backward_finished(const LstmBackwardArgs<T>& s, acc_t<T>& grad_cell) {
    grad_cell = clip_value(grad_cell, s.state_clip);
  }
};

}  // namespace cuda
}  // namespace rnntl
