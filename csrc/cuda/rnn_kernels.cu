// Elman RNN entry points for the GPU (rnntl/cuda_api.h): the sequence drivers of
// rnntl/cuda/rnn_launch.cuh for float, half and bfloat16 (float accumulation).
// Includes only CUDA headers and csrc/include/rnntl, so it compiles in seconds.
#include <rnntl/cuda/rnn_launch.cuh>
#include <rnntl/cuda_api.h>

namespace rnntl {
namespace cuda {

size_t rnn_forward_workspace_bytes(const RnnForwardParams& p) { return forward_workspace_bytes<RnnLaunch>(p); }
const char* rnn_forward(const RnnForwardParams& p) { return forward<RnnLaunch>(p); }
size_t rnn_backward_workspace_bytes(const RnnBackwardParams& p) { return backward_workspace_bytes<RnnLaunch>(p); }
const char* rnn_backward(const RnnBackwardParams& p) { return backward<RnnLaunch>(p); }

}  // namespace cuda
}  // namespace rnntl
