// Declarations of the CPU kernels of the layer-normalised cells, registered as
// torch.ops.rnntl_fast.layer_norm_{lstm,gru}_{forward,backward} (csrc/ops.cpp has the
// schemas; docs/cpu.md, "Layer normalisation", the reserve). C++ callers and tests use them.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace rnntl {
namespace cpu {

// -> (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], normalized [T,B,8H], cells [T,B,3H],
//     inverse_std [T,B,3], hidden_pre_clip [T,B,P]); the reserve (the last five) is empty
//     unless save_for_backward, hidden_pre_clip also unless proj_clip.
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
                            double proj_clip, double state_clip, double gate_clip, bool save_for_backward);

// -> (grad_input, grad_weight_ih, grad_weight_hh, grad_bias (of bias_ih and bias_hh alike),
//     grad_weight_hr, grad_h0, grad_c0, grad_layer_norm_ih, grad_layer_norm_hh,
//     grad_layer_norm_cell_weight, grad_layer_norm_cell_bias); empty where output_mask is off.
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
    double proj_clip, double state_clip, double gate_clip, std::array<bool, 11> output_mask);

// -> (output [T,B,H], h_n [B,H], gates [T,B,3H], normalized [T,B,6H], inverse_std [T,B,2]);
//     the reserve (the last three) is empty unless save_for_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& lengths,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh, bool reverse, double state_clip,
    double gate_clip, bool save_for_backward);

// -> (grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0,
//     grad_layer_norm_ih, grad_layer_norm_hh); empty where output_mask is off.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_norm_gru_backward_cpu(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
                            const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                            const c10::optional<at::Tensor>& bias_hh, const c10::optional<at::Tensor>& h0,
                            const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& recurrent_mask,
                            const c10::optional<at::Tensor>& zoneout, const at::Tensor& layer_norm_ih,
                            const at::Tensor& layer_norm_hh, const at::Tensor& output, const at::Tensor& gates,
                            const at::Tensor& normalized, const at::Tensor& inverse_std, bool reverse,
                            double state_clip, double gate_clip, std::array<bool, 8> output_mask);

}  // namespace cpu
}  // namespace rnntl
