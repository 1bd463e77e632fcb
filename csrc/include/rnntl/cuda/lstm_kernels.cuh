// LSTM kernels and their host-side sequence drivers, one layer and one direction.
// Compiled by nvcc from csrc/cuda/lstm_kernels.cu (with explicit per-dtype instantiations)
// and by g++ against the CPU emulation in tests/cuda_emulation/.
//
// Two strategies (see rnntl/params.h, docs/cuda.md):
//   stepwise:   per step a recurrent GEMM through the GemmHook (cuBLAS) over the running
//               rows, then one fused pointwise kernel; with proj_size a second GEMM and
//               an epilogue kernel.
//   persistent: one cooperative launch per sequence; block b owns hidden units
//               [b*U, b*U+U) and keeps their rows of W_hh (forward) or columns of W_hh
//               (backward) in shared memory for all steps; blocks exchange h_t (forward)
//               or dL/da_t (backward) through global memory, one grid barrier per step.
//               No projection (P == H).
// Gate math comes from rnntl/cell_math.h, in acc_t<T> (float for half/bfloat16).
// Shapes: T steps, B batch, I input, H hidden, P = proj_size or H, G = 4H. "Slot-major":
// slot j holds batch row order[j] (rows sorted by length, longest first).
#pragma once

#include "common_kernels.cuh"

namespace rnntl {
namespace cuda {

// ---------------------------------------------------------------------------------------
// Stepwise forward
// ---------------------------------------------------------------------------------------
template <typename T>
struct LstmForwardStepArgs {
  int64_t batch, hidden, out_size, t, active;
  bool project;
  const int64_t* order;        // [B]
  const T* input_gates;        // [T, B, 4H] W_ih x (biases are added here)
  const T* bias_ih;            // [4H] or null
  const T* bias_hh;            // [4H] or null
  const T* recurrent_gates;    // [B, 4H] slot-major W_hh h_{t-1}
  acc_t<T>* cell_state;        // [B, H] slot-major
  T* hidden_state;             // [B, P] slot-major (written here without projection)
  T* hidden_unprojected;       // [B, H] slot-major o*tanh(c) (with projection)
  T* output;                   // [T, B, P]
  T* gates;                    // [T, B, 4H] or null (not saving)
  T* cells;                    // [T, B, H] or null
  T* hidden_pre_clip;          // [T, B, P] or null
  acc_t<T> cell_clip, proj_clip;
};

// One step over all B slots x max(H, P) columns: running slots update their state, the
// others write zeros to this step's output and reserve rows and keep their state.
template <typename T>
__global__ void lstm_forward_step_kernel(LstmForwardStepArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, P = s.out_size, G = 4 * H, W = H > P ? H : P;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * W) {
    const int64_t j = index / W, k = index % W;
    const int64_t row = s.t * s.batch + s.order[j];
    if (j < s.active) {
      if (k >= H) continue;
      A a[4];
      for (int g = 0; g < 4; ++g) {
        const int64_t col = g * H + k;
        a[g] = to_acc(s.input_gates[row * G + col]) + to_acc(s.recurrent_gates[j * G + col]);
        if (s.bias_ih) a[g] += to_acc(s.bias_ih[col]);
        if (s.bias_hh) a[g] += to_acc(s.bias_hh[col]);
      }
      const LstmForwardElement<A> e = lstm_element_forward<A>(a[0], a[1], a[2], a[3], s.cell_state[j * H + k],
                                                               s.cell_clip);
      s.cell_state[j * H + k] = e.cell;
      if (s.gates) {
        s.gates[row * G + k] = from_acc<T>(e.i);
        s.gates[row * G + H + k] = from_acc<T>(e.f);
        s.gates[row * G + 2 * H + k] = from_acc<T>(e.g);
        s.gates[row * G + 3 * H + k] = from_acc<T>(e.o);
        s.cells[row * H + k] = from_acc<T>(e.cell_before_clip);
      }
      if (s.project) {
        s.hidden_unprojected[j * H + k] = from_acc<T>(e.hidden);
      } else {
        const T h = from_acc<T>(clip_value(e.hidden, s.proj_clip));
        s.hidden_state[j * P + k] = h;
        s.output[row * P + k] = h;
        if (s.hidden_pre_clip) s.hidden_pre_clip[row * P + k] = from_acc<T>(e.hidden);
      }
    } else {
      if (k < P) {
        s.output[row * P + k] = from_acc<T>(A(0));
        if (s.hidden_pre_clip) s.hidden_pre_clip[row * P + k] = from_acc<T>(A(0));
      }
      if (k < H && s.gates) {
        for (int g = 0; g < 4; ++g) s.gates[row * G + g * H + k] = from_acc<T>(A(0));
        s.cells[row * H + k] = from_acc<T>(A(0));
      }
    }
  }
}

// After the projection GEMM: h = clip(W_hr m) for the running slots.
//   projected: [B, P] slot-major W_hr m;  hidden_state: [B, P];  output, hidden_pre_clip: [T, B, P].
template <typename T>
__global__ void lstm_projection_epilogue_kernel(const T* projected, T* hidden_state, T* output, T* hidden_pre_clip,
                                                const int64_t* order, int64_t batch, int64_t out_size, int64_t t,
                                                int64_t active, acc_t<T> proj_clip) {
  RNNTL_GRID_STRIDE_LOOP(index, active * out_size) {
    const int64_t j = index / out_size, k = index % out_size;
    const int64_t row = t * batch + order[j];
    const acc_t<T> v = to_acc(projected[index]);
    if (hidden_pre_clip) hidden_pre_clip[row * out_size + k] = projected[index];
    const T h = from_acc<T>(clip_value(v, proj_clip));
    hidden_state[index] = h;
    output[row * out_size + k] = h;
  }
}

// ---------------------------------------------------------------------------------------
// Stepwise backward
// ---------------------------------------------------------------------------------------
template <typename T>
struct LstmBackwardStepArgs {
  int64_t batch, hidden, out_size, t, active;
  bool reverse;
  const int64_t* order;             // [B]
  const int64_t* length;            // [B] by batch row
  const T* grad_output;             // [T, B, P] or null (zeros)
  const T* hidden_pre_clip;         // [T, B, P] or null (no proj_clip)
  const T* gates;                   // [T, B, 4H]
  const T* cells;                   // [T, B, H] before clip
  const T* output;                  // [T, B, P]
  const T* h0;                      // [B, P] or null
  const T* c0;                      // [B, H] or null
  T* grad_hidden_carry;             // [B, P] slot-major dL/dh_t from step t+1; inactive slots clipped here
  T* grad_pre_clip;                 // [B, P] slot-major dL/d(hidden before proj_clip)
  T* grad_pre_clip_all;             // [T, B, P] or null (only for dW_hr)
  const T* grad_hidden_unprojected; // [B, H] slot-major dL/dm (grad_pre_clip without projection)
  acc_t<T>* grad_cell_carry;        // [B, H] slot-major dL/dc_t in, dL/dc_{t-1} out
  T* grad_gates;                    // [B, 4H] slot-major dL/da (input of the recurrent GEMM)
  T* grad_gates_all;                // [T, B, 4H]
  T* hidden_prev_all;               // [T, B, P] h_{t-1} per row, or null (no dW_hh)
  T* hidden_unprojected_all;        // [T, B, H] m per row, or null (no dW_hr)
  acc_t<T> cell_clip, proj_clip, state_clip, gate_clip;
};

// dL/dh_t = clip(carry + grad_output) (state mode), then through proj_clip's mask.
template <typename T>
__global__ void lstm_hidden_gradient_kernel(LstmBackwardStepArgs<T> s) {
  using A = acc_t<T>;
  const int64_t P = s.out_size;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * P) {
    const int64_t j = index / P, k = index % P;
    const int64_t row = s.t * s.batch + s.order[j];
    if (j < s.active) {
      A g = to_acc(s.grad_hidden_carry[index]);
      if (s.grad_output) g += to_acc(s.grad_output[row * P + k]);
      g = clip_value(g, s.state_clip);
      if (s.hidden_pre_clip) g *= clip_pass(to_acc(s.hidden_pre_clip[row * P + k]), s.proj_clip);
      s.grad_pre_clip[index] = from_acc<T>(g);
      if (s.grad_pre_clip_all) s.grad_pre_clip_all[row * P + k] = from_acc<T>(g);
    } else {
      // A row past its length passes its state gradient on, clamped as the reference's hook does.
      s.grad_hidden_carry[index] = from_acc<T>(clip_value(to_acc(s.grad_hidden_carry[index]), s.state_clip));
      if (s.grad_pre_clip_all) s.grad_pre_clip_all[row * P + k] = from_acc<T>(A(0));
    }
  }
}

template <typename T>
__global__ void lstm_backward_step_kernel(LstmBackwardStepArgs<T> s) {
  using A = acc_t<T>;
  const int64_t H = s.hidden, P = s.out_size, G = 4 * H, W = H > P ? H : P;
  RNNTL_GRID_STRIDE_LOOP(index, s.batch * W) {
    const int64_t j = index / W, k = index % W;
    const int64_t b = s.order[j];
    const int64_t row = s.t * s.batch + b;
    if (j < s.active) {
      const bool first = s.reverse ? s.t == s.length[b] - 1 : s.t == 0;
      const int64_t prev_row = (s.reverse ? s.t + 1 : s.t - 1) * s.batch + b;
      if (k < H) {
        // c0 is not clipped; the saved cells are before the clip.
        const A cell_prev = first ? (s.c0 ? to_acc(s.c0[b * H + k]) : A(0))
                                  : clip_value(to_acc(s.cells[prev_row * H + k]), s.cell_clip);
        const T* act = s.gates + row * G;
        const A cell = to_acc(s.cells[row * H + k]);
        const LstmBackwardElement<A> e = lstm_element_backward<A>(
            to_acc(act[k]), to_acc(act[H + k]), to_acc(act[2 * H + k]), to_acc(act[3 * H + k]), cell, cell_prev,
            to_acc(s.grad_hidden_unprojected[j * H + k]), s.grad_cell_carry[j * H + k], s.cell_clip, s.state_clip,
            s.gate_clip);
        s.grad_cell_carry[j * H + k] = e.grad_cell_prev;
        const A d[4] = {e.d_i, e.d_f, e.d_g, e.d_o};
        for (int g = 0; g < 4; ++g) {
          s.grad_gates[j * G + g * H + k] = from_acc<T>(d[g]);
          s.grad_gates_all[row * G + g * H + k] = from_acc<T>(d[g]);
        }
        if (s.hidden_unprojected_all)
          s.hidden_unprojected_all[row * H + k] =
              from_acc<T>(to_acc(act[3 * H + k]) * tanh_(clip_value(cell, s.cell_clip)));
      }
      if (k < P && s.hidden_prev_all)
        s.hidden_prev_all[row * P + k] =
            first ? (s.h0 ? s.h0[b * P + k] : from_acc<T>(A(0))) : s.output[prev_row * P + k];
    } else {
      if (k < H) {
        s.grad_cell_carry[j * H + k] = clip_value(s.grad_cell_carry[j * H + k], s.state_clip);
        for (int g = 0; g < 4; ++g) s.grad_gates_all[row * G + g * H + k] = from_acc<T>(A(0));
        if (s.hidden_unprojected_all) s.hidden_unprojected_all[row * H + k] = from_acc<T>(A(0));
      }
      if (k < P && s.hidden_prev_all) s.hidden_prev_all[row * P + k] = from_acc<T>(A(0));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Persistent forward (P == H)
// ---------------------------------------------------------------------------------------
template <typename T>
struct LstmPersistentForwardArgs {
  int64_t steps, batch, hidden, units_per_block;
  bool reverse;
  const int64_t* order;         // [B]
  const int64_t* active;        // [T]
  const T* input_gates;         // [T, B, 4H] W_ih x
  const T* bias_ih;             // [4H] or null
  const T* bias_hh;             // [4H] or null
  const T* weight_hh;           // [4H, H]
  const T* c0;                  // [B, H] batch order, or null
  acc_t<T>* hidden_exchange;    // [2, B, H] slot-major; [0] holds h0 (slot order) at launch
  unsigned int* barrier;        // one counter, zero at launch
  T* output;                    // [T, B, H]
  T* h_n;                       // [B, H]
  T* c_n;                       // [B, H]
  T* gates;                     // [T, B, 4H] or null
  T* cells;                     // [T, B, H] or null
  T* hidden_pre_clip;           // [T, B, H] or null
  acc_t<T> cell_clip, proj_clip;
};

// Shared memory: h_{t-1} of all running rows [B][H] and the block's cells [B][U] in
// acc_t<T>, then the block's rows of W_hh transposed, [H][4U] (unit fastest, so that the
// threads of a warp read consecutive words).
template <typename T>
inline size_t lstm_persistent_forward_shared_bytes(int64_t batch, int64_t hidden, int64_t units) {
  return size_t(batch * hidden + batch * units) * sizeof(acc_t<T>) + size_t(hidden * 4 * units) * sizeof(T);
}

template <typename T>
__global__ void lstm_persistent_forward_kernel(LstmPersistentForwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(unsigned char, shared);
  const int64_t B = s.batch, H = s.hidden, G = 4 * H, U = s.units_per_block, GU = 4 * U;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int64_t units = H - u0 < U ? H - u0 : U;
  A* hidden_shared = reinterpret_cast<A*>(shared);  // [B][H]
  A* cell_shared = hidden_shared + B * H;           // [B][U]
  T* weight_shared = reinterpret_cast<T*>(cell_shared + B * U);  // [4U][H]

  // The block's rows of W_hh, gate-major: row (g, k) is W_hh row g*H + u0 + k (p fastest,
  // so the lanes of a warp read consecutive words).
  for (int64_t i = threadIdx.x; i < GU * H; i += blockDim.x) {
    const int64_t r = i / H, p = i % H, g = r / U, k = r % U;
    weight_shared[i] = k < units ? s.weight_hh[(g * H + u0 + k) * H + p] : from_acc<T>(A(0));
  }
  for (int64_t i = threadIdx.x; i < B * U; i += blockDim.x) {
    const int64_t j = i / U, k = i % U;
    cell_shared[i] = (k < units && s.c0) ? to_acc(s.c0[s.order[j] * H + u0 + k]) : A(0);
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
        A a[4] = {A(0), A(0), A(0), A(0)};
        const A* h = hidden_shared + j * H;
        for (int64_t p = lane; p < H; p += warpSize) {
          const A hp = h[p];
          for (int g = 0; g < 4; ++g) a[g] += to_acc(weight_shared[(g * U + k) * H + p]) * hp;
        }
        for (int g = 0; g < 4; ++g) a[g] = warp_sum(a[g]);
        if (lane != 0) continue;
        for (int g = 0; g < 4; ++g) {
          const int64_t col = g * H + u;
          a[g] += to_acc(s.input_gates[row * G + col]);
          if (s.bias_ih) a[g] += to_acc(s.bias_ih[col]);
          if (s.bias_hh) a[g] += to_acc(s.bias_hh[col]);
        }
        const LstmForwardElement<A> e =
            lstm_element_forward<A>(a[0], a[1], a[2], a[3], cell_shared[j * U + k], s.cell_clip);
        cell_shared[j * U + k] = e.cell;
        // Rounded to T as the stepwise strategy's hidden state is.
        const T h_out = from_acc<T>(clip_value(e.hidden, s.proj_clip));
        hidden_next[j * H + u] = to_acc(h_out);
        s.output[row * H + u] = h_out;
        if (s.gates) {
          s.gates[row * G + u] = from_acc<T>(e.i);
          s.gates[row * G + H + u] = from_acc<T>(e.f);
          s.gates[row * G + 2 * H + u] = from_acc<T>(e.g);
          s.gates[row * G + 3 * H + u] = from_acc<T>(e.o);
          s.cells[row * H + u] = from_acc<T>(e.cell_before_clip);
        }
        if (s.hidden_pre_clip) s.hidden_pre_clip[row * H + u] = from_acc<T>(e.hidden);
      } else {
        if (lane != 0) continue;
        hidden_next[j * H + u] = hidden_prev[j * H + u];  // this block's own unit: no exchange
        s.output[row * H + u] = from_acc<T>(A(0));
        if (s.gates) {
          for (int g = 0; g < 4; ++g) s.gates[row * G + g * H + u] = from_acc<T>(A(0));
          s.cells[row * H + u] = from_acc<T>(A(0));
        }
        if (s.hidden_pre_clip) s.hidden_pre_clip[row * H + u] = from_acc<T>(A(0));
      }
    }
    if (step + 1 < s.steps) grid_barrier(s.barrier, static_cast<unsigned int>(step + 1));
  }
  __syncthreads();
  const A* hidden_last = s.hidden_exchange + (s.steps & 1) * B * H;
  for (int64_t item = threadIdx.x; item < B * U; item += blockDim.x) {
    const int64_t j = item / U, k = item % U, u = u0 + k;
    if (k >= units) continue;
    const int64_t b = s.order[j];
    s.h_n[b * H + u] = from_acc<T>(hidden_last[j * H + u]);
    s.c_n[b * H + u] = from_acc<T>(cell_shared[j * U + k]);
  }
}

// ---------------------------------------------------------------------------------------
// Persistent backward (P == H)
// ---------------------------------------------------------------------------------------
template <typename T>
struct LstmPersistentBackwardArgs {
  int64_t steps, batch, hidden, units_per_block;
  bool reverse;
  const int64_t* order;         // [B]
  const int64_t* length;        // [B] by batch row
  const int64_t* active;        // [T]
  const T* grad_output;         // [T, B, H] or null
  const T* grad_h_n;            // [B, H] or null
  const T* grad_c_n;            // [B, H] or null
  const T* weight_hh;           // [4H, H]
  const T* h0;                  // [B, H] or null
  const T* c0;                  // [B, H] or null
  const T* output;              // [T, B, H]
  const T* gates;               // [T, B, 4H]
  const T* cells;               // [T, B, H]
  const T* hidden_pre_clip;     // [T, B, H] or null
  acc_t<T>* gate_exchange;      // [2, B, 4H] slot-major dL/da, double-buffered by step parity
  unsigned int* barrier;        // one counter, zero at launch
  T* grad_gates_all;            // [T, B, 4H]
  T* hidden_prev_all;           // [T, B, H] or null
  T* grad_h0;                   // [B, H] or null
  T* grad_c0;                   // [B, H] or null
  acc_t<T> cell_clip, proj_clip, state_clip, gate_clip;
};

// Shared memory: dL/da of the running rows [B][4H], the block's carries dL/dh and dL/dc
// [B][U] each (acc_t<T>), then the block's columns of W_hh, [4H][U].
template <typename T>
inline size_t lstm_persistent_backward_shared_bytes(int64_t batch, int64_t hidden, int64_t units) {
  return size_t(batch * 4 * hidden + 2 * batch * units) * sizeof(acc_t<T>) + size_t(4 * hidden * units) * sizeof(T);
}

// Per step: phase 1 (block-local) turns the block's dL/dh, dL/dc slices into dL/da for its
// units and publishes them; grid barrier; phase 2 reads every unit's dL/da and forms
// dL/dh_{t-1} = W_hh^T dL/da for the block's columns, which are its own units again
// (P == H), so the next phase 1 needs nothing from other blocks.
template <typename T>
__global__ void lstm_persistent_backward_kernel(LstmPersistentBackwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(unsigned char, shared);
  const int64_t B = s.batch, H = s.hidden, G = 4 * H, U = s.units_per_block;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int64_t units = H - u0 < U ? H - u0 : U;
  A* gate_shared = reinterpret_cast<A*>(shared);  // [B][G]
  A* carry_h = gate_shared + B * G;               // [B][U]
  A* carry_c = carry_h + B * U;                   // [B][U]
  T* weight_shared = reinterpret_cast<T*>(carry_c + B * U);  // [U][G]

  // The block's columns of W_hh, unit-major: row k is column u0 + k (g fastest, so the
  // lanes of a warp read consecutive words).
  for (int64_t i = threadIdx.x; i < U * G; i += blockDim.x) {
    const int64_t k = i / G, g = i % G;
    weight_shared[i] = k < units ? s.weight_hh[g * H + u0 + k] : from_acc<T>(A(0));
  }
  for (int64_t i = threadIdx.x; i < B * U; i += blockDim.x) {
    const int64_t j = i / U, k = i % U, b = s.order[j];
    carry_h[i] = (k < units && s.grad_h_n) ? to_acc(s.grad_h_n[b * H + u0 + k]) : A(0);
    carry_c[i] = (k < units && s.grad_c_n) ? to_acc(s.grad_c_n[b * H + u0 + k]) : A(0);
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
        A dh = carry_h[item];
        if (s.grad_output) dh += to_acc(s.grad_output[row * H + u]);
        dh = clip_value(dh, s.state_clip);
        if (s.hidden_pre_clip) dh *= clip_pass(to_acc(s.hidden_pre_clip[row * H + u]), s.proj_clip);
        const A cell_prev = first ? (s.c0 ? to_acc(s.c0[b * H + u]) : A(0))
                                  : clip_value(to_acc(s.cells[prev_row * H + u]), s.cell_clip);
        const T* act = s.gates + row * G;
        const LstmBackwardElement<A> e = lstm_element_backward<A>(
            to_acc(act[u]), to_acc(act[H + u]), to_acc(act[2 * H + u]), to_acc(act[3 * H + u]),
            to_acc(s.cells[row * H + u]), cell_prev, dh, carry_c[item], s.cell_clip, s.state_clip, s.gate_clip);
        carry_c[item] = e.grad_cell_prev;
        const A d[4] = {e.d_i, e.d_f, e.d_g, e.d_o};
        for (int g = 0; g < 4; ++g) {
          const T rounded = from_acc<T>(d[g]);
          s.grad_gates_all[row * G + g * H + u] = rounded;
          exchange[j * G + g * H + u] = to_acc(rounded);
        }
        if (s.hidden_prev_all)
          s.hidden_prev_all[row * H + u] =
              first ? (s.h0 ? s.h0[b * H + u] : from_acc<T>(A(0))) : s.output[prev_row * H + u];
      } else {
        carry_h[item] = clip_value(carry_h[item], s.state_clip);
        carry_c[item] = clip_value(carry_c[item], s.state_clip);
        for (int g = 0; g < 4; ++g) s.grad_gates_all[row * G + g * H + u] = from_acc<T>(A(0));
        if (s.hidden_prev_all) s.hidden_prev_all[row * H + u] = from_acc<T>(A(0));
      }
    }
    grid_barrier(s.barrier, static_cast<unsigned int>(round + 1));
    for (int64_t i = threadIdx.x; i < n * G; i += blockDim.x) gate_shared[i] = load_coherent(exchange + i);
    __syncthreads();
    // One warp per (row, unit) item; its lanes split the dot product over 4H.
    const int64_t lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize, warps = blockDim.x / warpSize;
    for (int64_t item = warp; item < n * U; item += warps) {
      const int64_t j = item / U, k = item % U;
      if (k >= units) continue;
      const A* da = gate_shared + j * G;
      A sum = A(0);
      for (int64_t g = lane; g < G; g += warpSize) sum += to_acc(weight_shared[k * G + g]) * da[g];
      sum = warp_sum(sum);
      if (lane == 0) carry_h[item] = sum;
    }
    __syncthreads();
  }
  for (int64_t item = threadIdx.x; item < B * U; item += blockDim.x) {
    const int64_t j = item / U, k = item % U, u = u0 + k;
    if (k >= units) continue;
    const int64_t b = s.order[j];
    if (s.grad_h0) s.grad_h0[b * H + u] = from_acc<T>(carry_h[item]);
    if (s.grad_c0) s.grad_c0[b * H + u] = from_acc<T>(carry_c[item]);
  }
}

// ---------------------------------------------------------------------------------------
// Host-side drivers
// ---------------------------------------------------------------------------------------

template <typename T>
inline PersistentPlan lstm_forward_plan(const LstmForwardParams& p) {
  if (p.weight_hr != nullptr || p.out_size != p.hidden) return PersistentPlan{};
  return plan_persistent(lstm_persistent_forward_kernel<T>, p.hidden, persistent_threads(p.env), [&](int64_t units) {
    return lstm_persistent_forward_shared_bytes<T>(p.batch, p.hidden, units);
  });
}

template <typename T>
inline PersistentPlan lstm_backward_plan(const LstmBackwardParams& p) {
  if (p.weight_hr != nullptr || p.out_size != p.hidden) return PersistentPlan{};
  return plan_persistent(lstm_persistent_backward_kernel<T>, p.hidden, persistent_threads(p.env), [&](int64_t units) {
    return lstm_persistent_backward_shared_bytes<T>(p.batch, p.hidden, units);
  });
}

template <typename T>
struct LstmForwardWorkspace {
  T* input_gates;               // [T, B, 4H]
  T* hidden_state;              // [B, P]
  acc_t<T>* cell_state;         // [B, H]
  T* recurrent_gates;           // [B, 4H]
  T* hidden_unprojected;        // [B, H]
  T* projected;                 // [B, P]
  acc_t<T>* hidden_exchange;    // [2, B, H]
  unsigned int* barrier;        // [1]
  size_t bytes;

  LstmForwardWorkspace(const LstmForwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    const int64_t T_ = p.steps, B = p.batch, H = p.hidden, P = p.out_size, G = 4 * H;
    input_gates = c.take<T>(T_ * B * G);
    hidden_state = c.take<T>(B * P);
    cell_state = c.take<acc_t<T>>(B * H);
    recurrent_gates = c.take<T>(B * G);
    hidden_unprojected = c.take<T>(B * H);
    projected = c.take<T>(B * P);
    hidden_exchange = c.take<acc_t<T>>(2 * B * H);
    barrier = c.take<unsigned int>(1);
    bytes = c.offset;
  }
};

template <typename T>
const char* lstm_forward_run(const LstmForwardParams& p) {
  using A = acc_t<T>;
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, H = p.hidden, P = p.out_size, G = 4 * H;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  LstmForwardWorkspace<T> w(p, p.env.workspace);
  const bool project = p.weight_hr != nullptr;
  const PersistentPlan plan = lstm_forward_plan<T>(p);
  bool persistent = false;
  if (const char* error = resolve_strategy(p.env.strategy, plan, B, &persistent)) return error;

  // Input projection of all steps at once: [T*B, I] @ W_ih^T.
  gemm(T_ * B, G, I, p.input, I, false, p.weight_ih, I, true, w.input_gates, G, false);
  const T* bias_ih = static_cast<const T*>(p.bias_ih);
  const T* bias_hh = static_cast<const T*>(p.bias_hh);
  T* gates = p.save ? static_cast<T*>(p.gates) : nullptr;
  T* cells = p.save ? static_cast<T*>(p.cells) : nullptr;
  T* pre_clip = (p.save && p.proj_clip > 0) ? static_cast<T*>(p.hidden_pre_clip) : nullptr;

  if (persistent) {
    gather_rows(static_cast<const T*>(p.h0), w.hidden_exchange, p.order.order, B, H, stream);
    cudaMemsetAsync(w.barrier, 0, sizeof(unsigned int), static_cast<cudaStream_t>(stream));
    LstmPersistentForwardArgs<T> a;
    a.steps = T_;
    a.batch = B;
    a.hidden = H;
    a.units_per_block = plan.units_per_block;
    a.reverse = p.reverse;
    a.order = p.order.order;
    a.active = p.order.active;
    a.input_gates = w.input_gates;
    a.bias_ih = bias_ih;
    a.bias_hh = bias_hh;
    a.weight_hh = static_cast<const T*>(p.weight_hh);
    a.c0 = static_cast<const T*>(p.c0);
    a.hidden_exchange = w.hidden_exchange;
    a.barrier = w.barrier;
    a.output = static_cast<T*>(p.output);
    a.h_n = static_cast<T*>(p.h_n);
    a.c_n = static_cast<T*>(p.c_n);
    a.gates = gates;
    a.cells = cells;
    a.hidden_pre_clip = pre_clip;
    a.cell_clip = A(p.cell_clip);
    a.proj_clip = A(p.proj_clip);
    const cudaError_t error = launch_cooperative(dim3(plan.blocks), dim3(plan.threads), plan.shared_bytes, stream,
                                                 lstm_persistent_forward_kernel<T>, a);
    if (error != cudaSuccess) return cudaGetErrorString(error);
    return launch_error("lstm_persistent_forward_kernel");
  }

  gather_rows(static_cast<const T*>(p.h0), w.hidden_state, p.order.order, B, P, stream);
  gather_rows(static_cast<const T*>(p.c0), w.cell_state, p.order.order, B, H, stream);
  LstmForwardStepArgs<T> s;
  s.batch = B;
  s.hidden = H;
  s.out_size = P;
  s.project = project;
  s.order = p.order.order;
  s.input_gates = w.input_gates;
  s.bias_ih = bias_ih;
  s.bias_hh = bias_hh;
  s.recurrent_gates = w.recurrent_gates;
  s.cell_state = w.cell_state;
  s.hidden_state = w.hidden_state;
  s.hidden_unprojected = w.hidden_unprojected;
  s.output = static_cast<T*>(p.output);
  s.gates = gates;
  s.cells = cells;
  s.hidden_pre_clip = pre_clip;
  s.cell_clip = A(p.cell_clip);
  s.proj_clip = A(p.proj_clip);
  const int64_t width = H > P ? H : P;
  for (int64_t step = 0; step < T_; ++step) {
    const int64_t t = p.reverse ? T_ - 1 - step : step;
    const int64_t n = p.order.active_host[t];
    s.t = t;
    s.active = n;
    // Recurrent part of the running slots: [n, P] @ W_hh^T.
    gemm(n, G, P, w.hidden_state, P, false, p.weight_hh, P, true, w.recurrent_gates, G, false);
    launch_kernel(pointwise_grid(B * width), dim3(kPointwiseThreads), 0, stream, lstm_forward_step_kernel<T>, s);
    if (project && n > 0) {
      gemm(n, P, H, w.hidden_unprojected, H, false, p.weight_hr, H, true, w.projected, P, false);
      launch_kernel(pointwise_grid(n * P), dim3(kPointwiseThreads), 0, stream, lstm_projection_epilogue_kernel<T>,
                    static_cast<const T*>(w.projected), w.hidden_state, static_cast<T*>(p.output), pre_clip,
                    p.order.order, B, P, t, n, A(p.proj_clip));
    }
  }
  scatter_rows(static_cast<const T*>(w.hidden_state), static_cast<T*>(p.h_n), p.order.order, B, P, stream);
  scatter_rows(static_cast<const A*>(w.cell_state), static_cast<T*>(p.c_n), p.order.order, B, H, stream);
  return launch_error("lstm_forward");
}

template <typename T>
struct LstmBackwardWorkspace {
  T* grad_hidden_carry;         // [B, P]
  acc_t<T>* grad_cell_carry;    // [B, H]
  T* grad_pre_clip;             // [B, P]
  T* grad_hidden_unprojected;   // [B, H]
  T* grad_gates;                // [B, 4H]
  T* grad_gates_all;            // [T, B, 4H]
  T* grad_pre_clip_all;         // [T, B, P]
  T* hidden_unprojected_all;    // [T, B, H]
  T* hidden_prev_all;           // [T, B, P]
  acc_t<T>* gate_exchange;      // [2, B, 4H]
  unsigned int* barrier;        // [1]
  size_t bytes;

  LstmBackwardWorkspace(const LstmBackwardParams& p, void* base) {
    WorkspaceCarver c{static_cast<unsigned char*>(base)};
    const int64_t T_ = p.steps, B = p.batch, H = p.hidden, P = p.out_size, G = 4 * H;
    const bool want_weight_hr = p.weight_hr != nullptr && p.grad_weight_hr != nullptr;
    grad_hidden_carry = c.take<T>(B * P);
    grad_cell_carry = c.take<acc_t<T>>(B * H);
    grad_pre_clip = c.take<T>(B * P);
    grad_hidden_unprojected = c.take<T>(B * H);
    grad_gates = c.take<T>(B * G);
    grad_gates_all = c.take<T>(T_ * B * G);
    grad_pre_clip_all = want_weight_hr ? c.take<T>(T_ * B * P) : nullptr;
    hidden_unprojected_all = want_weight_hr ? c.take<T>(T_ * B * H) : nullptr;
    hidden_prev_all = p.grad_weight_hh ? c.take<T>(T_ * B * P) : nullptr;
    gate_exchange = c.take<acc_t<T>>(2 * B * G);
    barrier = c.take<unsigned int>(1);
    bytes = c.offset;
  }
};

template <typename T>
const char* lstm_backward_run(const LstmBackwardParams& p) {
  using A = acc_t<T>;
  const int64_t T_ = p.steps, B = p.batch, I = p.input_size, H = p.hidden, P = p.out_size, G = 4 * H;
  void* stream = p.env.stream;
  const Gemm gemm{p.env.gemm, p.dtype};
  LstmBackwardWorkspace<T> w(p, p.env.workspace);
  const bool project = p.weight_hr != nullptr;
  const PersistentPlan plan = lstm_backward_plan<T>(p);
  bool persistent = false;
  if (const char* error = resolve_strategy(p.env.strategy, plan, B, &persistent)) return error;
  const T* pre_clip = p.proj_clip > 0 ? static_cast<const T*>(p.hidden_pre_clip) : nullptr;

  if (persistent) {
    cudaMemsetAsync(w.barrier, 0, sizeof(unsigned int), static_cast<cudaStream_t>(stream));
    LstmPersistentBackwardArgs<T> a;
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
    a.grad_c_n = static_cast<const T*>(p.grad_c_n);
    a.weight_hh = static_cast<const T*>(p.weight_hh);
    a.h0 = static_cast<const T*>(p.h0);
    a.c0 = static_cast<const T*>(p.c0);
    a.output = static_cast<const T*>(p.output);
    a.gates = static_cast<const T*>(p.gates);
    a.cells = static_cast<const T*>(p.cells);
    a.hidden_pre_clip = pre_clip;
    a.gate_exchange = w.gate_exchange;
    a.barrier = w.barrier;
    a.grad_gates_all = w.grad_gates_all;
    a.hidden_prev_all = w.hidden_prev_all;
    a.grad_h0 = static_cast<T*>(p.grad_h0);
    a.grad_c0 = static_cast<T*>(p.grad_c0);
    a.cell_clip = A(p.cell_clip);
    a.proj_clip = A(p.proj_clip);
    a.state_clip = A(p.state_clip);
    a.gate_clip = A(p.gate_clip);
    const cudaError_t error = launch_cooperative(dim3(plan.blocks), dim3(plan.threads), plan.shared_bytes, stream,
                                                 lstm_persistent_backward_kernel<T>, a);
    if (error != cudaSuccess) return cudaGetErrorString(error);
  } else {
    gather_rows(static_cast<const T*>(p.grad_h_n), w.grad_hidden_carry, p.order.order, B, P, stream);
    gather_rows(static_cast<const T*>(p.grad_c_n), w.grad_cell_carry, p.order.order, B, H, stream);
    LstmBackwardStepArgs<T> s;
    s.batch = B;
    s.hidden = H;
    s.out_size = P;
    s.reverse = p.reverse;
    s.order = p.order.order;
    s.length = p.order.length;
    s.grad_output = static_cast<const T*>(p.grad_output);
    s.hidden_pre_clip = pre_clip;
    s.gates = static_cast<const T*>(p.gates);
    s.cells = static_cast<const T*>(p.cells);
    s.output = static_cast<const T*>(p.output);
    s.h0 = static_cast<const T*>(p.h0);
    s.c0 = static_cast<const T*>(p.c0);
    s.grad_hidden_carry = w.grad_hidden_carry;
    s.grad_pre_clip = w.grad_pre_clip;
    s.grad_pre_clip_all = w.grad_pre_clip_all;
    s.grad_hidden_unprojected = project ? w.grad_hidden_unprojected : w.grad_pre_clip;
    s.grad_cell_carry = w.grad_cell_carry;
    s.grad_gates = w.grad_gates;
    s.grad_gates_all = w.grad_gates_all;
    s.hidden_prev_all = w.hidden_prev_all;
    s.hidden_unprojected_all = w.hidden_unprojected_all;
    s.cell_clip = A(p.cell_clip);
    s.proj_clip = A(p.proj_clip);
    s.state_clip = A(p.state_clip);
    s.gate_clip = A(p.gate_clip);
    const int64_t width = H > P ? H : P;
    for (int64_t step = T_ - 1; step >= 0; --step) {
      const int64_t t = p.reverse ? T_ - 1 - step : step;
      const int64_t n = p.order.active_host[t];
      s.t = t;
      s.active = n;
      launch_kernel(pointwise_grid(B * P), dim3(kPointwiseThreads), 0, stream, lstm_hidden_gradient_kernel<T>, s);
      // Through the projection: dL/dm = dL/dh W_hr, [n, P] @ [P, H].
      if (project) gemm(n, H, P, w.grad_pre_clip, P, false, p.weight_hr, H, false, w.grad_hidden_unprojected, H, false);
      launch_kernel(pointwise_grid(B * width), dim3(kPointwiseThreads), 0, stream, lstm_backward_step_kernel<T>, s);
      // dL/dh_{t-1} of the running slots: [n, 4H] @ W_hh [4H, P].
      gemm(n, P, G, w.grad_gates, G, false, p.weight_hh, P, false, w.grad_hidden_carry, P, false);
    }
    if (p.grad_h0) scatter_rows(static_cast<const T*>(w.grad_hidden_carry), static_cast<T*>(p.grad_h0), p.order.order, B, P, stream);
    if (p.grad_c0) scatter_rows(static_cast<const A*>(w.grad_cell_carry), static_cast<T*>(p.grad_c0), p.order.order, B, H, stream);
  }

  // Whole-sequence GEMMs, only for the gradients asked for.
  const int64_t rows = T_ * B;
  if (p.grad_input) gemm(rows, I, G, w.grad_gates_all, G, false, p.weight_ih, I, false, p.grad_input, I, false);
  if (p.grad_weight_ih) gemm(G, I, rows, w.grad_gates_all, G, true, p.input, I, false, p.grad_weight_ih, I, false);
  if (p.grad_weight_hh) gemm(G, P, rows, w.grad_gates_all, G, true, w.hidden_prev_all, P, false, p.grad_weight_hh, P, false);
  if (p.grad_bias) column_sum(static_cast<const T*>(w.grad_gates_all), static_cast<T*>(p.grad_bias), rows, G, stream);
  if (project && p.grad_weight_hr)
    gemm(P, H, rows, w.grad_pre_clip_all, P, true, w.hidden_unprojected_all, H, false, p.grad_weight_hr, H, false);
  return launch_error("lstm_backward");
}

}  // namespace cuda
}  // namespace rnntl
