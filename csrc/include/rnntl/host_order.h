// Batch order of a variable-length sequence, computed on the host (lengths always live on
// the CPU) and shared by the CUDA glue and the CPU emulation tests. Same rule as
// SequenceOrder in csrc/cpu/sequence_cpu.h: slot j holds batch row order[j], rows sorted
// by length, longest first (stable), so the rows running at step t are slots [0, active[t]).
//
// Compact rows (the layout of the CUDA ops' whole-sequence work buffers, and the CPU ops'
// valid-row layout): only the N valid (step, slot) pairs, step by step in time order, slot
// order within a step; (t, slot j) is compact row first_row[t] + j. Padded steps have no
// compact row, so they never enter a product. Without lengths (and whenever every row runs
// all T steps in batch order) it is the padded [T, B] layout: compact_is_padded().
#pragma once

#include <rnntl/params.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace rnntl {

struct HostOrder {
  int64_t steps, batch;
  // packed = [order (B), length by batch row (B), active (T), first_row (T + 1), slot by
  // batch row (B)]: one host-to-device copy. first_row[T] = N.
  std::vector<int64_t> packed;

  // lengths: [B] host int64, or null (every row runs all T steps).
  HostOrder(const int64_t* lengths, int64_t steps_, int64_t batch_) : steps(steps_), batch(batch_) {
    packed.assign(3 * batch + 2 * steps + 1, 0);
    int64_t* order = packed.data();
    int64_t* length = order + batch;
    int64_t* active = length + batch;
    int64_t* first_row = active + steps;
    int64_t* slot = first_row + steps + 1;
    std::iota(order, order + batch, 0);
    for (int64_t b = 0; b < batch; ++b) length[b] = lengths ? lengths[b] : steps;
    std::stable_sort(order, order + batch, [&](int64_t a, int64_t b) { return length[a] > length[b]; });
    for (int64_t t = 0; t < steps; ++t) {
      int64_t n = 0;
      while (n < batch && length[order[n]] > t) ++n;
      active[t] = n;
      first_row[t + 1] = first_row[t] + n;
    }
    for (int64_t j = 0; j < batch; ++j) slot[order[j]] = j;
  }
  const int64_t* active_host() const { return packed.data() + 2 * batch; }
  int64_t valid_rows() const { return packed[2 * batch + 2 * steps]; }
  bool compact_is_padded() const {
    if (valid_rows() != steps * batch) return false;
    for (int64_t j = 0; j < batch; ++j)
      if (packed[j] != j) return false;
    return true;
  }
  // The view the kernels' params take, with its device pointers into `device`, a device
  // copy of `packed` (the CPU emulation passes `packed` itself).
  OrderView view(const int64_t* device) const {
    OrderView v;
    v.order = device;
    v.length = device + batch;
    v.active = device + 2 * batch;
    v.first_row = device + 2 * batch + steps;
    v.slot = device + 2 * batch + 2 * steps + 1;
    v.active_host = active_host();
    v.valid_rows = valid_rows();
    v.compact_is_padded = compact_is_padded();
    return v;
  }
};

}  // namespace rnntl
