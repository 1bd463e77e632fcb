// Torch-facing pieces shared by lstm_cuda.cpp and gru_cuda.cpp: argument checks for CUDA
// tensors, the batch order copied to the device, the cuBLAS GEMM hook (through ATen, on
// the current stream), the workspace and the strategy chosen by env var.
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

// Contiguous tensor (kept alive by the caller) and its data pointer, or null.
struct Contiguous {
  at::Tensor tensor;
  const void* pointer = nullptr;
  explicit Contiguous(const std::optional<at::Tensor>& t) {
    if (t.has_value() && t->defined()) {
      tensor = t->contiguous();
      pointer = tensor.data_ptr();
    }
  }
  explicit Contiguous(const at::Tensor& t) : Contiguous(std::optional<at::Tensor>(t)) {}
};

// lengths: CPU integer tensor [B] (checked here), or none.
struct DeviceOrder {
  at::Tensor lengths_host;
  HostOrder host;
  at::Tensor device;  // [2B + T] int64: order, length, active

  DeviceOrder(const std::optional<at::Tensor>& lengths, int64_t steps, int64_t batch, const at::Device& where)
      : lengths_host(checked_lengths(lengths, steps, batch)),
        host(lengths_host.defined() ? lengths_host.data_ptr<int64_t>() : nullptr, steps, batch) {
    const at::Tensor packed =
        at::from_blob(host.packed.data(), {int64_t(host.packed.size())}, at::TensorOptions().dtype(at::kLong));
    device = packed.to(where);  // synchronous copy from pageable memory: `packed` may die after
  }

  OrderView view() const {
    const int64_t* d = device.data_ptr<int64_t>();
    return OrderView{HostOrder::order_in(d), host.length_in(d), host.active_in(d), host.active_host()};
  }
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

inline at::Tensor allocate_workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

inline void check_run(const char* error) { TORCH_CHECK(error == nullptr, error ? error : ""); }

inline at::Tensor empty_if(bool keep, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return keep ? at::empty(sizes, options) : at::empty({0}, options);
}

inline void* pointer_or_null(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr() : nullptr; }

}  // namespace cuda_glue
}  // namespace rnntl
