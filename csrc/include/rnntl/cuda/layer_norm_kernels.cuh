// Layer-normalised LSTM and GRU kernels (docs/semantics.md section 10), one layer and one
// direction, stepwise strategy only: per step the recurrent GEMM (through the GemmHook)
// over the running rows, then one block per batch slot does the row's work, since a row's
// statistics need its whole 4H / 3H row: block reductions for the two gate norms, the
// gates, the cell, a third reduction for the LSTM's LN(c~), and h. The backward mirrors it
// (dL/dh_t, the norm of the cell backwards, the gate gradients, both gate norms
// backwards). The launches and workspaces are in layer_norm_launch.cuh; the row and element
// math is rnntl/layer_norm_math.h and rnntl/cell_math.h, the CPU kernels' own.
//
// Shapes: T steps, B batch, H hidden, P = proj_size or H (GRU: H), G = 4H (i, f, g, o) or
// 3H (r, z, n), N valid rows. `row` = t * B + b indexes the [T, B, *] tensors (the reserve
// is padded, zeros at padded steps), `compact` = first_row[t] + j the [N, *] work buffers,
// slot j the slot-major [B, *] state buffers (device_common.cuh).
#pragma once

#include "../layer_norm_math.h"
#include "device_common.cuh"

namespace rnntl {
namespace cuda {

// Threads of a row kernel's block (whole warps); its dynamic shared memory holds the
// per-warp partial sums of up to kRowSums values.
constexpr int kRowThreads = 128;
constexpr int kRowSums = 4;

template <typename T>
constexpr size_t row_shared_bytes() {
  return size_t(32) * kRowSums * sizeof(acc_t<T>);
}

// Sums values[0..kCount) over the block; every thread gets the sums. shared: [32 * kCount]
// (blockDim.x a multiple of 32, at most 1024). Every thread of the block must call it.
template <int kCount, typename A>
RNNTL_DEVICE void block_sums(A* values, A* shared) {
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize, warps = blockDim.x / warpSize;
  for (int i = 0; i < kCount; ++i) {
    const A v = warp_sum(values[i]);
    if (lane == 0) shared[warp * kCount + i] = v;
  }
  __syncthreads();
  for (int i = 0; i < kCount; ++i) {
    A sum = A(0);
    for (int w = 0; w < warps; ++w) sum += shared[w * kCount + i];
    values[i] = sum;
  }
  __syncthreads();  // shared is reused by the next call
}

// Statistics of two rows of n values (the two gate products): stats = {mean of a, 1/std of
// a, mean of b, 1/std of b}, two passes (mean, then the centred squares) as
// layer_norm_row_forward.
template <typename T>
RNNTL_DEVICE void two_row_statistics(const T* a, const T* b, int64_t n, acc_t<T>* shared, acc_t<T>* stats) {
  using A = acc_t<T>;
  A sums[2] = {A(0), A(0)};
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    sums[0] += to_acc(a[k]);
    sums[1] += to_acc(b[k]);
  }
  block_sums<2>(sums, shared);
  const A mean_a = sums[0] / A(n), mean_b = sums[1] / A(n);
  A squares[2] = {A(0), A(0)};
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const A da = to_acc(a[k]) - mean_a, db = to_acc(b[k]) - mean_b;
    squares[0] += da * da;
    squares[1] += db * db;
  }
  block_sums<2>(squares, shared);
  // 1/std rounded to T, as the reserve keeps it: the backward then differentiates exactly
  // the norm the forward applied (with 1/std in a half type, float16 runs had twice the
  // reference's gradient error otherwise).
  stats[0] = mean_a;
  stats[1] = to_acc(from_acc<T>(layer_norm_inverse_std(squares[0] / A(n))));
  stats[2] = mean_b;
  stats[3] = to_acc(from_acc<T>(layer_norm_inverse_std(squares[1] / A(n))));
}

template <typename T>
RNNTL_DEVICE acc_t<T> value_or(const T* p, int64_t k, acc_t<T> fallback) {
  return p ? to_acc(p[k]) : fallback;
}

// Zeros in `width` values of a [T, B, width] tensor's row (a padded step), or nothing for null.
template <typename T>
RNNTL_DEVICE void zero_row(T* tensor, int64_t row, int64_t width) {
  if (!tensor) return;
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) tensor[row * width + k] = from_acc<T>(acc_t<T>(0));
}

// out[c] = sum over the valid (t, b) of a[compact row, c] * padded[t * B + b, c]: the gains'
// gradients from compact dL/d(norm output) and the padded reserve's normalised values. One
// warp per column, float accumulation.
//   a: [N, a_stride] compact rows;  padded: [T, B, padded_stride];  out: [cols].
template <typename T>
__global__ void compact_padded_column_dot_kernel(const T* a, int64_t a_stride, const T* padded, int64_t padded_stride,
                                                 T* out, int64_t cols, int64_t steps, int64_t batch,
                                                 const int64_t* slot, const int64_t* active,
                                                 const int64_t* first_row) {
  using A = acc_t<T>;
  const int64_t warps_per_block = blockDim.x / warpSize;
  const int64_t lane = threadIdx.x % warpSize;
  for (int64_t c = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / warpSize; c < cols;
       c += int64_t(gridDim.x) * warps_per_block) {
    A sum = A(0);
    for (int64_t r = lane; r < steps * batch; r += warpSize) {
      const int64_t t = r / batch, b = r % batch, j = slot[b];
      if (j < active[t]) sum += to_acc(a[(first_row[t] + j) * a_stride + c]) * to_acc(padded[r * padded_stride + c]);
    }
    sum = warp_sum(sum);
    if (lane == 0) out[c] = from_acc<T>(sum);
  }
}

// ---------------------------------------------------------------------------------------
// Kernel arguments (filled once per run by layer_norm_launch.cuh; the loop sets t, running)
// ---------------------------------------------------------------------------------------
template <typename T>
struct LayerNormForwardArgs : SequenceArgs {
  const T* input_gates;         // [N, G] compact W_ih x (no bias: it adds after the norm)
  const T* recurrent_gates;     // [B, G] slot-major W_hh (m * h_{t-1})
  const T *gain_ih, *gain_hh;   // [G]
  const T *bias_ih, *bias_hh;   // [G] or null
  T* hidden_state;              // [B, P] slot-major h_{t-1} in, h_t out (unmasked)
  T* output;                    // [T, B, P]
  T* gates;                     // [T, B, G] activations, or null (not saving)
  T* normalized;                // [T, B, 2G] LN(W_ih x) | LN(W_hh (m * h)), or null
  T* inverse_std;               // [T, B, 3] (LSTM) / [T, B, 2] (GRU), or null
};

template <typename T>
struct LnLstmForwardArgs : LayerNormForwardArgs<T> {
  bool project;                 // weight_hr given
  const T *cell_gain, *cell_bias;  // [H] or null (1, 0)
  const T* zoneout_h;           // [T, B, P] keep weights d, or null
  const T* zoneout_c;           // [T, B, H] keep weights e, or null
  T* cells;                     // [T, B, 3H] c~ before clip | LN(c~) | carried c_t, or null
  T* hidden_pre_clip;           // [T, B, P] or null
  acc_t<T>* cell_state;         // [B, H] slot-major carried c
  acc_t<T>* cell_scratch;       // [B, 2H] slot-major: c~ after clip | o
  T* hidden_unprojected;        // [B, H] slot-major m = o * tanh(LN(c~) g_c + b_c) (projection)
  acc_t<T> cell_clip, proj_clip;
};

template <typename T>
struct LnGruForwardArgs : LayerNormForwardArgs<T> {
  const T* zoneout;             // [T, B, H] keep weights, or null
};

template <typename T>
struct LayerNormBackwardArgs : SequenceArgs {
  const T *gain_ih, *gain_hh;   // [G]
  const T* output;              // [T, B, P] forward output (the carried h_t)
  const T* grad_output;         // [T, B, P] or null
  const T* h0;                  // [B, P] or null
  const T* recurrent_mask;      // [B, P] batch order, or null
  const T* gates;               // [T, B, G]
  const T* normalized;          // [T, B, 2G]
  const T* inverse_std;         // [T, B, 3 or 2]
  T* grad_hidden_carry;         // [B, P] slot-major dL/dh_t in; the paths that skip W_hh out
  acc_t<T>* grad_gates;         // [B, G] slot-major dL/da (LSTM) or dL/dgx (GRU), float
  T* grad_input_product;        // [N, G] compact dL/d(W_ih x), or null (no dL/dx, no dW_ih)
  T* grad_recurrent_product;    // dL/d(W_hh (m * h)): [N, G] compact when recurrent_product_all, else [B, G]
  bool recurrent_product_all;   // (dW_hh wanted)
  T* hidden_prev_all;           // [N, P] compact m * h_{t-1}, or null (no dW_hh)
  acc_t<T> state_clip, gate_clip;
};

template <typename T>
struct LnLstmBackwardArgs : LayerNormBackwardArgs<T> {
  const T *cell_gain, *cell_bias;  // [H] or null
  const T* c0;                  // [B, H] or null
  const T* cells;               // [T, B, 3H]
  const T* hidden_pre_clip;     // [T, B, P] or null (no proj_clip)
  const T *zoneout_h, *zoneout_c;  // keep weights or null
  acc_t<T>* grad_cell_carry;    // [B, H] slot-major dL/dc_t in, dL/dc_{t-1} out
  T* grad_pre_clip;             // [B, P] slot-major dL/dh~ (through proj_clip)
  T* grad_pre_clip_all;         // [N, P] compact, or null (no dW_hr)
  const T* grad_hidden_unprojected;  // [B, H] slot-major dL/dm (grad_pre_clip without projection)
  acc_t<T>* cell_work;          // [B, H] slot-major dL/d(LN(c~) g_c + b_c)
  T* grad_gates_all;            // [N, 4H] compact dL/da (bias gradient)
  T* grad_normalized_cell_all;  // [N, H] compact dL/d(LN(c~) g_c + b_c), or null (no g_c, b_c gradient)
  T* hidden_unprojected_all;    // [N, H] compact m, or null (no dW_hr)
  acc_t<T> cell_clip, proj_clip;
};

template <typename T>
struct LnGruBackwardArgs : LayerNormBackwardArgs<T> {
  const T* bias_hh;             // [3H] or null
  const T* zoneout;             // [T, B, H] or null
  acc_t<T>* grad_hidden_gates;  // [B, 3H] slot-major dL/dgh, float
  T* grad_input_gates_all;      // [N, 3H] compact dL/dgx (b_ih's gradient)
  T* grad_hidden_gates_all;     // [N, 3H] compact dL/dgh (b_hh's gradient)
};

// ---------------------------------------------------------------------------------------
// LSTM forward
// ---------------------------------------------------------------------------------------
// h_t of a running item (column k) from h~ before proj_clip: the reserve, the clip, zoneout's
// blend with the unmasked h_{t-1}, the state and the output.
template <typename T>
RNNTL_DEVICE void ln_lstm_hidden_item(const LnLstmForwardArgs<T>& s, int64_t row, int64_t j, int64_t k,
                                      acc_t<T> fresh) {
  const int64_t P = s.out_size;
  if (s.hidden_pre_clip) s.hidden_pre_clip[row * P + k] = from_acc<T>(fresh);
  acc_t<T> value = clip_value(fresh, s.proj_clip);
  if (s.zoneout_h) value = zoneout_blend(to_acc(s.zoneout_h[row * P + k]), to_acc(s.hidden_state[j * P + k]), value);
  const T h = from_acc<T>(value);
  s.hidden_state[j * P + k] = h;
  s.output[row * P + k] = h;
}

// One block per slot j (grid B): a running row's step, or a padded row's zeros.
template <typename T>
__global__ void ln_lstm_forward_row_kernel(LnLstmForwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(A, shared);
  const int64_t H = s.hidden, P = s.out_size, G = 4 * H, j = blockIdx.x;
  if (j >= s.batch) return;
  const int64_t row = s.t * s.batch + s.order[j];
  if (j >= s.running) {
    zero_row(s.output, row, P);
    zero_row(s.hidden_pre_clip, row, P);
    zero_row(s.gates, row, G);
    zero_row(s.normalized, row, 2 * G);
    zero_row(s.cells, row, 3 * H);
    zero_row(s.inverse_std, row, 3);
    return;
  }
  const int64_t compact = s.first_row[s.t] + j;
  const T* xp = s.input_gates + compact * G;
  const T* hp = s.recurrent_gates + j * G;
  A stats[4];
  two_row_statistics(xp, hp, G, shared, stats);
  A* fresh = s.cell_scratch + j * 2 * H;
  A* out_gate = fresh + H;
  A* cell = s.cell_state + j * H;
  A cell_sum[1] = {A(0)};
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) {
    A a[4];
    for (int g = 0; g < 4; ++g) {
      const int64_t col = g * H + k;
      const A xn = (to_acc(xp[col]) - stats[0]) * stats[1], hn = (to_acc(hp[col]) - stats[2]) * stats[3];
      if (s.normalized) {
        s.normalized[row * 2 * G + col] = from_acc<T>(xn);
        s.normalized[row * 2 * G + G + col] = from_acc<T>(hn);
      }
      a[g] = layer_norm_affine(xn, to_acc(s.gain_ih[col]), value_or(s.bias_ih, col, A(0))) +
             layer_norm_affine(hn, to_acc(s.gain_hh[col]), value_or(s.bias_hh, col, A(0)));
    }
    A i, f, g, o;
    lstm_gate_activations(a[0], a[1], a[2], a[3], i, f, g, o);
    const A before_clip = f * cell[k] + i * g;
    const A clipped = clip_value(before_clip, s.cell_clip);
    const A carried = s.zoneout_c ? zoneout_blend(to_acc(s.zoneout_c[row * H + k]), cell[k], clipped) : clipped;
    cell[k] = carried;
    fresh[k] = clipped;
    out_gate[k] = o;
    cell_sum[0] += clipped;
    if (s.gates) {
      const A act[4] = {i, f, g, o};
      for (int q = 0; q < 4; ++q) s.gates[row * G + q * H + k] = from_acc<T>(act[q]);
      s.cells[row * 3 * H + k] = from_acc<T>(before_clip);
      s.cells[row * 3 * H + 2 * H + k] = from_acc<T>(carried);
    }
  }
  // LN(c~): h~ reads the fresh (clipped) cell before zoneout, as the reference.
  block_sums<1>(cell_sum, shared);
  const A cell_mean = cell_sum[0] / A(H);
  A squares[1] = {A(0)};
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) squares[0] += (fresh[k] - cell_mean) * (fresh[k] - cell_mean);
  block_sums<1>(squares, shared);
  const A cell_inverse_std = layer_norm_inverse_std(squares[0] / A(H));
  if (s.inverse_std && threadIdx.x == 0) {
    s.inverse_std[row * 3] = from_acc<T>(stats[1]);
    s.inverse_std[row * 3 + 1] = from_acc<T>(stats[3]);
    s.inverse_std[row * 3 + 2] = from_acc<T>(cell_inverse_std);
  }
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) {
    const A y = (fresh[k] - cell_mean) * cell_inverse_std;
    if (s.cells) s.cells[row * 3 * H + H + k] = from_acc<T>(y);
    const A m = out_gate[k] *
                tanh_activation(layer_norm_affine(y, value_or(s.cell_gain, k, A(1)), value_or(s.cell_bias, k, A(0))));
    if (s.project) {
      s.hidden_unprojected[j * H + k] = from_acc<T>(m);
    } else {
      ln_lstm_hidden_item(s, row, j, k, m);
    }
  }
}

// After the projection GEMM: h = clip(W_hr m), zoned, for the running slots.
//   projected: [B, P] slot-major W_hr m.
template <typename T>
__global__ void ln_lstm_projection_epilogue_kernel(LnLstmForwardArgs<T> s, const T* projected) {
  const int64_t P = s.out_size;
  RNNTL_GRID_STRIDE_LOOP(index, s.running * P) {
    const int64_t j = index / P, k = index % P;
    ln_lstm_hidden_item(s, s.t * s.batch + s.order[j], j, k, to_acc(projected[index]));
  }
}

// ---------------------------------------------------------------------------------------
// LSTM backward
// ---------------------------------------------------------------------------------------
// dL/dh~ of the running slots: the total dL/dh_t clamped in state mode, split by zoneout
// (the direct path stays in the carry, to which the recurrent GEMM adds), through
// proj_clip's backward. Rows past their length pass their carry on, clamped.
template <typename T>
__global__ void ln_lstm_hidden_gradient_kernel(LnLstmBackwardArgs<T> s) {
  using A = acc_t<T>;
  const int64_t P = s.out_size;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * P) {
    const int64_t j = index / P, k = index % P;
    const int64_t row = s.t * s.batch + s.order[j];
    const A carry = to_acc(s.grad_hidden_carry[index]);
    if (j < s.running) {
      const A grad_output = value_or(s.grad_output, row * P + k, A(0));
      const HiddenStateGradient<A> g =
          s.zoneout_h ? hidden_state_gradient<true>(carry, grad_output, to_acc(s.zoneout_h[row * P + k]), s.state_clip)
                      : hidden_state_gradient<false>(carry, grad_output, A(0), s.state_clip);
      const A fresh =
          s.hidden_pre_clip ? clip_gradient(g.fresh, to_acc(s.hidden_pre_clip[row * P + k]), s.proj_clip) : g.fresh;
      s.grad_pre_clip[index] = from_acc<T>(fresh);
      if (s.grad_pre_clip_all) s.grad_pre_clip_all[(s.first_row[s.t] + j) * P + k] = from_acc<T>(fresh);
      s.grad_hidden_carry[index] = from_acc<T>(g.direct);
    } else {
      s.grad_hidden_carry[index] = from_acc<T>(clip_value(carry, s.state_clip));
    }
  }
}

// Both gate norms backwards from dL/da in s.grad_gates (slot j) and the four sums
// {sum d g_ih, sum d g_ih x̂, sum d g_hh, sum d g_hh ĥ} of the row: dL/d(W_ih x) where
// wanted, dL/d(W_hh (m * h)); then the operand m * h_{t-1} of dW_hh. `hidden_gates` is the
// recurrent side's dL/d(norm output) (the GRU's dgh), or null (the LSTM: dL/da itself).
template <typename T>
RNNTL_DEVICE void gate_norms_backward(const LayerNormBackwardArgs<T>& s, int64_t j, int64_t row, int64_t compact,
                                      int64_t G, int stats_per_row, const acc_t<T>* sums,
                                      const acc_t<T>* hidden_gates) {
  using A = acc_t<T>;
  const T* xn = s.normalized + row * 2 * G;
  const T* hn = xn + G;
  const A inverse_std_x = to_acc(s.inverse_std[row * stats_per_row]);
  const A inverse_std_h = to_acc(s.inverse_std[row * stats_per_row + 1]);
  const A mean_x = sums[0] / A(G), dot_x = sums[1] / A(G), mean_h = sums[2] / A(G), dot_h = sums[3] / A(G);
  T* grad_recurrent = s.grad_recurrent_product + (s.recurrent_product_all ? compact : j) * G;
  for (int64_t c = threadIdx.x; c < G; c += blockDim.x) {
    if (s.grad_input_product) {
      const A d = s.grad_gates[j * G + c] * to_acc(s.gain_ih[c]);
      s.grad_input_product[compact * G + c] = from_acc<T>(inverse_std_x * (d - mean_x - to_acc(xn[c]) * dot_x));
    }
    const A d = (hidden_gates ? hidden_gates[j * G + c] : s.grad_gates[j * G + c]) * to_acc(s.gain_hh[c]);
    grad_recurrent[c] = from_acc<T>(inverse_std_h * (d - mean_h - to_acc(hn[c]) * dot_h));
  }
}

// m * h_{t-1} of slot j (batch row b) for dW_hh.
template <typename T>
RNNTL_DEVICE void hidden_operand(const LayerNormBackwardArgs<T>& s, int64_t b, int64_t prev_row, bool first,
                                 int64_t compact) {
  if (!s.hidden_prev_all) return;
  const int64_t P = s.out_size;
  for (int64_t k = threadIdx.x; k < P; k += blockDim.x) {
    const T h_prev = first ? (s.h0 ? s.h0[b * P + k] : from_acc<T>(acc_t<T>(0))) : s.output[prev_row * P + k];
    s.hidden_prev_all[compact * P + k] = masked_value(s.recurrent_mask, b, P, k, h_prev);
  }
}

// One block per slot j (grid B): the norm of the cell backwards, the cell and gate
// gradients, both gate norms backwards; a row past its length clamps its cell carry.
template <typename T>
__global__ void ln_lstm_backward_row_kernel(LnLstmBackwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(A, shared);
  const int64_t H = s.hidden, G = 4 * H, j = blockIdx.x;
  if (j >= s.batch) return;
  A* carry_c = s.grad_cell_carry + j * H;
  if (j >= s.running) {
    for (int64_t k = threadIdx.x; k < H; k += blockDim.x) carry_c[k] = clip_value(carry_c[k], s.state_clip);
    return;
  }
  const int64_t b = s.order[j], row = s.t * s.batch + b, compact = s.first_row[s.t] + j;
  const bool first = s.reverse ? s.t == s.length[b] - 1 : s.t == 0;
  const int64_t prev_row = (s.reverse ? s.t + 1 : s.t - 1) * s.batch + b;
  const T* act = s.gates + row * G;
  const T* xn = s.normalized + row * 2 * G;
  const T* hn = xn + G;
  const T* cells = s.cells + row * 3 * H;
  A* work = s.cell_work + j * H;
  // LN(c~) again from the saved c~ before clip, its statistics in float from the dtype's
  // c~ as the reference's norm backward takes them, rather than from the saved LN(c~) and
  // 1/std rounded to the dtype (two block sums more).
  A cell_stats[1] = {A(0)};
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) cell_stats[0] += clip_value(to_acc(cells[k]), s.cell_clip);
  block_sums<1>(cell_stats, shared);
  const A fresh_mean = cell_stats[0] / A(H);
  A squares[1] = {A(0)};
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) {
    const A centred = clip_value(to_acc(cells[k]), s.cell_clip) - fresh_mean;
    squares[0] += centred * centred;
  }
  block_sums<1>(squares, shared);
  const A cell_inverse_std = layer_norm_inverse_std(squares[0] / A(H));
  const auto normalized_cell = [&](int64_t k) {
    return (clip_value(to_acc(cells[k]), s.cell_clip) - fresh_mean) * cell_inverse_std;
  };
  // dL/dy, y = LN(c~) g_c + b_c, and its norm's two sums.
  A cell_sums[2] = {A(0), A(0)};
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) {
    const A o = to_acc(act[3 * H + k]), y = normalized_cell(k), gain = value_or(s.cell_gain, k, A(1));
    const A tanh_cell = tanh_activation(layer_norm_affine(y, gain, value_or(s.cell_bias, k, A(0))));
    const A dy = lstm_normalized_cell_gradient(o, tanh_cell, to_acc(s.grad_hidden_unprojected[j * H + k]));
    work[k] = dy;
    if (s.grad_normalized_cell_all) s.grad_normalized_cell_all[compact * H + k] = from_acc<T>(dy);
    if (s.hidden_unprojected_all) s.hidden_unprojected_all[compact * H + k] = from_acc<T>(o * tanh_cell);
    cell_sums[0] += dy * gain;
    cell_sums[1] += dy * gain * y;
  }
  block_sums<2>(cell_sums, shared);
  const A cell_mean = cell_sums[0] / A(H), cell_dot = cell_sums[1] / A(H);
  A gate_sums[4] = {A(0), A(0), A(0), A(0)};
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) {
    const A y = normalized_cell(k), gain = value_or(s.cell_gain, k, A(1));
    const A tanh_cell = tanh_activation(layer_norm_affine(y, gain, value_or(s.cell_bias, k, A(0))));
    const A through_norm = cell_inverse_std * (work[k] * gain - cell_mean - y * cell_dot);
    const LayerNormCellGradient<A> g =
        s.zoneout_c ? lstm_layer_norm_cell_gradient<true>(carry_c[k], through_norm,
                                                          to_acc(s.zoneout_c[row * H + k]), s.state_clip)
                    : lstm_layer_norm_cell_gradient<false>(carry_c[k], through_norm, A(0), s.state_clip);
    const A grad_cell = clip_gradient(g.fresh, to_acc(cells[k]), s.cell_clip);
    const A cell_prev = first ? value_or(s.c0, b * H + k, A(0)) : to_acc(s.cells[prev_row * 3 * H + 2 * H + k]);
    const LstmBackwardElement<A> e =
        lstm_gate_gradients(to_acc(act[k]), to_acc(act[H + k]), to_acc(act[2 * H + k]), to_acc(act[3 * H + k]),
                            tanh_cell, cell_prev, to_acc(s.grad_hidden_unprojected[j * H + k]), grad_cell, s.gate_clip);
    const A d[4] = {e.d_i, e.d_f, e.d_g, e.d_o};
    for (int q = 0; q < 4; ++q) {
      const int64_t col = q * H + k;
      s.grad_gates[j * G + col] = d[q];
      s.grad_gates_all[compact * G + col] = from_acc<T>(d[q]);
      const A dx = d[q] * to_acc(s.gain_ih[col]), dh = d[q] * to_acc(s.gain_hh[col]);
      gate_sums[0] += dx;
      gate_sums[1] += dx * to_acc(xn[col]);
      gate_sums[2] += dh;
      gate_sums[3] += dh * to_acc(hn[col]);
    }
    carry_c[k] = e.grad_cell_prev + g.direct;
  }
  block_sums<4>(gate_sums, shared);  // also orders the grad_gates writes before the reads below
  gate_norms_backward<T>(s, j, row, compact, G, 3, gate_sums, nullptr);
  hidden_operand<T>(s, b, prev_row, first, compact);
}

// ---------------------------------------------------------------------------------------
// GRU
// ---------------------------------------------------------------------------------------
template <typename T>
__global__ void ln_gru_forward_row_kernel(LnGruForwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(A, shared);
  const int64_t H = s.hidden, G = 3 * H, j = blockIdx.x;
  if (j >= s.batch) return;
  const int64_t row = s.t * s.batch + s.order[j];
  if (j >= s.running) {
    zero_row(s.output, row, H);
    zero_row(s.gates, row, G);
    zero_row(s.normalized, row, 2 * G);
    zero_row(s.inverse_std, row, 2);
    return;
  }
  const int64_t compact = s.first_row[s.t] + j;
  const T* xp = s.input_gates + compact * G;
  const T* hp = s.recurrent_gates + j * G;
  A stats[4];
  two_row_statistics(xp, hp, G, shared, stats);
  if (s.inverse_std && threadIdx.x == 0) {
    s.inverse_std[row * 2] = from_acc<T>(stats[1]);
    s.inverse_std[row * 2 + 1] = from_acc<T>(stats[3]);
  }
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) {
    A gx[3], gh[3];
    for (int q = 0; q < 3; ++q) {
      const int64_t col = q * H + k;
      const A xn = (to_acc(xp[col]) - stats[0]) * stats[1], hn = (to_acc(hp[col]) - stats[2]) * stats[3];
      if (s.normalized) {
        s.normalized[row * 2 * G + col] = from_acc<T>(xn);
        s.normalized[row * 2 * G + G + col] = from_acc<T>(hn);
      }
      gx[q] = layer_norm_affine(xn, to_acc(s.gain_ih[col]), value_or(s.bias_ih, col, A(0)));
      gh[q] = layer_norm_affine(hn, to_acc(s.gain_hh[col]), value_or(s.bias_hh, col, A(0)));
    }
    const A h_prev = to_acc(s.hidden_state[j * H + k]);
    const GruForwardElement<A> e = gru_element_forward(gx[0], gx[1], gx[2], gh[0], gh[1], gh[2], h_prev);
    if (s.gates) {
      s.gates[row * G + k] = from_acc<T>(e.r);
      s.gates[row * G + H + k] = from_acc<T>(e.z);
      s.gates[row * G + 2 * H + k] = from_acc<T>(e.n);
    }
    const T h = from_acc<T>(s.zoneout ? zoneout_blend(to_acc(s.zoneout[row * H + k]), h_prev, e.hidden) : e.hidden);
    s.hidden_state[j * H + k] = h;
    s.output[row * H + k] = h;
  }
}

// One block per slot j: dL/dh_t (state clip, zoneout), the gate gradients, both gate norms
// backwards; the carry keeps z * dL/dh~ + d * dL/dh_t, to which the recurrent GEMM adds.
template <typename T>
__global__ void ln_gru_backward_row_kernel(LnGruBackwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(A, shared);
  const int64_t H = s.hidden, G = 3 * H, j = blockIdx.x;
  if (j >= s.batch) return;
  T* carry = s.grad_hidden_carry + j * H;
  if (j >= s.running) {
    for (int64_t k = threadIdx.x; k < H; k += blockDim.x)
      carry[k] = from_acc<T>(clip_value(to_acc(carry[k]), s.state_clip));
    return;
  }
  const int64_t b = s.order[j], row = s.t * s.batch + b, compact = s.first_row[s.t] + j;
  const bool first = s.reverse ? s.t == s.length[b] - 1 : s.t == 0;
  const int64_t prev_row = (s.reverse ? s.t + 1 : s.t - 1) * s.batch + b;
  const T* act = s.gates + row * G;
  const T* xn = s.normalized + row * 2 * G;
  const T* hn = xn + G;
  A gate_sums[4] = {A(0), A(0), A(0), A(0)};
  for (int64_t k = threadIdx.x; k < H; k += blockDim.x) {
    const A grad_output = value_or(s.grad_output, row * H + k, A(0)), c = to_acc(carry[k]);
    const HiddenStateGradient<A> g =
        s.zoneout ? hidden_state_gradient<true>(c, grad_output, to_acc(s.zoneout[row * H + k]), s.state_clip)
                  : hidden_state_gradient<false>(c, grad_output, A(0), s.state_clip);
    const A hidden_n =
        layer_norm_affine(to_acc(hn[2 * H + k]), to_acc(s.gain_hh[2 * H + k]), value_or(s.bias_hh, 2 * H + k, A(0)));
    const A h_prev = first ? value_or(s.h0, b * H + k, A(0)) : to_acc(s.output[prev_row * H + k]);
    const GruBackwardElement<A> e = gru_element_backward(to_acc(act[k]), to_acc(act[H + k]), to_acc(act[2 * H + k]),
                                                         hidden_n, h_prev, g.fresh, s.gate_clip);
    const A dx[3] = {e.d_r, e.d_z, e.d_n}, dh[3] = {e.d_r, e.d_z, e.d_hidden_n};
    for (int q = 0; q < 3; ++q) {
      const int64_t col = q * H + k;
      s.grad_gates[j * G + col] = dx[q];
      s.grad_hidden_gates[j * G + col] = dh[q];
      s.grad_input_gates_all[compact * G + col] = from_acc<T>(dx[q]);
      s.grad_hidden_gates_all[compact * G + col] = from_acc<T>(dh[q]);
      const A wx = dx[q] * to_acc(s.gain_ih[col]), wh = dh[q] * to_acc(s.gain_hh[col]);
      gate_sums[0] += wx;
      gate_sums[1] += wx * to_acc(xn[col]);
      gate_sums[2] += wh;
      gate_sums[3] += wh * to_acc(hn[col]);
    }
    carry[k] = from_acc<T>(e.grad_hidden_prev + g.direct);
  }
  block_sums<4>(gate_sums, shared);
  gate_norms_backward<T>(s, j, row, compact, G, 2, gate_sums, s.grad_hidden_gates);
  hidden_operand<T>(s, b, prev_row, first, compact);
}

}  // namespace cuda
}  // namespace rnntl
