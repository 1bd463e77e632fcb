// Pieces shared by the CPU LSTM and GRU sequence kernels: the batch order that makes the
// rows still running at a step a prefix (so each step's GEMM covers only them), the
// parallel row loop, and argument checks.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace rnntl {
namespace cpu {

// Vector clones of the pointwise row loops: the loader picks the widest the CPU has.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(RNNTL_NO_TARGET_CLONES)
#define RNNTL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RNNTL_VECTOR_CLONES
#endif
// Row loops are forced inline into each clone, so that each clone's body is compiled for
// its own instruction set (a plain call would run the baseline code).
#define RNNTL_ROW_INLINE __attribute__((always_inline)) inline

// PackedLengths-style bookkeeping for one sequence kernel.
//   order[j]:  batch row processed in slot j; rows sorted by length, longest first (stable),
//              so at any step the rows still inside their sequence are slots [0, active[t]).
//   active[t]: number of rows with length > t.
// Row b is valid at step t iff t < length[b], in both directions: the reverse direction
// therefore starts each row at its own last step.
struct SequenceOrder {
  std::vector<int64_t> order;
  std::vector<int64_t> active;
  std::vector<int64_t> length;

  SequenceOrder(const c10::optional<at::Tensor>& lengths, int64_t steps, int64_t batch) {
    order.resize(batch);
    std::iota(order.begin(), order.end(), 0);
    length.assign(batch, steps);
    active.assign(steps, batch);
    if (!lengths.has_value()) return;
    const at::Tensor l = lengths->to(at::kLong).contiguous();
    const int64_t* data = l.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) length[b] = data[b];
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return length[a] > length[b]; });
    for (int64_t t = 0; t < steps; ++t) {
      int64_t n = 0;
      while (n < batch && length[order[n]] > t) ++n;
      active[t] = n;
    }
  }

  // Step at which row b started (its first step in processing order).
  bool is_first_step(int64_t b, int64_t t, bool reverse) const {
    return reverse ? t == length[b] - 1 : t == 0;
  }
  // Step processed just before t for a valid row (only meaningful when !is_first_step).
  static int64_t previous_step(int64_t t, bool reverse) { return reverse ? t + 1 : t - 1; }
};

// Runs f(j) for j in [0, rows), split across threads in blocks of roughly equal work.
template <typename F>
inline void parallel_rows(int64_t rows, int64_t width, const F& f) {
  if (rows <= 0) return;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) f(j);
  });
}

// The first n slots of a slot-major buffer.
inline at::Tensor slots(const at::Tensor& t, int64_t n) { return t.narrow(0, 0, n); }

inline double clip_or_zero(const c10::optional<double>& value, const char* name) {
  if (!value.has_value()) return 0.0;
  TORCH_CHECK(std::isfinite(*value) && *value > 0.0, "rnntl_fast: ", name,
              " must be a finite positive number or None, got ", *value);
  return *value;
}

inline void check_grad_clip_mode(c10::string_view mode) {
  TORCH_CHECK(mode == "state" || mode == "gates",
              "rnntl_fast: grad_clip_mode must be 'state' or 'gates', got '", std::string(mode), "'");
}

inline void check_same(const at::Tensor& input, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "rnntl_fast: ", name, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "rnntl_fast: ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "rnntl_fast: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

inline void check_optional(const c10::optional<at::Tensor>& t, const at::Tensor& input,
                           at::IntArrayRef expected, const char* name) {
  if (!t.has_value()) return;
  check_same(input, *t, name);
  check_shape(*t, expected, name);
}

inline void check_lengths(const c10::optional<at::Tensor>& lengths, int64_t steps, int64_t batch) {
  if (!lengths.has_value()) return;
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.device().is_cpu(), "rnntl_fast: lengths must be a CPU tensor for the CPU kernels, got ",
              l.device());
  TORCH_CHECK(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt,
              "rnntl_fast: lengths must be an integer tensor (int64 or int32), got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == batch, "rnntl_fast: lengths must have shape [", batch,
              "] (one per batch row), got ", l.sizes());
  if (batch == 0) return;
  const at::Tensor l64 = l.to(at::kLong);
  const int64_t lo = l64.min().item<int64_t>();
  const int64_t hi = l64.max().item<int64_t>();
  TORCH_CHECK(lo >= 0, "rnntl_fast: lengths must be >= 0, got ", lo);
  TORCH_CHECK(hi <= steps, "rnntl_fast: lengths must be <= the number of steps T=", steps, ", got ", hi);
}

inline void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 3, "rnntl_fast: input must have shape [T, B, I] (3 dims), got ",
              input.dim(), " dims");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "rnntl_fast: the CPU kernels support float32 and float64 input, got ", input.scalar_type());
  TORCH_CHECK(input.size(0) > 0, "rnntl_fast: input must have at least one step (T > 0)");
  TORCH_CHECK(input.size(1) > 0, "rnntl_fast: input must have a non-empty batch (B > 0)");
}

// A defined tensor of `sizes`, or zeros where the autograd engine passed none.
inline at::Tensor defined_or_zeros(const c10::optional<at::Tensor>& t, at::IntArrayRef sizes,
                                   const at::TensorOptions& options) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return at::zeros(sizes, options);
}

inline at::Tensor empty_if(bool keep, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return keep ? at::empty(sizes, options) : at::empty({0}, options);
}

}  // namespace cpu
}  // namespace rnntl
