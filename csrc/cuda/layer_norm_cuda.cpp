// rnntl_fast::layer_norm_{lstm,gru}_{forward,backward} for CUDA tensors: checks, tensors ->
// POD params (rnntl/params.h), device guard and stream, then the kernels of
// csrc/cuda/layer_norm_kernels.cu (stepwise only; docs/cuda.md, "Layer normalisation").
// Same semantics and outputs as the CPU ops (csrc/cpu/layer_norm_cpu.cpp), the reserve with
// the same shapes; it is padded [T, B, *] here (zeros at padded steps) where the CPU op keeps
// compact rows first.
// Shapes: input [T, B, I]; weight_ih [G, I]; weight_hh [G, P]; weight_hr [P, H]; h0 [B, P];
// c0 [B, H]; lengths: CPU [B]; recurrent_mask [B, P]; zoneout_h [T, B, P], zoneout_c /
// zoneout [T, B, H]; layer_norm_ih, layer_norm_hh [G]; layer_norm_cell_weight /
// layer_norm_cell_bias [H]; G = 4H (LSTM) or 3H (GRU), P = proj_size or H (GRU: H).
#include "sequence_cuda.h"

namespace rnntl {
namespace cuda_glue {
namespace {

void fill_layer_norm_lstm(OpCall& call, LayerNormLstmParams& p, double cell_clip, double proj_clip,
                          const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& c0,
                          const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
                          const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
                          const std::optional<at::Tensor>& cell_weight, const std::optional<at::Tensor>& cell_bias) {
  p.cell_clip = cell_clip;
  p.proj_clip = proj_clip;
  p.weight_hr = call.in(weight_hr);
  p.c0 = call.in(c0);
  p.zoneout_h = call.in(zoneout_h);
  p.zoneout_c = call.in(zoneout_c);
  p.gain_ih = call.in(layer_norm_ih);
  p.gain_hh = call.in(layer_norm_hh);
  p.cell_gain = call.in(cell_weight);
  p.cell_bias = call.in(cell_bias);
}

}  // namespace

// -> (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], normalized [T,B,8H], cells [T,B,3H],
//     inverse_std [T,B,3], hidden_pre_clip [T,B,P]); the reserve is empty unless
//     save_for_backward (hidden_pre_clip also unless proj_clip)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_norm_lstm_forward_cuda(const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                             const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
                             const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
                             const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths,
                             const std::optional<at::Tensor>& recurrent_mask,
                             const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
                             const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
                             const std::optional<at::Tensor>& layer_norm_cell_weight,
                             const std::optional<at::Tensor>& layer_norm_cell_bias, bool reverse, double cell_clip,
                             double proj_clip, double state_clip, double gate_clip, bool save_for_backward) {
  check_input_cuda(input);
  const LstmSizes sizes = check_layer_norm_lstm_forward_arguments(
      input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, recurrent_mask, zoneout_h, zoneout_c,
      layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, cell_clip, proj_clip, state_clip,
      gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, P = sizes.out_size;
  const int64_t G = 4 * H;
  OpCall call(input, lengths, T, B);
  at::Tensor output = call.empty(true, {T, B, P});
  at::Tensor h_n = call.empty(true, {B, P});
  at::Tensor c_n = call.empty(true, {B, H});
  at::Tensor gates = call.empty(save_for_backward, {T, B, G});
  at::Tensor normalized = call.empty(save_for_backward, {T, B, 2 * G});
  at::Tensor cells = call.empty(save_for_backward, {T, B, 3 * H});
  at::Tensor inverse_std = call.empty(save_for_backward, {T, B, 3});
  at::Tensor hidden_pre_clip = call.empty(save_for_backward && proj_clip > 0, {T, B, P});

  LayerNormLstmForwardParams p{};
  call.fill(p, I, H, P, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_forward(p, save_for_backward, bias_ih, bias_hh, output, h_n, gates);
  fill_layer_norm_lstm(call, p, cell_clip, proj_clip, weight_hr, c0, zoneout_h, zoneout_c, layer_norm_ih,
                       layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias);
  p.c_n = c_n.data_ptr();
  p.normalized = pointer_or_null(normalized);
  p.cells = pointer_or_null(cells);
  p.inverse_std = pointer_or_null(inverse_std);
  p.hidden_pre_clip = pointer_or_null(hidden_pre_clip);
  call.run(p, cuda::layer_norm_lstm_forward_workspace_bytes, cuda::layer_norm_lstm_forward);
  return {output, h_n, c_n, gates, normalized, cells, inverse_std, hidden_pre_clip};
}

// -> (grad_input [T,B,I], grad_weight_ih [4H,I], grad_weight_hh [4H,P], grad_bias [4H],
//     grad_weight_hr [P,H], grad_h0 [B,P], grad_c0 [B,H], grad_layer_norm_ih [4H],
//     grad_layer_norm_hh [4H], grad_layer_norm_cell_weight [H], grad_layer_norm_cell_bias [H]);
//     entries output_mask leaves off (or whose input is absent) are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
layer_norm_lstm_backward_cuda(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& normalized, const at::Tensor& cells,
    const at::Tensor& inverse_std, const at::Tensor& hidden_pre_clip, bool reverse, double cell_clip,
    double proj_clip, double state_clip, double gate_clip, std::array<bool, 11> output_mask) {
  check_input_cuda(input);
  const LstmSizes sizes = check_layer_norm_lstm_backward_arguments(
      grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, recurrent_mask, zoneout_h,
      zoneout_c, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, output, gates, normalized,
      cells, inverse_std, hidden_pre_clip, cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, P = sizes.out_size;
  const int64_t G = 4 * H;
  const bool project = weight_hr.has_value();
  OpCall call(input, lengths, T, B);
  at::Tensor grad_input = call.empty(output_mask[0], {T, B, I});
  at::Tensor grad_weight_ih = call.empty(output_mask[1], {G, I});
  at::Tensor grad_weight_hh = call.empty(output_mask[2], {G, P});
  at::Tensor grad_bias = call.empty(output_mask[3], {G});
  at::Tensor grad_weight_hr = call.empty(project && output_mask[4], {P, H});
  at::Tensor grad_h0 = call.empty(output_mask[5], {B, P});
  at::Tensor grad_c0 = call.empty(output_mask[6], {B, H});
  at::Tensor grad_gain_ih = call.empty(output_mask[7], {G});
  at::Tensor grad_gain_hh = call.empty(output_mask[8], {G});
  at::Tensor grad_cell_gain = call.empty(output_mask[9], {H});
  at::Tensor grad_cell_bias = call.empty(output_mask[10], {H});

  LayerNormLstmBackwardParams p{};
  call.fill(p, I, H, P, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_backward(p, state_clip, gate_clip, grad_output, grad_h_n, output, gates, grad_input, grad_weight_ih,
                     grad_weight_hh, grad_h0);
  fill_layer_norm_lstm(call, p, cell_clip, proj_clip, weight_hr, c0, zoneout_h, zoneout_c, layer_norm_ih,
                       layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias);
  p.grad_c_n = call.in(grad_c_n);
  p.normalized = call.in(normalized);
  p.cells = call.in(cells);
  p.inverse_std = call.in(inverse_std);
  p.hidden_pre_clip = proj_clip > 0 ? call.in(hidden_pre_clip) : nullptr;
  p.grad_bias = pointer_or_null(grad_bias);
  p.grad_weight_hr = pointer_or_null(grad_weight_hr);
  p.grad_c0 = pointer_or_null(grad_c0);
  p.grad_gain_ih = pointer_or_null(grad_gain_ih);
  p.grad_gain_hh = pointer_or_null(grad_gain_hh);
  p.grad_cell_gain = pointer_or_null(grad_cell_gain);
  p.grad_cell_bias = pointer_or_null(grad_cell_bias);
  call.run(p, cuda::layer_norm_lstm_backward_workspace_bytes, cuda::layer_norm_lstm_backward);
  return {grad_input,     grad_weight_ih, grad_weight_hh, grad_bias,      grad_weight_hr, grad_h0,
          grad_c0,        grad_gain_ih,   grad_gain_hh,   grad_cell_gain, grad_cell_bias};
}

// -> (output [T,B,H], h_n [B,H], gates [T,B,3H], normalized [T,B,6H], inverse_std [T,B,2]);
//     the reserve is empty unless save_for_backward
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_gru_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout,
    const at::Tensor& layer_norm_ih, const at::Tensor& layer_norm_hh, bool reverse, double state_clip,
    double gate_clip, bool save_for_backward) {
  check_input_cuda(input);
  const GruSizes sizes = check_layer_norm_gru_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0,
                                                                recurrent_mask, zoneout, layer_norm_ih, layer_norm_hh,
                                                                state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, G = 3 * H;
  OpCall call(input, lengths, T, B);
  at::Tensor output = call.empty(true, {T, B, H});
  at::Tensor h_n = call.empty(true, {B, H});
  at::Tensor gates = call.empty(save_for_backward, {T, B, G});
  at::Tensor normalized = call.empty(save_for_backward, {T, B, 2 * G});
  at::Tensor inverse_std = call.empty(save_for_backward, {T, B, 2});

  LayerNormGruForwardParams p{};
  call.fill(p, I, H, H, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_forward(p, save_for_backward, bias_ih, bias_hh, output, h_n, gates);
  p.zoneout = call.in(zoneout);
  p.gain_ih = call.in(layer_norm_ih);
  p.gain_hh = call.in(layer_norm_hh);
  p.normalized = pointer_or_null(normalized);
  p.inverse_std = pointer_or_null(inverse_std);
  call.run(p, cuda::layer_norm_gru_forward_workspace_bytes, cuda::layer_norm_gru_forward);
  return {output, h_n, gates, normalized, inverse_std};
}

// -> (grad_input [T,B,I], grad_weight_ih [3H,I], grad_weight_hh [3H,H], grad_bias_ih [3H],
//     grad_bias_hh [3H], grad_h0 [B,H], grad_layer_norm_ih [3H], grad_layer_norm_hh [3H]);
//     entries output_mask leaves off are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_norm_gru_backward_cuda(const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
                             const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                             const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& h0,
                             const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& recurrent_mask,
                             const std::optional<at::Tensor>& zoneout, const at::Tensor& layer_norm_ih,
                             const at::Tensor& layer_norm_hh, const at::Tensor& output, const at::Tensor& gates,
                             const at::Tensor& normalized, const at::Tensor& inverse_std, bool reverse,
                             double state_clip, double gate_clip, std::array<bool, 8> output_mask) {
  check_input_cuda(input);
  const GruSizes sizes = check_layer_norm_gru_backward_arguments(
      grad_output, grad_h_n, input, weight_ih, weight_hh, bias_hh, h0, recurrent_mask, zoneout, layer_norm_ih,
      layer_norm_hh, output, gates, normalized, inverse_std, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, G = 3 * H;
  OpCall call(input, lengths, T, B);
  at::Tensor grad_input = call.empty(output_mask[0], {T, B, I});
  at::Tensor grad_weight_ih = call.empty(output_mask[1], {G, I});
  at::Tensor grad_weight_hh = call.empty(output_mask[2], {G, H});
  at::Tensor grad_bias_ih = call.empty(output_mask[3], {G});
  at::Tensor grad_bias_hh = call.empty(output_mask[4], {G});
  at::Tensor grad_h0 = call.empty(output_mask[5], {B, H});
  at::Tensor grad_gain_ih = call.empty(output_mask[6], {G});
  at::Tensor grad_gain_hh = call.empty(output_mask[7], {G});

  LayerNormGruBackwardParams p{};
  call.fill(p, I, H, H, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_backward(p, state_clip, gate_clip, grad_output, grad_h_n, output, gates, grad_input, grad_weight_ih,
                     grad_weight_hh, grad_h0);
  p.zoneout = call.in(zoneout);
  p.gain_ih = call.in(layer_norm_ih);
  p.gain_hh = call.in(layer_norm_hh);
  p.bias_hh = call.in(bias_hh);
  p.normalized = call.in(normalized);
  p.inverse_std = call.in(inverse_std);
  p.grad_bias_ih = pointer_or_null(grad_bias_ih);
  p.grad_bias_hh = pointer_or_null(grad_bias_hh);
  p.grad_gain_ih = pointer_or_null(grad_gain_ih);
  p.grad_gain_hh = pointer_or_null(grad_gain_hh);
  call.run(p, cuda::layer_norm_gru_backward_workspace_bytes, cuda::layer_norm_gru_backward);
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0, grad_gain_ih, grad_gain_hh};
}

}  // namespace cuda_glue
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CUDA, m) {
  m.impl("layer_norm_lstm_forward", &rnntl::cuda_glue::layer_norm_lstm_forward_cuda);
  m.impl("layer_norm_lstm_backward", &rnntl::cuda_glue::layer_norm_lstm_backward_cuda);
  m.impl("layer_norm_gru_forward", &rnntl::cuda_glue::layer_norm_gru_forward_cuda);
  m.impl("layer_norm_gru_backward", &rnntl::cuda_glue::layer_norm_gru_backward_cuda);
}
