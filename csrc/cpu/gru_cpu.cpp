// GRU ("reset after", as torch.nn and cuDNN) over a whole sequence, one layer and one
// direction, on the CPU. Same structure as lstm_cpu.cpp: the input projection in blocks of steps, per
// step a recurrent GEMM over the running rows and a fused pointwise pass; backward per
// step, then the weight-gradient GEMMs over all steps for the weights that need them.
// Shapes: input [T, B, I]; weight_ih [3H, I]; weight_hh [3H, H]; biases [3H]; h0 [B, H].
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
  const int64_t* order;
  const T* input_gates;      // [steps, B, 3H] W_ih x + b_ih of steps input_first_step...
  int64_t input_first_step;
  T* recurrent_gates;        // [B, 3H]    slot-major W_hh h_{t-1} (no bias); r, z written over it
  const T* bias_hh;          // [3H]       b_hh, or zeros
  T* hidden_state;           // [B, H]     slot-major
  T* output;                 // [T, B, H]
  T* gates;                  // [T, B, 3H] activations r, z, n, when saving for backward
  T* hidden_n;               // [T, B, H]  W_hn h_{t-1} + b_hn, when saving
};

template <typename T, bool kSave>
RNNTL_ROW_INLINE void gru_forward_row(const GruForwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 3 * s.hidden;
  const int64_t row = s.t * s.batch + s.order[j];
  const T* __restrict__ x = s.input_gates + (row - s.input_first_step * s.batch) * G;
  // r and z overwrite the recurrent product in place when not saved (element k is read
  // before it is written), so r is not __restrict__.
  const T* r = s.recurrent_gates + j * G;
  T* rz = kSave ? s.gates + row * G : s.recurrent_gates + j * G;
  const T* __restrict__ bias = s.bias_hh;
  T* __restrict__ h = s.hidden_state + j * H;
  T* __restrict__ out = s.output + row * H;
  T* __restrict__ hidden_n = kSave ? s.hidden_n + row * H : nullptr;
  // Two passes (see gru_candidate_update): the independent r and z first, then n and h.
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T reset = sigmoid(x[k] + r[k] + bias[k]);
    const T update = sigmoid(x[H + k] + r[H + k] + bias[H + k]);
    rz[k] = reset;
    rz[H + k] = update;
  }
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T hn = r[2 * H + k] + bias[2 * H + k];
    GruForwardElement<T> e;
    gru_candidate_update(rz[k], rz[H + k], x[2 * H + k], hn, h[k], e);
    h[k] = e.hidden;
    out[k] = e.hidden;
    if (kSave) {
      rz[2 * H + k] = e.n;
      hidden_n[k] = hn;
    }
  }
}

template <typename T>
RNNTL_ROW_INLINE void gru_forward_rows(const GruForwardStep<T>& s, int64_t begin, int64_t end, bool save) {
  for (int64_t j = begin; j < end; ++j) save ? gru_forward_row<T, true>(s, j) : gru_forward_row<T, false>(s, j);
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
  const T* gates;             // [T, B, 3H]
  const T* hidden_n;          // [T, B, H]
  const T* output;            // [T, B, H]
  const T* grad_output;       // [T, B, H]
  const T* h0;                // [B, H] or nullptr
  const T* zeros;             // [H]
  T* grad_hidden_carry;       // [B, H]  slot-major: dL/dh_t from step t+1 in, z * dL/dh_t out
                              //         (the caller then adds dL/dgh @ W_hh)
  T* grad_hidden_gates;       // [B, 3H] slot-major dL/d(W_hh h + b_hh)
  T* grad_hidden_gates_all;   // [T, B, 3H] or nullptr (may alias grad_hidden_gates)
  T* grad_input_gates_all;    // [T, B, 3H] dL/d(W_ih x + b_ih)
  T* hidden_prev_all;         // h_{t-1} of row r at r * hidden_prev_stride, or nullptr
  int64_t hidden_prev_stride;
  T state_clip, gate_clip;
};

template <typename T>
RNNTL_ROW_INLINE void gru_backward_row(const GruBackwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 3 * s.hidden;
  const int64_t b = s.sequence->order[j];
  const int64_t row = s.t * s.batch + b;
  const bool first = s.sequence->is_first_step(b, s.t, s.reverse);
  const int64_t prev_row = SequenceOrder::previous_step(s.t, s.reverse) * s.batch + b;
  const T* __restrict__ h_prev = first ? (s.h0 ? s.h0 + b * H : s.zeros) : s.output + prev_row * H;
  const T* __restrict__ act = s.gates + row * G;
  const T* __restrict__ hn = s.hidden_n + row * H;
  const T* __restrict__ go = s.grad_output + row * H;
  T* __restrict__ carry = s.grad_hidden_carry + j * H;
  T* __restrict__ dgh = s.grad_hidden_gates + j * G;
  T* __restrict__ dgi = s.grad_input_gates_all + row * G;
  const T state_clip = s.state_clip, gate_clip = s.gate_clip;
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T dh = clip_value(carry[k] + go[k], state_clip);
    const GruBackwardElement<T> e =
        gru_element_backward(act[k], act[H + k], act[2 * H + k], hn[k], h_prev[k], dh, gate_clip);
    dgi[k] = e.d_r;
    dgi[H + k] = e.d_z;
    dgi[2 * H + k] = e.d_n;
    dgh[k] = e.d_r;
    dgh[H + k] = e.d_z;
    dgh[2 * H + k] = e.d_hidden_n;
    carry[k] = e.grad_hidden_prev;
  }
  if (s.grad_hidden_gates_all) {
    T* all = s.grad_hidden_gates_all + row * G;
    if (all != dgh) std::copy(dgh, dgh + G, all);
  }
  if (s.hidden_prev_all) std::copy(h_prev, h_prev + H, s.hidden_prev_all + row * s.hidden_prev_stride);
}

template <typename T>
RNNTL_ROW_INLINE void gru_backward_rows(const GruBackwardStep<T>& s, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) gru_backward_row(s, j);
}

RNNTL_VECTOR_CLONES void gru_backward_rows_entry(const GruBackwardStep<float>& s, int64_t begin, int64_t end) {
  gru_backward_rows(s, begin, end);
}
void gru_backward_rows_entry(const GruBackwardStep<double>& s, int64_t begin, int64_t end) {
  gru_backward_rows(s, begin, end);
}

}  // namespace

// Returns (output [T,B,H], h_n [B,H], gates [T,B,3H], hidden_n [T,B,H]); the last two
// are empty unless save_for_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths, bool reverse,
    double state_clip, double gate_clip, bool save_for_backward) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const GruSizes sizes =
      check_gru_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, G = 3 * H;
  const at::Tensor lengths64 = checked_lengths(lengths, T, B);
  const auto options = input.options();

  // The input projection, a few steps at a time just before they run (see RowProjection),
  // into a buffer reused block after block.
  const RowProjection input_projection(input.contiguous().view({T * B, I}), weight_ih, bias_ih);
  const int64_t block_steps = std::max<int64_t>(1, projection_block_rows(G, I, B) / std::max<int64_t>(B, 1));
  at::Tensor input_gates_block = at::empty({std::min(block_steps, T) * B, G}, options);
  const at::Tensor bias = bias_hh.has_value() ? bias_hh->contiguous() : at::zeros({G}, options);
  const SequenceOrder sequence(lengths64, T, B);
  const at::Tensor order_tensor = sequence.order_tensor();
  at::Tensor hidden_state = h0.has_value() ? h0->index_select(0, order_tensor) : at::zeros({B, H}, options);
  at::Tensor recurrent_scratch = at::empty({B, G}, options);
  at::Tensor output = at::empty({T, B, H}, options);
  at::Tensor gates = empty_if(save_for_backward, {T, B, G}, options);
  at::Tensor hidden_n = empty_if(save_for_backward, {T, B, H}, options);
  const StepWeight recurrent(weight_hh, B);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_forward_cpu", [&] {
    RECORD_FUNCTION("rnntl_fast::gru_forward_steps", std::vector<c10::IValue>());
    using T_ = scalar_t;
    GruForwardStep<T_> s;
    s.batch = B;
    s.hidden = H;
    s.order = sequence.order;
    s.input_gates = input_gates_block.data_ptr<T_>();
    s.bias_hh = bias.data_ptr<T_>();
    s.hidden_state = hidden_state.data_ptr<T_>();
    s.output = output.data_ptr<T_>();
    s.gates = save_for_backward ? gates.data_ptr<T_>() : nullptr;
    s.hidden_n = save_for_backward ? hidden_n.data_ptr<T_>() : nullptr;
    at::Tensor product_holder;
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? T - 1 - step : step;
      const int64_t n = sequence.active[t];
      s.t = t;
      if (step % block_steps == 0) {
        // Steps [step, step + steps) in processing order: padded rows of t_low... (one range).
        const int64_t steps = std::min(block_steps, T - step);
        const int64_t t_low = reverse ? T - step - steps : step;
        input_projection.into(t_low * B, steps * B, input_gates_block.data_ptr<T_>());
        s.input_first_step = t_low;
      }
      if (n > 0) {
        s.recurrent_gates =
            recurrent.multiply(s.hidden_state, n, recurrent_scratch.data_ptr<T_>(), product_holder);  // [n, 3H]
        parallel_rows(n, G, [&](int64_t j) { gru_forward_rows_entry(s, j, j + 1, save_for_backward); });
      }
      for (int64_t j = n; j < B; ++j) {
        const int64_t row = t * B + sequence.order[j];
        std::fill_n(s.output + row * H, H, T_(0));
        if (save_for_backward) {
          std::fill_n(s.gates + row * G, G, T_(0));
          std::fill_n(s.hidden_n + row * H, H, T_(0));
        }
      }
    }
  });

  at::Tensor h_n = at::empty({B, H}, options);
  h_n.index_copy_(0, order_tensor, hidden_state);
  return {output, h_n, gates, hidden_n};
}

// Returns (grad_input [T,B,I], grad_weight_ih [3H,I], grad_weight_hh [3H,H],
// grad_bias_ih [3H], grad_bias_hh [3H], grad_h0 [B,H]); an entry whose output_mask is
// false is an empty tensor and costs nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& hidden_n, bool reverse, double state_clip,
    double gate_clip, std::array<bool, 6> output_mask) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const GruSizes sizes = check_gru_backward_arguments(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, output,
                                                      gates, hidden_n, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, G = 3 * H;
  const at::Tensor lengths64 = checked_lengths(lengths, T, B);
  const bool need_input = output_mask[0], need_weight_ih = output_mask[1], need_weight_hh = output_mask[2],
             need_bias_ih = output_mask[3], need_bias_hh = output_mask[4], need_h0 = output_mask[5];
  const bool keep_hidden_gates = need_weight_hh || need_bias_hh;
  const auto options = input.options();

  const SequenceOrder sequence(lengths64, T, B);
  const at::Tensor order_tensor = sequence.order_tensor();
  const bool identity_order = !lengths.has_value();
  const at::Tensor grad_out = defined_or_zeros(grad_output, {T, B, H}, options);
  at::Tensor grad_hidden_carry = defined_or_zeros(grad_h_n, {B, H}, options).index_select(0, order_tensor);
  at::Tensor grad_input_gates_all = at::empty({T, B, G}, options);
  at::Tensor grad_hidden_gates_all = keep_hidden_gates ? at::empty({T, B, G}, options) : at::Tensor();
  at::Tensor grad_hidden_gates_buffer = at::empty({B, G}, options);
  // dW_ih = grad_input_gates^T @ x; dW_hh = grad_hidden_gates^T @ h_prev (h_prev written by the steps).
  WeightGradientOperand input_operand(T * B, need_weight_ih ? input.contiguous().view({T * B, I}) : at::Tensor(), 0,
                                      options);
  WeightGradientOperand hidden_operand(T * B, at::Tensor(), need_weight_hh ? H : 0, options);
  const at::Tensor zeros = at::zeros({H}, options);
  const at::Tensor h0c = h0.has_value() ? h0->contiguous() : at::Tensor();
  const at::Tensor output_c = output.contiguous();
  const at::Tensor gates_c = gates.contiguous();
  const at::Tensor hidden_n_c = hidden_n.contiguous();
  const StepWeight recurrent_back(weight_hh.t(), B);  // dL/dh_{t-1} = z * dL/dh_t + dL/dgh @ W_hh

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_backward_cpu", [&] {
    RECORD_FUNCTION("rnntl_fast::gru_backward_steps", std::vector<c10::IValue>());
    using T_ = scalar_t;
    GruBackwardStep<T_> s;
    s.batch = B;
    s.hidden = H;
    s.reverse = reverse;
    s.sequence = &sequence;
    s.gates = gates_c.data_ptr<T_>();
    s.hidden_n = hidden_n_c.data_ptr<T_>();
    s.output = output_c.data_ptr<T_>();
    s.grad_output = grad_out.data_ptr<T_>();
    s.h0 = h0c.defined() ? h0c.data_ptr<T_>() : nullptr;
    s.zeros = zeros.data_ptr<T_>();
    s.grad_hidden_carry = grad_hidden_carry.data_ptr<T_>();
    s.grad_hidden_gates_all = keep_hidden_gates ? grad_hidden_gates_all.data_ptr<T_>() : nullptr;
    s.grad_input_gates_all = grad_input_gates_all.data_ptr<T_>();
    s.hidden_prev_all = hidden_operand.hidden_columns<T_>();
    s.hidden_prev_stride = hidden_operand.width();
    s.state_clip = static_cast<T_>(state_clip);
    s.gate_clip = static_cast<T_>(gate_clip);
    T_* carry = s.grad_hidden_carry;
    // The blocks the pointwise pass of processing step `step` reads (see prefetch_block).
    const auto prefetch_step = [&](int64_t step) {
      if (step < 0) return;
      const int64_t t = reverse ? T - 1 - step : step;
      prefetch_block(s.gates + t * B * G, B * G);
      prefetch_block(s.hidden_n + t * B * H, B * H);
      prefetch_block(s.grad_output + t * B * H, B * H);
      if (step > 0) prefetch_block(s.output + SequenceOrder::previous_step(t, reverse) * B * H, B * H);
    };
    prefetch_step(T - 1);

    for (int64_t step = T - 1; step >= 0; --step) {
      const int64_t t = reverse ? T - 1 - step : step;
      const int64_t n = sequence.active[t];
      s.t = t;
      s.grad_hidden_gates = identity_order && keep_hidden_gates ? s.grad_hidden_gates_all + t * B * G
                                                                : grad_hidden_gates_buffer.data_ptr<T_>();
      if (n > 0) {
        parallel_rows(n, G, [&](int64_t j) { gru_backward_rows_entry(s, j, j + 1); });
        prefetch_step(step - 1);
        recurrent_back.multiply_into(s.grad_hidden_gates, n, carry, /*accumulate=*/true);
      }
      for (int64_t j = n; j < B; ++j) {
        const int64_t row = t * B + sequence.order[j];
        if (s.state_clip > 0) {
          for (int64_t k = 0; k < H; ++k) carry[j * H + k] = clip_value(carry[j * H + k], s.state_clip);
        }
        std::fill_n(s.grad_input_gates_all + row * G, G, T_(0));
        if (s.grad_hidden_gates_all) std::fill_n(s.grad_hidden_gates_all + row * G, G, T_(0));
        if (s.hidden_prev_all) std::fill_n(s.hidden_prev_all + row * s.hidden_prev_stride, H, T_(0));
      }
    }
  });

  const at::Tensor grad_input_gates = grad_input_gates_all.view({T * B, G});
  // Each skipped gradient is its own empty tensor: outputs of an op must not alias.
  const auto none = [&] { return at::empty({0}, options); };
  at::Tensor grad_input = need_input ? linear_rows(grad_input_gates, weight_ih.t()).view({T, B, I}) : none();
  input_operand.multiply(grad_input_gates);
  at::Tensor grad_weight_ih = need_weight_ih ? input_operand.input_block(I) : none();
  at::Tensor grad_bias_ih = need_bias_ih ? grad_input_gates.sum(0) : none();
  if (keep_hidden_gates) hidden_operand.multiply(grad_hidden_gates_all.view({T * B, G}));
  at::Tensor grad_weight_hh = need_weight_hh ? hidden_operand.hidden_block(H) : none();
  at::Tensor grad_bias_hh = need_bias_hh ? grad_hidden_gates_all.view({T * B, G}).sum(0) : none();
  at::Tensor grad_h0 = none();
  if (need_h0) {
    grad_h0 = at::empty({B, H}, options);
    grad_h0.index_copy_(0, order_tensor, grad_hidden_carry);
  }
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0};
}

}  // namespace cpu
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CPU, m) {
  m.impl("gru_forward", &rnntl::cpu::gru_forward_cpu);
  m.impl("gru_backward", &rnntl::cpu::gru_backward_cpu);
}
