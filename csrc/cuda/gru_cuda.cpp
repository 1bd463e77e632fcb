// rnntl_fast::gru_forward / gru_backward for CUDA tensors: checks, tensors -> POD params,
// device guard and stream, then the kernels of csrc/cuda/gru_kernels.cu. Same semantics
// and outputs as the CPU ops (csrc/cpu/gru_cpu.cpp), including the saved reserve.
// Shapes: input [T, B, I]; weight_ih [3H, I]; weight_hh [3H, H]; biases [3H]; h0 [B, H];
// lengths: CPU [B].
#include "sequence_cuda.h"

namespace rnntl {
namespace cuda_glue {

// -> (output [T,B,H], h_n [B,H], gates [T,B,3H], hidden_n [T,B,H])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths, bool reverse,
    double state_clip, double gate_clip, bool save_for_backward) {
  check_input_cuda(input);
  const GruSizes sizes =
      check_gru_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, G = 3 * H;
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceOrder order(lengths, T, B, input.device());
  const at::TensorOptions options = input.options();

  const Contiguous x(input), w_ih(weight_ih), w_hh(weight_hh), b_ih(bias_ih), b_hh(bias_hh), h0c(h0);
  at::Tensor output = at::empty({T, B, H}, options);
  at::Tensor h_n = at::empty({B, H}, options);
  at::Tensor gates = empty_if(save_for_backward, {T, B, G}, options);
  at::Tensor hidden_n = empty_if(save_for_backward, {T, B, H}, options);

  GruForwardParams p{};
  p.dtype = dtype_of(input);
  p.steps = T;
  p.batch = B;
  p.input_size = I;
  p.hidden = H;
  p.reverse = reverse;
  p.save = save_for_backward;
  p.input = x.pointer;
  p.weight_ih = w_ih.pointer;
  p.weight_hh = w_hh.pointer;
  p.bias_ih = b_ih.pointer;
  p.bias_hh = b_hh.pointer;
  p.h0 = h0c.pointer;
  p.order = order.view();
  p.output = output.data_ptr();
  p.h_n = h_n.data_ptr();
  p.gates = pointer_or_null(gates);
  p.hidden_n = pointer_or_null(hidden_n);
  p.env = make_env(&options);
  const at::Tensor workspace = allocate_workspace(cuda::gru_forward_workspace_bytes(p), input);
  p.env.workspace = workspace.data_ptr();
  check_run(cuda::gru_forward(p));
  return {output, h_n, gates, hidden_n};
}

// -> (grad_input [T,B,I], grad_weight_ih [3H,I], grad_weight_hh [3H,H], grad_bias_ih [3H],
//     grad_bias_hh [3H], grad_h0 [B,H]); unmasked entries are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward_cuda(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& hidden_n, bool reverse, double state_clip,
    double gate_clip, std::array<bool, 6> output_mask) {
  check_input_cuda(input);
  const GruSizes sizes = check_gru_backward_arguments(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, output,
                                                      gates, hidden_n, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, G = 3 * H;
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceOrder order(lengths, T, B, input.device());
  const at::TensorOptions options = input.options();

  const Contiguous go(grad_output), ghn(grad_h_n), x(input), w_ih(weight_ih), w_hh(weight_hh), h0c(h0),
      out(output), act(gates), hn(hidden_n);
  const auto wanted = [&](bool need, at::IntArrayRef sizes) { return empty_if(need, sizes, options); };
  at::Tensor grad_input = wanted(output_mask[0], {T, B, I});
  at::Tensor grad_weight_ih = wanted(output_mask[1], {G, I});
  at::Tensor grad_weight_hh = wanted(output_mask[2], {G, H});
  at::Tensor grad_bias_ih = wanted(output_mask[3], {G});
  at::Tensor grad_bias_hh = wanted(output_mask[4], {G});
  at::Tensor grad_h0 = wanted(output_mask[5], {B, H});

  GruBackwardParams p{};
  p.dtype = dtype_of(input);
  p.steps = T;
  p.batch = B;
  p.input_size = I;
  p.hidden = H;
  p.reverse = reverse;
  p.state_clip = state_clip;
  p.gate_clip = gate_clip;
  p.grad_output = go.pointer;
  p.grad_h_n = ghn.pointer;
  p.input = x.pointer;
  p.weight_ih = w_ih.pointer;
  p.weight_hh = w_hh.pointer;
  p.h0 = h0c.pointer;
  p.output = out.pointer;
  p.gates = act.pointer;
  p.hidden_n = hn.pointer;
  p.order = order.view();
  p.grad_input = pointer_or_null(grad_input);
  p.grad_weight_ih = pointer_or_null(grad_weight_ih);
  p.grad_weight_hh = pointer_or_null(grad_weight_hh);
  p.grad_bias_ih = pointer_or_null(grad_bias_ih);
  p.grad_bias_hh = pointer_or_null(grad_bias_hh);
  p.grad_h0 = pointer_or_null(grad_h0);
  p.env = make_env(&options);
  const at::Tensor workspace = allocate_workspace(cuda::gru_backward_workspace_bytes(p), input);
  p.env.workspace = workspace.data_ptr();
  check_run(cuda::gru_backward(p));
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0};
}

}  // namespace cuda_glue
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CUDA, m) {
  m.impl("gru_forward", &rnntl::cuda_glue::gru_forward_cuda);
  m.impl("gru_backward", &rnntl::cuda_glue::gru_backward_cuda);
}
