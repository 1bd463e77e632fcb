// The products of small_gemm_cpu.h: register-blocked kernels for AVX-512F and for
// AVX2/FMA (one code, small_gemm_blocks.inc, compiled once per instruction set), chosen at
// run time from what the CPU has, and a portable loop otherwise. Built with
// -DRNNTL_SMALL_GEMM_PORTABLE only the portable loop exists, with -DRNNTL_SMALL_GEMM_NO_AVX512
// no AVX-512 code: the C++ tests use both to check every variant on one machine.
#include "small_gemm_cpu.h"

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(RNNTL_SMALL_GEMM_PORTABLE)
#include <immintrin.h>
#define RNNTL_SMALL_GEMM_X86 1
#endif

namespace rnntl {
namespace cpu {
namespace {

// The operands of one product as both entry points pass them: out [M, N] (=|+=) A @ B over
// the columns of panels [panel_begin, panel_end), A[m][k] = a[m * row_stride + k * depth_stride],
// K summed in chunks of depth_chunk (each added to the result in turn), bias (or nullptr)
// added where a result is first stored.
struct Product {
  const float* a;
  int64_t row_stride, depth_stride, M, K;
  const float* packed;
  int64_t N, panel_begin, panel_end;
  const float* bias;
  float* out;
  int64_t ldo;
  bool accumulate;
  int64_t depth_chunk;
};

// One panel and one row at a time; the 16-wide inner loop vectorizes for the baseline ISA.
// The same sums in the same order as the vector code.
void portable_product(const Product& g) {
  for (int64_t p = g.panel_begin; p < g.panel_end; ++p) {
    const int64_t first_col = p * kPanelWidth, cols = std::min(kPanelWidth, g.N - first_col);
    for (int64_t r = 0; r < g.M; ++r) {
      float* o = g.out + r * g.ldo + first_col;
      for (int64_t k0 = 0; k0 < g.K || k0 == 0; k0 += g.depth_chunk) {
        float acc[kPanelWidth] = {};
        const float* panel = g.packed + (p * g.K + k0) * kPanelWidth;
        for (int64_t k = k0; k < std::min(g.K, k0 + g.depth_chunk); ++k) {
          const float value = g.a[r * g.row_stride + k * g.depth_stride];
          const float* b = panel + (k - k0) * kPanelWidth;
          for (int64_t c = 0; c < kPanelWidth; ++c) acc[c] += value * b[c];
        }
        const bool add = g.accumulate || k0 > 0;
        for (int64_t c = 0; c < cols; ++c)
          o[c] = add ? o[c] + acc[c] : (g.bias ? acc[c] + g.bias[first_col + c] : acc[c]);
      }
    }
  }
}

// Rows in chunks of kRowChunk for the products over many rows (a chunk's rows stay in L2);
// each chunk in balanced blocks of at most `most` rows: block i of `blocks` starts at
// row_block_start(i), so sizes differ by at most one (32 rows in blocks of 6: 6+6+5+5+5+5,
// not 6+6+6+6+6+2, whose 2-row block waits on FMA latency with few accumulators).
constexpr int64_t kRowChunk = 96;
inline int64_t row_blocks_of(int64_t rows, int64_t most) { return (rows + most - 1) / most; }
inline int64_t row_block_start(int64_t i, int64_t rows, int64_t blocks) {
  return i * (rows / blocks) + std::min(i, rows % blocks);
}

#ifdef RNNTL_SMALL_GEMM_X86
// AVX2 + FMA: 8 floats a register, 16 registers: blocks of 6 rows x 1 panel (12
// accumulators); 1 row: 4 panels side by side (8 accumulators), 2 rows: 3 (12).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Vector {
  using Register = __m256;
  static constexpr int kFloats = 8;
  static constexpr int kBlockRows = 6, kBlockPanels = 1;
  static constexpr int64_t kSideBySide[2] = {4, 3};
  static Register zero() { return _mm256_setzero_ps(); }
  static Register load(const float* p) { return _mm256_loadu_ps(p); }
  static Register broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Register fmadd(Register a, Register b, Register c) { return _mm256_fmadd_ps(a, b, c); }
  static Register add(Register a, Register b) { return _mm256_add_ps(a, b); }
  static void store(float* p, Register v) { _mm256_storeu_ps(p, v); }
};
#include "small_gemm_blocks.inc"
}  // namespace avx2
#pragma GCC pop_options

#ifndef RNNTL_SMALL_GEMM_NO_AVX512
// AVX-512F: one register a panel, 32 registers: blocks of 8 rows x 2 panels (16
// accumulators, 2 panel loads per 8 broadcasts); 1 row: 8 panels side by side, 2 rows: 4.
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
struct Vector {
  using Register = __m512;
  static constexpr int kFloats = 16;
  static constexpr int kBlockRows = 8, kBlockPanels = 2;
  static constexpr int64_t kSideBySide[2] = {8, 4};
  static Register zero() { return _mm512_setzero_ps(); }
  static Register load(const float* p) { return _mm512_loadu_ps(p); }
  static Register broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Register fmadd(Register a, Register b, Register c) { return _mm512_fmadd_ps(a, b, c); }
  static Register add(Register a, Register b) { return _mm512_add_ps(a, b); }
  static void store(float* p, Register v) { _mm512_storeu_ps(p, v); }
};
#include "small_gemm_blocks.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

// The instruction set the products run with, chosen once from what the CPU has.
enum class Variant { portable, avx2, avx512 };
Variant variant() {
  static const Variant chosen = [] {
#ifndef RNNTL_SMALL_GEMM_NO_AVX512
    if (__builtin_cpu_supports("avx512f")) return Variant::avx512;
#endif
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Variant::avx2;
    return Variant::portable;
  }();
  return chosen;
}
#else
enum class Variant { portable };
Variant variant() { return Variant::portable; }
#endif  // RNNTL_SMALL_GEMM_X86

}  // namespace

void pack_panels(const float* weight, int64_t N, int64_t K, int64_t stride_n, int64_t stride_k, float* packed) {
  for (int64_t p = 0; p < panel_count(N); ++p) {
    float* panel = packed + p * K * kPanelWidth;
    const int64_t first = p * kPanelWidth, cols = std::min(kPanelWidth, N - first);
    if (stride_k == 1) {
      // Rows of the weight are contiguous: read each straight through (the panel, at most
      // K * 64 bytes, takes the strided writes in cache).
      for (int64_t c = 0; c < kPanelWidth; ++c) {
        if (c < cols) {
          const float* row = weight + (first + c) * stride_n;
          for (int64_t k = 0; k < K; ++k) panel[k * kPanelWidth + c] = row[k];
        } else {
          for (int64_t k = 0; k < K; ++k) panel[k * kPanelWidth + c] = 0.0f;
        }
      }
      continue;
    }
    if (stride_n == 1 && cols == kPanelWidth) {
      // A transposed view of a row-major matrix (the input gradient's W_ih): a panel's
      // columns of one depth step are contiguous.
      for (int64_t k = 0; k < K; ++k) {
        const float* src = weight + first + k * stride_k;
        float* dst = panel + k * kPanelWidth;
        for (int64_t c = 0; c < kPanelWidth; ++c) dst[c] = src[c];
      }
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      float* dst = panel + k * kPanelWidth;
      const float* src = weight + first * stride_n + k * stride_k;
      for (int64_t c = 0; c < kPanelWidth; ++c) dst[c] = c < cols ? src[c * stride_n] : 0.0f;
    }
  }
}

void small_gemm_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* packed, int64_t N,
                       int64_t panel_begin, int64_t panel_end, float* out, int64_t ldo, bool accumulate) {
  if (M <= 0 || panel_begin >= panel_end) return;
#ifdef RNNTL_SMALL_GEMM_X86
#ifndef RNNTL_SMALL_GEMM_NO_AVX512
  if (variant() == Variant::avx512)
    return avx512::step_product(x, ldx, M, K, packed, N, panel_begin, panel_end, out, ldo, accumulate);
#endif
  if (variant() == Variant::avx2)
    return avx2::step_product(x, ldx, M, K, packed, N, panel_begin, panel_end, out, ldo, accumulate);
#endif
  portable_product(Product{x, ldx, 1, M, K, packed, N, panel_begin, panel_end, nullptr, out, ldo, accumulate,
                           kDepthChunk});
}

void gemm_panels(const float* a, int64_t row_stride, int64_t depth_stride, int64_t M, int64_t K, const float* packed,
                 int64_t N, const float* bias, float* out, int64_t ldo, bool accumulate, int64_t depth_chunk) {
  if (M <= 0) return;
  const Product g{a, row_stride, depth_stride, M, K, packed, N, 0, panel_count(N), bias, out, ldo, accumulate,
                  std::max<int64_t>(1, depth_chunk)};
#ifdef RNNTL_SMALL_GEMM_X86
#ifndef RNNTL_SMALL_GEMM_NO_AVX512
  if (variant() == Variant::avx512) return avx512::sequence_product(g);
#endif
  if (variant() == Variant::avx2) return avx2::sequence_product(g);
#endif
  portable_product(g);
}

const char* small_gemm_variant() {
  switch (variant()) {
#ifdef RNNTL_SMALL_GEMM_X86
    case Variant::avx512: return "avx512";
    case Variant::avx2: return "avx2";
#endif
    default: return "portable";
  }
}

}  // namespace cpu
}  // namespace rnntl
