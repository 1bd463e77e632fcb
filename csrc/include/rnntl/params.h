// Plain-old-data parameter structs that cross the boundary between the torch-facing
// CUDA glue (csrc/cuda/*_cuda.cpp, compiled against torch) and the kernels
// (csrc/cuda/*.cu and csrc/include/rnntl/cuda/*.cuh, compiled without torch).
// Tensors travel as untyped pointers plus one dtype tag; every pointer is documented
// with its shape. Device pointers unless marked "host".
//
// Layout conventions as in csrc/ops.cpp: time-major [T, B, *], one layer and one
// direction; G = 4H (LSTM, gates i,f,g,o) or 3H (GRU, gates r,z,n); P = proj_size or H.
// "Slot" j is the j-th row in SequenceOrder order (longest first), so the rows still
// running at step t are slots [0, active[t]).
#pragma once

#include <cstddef>
#include <cstdint>

namespace rnntl {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// How a sequence is run on the GPU.
//   kStepwise:   per step one cuBLAS GEMM for the recurrent part + one fused pointwise
//                kernel (cuDNN's "standard" algorithm); any size.
//   kPersistent: one launch for the whole sequence; each block keeps its slice of W_hh in
//                shared memory and blocks meet at a grid-wide barrier between steps
//                (cuDNN's "persistent" algorithm); small batches and hidden sizes only.
//   kAuto:       persistent where it is supported and expected to win, else stepwise.
enum class Strategy : int { kAuto = 0, kStepwise = 1, kPersistent = 2 };

// One GEMM the kernels need but do not implement: C = op(A) @ op(B) (+ C if accumulate),
// all row-major with leading dimensions, all of the op's dtype, float accumulation.
//   A: [m, k] (or stored [k, m] when a_transposed);  B: [k, n] (or stored [n, k] when
//   b_transposed);  C: [m, n].
struct GemmCall {
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  bool a_transposed;
  const void* b;
  int64_t ldb;
  bool b_transposed;
  void* c;
  int64_t ldc;
  bool accumulate;
};

// The glue runs GEMMs through cuBLAS (via ATen) on the current stream; the CPU emulation
// of the tests through a loop kernel.
struct GemmHook {
  void (*run)(void* context, DType dtype, const GemmCall& call);
  void* context;
};

// Batch order of a sequence and its compact rows (rnntl/host_order.h, which fills it).
struct OrderView {
  const int64_t* order;        // [B]  device: batch row of slot j
  const int64_t* length;       // [B]  device: length of batch row b (by row, not slot)
  const int64_t* active;       // [T]  device: rows with length > t
  const int64_t* first_row;    // [T + 1] device: compact row of (t, slot 0); first_row[T] = N
  const int64_t* slot;         // [B]  device: slot of batch row b
  const int64_t* active_host;  // [T]  host copy of active (the stepwise loop sizes GEMMs by it)
  int64_t valid_rows;          // N = sum of the lengths: rows of the whole-sequence products
  bool compact_is_padded;      // compact row == padded row t * B + b (every row runs all T
                               // steps, in batch order): the input needs no gather
};

// Launch environment shared by all entry points.
struct LaunchEnv {
  void* stream;            // cudaStream_t
  GemmHook gemm;
  void* workspace;         // *_workspace_bytes(params) bytes, any content
  Strategy strategy;
  int threads_per_block;   // persistent kernels and the layer-norm row kernels; 0 = default (256, 128)
};

// The parameters are layered so that each field is declared once: SequenceParams holds
// what every op reads, ForwardParams / BackwardParams what every forward / backward adds,
// LstmParams what the LSTM forward and backward share, and the four op structs the rest.

// Every op: the run's sizes and direction, the inputs both passes read, batch order, launch.
struct SequenceParams {
  DType dtype;
  int64_t steps, batch, input_size, hidden;  // T, B, I, H
  int64_t out_size;        // P: proj_size or H (always H for the GRU)
  bool reverse;
  const void* input;       // [T, B, I]
  const void* weight_ih;   // [G, I]
  const void* weight_hh;   // [G, P]
  const void* h0;          // [B, P] or null (zeros)
  const void* recurrent_mask;  // [B, P] or null (no mask): every step's W_hh product reads
                               // mask * h_{t-1} (recurrent dropout, docs/semantics.md section 10)
  OrderView order;
  LaunchEnv env;
};

// Every forward: biases, results and the saved gate activations.
struct ForwardParams : SequenceParams {
  bool save;               // write the reserve (gates and the cell's saved tensors) for backward
  const void* bias_ih;     // [G] or null
  const void* bias_hh;     // [G] or null
  void* output;            // [T, B, P]
  void* h_n;               // [B, P]
  void* gates;             // [T, B, G] gate activations; only when save
};

// Every backward: gradient clips, incoming gradients, the forward's results and reserve,
// and the gradients every cell has. Results: null = not wanted (its GEMM is skipped).
struct BackwardParams : SequenceParams {
  double state_clip;       // clamp of dL/dh_t (LSTM: and dL/dc_t) (docs/semantics.md); <= 0: off
  double gate_clip;        // clamp of dL/d(gate pre-activations); <= 0: off
  const void* grad_output; // [T, B, P] or null (zeros)
  const void* grad_h_n;    // [B, P] or null (zeros)
  const void* output;      // [T, B, P] forward output
  const void* gates;       // [T, B, G] saved activations
  void* grad_input;        // [T, B, I]
  void* grad_weight_ih;    // [G, I]
  void* grad_weight_hh;    // [G, P]
  void* grad_h0;           // [B, P]
};

// What the LSTM forward and backward share beyond SequenceParams (G = 4H, gates i,f,g,o).
struct LstmParams {
  double cell_clip;        // <= 0: off
  double proj_clip;        // <= 0: off
  const void* weight_hr;   // [P, H] or null (no projection)
  const void* c0;          // [B, H] or null (zeros)
  // Zoneout keep weights (docs/semantics.md section 10), every entry in [0, 1], or null:
  // the carried h_t = d * h_{t-1} + (1 - d) * h~_t (h~_t after W_hr and proj_clip) and
  // c_t = e * c_{t-1} + (1 - e) * c~_t (c~_t after cell_clip; h~_t reads c~_t).
  const void* zoneout_h;   // [T, B, P] d
  const void* zoneout_c;   // [T, B, H] e
};

struct LstmForwardParams : ForwardParams, LstmParams {
  void* c_n;               // [B, H]
  void* cells;             // [T, B, H]  cell before cell_clip; only when save
  void* hidden_pre_clip;   // [T, B, P]  hidden before proj_clip; only when save && proj_clip
  void* carried_cells;     // [T, B, H]  the zoned c_t (zeros at padded steps); only when save && zoneout_c
};

struct LstmBackwardParams : BackwardParams, LstmParams {
  const void* grad_c_n;         // [B, H] or null
  const void* cells;            // [T, B, H]  saved cells before clip
  const void* hidden_pre_clip;  // [T, B, P] or null (only with proj_clip)
  const void* carried_cells;    // [T, B, H] the forward's zoned c_t, or null (only with zoneout_c)
  void* grad_bias;              // [4H] (bias_ih and bias_hh have the same gradient)
  void* grad_weight_hr;         // [P, H]
  void* grad_c0;                // [B, H]
};

// GRU ("reset after"): G = 3H, gates r,z,n; P = H.
struct GruParams {
  const void* zoneout;     // [T, B, H] keep weights d in [0, 1], or null: h_t = d * h_{t-1} + (1 - d) * h~_t
};

struct GruForwardParams : ForwardParams, GruParams {
  void* hidden_n;          // [T, B, H]  W_hn h_{t-1} + b_hn; only when save
};

struct GruBackwardParams : BackwardParams, GruParams {
  const void* hidden_n;    // [T, B, H]
  void* grad_bias_ih;      // [3H]
  void* grad_bias_hh;      // [3H]
};

// Elman RNN (docs/semantics.md section 10): G = H, P = H. ForwardParams::gates /
// BackwardParams::gates is the CPU op's `activations` reserve f(a_t): [T, B, H] as T*B rows,
// the N compact rows first, then zeros; written only when save and zoneout, read only with
// zoneout (without it f(a_t) is the output).
struct RnnParams {
  bool relu;               // f = relu, else tanh
  const void* zoneout;     // [T, B, H] keep weights d in [0, 1], or null (no zoneout)
};

struct RnnForwardParams : ForwardParams, RnnParams {};

struct RnnBackwardParams : BackwardParams, RnnParams {
  void* grad_bias_ih;      // [H]
  void* grad_bias_hh;      // [H]
};

// Layer-normalised LSTM and GRU (docs/semantics.md section 10; rnntl/cuda/layer_norm_launch.cuh):
// the gains of LN(W_ih x) and LN(W_hh (m * h_{t-1})) over the whole G row, and the reserve
// both passes share. The reserve is padded [T, B, *] (zeros at padded steps); the CPU op
// keeps compact rows there (docs/cpu.md), same shapes.
struct LayerNormParams {
  const void* gain_ih;     // [G] g_ih
  const void* gain_hh;     // [G] g_hh
};

// LSTM (G = 4H): a = LN(W_ih x) g_ih + b_ih + LN(W_hh (m * h)) g_hh + b_hh;
// h~ = o * tanh(LN(c~) g_c + b_c). ForwardParams::gates holds i, f, g, o.
struct LayerNormLstmParams : LstmParams, LayerNormParams {
  const void* cell_gain;   // [H] g_c, or null (1)
  const void* cell_bias;   // [H] b_c, or null (0)
};

struct LayerNormLstmForwardParams : ForwardParams, LayerNormLstmParams {
  void* c_n;               // [B, H]
  void* normalized;        // [T, B, 8H] LN(W_ih x) | LN(W_hh (m * h)); only when save
  void* cells;             // [T, B, 3H] c~ before cell_clip | LN(c~ after clip) | carried c_t; only when save
  void* inverse_std;       // [T, B, 3]  1/std of the two products and of c~; only when save
  void* hidden_pre_clip;   // [T, B, P]  h~ before proj_clip; only when save && proj_clip
};

struct LayerNormLstmBackwardParams : BackwardParams, LayerNormLstmParams {
  const void* grad_c_n;         // [B, H] or null
  const void* normalized;       // [T, B, 8H]
  const void* cells;            // [T, B, 3H]
  const void* inverse_std;      // [T, B, 3]
  const void* hidden_pre_clip;  // [T, B, P] or null (only with proj_clip)
  void* grad_bias;              // [4H] (bias_ih and bias_hh have the same gradient)
  void* grad_weight_hr;         // [P, H]
  void* grad_c0;                // [B, H]
  void* grad_gain_ih;           // [4H]
  void* grad_gain_hh;           // [4H]
  void* grad_cell_gain;         // [H]
  void* grad_cell_bias;         // [H]
};

// GRU (G = 3H, P = H): gx = LN(W_ih x) g_ih + b_ih, gh = LN(W_hh (m * h)) g_hh + b_hh in
// place of section 2's products. ForwardParams::gates holds r, z, n.
struct LayerNormGruForwardParams : ForwardParams, GruParams, LayerNormParams {
  void* normalized;        // [T, B, 6H] LN(W_ih x) | LN(W_hh (m * h)); only when save
  void* inverse_std;       // [T, B, 2]; only when save
};

struct LayerNormGruBackwardParams : BackwardParams, GruParams, LayerNormParams {
  const void* bias_hh;     // [3H] or null: the backward of r * gh_n reads gh_n
  const void* normalized;  // [T, B, 6H]
  const void* inverse_std; // [T, B, 2]
  void* grad_bias_ih;      // [3H]
  void* grad_bias_hh;      // [3H]
  void* grad_gain_ih;      // [3H]
  void* grad_gain_hh;      // [3H]
};

}  // namespace rnntl
