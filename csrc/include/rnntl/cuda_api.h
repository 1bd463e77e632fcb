// Entry points of the CUDA kernels (csrc/cuda/*.cu), called by the torch-facing glue
// (csrc/cuda/*_cuda.cpp). Plain C++: no CUDA or torch types cross this line, only the
// POD params of rnntl/params.h. Each run returns null on success or an error message.
#pragma once

#include <cstddef>

#include "params.h"

namespace rnntl {
namespace cuda {

size_t lstm_forward_workspace_bytes(const LstmForwardParams& params);
const char* lstm_forward(const LstmForwardParams& params);
size_t lstm_backward_workspace_bytes(const LstmBackwardParams& params);
const char* lstm_backward(const LstmBackwardParams& params);

size_t gru_forward_workspace_bytes(const GruForwardParams& params);
const char* gru_forward(const GruForwardParams& params);
size_t gru_backward_workspace_bytes(const GruBackwardParams& params);
const char* gru_backward(const GruBackwardParams& params);

size_t rnn_forward_workspace_bytes(const RnnForwardParams& params);
const char* rnn_forward(const RnnForwardParams& params);
size_t rnn_backward_workspace_bytes(const RnnBackwardParams& params);
const char* rnn_backward(const RnnBackwardParams& params);

// Layer-normalised LSTM and GRU (stepwise strategy only: an explicit persistent request
// returns an error).
size_t layer_norm_lstm_forward_workspace_bytes(const LayerNormLstmForwardParams& params);
const char* layer_norm_lstm_forward(const LayerNormLstmForwardParams& params);
size_t layer_norm_lstm_backward_workspace_bytes(const LayerNormLstmBackwardParams& params);
const char* layer_norm_lstm_backward(const LayerNormLstmBackwardParams& params);
size_t layer_norm_gru_forward_workspace_bytes(const LayerNormGruForwardParams& params);
const char* layer_norm_gru_forward(const LayerNormGruForwardParams& params);
size_t layer_norm_gru_backward_workspace_bytes(const LayerNormGruBackwardParams& params);
const char* layer_norm_gru_backward(const LayerNormGruBackwardParams& params);

}  // namespace cuda
}  // namespace rnntl
