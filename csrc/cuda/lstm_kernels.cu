// LSTM entry points for the GPU (rnntl/cuda_api.h): the sequence drivers of
// rnntl/cuda/lstm_launch.cuh for float, half and bfloat16 (float accumulation).
// Includes only CUDA headers and csrc/include/rnntl, so it compiles in seconds.
#include <rnntl/cuda/lstm_launch.cuh>
#include <rnntl/cuda_api.h>

namespace rnntl {
namespace cuda {

size_t lstm_forward_workspace_bytes(const LstmForwardParams& p) { return forward_workspace_bytes<LstmLaunch>(p); }
const char* lstm_forward(const LstmForwardParams& p) { return forward<LstmLaunch>(p); }
size_t lstm_backward_workspace_bytes(const LstmBackwardParams& p) { return backward_workspace_bytes<LstmLaunch>(p); }
const char* lstm_backward(const LstmBackwardParams& p) { return backward<LstmLaunch>(p); }

}  // namespace cuda
}  // namespace rnntl
