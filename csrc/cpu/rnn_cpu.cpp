// Elman RNN (torch.nn.RNN's cell, tanh or relu) over a whole sequence, one layer and one
// direction, on the CPU, with the regularizer arguments of docs/semantics.md section 10:
//   a_t = W_ih x_t + b_ih + W_hh (m * h_{t-1}) + b_hh,  h~_t = f(a_t),
//   h_t = d_t * h_{t-1} + (1 - d_t) * h~_t   (zoneout keep weights d; without them h_t = h~_t).
// Same structure and layout as gru_cpu.cpp's step-at-a-time loop: the input projection in
// blocks of steps (ProjectionBlocks), per step a recurrent GEMM over the running rows and a
// fused pointwise pass; backward per step, then the whole-sequence products dL/dx and
// dL/d[W_ih | W_hh] (one product: both weights' gradients share dL/da) for what is wanted.
// Two step loops run it (sequence_cpu.h's step_loop): run_steps, a step at a time, and
// run_steps_rows, in which each thread runs every step for its own batch rows.
// Shapes: input [T, B, I]; weight_ih [H, I]; weight_hh [H, H]; biases [H]; h0 [B, H];
// recurrent_mask [B, H]; zoneout [T, B, H]. "Slot-major" buffers hold row order[j] in slot j;
// the whole-sequence buffers (saved activations, dL/da, the weight-gradient operand) hold
// only the N = valid_rows rows of SequenceOrder's compact layout.
#include "gemm_cpu.h"
#include "kernels_cpu.h"
#include "sequence_cpu.h"

#include <rnntl/cell_math.h>

namespace rnntl {
namespace cpu {
namespace {

template <typename T>
struct RnnForwardStep {
  int64_t batch, hidden, t;
  int64_t first_row;          // compact row of slot 0 at step t
  const int64_t* order;
  const T* input_gates;       // [rows, H] W_ih x + b_ih of compact rows input_first_row...
  int64_t input_first_row;
  const T* recurrent;         // [n, H]    W_hh (m * h_{t-1}) of slots recurrent_first_slot, ... (no bias)
  int64_t recurrent_first_slot;
  const T* bias_hh;           // [H]       b_hh, or zeros
  T* hidden_state;            // [B, H]    slot-major h_{t-1} in, h_t out
  const T* recurrent_mask;    // [B, H]    slot-major m, or nullptr
  T* masked_state;            // [B, H]    slot-major m * h_t (the next product's operand), with a mask
  const T* zoneout;           // [T, B, H] padded keep weights d, or nullptr
  T* output;                  // [T, B, H] padded
  T* activations;             // [N, H]    compact h~_t, when saving with zoneout
};

template <typename T, bool kRelu, bool kZoneout>
RNNTL_ROW_INLINE void rnn_forward_row(const RnnForwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden;
  const int64_t b = s.order[j];
  const int64_t row = s.t * s.batch + b;      // padded row (output, zoneout)
  const int64_t compact = s.first_row + j;    // compact row (the whole-sequence buffers)
  const T* __restrict__ x = s.input_gates + (compact - s.input_first_row) * H;
  const T* __restrict__ r = s.recurrent + (j - s.recurrent_first_slot) * H;
  const T* __restrict__ bias = s.bias_hh;
  T* __restrict__ h = s.hidden_state + j * H;
  T* __restrict__ out = s.output + row * H;
  const T* __restrict__ keep = kZoneout ? s.zoneout + row * H : nullptr;
  T* __restrict__ fresh_saved = kZoneout && s.activations ? s.activations + compact * H : nullptr;
  const T* __restrict__ mask = s.recurrent_mask ? s.recurrent_mask + j * H : nullptr;
  T* __restrict__ masked = mask ? s.masked_state + j * H : nullptr;
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T fresh = rnn_activation<kRelu>(x[k] + (r[k] + bias[k]));
    T value = fresh;
    if constexpr (kZoneout) {
      value = zoneout_blend(keep[k], h[k], fresh);
      if (fresh_saved) fresh_saved[k] = fresh;
    }
    h[k] = value;
    out[k] = value;
    if (masked) masked[k] = mask[k] * value;
  }
}

template <typename T>
RNNTL_ROW_INLINE void rnn_forward_rows(const RnnForwardStep<T>& s, int64_t begin, int64_t end, bool relu) {
  const bool zoneout = s.zoneout != nullptr;
  for (int64_t j = begin; j < end; ++j) {
    if (relu)
      zoneout ? rnn_forward_row<T, true, true>(s, j) : rnn_forward_row<T, true, false>(s, j);
    else
      zoneout ? rnn_forward_row<T, false, true>(s, j) : rnn_forward_row<T, false, false>(s, j);
  }
}

RNNTL_VECTOR_CLONES void rnn_forward_rows_entry(const RnnForwardStep<float>& s, int64_t begin, int64_t end,
                                                bool relu) {
  rnn_forward_rows(s, begin, end, relu);
}
void rnn_forward_rows_entry(const RnnForwardStep<double>& s, int64_t begin, int64_t end, bool relu) {
  rnn_forward_rows(s, begin, end, relu);
}

template <typename T>
struct RnnBackwardStep {
  int64_t batch, hidden, t;
  bool reverse;
  const SequenceOrder* sequence;
  const T* output;            // [T, B, H] padded h_t (and h~_t without zoneout)
  const T* activations;       // [N, H]    compact h~_t, with zoneout
  const T* grad_output;       // [T, B, H] padded
  const T* h0;                // [B, H] or nullptr
  const T* zeros;             // [H]
  const T* recurrent_mask;    // [B, H] slot-major, or nullptr
  const T* zoneout;           // [T, B, H] padded, or nullptr
  T* grad_hidden_carry;       // [B, H]  slot-major: dL/dh_t from step t+1 in, d * dL/dh_t out
                              //         with zoneout (the caller then adds m * (dL/da @ W_hh))
  T* grad_preactivation;      // [n, H]  dL/da of step t's slots
  T* hidden_prev_all;         // m * h_{t-1} of compact row r at r * hidden_prev_stride, or nullptr
  int64_t hidden_prev_stride;
  T state_clip, gate_clip;
};

template <typename T, bool kRelu, bool kZoneout>
RNNTL_ROW_INLINE void rnn_backward_row(const RnnBackwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden;
  const int64_t b = s.sequence->order[j];
  const int64_t row = s.t * s.batch + b;                   // padded (output, grad_output, zoneout)
  const int64_t compact = s.sequence->first_row[s.t] + j;  // compact (the whole-sequence buffers)
  const T* __restrict__ fresh = kZoneout ? s.activations + compact * H : s.output + row * H;
  const T* __restrict__ keep = kZoneout ? s.zoneout + row * H : nullptr;
  const T* __restrict__ go = s.grad_output + row * H;
  T* __restrict__ carry = s.grad_hidden_carry + j * H;
  T* __restrict__ da = s.grad_preactivation + j * H;
  const T state_clip = s.state_clip, gate_clip = s.gate_clip;
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T dh = clip_value(carry[k] + go[k], state_clip);
    T grad_fresh = dh;
    if constexpr (kZoneout) {
      grad_fresh = dh * (T(1) - keep[k]);
      carry[k] = dh * keep[k];
    }
    da[k] = rnn_preactivation_gradient<kRelu>(fresh[k], grad_fresh, gate_clip);
  }
  if (s.hidden_prev_all) {  // the operand of dL/dW_hh: m * h_{t-1}
    const bool first = s.sequence->is_first_step(b, s.t, s.reverse);
    const int64_t prev_row = SequenceOrder::previous_step(s.t, s.reverse) * s.batch + b;
    const T* __restrict__ h_prev = first ? (s.h0 ? s.h0 + b * H : s.zeros) : s.output + prev_row * H;
    T* operand = s.hidden_prev_all + compact * s.hidden_prev_stride;
    if (s.recurrent_mask) {
      masked_rows(s.recurrent_mask + j * H, h_prev, operand, 1, H, 0, H);
    } else {
      std::copy(h_prev, h_prev + H, operand);
    }
  }
}

template <typename T>
RNNTL_ROW_INLINE void rnn_backward_rows(const RnnBackwardStep<T>& s, int64_t begin, int64_t end, bool relu) {
  const bool zoneout = s.zoneout != nullptr;
  for (int64_t j = begin; j < end; ++j) {
    if (relu)
      zoneout ? rnn_backward_row<T, true, true>(s, j) : rnn_backward_row<T, true, false>(s, j);
    else
      zoneout ? rnn_backward_row<T, false, true>(s, j) : rnn_backward_row<T, false, false>(s, j);
  }
}

RNNTL_VECTOR_CLONES void rnn_backward_rows_entry(const RnnBackwardStep<float>& s, int64_t begin, int64_t end,
                                                 bool relu) {
  rnn_backward_rows(s, begin, end, relu);
}
void rnn_backward_rows_entry(const RnnBackwardStep<double>& s, int64_t begin, int64_t end, bool relu) {
  rnn_backward_rows(s, begin, end, relu);
}

c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------------------------------
// Forward: allocation (constructor), the step loop (run_steps), the results.
// ------------------------------------------------------------------------------------
class RnnForward {
 public:
  RnnForward(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
             const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
             const c10::optional<at::Tensor>& h0, const at::Tensor& lengths64,
             const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
             const RnnSizes& sizes, bool relu, bool reverse, bool save)
      : steps_(sizes.steps), batch_(sizes.batch), hidden_(sizes.hidden), relu_(relu), reverse_(reverse),
        sequence_(lengths64, steps_, batch_),
        input_projection_(sequence_.compact_from_padded(input), weight_ih, contiguous_or_none(bias_ih)),
        recurrent_(weight_hh, batch_, sequence_.host.steps),
        block_rows_(projection_block_rows(hidden_, sizes.input_size, batch_)),
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel(), FewRowsLoop::none)),
        recurrent_mask_(slot_major_or_undefined(sequence_, recurrent_mask)), zoneout_(contiguous_or_none(zoneout)) {
    const auto options = input.options();
    // One block of steps' input gates, reused (every row's for the row split).
    input_gates_block_ = reusable_empty({ProjectionBlocks::capacity(sequence_, block_rows_, loop_), hidden_}, options);
    bias_hh_ = bias_hh.has_value() ? bias_hh->contiguous() : reusable_zeros({hidden_}, options);
    hidden_state_ = h0.has_value() ? sequence_.slot_major(*h0) : reusable_zeros({batch_, hidden_}, options);
    // The first product's operand m * h0; each step then writes the next one.
    if (recurrent_mask_.defined()) masked_state_ = hidden_state_ * recurrent_mask_;
    recurrent_scratch_ = reusable_empty({batch_, hidden_}, options);
    output_ = reusable_empty({steps_, batch_, hidden_}, options);
    // Without zoneout h~_t is the output itself: nothing more to keep.
    activations_ = save && zoneout_.has_value() ? sequence_.saved_buffer(hidden_, options) : at::empty({0}, options);
  }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::rnn_forward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_, /*projected=*/false);
  }

  // The row split (sequence_cpu.h, step_loop): the input projection of every row first,
  // then each worker runs every step for its own slots.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::rnn_forward_steps_rows", std::vector<c10::IValue>());
    input_projection_.into(0, sequence_.valid_rows, input_gates_block_.data_ptr<T>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) { run_slots<T>(slot_begin, slot_end, true); });
  }

  // Every step for the slots [slot_begin, slot_end), as LstmForward::run_slots.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end, bool projected) {
    RnnForwardStep<T> s;
    s.batch = batch_;
    s.hidden = hidden_;
    s.order = sequence_.order;
    s.input_gates = input_gates_block_.data_ptr<T>();
    s.input_first_row = 0;
    s.bias_hh = bias_hh_.data_ptr<T>();
    s.hidden_state = hidden_state_.data_ptr<T>();
    s.recurrent_mask = data_or_null<T>(recurrent_mask_);
    s.masked_state = masked_state_.defined() ? masked_state_.data_ptr<T>() : nullptr;
    s.zoneout = data_or_null<T>(zoneout_);
    s.output = output_.data_ptr<T>();
    s.activations = activations_.numel() ? activations_.data_ptr<T>() : nullptr;
    s.recurrent_first_slot = slot_begin;
    // The product reads m * h_{t-1} with a mask, else h_{t-1} (the own slots' rows).
    const T* operand = (s.masked_state ? s.masked_state : s.hidden_state) + slot_begin * hidden_;
    T* const scratch = recurrent_scratch_.data_ptr<T>() + slot_begin * hidden_;
    ProjectionBlocks blocks(sequence_, reverse_, block_rows_);
    at::Tensor product_holder;
    for (int64_t step = 0; step < steps_; ++step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = std::min(sequence_.active[t], slot_end) - slot_begin;
      s.t = t;
      s.first_row = sequence_.first_row[t];
      if (!projected && blocks.starts_at(step)) {
        input_projection_.into(blocks.first(), blocks.rows(), input_gates_block_.data_ptr<T>());
        s.input_first_row = blocks.first();
      }
      if (n > 0) {
        if (projected) sequence_.prefetch_step_rows(s.input_gates, hidden_, step + 1, reverse_, slot_begin, slot_end);
        s.recurrent = recurrent_.multiply(operand, n, scratch, product_holder);  // [n, H]
        parallel_rows(n, hidden_,
                      [&](int64_t j) { rnn_forward_rows_entry(s, slot_begin + j, slot_begin + j + 1, relu_); });
      }
      sequence_.zero_past_length(s.output, hidden_, t, 0, hidden_, slot_begin, slot_end);
    }
  }

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  // (output [T,B,H], h_n [B,H], activations [T,B,H] or [0]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> results() const {
    return {output_, sequence_.batch_major(hidden_state_), activations_};
  }

 private:
  int64_t steps_, batch_, hidden_;
  bool relu_, reverse_;
  SequenceOrder sequence_;
  RowProjection input_projection_;  // [N, H] = x_compact W_ih^T + b_ih, in blocks
  StepWeight recurrent_;
  int64_t block_rows_;
  StepLoop loop_;
  at::Tensor recurrent_mask_;      // [B, H] slot-major, or undefined
  c10::optional<at::Tensor> zoneout_;
  at::Tensor input_gates_block_;  // [block capacity, H] one block's input gates, reused
  at::Tensor bias_hh_;            // [H]
  at::Tensor hidden_state_;       // [B, H] slot-major
  at::Tensor masked_state_;       // [B, H] slot-major m * h, with a mask
  at::Tensor recurrent_scratch_;  // [B, H]
  at::Tensor output_, activations_;
};

// ------------------------------------------------------------------------------------
// Backward: allocation (constructor), the step loop (run_steps), gradient assembly.
// ------------------------------------------------------------------------------------
class RnnBackward {
 public:
  RnnBackward(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
              const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
              const c10::optional<at::Tensor>& h0, const at::Tensor& lengths64,
              const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
              const at::Tensor& output, const at::Tensor& activations, const RnnSizes& sizes, bool relu, bool reverse,
              double state_clip, double gate_clip, std::array<bool, 6> output_mask)
      : steps_(sizes.steps), batch_(sizes.batch), input_size_(sizes.input_size), hidden_(sizes.hidden), relu_(relu),
        reverse_(reverse), state_clip_(state_clip), gate_clip_(gate_clip), mask_(output_mask),
        options_(input.options()), sequence_(lengths64, steps_, batch_),
        recurrent_back_(weight_hh.t(), batch_, sequence_.host.steps),  // dL/d(m * h_{t-1}) = dL/da @ W_hh
        loop_(step_loop(input, weight_hh, hidden_, weight_hh.numel(), FewRowsLoop::none)), weight_ih_(weight_ih),
        recurrent_mask_(slot_major_or_undefined(sequence_, recurrent_mask)),
        zoneout_(contiguous_or_none(zoneout)) {
    const int64_t N = sequence_.valid_rows, H = hidden_;
    grad_out_ = defined_or_zeros(grad_output, {steps_, batch_, H}, options_);
    grad_hidden_carry_ = sequence_.slot_major(defined_or_zeros(grad_h_n, {batch_, H}, options_));
    // dL/da of every step where a whole-sequence product reads it, else one step's rows.
    grad_preactivation_all_ = reusable_empty({keep_preactivation_gradients() ? N : batch_, H}, options_);
    if (recurrent_mask_.defined()) recurrent_scratch_ = reusable_empty({batch_, H}, options_);
    // dL/d[W_ih | W_hh] = (dL/da)^T @ [x | m * h_{t-1}] (m * h_{t-1} written by the steps).
    weight_operand_.emplace(N, mask_[1] ? sequence_.compact_from_padded(input) : at::Tensor(), mask_[2] ? H : 0,
                            options_);
    zeros_ = reusable_zeros({H}, options_);
    h0_ = h0.has_value() ? h0->contiguous() : at::Tensor();
    output_ = output.contiguous();
    activations_ = zoneout_.has_value() ? activations.contiguous() : at::Tensor();
  }

  template <typename T>
  void run_steps() {
    RECORD_FUNCTION("rnntl_fast::rnn_backward_steps", std::vector<c10::IValue>());
    run_slots<T>(0, batch_);
  }

  // The row split (sequence_cpu.h, step_loop): each worker runs every step for its own slots.
  template <typename T>
  void run_steps_rows(int64_t workers) {
    RECORD_FUNCTION("rnntl_fast::rnn_backward_steps_rows", std::vector<c10::IValue>());
    run_row_split(sequence_, workers,
                  [&](int64_t slot_begin, int64_t slot_end) { run_slots<T>(slot_begin, slot_end); });
  }

  // Every step, last first, for the slots [slot_begin, slot_end), as LstmBackward::run_slots.
  template <typename T>
  void run_slots(int64_t slot_begin, int64_t slot_end) {
    const int64_t H = hidden_;
    RnnBackwardStep<T> s;
    s.batch = batch_;
    s.hidden = H;
    s.reverse = reverse_;
    s.sequence = &sequence_;
    s.output = output_.data_ptr<T>();
    s.activations = activations_.defined() ? activations_.data_ptr<T>() : nullptr;
    s.grad_output = grad_out_.data_ptr<T>();
    s.h0 = h0_.defined() ? h0_.data_ptr<T>() : nullptr;
    s.zeros = zeros_.data_ptr<T>();
    s.recurrent_mask = data_or_null<T>(recurrent_mask_);
    s.zoneout = data_or_null<T>(zoneout_);
    s.grad_hidden_carry = grad_hidden_carry_.data_ptr<T>();
    s.hidden_prev_all = weight_operand_->hidden_columns<T>();
    s.hidden_prev_stride = weight_operand_->width();
    s.state_clip = static_cast<T>(state_clip_);
    s.gate_clip = static_cast<T>(gate_clip_);
    T* const carry = s.grad_hidden_carry;
    T* const own_carry = carry + slot_begin * H;
    const T* const own_mask = s.recurrent_mask ? s.recurrent_mask + slot_begin * H : nullptr;
    T* const grad_preactivation = grad_preactivation_all_.data_ptr<T>();
    T* const scratch = recurrent_scratch_.defined() ? recurrent_scratch_.data_ptr<T>() + slot_begin * H : nullptr;
    const bool keep = keep_preactivation_gradients(), zoneout = s.zoneout != nullptr;

    for (int64_t step = steps_ - 1; step >= 0; --step) {
      const int64_t t = sequence_.time_of(step, reverse_);
      const int64_t n = std::min(sequence_.active[t], slot_end) - slot_begin;
      s.t = t;
      s.grad_preactivation = keep ? grad_preactivation + sequence_.first_row[t] * H : grad_preactivation;
      if (n > 0) {
        parallel_rows(n, H, [&](int64_t j) { rnn_backward_rows_entry(s, slot_begin + j, slot_begin + j + 1, relu_); });
        const T* own_grad = s.grad_preactivation + slot_begin * H;
        if (own_mask) {
          // dL/dh_{t-1} (+)= m * (dL/da @ W_hh): the mask is per row, so not inside the product.
          recurrent_back_.multiply_into(own_grad, n, scratch);
          if (zoneout) {
            add_masked_rows(own_mask, scratch, own_carry, n, H, 0, H);
          } else {
            masked_rows(own_mask, scratch, own_carry, n, H, 0, H);
          }
        } else {
          // Without zoneout the step's rows of dL/dh_{t-1} are the product alone.
          recurrent_back_.multiply_into(own_grad, n, own_carry, /*accumulate=*/zoneout);
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

  // Runs the steps on the loop step_loop() chose for this sequence.
  void run(at::ScalarType dtype) { run_chosen_loop(*this, loop_, dtype); }

  // (grad_input [T,B,I], grad_weight_ih [H,I], grad_weight_hh [H,H], grad_bias_ih [H],
  // grad_bias_hh [H], grad_h0 [B,H]); an entry whose output_mask is false is an empty tensor.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradients() {
    // Each skipped gradient is its own empty tensor: outputs of an op must not alias.
    const auto none = [&] { return at::empty({0}, options_); };
    const at::Tensor& grad_a = grad_preactivation_all_;  // [N, H] when kept
    at::Tensor grad_input = mask_[0] ? sequence_.padded_from_compact(linear_rows(grad_a, weight_ih_.t())) : none();
    weight_operand_->multiply(grad_a);
    at::Tensor grad_weight_ih = mask_[1] ? weight_operand_->input_block(input_size_) : none();
    at::Tensor grad_weight_hh = mask_[2] ? weight_operand_->hidden_block(hidden_) : none();
    // Both biases receive dL/da; the second is a copy (outputs must not alias).
    at::Tensor grad_bias = mask_[3] || mask_[4] ? grad_a.sum(0) : at::Tensor();
    at::Tensor grad_bias_ih = mask_[3] ? grad_bias : none();
    at::Tensor grad_bias_hh = mask_[4] ? (mask_[3] ? grad_bias.clone() : grad_bias) : none();
    at::Tensor grad_h0 = mask_[5] ? sequence_.batch_major(grad_hidden_carry_) : none();
    return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0};
  }

 private:
  // dL/da of every step is kept where dL/dx, a weight or a bias gradient is wanted.
  bool keep_preactivation_gradients() const { return mask_[0] || mask_[1] || mask_[2] || mask_[3] || mask_[4]; }
  int64_t steps_, batch_, input_size_, hidden_;
  bool relu_, reverse_;
  double state_clip_, gate_clip_;
  std::array<bool, 6> mask_;
  at::TensorOptions options_;
  SequenceOrder sequence_;
  StepWeight recurrent_back_;
  StepLoop loop_;
  at::Tensor weight_ih_;
  at::Tensor recurrent_mask_;          // [B, H] slot-major, or undefined
  c10::optional<at::Tensor> zoneout_;
  at::Tensor grad_out_;                // [T, B, H] padded
  at::Tensor grad_hidden_carry_;       // [B, H] slot-major
  at::Tensor grad_preactivation_all_;  // [N, H] compact, or [B, H]: one step's rows
  at::Tensor recurrent_scratch_;       // [B, H] dL/da @ W_hh of one step, with a mask
  c10::optional<WeightGradientOperand> weight_operand_;
  at::Tensor zeros_, h0_, output_, activations_;
};

}  // namespace

// Returns (output [T,B,H], h_n [B,H], activations [T,B,H]); activations (h~_t = f(a_t),
// the compact rows first: docs/cpu.md) is empty unless save_for_backward and zoneout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout, bool relu,
    bool reverse, double state_clip, double gate_clip, bool save_for_backward) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const RnnSizes sizes = check_rnn_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0,
                                                     recurrent_mask, zoneout, state_clip, gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  RnnForward forward(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths64, recurrent_mask, zoneout, sizes,
                     relu, reverse, save_for_backward);
  forward.run(input.scalar_type());
  return forward.results();
}

// Returns (grad_input [T,B,I], grad_weight_ih [H,I], grad_weight_hh [H,H], grad_bias_ih [H],
// grad_bias_hh [H], grad_h0 [B,H]); an entry whose output_mask is false is an empty tensor
// and costs nothing. recurrent_mask and zoneout get no gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const at::Tensor& output, const at::Tensor& activations, bool relu, bool reverse, double state_clip,
    double gate_clip, std::array<bool, 6> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const RnnSizes sizes = check_rnn_backward_arguments(grad_output, grad_h_n, input, weight_ih, weight_hh, h0,
                                                      recurrent_mask, zoneout, output, activations, state_clip,
                                                      gate_clip);
  const at::Tensor lengths64 = checked_lengths(lengths, sizes.steps, sizes.batch);
  RnnBackward backward(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths64, recurrent_mask, zoneout,
                       output, activations, sizes, relu, reverse, state_clip, gate_clip, output_mask);
  backward.run(input.scalar_type());
  return backward.gradients();
}

}  // namespace cpu
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CPU, m) {
  m.impl("rnn_forward", &rnntl::cpu::rnn_forward_cpu);
  m.impl("rnn_backward", &rnntl::cpu::rnn_backward_cpu);
}
