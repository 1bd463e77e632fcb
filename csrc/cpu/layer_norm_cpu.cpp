// Layer-normalised LSTM and GRU (docs/semantics.md section 10) over a whole sequence, one
// layer and one direction, on the CPU, with every option of the plain cells (lengths,
// reverse, proj_size, cell_clip / proj_clip, state and gate clipping) and the regularizer
// arguments (recurrent_mask, zoneout):
//   LSTM: a_t = LN(W_ih x_t) * g_ih + b_ih + LN(W_hh (m * h_{t-1})) * g_hh + b_hh  (LN over 4H)
//         c~_t = clip(f * c_{t-1} + i * g);  h~_t = o * tanh(LN(c~_t) * g_c + b_c) (then W_hr, proj_clip)
//   GRU:  gx = LN(W_ih x_t) * g_ih + b_ih, gh = LN(W_hh (m * h_{t-1})) * g_hh + b_hh  (LN over 3H)
// and the carried states zoned with the keep weights. The row and element math is
// csrc/include/rnntl/layer_norm_math.h (shared with device code) and cell_math.h.
//
// One step loop, a step at a time (the structure of rnn_cpu.cpp and gru_cpu.cpp's
// stepwise loop): the input product W_ih x without bias in blocks of steps (ProjectionBlocks;
// the bias comes after the norm), per step the recurrent product over the running rows and
// one fused pass per row (both norms, gates, cell, norm of the cell, h). A row's statistics
// need its whole 4H / 3H row, so rows, not hidden units, are split across threads: the
// multi-core loop of the plain cells (which splits the units of a row) does not apply.
// Backward per step (reverse processing order), then the whole-sequence products: dW_ih and
// dL/dx from dL/d(W_ih x), dW_hh from dL/d(W_hh h), which differ under the norms.
//
// Shapes: input [T, B, I]; weight_ih [G, I]; weight_hh [G, P]; weight_hr [P, H]; h0 [B, P];
// c0 [B, H]; G = 4H (LSTM) or 3H (GRU), P = proj_size or H (GRU: H). "Slot-major" buffers
// hold row order[j] in slot j; whole-sequence buffers hold the N = valid_rows compact rows
// of SequenceOrder (the saved [T, B, ...] reserve tensors: those rows first, zeros after).
#include "layer_norm_cpu.h"

#include "gemm_cpu.h"
#include "sequence_cpu.h"

#include <rnntl/cell_math.h>
#include <rnntl/layer_norm_math.h>

#include <algorithm>
#include <vector>

namespace rnntl {
namespace cpu {
namespace {

c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// `given` contiguous, or a [size] tensor of `fill` (an absent gain is 1, an absent bias 0).
at::Tensor given_or_filled(const c10::optional<at::Tensor>& given, int64_t size, double fill,
                           const at::TensorOptions& options) {
  return given.has_value() ? given->contiguous() : at::full({size}, fill, options);
}

// b_ih + b_hh (each may be absent): both add after the norms, so they add up front.
at::Tensor summed_bias(const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
                       int64_t size, const at::TensorOptions& options) {
  at::Tensor sum = reusable_zeros({size}, options);
  if (bias_ih.has_value()) sum.add_(*bias_ih);
  if (bias_hh.has_value()) sum.add_(*bias_hh);
  return sum;
}

// The gradients that are column sums over every valid row: the biases' (sums of dL/dy) and
// the gains' (sums of dL/dy times the normalised values). Each row adds its terms in its
// backward step, while they are in cache, into sums of its slot in the op's dtype
// (`partial`), which go into the slot's float64 sums every kPartialSumSteps steps and at the
// row's last step (flush_partial_sums): a [N, W] buffer of dL/dy read back afterwards cost
// 4.4 ms of a 50 ms LSTM training step at (100, 32, 256, 256), and float64 sums updated by
// every row took a quarter of the layer-normalised LSTM's backward rows at (200, 16, 128,
// 128) (their conversions, and 14H float64 values read and written per row). A float32
// partial sum adds at most 8 terms, so the totals stay as accurate as float64 sums to float32
// precision. A slot's sums run over its steps in order, flushed at steps fixed by the time
// index, and total() adds the slots in slot order, so the result depends on neither the
// step loop nor the thread count.
constexpr int64_t kPartialSumSteps = 8;

class ColumnSums {
 public:
  // width: the columns of all sums together; wanted: false leaves it empty (no gradient asked).
  ColumnSums(int64_t batch, int64_t width, bool wanted, const at::TensorOptions& options) {
    if (wanted) {
      sums_ = reusable_zeros({batch, width}, at::kDouble);
      partial_ = reusable_zeros({batch, width}, options);
    }
  }
  // The [width] float64 sums of slot j, or nullptr when empty.
  double* slot(int64_t j) const { return sums_.defined() ? sums_.data_ptr<double>() + j * sums_.size(1) : nullptr; }
  // The [width] partial sums of slot j, or nullptr when empty.
  template <typename T>
  T* partial_slot(int64_t j) const {
    return partial_.defined() ? partial_.data_ptr<T>() + j * partial_.size(1) : nullptr;
  }
  // Columns [offset, offset + size) summed over the slots, as a [size] tensor of `options`
  // (every partial sum flushed: each row flushes at its last step).
  at::Tensor total(int64_t offset, int64_t size, const at::TensorOptions& options) const {
    at::Tensor out = reusable_zeros({size}, at::kDouble);
    double* __restrict__ o = out.data_ptr<double>();
    for (int64_t j = 0; j < sums_.size(0); ++j) {
      const double* __restrict__ row = slot(j) + offset;
      for (int64_t k = 0; k < size; ++k) o[k] += row[k];
    }
    return out.to(options.dtype());
  }

 private:
  at::Tensor sums_;     // [B, width] float64, slot-major
  at::Tensor partial_;  // [B, width] the op's dtype, slot-major
};

// sums[k] += a[k] (* b[k]), k < n.
template <typename T>
RNNTL_ROW_INLINE void add_to_sums(T* __restrict__ sums, const T* __restrict__ a, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) sums[k] += a[k];
}
template <typename T>
RNNTL_ROW_INLINE void add_products_to_sums(T* __restrict__ sums, const T* __restrict__ a, const T* __restrict__ b,
                                           int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) sums[k] += a[k] * b[k];
}
// A row's partial sums into its slot's float64 sums, at time step t of the backward (last:
// the row's last step there, its first in time order), every kPartialSumSteps steps.
template <typename T>
RNNTL_ROW_INLINE void flush_partial_sums(T* __restrict__ partial, double* __restrict__ sums, int64_t n, int64_t t,
                                         bool last) {
  if (!last && t % kPartialSumSteps != 0) return;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    sums[k] += double(partial[k]);
    partial[k] = T(0);
  }
}

// h_{t-1} of slot j at step t (a valid step): the initial state on the row's first step,
// else the carried state, which is the previous step's output.
template <typename T>
const T* previous_hidden(const SequenceOrder& sequence, int64_t t, int64_t j, bool reverse, const T* output,
                         const T* h0, const T* zeros, int64_t width) {
  const int64_t batch = sequence.host.batch, b = sequence.order[j];
  if (sequence.is_first_step(b, t, reverse)) return h0 ? h0 + b * width : zeros;
  return output + (SequenceOrder::previous_step(t, reverse) * batch + b) * width;
}

// The operand of dL/dW_hh for slot j at step t: m * h_{t-1} (or h_{t-1}), into `operand`.
template <typename T>
void write_hidden_operand(const T* mask, const T* h_prev, T* operand, int64_t width) {
  if (mask) {
    masked_rows(mask, h_prev, operand, 1, width, 0, width);
  } else {
    std::copy(h_prev, h_prev + width, operand);
  }
}

// Rows past their length (slots [first, end)) pass their state gradient through unchanged,
// clamped in state mode as the reference's hooks on the carried-over states do.
template <typename T>
void clip_rows_past_length(T* carry, int64_t first, int64_t end, int64_t width, T state_clip) {
  if (state_clip <= T(0)) return;
  for (int64_t j = first; j < end; ++j)
    for (int64_t k = 0; k < width; ++k) carry[j * width + k] = clip_value(carry[j * width + k], state_clip);
}

// ====================================================================================
// LSTM
// ====================================================================================

// Forward pass of one step. Row buffers (gates, normalized, cells, inverse_std) are the
// saved compact rows when saving (row = compact row), else per-slot scratch (row = slot).
template <typename T>
struct LnLstmForwardStep {
  int64_t batch, hidden, out_size, t;
  int64_t first_row;           // compact row of slot 0 at step t
  const int64_t* order;
  const T* input_product;      // [rows, 4H] W_ih x of compact rows input_first_row...
  int64_t input_first_row;
  const T* recurrent_product;  // [n, 4H]    W_hh (m * h_{t-1}) of slots recurrent_first_slot, ...
  int64_t recurrent_first_slot;
  const T *gain_ih, *gain_hh;  // [4H]
  const T* bias;               // [4H]       b_ih + b_hh
  const T *cell_gain, *cell_bias;  // [H]
  T* cell_state;               // [B, H]     slot-major c_{t-1} in, c_t out
  T* hidden_state;             // [B, P]     slot-major h_{t-1} in, h_t out
  const T* recurrent_mask;     // [B, P]     slot-major, or nullptr
  T* masked_state;             // [B, P]     slot-major m * h_t, with a mask
  const T* zoneout_h;          // [T, B, P]  padded keep weights, or nullptr
  const T* zoneout_c;          // [T, B, H]  padded keep weights, or nullptr
  T* output;                   // [T, B, P]  padded
  T* hidden_unprojected;       // [B, H]     slot-major o * tanh(LN(c~) * g_c + b_c)
  bool saving;
  T* gates;                    // [rows, 4H] activations i, f, g, o
  T* normalized;               // [rows, 8H] LN(W_ih x) | LN(W_hh (m * h))
  T* cells;                    // [rows, 3H] c~ before cell_clip | LN(c~) | carried c_t
  T* inverse_std;              // [rows, 3]  1/std of the input product, recurrent product, c~
  T* hidden_pre_clip;          // [N, P]     compact h~ before proj_clip, when saving with proj_clip
  T cell_clip, proj_clip;
};

// h~ [P] of slot j -> proj_clip, zoneout, the state, the output and the next product's operand.
template <typename T>
RNNTL_ROW_INLINE void ln_lstm_hidden_epilogue(const LnLstmForwardStep<T>& s, int64_t j, const T* fresh) {
  const int64_t P = s.out_size;
  const int64_t row = s.t * s.batch + s.order[j], compact = s.first_row + j;
  T* __restrict__ h = s.hidden_state + j * P;
  T* __restrict__ out = s.output + row * P;
  const T* __restrict__ keep = s.zoneout_h ? s.zoneout_h + row * P : nullptr;
  T* __restrict__ pre = s.hidden_pre_clip ? s.hidden_pre_clip + compact * P : nullptr;
  const T* __restrict__ mask = s.recurrent_mask ? s.recurrent_mask + j * P : nullptr;
  T* __restrict__ masked = mask ? s.masked_state + j * P : nullptr;
  const T proj_clip = s.proj_clip;
  for (int64_t k = 0; k < P; ++k) {
    if (pre) pre[k] = fresh[k];
    T value = clip_value(fresh[k], proj_clip);
    if (keep) value = zoneout_blend(keep[k], h[k], value);
    h[k] = value;
    out[k] = value;
    if (masked) masked[k] = mask[k] * value;
  }
}

template <typename T, bool kZoneoutC>
RNNTL_ROW_INLINE void ln_lstm_forward_row(const LnLstmForwardStep<T>& s, int64_t j, bool project) {
  const int64_t H = s.hidden, G = 4 * H;
  const int64_t row = s.t * s.batch + s.order[j], compact = s.first_row + j;
  const int64_t r = s.saving ? compact : j;
  const T* __restrict__ xp = s.input_product + (compact - s.input_first_row) * G;
  const T* __restrict__ hp = s.recurrent_product + (j - s.recurrent_first_slot) * G;
  T* __restrict__ xn = s.normalized + r * 2 * G;
  T* __restrict__ hn = xn + G;
  T* __restrict__ stats = s.inverse_std + r * 3;
  T* __restrict__ act = s.gates + r * G;
  T* __restrict__ cells = s.cells + r * 3 * H;
  T* __restrict__ c = s.cell_state + j * H;
  T* __restrict__ m = s.hidden_unprojected + j * H;
  const T* __restrict__ keep = kZoneoutC ? s.zoneout_c + row * H : nullptr;
  const T *__restrict__ gain_ih = s.gain_ih, *__restrict__ gain_hh = s.gain_hh, *__restrict__ bias = s.bias;
  const T *__restrict__ cell_gain = s.cell_gain, *__restrict__ cell_bias = s.cell_bias;
  const T cell_clip = s.cell_clip;
  stats[0] = layer_norm_row_forward(xp, xn, G);
  stats[1] = layer_norm_row_forward(hp, hn, G);
#pragma omp simd
  for (int64_t k = 0; k < G; ++k) act[k] = layer_norm_affine(xn[k], gain_ih[k], bias[k]) + hn[k] * gain_hh[k];
#pragma omp simd
  for (int64_t k = 0; k < H; ++k)
    lstm_gate_activations(act[k], act[H + k], act[2 * H + k], act[3 * H + k], act[k], act[H + k], act[2 * H + k],
                          act[3 * H + k]);
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T before_clip = act[H + k] * c[k] + act[k] * act[2 * H + k];
    const T fresh = clip_value(before_clip, cell_clip);
    const T carried = kZoneoutC ? zoneout_blend(keep[k], c[k], fresh) : fresh;
    cells[k] = before_clip;
    cells[H + k] = fresh;  // normalised in place below
    cells[2 * H + k] = carried;
    c[k] = carried;
  }
  // h~ reads the fresh cell (before zoneout), as the reference.
  stats[2] = layer_norm_row_forward(cells + H, cells + H, H);
#pragma omp simd
  for (int64_t k = 0; k < H; ++k)
    m[k] = act[3 * H + k] * tanh_activation(layer_norm_affine(cells[H + k], cell_gain[k], cell_bias[k]));
  if (!project) ln_lstm_hidden_epilogue(s, j, m);
}

template <typename T>
RNNTL_ROW_INLINE void ln_lstm_forward_rows(const LnLstmForwardStep<T>& s, int64_t begin, int64_t end, bool project) {
  for (int64_t j = begin; j < end; ++j)
    s.zoneout_c ? ln_lstm_forward_row<T, true>(s, j, project) : ln_lstm_forward_row<T, false>(s, j, project);
}

RNNTL_VECTOR_CLONES void ln_lstm_forward_rows_entry(const LnLstmForwardStep<float>& s, int64_t begin, int64_t end,
                                                    bool project) {
  ln_lstm_forward_rows(s, begin, end, project);
}
void ln_lstm_forward_rows_entry(const LnLstmForwardStep<double>& s, int64_t begin, int64_t end, bool project) {
  ln_lstm_forward_rows(s, begin, end, project);
}

// Where each column sum of the layer-normalised LSTM's backward starts in a slot's
// ColumnSums, in units of H: dL/da [4H] (b_ih's and b_hh's gradient), dL/da * LN(W_ih x)
// [4H] (g_ih's), dL/da * LN(W_hh h) [4H] (g_hh's), dL/dy * LN(c~) [H] (g_c's), dL/dy [H] (b_c's).
enum LstmSum : int64_t { kSumBias = 0, kSumGainIh = 4, kSumGainHh = 8, kSumCellGain = 12, kSumCellBias = 13,
                         kLstmSumsWidth = 14 };

// Backward pass of one step. The whole-sequence buffers are compact [N, ...].
template <typename T>
struct LnLstmBackwardStep {
  int64_t batch, hidden, out_size, t;
  bool reverse;
  const SequenceOrder* sequence;
  const T *gates, *normalized, *cells, *inverse_std;  // the saved reserve, compact rows
  const T* hidden_pre_clip;     // [N, P] compact, with proj_clip
  const T* output;              // [T, B, P] padded (the carried h_t)
  const T* grad_output;         // [T, B, P] padded
  const T *h0, *c0;             // [B, P], [B, H] by batch row, or nullptr
  const T* zeros;               // [max(H, P)]
  const T *gain_ih, *gain_hh;   // [4H]
  const T *cell_gain, *cell_bias;  // [H]
  const T* recurrent_mask;      // [B, P] slot-major, or nullptr
  const T *zoneout_h, *zoneout_c;  // padded keep weights, or nullptr
  T* grad_hidden_carry;         // [B, P] slot-major dL/dh_t in; out: the zoneout path to h_{t-1} (or 0)
  T* grad_cell_carry;           // [B, H] slot-major dL/dc_t in, dL/dc_{t-1} out
  T* grad_fresh_hidden;         // dL/dh~ (after proj_clip's backward) of slot j at + row * P (projection)
  bool fresh_hidden_all;        // grad_fresh_hidden holds compact rows (for dW_hr), else slots
  const T* grad_unprojected;    // [n, H] dL/dm of slots unprojected_first_slot, ... (projection)
  int64_t unprojected_first_slot;
  T* unprojected_all;           // [N, H] compact m, for dW_hr, or nullptr
  T* cell_scratch;              // [B, 3H] slot-major: tanh(y) | work row | dL/dm (no projection)
  T* grad_preactivation;        // [B, 4H] slot-major dL/da of the step
  T* gradient_sums;             // ColumnSums' partial sums [B, 14H] (LstmSum), or nullptr
  double* gradient_totals;      // ColumnSums' float64 sums [B, 14H]
  T* grad_input_product;        // [N, 4H] compact dL/d(W_ih x), or nullptr
  T* grad_recurrent_product;    // dL/d(W_hh (m * h)) of slot j at + row * 4H
  bool recurrent_product_all;   // grad_recurrent_product holds compact rows (for dW_hh), else slots
  T* hidden_prev_all;           // [N, P] compact m * h_{t-1}, for dW_hh, or nullptr
  T cell_clip, proj_clip, state_clip, gate_clip;
};

// dL/dh~ of slot j: the total dL/dh_t clamped in state mode, split by zoneout, through
// proj_clip's backward. Leaves the zoneout path in the hidden carry.
template <typename T, bool kZoneoutH>
RNNTL_ROW_INLINE void ln_lstm_fresh_hidden_gradient(const LnLstmBackwardStep<T>& s, int64_t j, T* grad_fresh) {
  const int64_t P = s.out_size;
  const int64_t row = s.t * s.batch + s.sequence->order[j], compact = s.sequence->first_row[s.t] + j;
  const T* __restrict__ go = s.grad_output + row * P;
  const T* __restrict__ keep = kZoneoutH ? s.zoneout_h + row * P : nullptr;
  const T* __restrict__ pre = s.hidden_pre_clip ? s.hidden_pre_clip + compact * P : nullptr;
  T* __restrict__ carry = s.grad_hidden_carry + j * P;
  const T state_clip = s.state_clip, proj_clip = s.proj_clip;
  for (int64_t k = 0; k < P; ++k) {
    const HiddenStateGradient<T> g =
        hidden_state_gradient<kZoneoutH>(carry[k], go[k], kZoneoutH ? keep[k] : T(0), state_clip);
    grad_fresh[k] = pre ? clip_gradient(g.fresh, pre[k], proj_clip) : g.fresh;
    carry[k] = g.direct;
  }
}

template <typename T, bool kZoneoutH>
RNNTL_ROW_INLINE void ln_lstm_projection_rows(const LnLstmBackwardStep<T>& s, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const int64_t r = s.fresh_hidden_all ? s.sequence->first_row[s.t] + j : j;
    ln_lstm_fresh_hidden_gradient<T, kZoneoutH>(s, j, s.grad_fresh_hidden + r * s.out_size);
  }
}

template <typename T, bool kProject, bool kZoneoutH, bool kZoneoutC>
RNNTL_ROW_INLINE void ln_lstm_backward_row(const LnLstmBackwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 4 * H, P = s.out_size;
  const SequenceOrder& sequence = *s.sequence;
  const int64_t b = sequence.order[j], row = s.t * s.batch + b, compact = sequence.first_row[s.t] + j;
  const T* __restrict__ act = s.gates + compact * G;
  const T* __restrict__ xn = s.normalized + compact * 2 * G;
  const T* __restrict__ hn = xn + G;
  const T* __restrict__ cells = s.cells + compact * 3 * H;
  const T* __restrict__ stats = s.inverse_std + compact * 3;
  const bool first = sequence.is_first_step(b, s.t, s.reverse);
  const T* __restrict__ c_prev =
      first ? (s.c0 ? s.c0 + b * H : s.zeros)
            : s.cells + (sequence.first_row[SequenceOrder::previous_step(s.t, s.reverse)] + j) * 3 * H + 2 * H;
  const T* __restrict__ keep_c = kZoneoutC ? s.zoneout_c + row * H : nullptr;
  T* __restrict__ tanh_cell = s.cell_scratch + j * 3 * H;
  T* __restrict__ work = tanh_cell + H;
  T* __restrict__ grad_m = tanh_cell + 2 * H;
  if constexpr (kProject) {
    const T* grad_unprojected = s.grad_unprojected + (j - s.unprojected_first_slot) * H;
    std::copy(grad_unprojected, grad_unprojected + H, grad_m);
  } else {
    ln_lstm_fresh_hidden_gradient<T, kZoneoutH>(s, j, grad_m);  // P == H
  }
  T* __restrict__ m_saved = s.unprojected_all ? s.unprojected_all + compact * H : nullptr;
  const T *__restrict__ cell_gain = s.cell_gain, *__restrict__ cell_bias = s.cell_bias;
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T o = act[3 * H + k];
    const T tc = tanh_activation(layer_norm_affine(cells[H + k], cell_gain[k], cell_bias[k]));
    const T dy = lstm_normalized_cell_gradient(o, tc, grad_m[k]);
    tanh_cell[k] = tc;
    work[k] = dy;
    if (m_saved) m_saved[k] = o * tc;
  }
  T* const sums = s.gradient_sums ? s.gradient_sums + j * kLstmSumsWidth * H : nullptr;
  if (sums) {  // dL/dy of the cell's affine: its gain's and bias's terms
    add_products_to_sums(sums + kSumCellGain * H, work, cells + H, H);
    add_to_sums(sums + kSumCellBias * H, work, H);
  }
  layer_norm_row_backward(work, cell_gain, cells + H, stats[2], work, H);  // dL/dc~ through the norm
  T* __restrict__ da = s.grad_preactivation + j * G;
  T* __restrict__ carry_c = s.grad_cell_carry + j * H;
  const T cell_clip = s.cell_clip, state_clip = s.state_clip, gate_clip = s.gate_clip;
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const LayerNormCellGradient<T> g =
        lstm_layer_norm_cell_gradient<kZoneoutC>(carry_c[k], work[k], kZoneoutC ? keep_c[k] : T(0), state_clip);
    const T grad_cell = clip_gradient(g.fresh, cells[k], cell_clip);
    const LstmBackwardElement<T> e = lstm_gate_gradients(act[k], act[H + k], act[2 * H + k], act[3 * H + k],
                                                         tanh_cell[k], c_prev[k], grad_m[k], grad_cell, gate_clip);
    da[k] = e.d_i;
    da[H + k] = e.d_f;
    da[2 * H + k] = e.d_g;
    da[3 * H + k] = e.d_o;
    carry_c[k] = e.grad_cell_prev + g.direct;
  }
  if (sums) {
    add_to_sums(sums + kSumBias * H, da, G);
    add_products_to_sums(sums + kSumGainIh * H, da, xn, G);
    add_products_to_sums(sums + kSumGainHh * H, da, hn, G);
    flush_partial_sums(sums, s.gradient_totals + j * kLstmSumsWidth * H, kLstmSumsWidth * H, s.t, first);
  }
  if (s.grad_input_product) layer_norm_row_backward(da, s.gain_ih, xn, stats[0], s.grad_input_product + compact * G, G);
  T* grad_recurrent = s.grad_recurrent_product + (s.recurrent_product_all ? compact : j) * G;
  layer_norm_row_backward(da, s.gain_hh, hn, stats[1], grad_recurrent, G);
  if (s.hidden_prev_all) {
    const T* h_prev = previous_hidden(sequence, s.t, j, s.reverse, s.output, s.h0, s.zeros, P);
    write_hidden_operand(s.recurrent_mask ? s.recurrent_mask + j * P : nullptr, h_prev, s.hidden_prev_all + compact * P,
                         P);
  }
}

template <typename T, bool kProject, bool kZoneoutH>
RNNTL_ROW_INLINE void ln_lstm_backward_rows_for(const LnLstmBackwardStep<T>& s, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j)
    s.zoneout_c ? ln_lstm_backward_row<T, kProject, kZoneoutH, true>(s, j)
                : ln_lstm_backward_row<T, kProject, kZoneoutH, false>(s, j);
}

// project: the pass after the projection's product; else the whole step's pass.
template <typename T>
RNNTL_ROW_INLINE void ln_lstm_backward_rows(const LnLstmBackwardStep<T>& s, int64_t begin, int64_t end,
                                            bool project) {
  if (project) return ln_lstm_backward_rows_for<T, true, false>(s, begin, end);
  s.zoneout_h ? ln_lstm_backward_rows_for<T, false, true>(s, begin, end)
              : ln_lstm_backward_rows_for<T, false, false>(s, begin, end);
}

RNNTL_VECTOR_CLONES void ln_lstm_backward_rows_entry(const LnLstmBackwardStep<float>& s, int64_t begin, int64_t end,
                                                     bool project) {
  ln_lstm_backward_rows(s, begin, end, project);
}
void ln_lstm_backward_rows_entry(const LnLstmBackwardStep<double>& s, int64_t begin, int64_t end, bool project) {
  ln_lstm_backward_rows(s, begin, end, project);
}

template <typename T>
void ln_lstm_projection_rows_entry(const LnLstmBackwardStep<T>& s, int64_t begin, int64_t end) {
  s.zoneout_h ? ln_lstm_projection_rows<T, true>(s, begin, end) : ln_lstm_projection_rows<T, false>(s, begin, end);
}

class LnLstmForward {
 public:
  LnLstmForward(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
                const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
                const c10::optional<at::Tensor>& c0, const at::Tensor& lengths64,
                const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout_h,
                const c10::optional<at::Tensor>& zoneout_c, const at::Tensor& layer_norm_ih,
                const at::Tensor& layer_norm_hh, const c10::optional<at::Tensor>& cell_weight,
                const c10::optional<at::Tensor>& cell_bias, const LstmSizes& sizes, bool reverse, double cell_clip,
                double proj_clip, bool save)
      : steps_(sizes.steps), batch_(sizes.batch), hidden_(sizes.hidden), out_size_(sizes.out_size),
        project_(weight_hr.has_value()), reverse_(reverse), save_(save), cell_clip_(cell_clip), proj_clip_(proj_clip),
        sequence_(lengths64, steps_, batch_),
        input_projection_(sequence_.compact_from_padded(input), weight_ih, c10::nullopt),
        recurrent_weight_(weight_hh), block_rows_(projection_block_rows(4 * hidden_, sizes.input_size, batch_)),
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel() + (project_ ? weight_hr->numel() : 0),
                        FewRowsLoop::products)),
        recurrent_mask_(slot_major_or_undefined(sequence_, recurrent_mask)), zoneout_h_(contiguous_or_none(zoneout_h)),
        zoneout_c_(contiguous_or_none(zoneout_c)) {
    const auto options = input.options();
    const int64_t B = batch_, H = hidden_, P = out_size_, G = 4 * H;
    // (the products loop's team packs its own slices)
    if (loop_.kind != StepLoop::products) recurrent_.emplace(recurrent_weight_, B, sequence_.host.steps);
    if (project_) projection_.emplace(*weight_hr, B, sequence_.host.steps);
    // One block of steps' input products, reused (every row's for the row split).
    input_block_ = reusable_empty({ProjectionBlocks::capacity(sequence_, block_rows_, loop_), G}, options);
    gain_ih_ = layer_norm_ih.contiguous();
    gain_hh_ = layer_norm_hh.contiguous();
    bias_ = summed_bias(bias_ih, bias_hh, G, options);
    cell_gain_ = given_or_filled(cell_weight, H, 1.0, options);
    cell_bias_ = given_or_filled(cell_bias, H, 0.0, options);
    cell_state_ = c0.has_value() ? sequence_.slot_major(*c0) : reusable_zeros({B, H}, options);
    hidden_state_ = h0.has_value() ? sequence_.slot_major(*h0) : reusable_zeros({B, P}, options);
    if (recurrent_mask_.defined()) masked_state_ = hidden_state_ * recurrent_mask_;
    recurrent_scratch_ = reusable_empty({B, G}, options);
    hidden_unprojected_ = reusable_empty({B, H}, options);
    projected_scratch_ = reusable_empty({B, P}, options);
    output_ = reusable_empty({steps_, B, P}, options);
    if (save_) {
      gates_ = sequence_.saved_buffer(G, options);
      normalized_ = sequence_.saved_buffer(2 * G, options);
      cells_ = sequence_.saved_buffer(3 * H, options);
      inverse_std_ = sequence_.saved_buffer(3, options);
    } else {  // one step's rows, by slot
      gates_ = reusable_empty({B, G}, options);
      normalized_ = reusable_empty({B, 2 * G}, options);
      cells_ = reusable_empty({B, 3 * H}, options);
      inverse_std_ = reusable_empty({B, 3}, options);
    }
    hidden_pre_clip_ = save_ && proj_clip > 0 ? sequence_.saved_buffer(P, options) : at::empty({0}, options);
  }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::layer_norm_lstm_forward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_, /*projected=*/false, StepProductRunner(*recurrent_));
  }

  // The row split (sequence_cpu.h, step_loop): a row's norms need only that row, so each
  // worker runs every step for its own slots after the input products of every row.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::layer_norm_lstm_forward_steps_rows", std::vector<c10::IValue>());
    input_projection_.into(0, sequence_.valid_rows, input_block_.data_ptr<T>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) {
                    run_slots<T>(slot_begin, slot_end, true, StepProductRunner(*recurrent_));
                  });
  }

  // The products loop (sequence_cpu.h, step_loop): every row's input product first, then
  // every step on one worker while the team splits each step's recurrent product.
  void run_steps_products(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::layer_norm_lstm_forward_steps_products", std::vector<c10::IValue>());
    input_projection_.into(0, sequence_.valid_rows, input_block_.data_ptr<float>());
    run_product_team(workers, recurrent_weight_,
                     [&](const StepProductRunner& products) { run_slots<float>(0, batch_, true, products); });
  }

  // Every step for the slots [slot_begin, slot_end), as LstmForward::run_slots in lstm_cpu.cpp.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end, bool projected, const StepProductRunner& products) {
    LnLstmForwardStep<T> s;
    s.batch = batch_;
    s.hidden = hidden_;
    s.out_size = out_size_;
    s.order = sequence_.order;
    s.input_product = input_block_.data_ptr<T>();
    s.input_first_row = 0;
    s.gain_ih = gain_ih_.data_ptr<T>();
    s.gain_hh = gain_hh_.data_ptr<T>();
    s.bias = bias_.data_ptr<T>();
    s.cell_gain = cell_gain_.data_ptr<T>();
    s.cell_bias = cell_bias_.data_ptr<T>();
    s.cell_state = cell_state_.data_ptr<T>();
    s.hidden_state = hidden_state_.data_ptr<T>();
    s.recurrent_mask = data_or_null<T>(recurrent_mask_);
    s.masked_state = data_or_null<T>(masked_state_);
    s.zoneout_h = data_or_null<T>(zoneout_h_);
    s.zoneout_c = data_or_null<T>(zoneout_c_);
    s.output = output_.data_ptr<T>();
    s.hidden_unprojected = hidden_unprojected_.data_ptr<T>();
    s.saving = save_;
    s.gates = gates_.data_ptr<T>();
    s.normalized = normalized_.data_ptr<T>();
    s.cells = cells_.data_ptr<T>();
    s.inverse_std = inverse_std_.data_ptr<T>();
    s.hidden_pre_clip = data_or_null<T>(hidden_pre_clip_);
    s.cell_clip = static_cast<T>(cell_clip_);
    s.proj_clip = static_cast<T>(proj_clip_);
    s.recurrent_first_slot = slot_begin;
    const int64_t H = hidden_, P = out_size_, G = 4 * hidden_;
    // The recurrent product reads the own slots of m * h (or h).
    const T* operand = (s.masked_state ? s.masked_state : s.hidden_state) + slot_begin * P;
    ProjectionBlocks blocks(sequence_, reverse_, block_rows_);
    at::Tensor product_holder, projection_holder;
    for (int64_t step = 0; step < steps_; ++step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = std::min(sequence_.active[t], slot_end) - slot_begin;
      s.t = t;
      s.first_row = sequence_.first_row[t];
      if (!projected && blocks.starts_at(step)) {
        input_projection_.into(blocks.first(), blocks.rows(), input_block_.data_ptr<T>());
        s.input_first_row = blocks.first();
      }
      if (n > 0) {
        s.recurrent_product =
            products.multiply(operand, n, recurrent_scratch_.data_ptr<T>() + slot_begin * G, product_holder);
        parallel_rows(n, 2 * G,
                      [&](int64_t j) { ln_lstm_forward_rows_entry(s, slot_begin + j, slot_begin + j + 1, project_); });
        if (project_) {
          const T* projected = projection_->multiply(s.hidden_unprojected + slot_begin * H, n,
                                                     projected_scratch_.data_ptr<T>() + slot_begin * P,
                                                     projection_holder);  // [n, P]
          parallel_rows(n, P, [&](int64_t j) { ln_lstm_hidden_epilogue(s, slot_begin + j, projected + j * P); });
        }
      }
      sequence_.zero_past_length(s.output, P, t, 0, P, slot_begin, slot_end);
    }
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  results() const {
    const auto reserve = [&](const at::Tensor& t) { return save_ ? t : at::empty({0}, output_.options()); };
    return {output_,          sequence_.batch_major(hidden_state_), sequence_.batch_major(cell_state_),
            reserve(gates_),  reserve(normalized_),                 reserve(cells_),
            reserve(inverse_std_), hidden_pre_clip_};
  }

 private:
  int64_t steps_, batch_, hidden_, out_size_;
  bool project_, reverse_, save_;
  double cell_clip_, proj_clip_;
  SequenceOrder sequence_;
  RowProjection input_projection_;  // [N, 4H] W_ih x (no bias), in blocks
  at::Tensor recurrent_weight_;          // [4H, P] the step product's weight: x @ W_hh^T
  std::optional<StepWeight> recurrent_;  // none in the products loop (the team packs slices)
  c10::optional<StepWeight> projection_;
  int64_t block_rows_;
  StepLoop loop_;
  at::Tensor recurrent_mask_;  // [B, P] slot-major, or undefined
  c10::optional<at::Tensor> zoneout_h_, zoneout_c_;
  at::Tensor input_block_;     // [block capacity, 4H]
  at::Tensor gain_ih_, gain_hh_, bias_, cell_gain_, cell_bias_;
  at::Tensor cell_state_, hidden_state_, masked_state_;  // slot-major
  at::Tensor recurrent_scratch_, hidden_unprojected_, projected_scratch_;
  at::Tensor output_, gates_, normalized_, cells_, inverse_std_, hidden_pre_clip_;
};

// Gradient outputs of layer_norm_lstm_backward, in order.
enum LstmGrad { kInput, kWeightIh, kWeightHh, kBias, kWeightHr, kH0, kC0, kGainIh, kGainHh, kCellGain, kCellBias };

class LnLstmBackward {
 public:
  LnLstmBackward(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
                 const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
                 const at::Tensor& weight_hh, const c10::optional<at::Tensor>& weight_hr,
                 const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0,
                 const at::Tensor& lengths64, const c10::optional<at::Tensor>& recurrent_mask,
                 const c10::optional<at::Tensor>& zoneout_h, const c10::optional<at::Tensor>& zoneout_c,
                 const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
                 const c10::optional<at::Tensor>& cell_weight, const c10::optional<at::Tensor>& cell_bias,
                 const at::Tensor& output, const at::Tensor& gates, const at::Tensor& normalized,
                 const at::Tensor& cells, const at::Tensor& inverse_std, const at::Tensor& hidden_pre_clip,
                 const LstmSizes& sizes, bool reverse, double cell_clip, double proj_clip, double state_clip,
                 double gate_clip, std::array<bool, 11> output_mask)
      : steps_(sizes.steps), batch_(sizes.batch), input_size_(sizes.input_size), hidden_(sizes.hidden),
        out_size_(sizes.out_size), project_(weight_hr.has_value()), reverse_(reverse), cell_clip_(cell_clip),
        proj_clip_(proj_clip), state_clip_(state_clip), gate_clip_(gate_clip), mask_(output_mask),
        options_(input.options()), sequence_(lengths64, steps_, batch_),
        column_sums_(batch_, kLstmSumsWidth * hidden_,
                     output_mask[kBias] || output_mask[kGainIh] || output_mask[kGainHh] || output_mask[kCellGain] ||
                         output_mask[kCellBias],
                     options_),
        recurrent_weight_(weight_hh.t()),  // dL/d(m * h_{t-1}) = dL/d(W_hh (m * h)) @ W_hh
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel() + (project_ ? weight_hr->numel() : 0),
                        FewRowsLoop::products)),
        weight_ih_(weight_ih), recurrent_mask_(slot_major_or_undefined(sequence_, recurrent_mask)),
        zoneout_h_(contiguous_or_none(zoneout_h)), zoneout_c_(contiguous_or_none(zoneout_c)) {
    const int64_t B = batch_, H = hidden_, P = out_size_, N = sequence_.valid_rows, G = 4 * H;
    // (the products loop's team packs its own slices)
    if (loop_.kind != StepLoop::products) recurrent_.emplace(recurrent_weight_, B, sequence_.host.steps);
    if (project_) projection_back_.emplace(weight_hr->t(), B, sequence_.host.steps);  // dL/dm = dL/dh~ @ W_hr
    grad_out_ = defined_or_zeros(grad_output, {steps_, B, P}, options_);
    grad_hidden_carry_ = sequence_.slot_major(defined_or_zeros(grad_h_n, {B, P}, options_));
    grad_cell_carry_ = sequence_.slot_major(defined_or_zeros(grad_c_n, {B, H}, options_));
    grad_preactivation_ = reusable_empty({B, G}, options_);
    if (mask_[kInput] || mask_[kWeightIh]) grad_input_product_ = reusable_empty({N, G}, options_);
    grad_recurrent_product_ = reusable_empty({mask_[kWeightHh] ? N : B, G}, options_);
    if (mask_[kWeightHh]) hidden_prev_all_ = reusable_empty({N, P}, options_);
    if (project_) {
      grad_fresh_hidden_ = reusable_empty({want_weight_hr() ? N : B, P}, options_);
      grad_unprojected_ = reusable_empty({B, H}, options_);
      if (want_weight_hr()) unprojected_all_ = reusable_empty({N, H}, options_);
    }
    cell_scratch_ = reusable_empty({B, 3 * H}, options_);
    product_scratch_ = reusable_empty({B, P}, options_);
    if (mask_[kWeightIh]) input_compact_ = sequence_.compact_from_padded(input);
    zeros_ = reusable_zeros({std::max(H, P)}, options_);
    h0_ = h0.has_value() ? h0->contiguous() : at::Tensor();
    c0_ = c0.has_value() ? c0->contiguous() : at::Tensor();
    gain_ih_ = layer_norm_ih.contiguous();
    gain_hh_ = layer_norm_hh.contiguous();
    cell_gain_ = given_or_filled(cell_weight, H, 1.0, options_);
    cell_bias_ = given_or_filled(cell_bias, H, 0.0, options_);
    output_ = output.contiguous();
    gates_ = gates.contiguous();
    normalized_ = normalized.contiguous();
    cells_ = cells.contiguous();
    inverse_std_ = inverse_std.contiguous();
    hidden_pre_clip_ = proj_clip > 0 ? hidden_pre_clip.contiguous() : at::Tensor();
  }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::layer_norm_lstm_backward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_, StepProductRunner(*recurrent_));
  }

  // The row split (sequence_cpu.h, step_loop): each worker runs every step for its own slots.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::layer_norm_lstm_backward_steps_rows", std::vector<c10::IValue>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) {
                    run_slots<T>(slot_begin, slot_end, StepProductRunner(*recurrent_));
                  });
  }

  // The products loop (sequence_cpu.h, step_loop): every step on one worker while the team
  // splits each step's recurrent product.
  void run_steps_products(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::layer_norm_lstm_backward_steps_products", std::vector<c10::IValue>());
    run_product_team(workers, recurrent_weight_,
                     [&](const StepProductRunner& products) { run_slots<float>(0, batch_, products); });
  }

  // Every step, last first, for the slots [slot_begin, slot_end), as LstmBackward::run_slots.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end, const StepProductRunner& products) {
    const int64_t H = hidden_, P = out_size_, G = 4 * H;
    LnLstmBackwardStep<T> s;
    s.batch = batch_;
    s.hidden = H;
    s.out_size = P;
    s.reverse = reverse_;
    s.sequence = &sequence_;
    s.gates = gates_.data_ptr<T>();
    s.normalized = normalized_.data_ptr<T>();
    s.cells = cells_.data_ptr<T>();
    s.inverse_std = inverse_std_.data_ptr<T>();
    s.hidden_pre_clip = data_or_null<T>(hidden_pre_clip_);
    s.output = output_.data_ptr<T>();
    s.grad_output = grad_out_.data_ptr<T>();
    s.h0 = data_or_null<T>(h0_);
    s.c0 = data_or_null<T>(c0_);
    s.zeros = zeros_.data_ptr<T>();
    s.gain_ih = gain_ih_.data_ptr<T>();
    s.gain_hh = gain_hh_.data_ptr<T>();
    s.cell_gain = cell_gain_.data_ptr<T>();
    s.cell_bias = cell_bias_.data_ptr<T>();
    s.recurrent_mask = data_or_null<T>(recurrent_mask_);
    s.zoneout_h = data_or_null<T>(zoneout_h_);
    s.zoneout_c = data_or_null<T>(zoneout_c_);
    s.grad_hidden_carry = grad_hidden_carry_.data_ptr<T>();
    s.grad_cell_carry = grad_cell_carry_.data_ptr<T>();
    s.grad_fresh_hidden = data_or_null<T>(grad_fresh_hidden_);
    s.fresh_hidden_all = want_weight_hr();
    s.unprojected_all = data_or_null<T>(unprojected_all_);
    s.cell_scratch = cell_scratch_.data_ptr<T>();
    s.grad_preactivation = grad_preactivation_.data_ptr<T>();
    s.gradient_sums = column_sums_.partial_slot<T>(0);
    s.gradient_totals = column_sums_.slot(0);
    s.grad_input_product = data_or_null<T>(grad_input_product_);
    s.grad_recurrent_product = grad_recurrent_product_.data_ptr<T>();
    s.recurrent_product_all = mask_[kWeightHh];
    s.hidden_prev_all = data_or_null<T>(hidden_prev_all_);
    s.cell_clip = static_cast<T>(cell_clip_);
    s.proj_clip = static_cast<T>(proj_clip_);
    s.state_clip = static_cast<T>(state_clip_);
    s.gate_clip = static_cast<T>(gate_clip_);
    s.unprojected_first_slot = slot_begin;
    T* const own_carry_h = s.grad_hidden_carry + slot_begin * P;
    const T* const own_mask = s.recurrent_mask ? s.recurrent_mask + slot_begin * P : nullptr;
    T* const scratch = product_scratch_.data_ptr<T>() + slot_begin * P;
    const bool zoneout_h = s.zoneout_h != nullptr;
    at::Tensor projection_holder;
    for (int64_t step = steps_ - 1; step >= 0; --step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = std::min(sequence_.active[t], slot_end) - slot_begin;
      s.t = t;
      if (n > 0) {
        if (project_) {
          parallel_rows(n, P, [&](int64_t j) { ln_lstm_projection_rows_entry(s, slot_begin + j, slot_begin + j + 1); });
          const T* fresh = s.grad_fresh_hidden + ((s.fresh_hidden_all ? sequence_.first_row[t] : 0) + slot_begin) * P;
          s.grad_unprojected = projection_back_->multiply(fresh, n, grad_unprojected_.data_ptr<T>() + slot_begin * H,
                                                          projection_holder);  // [n, H]
        }
        parallel_rows(n, 2 * G,
                      [&](int64_t j) { ln_lstm_backward_rows_entry(s, slot_begin + j, slot_begin + j + 1, project_); });
        const T* grad_recurrent =
            s.grad_recurrent_product + ((s.recurrent_product_all ? sequence_.first_row[t] : 0) + slot_begin) * G;
        if (own_mask) {
          // dL/dh_{t-1} += m * (dL/d(W_hh (m * h)) @ W_hh): the mask is per row, so not in the product.
          products.multiply_into(grad_recurrent, n, scratch);
          add_masked_rows(own_mask, scratch, own_carry_h, n, P, 0, P);
        } else {
          // The carry holds zoneout's direct path, or nothing without zoneout.
          products.multiply_into(grad_recurrent, n, own_carry_h, /*accumulate=*/zoneout_h);
        }
      }
      const int64_t past = std::max(sequence_.active[t], slot_begin);
      clip_rows_past_length(s.grad_hidden_carry, past, slot_end, P, s.state_clip);
      clip_rows_past_length(s.grad_cell_carry, past, slot_end, H, s.state_clip);
    }
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor, at::Tensor, at::Tensor>
  gradients() {
    const int64_t H = hidden_, G = 4 * H;
    const auto none = [&] { return at::empty({0}, options_); };  // outputs must not alias
    return {
        mask_[kInput] ? sequence_.padded_from_compact(linear_rows(grad_input_product_, weight_ih_.t())) : none(),
        mask_[kWeightIh] ? transposed_product(grad_input_product_, input_compact_) : none(),
        mask_[kWeightHh] ? transposed_product(grad_recurrent_product_, hidden_prev_all_) : none(),
        mask_[kBias] ? column_sums_.total(kSumBias * H, G, options_) : none(),
        want_weight_hr() ? transposed_product(grad_fresh_hidden_, unprojected_all_) : none(),
        mask_[kH0] ? sequence_.batch_major(grad_hidden_carry_) : none(),
        mask_[kC0] ? sequence_.batch_major(grad_cell_carry_) : none(),
        mask_[kGainIh] ? column_sums_.total(kSumGainIh * H, G, options_) : none(),
        mask_[kGainHh] ? column_sums_.total(kSumGainHh * H, G, options_) : none(),
        mask_[kCellGain] ? column_sums_.total(kSumCellGain * H, H, options_) : none(),
        mask_[kCellBias] ? column_sums_.total(kSumCellBias * H, H, options_) : none()};
  }

 private:
  bool want_weight_hr() const { return project_ && mask_[kWeightHr]; }
  int64_t steps_, batch_, input_size_, hidden_, out_size_;
  bool project_, reverse_;
  double cell_clip_, proj_clip_, state_clip_, gate_clip_;
  std::array<bool, 11> mask_;
  at::TensorOptions options_;
  SequenceOrder sequence_;
  ColumnSums column_sums_;             // [B, 14H] the bias and gain gradients' sums (LstmSum)
  at::Tensor recurrent_weight_;          // [P, 4H] the step product's weight: x @ W_hh
  std::optional<StepWeight> recurrent_;  // none in the products loop (the team packs slices)
  StepLoop loop_;
  c10::optional<StepWeight> projection_back_;
  at::Tensor weight_ih_;
  at::Tensor recurrent_mask_;  // [B, P] slot-major, or undefined
  c10::optional<at::Tensor> zoneout_h_, zoneout_c_;
  at::Tensor grad_out_;                // [T, B, P] padded
  at::Tensor grad_hidden_carry_;       // [B, P] slot-major
  at::Tensor grad_cell_carry_;         // [B, H] slot-major
  at::Tensor grad_preactivation_;      // [B, 4H] slot-major dL/da of a step
  at::Tensor grad_input_product_;      // [N, 4H] dL/d(W_ih x), for dL/dx and dW_ih
  at::Tensor grad_recurrent_product_;  // [N, 4H] (for dW_hh) or [B, 4H]: dL/d(W_hh (m * h))
  at::Tensor hidden_prev_all_;         // [N, P] m * h_{t-1}, for dW_hh
  at::Tensor grad_fresh_hidden_;       // [N, P] (for dW_hr) or [B, P]: dL/dh~, with projection
  at::Tensor grad_unprojected_;        // [B, H] dL/dm of one step, with projection
  at::Tensor unprojected_all_;         // [N, H] m, for dW_hr
  at::Tensor cell_scratch_;            // [B, 3H]
  at::Tensor product_scratch_;         // [B, P]
  at::Tensor input_compact_;           // [N, I], for dW_ih
  at::Tensor zeros_, h0_, c0_, gain_ih_, gain_hh_, cell_gain_, cell_bias_;
  at::Tensor output_, gates_, normalized_, cells_, inverse_std_, hidden_pre_clip_;
};

// ====================================================================================
// GRU
// ====================================================================================

template <typename T>
struct LnGruForwardStep {
  int64_t batch, hidden, t;
  int64_t first_row;
  const int64_t* order;
  const T* input_product;      // [rows, 3H] W_ih x of compact rows input_first_row...
  int64_t input_first_row;
  const T* recurrent_product;  // [n, 3H] W_hh (m * h_{t-1}) of slots recurrent_first_slot, ...
  int64_t recurrent_first_slot;
  const T *gain_ih, *gain_hh, *bias_ih, *bias_hh;  // [3H]
  T* hidden_state;             // [B, H] slot-major h_{t-1} in, h_t out
  const T* recurrent_mask;     // [B, H] slot-major, or nullptr
  T* masked_state;             // [B, H] slot-major m * h_t, with a mask
  const T* zoneout;            // [T, B, H] padded keep weights, or nullptr
  T* output;                   // [T, B, H] padded
  bool saving;                 // row buffers: compact rows when saving, else slots
  T* gates;                    // [rows, 3H] activations r, z, n
  T* normalized;               // [rows, 6H] LN(W_ih x) | LN(W_hh (m * h))
  T* inverse_std;              // [rows, 2]
};

template <typename T, bool kZoneout>
RNNTL_ROW_INLINE void ln_gru_forward_row(const LnGruForwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 3 * H;
  const int64_t row = s.t * s.batch + s.order[j], compact = s.first_row + j;
  const int64_t r = s.saving ? compact : j;
  const T* __restrict__ xp = s.input_product + (compact - s.input_first_row) * G;
  const T* __restrict__ hp = s.recurrent_product + (j - s.recurrent_first_slot) * G;
  T* __restrict__ xn = s.normalized + r * 2 * G;
  T* __restrict__ hn = xn + G;
  T* __restrict__ stats = s.inverse_std + r * 2;
  T* __restrict__ act = s.gates + r * G;
  T* __restrict__ h = s.hidden_state + j * H;
  T* __restrict__ out = s.output + row * H;
  const T* __restrict__ keep = kZoneout ? s.zoneout + row * H : nullptr;
  const T* __restrict__ mask = s.recurrent_mask ? s.recurrent_mask + j * H : nullptr;
  T* __restrict__ masked = mask ? s.masked_state + j * H : nullptr;
  const T *__restrict__ gi = s.gain_ih, *__restrict__ gh = s.gain_hh, *__restrict__ bi = s.bias_ih,
                        *__restrict__ bh = s.bias_hh;
  stats[0] = layer_norm_row_forward(xp, xn, G);
  stats[1] = layer_norm_row_forward(hp, hn, G);
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const GruForwardElement<T> e = gru_element_forward(
        layer_norm_affine(xn[k], gi[k], bi[k]), layer_norm_affine(xn[H + k], gi[H + k], bi[H + k]),
        layer_norm_affine(xn[2 * H + k], gi[2 * H + k], bi[2 * H + k]), layer_norm_affine(hn[k], gh[k], bh[k]),
        layer_norm_affine(hn[H + k], gh[H + k], bh[H + k]),
        layer_norm_affine(hn[2 * H + k], gh[2 * H + k], bh[2 * H + k]), h[k]);
    act[k] = e.r;
    act[H + k] = e.z;
    act[2 * H + k] = e.n;
    const T value = kZoneout ? zoneout_blend(keep[k], h[k], e.hidden) : e.hidden;
    h[k] = value;
    out[k] = value;
    if (masked) masked[k] = mask[k] * value;
  }
}

template <typename T>
RNNTL_ROW_INLINE void ln_gru_forward_rows(const LnGruForwardStep<T>& s, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j)
    s.zoneout ? ln_gru_forward_row<T, true>(s, j) : ln_gru_forward_row<T, false>(s, j);
}

RNNTL_VECTOR_CLONES void ln_gru_forward_rows_entry(const LnGruForwardStep<float>& s, int64_t begin, int64_t end) {
  ln_gru_forward_rows(s, begin, end);
}
void ln_gru_forward_rows_entry(const LnGruForwardStep<double>& s, int64_t begin, int64_t end) {
  ln_gru_forward_rows(s, begin, end);
}

// Where each column sum of the layer-normalised GRU's backward starts in a slot's ColumnSums,
// in units of G = 3H: dL/dgx (b_ih's gradient), dL/dgh (b_hh's), dL/dgx * LN(W_ih x) (g_ih's),
// dL/dgh * LN(W_hh h) (g_hh's).
enum GruSum : int64_t { kSumBiasIh = 0, kSumBiasHh = 1, kSumGruGainIh = 2, kSumGruGainHh = 3, kGruSumsWidth = 4 };

template <typename T>
struct LnGruBackwardStep {
  int64_t batch, hidden, t;
  bool reverse;
  const SequenceOrder* sequence;
  const T *gates, *normalized, *inverse_std;  // the saved reserve, compact rows
  const T* output;              // [T, B, H] padded (the carried h_t)
  const T* grad_output;         // [T, B, H] padded
  const T* h0;                  // [B, H] by batch row, or nullptr
  const T* zeros;               // [H]
  const T *gain_ih, *gain_hh, *bias_hh;  // [3H]
  const T* recurrent_mask;      // [B, H] slot-major, or nullptr
  const T* zoneout;             // [T, B, H] padded, or nullptr
  T* grad_hidden_carry;         // [B, H] slot-major dL/dh_t in; out: the paths to h_{t-1} that skip W_hh
  T* grad_input_gates;          // [B, 3H] slot-major dL/dgx of the step
  T* grad_hidden_gates;         // [B, 3H] slot-major dL/dgh of the step
  T* gradient_sums;             // ColumnSums' partial sums [B, 12H] (GruSum), or nullptr
  double* gradient_totals;      // ColumnSums' float64 sums [B, 12H]
  T* grad_input_product;        // [N, 3H] compact dL/d(W_ih x), or nullptr
  T* grad_recurrent_product;    // dL/d(W_hh (m * h)) of slot j at + row * 3H
  bool recurrent_product_all;   // compact rows (for dW_hh), else slots
  T* hidden_prev_all;           // [N, H] compact m * h_{t-1}, for dW_hh, or nullptr
  T state_clip, gate_clip;
};

template <typename T, bool kZoneout>
RNNTL_ROW_INLINE void ln_gru_backward_row(const LnGruBackwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 3 * H;
  const SequenceOrder& sequence = *s.sequence;
  const int64_t row = s.t * s.batch + sequence.order[j], compact = sequence.first_row[s.t] + j;
  const T* __restrict__ act = s.gates + compact * G;
  const T* __restrict__ xn = s.normalized + compact * 2 * G;
  const T* __restrict__ hn = xn + G;
  const T* __restrict__ stats = s.inverse_std + compact * 2;
  const T* __restrict__ go = s.grad_output + row * H;
  const T* __restrict__ keep = kZoneout ? s.zoneout + row * H : nullptr;
  const T* __restrict__ h_prev = previous_hidden(sequence, s.t, j, s.reverse, s.output, s.h0, s.zeros, H);
  T* __restrict__ carry = s.grad_hidden_carry + j * H;
  T* __restrict__ dgx = s.grad_input_gates + j * G;
  T* __restrict__ dgh = s.grad_hidden_gates + j * G;
  const T *__restrict__ gh = s.gain_hh, *__restrict__ bh = s.bias_hh;
  const T state_clip = s.state_clip, gate_clip = s.gate_clip;
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const HiddenStateGradient<T> g =
        hidden_state_gradient<kZoneout>(carry[k], go[k], kZoneout ? keep[k] : T(0), state_clip);
    const T hidden_n = layer_norm_affine(hn[2 * H + k], gh[2 * H + k], bh[2 * H + k]);
    const GruBackwardElement<T> e =
        gru_element_backward(act[k], act[H + k], act[2 * H + k], hidden_n, h_prev[k], g.fresh, gate_clip);
    dgx[k] = e.d_r;
    dgx[H + k] = e.d_z;
    dgx[2 * H + k] = e.d_n;
    dgh[k] = e.d_r;
    dgh[H + k] = e.d_z;
    dgh[2 * H + k] = e.d_hidden_n;
    carry[k] = e.grad_hidden_prev + g.direct;
  }
  if (s.gradient_sums) {
    T* const sums = s.gradient_sums + j * kGruSumsWidth * G;
    add_to_sums(sums + kSumBiasIh * G, dgx, G);
    add_to_sums(sums + kSumBiasHh * G, dgh, G);
    add_products_to_sums(sums + kSumGruGainIh * G, dgx, xn, G);
    add_products_to_sums(sums + kSumGruGainHh * G, dgh, hn, G);
    flush_partial_sums(sums, s.gradient_totals + j * kGruSumsWidth * G, kGruSumsWidth * G, s.t,
                       sequence.is_first_step(sequence.order[j], s.t, s.reverse));
  }
  if (s.grad_input_product)
    layer_norm_row_backward(dgx, s.gain_ih, xn, stats[0], s.grad_input_product + compact * G, G);
  T* grad_recurrent = s.grad_recurrent_product + (s.recurrent_product_all ? compact : j) * G;
  layer_norm_row_backward(dgh, s.gain_hh, hn, stats[1], grad_recurrent, G);
  if (s.hidden_prev_all)
    write_hidden_operand(s.recurrent_mask ? s.recurrent_mask + j * H : nullptr, h_prev, s.hidden_prev_all + compact * H,
                         H);
}

template <typename T>
RNNTL_ROW_INLINE void ln_gru_backward_rows(const LnGruBackwardStep<T>& s, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j)
    s.zoneout ? ln_gru_backward_row<T, true>(s, j) : ln_gru_backward_row<T, false>(s, j);
}

RNNTL_VECTOR_CLONES void ln_gru_backward_rows_entry(const LnGruBackwardStep<float>& s, int64_t begin, int64_t end) {
  ln_gru_backward_rows(s, begin, end);
}
void ln_gru_backward_rows_entry(const LnGruBackwardStep<double>& s, int64_t begin, int64_t end) {
  ln_gru_backward_rows(s, begin, end);
}

class LnGruForward {
 public:
  LnGruForward(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
               const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
               const c10::optional<at::Tensor>& h0, const at::Tensor& lengths64,
               const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
               const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh, const GruSizes& sizes, bool reverse,
               bool save)
      : steps_(sizes.steps), batch_(sizes.batch), hidden_(sizes.hidden), reverse_(reverse), save_(save),
        sequence_(lengths64, steps_, batch_),
        input_projection_(sequence_.compact_from_padded(input), weight_ih, c10::nullopt),
        recurrent_weight_(weight_hh), block_rows_(projection_block_rows(3 * hidden_, sizes.input_size, batch_)),
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel(), FewRowsLoop::products)),
        recurrent_mask_(slot_major_or_undefined(sequence_, recurrent_mask)), zoneout_(contiguous_or_none(zoneout)) {
    const auto options = input.options();
    const int64_t B = batch_, H = hidden_, G = 3 * H;
    // (the products loop's team packs its own slices)
    if (loop_.kind != StepLoop::products) recurrent_.emplace(recurrent_weight_, B, sequence_.host.steps);
    // One block of steps' input products, reused (every row's for the row split).
    input_block_ = reusable_empty({ProjectionBlocks::capacity(sequence_, block_rows_, loop_), G}, options);
    gain_ih_ = layer_norm_ih.contiguous();
    gain_hh_ = layer_norm_hh.contiguous();
    bias_ih_ = given_or_filled(bias_ih, G, 0.0, options);
    bias_hh_ = given_or_filled(bias_hh, G, 0.0, options);
    hidden_state_ = h0.has_value() ? sequence_.slot_major(*h0) : reusable_zeros({B, H}, options);
    if (recurrent_mask_.defined()) masked_state_ = hidden_state_ * recurrent_mask_;
    recurrent_scratch_ = reusable_empty({B, G}, options);
    output_ = reusable_empty({steps_, B, H}, options);
    if (save_) {
      gates_ = sequence_.saved_buffer(G, options);
      normalized_ = sequence_.saved_buffer(2 * G, options);
      inverse_std_ = sequence_.saved_buffer(2, options);
    } else {
      gates_ = reusable_empty({B, G}, options);
      normalized_ = reusable_empty({B, 2 * G}, options);
      inverse_std_ = reusable_empty({B, 2}, options);
    }
  }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::layer_norm_gru_forward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_, /*projected=*/false, StepProductRunner(*recurrent_));
  }

  // The row split (sequence_cpu.h, step_loop), as LnLstmForward::run_steps_rows.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::layer_norm_gru_forward_steps_rows", std::vector<c10::IValue>());
    input_projection_.into(0, sequence_.valid_rows, input_block_.data_ptr<T>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) {
                    run_slots<T>(slot_begin, slot_end, true, StepProductRunner(*recurrent_));
                  });
  }

  // The products loop (sequence_cpu.h, step_loop): every row's input product first, then
  // every step on one worker while the team splits each step's recurrent product.
  void run_steps_products(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::layer_norm_gru_forward_steps_products", std::vector<c10::IValue>());
    input_projection_.into(0, sequence_.valid_rows, input_block_.data_ptr<float>());
    run_product_team(workers, recurrent_weight_,
                     [&](const StepProductRunner& products) { run_slots<float>(0, batch_, true, products); });
  }

  // Every step for the slots [slot_begin, slot_end), as LstmForward::run_slots in lstm_cpu.cpp.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end, bool projected, const StepProductRunner& products) {
    LnGruForwardStep<T> s;
    s.batch = batch_;
    s.hidden = hidden_;
    s.order = sequence_.order;
    s.input_product = input_block_.data_ptr<T>();
    s.input_first_row = 0;
    s.gain_ih = gain_ih_.data_ptr<T>();
    s.gain_hh = gain_hh_.data_ptr<T>();
    s.bias_ih = bias_ih_.data_ptr<T>();
    s.bias_hh = bias_hh_.data_ptr<T>();
    s.hidden_state = hidden_state_.data_ptr<T>();
    s.recurrent_mask = data_or_null<T>(recurrent_mask_);
    s.masked_state = data_or_null<T>(masked_state_);
    s.zoneout = data_or_null<T>(zoneout_);
    s.output = output_.data_ptr<T>();
    s.saving = save_;
    s.gates = gates_.data_ptr<T>();
    s.normalized = normalized_.data_ptr<T>();
    s.inverse_std = inverse_std_.data_ptr<T>();
    s.recurrent_first_slot = slot_begin;
    const int64_t H = hidden_, G = 3 * hidden_;
    const T* operand = (s.masked_state ? s.masked_state : s.hidden_state) + slot_begin * H;
    ProjectionBlocks blocks(sequence_, reverse_, block_rows_);
    at::Tensor product_holder;
    for (int64_t step = 0; step < steps_; ++step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = std::min(sequence_.active[t], slot_end) - slot_begin;
      s.t = t;
      s.first_row = sequence_.first_row[t];
      if (!projected && blocks.starts_at(step)) {
        input_projection_.into(blocks.first(), blocks.rows(), input_block_.data_ptr<T>());
        s.input_first_row = blocks.first();
      }
      if (n > 0) {
        s.recurrent_product =
            products.multiply(operand, n, recurrent_scratch_.data_ptr<T>() + slot_begin * G, product_holder);
        parallel_rows(n, 2 * G, [&](int64_t j) { ln_gru_forward_rows_entry(s, slot_begin + j, slot_begin + j + 1); });
      }
      sequence_.zero_past_length(s.output, H, t, 0, H, slot_begin, slot_end);
    }
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> results() const {
    const auto reserve = [&](const at::Tensor& t) { return save_ ? t : at::empty({0}, output_.options()); };
    return {output_, sequence_.batch_major(hidden_state_), reserve(gates_), reserve(normalized_),
            reserve(inverse_std_)};
  }

 private:
  int64_t steps_, batch_, hidden_;
  bool reverse_, save_;
  SequenceOrder sequence_;
  RowProjection input_projection_;  // [N, 3H] W_ih x (no bias), in blocks
  at::Tensor recurrent_weight_;          // [3H, H] the step product's weight: x @ W_hh^T
  std::optional<StepWeight> recurrent_;  // none in the products loop (the team packs slices)
  int64_t block_rows_;
  StepLoop loop_;
  at::Tensor recurrent_mask_;
  c10::optional<at::Tensor> zoneout_;
  at::Tensor input_block_, gain_ih_, gain_hh_, bias_ih_, bias_hh_;
  at::Tensor hidden_state_, masked_state_, recurrent_scratch_;
  at::Tensor output_, gates_, normalized_, inverse_std_;
};

// Gradient outputs of layer_norm_gru_backward, in order.
enum GruGrad { kGruInput, kGruWeightIh, kGruWeightHh, kGruBiasIh, kGruBiasHh, kGruH0, kGruGainIh, kGruGainHh };

class LnGruBackward {
 public:
  LnGruBackward(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
                const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                const c10::optional<at::Tensor>& bias_hh, const c10::optional<at::Tensor>& h0,
                const at::Tensor& lengths64, const c10::optional<at::Tensor>& recurrent_mask,
                const c10::optional<at::Tensor>& zoneout, const at::Tensor& layer_norm_ih,
                const at::Tensor& layer_norm_hh, const at::Tensor& output, const at::Tensor& gates,
                const at::Tensor& normalized, const at::Tensor& inverse_std, const GruSizes& sizes, bool reverse,
                double state_clip, double gate_clip, std::array<bool, 8> output_mask)
      : steps_(sizes.steps), batch_(sizes.batch), hidden_(sizes.hidden), reverse_(reverse), state_clip_(state_clip),
        gate_clip_(gate_clip), mask_(output_mask), options_(input.options()), sequence_(lengths64, steps_, batch_),
        column_sums_(batch_, kGruSumsWidth * 3 * hidden_,
                     output_mask[kGruBiasIh] || output_mask[kGruBiasHh] || output_mask[kGruGainIh] ||
                         output_mask[kGruGainHh],
                     options_),
        recurrent_weight_(weight_hh.t()),  // dL/dh_{t-1} = dL/d(W_hh h) @ W_hh
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel(), FewRowsLoop::products)), weight_ih_(weight_ih),
        recurrent_mask_(slot_major_or_undefined(sequence_, recurrent_mask)), zoneout_(contiguous_or_none(zoneout)) {
    const int64_t B = batch_, H = hidden_, N = sequence_.valid_rows, G = 3 * H;
    // (the products loop's team packs its own slices)
    if (loop_.kind != StepLoop::products) recurrent_.emplace(recurrent_weight_, B, sequence_.host.steps);
    grad_out_ = defined_or_zeros(grad_output, {steps_, B, H}, options_);
    grad_hidden_carry_ = sequence_.slot_major(defined_or_zeros(grad_h_n, {B, H}, options_));
    grad_input_gates_ = reusable_empty({B, G}, options_);
    grad_hidden_gates_ = reusable_empty({B, G}, options_);
    if (mask_[kGruInput] || mask_[kGruWeightIh]) grad_input_product_ = reusable_empty({N, G}, options_);
    grad_recurrent_product_ = reusable_empty({mask_[kGruWeightHh] ? N : B, G}, options_);
    if (mask_[kGruWeightHh]) hidden_prev_all_ = reusable_empty({N, H}, options_);
    product_scratch_ = reusable_empty({B, H}, options_);
    if (mask_[kGruWeightIh]) input_compact_ = sequence_.compact_from_padded(input);
    zeros_ = reusable_zeros({H}, options_);
    h0_ = h0.has_value() ? h0->contiguous() : at::Tensor();
    gain_ih_ = layer_norm_ih.contiguous();
    gain_hh_ = layer_norm_hh.contiguous();
    bias_hh_ = given_or_filled(bias_hh, G, 0.0, options_);
    output_ = output.contiguous();
    gates_ = gates.contiguous();
    normalized_ = normalized.contiguous();
    inverse_std_ = inverse_std.contiguous();
  }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::layer_norm_gru_backward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_, StepProductRunner(*recurrent_));
  }

  // The row split (sequence_cpu.h, step_loop): each worker runs every step for its own slots.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::layer_norm_gru_backward_steps_rows", std::vector<c10::IValue>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) {
                    run_slots<T>(slot_begin, slot_end, StepProductRunner(*recurrent_));
                  });
  }

  // The products loop (sequence_cpu.h, step_loop): every step on one worker while the team
  // splits each step's recurrent product.
  void run_steps_products(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::layer_norm_gru_backward_steps_products", std::vector<c10::IValue>());
    run_product_team(workers, recurrent_weight_,
                     [&](const StepProductRunner& products) { run_slots<float>(0, batch_, products); });
  }

  // Every step, last first, for the slots [slot_begin, slot_end), as LstmBackward::run_slots.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end, const StepProductRunner& products) {
    const int64_t H = hidden_, G = 3 * H;
    LnGruBackwardStep<T> s;
    s.batch = batch_;
    s.hidden = H;
    s.reverse = reverse_;
    s.sequence = &sequence_;
    s.gates = gates_.data_ptr<T>();
    s.normalized = normalized_.data_ptr<T>();
    s.inverse_std = inverse_std_.data_ptr<T>();
    s.output = output_.data_ptr<T>();
    s.grad_output = grad_out_.data_ptr<T>();
    s.h0 = data_or_null<T>(h0_);
    s.zeros = zeros_.data_ptr<T>();
    s.gain_ih = gain_ih_.data_ptr<T>();
    s.gain_hh = gain_hh_.data_ptr<T>();
    s.bias_hh = bias_hh_.data_ptr<T>();
    s.recurrent_mask = data_or_null<T>(recurrent_mask_);
    s.zoneout = data_or_null<T>(zoneout_);
    s.grad_hidden_carry = grad_hidden_carry_.data_ptr<T>();
    s.grad_input_gates = grad_input_gates_.data_ptr<T>();
    s.grad_hidden_gates = grad_hidden_gates_.data_ptr<T>();
    s.gradient_sums = column_sums_.partial_slot<T>(0);
    s.gradient_totals = column_sums_.slot(0);
    s.grad_input_product = data_or_null<T>(grad_input_product_);
    s.grad_recurrent_product = grad_recurrent_product_.data_ptr<T>();
    s.recurrent_product_all = mask_[kGruWeightHh];
    s.hidden_prev_all = data_or_null<T>(hidden_prev_all_);
    s.state_clip = static_cast<T>(state_clip_);
    s.gate_clip = static_cast<T>(gate_clip_);
    T* const own_carry = s.grad_hidden_carry + slot_begin * H;
    const T* const own_mask = s.recurrent_mask ? s.recurrent_mask + slot_begin * H : nullptr;
    T* const scratch = product_scratch_.data_ptr<T>() + slot_begin * H;
    for (int64_t step = steps_ - 1; step >= 0; --step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = std::min(sequence_.active[t], slot_end) - slot_begin;
      s.t = t;
      if (n > 0) {
        parallel_rows(n, 2 * G, [&](int64_t j) { ln_gru_backward_rows_entry(s, slot_begin + j, slot_begin + j + 1); });
        const T* grad_recurrent =
            s.grad_recurrent_product + ((s.recurrent_product_all ? sequence_.first_row[t] : 0) + slot_begin) * G;
        // The carry holds the direct path z * dL/dh~ (plus zoneout's); the product's path adds to it.
        if (own_mask) {
          products.multiply_into(grad_recurrent, n, scratch);
          add_masked_rows(own_mask, scratch, own_carry, n, H, 0, H);
        } else {
          products.multiply_into(grad_recurrent, n, own_carry, /*accumulate=*/true);
        }
      }
      clip_rows_past_length(s.grad_hidden_carry, std::max(sequence_.active[t], slot_begin), slot_end, H, s.state_clip);
    }
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  gradients() {
    const int64_t G = 3 * hidden_;
    const auto none = [&] { return at::empty({0}, options_); };
    return {
        mask_[kGruInput] ? sequence_.padded_from_compact(linear_rows(grad_input_product_, weight_ih_.t())) : none(),
        mask_[kGruWeightIh] ? transposed_product(grad_input_product_, input_compact_) : none(),
        mask_[kGruWeightHh] ? transposed_product(grad_recurrent_product_, hidden_prev_all_) : none(),
        mask_[kGruBiasIh] ? column_sums_.total(kSumBiasIh * G, G, options_) : none(),
        mask_[kGruBiasHh] ? column_sums_.total(kSumBiasHh * G, G, options_) : none(),
        mask_[kGruH0] ? sequence_.batch_major(grad_hidden_carry_) : none(),
        mask_[kGruGainIh] ? column_sums_.total(kSumGruGainIh * G, G, options_) : none(),
        mask_[kGruGainHh] ? column_sums_.total(kSumGruGainHh * G, G, options_) : none()};
  }

 private:
  int64_t steps_, batch_, hidden_;
  bool reverse_;
  double state_clip_, gate_clip_;
  std::array<bool, 8> mask_;
  at::TensorOptions options_;
  SequenceOrder sequence_;
  ColumnSums column_sums_;             // [B, 12H] the bias and gain gradients' sums (GruSum)
  at::Tensor recurrent_weight_;          // [H, 3H] the step product's weight: x @ W_hh
  std::optional<StepWeight> recurrent_;  // none in the products loop (the team packs slices)
  StepLoop loop_;
  at::Tensor weight_ih_;
  at::Tensor recurrent_mask_;
  c10::optional<at::Tensor> zoneout_;
  at::Tensor grad_out_;                // [T, B, H] padded
  at::Tensor grad_hidden_carry_;       // [B, H] slot-major
  at::Tensor grad_input_gates_;        // [B, 3H] slot-major dL/dgx of a step
  at::Tensor grad_hidden_gates_;       // [B, 3H] slot-major dL/dgh of a step
  at::Tensor grad_input_product_;      // [N, 3H] dL/d(W_ih x), for dL/dx and dW_ih
  at::Tensor grad_recurrent_product_;  // [N, 3H] (for dW_hh) or [B, 3H]
  at::Tensor hidden_prev_all_;         // [N, H] m * h_{t-1}, for dW_hh
  at::Tensor product_scratch_;         // [B, H]
  at::Tensor input_compact_;           // [N, I], for dW_ih
  at::Tensor zeros_, h0_, gain_ih_, gain_hh_, bias_hh_, output_, gates_, normalized_, inverse_std_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_norm_lstm_forward_cpu(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                            const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
                            const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
                            const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
                            const c10::optional<at::Tensor>& recurrent_mask,
                            const c10::optional<at::Tensor>& zoneout_h, const c10::optional<at::Tensor>& zoneout_c,
                            const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
                            const c10::optional<at::Tensor>& layer_norm_cell_weight,
                            const c10::optional<at::Tensor>& layer_norm_cell_bias, bool reverse, double cell_clip,
                            double proj_clip, double state_clip, double gate_clip, bool save_for_backward) {
  // The kernels' own products are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const LstmSizes sizes = check_layer_norm_lstm_forward_arguments(
      input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, recurrent_mask, zoneout_h, zoneout_c,
      layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, cell_clip, proj_clip, state_clip,
      gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  LnLstmForward forward(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths64, recurrent_mask,
                        zoneout_h, zoneout_c, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight,
                        layer_norm_cell_bias, sizes, reverse, cell_clip, proj_clip, save_for_backward);
  forward.run(input.scalar_type());
  return forward.results();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
layer_norm_lstm_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout_h,
    const c10::optional<at::Tensor>& zoneout_c, const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
    const c10::optional<at::Tensor>& layer_norm_cell_weight, const c10::optional<at::Tensor>& layer_norm_cell_bias,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& normalized, const at::Tensor& cells,
    const at::Tensor& inverse_std, const at::Tensor& hidden_pre_clip, bool reverse, double cell_clip,
    double proj_clip, double state_clip, double gate_clip, std::array<bool, 11> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const LstmSizes sizes = check_layer_norm_lstm_backward_arguments(
      grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, recurrent_mask, zoneout_h,
      zoneout_c, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, output, gates, normalized,
      cells, inverse_std, hidden_pre_clip, cell_clip, proj_clip, state_clip, gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  LnLstmBackward backward(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths64,
                          recurrent_mask, zoneout_h, zoneout_c, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight,
                          layer_norm_cell_bias, output, gates, normalized, cells, inverse_std, hidden_pre_clip, sizes,
                          reverse, cell_clip, proj_clip, state_clip, gate_clip, output_mask);
  backward.run(input.scalar_type());
  return backward.gradients();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh, bool reverse, double state_clip,
    double gate_clip, bool save_for_backward) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const GruSizes sizes = check_layer_norm_gru_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0,
                                                                recurrent_mask, zoneout, layer_norm_ih, layer_norm_hh,
                                                                state_clip, gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  LnGruForward forward(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths64, recurrent_mask, zoneout,
                       layer_norm_ih, layer_norm_hh, sizes, reverse, save_for_backward);
  forward.run(input.scalar_type());
  return forward.results();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_norm_gru_backward_cpu(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
                            const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                            const c10::optional<at::Tensor>& bias_hh, const c10::optional<at::Tensor>& h0,
                            const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& recurrent_mask,
                            const c10::optional<at::Tensor>& zoneout, const at::Tensor& layer_norm_ih,
                            const at::Tensor& layer_norm_hh, const at::Tensor& output, const at::Tensor& gates,
                            const at::Tensor& normalized, const at::Tensor& inverse_std, bool reverse,
                            double state_clip, double gate_clip, std::array<bool, 8> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const GruSizes sizes = check_layer_norm_gru_backward_arguments(
      grad_output, grad_h_n, input, weight_ih, weight_hh, bias_hh, h0, recurrent_mask, zoneout, layer_norm_ih,
      layer_norm_hh, output, gates, normalized, inverse_std, state_clip, gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  LnGruBackward backward(grad_output, grad_h_n, input, weight_ih, weight_hh, bias_hh, h0, lengths64, recurrent_mask,
                         zoneout, layer_norm_ih, layer_norm_hh, output, gates, normalized, inverse_std, sizes, reverse,
                         state_clip, gate_clip, output_mask);
  backward.run(input.scalar_type());
  return backward.gradients();
}

}  // namespace cpu
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CPU, m) {
  m.impl("layer_norm_lstm_forward", &rnntl::cpu::layer_norm_lstm_forward_cpu);
  m.impl("layer_norm_lstm_backward", &rnntl::cpu::layer_norm_lstm_backward_cpu);
  m.impl("layer_norm_gru_forward", &rnntl::cpu::layer_norm_gru_forward_cpu);
  m.impl("layer_norm_gru_backward", &rnntl::cpu::layer_norm_gru_backward_cpu);
}
