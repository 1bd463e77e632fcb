// Torch-facing pieces shared by lstm_cuda.cpp and gru_cuda.cpp: argument checks for CUDA
// tensors, the batch order copied to the device, the cuBLAS GEMM hook (through ATen, on
// the current stream), the strategy chosen by env var, and OpCall, which fills the parts
// of the params every op shares and runs the kernels with their workspace.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs the cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <rnntl/cuda_api.h>
#include <rnntl/host_order.h>
#include <rnntl/params.h>

#include "../op_checks.h"

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace rnntl {
namespace cuda_glue {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "rnntl_fast: the CUDA kernels support float32, float16 and bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

inline void check_input_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "rnntl_fast: input must be a CUDA tensor for the CUDA kernels, got ", input.device());
  check_input_shape(input);
  dtype_of(input);
}

// recurrent_mask (recurrent dropout, docs/semantics.md section 10): [B, width] on the
// input's device, in its dtype, or none. The kernels read it through a raw pointer, so a
// wrong shape would read out of bounds: checked here, naming the argument.
inline void check_recurrent_mask(const std::optional<at::Tensor>& recurrent_mask, const at::Tensor& input,
                                 int64_t batch, int64_t width) {
  if (!recurrent_mask.has_value()) return;
  const at::Tensor& mask = *recurrent_mask;
  TORCH_CHECK(mask.device() == input.device(), "rnntl_fast: recurrent_mask is on ", mask.device(),
              " but input is on ", input.device());
  TORCH_CHECK(mask.scalar_type() == input.scalar_type(), "rnntl_fast: recurrent_mask has dtype ",
              mask.scalar_type(), " but input has dtype ", input.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == width,
              "rnntl_fast: recurrent_mask must have shape [", batch, ", ", width, "], got ", mask.sizes());
}

// lengths: CPU integer tensor [B] (checked here), or none.
struct DeviceOrder {
  at::Tensor lengths_host;
  HostOrder host;
  at::Tensor device;  // [3B + 2T + 1] int64: order, length, active, first_row, slot (HostOrder::packed)

  DeviceOrder(const std::optional<at::Tensor>& lengths, int64_t steps, int64_t batch, const at::Device& where)
      : lengths_host(checked_lengths(lengths, steps, batch)),
        host(lengths_host.defined() ? lengths_host.data_ptr<int64_t>() : nullptr, steps, batch) {
    const at::Tensor packed =
        at::from_blob(host.packed.data(), {int64_t(host.packed.size())}, at::TensorOptions().dtype(at::kLong));
    device = packed.to(where);  // synchronous copy from pageable memory: `packed` may die after
  }

  OrderView view() const { return host.view(device.data_ptr<int64_t>()); }
};

// GEMMs of the kernels' drivers, through ATen (cuBLAS, current stream, float accumulation
// for half and bfloat16).
inline void run_gemm(void* context, DType, const GemmCall& c) {
  const at::TensorOptions& options = *static_cast<const at::TensorOptions*>(context);
  const auto view = [&](const void* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<void*>(p), {rows, cols}, {ld, 1}, options);
  };
  const at::Tensor a = c.a_transposed ? view(c.a, c.k, c.m, c.lda).t() : view(c.a, c.m, c.k, c.lda);
  const at::Tensor b = c.b_transposed ? view(c.b, c.n, c.k, c.ldb).t() : view(c.b, c.k, c.n, c.ldb);
  at::Tensor out = view(c.c, c.m, c.n, c.ldc);
  if (c.k == 0) {
    if (!c.accumulate) out.zero_();
    return;
  }
  if (c.accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// RNNTL_CUDA_STRATEGY=auto|stepwise|persistent (default auto: persistent where it fits).
inline Strategy strategy_from_env() {
  const char* value = std::getenv("RNNTL_CUDA_STRATEGY");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return Strategy::kAuto;
  if (std::strcmp(value, "stepwise") == 0) return Strategy::kStepwise;
  if (std::strcmp(value, "persistent") == 0) return Strategy::kPersistent;
  TORCH_CHECK(false, "rnntl_fast: RNNTL_CUDA_STRATEGY must be auto, stepwise or persistent, got '", value, "'");
  return Strategy::kAuto;
}

// Launch environment; `options` must outlive the run (the GEMM hook points at it).
inline LaunchEnv make_env(const at::TensorOptions* options) {
  LaunchEnv env;
  env.stream = static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream());
  env.gemm = GemmHook{&run_gemm, const_cast<at::TensorOptions*>(options)};
  env.workspace = nullptr;
  env.strategy = strategy_from_env();
  env.threads_per_block = 0;
  return env;
}

inline void* pointer_or_null(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr() : nullptr; }

// One CUDA op call: device guard, the batch order on the device, the contiguous inputs
// the params point into (kept alive until the kernels are queued) and the launch
// environment. Shapes: input [T, B, I]; lengths: CPU [B] or none.
class OpCall {
 public:
  OpCall(const at::Tensor& input, const std::optional<at::Tensor>& lengths, int64_t steps, int64_t batch)
      : input_(input),
        options_(input.options()),
        guard_(input.device()),
        order_(lengths, steps, batch, input.device()),
        steps_(steps),
        batch_(batch) {}

  // Data pointer of a contiguous copy kept alive by this call, or null for an absent tensor.
  const void* in(const std::optional<at::Tensor>& t) {
    if (!t.has_value() || !t->defined()) return nullptr;
    kept_.push_back(t->contiguous());
    return kept_.back().data_ptr();
  }

  // A result of the input's dtype and device; an empty one when not wanted (each its own
  // tensor: outputs of an op must not alias).
  at::Tensor empty(bool wanted, at::IntArrayRef sizes) const {
    return wanted ? at::empty(sizes, options_) : at::empty({0}, options_);
  }

  // What every op's params hold (rnntl/params.h: SequenceParams).
  // recurrent_mask: [B, out_size] or none (checked here).
  void fill(SequenceParams& p, int64_t input_size, int64_t hidden, int64_t out_size, bool reverse,
            const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& h0,
            const std::optional<at::Tensor>& recurrent_mask) {
    check_recurrent_mask(recurrent_mask, input_, batch_, out_size);
    p.dtype = dtype_of(input_);
    p.steps = steps_;
    p.batch = batch_;
    p.input_size = input_size;
    p.hidden = hidden;
    p.out_size = out_size;
    p.reverse = reverse;
    p.input = in(input_);
    p.weight_ih = in(weight_ih);
    p.weight_hh = in(weight_hh);
    p.h0 = in(h0);
    p.recurrent_mask = in(recurrent_mask);
    p.order = order_.view();
    p.env = make_env(&options_);
  }

  // What every forward adds (ForwardParams).
  void fill_forward(ForwardParams& p, bool save, const std::optional<at::Tensor>& bias_ih,
                    const std::optional<at::Tensor>& bias_hh, const at::Tensor& output, const at::Tensor& h_n,
                    const at::Tensor& gates) {
    p.save = save;
    p.bias_ih = in(bias_ih);
    p.bias_hh = in(bias_hh);
    p.output = output.data_ptr();
    p.h_n = h_n.data_ptr();
    p.gates = pointer_or_null(gates);
  }

  // What every backward adds (BackwardParams); results that are empty are not computed.
  void fill_backward(BackwardParams& p, double state_clip, double gate_clip,
                     const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
                     const at::Tensor& output, const at::Tensor& gates, const at::Tensor& grad_input,
                     const at::Tensor& grad_weight_ih, const at::Tensor& grad_weight_hh, const at::Tensor& grad_h0) {
    p.state_clip = state_clip;
    p.gate_clip = gate_clip;
    p.grad_output = in(grad_output);
    p.grad_h_n = in(grad_h_n);
    p.output = in(output);
    p.gates = in(gates);
    p.grad_input = pointer_or_null(grad_input);
    p.grad_weight_ih = pointer_or_null(grad_weight_ih);
    p.grad_weight_hh = pointer_or_null(grad_weight_hh);
    p.grad_h0 = pointer_or_null(grad_h0);
  }

  // Allocates the workspace the kernels ask for and queues them; a failure is an error.
  template <typename Params>
  void run(Params& p, size_t (*workspace_bytes)(const Params&), const char* (*kernels)(const Params&)) {
    const size_t bytes = workspace_bytes(p);
    const at::Tensor workspace = at::empty({int64_t(bytes > 0 ? bytes : 1)}, options_.dtype(at::kByte));
    p.env.workspace = workspace.data_ptr();
    const char* error = kernels(p);
    TORCH_CHECK(error == nullptr, error ? error : "");
  }

 private:
  at::Tensor input_;
  at::TensorOptions options_;  // the GEMM hook's context: lives as long as the call
  c10::cuda::CUDAGuard guard_;
  DeviceOrder order_;
  int64_t steps_, batch_;
  std::vector<at::Tensor> kept_;
};

}  // namespace cuda_glue
}  // namespace rnntl
