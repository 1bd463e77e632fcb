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

// A clip value: None -> 0 ("no clip" in the kernels), else finite and > 0.
inline double clip_or_zero(const std::optional<double>& value, const char* name) {
  if (!value.has_value()) return 0.0;
  TORCH_CHECK(std::isfinite(*value) && *value > 0.0, "rnntl_fast: ", name,
              " must be a finite positive number or None, got ", *value);
  return *value;
}

// true for "gates", false for "state"; anything else is an error.
inline bool is_gate_mode(c10::string_view mode) {
  TORCH_CHECK(mode == "state" || mode == "gates", "rnntl_fast: grad_clip_mode must be 'state' or 'gates', got '",
              std::string(mode), "'");
  return mode == "gates";
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

}  // namespace rnntl
