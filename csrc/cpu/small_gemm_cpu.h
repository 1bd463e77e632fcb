// A float32 matrix product for the per-step recurrent products of the CPU kernels:
// out [M, N] (=|+=) x [M, K] @ B [K, N], where M is a batch of at most a few dozen rows and
// B (a weight, transposed) is the same at every step of a sequence.
//
// B is packed once per sequence into column panels of kPanelWidth columns (the last one
// zero-padded): panel p holds B[k][p*16 + c] at packed[(p*K + k)*16 + c]. One step then reads
// each panel once, straight through, and keeps a block of up to 6 rows x 16 columns (or
// 1-2 rows x 64 columns) of the result in registers over the whole K loop; there is no
// per-call setup, which is what a library call costs most at these sizes.
//
// Torch-free on purpose (plain pointers), so that it builds and tests on its own.
#pragma once

#include <cstdint>

namespace rnntl {
namespace cpu {

constexpr int64_t kPanelWidth = 16;
// K chunk of the products (a panel's chunk, 16 KB, stays in L1 while every row block reads
// it); small_gemm_panels always uses it, gemm_panels callers pass it unless accuracy needs less.
constexpr int64_t kDepthChunk = 256;

inline int64_t panel_count(int64_t N) { return (N + kPanelWidth - 1) / kPanelWidth; }
// Floats in the packed B of a [K, N] matrix.
inline int64_t packed_panels_size(int64_t N, int64_t K) { return panel_count(N) * K * kPanelWidth; }

// B[k][n] = weight[n * stride_n + k * stride_k] (weight is [N, K], any strides: B = weight^T).
void pack_panels(const float* weight, int64_t N, int64_t K, int64_t stride_n, int64_t stride_k, float* packed);

// out [M, N] (row stride ldo) = x [M, K] (row stride ldx) @ B, or += with accumulate, over
// the columns of panels [panel_begin, panel_end) only (so callers can split panels across
// threads). Rows of x and out must not overlap.
void small_gemm_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* packed, int64_t N,
                       int64_t panel_begin, int64_t panel_end, float* out, int64_t ldo, bool accumulate);

// The whole-sequence products (many rows): out [M, N] (=|+=) A @ B over all panels, where
// A[m][k] = a[m * row_stride + k * depth_stride] (so A may be a transposed view, as in the
// weight gradients grad_gates^T @ x). Rows go in chunks that stay in cache; K goes in
// chunks of depth_chunk, each chunk's partial product added to the result in turn, which
// bounds how deep a float32 sum grows (callers pick about sqrt(K) where accuracy needs it).
// bias: [N] added to each row, or nullptr (ignored with accumulate).
void gemm_panels(const float* a, int64_t row_stride, int64_t depth_stride, int64_t M, int64_t K, const float* packed,
                 int64_t N, const float* bias, float* out, int64_t ldo, bool accumulate, int64_t depth_chunk);

// Which code small_gemm_panels runs on this CPU: "avx512", "avx2" or "portable".
const char* small_gemm_variant();

}  // namespace cpu
}  // namespace rnntl
