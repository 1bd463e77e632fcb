// LSTM over a whole sequence, one layer and one direction, on the CPU.
//
// Forward: the input projection a block of steps at a time (RowProjection); per step one
// GEMM for the recurrent part (over the rows still running) and one fused pointwise pass; with
// proj_size a second small GEMM and an epilogue. Backward mirrors it per step and ends
// with the weight-gradient GEMMs over all steps, skipped for weights that need no grad.
// Shapes: input [T, B, I]; weight_ih [4H, I]; weight_hh [4H, P]; weight_hr [P, H];
// h0 [B, P]; c0 [B, H]; P = proj_size or H. "Slot-major" buffers hold row order[j] in slot j.
// The whole-sequence buffers (input gates, saved gates / cells / pre-clip hidden, gradient
// buffers) hold only the valid rows, in SequenceOrder's compact layout: N = valid_rows <= T*B
// rows, row first_row[t] + j for slot j at step t. With variable lengths the whole-sequence
// products (input projection, dL/dx, weight gradients) then cover only valid rows. The saved
// [T, B, ...] tensors keep their shape; their rows past N are zeros.
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
  const T* recurrent_gates;  // [B, 4H]     slot-major W_hh h_{t-1}
  T* cell_state;             // [B, H]      slot-major
  T* hidden_state;           // [B, H]      slot-major, only without projection
  T* hidden_unprojected;     // [B, H]      slot-major o*tanh(c), only with projection
  T* output;                 // [T, B, H]   padded, only without projection
  T* cells;                  // [N, H]      compact cell before clip, when saving
  T* hidden_pre_clip;        // [N, H]      compact hidden before proj_clip, when saving with proj_clip
  T cell_clip, proj_clip;
};

template <typename T, bool kSave, bool kProject>
RNNTL_ROW_INLINE void lstm_forward_row(const LstmForwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 4 * s.hidden;
  const int64_t row = s.t * s.batch + s.order[j];  // padded row (output)
  const int64_t compact = s.first_row + j;         // compact row (the whole-sequence buffers)
  // The activations overwrite the input gates in place.
  T* __restrict__ act = s.input_gates + (compact - s.input_first_row) * G;
  const T* __restrict__ r = s.recurrent_gates + j * G;
  T* __restrict__ c = s.cell_state + j * H;
  T* __restrict__ cells = kSave ? s.cells + compact * H : nullptr;
  T* __restrict__ m = kProject ? s.hidden_unprojected + j * H : nullptr;
  T* __restrict__ h = kProject ? nullptr : s.hidden_state + j * H;
  T* __restrict__ out = kProject ? nullptr : s.output + row * H;
  const bool keep_pre_clip = !kProject && kSave && s.hidden_pre_clip != nullptr;
  T* __restrict__ pre = keep_pre_clip ? s.hidden_pre_clip + compact * H : nullptr;
  const T cell_clip = s.cell_clip, proj_clip = s.proj_clip;
  // Two passes (see lstm_cell_update): measured ~25% faster than one on AVX2.
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    T i, f, g, o;
    lstm_gate_activations(act[k] + r[k], act[H + k] + r[H + k], act[2 * H + k] + r[2 * H + k],
                          act[3 * H + k] + r[3 * H + k], i, f, g, o);
    act[k] = i;
    act[H + k] = f;
    act[2 * H + k] = g;
    act[3 * H + k] = o;
  }
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    LstmForwardElement<T> e;
    lstm_cell_update(act[k], act[H + k], act[2 * H + k], act[3 * H + k], c[k], cell_clip, e);
    c[k] = e.cell;
    if (kSave) cells[k] = e.cell_before_clip;
    if (kProject) {
      m[k] = e.hidden;
    } else {
      const T hv = clip_value(e.hidden, proj_clip);
      if (keep_pre_clip) pre[k] = e.hidden;
      h[k] = hv;
      out[k] = hv;
    }
  }
}

template <typename T>
RNNTL_ROW_INLINE void lstm_forward_rows(const LstmForwardStep<T>& s, int64_t begin, int64_t end, bool save,
                              bool project) {
  for (int64_t j = begin; j < end; ++j) {
    if (save) {
      project ? lstm_forward_row<T, true, true>(s, j) : lstm_forward_row<T, true, false>(s, j);
    } else {
      project ? lstm_forward_row<T, false, true>(s, j) : lstm_forward_row<T, false, false>(s, j);
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
  const T* output;                  // [T, B, P] padded
  const T* h0;                      // [B, P] or nullptr
  const T* c0;                      // [B, H] or nullptr
  const T* zeros;                   // [max(H, P)] zeros, stands for an omitted h0 / c0
  const T* grad_hidden_unprojected; // [B, H] slot-major dL/dm
  T* grad_cell_carry;               // [B, H] slot-major dL/dc_t in, dL/dc_{t-1} out
  T* grad_gates;                    // [n, 4H] dL/da of step t's slots: grad_gates_all's rows of step t
  T* hidden_prev_all;               // h_{t-1} of compact row r at r * hidden_prev_stride, or nullptr
  int64_t hidden_prev_stride;
  T* hidden_unprojected_all;        // [N, H] compact m per row (for dW_hr), or nullptr
  T cell_clip, state_clip, gate_clip;
};

template <typename T, bool kKeepUnprojected>
RNNTL_ROW_INLINE void lstm_backward_row(const LstmBackwardStep<T>& s, int64_t j) {
  const int64_t H = s.hidden, G = 4 * s.hidden, P = s.out_size;
  const int64_t b = s.sequence->order[j];
  const bool first = s.sequence->is_first_step(b, s.t, s.reverse);
  const int64_t prev_t = SequenceOrder::previous_step(s.t, s.reverse);
  const int64_t prev_row = prev_t * s.batch + b;  // padded (output)
  // Compact rows; only read when !first, where the previous step is valid for this slot.
  const int64_t compact = s.sequence->first_row[s.t] + j;
  const int64_t prev_compact = first ? 0 : s.sequence->first_row[prev_t] + j;
  const T* __restrict__ cell_prev = first ? (s.c0 ? s.c0 + b * H : s.zeros) : s.cells + prev_compact * H;
  const T prev_clip = first ? T(0) : s.cell_clip;  // c0 is not clipped; saved cells are pre-clip
  const T* __restrict__ act = s.gates + compact * G;
  const T* __restrict__ cell = s.cells + compact * H;
  const T* __restrict__ dm = s.grad_hidden_unprojected + j * H;
  T* __restrict__ dc = s.grad_cell_carry + j * H;
  T* __restrict__ da = s.grad_gates + j * G;
  const T cell_clip = s.cell_clip, state_clip = s.state_clip, gate_clip = s.gate_clip;
  // m = o * tanh(c) for dW_hr comes from the same tanh.
  T* __restrict__ m = kKeepUnprojected ? s.hidden_unprojected_all + compact * H : nullptr;
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T tanh_cell = tanh_(clip_value(cell[k], cell_clip));
    const LstmBackwardElement<T> e = lstm_element_backward_given_tanh(
        act[k], act[H + k], act[2 * H + k], act[3 * H + k], cell[k], tanh_cell, clip_value(cell_prev[k], prev_clip),
        dm[k], dc[k], cell_clip, state_clip, gate_clip);
    da[k] = e.d_i;
    da[H + k] = e.d_f;
    da[2 * H + k] = e.d_g;
    da[3 * H + k] = e.d_o;
    dc[k] = e.grad_cell_prev;
    if (kKeepUnprojected) m[k] = act[3 * H + k] * tanh_cell;
  }
  if (s.hidden_prev_all) {
    const T* h_prev = first ? (s.h0 ? s.h0 + b * P : s.zeros) : s.output + prev_row * P;
    std::copy(h_prev, h_prev + P, s.hidden_prev_all + compact * s.hidden_prev_stride);
  }
}

template <typename T>
RNNTL_ROW_INLINE void lstm_backward_rows(const LstmBackwardStep<T>& s, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j)
    s.hidden_unprojected_all ? lstm_backward_row<T, true>(s, j) : lstm_backward_row<T, false>(s, j);
}

RNNTL_VECTOR_CLONES void lstm_backward_rows_entry(const LstmBackwardStep<float>& s, int64_t begin,
                                                  int64_t end) {
  lstm_backward_rows(s, begin, end);
}
void lstm_backward_rows_entry(const LstmBackwardStep<double>& s, int64_t begin, int64_t end) {
  lstm_backward_rows(s, begin, end);
}

// dL/dh_t total (carry from step t+1 plus the output's gradient), clipped in state mode,
// then through proj_clip: the gradient w.r.t. the hidden before proj_clip, per slot.
template <typename T>
RNNTL_ROW_INLINE void lstm_hidden_gradient_rows(int64_t begin, int64_t end, int64_t P, int64_t batch, int64_t t,
                                                int64_t first_row, const int64_t* order, const T* grad_output, const T* hidden_pre_clip,
                                                const T* grad_hidden_carry, T* grad_pre_clip, T* grad_pre_clip_all,
                                                T state_clip, T proj_clip) {
  for (int64_t j = begin; j < end; ++j) {
    const int64_t row = t * batch + order[j];  // padded (grad_output)
    const int64_t compact = first_row + j;     // compact (hidden_pre_clip, grad_pre_clip_all)
    const T* __restrict__ go = grad_output + row * P;
    const T* __restrict__ carry = grad_hidden_carry + j * P;
    T* __restrict__ d = grad_pre_clip + j * P;
    // Two loops rather than a test per element, so that each vectorizes.
    if (hidden_pre_clip) {
      const T* __restrict__ pre = hidden_pre_clip + compact * P;
#pragma omp simd
      for (int64_t k = 0; k < P; ++k) d[k] = clip_value(carry[k] + go[k], state_clip) * clip_pass(pre[k], proj_clip);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < P; ++k) d[k] = clip_value(carry[k] + go[k], state_clip);
    }
    if (grad_pre_clip_all) std::copy(d, d + P, grad_pre_clip_all + compact * P);
  }
}

RNNTL_VECTOR_CLONES void lstm_hidden_gradient_rows_entry(int64_t begin, int64_t end, int64_t P, int64_t batch,
                                                         int64_t t, int64_t first_row, const int64_t* order, const float* grad_output,
                                                         const float* hidden_pre_clip, const float* grad_hidden_carry,
                                                         float* grad_pre_clip, float* grad_pre_clip_all,
                                                         float state_clip, float proj_clip) {
  lstm_hidden_gradient_rows(begin, end, P, batch, t, first_row, order, grad_output, hidden_pre_clip, grad_hidden_carry,
                            grad_pre_clip, grad_pre_clip_all, state_clip, proj_clip);
}
void lstm_hidden_gradient_rows_entry(int64_t begin, int64_t end, int64_t P, int64_t batch, int64_t t,
                                     int64_t first_row, const int64_t* order, const double* grad_output, const double* hidden_pre_clip,
                                     const double* grad_hidden_carry, double* grad_pre_clip,
                                     double* grad_pre_clip_all, double state_clip, double proj_clip) {
  lstm_hidden_gradient_rows(begin, end, P, batch, t, first_row, order, grad_output, hidden_pre_clip, grad_hidden_carry,
                            grad_pre_clip, grad_pre_clip_all, state_clip, proj_clip);
}

}  // namespace

// Returns (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], cells [T,B,H],
// hidden_pre_clip [T,B,P]); the last three are empty unless save_for_backward (and,
// for hidden_pre_clip, proj_clip) is set.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths, bool reverse,
    double cell_clip, double proj_clip, double state_clip, double gate_clip, bool save_for_backward) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const LstmSizes sizes = check_lstm_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0,
                                                       c0, cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, P = sizes.out_size;
  const int64_t G = 4 * H;
  const at::Tensor lengths64 = checked_lengths(lengths, T, B);
  const bool project = weight_hr.has_value();
  const auto options = input.options();

  const SequenceOrder sequence(lengths64, T, B);
  const at::Tensor order_tensor = sequence.order_tensor();
  const int64_t N = sequence.valid_rows;
  const bool compact_is_padded = sequence.compact_is_padded();

  // The input projection of the valid rows only ([N, I] compact rows of x), computed a few
  // steps at a time just before they run (see RowProjection).
  at::Tensor x_rows = input.contiguous().view({T * B, I});
  if (!compact_is_padded) x_rows = x_rows.index_select(0, sequence.padded_rows_tensor());  // [N, I]
  c10::optional<at::Tensor> input_bias;
  if (bias_ih.has_value() && bias_hh.has_value()) input_bias = *bias_ih + *bias_hh;
  else if (bias_ih.has_value()) input_bias = *bias_ih;
  else if (bias_hh.has_value()) input_bias = *bias_hh;
  const RowProjection input_projection(x_rows, weight_ih, input_bias);
  const int64_t block_rows = projection_block_rows(G, I, B);

  at::Tensor hidden_state = h0.has_value() ? h0->index_select(0, order_tensor) : at::zeros({B, P}, options);
  at::Tensor cell_state = c0.has_value() ? c0->index_select(0, order_tensor) : at::zeros({B, H}, options);
  at::Tensor hidden_unprojected = project ? at::empty({B, H}, options) : at::Tensor();
  at::Tensor step_scratch = at::empty({B, G + P}, options);  // per-step products: W_hh h, then W_hr m
  at::Tensor output = at::empty({T, B, P}, options);
  // The input gates of a block of steps go where their activations go: straight into the
  // saved gates when saving for backward (the activations overwrite them in place), else
  // into a buffer of block_rows rows reused block after block. With variable lengths the
  // saved tensors keep their [T, B, ...] shape (the op's schema) and hold the compact rows
  // first; their rows past N are zeroed so that the outputs are deterministic.
  const auto saved = [&](int64_t width) {
    at::Tensor t = at::empty({T * B, width}, options);
    if (N < T * B) t.narrow(0, N, T * B - N).zero_();
    return t.view({T, B, width});
  };
  at::Tensor gates = save_for_backward ? saved(G) : at::empty({0}, options);
  at::Tensor input_gates_block = save_for_backward ? at::Tensor() : at::empty({std::min(block_rows, N), G}, options);
  at::Tensor cells = save_for_backward ? saved(H) : at::empty({0}, options);
  at::Tensor hidden_pre_clip = save_for_backward && proj_clip > 0 ? saved(P) : at::empty({0}, options);
  const StepWeight recurrent(weight_hh, B);
  const c10::optional<StepWeight> projection =
      project ? c10::optional<StepWeight>(StepWeight(*weight_hr, B)) : c10::nullopt;

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_forward_cpu", [&] {
    RECORD_FUNCTION("rnntl_fast::lstm_forward_steps", std::vector<c10::IValue>());
    using T_ = scalar_t;
    LstmForwardStep<T_> s;
    s.batch = B;
    s.hidden = H;
    s.order = sequence.order;
    T_* const gates_buffer = save_for_backward ? gates.data_ptr<T_>() : input_gates_block.data_ptr<T_>();
    s.input_gates = gates_buffer;
    s.input_first_row = 0;
    s.cell_state = cell_state.data_ptr<T_>();
    s.hidden_state = project ? nullptr : hidden_state.data_ptr<T_>();
    s.hidden_unprojected = project ? hidden_unprojected.data_ptr<T_>() : nullptr;
    s.output = project ? nullptr : output.data_ptr<T_>();
    s.cells = save_for_backward ? cells.data_ptr<T_>() : nullptr;
    s.hidden_pre_clip = hidden_pre_clip.numel() ? hidden_pre_clip.data_ptr<T_>() : nullptr;
    s.cell_clip = static_cast<T_>(cell_clip);
    s.proj_clip = static_cast<T_>(proj_clip);
    T_* out_data = output.data_ptr<T_>();
    T_* const recurrent_scratch = step_scratch.data_ptr<T_>();
    T_* const projected_scratch = recurrent_scratch + B * G;
    at::Tensor product_holder;
    int64_t block_end_step = 0;  // processing steps before it have their input gates
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? T - 1 - step : step;
      const int64_t n = sequence.active[t];
      s.t = t;
      s.first_row = sequence.first_row[t];
      if (step == block_end_step) {
        // The next block of steps: as many as fit in block_rows rows (at least one). Their
        // compact rows are one contiguous range in either direction.
        int64_t rows = n;
        block_end_step = step + 1;
        while (block_end_step < T) {
          const int64_t next = sequence.active[reverse ? T - 1 - block_end_step : block_end_step];
          if (rows + next > block_rows) break;
          rows += next;
          ++block_end_step;
        }
        const int64_t first = reverse ? sequence.first_row[T - block_end_step] : s.first_row;
        if (save_for_backward) {
          input_projection.into(first, rows, gates_buffer + first * G);
        } else {
          // Fits: a block is at most block_rows rows (>= B, so one step always fits) and at most N.
          TORCH_INTERNAL_ASSERT(rows <= input_gates_block.size(0));
          s.input_gates = input_gates_block.data_ptr<T_>();
          input_projection.into(first, rows, s.input_gates);
          s.input_first_row = first;
        }
      }
      if (n > 0) {
        s.recurrent_gates = recurrent.multiply(hidden_state.data_ptr<T_>(), n, recurrent_scratch, product_holder);
        parallel_rows(n, G, [&](int64_t j) { lstm_forward_rows_entry(s, j, j + 1, save_for_backward, project); });
      }
      if (project && n > 0) {
        const T_* r = projection->multiply(hidden_unprojected.data_ptr<T_>(), n, projected_scratch, product_holder);
        T_* h = hidden_state.data_ptr<T_>();
        T_* pre = s.hidden_pre_clip;
        const T_ limit = s.proj_clip;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t row = t * B + sequence.order[j];  // padded (output)
          const int64_t compact = s.first_row + j;        // compact (hidden_pre_clip)
          for (int64_t k = 0; k < P; ++k) {
            const T_ v = r[j * P + k];
            if (pre) pre[compact * P + k] = v;
            const T_ hv = clip_value(v, limit);
            h[j * P + k] = hv;
            out_data[row * P + k] = hv;
          }
        }
      }
      // Rows past their length: zero output (as pad_packed_sequence gives), state unchanged
      // (the compact buffers have no rows for them).
      for (int64_t j = n; j < B; ++j) {
        const int64_t row = t * B + sequence.order[j];
        std::fill_n(out_data + row * P, P, T_(0));
      }
    }
  });

  at::Tensor h_n = at::empty({B, P}, options);
  at::Tensor c_n = at::empty({B, H}, options);
  h_n.index_copy_(0, order_tensor, hidden_state);
  c_n.index_copy_(0, order_tensor, cell_state);
  return {output, h_n, c_n, gates, cells, hidden_pre_clip};
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
                  const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                  const at::Tensor& hidden_pre_clip, bool reverse, double cell_clip, double proj_clip,
                  double state_clip, double gate_clip, std::array<bool, 7> output_mask) {
  // The kernels' own GEMMs are not part of any autograd graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_input_cpu(input);
  const LstmSizes sizes =
      check_lstm_backward_arguments(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0,
                                    output, gates, cells, hidden_pre_clip, cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, P = sizes.out_size;
  const int64_t G = 4 * H;
  const at::Tensor lengths64 = checked_lengths(lengths, T, B);
  const bool project = weight_hr.has_value();
  const bool need_input = output_mask[0], need_weight_ih = output_mask[1], need_weight_hh = output_mask[2],
             need_bias = output_mask[3], need_weight_hr = output_mask[4], need_h0 = output_mask[5],
             need_c0 = output_mask[6];
  const bool want_weight_hr = project && need_weight_hr;
  const auto options = input.options();

  const SequenceOrder sequence(lengths64, T, B);
  const at::Tensor order_tensor = sequence.order_tensor();
  const int64_t N = sequence.valid_rows;
  const bool compact_is_padded = sequence.compact_is_padded();
  const at::Tensor padded_rows = compact_is_padded ? at::Tensor() : sequence.padded_rows_tensor();  // [N]
  const at::Tensor grad_out = defined_or_zeros(grad_output, {T, B, P}, options);
  at::Tensor grad_hidden_carry = defined_or_zeros(grad_h_n, {B, P}, options).index_select(0, order_tensor);
  at::Tensor grad_cell_carry = defined_or_zeros(grad_c_n, {B, H}, options).index_select(0, order_tensor);
  // Compact [N, ...]: each step's slots are contiguous rows, so dL/da of step t is written
  // in place where the recurrent product reads it.
  at::Tensor grad_gates_all = at::empty({N, G}, options);
  at::Tensor grad_pre_clip = at::empty({B, P}, options);  // dL/d(hidden before proj_clip), slot-major
  at::Tensor grad_unprojected_scratch = project ? at::empty({B, H}, options) : at::Tensor();
  at::Tensor grad_pre_clip_all = want_weight_hr ? at::empty({N, P}, options) : at::Tensor();
  at::Tensor hidden_unprojected_all = want_weight_hr ? at::empty({N, H}, options) : at::Tensor();
  // dW_ih and dW_hh come out of one product grad_gates^T @ [x | h_prev], over the valid rows.
  at::Tensor input_compact;  // [N, I]
  if (need_weight_ih) {
    input_compact = input.contiguous().view({T * B, I});
    if (!compact_is_padded) input_compact = input_compact.index_select(0, padded_rows);
  }
  WeightGradientOperand weight_operand(N, input_compact, need_weight_hh ? P : 0, options);
  const at::Tensor zeros = at::zeros({std::max(H, P)}, options);
  const at::Tensor h0c = h0.has_value() ? h0->contiguous() : at::Tensor();
  const at::Tensor c0c = c0.has_value() ? c0->contiguous() : at::Tensor();
  const at::Tensor output_c = output.contiguous();
  const at::Tensor gates_c = gates.contiguous();
  const at::Tensor cells_c = cells.contiguous();
  const at::Tensor pre_clip_c = proj_clip > 0 ? hidden_pre_clip.contiguous() : at::Tensor();
  const StepWeight recurrent_back(weight_hh.t(), B);  // dL/dh_{t-1} = dL/da @ W_hh
  const c10::optional<StepWeight> projection_back =
      project ? c10::optional<StepWeight>(StepWeight(weight_hr->t(), B)) : c10::nullopt;  // dL/dm = dL/dr @ W_hr

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_backward_cpu", [&] {
    RECORD_FUNCTION("rnntl_fast::lstm_backward_steps", std::vector<c10::IValue>());
    using T_ = scalar_t;
    const T_ state_limit = static_cast<T_>(state_clip);
    LstmBackwardStep<T_> s;
    s.batch = B;
    s.hidden = H;
    s.out_size = P;
    s.reverse = reverse;
    s.sequence = &sequence;
    s.gates = gates_c.data_ptr<T_>();
    s.cells = cells_c.data_ptr<T_>();
    s.output = output_c.data_ptr<T_>();
    s.h0 = h0c.defined() ? h0c.data_ptr<T_>() : nullptr;
    s.c0 = c0c.defined() ? c0c.data_ptr<T_>() : nullptr;
    s.zeros = zeros.data_ptr<T_>();
    s.grad_cell_carry = grad_cell_carry.data_ptr<T_>();
    T_* const grad_gates_data = grad_gates_all.data_ptr<T_>();
    s.hidden_prev_all = weight_operand.hidden_columns<T_>();
    s.hidden_prev_stride = weight_operand.width();
    s.hidden_unprojected_all = want_weight_hr ? hidden_unprojected_all.data_ptr<T_>() : nullptr;
    s.cell_clip = static_cast<T_>(cell_clip);
    s.state_clip = state_limit;
    s.gate_clip = static_cast<T_>(gate_clip);
    const T_* go = grad_out.data_ptr<T_>();
    const T_* pre = pre_clip_c.defined() ? pre_clip_c.data_ptr<T_>() : nullptr;
    T_* carry_h = grad_hidden_carry.data_ptr<T_>();
    T_* carry_c = grad_cell_carry.data_ptr<T_>();
    T_* d_pre = grad_pre_clip.data_ptr<T_>();
    T_* d_pre_all = want_weight_hr ? grad_pre_clip_all.data_ptr<T_>() : nullptr;
    const T_ proj_limit = static_cast<T_>(proj_clip);
    T_* const grad_unprojected = project ? grad_unprojected_scratch.data_ptr<T_>() : nullptr;
    at::Tensor product_holder;
    // The blocks the pointwise passes of processing step `step` read (see prefetch_block).
    const auto prefetch_step = [&](int64_t step) {
      if (step < 0) return;
      const int64_t t = reverse ? T - 1 - step : step;
      const int64_t n = sequence.active[t], first = sequence.first_row[t];
      prefetch_block(s.gates + first * G, n * G);
      prefetch_block(s.cells + first * H, n * H);
      prefetch_block(go + t * B * P, B * P);
      if (step > 0) {
        const int64_t previous = SequenceOrder::previous_step(t, reverse);
        prefetch_block(s.cells + sequence.first_row[previous] * H, sequence.active[previous] * H);
      }
    };
    prefetch_step(T - 1);

    for (int64_t step = T - 1; step >= 0; --step) {
      const int64_t t = reverse ? T - 1 - step : step;
      const int64_t n = sequence.active[t];
      s.t = t;
      s.grad_gates = grad_gates_data + sequence.first_row[t] * G;
      if (n > 0) {
        parallel_rows(n, P, [&](int64_t j) {
          lstm_hidden_gradient_rows_entry(j, j + 1, P, B, t, sequence.first_row[t], sequence.order, go, pre, carry_h, d_pre, d_pre_all,
                                          state_limit, proj_limit);
        });
        s.grad_hidden_unprojected =
            project ? projection_back->multiply(d_pre, n, grad_unprojected, product_holder) : d_pre;  // [n, H]
        parallel_rows(n, G, [&](int64_t j) { lstm_backward_rows_entry(s, j, j + 1); });
        prefetch_step(step - 1);
        recurrent_back.multiply_into(s.grad_gates, n, carry_h);
      }
      // Rows past their length pass their state gradients through unchanged (clamped in
      // state mode, as the reference's hooks on the carried-over state do).
      if (state_limit > 0) {
        for (int64_t j = n; j < B; ++j) {
          for (int64_t k = 0; k < P; ++k) carry_h[j * P + k] = clip_value(carry_h[j * P + k], state_limit);
          for (int64_t k = 0; k < H; ++k) carry_c[j * H + k] = clip_value(carry_c[j * H + k], state_limit);
        }
      }
    }
  });

  const at::Tensor& grad_gates_2d = grad_gates_all;  // [N, G]
  // Each skipped gradient is its own empty tensor: outputs of an op must not alias.
  const auto none = [&] { return at::empty({0}, options); };
  at::Tensor grad_input = none();
  if (need_input) {
    const at::Tensor grad_input_compact = linear_rows(grad_gates_2d, weight_ih.t());  // [N, I]
    if (compact_is_padded) {
      grad_input = grad_input_compact.view({T, B, I});
    } else {  // padded rows past their length get zero gradient
      grad_input = at::zeros({T * B, I}, options).index_copy_(0, padded_rows, grad_input_compact).view({T, B, I});
    }
  }
  weight_operand.multiply(grad_gates_2d);
  at::Tensor grad_weight_ih = need_weight_ih ? weight_operand.input_block(I) : none();
  at::Tensor grad_weight_hh = need_weight_hh ? weight_operand.hidden_block(P) : none();
  at::Tensor grad_bias = need_bias ? grad_gates_2d.sum(0) : none();
  at::Tensor grad_weight_hr =
      want_weight_hr ? transposed_product(grad_pre_clip_all, hidden_unprojected_all) : none();
  at::Tensor grad_h0 = none(), grad_c0 = none();
  if (need_h0) {
    grad_h0 = at::empty({B, P}, options);
    grad_h0.index_copy_(0, order_tensor, grad_hidden_carry);
  }
  if (need_c0) {
    grad_c0 = at::empty({B, H}, options);
    grad_c0.index_copy_(0, order_tensor, grad_cell_carry);
  }
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr, grad_h0, grad_c0};
}

}  // namespace cpu
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CPU, m) {
  m.impl("lstm_forward", &rnntl::cpu::lstm_forward_cpu);
  m.impl("lstm_backward", &rnntl::cpu::lstm_backward_cpu);
}
