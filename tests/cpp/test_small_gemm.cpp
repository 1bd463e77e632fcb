// The per-step product kernel (csrc/cpu/small_gemm_cpu.h) on its own, against a double
// loop: odd sizes (partial last panel, row counts that are not a multiple of the row
// block), 1 and 2 rows (the side-by-side panel path), K past one depth chunk, strided
// (transposed) weights, accumulate, and panel sub-ranges as the threads split them; and the
// whole-sequence product gemm_panels: more rows than one row chunk, A stored transposed
// (depth stride), a bias, accumulate, and depth chunks of several sizes.
#include "small_gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {
int failures = 0;

// out = x @ weight^T (weight [N, K] row-major), optionally transposed storage.
void check(int64_t M, int64_t K, int64_t N, bool transposed_weight, bool accumulate, int64_t ld_pad,
           std::mt19937& rng) {
  using namespace rnntl::cpu;
  std::normal_distribution<float> normal;
  const int64_t ldx = K + ld_pad, ldo = N + ld_pad;
  std::vector<float> x(M * ldx), weight(N * K), out(M * ldo), start(M * ldo);
  for (auto& v : x) v = normal(rng);
  for (auto& v : weight) v = normal(rng);
  for (auto& v : start) v = normal(rng);
  // Stored as [K, N] when transposed: element (n, k) at k * N + n.
  std::vector<float> stored(weight.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) stored[transposed_weight ? k * N + n : n * K + k] = weight[n * K + k];
  std::vector<float> packed(packed_panels_size(N, K));
  pack_panels(stored.data(), N, K, transposed_weight ? 1 : K, transposed_weight ? N : 1, packed.data());
  // Two calls over a split of the panels, as parallel_for gives them.
  const int64_t panels = panel_count(N), split = panels / 2;
  out = start;
  small_gemm_panels(x.data(), ldx, M, K, packed.data(), N, 0, split, out.data(), ldo, accumulate);
  small_gemm_panels(x.data(), ldx, M, K, packed.data(), N, split, panels, out.data(), ldo, accumulate);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldo; ++n) {
      const float got = out[m * ldo + n];
      if (n >= N) {  // padding columns of out are never written
        if (got != start[m * ldo + n]) {
          std::printf("FAIL M=%ld K=%ld N=%ld: wrote past column N\n", long(M), long(K), long(N));
          ++failures;
          return;
        }
        continue;
      }
      double want = accumulate ? start[m * ldo + n] : 0.0, magnitude = std::fabs(want);
      for (int64_t k = 0; k < K; ++k) {
        want += double(x[m * ldx + k]) * weight[n * K + k];
        magnitude += std::fabs(double(x[m * ldx + k]) * weight[n * K + k]);
      }
      if (!(std::fabs(got - want) <= 1e-6 * (K + 1) * magnitude + 1e-30)) {
        std::printf("FAIL M=%ld K=%ld N=%ld transposed=%d accumulate=%d at (%ld, %ld): got %.9g want %.9g\n",
                    long(M), long(K), long(N), int(transposed_weight), int(accumulate), long(m), long(n), got, want);
        ++failures;
        return;
      }
    }
  }
}
// out (=|+=) A @ weight^T (+ bias) by gemm_panels; A [M, K] stored row-major or as [K, M].
void check_large(int64_t M, int64_t K, int64_t N, bool transposed_a, bool with_bias, bool accumulate,
                 int64_t depth_chunk, std::mt19937& rng) {
  using namespace rnntl::cpu;
  std::normal_distribution<float> normal;
  const int64_t ldo = N + 3;
  std::vector<float> a(M * K), weight(N * K), bias(N), out(M * ldo), start(M * ldo);
  for (auto& v : a) v = normal(rng);
  for (auto& v : weight) v = normal(rng);
  for (auto& v : bias) v = normal(rng);
  for (auto& v : start) v = normal(rng);
  const int64_t row_stride = transposed_a ? 1 : K, depth_stride = transposed_a ? M : 1;
  std::vector<float> packed(packed_panels_size(N, K));
  pack_panels(weight.data(), N, K, K, 1, packed.data());
  out = start;
  gemm_panels(a.data(), row_stride, depth_stride, M, K, packed.data(), N, with_bias ? bias.data() : nullptr,
              out.data(), ldo, accumulate, depth_chunk);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < ldo; ++n) {
      const float got = out[m * ldo + n];
      if (n >= N) {
        if (got != start[m * ldo + n]) {
          std::printf("FAIL gemm_panels M=%ld K=%ld N=%ld: wrote past column N\n", long(M), long(K), long(N));
          ++failures;
          return;
        }
        continue;
      }
      double want = accumulate ? start[m * ldo + n] : (with_bias ? bias[n] : 0.0), magnitude = std::fabs(want);
      for (int64_t k = 0; k < K; ++k) {
        const double term = double(a[m * row_stride + k * depth_stride]) * weight[n * K + k];
        want += term;
        magnitude += std::fabs(term);
      }
      if (!(std::fabs(got - want) <= 1e-6 * (K + 1) * magnitude + 1e-30)) {
        std::printf("FAIL gemm_panels M=%ld K=%ld N=%ld transposed_a=%d bias=%d accumulate=%d chunk=%ld at (%ld, %ld): "
                    "got %.9g want %.9g\n",
                    long(M), long(K), long(N), int(transposed_a), int(with_bias), int(accumulate), long(depth_chunk),
                    long(m), long(n), got, want);
        ++failures;
        return;
      }
    }
  }
}
}  // namespace

int main() {
  std::mt19937 rng(7);
  int cases = 0;
  for (int64_t M : {1, 2, 3, 5, 6, 7, 8, 9, 13, 16, 17, 24, 33})
    for (int64_t K : {1, 7, 64, 300})
      for (int64_t N : {1, 15, 16, 17, 40, 80, 100, 260})
        for (bool transposed : {false, true})
          for (bool accumulate : {false, true}) {
            check(M, K, N, transposed, accumulate, (M + K + N) % 3, rng);
            ++cases;
          }
  for (int64_t M : {1, 5, 6, 9, 97, 200})
    for (int64_t K : {1, 37, 300})
      for (int64_t N : {1, 17, 48, 64})
        for (bool transposed_a : {false, true})
          for (int64_t depth_chunk : {int64_t(1), int64_t(16), int64_t(256)}) {
            check_large(M, K, N, transposed_a, /*with_bias=*/(M + N) % 2 == 0, /*accumulate=*/false, depth_chunk, rng);
            check_large(M, K, N, transposed_a, /*with_bias=*/true, /*accumulate=*/true, depth_chunk, rng);
            cases += 2;
          }
  std::printf("small_gemm (%s): %d cases, %d failures\n", rnntl::cpu::small_gemm_variant(), cases, failures);
  return failures == 0 ? 0 : 1;
}
