// rnntl_fast::lstm_forward / lstm_backward for CUDA tensors: checks, tensors -> POD params
// (rnntl/params.h), device guard and stream, then the kernels of csrc/cuda/lstm_kernels.cu.
// Same semantics and outputs as the CPU ops (csrc/cpu/lstm_cpu.cpp), including the saved
// reserve (gates, cells, hidden_pre_clip) that the backward reads.
// Shapes: input [T, B, I]; weight_ih [4H, I]; weight_hh [4H, P]; weight_hr [P, H];
// h0 [B, P]; c0 [B, H]; lengths: CPU [B]; P = proj_size or H.
#include "sequence_cuda.h"

namespace rnntl {
namespace cuda_glue {

// -> (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], cells [T,B,H], hidden_pre_clip [T,B,P])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths, bool reverse,
    double cell_clip, double proj_clip, double state_clip, double gate_clip, bool save_for_backward) {
  check_input_cuda(input);
  const LstmSizes sizes = check_lstm_forward_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0,
                                                       c0, cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, P = sizes.out_size;
  const int64_t G = 4 * H;
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceOrder order(lengths, T, B, input.device());
  const at::TensorOptions options = input.options();

  const Contiguous x(input), w_ih(weight_ih), w_hh(weight_hh), b_ih(bias_ih), b_hh(bias_hh), w_hr(weight_hr),
      h0c(h0), c0c(c0);
  at::Tensor output = at::empty({T, B, P}, options);
  at::Tensor h_n = at::empty({B, P}, options);
  at::Tensor c_n = at::empty({B, H}, options);
  at::Tensor gates = empty_if(save_for_backward, {T, B, G}, options);
  at::Tensor cells = empty_if(save_for_backward, {T, B, H}, options);
  at::Tensor hidden_pre_clip = empty_if(save_for_backward && proj_clip > 0, {T, B, P}, options);

  LstmForwardParams p{};
  p.dtype = dtype_of(input);
  p.steps = T;
  p.batch = B;
  p.input_size = I;
  p.hidden = H;
  p.out_size = P;
  p.reverse = reverse;
  p.save = save_for_backward;
  p.cell_clip = cell_clip;
  p.proj_clip = proj_clip;
  p.input = x.pointer;
  p.weight_ih = w_ih.pointer;
  p.weight_hh = w_hh.pointer;
  p.bias_ih = b_ih.pointer;
  p.bias_hh = b_hh.pointer;
  p.weight_hr = w_hr.pointer;
  p.h0 = h0c.pointer;
  p.c0 = c0c.pointer;
  p.order = order.view();
  p.output = output.data_ptr();
  p.h_n = h_n.data_ptr();
  p.c_n = c_n.data_ptr();
  p.gates = pointer_or_null(gates);
  p.cells = pointer_or_null(cells);
  p.hidden_pre_clip = pointer_or_null(hidden_pre_clip);
  p.env = make_env(&options);
  const at::Tensor workspace = allocate_workspace(cuda::lstm_forward_workspace_bytes(p), input);
  p.env.workspace = workspace.data_ptr();
  check_run(cuda::lstm_forward(p));
  return {output, h_n, c_n, gates, cells, hidden_pre_clip};
}

// -> (grad_input [T,B,I], grad_weight_ih [4H,I], grad_weight_hh [4H,P], grad_bias [4H],
//     grad_weight_hr [P,H], grad_h0 [B,P], grad_c0 [B,H]); unmasked entries are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cuda(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& hidden_pre_clip, bool reverse,
    double cell_clip, double proj_clip, double state_clip, double gate_clip, std::array<bool, 7> output_mask) {
  check_input_cuda(input);
  const LstmSizes sizes =
      check_lstm_backward_arguments(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0,
                                    output, gates, cells, hidden_pre_clip, cell_clip, proj_clip, state_clip, gate_clip);
  const int64_t T = sizes.steps, B = sizes.batch, I = sizes.input_size, H = sizes.hidden, P = sizes.out_size;
  const int64_t G = 4 * H;
  const bool project = weight_hr.has_value();
  const c10::cuda::CUDAGuard guard(input.device());
  const DeviceOrder order(lengths, T, B, input.device());
  const at::TensorOptions options = input.options();

  const Contiguous go(grad_output), ghn(grad_h_n), gcn(grad_c_n), x(input), w_ih(weight_ih), w_hh(weight_hh),
      w_hr(weight_hr), h0c(h0), c0c(c0), out(output), act(gates), cel(cells),
      pre(proj_clip > 0 ? std::optional<at::Tensor>(hidden_pre_clip) : std::nullopt);
  // Each skipped gradient is its own empty tensor: outputs of an op must not alias.
  const auto wanted = [&](bool need, at::IntArrayRef sizes) { return empty_if(need, sizes, options); };
  at::Tensor grad_input = wanted(output_mask[0], {T, B, I});
  at::Tensor grad_weight_ih = wanted(output_mask[1], {G, I});
  at::Tensor grad_weight_hh = wanted(output_mask[2], {G, P});
  at::Tensor grad_bias = wanted(output_mask[3], {G});
  at::Tensor grad_weight_hr = wanted(project && output_mask[4], {P, H});
  at::Tensor grad_h0 = wanted(output_mask[5], {B, P});
  at::Tensor grad_c0 = wanted(output_mask[6], {B, H});

  LstmBackwardParams p{};
  p.dtype = dtype_of(input);
  p.steps = T;
  p.batch = B;
  p.input_size = I;
  p.hidden = H;
  p.out_size = P;
  p.reverse = reverse;
  p.cell_clip = cell_clip;
  p.proj_clip = proj_clip;
  p.state_clip = state_clip;
  p.gate_clip = gate_clip;
  p.grad_output = go.pointer;
  p.grad_h_n = ghn.pointer;
  p.grad_c_n = gcn.pointer;
  p.input = x.pointer;
  p.weight_ih = w_ih.pointer;
  p.weight_hh = w_hh.pointer;
  p.weight_hr = w_hr.pointer;
  p.h0 = h0c.pointer;
  p.c0 = c0c.pointer;
  p.output = out.pointer;
  p.gates = act.pointer;
  p.cells = cel.pointer;
  p.hidden_pre_clip = pre.pointer;
  p.order = order.view();
  p.grad_input = pointer_or_null(grad_input);
  p.grad_weight_ih = pointer_or_null(grad_weight_ih);
  p.grad_weight_hh = pointer_or_null(grad_weight_hh);
  p.grad_bias = pointer_or_null(grad_bias);
  p.grad_weight_hr = pointer_or_null(grad_weight_hr);
  p.grad_h0 = pointer_or_null(grad_h0);
  p.grad_c0 = pointer_or_null(grad_c0);
  p.env = make_env(&options);
  const at::Tensor workspace = allocate_workspace(cuda::lstm_backward_workspace_bytes(p), input);
  p.env.workspace = workspace.data_ptr();
  check_run(cuda::lstm_backward(p));
  return {grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr, grad_h0, grad_c0};
}

}  // namespace cuda_glue
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CUDA, m) {
  m.impl("lstm_forward", &rnntl::cuda_glue::lstm_forward_cuda);
  m.impl("lstm_backward", &rnntl::cuda_glue::lstm_backward_cuda);
}
