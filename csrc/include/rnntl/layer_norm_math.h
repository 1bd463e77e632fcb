// Layer-normalised LSTM / GRU cells (docs/semantics.md section 10), the math of one row and
// one element, forward and backward, shared by every native backend the way cell_math.h is:
// no torch headers, so this file compiles with g++ alone and with nvcc alone.
//
//   LN(v) = (v - mean(v)) / sqrt(var(v) + eps) over the row (biased variance, no affine terms)
//   LSTM: a = LN(W_ih x) * g_ih + b_ih + LN(W_hh h) * g_hh + b_hh  (rows of 4H)
//         c~ = clip(f * c_prev + i * g);  h~ = o * tanh(LN(c~) * g_c + b_c)  (rows of H)
//   GRU:  gx = LN(W_ih x) * g_ih + b_ih;  gh = LN(W_hh h) * g_hh + b_hh  (rows of 3H)
// "Normalised" values are LN(v) (x̂); a row's statistics are its mean and 1/std; a row
// function runs on one row of n contiguous values, one thread (a CUDA kernel may instead
// reduce a row across a block and call the element functions).
#pragma once

#include "cell_math.h"

#include <cstdint>

#if defined(__CUDACC__) || defined(_MSC_VER)
#define RNNTL_SIMD_REDUCTION(...)
#define RNNTL_SIMD
#else
#define RNNTL_SIMD_REDUCTION(...) _Pragma(RNNTL_PRAGMA_STRING(omp simd reduction(__VA_ARGS__)))
#define RNNTL_SIMD _Pragma("omp simd")
#define RNNTL_PRAGMA_STRING(x) #x
#endif

namespace rnntl {

// torch.nn.functional.layer_norm's default eps, the one docs/semantics.md defines.
constexpr double kLayerNormEps = 1e-5;

// The type a row's sums accumulate in: double for float rows on the host, so that the
// statistics do not depend on the order of the additions (a build without vectorization,
// a sanitizer build say, sums a 4H row one element after the other, and float sums lost
// enough there to double the float32 error of the gains' gradients); device code keeps T
// (a CUDA kernel would reduce across threads instead).
template <typename T>
struct RowAccumulator {
  using type = T;
};
#if !defined(__CUDACC__)
template <>
struct RowAccumulator<float> {
  using type = double;
};
#endif

// 1/std of a row from its biased variance.
template <typename T>
RNNTL_HOST_DEVICE T layer_norm_inverse_std(T variance) {
#if defined(__CUDA_ARCH__)
  return T(1) / ::sqrt(variance + T(kLayerNormEps));
#else
  return T(1) / std::sqrt(variance + T(kLayerNormEps));
#endif
}

// Forward of one row: normalized[k] = (v[k] - mean) / std (normalized may be v itself);
// returns 1/std. Two passes over v (mean, then the centred squares), which loses less
// precision than the one-pass sum of squares.
template <typename T>
RNNTL_HOST_DEVICE T layer_norm_row_forward(const T* v, T* normalized, int64_t n) {
  using Acc = typename RowAccumulator<T>::type;
  Acc sum = Acc(0);
  RNNTL_SIMD_REDUCTION(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += Acc(v[k]);
  const Acc mean = sum / Acc(n);
  Acc squares = Acc(0);
  RNNTL_SIMD_REDUCTION(+ : squares)
  for (int64_t k = 0; k < n; ++k) squares += (Acc(v[k]) - mean) * (Acc(v[k]) - mean);
  const T inverse_std = T(layer_norm_inverse_std(squares / Acc(n)));
  const T row_mean = T(mean);
  RNNTL_SIMD
  for (int64_t k = 0; k < n; ++k) normalized[k] = (v[k] - row_mean) * inverse_std;
  return inverse_std;
}

// Backward of one row of y = LN(v) * gain: given dL/dy (grad), the forward's normalized
// values and 1/std, writes dL/dv = (1/std) * (d - mean(d) - x̂ * mean(d * x̂)) with
// d = dL/dy * gain (grad_v may be grad).
template <typename T>
RNNTL_HOST_DEVICE void layer_norm_row_backward(const T* grad, const T* gain, const T* normalized, T inverse_std,
                                               T* grad_v, int64_t n) {
  using Acc = typename RowAccumulator<T>::type;
  Acc sum = Acc(0), dot = Acc(0);
  RNNTL_SIMD_REDUCTION(+ : sum, dot)
  for (int64_t k = 0; k < n; ++k) {
    const T d = grad[k] * gain[k];
    sum += Acc(d);
    dot += Acc(d) * Acc(normalized[k]);
  }
  const T mean = T(sum / Acc(n)), mean_dot = T(dot / Acc(n));
  RNNTL_SIMD
  for (int64_t k = 0; k < n; ++k) grad_v[k] = inverse_std * (grad[k] * gain[k] - mean - normalized[k] * mean_dot);
}

// x̂ * gain + bias: a normalised value through the affine terms.
template <typename T>
RNNTL_HOST_DEVICE T layer_norm_affine(T normalized, T gain, T bias) {
  return normalized * gain + bias;
}

// ---------------------------------------------------------------------------------------
// LSTM with LN(c): the cell's output and the gradients of its state.
// ---------------------------------------------------------------------------------------

// dL/d(LN(c~) * g_c + b_c) from dL/dm (m = o * tanh(y), before any projection).
template <typename T>
RNNTL_HOST_DEVICE T lstm_normalized_cell_gradient(T o, T tanh_cell, T grad_hidden) {
  return grad_hidden * o * (T(1) - tanh_cell * tanh_cell);
}

// The gradient of the fresh cell c~ (after cell_clip, before its backward) and the part of
// dL/dc_{t-1} that skips the gates (zoneout's direct path), from
//   carry:          dL/dc_t arriving from step t+1 (the carried state's gradient),
//   through_norm:   dL/dc~ through LN(c~) and h (layer_norm_row_backward's result),
//   keep:           the zoneout keep weight e of c (zoned = false: no zoneout).
// State-mode clipping clamps the total gradient of the carried state c_t (docs/semantics.md
// section 10): without zoneout c_t = c~ feeds h, so the clamp covers both paths; with
// zoneout h reads c~ and the carried c_t = e * c_{t-1} + (1 - e) * c~ gets only the carry.
template <typename T>
struct LayerNormCellGradient {
  T fresh;   // dL/dc~
  T direct;  // dL/dc_{t-1} through zoneout's keep path (0 without zoneout)
};

template <bool kZoneout, typename T>
RNNTL_HOST_DEVICE LayerNormCellGradient<T> lstm_layer_norm_cell_gradient(T carry, T through_norm, T keep,
                                                                         T state_clip) {
  LayerNormCellGradient<T> g;
  if constexpr (kZoneout) {
    const T clamped = clip_value(carry, state_clip);
    g.fresh = clamped * (T(1) - keep) + through_norm;
    g.direct = clamped * keep;
  } else {
    g.fresh = clip_value(carry + through_norm, state_clip);
    g.direct = T(0);
  }
  return g;
}

// ---------------------------------------------------------------------------------------
// The carried hidden state (LSTM and GRU): dL/dh_t (carry from step t+1 plus the output's
// gradient), clamped in state mode, split by zoneout into the fresh state's gradient and
// the direct path to h_{t-1}.
// ---------------------------------------------------------------------------------------
template <typename T>
struct HiddenStateGradient {
  T fresh;   // dL/dh~_t
  T direct;  // dL/dh_{t-1} through zoneout's keep path (0 without zoneout)
};

template <bool kZoneout, typename T>
RNNTL_HOST_DEVICE HiddenStateGradient<T> hidden_state_gradient(T carry, T grad_output, T keep, T state_clip) {
  const T total = clip_value(carry + grad_output, state_clip);
  HiddenStateGradient<T> g;
  if constexpr (kZoneout) {
    g.fresh = total * (T(1) - keep);
    g.direct = total * keep;
  } else {
    g.fresh = total;
    g.direct = T(0);
  }
  return g;
}

}  // namespace rnntl
