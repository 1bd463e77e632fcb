// The multi-core step loop's machinery (csrc/cpu/persistent_cpu.h) on its own: the worker
// registration, the step barrier, the hidden-unit split and the sliced weight products,
// driving a small recurrence the way the LSTM and GRU kernels do (double-buffered state,
// one barrier per step, or two with a second, projection-like phase), against a serial
// loop, the backward's exchange of partial products, and the products loop's team. Built twice by CMakeLists.txt: plainly and with ThreadSanitizer.
#include "persistent_cpu.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

using namespace rnntl::cpu;

namespace {

int failures = 0;

void check(bool condition, const char* what, int64_t a = 0, int64_t b = 0) {
  if (!condition) {
    std::printf("FAILED: %s (%lld, %lld)\n", what, static_cast<long long>(a), static_cast<long long>(b));
    ++failures;
  }
}

// chunk(begin, end) for chunks of ceil(count / threads) of [0, count), each on its own
// thread, as torch's OpenMP parallel_for hands them out.
struct ThreadTeam {
  int threads;
  template <typename Chunk>
  void operator()(int64_t count, const Chunk& chunk) const {
    const int64_t size = (count + threads - 1) / threads;
    std::vector<std::thread> team;
    for (int64_t begin = 0; begin < count; begin += size)
      team.emplace_back([&chunk, begin, size, count] { chunk(begin, std::min(count, begin + size)); });
    for (auto& thread : team) thread.join();
  }
};

struct Recurrence {
  int64_t steps, batch, hidden;
  bool second_phase;     // y_t = V h_t, fed back instead of h_t (as the LSTM projection)
  std::vector<float> x;  // [T, B, H]
  std::vector<float> w;  // [H, H]
  std::vector<float> v;  // [H, H]
};

// h_t = tanh(x_t + W r_{t-1}), r = h (or V h with the second phase); returns all r_t [T, B, H].
std::vector<float> serial(const Recurrence& r) {
  const int64_t B = r.batch, H = r.hidden;
  std::vector<double> previous(B * H, 0.0), h(B * H);
  std::vector<float> out(r.steps * B * H);
  for (int64_t t = 0; t < r.steps; ++t) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t u = 0; u < H; ++u) {
        double sum = r.x[(t * B + b) * H + u];
        for (int64_t k = 0; k < H; ++k) sum += double(r.w[u * H + k]) * previous[b * H + k];
        h[b * H + u] = std::tanh(sum);
      }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t u = 0; u < H; ++u) {
        double value = h[b * H + u];
        if (r.second_phase) {
          value = 0;
          for (int64_t k = 0; k < H; ++k) value += double(r.v[u * H + k]) * h[b * H + k];
        }
        out[(t * B + b) * H + u] = float(value);
      }
    for (int64_t i = 0; i < B * H; ++i) previous[i] = out[(t * B) * H + i];
  }
  return out;
}

std::vector<float> parallel(const Recurrence& r, int threads) {
  const int64_t B = r.batch, H = r.hidden, slices = threads;
  const std::vector<int64_t> units = split_units(H, slices, kPanelWidth);
  SlicedPanels recurrent(units, 1, H), second(units, 1, H);
  std::vector<float> state(2 * B * H, 0.0f), gates(B * H), h(B * H), out(r.steps * B * H);
  run_team(slices, ThreadTeam{threads}, [&](const StepWorker& worker) {
    const int64_t first = worker.first_slice(), end = worker.end_slice();
    for (int64_t s = first; s < end; ++s) {
      recurrent.pack(s, 0, r.w.data() + units[s] * H, H, 1);
      second.pack(s, 0, r.v.data() + units[s] * H, H, 1);
    }
    const int64_t u0 = units[first], u1 = units[end];
    for (int64_t t = 0; t < r.steps; ++t) {
      const float* previous = state.data() + (t & 1) * B * H;
      float* current = state.data() + ((t + 1) & 1) * B * H;
      for (int64_t s = first; s < end; ++s) recurrent.multiply(s, 0, previous, H, B, gates.data() + units[s], H, false);
      float* own = r.second_phase ? h.data() : current;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t u = u0; u < u1; ++u) own[b * H + u] = std::tanh(r.x[(t * B + b) * H + u] + gates[b * H + u]);
      if (r.second_phase) {
        worker.barrier();  // all of h_t written
        for (int64_t s = first; s < end; ++s) second.multiply(s, 0, h.data(), H, B, current + units[s], H, false);
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t u = u0; u < u1; ++u) out[(t * B + b) * H + u] = current[b * H + u];
      worker.barrier();  // all of r_t written
    }
  });
  return out;
}

Recurrence make(int64_t steps, int64_t batch, int64_t hidden, bool second_phase, unsigned seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  Recurrence r{steps, batch, hidden, second_phase, {}, {}, {}};
  const float scale = 1.5f / std::sqrt(float(hidden));
  for (int64_t i = 0; i < steps * batch * hidden; ++i) r.x.push_back(uniform(generator));
  for (int64_t i = 0; i < hidden * hidden; ++i) r.w.push_back(uniform(generator) * scale);
  for (int64_t i = 0; i < hidden * hidden; ++i) r.v.push_back(uniform(generator) * scale);
  return r;
}

void compare(const Recurrence& r, int threads) {
  const std::vector<float> expected = serial(r), actual = parallel(r, threads);
  double worst = 0;
  for (size_t i = 0; i < expected.size(); ++i) worst = std::max(worst, double(std::fabs(expected[i] - actual[i])));
  check(worst < 1e-4, "parallel recurrence equals the serial loop (threads, hidden)", threads, r.hidden);
}

// The backward's exchange (PartialRecurrentProduct): a recurrence run backwards,
// g_t = tanh(x_t) * c_t over `gates` blocks of H columns, c_{t-1} = keep * c_t (with
// accumulate) + mask * (g_t @ W) [B, width], each worker making its slices' partials and
// adding its own columns of everyone's after the step's barrier, against a serial loop in
// double. Returns the largest difference over all steps' g_t and the final c.
double partial_product_error(int threads, int64_t steps, int64_t batch, int64_t hidden, int64_t gates, bool masked,
                             bool accumulate, unsigned seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const int64_t B = batch, H = hidden, G = gates * hidden, width = H;
  std::vector<float> x(steps * B * G), w(G * width), mask(B * width), c0(B * width);
  for (float& v : x) v = uniform(generator);
  for (float& v : w) v = uniform(generator) / std::sqrt(float(G));
  for (float& v : mask) v = masked ? (uniform(generator) > 0 ? 1.5f : 0.0f) : 1.0f;
  for (float& v : c0) v = uniform(generator);
  const float keep = accumulate ? 0.5f : 0.0f;
  // Serial, double.
  std::vector<double> c(c0.begin(), c0.end()), g(B * G), g_all(steps * B * G);
  for (int64_t t = steps - 1; t >= 0; --t) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < G; ++j) g[b * G + j] = std::tanh(double(x[(t * B + b) * G + j])) * c[b * width + j % H];
    std::copy(g.begin(), g.end(), g_all.begin() + t * B * G);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < width; ++k) {
        double sum = 0;
        for (int64_t j = 0; j < G; ++j) sum += g[b * G + j] * double(w[j * width + k]);
        c[b * width + k] = keep * c[b * width + k] + double(mask[b * width + k]) * sum;
      }
  }
  // Parallel: worker-owned units; the carry's columns are the same units (width = H).
  const std::vector<int64_t> units = split_units(H, threads, kPanelWidth);
  PartialRecurrentProduct product(units, gates, H, width, B);
  std::vector<float> carry(c0), grads(steps * B * G);
  run_team(threads, ThreadTeam{threads}, [&](const StepWorker& worker) {
    const int64_t first = worker.first_slice(), end = worker.end_slice();
    for (int64_t s = first; s < end; ++s) product.pack(s, w.data());
    const int64_t u0 = units[first], u1 = units[end];
    for (int64_t t = steps - 1; t >= 0; --t) {
      if (t < steps - 1) {
        for (int64_t b = 0; b < B; ++b)  // keep * c_t on own columns before the partials add
          for (int64_t k = u0; k < u1; ++k) carry[b * width + k] *= keep;
        product.add_into(t + 1, B, u0, u1, masked ? mask.data() : nullptr, carry.data(), accumulate);
      }
      float* gt = grads.data() + t * B * G;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t q = 0; q < gates; ++q)
          for (int64_t u = u0; u < u1; ++u)
            gt[b * G + q * H + u] = std::tanh(x[(t * B + b) * G + q * H + u]) * carry[b * width + u];
      for (int64_t s = first; s < end; ++s) product.multiply(s, gt, G, B, t);
      worker.barrier();
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = u0; k < u1; ++k) carry[b * width + k] *= keep;
    product.add_into(0, B, u0, u1, masked ? mask.data() : nullptr, carry.data(), accumulate);
  });
  double worst = 0;
  for (size_t i = 0; i < g_all.size(); ++i) worst = std::max(worst, std::fabs(g_all[i] - grads[i]));
  for (size_t i = 0; i < c.size(); ++i) worst = std::max(worst, std::fabs(c[i] - carry[i]));
  return worst;
}

void test_partial_recurrent_product() {
  unsigned seed = 11;
  for (int threads : {1, 2, 3, 5})
    for (int64_t hidden : {16, 40, 100})
      for (int64_t gates : {3, 4})
        for (bool masked : {false, true})
          for (bool accumulate : {false, true}) {
            const double error = partial_product_error(threads, 9, 3, hidden, gates, masked, accumulate, ++seed);
            check(error < 1e-4, "partial recurrent products equal the serial loop (threads, hidden)", threads, hidden);
          }
}

// The products loop's team (StepProductTeam): a leader runs a recurrence h_t = tanh(x_t +
// h_{t-1} @ B) (plus, on odd steps, an accumulated second product), handing each product to
// `threads` workers, against the same recurrence in double on one thread. transposed: B read
// through a row-major weight [width, depth] (x @ weight^T) or a transposed view of one.
double product_team_error(int threads, int64_t steps, int64_t rows, int64_t width, bool transposed, unsigned seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
  const int64_t depth = width;  // a recurrence: h [rows, width] is the next product's x
  std::vector<float> weight(width * depth), x(steps * rows * width);
  for (float& v : weight) v = uniform(generator);
  for (float& v : x) v = uniform(generator);
  // B[k][c] = weight[c * stride_c + k * stride_k]
  const int64_t stride_c = transposed ? 1 : depth, stride_k = transposed ? width : 1;
  std::vector<double> expected(rows * width, 0.0);
  for (int64_t t = 0; t < steps; ++t) {
    std::vector<double> next(rows * width);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) {
        double sum = 0;
        for (int64_t k = 0; k < depth; ++k) sum += expected[r * width + k] * weight[c * stride_c + k * stride_k];
        if (t % 2 == 1) sum *= 2;  // the accumulated second product
        next[r * width + c] = std::tanh(x[(t * rows + r) * width + c] + sum);
      }
    expected = next;
  }
  StepProductTeam team(weight.data(), width, depth, stride_c, stride_k, threads);
  std::vector<float> h(rows * width, 0.0f), product(rows * width);
  run_team(threads, ThreadTeam{threads}, [&](const StepWorker& worker) {
    team.pack(worker);
    worker.barrier();
    if (worker.first_slice() != 0) return team.serve(worker);
    for (int64_t t = 0; t < steps; ++t) {
      team.multiply(worker, h.data(), rows, product.data(), false);
      if (t % 2 == 1) team.multiply(worker, h.data(), rows, product.data(), true);
      for (int64_t i = 0; i < rows * width; ++i) h[i] = std::tanh(x[t * rows * width + i] + product[i]);
    }
    team.finish(worker);
  });
  double worst = 0;
  for (int64_t i = 0; i < rows * width; ++i) worst = std::max(worst, std::fabs(expected[i] - h[i]));
  return worst;
}

void test_product_team() {
  unsigned seed = 40;
  for (int threads : {1, 2, 3, 5})  // 5 slices of 40 columns: some empty
    for (int64_t width : {16, 40, 100})
      for (int64_t rows : {1, 3})
        for (bool transposed : {false, true}) {
          const double error = product_team_error(threads, 7, rows, width, transposed, ++seed);
          check(error < 1e-4, "the product team equals the serial recurrence (threads, width)", threads, width);
        }
  // Many short sequences in a row: a new team each, a product or two each.
  for (int i = 0; i < 300; ++i)
    check(product_team_error(2 + i % 2, 1 + i % 2, 1, 32, i % 3 == 0, 500 + i) < 1e-4, "short sequence", i);
}

void test_split_units() {
  const std::vector<int64_t> even = split_units(64, 2, 16);
  check(even.size() == 3 && even[0] == 0 && even[1] == 32 && even[2] == 64, "64 units in 2 slices");
  const std::vector<int64_t> uneven = split_units(100, 3, 16);
  check(uneven.front() == 0 && uneven.back() == 100, "slices cover all units");
  for (size_t i = 1; i + 1 < uneven.size(); ++i) check(uneven[i] % 16 == 0, "inner bounds aligned", uneven[i]);
  const std::vector<int64_t> few = split_units(20, 4, 16);  // two blocks for four slices
  int64_t nonempty = 0;
  for (size_t i = 0; i + 1 < few.size(); ++i) nonempty += few[i + 1] > few[i];
  check(nonempty == 2 && few.back() == 20, "empty slices where units are few", nonempty);
}

}  // namespace

int main() {
  test_split_units();
  test_partial_recurrent_product();
  test_product_team();
  for (int threads : {1, 2, 3, 4, 8})  // more workers than cores: the barrier must yield
    for (int64_t hidden : {16, 40, 100})
      for (bool second_phase : {false, true}) compare(make(23, 3, hidden, second_phase, 7 + threads), threads);
  // Many short sequences in a row: a new team and barrier each, a few steps each.
  for (int i = 0; i < 400; ++i) compare(make(1 + i % 3, 1 + i % 4, 32, i % 2 == 1, 100 + i), 2 + i % 2);
  if (failures == 0) std::printf("persistent loop: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
