// Counter-based random draws for the regularizers' masks (docs/semantics.md section 10):
// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
// which turns a 128-bit counter and a 64-bit key into four 32-bit words. Entry i of a mask
// of numel entries is a pure function of (seed, numel, i), so any number of threads (or GPU
// threads) can fill any part of a mask and the result is the same bits. With
// C = ceil(numel / 4) counters:
//
//   words(seed, n)  = Philox-4x32-10(counter = (n mod 2^32, n div 2^32, 0, 0),
//                                    key = (seed mod 2^32, seed div 2^32))
//   u_i            = (words(seed, i mod C)[i div C] >> 8) * 2^-24     (uniform in [0, 1))
//   draw_i         = value if u_i < probability else 0
//
// No torch and no CUDA headers: the CPU op (csrc/cpu/bernoulli_cpu.cpp) includes it, and a
// CUDA kernel can (RNNTL_HOST_DEVICE_INLINE is empty on the host).
#pragma once

#include <cstdint>

#ifndef RNNTL_PHILOX_INLINE
#if defined(__CUDACC__)
#define RNNTL_PHILOX_INLINE __host__ __device__ __forceinline__
#else
#define RNNTL_PHILOX_INLINE inline
#endif
#endif

namespace rnntl {

struct PhiloxWords {
  uint32_t word[4];
};

// The published round constants: the two multipliers and the key increments (the golden
// ratio and sqrt(3) - 1, as 32-bit fractions).
constexpr uint32_t kPhiloxMultiplier0 = 0xD2511F53u, kPhiloxMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyStep0 = 0x9E3779B9u, kPhiloxKeyStep1 = 0xBB67AE85u;

RNNTL_PHILOX_INLINE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                              uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxKeyStep0;
      k1 += kPhiloxKeyStep1;
    }
    const uint64_t product0 = uint64_t(kPhiloxMultiplier0) * c0;
    const uint64_t product1 = uint64_t(kPhiloxMultiplier1) * c2;
    const uint32_t next0 = uint32_t(product1 >> 32) ^ c1 ^ k0;
    const uint32_t next2 = uint32_t(product0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(product1);
    c3 = uint32_t(product0);
    c0 = next0;
    c2 = next2;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// u in [0, 1) from one 32-bit word: its top 24 bits, so every value is exact in float32.
RNNTL_PHILOX_INLINE float philox_uniform(uint32_t word) { return float(word >> 8) * (1.0f / 16777216.0f); }

}  // namespace rnntl
