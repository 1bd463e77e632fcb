// LSTM over a whole sequence, one layer and one direction, on the CPU.
//
// Forward: the input projection a block of steps at a time (RowProjection); per step one
// GEMM for the recurrent part (over the rows still running) and one fused pointwise pass; with
// proj_size a second small GEMM and an epilogue. Backward mirrors it per step and ends
// with the weight-gradient GEMMs over all steps, skipped for weights that need no grad.
// Three step loops run it (sequence_cpu.h's step_loop; docs/cpu.md, "Multi-core engine"):
// run_steps, a step at a time with each parallel pass forked over torch's threads;
// run_steps_rows, in which each thread runs every step for its own batch rows; and
// run_steps_persistent, one parallel region for the whole sequence in which each thread owns
// a slice of the hidden units and the threads meet once per step.
// Shapes: input [T, B, I]; weight_ih [4H, I]; weight_hh [4H, P]; weight_hr [P, H];
// h0 [B, P]; c0 [B, H]; P = proj_size or H; recurrent_mask [B, P]; zoneout keep weights
// zoneout_h [T, B, P], zoneout_c [T, B, H] (the carried state is d * previous + (1 - d) * new;
// h~ reads the fresh cell). "Slot-major" buffers hold row order[j] in slot j.
// The whole-sequence buffers (input gates, saved gates / cells / pre-clip hidden, gradient
// buffers) hold only the valid rows, in SequenceOrder's compact layout: N = valid_rows <= T*B
// rows, row first_row[t] + j for slot j at step t. With variable lengths the whole-sequence
// products (input projection, dL/dx, weight gradients) then cover only valid rows, and
// padded steps never enter a product. The saved [T, B, ...] tensors keep their shape; their
// rows past N are zeros.
#include "gemm_cpu.h"
#include "kernels_cpu.h"
#include "sequence_cpu.h"

#include <rnntl/cell_math.h>

namespace rnntl {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------------
// Forward pointwise pass of one step.
// ------------------------------------------------------------------------------------
template <typename T>
struct LstmForwardStep {
  int64_t batch, hidden, t;
  int64_t first_row;         // compact row of slot 0 at step t
  const int64_t* order;
  T* input_gates;            // [rows, 4H]  W_ih x + b_ih + b_hh of compact rows input_first_row...; the
                             //             activations i,f,g,o overwrite them in place (the saved
                             //             `gates` [N, 4H] when saving for backward, first row 0)
  int64_t input_first_row;
  const T* recurrent_gates;  // [n, 4H]     W_hh h_{t-1} of slots recurrent_first_slot, ...
  int64_t recurrent_first_slot;
  T* cell_state;             // [B, H]      slot-major
  T* hidden_state;           // [B, H]      slot-major, only without projection
  const T* hidden_previous;  // [B, P]      slot-major h_{t-1} (may be hidden_state), for zoneout_h
  const T* zoneout_h;        // [T, B, P]   padded keep weights of h, or nullptr
  const T* zoneout_c;        // [T, B, H]   padded keep weights of c, or nullptr
  T* carried_cells;          // [N, H]      compact zoned c_t, when saving with zoneout_c
  T* hidden_unprojected;     // [B, H]      slot-major o*tanh(c), only with projection
  T* output;                 // [T, B, H]   padded, only without projection
  T* cells;                  // [N, H]      compact cell before clip, when saving
  T* hidden_pre_clip;        // [N, H]      compact hidden before proj_clip, when saving with proj_clip
  T cell_clip, proj_clip;
  int64_t unit_begin, unit_end;  // the hidden units [unit_begin, unit_end) this pass updates
};

// kZoneoutH: zoneout of h in this pass (without projection; with it the epilogue blends h);
// kZoneoutC: zoneout of c. Compile-time switches, so that each variant's loops vectorize.
template <typename T, bool kSave, bool kProject, bool kZoneoutH, bool kZoneoutC>
RNNTL_ROW_INLINE void lstm_forward_row(const LstmForwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 4 * s.hidden;
  const int64_t row = s.t * s.batch + s.order[j];  // padded row (output)
  const int64_t compact = s.first_row + j;         // compact row (the whole-sequence buffers)
  // The activations overwrite the input gates in place.
  T* __restrict__ act = s.input_gates + (compact - s.input_first_row) * G;
  const T* __restrict__ r = s.recurrent_gates + (j - s.recurrent_first_slot) * G;
  T* __restrict__ c = s.cell_state + j * H;
  T* __restrict__ cells = kSave ? s.cells + compact * H : nullptr;
  T* __restrict__ m = kProject ? s.hidden_unprojected + j * H : nullptr;
  T* __restrict__ h = kProject ? nullptr : s.hidden_state + j * H;
  T* __restrict__ out = kProject ? nullptr : s.output + row * H;
  const bool keep_pre_clip = !kProject && kSave && s.hidden_pre_clip != nullptr;
  T* __restrict__ pre = keep_pre_clip ? s.hidden_pre_clip + compact * H : nullptr;
  const T* __restrict__ keep_c = kZoneoutC ? s.zoneout_c + row * H : nullptr;
  const T* __restrict__ keep_h = kZoneoutH ? s.zoneout_h + row * H : nullptr;
  const T* h_previous = kZoneoutH ? s.hidden_previous + j * H : nullptr;  // may be h: read before written
  T* __restrict__ carried_saved = kZoneoutC && kSave ? s.carried_cells + compact * H : nullptr;
  const T cell_clip = s.cell_clip, proj_clip = s.proj_clip;
  const int64_t k_begin = s.unit_begin, k_end = s.unit_end;
  // Two passes (see lstm_cell_update): measured ~25% faster than one on AVX2.
#pragma omp simd
  for (int64_t k = k_begin; k < k_end; ++k) {
    T i, f, g, o;
    lstm_gate_activations(act[k] + r[k], act[H + k] + r[H + k], act[2 * H + k] + r[2 * H + k],
                          act[3 * H + k] + r[3 * H + k], i, f, g, o);
    act[k] = i;
    act[H + k] = f;
    act[2 * H + k] = g;
    act[3 * H + k] = o;
  }
#pragma omp simd
  for (int64_t k = k_begin; k < k_end; ++k) {
    LstmForwardElement<T> e;
    lstm_cell_update(act[k], act[H + k], act[2 * H + k], act[3 * H + k], c[k], cell_clip, e);
    if (kZoneoutC) {
      c[k] = zoneout_blend(keep_c[k], c[k], e.cell);
      if (kSave) carried_saved[k] = c[k];
    } else {
      c[k] = e.cell;
    }
    if (kSave) cells[k] = e.cell_before_clip;
    if (kProject) {
      m[k] = e.hidden;
    } else {
      T hv = clip_value(e.hidden, proj_clip);
      if (keep_pre_clip) pre[k] = e.hidden;
      if (kZoneoutH) hv = zoneout_blend(keep_h[k], h_previous[k], hv);
      h[k] = hv;
      out[k] = hv;
    }
  }
}

// lstm_forward_row for the zoneout switches of s.
template <typename T, bool kSave, bool kProject>
RNNTL_ROW_INLINE void lstm_forward_row_zoneout(const LstmForwardStep<T>& s, int64_t j) {
  const bool cell = s.zoneout_c != nullptr;
  if (!kProject && s.zoneout_h != nullptr) {
    cell ? lstm_forward_row<T, kSave, kProject, !kProject, true>(s, j)
         : lstm_forward_row<T, kSave, kProject, !kProject, false>(s, j);
  } else {
    cell ? lstm_forward_row<T, kSave, kProject, false, true>(s, j) : lstm_forward_row<T, kSave, kProject, false, false>(s, j);
  }
}

template <typename T>
RNNTL_ROW_INLINE void lstm_forward_rows(const LstmForwardStep<T>& s, int64_t begin, int64_t end, bool save,
                              bool project) {
  for (int64_t j = begin; j < end; ++j) {
    if (save) {
      project ? lstm_forward_row_zoneout<T, true, true>(s, j) : lstm_forward_row_zoneout<T, true, false>(s, j);
    } else {
      project ? lstm_forward_row_zoneout<T, false, true>(s, j) : lstm_forward_row_zoneout<T, false, false>(s, j);
    }
  }
}

RNNTL_VECTOR_CLONES void lstm_forward_rows_entry(const LstmForwardStep<float>& s, int64_t begin,
                                                 int64_t end, bool save, bool project) {
  lstm_forward_rows(s, begin, end, save, project);
}
void lstm_forward_rows_entry(const LstmForwardStep<double>& s, int64_t begin, int64_t end, bool save,
                             bool project) {
  lstm_forward_rows(s, begin, end, save, project);
}

// ------------------------------------------------------------------------------------
// Backward pointwise pass of one step (after dL/dm is known for the active slots).
// ------------------------------------------------------------------------------------
template <typename T>
struct LstmBackwardStep {
  int64_t batch, hidden, out_size, t;
  bool reverse;
  const SequenceOrder* sequence;
  const T* gates;                   // [N, 4H] compact
  const T* cells;                   // [N, H]  compact, before clip
  const T* carried_cells;           // [N, H]  compact zoned c_t, with zoneout_c
  const T* zoneout_c;               // [T, B, H] padded keep weights of c, or nullptr
  const T* output;                  // [T, B, P] padded
  const T* h0;                      // [B, P] or nullptr
  const T* c0;                      // [B, H] or nullptr
  const T* zeros;                   // [max(H, P)] zeros, stands for an omitted h0 / c0
  const T* grad_hidden_unprojected; // [n, H] dL/dm of slots grad_hidden_first_slot, ...
  int64_t grad_hidden_first_slot;
  T* grad_cell_carry;               // [B, H] slot-major dL/dc_t in, dL/dc_{t-1} out
  T* grad_gates;                    // [n, 4H] dL/da of step t's slots: grad_gates_all's rows of step t
  T* hidden_prev_all;               // h_{t-1} of compact row r at r * hidden_prev_stride, or nullptr
  int64_t hidden_prev_stride;
  const T* recurrent_mask;          // [B, P] slot-major: hidden_prev_all gets mask * h_{t-1}; or nullptr
  T* hidden_unprojected_all;        // [N, H] compact m per row (for dW_hr), or nullptr
  T cell_clip, state_clip, gate_clip;
  int64_t unit_begin, unit_end;      // the hidden units [unit_begin, unit_end) this pass covers
  int64_t column_begin, column_end;  // the columns of h_{t-1} [column_begin, column_end) it copies
};

// kClips: any of cell_clip, state_clip, gate_clip set; without, the clamps are compiled out
// (a clamp to a runtime limit costs a row a third more instructions).
template <typename T, bool kKeepUnprojected, bool kZoneoutCell, bool kClips>
RNNTL_ROW_INLINE void lstm_backward_row(const LstmBackwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 4 * s.hidden, P = s.out_size;
  const int64_t b = s.sequence->order[j];
  const bool first = s.sequence->is_first_step(b, s.t, s.reverse);
  const int64_t prev_t = SequenceOrder::previous_step(s.t, s.reverse);
  const int64_t prev_row = prev_t * s.batch + b;  // padded (output)
  // Compact rows; only read when !first, where the previous step is valid for this slot.
  const int64_t compact = s.sequence->first_row[s.t] + j;
  const int64_t prev_compact = first ? 0 : s.sequence->first_row[prev_t] + j;
  // c_{t-1}: c0 (not clipped), the saved zoned state, or the clip of the saved pre-clip cell.
  const T* __restrict__ cell_prev = first ? (s.c0 ? s.c0 + b * H : s.zeros)
                                          : (kZoneoutCell ? s.carried_cells : s.cells) + prev_compact * H;
  const T prev_clip = first || kZoneoutCell || !kClips ? T(0) : s.cell_clip;
  const T* __restrict__ keep_c = kZoneoutCell ? s.zoneout_c + (s.t * s.batch + b) * H : nullptr;
  const T* __restrict__ act = s.gates + compact * G;
  const T* __restrict__ cell = s.cells + compact * H;
  const T* __restrict__ dm = s.grad_hidden_unprojected + (j - s.grad_hidden_first_slot) * H;
  T* __restrict__ dc = s.grad_cell_carry + j * H;
  T* __restrict__ da = s.grad_gates + j * G;
  const T cell_clip = kClips ? s.cell_clip : T(0), state_clip = kClips ? s.state_clip : T(0);
  const T gate_clip = kClips ? s.gate_clip : T(0);
  // m = o * tanh(c) for dW_hr comes from the same tanh.
  T* __restrict__ m = kKeepUnprojected ? s.hidden_unprojected_all + compact * H : nullptr;
#pragma omp simd
  for (int64_t k = s.unit_begin; k < s.unit_end; ++k) {
    const T tanh_cell = tanh_activation(clip_value(cell[k], cell_clip));
    const LstmBackwardElement<T> e =
        kZoneoutCell ? lstm_element_backward_zoneout(act[k], act[H + k], act[2 * H + k], act[3 * H + k], cell[k],
                                                     tanh_cell, cell_prev[k], dm[k], dc[k], keep_c[k], cell_clip,
                                                     state_clip, gate_clip)
                     : lstm_element_backward_given_tanh(act[k], act[H + k], act[2 * H + k], act[3 * H + k], cell[k],
                                                        tanh_cell, clip_value(cell_prev[k], prev_clip), dm[k], dc[k],
                                                        cell_clip, state_clip, gate_clip);
    da[k] = e.d_i;
    da[H + k] = e.d_f;
    da[2 * H + k] = e.d_g;
    da[3 * H + k] = e.d_o;
    dc[k] = e.grad_cell_prev;
    if (kKeepUnprojected) m[k] = act[3 * H + k] * tanh_cell;
  }
  if (s.hidden_prev_all) {
    const T* h_prev = first ? (s.h0 ? s.h0 + b * P : s.zeros) : s.output + prev_row * P;
    T* operand = s.hidden_prev_all + compact * s.hidden_prev_stride;
    if (s.recurrent_mask) {
      masked_rows(s.recurrent_mask + j * P, h_prev, operand, 1, P, s.column_begin, s.column_end);
    } else {
      std::copy(h_prev + s.column_begin, h_prev + s.column_end, operand + s.column_begin);
    }
  }
}

template <typename T>
RNNTL_ROW_INLINE void lstm_backward_rows(const LstmBackwardStep<T>& s, int64_t begin, int64_t end) {
  const bool clips = s.cell_clip > T(0) || s.state_clip > T(0) || s.gate_clip > T(0);
  for (int64_t j = begin; j < end; ++j) {
    // (zoneout of c keeps the clamps: without them its rounding with keep weights of 0
    // would differ from the plain pass's, which tests compare bit for bit)
    if (s.zoneout_c) {
      s.hidden_unprojected_all ? lstm_backward_row<T, true, true, true>(s, j)
                               : lstm_backward_row<T, false, true, true>(s, j);
    } else if (clips) {
      s.hidden_unprojected_all ? lstm_backward_row<T, true, false, true>(s, j)
                               : lstm_backward_row<T, false, false, true>(s, j);
    } else {
      s.hidden_unprojected_all ? lstm_backward_row<T, true, false, false>(s, j)
                               : lstm_backward_row<T, false, false, false>(s, j);
    }
  }
}

RNNTL_VECTOR_CLONES void lstm_backward_rows_entry(const LstmBackwardStep<float>& s, int64_t begin,
                                                  int64_t end) {
  lstm_backward_rows(s, begin, end);
}
void lstm_backward_rows_entry(const LstmBackwardStep<double>& s, int64_t begin, int64_t end) {
  lstm_backward_rows(s, begin, end);
}

// dL/dh_t total (carry from step t+1 plus the output's gradient), clipped in state mode,
// then (times 1 - d under zoneout) through proj_clip: the gradient w.r.t. the hidden before
// proj_clip, per slot.
template <typename T>
struct LstmHiddenGradientStep {
  int64_t batch, out_size, t;
  int64_t first_row;              // compact row of slot 0 at step t
  const int64_t* order;
  const T* grad_output;           // [T, B, P] padded
  const T* hidden_pre_clip;       // [N, P] compact, or nullptr without proj_clip
  const T* zoneout_h;             // [T, B, P] padded keep weights d of h, or nullptr
  T* grad_hidden_carry;           // [B, P] slot-major dL/dh_t from step t+1 in; with zoneout_h
                                  //        d * dL/dh_t out (the caller adds the product path)
  T* grad_pre_clip;               // [B, P] slot-major result
  T* grad_pre_clip_all;           // [N, P] compact copy of the result (for dW_hr), or nullptr
  T state_clip, proj_clip;
  int64_t column_begin, column_end;  // the columns [column_begin, column_end) of P this pass covers
};

template <typename T>
RNNTL_ROW_INLINE void lstm_hidden_gradient_rows(const LstmHiddenGradientStep<T>& s, int64_t begin, int64_t end) {
  const int64_t P = s.out_size, k_begin = s.column_begin, k_end = s.column_end;
  const T state_clip = s.state_clip, proj_clip = s.proj_clip;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t row = s.t * s.batch + s.order[j];  // padded (grad_output)
    const int64_t compact = s.first_row + j;         // compact (hidden_pre_clip, grad_pre_clip_all)
    const T* __restrict__ go = s.grad_output + row * P;
    T* __restrict__ carry = s.grad_hidden_carry + j * P;
    T* __restrict__ d = s.grad_pre_clip + j * P;
    // Separate loops rather than a test per element, so that each vectorizes.
    if (s.zoneout_h) {
      // dL/dh_t of the carried state splits into (1 - d) for h~_t and d for h_{t-1}.
      const T* __restrict__ keep = s.zoneout_h + row * P;
      if (s.hidden_pre_clip) {
        const T* __restrict__ pre = s.hidden_pre_clip + compact * P;
#pragma omp simd
        for (int64_t k = k_begin; k < k_end; ++k) {
          const T total = clip_value(carry[k] + go[k], state_clip);
          d[k] = clip_gradient((T(1) - keep[k]) * total, pre[k], proj_clip);
          carry[k] = keep[k] * total;
        }
      } else {
#pragma omp simd
        for (int64_t k = k_begin; k < k_end; ++k) {
          const T total = clip_value(carry[k] + go[k], state_clip);
          d[k] = (T(1) - keep[k]) * total;
          carry[k] = keep[k] * total;
        }
      }
    } else if (s.hidden_pre_clip) {
      const T* __restrict__ pre = s.hidden_pre_clip + compact * P;
#pragma omp simd
      for (int64_t k = k_begin; k < k_end; ++k)
        d[k] = clip_gradient(clip_value(carry[k] + go[k], state_clip), pre[k], proj_clip);
    } else {
#pragma omp simd
      for (int64_t k = k_begin; k < k_end; ++k) d[k] = clip_value(carry[k] + go[k], state_clip);
    }
    if (s.grad_pre_clip_all) std::copy(d + k_begin, d + k_end, s.grad_pre_clip_all + compact * P + k_begin);
  }
}

RNNTL_VECTOR_CLONES void lstm_hidden_gradient_rows_entry(const LstmHiddenGradientStep<float>& s, int64_t begin,
                                                         int64_t end) {
  lstm_hidden_gradient_rows(s, begin, end);
}
void lstm_hidden_gradient_rows_entry(const LstmHiddenGradientStep<double>& s, int64_t begin, int64_t end) {
  lstm_hidden_gradient_rows(s, begin, end);
}

// b_ih + b_hh, added once by the input projection; nullopt when there is no bias.
c10::optional<at::Tensor> combined_bias(const c10::optional<at::Tensor>& bias_ih,
                                        const c10::optional<at::Tensor>& bias_hh) {
  if (bias_ih.has_value() && bias_hh.has_value()) return *bias_ih + *bias_hh;
  if (bias_ih.has_value()) return bias_ih->contiguous();
  if (bias_hh.has_value()) return bias_hh->contiguous();
  return c10::nullopt;
}

// ------------------------------------------------------------------------------------
// Forward: allocation (constructor), the step loop (run_steps), the results.
// ------------------------------------------------------------------------------------
class LstmForward {
 public:
  LstmForward(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
              const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
              const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
              const c10::optional<at::Tensor>& c0, const at::Tensor& lengths64,
              const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout_h,
              const c10::optional<at::Tensor>& zoneout_c, const LstmSizes& sizes, bool reverse, double cell_clip,
              double proj_clip, bool save)
      : steps_(sizes.steps), batch_(sizes.batch), hidden_(sizes.hidden), out_size_(sizes.out_size),
        input_size_(sizes.input_size), project_(weight_hr.has_value()), reverse_(reverse), save_(save),
        cell_clip_(cell_clip), proj_clip_(proj_clip), sequence_(lengths64, steps_, batch_),
        input_compact_(sequence_.compact_from_padded(input)), bias_(combined_bias(bias_ih, bias_hh)),
        weight_ih_(weight_ih), weight_hh_(weight_hh), weight_hr_(weight_hr.has_value() ? *weight_hr : at::Tensor()),
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel() + (project_ ? weight_hr->numel() : 0))),
        block_rows_(projection_block_rows(4 * hidden_, sizes.input_size, batch_)) {
    const auto options = input.options();
    const int64_t B = batch_, H = hidden_, P = out_size_, G = 4 * hidden_;
    if (loop_.kind != StepLoop::units) {  // the products of the other loops (the units loop packs its own)
      input_projection_.emplace(input_compact_, weight_ih, bias_);
      recurrent_.emplace(weight_hh, B, sequence_.host.steps);
      if (project_) projection_.emplace(*weight_hr, B, sequence_.host.steps);
    }
    hidden_state_ = h0.has_value() ? sequence_.slot_major(*h0) : reusable_zeros({B, P}, options);
    cell_state_ = c0.has_value() ? sequence_.slot_major(*c0) : reusable_zeros({B, H}, options);
    recurrent_mask_ = slot_major_or_undefined(sequence_, recurrent_mask);
    if (recurrent_mask_.defined()) masked_hidden_ = reusable_empty({B, P}, options);
    zoneout_h_ = zoneout_h.has_value() ? zoneout_h->contiguous() : at::Tensor();
    zoneout_c_ = zoneout_c.has_value() ? zoneout_c->contiguous() : at::Tensor();
    hidden_unprojected_ = project_ ? reusable_empty({B, H}, options) : at::Tensor();
    step_scratch_ = reusable_empty({B, G + P}, options);  // per-step products: W_hh h, then W_hr m
    output_ = reusable_empty({steps_, B, P}, options);
    // The input gates of a block of steps go where their activations go: straight into the
    // saved gates when saving for backward (the activations overwrite them in place), else
    // into a buffer of one block reused block after block (of every row for the row split,
    // whose workers run all steps at once).
    gates_ = save ? sequence_.saved_buffer(G, options) : at::empty({0}, options);
    input_gates_block_ =
        save ? at::Tensor() : reusable_empty({ProjectionBlocks::capacity(sequence_, block_rows_, loop_), G}, options);
    cells_ = save ? sequence_.saved_buffer(H, options) : at::empty({0}, options);
    hidden_pre_clip_ = save && proj_clip > 0 ? sequence_.saved_buffer(P, options) : at::empty({0}, options);
    carried_cells_ = save && zoneout_c_.defined() ? sequence_.saved_buffer(H, options) : at::empty({0}, options);
  }

  // The parts of the pointwise pass that are the same at every step (all units).
  template <typename T>
  LstmForwardStep<T> forward_step() {
    LstmForwardStep<T> s;
    s.batch = batch_;
    s.hidden = hidden_;
    s.order = sequence_.order;
    s.input_gates = save_ ? gates_.data_ptr<T>() : input_gates_block_.data_ptr<T>();
    s.input_first_row = 0;
    s.recurrent_first_slot = 0;
    s.cell_state = cell_state_.data_ptr<T>();
    s.hidden_state = project_ ? nullptr : hidden_state_.data_ptr<T>();
    s.hidden_previous = hidden_state_.data_ptr<T>();
    s.zoneout_h = zoneout_h_.defined() ? zoneout_h_.data_ptr<T>() : nullptr;
    s.zoneout_c = zoneout_c_.defined() ? zoneout_c_.data_ptr<T>() : nullptr;
    s.carried_cells = carried_cells_.numel() ? carried_cells_.data_ptr<T>() : nullptr;
    s.hidden_unprojected = project_ ? hidden_unprojected_.data_ptr<T>() : nullptr;
    s.output = project_ ? nullptr : output_.data_ptr<T>();
    s.cells = save_ ? cells_.data_ptr<T>() : nullptr;
    s.hidden_pre_clip = hidden_pre_clip_.numel() ? hidden_pre_clip_.data_ptr<T>() : nullptr;
    s.cell_clip = static_cast<T>(cell_clip_);
    s.proj_clip = static_cast<T>(proj_clip_);
    s.unit_begin = 0;
    s.unit_end = hidden_;
    return s;
  }

  // With projection: h = clip(r) of slots [slot_begin, slot_end), columns [column_begin,
  // column_end), from r = W_hr m [slot_end - slot_begin, P] (from slot_begin), into the state h [B, P], the
  // output, and hidden_pre_clip when saved; with zoneout_h blended with h_previous [B, P]
  // (which may be h).
  template <typename T>
  void projection_epilogue(const LstmForwardStep<T>& s, const T* r, int64_t slot_begin, int64_t slot_end, T* h,
                           const T* h_previous, int64_t column_begin, int64_t column_end) {
    const int64_t P = out_size_;
    T* const out = output_.data_ptr<T>();
    for (int64_t j = slot_begin; j < slot_end; ++j) {
      const int64_t row = s.t * batch_ + sequence_.order[j];  // padded (output, zoneout_h)
      const int64_t compact = s.first_row + j;                // compact (hidden_pre_clip)
      for (int64_t k = column_begin; k < column_end; ++k) {
        const T v = r[(j - slot_begin) * P + k];
        if (s.hidden_pre_clip) s.hidden_pre_clip[compact * P + k] = v;
        T hv = clip_value(v, s.proj_clip);
        if (s.zoneout_h) hv = zoneout_blend(s.zoneout_h[row * P + k], h_previous[j * P + k], hv);
        h[j * P + k] = hv;
        out[row * P + k] = hv;
      }
    }
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::lstm_forward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_, /*projected=*/false);
  }

  // The row split (sequence_cpu.h, step_loop): the input projection of every row first,
  // over all threads, then each worker runs every step for its own slots.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::lstm_forward_steps_rows", std::vector<c10::IValue>());
    T* input_gates = save_ ? gates_.data_ptr<T>() : input_gates_block_.data_ptr<T>();
    input_projection_->into(0, sequence_.valid_rows, input_gates);
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) { run_slots<T>(slot_begin, slot_end, true); });
  }

  // Every step for the slots [slot_begin, slot_end): all of them in the step-at-a-time loop
  // (each pass split over torch's threads), a worker's own in the row split (its passes run
  // on its thread: parallel_for inside a parallel region runs inline). projected: the input
  // gates of every row are already in place; else they are computed a block of steps at a time.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end, bool projected) {
    const int64_t P = out_size_, H = hidden_, G = 4 * hidden_;
    LstmForwardStep<T> s = forward_step<T>();
    T* const input_gates = s.input_gates;
    T* const recurrent_scratch = step_scratch_.data_ptr<T>() + slot_begin * G;  // [n, G] from slot_begin
    T* const projected_scratch = step_scratch_.data_ptr<T>() + batch_ * G;      // [B, P]
    T* const hidden_state = hidden_state_.data_ptr<T>();
    ProjectionBlocks blocks(sequence_, reverse_, block_rows_);
    at::Tensor product_holder;
    s.recurrent_first_slot = slot_begin;
    for (int64_t step = 0; step < steps_; ++step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t end = std::min(sequence_.active[t], slot_end), n = end - slot_begin;
      s.t = t;
      s.first_row = sequence_.first_row[t];
      if (!projected && blocks.starts_at(step)) {
        if (save_) {  // in place in the saved gates: row r at input_gates + r * G
          input_projection_->into(blocks.first(), blocks.rows(), input_gates + blocks.first() * G);
        } else {
          input_projection_->into(blocks.first(), blocks.rows(), input_gates);
          s.input_first_row = blocks.first();
        }
      }
      if (n > 0) {
        const T* product_input = hidden_state + slot_begin * P;
        if (recurrent_mask_.defined()) {
          T* masked = masked_hidden_.data_ptr<T>() + slot_begin * P;
          masked_rows(recurrent_mask_.data_ptr<T>() + slot_begin * P, product_input, masked, n, P, 0, P);
          product_input = masked;
        }
        if (projected) sequence_.prefetch_step_rows(input_gates, G, step + 1, reverse_, slot_begin, slot_end);
        s.recurrent_gates = recurrent_->multiply(product_input, n, recurrent_scratch, product_holder);
        parallel_rows(n, G, [&](int64_t j) {
          lstm_forward_rows_entry(s, slot_begin + j, slot_begin + j + 1, save_, project_);
        });
        if (project_) {
          const T* r = projection_->multiply(hidden_unprojected_.data_ptr<T>() + slot_begin * H, n,
                                             projected_scratch + slot_begin * P, product_holder);
          projection_epilogue(s, r, slot_begin, end, hidden_state, hidden_state, 0, P);
        }
      }
      sequence_.zero_past_length(output_.data_ptr<T>(), P, t, 0, P, slot_begin, slot_end);
    }
  }

  // The multi-core step loop (persistent_cpu.h), float32: `slices` workers each own a slice
  // of the hidden units (and, with projection, of the projected outputs) for the whole
  // sequence. Per step a worker computes its units' input gates (a block of steps at a
  // time) and recurrent gates from its packed weight slices, runs the pointwise pass on its
  // units and writes its units of h_t; one barrier ends the step. With projection, a second
  // barrier lets every worker read all of m_t before projecting its slice of h_t.
  void run_steps_persistent(int64_t slices) {
    RECORD_FUNCTION("rnntl_fast::lstm_forward_steps_persistent", std::vector<c10::IValue>());
    const int64_t H = hidden_, P = out_size_, G = 4 * hidden_, I = input_size_;
    const std::vector<int64_t> units = split_units(H, slices, kPanelWidth);
    const std::vector<int64_t> columns = project_ ? split_units(P, slices, kPanelWidth) : units;
    GateRowSlices recurrent_panels(units, 4, H, P), input_panels(units, 4, H, I);  // W_hh, W_ih
    c10::optional<SlicedPanels> projection_panels;
    if (project_) projection_panels.emplace(columns, 1, H);  // W_hr rows
    const at::Tensor weight_hh = weight_hh_.contiguous(), weight_ih = weight_ih_.contiguous();
    const at::Tensor weight_hr = project_ ? weight_hr_.contiguous() : at::Tensor();
    const float* const bias = bias_.has_value() ? bias_->data_ptr<float>() : nullptr;
    const float* const x = input_compact_.data_ptr<float>();  // [N, I]
    AlternatingState hidden(hidden_state_);
    // With recurrent dropout the products read mask * h, kept beside h in its own two
    // buffers: each worker writes its columns of both before the step's last barrier.
    const float* const mask = recurrent_mask_.defined() ? recurrent_mask_.data_ptr<float>() : nullptr;
    c10::optional<AlternatingState> masked;
    if (mask) masked.emplace(recurrent_mask_ * hidden_state_);
    const LstmForwardStep<float> common = forward_step<float>();
    float* const recurrent = step_scratch_.data_ptr<float>();  // [B, 4H] W_hh h_{t-1}
    float* const projected = recurrent + batch_ * G;            // [B, P]  W_hr m_t

    run_persistent(slices, [&](const StepWorker& worker) {
      const int64_t first = worker.first_slice(), end = worker.end_slice();
      for (int64_t w = first; w < end; ++w) {
        recurrent_panels.pack(w, weight_hh.data_ptr<float>());
        input_panels.pack(w, weight_ih.data_ptr<float>());
        if (project_) projection_panels->pack(w, 0, weight_hr.data_ptr<float>() + columns[w] * H, H, 1);
      }
      LstmForwardStep<float> s = common;
      s.unit_begin = units[first];
      s.unit_end = units[end];
      ProjectionBlocks blocks(sequence_, reverse_, block_rows_);
      for (int64_t step = 0; step < steps_; ++step) {
        const int64_t t = sequence_.time_of(step, reverse_);
        const int64_t n = sequence_.active[t];
        s.t = t;
        s.first_row = sequence_.first_row[t];
        if (blocks.starts_at(step)) {  // each worker projects its own columns, just before they run
          float* gates = s.input_gates + (save_ ? blocks.first() * G : 0);
          if (!save_) s.input_first_row = blocks.first();
          for (int64_t w = first; w < end; ++w)
            input_panels.project(w, x + blocks.first() * I, I, blocks.rows(), bias, gates, G);
        }
        const float* h_previous = masked ? masked->read(step) : hidden.read(step);
        float* h = hidden.write(step);
        if (n > 0) {
          for (int64_t w = first; w < end; ++w) recurrent_panels.multiply(w, h_previous, P, n, recurrent, G);
          s.recurrent_gates = recurrent;
          s.hidden_state = project_ ? nullptr : h;
          s.hidden_previous = hidden.read(step);
          lstm_forward_rows_entry(s, 0, n, save_, project_);
          if (project_) {
            worker.barrier();  // m_t complete
            for (int64_t w = first; w < end; ++w)
              projection_panels->multiply(w, 0, s.hidden_unprojected, H, n, projected + columns[w], P, false);
            projection_epilogue(s, projected, 0, n, h, hidden.read(step), columns[first], columns[end]);
          }
          if (masked) masked_rows(mask, h, masked->write(step), n, P, columns[first], columns[end]);
        }
        sequence_.zero_past_length(output_.data_ptr<float>(), P, t, columns[first], columns[end]);
        worker.barrier();  // h_t complete
      }
    });
    hidden_state_ = hidden.final_state(sequence_, reverse_);
  }

  // (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], cells [T,B,H], hidden_pre_clip [T,B,P],
  // carried_cells [T,B,H]).
  LstmForwardResults results() const {
    return {output_, sequence_.batch_major(hidden_state_), sequence_.batch_major(cell_state_), gates_, cells_,
            hidden_pre_clip_, carried_cells_};
  }

 private:
  int64_t steps_, batch_, hidden_, out_size_, input_size_;
  bool project_, reverse_, save_;
  double cell_clip_, proj_clip_;
  SequenceOrder sequence_;
  at::Tensor input_compact_;            // [N, I] the valid rows of the input
  c10::optional<at::Tensor> bias_;      // [4H] b_ih + b_hh
  at::Tensor weight_ih_, weight_hh_, weight_hr_;
  StepLoop loop_;
  int64_t block_rows_;
  c10::optional<RowProjection> input_projection_;  // [N, 4H] W_ih x + b_ih + b_hh, in blocks
  c10::optional<StepWeight> recurrent_, projection_;
  at::Tensor hidden_state_;        // [B, P] slot-major
  at::Tensor cell_state_;          // [B, H] slot-major
  at::Tensor recurrent_mask_;      // [B, P] slot-major, or undefined
  at::Tensor masked_hidden_;       // [B, P] slot-major mask * h_{t-1}, with recurrent_mask
  at::Tensor zoneout_h_;           // [T, B, P] padded keep weights, or undefined
  at::Tensor zoneout_c_;           // [T, B, H] padded keep weights, or undefined
  at::Tensor hidden_unprojected_;  // [B, H] slot-major m, with projection
  at::Tensor step_scratch_;        // [B, 4H + P]
  at::Tensor input_gates_block_;   // [block capacity, 4H], when not saving
  at::Tensor output_, gates_, cells_, hidden_pre_clip_;
  at::Tensor carried_cells_;       // [T, B, H] compact rows first: the zoned c_t, when saving with zoneout_c
};

// ------------------------------------------------------------------------------------
// Backward: allocation (constructor), the step loop (run_steps), gradient assembly.
// ------------------------------------------------------------------------------------
class LstmBackward {
 public:
  LstmBackward(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
               const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
               const at::Tensor& weight_hh, const c10::optional<at::Tensor>& weight_hr,
               const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& c0, const at::Tensor& lengths64,
               const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout_h,
               const c10::optional<at::Tensor>& zoneout_c, const at::Tensor& output, const at::Tensor& gates,
               const at::Tensor& cells, const at::Tensor& hidden_pre_clip, const at::Tensor& carried_cells,
               const LstmSizes& sizes, bool reverse, double cell_clip,
               double proj_clip, double state_clip, double gate_clip, std::array<bool, 7> output_mask)
      : steps_(sizes.steps), batch_(sizes.batch), input_size_(sizes.input_size), hidden_(sizes.hidden),
        out_size_(sizes.out_size), project_(weight_hr.has_value()), reverse_(reverse), cell_clip_(cell_clip),
        proj_clip_(proj_clip), state_clip_(state_clip), gate_clip_(gate_clip), mask_(output_mask),
        options_(input.options()), sequence_(lengths64, steps_, batch_),
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel() + (project_ ? weight_hr->numel() : 0))),
        weight_ih_(weight_ih), weight_hh_(weight_hh), weight_hr_(weight_hr.has_value() ? *weight_hr : at::Tensor()) {
    const int64_t B = batch_, H = hidden_, P = out_size_, N = sequence_.valid_rows;
    if (loop_.kind != StepLoop::units) {  // the products of the other loops (the units loop packs its own)
      recurrent_back_.emplace(weight_hh.t(), B, sequence_.host.steps);                  // dL/dh_{t-1} = dL/da @ W_hh
      if (project_) projection_back_.emplace(weight_hr->t(), B, sequence_.host.steps);  // dL/dm = dL/dr @ W_hr
    }
    grad_out_ = defined_or_zeros(grad_output, {steps_, B, P}, options_);
    grad_hidden_carry_ = sequence_.slot_major(defined_or_zeros(grad_h_n, {B, P}, options_));
    grad_cell_carry_ = sequence_.slot_major(defined_or_zeros(grad_c_n, {B, H}, options_));
    // Compact [N, ...]: each step's slots are contiguous rows, so dL/da of step t is written
    // in place where the recurrent product reads it.
    grad_gates_all_ = reusable_empty({N, 4 * H}, options_);
    grad_pre_clip_ = reusable_empty({B, P}, options_);  // dL/d(hidden before proj_clip), slot-major
    grad_unprojected_ = project_ ? reusable_empty({B, H}, options_) : at::Tensor();
    if (want_weight_hr()) {
      grad_pre_clip_all_ = reusable_empty({N, P}, options_);
      hidden_unprojected_all_ = reusable_empty({N, H}, options_);
    }
    // dW_ih and dW_hh come out of one product grad_gates^T @ [x | h_prev], over the valid rows.
    weight_operand_.emplace(N, mask_[1] ? sequence_.compact_from_padded(input) : at::Tensor(), mask_[2] ? P : 0,
                            options_);
    zeros_ = reusable_zeros({std::max(H, P)}, options_);
    h0_ = h0.has_value() ? h0->contiguous() : at::Tensor();
    c0_ = c0.has_value() ? c0->contiguous() : at::Tensor();
    recurrent_mask_ = slot_major_or_undefined(sequence_, recurrent_mask);
    output_ = output.contiguous();
    gates_ = gates.contiguous();
    cells_ = cells.contiguous();
    hidden_pre_clip_ = proj_clip > 0 ? hidden_pre_clip.contiguous() : at::Tensor();
    zoneout_h_ = zoneout_h.has_value() ? zoneout_h->contiguous() : at::Tensor();
    zoneout_c_ = zoneout_c.has_value() ? zoneout_c->contiguous() : at::Tensor();
    carried_cells_ = zoneout_c_.defined() ? carried_cells.contiguous() : at::Tensor();
    // With zoneout_h, dL/dh_{t-1} = d * dL/dh_t + (mask *) (dL/da @ W_hh): with a mask the
    // step-at-a-time loop's product goes to a scratch first.
    if (zoneout_h_.defined() && recurrent_mask_.defined()) recurrent_product_ = reusable_empty({B, P}, options_);
  }

  // The parts of the pointwise pass that are the same at every step (all units).
  template <typename T>
  LstmBackwardStep<T> backward_step() {
    const int64_t B = batch_, H = hidden_, P = out_size_;
    LstmBackwardStep<T> s;
    s.batch = B;
    s.hidden = H;
    s.out_size = P;
    s.reverse = reverse_;
    s.sequence = &sequence_;
    s.gates = gates_.data_ptr<T>();
    s.cells = cells_.data_ptr<T>();
    s.carried_cells = carried_cells_.defined() ? carried_cells_.data_ptr<T>() : nullptr;
    s.zoneout_c = zoneout_c_.defined() ? zoneout_c_.data_ptr<T>() : nullptr;
    s.output = output_.data_ptr<T>();
    s.h0 = h0_.defined() ? h0_.data_ptr<T>() : nullptr;
    s.c0 = c0_.defined() ? c0_.data_ptr<T>() : nullptr;
    s.zeros = zeros_.data_ptr<T>();
    s.grad_cell_carry = grad_cell_carry_.data_ptr<T>();
    s.hidden_prev_all = weight_operand_->hidden_columns<T>();
    s.hidden_prev_stride = weight_operand_->width();
    s.recurrent_mask = recurrent_mask_.defined() ? recurrent_mask_.data_ptr<T>() : nullptr;
    s.grad_hidden_first_slot = 0;
    s.hidden_unprojected_all = want_weight_hr() ? hidden_unprojected_all_.data_ptr<T>() : nullptr;
    s.cell_clip = static_cast<T>(cell_clip_);
    s.state_clip = static_cast<T>(state_clip_);
    s.gate_clip = static_cast<T>(gate_clip_);
    s.unit_begin = 0;
    s.unit_end = H;
    s.column_begin = 0;
    s.column_end = P;
    return s;
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::lstm_backward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_);
  }

  // The row split (sequence_cpu.h, step_loop): each worker runs every step for its own slots.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::lstm_backward_steps_rows", std::vector<c10::IValue>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) { run_slots<T>(slot_begin, slot_end); });
  }

  // Every step, last first, for the slots [slot_begin, slot_end): all of them in the
  // step-at-a-time loop (each pass split over torch's threads), a worker's own in the row
  // split (its passes run on its thread).
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end) {
    const int64_t H = hidden_, P = out_size_, G = 4 * hidden_;
    const T state_limit = static_cast<T>(state_clip_);
    LstmBackwardStep<T> s = backward_step<T>();
    T* const grad_gates_data = grad_gates_all_.data_ptr<T>();
    LstmHiddenGradientStep<T> d = hidden_gradient_step<T>();
    const T* go = d.grad_output;
    T* const carry_h = grad_hidden_carry_.data_ptr<T>();
    T* const carry_c = grad_cell_carry_.data_ptr<T>();
    T* const own_carry_h = carry_h + slot_begin * P;
    const T* const own_mask = s.recurrent_mask ? s.recurrent_mask + slot_begin * P : nullptr;
    T* const d_pre = d.grad_pre_clip;
    T* const grad_unprojected = project_ ? grad_unprojected_.data_ptr<T>() : nullptr;
    at::Tensor product_holder;
    const auto slots_at = [&](int64_t t) { return std::min(sequence_.active[t], slot_end) - slot_begin; };
    // The blocks the pointwise passes of processing step `step` read (see prefetch_block).
    const auto prefetch_step = [&](int64_t step) {
      sequence_.prefetch_step_rows(s.gates, G, step, reverse_, slot_begin, slot_end);
      sequence_.prefetch_step_rows(s.cells, H, step, reverse_, slot_begin, slot_end);
      sequence_.prefetch_step_padded_rows(go, P, step, reverse_, slot_begin, slot_end);
      sequence_.prefetch_step_rows(s.cells, H, step - 1, reverse_, slot_begin, slot_end);  // c_{t-1}
    };
    prefetch_step(steps_ - 1);

    for (int64_t step = steps_ - 1; step >= 0; --step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = slots_at(t), first = sequence_.first_row[t];
      s.t = t;
      s.grad_gates = grad_gates_data + first * G;
      d.t = t;
      d.first_row = first;
      if (n > 0) {
        parallel_rows(n, P, [&](int64_t j) { lstm_hidden_gradient_rows_entry(d, slot_begin + j, slot_begin + j + 1); });
        if (project_) {  // dL/dm [n, H] of the own slots
          s.grad_hidden_unprojected = projection_back_->multiply(d_pre + slot_begin * P, n,
                                                                 grad_unprojected + slot_begin * H, product_holder);
          s.grad_hidden_first_slot = slot_begin;
        } else {
          s.grad_hidden_unprojected = d_pre;
        }
        parallel_rows(n, G, [&](int64_t j) { lstm_backward_rows_entry(s, slot_begin + j, slot_begin + j + 1); });
        prefetch_step(step - 1);
        const T* own_grad_gates = s.grad_gates + slot_begin * G;
        if (d.zoneout_h && own_mask) {  // carry holds d * dL/dh_t
          T* product = recurrent_product_.data_ptr<T>() + slot_begin * P;
          recurrent_back_->multiply_into(own_grad_gates, n, product);
          add_masked_rows(own_mask, product, own_carry_h, n, P, 0, P);
        } else {
          recurrent_back_->multiply_into(own_grad_gates, n, own_carry_h, /*accumulate=*/d.zoneout_h != nullptr);
          if (own_mask) masked_rows(own_mask, own_carry_h, own_carry_h, n, P, 0, P);
        }
      }
      // Rows past their length pass their state gradients through unchanged (clamped in
      // state mode, as the reference's hooks on the carried-over state do).
      if (state_limit > 0) {
        for (int64_t j = std::max(sequence_.active[t], slot_begin); j < slot_end; ++j) {
          for (int64_t k = 0; k < P; ++k) carry_h[j * P + k] = clip_value(carry_h[j * P + k], state_limit);
          for (int64_t k = 0; k < H; ++k) carry_c[j * H + k] = clip_value(carry_c[j * H + k], state_limit);
        }
      }
    }
  }

  // The multi-core step loop (persistent_cpu.h), float32, mirroring the forward's: worker w
  // owns hidden units units[w] and columns columns[w] of h (the same without projection).
  // Per step it adds up, on its columns, the slices' partials of dL/dh_t (see
  // PartialRecurrentProduct), forms dL/dh_t there, (with projection: a barrier, then dL/dm
  // on its units from all of dL/dh_t), runs the pointwise pass on its units and multiplies
  // its gate columns of dL/da_t by its rows of W_hh: its partial of dL/dh_{t-1}. One barrier
  // ends the step.
  void run_steps_persistent(int64_t slices) {
    RECORD_FUNCTION("rnntl_fast::lstm_backward_steps_persistent", std::vector<c10::IValue>());
    const int64_t B = batch_, H = hidden_, P = out_size_, G = 4 * hidden_;
    const std::vector<int64_t> units = split_units(H, slices, kPanelWidth);
    const std::vector<int64_t> columns = project_ ? split_units(P, slices, kPanelWidth) : units;
    PartialRecurrentProduct recurrent_product(units, 4, H, P, B);  // dL/dh_{t-1} = dL/da_t @ W_hh
    c10::optional<SlicedPanels> projection_panels;
    if (project_) projection_panels.emplace(units, 1, P);  // B[k][u] = W_hr[k][u]: columns of W_hr
    const at::Tensor weight_hh = weight_hh_.contiguous();
    const at::Tensor weight_hr = project_ ? weight_hr_.contiguous() : at::Tensor();
    const float state_limit = static_cast<float>(state_clip_);
    const LstmBackwardStep<float> common = backward_step<float>();
    const LstmHiddenGradientStep<float> common_hidden = hidden_gradient_step<float>();
    float* const grad_gates_data = grad_gates_all_.data_ptr<float>();
    float* const carry_h = grad_hidden_carry_.data_ptr<float>();
    float* const carry_c = grad_cell_carry_.data_ptr<float>();
    float* const grad_unprojected = project_ ? grad_unprojected_.data_ptr<float>() : nullptr;

    run_persistent(slices, [&](const StepWorker& worker) {
      const int64_t first = worker.first_slice(), end = worker.end_slice();
      for (int64_t w = first; w < end; ++w) {
        recurrent_product.pack(w, weight_hh.data_ptr<float>());
        if (project_) projection_panels->pack(w, 0, weight_hr.data_ptr<float>() + units[w], 1, H);
      }
      const int64_t unit_begin = units[first], unit_end = units[end];
      const int64_t column_begin = columns[first], column_end = columns[end];
      LstmBackwardStep<float> s = common;
      s.unit_begin = unit_begin;
      s.unit_end = unit_end;
      s.column_begin = column_begin;
      s.column_end = column_end;
      LstmHiddenGradientStep<float> d = common_hidden;
      d.column_begin = column_begin;
      d.column_end = column_end;
      // dL/dh_{t-1} on this worker's columns, rows [0, rows) (the rows of the step that made
      // the partials): (mask *) the partials, added to the carry's d * dL/dh_t with zoneout_h.
      const auto add_partials = [&](int64_t parity, int64_t rows) {
        recurrent_product.add_into(parity, rows, column_begin, column_end, s.recurrent_mask, carry_h,
                                   /*accumulate=*/d.zoneout_h != nullptr);
      };
      int64_t partial_rows = 0;  // rows of the partials of the previous processing step
      for (int64_t step = steps_ - 1; step >= 0; --step) {
        const int64_t t = sequence_.time_of(step, reverse_);
        const int64_t n = sequence_.active[t], first_row = sequence_.first_row[t];
        s.t = d.t = t;
        s.grad_gates = grad_gates_data + first_row * G;
        d.first_row = first_row;
        if (partial_rows > 0) add_partials(step + 1, partial_rows);
        if (n > 0) {
          lstm_hidden_gradient_rows_entry(d, 0, n);
          if (project_) {
            worker.barrier();  // dL/dh_t complete
            for (int64_t w = first; w < end; ++w)
              projection_panels->multiply(w, 0, d.grad_pre_clip, P, n, grad_unprojected + units[w], H, false);
            s.grad_hidden_unprojected = grad_unprojected;
          } else {
            s.grad_hidden_unprojected = d.grad_pre_clip;
          }
          lstm_backward_rows_entry(s, 0, n);
          prefetch_own_rows(step - 1, unit_begin, unit_end, column_begin, column_end);
          for (int64_t w = first; w < end; ++w) recurrent_product.multiply(w, s.grad_gates, G, n, step);
        }
        partial_rows = n;
        // Rows past their length pass their state gradients through (clamped in state mode).
        if (state_limit > 0) {
          for (int64_t j = n; j < B; ++j) {
            for (int64_t k = column_begin; k < column_end; ++k)
              carry_h[j * P + k] = clip_value(carry_h[j * P + k], state_limit);
            for (int64_t k = unit_begin; k < unit_end; ++k)
              carry_c[j * H + k] = clip_value(carry_c[j * H + k], state_limit);
          }
        }
        worker.barrier();  // the partials of dL/dh_{t-1} complete
      }
      if (partial_rows > 0) add_partials(0, partial_rows);  // dL/dh_0
    });
  }

  // The multi-core loop's prefetch_block (see there): a worker's units [unit_begin, unit_end)
  // of the saved gates and cells, and its columns of the output gradient, of processing
  // step `step`, issued during the previous step's product; and for writing, its units of
  // that step's rows of dL/da and its columns of the weight-gradient operand's h_{t-1}.
  void prefetch_own_rows(int64_t step, int64_t unit_begin, int64_t unit_end, int64_t column_begin,
                         int64_t column_end) const {
    if (step < 0) return;
    const int64_t H = hidden_, G = 4 * hidden_, P = out_size_, U = unit_end - unit_begin;
    const int64_t t = sequence_.time_of(step, reverse_);
    const float* gates = gates_.data_ptr<float>();
    const float* cells = cells_.data_ptr<float>();
    const float* grad_output = grad_out_.data_ptr<float>();
    const float* output = output_.data_ptr<float>();
    const float* grad_gates = grad_gates_all_.data_ptr<float>();
    const float* operand = weight_operand_->hidden_columns<float>();
    for (int64_t j = 0; j < sequence_.active[t]; ++j) {
      const int64_t compact = sequence_.first_row[t] + j;
      for (int64_t g = 0; g < 4; ++g) prefetch_block(gates + compact * G + g * H + unit_begin, U);
      prefetch_block(cells + compact * H + unit_begin, U);
      prefetch_block(grad_output + (t * batch_ + sequence_.order[j]) * P + column_begin, column_end - column_begin);
      for (int64_t g = 0; g < 4; ++g) prefetch_block<true>(grad_gates + compact * G + g * H + unit_begin, U);
      if (operand) {  // h_{t-1} of the weight-gradient operand, from the output of step t - 1
        prefetch_block<true>(operand + compact * weight_operand_->width() + column_begin, column_end - column_begin);
        if (step > 0) {
          const int64_t previous = SequenceOrder::previous_step(t, reverse_) * batch_ + sequence_.order[j];
          prefetch_block(output + previous * P + column_begin, column_end - column_begin);
        }
      }
    }
  }

  // The parts of the hidden-gradient pass that are the same at every step (all columns).
  template <typename T>
  LstmHiddenGradientStep<T> hidden_gradient_step() {
    LstmHiddenGradientStep<T> d;
    d.batch = batch_;
    d.out_size = out_size_;
    d.order = sequence_.order;
    d.grad_output = grad_out_.data_ptr<T>();
    d.hidden_pre_clip = hidden_pre_clip_.defined() ? hidden_pre_clip_.data_ptr<T>() : nullptr;
    d.zoneout_h = zoneout_h_.defined() ? zoneout_h_.data_ptr<T>() : nullptr;
    d.grad_hidden_carry = grad_hidden_carry_.data_ptr<T>();
    d.grad_pre_clip = grad_pre_clip_.data_ptr<T>();
    d.grad_pre_clip_all = want_weight_hr() ? grad_pre_clip_all_.data_ptr<T>() : nullptr;
    d.state_clip = static_cast<T>(state_clip_);
    d.proj_clip = static_cast<T>(proj_clip_);
    d.column_begin = 0;
    d.column_end = out_size_;
    return d;
  }

  // (grad_input [T,B,I], grad_weight_ih [4H,I], grad_weight_hh [4H,P], grad_bias [4H] (the
  // same for bias_ih and bias_hh), grad_weight_hr [P,H], grad_h0 [B,P], grad_c0 [B,H]); an
  // entry whose output_mask is false is an empty tensor.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradients() {
    // Each skipped gradient is its own empty tensor: outputs of an op must not alias.
    const auto none = [&] { return at::empty({0}, options_); };
    const at::Tensor& grad_gates = grad_gates_all_;  // [N, 4H]
    at::Tensor grad_input =
        mask_[0] ? sequence_.padded_from_compact(linear_rows(grad_gates, weight_ih_.t())) : none();
    weight_operand_->multiply(grad_gates);
    at::Tensor grad_weight_ih = mask_[1] ? weight_operand_->input_block(input_size_) : none();
    at::Tensor grad_weight_hh = mask_[2] ? weight_operand_->hidden_block(out_size_) : none();
    at::Tensor grad_bias = mask_[3] ? grad_gates.sum(0) : none();
    at::Tensor grad_weight_hr =
        want_weight_hr() ? transposed_product(grad_pre_clip_all_, hidden_unprojected_all_) : none();
    at::Tensor grad_h0 = mask_[5] ? sequence_.batch_major(grad_hidden_carry_) : none();
    at::Tensor grad_c0 = mask_[6] ? sequence_.batch_major(grad_cell_carry_) : none();
    return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr, grad_h0, grad_c0};
  }

 private:
  bool want_weight_hr() const { return project_ && mask_[4]; }
  int64_t steps_, batch_, input_size_, hidden_, out_size_;
  bool project_, reverse_;
  double cell_clip_, proj_clip_, state_clip_, gate_clip_;
  std::array<bool, 7> mask_;
  at::TensorOptions options_;
  SequenceOrder sequence_;
  StepLoop loop_;
  c10::optional<StepWeight> recurrent_back_, projection_back_;
  at::Tensor weight_ih_, weight_hh_, weight_hr_;
  at::Tensor grad_out_;                // [T, B, P] padded
  at::Tensor grad_hidden_carry_;       // [B, P] slot-major
  at::Tensor grad_cell_carry_;         // [B, H] slot-major
  at::Tensor grad_gates_all_;          // [N, 4H] compact
  at::Tensor grad_pre_clip_;           // [B, P] slot-major
  at::Tensor grad_unprojected_;        // [B, H] slot-major, with projection
  at::Tensor grad_pre_clip_all_;       // [N, P] compact, for dW_hr
  at::Tensor hidden_unprojected_all_;  // [N, H] compact m, for dW_hr
  c10::optional<WeightGradientOperand> weight_operand_;
  at::Tensor zeros_, h0_, c0_, output_, gates_, cells_, hidden_pre_clip_;
  at::Tensor recurrent_mask_;  // [B, P] slot-major, or undefined
  at::Tensor zoneout_h_;           // [T, B, P] padded keep weights, or undefined
  at::Tensor zoneout_c_;           // [T, B, H] padded keep weights, or undefined
  at::Tensor carried_cells_;       // [T, B, H] compact rows first, with zoneout_c
  at::Tensor recurrent_product_;   // [B, P] dL/da @ W_hh, with zoneout_h and recurrent_mask
};

}  // namespace

// Returns (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], cells [T,B,H],
// hidden_pre_clip [T,B,P], carried_cells [T,B,H]); the last four are empty unless
// save_for_backward (and, for hidden_pre_clip, proj_clip; for carried_cells, zoneout_c) is
// set. With lengths, they hold the compact rows first (the layout is private to this op, see
// docs/cpu.md).
LstmForwardResults lstm_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout_h,
    const c10::optional<at::Tensor>& zoneout_c, bool reverse, double cell_clip, double proj_clip, double state_clip,
    double gate_clip, bool save_for_backward) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const LstmSizes sizes = check_lstm_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0,
                                                       c0, cell_clip, proj_clip, state_clip, gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  check_optional(recurrent_mask, input, {sizes.batch, sizes.out_size}, "recurrent_mask");
  check_optional(zoneout_h, input, {sizes.steps, sizes.batch, sizes.out_size}, "zoneout_h");
  check_optional(zoneout_c, input, {sizes.steps, sizes.batch, sizes.hidden}, "zoneout_c");
  LstmForward forward(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths64, recurrent_mask,
                      zoneout_h, zoneout_c, sizes, reverse, cell_clip, proj_clip, save_for_backward);
  forward.run(input.scalar_type());
  return forward.results();
}

// Returns (grad_input [T,B,I], grad_weight_ih [4H,I], grad_weight_hh [4H,P],
// grad_bias [4H] (the same for bias_ih and bias_hh), grad_weight_hr [P,H], grad_h0 [B,P],
// grad_c0 [B,H]); an entry whose output_mask is false is an empty tensor and costs nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_backward_cpu(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
                  const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                  const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                  const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
                  const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
                  const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout_h,
                  const c10::optional<at::Tensor>& zoneout_c, const at::Tensor& output, const at::Tensor& gates,
                  const at::Tensor& cells, const at::Tensor& hidden_pre_clip, const at::Tensor& carried_cells,
                  bool reverse, double cell_clip, double proj_clip,
                  double state_clip, double gate_clip, std::array<bool, 7> output_mask) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const LstmSizes sizes =
      check_lstm_backward_arguments(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0,
                                    output, gates, cells, hidden_pre_clip, cell_clip, proj_clip, state_clip, gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  check_optional(recurrent_mask, input, {sizes.batch, sizes.out_size}, "recurrent_mask");
  check_optional(zoneout_h, input, {sizes.steps, sizes.batch, sizes.out_size}, "zoneout_h");
  check_optional(zoneout_c, input, {sizes.steps, sizes.batch, sizes.hidden}, "zoneout_c");
  if (zoneout_c.has_value()) check_optional(carried_cells, input, {sizes.steps, sizes.batch, sizes.hidden}, "carried_cells");
  LstmBackward backward(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths64,
                        recurrent_mask, zoneout_h, zoneout_c, output, gates, cells, hidden_pre_clip, carried_cells, sizes,
                        reverse, cell_clip, proj_clip, state_clip, gate_clip, output_mask);
  backward.run(input.scalar_type());
  return backward.gradients();
}

}  // namespace cpu
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CPU, m) {
  m.impl("lstm_forward", &rnntl::cpu::lstm_forward_cpu);
  m.impl("lstm_backward", &rnntl::cpu::lstm_backward_cpu);
}
