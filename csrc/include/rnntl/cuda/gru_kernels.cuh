// GRU ("reset after") kernels and their host-side sequence drivers, one layer and one
// direction; same structure and strategies as lstm_kernels.cuh.
// Shapes: T steps, B batch, I input, H hidden, G = 3H (gates r, z, n).
#pragma once

#include "common_kernels.cuh"

namespace rnntl {
namespace cuda {

// ---------------------------------------------------------------------------------------
// Stepwise
// ---------------------------------------------------------------------------------------
template <typename T>
struct GruForwardStepArgs {
  int64_t batch, hidden, t, active;
  const int64_t* order;        // [B]
  const T* input_gates;        // [T, B, 3H] W_ih x
  const T* bias_ih;            // [3H] or null
  const T* bias_hh;            // [3H] or null
  const T* recurrent_gates;    // [B, 3H] slot-major W_hh h_{t-1}
  T* hidden_state;             // [B, H] slot-major
  T* output;                   // [T, B, H]
  T* gates;                    // [T, B, 3H] or null
  T* hidden_n;                 // [T, B, H] or null
};

template <typename T>
__global__ void gru_forward_step_kernel(GruForwardStepArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 3 * H;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * H) {
    const int64_t j = index / H, k = index % H;
    const int64_t row = s.t * s.batch + s.order[j];
    if (j < s.active) {
      A x[3], h[3];
      for (int g = 0; g < 3; ++g) {
        const int64_t col = g * H + k;
        x[g] = to_acc(s.input_gates[row * G + col]) + (s.bias_ih ? to_acc(s.bias_ih[col]) : A(0));
        h[g] = to_acc(s.recurrent_gates[j * G + col]) + (s.bias_hh ? to_acc(s.bias_hh[col]) : A(0));
      }
      const GruForwardElement<A> e =
          gru_element_forward<A>(x[0], x[1], x[2], h[0], h[1], h[2], to_acc(s.hidden_state[index]));
      const T out = from_acc<T>(e.hidden);
      s.hidden_state[index] = out;
      s.output[row * H + k] = out;
      if (s.gates) {
        s.gates[row * G + k] = from_acc<T>(e.r);
        s.gates[row * G + H + k] = from_acc<T>(e.z);
        s.gates[row * G + 2 * H + k] = from_acc<T>(e.n);
        s.hidden_n[row * H + k] = from_acc<T>(h[2]);
      }
    } else {
      s.output[row * H + k] = from_acc<T>(A(0));
      if (s.gates) {
        for (int g = 0; g < 3; ++g) s.gates[row * G + g * H + k] = from_acc<T>(A(0));
        s.hidden_n[row * H + k] = from_acc<T>(A(0));
      }
    }
  }
}

template <typename T>
struct GruBackwardStepArgs {
  int64_t batch, hidden, t, active;
  bool reverse;
  const int64_t* order;          // [B]
  const int64_t* length;         // [B] by batch row
  const T* grad_output;          // [T, B, H] or null
  const T* gates;                // [T, B, 3H]
  const T* hidden_n;             // [T, B, H]
  const T* output;               // [T, B, H]
  const T* h0;                   // [B, H] or null
  T* grad_hidden_carry;          // [B, H] slot-major: dL/dh_t in; z*dL/dh_t out (the GEMM adds the rest)
  T* grad_hidden_gates;          // [B, 3H] slot-major dL/d(W_hh h + b_hh)
  T* grad_hidden_gates_all;      // [T, B, 3H] or null
  T* grad_input_gates_all;       // [T, B, 3H] dL/d(W_ih x + b_ih)
  T* hidden_prev_all;            // [T, B, H] or null
  acc_t<T> state_clip, gate_clip;
};

template <typename T>
__global__ void gru_backward_step_kernel(GruBackwardStepArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, G = 3 * H;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * H) {
    const int64_t j = index / H, k = index % H;
    const int64_t b = s.order[j];
    const int64_t row = s.t * s.batch + b;
    if (j < s.active) {
      const bool first = s.reverse ? s.t == s.length[b] - 1 : s.t == 0;
      const int64_t prev_row = (s.reverse ? s.t + 1 : s.t - 1) * s.batch + b;
      const T h_prev = first ? (s.h0 ? s.h0[b * H + k] : from_acc<T>(A(0))) : s.output[prev_row * H + k];
      A dh = to_acc(s.grad_hidden_carry[index]);
      if (s.grad_output) dh += to_acc(s.grad_output[row * H + k]);
      dh = clip_value(dh, s.state_clip);
      const T* act = s.gates + row * G;
      const GruBackwardElement<A> e =
          gru_element_backward<A>(to_acc(act[k]), to_acc(act[H + k]), to_acc(act[2 * H + k]),
                                  to_acc(s.hidden_n[row * H + k]), to_acc(h_prev), dh, s.gate_clip);
      const A di[3] = {e.d_r, e.d_z, e.d_n};
      const A dg[3] = {e.d_r, e.d_z, e.d_hidden_n};
      for (int g = 0; g < 3; ++g) {
        s.grad_input_gates_all[row * G + g * H + k] = from_acc<T>(di[g]);
        s.grad_hidden_gates[j * G + g * H + k] = from_acc<T>(dg[g]);
        if (s.grad_hidden_gates_all) s.grad_hidden_gates_all[row * G + g * H + k] = from_acc<T>(dg[g]);
      }
      s.grad_hidden_carry[index] = from_acc<T>(e.grad_hidden_prev);
      if (s.hidden_prev_all) s.hidden_prev_all[row * H + k] = h_prev;
    } else {
      s.grad_hidden_carry[index] = from_acc<T>(clip_value(to_acc(s.grad_hidden_carry[index]), s.state_clip));
      for (int g = 0; g < 3; ++g) {
        s.grad_input_gates_all[row * G + g * H + k] = from_acc<T>(A(0));
        if (s.grad_hidden_gates_all) s.grad_hidden_gates_all[row * G + g * H + k] = from_acc<T>(A(0));
      }
      if (s.hidden_prev_all) s.hidden_prev_all[row * H + k] = from_acc<T>(A(0));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Persistent
// ---------------------------------------------------------------------------------------
template <typename T>
struct GruPersistentForwardArgs {
  int64_t steps, batch, hidden, units_per_block;
  bool reverse;
  const int64_t* order;         // [B]
  const int64_t* active;        // [T]
  const T* input_gates;         // [T, B, 3H] W_ih x
  const T* bias_ih;             // [3H] or null
  const T* bias_hh;             // [3H] or null
  const T* weight_hh;           // [3H, H]
  acc_t<T>* hidden_exchange;    // [2, B, H] slot-major; [0] holds h0 (slot order) at launch
  unsigned int* barrier;        // one counter, zero at launch
  T* output;                    // [T, B, H]
  T* h_n;                       // [B, H]
  T* gates;                     // [T, B, 3H] or null
  T* hidden_n;                  // [T, B, H] or null
};

// Shared memory: h_{t-1} of the running rows [B][H] (acc_t<T>), then the block's rows of
// W_hh transposed, [H][3U].
template <typename T>
inline size_t gru_persistent_forward_shared_bytes(int64_t batch, int64_t hidden, int64_t units) {
  return size_t(batch * hidden) * sizeof(acc_t<T>) + size_t(hidden * 3 * units) * sizeof(T);
}

template <typename T>
__global__ void gru_persistent_forward_kernel(GruPersistentForwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(unsigned char, shared);
  const int64_t B = s.batch, H = s.hidden, G = 3 * H, U = s.units_per_block, GU = 3 * U;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int64_t units = H - u0 < U ? H - u0 : U;
  A* hidden_shared = reinterpret_cast<A*>(shared);                    // [B][H]
  T* weight_shared = reinterpret_cast<T*>(hidden_shared + B * H);     // [3U][H]
  // The block's rows of W_hh, gate-major: row (g, k) is W_hh row g*H + u0 + k (p fastest,
  // so the lanes of a warp read consecutive words).
  for (int64_t i = threadIdx.x; i < GU * H; i += blockDim.x) {
    const int64_t r = i / H, p = i % H, g = r / U, k = r % U;
    weight_shared[i] = k < units ? s.weight_hh[(g * H + u0 + k) * H + p] : from_acc<T>(A(0));
  }
  for (int64_t step = 0; step < s.steps; ++step) {
    const int64_t t = s.reverse ? s.steps - 1 - step : step;
    const int64_t n = s.active[t];
    const A* hidden_prev = s.hidden_exchange + (step & 1) * B * H;
    A* hidden_next = s.hidden_exchange + ((step + 1) & 1) * B * H;
    for (int64_t i = threadIdx.x; i < n * H; i += blockDim.x) hidden_shared[i] = load_coherent(hidden_prev + i);
    __syncthreads();
    // One warp per (row, unit) item; its lanes split the dot products over H.
    const int64_t lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize, warps = blockDim.x / warpSize;
    for (int64_t item = warp; item < B * U; item += warps) {
      const int64_t j = item / U, k = item % U, u = u0 + k;
      if (k >= units) continue;
      const int64_t row = t * B + s.order[j];
      if (j < n) {
        A hg[3] = {A(0), A(0), A(0)};
        const A* h = hidden_shared + j * H;
        for (int64_t p = lane; p < H; p += warpSize) {
          const A hp = h[p];
          for (int g = 0; g < 3; ++g) hg[g] += to_acc(weight_shared[(g * U + k) * H + p]) * hp;
        }
        for (int g = 0; g < 3; ++g) hg[g] = warp_sum(hg[g]);
        if (lane != 0) continue;
        A x[3];
        for (int g = 0; g < 3; ++g) {
          const int64_t col = g * H + u;
          x[g] = to_acc(s.input_gates[row * G + col]) + (s.bias_ih ? to_acc(s.bias_ih[col]) : A(0));
          if (s.bias_hh) hg[g] += to_acc(s.bias_hh[col]);
        }
        const GruForwardElement<A> e = gru_element_forward<A>(x[0], x[1], x[2], hg[0], hg[1], hg[2], h[u]);
        const T out = from_acc<T>(e.hidden);
        hidden_next[j * H + u] = to_acc(out);
        s.output[row * H + u] = out;
        if (s.gates) {
          s.gates[row * G + u] = from_acc<T>(e.r);
          s.gates[row * G + H + u] = from_acc<T>(e.z);
          s.gates[row * G + 2 * H + u] = from_acc<T>(e.n);
          s.hidden_n[row * H + u] = from_acc<T>(hg[2]);
        }
      } else {
        if (lane != 0) continue;
        hidden_next[j * H + u] = hidden_prev[j * H + u];  // this block's own unit
        s.output[row * H + u] = from_acc<T>(A(0));
        if (s.gates) {
          for (int g = 0; g < 3; ++g) s.gates[row * G + g * H + u] = from_acc<T>(A(0));
          s.hidden_n[row * H + u] = from_acc<T>(A(0));
        }
      }
    }
    if (step + 1 < s.steps) grid_barrier(s.barrier, static_cast<unsigned int>(step + 1));
  }
  __syncthreads();
  const A* hidden_last = s.hidden_exchange + (s.steps & 1) * B * H;
  for (int64_t item = threadIdx.x; item < B * U; item += blockDim.x) {
    const int64_t j = item / U, k = item % U, u = u0 + k;
    if (k >= units) continue;
    s.h_n[s.order[j] * H + u] = from_acc<T>(hidden_last[j * H + u]);
  }
}

template <typename T>
struct GruPersistentBackwardArgs {
  int64_t steps, batch, hidden, units_per_block;
  bool reverse;
  const int64_t* order;          // [B]
  const int64_t* length;         // [B] by batch row
  const int64_t* active;         // [T]
  const T* grad_output;          // [T, B, H] or null
  const T* grad_h_n;             // [B, H] or null
  const T* weight_hh;            // [3H, H]
  const T* h0;                   // [B, H] or null
  const T* output;               // [T, B, H]
  const T* gates;                // [T, B, 3H]
  const T* hidden_n;             // [T, B, H]
  acc_t<T>* gate_exchange;       // [2, B, 3H] slot-major dL/d(W_hh h + b_hh)
  unsigned int* barrier;         // one counter, zero at launch
  T* grad_input_gates_all;       // [T, B, 3H]
  T* grad_hidden_gates_all;      // [T, B, 3H] or null
  T* hidden_prev_all;            // [T, B, H] or null
  T* grad_h0;                    // [B, H] or null
  acc_t<T> state_clip, gate_clip;
};

// Shared memory: dL/d(W_hh h + b_hh) of the running rows [B][3H], the block's carry and
// direct path z*dL/dh [B][U] each (acc_t<T>), then the block's columns of W_hh, [3H][U].
template <typename T>
inline size_t gru_persistent_backward_shared_bytes(int64_t batch, int64_t hidden, int64_t units) {
  return size_t(batch * 3 * hidden + 2 * batch * units) * sizeof(acc_t<T>) + size_t(3 * hidden * units) * sizeof(T);
}

template <typename T>
__global__ void gru_persistent_backward_kernel(GruPersistentBackwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(unsigned char, shared);
  const int64_t B = s.batch, H = s.hidden, G = 3 * H, U = s.units_per_block;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int64_t units = H - u0 < U ? H - u0 : U;
  A* gate_shared = reinterpret_cast<A*>(shared);  // [B][G]
  A* carry = gate_shared + B * G;                 // [B][U]
  A* direct = carry + B * U;                      // [B][U]
  T* weight_shared = reinterpret_cast<T*>(direct + B * U);  // [U][G]
  // The block's columns of W_hh, unit-major: row k is column u0 + k (g fastest, so the
  // lanes of a warp read consecutive words).
  for (int64_t i = threadIdx.x; i < U * G; i += blockDim.x) {
    const int64_t k = i / G, g = i % G;
    weight_shared[i] = k < units ? s.weight_hh[g * H + u0 + k] : from_acc<T>(A(0));
  }
  for (int64_t i = threadIdx.x; i < B * U; i += blockDim.x) {
    const int64_t j = i / U, k = i % U;
    carry[i] = (k < units && s.grad_h_n) ? to_acc(s.grad_h_n[s.order[j] * H + u0 + k]) : A(0);
  }
  __syncthreads();
  for (int64_t round = 0; round < s.steps; ++round) {
    const int64_t step = s.steps - 1 - round;
    const int64_t t = s.reverse ? s.steps - 1 - step : step;
    const int64_t n = s.active[t];
    A* exchange = s.gate_exchange + (round & 1) * B * G;
    for (int64_t item = threadIdx.x; item < B * U; item += blockDim.x) {
      const int64_t j = item / U, k = item % U, u = u0 + k;
      if (k >= units) continue;
      const int64_t b = s.order[j];
      const int64_t row = t * B + b;
      if (j < n) {
        const bool first = s.reverse ? t == s.length[b] - 1 : t == 0;
        const int64_t prev_row = (s.reverse ? t + 1 : t - 1) * B + b;
        const T h_prev = first ? (s.h0 ? s.h0[b * H + u] : from_acc<T>(A(0))) : s.output[prev_row * H + u];
        A dh = carry[item];
        if (s.grad_output) dh += to_acc(s.grad_output[row * H + u]);
        dh = clip_value(dh, s.state_clip);
        const T* act = s.gates + row * G;
        const GruBackwardElement<A> e =
            gru_element_backward<A>(to_acc(act[u]), to_acc(act[H + u]), to_acc(act[2 * H + u]),
                                    to_acc(s.hidden_n[row * H + u]), to_acc(h_prev), dh, s.gate_clip);
        const A di[3] = {e.d_r, e.d_z, e.d_n};
        const A dg[3] = {e.d_r, e.d_z, e.d_hidden_n};
        for (int g = 0; g < 3; ++g) {
          s.grad_input_gates_all[row * G + g * H + u] = from_acc<T>(di[g]);
          const T rounded = from_acc<T>(dg[g]);
          if (s.grad_hidden_gates_all) s.grad_hidden_gates_all[row * G + g * H + u] = rounded;
          exchange[j * G + g * H + u] = to_acc(rounded);
        }
        direct[item] = e.grad_hidden_prev;
        if (s.hidden_prev_all) s.hidden_prev_all[row * H + u] = h_prev;
      } else {
        carry[item] = clip_value(carry[item], s.state_clip);
        for (int g = 0; g < 3; ++g) {
          s.grad_input_gates_all[row * G + g * H + u] = from_acc<T>(A(0));
          if (s.grad_hidden_gates_all) s.grad_hidden_gates_all[row * G + g * H + u] = from_acc<T>(A(0));
        }
        if (s.hidden_prev_all) s.hidden_prev_all[row * H + u] = from_acc<T>(A(0));
      }
    }
    grid_barrier(s.barrier, static_cast<unsigned int>(round + 1));
    for (int64_t i = threadIdx.x; i < n * G; i += blockDim.x) gate_shared[i] = load_coherent(exchange + i);
    __syncthreads();
    // One warp per (row, unit) item; its lanes split the dot product over 3H.
    const int64_t lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize, warps = blockDim.x / warpSize;
    for (int64_t item = warp; item < n * U; item += warps) {
      const int64_t j = item / U, k = item % U;
      if (k >= units) continue;
      const A* dg = gate_shared + j * G;
      A sum = A(0);
      for (int64_t g = lane; g < G; g += warpSize) sum += to_acc(weight_shared[k * G + g]) * dg[g];
      sum = warp_sum(sum);
      if (lane == 0) carry[item] = direct[item] + sum;
    }
    __syncthreads();
  }
  for (int64_t item = threadIdx.x; item < B * U; item += blockDim.x) {
    const int64_t j = item / U, k = item % U, u = u0 + k;
    if (k >= units || !s.grad_h0) continue;
    s.grad_h0[s.order[j] * H + u] = from_acc<T>(carry[item]);
  }
}

// ---------------------------------------------------------------------------------------
// Host-side drivers
// ---------------------------------------------------------------------------------------
template <typename T>
inline PersistentPlan gru_forward_plan(const GruForwardParams& p) {
  return plan_persistent(gru_persistent_forward_kernel<T>, p.hidden, persistent_threads(p.env), [&](int64_t units) {
    return gru_persistent_forward_shared_bytes<T>(p.batch, p.hidden, units);
  });
}

template <typename T>
inline PersistentPlan gru_backward_plan(const GruBackwardParams& p) {
  return plan_persistent(gru_persistent_backward_kernel<T>, p.hidden, persistent_threads(p.env), [&](int64_t units) {
    return gru_persistent_backward_shared_bytes<T>(p.batch, p.hidden, units);
  });
}

template <typename T>
struct GruForwardWorkspace {
  T* input_gates;               // [T, B, 3H]
  T* hidden_state;              // [B, H]
  T* recurrent_gates;           // [B, 3H]
  acc_t<T>* hidden_exchange;    // [2, B, H]
  unsigned int* barrier;        // [1]
  size_t bytes;
  GruForwardWorkspace(const GruForwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    const int64_t B = p.batch, H = p.hidden, G = 3 * H;
    input_gates = c.take<T>(p.steps * B * G);
    hidden_state = c.take<T>(B * H);
    recurrent_gates = c.take<T>(B * G);
    hidden_exchange = c.take<acc_t<T>>(2 * B * H);
    barrier = c.take<unsigned int>(1);
    bytes = c.offset;
  }
};

template <typename T>
const char* gru_forward_run(const GruForwardParams& p) {
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, H = p.hidden, G = 3 * H;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  GruForwardWorkspace<T> w(p, p.env.workspace);
  const PersistentPlan plan = gru_forward_plan<T>(p);
  bool persistent = false;
  if (const char* error = resolve_strategy(p.env.strategy, plan, B, &persistent)) return error;
  gemm(T_ * B, G, I, p.input, I, false, p.weight_ih, I, true, w.input_gates, G, false);
  T* gates = p.save ? static_cast<T*>(p.gates) : nullptr;
  T* hidden_n = p.save ? static_cast<T*>(p.hidden_n) : nullptr;

  if (persistent) {
    gather_rows(static_cast<const T*>(p.h0), w.hidden_exchange, p.order.order, B, H, stream);
    cudaMemsetAsync(w.barrier, 0, sizeof(unsigned int), static_cast<cudaStream_t>(stream));
    GruPersistentForwardArgs<T> a;
    a.steps = T_;
    a.batch = B;
    a.hidden = H;
    a.units_per_block = plan.units_per_block;
    a.reverse = p.reverse;
    a.order = p.order.order;
    a.active = p.order.active;
    a.input_gates = w.input_gates;
    a.bias_ih = static_cast<const T*>(p.bias_ih);
    a.bias_hh = static_cast<const T*>(p.bias_hh);
    a.weight_hh = static_cast<const T*>(p.weight_hh);
    a.hidden_exchange = w.hidden_exchange;
    a.barrier = w.barrier;
    a.output = static_cast<T*>(p.output);
    a.h_n = static_cast<T*>(p.h_n);
    a.gates = gates;
    a.hidden_n = hidden_n;
    const cudaError_t error = launch_cooperative(dim3(plan.blocks), dim3(plan.threads), plan.shared_bytes, stream,
                                                 gru_persistent_forward_kernel<T>, a);
    if (error != cudaSuccess) return cudaGetErrorString(error);
    return launch_error("gru_persistent_forward_kernel");
  }

  gather_rows(static_cast<const T*>(p.h0), w.hidden_state, p.order.order, B, H, stream);
  GruForwardStepArgs<T> s;
  s.batch = B;
  s.hidden = H;
  s.order = p.order.order;
  s.input_gates = w.input_gates;
  s.bias_ih = static_cast<const T*>(p.bias_ih);
  s.bias_hh = static_cast<const T*>(p.bias_hh);
  s.recurrent_gates = w.recurrent_gates;
  s.hidden_state = w.hidden_state;
  s.output = static_cast<T*>(p.output);
  s.gates = gates;
  s.hidden_n = hidden_n;
  for (int64_t step = 0; step < T_; ++step) {
    const int64_t t = p.reverse ? T_ - 1 - step : step;
    const int64_t n = p.order.active_host[t];
    s.t = t;
    s.active = n;
    gemm(n, G, H, w.hidden_state, H, false, p.weight_hh, H, true, w.recurrent_gates, G, false);
    launch_kernel(pointwise_grid(B * H), dim3(kPointwiseThreads), 0, stream, gru_forward_step_kernel<T>, s);
  }
  scatter_rows(static_cast<const T*>(w.hidden_state), static_cast<T*>(p.h_n), p.order.order, B, H, stream);
  return launch_error("gru_forward");
}

template <typename T>
struct GruBackwardWorkspace {
  T* grad_hidden_carry;         // [B, H]
  T* grad_hidden_gates;         // [B, 3H]
  T* grad_input_gates_all;      // [T, B, 3H]
  T* grad_hidden_gates_all;     // [T, B, 3H]
  T* hidden_prev_all;           // [T, B, H]
  acc_t<T>* gate_exchange;      // [2, B, 3H]
  unsigned int* barrier;        // [1]
  size_t bytes;
  GruBackwardWorkspace(const GruBackwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    const int64_t T_ = p.steps, B = p.batch, H = p.hidden, G = 3 * H;
    grad_hidden_carry = c.take<T>(B * H);
    grad_hidden_gates = c.take<T>(B * G);
    grad_input_gates_all = c.take<T>(T_ * B * G);
    grad_hidden_gates_all = (p.grad_weight_hh || p.grad_bias_hh) ? c.take<T>(T_ * B * G) : nullptr;
    hidden_prev_all = p.grad_weight_hh ? c.take<T>(T_ * B * H) : nullptr;
    gate_exchange = c.take<acc_t<T>>(2 * B * G);
    barrier = c.take<unsigned int>(1);
    bytes = c.offset;
  }
};

template <typename T>
const char* gru_backward_run(const GruBackwardParams& p) {
  using A = acc_t<T>;
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, H = p.hidden, G = 3 * H;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  GruBackwardWorkspace<T> w(p, p.env.workspace);
  const PersistentPlan plan = gru_backward_plan<T>(p);
  bool persistent = false;
  if (const char* error = resolve_strategy(p.env.strategy, plan, B, &persistent)) return error;

  if (persistent) {
    cudaMemsetAsync(w.barrier, 0, sizeof(unsigned int), static_cast<cudaStream_t>(stream));
    GruPersistentBackwardArgs<T> a;
    a.steps = T_;
    a.batch = B;
    a.hidden = H;
    a.units_per_block = plan.units_per_block;
    a.reverse = p.reverse;
    a.order = p.order.order;
    a.length = p.order.length;
    a.active = p.order.active;
    a.grad_output = static_cast<const T*>(p.grad_output);
    a.grad_h_n = static_cast<const T*>(p.grad_h_n);
    a.weight_hh = static_cast<const T*>(p.weight_hh);
    a.h0 = static_cast<const T*>(p.h0);
    a.output = static_cast<const T*>(p.output);
    a.gates = static_cast<const T*>(p.gates);
    a.hidden_n = static_cast<const T*>(p.hidden_n);
    a.gate_exchange = w.gate_exchange;
    a.barrier = w.barrier;
    a.grad_input_gates_all = w.grad_input_gates_all;
    a.grad_hidden_gates_all = w.grad_hidden_gates_all;
    a.hidden_prev_all = w.hidden_prev_all;
    a.grad_h0 = static_cast<T*>(p.grad_h0);
    a.state_clip = A(p.state_clip);
    a.gate_clip = A(p.gate_clip);
    const cudaError_t error = launch_cooperative(dim3(plan.blocks), dim3(plan.threads), plan.shared_bytes, stream,
                                                 gru_persistent_backward_kernel<T>, a);
    if (error != cudaSuccess) return cudaGetErrorString(error);
  } else {
    gather_rows(static_cast<const T*>(p.grad_h_n), w.grad_hidden_carry, p.order.order, B, H, stream);
    GruBackwardStepArgs<T> s;
    s.batch = B;
    s.hidden = H;
    s.reverse = p.reverse;
    s.order = p.order.order;
    s.length = p.order.length;
    s.grad_output = static_cast<const T*>(p.grad_output);
    s.gates = static_cast<const T*>(p.gates);
    s.hidden_n = static_cast<const T*>(p.hidden_n);
    s.output = static_cast<const T*>(p.output);
    s.h0 = static_cast<const T*>(p.h0);
    s.grad_hidden_carry = w.grad_hidden_carry;
    s.grad_hidden_gates = w.grad_hidden_gates;
    s.grad_hidden_gates_all = w.grad_hidden_gates_all;
    s.grad_input_gates_all = w.grad_input_gates_all;
    s.hidden_prev_all = w.hidden_prev_all;
    s.state_clip = A(p.state_clip);
    s.gate_clip = A(p.gate_clip);
    for (int64_t step = T_ - 1; step >= 0; --step) {
      const int64_t t = p.reverse ? T_ - 1 - step : step;
      const int64_t n = p.order.active_host[t];
      s.t = t;
      s.active = n;
      launch_kernel(pointwise_grid(B * H), dim3(kPointwiseThreads), 0, stream, gru_backward_step_kernel<T>, s);
      // dL/dh_{t-1} = z*dL/dh_t (already in the carry) + dL/d(W_hh h) W_hh, [n, 3H] @ [3H, H].
      gemm(n, H, G, w.grad_hidden_gates, G, false, p.weight_hh, H, false, w.grad_hidden_carry, H, true);
    }
    if (p.grad_h0) scatter_rows(static_cast<const T*>(w.grad_hidden_carry), static_cast<T*>(p.grad_h0), p.order.order, B, H, stream);
  }

  const int64_t rows = T_ * B;
  if (p.grad_input) gemm(rows, I, G, w.grad_input_gates_all, G, false, p.weight_ih, I, false, p.grad_input, I, false);
  if (p.grad_weight_ih)
    gemm(G, I, rows, w.grad_input_gates_all, G, true, p.input, I, false, p.grad_weight_ih, I, false);
  if (p.grad_bias_ih) column_sum(static_cast<const T*>(w.grad_input_gates_all), static_cast<T*>(p.grad_bias_ih), rows, G, stream);
  if (p.grad_weight_hh)
    gemm(G, H, rows, w.grad_hidden_gates_all, G, true, w.hidden_prev_all, H, false, p.grad_weight_hh, H, false);
  if (p.grad_bias_hh) column_sum(static_cast<const T*>(w.grad_hidden_gates_all), static_cast<T*>(p.grad_bias_hh), rows, G, stream);
  return launch_error("gru_backward");
}

}  // namespace cuda
}  // namespace rnntl
