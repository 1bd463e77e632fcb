// The matrix products of the CPU kernels, in one place: out = x @ weight^T (+ bias).
//
// Which code runs a float32 product depends on its size (the measurements behind each
// choice: docs/cpu.md, "Matrix products"):
//  * the library-free kernel of small_gemm_cpu.h: the whole-sequence products
//    (RowProjection: input projection, dL/dx) from 256 rows on, the per-step ones
//    (StepWeight) where the size suits it: the weight is packed once per sequence, so no
//    call has setup cost;
//  * big per-step products (>= 16 rows and >= 2 MFLOP): oneDNN's matmul (the op torch
//    registers as mkldnn::_linear_pointwise; weights pre-packed once per sequence by
//    mkldnn::_reorder_linear_weight), whose BLAS path at::mm does not take on every CPU;
//  * small per-step products without the own kernel: MKL's packed GEMM (cblas_sgemm_pack /
//    cblas_sgemm_compute, looked up at run time in the loaded libtorch): the weight packed
//    once, no dispatcher call on the path, where oneDNN's fixed per-call cost dominates;
//  * the weight gradients (transposed_product): the own kernel on CPUs other than Intel's,
//    BLAS (addmm_) on Intel's, in both cases K summed in chunks;
//  * float64, and torch builds without those libraries: at::mm / at::addmm;
//  * products too few to pay for packing their weight (short sequences, one step at a
//    time: packing_pays_for_rows / packing_pays_for_steps): at::mm / at::addmm on the
//    weight as it is.
// RNNTL_CPU_GEMM=aten forces at::mm everywhere; RNNTL_CPU_GEMM=library keeps the libraries
// on every product (docs/ENVIRONMENT.md).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

#include "reusable_buffers_cpu.h"
#include "small_gemm_cpu.h"

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>
#include <cstring>
#include <optional>
#include <type_traits>

namespace rnntl {
namespace cpu {

// RNNTL_CPU_GEMM, read once: "aten" (at::mm everywhere), "library" (no own kernel), unset,
// empty or "auto": the automatic choice below (docs/ENVIRONMENT.md). Any other value is an
// error at the first product rather than a silent fallback to the automatic choice.
enum class GemmChoice { automatic, aten, library };
inline GemmChoice gemm_choice() {
  static const GemmChoice choice = [] {
    const char* value = std::getenv("RNNTL_CPU_GEMM");
    if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return GemmChoice::automatic;
    const bool aten = std::strcmp(value, "aten") == 0, library = std::strcmp(value, "library") == 0;
    TORCH_CHECK(aten || library, "rnntl_fast: the environment variable RNNTL_CPU_GEMM must be auto, aten or library ",
                "(or unset), got '", value, "'");
    return aten ? GemmChoice::aten : GemmChoice::library;
  }();
  return choice;
}

struct OneDnnOps {
  std::optional<c10::OperatorHandle> linear;   // mkldnn::_linear_pointwise
  std::optional<c10::OperatorHandle> reorder;  // mkldnn::_reorder_linear_weight
  bool available = false;

  static const OneDnnOps& get() {
    static const OneDnnOps ops = [] {
      OneDnnOps o;
      if (gemm_choice() == GemmChoice::aten) return o;
      auto& dispatcher = c10::Dispatcher::singleton();
      o.linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
      o.reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
      o.available = o.linear.has_value() && o.reorder.has_value() && at::hasMKLDNN() &&
                    o.linear->hasKernelForDispatchKey(c10::DispatchKey::CPU);
      return o;
    }();
    return ops;
  }
};

// MKL's packed-GEMM entry points, when the loaded torch carries MKL.
struct MklPackedGemm {
  using size_fn = size_t (*)(int identifier, int m, int n, int k);
  using pack_fn = void (*)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                           int ld, float* dest);
  using compute_fn = void (*)(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                              const float* b, int ldb, float beta, float* c, int ldc);
  // CBLAS constants (mkl_cblas.h)
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
  size_fn size = nullptr;
  pack_fn pack = nullptr;
  compute_fn compute = nullptr;
  bool available = false;

  static void* find(const char* name) {
    if (void* symbol = dlsym(RTLD_DEFAULT, name)) return symbol;
    void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    return torch_cpu ? dlsym(torch_cpu, name) : nullptr;
  }

  static const MklPackedGemm& get() {
    static const MklPackedGemm gemm = [] {
      MklPackedGemm g;
      if (gemm_choice() == GemmChoice::aten) return g;
      g.size = reinterpret_cast<size_fn>(find("cblas_sgemm_pack_get_size"));
      g.pack = reinterpret_cast<pack_fn>(find("cblas_sgemm_pack"));
      g.compute = reinterpret_cast<compute_fn>(find("cblas_sgemm_compute"));
      g.available = g.size && g.pack && g.compute;
      return g;
    }();
    return gemm;
  }
};

// Whether this is an Intel CPU: MKL, which picks its kernels by vendor, serves two products there.
inline bool intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;  // MKL is x86-only: elsewhere the library paths are oneDNN's or torch's BLAS
#endif
}

// MKL picks its own kernels by CPU vendor: on Intel CPUs its packed GEMM runs its AVX-512
// kernels and beat oneDNN's matmul on the per-step products (no result copy, no per-call
// primitive lookup: LSTM (50, 64, 512, 512) training 174-179 -> 152-159 ms, docs/cpu.md); on AMD it
// took an AVX2-level path at 73 GFLOP/s against oneDNN's 188, so oneDNN serves there.
inline bool mkl_packed_preferred(const at::Tensor& weight) {
  return intel_cpu() && weight.scalar_type() == at::kFloat && MklPackedGemm::get().available;
}

inline bool use_onednn(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn() && OneDnnOps::get().available;
}

// Products below this size lose more to oneDNN's per-call cost than its kernels win.
inline bool big_enough_for_onednn(int64_t rows, int64_t cols, int64_t depth) {
  return rows >= 16 && 2 * rows * cols * depth >= 2000000;
}

inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  torch::jit::Stack stack;
  stack.emplace_back(x);
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(c10::IValue());
  OneDnnOps::get().linear->callBoxed(&stack);
  return stack.back().toTensor();
}

// Whether the float32 products may use small_gemm_cpu.h's kernel (RNNTL_CPU_GEMM neither aten nor library).
inline bool own_kernel_enabled() { return gemm_choice() == GemmChoice::automatic; }

// Packing a weight (the own kernel's panels, MKL's or oneDNN's packed layouts, the
// multi-core loops' per-worker slices) copies all of it once per op call: 0.36-1.5 ns a
// float on the 2-core Xeon, as long as BLAS takes to multiply 30-100 rows by it. It pays
// only where enough products read the packed copy afterwards; below, products read the
// weight as it is (at::mm) and the sequence runs a step at a time. Without these rules a
// call of one step (a token at a time) was mostly packing: GRU (T, B, H) = (1, 1, 1024)
// inference took 5.4 ms against torch.nn's 0.75 ms. The thresholds are measured
// (docs/cpu.md, "Short sequences"). RNNTL_CPU_PACKING (read at each op call,
// docs/ENVIRONMENT.md): auto (these rules), always (pack at every size: the tests run so,
// so that their short sequences exercise the packed kernels), never.
enum class Packing { automatic, always, never };
inline Packing packing_choice() {
  const char* value = std::getenv("RNNTL_CPU_PACKING");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return Packing::automatic;
  if (std::strcmp(value, "always") == 0) return Packing::always;
  TORCH_CHECK(std::strcmp(value, "never") == 0,
              "rnntl_fast: the environment variable RNNTL_CPU_PACKING must be auto, always or never (or unset), got '",
              value, "'");
  return Packing::never;
}

// A whole-sequence product x [rows, K] @ weight^T: from 256 rows on, packing costs at most
// about a tenth of the product.
constexpr int64_t kPackingMinRows = 256;
inline bool packing_pays_for_rows(int64_t rows) {
  const Packing choice = packing_choice();
  return choice == Packing::always || (choice == Packing::automatic && rows >= kPackingMinRows);
}

// A per-step weight (W_hh, W_hr; `weight_bytes` in all) applied at each of `steps` steps to
// at most `batch` rows. At a few rows a step the product streams the weight, and a packed
// copy is faster only from each core's L2: a bigger one (per thread) is left as it is.
constexpr int64_t kPackingMinSteps = 8, kPackingMinStepRows = 16, kPackingMinComputeBatch = 8;
constexpr int64_t kPackingMaxStreamedBytesPerThread = int64_t(1) << 20;
inline bool packing_pays_for_steps(int64_t steps, int64_t batch, int64_t weight_bytes) {
  const Packing choice = packing_choice();
  if (choice != Packing::automatic) return choice == Packing::always;
  const bool cached = weight_bytes <= at::get_num_threads() * kPackingMaxStreamedBytesPerThread;
  return steps >= kPackingMinSteps && steps * batch >= kPackingMinStepRows &&
         (batch >= kPackingMinComputeBatch || cached);
}

// pack_panels over torch's threads, a range of panels each (the packing otherwise runs on
// one core while the others wait for the products it feeds). weight: [N, K] with strides
// (stride_n, stride_k); packed: packed_panels_size(N, K) floats. Inside a parallel region
// it runs on the calling thread.
inline void pack_panels_parallel(const float* weight, int64_t N, int64_t K, int64_t stride_n, int64_t stride_k,
                                 float* packed) {
  const int64_t panel_floats = std::max<int64_t>(1, K * kPanelWidth);
  const int64_t grain = std::max<int64_t>(1, (int64_t(16) << 10) / panel_floats);  // >= 64 KB of panels a task
  at::parallel_for(0, panel_count(N), grain, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kPanelWidth;
    pack_panels(weight + first * stride_n, std::min(N - first, (end - begin) * kPanelWidth), K, stride_n, stride_k,
                packed + begin * panel_floats);
  });
}

// pack_panels_parallel of a [N, K] tensor (any strides) into a new buffer.
inline at::Tensor packed_weight_panels(const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor panels = reusable_empty({packed_panels_size(N, K)}, weight.options());
  pack_panels_parallel(weight.data_ptr<float>(), N, K, weight.stride(0), weight.stride(1), panels.data_ptr<float>());
  return panels;
}

// x [M, K] @ weight [N, K]^T (+ bias [N]), computed a block of rows at a time into a
// caller's buffer. The sequence kernels project each few steps' input rows just before
// those steps run, into a buffer that stays in L2, instead of the whole [T*B, G] product up
// front (a fresh multi-MB buffer that then comes back from L3, page faults included).
// float32 with the own kernel: small_gemm_cpu.h's gemm_panels, the weight packed into
// panels once (N*K floats), rows split across threads, the bias added in the kernel
// (faster than oneDNN's matmul at these shapes: docs/cpu.md). Otherwise the libraries, one
// product per block.
class RowProjection {
 public:
  // x: [M, K] (rows may be strided, elements contiguous); weight: [N, K], any strides.
  // profile_name: what torch.profiler shows for each product (a string literal).
  RowProjection(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                const char* profile_name = "rnntl_fast::input_projection")
      : x_(x.stride(1) == 1 ? x : x.contiguous()), weight_(weight), bias_(bias), profile_name_(profile_name) {
    packing_ = packing_pays_for_rows(x.size(0));
    own_kernel_ = x.scalar_type() == at::kFloat && own_kernel_enabled() && packing_;
    if (own_kernel_) {
      panels_ = packed_weight_panels(weight);
      if (bias.has_value()) bias_ = bias->contiguous();
    }
  }
  int64_t rows() const { return x_.size(0); }
  int64_t width() const { return weight_.size(0); }

  // out [rows, N] (row stride N) = rows [first, first + rows) of the product.
  template <typename T>
  void into(int64_t first, int64_t rows, T* out) const {
    if (rows <= 0) return;
    // Named in profiles (benchmarks/sequence_products.py times them by these names).
    RECORD_FUNCTION(profile_name_, std::vector<c10::IValue>());
    const int64_t K = x_.size(1), N = weight_.size(0);
    if constexpr (std::is_same_v<T, float>) {
      if (own_kernel_) {
        const int64_t row_stride = x_.stride(0);
        const float* a = x_.data_ptr<float>() + first * row_stride;
        const float* panels = panels_.data_ptr<float>();
        const float* bias = bias_.has_value() ? bias_->data_ptr<float>() : nullptr;
        const int64_t grain = std::max<int64_t>(96, 4000000 / std::max<int64_t>(1, 2 * N * K));
        at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
          gemm_panels(a + begin * row_stride, row_stride, 1, end - begin, K, panels, N, bias, out + begin * N, N,
                      false, kDepthChunk);
        });
        return;
      }
    }
    at::Tensor result = at::from_blob(out, {rows, N}, x_.options());
    const at::Tensor block = x_.narrow(0, first, rows);
    if (onednn_suits(block)) {
      result.copy_(onednn_linear(block, weight_, bias_));
    } else {  // BLAS writes the result in place
      bias_.has_value() ? at::addmm_out(result, *bias_, block, weight_.t()) : at::mm_out(result, block, weight_.t());
    }
  }
  // The whole product as a new [M, N] tensor.
  at::Tensor all() const {
    if (!own_kernel_) {
      RECORD_FUNCTION(profile_name_, std::vector<c10::IValue>());
      return library_product(x_);
    }
    at::Tensor out = reusable_empty({rows(), width()}, x_.options());
    into(0, rows(), out.data_ptr<float>());
    return out;
  }

 private:
  // oneDNN's matmul reorders the weight at each call: a packing too.
  bool onednn_suits(const at::Tensor& x) const {
    return packing_ && use_onednn(x) && big_enough_for_onednn(x.size(0), weight_.size(0), x.size(1));
  }
  at::Tensor library_product(const at::Tensor& x) const {
    if (onednn_suits(x)) return onednn_linear(x, weight_, bias_);
    return bias_.has_value() ? at::addmm(*bias_, x, weight_.t()) : at::mm(x, weight_.t());
  }
  at::Tensor x_, weight_, panels_;
  c10::optional<at::Tensor> bias_;
  const char* profile_name_;
  bool packing_ = false, own_kernel_ = false;
};

// Rows per block of a RowProjection that a sequence kernel consumes step by step: about
// 256 KB of results (half of a 512 KB L2), at least one step's rows, and at least as many
// bytes of results as of weight (rows >= depth), since each block streams the whole packed
// weight again once the per-step products have evicted it (docs/cpu.md gives the cost of
// smaller blocks).
inline int64_t projection_block_rows(int64_t width, int64_t depth, int64_t batch) {
  const int64_t cache_rows = (int64_t(256) << 10) / (std::max<int64_t>(width, 1) * int64_t(sizeof(float)));
  return std::max({batch, cache_rows, depth});
}

// x [M, K] @ weight[N, K]^T (+ bias [N]) -> [M, N]; x and weight may be strided views.
inline at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight,
                              const char* profile_name = "rnntl_fast::input_gradient") {
  return RowProjection(x, weight, c10::nullopt, profile_name).all();
}

// Whether the weight gradients use the own kernel (transposed_product_own_kernel) rather
// than BLAS: on non-Intel CPUs with AVX-512, where MKL takes an AVX2-level path and the own
// AVX-512 kernel is faster. On Intel CPUs MKL runs its AVX-512 kernels (whole training steps
// 0-13% slower with the own kernel on Sapphire Rapids, docs/cpu.md), and on AVX2-only
// CPUs the own kernel's 6x16 register blocks lose to BLAS (whole training steps 1-13%
// slower, docs/cpu.md).
inline bool own_kernel_for_weight_gradients() {
  return !intel_cpu() && std::strcmp(small_gemm_variant(), "avx512") == 0;
}

// a [K, M]^T @ b [K, N] -> [M, N] in float32 with small_gemm_cpu.h's kernel, K summed in
// chunks of `chunk` rows as transposed_product does. b is packed into panels (threads split
// the panels); each thread then takes a range of the M result rows (no sums across threads)
// and copies a block of them from a, transposed into a [K, rows] buffer that stays in L2
// (read in place, consecutive depth steps of a column of a are a whole row of a apart: one
// cache line and usually one page per depth step, which ran the kernel at 0.4-0.7 of
// BLAS). The packed copy of b is kept to about 16 MB: a longer K goes in spans of whole
// chunks, each span's product added to the result (the same sums in the same order as one span).
inline at::Tensor transposed_product_own_kernel(const at::Tensor& a_in, const at::Tensor& b, int64_t chunk) {
  const at::Tensor a = a_in.stride(1) == 1 ? a_in : a_in.contiguous();
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1), lda = a.stride(0);
  at::Tensor result = reusable_empty({M, N}, a.options());
  if (K == 0 || M == 0 || N == 0) return result.zero_();
  const int64_t panel_floats = panel_count(N) * kPanelWidth;
  const int64_t span = std::min(K, std::max<int64_t>(1, (int64_t(4) << 20) / panel_floats / chunk) * chunk);
  at::Tensor panels = reusable_empty({span * panel_floats}, b.options());
  // Rows per block: its [span, rows] copy about 256 KB, 8 to 96 rows (a multiple of 8:
  // whole register blocks); each block streams the packed b once.
  const int64_t block_rows = std::clamp<int64_t>(((int64_t(64) << 10) / span) / 8 * 8, 8, 96);
  const int64_t grain = std::max<int64_t>(8, 4000000 / std::max<int64_t>(1, 2 * N * K));
  const int64_t stride_n = b.stride(1), stride_k = b.stride(0);
  float* packed = panels.data_ptr<float>();
  float* out = result.data_ptr<float>();
  for (int64_t k0 = 0; k0 < K; k0 += span) {
    const int64_t depth = std::min(span, K - k0);
    const float* b_rows = b.data_ptr<float>() + k0 * stride_k;
    const float* a_rows = a.data_ptr<float>() + k0 * lda;
    pack_panels_parallel(b_rows, N, depth, stride_n, stride_k, packed);
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> block(static_cast<size_t>(std::min(block_rows, end - begin) * depth));
      for (int64_t first = begin; first < end; first += block_rows) {
        const int64_t rows = std::min(block_rows, end - first);
        for (int64_t k = 0; k < depth; ++k) {
          const float* from = a_rows + k * lda + first;
          float* to = block.data() + k * rows;
          for (int64_t r = 0; r < rows; ++r) to[r] = from[r];
        }
        gemm_panels(block.data(), 1, rows, rows, depth, packed, N, nullptr, out + first * N, N, k0 > 0, chunk);
      }
    });
  }
  return result;
}

// a [K, M]^T @ b [K, N] -> [M, N]: the weight-gradient products, reducing over the K valid rows.
//
// The K rows are summed in chunks of max(256, sqrt(K)) rows, each chunk's product added to
// the result: a float32 sum then grows at most max(256, sqrt(K)) + K / 256 additions deep
// instead of K, which keeps these gradients as accurate as torch.nn's (its GRU sums one
// product per step, its LSTM takes one GEMM; docs/cpu.md gives the errors). Chunks of
// sqrt(K) rows (56 at K = 3200) were as accurate but ran BLAS at 10-25% below one call's
// rate at K = 3200 and far below at small K, from the call count and the short inner
// dimension. The own kernel (transposed_product_own_kernel) takes the same chunks where it
// serves; otherwise each chunk is one addmm_ into the result (BLAS reads the
// transposed operand in place and adds with beta = 1, no transposed copies). A result
// bigger than 4 MiB would be streamed through memory once per chunk; it is done in blocks
// of its rows of about 2 MiB instead, each block taking all chunks in turn while it stays
// in cache (same sums in the same order). The measurements: docs/cpu.md.
inline at::Tensor transposed_product(const at::Tensor& a, const at::Tensor& b) {
  RECORD_FUNCTION("rnntl_fast::weight_gradient", std::vector<c10::IValue>());
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  const int64_t chunk = std::max<int64_t>(256, static_cast<int64_t>(std::sqrt(static_cast<double>(K))));
  if (a.scalar_type() == at::kFloat && own_kernel_enabled() && own_kernel_for_weight_gradients())
    return transposed_product_own_kernel(a, b, chunk);
  const int64_t row_bytes = std::max<int64_t>(1, N * static_cast<int64_t>(a.element_size()));
  const int64_t block = M * row_bytes > (int64_t(4) << 20) ? std::max<int64_t>(64, (int64_t(2) << 20) / row_bytes) : M;
  if (K == 0) return reusable_zeros({M, N}, a.options());
  // The first chunk overwrites (beta = 0: BLAS does not read the result), so the result
  // needs no zero fill (0.6 ms for the [2048, 1024] gradient of LSTM (50, 64, 512, 512)).
  at::Tensor result = reusable_empty({M, N}, a.options());
  for (int64_t first = 0; first < M; first += block) {
    const int64_t width = std::min(block, M - first);
    at::Tensor result_rows = result.narrow(0, first, width);
    for (int64_t start = 0; start < K; start += chunk) {
      const int64_t rows = std::min(chunk, K - start);
      result_rows.addmm_(a.narrow(0, start, rows).narrow(1, first, width).t(), b.narrow(0, start, rows),
                         /*beta=*/start == 0 ? 0 : 1);
    }
  }
  return result;
}

// The right-hand operand of dL/d(weights) = grad_gates^T @ [x | h_prev]: the gradients of
// weight_ih and weight_hh come out of one product (one pass over grad_gates). Blocks whose
// gradient is not needed are left out. (Bias gradients are column sums of grad_gates,
// taken with at::sum, whose cascade summation is what torch.nn's are taken with.) Two
// products instead, x read in place and no copies, ran BLAS 15-24% slower at the ops
// grid's small sizes (LSTM (200, 16, 128, 128) 225 -> 192 GFLOP/s, (100, 8, 64, 64) 161 ->
// 123, 2 threads), more than the copies cost; docs/cpu.md "Backward, per sequence". Below
// packing_pays_for_rows's rows the products are small and the copies of the result's blocks
// (the size of the weights, whatever the row count) are not: there it takes the two
// products (Elman RNN, (T, B, H) = (1, 1, 1024): two 4 MB copies a training step).
class WeightGradientOperand {
 public:
  // input: [rows, I] or undefined; hidden_width: P, or 0 when weight_hh needs no gradient.
  WeightGradientOperand(int64_t rows, const at::Tensor& input, int64_t hidden_width,
                        const at::TensorOptions& options) {
    if (input.defined() && hidden_width > 0 && !packing_pays_for_rows(rows)) {
      input_ = input;  // read in place by its own product
      matrix_ = reusable_empty({rows, hidden_width}, options);
      hidden_offset_ = 0;
      width_ = hidden_width;
      return;
    }
    int64_t width = 0;
    if (input.defined()) {
      input_offset_ = width;
      width += input.size(1);
    }
    if (hidden_width > 0) {
      hidden_offset_ = width;
      width += hidden_width;
    }
    width_ = width;
    if (input.defined() && hidden_width == 0 && input.is_contiguous()) {
      matrix_ = input;  // x alone (the GRU's input side, or W_hh frozen): read in place, never written
      return;
    }
    matrix_ = reusable_empty({rows, width}, options);
    if (input.defined()) matrix_.narrow(1, input_offset_, input.size(1)).copy_(input);
  }
  // The row stride of the operand's rows (those of h_{t-1} included).
  int64_t width() const { return width_; }
  // Where the caller writes h_{t-1} of row r: hidden_columns() + r * width().
  template <typename T>
  T* hidden_columns() const {
    return hidden_offset_ < 0 ? nullptr : matrix_.data_ptr<T>() + hidden_offset_;
  }
  // grad_gates [rows, G] -> the product [G, width], then its blocks.
  void multiply(const at::Tensor& grad_gates) {
    if (input_.defined()) input_product_ = transposed_product(grad_gates, input_);
    if (width_ > 0) product_ = transposed_product(grad_gates, matrix_);
  }
  at::Tensor input_block(int64_t size) const { return input_.defined() ? input_product_ : block(input_offset_, size); }
  at::Tensor hidden_block(int64_t size) const { return block(hidden_offset_, size); }

 private:
  // A block of the product's columns as a contiguous tensor, in a reused buffer (a fresh one
  // faulted in its pages: 2.1 ms for the two [2048, 512] blocks of LSTM (50, 64, 512, 512)).
  at::Tensor block(int64_t offset, int64_t size) const {
    if (offset < 0) return at::Tensor();
    const at::Tensor columns = product_.narrow(1, offset, size);
    if (columns.is_contiguous()) return columns;
    return reusable_empty(columns.sizes(), columns.options()).copy_(columns);
  }
  at::Tensor matrix_, product_;
  at::Tensor input_, input_product_;  // x and its product, where x is not part of matrix_
  int64_t input_offset_ = -1, hidden_offset_ = -1, width_ = 0;
};


// Sizes where the own kernel measured at least on par with the libraries (docs/cpu.md):
// batch up to 32, or a weight [N, K] of at most 1 MiB (it stays in L2 between steps).
inline bool own_step_kernel_suits(int64_t batch, int64_t N, int64_t K) {
  return batch <= 32 || N * K * static_cast<int64_t>(sizeof(float)) <= (int64_t(1) << 20);
}

// A weight [N, K] applied at each of `steps` steps as x @ weight^T, x [M <= batch, K]:
// packed once for the sequence by the kernel that suits the size, unless too few products
// follow to pay for it (packing_pays_for_steps): then at::mm reads it as it is.
class StepWeight {
 public:
  StepWeight(const at::Tensor& weight, int64_t batch, int64_t steps) : weight_(weight) {
    const int64_t N = weight.size(0), K = weight.size(1);
    if (!packing_pays_for_steps(steps, batch, weight.numel() * int64_t(weight.element_size()))) return;
    if (weight.scalar_type() == at::kFloat && own_kernel_enabled() && own_step_kernel_suits(batch, N, K)) {
      // B = weight^T as column panels, read through the weight's strides (it may be a transposed view).
      panels_ = packed_weight_panels(weight);
    } else if (!mkl_packed_preferred(weight) && use_onednn(weight) && big_enough_for_onednn(batch, N, K)) {
      torch::jit::Stack stack;
      stack.emplace_back(weight.contiguous());
      stack.emplace_back(c10::IValue(batch));
      OneDnnOps::get().reorder->callBoxed(&stack);
      onednn_packed_ = stack.back().toTensor();
    } else if (weight.scalar_type() == at::kFloat && MklPackedGemm::get().available) {
      const auto& mkl = MklPackedGemm::get();
      // B = weight^T (K x N): read from a row-major N x K weight as a transpose, or in place
      // where the weight is the transposed view of a row-major K x N matrix (the backward's
      // W_hh^T): its contiguous copy, a strided read, took 2.2-2.5 ms of the GRU and LSTM
      // (50, 64, 512, 512) backward.
      const bool transposed_view = weight.stride(0) == 1 && weight.stride(1) >= N;
      const at::Tensor w = transposed_view ? weight : weight.contiguous();
      // Uninitialized on purpose: MKL writes what it reads; zero-filling cost more than the packing.
      const int64_t bytes = static_cast<int64_t>(mkl.size(MklPackedGemm::kBMatrix, int(batch), int(N), int(K)));
      mkl_packed_ = reusable_empty({bytes / int64_t(sizeof(float)) + 1}, w.options());
      mkl.pack(MklPackedGemm::kRowMajor, MklPackedGemm::kBMatrix,
               transposed_view ? MklPackedGemm::kNoTrans : MklPackedGemm::kTrans, int(batch), int(N), int(K), 1.0f,
               w.data_ptr<float>(), int(transposed_view ? w.stride(1) : K), mkl_packed_.data_ptr<float>());
    }
  }
  // x [M, K] (contiguous rows) -> [M, N] (a new tensor)
  at::Tensor apply(const at::Tensor& x) const {
    if (onednn_packed_.defined()) return onednn_linear(x, onednn_packed_, c10::nullopt);
    at::Tensor out = reusable_empty({x.size(0), weight_.size(0)}, x.options());
    apply_into(x, out);
    return out;
  }
  // out [M, N] = x [M, K] @ weight^T, or += with accumulate; out a contiguous block of rows.
  void apply_into(const at::Tensor& x, at::Tensor out, bool accumulate = false) const {
    if (panels_.defined()) {
      const at::Tensor a = x.contiguous();
      panels_product(a.data_ptr<float>(), a.size(0), out.data_ptr<float>(), accumulate);
    } else if (onednn_packed_.defined()) {
      const at::Tensor product = onednn_linear(x, onednn_packed_, c10::nullopt);
      accumulate ? out.add_(product) : out.copy_(product);
    } else if (mkl_packed_.defined()) {
      const int64_t M = x.size(0), N = weight_.size(0), K = weight_.size(1);
      const at::Tensor a = x.contiguous();
      MklPackedGemm::get().compute(MklPackedGemm::kRowMajor, MklPackedGemm::kNoTrans, MklPackedGemm::kPacked, int(M),
                                   int(N), int(K), a.data_ptr<float>(), int(K), mkl_packed_.data_ptr<float>(), int(K),
                                   accumulate ? 1.0f : 0.0f, out.data_ptr<float>(), int(N));
    } else if (accumulate) {
      at::addmm_out(out, out, x, weight_.t());
    } else {
      at::mm_out(out, x, weight_.t());
    }
  }

  // The same on raw rows, without tensor bookkeeping on the per-step path where the MKL
  // packed product runs. x: [rows, K] contiguous. Returns where the [rows, N] result is:
  // `scratch`, or a oneDNN result kept alive in `holder` (both writable: callers may reuse
  // the product's memory within the step).
  template <typename T>
  T* multiply(const T* x, int64_t rows, T* scratch, at::Tensor& holder) const {
    if (onednn_packed_.defined()) {
      holder = apply(rows_tensor(x, rows, weight_.size(1)));
      return holder.template data_ptr<T>();
    }
    multiply_into(x, rows, scratch);
    return scratch;
  }
  // out [rows, N] = x [rows, K] @ weight^T, or += with accumulate.
  template <typename T>
  void multiply_into(const T* x, int64_t rows, T* out, bool accumulate = false) const {
    const int64_t N = weight_.size(0), K = weight_.size(1);
    if constexpr (std::is_same_v<T, float>) {
      if (panels_.defined()) {
        panels_product(x, rows, out, accumulate);
        return;
      }
      if (mkl_packed_.defined()) {
        MklPackedGemm::get().compute(MklPackedGemm::kRowMajor, MklPackedGemm::kNoTrans, MklPackedGemm::kPacked,
                                     int(rows), int(N), int(K), x, int(K), mkl_packed_.data_ptr<float>(), int(K),
                                     accumulate ? 1.0f : 0.0f, out, int(N));
        return;
      }
    }
    apply_into(rows_tensor(x, rows, K), rows_tensor(out, rows, N), accumulate);
  }

 private:
  // out [rows, N] (=|+=) x [rows, K] @ weight^T with the own kernel; the panels are split
  // across threads only where each thread gets enough work to pay for the hand-off.
  void panels_product(const float* x, int64_t rows, float* out, bool accumulate) const {
    const int64_t N = weight_.size(0), K = weight_.size(1);
    const float* panels = panels_.data_ptr<float>();
    const int64_t flops_per_panel = std::max<int64_t>(1, 2 * rows * K * kPanelWidth);
    const int64_t grain = std::max<int64_t>(1, 500000 / flops_per_panel);
    at::parallel_for(0, panel_count(N), grain, [&](int64_t begin, int64_t end) {
      small_gemm_panels(x, K, rows, K, panels, N, begin, end, out, N, accumulate);
    });
  }

  template <typename T>
  at::Tensor rows_tensor(const T* data, int64_t rows, int64_t cols) const {
    return at::from_blob(const_cast<T*>(data), {rows, cols}, weight_.options());
  }

  at::Tensor weight_;
  at::Tensor panels_;  // small_gemm_cpu.h's packed weight^T, when the own kernel runs
  at::Tensor onednn_packed_;
  at::Tensor mkl_packed_;  // MKL's packed layout of weight^T, opaque
};

}  // namespace cpu
}  // namespace rnntl
