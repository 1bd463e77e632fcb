// The shared gate math (csrc/include/rnntl/cell_math.h) on its own: the fast float
// nonlinearities against libm, and every backward element against central finite
// differences of the forward element in double.
#include <rnntl/cell_math.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <limits>

namespace {
int failures = 0;

void expect_close(const char* what, double got, double want, double tolerance) {
  if (!(std::fabs(got - want) <= tolerance)) {
    std::printf("FAIL %s: got %.12g want %.12g (tolerance %.3g)\n", what, got, want, tolerance);
    ++failures;
  }
}

void test_float_nonlinearities() {
  for (double x = -30.0; x <= 30.0; x += 0.0137) {
    const float xf = static_cast<float>(x);
    expect_close("sigmoid(float)", rnntl::sigmoid(xf), 1.0 / (1.0 + std::exp(-double(xf))), 3e-7);
    expect_close("tanh(float)", rnntl::tanh_activation(xf), std::tanh(double(xf)), 3e-7);
  }
  for (double x = -80.0; x <= 80.0; x += 0.173) {
    const float xf = static_cast<float>(x);
    expect_close("exp_branchless relative", rnntl::exp_branchless(xf) / std::exp(double(xf)), 1.0, 4e-7);
  }
  expect_close("clip_value", rnntl::clip_value(3.0f, 2.0f), 2.0, 0);
  expect_close("clip_value off", rnntl::clip_value(3.0f, 0.0f), 3.0, 0);
  expect_close("clip_pass boundary", rnntl::clip_pass(2.0f, 2.0f), 1.0, 0);
  expect_close("clip_pass outside", rnntl::clip_pass(-2.5f, 2.0f), 0.0, 0);
}

// Error in units in the last place of the float nearest the double result, over 400,000
// arguments spaced geometrically in 1e-6 <= |x| <= 20 (both signs). The float tanh had
// 5.2 ulp near |x| = 0.25 with a Taylor series, within the absolute 3e-7 above.
void test_float_nonlinearities_in_ulp() {
  const auto ulp_error = [](float got, double want) {
    const float nearest = static_cast<float>(want);
    const double ulp = std::nextafter(std::fabs(nearest), std::numeric_limits<float>::infinity()) - std::fabs(nearest);
    return std::fabs(double(got) - want) / ulp;
  };
  double worst_tanh = 0.0, worst_sigmoid = 0.0;
  const int points = 200000;
  for (int k = 0; k < points; ++k) {
    const double magnitude = 1e-6 * std::pow(20.0 / 1e-6, double(k) / (points - 1));
    for (const double sign : {-1.0, 1.0}) {
      const float xf = static_cast<float>(sign * magnitude);
      worst_tanh = std::fmax(worst_tanh, ulp_error(rnntl::tanh_activation(xf), std::tanh(double(xf))));
      worst_sigmoid = std::fmax(worst_sigmoid, ulp_error(rnntl::sigmoid(xf), 1.0 / (1.0 + std::exp(-double(xf)))));
    }
  }
  if (!(worst_tanh <= 2.0)) {
    std::printf("FAIL tanh(float): %.2f ulp (at most 2)\n", worst_tanh);
    ++failures;
  }
  if (!(worst_sigmoid <= 3.0)) {
    std::printf("FAIL sigmoid(float): %.2f ulp (at most 3)\n", worst_sigmoid);
    ++failures;
  }
}

// Non-finite arguments give what libm gives: a saturated sigmoid is exactly 0 or 1 (not
// 6e-39), so a gate's derivative s * (1 - s) there is exactly 0.
void test_float_non_finite() {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const auto expect_exact = [](const char* what, float got, float want) {
    if (!(got == want)) {
      std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
      ++failures;
    }
  };
  const auto expect_nan = [](const char* what, float got) {
    if (!std::isnan(got)) {
      std::printf("FAIL %s: got %.9g want NaN\n", what, got);
      ++failures;
    }
  };
  expect_exact("exp(-inf)", rnntl::exp_branchless(-inf), 0.0f);
  expect_exact("exp(-200)", rnntl::exp_branchless(-200.0f), 0.0f);
  expect_exact("exp(+inf)", rnntl::exp_branchless(inf), inf);
  expect_exact("exp(100)", rnntl::exp_branchless(100.0f), inf);
  expect_nan("exp(NaN)", rnntl::exp_branchless(nan));
  expect_exact("sigmoid(-inf)", rnntl::sigmoid(-inf), 0.0f);
  expect_exact("sigmoid(-100)", rnntl::sigmoid(-100.0f), 0.0f);
  expect_exact("sigmoid(+inf)", rnntl::sigmoid(inf), 1.0f);
  expect_nan("sigmoid(NaN)", rnntl::sigmoid(nan));
  expect_exact("tanh(-inf)", rnntl::tanh_activation(-inf), -1.0f);
  expect_exact("tanh(+inf)", rnntl::tanh_activation(inf), 1.0f);
  expect_nan("tanh(NaN)", rnntl::tanh_activation(nan));
  expect_exact("sigmoid'(-inf)", rnntl::sigmoid(-inf) * (1.0f - rnntl::sigmoid(-inf)), 0.0f);
  // Up to the overflow edge the values stay libm's (relative 4e-7), down to the underflow edge too.
  for (float x : {-87.3f, -87.0f, 87.0f, 88.3f})
    expect_close("exp_branchless near the edges", rnntl::exp_branchless(x) / std::exp(double(x)), 1.0, 4e-7);
}

// Scalar loss of one LSTM element: w_c * c_t + w_h * m_t.
double lstm_loss(const double a[4], double c_prev, double w_c, double w_h, double cell_clip) {
  const auto e = rnntl::lstm_element_forward(a[0], a[1], a[2], a[3], c_prev, cell_clip);
  return w_c * e.cell + w_h * e.hidden;
}

void test_lstm_backward() {
  const double h = 1e-6;
  for (int trial = 0; trial < 200; ++trial) {
    double a[4];
    for (double& v : a) v = (std::rand() / double(RAND_MAX) - 0.5) * 6;
    const double c_prev = (std::rand() / double(RAND_MAX) - 0.5) * 4;
    const double w_c = 0.7, w_h = -1.3;
    const double cell_clip = trial % 2 ? 0.8 : 0.0;
    const auto f = rnntl::lstm_element_forward(a[0], a[1], a[2], a[3], c_prev, cell_clip);
    if (cell_clip > 0 && std::fabs(std::fabs(f.cell_before_clip) - cell_clip) < 1e-4) continue;  // kink
    const auto b = rnntl::lstm_element_backward(f.i, f.f, f.g, f.o, f.cell_before_clip, c_prev, w_h, w_c, cell_clip,
                                                0.0, 0.0);
    const double analytic[4] = {b.d_i, b.d_f, b.d_g, b.d_o};
    for (int k = 0; k < 4; ++k) {
      double up[4] = {a[0], a[1], a[2], a[3]}, down[4] = {a[0], a[1], a[2], a[3]};
      up[k] += h;
      down[k] -= h;
      const double numeric = (lstm_loss(up, c_prev, w_c, w_h, cell_clip) - lstm_loss(down, c_prev, w_c, w_h, cell_clip)) / (2 * h);
      expect_close("lstm d(pre-activation)", analytic[k], numeric, 1e-7);
    }
    const double numeric_c = (lstm_loss(a, c_prev + h, w_c, w_h, cell_clip) - lstm_loss(a, c_prev - h, w_c, w_h, cell_clip)) / (2 * h);
    expect_close("lstm d(c_prev)", b.grad_cell_prev, numeric_c, 1e-7);
  }
}

double gru_loss(double ir, double iz, double in, double hr, double hz, double hn, double h_prev) {
  return -0.9 * rnntl::gru_element_forward(ir, iz, in, hr, hz, hn, h_prev).hidden;
}

void test_gru_backward() {
  const double h = 1e-6;
  for (int trial = 0; trial < 200; ++trial) {
    double v[7];
    for (double& x : v) x = (std::rand() / double(RAND_MAX) - 0.5) * 4;
    const auto f = rnntl::gru_element_forward(v[0], v[1], v[2], v[3], v[4], v[5], v[6]);
    const auto b = rnntl::gru_element_backward(f.r, f.z, f.n, v[5], v[6], -0.9, 0.0);
    // analytic gradients w.r.t. input_r, input_z, input_n, hidden_r, hidden_z, hidden_n, h_prev
    const double analytic[7] = {b.d_r, b.d_z, b.d_n, b.d_r, b.d_z, b.d_hidden_n, b.grad_hidden_prev};
    for (int k = 0; k < 7; ++k) {
      double up[7], down[7];
      for (int j = 0; j < 7; ++j) up[j] = down[j] = v[j];
      up[k] += h;
      down[k] -= h;
      const double numeric = (gru_loss(up[0], up[1], up[2], up[3], up[4], up[5], up[6]) -
                              gru_loss(down[0], down[1], down[2], down[3], down[4], down[5], down[6])) / (2 * h);
      expect_close("gru gradient", analytic[k], numeric, 1e-7);
    }
  }
}

// Elman element with zoneout: h = d * h_prev + (1 - d) * f(a); dL/da and dL/dh_prev (direct
// path) against finite differences, tanh and relu (a kept away from relu's kink).
template <bool kRelu>
double rnn_loss(double a, double h_prev, double keep) {
  return -0.9 * rnntl::zoneout_blend(keep, h_prev, rnntl::rnn_activation<kRelu>(a));
}

template <bool kRelu>
void test_rnn_backward() {
  const double h = 1e-6;
  for (int trial = 0; trial < 200; ++trial) {
    double a = (std::rand() / double(RAND_MAX) - 0.5) * 4;
    if (kRelu && std::fabs(a) < 1e-3) a = 0.5;
    const double h_prev = (std::rand() / double(RAND_MAX) - 0.5) * 2, keep = std::rand() / double(RAND_MAX);
    const double fresh = rnntl::rnn_activation<kRelu>(a), dh = -0.9;
    const double d_a = rnntl::rnn_preactivation_gradient<kRelu>(fresh, dh * (1 - keep), 0.0);
    const double numeric_a = (rnn_loss<kRelu>(a + h, h_prev, keep) - rnn_loss<kRelu>(a - h, h_prev, keep)) / (2 * h);
    expect_close("rnn dL/da", d_a, numeric_a, 1e-7);
    expect_close("rnn dL/dh_prev", dh * keep,
                 (rnn_loss<kRelu>(a, h_prev + h, keep) - rnn_loss<kRelu>(a, h_prev - h, keep)) / (2 * h), 1e-7);
  }
  // relu's derivative as torch's threshold_backward: zero at and below 0, NaN output passes.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect_close("relu backward at 0", rnntl::rnn_activation_backward<true>(1.0, 0.0), 0.0, 0.0);
  expect_close("relu backward at NaN", std::isnan(rnntl::rnn_activation_backward<true>(nan, nan)) ? 1 : 0, 1, 0);
  expect_close("relu of NaN", std::isnan(rnntl::rnn_activation<true>(nan)) ? 1 : 0, 1, 0);
}

void test_gate_clip() {
  const auto f = rnntl::lstm_element_forward(2.0, 1.0, -1.0, 0.5, 0.3, 0.0);
  const auto b = rnntl::lstm_element_backward(f.i, f.f, f.g, f.o, f.cell_before_clip, 0.3, 50.0, 40.0, 0.0, 0.0, 0.01);
  for (double d : {b.d_i, b.d_f, b.d_g, b.d_o}) expect_close("gate clip bound", std::fabs(d) <= 0.01 ? 0 : 1, 0, 0);
  const auto s = rnntl::lstm_element_backward(f.i, f.f, f.g, f.o, f.cell_before_clip, 0.3, 50.0, 40.0, 0.0, 0.05, 0.0);
  expect_close("state clip bounds dL/dc", std::fabs(s.grad_cell_prev) <= 0.05 * f.f + 1e-15 ? 0 : 1, 0, 0);
}

// Clamps keep NaN (a clamped NaN is NaN, not a bound), and a clamp's backward is torch's
// select: 0 wherever the clamp was active or x is NaN, even for a NaN or inf gradient.
void test_clamps_non_finite() {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const auto expect = [](const char* what, double got, double want) {
    if (!(got == want || (std::isnan(got) && std::isnan(want)))) {
      std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
      ++failures;
    }
  };
  expect("clip_value(NaN)", rnntl::clip_value(nan, 2.0), nan);
  expect("clip_value(float NaN)", rnntl::clip_value(std::numeric_limits<float>::quiet_NaN(), 2.0f), nan);
  expect("clip_value(-inf)", rnntl::clip_value(-inf, 2.0), -2.0);
  expect("clip_gradient(NaN) inside", rnntl::clip_gradient(nan, 1.0, 2.0), nan);
  expect("clip_gradient(NaN) outside", rnntl::clip_gradient(nan, 3.0, 2.0), 0.0);
  expect("clip_gradient(inf) outside", rnntl::clip_gradient(inf, -3.0, 2.0), 0.0);
  expect("clip_gradient at NaN x", rnntl::clip_gradient(0.5, nan, 2.0), 0.0);
  expect("clip_gradient at the bound", rnntl::clip_gradient(0.5, 2.0, 2.0), 0.5);
  expect("clip_gradient off", rnntl::clip_gradient(inf, 3.0, 0.0), inf);
  // A NaN dL/dc_t at a step whose cell clamp was active stops there, as in torch.
  const auto f = rnntl::lstm_element_forward(2.0, 1.0, 2.0, 0.5, 0.3, 0.5);
  const auto b = rnntl::lstm_element_backward(f.i, f.f, f.g, f.o, f.cell_before_clip, 0.3, 0.1, nan, 0.5, 0.0, 0.0);
  expect("clamped cell: dL/dc_{t-1}", b.grad_cell_prev, 0.0);
  expect("clamped cell: dL/da_f", b.d_f, 0.0);
  const auto p = rnntl::lstm_element_backward(f.i, f.f, f.g, f.o, f.cell_before_clip, 0.3, 0.1, nan, 0.0, 0.0, 0.0);
  expect("unclamped cell: NaN passes", p.grad_cell_prev, nan);
}
}  // namespace

int main() {
  test_float_nonlinearities();
  test_float_nonlinearities_in_ulp();
  test_float_non_finite();
  test_lstm_backward();
  test_gru_backward();
  test_rnn_backward<false>();
  test_rnn_backward<true>();
  test_gate_clip();
  test_clamps_non_finite();
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("cell math: all checks passed\n");
  return 0;
}
