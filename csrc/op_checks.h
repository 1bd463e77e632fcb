// Argument checks of the registered ops, shared by the CPU kernels and the CUDA glue (both
// torch-facing; the kernel headers in csrc/include/rnntl stay free of torch). Every message
// names the argument at fault. The device- and dtype-specific check of `input` is the
// caller's (check_input_cpu / check_input_cuda); everything here compares against `input`.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

namespace rnntl {

inline void check_same(const at::Tensor& input, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "rnntl_fast: ", name, " is on ", t.device(), " but input is on ",
              input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "rnntl_fast: ", name, " has dtype ", t.scalar_type(),
              " but input has dtype ", input.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "rnntl_fast: ", name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_optional(const std::optional<at::Tensor>& t, const at::Tensor& input, at::IntArrayRef expected,
                           const char* name) {
  if (!t.has_value()) return;
  check_same(input, *t, name);
  check_shape(*t, expected, name);
}

// A clip limit of the op schemas (cell_clip, proj_clip, state_clip, gate_clip): finite
// and >= 0, where 0 means "no clip" (docs/semantics.md).
inline double checked_clip(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value) && value >= 0.0, "rnntl_fast: ", name,
              " must be a finite number >= 0 (0 = off), got ", value);
  return value;
}

// lengths: a CPU integer tensor [B] (for every device: the batch order is computed on the
// host) with 0 <= lengths <= T. Returns it as contiguous int64, or undefined when absent.
inline at::Tensor checked_lengths(const std::optional<at::Tensor>& lengths, int64_t steps, int64_t batch) {
  if (!lengths.has_value()) return at::Tensor();
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.device().is_cpu(), "rnntl_fast: lengths must be a CPU tensor (also for CUDA input), got ",
              l.device());
  TORCH_CHECK(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt,
              "rnntl_fast: lengths must be an integer tensor (int64 or int32), got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == batch, "rnntl_fast: lengths must have shape [", batch,
              "] (one per batch row), got ", l.sizes());
  const at::Tensor l64 = l.to(at::kLong).contiguous();
  const int64_t lo = l64.min().item<int64_t>(), hi = l64.max().item<int64_t>();
  TORCH_CHECK(lo >= 0, "rnntl_fast: lengths must be >= 0, got ", lo);
  TORCH_CHECK(hi <= steps, "rnntl_fast: lengths must be <= the number of steps T=", steps, ", got ", hi);
  return l64;
}

inline void check_input_shape(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 3, "rnntl_fast: input must have shape [T, B, I] (3 dims), got ", input.dim(), " dims");
  TORCH_CHECK(input.size(0) > 0, "rnntl_fast: input must have at least one step (T > 0)");
  TORCH_CHECK(input.size(1) > 0, "rnntl_fast: input must have a non-empty batch (B > 0)");
}

// LSTM weights against input [T, B, I]: weight_ih [4H, I], weight_hh [4H, P], biases [4H],
// weight_hr [P, H]. Returns H and P (= proj_size or H).
inline void check_lstm_weights(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                               const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
                               const std::optional<at::Tensor>& weight_hr, int64_t* hidden, int64_t* out_size) {
  check_same(input, weight_ih, "weight_ih");
  check_same(input, weight_hh, "weight_hh");
  TORCH_CHECK(weight_ih.dim() == 2 && weight_ih.size(0) % 4 == 0 && weight_ih.size(0) > 0,
              "rnntl_fast: weight_ih must have shape [4*hidden_size, input_size], got ", weight_ih.sizes());
  TORCH_CHECK(weight_ih.size(1) == input.size(2), "rnntl_fast: input has ", input.size(2),
              " features but weight_ih expects input_size=", weight_ih.size(1));
  const int64_t H = weight_ih.size(0) / 4;
  int64_t P = H;
  if (weight_hr.has_value()) {
    check_same(input, *weight_hr, "weight_hr");
    TORCH_CHECK(weight_hr->dim() == 2 && weight_hr->size(1) == H && weight_hr->size(0) > 0,
                "rnntl_fast: weight_hr must have shape [proj_size, ", H, "], got ", weight_hr->sizes());
    P = weight_hr->size(0);
  }
  check_shape(weight_hh, {4 * H, P}, "weight_hh");
  check_optional(bias_ih, input, {4 * H}, "bias_ih");
  check_optional(bias_hh, input, {4 * H}, "bias_hh");
  *hidden = H;
  *out_size = P;
}

// GRU weights against input [T, B, I]: weight_ih [3H, I], weight_hh [3H, H], biases [3H]. Returns H.
inline int64_t check_gru_weights(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                 const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh) {
  check_same(input, weight_ih, "weight_ih");
  check_same(input, weight_hh, "weight_hh");
  TORCH_CHECK(weight_ih.dim() == 2 && weight_ih.size(0) % 3 == 0 && weight_ih.size(0) > 0,
              "rnntl_fast: weight_ih must have shape [3*hidden_size, input_size], got ", weight_ih.sizes());
  TORCH_CHECK(weight_ih.size(1) == input.size(2), "rnntl_fast: input has ", input.size(2),
              " features but weight_ih expects input_size=", weight_ih.size(1));
  const int64_t H = weight_ih.size(0) / 3;
  check_shape(weight_hh, {3 * H, H}, "weight_hh");
  check_optional(bias_ih, input, {3 * H}, "bias_ih");
  check_optional(bias_hh, input, {3 * H}, "bias_hh");
  return H;
}

// Sizes of one LSTM op call: T, B, I, H and P (= proj_size or H).
struct LstmSizes {
  int64_t steps, batch, input_size, hidden, out_size;
};

// Sizes of one GRU op call: T, B, I, H.
struct GruSizes {
  int64_t steps, batch, input_size, hidden;
};

// Every argument of rnntl_fast::lstm_forward except lengths (checked_lengths) and the
// device/dtype of input (check_input_cpu / check_input_cuda).
inline LstmSizes check_lstm_forward_arguments(const at::Tensor& input, const at::Tensor& weight_ih,
                                              const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                                              const std::optional<at::Tensor>& bias_hh,
                                              const std::optional<at::Tensor>& weight_hr,
                                              const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0,
                                              double cell_clip, double proj_clip, double state_clip,
                                              double gate_clip) {
  LstmSizes s{input.size(0), input.size(1), input.size(2), 0, 0};
  check_lstm_weights(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, &s.hidden, &s.out_size);
  check_optional(h0, input, {s.batch, s.out_size}, "h0");
  check_optional(c0, input, {s.batch, s.hidden}, "c0");
  checked_clip(cell_clip, "cell_clip");
  checked_clip(proj_clip, "proj_clip");
  checked_clip(state_clip, "state_clip");
  checked_clip(gate_clip, "gate_clip");
  return s;
}

// Every argument of rnntl_fast::lstm_backward except lengths and the device/dtype of input.
inline LstmSizes check_lstm_backward_arguments(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
    const at::Tensor& hidden_pre_clip, double cell_clip, double proj_clip, double state_clip, double gate_clip) {
  const LstmSizes s = check_lstm_forward_arguments(input, weight_ih, weight_hh, std::nullopt, std::nullopt, weight_hr,
                                                   h0, c0, cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = s.steps, B = s.batch, H = s.hidden, P = s.out_size;
  check_optional(grad_output, input, {T, B, P}, "grad_output");
  check_optional(grad_h_n, input, {B, P}, "grad_h_n");
  check_optional(grad_c_n, input, {B, H}, "grad_c_n");
  check_same(input, output, "output");
  check_shape(output, {T, B, P}, "output");
  check_same(input, gates, "gates");
  check_shape(gates, {T, B, 4 * H}, "gates (forward run without save_for_backward?)");
  check_same(input, cells, "cells");
  check_shape(cells, {T, B, H}, "cells (forward run without save_for_backward?)");
  if (proj_clip > 0) {
    check_same(input, hidden_pre_clip, "hidden_pre_clip");
    check_shape(hidden_pre_clip, {T, B, P}, "hidden_pre_clip");
  }
  return s;
}

// Every argument of rnntl_fast::gru_forward except lengths and the device/dtype of input.
inline GruSizes check_gru_forward_arguments(const at::Tensor& input, const at::Tensor& weight_ih,
                                            const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                                            const std::optional<at::Tensor>& bias_hh,
                                            const std::optional<at::Tensor>& h0, double state_clip,
                                            double gate_clip) {
  GruSizes s{input.size(0), input.size(1), input.size(2), 0};
  s.hidden = check_gru_weights(input, weight_ih, weight_hh, bias_ih, bias_hh);
  check_optional(h0, input, {s.batch, s.hidden}, "h0");
  checked_clip(state_clip, "state_clip");
  checked_clip(gate_clip, "gate_clip");
  return s;
}

// Every argument of rnntl_fast::gru_backward except lengths and the device/dtype of input.
inline GruSizes check_gru_backward_arguments(const std::optional<at::Tensor>& grad_output,
                                             const std::optional<at::Tensor>& grad_h_n, const at::Tensor& input,
                                             const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                             const std::optional<at::Tensor>& h0, const at::Tensor& output,
                                             const at::Tensor& gates, const at::Tensor& hidden_n, double state_clip,
                                             double gate_clip) {
  const GruSizes s = check_gru_forward_arguments(input, weight_ih, weight_hh, std::nullopt, std::nullopt, h0,
                                                 state_clip, gate_clip);
  const int64_t T = s.steps, B = s.batch, H = s.hidden;
  check_optional(grad_output, input, {T, B, H}, "grad_output");
  check_optional(grad_h_n, input, {B, H}, "grad_h_n");
  check_same(input, output, "output");
  check_shape(output, {T, B, H}, "output");
  check_same(input, gates, "gates");
  check_shape(gates, {T, B, 3 * H}, "gates (forward run without save_for_backward?)");
  check_same(input, hidden_n, "hidden_n");
  check_shape(hidden_n, {T, B, H}, "hidden_n (forward run without save_for_backward?)");
  return s;
}

// Sizes of one Elman RNN op call: T, B, I, H.
struct RnnSizes {
  int64_t steps, batch, input_size, hidden;
};

// Every argument of rnntl_fast::rnn_forward except lengths and the device/dtype of input:
// weight_ih [H, I], weight_hh [H, H], biases [H], h0 [B, H], recurrent_mask [B, H],
// zoneout [T, B, H].
inline RnnSizes check_rnn_forward_arguments(const at::Tensor& input, const at::Tensor& weight_ih,
                                            const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                                            const std::optional<at::Tensor>& bias_hh,
                                            const std::optional<at::Tensor>& h0,
                                            const std::optional<at::Tensor>& recurrent_mask,
                                            const std::optional<at::Tensor>& zoneout, double state_clip,
                                            double gate_clip) {
  RnnSizes s{input.size(0), input.size(1), input.size(2), 0};
  check_same(input, weight_ih, "weight_ih");
  check_same(input, weight_hh, "weight_hh");
  TORCH_CHECK(weight_ih.dim() == 2 && weight_ih.size(0) > 0,
              "rnntl_fast: weight_ih must have shape [hidden_size, input_size], got ", weight_ih.sizes());
  TORCH_CHECK(weight_ih.size(1) == input.size(2), "rnntl_fast: input has ", input.size(2),
              " features but weight_ih expects input_size=", weight_ih.size(1));
  s.hidden = weight_ih.size(0);
  check_shape(weight_hh, {s.hidden, s.hidden}, "weight_hh");
  check_optional(bias_ih, input, {s.hidden}, "bias_ih");
  check_optional(bias_hh, input, {s.hidden}, "bias_hh");
  check_optional(h0, input, {s.batch, s.hidden}, "h0");
  check_optional(recurrent_mask, input, {s.batch, s.hidden}, "recurrent_mask");
  check_optional(zoneout, input, {s.steps, s.batch, s.hidden}, "zoneout");
  checked_clip(state_clip, "state_clip");
  checked_clip(gate_clip, "gate_clip");
  return s;
}

// Every argument of rnntl_fast::rnn_backward except lengths and the device/dtype of input.
// activations (the forward's f(a_t)) is read only with zoneout.
inline RnnSizes check_rnn_backward_arguments(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout,
    const at::Tensor& output, const at::Tensor& activations, double state_clip, double gate_clip) {
  const RnnSizes s = check_rnn_forward_arguments(input, weight_ih, weight_hh, std::nullopt, std::nullopt, h0,
                                                 recurrent_mask, zoneout, state_clip, gate_clip);
  const int64_t T = s.steps, B = s.batch, H = s.hidden;
  check_optional(grad_output, input, {T, B, H}, "grad_output");
  check_optional(grad_h_n, input, {B, H}, "grad_h_n");
  check_same(input, output, "output");
  check_shape(output, {T, B, H}, "output");
  if (zoneout.has_value()) {
    check_same(input, activations, "activations");
    check_shape(activations, {T, B, H}, "activations (forward run without save_for_backward?)");
  }
  return s;
}

// Every argument of rnntl_fast::layer_norm_lstm_forward except lengths and the device/dtype
// of input: lstm_forward's, plus recurrent_mask [B, P], zoneout_h [T, B, P], zoneout_c
// [T, B, H], layer_norm_ih and layer_norm_hh [4H], layer_norm_cell_weight and
// layer_norm_cell_bias [H].
inline LstmSizes check_layer_norm_lstm_forward_arguments(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& recurrent_mask,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    double cell_clip, double proj_clip, double state_clip, double gate_clip) {
  const LstmSizes s = check_lstm_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0,
                                                   cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = s.steps, B = s.batch, H = s.hidden, P = s.out_size;
  check_optional(recurrent_mask, input, {B, P}, "recurrent_mask");
  check_optional(zoneout_h, input, {T, B, P}, "zoneout_h");
  check_optional(zoneout_c, input, {T, B, H}, "zoneout_c");
  check_optional(layer_norm_ih, input, {4 * H}, "layer_norm_ih");
  check_optional(layer_norm_hh, input, {4 * H}, "layer_norm_hh");
  check_optional(layer_norm_cell_weight, input, {H}, "layer_norm_cell_weight");
  check_optional(layer_norm_cell_bias, input, {H}, "layer_norm_cell_bias");
  return s;
}

// Every argument of rnntl_fast::layer_norm_lstm_backward except lengths and the
// device/dtype of input; the reserve as layer_norm_lstm_forward returns it.
inline LstmSizes check_layer_norm_lstm_backward_arguments(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& recurrent_mask,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& normalized, const at::Tensor& cells,
    const at::Tensor& inverse_std, const at::Tensor& hidden_pre_clip, double cell_clip, double proj_clip,
    double state_clip, double gate_clip) {
  const LstmSizes s = check_layer_norm_lstm_forward_arguments(
      input, weight_ih, weight_hh, std::nullopt, std::nullopt, weight_hr, h0, c0, recurrent_mask, zoneout_h,
      zoneout_c, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, cell_clip, proj_clip,
      state_clip, gate_clip);
  const int64_t T = s.steps, B = s.batch, H = s.hidden, P = s.out_size;
  check_optional(grad_output, input, {T, B, P}, "grad_output");
  check_optional(grad_h_n, input, {B, P}, "grad_h_n");
  check_optional(grad_c_n, input, {B, H}, "grad_c_n");
  check_optional(output, input, {T, B, P}, "output");
  check_optional(gates, input, {T, B, 4 * H}, "gates (forward run without save_for_backward?)");
  check_optional(normalized, input, {T, B, 8 * H}, "normalized (forward run without save_for_backward?)");
  check_optional(cells, input, {T, B, 3 * H}, "cells (forward run without save_for_backward?)");
  check_optional(inverse_std, input, {T, B, 3}, "inverse_std (forward run without save_for_backward?)");
  if (proj_clip > 0) check_optional(hidden_pre_clip, input, {T, B, P}, "hidden_pre_clip");
  return s;
}

// Every argument of rnntl_fast::layer_norm_gru_forward except lengths and the device/dtype
// of input: gru_forward's, plus recurrent_mask [B, H], zoneout [T, B, H], layer_norm_ih and
// layer_norm_hh [3H].
inline GruSizes check_layer_norm_gru_forward_arguments(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& recurrent_mask,
    const std::optional<at::Tensor>& zoneout, const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
    double state_clip, double gate_clip) {
  const GruSizes s =
      check_gru_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, state_clip, gate_clip);
  const int64_t T = s.steps, B = s.batch, H = s.hidden;
  check_optional(recurrent_mask, input, {B, H}, "recurrent_mask");
  check_optional(zoneout, input, {T, B, H}, "zoneout");
  check_optional(layer_norm_ih, input, {3 * H}, "layer_norm_ih");
  check_optional(layer_norm_hh, input, {3 * H}, "layer_norm_hh");
  return s;
}

// Every argument of rnntl_fast::layer_norm_gru_backward except lengths and the device/dtype
// of input; the reserve as layer_norm_gru_forward returns it.
inline GruSizes check_layer_norm_gru_backward_arguments(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n, const at::Tensor& input,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& recurrent_mask,
    const std::optional<at::Tensor>& zoneout, const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& normalized, const at::Tensor& inverse_std,
    double state_clip, double gate_clip) {
  const GruSizes s = check_layer_norm_gru_forward_arguments(input, weight_ih, weight_hh, std::nullopt, bias_hh, h0,
                                                            recurrent_mask, zoneout, layer_norm_ih, layer_norm_hh,
                                                            state_clip, gate_clip);
  const int64_t T = s.steps, B = s.batch, H = s.hidden;
  check_optional(grad_output, input, {T, B, H}, "grad_output");
  check_optional(grad_h_n, input, {B, H}, "grad_h_n");
  check_optional(output, input, {T, B, H}, "output");
  check_optional(gates, input, {T, B, 3 * H}, "gates (forward run without save_for_backward?)");
  check_optional(normalized, input, {T, B, 6 * H}, "normalized (forward run without save_for_backward?)");
  check_optional(inverse_std, input, {T, B, 2}, "inverse_std (forward run without save_for_backward?)");
  return s;
}

}  // namespace rnntl
