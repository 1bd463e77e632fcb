// Runs the real CUDA kernel sources (csrc/include/rnntl/cuda/*.cuh) on the CPU through
// cuda_emulation.h (this folder). Built by g++ (no nvcc, no torch) as
//   * a shared library with a C entry point per cell, called from
//     tests/test_cuda_emulation.py through ctypes on small shapes;
//   * with -DRNNTL_EMULATION_MAIN and -fsanitize=thread, a program that runs a fixed set
//     of cases (both strategies) so that ThreadSanitizer can look for races.
// The GEMMs that cuBLAS does on the GPU are a plain loop kernel here, launched through
// the same emulated launch.
#include <rnntl/cuda/gru_launch.cuh>
#include <rnntl/cuda/layer_norm_launch.cuh>
#include <rnntl/cuda/lstm_launch.cuh>
#include <rnntl/cuda/rnn_launch.cuh>
#include <rnntl/host_order.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace rnntl {
namespace emulation {

using cuda::acc_t;
using cuda::from_acc;
using cuda::to_acc;

// C = op(A) @ op(B) (+ C), one output element per thread, accumulation in acc_t<T>.
template <typename T>
__global__ void gemm_loop_kernel(GemmCall c) {
  using A = acc_t<T>;
  const T* a = static_cast<const T*>(c.a);
  const T* b = static_cast<const T*>(c.b);
  T* out = static_cast<T*>(c.c);
  RNNTL_GRID_STRIDE_LOOP(index, c.m * c.n) {
    const int64_t i = index / c.n, j = index % c.n;
    A sum = c.accumulate ? to_acc(out[i * c.ldc + j]) : A(0);
    for (int64_t k = 0; k < c.k; ++k) {
      const A av = to_acc(c.a_transposed ? a[k * c.lda + i] : a[i * c.lda + k]);
      const A bv = to_acc(c.b_transposed ? b[j * c.ldb + k] : b[k * c.ldb + j]);
      sum += av * bv;
    }
    out[i * c.ldc + j] = from_acc<T>(sum);
  }
}

void run_gemm(void*, DType dtype, const GemmCall& call) {
  const dim3 grid = cuda::pointwise_grid(call.m * call.n);
  const dim3 block(cuda::kPointwiseThreads);
  switch (dtype) {
    case DType::kFloat64: cuda::launch_kernel(grid, block, 0, nullptr, gemm_loop_kernel<double>, call); break;
    case DType::kFloat16: cuda::launch_kernel(grid, block, 0, nullptr, gemm_loop_kernel<__half>, call); break;
    case DType::kBFloat16: cuda::launch_kernel(grid, block, 0, nullptr, gemm_loop_kernel<__nv_bfloat16>, call); break;
    default: cuda::launch_kernel(grid, block, 0, nullptr, gemm_loop_kernel<float>, call); break;
  }
}

struct Setup {
  HostOrder order;
  LaunchEnv env;
  std::vector<unsigned char> workspace;
  Setup(const int64_t* lengths, int64_t steps, int64_t batch, int strategy, int threads, int sms)
      : order(lengths, steps, batch) {
    env.stream = nullptr;
    env.gemm = GemmHook{&run_gemm, nullptr};
    env.workspace = nullptr;
    env.strategy = static_cast<Strategy>(strategy);
    env.threads_per_block = threads;
    // Emulated device with `sms` multiprocessors: the persistent plan spreads H over them.
    if (sms > 0) emu::device_config().multiprocessors = sms;
  }
  // "Device" memory is host memory in the emulation.
  OrderView view() const { return order.view(order.packed.data()); }
  void* allocate(size_t bytes) {
    workspace.assign(bytes, 0xA5);  // garbage, as cudaMalloc gives
    return workspace.data();
  }
  // The part of every op's params that the forward and the backward share.
  void fill(SequenceParams& p, int dtype, int64_t input_size, int64_t hidden, int64_t out_size, int reverse,
            const void* input, const void* weight_ih, const void* weight_hh, const void* h0,
            const void* recurrent_mask) const {
    p.dtype = static_cast<DType>(dtype);
    p.steps = order.steps;
    p.batch = order.batch;
    p.input_size = input_size;
    p.hidden = hidden;
    p.out_size = out_size;
    p.reverse = reverse != 0;
    p.input = input;
    p.weight_ih = weight_ih;
    p.weight_hh = weight_hh;
    p.h0 = h0;
    p.recurrent_mask = recurrent_mask;
    p.order = view();
    p.env = env;
  }
  // What every forward adds; the forward always saves its reserve here.
  void fill_forward(ForwardParams& p, const void* bias_ih, const void* bias_hh, void* output, void* h_n,
                    void* gates) const {
    p.save = true;
    p.bias_ih = bias_ih;
    p.bias_hh = bias_hh;
    p.output = output;
    p.h_n = h_n;
    p.gates = gates;
  }
  // What every backward adds.
  void fill_backward(BackwardParams& p, double state_clip, double gate_clip, const void* grad_output,
                     const void* grad_h_n, const void* output, const void* gates, void* grad_input,
                     void* grad_weight_ih, void* grad_weight_hh, void* grad_h0) const {
    p.state_clip = state_clip;
    p.gate_clip = gate_clip;
    p.grad_output = grad_output;
    p.grad_h_n = grad_h_n;
    p.output = output;
    p.gates = gates;
    p.grad_input = grad_input;
    p.grad_weight_ih = grad_weight_ih;
    p.grad_weight_hh = grad_weight_hh;
    p.grad_h0 = grad_h0;
  }
};

}  // namespace emulation

}  // namespace rnntl

using namespace rnntl;

namespace {

// Forward (saving for backward) then backward, each with a workspace of its own.
template <typename Launch, typename T>
const char* forward_backward(emulation::Setup& setup, typename Launch::ForwardParams f,
                             typename Launch::BackwardParams b) {
  f.env.workspace = setup.allocate(typename Launch::template ForwardWorkspace<T>(f, nullptr).bytes);
  if (const char* error = cuda::forward_run<Launch, T>(f)) return error;
  b.env.workspace = setup.allocate(typename Launch::template BackwardWorkspace<T>(b, nullptr).bytes);
  return cuda::backward_run<Launch, T>(b);
}

// The same for the layer-normalised cells, whose drivers are functions of their own.
template <template <typename> class ForwardWorkspace, template <typename> class BackwardWorkspace, typename T,
          typename Forward, typename Backward>
const char* layer_norm_forward_backward(emulation::Setup& setup, Forward f, Backward b,
                                        const char* (*forward_run)(const Forward&),
                                        const char* (*backward_run)(const Backward&)) {
  f.env.workspace = setup.allocate(ForwardWorkspace<T>(f, nullptr).bytes);
  if (const char* error = forward_run(f)) return error;
  b.env.workspace = setup.allocate(BackwardWorkspace<T>(b, nullptr).bytes);
  return backward_run(b);
}

}  // namespace

extern "C" {

// Forward (saving for backward) then backward of one LSTM layer-direction.
// dtype: 0 float32, 1 float16, 2 bfloat16, 3 float64. strategy: 1 stepwise, 2 persistent. Shapes as in
// rnntl/params.h; lengths: [B] int64 or null; recurrent_mask: [B, P] or null; zoneout_h
// [T, B, P], zoneout_c [T, B, H] keep weights or null; carried_cells: the [T, B, H] reserve
// (used with zoneout_c) or null; any gradient pointer may be null.
const char* rnntl_emulation_lstm(int dtype, int strategy, int threads, int sms, int64_t steps, int64_t batch,
                                 int64_t input_size, int64_t hidden, int64_t out_size, int reverse,
                                 double cell_clip, double proj_clip, double state_clip, double gate_clip,
                                 const int64_t* lengths, const void* recurrent_mask, const void* zoneout_h,
                                 const void* zoneout_c, void* carried_cells, const void* input,
                                 const void* weight_ih,
                                 const void* weight_hh, const void* bias_ih, const void* bias_hh,
                                 const void* weight_hr, const void* h0, const void* c0, void* output, void* h_n,
                                 void* c_n, void* gates, void* cells, void* hidden_pre_clip,
                                 const void* grad_output, const void* grad_h_n, const void* grad_c_n,
                                 void* grad_input, void* grad_weight_ih, void* grad_weight_hh, void* grad_bias,
                                 void* grad_weight_hr, void* grad_h0, void* grad_c0) {
  emulation::Setup setup(lengths, steps, batch, strategy, threads, sms);
  LstmForwardParams f{};
  setup.fill(f, dtype, input_size, hidden, out_size, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_forward(f, bias_ih, bias_hh, output, h_n, gates);
  f.cell_clip = cell_clip;
  f.proj_clip = proj_clip;
  f.weight_hr = weight_hr;
  f.c0 = c0;
  f.zoneout_h = zoneout_h;
  f.zoneout_c = zoneout_c;
  f.c_n = c_n;
  f.cells = cells;
  f.hidden_pre_clip = hidden_pre_clip;
  f.carried_cells = carried_cells;
  LstmBackwardParams b{};
  setup.fill(b, dtype, input_size, hidden, out_size, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_backward(b, state_clip, gate_clip, grad_output, grad_h_n, output, gates, grad_input, grad_weight_ih,
                      grad_weight_hh, grad_h0);
  static_cast<LstmParams&>(b) = f;  // cell_clip, proj_clip, weight_hr, c0, zoneout_h, zoneout_c
  b.grad_c_n = grad_c_n;
  b.cells = cells;
  b.hidden_pre_clip = proj_clip > 0 ? hidden_pre_clip : nullptr;
  b.carried_cells = carried_cells;
  b.grad_bias = grad_bias;
  b.grad_weight_hr = grad_weight_hr;
  b.grad_c0 = grad_c0;
  return cuda::dispatch_dtype(f.dtype, [&](auto tag) {
    return forward_backward<cuda::LstmLaunch, decltype(tag)>(setup, f, b);
  });
}

// The same for one GRU layer-direction; zoneout: [T, B, H] keep weights or null.
const char* rnntl_emulation_gru(int dtype, int strategy, int threads, int sms, int64_t steps, int64_t batch,
                                int64_t input_size, int64_t hidden, int reverse, double state_clip, double gate_clip,
                                const int64_t* lengths, const void* recurrent_mask, const void* zoneout,
                                const void* input,
                                const void* weight_ih,
                                const void* weight_hh, const void* bias_ih, const void* bias_hh, const void* h0,
                                void* output, void* h_n, void* gates, void* hidden_n, const void* grad_output,
                                const void* grad_h_n, void* grad_input, void* grad_weight_ih, void* grad_weight_hh,
                                void* grad_bias_ih, void* grad_bias_hh, void* grad_h0) {
  emulation::Setup setup(lengths, steps, batch, strategy, threads, sms);
  GruForwardParams f{};
  setup.fill(f, dtype, input_size, hidden, hidden, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_forward(f, bias_ih, bias_hh, output, h_n, gates);
  f.hidden_n = hidden_n;
  f.zoneout = zoneout;
  GruBackwardParams b{};
  setup.fill(b, dtype, input_size, hidden, hidden, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_backward(b, state_clip, gate_clip, grad_output, grad_h_n, output, gates, grad_input, grad_weight_ih,
                      grad_weight_hh, grad_h0);
  b.hidden_n = hidden_n;
  b.zoneout = zoneout;
  b.grad_bias_ih = grad_bias_ih;
  b.grad_bias_hh = grad_bias_hh;
  return cuda::dispatch_dtype(f.dtype, [&](auto tag) {
    return forward_backward<cuda::GruLaunch, decltype(tag)>(setup, f, b);
  });
}

// Forward (saving for backward) then backward of one Elman RNN layer-direction. zoneout:
// [T, B, H] keep weights or null; activations: the [T, B, H] reserve (used with zoneout) or null.
const char* rnntl_emulation_rnn(int dtype, int strategy, int threads, int sms, int64_t steps, int64_t batch,
                                int64_t input_size, int64_t hidden, int relu, int reverse, double state_clip,
                                double gate_clip, const int64_t* lengths, const void* recurrent_mask,
                                const void* zoneout, const void* input, const void* weight_ih, const void* weight_hh,
                                const void* bias_ih, const void* bias_hh, const void* h0, void* output, void* h_n,
                                void* activations, const void* grad_output, const void* grad_h_n, void* grad_input,
                                void* grad_weight_ih, void* grad_weight_hh, void* grad_bias_ih, void* grad_bias_hh,
                                void* grad_h0) {
  emulation::Setup setup(lengths, steps, batch, strategy, threads, sms);
  RnnForwardParams f{};
  setup.fill(f, dtype, input_size, hidden, hidden, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_forward(f, bias_ih, bias_hh, output, h_n, activations);
  f.relu = relu != 0;
  f.zoneout = zoneout;
  RnnBackwardParams b{};
  setup.fill(b, dtype, input_size, hidden, hidden, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_backward(b, state_clip, gate_clip, grad_output, grad_h_n, output, activations, grad_input,
                      grad_weight_ih, grad_weight_hh, grad_h0);
  static_cast<RnnParams&>(b) = f;  // relu, zoneout
  b.grad_bias_ih = grad_bias_ih;
  b.grad_bias_hh = grad_bias_hh;
  return cuda::dispatch_dtype(f.dtype, [&](auto tag) {
    return forward_backward<cuda::RnnLaunch, decltype(tag)>(setup, f, b);
  });
}

// Forward (saving for backward) then backward of one layer-normalised LSTM layer-direction
// (docs/semantics.md section 10); threads: of the row kernels' blocks (0: the GPU's default). gain_ih, gain_hh [4H]; cell_gain, cell_bias [H] or null;
// the reserve: gates [T, B, 4H], normalized [T, B, 8H], cells [T, B, 3H], inverse_std
// [T, B, 3], hidden_pre_clip [T, B, P] (with proj_clip); any gradient pointer may be null.
const char* rnntl_emulation_layer_norm_lstm(
    int dtype, int strategy, int threads, int64_t steps, int64_t batch, int64_t input_size, int64_t hidden, int64_t out_size,
    int reverse, double cell_clip, double proj_clip, double state_clip, double gate_clip, const int64_t* lengths,
    const void* recurrent_mask, const void* zoneout_h, const void* zoneout_c, const void* input,
    const void* weight_ih, const void* weight_hh, const void* bias_ih, const void* bias_hh, const void* weight_hr,
    const void* h0, const void* c0, const void* gain_ih, const void* gain_hh, const void* cell_gain,
    const void* cell_bias, void* output, void* h_n, void* c_n, void* gates, void* normalized, void* cells,
    void* inverse_std, void* hidden_pre_clip, const void* grad_output, const void* grad_h_n, const void* grad_c_n,
    void* grad_input, void* grad_weight_ih, void* grad_weight_hh, void* grad_bias, void* grad_weight_hr,
    void* grad_h0, void* grad_c0, void* grad_gain_ih, void* grad_gain_hh, void* grad_cell_gain,
    void* grad_cell_bias) {
  emulation::Setup setup(lengths, steps, batch, strategy, threads, 0);
  LayerNormLstmForwardParams f{};
  setup.fill(f, dtype, input_size, hidden, out_size, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_forward(f, bias_ih, bias_hh, output, h_n, gates);
  f.cell_clip = cell_clip;
  f.proj_clip = proj_clip;
  f.weight_hr = weight_hr;
  f.c0 = c0;
  f.zoneout_h = zoneout_h;
  f.zoneout_c = zoneout_c;
  f.gain_ih = gain_ih;
  f.gain_hh = gain_hh;
  f.cell_gain = cell_gain;
  f.cell_bias = cell_bias;
  f.c_n = c_n;
  f.normalized = normalized;
  f.cells = cells;
  f.inverse_std = inverse_std;
  f.hidden_pre_clip = hidden_pre_clip;
  LayerNormLstmBackwardParams b{};
  setup.fill(b, dtype, input_size, hidden, out_size, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_backward(b, state_clip, gate_clip, grad_output, grad_h_n, output, gates, grad_input, grad_weight_ih,
                      grad_weight_hh, grad_h0);
  static_cast<LayerNormLstmParams&>(b) = f;  // clips, weight_hr, c0, zoneout, gains
  b.grad_c_n = grad_c_n;
  b.normalized = normalized;
  b.cells = cells;
  b.inverse_std = inverse_std;
  b.hidden_pre_clip = proj_clip > 0 ? hidden_pre_clip : nullptr;
  b.grad_bias = grad_bias;
  b.grad_weight_hr = grad_weight_hr;
  b.grad_c0 = grad_c0;
  b.grad_gain_ih = grad_gain_ih;
  b.grad_gain_hh = grad_gain_hh;
  b.grad_cell_gain = grad_cell_gain;
  b.grad_cell_bias = grad_cell_bias;
  return cuda::dispatch_dtype(f.dtype, [&](auto tag) {
    using T = decltype(tag);
    return layer_norm_forward_backward<cuda::LnLstmForwardWorkspace, cuda::LnLstmBackwardWorkspace, T>(
        setup, f, b, cuda::layer_norm_lstm_forward_run<T>, cuda::layer_norm_lstm_backward_run<T>);
  });
}

// The same for the layer-normalised GRU: gain_ih, gain_hh [3H]; the reserve gates
// [T, B, 3H], normalized [T, B, 6H], inverse_std [T, B, 2].
const char* rnntl_emulation_layer_norm_gru(
    int dtype, int strategy, int threads, int64_t steps, int64_t batch, int64_t input_size, int64_t hidden, int reverse,
    double state_clip, double gate_clip, const int64_t* lengths, const void* recurrent_mask, const void* zoneout,
    const void* input, const void* weight_ih, const void* weight_hh, const void* bias_ih, const void* bias_hh,
    const void* h0, const void* gain_ih, const void* gain_hh, void* output, void* h_n, void* gates, void* normalized,
    void* inverse_std, const void* grad_output, const void* grad_h_n, void* grad_input, void* grad_weight_ih,
    void* grad_weight_hh, void* grad_bias_ih, void* grad_bias_hh, void* grad_h0, void* grad_gain_ih,
    void* grad_gain_hh) {
  emulation::Setup setup(lengths, steps, batch, strategy, threads, 0);
  LayerNormGruForwardParams f{};
  setup.fill(f, dtype, input_size, hidden, hidden, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_forward(f, bias_ih, bias_hh, output, h_n, gates);
  f.zoneout = zoneout;
  f.gain_ih = gain_ih;
  f.gain_hh = gain_hh;
  f.normalized = normalized;
  f.inverse_std = inverse_std;
  LayerNormGruBackwardParams b{};
  setup.fill(b, dtype, input_size, hidden, hidden, reverse, input, weight_ih, weight_hh, h0, recurrent_mask);
  setup.fill_backward(b, state_clip, gate_clip, grad_output, grad_h_n, output, gates, grad_input, grad_weight_ih,
                      grad_weight_hh, grad_h0);
  b.zoneout = zoneout;
  b.gain_ih = gain_ih;
  b.gain_hh = gain_hh;
  b.bias_hh = bias_hh;
  b.normalized = normalized;
  b.inverse_std = inverse_std;
  b.grad_bias_ih = grad_bias_ih;
  b.grad_bias_hh = grad_bias_hh;
  b.grad_gain_ih = grad_gain_ih;
  b.grad_gain_hh = grad_gain_hh;
  return cuda::dispatch_dtype(f.dtype, [&](auto tag) {
    using T = decltype(tag);
    return layer_norm_forward_backward<cuda::LnGruForwardWorkspace, cuda::LnGruBackwardWorkspace, T>(
        setup, f, b, cuda::layer_norm_gru_forward_run<T>, cuda::layer_norm_gru_backward_run<T>);
  });
}

}  // extern "C"

namespace {

// Checks the emulated warp primitives against their CUDA definitions: 2 blocks of 48
// threads (one full warp and one of 16 lanes each). Writes one flag per thread.
__global__ void warp_primitives_kernel(int* failures) {
  const unsigned lane = threadIdx.x % warpSize;
  const unsigned lanes = (blockDim.x - (threadIdx.x / warpSize) * warpSize) < 32u
                             ? blockDim.x - (threadIdx.x / warpSize) * warpSize
                             : 32u;
  int bad = 0;
  const unsigned ballot = __ballot_sync(0xffffffffu, lane % 3 == 0);
  unsigned expected = 0;
  for (unsigned l = 0; l < lanes; ++l) expected |= unsigned(l % 3 == 0) << l;
  bad |= ballot != expected;
  bad |= __any_sync(0xffffffffu, lane == 5) != true;
  bad |= __all_sync(0xffffffffu, lane < lanes) != true;
  bad |= __all_sync(0xffffffffu, lane != 0) != false;
  bad |= __shfl_sync(0xffffffffu, int(lane) * 10, 3) != 30;
  const int down = __shfl_down_sync(0xffffffffu, int(lane), 1);
  bad |= down != int(lane + 1 < lanes ? lane + 1 : lane);
  float sum = 1.0f;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  bad |= lanes == 32 && sum != 32.0f;
  // Shared memory is per block: each block sums its own thread ids.
  RNNTL_DYNAMIC_SHARED(unsigned int, total);
  if (threadIdx.x == 0) *total = 0;
  __syncthreads();
  atomicAdd(total, threadIdx.x + blockIdx.x * 1000u);
  __syncthreads();
  bad |= *total != (blockDim.x * (blockDim.x - 1)) / 2 + blockIdx.x * 1000u * blockDim.x;
  failures[blockIdx.x * blockDim.x + threadIdx.x] = bad;
}

}  // namespace

extern "C" int rnntl_emulation_warp_selftest() {
  std::vector<int> failures(2 * 48, -1);
  cuda::launch_kernel(dim3(2), dim3(48), sizeof(unsigned int), nullptr, warp_primitives_kernel, failures.data());
  int count = 0;
  for (int f : failures) count += f != 0;
  return count;
}

#ifdef RNNTL_EMULATION_MAIN
// Race check: LSTM, GRU and Elman RNN, both strategies, forward + backward, variable
// lengths and reverse, both clip modes, with a recurrent mask or with zoneout (the RNN once:
// reverse, relu, mask and zoneout); the persistent results must also match the stepwise ones.
// The layer-normalised LSTM and GRU once each (stepwise: their only strategy).
namespace {

std::vector<float> random_vector(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> dist(-0.5f, 0.5f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

float max_difference(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

struct LstmRun {
  std::vector<float> output, h_n, c_n, grad_input, grad_weight_hh, grad_h0;
};

// Half of the mask's entries 0, the others 2 (recurrent dropout with p = 0.5).
std::vector<float> dropout_mask(std::mt19937& rng, size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = (rng() & 1) ? 2.0f : 0.0f;
  return v;
}

// Keep weights of zoneout as 0/1 draws (p = 0.5), as in training.
std::vector<float> zoneout_draws(std::mt19937& rng, size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = float(rng() & 1);
  return v;
}

// With `zoned`, zoneout of h and c.
LstmRun run_lstm(int strategy, bool reverse, double state_clip, double gate_clip, const std::vector<int64_t>& lengths,
                 bool masked, bool zoned) {
  const int64_t T = 4, B = 3, I = 5, H = 7;
  std::mt19937 rng(1);
  auto x = random_vector(rng, T * B * I), wih = random_vector(rng, 4 * H * I), whh = random_vector(rng, 4 * H * H);
  auto bih = random_vector(rng, 4 * H), bhh = random_vector(rng, 4 * H), h0 = random_vector(rng, B * H),
       c0 = random_vector(rng, B * H), go = random_vector(rng, T * B * H), ghn = random_vector(rng, B * H),
       gcn = random_vector(rng, B * H), mask = dropout_mask(rng, B * H), keep_h = zoneout_draws(rng, T * B * H),
       keep_c = zoneout_draws(rng, T * B * H);
  LstmRun r;
  r.output.resize(T * B * H);
  r.h_n.resize(B * H);
  r.c_n.resize(B * H);
  std::vector<float> gates(T * B * 4 * H), cells(T * B * H), pre(T * B * H), carried(T * B * H);
  r.grad_input.resize(T * B * I);
  std::vector<float> gwih(4 * H * I), gbias(4 * H), gc0(B * H);
  r.grad_weight_hh.resize(4 * H * H);
  r.grad_h0.resize(B * H);
  const char* error = rnntl_emulation_lstm(
      0, strategy, 32, 3, T, B, I, H, H, reverse, 0.8, 0.3, state_clip, gate_clip, lengths.data(),
      masked ? mask.data() : nullptr, zoned ? keep_h.data() : nullptr, zoned ? keep_c.data() : nullptr,
      zoned ? carried.data() : nullptr, x.data(), wih.data(), whh.data(), bih.data(), bhh.data(), nullptr, h0.data(),
      c0.data(), r.output.data(), r.h_n.data(), r.c_n.data(), gates.data(), cells.data(), pre.data(), go.data(),
      ghn.data(), gcn.data(), r.grad_input.data(), gwih.data(), r.grad_weight_hh.data(), gbias.data(), nullptr,
      r.grad_h0.data(), gc0.data());
  if (error) {
    std::fprintf(stderr, "lstm failed: %s\n", error);
    std::exit(2);
  }
  return r;
}

struct GruRun {
  std::vector<float> output, h_n, grad_input, grad_weight_hh, grad_h0;
};

GruRun run_gru(int strategy, bool reverse, double state_clip, double gate_clip, const std::vector<int64_t>& lengths,
               bool masked, bool zoned) {
  const int64_t T = 4, B = 3, I = 5, H = 7;
  std::mt19937 rng(2);
  auto x = random_vector(rng, T * B * I), wih = random_vector(rng, 3 * H * I), whh = random_vector(rng, 3 * H * H);
  auto bih = random_vector(rng, 3 * H), bhh = random_vector(rng, 3 * H), h0 = random_vector(rng, B * H),
       go = random_vector(rng, T * B * H), ghn = random_vector(rng, B * H), mask = dropout_mask(rng, B * H),
       keep = zoneout_draws(rng, T * B * H);
  GruRun r;
  r.output.resize(T * B * H);
  r.h_n.resize(B * H);
  std::vector<float> gates(T * B * 3 * H), hidden_n(T * B * H), gwih(3 * H * I), gbih(3 * H), gbhh(3 * H);
  r.grad_input.resize(T * B * I);
  r.grad_weight_hh.resize(3 * H * H);
  r.grad_h0.resize(B * H);
  const char* error = rnntl_emulation_gru(
      0, strategy, 32, 3, T, B, I, H, reverse, state_clip, gate_clip, lengths.data(),
      masked ? mask.data() : nullptr, zoned ? keep.data() : nullptr, x.data(), wih.data(), whh.data(), bih.data(),
      bhh.data(), h0.data(), r.output.data(), r.h_n.data(), gates.data(), hidden_n.data(), go.data(), ghn.data(),
      r.grad_input.data(), gwih.data(), r.grad_weight_hh.data(), gbih.data(), gbhh.data(), r.grad_h0.data());
  if (error) {
    std::fprintf(stderr, "gru failed: %s\n", error);
    std::exit(2);
  }
  return r;
}

struct RnnRun {
  std::vector<float> output, h_n, grad_input, grad_weight_hh, grad_h0;
};

// relu; with the mask also zoneout keep weights (0/1 draws): the persistent backward's direct part.
RnnRun run_rnn(int strategy, bool reverse, double state_clip, double gate_clip, const std::vector<int64_t>& lengths,
               bool masked) {
  const int64_t T = 4, B = 3, I = 5, H = 7;
  std::mt19937 rng(3);
  auto x = random_vector(rng, T * B * I), wih = random_vector(rng, H * I), whh = random_vector(rng, H * H);
  auto bih = random_vector(rng, H), bhh = random_vector(rng, H), h0 = random_vector(rng, B * H),
       go = random_vector(rng, T * B * H), ghn = random_vector(rng, B * H), mask = dropout_mask(rng, B * H),
       keep = dropout_mask(rng, T * B * H);
  for (auto& d : keep) d /= 2.0f;
  RnnRun r;
  r.output.resize(T * B * H);
  r.h_n.resize(B * H);
  std::vector<float> activations(T * B * H), gwih(H * I), gbih(H), gbhh(H);
  r.grad_input.resize(T * B * I);
  r.grad_weight_hh.resize(H * H);
  r.grad_h0.resize(B * H);
  const char* error = rnntl_emulation_rnn(
      0, strategy, 32, 3, T, B, I, H, /*relu=*/1, reverse, state_clip, gate_clip, lengths.data(),
      masked ? mask.data() : nullptr, masked ? keep.data() : nullptr, x.data(), wih.data(), whh.data(), bih.data(),
      bhh.data(), h0.data(), r.output.data(), r.h_n.data(), activations.data(), go.data(), ghn.data(),
      r.grad_input.data(), gwih.data(), r.grad_weight_hh.data(), gbih.data(), gbhh.data(), r.grad_h0.data());
  if (error) {
    std::fprintf(stderr, "rnn failed: %s\n", error);
    std::exit(2);
  }
  return r;
}

// The layer-normalised LSTM (reverse, mask, zoneout of h and c, cell terms, both clips of the
// state) and GRU (mask, zoneout, gate clip) once each, with 64-thread row blocks: 0 on success.
int run_layer_norm_cells(const std::vector<int64_t>& lengths) {
  const int64_t T = 4, B = 3, I = 5, H = 7, G4 = 4 * H, G3 = 3 * H;
  std::mt19937 rng(4);
  auto x = random_vector(rng, T * B * I), wih = random_vector(rng, G4 * I), whh = random_vector(rng, G4 * H),
       bih = random_vector(rng, G4), bhh = random_vector(rng, G4), h0 = random_vector(rng, B * H),
       c0 = random_vector(rng, B * H), gih = random_vector(rng, G4), ghh = random_vector(rng, G4),
       gc = random_vector(rng, H), bc = random_vector(rng, H), go = random_vector(rng, T * B * H),
       ghn = random_vector(rng, B * H), gcn = random_vector(rng, B * H), mask = dropout_mask(rng, B * H),
       keep_h = zoneout_draws(rng, T * B * H), keep_c = zoneout_draws(rng, T * B * H);
  std::vector<float> out(T * B * H), h_n(B * H), c_n(B * H), gates(T * B * G4), normalized(T * B * 2 * G4),
      cells(T * B * 3 * H), inverse_std(T * B * 3), pre(T * B * H), gx(T * B * I), gwih(G4 * I), gwhh(G4 * H),
      gb(G4), gbih(G3), gbhh(G3), gh0(B * H), gc0(B * H), ggih(G4), gghh(G4), ggc(H), gbc(H);
  const char* error = rnntl_emulation_layer_norm_lstm(
      0, 1, 64, T, B, I, H, H, 1, 0.8, 0.3, 0.05, 0.0, lengths.data(), mask.data(), keep_h.data(), keep_c.data(),
      x.data(), wih.data(), whh.data(), bih.data(), bhh.data(), nullptr, h0.data(), c0.data(), gih.data(),
      ghh.data(), gc.data(), bc.data(), out.data(), h_n.data(), c_n.data(), gates.data(), normalized.data(),
      cells.data(), inverse_std.data(), pre.data(), go.data(), ghn.data(), gcn.data(), gx.data(), gwih.data(),
      gwhh.data(), gb.data(), nullptr, gh0.data(), gc0.data(), ggih.data(), gghh.data(), ggc.data(), gbc.data());
  if (!error)
    error = rnntl_emulation_layer_norm_gru(
        0, 1, 64, T, B, I, H, 0, 0.0, 0.05, lengths.data(), mask.data(), keep_h.data(), x.data(), wih.data(),
        whh.data(), bih.data(), bhh.data(), h0.data(), gih.data(), ghh.data(), out.data(), h_n.data(), gates.data(),
        normalized.data(), inverse_std.data(), go.data(), ghn.data(), gx.data(), gwih.data(), gwhh.data(),
        gbih.data(), gbhh.data(), gh0.data(), ggih.data(), gghh.data());
  if (error) std::fprintf(stderr, "layer norm failed: %s\n", error);
  std::printf("layer-norm lstm and gru: %s\n", error ? "failed" : "ran");
  return error ? 1 : 0;
}

}  // namespace

int main() {
  const std::vector<int64_t> lengths = {2, 4, 1};
  int failures = rnntl_emulation_warp_selftest();
  std::printf("warp primitives self-test: %d failing threads\n", failures);
  // Two configurations cover both directions and both clip modes (TSan runs are slow).
  for (int reverse = 0; reverse < 2; ++reverse) {
    {
      const int mode = reverse;
      const double state_clip = mode == 0 ? 0.05 : 0.0, gate_clip = mode == 1 ? 0.05 : 0.0;
      const bool masked = reverse == 1, zoned = reverse == 0;  // zoneout: the LSTM's and GRU's direct part
      const LstmRun a = run_lstm(1, reverse, state_clip, gate_clip, lengths, masked, zoned);
      const LstmRun b = run_lstm(2, reverse, state_clip, gate_clip, lengths, masked, zoned);
      const float dl = std::max({max_difference(a.output, b.output), max_difference(a.c_n, b.c_n),
                                 max_difference(a.grad_input, b.grad_input),
                                 max_difference(a.grad_weight_hh, b.grad_weight_hh),
                                 max_difference(a.grad_h0, b.grad_h0)});
      const GruRun c = run_gru(1, reverse, state_clip, gate_clip, lengths, masked, zoned);
      const GruRun d = run_gru(2, reverse, state_clip, gate_clip, lengths, masked, zoned);
      const float dg = std::max({max_difference(c.output, d.output), max_difference(c.h_n, d.h_n),
                                 max_difference(c.grad_input, d.grad_input),
                                 max_difference(c.grad_weight_hh, d.grad_weight_hh),
                                 max_difference(c.grad_h0, d.grad_h0)});
      std::printf("reverse=%d mode=%s mask=%d zoneout=%d: lstm stepwise vs persistent %.2e, gru %.2e\n", reverse,
                  mode == 0 ? "state" : "gates", int(masked), int(zoned), dl, dg);
      if (!(dl < 1e-5f && dg < 1e-5f)) ++failures;
      if (masked) {  // the RNN once: its own parts (relu, zoneout's direct path) with the mask
        const RnnRun e = run_rnn(1, reverse, state_clip, gate_clip, lengths, masked);
        const RnnRun f = run_rnn(2, reverse, state_clip, gate_clip, lengths, masked);
        const float dr = std::max({max_difference(e.output, f.output), max_difference(e.h_n, f.h_n),
                                   max_difference(e.grad_input, f.grad_input),
                                   max_difference(e.grad_weight_hh, f.grad_weight_hh),
                                   max_difference(e.grad_h0, f.grad_h0)});
        std::printf("reverse=%d mode=%s mask=1 zoneout=1 relu=1: rnn stepwise vs persistent %.2e\n", reverse,
                    mode == 0 ? "state" : "gates", dr);
        if (!(dr < 1e-5f)) ++failures;
      }
    }
  }
  failures += run_layer_norm_cells(lengths);
  std::printf(failures ? "FAILED\n" : "OK\n");
  return failures ? 1 : 0;
}
#endif
