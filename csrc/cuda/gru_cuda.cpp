// rnntl_fast::gru_forward / gru_backward for CUDA tensors: checks, tensors -> POD params,
// device guard and stream, then the kernels of csrc/cuda/gru_kernels.cu. Same semantics
// and outputs as the CPU ops (csrc/cpu/gru_cpu.cpp), including the saved reserve.
// Shapes: input [T, B, I]; weight_ih [3H, I]; weight_hh [3H, H]; biases [3H]; h0 [B, H];
// lengths: CPU [B]; recurrent_mask [B, H]; zoneout keep weights [T, B, H].
#include "sequence_cuda.h"

namespace rnntl {
namespace cuda_glue {

// -> (output [T,B,H], h_n [B,H], gates [T,B,3H], hidden_n [T,B,H])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout, bool reverse,
    double state_clip, double gate_clip, bool save_for_backward) {
  check_input_cuda(input);
  const GruSizes sizes =
      check_gru_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, G = 3 * H;
  check_optional(zoneout, input, {T, B, H}, "zoneout");
  OpCall call(input, lengths, T, B);
  at::Tensor output = call.empty(true, {T, B, H});
  at::Tensor h_n = call.empty(true, {B, H});
  at::Tensor gates = call.empty(save_for_backward, {T, B, G});
  at::Tensor hidden_n = call.empty(save_for_backward, {T, B, H});

  GruForwardParams p{};
  call.fill(p, I, H, H, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_forward(p, save_for_backward, bias_ih, bias_hh, output, h_n, gates);
  p.hidden_n = pointer_or_null(hidden_n);
  p.zoneout = call.in(zoneout);
  call.run(p, cuda::gru_forward_workspace_bytes, cuda::gru_forward);
  return {output, h_n, gates, hidden_n};
}

// -> (grad_input [T,B,I], grad_weight_ih [3H,I], grad_weight_hh [3H,H], grad_bias_ih [3H],
//     grad_bias_hh [3H], grad_h0 [B,H]); unmasked entries are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cuda(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& hidden_n, bool reverse, double state_clip,
    double gate_clip, std::array<bool, 6> output_mask) {
  check_input_cuda(input);
  const GruSizes sizes = check_gru_backward_arguments(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, output,
                                                      gates, hidden_n, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, G = 3 * H;
  check_optional(zoneout, input, {T, B, H}, "zoneout");
  OpCall call(input, lengths, T, B);
  at::Tensor grad_input = call.empty(output_mask[0], {T, B, I});
  at::Tensor grad_weight_ih = call.empty(output_mask[1], {G, I});
  at::Tensor grad_weight_hh = call.empty(output_mask[2], {G, H});
  at::Tensor grad_bias_ih = call.empty(output_mask[3], {G});
  at::Tensor grad_bias_hh = call.empty(output_mask[4], {G});
  at::Tensor grad_h0 = call.empty(output_mask[5], {B, H});

  GruBackwardParams p{};
  call.fill(p, I, H, H, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_backward(p, state_clip, gate_clip, grad_output, grad_h_n, output, gates, grad_input, grad_weight_ih,
                     grad_weight_hh, grad_h0);
  p.hidden_n = call.in(hidden_n);
  p.zoneout = call.in(zoneout);
  p.grad_bias_ih = pointer_or_null(grad_bias_ih);
  p.grad_bias_hh = pointer_or_null(grad_bias_hh);
  call.run(p, cuda::gru_backward_workspace_bytes, cuda::gru_backward);
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0};
}

}  // namespace cuda_glue
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CUDA, m) {
  m.impl("gru_forward", &rnntl::cuda_glue::gru_forward_cuda);
  m.impl("gru_backward", &rnntl::cuda_glue::gru_backward_cuda);
}
