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

// The backward's recurrent product dL/dh_{t-1} = dL/da_t @ W_hh in the multi-core loop,
// where worker w has written only its units' gate columns of dL/da_t [n, gates * hidden].
// Reading the other workers' columns would move all of dL/da_t between cores every step
// (gates * hidden values per row); instead each slice multiplies its own gate columns by
// its own rows of W_hh, a partial sum over all `width` columns of dL/dh_{t-1}, and after
// the step's barrier the owner of a column adds the slices' partials: width values per
// row cross cores, a quarter (LSTM) or a third (GRU) as many. Measured in docs/cpu.md.
//
// The partials alternate between two sets by step parity: a slice writes step t's partial
// while other workers may still be adding up step t+1's (nothing orders them but the
// barrier of the step after).
class PartialRecurrentProduct {
 public:
  // units: slice bounds of [0, hidden); weight rows g * hidden + u (u in slice w) are slice
  // w's; rows: the most rows of a step (the batch).
  PartialRecurrentProduct(const std::vector<int64_t>& units, int64_t gates, int64_t hidden, int64_t width,
                          int64_t rows)
      : units_(units), gates_(gates), hidden_(hidden), width_(width), partial_stride_(round_up(rows * width)),
        offset_(units.size(), 0) {
    const int64_t slices = static_cast<int64_t>(units.size()) - 1;
    // Per slice: its packed weight rows, then its gathered operand [rows, gates * U].
    for (int64_t w = 0; w < slices; ++w) {
      const int64_t depth = gates * (units[w + 1] - units[w]);
      offset_[w + 1] = offset_[w] + round_up(packed_panels_size(width, depth)) + round_up(rows * depth);
    }
    // One allocation, 64-byte aligned: no two slices' partials (or panels) share a cache line.
    storage_.reset(new float[offset_.back() + 2 * slices * partial_stride_ + kPanelWidth]);
    const uintptr_t misalignment = (reinterpret_cast<uintptr_t>(storage_.get()) / sizeof(float)) % kPanelWidth;
    base_ = storage_.get() + (kPanelWidth - misalignment) % kPanelWidth;
  }

  // weight: [gates * hidden, width] contiguous (W_hh). Called by the slice's owner. The
  // slice's rows of all gates form one [gates * U, width] operand (row g * U + k is weight
  // row g * hidden + units[slice] + k), packed as small_gemm_cpu.h's panels.
  void pack(int64_t slice, const float* weight) {
    const int64_t U = units_[slice + 1] - units_[slice], depth = gates_ * U;
    float* packed = panels(slice);
    for (int64_t p = 0; p < panel_count(width_); ++p) {
      const int64_t first = p * kPanelWidth, cols = std::min(kPanelWidth, width_ - first);
      for (int64_t g = 0; g < gates_; ++g)
        for (int64_t k = 0; k < U; ++k) {
          const float* row = weight + (g * hidden_ + units_[slice] + k) * width_ + first;
          float* dst = packed + (p * depth + g * U + k) * kPanelWidth;
          for (int64_t c = 0; c < kPanelWidth; ++c) dst[c] = c < cols ? row[c] : 0.0f;
        }
    }
  }

  // The slice's partial of step `parity`: its own gate columns of grad_gates [n, gates * hidden]
  // (row stride ldg), gathered into one [n, gates * U] operand (in cache: one product over
  // the whole depth instead of one per gate), times its rows of the weight.
  void multiply(int64_t slice, const float* grad_gates, int64_t ldg, int64_t n, int64_t parity) {
    const int64_t U = units_[slice + 1] - units_[slice], depth = gates_ * U;
    if (U == 0 || n == 0) return;
    float* operand = gathered(slice);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < gates_; ++g) {
        const float* src = grad_gates + j * ldg + g * hidden_ + units_[slice];
        std::copy(src, src + U, operand + j * depth + g * U);
      }
    small_gemm_panels(operand, depth, n, depth, panels(slice), width_, 0, panel_count(width_), partial(slice, parity),
                      width_, false);
  }

  // carry [rows, width] (row stride width), rows j < n, columns [column_begin, column_end):
  // carry = (accumulate ? carry : 0) + the sum of mask * each slice's partial of step `parity`,
  // mask [rows, width] or nullptr (= 1). After the barrier that follows the partials.
  void add_into(int64_t parity, int64_t n, int64_t column_begin, int64_t column_end, const float* mask,
                float* carry, bool accumulate) const {
    const int64_t slices = static_cast<int64_t>(units_.size()) - 1;
    for (int64_t j = 0; j < n; ++j) {
      float* __restrict__ out = carry + j * width_;
      const float* __restrict__ m = mask ? mask + j * width_ : nullptr;
      bool written = accumulate;  // out holds what the partials add to
      for (int64_t w = 0; w < slices; ++w) {
        if (units_[w + 1] == units_[w]) continue;  // an empty slice wrote no partial
        const float* __restrict__ p = partial(w, parity) + j * width_;
        // (mask * a sum as the sum of masked terms: separate loops, each of which vectorizes)
        if (m && written) {
          for (int64_t k = column_begin; k < column_end; ++k) out[k] += m[k] * p[k];
        } else if (m) {
          for (int64_t k = column_begin; k < column_end; ++k) out[k] = m[k] * p[k];
        } else if (written) {
          for (int64_t k = column_begin; k < column_end; ++k) out[k] += p[k];
        } else {
          std::copy(p + column_begin, p + column_end, out + column_begin);
        }
        written = true;
      }
      if (!written) std::fill(out + column_begin, out + column_end, 0.0f);
    }
  }

 private:
  static int64_t round_up(int64_t floats) { return (floats + kPanelWidth - 1) / kPanelWidth * kPanelWidth; }
  int64_t depth(int64_t slice) const { return gates_ * (units_[slice + 1] - units_[slice]); }
  float* panels(int64_t slice) const { return base_ + offset_[slice]; }
  float* gathered(int64_t slice) const {
    return base_ + offset_[slice] + round_up(packed_panels_size(width_, depth(slice)));
  }
  float* partial(int64_t slice, int64_t parity) const {
    const int64_t slices = static_cast<int64_t>(units_.size()) - 1;
    return base_ + offset_.back() + ((parity & 1) * slices + slice) * partial_stride_;
  }
  std::vector<int64_t> units_;
  int64_t gates_, hidden_, width_, partial_stride_;
  std::vector<int64_t> offset_;
  std::unique_ptr<float[]> storage_;
  float* base_ = nullptr;
};

// The per-step product of the products loop (sequence_cpu.h, StepLoop::products), for ops
// whose pointwise pass needs whole rows (the layer-normalised cells' norms): one worker,
// the leader (the owner of slice 0), runs the steps; at each step's product it hands the
// product to the team, which splits it by output columns. Each worker owns fixed slices
// of the weight's panels, packed by it and kept in its core's cache, as in the unit split.
// Two barrier crossings a product: one hands the request to the others, one hands the
// results back to the leader.
class StepProductTeam {
 public:
  // The product x [rows, depth] @ B, B [depth, width] with B[k][c] = weight[c * stride_c +
  // k * stride_k] (x @ weight^T for a row-major weight [width, depth]: stride_c = depth,
  // stride_k = 1), cut into `slices` column slices.
  StepProductTeam(const float* weight, int64_t width, int64_t depth, int64_t stride_c, int64_t stride_k,
                  int64_t slices)
      : weight_(weight), width_(width), depth_(depth), stride_c_(stride_c), stride_k_(stride_k),
        bound_(split_units(width, slices, kPanelWidth)), panels_(bound_, 1, depth) {}

  // Every worker, once, before the first product (and a barrier after, before any product).
  void pack(const StepWorker& me) {
    for (int64_t w = me.first_slice(); w < me.end_slice(); ++w)
      panels_.pack(w, 0, weight_ + bound_[w] * stride_c_, stride_c_, stride_k_);
  }

  // The leader: out [rows, width] = x [rows, depth] @ B, or += with accumulate (contiguous rows).
  void multiply(const StepWorker& me, const float* x, int64_t rows, float* out, bool accumulate) {
    request_ = Request{x, rows, out, accumulate, false};
    me.barrier();  // the others read the request after this
    run_own_slices(me);
    me.barrier();  // every slice written
  }
  // The leader, after its last product: lets the others leave serve().
  void finish(const StepWorker& me) {
    request_.done = true;
    me.barrier();
  }
  // The other workers: every product the leader asks for, until it finishes.
  void serve(const StepWorker& me) {
    while (true) {
      me.barrier();
      if (request_.done) return;
      run_own_slices(me);
      me.barrier();
    }
  }

 private:
  struct Request {
    const float* x = nullptr;
    int64_t rows = 0;
    float* out = nullptr;
    bool accumulate = false, done = false;
  };
  void run_own_slices(const StepWorker& me) const {
    const Request r = request_;
    for (int64_t w = me.first_slice(); w < me.end_slice(); ++w)
      panels_.multiply(w, 0, r.x, depth_, r.rows, r.out + bound_[w], width_, r.accumulate);
  }
  const float* weight_;
  int64_t width_, depth_, stride_c_, stride_k_;
  std::vector<int64_t> bound_;
  SlicedPanels panels_;
  Request request_;  // written by the leader before a barrier, read by all after it
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
