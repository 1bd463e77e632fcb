// GRU entry points for the GPU (rnntl/cuda_api.h): the sequence drivers of
// rnntl/cuda/gru_launch.cuh for float, half and bfloat16 (float accumulation).
// Includes only CUDA headers and csrc/include/rnntl, so it compiles in seconds.
#include <rnntl/cuda/gru_launch.cuh>
#include <rnntl/cuda_api.h>

namespace rnntl {
namespace cuda {

size_t gru_forward_workspace_bytes(const GruForwardParams& p) { return forward_workspace_bytes<GruLaunch>(p); }
const char* gru_forward(const GruForwardParams& p) { return forward<GruLaunch>(p); }
size_t gru_backward_workspace_bytes(const GruBackwardParams& p) { return backward_workspace_bytes<GruLaunch>(p); }
const char* gru_backward(const GruBackwardParams& p) { return backward<GruLaunch>(p); }

}  // namespace cuda
}  // namespace rnntl
