// Device code shared by the LSTM and GRU kernels: the part of the kernel arguments every
// cell has, the grid-stride loop, moving rows between batch order and slot order, column
// sums (bias gradients) and warp sums. Their launches are in launch_common.cuh.
// Slot-major buffers: slot j holds batch row order[j] (rows sorted by length, longest
// first), so the rows running at step t are slots [0, active[t]). Whole-sequence work
// buffers ([N, W]) hold compact rows (rnntl/host_order.h): (t, slot j) is row
// first_row[t] + j, and padded steps have no row, so they enter no product.
#pragma once

#include "../cell_math.h"
#include "../cuda_compat.h"
#include "../params.h"

namespace rnntl {
namespace cuda {

// The kernels' arguments are layered like the params (rnntl/params.h): SequenceArgs is
// what every kernel reads, ForwardArgs / BackwardArgs what every cell's forward /
// backward kernels (stepwise and persistent alike) read, and each cell's args
// (LstmForwardArgs, ...) add their own. Filled once per run from the params and the
// workspace (fill_*_args in launch_common.cuh); the stepwise loop only sets t and
// running before each launch. G = gates * H.
struct SequenceArgs {
  int64_t steps, batch, hidden, out_size;  // T, B, H, P
  bool reverse;
  int64_t units_per_block;      // persistent: hidden units per block
  int64_t t, running;           // stepwise: this launch's step and its running rows
  const int64_t* order;         // [B] batch row of slot j
  const int64_t* length;        // [B] by batch row
  const int64_t* active;        // [T] running rows per step
  const int64_t* first_row;     // [T + 1] compact row of (t, slot 0)
};

template <typename T>
struct ForwardArgs : SequenceArgs {
  const T* input_gates;         // [N, G] compact rows: W_ih x (the cells add the biases)
  const T* bias_ih;             // [G] or null
  const T* bias_hh;             // [G] or null
  const T* weight_hh;           // [G, P]
  const T* recurrent_gates;     // [B, G] slot-major W_hh h_{t-1} (stepwise)
  T* hidden_state;              // [B, P] slot-major h (stepwise)
  acc_t<T>* hidden_exchange;    // [2, B, H] slot-major h by step parity; [0] holds h0 at launch (persistent)
  unsigned int* barrier;        // one counter, zero at launch (persistent)
  T* output;                    // [T, B, P]
  T* h_n;                       // [B, P]
  T* gates;                     // [T, B, G] activations, or null (not saving)
  const T* recurrent_mask;      // [B, P] batch order, or null: the products read mask * h_{t-1}
};

template <typename T>
struct BackwardArgs : SequenceArgs {
  const T* grad_output;         // [T, B, P] or null (zeros)
  const T* grad_h_n;            // [B, P] or null
  const T* weight_hh;           // [G, P]
  const T* h0;                  // [B, P] or null
  const T* output;              // [T, B, P] forward output
  const T* gates;               // [T, B, G] saved activations
  T* grad_hidden_carry;         // [B, P] slot-major dL/dh_t from step t+1 (stepwise)
  acc_t<T>* gate_exchange;      // [2, B, G] slot-major dL/d(W_hh h) by round parity (persistent)
  unsigned int* barrier;        // one counter, zero at launch (persistent)
  T* hidden_prev_all;           // [N, P] compact rows: h_{t-1}, or null (no dW_hh)
  T* grad_h0;                   // [B, P] or null
  const T* recurrent_mask;      // [B, P] batch order, or null: masks the product's part of
                                // dL/dh_{t-1} and the h_{t-1} of dW_hh
  acc_t<T> state_clip, gate_clip;
};

// v * mask[b, k], rounded to T as the reference's h_{t-1} * mask is; v itself without a mask.
//   mask: [B, width] batch order, or null.
template <typename T>
RNNTL_DEVICE T masked_value(const T* mask, int64_t b, int64_t width, int64_t k, T v) {
  return mask ? from_acc<T>(to_acc(v) * to_acc(mask[b * width + k])) : v;
}

#define RNNTL_GRID_STRIDE_LOOP(index, total)                                                     \
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < (total);        \
       index += int64_t(gridDim.x) * blockDim.x)

// dst[j, k] = src[order[j], k] (slot order from batch order), or 0 where src is null.
//   src: [rows, width] in batch order, or null;  dst: [rows, width] slot-major.
template <typename Src, typename Dst>
__global__ void gather_rows_kernel(const Src* src, Dst* dst, const int64_t* order, int64_t rows, int64_t width) {
  RNNTL_GRID_STRIDE_LOOP(index, rows * width) {
    const int64_t j = index / width, k = index % width;
    dst[index] = src ? from_acc<Dst>(to_acc(src[order[j] * width + k])) : from_acc<Dst>(0);
  }
}

// dst[r, k] = src[t * B + b, k] for every compact row r = (t, slot[b]): the valid rows of
// a whole-sequence input, the padded ones never read.
//   src: [T, B, width];  dst: [N, width] compact rows.
template <typename T>
__global__ void compact_from_padded_kernel(const T* src, T* dst, const int64_t* slot, const int64_t* active,
                                           const int64_t* first_row, int64_t steps, int64_t batch, int64_t width) {
  RNNTL_GRID_STRIDE_LOOP(index, steps * batch * width) {
    const int64_t t = index / (batch * width), b = (index / width) % batch, k = index % width;
    const int64_t j = slot[b];
    if (j < active[t]) dst[(first_row[t] + j) * width + k] = src[index];
  }
}

// dst[t, b, k] = src[first_row[t] + slot[b], k] at valid steps, 0 at padded ones.
//   src: [N, width] compact rows;  dst: [T, B, width].
template <typename T>
__global__ void padded_from_compact_kernel(const T* src, T* dst, const int64_t* slot, const int64_t* active,
                                           const int64_t* first_row, int64_t steps, int64_t batch, int64_t width) {
  RNNTL_GRID_STRIDE_LOOP(index, steps * batch * width) {
    const int64_t t = index / (batch * width), b = (index / width) % batch, k = index % width;
    const int64_t j = slot[b];
    dst[index] = j < active[t] ? src[(first_row[t] + j) * width + k] : from_acc<T>(acc_t<T>(0));
  }
}

// dst[order[j], k] = src[j, k] (batch order from slot order).
//   src: [rows, width] slot-major;  dst: [rows, width] batch order.
template <typename Src, typename Dst>
__global__ void scatter_rows_kernel(const Src* src, Dst* dst, const int64_t* order, int64_t rows, int64_t width) {
  RNNTL_GRID_STRIDE_LOOP(index, rows * width) {
    const int64_t j = index / width, k = index % width;
    dst[order[j] * width + k] = from_acc<Dst>(to_acc(src[index]));
  }
}

// dst[j, k] = (dst[j, k] if accumulate) + mask[order[j], k] * src[j, k] for the first `rows`
// slots: the masked copy of h_{t-1} that enters the forward's product (accumulate false)
// and the masked product part of dL/dh_{t-1} (the GRU adds it to its direct part).
//   src, dst: [rows, width] slot-major (src may be dst);  mask: [B, width] batch order.
template <typename T>
__global__ void masked_rows_kernel(const T* src, T* dst, const T* mask, const int64_t* order, int64_t rows,
                                   int64_t width, bool accumulate) {
  RNNTL_GRID_STRIDE_LOOP(index, rows * width) {
    const int64_t j = index / width, k = index % width;
    const acc_t<T> v = to_acc(src[index]) * to_acc(mask[order[j] * width + k]);
    dst[index] = accumulate ? from_acc<T>(to_acc(dst[index]) + to_acc(from_acc<T>(v))) : from_acc<T>(v);
  }
}

// out[c] = sum_r in[r, c], one warp per column (lanes split the rows, then a shuffle
// reduction), float accumulation.  in: [rows, cols];  out: [cols].
template <typename T>
__global__ void column_sum_kernel(const T* in, T* out, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  const int64_t warps_per_block = blockDim.x / warpSize;
  const int64_t lane = threadIdx.x % warpSize;
  for (int64_t c = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / warpSize; c < cols;
       c += int64_t(gridDim.x) * warps_per_block) {
    A sum = A(0);
    for (int64_t r = lane; r < rows; r += warpSize) sum += to_acc(in[r * cols + c]);
    for (int offset = warpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[c] = from_acc<T>(sum);
  }
}

// Sum of v over the 32 lanes of a warp, every lane gets it (all lanes must call).
template <typename A>
RNNTL_DEVICE A warp_sum(A v) {
  for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace cuda
}  // namespace rnntl
