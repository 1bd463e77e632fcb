// Layer-normalised LSTM and GRU launches (docs/cuda.md, "Layer normalisation"): workspaces,
// kernel arguments from the params, and the stepwise sequence drivers. Kernels:
// layer_norm_kernels.cuh. Only the stepwise strategy exists for these cells: an explicit
// RNNTL_CUDA_STRATEGY=persistent request is an error, `auto` runs stepwise.
// Shapes: T steps, B batch, I input, H hidden, P = proj_size or H (GRU: H), G = 4H / 3H,
// N valid (compact) rows.
#pragma once

#include "layer_norm_kernels.cuh"
#include "sequence_launch.cuh"

#include <vector>

namespace rnntl {
namespace cuda {

constexpr const char* kLayerNormPersistent =
    "rnntl_fast: the persistent CUDA strategy does not run layer_norm (its rows' statistics need the whole gate "
    "row; RNNTL_CUDA_STRATEGY=auto or stepwise runs it stepwise)";

// Compact row of (t, slot 0) on the host: the compact rows are in time order.
inline std::vector<int64_t> host_first_rows(const OrderView& order, int64_t steps) {
  std::vector<int64_t> first(steps + 1, 0);
  for (int64_t t = 0; t < steps; ++t) first[t + 1] = first[t] + order.active_host[t];
  return first;
}

// The row kernels: one block per slot, of kRowThreads threads unless the launch environment
// asks for another whole number of warps (the emulation tests run fewer).
template <typename Kernel, typename Args>
inline void launch_rows(Kernel kernel, const Args& s, const LaunchEnv& env, size_t shared_bytes) {
  const int threads = env.threads_per_block > 0 ? (env.threads_per_block + 31) / 32 * 32 : kRowThreads;
  launch_kernel(dim3(static_cast<unsigned int>(s.batch > 0 ? s.batch : 1)), dim3(threads < 1024 ? threads : 1024),
                shared_bytes, env.stream, kernel, s);
}

// out [cols] = column sums of compact `a` times the padded reserve's normalised values.
template <typename T>
inline void compact_padded_column_dot(const T* a, int64_t a_stride, const T* padded, int64_t padded_stride, T* out,
                                      int64_t cols, const OrderView& order, int64_t steps, int64_t batch,
                                      void* stream) {
  const int64_t warps = kPointwiseThreads / 32;
  const int64_t blocks = ceil_div(cols, warps);
  launch_kernel(dim3(static_cast<unsigned int>(blocks < 1024 ? blocks : 1024)), dim3(kPointwiseThreads), 0, stream,
                compact_padded_column_dot_kernel<T>, a, a_stride, padded, padded_stride, out, cols, steps, batch,
                order.slot, order.active, order.first_row);
}

template <typename T, typename Params>
inline void fill_layer_norm_forward_args(LayerNormForwardArgs<T>& s, const Params& p, const ForwardWorkspace<T>& w) {
  fill_sequence_args(s, p, PersistentPlan{});
  s.input_gates = w.input_gates;
  s.recurrent_gates = w.recurrent_gates;
  s.gain_ih = typed<T>(p.gain_ih);
  s.gain_hh = typed<T>(p.gain_hh);
  s.bias_ih = typed<T>(p.bias_ih);
  s.bias_hh = typed<T>(p.bias_hh);
  s.hidden_state = w.hidden_state;
  s.output = typed<T>(p.output);
  s.gates = p.save ? typed<T>(p.gates) : nullptr;
  s.normalized = p.save ? typed<T>(p.normalized) : nullptr;
  s.inverse_std = p.save ? typed<T>(p.inverse_std) : nullptr;
}

// The backward's buffers both cells have beyond BackwardWorkspace.
template <typename T>
struct LayerNormBackwardBuffers {
  acc_t<T>* grad_gates;          // [B, G]
  T* grad_input_product;         // [N, G] or null
  T* grad_recurrent_product;     // [N, G] (dW_hh wanted) or [B, G]

  void take(const BackwardParams& p, int64_t G, WorkspaceCarver& c) {
    const int64_t N = p.order.valid_rows, B = p.batch;
    grad_gates = c.take<acc_t<T>>(B * G);
    grad_input_product = (p.grad_input || p.grad_weight_ih) ? c.take<T>(N * G) : nullptr;
    grad_recurrent_product = c.take<T>((p.grad_weight_hh ? N : B) * G);
  }
};

template <typename T, typename Params>
inline void fill_layer_norm_backward_args(LayerNormBackwardArgs<T>& s, const Params& p, const BackwardWorkspace<T>& w,
                                          const LayerNormBackwardBuffers<T>& buffers) {
  fill_sequence_args(s, p, PersistentPlan{});
  s.gain_ih = typed<T>(p.gain_ih);
  s.gain_hh = typed<T>(p.gain_hh);
  s.output = typed<T>(p.output);
  s.grad_output = typed<T>(p.grad_output);
  s.h0 = typed<T>(p.h0);
  s.recurrent_mask = typed<T>(p.recurrent_mask);
  s.gates = typed<T>(p.gates);
  s.normalized = typed<T>(p.normalized);
  s.inverse_std = typed<T>(p.inverse_std);
  s.grad_hidden_carry = w.grad_hidden_carry;
  s.grad_gates = buffers.grad_gates;
  s.grad_input_product = buffers.grad_input_product;
  s.grad_recurrent_product = buffers.grad_recurrent_product;
  s.recurrent_product_all = p.grad_weight_hh != nullptr;
  s.hidden_prev_all = w.hidden_prev_all;
  s.state_clip = acc_t<T>(p.state_clip);
  s.gate_clip = acc_t<T>(p.gate_clip);
}

// Stepwise backward step after the row kernel: dL/dh_{t-1} of the n running slots from
// dL/d(W_hh (m * h)) (masked, accumulated onto the direct paths in the carry when
// `accumulate`).
template <typename T>
inline void layer_norm_recurrent_gradient(const BackwardParams& p, const BackwardWorkspace<T>& w,
                                          const LayerNormBackwardBuffers<T>& buffers, const Gemm& gemm, int64_t t,
                                          int64_t n, int64_t G, const std::vector<int64_t>& first_rows,
                                          bool accumulate, void* stream) {
  const T* rows = buffers.grad_recurrent_product + (p.grad_weight_hh ? first_rows[t] * G : 0);
  recurrent_hidden_gradient(p, w, gemm, n, G, rows, accumulate, stream);
}

// The whole-sequence products both cells share: dL/dx and dW_ih from dL/d(W_ih x), dW_hh
// from dL/d(W_hh (m * h)) and m * h_{t-1}, the gains' gradients.
template <typename T>
inline void layer_norm_sequence_gradients(const BackwardParams& p, const void* normalized, void* grad_gain_ih, void* grad_gain_hh,
                                          const T* grad_input_side_gates, const T* grad_hidden_side_gates,
                                          const BackwardWorkspace<T>& w, const LayerNormBackwardBuffers<T>& buffers,
                                          int64_t G, const Gemm& gemm, void* stream) {
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, P = p.out_size, N = p.order.valid_rows;
  if (p.grad_input) {
    T* grad_rows = p.order.compact_is_padded ? typed<T>(p.grad_input) : w.input_rows;
    gemm(N, I, G, buffers.grad_input_product, G, false, p.weight_ih, I, false, grad_rows, I, false);
    if (!p.order.compact_is_padded)
      padded_from_compact(static_cast<const T*>(grad_rows), typed<T>(p.grad_input), p.order, T_, B, I, stream);
  }
  if (p.grad_weight_ih) {
    const T* input = valid_input_rows<T>(p, w.input_rows, stream);
    gemm(G, I, N, buffers.grad_input_product, G, true, input, I, false, p.grad_weight_ih, I, false);
  }
  if (p.grad_weight_hh)
    gemm(G, P, N, buffers.grad_recurrent_product, G, true, w.hidden_prev_all, P, false, p.grad_weight_hh, P, false);
  const T* saved = typed<T>(normalized);
  if (grad_gain_ih)
    compact_padded_column_dot(grad_input_side_gates, G, saved, 2 * G, typed<T>(grad_gain_ih), G, p.order, T_, B,
                              stream);
  if (grad_gain_hh)
    compact_padded_column_dot(grad_hidden_side_gates, G, saved + G, 2 * G, typed<T>(grad_gain_hh), G, p.order, T_, B,
                              stream);
}

// ---------------------------------------------------------------------------------------
// LSTM
// ---------------------------------------------------------------------------------------
template <typename T>
struct LnLstmForwardWorkspace : ForwardWorkspace<T> {
  acc_t<T>* cell_state;         // [B, H]
  acc_t<T>* cell_scratch;       // [B, 2H]
  T* hidden_unprojected;        // [B, H] or null (no projection)
  T* projected;                 // [B, P] or null

  LnLstmForwardWorkspace(const LayerNormLstmForwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 4, c);
    const bool project = p.weight_hr != nullptr;
    cell_state = c.take<acc_t<T>>(p.batch * p.hidden);
    cell_scratch = c.take<acc_t<T>>(p.batch * 2 * p.hidden);
    hidden_unprojected = project ? c.take<T>(p.batch * p.hidden) : nullptr;
    projected = project ? c.take<T>(p.batch * p.out_size) : nullptr;
    this->bytes = c.offset;
  }
};

template <typename T>
struct LnLstmBackwardWorkspace : BackwardWorkspace<T> {
  LayerNormBackwardBuffers<T> buffers;
  acc_t<T>* grad_cell_carry;     // [B, H]
  acc_t<T>* cell_work;           // [B, H]
  T* grad_pre_clip;              // [B, P]
  T* grad_pre_clip_all;          // [N, P] or null (no dW_hr)
  T* grad_hidden_unprojected;    // [B, H] or null (no projection)
  T* grad_gates_all;             // [N, 4H]
  T* grad_normalized_cell_all;   // [N, H] or null
  T* hidden_unprojected_all;     // [N, H] or null

  LnLstmBackwardWorkspace(const LayerNormLstmBackwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 4, c);
    const int64_t N = p.order.valid_rows, B = p.batch, H = p.hidden, P = p.out_size, G = 4 * H;
    const bool project = p.weight_hr != nullptr, want_weight_hr = project && p.grad_weight_hr != nullptr;
    buffers.take(p, G, c);
    grad_cell_carry = c.take<acc_t<T>>(B * H);
    cell_work = c.take<acc_t<T>>(B * H);
    grad_pre_clip = c.take<T>(B * P);
    grad_pre_clip_all = want_weight_hr ? c.take<T>(N * P) : nullptr;
    grad_hidden_unprojected = project ? c.take<T>(B * H) : nullptr;
    grad_gates_all = c.take<T>(N * G);
    grad_normalized_cell_all = (p.grad_cell_gain || p.grad_cell_bias) ? c.take<T>(N * H) : nullptr;
    hidden_unprojected_all = want_weight_hr ? c.take<T>(N * H) : nullptr;
    this->bytes = c.offset;
  }
};

template <typename T>
const char* layer_norm_lstm_forward_run(const LayerNormLstmForwardParams& p) {
  if (p.env.strategy == Strategy::kPersistent) return kLayerNormPersistent;
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, H = p.hidden, P = p.out_size, G = 4 * H;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  const LnLstmForwardWorkspace<T> w(p, p.env.workspace);
  // W_ih x of all valid rows at once, without bias (it adds after the norm).
  const T* input = valid_input_rows<T>(p, w.input_rows, stream);
  gemm(p.order.valid_rows, G, I, input, I, false, p.weight_ih, I, true, w.input_gates, G, false);

  LnLstmForwardArgs<T> s;
  fill_layer_norm_forward_args(s, p, w);
  s.project = p.weight_hr != nullptr;
  s.cell_gain = typed<T>(p.cell_gain);
  s.cell_bias = typed<T>(p.cell_bias);
  s.zoneout_h = typed<T>(p.zoneout_h);
  s.zoneout_c = typed<T>(p.zoneout_c);
  s.cells = p.save ? typed<T>(p.cells) : nullptr;
  s.hidden_pre_clip = (p.save && p.proj_clip > 0) ? typed<T>(p.hidden_pre_clip) : nullptr;
  s.cell_state = w.cell_state;
  s.cell_scratch = w.cell_scratch;
  s.hidden_unprojected = w.hidden_unprojected;
  s.cell_clip = acc_t<T>(p.cell_clip);
  s.proj_clip = acc_t<T>(p.proj_clip);

  gather_rows(typed<T>(p.h0), w.hidden_state, p.order.order, B, P, stream);
  gather_rows(typed<T>(p.c0), w.cell_state, p.order.order, B, H, stream);
  for (int64_t step = 0; step < T_; ++step) {
    const int64_t t = p.reverse ? T_ - 1 - step : step;
    const int64_t n = p.order.active_host[t];
    s.t = t;
    s.running = n;
    gemm(n, G, P, recurrent_product_input(p, w, n, stream), P, false, p.weight_hh, P, true, w.recurrent_gates, G,
         false);
    launch_rows(ln_lstm_forward_row_kernel<T>, s, p.env, row_shared_bytes<T>());
    if (s.project && n > 0) {
      gemm(n, P, H, w.hidden_unprojected, H, false, p.weight_hr, H, true, w.projected, P, false);
      launch_kernel(pointwise_grid(n * P), dim3(kPointwiseThreads), 0, stream, ln_lstm_projection_epilogue_kernel<T>,
                    s, static_cast<const T*>(w.projected));
    }
  }
  scatter_rows(static_cast<const T*>(w.hidden_state), typed<T>(p.h_n), p.order.order, B, P, stream);
  scatter_rows(static_cast<const acc_t<T>*>(w.cell_state), typed<T>(p.c_n), p.order.order, B, H, stream);
  return launch_error();
}

template <typename T>
const char* layer_norm_lstm_backward_run(const LayerNormLstmBackwardParams& p) {
  if (p.env.strategy == Strategy::kPersistent) return kLayerNormPersistent;
  const int64_t T_ = p.steps, B = p.batch, H = p.hidden, P = p.out_size, G = 4 * H, N = p.order.valid_rows;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  const LnLstmBackwardWorkspace<T> w(p, p.env.workspace);
  const bool project = p.weight_hr != nullptr;

  LnLstmBackwardArgs<T> s;
  fill_layer_norm_backward_args(s, p, w, w.buffers);
  s.cell_gain = typed<T>(p.cell_gain);
  s.cell_bias = typed<T>(p.cell_bias);
  s.c0 = typed<T>(p.c0);
  s.cells = typed<T>(p.cells);
  s.hidden_pre_clip = p.proj_clip > 0 ? typed<T>(p.hidden_pre_clip) : nullptr;
  s.zoneout_h = typed<T>(p.zoneout_h);
  s.zoneout_c = typed<T>(p.zoneout_c);
  s.grad_cell_carry = w.grad_cell_carry;
  s.grad_pre_clip = w.grad_pre_clip;
  s.grad_pre_clip_all = w.grad_pre_clip_all;
  s.grad_hidden_unprojected = project ? w.grad_hidden_unprojected : w.grad_pre_clip;
  s.cell_work = w.cell_work;
  s.grad_gates_all = w.grad_gates_all;
  s.grad_normalized_cell_all = w.grad_normalized_cell_all;
  s.hidden_unprojected_all = w.hidden_unprojected_all;
  s.cell_clip = acc_t<T>(p.cell_clip);
  s.proj_clip = acc_t<T>(p.proj_clip);

  const std::vector<int64_t> first_rows = host_first_rows(p.order, T_);
  gather_rows(typed<T>(p.grad_h_n), w.grad_hidden_carry, p.order.order, B, P, stream);
  gather_rows(typed<T>(p.grad_c_n), w.grad_cell_carry, p.order.order, B, H, stream);
  for (int64_t step = T_ - 1; step >= 0; --step) {
    const int64_t t = p.reverse ? T_ - 1 - step : step;
    const int64_t n = p.order.active_host[t];
    s.t = t;
    s.running = n;
    launch_kernel(pointwise_grid(B * P), dim3(kPointwiseThreads), 0, stream, ln_lstm_hidden_gradient_kernel<T>, s);
    // Through the projection: dL/dm = dL/dh~ W_hr, [n, P] @ [P, H].
    if (project) gemm(n, H, P, w.grad_pre_clip, P, false, p.weight_hr, H, false, w.grad_hidden_unprojected, H, false);
    launch_rows(ln_lstm_backward_row_kernel<T>, s, p.env, row_shared_bytes<T>());
    layer_norm_recurrent_gradient(p, w, w.buffers, gemm, t, n, G, first_rows, p.zoneout_h != nullptr, stream);
  }
  if (p.grad_h0)
    scatter_rows(static_cast<const T*>(w.grad_hidden_carry), typed<T>(p.grad_h0), p.order.order, B, P, stream);
  if (p.grad_c0)
    scatter_rows(static_cast<const acc_t<T>*>(w.grad_cell_carry), typed<T>(p.grad_c0), p.order.order, B, H, stream);

  const T* grad_gates = w.grad_gates_all;  // dL/da drives both gains' gradients
  layer_norm_sequence_gradients<T>(p, p.normalized, p.grad_gain_ih, p.grad_gain_hh, grad_gates, grad_gates, w,
                                   w.buffers, G, gemm, stream);
  if (p.grad_bias) column_sum(grad_gates, typed<T>(p.grad_bias), N, G, stream);
  if (project && p.grad_weight_hr)
    gemm(P, H, N, w.grad_pre_clip_all, P, true, w.hidden_unprojected_all, H, false, p.grad_weight_hr, H, false);
  if (p.grad_cell_gain)
    compact_padded_column_dot(static_cast<const T*>(w.grad_normalized_cell_all), H, typed<T>(p.cells) + H, 3 * H,
                              typed<T>(p.grad_cell_gain), H, p.order, T_, B, stream);
  if (p.grad_cell_bias)
    column_sum(static_cast<const T*>(w.grad_normalized_cell_all), typed<T>(p.grad_cell_bias), N, H, stream);
  return launch_error();
}

// ---------------------------------------------------------------------------------------
// GRU
// ---------------------------------------------------------------------------------------
template <typename T>
struct LnGruForwardWorkspace : ForwardWorkspace<T> {
  LnGruForwardWorkspace(const LayerNormGruForwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 3, c);
    this->bytes = c.offset;
  }
};

template <typename T>
struct LnGruBackwardWorkspace : BackwardWorkspace<T> {
  LayerNormBackwardBuffers<T> buffers;
  acc_t<T>* grad_hidden_gates;   // [B, 3H]
  T* grad_input_gates_all;       // [N, 3H]
  T* grad_hidden_gates_all;      // [N, 3H]

  LnGruBackwardWorkspace(const LayerNormGruBackwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    this->take_common(p, 3, c);
    const int64_t N = p.order.valid_rows, G = 3 * p.hidden;
    buffers.take(p, G, c);
    grad_hidden_gates = c.take<acc_t<T>>(p.batch * G);
    grad_input_gates_all = c.take<T>(N * G);
    grad_hidden_gates_all = c.take<T>(N * G);
    this->bytes = c.offset;
  }
};

template <typename T>
const char* layer_norm_gru_forward_run(const LayerNormGruForwardParams& p) {
  if (p.env.strategy == Strategy::kPersistent) return kLayerNormPersistent;
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, H = p.hidden, G = 3 * H;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  const LnGruForwardWorkspace<T> w(p, p.env.workspace);
  const T* input = valid_input_rows<T>(p, w.input_rows, stream);
  gemm(p.order.valid_rows, G, I, input, I, false, p.weight_ih, I, true, w.input_gates, G, false);

  LnGruForwardArgs<T> s;
  fill_layer_norm_forward_args(s, p, w);
  s.zoneout = typed<T>(p.zoneout);

  gather_rows(typed<T>(p.h0), w.hidden_state, p.order.order, B, H, stream);
  for (int64_t step = 0; step < T_; ++step) {
    const int64_t t = p.reverse ? T_ - 1 - step : step;
    const int64_t n = p.order.active_host[t];
    s.t = t;
    s.running = n;
    gemm(n, G, H, recurrent_product_input(p, w, n, stream), H, false, p.weight_hh, H, true, w.recurrent_gates, G,
         false);
    launch_rows(ln_gru_forward_row_kernel<T>, s, p.env, row_shared_bytes<T>());
  }
  scatter_rows(static_cast<const T*>(w.hidden_state), typed<T>(p.h_n), p.order.order, B, H, stream);
  return launch_error();
}

template <typename T>
const char* layer_norm_gru_backward_run(const LayerNormGruBackwardParams& p) {
  if (p.env.strategy == Strategy::kPersistent) return kLayerNormPersistent;
  const int64_t T_ = p.steps, B = p.batch, H = p.hidden, G = 3 * H, N = p.order.valid_rows;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  const LnGruBackwardWorkspace<T> w(p, p.env.workspace);

  LnGruBackwardArgs<T> s;
  fill_layer_norm_backward_args(s, p, w, w.buffers);
  s.bias_hh = typed<T>(p.bias_hh);
  s.zoneout = typed<T>(p.zoneout);
  s.grad_hidden_gates = w.grad_hidden_gates;
  s.grad_input_gates_all = w.grad_input_gates_all;
  s.grad_hidden_gates_all = w.grad_hidden_gates_all;

  const std::vector<int64_t> first_rows = host_first_rows(p.order, T_);
  gather_rows(typed<T>(p.grad_h_n), w.grad_hidden_carry, p.order.order, B, H, stream);
  for (int64_t step = T_ - 1; step >= 0; --step) {
    const int64_t t = p.reverse ? T_ - 1 - step : step;
    const int64_t n = p.order.active_host[t];
    s.t = t;
    s.running = n;
    launch_rows(ln_gru_backward_row_kernel<T>, s, p.env, row_shared_bytes<T>());
    // The carry holds z * dL/dh~ + d * dL/dh_t (unmasked); the product's part adds to it.
    layer_norm_recurrent_gradient(p, w, w.buffers, gemm, t, n, G, first_rows, true, stream);
  }
  if (p.grad_h0)
    scatter_rows(static_cast<const T*>(w.grad_hidden_carry), typed<T>(p.grad_h0), p.order.order, B, H, stream);

  layer_norm_sequence_gradients<T>(p, p.normalized, p.grad_gain_ih, p.grad_gain_hh, w.grad_input_gates_all,
                                   w.grad_hidden_gates_all, w, w.buffers, G, gemm, stream);
  if (p.grad_bias_ih) column_sum(static_cast<const T*>(w.grad_input_gates_all), typed<T>(p.grad_bias_ih), N, G, stream);
  if (p.grad_bias_hh)
    column_sum(static_cast<const T*>(w.grad_hidden_gates_all), typed<T>(p.grad_bias_hh), N, G, stream);
  return launch_error();
}

// The entry points' bodies (rnntl/cuda_api.h): float32, float16, bfloat16 on the GPU; the
// emulation also runs float64.
#define RNNTL_LAYER_NORM_ENTRY(name, Params, Workspace)                                                  \
  inline size_t name##_workspace_bytes_for(const Params& p) {                                            \
    return dispatch_dtype(p.dtype, [&](auto tag) { return Workspace<decltype(tag)>(p, nullptr).bytes; }); \
  }                                                                                                      \
  inline const char* name##_for(const Params& p) {                                                       \
    if (p.dtype == DType::kFloat64) return kUnsupportedDtype;                                            \
    return dispatch_dtype(p.dtype, [&](auto tag) { return name##_run<decltype(tag)>(p); });              \
  }

RNNTL_LAYER_NORM_ENTRY(layer_norm_lstm_forward, LayerNormLstmForwardParams, LnLstmForwardWorkspace)
RNNTL_LAYER_NORM_ENTRY(layer_norm_lstm_backward, LayerNormLstmBackwardParams, LnLstmBackwardWorkspace)
RNNTL_LAYER_NORM_ENTRY(layer_norm_gru_forward, LayerNormGruForwardParams, LnGruForwardWorkspace)
RNNTL_LAYER_NORM_ENTRY(layer_norm_gru_backward, LayerNormGruBackwardParams, LnGruBackwardWorkspace)
#undef RNNTL_LAYER_NORM_ENTRY

}  // namespace cuda
}  // namespace rnntl
