// Pieces shared by the CPU LSTM and GRU sequence kernels: the batch order that makes the
// rows still running at a step a prefix (so each step's GEMM covers only them), the
// parallel row loop, and argument checks.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <rnntl/host_order.h>

#include "../op_checks.h"
#include "gemm_cpu.h"
#include "persistent_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <cstring>
#include <exception>
#include <vector>

namespace rnntl {
namespace cpu {

// Vector clones of the pointwise row loops: the loader picks the widest the CPU has. The
// 256-bit clone is x86-64-v3 (AVX2 *and* FMA): a plain "avx2" clone has no FMA, and the
// exp/sigmoid/tanh polynomials then run as separate multiplies and adds (measured: the
// LSTM forward pointwise pass took ~35% longer that way on an AVX2/FMA EPYC).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(RNNTL_NO_TARGET_CLONES)
#define RNNTL_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define RNNTL_VECTOR_CLONES
#endif
// Row loops are forced inline into each clone, so that each clone's body is compiled for
// its own instruction set (a plain call would run the baseline code).
#define RNNTL_ROW_INLINE __attribute__((always_inline)) inline

// The batch order of one sequence kernel (the rule is rnntl::HostOrder's, shared with the
// CUDA glue): slot j holds batch row order[j], rows sorted by length, longest first
// (stable), so the rows still inside their sequence at step t are slots [0, active[t]).
// Row b is valid at step t iff t < length[b], in both directions: the reverse direction
// therefore starts each row at its own last step.
struct SequenceOrder {
  HostOrder host;
  const int64_t* order;   // [B]
  const int64_t* length;  // [B], by batch row
  const int64_t* active;  // [T]

  // The "compact" row layout of every whole-sequence buffer of the LSTM and GRU ops (input
  // gates, saved gates and cells, gate gradients, weight-gradient operands): only valid
  // (step, slot) pairs, step by step in time order, slot order within a step; (t, slot j) is
  // compact row first_row[t] + j. (A row keeps its slot at every step, so its previous step's
  // compact row is first_row[previous_step] + j.) Padded rows have no compact row, so they
  // never enter a product. Without lengths it is the padded [T, B] layout.
  std::vector<int64_t> first_row;  // [T + 1]; first_row[T] = valid_rows
  int64_t valid_rows = 0;
  bool compact_is_padded = true;   // every row runs all steps, in batch order
  at::Tensor padded_rows;          // [valid_rows] int64: padded flat row t * B + order[j] of each
                                   // compact row; undefined when compact_is_padded

  // lengths64: checked_lengths()'s result (contiguous int64 [B]), or undefined for all T.
  SequenceOrder(const at::Tensor& lengths64, int64_t steps, int64_t batch)
      : host(lengths64.defined() ? lengths64.data_ptr<int64_t>() : nullptr, steps, batch),
        order(host.packed.data()),
        length(order + batch),
        active(length + batch),
        first_row(steps + 1, 0) {
    for (int64_t t = 0; t < steps; ++t) first_row[t + 1] = first_row[t] + active[t];
    valid_rows = first_row[steps];
    compact_is_padded = valid_rows == steps * batch;
    for (int64_t j = 0; j < batch && compact_is_padded; ++j) compact_is_padded = order[j] == j;
    if (!compact_is_padded) {
      padded_rows = reusable_empty({valid_rows}, at::TensorOptions().dtype(at::kLong));
      int64_t* r = padded_rows.data_ptr<int64_t>();
      for (int64_t t = 0; t < steps; ++t)
        for (int64_t j = 0; j < active[t]; ++j) *r++ = t * batch + order[j];
    }
  }
  // Time step of processing step `step` (0 = the first processed).
  int64_t time_of(int64_t step, bool reverse) const { return reverse ? host.steps - 1 - step : step; }

  // padded: [T, B, W] -> its compact rows [N, W] (a view when the layouts coincide).
  at::Tensor compact_from_padded(const at::Tensor& padded) const {
    const at::Tensor rows = padded.contiguous().view({host.steps * host.batch, padded.size(2)});
    return compact_is_padded ? rows : rows.index_select(0, padded_rows);
  }
  // compact: [N, W] -> [T, B, W], zero at padded rows.
  at::Tensor padded_from_compact(const at::Tensor& compact) const {
    const int64_t W = compact.size(1);
    if (compact_is_padded) return compact.view({host.steps, host.batch, W});
    return reusable_zeros({host.steps * host.batch, W}, compact.options())
        .index_copy_(0, padded_rows, compact)
        .view({host.steps, host.batch, W});
  }
  // A saved whole-sequence buffer: the op schema's [T, B, W] shape, holding the compact rows
  // first (rows past N are zero so that the op's outputs are deterministic).
  at::Tensor saved_buffer(int64_t width, const at::TensorOptions& options) const {
    const int64_t all = host.steps * host.batch;
    at::Tensor t = reusable_empty({all, width}, options);
    if (valid_rows < all) t.narrow(0, valid_rows, all - valid_rows).zero_();
    return t.view({host.steps, host.batch, width});
  }
  SequenceOrder(const SequenceOrder&) = delete;  // the pointers point into `host`
  SequenceOrder& operator=(const SequenceOrder&) = delete;

  // by_batch: [B, W] -> the same rows in slot order (a new tensor, the state a kernel updates).
  at::Tensor slot_major(const at::Tensor& by_batch) const { return by_batch.index_select(0, order_tensor()); }
  // by_slot: [B, W] in slot order -> batch order.
  at::Tensor batch_major(const at::Tensor& by_slot) const {
    return at::empty_like(by_slot).index_copy_(0, order_tensor(), by_slot);
  }
  at::Tensor order_tensor() const {
    return at::from_blob(const_cast<int64_t*>(order), {host.batch}, at::TensorOptions().dtype(at::kLong)).clone();
  }
  // Step at which row b started (its first step in processing order).
  bool is_first_step(int64_t b, int64_t t, bool reverse) const {
    return reverse ? t == length[b] - 1 : t == 0;
  }
  // Step processed just before t for a valid row (only meaningful when !is_first_step).
  static int64_t previous_step(int64_t t, bool reverse) { return reverse ? t + 1 : t - 1; }
  // Prefetches (prefetch_block) the compact rows of slots [slot_begin, slot_end) at processing
  // step `step` of a whole-sequence buffer `rows` [N, width]; nothing for a step outside
  // [0, T). The row split's forward workers call it for the next step's input gates, which
  // the projection of every row up front left in L3 or memory (the first load of each row
  // was the pointwise pass's hottest instruction), and the backward for the saved rows of
  // the step it processes next (docs/cpu.md, "Multi-core engine").
  template <typename T>
  void prefetch_step_rows(const T* rows, int64_t width, int64_t step, bool reverse, int64_t slot_begin,
                          int64_t slot_end) const;
  // As prefetch_step_rows for a padded buffer [T, B, width] (the output gradient).
  template <typename T>
  void prefetch_step_padded_rows(const T* padded, int64_t width, int64_t step, bool reverse, int64_t slot_begin,
                                 int64_t slot_end) const;
  // Zero in the padded output [T, B, width] the columns [column_begin, column_end) of the rows
  // past their length at step t (as pad_packed_sequence gives).
  // Slots [slot_begin, slot_end) only, where given (a row-split worker's).
  template <typename T>
  void zero_past_length(T* output, int64_t width, int64_t t, int64_t column_begin, int64_t column_end,
                        int64_t slot_begin = 0, int64_t slot_end = -1) const {
    for (int64_t j = std::max(active[t], slot_begin); j < (slot_end < 0 ? host.batch : slot_end); ++j) {
      T* row = output + (t * host.batch + order[j]) * width;
      std::fill(row + column_begin, row + column_end, T(0));
    }
  }
  // Processing step of slot j's last step (-1 for a row of length 0).
  int64_t last_processing_step(int64_t j, bool reverse) const {
    const int64_t steps_run = length[order[j]];
    return steps_run == 0 ? -1 : reverse ? host.steps - 1 : steps_run - 1;
  }
};

// Whether run_persistent can run more than one worker at once: torch's OpenMP backend runs
// every chunk of a parallel_for on its own thread of one team, all at the same time; the
// native thread pool may queue chunks behind each other, and a worker waiting at a barrier
// for a queued one would wait forever.
inline bool persistent_workers_available() {
#if AT_PARALLEL_OPENMP
  return at::get_num_threads() > 1 && !at::in_parallel_region();
#else
  return false;
#endif
}

// run_team (persistent_cpu.h) on torch's intra-op threads. Inside another parallel region
// parallel_for runs one chunk, [0, slices), on the calling thread: one worker does it all.
template <typename F>
void run_persistent(int64_t slices, const F& worker) {
  run_team(slices, [](int64_t count, const auto& chunk) { at::parallel_for(0, count, 1, chunk); }, worker);
}

// The step loops a sequence can run on (docs/cpu.md, "Multi-core engine"):
//  * stepwise: a step at a time, each parallel pass of a step forked over torch's threads;
//  * rows: each of torch's threads runs every step for its own slots (batch rows). A row's
//    recurrence needs nothing from other rows, so the workers never wait for each other;
//    each reads the whole W_hh, which must therefore stay in its core's L2;
//  * units: the multi-core loop of persistent_cpu.h: each worker owns a slice of the hidden
//    units (and of W_hh) and the workers meet at a barrier once per step: for few rows,
//    where the row split has nothing to split;
//  * products: for the ops whose pointwise pass needs whole rows (the layer-normalised
//    cells), in place of the unit split: one worker runs the steps and a persistent team
//    splits each step's recurrent product by columns (StepProductTeam, persistent_cpu.h),
//    each worker's slice of W_hh kept in its core's cache.
// RNNTL_CPU_ENGINE (read at each op call, docs/ENVIRONMENT.md): unset, empty or "auto" is
// the automatic choice (step_loop below); "stepwise", "rows" or "units" asks for that loop
// wherever it can run the sequence (the step-at-a-time loop elsewhere; "units" is the
// products loop for the layer-normalised ops); any other value is an error.
enum class CpuEngine { automatic, stepwise, rows, units };
inline CpuEngine cpu_engine() {
  const char* value = std::getenv("RNNTL_CPU_ENGINE");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return CpuEngine::automatic;
  if (std::strcmp(value, "stepwise") == 0) return CpuEngine::stepwise;
  if (std::strcmp(value, "rows") == 0) return CpuEngine::rows;
  TORCH_CHECK(std::strcmp(value, "units") == 0,
              "rnntl_fast: the environment variable RNNTL_CPU_ENGINE must be auto, stepwise, rows or units (or "
              "unset), got '", value, "'");
  return CpuEngine::units;
}

// The automatic choice's threshold (measured: docs/cpu.md, "Multi-core engine"): the row
// split reads all of the per-step weights (W_hh, and W_hr with a projection) on every core,
// so they must stay in each core's L2 beside the step's rows.
constexpr int64_t kRowSplitMaxWeightBytes = int64_t(1) << 20;
// The products loop's: below about 32 KiB of W_hh (H = 32 to 64 at batch 1) the step-at-a-time
// loop measured as fast or faster.
constexpr int64_t kProductsLoopMinWeightBytes = int64_t(32) << 10;

// The loop a sequence runs on, and its worker count (0 for the step-at-a-time loop).
struct StepLoop {
  enum Kind { stepwise, rows, units, products } kind = stepwise;
  int64_t workers = 0;
};

// The multi-core loop an op has for fewer rows than threads: the unit split, the products
// loop (the layer-normalised cells), or neither (the Elman RNN).
enum class FewRowsLoop { units, products, none };

// The loop for a sequence of `batch` slots with recurrent weight weight_hh [gates * hidden,
// depth] and per-step weights of step_weight_floats floats in all (W_hh, plus W_hr).
inline StepLoop step_loop(const at::Tensor& input, const at::Tensor& weight_hh, int64_t hidden,
                          int64_t step_weight_floats, FewRowsLoop few_rows = FewRowsLoop::units) {
  StepLoop loop;
  const CpuEngine engine = cpu_engine();
  if (engine == CpuEngine::stepwise || at::get_num_threads() < 2 || at::in_parallel_region()) return loop;
  const int64_t batch = input.size(1), threads = at::get_num_threads();
  // The other loops pack the per-step weights (whole, or a slice per worker).
  if (!packing_pays_for_steps(input.size(0), batch, step_weight_floats * int64_t(input.element_size()))) return loop;
  const bool float32_own_kernel = input.scalar_type() == at::kFloat && own_kernel_enabled();
  // rows: a worker per thread, each with at least one slot (fewer slots than threads would
  // leave threads idle: the unit split uses them all); no barrier, so any thread backend serves.
  const int64_t row_workers = std::min(threads, batch);
  const bool rows_suit = float32_own_kernel && batch >= threads &&
                         step_weight_floats * int64_t(sizeof(float)) <= kRowSplitMaxWeightBytes;
  if (row_workers >= 2 && (engine == CpuEngine::rows || (engine == CpuEngine::automatic && rows_suit))) {
    loop.kind = StepLoop::rows;
    loop.workers = row_workers;
    return loop;
  }
  if (few_rows == FewRowsLoop::none || engine == CpuEngine::rows || !float32_own_kernel ||
      !persistent_workers_available())
    return loop;
  if (few_rows == FewRowsLoop::products) {
    // products: the pointwise pass runs on one worker, so only where the row split cannot
    // give every thread a row, and where W_hh is big enough to pay for two barriers a step;
    // at least two slices of W_hh's rows (16 each) that suit the own kernel.
    const int64_t columns = weight_hh.size(0);
    const int64_t workers = std::min<int64_t>(threads, (columns + kPanelWidth - 1) / kPanelWidth);
    const bool products_suit =
        batch < threads && weight_hh.numel() * int64_t(sizeof(float)) >= kProductsLoopMinWeightBytes;
    if (workers < 2 || (engine == CpuEngine::automatic && !products_suit)) return loop;
    if (!own_step_kernel_suits(batch, (columns + workers - 1) / workers, weight_hh.size(1))) return loop;
    loop.kind = StepLoop::products;
    loop.workers = workers;
    return loop;
  }
  // units: at least two slices of hidden units, each a W_hh slice that suits the own kernel.
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (hidden + kPanelWidth - 1) / kPanelWidth);
  if (workers < 2) return loop;
  const int64_t rows_per_worker = (weight_hh.size(0) + workers - 1) / workers;
  if (!own_step_kernel_suits(batch, rows_per_worker, weight_hh.size(1))) return loop;
  loop.kind = StepLoop::units;
  loop.workers = workers;
  return loop;
}

// The slots [bound[w], bound[w + 1]) of each of `workers` row-split workers: contiguous
// (the per-step products take consecutive rows), with about equal numbers of valid steps
// (slots are sorted by length, longest first).
inline std::vector<int64_t> split_slots(const SequenceOrder& sequence, int64_t workers) {
  const int64_t batch = sequence.host.batch;
  int64_t total = 0;
  for (int64_t j = 0; j < batch; ++j) total += sequence.length[sequence.order[j]];
  std::vector<int64_t> bound(workers + 1, batch);
  bound[0] = 0;
  int64_t j = 0, done = 0;
  for (int64_t w = 1; w < workers; ++w) {
    while (j < batch && done * workers < total * w) done += sequence.length[sequence.order[j++]];
    bound[w] = j;
  }
  return bound;
}

// Runs worker(first_slot, end_slot) for each row-split worker on its own torch thread.
template <typename F>
void run_row_split(const SequenceOrder& sequence, int64_t workers, const F& worker) {
  const std::vector<int64_t> bound = split_slots(sequence, workers);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    // The ops' products are internal to them (as on the calling thread): dispatch keys are
    // per thread, and a library product on a worker would otherwise meet autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    worker(bound[begin], bound[end]);
  });
}

// Runs a sequence op class's steps on the chosen loop: op.run_steps_persistent(workers)
// (float32, where the op has it), or op.run_steps_rows<T>(workers) / the step-at-a-time
// op.run_steps<T>() for the input's dtype.
template <typename Op, typename = void>
struct HasUnitSplit : std::false_type {};
template <typename Op>
struct HasUnitSplit<Op, std::void_t<decltype(&Op::run_steps_persistent)>> : std::true_type {};

template <typename Op, typename = void>
struct HasProductsLoop : std::false_type {};
template <typename Op>
struct HasProductsLoop<Op, std::void_t<decltype(&Op::run_steps_products)>> : std::true_type {};

template <typename Op>
void run_chosen_loop(Op& op, const StepLoop& loop, at::ScalarType dtype) {
  if constexpr (HasUnitSplit<Op>::value) {
    if (loop.kind == StepLoop::units) return op.run_steps_persistent(loop.workers);
  }
  if constexpr (HasProductsLoop<Op>::value) {
    if (loop.kind == StepLoop::products) return op.run_steps_products(loop.workers);
  }
  TORCH_INTERNAL_ASSERT(loop.kind != StepLoop::units || HasUnitSplit<Op>::value,
                        "unit split chosen for an op without it");
  TORCH_INTERNAL_ASSERT(loop.kind != StepLoop::products || HasProductsLoop<Op>::value,
                        "products loop chosen for an op without it");
  AT_DISPATCH_FLOATING_TYPES(dtype, "rnntl_fast CPU sequence op", [&] {
    if (loop.kind == StepLoop::rows) return op.template run_steps_rows<scalar_t>(loop.workers);
    op.template run_steps<scalar_t>();
  });
}

// Where a step loop's per-step recurrent product runs: on the calling thread (StepWeight:
// the own kernel or a library, forked over torch's threads where worth it), or, in the
// products loop, on the product team, asked for by its leader.
class StepProductRunner {
 public:
  explicit StepProductRunner(const StepWeight& weight) : weight_(&weight) {}
  StepProductRunner(StepProductTeam& team, const StepWorker& leader) : team_(&team), leader_(&leader) {}

  // x [rows, K] @ weight^T -> [rows, N]: `scratch`, or where StepWeight::multiply put it.
  template <typename T>
  const T* multiply(const T* x, int64_t rows, T* scratch, at::Tensor& holder) const {
    if constexpr (std::is_same_v<T, float>) {
      if (team_ != nullptr) {
        team_->multiply(*leader_, x, rows, scratch, false);
        return scratch;
      }
    }
    return weight_->multiply(x, rows, scratch, holder);
  }
  // out [rows, N] = x [rows, K] @ weight^T, or += with accumulate.
  template <typename T>
  void multiply_into(const T* x, int64_t rows, T* out, bool accumulate = false) const {
    if constexpr (std::is_same_v<T, float>) {
      if (team_ != nullptr) return team_->multiply(*leader_, x, rows, out, accumulate);
    }
    weight_->multiply_into(x, rows, out, accumulate);
  }

 private:
  const StepWeight* weight_ = nullptr;
  StepProductTeam* team_ = nullptr;
  const StepWorker* leader_ = nullptr;
};

// The products loop (StepLoop::products): `workers` workers of torch's threads pack their
// slices of the step product x @ weight^T (weight [N, K] float32, possibly a strided view),
// then leader(const StepProductRunner&) runs every step on the owner of slice 0 while the
// others serve its products. A leader that throws still releases the others; the exception
// is rethrown here.
template <typename Leader>
void run_product_team(int64_t workers, const at::Tensor& weight, const Leader& leader) {
  StepProductTeam team(weight.data_ptr<float>(), weight.size(0), weight.size(1), weight.stride(0), weight.stride(1),
                       workers);
  std::exception_ptr failure;
  run_persistent(workers, [&](const StepWorker& me) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as run_row_split
    team.pack(me);
    me.barrier();
    if (me.first_slice() != 0) return team.serve(me);
    try {
      leader(StepProductRunner(team, me));
    } catch (...) {
      failure = std::current_exception();
    }
    team.finish(me);
  });
  if (failure) std::rethrow_exception(failure);
}

// The hidden state [B, W] (slot-major) of the multi-core loop, in two buffers: processing
// step s reads buffer s % 2 and writes buffer (s + 1) % 2, so that no worker overwrites a
// row that another worker's product of the same step still reads. Both start as the
// initial state; rows that do not run at a step are not written. read / write are plain
// pointer arithmetic: they run in every worker at every step, between two barriers, where a
// tensor index (an aten::select through the dispatcher, and atomic reference counts on one
// tensor from every core) cost a third of a small batch-1 step: LSTM (200, 1, 64, 64)
// training 1.2 -> 0.8 ms at 2 threads, GRU 0.9 -> 0.7 ms.
class AlternatingState {
 public:
  AlternatingState(const at::Tensor& initial)
      : buffers_(at::stack({initial, initial})), data_(buffers_.data_ptr<float>()), size_(initial.numel()) {}
  float* read(int64_t step) const { return data_ + (step & 1) * size_; }
  float* write(int64_t step) const { return data_ + ((step + 1) & 1) * size_; }
  // The state after each slot's last step, slot-major [B, W].
  at::Tensor final_state(const SequenceOrder& sequence, bool reverse) {
    const int64_t batch = buffers_.size(1);
    at::Tensor out = at::empty_like(buffers_[0]);
    for (int64_t j = 0; j < batch; ++j) out[j].copy_(buffers_[(sequence.last_processing_step(j, reverse) + 1) & 1][j]);
    return out;
  }

 private:
  at::Tensor buffers_;  // [2, B, W]
  float* data_;
  int64_t size_;        // B * W
};

// The one step scheduler of the forward passes: processing steps grouped into blocks whose
// input projection is computed together just before they run (see RowProjection): as many
// consecutive steps as fit in block_rows compact rows, at least one. In either direction a
// block's compact rows are one contiguous range.
class ProjectionBlocks {
 public:
  ProjectionBlocks(const SequenceOrder& sequence, bool reverse, int64_t block_rows)
      : sequence_(sequence), reverse_(reverse), block_rows_(block_rows) {}
  // Whether processing step `step` (called in order 0, 1, ...) starts a block; if so,
  // first() and rows() give its compact rows.
  bool starts_at(int64_t step) {
    if (step != end_step_) return false;
    const int64_t steps = sequence_.host.steps;
    rows_ = sequence_.active[sequence_.time_of(step, reverse_)];
    end_step_ = step + 1;
    while (end_step_ < steps) {
      const int64_t next = sequence_.active[sequence_.time_of(end_step_, reverse_)];
      if (rows_ + next > block_rows_) break;
      rows_ += next;
      ++end_step_;
    }
    // Time-ordered compact rows: the block's earliest time step starts the range.
    first_ = sequence_.first_row[reverse_ ? steps - end_step_ : step];
    return true;
  }
  int64_t first() const { return first_; }
  int64_t rows() const { return rows_; }
  // The most rows a block holds on `loop`: a buffer this long takes any block (every row
  // for the row split, which projects them all before its workers start).
  static int64_t capacity(const SequenceOrder& sequence, int64_t block_rows, const StepLoop& loop) {
    // (the loops whose steps run inside a parallel region take every row's product first)
    if (loop.kind == StepLoop::rows || loop.kind == StepLoop::products) return sequence.valid_rows;
    return std::min(std::max(block_rows, sequence.host.batch), sequence.valid_rows);
  }

 private:
  const SequenceOrder& sequence_;
  bool reverse_;
  int64_t block_rows_;
  int64_t end_step_ = 0, first_ = 0, rows_ = 0;
};

// Recurrent dropout (docs/semantics.md): out = mask * h over rows [0, rows) and columns
// [column_begin, column_end) of slot-major [B, width] buffers (out may be h). The forward's
// recurrent products read the masked state; the backward masks what they give dL/dh_{t-1}.
template <typename T>
inline void masked_rows(const T* mask, const T* h, T* out, int64_t rows, int64_t width, int64_t column_begin,
                        int64_t column_end) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t k = column_begin; k < column_end; ++k) out[j * width + k] = mask[j * width + k] * h[j * width + k];
}

// carry += mask * product over the same rows and columns (the GRU's dL/dh_{t-1}, whose
// direct path z * dL/dh_t is already in carry).
template <typename T>
inline void add_masked_rows(const T* mask, const T* product, T* carry, int64_t rows, int64_t width,
                            int64_t column_begin, int64_t column_end) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t k = column_begin; k < column_end; ++k) carry[j * width + k] += mask[j * width + k] * product[j * width + k];
}

// A [B, width] op argument in slot order (sequence.slot_major), or undefined when absent.
inline at::Tensor slot_major_or_undefined(const SequenceOrder& sequence, const c10::optional<at::Tensor>& by_batch) {
  return by_batch.has_value() ? sequence.slot_major(by_batch->contiguous()) : at::Tensor();
}

// Runs f(j) for j in [0, rows), split across threads in blocks of roughly equal work.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t width, const F& f) {
  if (rows <= 0) return;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) f(j);
  });
}

// Asks the caches for [data, data + count) before a step reads it. A backward step's rows
// of the saved whole-sequence buffers (gates, cells, output gradients) were written long
// before and sit in L3 or memory; each row is only a few KB, so the hardware prefetchers
// (which stop at 4 KB pages) start cold on every row and the pointwise pass waits (in the
// forward pass, before its input gates were computed in blocks, the first load of each row
// was the hottest instruction). Issued during the previous step's product, the loads overlap it.
// kForWrite: the step will write the block (fresh rows of a gradient buffer): the lines are
// asked for in a writable state where the target has such a prefetch (on x86 the same
// prefetcht1: GCC emitted it for writes too, without -mprfchw).
// On x86 the prefetch is an asm statement: GCC models __builtin_prefetch as free of side
// effects, so a function left holding only prefetches (this one, or a caller's lambda, when
// not inlined) was marked const and every call to it deleted; the row split's prefetches
// compiled to nothing that way (GCC 12, -O3), only the unit split's inlined ones ran.
template <bool kForWrite = false, typename T>
inline void prefetch_block(const T* data, int64_t count) {
  if (data == nullptr || count <= 0) return;
  const char* begin = reinterpret_cast<const char*>(data);
  const char* end = reinterpret_cast<const char*>(data + count);
  for (const char* p = begin; p < end; p += 64) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht1 %0" : : "m"(*p));  // into L2 (not L1); never faults
#else
    __builtin_prefetch(p, kForWrite ? 1 : 0, 2);
#endif
  }
}

template <typename T>
void SequenceOrder::prefetch_step_rows(const T* rows, int64_t width, int64_t step, bool reverse, int64_t slot_begin,
                                       int64_t slot_end) const {
  if (rows == nullptr || step < 0 || step >= host.steps) return;
  const int64_t t = time_of(step, reverse), n = std::min(active[t], slot_end) - slot_begin;
  if (n > 0) prefetch_block(rows + (first_row[t] + slot_begin) * width, n * width);
}

template <typename T>
void SequenceOrder::prefetch_step_padded_rows(const T* padded, int64_t width, int64_t step, bool reverse,
                                              int64_t slot_begin, int64_t slot_end) const {
  if (padded == nullptr || step < 0 || step >= host.steps) return;
  const int64_t t = time_of(step, reverse), end = std::min(active[t], slot_end);
  for (int64_t j = slot_begin; j < end; ++j) prefetch_block(padded + (t * host.batch + order[j]) * width, width);
}

inline void check_input_cpu(const at::Tensor& input) {
  check_input_shape(input);
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "rnntl_fast: the CPU kernels support float32 and float64 input, got ", input.scalar_type());
}

// A defined tensor of `sizes`, or zeros where the autograd engine passed none.
inline at::Tensor defined_or_zeros(const c10::optional<at::Tensor>& t, at::IntArrayRef sizes,
                                   const at::TensorOptions& options) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return reusable_zeros(sizes, options);
}

}  // namespace cpu
}  // namespace rnntl
