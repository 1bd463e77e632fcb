// LSTM entry points for the GPU: explicit instantiations of the kernels and drivers of
// rnntl/cuda/lstm_kernels.cuh for float, half and bfloat16 (float accumulation).
// Includes only CUDA headers and csrc/include/rnntl, so it compiles in seconds.
#include <rnntl/cuda/lstm_kernels.cuh>
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

size_t lstm_forward_workspace_bytes(const LstmForwardParams& p) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return LstmForwardWorkspace<decltype(tag)>(p, nullptr).bytes; });
}

const char* lstm_forward(const LstmForwardParams& p) {
  if (p.dtype == DType::kFloat64) return "rnntl_fast: the CUDA kernels support float32, float16 and bfloat16";
  return dispatch_dtype(p.dtype, [&](auto tag) { return lstm_forward_run<decltype(tag)>(p); });
}

size_t lstm_backward_workspace_bytes(const LstmBackwardParams& p) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return LstmBackwardWorkspace<decltype(tag)>(p, nullptr).bytes; });
}

const char* lstm_backward(const LstmBackwardParams& p) {
  if (p.dtype == DType::kFloat64) return "rnntl_fast: the CUDA kernels support float32, float16 and bfloat16";
  return dispatch_dtype(p.dtype, [&](auto tag) { return lstm_backward_run<decltype(tag)>(p); });
}

}  // namespace cuda
}  // namespace rnntl
