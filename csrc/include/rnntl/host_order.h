// Batch order of a variable-length sequence, computed on the host (lengths always live on
// the CPU) and shared by the CUDA glue and the CPU emulation tests. Same rule as
// SequenceOrder in csrc/cpu/sequence_cpu.h: slot j holds batch row order[j], rows sorted
// by length, longest first (stable), so the rows running at step t are slots [0, active[t]).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace rnntl {

struct HostOrder {
  int64_t steps, batch;
  // packed = [order (B), length by batch row (B), active (T)]: one host-to-device copy.
  std::vector<int64_t> packed;

  // lengths: [B] host int64, or null (every row runs all T steps).
  HostOrder(const int64_t* lengths, int64_t steps_, int64_t batch_) : steps(steps_), batch(batch_) {
    packed.assign(2 * batch + steps, 0);
    int64_t* order = packed.data();
    int64_t* length = order + batch;
    int64_t* active = length + batch;
    std::iota(order, order + batch, 0);
    for (int64_t b = 0; b < batch; ++b) length[b] = lengths ? lengths[b] : steps;
    std::stable_sort(order, order + batch, [&](int64_t a, int64_t b) { return length[a] > length[b]; });
    for (int64_t t = 0; t < steps; ++t) {
      int64_t n = 0;
      while (n < batch && length[order[n]] > t) ++n;
      active[t] = n;
    }
  }
  const int64_t* active_host() const { return packed.data() + 2 * batch; }
  // Pointers into a device copy of `packed`.
  static const int64_t* order_in(const int64_t* device) { return device; }
  const int64_t* length_in(const int64_t* device) const { return device + batch; }
  const int64_t* active_in(const int64_t* device) const { return device + 2 * batch; }
};

}  // namespace rnntl
