// rnntl_fast::lstm_forward / lstm_backward for CUDA tensors: checks, tensors -> POD params
// (rnntl/params.h), device guard and stream, then the kernels of csrc/cuda/lstm_kernels.cu.
// Same semantics and outputs as the CPU ops (csrc/cpu/lstm_cpu.cpp), including the saved
// reserve (gates, cells, hidden_pre_clip, carried_cells) that the backward reads; the reserve
// is padded [T, B, *] here (zeros at padded steps) where the CPU op keeps compact rows.
// Shapes: input [T, B, I]; weight_ih [4H, I]; weight_hh [4H, P]; weight_hr [P, H];
// h0 [B, P]; c0 [B, H]; lengths: CPU [B]; recurrent_mask [B, P]; zoneout keep weights
// zoneout_h [T, B, P], zoneout_c [T, B, H]; P = proj_size or H.
#include "sequence_cuda.h"

namespace rnntl {
namespace cuda_glue {
namespace {

// What the LSTM forward and backward params share (rnntl/params.h: LstmParams); checks the
// keep weights (read through raw pointers, so a wrong shape would read out of bounds).
void fill_lstm(OpCall& call, LstmParams& p, const at::Tensor& input, const LstmSizes& sizes, double cell_clip,
               double proj_clip, const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& c0,
               const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c) {
  check_optional(zoneout_h, input, {sizes.steps, sizes.batch, sizes.out_size}, "zoneout_h");
  check_optional(zoneout_c, input, {sizes.steps, sizes.batch, sizes.hidden}, "zoneout_c");
  p.cell_clip = cell_clip;
  p.proj_clip = proj_clip;
  p.weight_hr = call.in(weight_hr);
  p.c0 = call.in(c0);
  p.zoneout_h = call.in(zoneout_h);
  p.zoneout_c = call.in(zoneout_c);
}

}  // namespace

// -> (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], cells [T,B,H], hidden_pre_clip [T,B,P],
//     carried_cells [T,B,H]); the last four are empty unless save_for_backward (and, for
//     hidden_pre_clip, proj_clip; for carried_cells, zoneout_c)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, bool reverse,
    double cell_clip, double proj_clip, double state_clip, double gate_clip, bool save_for_backward) {
  check_input_cuda(input);
  const LstmSizes sizes = check_lstm_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0,
                                                       c0, cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, P = sizes.out_size;
  const int64_t G = 4 * H;
  OpCall call(input, lengths, T, B);
  at::Tensor output = call.empty(true, {T, B, P});
  at::Tensor h_n = call.empty(true, {B, P});
  at::Tensor c_n = call.empty(true, {B, H});
  at::Tensor gates = call.empty(save_for_backward, {T, B, G});
  at::Tensor cells = call.empty(save_for_backward, {T, B, H});
  at::Tensor hidden_pre_clip = call.empty(save_for_backward && proj_clip > 0, {T, B, P});
  at::Tensor carried_cells = call.empty(save_for_backward && zoneout_c.has_value(), {T, B, H});

  LstmForwardParams p{};
  call.fill(p, I, H, P, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_forward(p, save_for_backward, bias_ih, bias_hh, output, h_n, gates);
  fill_lstm(call, p, input, sizes, cell_clip, proj_clip, weight_hr, c0, zoneout_h, zoneout_c);
  p.c_n = c_n.data_ptr();
  p.cells = pointer_or_null(cells);
  p.hidden_pre_clip = pointer_or_null(hidden_pre_clip);
  p.carried_cells = pointer_or_null(carried_cells);
  call.run(p, cuda::lstm_forward_workspace_bytes, cuda::lstm_forward);
  return {output, h_n, c_n, gates, cells, hidden_pre_clip, carried_cells};
}

// -> (grad_input [T,B,I], grad_weight_ih [4H,I], grad_weight_hh [4H,P], grad_bias [4H],
//     grad_weight_hr [P,H], grad_h0 [B,P], grad_c0 [B,H]); unmasked entries are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cuda(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hidden_pre_clip, const at::Tensor& carried_cells, bool reverse,
    double cell_clip, double proj_clip, double state_clip, double gate_clip, std::array<bool, 7> output_mask) {
  check_input_cuda(input);
  const LstmSizes sizes =
      check_lstm_backward_arguments(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0,
                                    output, gates, cells, hidden_pre_clip, cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, P = sizes.out_size;
  const int64_t G = 4 * H;
  if (zoneout_c.has_value()) {  // the backward's c_{t-1} is the zoned cell
    check_same(input, carried_cells, "carried_cells");
    check_shape(carried_cells, {T, B, H}, "carried_cells (forward run without save_for_backward?)");
  }
  const bool project = weight_hr.has_value();
  OpCall call(input, lengths, T, B);
  at::Tensor grad_input = call.empty(output_mask[0], {T, B, I});
  at::Tensor grad_weight_ih = call.empty(output_mask[1], {G, I});
  at::Tensor grad_weight_hh = call.empty(output_mask[2], {G, P});
  at::Tensor grad_bias = call.empty(output_mask[3], {G});
  at::Tensor grad_weight_hr = call.empty(project && output_mask[4], {P, H});
  at::Tensor grad_h0 = call.empty(output_mask[5], {B, P});
  at::Tensor grad_c0 = call.empty(output_mask[6], {B, H});

  LstmBackwardParams p{};
  call.fill(p, I, H, P, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_backward(p, state_clip, gate_clip, grad_output, grad_h_n, output, gates, grad_input, grad_weight_ih,
                     grad_weight_hh, grad_h0);
  fill_lstm(call, p, input, sizes, cell_clip, proj_clip, weight_hr, c0, zoneout_h, zoneout_c);
  p.grad_c_n = call.in(grad_c_n);
  p.cells = call.in(cells);
  p.hidden_pre_clip = proj_clip > 0 ? call.in(hidden_pre_clip) : nullptr;
  p.carried_cells = zoneout_c.has_value() ? call.in(carried_cells) : nullptr;
  p.grad_bias = pointer_or_null(grad_bias);
  p.grad_weight_hr = pointer_or_null(grad_weight_hr);
  p.grad_c0 = pointer_or_null(grad_c0);
  call.run(p, cuda::lstm_backward_workspace_bytes, cuda::lstm_backward);
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr, grad_h0, grad_c0};
}

}  // namespace cuda_glue
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CUDA, m) {
  m.impl("lstm_forward", &rnntl::cuda_glue::lstm_forward_cuda);
  m.impl("lstm_backward", &rnntl::cuda_glue::lstm_backward_cuda);
}
