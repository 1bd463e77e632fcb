// Op schemas of the rnntl_fast namespace (one place), plus the tiny Python module `_C`
// that only reports how the extension was built. Kernels register their implementations
// per device in csrc/cpu/*.cpp and csrc/cuda/*_cuda.cpp; fake (meta) implementations and
// autograd are registered from Python (rnntl_fast/ops/native.py, rnntl_fast/ops/autograd.py).
//
// Layout conventions for every op: input [T, B, I] (time-major, one layer, one direction);
// lengths, when given, is a CPU integer tensor [B] with 0 <= lengths[b] <= T; rows past
// their length keep their state and produce zero output; reverse runs t = T-1 .. 0 with
// each row starting at its own last step.
#ifdef TORCH_EXTENSION_NAME
// The module is written against the Python C API, not pybind11: torch/extension.h alone
// costs ~35 s of compile time, a third of this file's build.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "cpu/reusable_buffers_cpu.h"
#include "cpu/small_gemm_cpu.h"
#endif  // (built by CMake into the C++ tests, the file holds the schemas only)
#include <torch/library.h>

// recurrent_mask, when given, is [B, P] (P: the width of h): the recurrent product of every
// step reads recurrent_mask * h_{t-1} instead of h_{t-1} (recurrent dropout, docs/semantics.md).
// Zoneout keep weights d (zoneout_h [T, B, P], zoneout_c [T, B, H], zoneout [T, B, H]), when
// given, make the carried state d * previous + (1 - d) * new (docs/semantics.md section 10).
// Masks and keep weights get no gradient.
// Clip arguments are limits >= 0 where 0 means "off" (docs/semantics.md): cell_clip and
// proj_clip act in the forward; state_clip and gate_clip act in the backward and are taken
// by the forward ops only so that autograd can hand them to the backward ops.
TORCH_LIBRARY(rnntl_fast, m) {
  // The regularizers' random draws (docs/semantics.md section 10): out[i] = value if u_i <
  // probability else 0, u_i the i-th uniform of the Philox stream of seed
  // (csrc/include/rnntl/philox.h). out: any shape, contiguous, floating point; seed: a
  // one-element int64 tensor on out's device (a tensor, so that drawing it from a generator
  // needs no host sync and no graph break).
  m.def("bernoulli_draws_(Tensor(a!) out, float probability, float value, Tensor seed) -> ()");
  // -> (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], cells [T,B,H], hidden_pre_clip [T,B,P],
  //     carried_cells [T,B,H]: the zoned c_t, kept only with zoneout_c)
  m.def(
      "lstm_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
      "Tensor? weight_hr, Tensor? h0, Tensor? c0, Tensor? lengths, Tensor? recurrent_mask, Tensor? zoneout_h, "
      "Tensor? zoneout_c, bool reverse, float cell_clip, float proj_clip, float state_clip, float gate_clip, "
      "bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr, grad_h0, grad_c0)
  m.def(
      "lstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, Tensor? h0, Tensor? c0, Tensor? lengths, "
      "Tensor? recurrent_mask, Tensor? zoneout_h, Tensor? zoneout_c, Tensor output, Tensor gates, Tensor cells, "
      "Tensor hidden_pre_clip, Tensor carried_cells, bool reverse, float cell_clip, float proj_clip, "
      "float state_clip, float gate_clip, bool[7] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (output [T,B,H], h_n [B,H], gates [T,B,3H], hidden_n [T,B,H])
  m.def(
      "gru_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
      "Tensor? h0, Tensor? lengths, Tensor? recurrent_mask, Tensor? zoneout, bool reverse, float state_clip, "
      "float gate_clip, bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0)
  m.def(
      "gru_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? h0, Tensor? lengths, Tensor? recurrent_mask, Tensor? zoneout, Tensor output, "
      "Tensor gates, Tensor hidden_n, bool reverse, float state_clip, float gate_clip, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Elman RNN. recurrent_mask [B,H] and zoneout keep weights [T,B,H] (docs/semantics.md
  // section 10) get no gradient. -> (output [T,B,H], h_n [B,H], activations [T,B,H]: f(a_t),
  // kept only with zoneout, where it differs from the output)
  m.def(
      "rnn_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
      "Tensor? h0, Tensor? lengths, Tensor? recurrent_mask, Tensor? zoneout, bool relu, bool reverse, "
      "float state_clip, float gate_clip, bool save_for_backward) -> (Tensor, Tensor, Tensor)");
  // -> (grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0)
  m.def(
      "rnn_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? h0, Tensor? lengths, Tensor? recurrent_mask, Tensor? zoneout, "
      "Tensor output, Tensor activations, bool relu, bool reverse, float state_clip, float gate_clip, "
      "bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Layer-normalised LSTM (docs/semantics.md section 10): lstm_forward's arguments plus the
  // zoneout keep weights zoneout_h [T,B,P] and zoneout_c [T,B,H] and the norms' terms
  // layer_norm_ih, layer_norm_hh [4H] (gains) and layer_norm_cell_weight, layer_norm_cell_bias
  // [H] (absent: 1 and 0); bias_ih / bias_hh add after the norms. Masks and keep weights get
  // no gradient. -> (output [T,B,P], h_n [B,P], c_n [B,H], gates [T,B,4H], normalized [T,B,8H],
  // cells [T,B,3H], inverse_std [T,B,3], hidden_pre_clip [T,B,P]); the reserve (docs/cpu.md,
  // "Layer normalisation") is empty unless save_for_backward (hidden_pre_clip also unless proj_clip).
  m.def(
      "layer_norm_lstm_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor? weight_hr, Tensor? h0, Tensor? c0, Tensor? lengths, Tensor? recurrent_mask, "
      "Tensor? zoneout_h, Tensor? zoneout_c, Tensor layer_norm_ih, Tensor layer_norm_hh, "
      "Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, bool reverse, float cell_clip, "
      "float proj_clip, float state_clip, float gate_clip, bool save_for_backward) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_input, grad_weight_ih, grad_weight_hh, grad_bias (the same for bias_ih and
  // bias_hh), grad_weight_hr, grad_h0, grad_c0, grad_layer_norm_ih, grad_layer_norm_hh,
  // grad_layer_norm_cell_weight, grad_layer_norm_cell_bias)
  m.def(
      "layer_norm_lstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, Tensor? h0, Tensor? c0, Tensor? lengths, "
      "Tensor? recurrent_mask, Tensor? zoneout_h, Tensor? zoneout_c, Tensor layer_norm_ih, Tensor layer_norm_hh, "
      "Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, Tensor output, Tensor gates, "
      "Tensor normalized, Tensor cells, Tensor inverse_std, Tensor hidden_pre_clip, bool reverse, "
      "float cell_clip, float proj_clip, float state_clip, float gate_clip, bool[11] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Layer-normalised GRU: gru_forward's arguments plus recurrent_mask [B,H], zoneout keep
  // weights [T,B,H] and the gains layer_norm_ih, layer_norm_hh [3H]. -> (output [T,B,H],
  // h_n [B,H], gates [T,B,3H], normalized [T,B,6H], inverse_std [T,B,2])
  m.def(
      "layer_norm_gru_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor? h0, Tensor? lengths, Tensor? recurrent_mask, Tensor? zoneout, "
      "Tensor layer_norm_ih, Tensor layer_norm_hh, bool reverse, float state_clip, float gate_clip, "
      "bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0,
  // grad_layer_norm_ih, grad_layer_norm_hh). bias_hh: the backward of r * gh_n reads gh_n.
  m.def(
      "layer_norm_gru_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_hh, Tensor? h0, Tensor? lengths, Tensor? recurrent_mask, Tensor? zoneout, "
      "Tensor layer_norm_ih, Tensor layer_norm_hh, Tensor output, Tensor gates, Tensor normalized, "
      "Tensor inverse_std, bool reverse, float state_clip, float gate_clip, bool[8] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#ifdef TORCH_EXTENSION_NAME
namespace {
// The instruction set the own product kernel runs with on this CPU (avx512, avx2 or portable).
PyObject* product_kernel(PyObject*, PyObject*) { return PyUnicode_FromString(rnntl::cpu::small_gemm_variant()); }

// Frees the CPU kernels' idle buffer blocks (csrc/cpu/reusable_buffers_cpu.h); -> bytes freed.
PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  try {
    return PyLong_FromLongLong(rnntl::cpu::release_reusable_buffers());
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

// Bytes held in idle CPU buffer blocks now.
PyObject* cpu_cache_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(rnntl::cpu::idle_reusable_buffer_bytes()); }

PyMethodDef module_methods[] = {
    {"product_kernel", product_kernel, METH_NOARGS, "instruction set of the CPU product kernel on this CPU"},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "free the CPU kernels' idle buffer blocks; -> bytes freed"},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS, "bytes held in the CPU kernels' idle buffer blocks"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "_C",
                                 "rnntl_fast native kernels (ops are registered under torch.ops.rnntl_fast)", -1,
                                 module_methods};

#ifdef RNNTL_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif
#ifdef _OPENMP
constexpr long kOpenMP = _OPENMP;
#else
constexpr long kOpenMP = 0;
#endif
}  // namespace

#define RNNTL_CONCAT_(a, b) a##b
#define RNNTL_CONCAT(a, b) RNNTL_CONCAT_(a, b)
PyMODINIT_FUNC RNNTL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() {
  PyObject* module = PyModule_Create(&module_definition);
  if (module == nullptr) return nullptr;
  if (PyModule_AddObject(module, "with_cuda", PyBool_FromLong(kWithCuda)) < 0 ||
      PyModule_AddStringConstant(module, "compiler", __VERSION__) < 0 ||
      PyModule_AddIntConstant(module, "openmp", kOpenMP) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
#endif
