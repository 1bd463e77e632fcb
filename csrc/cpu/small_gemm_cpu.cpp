// The products of small_gemm_cpu.h: an AVX2/FMA register-blocked kernel, chosen at
// run time where the CPU has it, and a portable loop otherwise (also when built with
// -DRNNTL_SMALL_GEMM_PORTABLE, which the C++ tests use to check that loop).
#include "small_gemm_cpu.h"

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(RNNTL_SMALL_GEMM_PORTABLE)
#include <immintrin.h>
#define RNNTL_SMALL_GEMM_AVX2 1
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
// The same sums in the same order as the AVX2 code.
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

#ifdef RNNTL_SMALL_GEMM_AVX2
#define RNNTL_AVX2 __attribute__((target("avx2,fma")))

// A block of kRows rows x kPanels panels (16*kPanels columns) of the result, kept in
// 2*kRows*kPanels ymm registers over the whole K loop. x: the block's first row;
// panel: its first panel (the next ones follow at panel_stride floats); out: the block's
// top-left element; cols: how many of its columns exist (the last panel may be padding).
// x's elements of one row follow each other (kUnitDepth), or are depth_stride apart.
template <int kRows, int kPanels, bool kUnitDepth = true>
RNNTL_AVX2 __attribute__((always_inline)) inline void block_avx2(const float* x, int64_t ldx, int64_t K,
                                                                  const float* panel, int64_t panel_stride,
                                                                  float* out, int64_t ldo, int64_t cols,
                                                                  bool accumulate, int64_t depth_stride = 1,
                                                                  const float* bias = nullptr) {
  const int64_t xk = kUnitDepth ? 1 : depth_stride;
  constexpr int kVectors = 2 * kPanels;  // 8-float vectors per row of the block
  __m256 acc[kRows][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[kVectors];
#pragma GCC unroll 8
    for (int q = 0; q < kPanels; ++q) {
      b[2 * q] = _mm256_loadu_ps(panel + q * panel_stride + k * kPanelWidth);
      b[2 * q + 1] = _mm256_loadu_ps(panel + q * panel_stride + k * kPanelWidth + 8);
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k * xk);
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    float* o = out + r * ldo;
    if (cols == kVectors * 8) {
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) {
        __m256 value = acc[r][v];
        if (accumulate) value = _mm256_add_ps(value, _mm256_loadu_ps(o + 8 * v));
        else if (bias) value = _mm256_add_ps(value, _mm256_loadu_ps(bias + 8 * v));
        _mm256_storeu_ps(o + 8 * v, value);
      }
    } else {
      alignas(32) float tail[kVectors * 8];
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) _mm256_store_ps(tail + 8 * v, acc[r][v]);
      for (int64_t c = 0; c < cols; ++c) o[c] = accumulate ? o[c] + tail[c] : (bias ? tail[c] + bias[c] : tail[c]);
    }
  }
}

// Rows in chunks of kRowChunk (for products over many rows: a chunk's rows stay in L2), each
// chunk in blocks of at most 6 rows (12 accumulators), balanced: block i of `blocks` starts
// at row_block_start(i), so sizes differ by at most one (32 rows: 6+6+5+5+5+5, not
// 6+6+6+6+6+2, whose 2-row block waits on FMA latency with only 4 accumulators). For each
// panel, K runs in depth chunks (of at most kDepthChunk for the per-step products, so that
// the panel's chunk, 16 KB, stays in L1 while every row block reads it); the blocks after
// the first chunk add to the result.
constexpr int64_t kRowChunk = 96;

inline int64_t row_blocks(int64_t rows) { return (rows + 5) / 6; }
inline int64_t row_block_start(int64_t i, int64_t rows, int64_t blocks) {
  return i * (rows / blocks) + std::min(i, rows % blocks);
}

template <bool kUnitDepth>
RNNTL_AVX2 void row_blocks_avx2(const Product& g) {
  const int64_t panel_stride = g.K * kPanelWidth;
  for (int64_t r0 = 0; r0 < g.M; r0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, g.M - r0);
    const int64_t blocks = row_blocks(rows);
    for (int64_t p = g.panel_begin; p < g.panel_end; ++p) {
      const int64_t first_col = p * kPanelWidth, cols = std::min(kPanelWidth, g.N - first_col);
      for (int64_t k0 = 0; k0 < g.K || k0 == 0; k0 += g.depth_chunk) {
        const int64_t depth = std::min(g.depth_chunk, g.K - k0);
        const float* panel = g.packed + p * panel_stride + k0 * kPanelWidth;
        const bool add = g.accumulate || k0 > 0;
        const float* panel_bias = g.bias && !add ? g.bias + first_col : nullptr;
        for (int64_t block = 0; block < blocks; ++block) {
          const int64_t r = r0 + row_block_start(block, rows, blocks);
          const float* ab = g.a + r * g.row_stride + k0 * g.depth_stride;
          float* ob = g.out + r * g.ldo + first_col;
          switch (r0 + row_block_start(block + 1, rows, blocks) - r) {
#define RNNTL_ROW_BLOCK_CASE(n)                                                                                 \
  block_avx2<n, 1, kUnitDepth>(ab, g.row_stride, depth, panel, panel_stride, ob, g.ldo, cols, add, g.depth_stride, \
                               panel_bias);                                                                      \
  break;
            case 1: RNNTL_ROW_BLOCK_CASE(1)
            case 2: RNNTL_ROW_BLOCK_CASE(2)
            case 3: RNNTL_ROW_BLOCK_CASE(3)
            case 4: RNNTL_ROW_BLOCK_CASE(4)
            case 5: RNNTL_ROW_BLOCK_CASE(5)
            default: RNNTL_ROW_BLOCK_CASE(6)
#undef RNNTL_ROW_BLOCK_CASE
          }
        }
      }
    }
  }
}

// One or two rows: several panels side by side, so that enough independent accumulators
// (8) hide the FMA latency.
template <int kRows>
RNNTL_AVX2 void panels_side_by_side(const float* x, int64_t ldx, int64_t K, const float* packed, int64_t N,
                                    int64_t panel_begin, int64_t panel_end, float* out, int64_t ldo,
                                    bool accumulate) {
  constexpr int64_t kGroup = kRows == 1 ? 4 : 3;
  const int64_t panel_stride = K * kPanelWidth;
  for (int64_t p = panel_begin; p < panel_end; p += kGroup) {
    const float* panel = packed + p * panel_stride;
    const int64_t first_col = p * kPanelWidth;
    const int64_t group = std::min(kGroup, panel_end - p);
    const int64_t cols = std::min(group * kPanelWidth, N - first_col);
    float* ob = out + first_col;
    switch (group) {
      case 1: block_avx2<kRows, 1>(x, ldx, K, panel, panel_stride, ob, ldo, cols, accumulate); break;
      case 2: block_avx2<kRows, 2>(x, ldx, K, panel, panel_stride, ob, ldo, cols, accumulate); break;
      case 3: block_avx2<kRows, 3>(x, ldx, K, panel, panel_stride, ob, ldo, cols, accumulate); break;
      default:
        if constexpr (kGroup == 4) block_avx2<kRows, 4>(x, ldx, K, panel, panel_stride, ob, ldo, cols, accumulate);
        break;
    }
  }
}

RNNTL_AVX2 void avx2_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* packed, int64_t N,
                            int64_t panel_begin, int64_t panel_end, float* out, int64_t ldo, bool accumulate) {
  if (M == 1) {
    panels_side_by_side<1>(x, ldx, K, packed, N, panel_begin, panel_end, out, ldo, accumulate);
  } else if (M == 2) {
    panels_side_by_side<2>(x, ldx, K, packed, N, panel_begin, panel_end, out, ldo, accumulate);
  } else {
    row_blocks_avx2<true>(Product{x, ldx, 1, M, K, packed, N, panel_begin, panel_end, nullptr, out, ldo, accumulate,
                                  kDepthChunk});
  }
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif  // RNNTL_SMALL_GEMM_AVX2

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
#ifdef RNNTL_SMALL_GEMM_AVX2
  if (cpu_has_avx2()) {
    avx2_panels(x, ldx, M, K, packed, N, panel_begin, panel_end, out, ldo, accumulate);
    return;
  }
#endif
  portable_product(Product{x, ldx, 1, M, K, packed, N, panel_begin, panel_end, nullptr, out, ldo, accumulate,
                           kDepthChunk});
}

void gemm_panels(const float* a, int64_t row_stride, int64_t depth_stride, int64_t M, int64_t K, const float* packed,
                 int64_t N, const float* bias, float* out, int64_t ldo, bool accumulate, int64_t depth_chunk) {
  if (M <= 0) return;
  const Product g{a, row_stride, depth_stride, M, K, packed, N, 0, panel_count(N), bias, out, ldo, accumulate,
                  std::max<int64_t>(1, depth_chunk)};
#ifdef RNNTL_SMALL_GEMM_AVX2
  if (cpu_has_avx2()) {
    depth_stride == 1 ? row_blocks_avx2<true>(g) : row_blocks_avx2<false>(g);
    return;
  }
#endif
  portable_product(g);
}

const char* small_gemm_variant() {
#ifdef RNNTL_SMALL_GEMM_AVX2
  if (cpu_has_avx2()) return "avx2";
#endif
  return "portable";
}

}  // namespace cpu
}  // namespace rnntl
