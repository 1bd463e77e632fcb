// GRU ("reset after", as torch.nn and cuDNN) over a whole sequence, one layer and one
// direction, on the CPU. Same structure and layout as lstm_cpu.cpp: the input projection in
// blocks of steps (ProjectionBlocks), per step a recurrent GEMM over the running rows and a
// fused pointwise pass; backward per step, then the weight-gradient GEMMs over all steps for
// the weights that need them.
// The same three step loops run it (sequence_cpu.h's step_loop; docs/cpu.md, "Multi-core
// engine"): run_steps (a step at a time), run_steps_rows (each thread runs every step for
// its own batch rows) and run_steps_persistent (each thread owns a slice of the hidden units).
// Shapes: input [T, B, I]; weight_ih [3H, I]; weight_hh [3H, H]; biases [3H]; h0 [B, H];
// recurrent_mask [B, H]; zoneout [T, B, H] keep weights d: h_t = d * h_{t-1} + (1 - d) * h~_t.
// "Slot-major" buffers hold row order[j] in slot j. The whole-sequence buffers (input gates,
// saved gates and hidden_n, gate gradients, weight-gradient operands) hold only the
// N = valid_rows rows of SequenceOrder's compact layout, so padded steps never enter a
// product (their input may hold anything, NaN included).
#include "gemm_cpu.h"
#include "kernels_cpu.h"
#include "sequence_cpu.h"

#include <rnntl/cell_math.h>

namespace rnntl {
namespace cpu {
namespace {

template <typename T>
struct GruForwardStep {
  int64_t batch, hidden, t;
  int64_t first_row;         // compact row of slot 0 at step t
  const int64_t* order;
  const T* input_gates;      // [rows, 3H] W_ih x + b_ih of compact rows input_first_row...
  int64_t input_first_row;
  T* recurrent_gates;        // [n, 3H]    W_hh h_{t-1} (no bias) of slots recurrent_first_slot, ...;
                             //            r, z written over it
  int64_t recurrent_first_slot;
  const T* bias_hh;          // [3H]       b_hh, or zeros
  const T* hidden_previous;  // [B, H]     slot-major h_{t-1} (may be hidden_state)
  T* hidden_state;           // [B, H]     slot-major h_t
  const T* zoneout;          // [T, B, H]  padded keep weights, or nullptr
  T* output;                 // [T, B, H]  padded
  T* gates;                  // [N, 3H]    compact activations r, z, n, when saving for backward
  T* hidden_n;               // [N, H]     compact W_hn h_{t-1} + b_hn, when saving
  int64_t unit_begin, unit_end;  // the hidden units [unit_begin, unit_end) this pass updates
};

template <typename T, bool kSave, bool kZoneout>
RNNTL_ROW_INLINE void gru_forward_row(const GruForwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 3 * s.hidden;
  const int64_t row = s.t * s.batch + s.order[j];  // padded row (output)
  const int64_t compact = s.first_row + j;         // compact row (the whole-sequence buffers)
  const T* __restrict__ x = s.input_gates + (compact - s.input_first_row) * G;
  // r and z overwrite the recurrent product in place when not saved (element k is read
  // before it is written), so r is not __restrict__.
  const T* r = s.recurrent_gates + (j - s.recurrent_first_slot) * G;
  T* rz = kSave ? s.gates + compact * G : s.recurrent_gates + (j - s.recurrent_first_slot) * G;
  const T* __restrict__ bias = s.bias_hh;
  const T* h_previous = s.hidden_previous + j * H;  // may be h: element k is read before it is written
  T* h = s.hidden_state + j * H;
  T* __restrict__ out = s.output + row * H;
  T* __restrict__ hidden_n = kSave ? s.hidden_n + compact * H : nullptr;
  const T* __restrict__ keep = kZoneout ? s.zoneout + row * H : nullptr;
  const int64_t k_begin = s.unit_begin, k_end = s.unit_end;
  // Two passes (see gru_candidate_update): the independent r and z first, then n and h.
#pragma omp simd
  for (int64_t k = k_begin; k < k_end; ++k) {
    const T reset = sigmoid(x[k] + r[k] + bias[k]);
    const T update = sigmoid(x[H + k] + r[H + k] + bias[H + k]);
    rz[k] = reset;
    rz[H + k] = update;
  }
#pragma omp simd
  for (int64_t k = k_begin; k < k_end; ++k) {
    const T hn = r[2 * H + k] + bias[2 * H + k];
    GruForwardElement<T> e;
    gru_candidate_update(rz[k], rz[H + k], x[2 * H + k], hn, h_previous[k], e);
    const T value = kZoneout ? zoneout_blend(keep[k], h_previous[k], e.hidden) : e.hidden;
    h[k] = value;
    out[k] = value;
    if (kSave) {
      rz[2 * H + k] = e.n;
      hidden_n[k] = hn;
    }
  }
}

template <typename T>
RNNTL_ROW_INLINE void gru_forward_rows(const GruForwardStep<T>& s, int64_t begin, int64_t end, bool save) {
  for (int64_t j = begin; j < end; ++j) {
    if (s.zoneout)
      save ? gru_forward_row<T, true, true>(s, j) : gru_forward_row<T, false, true>(s, j);
    else
      save ? gru_forward_row<T, true, false>(s, j) : gru_forward_row<T, false, false>(s, j);
  }
}

RNNTL_VECTOR_CLONES void gru_forward_rows_entry(const GruForwardStep<float>& s, int64_t begin, int64_t end,
                                                bool save) {
  gru_forward_rows(s, begin, end, save);
}
void gru_forward_rows_entry(const GruForwardStep<double>& s, int64_t begin, int64_t end, bool save) {
  gru_forward_rows(s, begin, end, save);
}

template <typename T>
struct GruBackwardStep {
  int64_t batch, hidden, t;
  bool reverse;
  const SequenceOrder* sequence;
  const T* gates;             // [N, 3H] compact
  const T* hidden_n;          // [N, H]  compact
  const T* output;            // [T, B, H] padded
  const T* grad_output;       // [T, B, H] padded
  const T* h0;                // [B, H] or nullptr
  const T* zeros;             // [H]
  const T* zoneout;           // [T, B, H] padded keep weights d, or nullptr
  T* grad_hidden_carry;       // [B, H]  slot-major: dL/dh_t from step t+1 in, z * dL/dh~_t
                              //         (+ d * dL/dh_t with zoneout) out (the caller then
                              //         adds dL/dgh @ W_hh)
  T* grad_hidden_gates;       // [n, 3H] dL/d(W_hh h + b_hh) of step t's slots
  T* grad_input_gates_all;    // [N, 3H] compact dL/d(W_ih x + b_ih)
  T* hidden_prev_all;         // h_{t-1} of compact row r at r * hidden_prev_stride, or nullptr
  int64_t hidden_prev_stride;
  const T* recurrent_mask;    // [B, H] slot-major: hidden_prev_all gets mask * h_{t-1}; or nullptr
  T state_clip, gate_clip;
  int64_t unit_begin, unit_end;  // the hidden units [unit_begin, unit_end) this pass covers
};

template <typename T, bool kZoneout>
RNNTL_ROW_INLINE void gru_backward_row(const GruBackwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 3 * s.hidden;
  const int64_t b = s.sequence->order[j];
  const int64_t row = s.t * s.batch + b;                // padded (output, grad_output)
  const int64_t compact = s.sequence->first_row[s.t] + j;  // compact (the whole-sequence buffers)
  const bool first = s.sequence->is_first_step(b, s.t, s.reverse);
  const int64_t prev_row = SequenceOrder::previous_step(s.t, s.reverse) * s.batch + b;
  const T* __restrict__ h_prev = first ? (s.h0 ? s.h0 + b * H : s.zeros) : s.output + prev_row * H;
  const T* __restrict__ act = s.gates + compact * G;
  const T* __restrict__ hn = s.hidden_n + compact * H;
  const T* __restrict__ go = s.grad_output + row * H;
  T* __restrict__ carry = s.grad_hidden_carry + j * H;
  T* __restrict__ dgh = s.grad_hidden_gates + j * G;
  T* __restrict__ dgi = s.grad_input_gates_all + compact * G;
  const T* __restrict__ keep = kZoneout ? s.zoneout + row * H : nullptr;
  const T state_clip = s.state_clip, gate_clip = s.gate_clip;
  const int64_t k_begin = s.unit_begin, k_end = s.unit_end;
#pragma omp simd
  for (int64_t k = k_begin; k < k_end; ++k) {
    const T dh = clip_value(carry[k] + go[k], state_clip);  // of the carried h_t
    const T dh_fresh = kZoneout ? (T(1) - keep[k]) * dh : dh;
    const GruBackwardElement<T> e =
        gru_element_backward(act[k], act[H + k], act[2 * H + k], hn[k], h_prev[k], dh_fresh, gate_clip);
    dgi[k] = e.d_r;
    dgi[H + k] = e.d_z;
    dgi[2 * H + k] = e.d_n;
    dgh[k] = e.d_r;
    dgh[H + k] = e.d_z;
    dgh[2 * H + k] = e.d_hidden_n;
    carry[k] = kZoneout ? e.grad_hidden_prev + keep[k] * dh : e.grad_hidden_prev;
  }
  if (s.hidden_prev_all) {
    T* operand = s.hidden_prev_all + compact * s.hidden_prev_stride;
    if (s.recurrent_mask) {
      masked_rows(s.recurrent_mask + j * H, h_prev, operand, 1, H, k_begin, k_end);
    } else {
      std::copy(h_prev + k_begin, h_prev + k_end, operand + k_begin);
    }
  }
}

template <typename T>
RNNTL_ROW_INLINE void gru_backward_rows(const GruBackwardStep<T>& s, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) s.zoneout ? gru_backward_row<T, true>(s, j) : gru_backward_row<T, false>(s, j);
}

RNNTL_VECTOR_CLONES void gru_backward_rows_entry(const GruBackwardStep<float>& s, int64_t begin, int64_t end) {
  gru_backward_rows(s, begin, end);
}
void gru_backward_rows_entry(const GruBackwardStep<double>& s, int64_t begin, int64_t end) {
  gru_backward_rows(s, begin, end);
}

// ------------------------------------------------------------------------------------
// Forward: allocation (constructor), the step loop (run_steps), the results.
// ------------------------------------------------------------------------------------
class GruForward {
 public:
  GruForward(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
             const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
             const c10::optional<at::Tensor>& h0, const at::Tensor& lengths64,
             const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
             const GruSizes& sizes, bool reverse, bool save)
      : steps_(sizes.steps), batch_(sizes.batch), hidden_(sizes.hidden), input_size_(sizes.input_size),
        reverse_(reverse), save_(save), sequence_(lengths64, steps_, batch_),
        input_compact_(sequence_.compact_from_padded(input)),
        bias_ih_(bias_ih.has_value() ? c10::optional<at::Tensor>(bias_ih->contiguous()) : c10::nullopt),
        weight_ih_(weight_ih), weight_hh_(weight_hh),
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel())),
        block_rows_(projection_block_rows(3 * hidden_, sizes.input_size, batch_)) {
    if (loop_.kind != StepLoop::units) {  // the products of the other loops (the units loop packs its own)
      input_projection_.emplace(input_compact_, weight_ih, bias_ih_);  // [N, 3H], in blocks
      recurrent_.emplace(weight_hh, batch_, sequence_.host.steps);
    }
    const auto options = input.options();
    const int64_t G = 3 * hidden_;
    // One block of steps' input gates, reused block after block (every row's for the row
    // split, whose workers run all steps at once).
    input_gates_block_ = reusable_empty({ProjectionBlocks::capacity(sequence_, block_rows_, loop_), G}, options);
    bias_hh_ = bias_hh.has_value() ? bias_hh->contiguous() : reusable_zeros({G}, options);
    hidden_state_ = h0.has_value() ? sequence_.slot_major(*h0) : reusable_zeros({batch_, hidden_}, options);
    recurrent_mask_ = slot_major_or_undefined(sequence_, recurrent_mask);
    if (recurrent_mask_.defined()) masked_hidden_ = reusable_empty({batch_, hidden_}, options);
    zoneout_ = zoneout.has_value() ? zoneout->contiguous() : at::Tensor();
    recurrent_scratch_ = reusable_empty({batch_, G}, options);
    output_ = reusable_empty({steps_, batch_, hidden_}, options);
    gates_ = save ? sequence_.saved_buffer(G, options) : at::empty({0}, options);
    hidden_n_ = save ? sequence_.saved_buffer(hidden_, options) : at::empty({0}, options);
  }

  // The parts of the pointwise pass that are the same at every step (all units).
  template <typename T>
  GruForwardStep<T> forward_step() {
    GruForwardStep<T> s;
    s.batch = batch_;
    s.hidden = hidden_;
    s.order = sequence_.order;
    s.input_gates = input_gates_block_.data_ptr<T>();
    s.input_first_row = 0;
    s.recurrent_first_slot = 0;
    s.bias_hh = bias_hh_.data_ptr<T>();
    s.hidden_previous = hidden_state_.data_ptr<T>();
    s.hidden_state = hidden_state_.data_ptr<T>();
    s.zoneout = zoneout_.defined() ? zoneout_.data_ptr<T>() : nullptr;
    s.output = output_.data_ptr<T>();
    s.gates = save_ ? gates_.data_ptr<T>() : nullptr;
    s.hidden_n = save_ ? hidden_n_.data_ptr<T>() : nullptr;
    s.unit_begin = 0;
    s.unit_end = hidden_;
    return s;
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::gru_forward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_, /*projected=*/false);
  }

  // The row split (sequence_cpu.h, step_loop): the input projection of every row first,
  // over all threads, then each worker runs every step for its own slots.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::gru_forward_steps_rows", std::vector<c10::IValue>());
    input_projection_->into(0, sequence_.valid_rows, input_gates_block_.data_ptr<T>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) { run_slots<T>(slot_begin, slot_end, true); });
  }

  // Every step for the slots [slot_begin, slot_end), as LstmForward::run_slots.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end, bool projected) {
    const int64_t H = hidden_, G = 3 * hidden_;
    GruForwardStep<T> s = forward_step<T>();
    ProjectionBlocks blocks(sequence_, reverse_, block_rows_);
    at::Tensor product_holder;
    s.recurrent_first_slot = slot_begin;
    for (int64_t step = 0; step < steps_; ++step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = std::min(sequence_.active[t], slot_end) - slot_begin;
      s.t = t;
      s.first_row = sequence_.first_row[t];
      if (!projected && blocks.starts_at(step)) {
        input_projection_->into(blocks.first(), blocks.rows(), input_gates_block_.data_ptr<T>());
        s.input_first_row = blocks.first();
      }
      if (n > 0) {
        // h_{t-1}, or mask * h_{t-1} with recurrent dropout, of the own slots
        const T* product_input = s.hidden_state + slot_begin * H;
        if (recurrent_mask_.defined()) {
          T* masked = masked_hidden_.data_ptr<T>() + slot_begin * H;
          masked_rows(recurrent_mask_.data_ptr<T>() + slot_begin * H, product_input, masked, n, H, 0, H);
          product_input = masked;
        }
        if (projected) sequence_.prefetch_step_rows(s.input_gates, G, step + 1, reverse_, slot_begin, slot_end);
        s.recurrent_gates = recurrent_->multiply(product_input, n, recurrent_scratch_.data_ptr<T>() + slot_begin * G,
                                                 product_holder);  // [n, 3H]
        parallel_rows(n, G, [&](int64_t j) { gru_forward_rows_entry(s, slot_begin + j, slot_begin + j + 1, save_); });
      }
      sequence_.zero_past_length(s.output, H, t, 0, H, slot_begin, slot_end);
    }
  }

  // The multi-core step loop (persistent_cpu.h), float32, as LstmForward's: worker w owns
  // hidden units units[w] (all three gates of them); per step it computes its units' input
  // gates (a block of steps at a time) and recurrent gates from its packed weight slices,
  // runs the pointwise pass on its units and writes its units of h_t; one barrier ends the step.
  void run_steps_persistent(int64_t slices) {
    RECORD_FUNCTION("rnntl_fast::gru_forward_steps_persistent", std::vector<c10::IValue>());
    const int64_t H = hidden_, G = 3 * hidden_, I = input_size_;
    const std::vector<int64_t> units = split_units(H, slices, kPanelWidth);
    GateRowSlices recurrent_panels(units, 3, H, H), input_panels(units, 3, H, I);  // W_hh, W_ih
    const at::Tensor weight_hh = weight_hh_.contiguous(), weight_ih = weight_ih_.contiguous();
    const float* const bias = bias_ih_.has_value() ? bias_ih_->data_ptr<float>() : nullptr;
    const float* const x = input_compact_.data_ptr<float>();  // [N, I]
    AlternatingState hidden(hidden_state_);
    // With recurrent dropout the products read mask * h (as LstmForward's).
    const float* const mask = recurrent_mask_.defined() ? recurrent_mask_.data_ptr<float>() : nullptr;
    c10::optional<AlternatingState> masked;
    if (mask) masked.emplace(recurrent_mask_ * hidden_state_);
    const GruForwardStep<float> common = forward_step<float>();
    float* const recurrent = recurrent_scratch_.data_ptr<float>();  // [B, 3H] W_hh h_{t-1}

    run_persistent(slices, [&](const StepWorker& worker) {
      const int64_t first = worker.first_slice(), end = worker.end_slice();
      for (int64_t w = first; w < end; ++w) {
        recurrent_panels.pack(w, weight_hh.data_ptr<float>());
        input_panels.pack(w, weight_ih.data_ptr<float>());
      }
      GruForwardStep<float> s = common;
      s.unit_begin = units[first];
      s.unit_end = units[end];
      ProjectionBlocks blocks(sequence_, reverse_, block_rows_);
      for (int64_t step = 0; step < steps_; ++step) {
        const int64_t t = sequence_.time_of(step, reverse_);
        const int64_t n = sequence_.active[t];
        s.t = t;
        s.first_row = sequence_.first_row[t];
        if (blocks.starts_at(step)) {  // each worker projects its own columns, just before they run
          float* gates = input_gates_block_.data_ptr<float>();
          s.input_first_row = blocks.first();
          for (int64_t w = first; w < end; ++w)
            input_panels.project(w, x + blocks.first() * I, I, blocks.rows(), bias, gates, G);
        }
        s.hidden_previous = hidden.read(step);
        s.hidden_state = hidden.write(step);
        if (n > 0) {
          const float* product_input = masked ? masked->read(step) : s.hidden_previous;
          for (int64_t w = first; w < end; ++w) recurrent_panels.multiply(w, product_input, H, n, recurrent, G);
          s.recurrent_gates = recurrent;
          gru_forward_rows_entry(s, 0, n, save_);
          if (masked) masked_rows(mask, s.hidden_state, masked->write(step), n, H, units[first], units[end]);
        }
        sequence_.zero_past_length(s.output, H, t, units[first], units[end]);
        worker.barrier();  // h_t complete
      }
    });
    hidden_state_ = hidden.final_state(sequence_, reverse_);
  }

  // (output [T,B,H], h_n [B,H], gates [T,B,3H], hidden_n [T,B,H]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> results() const {
    return {output_, sequence_.batch_major(hidden_state_), gates_, hidden_n_};
  }

 private:
  int64_t steps_, batch_, hidden_, input_size_;
  bool reverse_, save_;
  SequenceOrder sequence_;
  at::Tensor input_compact_;          // [N, I] the valid rows of the input
  c10::optional<at::Tensor> bias_ih_;  // [3H]
  at::Tensor weight_ih_, weight_hh_;
  StepLoop loop_;
  int64_t block_rows_;
  c10::optional<RowProjection> input_projection_;
  c10::optional<StepWeight> recurrent_;
  at::Tensor input_gates_block_;  // [block capacity, 3H] one block's input gates, reused
  at::Tensor bias_hh_;            // [3H]
  at::Tensor hidden_state_;       // [B, H] slot-major
  at::Tensor recurrent_mask_;     // [B, H] slot-major, or undefined
  at::Tensor masked_hidden_;      // [B, H] slot-major mask * h_{t-1}, with recurrent_mask
  at::Tensor zoneout_;            // [T, B, H] padded keep weights, or undefined
  at::Tensor recurrent_scratch_;  // [B, 3H]
  at::Tensor output_, gates_, hidden_n_;
};

// ------------------------------------------------------------------------------------
// Backward: allocation (constructor), the step loop (run_steps), gradient assembly.
// ------------------------------------------------------------------------------------
class GruBackward {
 public:
  GruBackward(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
              const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
              const c10::optional<at::Tensor>& h0, const at::Tensor& lengths64,
              const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
              const at::Tensor& output, const at::Tensor& gates, const at::Tensor& hidden_n, const GruSizes& sizes,
              bool reverse,
              double state_clip, double gate_clip, std::array<bool, 6> output_mask)
      : steps_(sizes.steps), batch_(sizes.batch), input_size_(sizes.input_size), hidden_(sizes.hidden), reverse_(reverse),
        state_clip_(state_clip), gate_clip_(gate_clip), mask_(output_mask), options_(input.options()),
        sequence_(lengths64, steps_, batch_),
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel())), weight_ih_(weight_ih), weight_hh_(weight_hh) {
    // dL/dh_{t-1} = z * dL/dh_t + dL/dgh @ W_hh (the multi-core loop packs its own W_hh)
    if (loop_.kind != StepLoop::units) recurrent_back_.emplace(weight_hh.t(), batch_, sequence_.host.steps);
    const int64_t N = sequence_.valid_rows, G = 3 * hidden_;
    grad_out_ = defined_or_zeros(grad_output, {steps_, batch_, hidden_}, options_);
    grad_hidden_carry_ = sequence_.slot_major(defined_or_zeros(grad_h_n, {batch_, hidden_}, options_));
    grad_input_gates_all_ = reusable_empty({N, G}, options_);
    // Each step's slots are contiguous compact rows, so dL/dgh of step t is written in place
    // where the recurrent product reads it; without a hidden-side weight gradient one
    // step's buffer is reused.
    grad_hidden_gates_all_ = reusable_empty({keep_hidden_gates() ? N : batch_, G}, options_);
    // dW_ih = grad_input_gates^T @ x; dW_hh = grad_hidden_gates^T @ h_prev (h_prev written by the steps).
    input_operand_.emplace(N, mask_[1] ? sequence_.compact_from_padded(input) : at::Tensor(), 0, options_);
    hidden_operand_.emplace(N, at::Tensor(), mask_[2] ? hidden_ : 0, options_);
    zeros_ = reusable_zeros({hidden_}, options_);
    h0_ = h0.has_value() ? h0->contiguous() : at::Tensor();
    output_ = output.contiguous();
    gates_ = gates.contiguous();
    hidden_n_ = hidden_n.contiguous();
    zoneout_ = zoneout.has_value() ? zoneout->contiguous() : at::Tensor();
    // With recurrent dropout dL/dh_{t-1} = z * dL/dh_t + mask * (dL/dgh @ W_hh): the product
    // goes to a scratch first.
    recurrent_mask_ = slot_major_or_undefined(sequence_, recurrent_mask);
    if (recurrent_mask_.defined()) recurrent_product_ = reusable_empty({batch_, hidden_}, options_);
  }

  // The parts of the pointwise pass that are the same at every step (all units).
  template <typename T>
  GruBackwardStep<T> backward_step() {
    GruBackwardStep<T> s;
    s.batch = batch_;
    s.hidden = hidden_;
    s.reverse = reverse_;
    s.sequence = &sequence_;
    s.gates = gates_.data_ptr<T>();
    s.hidden_n = hidden_n_.data_ptr<T>();
    s.output = output_.data_ptr<T>();
    s.grad_output = grad_out_.data_ptr<T>();
    s.h0 = h0_.defined() ? h0_.data_ptr<T>() : nullptr;
    s.zeros = zeros_.data_ptr<T>();
    s.zoneout = zoneout_.defined() ? zoneout_.data_ptr<T>() : nullptr;
    s.grad_hidden_carry = grad_hidden_carry_.data_ptr<T>();
    s.grad_input_gates_all = grad_input_gates_all_.data_ptr<T>();
    s.hidden_prev_all = hidden_operand_->hidden_columns<T>();
    s.hidden_prev_stride = hidden_operand_->width();
    s.recurrent_mask = recurrent_mask_.defined() ? recurrent_mask_.data_ptr<T>() : nullptr;
    s.state_clip = static_cast<T>(state_clip_);
    s.gate_clip = static_cast<T>(gate_clip_);
    s.unit_begin = 0;
    s.unit_end = hidden_;
    return s;
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::gru_backward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_);
  }

  // The row split (sequence_cpu.h, step_loop): each worker runs every step for its own slots.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::gru_backward_steps_rows", std::vector<c10::IValue>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) { run_slots<T>(slot_begin, slot_end); });
  }

  // Every step, last first, for the slots [slot_begin, slot_end), as LstmBackward::run_slots.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end) {
    const int64_t H = hidden_, G = 3 * hidden_;
    GruBackwardStep<T> s = backward_step<T>();
    T* const carry = s.grad_hidden_carry;
    T* const own_carry = carry + slot_begin * H;
    const T* const own_mask = s.recurrent_mask ? s.recurrent_mask + slot_begin * H : nullptr;
    T* const grad_hidden_gates = grad_hidden_gates_all_.data_ptr<T>();
    const bool keep = keep_hidden_gates();
    const auto slots_at = [&](int64_t t) { return std::min(sequence_.active[t], slot_end) - slot_begin; };
    // The blocks the pointwise pass of processing step `step` reads (see prefetch_block).
    const auto prefetch_step = [&](int64_t step) {
      sequence_.prefetch_step_rows(s.gates, G, step, reverse_, slot_begin, slot_end);
      sequence_.prefetch_step_rows(s.hidden_n, H, step, reverse_, slot_begin, slot_end);
      sequence_.prefetch_step_padded_rows(s.grad_output, H, step, reverse_, slot_begin, slot_end);
      sequence_.prefetch_step_padded_rows(s.output, H, step - 1, reverse_, slot_begin, slot_end);  // h_{t-1}
    };
    prefetch_step(steps_ - 1);

    for (int64_t step = steps_ - 1; step >= 0; --step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = slots_at(t);
      s.t = t;
      s.grad_hidden_gates = keep ? grad_hidden_gates + sequence_.first_row[t] * G : grad_hidden_gates;
      if (n > 0) {
        parallel_rows(n, G, [&](int64_t j) { gru_backward_rows_entry(s, slot_begin + j, slot_begin + j + 1); });
        prefetch_step(step - 1);
        const T* own_grad_hidden_gates = s.grad_hidden_gates + slot_begin * G;
        if (own_mask) {
          T* product = recurrent_product_.data_ptr<T>() + slot_begin * H;
          recurrent_back_->multiply_into(own_grad_hidden_gates, n, product);
          add_masked_rows(own_mask, product, own_carry, n, H, 0, H);
        } else {
          recurrent_back_->multiply_into(own_grad_hidden_gates, n, own_carry, /*accumulate=*/true);
        }
      }
      // Rows past their length pass their state gradient through unchanged (clamped in
      // state mode, as the reference's hooks on the carried-over state do).
      if (s.state_clip > 0) {
        for (int64_t j = std::max(sequence_.active[t], slot_begin); j < slot_end; ++j)
          for (int64_t k = 0; k < H; ++k) carry[j * H + k] = clip_value(carry[j * H + k], s.state_clip);
      }
    }
  }

  // The multi-core step loop (persistent_cpu.h), float32: worker w owns hidden units
  // units[w]; per step it adds the slices' partials of the recurrent product to its columns
  // of dL/dh_t (see PartialRecurrentProduct), runs the pointwise pass on its units (its
  // columns of dL/dgh_t and z * dL/dh_t) and multiplies its gate columns of dL/dgh_t by its
  // rows of W_hh: its partial of dL/dh_{t-1}. One barrier ends the step.
  void run_steps_persistent(int64_t slices) {
    RECORD_FUNCTION("rnntl_fast::gru_backward_steps_persistent", std::vector<c10::IValue>());
    const int64_t B = batch_, H = hidden_, G = 3 * hidden_;
    const std::vector<int64_t> units = split_units(H, slices, kPanelWidth);
    PartialRecurrentProduct recurrent_product(units, 3, H, H, B);  // dL/dh_{t-1} += dL/dgh_t @ W_hh
    const at::Tensor weight_hh = weight_hh_.contiguous();
    const GruBackwardStep<float> common = backward_step<float>();
    float* const carry = common.grad_hidden_carry;
    float* const grad_hidden_gates = grad_hidden_gates_all_.data_ptr<float>();
    const bool keep = keep_hidden_gates();

    run_persistent(slices, [&](const StepWorker& worker) {
      const int64_t first = worker.first_slice(), end = worker.end_slice();
      for (int64_t w = first; w < end; ++w) recurrent_product.pack(w, weight_hh.data_ptr<float>());
      GruBackwardStep<float> s = common;
      s.unit_begin = units[first];
      s.unit_end = units[end];
      int64_t partial_rows = 0;  // rows of the partials of the previous processing step
      for (int64_t step = steps_ - 1; step >= 0; --step) {
        const int64_t t = sequence_.time_of(step, reverse_);
        const int64_t n = sequence_.active[t];
        s.t = t;
        // A worker reads only its own columns of dL/dgh_t: without a kept buffer one step's rows do.
        s.grad_hidden_gates = grad_hidden_gates + (keep ? sequence_.first_row[t] * G : 0);
        if (partial_rows > 0)
          recurrent_product.add_into(step + 1, partial_rows, s.unit_begin, s.unit_end, s.recurrent_mask, carry,
                                     /*accumulate=*/true);
        if (n > 0) {
          gru_backward_rows_entry(s, 0, n);
          prefetch_own_rows(step - 1, s.unit_begin, s.unit_end);
          for (int64_t w = first; w < end; ++w) recurrent_product.multiply(w, s.grad_hidden_gates, G, n, step);
        }
        partial_rows = n;
        // Rows past their length pass their state gradient through (clamped in state mode).
        if (s.state_clip > 0) {
          for (int64_t j = n; j < B; ++j)
            for (int64_t k = s.unit_begin; k < s.unit_end; ++k) carry[j * H + k] = clip_value(carry[j * H + k], s.state_clip);
        }
        worker.barrier();  // the partials of dL/dh_{t-1} complete
      }
      if (partial_rows > 0)  // dL/dh_0
        recurrent_product.add_into(0, partial_rows, s.unit_begin, s.unit_end, s.recurrent_mask, carry, true);
    });
  }

  // The multi-core loop's prefetch_block (see there): a worker's units [unit_begin, unit_end)
  // of the saved gates and hidden_n and of the output gradient, of processing step `step`,
  // issued during the previous step's product.
  void prefetch_own_rows(int64_t step, int64_t unit_begin, int64_t unit_end) const {
    if (step < 0) return;
    const int64_t H = hidden_, G = 3 * hidden_, U = unit_end - unit_begin;
    const int64_t t = sequence_.time_of(step, reverse_);
    const float* gates = gates_.data_ptr<float>();
    const float* hidden_n = hidden_n_.data_ptr<float>();
    const float* grad_output = grad_out_.data_ptr<float>();
    for (int64_t j = 0; j < sequence_.active[t]; ++j) {
      const int64_t compact = sequence_.first_row[t] + j;
      for (int64_t g = 0; g < 3; ++g) prefetch_block(gates + compact * G + g * H + unit_begin, U);
      prefetch_block(hidden_n + compact * H + unit_begin, U);
      prefetch_block(grad_output + (t * batch_ + sequence_.order[j]) * H + unit_begin, U);
    }
  }

  // (grad_input [T,B,I], grad_weight_ih [3H,I], grad_weight_hh [3H,H], grad_bias_ih [3H],
  // grad_bias_hh [3H], grad_h0 [B,H]); an entry whose output_mask is false is an empty tensor.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradients() {
    // Each skipped gradient is its own empty tensor: outputs of an op must not alias.
    const auto none = [&] { return at::empty({0}, options_); };
    const at::Tensor& grad_input_gates = grad_input_gates_all_;  // [N, 3H]
    at::Tensor grad_input =
        mask_[0] ? sequence_.padded_from_compact(linear_rows(grad_input_gates, weight_ih_.t())) : none();
    input_operand_->multiply(grad_input_gates);
    at::Tensor grad_weight_ih = mask_[1] ? input_operand_->input_block(input_size_) : none();
    at::Tensor grad_bias_ih = mask_[3] ? grad_input_gates.sum(0) : none();
    if (keep_hidden_gates()) hidden_operand_->multiply(grad_hidden_gates_all_);
    at::Tensor grad_weight_hh = mask_[2] ? hidden_operand_->hidden_block(hidden_) : none();
    at::Tensor grad_bias_hh = mask_[4] ? grad_hidden_gates_all_.sum(0) : none();
    at::Tensor grad_h0 = mask_[5] ? sequence_.batch_major(grad_hidden_carry_) : none();
    return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0};
  }

 private:
  bool keep_hidden_gates() const { return mask_[2] || mask_[4]; }  // dW_hh or db_hh wanted
  int64_t steps_, batch_, input_size_, hidden_;
  bool reverse_;
  double state_clip_, gate_clip_;
  std::array<bool, 6> mask_;
  at::TensorOptions options_;
  SequenceOrder sequence_;
  StepLoop loop_;
  c10::optional<StepWeight> recurrent_back_;
  at::Tensor weight_ih_, weight_hh_;
  at::Tensor grad_out_;              // [T, B, H] padded
  at::Tensor grad_hidden_carry_;     // [B, H] slot-major
  at::Tensor grad_input_gates_all_;  // [N, 3H] compact
  at::Tensor grad_hidden_gates_all_; // [N, 3H] compact, or [2B, 3H]: two steps' rows, alternating
  c10::optional<WeightGradientOperand> input_operand_, hidden_operand_;
  at::Tensor zeros_, h0_, output_, gates_, hidden_n_;
  at::Tensor zoneout_;            // [T, B, H] padded keep weights, or undefined
  at::Tensor recurrent_mask_;     // [B, H] slot-major, or undefined
  at::Tensor recurrent_product_;  // [B, H] dL/dgh @ W_hh, with recurrent_mask
};

}  // namespace

// Returns (output [T,B,H], h_n [B,H], gates [T,B,3H], hidden_n [T,B,H]); the last two
// are empty unless save_for_backward. Zoneout needs nothing more saved: the backward reads
// the carried h_{t-1} from the output and n from the gates. With lengths, gates and hidden_n hold the compact
// rows first (the layout is private to this op, see docs/cpu.md).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout, bool reverse,
    double state_clip, double gate_clip, bool save_for_backward) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const GruSizes sizes =
      check_gru_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, state_clip, gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  check_optional(recurrent_mask, input, {sizes.batch, sizes.hidden}, "recurrent_mask");
  check_optional(zoneout, input, {sizes.steps, sizes.batch, sizes.hidden}, "zoneout");
  GruForward forward(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths64, recurrent_mask, zoneout, sizes,
                     reverse, save_for_backward);
  forward.run(input.scalar_type());
  return forward.results();
}

// Returns (grad_input [T,B,I], grad_weight_ih [3H,I], grad_weight_hh [3H,H],
// grad_bias_ih [3H], grad_bias_hh [3H], grad_h0 [B,H]); an entry whose output_mask is
// false is an empty tensor and costs nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& hidden_n, bool reverse, double state_clip,
    double gate_clip, std::array<bool, 6> output_mask) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const GruSizes sizes = check_gru_backward_arguments(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, output,
                                                      gates, hidden_n, state_clip, gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  check_optional(recurrent_mask, input, {sizes.batch, sizes.hidden}, "recurrent_mask");
  check_optional(zoneout, input, {sizes.steps, sizes.batch, sizes.hidden}, "zoneout");
  GruBackward backward(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths64, recurrent_mask, zoneout,
                       output, gates, hidden_n, sizes, reverse, state_clip, gate_clip, output_mask);
  backward.run(input.scalar_type());
  return backward.gradients();
}

}  // namespace cpu
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CPU, m) {
  m.impl("gru_forward", &rnntl::cpu::gru_forward_cpu);
  m.impl("gru_backward", &rnntl::cpu::gru_backward_cpu);
}
