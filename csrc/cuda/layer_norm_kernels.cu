// Layer-normalised LSTM / GRU entry points for the GPU (rnntl/cuda_api.h): the stepwise
// drivers of rnntl/cuda/layer_norm_launch.cuh for float, half and bfloat16 (float
// accumulation). Includes only CUDA headers and csrc/include/rnntl.
#include <rnntl/cuda/layer_norm_launch.cuh>
#include <rnntl/cuda_api.h>

namespace rnntl {
namespace cuda {

size_t layer_norm_lstm_forward_workspace_bytes(const LayerNormLstmForwardParams& p) {
  return layer_norm_lstm_forward_workspace_bytes_for(p);
}
const char* layer_norm_lstm_forward(const LayerNormLstmForwardParams& p) { return layer_norm_lstm_forward_for(p); }
size_t layer_norm_lstm_backward_workspace_bytes(const LayerNormLstmBackwardParams& p) {
  return layer_norm_lstm_backward_workspace_bytes_for(p);
}
const char* layer_norm_lstm_backward(const LayerNormLstmBackwardParams& p) { return layer_norm_lstm_backward_for(p); }
size_t layer_norm_gru_forward_workspace_bytes(const LayerNormGruForwardParams& p) {
  return layer_norm_gru_forward_workspace_bytes_for(p);
}
const char* layer_norm_gru_forward(const LayerNormGruForwardParams& p) { return layer_norm_gru_forward_for(p); }
size_t layer_norm_gru_backward_workspace_bytes(const LayerNormGruBackwardParams& p) {
  return layer_norm_gru_backward_workspace_bytes_for(p);
}
const char* layer_norm_gru_backward(const LayerNormGruBackwardParams& p) { return layer_norm_gru_backward_for(p); }

}  // namespace cuda
}  // namespace rnntl
