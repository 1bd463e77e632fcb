// The multi-core step loop of the CPU sequence kernels (docs/cpu.md, "Multi-core engine").
//
// A persistent parallel recurrence, the CPU form of a persistent RNN kernel: one parallel
// region of torch's intra-op threads covers the whole sequence. Each worker owns a fixed
// slice of the hidden units (all gates of those units, so the cell update needs nothing
// from other workers), packs its slice of the weights once and keeps it in its own core's
// cache, and runs every step's product and pointwise pass for its slice; the workers meet
// at one light barrier per step (two with a projection) instead of forking and joining
// the thread team two or three times per step.
//
// Torch-free (the thread team is a parameter: torch's intra-op threads in the kernels, see
// run_persistent in sequence_cpu.h), so that the C++ tests and their ThreadSanitizer build
// run it on its own.
#pragma once

#include "small_gemm_cpu.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace rnntl {
namespace cpu {

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// A reusable barrier for the workers of one sequence. Waiting spins briefly (a step's
// work is microseconds, and the other workers are on their own cores), then yields the
// core, so that an oversubscribed machine (more workers than free cores) still makes
// progress and no core burns while a worker it waits for is descheduled.
class StepBarrier {
 public:
  // Blocks until `participants` calls (this one included) have arrived.
  void arrive_and_wait(int participants) {
    if (participants <= 1) return;
    const uint32_t phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == participants - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);  // releases the others
      return;
    }
    int spins = 0;
    while (phase_.load(std::memory_order_acquire) == phase) {
      if (++spins < kSpinsBeforeYield) {
        spin_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  // ~20-40 us of pause instructions: longer than any step's imbalance on a quiet machine.
  static constexpr int kSpinsBeforeYield = 1 << 12;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> phase_{0};
};

// Boundaries of `slices` slices of [0, units): slice w is [bound[w], bound[w + 1]), sizes as
// equal as `align` (a multiple every inner boundary keeps: 16 floats are one cache line, so
// no two workers write the same line, and one panel of the product kernel) allows. A slice
// is empty where units are fewer than slices * align.
inline std::vector<int64_t> split_units(int64_t units, int64_t slices, int64_t align) {
  const int64_t blocks = (units + align - 1) / align;
  std::vector<int64_t> bound(slices + 1, 0);
  for (int64_t w = 0; w <= slices; ++w) bound[w] = std::min(units, (blocks * w / slices) * align);
  bound[slices] = units;
  return bound;
}

// The slices of one weight, packed for small_gemm_cpu.h's kernels by the worker that owns
// them (so the packed copy is written, and then kept, in that worker's core's cache). Slice
// w has `parts` blocks (e.g. one per gate), each the B = [depth, width] matrix of a product
// x [rows, depth] @ B with width = bound[w + 1] - bound[w].
class SlicedPanels {
 public:
  SlicedPanels(const std::vector<int64_t>& bound, int64_t parts, int64_t depth)
      : bound_(bound), parts_(parts), depth_(depth), offset_(bound.size(), 0) {
    for (size_t w = 0; w + 1 < bound.size(); ++w)
      offset_[w + 1] = offset_[w] + parts * packed_panels_size(width(w), depth);
    // Not value-initialized: the owner's packing is the first touch.
    buffer_.reset(new float[std::max<int64_t>(1, offset_.back())]);
  }
  int64_t width(int64_t slice) const { return bound_[slice + 1] - bound_[slice]; }
  const float* panels(int64_t slice, int64_t part) const {
    return buffer_.get() + offset_[slice] + part * packed_panels_size(width(slice), depth_);
  }
  // Packs B[k][c] = weight[c * stride_c + k * stride_k], c < width(slice), k < depth.
  void pack(int64_t slice, int64_t part, const float* weight, int64_t stride_c, int64_t stride_k) {
    if (width(slice) == 0) return;
    pack_panels(weight, width(slice), depth_, stride_c, stride_k, const_cast<float*>(panels(slice, part)));
  }
  // out [rows, width] (row stride ldo) = x [rows, depth] (row stride ldx) @ B, or += with accumulate.
  void multiply(int64_t slice, int64_t part, const float* x, int64_t ldx, int64_t rows, float* out, int64_t ldo,
                bool accumulate) const {
    const int64_t n = width(slice);
    if (n == 0 || rows == 0) return;
    small_gemm_panels(x, ldx, rows, depth_, panels(slice, part), n, 0, panel_count(n), out, ldo, accumulate);
  }

 private:
  std::vector<int64_t> bound_;
  int64_t parts_, depth_;
  std::vector<int64_t> offset_;
  std::unique_ptr<float[]> buffer_;
};

// What one worker is given: the slices [first_slice, end_slice) it owns, and the barrier it
// meets the others at. A worker may own several slices where torch's team has fewer threads
// than slices (or runs the region on one thread, inside another parallel region).
class StepWorker {
 public:
  StepWorker(int64_t first_slice, int64_t end_slice, StepBarrier& barrier, int participants)
      : first_slice_(first_slice), end_slice_(end_slice), barrier_(barrier), participants_(participants) {}
  int64_t first_slice() const { return first_slice_; }
  int64_t end_slice() const { return end_slice_; }
  int participants() const { return participants_; }
  // Every worker must call this the same number of times.
  void barrier() const { barrier_.arrive_and_wait(participants_); }

 private:
  int64_t first_slice_, end_slice_;
  StepBarrier& barrier_;
  int participants_;
};

// A weight [gates * hidden, depth] with torch's gate-major rows (W_ih, W_hh), cut by hidden
// unit: slice w holds, of every gate g, the rows g * hidden + u for the slice's units u,
// so that a worker's products give all gates of its units. Results go to the columns
// g * hidden + u of a [rows, gates * hidden] buffer, the layout of the step loops.
class GateRowSlices {
 public:
  GateRowSlices(const std::vector<int64_t>& units, int64_t gates, int64_t hidden, int64_t depth)
      : units_(units), gates_(gates), hidden_(hidden), depth_(depth), panels_(units, gates, depth) {}
  // weight: [gates * hidden, depth], contiguous.
  void pack(int64_t slice, const float* weight) {
    for (int64_t g = 0; g < gates_; ++g) panels_.pack(slice, g, weight + (g * hidden_ + units_[slice]) * depth_, depth_, 1);
  }
  // Per-step product: out[r][g*hidden + u] = x[r] . row(g, u), r < rows (a few).
  void multiply(int64_t slice, const float* x, int64_t ldx, int64_t rows, float* out, int64_t ldo) const {
    for (int64_t g = 0; g < gates_; ++g) panels_.multiply(slice, g, x, ldx, rows, out + column(slice, g), ldo, false);
  }
  // Whole-block product (many rows), plus bias [gates * hidden] where not null.
  void project(int64_t slice, const float* x, int64_t ldx, int64_t rows, const float* bias, float* out,
               int64_t ldo) const {
    if (panels_.width(slice) == 0 || rows == 0) return;
    for (int64_t g = 0; g < gates_; ++g)
      gemm_panels(x, ldx, 1, rows, depth_, panels_.panels(slice, g), panels_.width(slice),
                  bias ? bias + column(slice, g) : nullptr, out + column(slice, g), ldo, false, kDepthChunk);
  }

 private:
  int64_t column(int64_t slice, int64_t gate) const { return gate * hidden_ + units_[slice]; }
  std::vector<int64_t> units_;
  int64_t gates_, hidden_, depth_;
  SlicedPanels panels_;
};

// Runs worker(const StepWorker&) once per chunk of [0, slices) that launch(slices, chunk)
// hands out, calling chunk(begin, end) for each chunk, all chunks at the same time (launch
// must run them concurrently, or a worker would wait at the barrier for one that never
// starts). The chunks first register, so that every worker knows how many meet at the
// barrier before the first step. `worker` must not throw (a worker leaving early would
// leave the others waiting): allocate before calling this.
template <typename Launch, typename F>
void run_team(int64_t slices, const Launch& launch, const F& worker) {
  std::atomic<int64_t> covered{0};
  std::atomic<int> participants{0};
  StepBarrier barrier;
  launch(slices, [&](int64_t begin, int64_t end) {
    participants.fetch_add(1, std::memory_order_acq_rel);
    covered.fetch_add(end - begin, std::memory_order_acq_rel);  // after counting itself
    int spins = 0;
    while (covered.load(std::memory_order_acquire) < slices) {
      if (++spins < 1024) {
        spin_pause();
      } else {
        std::this_thread::yield();
      }
    }
    const StepWorker me(begin, end, barrier, participants.load(std::memory_order_acquire));
    worker(me);
  });
}

}  // namespace cpu
}  // namespace rnntl
