// GRU entry points for the GPU: explicit instantiations of the kernels and drivers of
// rnntl/cuda/gru_kernels.cuh for float, half and bfloat16 (float accumulation).
// Includes only CUDA headers and csrc/include/rnntl, so it compiles in seconds.
#include <rnntl/cuda/gru_kernels.cuh>
#include <rnntl/cuda_api.h>

namespace rnntl {
namespace cuda {
namespace {

// Runs f.template operator()<T>() for the params' dtype.
template <typename F>
auto dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return f(float{});
  }
}

}  // namespace

size_t gru_forward_workspace_bytes(const GruForwardParams& p) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return GruForwardWorkspace<decltype(tag)>(p, nullptr).bytes; });
}

const char* gru_forward(const GruForwardParams& p) {
  if (p.dtype == DType::kFloat64) return "rnntl_fast: the CUDA kernels support float32, float16 and bfloat16";
  return dispatch_dtype(p.dtype, [&](auto tag) { return gru_forward_run<decltype(tag)>(p); });
}

size_t gru_backward_workspace_bytes(const GruBackwardParams& p) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return GruBackwardWorkspace<decltype(tag)>(p, nullptr).bytes; });
}

const char* gru_backward(const GruBackwardParams& p) {
  if (p.dtype == DType::kFloat64) return "rnntl_fast: the CUDA kernels support float32, float16 and bfloat16";
  return dispatch_dtype(p.dtype, [&](auto tag) { return gru_backward_run<decltype(tag)>(p); });
}

}  // namespace cuda
}  // namespace rnntl
