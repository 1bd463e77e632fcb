// The persistent strategy's kernels, one skeleton for every cell: one cooperative launch
// per sequence; block b owns hidden units [b*U, b*U+U) and keeps their rows of W_hh
// (forward) or columns of W_hh (backward) in shared memory for all steps; blocks exchange
// h_t (forward) or dL/d(W_hh h_{t-1}) (backward) through global memory, one grid barrier
// per step. No projection (P == H). What differs between cells is the math of one
// (row, unit) item, supplied by a cell policy (LstmCell in lstm_kernels.cuh, GruCell in
// gru_kernels.cuh):
//   kGates                      G / H
//   ForwardArgs<T>, BackwardArgs<T>  the kernels' argument structs
//   kForwardUnitState           acc_t words per (row, unit) the forward keeps across steps
//                               (LSTM: the cell state); when 1:
//     initial_unit_state(s, j, u, owned) and final_unit_state(s, b, u, state)
//   forward_unit(s, row, compact, u, recurrent[kGates], hidden_prev_u, state*) -> T
//                               h_t of a running item from the warp-summed W_hh h_{t-1};
//                               writes the saved reserve (row: [T, B, *] tensors; compact:
//                               the [N, *] work buffers, device_common.cuh)
//   forward_finished(s, row, u) zeros of a finished row's reserve
//   kCellCarry                  the backward carries a second gradient across steps
//                               (LSTM: dL/dc_t); when true:
//     initial_cell_carry(s, b, u, owned), final_cell_carry(s, b, u, carry) and
//     backward_finished(s, cell_carry&)  a finished row: clamps the cell's carry (a padded
//                               step has no compact row, so there is nothing to zero)
//   kReadsPreviousHidden        backward_unit needs h_{t-1}
//   backward_unit(s, row, compact, prev_row, first, b, u, dh, h_prev, cell_carry&, direct&,
//                 exchange_row)
//                               gate gradients of a running item: into the compact rows of
//                               the whole-sequence GEMMs and the exchange (row j of it);
//                               `direct` gets the part of dL/dh_{t-1} that bypasses W_hh
//                               (GRU: z * dL/dh~_t; zoneout: + d * dL/dh_t; else 0), to which
//                               phase 2 adds W_hh^T dL/da
// Recurrent dropout (args.recurrent_mask, [B, H] or null): the forward stages h_{t-1}
// masked for the products, and the backward's phase 2 masks W_hh^T dL/da before adding
// the direct part; phase 1 writes the masked h_{t-1} for dW_hh.
// Shapes: T steps, B batch, H hidden, G = kGates * H, U = units_per_block.
#pragma once

#include "device_common.cuh"

namespace rnntl {
namespace cuda {

// Shared memory: h_{t-1} of all running rows [B][H] and the unit state [B][U] of the
// block's items in acc_t<T>, then the block's rows of W_hh, [kGates * U][H].
template <typename Cell, typename T>
inline size_t persistent_forward_shared_bytes(int64_t batch, int64_t hidden, int64_t units) {
  return size_t(batch * hidden + batch * units * Cell::kForwardUnitState) * sizeof(acc_t<T>) +
         size_t(hidden * Cell::kGates * units) * sizeof(T);
}

template <typename Cell, typename T>
__global__ void persistent_forward_kernel(typename Cell::template ForwardArgs<T> s) {
  using A = acc_t<T>;
  constexpr int kGates = Cell::kGates;
  RNNTL_DYNAMIC_SHARED(unsigned char, shared);
  const int64_t B = s.batch, H = s.hidden, U = s.units_per_block, GU = kGates * U;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int64_t units = H - u0 < U ? H - u0 : U;
  A* hidden_shared = reinterpret_cast<A*>(shared);  // [B][H]
  A* unit_state = hidden_shared + B * H;            // [B][U] when kForwardUnitState
  T* weight_shared = reinterpret_cast<T*>(unit_state + B * U * Cell::kForwardUnitState);  // [GU][H]

  // The block's rows of W_hh, gate-major: row (g, k) is W_hh row g*H + u0 + k (p fastest,
  // so the lanes of a warp read consecutive words).
  for (int64_t i = threadIdx.x; i < GU * H; i += blockDim.x) {
    const int64_t r = i / H, p = i % H, g = r / U, k = r % U;
    weight_shared[i] = k < units ? s.weight_hh[(g * H + u0 + k) * H + p] : from_acc<T>(A(0));
  }
  if constexpr (Cell::kForwardUnitState > 0) {
    for (int64_t i = threadIdx.x; i < B * U; i += blockDim.x) {
      const int64_t j = i / U, k = i % U;
      unit_state[i] = Cell::initial_unit_state(s, j, u0 + k, k < units);
    }
  }

  for (int64_t step = 0; step < s.steps; ++step) {
    const int64_t t = s.reverse ? s.steps - 1 - step : step;
    const int64_t n = s.active[t];
    const A* hidden_prev = s.hidden_exchange + (step & 1) * B * H;
    A* hidden_next = s.hidden_exchange + ((step + 1) & 1) * B * H;
    // The products read mask * h_{t-1} (recurrent dropout); the cell's own h_{t-1} is not masked.
    for (int64_t i = threadIdx.x; i < n * H; i += blockDim.x) {
      const A h = load_coherent(hidden_prev + i);
      hidden_shared[i] =
          s.recurrent_mask ? to_acc(masked_value(s.recurrent_mask, s.order[i / H], H, i % H, from_acc<T>(h))) : h;
    }
    __syncthreads();
    // One warp per (row, unit) item; its lanes split the dot products over H.
    const int64_t lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize, warps = blockDim.x / warpSize;
    for (int64_t item = warp; item < B * U; item += warps) {
      const int64_t j = item / U, k = item % U, u = u0 + k;
      if (k >= units) continue;
      const int64_t row = t * B + s.order[j];
      if (j < n) {
        const int64_t compact = s.first_row[t] + j;
        A recurrent[kGates] = {};
        const A* h = hidden_shared + j * H;
        for (int64_t p = lane; p < H; p += warpSize) {
          const A hp = h[p];
          for (int g = 0; g < kGates; ++g) recurrent[g] += to_acc(weight_shared[(g * U + k) * H + p]) * hp;
        }
        for (int g = 0; g < kGates; ++g) recurrent[g] = warp_sum(recurrent[g]);
        if (lane != 0) continue;
        // Rounded to T as the stepwise strategy's hidden state is.
        const A h_prev_u = s.recurrent_mask ? load_coherent(hidden_prev + j * H + u) : h[u];
        const T h_out = Cell::forward_unit(s, row, compact, u, recurrent, h_prev_u, unit_state + j * U + k);
        hidden_next[j * H + u] = to_acc(h_out);
        s.output[row * H + u] = h_out;
      } else {
        if (lane != 0) continue;
        hidden_next[j * H + u] = hidden_prev[j * H + u];  // this block's own unit: no exchange
        s.output[row * H + u] = from_acc<T>(A(0));
        Cell::forward_finished(s, row, u);
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
    if constexpr (Cell::kForwardUnitState > 0) Cell::final_unit_state(s, b, u, unit_state[item]);
  }
}

// Shared memory: dL/d(W_hh h) of the running rows [B][G], the block's carry dL/dh [B][U]
// and, when kCellCarry, the cell's carry [B][U] (acc_t<T>), then the block's columns of
// W_hh, [G][U].
template <typename Cell, typename T>
inline size_t persistent_backward_shared_bytes(int64_t batch, int64_t hidden, int64_t units) {
  return size_t(batch * Cell::kGates * hidden + (Cell::kCellCarry ? 2 : 1) * batch * units) * sizeof(acc_t<T>) +
         size_t(Cell::kGates * hidden * units) * sizeof(T);
}

// Per step: phase 1 (block-local) turns the block's dL/dh slices (and the cell's carry)
// into gate gradients for its units and publishes them; grid barrier; phase 2 reads every
// unit's gradients and forms dL/dh_{t-1} = W_hh^T dL/da (+ the direct part) for the
// block's columns, which are its own units again (P == H), so the next phase 1 needs
// nothing from other blocks.
template <typename Cell, typename T>
__global__ void persistent_backward_kernel(typename Cell::template BackwardArgs<T> s) {
  using A = acc_t<T>;
  RNNTL_DYNAMIC_SHARED(unsigned char, shared);
  const int64_t B = s.batch, H = s.hidden, G = Cell::kGates * H, U = s.units_per_block;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int64_t units = H - u0 < U ? H - u0 : U;
  A* gate_shared = reinterpret_cast<A*>(shared);  // [B][G]
  // carry: dL/dh_t, overwritten in phase 1 by the direct part of dL/dh_{t-1}, to which
  // phase 2 adds the product's part.
  A* carry = gate_shared + B * G;                 // [B][U]
  A* cell_carry = carry + B * U;                  // [B][U] when kCellCarry
  T* weight_shared = reinterpret_cast<T*>(cell_carry + (Cell::kCellCarry ? B * U : 0));  // [U][G]

  // The block's columns of W_hh, unit-major: row k is column u0 + k (g fastest, so the
  // lanes of a warp read consecutive words).
  for (int64_t i = threadIdx.x; i < U * G; i += blockDim.x) {
    const int64_t k = i / G, g = i % G;
    weight_shared[i] = k < units ? s.weight_hh[g * H + u0 + k] : from_acc<T>(A(0));
  }
  for (int64_t i = threadIdx.x; i < B * U; i += blockDim.x) {
    const int64_t j = i / U, k = i % U, b = s.order[j];
    carry[i] = (k < units && s.grad_h_n) ? to_acc(s.grad_h_n[b * H + u0 + k]) : A(0);
    if constexpr (Cell::kCellCarry) cell_carry[i] = Cell::initial_cell_carry(s, b, u0 + k, k < units);
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
        const int64_t compact = s.first_row[t] + j;
        const bool first = s.reverse ? t == s.length[b] - 1 : t == 0;
        const int64_t prev_row = (s.reverse ? t + 1 : t - 1) * B + b;
        const auto hidden_prev = [&] {
          return first ? (s.h0 ? s.h0[b * H + u] : from_acc<T>(A(0))) : s.output[prev_row * H + u];
        };
        const T h_prev = Cell::kReadsPreviousHidden ? hidden_prev() : from_acc<T>(A(0));
        A dh = carry[item];
        if (s.grad_output) dh += to_acc(s.grad_output[row * H + u]);
        dh = clip_value(dh, s.state_clip);
        A unused = A(0);
        A& cell_value = Cell::kCellCarry ? cell_carry[item] : unused;
        Cell::backward_unit(s, row, compact, prev_row, first, b, u, dh, h_prev, cell_value, carry[item],
                            exchange + j * G);
        if (s.hidden_prev_all)
          s.hidden_prev_all[compact * H + u] =
              masked_value(s.recurrent_mask, b, H, u, Cell::kReadsPreviousHidden ? h_prev : hidden_prev());
      } else {
        carry[item] = clip_value(carry[item], s.state_clip);
        if constexpr (Cell::kCellCarry) Cell::backward_finished(s, cell_carry[item]);
      }
    }
    grid_barrier(s.barrier, static_cast<unsigned int>(round + 1));
    for (int64_t i = threadIdx.x; i < n * G; i += blockDim.x) gate_shared[i] = load_coherent(exchange + i);
    __syncthreads();
    // One warp per (row, unit) item; its lanes split the dot product over G.
    const int64_t lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize, warps = blockDim.x / warpSize;
    for (int64_t item = warp; item < n * U; item += warps) {
      const int64_t j = item / U, k = item % U;
      if (k >= units) continue;
      const A* da = gate_shared + j * G;
      A sum = A(0);
      for (int64_t g = lane; g < G; g += warpSize) sum += to_acc(weight_shared[k * G + g]) * da[g];
      sum = warp_sum(sum);
      if (lane != 0) continue;
      if (s.recurrent_mask) sum *= to_acc(s.recurrent_mask[s.order[j] * H + u0 + k]);  // the product's part only
      carry[item] += sum;  // the direct part is there
    }
    __syncthreads();
  }
  for (int64_t item = threadIdx.x; item < B * U; item += blockDim.x) {
    const int64_t j = item / U, k = item % U, u = u0 + k;
    if (k >= units) continue;
    const int64_t b = s.order[j];
    if (s.grad_h0) s.grad_h0[b * H + u] = from_acc<T>(carry[item]);
    if constexpr (Cell::kCellCarry) Cell::final_cell_carry(s, b, u, cell_carry[item]);
  }
}

}  // namespace cuda
}  // namespace rnntl
