// The CPU kernels from C++: registered under the rnntl_fast namespace, forward equal to a
// naive ATen step loop (with lengths and reverse), and backward equal to finite differences.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>

#include "gemm_cpu.h"
#include "kernels_cpu.h"
#include "sequence_cpu.h"

namespace {
int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

// Naive LSTM (no projection, no clips) with the lengths rule of docs/semantics.md section 4.
std::tuple<at::Tensor, at::Tensor> naive_lstm(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                              const at::Tensor& b, const at::Tensor& lengths, bool reverse) {
  const int64_t T = x.size(0), B = x.size(1), H = w_hh.size(1);
  at::Tensor h = at::zeros({B, H}, x.options()), c = at::zeros({B, H}, x.options());
  at::Tensor out = at::zeros({T, B, H}, x.options());
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const at::Tensor a = at::matmul(x[t], w_ih.t()) + at::matmul(h, w_hh.t()) + b;
    const auto gates = a.chunk(4, 1);
    const at::Tensor c_new = at::sigmoid(gates[1]) * c + at::sigmoid(gates[0]) * at::tanh(gates[2]);
    const at::Tensor h_new = at::sigmoid(gates[3]) * at::tanh(c_new);
    const at::Tensor valid = (lengths > t).unsqueeze(1).to(x.scalar_type());
    c = valid * c_new + (1 - valid) * c;
    h = valid * h_new + (1 - valid) * h;
    out[t] = valid * h_new;
  }
  return {out, h};
}

void test_registered() {
  for (const char* name : {"rnntl_fast::lstm_forward", "rnntl_fast::lstm_backward", "rnntl_fast::gru_forward",
                           "rnntl_fast::gru_backward"}) {
    const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    expect(handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), name);
  }
}

void test_lstm_forward_matches_naive_loop() {
  at::manual_seed(0);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({6, 4, 5}, options), w_ih = at::randn({28, 5}, options) * 0.4,
                   w_hh = at::randn({28, 7}, options) * 0.4, b = at::randn({28}, options) * 0.1;
  const at::Tensor lengths = at::tensor({3, 6, 1, 4}, at::kLong);
  for (bool reverse : {false, true}) {
    const auto result = rnntl::cpu::lstm_forward_cpu(x, w_ih, w_hh, b, c10::nullopt, c10::nullopt, c10::nullopt,
                                                     c10::nullopt, lengths, c10::nullopt, c10::nullopt, c10::nullopt, reverse,
                                                     0.0, 0.0, 0.0, 0.0,
                                                     false);
    const auto [out, h] = naive_lstm(x, w_ih, w_hh, b, lengths, reverse);
    expect(at::allclose(std::get<0>(result), out, 1e-12, 1e-12), reverse ? "lstm output (reverse)" : "lstm output");
    expect(at::allclose(std::get<1>(result), h, 1e-12, 1e-12), reverse ? "lstm h_n (reverse)" : "lstm h_n");
  }
}

void test_gru_backward_matches_finite_differences() {
  at::manual_seed(1);
  const auto options = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::randn({4, 2, 3}, options);
  const at::Tensor w_ih = at::randn({15, 3}, options) * 0.5, w_hh = at::randn({15, 5}, options) * 0.5;
  const at::Tensor h0 = at::randn({2, 5}, options), weights = at::randn({4, 2, 5}, options);
  const at::Tensor lengths = at::tensor({2, 4}, at::kLong);
  auto loss = [&](const at::Tensor& input) {
    const auto r = rnntl::cpu::gru_forward_cpu(input, w_ih, w_hh, c10::nullopt, c10::nullopt, h0, lengths, c10::nullopt,
                                               c10::nullopt, true, 0.0, 0.0, false);
    return (std::get<0>(r) * weights).sum().item<double>();
  };
  const auto forward = rnntl::cpu::gru_forward_cpu(x, w_ih, w_hh, c10::nullopt, c10::nullopt, h0, lengths, c10::nullopt,
                                                   c10::nullopt, true, 0.0, 0.0, true);
  const auto grads = rnntl::cpu::gru_backward_cpu(weights, c10::nullopt, x, w_ih, w_hh, h0, lengths, c10::nullopt,
                                                  c10::nullopt, std::get<0>(forward), std::get<2>(forward), std::get<3>(forward),
                                                  true, 0.0, 0.0, {true, false, false, false, false, false});
  const at::Tensor grad_input = std::get<0>(grads);
  const double step = 1e-6;
  for (int64_t i = 0; i < x.numel(); ++i) {
    at::Tensor up = x.clone(), down = x.clone();
    up.view(-1)[i] += step;
    down.view(-1)[i] -= step;
    const double numeric = (loss(up) - loss(down)) / (2 * step);
    expect(std::abs(grad_input.view(-1)[i].item<double>() - numeric) < 1e-7, "gru grad_input vs finite differences");
  }
  expect(std::get<1>(grads).numel() == 0, "gru grad_weight_ih skipped when not requested");
}

// The valid-rows layout and the one step scheduler: for every direction and block size, the
// blocks start at the right steps, each holds its steps' compact rows as one contiguous range
// within the buffer capacity, and together they cover [0, N) once.
void test_projection_blocks_cover_every_valid_row_once() {
  const int64_t T = 7, B = 4;
  const at::Tensor lengths = at::tensor({3, 7, 1, 5}, at::kLong);
  const rnntl::cpu::SequenceOrder sequence(lengths, T, B);
  expect(sequence.valid_rows == 16 && !sequence.compact_is_padded, "valid rows of lengths 3, 7, 1, 5");
  // The row split projects every row before its workers start: its buffer holds them all.
  const rnntl::cpu::StepLoop row_split{rnntl::cpu::StepLoop::rows, 2};
  expect(rnntl::cpu::ProjectionBlocks::capacity(sequence, 4, row_split) == sequence.valid_rows,
         "the row split's buffer takes every valid row");
  for (bool reverse : {false, true}) {
    for (int64_t block_rows : {1, 4, 6, 9, 100}) {
      rnntl::cpu::ProjectionBlocks blocks(sequence, reverse, block_rows);
      std::vector<int> covered(sequence.valid_rows, 0);
      int64_t block_first = 0, block_rows_seen = 0, block_end = 0;
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = sequence.time_of(step, reverse);
        if (blocks.starts_at(step)) {
          expect(block_rows_seen == block_end - block_first, "a block's rows are its steps' rows");
          expect(blocks.rows() <= rnntl::cpu::ProjectionBlocks::capacity(sequence, block_rows, rnntl::cpu::StepLoop{}),
                 "a block fits");
          block_first = blocks.first();
          block_end = block_first + blocks.rows();
          block_rows_seen = 0;
          for (int64_t r = block_first; r < block_end; ++r) ++covered[r];
        }
        const int64_t first = sequence.first_row[t], n = sequence.active[t];
        expect(first >= block_first && first + n <= block_end, "a step's rows lie in its block");
        block_rows_seen += n;
      }
      expect(block_rows_seen == block_end - block_first, "the last block's rows are its steps' rows");
      bool once = true;
      for (int c : covered) once = once && c == 1;
      expect(once, reverse ? "blocks cover each compact row once (reverse)" : "blocks cover each compact row once");
    }
  }
}

// The weight-gradient product a [K, M]^T @ b [K, N] on both of its float32 paths (the own
// kernel, taken on non-Intel CPUs, and BLAS in chunks) against float64, whichever CPU runs
// the test: shapes that leave partial register blocks, panels and depth chunks, strided
// operands, threads, K = 0, and a K long enough to be packed in several spans.
void test_weight_gradient_products() {
  at::manual_seed(1);
  struct Shape {
    int64_t K, M, N;
  };
  for (const Shape shape : {Shape{1, 1, 1}, Shape{7, 13, 5}, Shape{300, 37, 17}, Shape{700, 96, 48},
                            Shape{3100, 200, 70}, Shape{0, 8, 16},
                            Shape{5000, 16, 2050}}) {  // the last: b packed in three spans of K
    for (bool strided : {false, true}) {
      // strided: a and b are column slices of wider matrices (row strides M + 3 and N + 5)
      const at::Tensor a_full = at::randn({shape.K, shape.M + (strided ? 3 : 0)});
      const at::Tensor b_full = at::randn({shape.K, shape.N + (strided ? 5 : 0)});
      const at::Tensor a = a_full.narrow(1, 0, shape.M), b = b_full.narrow(1, 0, shape.N);
      const at::Tensor expected = at::mm(a.to(at::kDouble).t(), b.to(at::kDouble));
      const int64_t chunk = std::max<int64_t>(256, static_cast<int64_t>(std::sqrt(double(shape.K))));
      // float32 sums of at most `chunk` products, then K / chunk partial sums: well within 1e-5 * (chunk + K / chunk)
      const double bound = 1e-5 * double(chunk + shape.K / chunk) * (1.0 + std::sqrt(double(shape.K)));
      const at::Tensor own = rnntl::cpu::transposed_product_own_kernel(a, b, chunk);
      const at::Tensor chosen = rnntl::cpu::transposed_product(a, b);
      const double own_error = (own.to(at::kDouble) - expected).abs().max().item<double>();
      const double chosen_error = (chosen.to(at::kDouble) - expected).abs().max().item<double>();
      expect(own.sizes() == expected.sizes() && own_error <= bound, "own-kernel weight gradient equals float64");
      expect(chosen.sizes() == expected.sizes() && chosen_error <= bound, "weight gradient equals float64");
    }
  }
  // One thread and several give the same sums (each result row is summed by one thread, in one order).
  const at::Tensor a = at::randn({900, 130}), b = at::randn({900, 40});
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = rnntl::cpu::transposed_product_own_kernel(a, b, 256);
  at::set_num_threads(3);
  const at::Tensor three = rnntl::cpu::transposed_product_own_kernel(a, b, 256);
  at::set_num_threads(threads);
  expect(at::equal(one, three), "own-kernel weight gradient: 1 and 3 threads equal bit for bit");
}

void test_bad_input_is_an_error_not_a_crash() {
  const at::Tensor x = at::randn({3, 2, 4});
  bool raised = false;
  try {
    rnntl::cpu::lstm_forward_cpu(x, at::randn({20, 4}), at::randn({20, 5}), c10::nullopt, c10::nullopt, c10::nullopt,
                                 c10::nullopt, c10::nullopt, at::tensor({4, 1}, at::kLong), c10::nullopt, c10::nullopt,
                                 c10::nullopt, false, 0.0, 0.0,
                                 0.0, 0.0, false);
  } catch (const c10::Error& error) {
    raised = std::string(error.what()).find("lengths must be <=") != std::string::npos;
  }
  expect(raised, "too-long lengths raise a c10::Error naming lengths");
}
}  // namespace

int main() {
  test_registered();
  test_lstm_forward_matches_naive_loop();
  test_gru_backward_matches_finite_differences();
  test_projection_blocks_cover_every_valid_row_once();
  test_weight_gradient_products();
  test_bad_input_is_an_error_not_a_crash();
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("cpu ops: all checks passed\n");
  return 0;
}
