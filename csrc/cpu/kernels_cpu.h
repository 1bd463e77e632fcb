// Declarations of the CPU kernels registered as torch.ops.rnntl_fast.* (see csrc/ops.cpp
// for the schemas and return conventions); C++ callers and tests use them directly.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace rnntl {
namespace cpu {

// (output, h_n, c_n, gates, cells, hidden_pre_clip, carried_cells): csrc/ops.cpp.
using LstmForwardResults =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LstmForwardResults lstm_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout_h,
    const c10::optional<at::Tensor>& zoneout_c, bool reverse, double cell_clip, double proj_clip, double state_clip,
    double gate_clip, bool save_for_backward);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout_h,
    const c10::optional<at::Tensor>& zoneout_c, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hidden_pre_clip, const at::Tensor& carried_cells, bool reverse,
    double cell_clip, double proj_clip, double state_clip, double gate_clip, std::array<bool, 7> output_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout, bool reverse,
    double state_clip, double gate_clip, bool save_for_backward);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& hidden_n, bool reverse, double state_clip,
    double gate_clip, std::array<bool, 6> output_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout, bool relu,
    bool reverse, double state_clip, double gate_clip, bool save_for_backward);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const at::Tensor& output, const at::Tensor& activations, bool relu, bool reverse, double state_clip,
    double gate_clip, std::array<bool, 6> output_mask);

}  // namespace cpu
}  // namespace rnntl
