// The matrix products of the CPU kernels, in one place: out = x @ weight^T (+ bias).
//
// float32 goes through oneDNN's matmul (the op torch registers as
// mkldnn::_linear_pointwise, with the weight pre-packed once per sequence by
// mkldnn::_reorder_linear_weight) when this torch build has it: on the machines we measured
// it runs these shapes 1.3-2x faster than at::mm, whose BLAS picks slower code paths on
// some CPUs. Everything else, and builds without oneDNN, use at::mm / at::addmm. The choice
// is made once per process; RNNTL_CPU_GEMM=aten forces at::mm (docs/ENVIRONMENT.md).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>
#include <optional>

namespace rnntl {
namespace cpu {

struct OneDnnOps {
  std::optional<c10::OperatorHandle> linear;   // mkldnn::_linear_pointwise
  std::optional<c10::OperatorHandle> reorder;  // mkldnn::_reorder_linear_weight
  bool available = false;

  static const OneDnnOps& get() {
    static const OneDnnOps ops = [] {
      OneDnnOps o;
      const char* choice = std::getenv("RNNTL_CPU_GEMM");
      if (choice != nullptr && std::strcmp(choice, "aten") == 0) return o;
      auto& dispatcher = c10::Dispatcher::singleton();
      o.linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
      o.reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
      o.available = o.linear.has_value() && o.reorder.has_value() && at::hasMKLDNN() &&
                    o.linear->hasKernelForDispatchKey(c10::DispatchKey::CPU);
      return o;
    }();
    return ops;
  }
};

inline bool use_onednn(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn() && OneDnnOps::get().available;
}

inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  torch::jit::Stack stack;
  stack.emplace_back(x);
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(c10::IValue());
  OneDnnOps::get().linear->callBoxed(&stack);
  return stack.back().toTensor();
}

// x [M, K] @ weight[N, K]^T (+ bias [N]) -> [M, N]; x and weight may be strided views.
inline at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias = c10::nullopt) {
  if (use_onednn(x)) return onednn_linear(x, weight, bias);
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

// A weight [N, K] applied at every step as x @ weight^T: packed once for the sequence.
class StepWeight {
 public:
  StepWeight(const at::Tensor& weight, int64_t batch) : weight_(weight) {
    if (use_onednn(weight)) {
      torch::jit::Stack stack;
      stack.emplace_back(weight.contiguous());
      stack.emplace_back(c10::IValue(batch));
      OneDnnOps::get().reorder->callBoxed(&stack);
      packed_ = stack.back().toTensor();
    }
  }
  // x [M, K] -> [M, N] (a new tensor)
  at::Tensor apply(const at::Tensor& x) const {
    if (packed_.defined()) return onednn_linear(x, packed_, c10::nullopt);
    return at::mm(x, weight_.t());
  }

 private:
  at::Tensor weight_;
  at::Tensor packed_;
};

}  // namespace cpu
}  // namespace rnntl
