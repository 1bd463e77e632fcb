// The layer-norm row math (csrc/include/rnntl/layer_norm_math.h) on its own, without torch:
// the forward against the definition of docs/semantics.md section 10 (computed here directly),
// the backward against central finite differences of the forward in double, and the
// state-gradient helpers against their definitions.
#include <rnntl/layer_norm_math.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {
int failures = 0;

void expect_close(const char* what, double got, double want, double tolerance) {
  if (!(std::fabs(got - want) <= tolerance)) {
    std::printf("FAIL %s: got %.12g want %.12g (tolerance %.3g)\n", what, got, want, tolerance);
    ++failures;
  }
}

std::vector<double> row(int n, double scale, double offset) {
  std::vector<double> v(n);
  for (int k = 0; k < n; ++k) v[k] = offset + scale * std::sin(1.7 * k + 0.3) + 0.1 * std::cos(0.37 * k * k);
  return v;
}

// sum_k weight[k] * (LN(v) * gain)[k]: a scalar loss whose gradient the backward gives.
double loss(const std::vector<double>& v, const std::vector<double>& gain, const std::vector<double>& weight) {
  std::vector<double> normalized(v.size());
  rnntl::layer_norm_row_forward(v.data(), normalized.data(), int64_t(v.size()));
  double sum = 0;
  for (size_t k = 0; k < v.size(); ++k) sum += weight[k] * normalized[k] * gain[k];
  return sum;
}

void test_forward(int n) {
  const std::vector<double> v = row(n, 2.0, 0.7);
  double mean = 0, var = 0;
  for (double x : v) mean += x / n;
  for (double x : v) var += (x - mean) * (x - mean) / n;
  std::vector<double> normalized(n);
  const double inverse_std = rnntl::layer_norm_row_forward(v.data(), normalized.data(), n);
  expect_close("inverse_std", inverse_std, 1.0 / std::sqrt(var + 1e-5), 1e-12);
  for (int k = 0; k < n; ++k) expect_close("normalized", normalized[k], (v[k] - mean) / std::sqrt(var + 1e-5), 1e-12);
  // float: the same within float rounding (in place, as the kernels call it for the cell)
  std::vector<float> vf(v.begin(), v.end());
  rnntl::layer_norm_row_forward(vf.data(), vf.data(), n);
  for (int k = 0; k < n; ++k) expect_close("normalized float", vf[k], normalized[k], 2e-6);
}

void test_backward(int n) {
  std::vector<double> v = row(n, 1.5, -0.4);
  const std::vector<double> gain = row(n, 0.3, 1.0), weight = row(n, 1.0, 0.2);
  std::vector<double> normalized(n), grad_v(n);
  const double inverse_std = rnntl::layer_norm_row_forward(v.data(), normalized.data(), n);
  rnntl::layer_norm_row_backward(weight.data(), gain.data(), normalized.data(), inverse_std, grad_v.data(), n);
  const double eps = 1e-6;
  for (int k = 0; k < n; ++k) {
    const double saved = v[k];
    v[k] = saved + eps;
    const double up = loss(v, gain, weight);
    v[k] = saved - eps;
    const double down = loss(v, gain, weight);
    v[k] = saved;
    expect_close("layer_norm_row_backward", grad_v[k], (up - down) / (2 * eps), 1e-7);
  }
}

void test_state_gradients() {
  const auto zoned = rnntl::lstm_layer_norm_cell_gradient<true>(3.0, 0.5, 0.25, 2.0);  // carry clamped to 2
  expect_close("cell fresh (zoneout)", zoned.fresh, 2.0 * 0.75 + 0.5, 0);
  expect_close("cell direct (zoneout)", zoned.direct, 2.0 * 0.25, 0);
  const auto plain = rnntl::lstm_layer_norm_cell_gradient<false>(1.5, 0.75, 0.0, 2.0);  // total clamped to 2
  expect_close("cell fresh", plain.fresh, 2.0, 0);
  expect_close("cell direct", plain.direct, 0.0, 0);
  const auto h = rnntl::hidden_state_gradient<true>(0.5, 0.25, 0.4, 0.0);
  expect_close("hidden fresh (zoneout)", h.fresh, 0.75 * 0.6, 1e-15);
  expect_close("hidden direct (zoneout)", h.direct, 0.75 * 0.4, 1e-15);
}
}  // namespace

int main() {
  for (int n : {1, 3, 16, 37, 1024}) test_forward(n);
  for (int n : {2, 5, 24, 67}) test_backward(n);
  test_state_gradients();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("layer_norm_math: all passed\n");
  return EXIT_SUCCESS;
}
