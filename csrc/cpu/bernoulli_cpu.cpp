// rnntl_fast::bernoulli_draws_ on the CPU: fills out with the regularizers' draws,
// out[i] = value if u_i < probability else 0, u_i from the Philox stream of seed
// (csrc/include/rnntl/philox.h; docs/semantics.md section 10 defines it). Every entry is a
// function of (seed, numel, i) alone, so the torch threads split the tensor freely and the
// bits do not depend on how many there are. torch's own CPU uniform_ draws one number at a
// time from a Mersenne Twister (6-9 ns an entry here with the compare); this runs in vector
// lanes on every core (1.8 ns an entry on one thread, docs/benchmarks.md).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include <rnntl/philox.h>

#include "sequence_cpu.h"  // RNNTL_VECTOR_CLONES

namespace rnntl {
namespace cpu {
namespace {

// Counters per inner block: independent lanes, so the compiler runs the rounds of several
// counters in one vector register.
constexpr int64_t kLanes = 64;
// Counters per parallel chunk (4 draws each): a chunk is a few µs of work.
constexpr int64_t kCountersPerTask = 4096;

// The Philox words of counters first .. first + kLanes - 1: words[j][lane] is word j of
// counter first + lane. A clone per instruction set (32-bit multiplies in 8 or 16 lanes).
RNNTL_VECTOR_CLONES void philox_block(int64_t first, uint32_t key0, uint32_t key1, uint32_t (&words)[4][kLanes]) {
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    const uint64_t counter = uint64_t(first + lane);
    const PhiloxWords w = philox4x32_10(uint32_t(counter), uint32_t(counter >> 32), 0, 0, key0, key1);
    for (int j = 0; j < 4; ++j) words[j][lane] = w.word[j];
  }
}

// Counters [begin, end) of a draw of numel entries with `counters` counters. Word j of counter
// n is entry j * counters + n: each word of a block of counters fills a contiguous run of the
// output (vector compares and stores, no interleaving). Arguments by value: in the
// parallel_for closure, captured references kept the compare-and-store loop scalar.
template <typename T>
void fill_counters(T* out, int64_t numel, int64_t counters, int64_t begin, int64_t end, uint32_t key0,
                   uint32_t key1, uint32_t threshold, T value) {
  uint32_t words[4][kLanes];
  for (int64_t first = begin; first < end; first += kLanes) {
    philox_block(first, key0, key1, words);
    const int64_t lanes = std::min(kLanes, end - first);
    for (int j = 0; j < 4; ++j) {
      T* run = out + j * counters + first;
      const int64_t count = std::min(lanes, numel - (j * counters + first));  // the last word's run ends early
      for (int64_t lane = 0; lane < count; ++lane) run[lane] = (words[j][lane] >> 8) < threshold ? value : T(0);
    }
  }
}

template <typename T>
void fill_draws(T* out, int64_t numel, double probability, T value, uint64_t seed) {
  const uint32_t key0 = uint32_t(seed), key1 = uint32_t(seed >> 32);
  // u < probability with u = m / 2^24 (m the word's top 24 bits) is m < ceil(probability * 2^24):
  // an integer compare, exact for every probability in [0, 1].
  const uint32_t threshold = uint32_t(std::ceil(probability * 16777216.0));
  const int64_t counters = (numel + 3) / 4;
  at::parallel_for(0, counters, kCountersPerTask, [=](int64_t begin, int64_t end) {
    fill_counters(out, numel, counters, begin, end, key0, key1, threshold, value);
  });
}

void bernoulli_draws_cpu(at::Tensor& out, double probability, double value, const at::Tensor& seed) {
  TORCH_CHECK(out.is_contiguous(), "bernoulli_draws_: out must be contiguous");
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), "bernoulli_draws_: out must be a floating-point tensor, got ",
              out.scalar_type());
  TORCH_CHECK(probability >= 0.0 && probability <= 1.0, "bernoulli_draws_: probability must be in [0, 1], got ",
              probability);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "bernoulli_draws_: seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(), " ",
              seed.sizes(), " on ", seed.device());
  const uint64_t seed_bits = uint64_t(seed.item<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bernoulli_draws_", [&] {
    fill_draws<scalar_t>(out.data_ptr<scalar_t>(), out.numel(), probability, scalar_t(value), seed_bits);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace rnntl

TORCH_LIBRARY_IMPL(rnntl_fast, CPU, m) { m.impl("bernoulli_draws_", &rnntl::cpu::bernoulli_draws_cpu); }
