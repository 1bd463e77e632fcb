// Gate math of one LSTM / GRU element, forward and backward, shared by every native
// backend: the CPU kernels include it from C++, the CUDA kernels from .cu files.
// No torch headers here: this file must compile with g++ alone and with nvcc alone.
//
// Conventions (docs/semantics.md section 2): LSTM gates in order i, f, g, o; GRU gates in order
// r, z, n with "reset after" (n = tanh(gi_n + r * gh_n)). "Pre-activation" is the gate
// input before its nonlinearity. A clip value <= 0 means "no clip" inside this header;
// the op layer has already rejected negative and non-finite user values.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RNNTL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RNNTL_HOST_DEVICE __attribute__((always_inline)) inline
#endif

namespace rnntl {

// ---------------------------------------------------------------------------------------
// Nonlinearities. float on the host uses a branch-free exp so that the CPU pointwise loops
// vectorize (std::exp does not); device code and double use the library functions.
// ---------------------------------------------------------------------------------------

#if !defined(__CUDA_ARCH__)
// exp(x) for float, relative error below 2 ulp on [-87, 88]: x = n*ln2 + r, |r| <= ln2/2,
// degree-6 polynomial for exp(r), 2^n assembled in the exponent bits. Non-finite values
// propagate as std::exp's: exp(-inf) = 0, exp(+inf) = +inf, exp(NaN) = NaN (sigmoid(-inf)
// must be exactly 0, or a gradient 0 * inf that torch.nn gives as NaN comes out +-inf).
// The argument is clamped to [-88, 89], where n reaches -127 and 128: 2^n is then the bit
// pattern 0 (zero) or 255 << 23 (+inf), so results below ~-87.7 flush to 0 and above ~88.4
// overflow to +inf with no extra select. A NaN passes the clamp (both comparisons are false).
__attribute__((always_inline)) inline float exp_branchless(float x) {
  x = x < -88.0f ? -88.0f : (x > 89.0f ? 89.0f : x);
  // Round to nearest by the 1.5*2^23 trick (vectorizes on plain SSE2, unlike std::floor);
  // n's integer value is then the low mantissa bits of `shifted`, read without a float to
  // int conversion (which has no defined result for NaN).
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  // ln2 split in two so that n*ln2 is exact to float precision.
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t n_plus_bias = __builtin_bit_cast(uint32_t, shifted) - 0x4B400000u + 127u;  // n + 127 in [0, 255]
  return p * __builtin_bit_cast(float, n_plus_bias << 23);
}
#endif

RNNTL_HOST_DEVICE float sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  return 1.0f / (1.0f + exp_branchless(-x));
#endif
}

RNNTL_HOST_DEVICE double sigmoid(double x) {
#if defined(__CUDA_ARCH__)
  return 1.0 / (1.0 + ::exp(-x));
#else
  return 1.0 / (1.0 + std::exp(-x));
#endif
}

RNNTL_HOST_DEVICE float tanh_activation(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  // 1 - 2/(e^{2x}+1) cancels below |x| = atanh(1/2), where 2/(e^{2x}+1) passes 1/2; there
  // an odd polynomial x + x^3 P(x^2) takes over, P fitted (minimax in relative error) on
  // [0, atanh(1/2)^2]: approximation error 1e-9. Measured over every float in [-12, 12]
  // against double tanh: at most 1.46 ulp, mean 0.04 (a Taylor series below 0.25 had 5.2 ulp).
  const float ax = x < 0.0f ? -x : x;
  const float e = exp_branchless(2.0f * ax);
  const float far = 1.0f - 2.0f / (e + 1.0f);
  const float s = ax * ax;
  const float p = -3.3333317744e-1f +
                  s * (1.3332593034e-1f + s * (-5.3853095255e-2f + s * (2.1075151495e-2f + s * -6.2794693492e-3f)));
  const float near = ax + ax * (s * p);
  const float t = ax < 0.549306144f ? near : far;
  return x < 0.0f ? -t : t;
#endif
}

RNNTL_HOST_DEVICE double tanh_activation(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return std::tanh(x);
#endif
}

// clamp to [-limit, limit]; limit <= 0 means no clip. Written as selects, without early
// returns, so that loops calling it still vectorize.
template <typename T>
RNNTL_HOST_DEVICE T clip_value(T x, T limit) {
  const T clamped = x < -limit ? -limit : (x > limit ? limit : x);
  return limit > T(0) ? clamped : x;
}

// Derivative mask of clamp(x, -limit, limit) as torch.clamp defines it: gradient passes
// where -limit <= x <= limit (boundaries included).
template <typename T>
RNNTL_HOST_DEVICE T clip_pass(T x, T limit) {
  const bool inside = (x >= -limit) & (x <= limit);
  return (inside | !(limit > T(0))) ? T(1) : T(0);
}

// Backward of clamp(x, -limit, limit) as torch.clamp's: `grad` where clip_pass is 1, else 0.
// A select, not grad * clip_pass: a NaN or inf gradient where the clamp was active (or x
// is NaN) gives 0, as in torch, where the product gives NaN.
template <typename T>
RNNTL_HOST_DEVICE T clip_gradient(T grad, T x, T limit) {
  const bool inside = (x >= -limit) & (x <= limit);
  return (inside | !(limit > T(0))) ? grad : T(0);
}

// ---------------------------------------------------------------------------------------
// LSTM element, forward. a_* are full pre-activations (input part + recurrent part +
// biases). Writes the gate activations, the cell before clipping (what backward needs
// for the clip mask), the cell after clipping (the state) and m = o * tanh(c).
// ---------------------------------------------------------------------------------------
template <typename T>
struct LstmForwardElement {
  T i, f, g, o;
  T cell_before_clip;
  T cell;
  T hidden;  // o * tanh(cell), before any projection
};

// The two halves of lstm_element_forward, for loops that run them as separate passes
// (the CPU kernels: four independent activations per element in one pass, then the cell
// update with one more, keeps more work in flight than one pass with both dependent halves).
template <typename T>
RNNTL_HOST_DEVICE void lstm_gate_activations(T a_i, T a_f, T a_g, T a_o, T& i, T& f, T& g, T& o) {
  i = sigmoid(a_i);
  f = sigmoid(a_f);
  g = tanh_activation(a_g);
  o = sigmoid(a_o);
}

// Cell update from the activations: fills cell_before_clip, cell and hidden of e.
template <typename T>
RNNTL_HOST_DEVICE void lstm_cell_update(T i, T f, T g, T o, T cell_prev, T cell_clip, LstmForwardElement<T>& e) {
  e.cell_before_clip = f * cell_prev + i * g;
  e.cell = clip_value(e.cell_before_clip, cell_clip);
  e.hidden = o * tanh_activation(e.cell);
}

template <typename T>
RNNTL_HOST_DEVICE LstmForwardElement<T> lstm_element_forward(T a_i, T a_f, T a_g, T a_o, T cell_prev,
                                                             T cell_clip) {
  LstmForwardElement<T> e;
  lstm_gate_activations(a_i, a_f, a_g, a_o, e.i, e.f, e.g, e.o);
  lstm_cell_update(e.i, e.f, e.g, e.o, cell_prev, cell_clip, e);
  return e;
}

// ---------------------------------------------------------------------------------------
// LSTM element, backward of one valid step.
//   grad_hidden:     dL/dm (m = o*tanh(c), before projection), already through the
//                    projection and proj_clip, and the state clip of h.
//   grad_cell_carry: dL/dc_t arriving from step t+1 (processing order).
// State-mode clipping of c_t happens on the total dL/dc_t; gate-mode clipping on dL/da.
// ---------------------------------------------------------------------------------------
template <typename T>
struct LstmBackwardElement {
  T d_i, d_f, d_g, d_o;  // dL/d(pre-activations)
  T grad_cell_prev;      // dL/dc_{t-1} through this step
};

// Total dL/dc_t (after cell_clip, before its backward): the carry plus the path through
// h = o * tanh(c), clamped in state mode.
template <typename T>
RNNTL_HOST_DEVICE T lstm_cell_state_gradient(T o, T tanh_cell, T grad_hidden, T grad_cell_carry, T state_clip) {
  return clip_value(grad_cell_carry + grad_hidden * o * (T(1) - tanh_cell * tanh_cell), state_clip);
}

// The gate gradients and dL/dc_{t-1} from grad_cell = dL/dc_t before the clip (through
// cell_clip's backward).
template <typename T>
RNNTL_HOST_DEVICE LstmBackwardElement<T> lstm_gate_gradients(T i, T f, T g, T o, T tanh_cell, T cell_prev,
                                                             T grad_hidden, T grad_cell, T gate_clip) {
  LstmBackwardElement<T> e;
  e.d_i = clip_value(grad_cell * g * i * (T(1) - i), gate_clip);
  e.d_f = clip_value(grad_cell * cell_prev * f * (T(1) - f), gate_clip);
  e.d_g = clip_value(grad_cell * i * (T(1) - g * g), gate_clip);
  e.d_o = clip_value(grad_hidden * tanh_cell * o * (T(1) - o), gate_clip);
  e.grad_cell_prev = grad_cell * f;
  return e;
}

// With tanh(clip(cell_before_clip)) given, for callers that need it themselves (the CPU
// kernel also rebuilds m = o * tanh(c) from it for the projection's gradient).
template <typename T>
RNNTL_HOST_DEVICE LstmBackwardElement<T> lstm_element_backward_given_tanh(T i, T f, T g, T o, T cell_before_clip,
                                                                          T tanh_cell, T cell_prev, T grad_hidden,
                                                                          T grad_cell_carry, T cell_clip,
                                                                          T state_clip, T gate_clip) {
  const T grad_cell = clip_gradient(lstm_cell_state_gradient(o, tanh_cell, grad_hidden, grad_cell_carry, state_clip),
                                    cell_before_clip, cell_clip);
  return lstm_gate_gradients(i, f, g, o, tanh_cell, cell_prev, grad_hidden, grad_cell, gate_clip);
}

// The same under zoneout of c with keep weight `keep`: the carried c_t = keep * c_{t-1} +
// (1 - keep) * clip(c~_t), while h~_t reads the fresh clip(c~_t). grad_cell_carry is dL/dc_t
// of the carried state, clamped alone in state mode (the state a hook would see); dL/dc_{t-1}
// gains the direct path keep * dL/dc_t.
template <typename T>
RNNTL_HOST_DEVICE LstmBackwardElement<T> lstm_element_backward_zoneout(T i, T f, T g, T o, T cell_before_clip,
                                                                       T tanh_cell, T cell_prev, T grad_hidden,
                                                                       T grad_cell_carry, T keep, T cell_clip,
                                                                       T state_clip, T gate_clip) {
  const T carried = clip_value(grad_cell_carry, state_clip);
  const T grad_fresh = clip_gradient((T(1) - keep) * carried + grad_hidden * o * (T(1) - tanh_cell * tanh_cell),
                                     cell_before_clip, cell_clip);
  LstmBackwardElement<T> e = lstm_gate_gradients(i, f, g, o, tanh_cell, cell_prev, grad_hidden, grad_fresh, gate_clip);
  e.grad_cell_prev += keep * carried;
  return e;
}

// The same computing tanh(clip(cell_before_clip)) itself (the CUDA kernels' form).
template <typename T>
RNNTL_HOST_DEVICE LstmBackwardElement<T> lstm_element_backward(T i, T f, T g, T o, T cell_before_clip,
                                                               T cell_prev, T grad_hidden,
                                                               T grad_cell_carry, T cell_clip,
                                                               T state_clip, T gate_clip) {
  const T tanh_cell = tanh_activation(clip_value(cell_before_clip, cell_clip));
  const T grad_cell = clip_gradient(lstm_cell_state_gradient(o, tanh_cell, grad_hidden, grad_cell_carry, state_clip),
                                    cell_before_clip, cell_clip);
  return lstm_gate_gradients(i, f, g, o, tanh_cell, cell_prev, grad_hidden, grad_cell, gate_clip);
}

// ---------------------------------------------------------------------------------------
// GRU element, forward. input_* = W_i* x + b_i*; hidden_* = W_h* h + b_h*.
// ---------------------------------------------------------------------------------------
template <typename T>
struct GruForwardElement {
  T r, z, n;
  T hidden;
};

// The second half of gru_element_forward, from the r and z activations (split for the
// same reason as lstm_cell_update): fills n and hidden of e.
template <typename T>
RNNTL_HOST_DEVICE void gru_candidate_update(T r, T z, T input_n, T hidden_n, T hidden_prev, GruForwardElement<T>& e) {
  e.n = tanh_activation(input_n + r * hidden_n);
  e.hidden = (T(1) - z) * e.n + z * hidden_prev;
}

template <typename T>
RNNTL_HOST_DEVICE GruForwardElement<T> gru_element_forward(T input_r, T input_z, T input_n, T hidden_r,
                                                           T hidden_z, T hidden_n, T hidden_prev) {
  GruForwardElement<T> e;
  e.r = sigmoid(input_r + hidden_r);
  e.z = sigmoid(input_z + hidden_z);
  gru_candidate_update(e.r, e.z, input_n, hidden_n, hidden_prev, e);
  return e;
}

// ---------------------------------------------------------------------------------------
// GRU element, backward of one valid step. grad_hidden is the total dL/dh_t (already
// state-clipped). hidden_n is W_hn h_{t-1} + b_hn as the forward computed it.
// The gradient of the input-side pre-activations is (d_r, d_z, d_n); of the
// hidden-side ones (d_r, d_z, d_n * r).
// ---------------------------------------------------------------------------------------
template <typename T>
struct GruBackwardElement {
  T d_r, d_z, d_n;      // dL/d(pre-activations); the n one is w.r.t. gi_n + r*gh_n
  T d_hidden_n;         // dL/d(gh_n) = d_n * r
  T grad_hidden_prev;   // direct path z * dh (the GEMM path is added by the caller)
};

template <typename T>
RNNTL_HOST_DEVICE GruBackwardElement<T> gru_element_backward(T r, T z, T n, T hidden_n, T hidden_prev,
                                                             T grad_hidden, T gate_clip) {
  GruBackwardElement<T> e;
  e.d_n = clip_value(grad_hidden * (T(1) - z) * (T(1) - n * n), gate_clip);
  e.d_z = clip_value(grad_hidden * (hidden_prev - n) * z * (T(1) - z), gate_clip);
  e.d_r = clip_value(e.d_n * hidden_n * r * (T(1) - r), gate_clip);
  e.d_hidden_n = e.d_n * r;
  e.grad_hidden_prev = grad_hidden * z;
  return e;
}

// ---------------------------------------------------------------------------------------
// Elman RNN element (docs/semantics.md section 10): a = W_ih x + b_ih + W_hh (m * h) + b_hh,
// h~ = f(a) with f = tanh or relu, and with zoneout keep weight d the carried
// h = d * h_prev + (1 - d) * h~. Both derivatives are taken from the output f(a), as
// torch's backward of tanh and relu takes them.
// ---------------------------------------------------------------------------------------
template <bool kRelu, typename T>
RNNTL_HOST_DEVICE T rnn_activation(T a) {
  if constexpr (kRelu) {
    return a < T(0) ? T(0) : a;  // a NaN passes, as torch.relu's
  } else {
    return tanh_activation(a);
  }
}

// dL/da from dL/dh~ and h~ = f(a). relu: torch's threshold_backward, zero where h~ <= 0
// (a NaN h~ passes the gradient, as there).
template <bool kRelu, typename T>
RNNTL_HOST_DEVICE T rnn_activation_backward(T grad_fresh, T fresh) {
  if constexpr (kRelu) {
    return fresh <= T(0) ? T(0) : grad_fresh;
  } else {
    return grad_fresh * (T(1) - fresh * fresh);
  }
}

// Zoneout: keep * previous + (1 - keep) * fresh, in the reference's order of operations.
template <typename T>
RNNTL_HOST_DEVICE T zoneout_blend(T keep, T previous, T fresh) {
  return keep * previous + (T(1) - keep) * fresh;
}

// dL/da of one valid step from the total dL/dh~ (dL/dh_t times 1 - d under zoneout),
// clamped in gate mode.
template <bool kRelu, typename T>
RNNTL_HOST_DEVICE T rnn_preactivation_gradient(T fresh, T grad_fresh, T gate_clip) {
  return clip_value(rnn_activation_backward<kRelu>(grad_fresh, fresh), gate_clip);
}

}  // namespace rnntl
