// rnntl_fast::rnn_forward / rnn_backward (Elman RNN) for CUDA tensors: checks, tensors ->
// POD params, device guard and stream, then the kernels of csrc/cuda/rnn_kernels.cu. Same
// semantics and outputs as the CPU ops (csrc/cpu/rnn_cpu.cpp), including the saved reserve
// `activations` and its layout (the compact rows first, then zeros; only with zoneout).
// Shapes: input [T, B, I]; weight_ih [H, I]; weight_hh [H, H]; biases [H]; h0 [B, H];
// lengths: CPU [B]; recurrent_mask [B, H]; zoneout [T, B, H].
#include "sequence_cuda.h"

namespace rnntl {
namespace cuda_glue {

// -> (output [T,B,H], h_n [B,H], activations [T,B,H] with save_for_backward and zoneout, else [0])
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout, bool relu,
    bool reverse, double state_clip, double gate_clip, bool save_for_backward) {
  check_input_cuda(input);
  const RnnSizes sizes = check_rnn_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0,
                                                     recurrent_mask, zoneout, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden;
  OpCall call(input, lengths, T, B);
  at::Tensor output = call.empty(true, {T, B, H});
  at::Tensor h_n = call.empty(true, {B, H});
  at::Tensor activations = call.empty(save_for_backward && zoneout.has_value(), {T, B, H});

  RnnForwardParams p{};
  call.fill(p, I, H, H, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  call.fill_forward(p, save_for_backward, bias_ih, bias_hh, output, h_n, activations);
  p.relu = relu;
  p.zoneout = call.in(zoneout);
  call.run(p, cuda::rnn_forward_workspace_bytes, cuda::rnn_forward);
  return {output, h_n, activations};
}

// -> (grad_input [T,B,I], grad_weight_ih [H,I], grad_weight_hh [H,H], grad_bias_ih [H],
//     grad_bias_hh [H], grad_h0 [B,H]); unmasked entries are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cuda(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout,
    const at::Tensor& output, const at::Tensor& activations, bool relu, bool reverse, double state_clip,
    double gate_clip, std::array<bool, 6> output_mask) {
  check_input_cuda(input);
  const RnnSizes sizes = check_rnn_backward_arguments(grad_output, grad_h_n, input, weight_ih, weight_hh, h0,
                                                      recurrent_mask, zoneout, output, activations, state_clip,
                                                      gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden;
  OpCall call(input, lengths, T, B);
  at::Tensor grad_input = call.empty(output_mask[0], {T, B, I});
  at::Tensor grad_weight_ih = call.empty(output_mask[1], {H, I});
  at::Tensor grad_weight_hh = call.empty(output_mask[2], {H, H});
  at::Tensor grad_bias_ih = call.empty(output_mask[3], {H});
  at::Tensor grad_bias_hh = call.empty(output_mask[4], {H});
  at::Tensor grad_h0 = call.empty(output_mask[5], {B, H});

  RnnBackwardParams p{};
  call.fill(p, I, H, H, reverse, weight_ih, weight_hh, h0, recurrent_mask);
  // The reserve is read only with zoneout (without it f(a_t) is the output).
  call.fill_backward(p, state_clip, gate_clip, grad_output, grad_h_n, output,
                     zoneout.has_value() ? activations : at::Tensor(), grad_input, grad_weight_ih, grad_weight_hh,
                     grad_h0);
  p.relu = relu;
  p.zoneout = call.in(zoneout);
  p.grad_bias_ih = pointer_or_null(grad_bias_ih);
  p.grad_bias_hh = pointer_or_null(grad_bias_hh);
  call.run(p, cuda::rnn_backward_workspace_bytes, cuda::rnn_backward);
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0};
}

}  // namespace cuda_glue
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CUDA, m) {
  m.impl("rnn_forward", &rnntl::cuda_glue::rnn_forward_cuda);
  m.impl("rnn_backward", &rnntl::cuda_glue::rnn_backward_cuda);
}
