// The counter-based generator of the regularizers' masks (csrc/include/rnntl/philox.h) on its
// own, without torch: Philox-4x32-10 against the known-answer vectors published with the
// algorithm (Random123's kat_vectors), and the 24-bit uniform built from a word.
#include <rnntl/philox.h>

#include <cstdio>

namespace {
struct KnownAnswer {
  uint32_t counter[4], key[2], expected[4];
};

const KnownAnswer kKnownAnswers[] = {
    {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};
}  // namespace

int main() {
  int failures = 0;
  for (const KnownAnswer& k : kKnownAnswers) {
    const rnntl::PhiloxWords w =
        rnntl::philox4x32_10(k.counter[0], k.counter[1], k.counter[2], k.counter[3], k.key[0], k.key[1]);
    for (int j = 0; j < 4; ++j) {
      if (w.word[j] != k.expected[j]) {
        std::printf("FAIL philox4x32_10 counter %08x...: word %d is %08x, want %08x\n", k.counter[0], j, w.word[j],
                    k.expected[j]);
        ++failures;
      }
    }
  }
  // The uniform keeps a word's top 24 bits: 0 -> 0, all ones -> 1 - 2^-24 (below 1).
  if (rnntl::philox_uniform(0u) != 0.0f || rnntl::philox_uniform(0xffffffffu) != 1.0f - 1.0f / 16777216.0f ||
      rnntl::philox_uniform(0x80000000u) != 0.5f) {
    std::printf("FAIL philox_uniform\n");
    ++failures;
  }
  std::printf("%s: test_philox\n", failures ? "FAILED" : "passed");
  return failures ? 1 : 0;
}
