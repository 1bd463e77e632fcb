"""The real CUDA kernel sources, run on the CPU by the emulated CUDA execution model
(tests/cuda_emulation/cuda_emulation.h), against the float64 reference loop.

Both strategies (stepwise: pointwise kernels between GEMMs; persistent: one cooperative
launch with a grid barrier per step), LSTM, GRU and Elman RNN, and the layer-normalised LSTM and
GRU (stepwise only), forward and every gradient, with the
error rule of tests/tolerances.py (baseline: the reference loop in the same dtype).
The driver is built with g++ only (tests/cuda_emulation/build.py), in about 10 s.
A second build under ThreadSanitizer must run without a race report.
"""
import ctypes
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rnntl_fast.ops.options import sequence_options  # noqa: E402
from rnntl_fast.ops.reference import LayerNormWeights, gru_reference, lstm_reference, rnn_reference  # noqa: E402
from tolerances import assert_within_error_rule  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs g++")

STRATEGIES = {"stepwise": 1, "persistent": 2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
THREADS_PER_BLOCK = 64  # two warps per block; one std::thread per emulated CUDA thread
MULTIPROCESSORS = 3     # the persistent plan splits H over this many blocks


# Saved reserve of the last emulated runs, by id of the result dict.
_RESERVE = {}


@pytest.fixture(scope="module")
def library():
    from cuda_emulation.build import build_library

    lib = ctypes.CDLL(build_library())
    lib.rnntl_emulation_lstm.restype = ctypes.c_char_p
    lib.rnntl_emulation_gru.restype = ctypes.c_char_p
    lib.rnntl_emulation_rnn.restype = ctypes.c_char_p
    lib.rnntl_emulation_layer_norm_lstm.restype = ctypes.c_char_p
    lib.rnntl_emulation_layer_norm_gru.restype = ctypes.c_char_p
    return lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(None)


def _i(v):
    return ctypes.c_int64(v)


def _d(v):
    return ctypes.c_double(v or 0.0)


# (name, T, B, I, H, proj, lengths, reverse, cell_clip, proj_clip, grad_clip, mode, with_h0)
LSTM_CASES = [
    ("T1_B1", 1, 1, 3, 4, None, None, False, None, None, None, "state", True),
    ("odd_unsorted", 5, 3, 7, 13, None, [3, 5, 1], False, None, None, None, "state", True),
    ("reverse_clips_state", 5, 3, 7, 13, None, [3, 5, 1], True, 0.5, 0.2, 0.02, "state", True),
    ("gates_mode_no_h0", 4, 2, 5, 9, None, None, True, None, None, 0.01, "gates", False),
    ("zero_length_row", 3, 4, 3, 6, None, [0, 3, 2, 3], False, 0.7, None, 0.05, "state", True),
    ("proj", 4, 3, 6, 8, 5, [4, 2, 3], False, None, 0.3, 0.05, "state", True),
    ("proj_reverse_gates", 3, 2, 4, 7, 3, [1, 3], True, 0.6, None, 0.02, "gates", False),
]

GRU_CASES = [
    ("T1_B1", 1, 1, 3, 4, None, False, None, "state", True),
    ("odd_unsorted", 5, 3, 7, 13, [3, 5, 1], False, None, "state", True),
    ("reverse_state_clip", 5, 3, 7, 13, [3, 5, 1], True, 0.02, "state", True),
    ("gates_mode_no_h0", 4, 2, 5, 9, None, True, 0.01, "gates", False),
    ("zero_length_row", 3, 4, 3, 6, [0, 3, 2, 3], False, 0.05, "state", True),
]


def _rand(*shape, dtype=torch.float64, scale=0.5):
    return ((torch.rand(*shape, dtype=torch.float64) * 2 - 1) * scale).to(dtype)


def _mask_of(data, dtype):
    """The recurrent mask of a case in `dtype` ([B, P]), or None."""
    return data["mask"].to(dtype).contiguous() if data.get("mask") is not None else None


# Inputs of a case that receive no gradient (go, ghn, gcn: the loss's weights).
GIVEN = ("go", "ghn", "gcn", "lengths", "mask", "zoneout", "zoneout_h", "zoneout_c")


def _keep_of(data, name, dtype):
    """Zoneout keep weights `name` of a case in `dtype` ([T, B, *]), or None."""
    return data[name].to(dtype).contiguous() if data.get(name) is not None else None


def _lstm_reference_run(dtype, data, options):
    tensors = {k: (v.detach().to(dtype).clone().requires_grad_() if v is not None and k not in GIVEN else v)
               for k, v in data.items()}
    out, h_n, c_n = lstm_reference(tensors["x"], tensors["w_ih"], tensors["w_hh"], tensors["b_ih"], tensors["b_hh"],
                                   tensors["w_hr"], tensors["h0"], tensors["c0"], data["lengths"],
                                   recurrent_mask=_mask_of(data, dtype), zoneout_h=_keep_of(data, "zoneout_h", dtype),
                                   zoneout_c=_keep_of(data, "zoneout_c", dtype), **options._asdict())
    loss = (out * data["go"].to(dtype)).sum() + (h_n * data["ghn"].to(dtype)).sum() + (c_n * data["gcn"].to(dtype)).sum()
    loss.backward()
    grads = {k: tensors[k].grad for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0")
             if tensors[k] is not None}
    return {"output": out.detach(), "h_n": h_n.detach(), "c_n": c_n.detach(), **grads}


def _lstm_emulated_run(library, strategy, dtype, data, shape, options, frozen=False):
    """Forward (saving) and backward of the emulated kernels; the reserve (gates, cells,
    hidden_pre_clip and, with zoneout_c, carried_cells) is kept in _RESERVE."""
    T, B, I, H, P = shape
    d = {k: (v.to(dtype).contiguous() if v is not None and k != "lengths" else v) for k, v in data.items()}
    for name in ("mask", "zoneout_h", "zoneout_c"):
        d.setdefault(name, None)
    nan = lambda *s: torch.full(s, float("nan"), dtype=dtype)  # noqa: E731  catches unwritten outputs
    out, h_n, c_n = nan(T, B, P), nan(B, P), nan(B, H)
    gates, cells = nan(T, B, 4 * H), nan(T, B, H)
    pre = nan(T, B, P) if options.proj_clip else None
    carried = nan(T, B, H) if d["zoneout_c"] is not None else None
    g = {"x": nan(T, B, I), "w_ih": None if frozen else nan(4 * H, I), "w_hh": None if frozen else nan(4 * H, P),
         "bias": nan(4 * H),
         "w_hr": nan(P, H) if d["w_hr"] is not None else None,
         "h0": nan(B, P) if d["h0"] is not None else None, "c0": nan(B, H) if d["c0"] is not None else None}
    lengths = data["lengths"]
    error = library.rnntl_emulation_lstm(
        ctypes.c_int(DTYPE_CODES[dtype]), ctypes.c_int(STRATEGIES[strategy]), ctypes.c_int(THREADS_PER_BLOCK),
        ctypes.c_int(MULTIPROCESSORS), _i(T), _i(B), _i(I), _i(H), _i(P), ctypes.c_int(int(options.reverse)),
        _d(options.cell_clip), _d(options.proj_clip), _d(options.state_clip), _d(options.gate_clip), _ptr(lengths),
        _ptr(d["mask"]), _ptr(d["zoneout_h"]), _ptr(d["zoneout_c"]), _ptr(carried), _ptr(d["x"]), _ptr(d["w_ih"]),
        _ptr(d["w_hh"]), _ptr(d["b_ih"]), _ptr(d["b_hh"]),
        _ptr(d["w_hr"]), _ptr(d["h0"]), _ptr(d["c0"]), _ptr(out), _ptr(h_n), _ptr(c_n), _ptr(gates), _ptr(cells),
        _ptr(pre), _ptr(d["go"]), _ptr(d["ghn"]), _ptr(d["gcn"]), _ptr(g["x"]), _ptr(g["w_ih"]), _ptr(g["w_hh"]),
        _ptr(g["bias"]), _ptr(g["w_hr"]), _ptr(g["h0"]), _ptr(g["c0"]))
    if error is not None:
        raise RuntimeError(error.decode())
    result = {"output": out, "h_n": h_n, "c_n": c_n, "x": g["x"], "b_ih": g["bias"], "b_hh": g["bias"]}
    _RESERVE[id(result)] = (gates, cells, pre) + ((carried,) if carried is not None else ())
    for k in ("w_ih", "w_hh", "w_hr", "h0", "c0"):
        if g[k] is not None:
            result[k] = g[k]
    return result


def _compare(fast, baseline, reference, dtype):
    assert set(fast) == set(reference), (sorted(fast), sorted(reference))
    for name in reference:
        if dtype == torch.float64:
            error = (fast[name] - reference[name]).abs().max().item() if fast[name].numel() else 0.0
            assert error <= 1e-10, f"{name}: float64 error {error:.3e}"
        else:
            assert_within_error_rule(name, fast[name], baseline[name], reference[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", LSTM_CASES, ids=[c[0] for c in LSTM_CASES])
def test_lstm_matches_reference(library, case, strategy, dtype):
    _, T, B, I, H, proj, lengths, reverse, cell_clip, proj_clip, grad_clip, mode, with_h0 = case
    if strategy == "persistent" and proj is not None:
        pytest.skip("the persistent kernel keeps W_hh of P == H on chip; proj_size runs stepwise")
    P = proj or H
    data = {"x": _rand(T, B, I), "w_ih": _rand(4 * H, I), "w_hh": _rand(4 * H, P), "b_ih": _rand(4 * H),
            "b_hh": _rand(4 * H), "w_hr": _rand(P, H) if proj else None,
            "h0": _rand(B, P) if with_h0 else None, "c0": _rand(B, H) if with_h0 else None,
            "go": _rand(T, B, P), "ghn": _rand(B, P), "gcn": _rand(B, H),
            "lengths": torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None}
    options = sequence_options(reverse, cell_clip, proj_clip, grad_clip, mode)
    reference = _lstm_reference_run(torch.float64, data, options)
    baseline = _lstm_reference_run(dtype, data, options)
    fast = _lstm_emulated_run(library, strategy, dtype, data, (T, B, I, H, P), options)
    _compare(fast, baseline, reference, dtype)


def _gru_reference_run(dtype, data, options):
    tensors = {k: (v.detach().to(dtype).clone().requires_grad_() if v is not None and k not in GIVEN else v)
               for k, v in data.items()}
    out, h_n = gru_reference(tensors["x"], tensors["w_ih"], tensors["w_hh"], tensors["b_ih"], tensors["b_hh"],
                             tensors["h0"], data["lengths"], recurrent_mask=_mask_of(data, dtype),
                             zoneout=_keep_of(data, "zoneout", dtype), reverse=options.reverse,
                             state_clip=options.state_clip, gate_clip=options.gate_clip)
    loss = (out * data["go"].to(dtype)).sum() + (h_n * data["ghn"].to(dtype)).sum()
    loss.backward()
    grads = {k: tensors[k].grad for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0") if tensors[k] is not None}
    return {"output": out.detach(), "h_n": h_n.detach(), **grads}


def _gru_emulated_run(library, strategy, dtype, data, shape, options, sms=MULTIPROCESSORS, frozen=False):
    T, B, I, H = shape
    d = {k: (v.to(dtype).contiguous() if v is not None and k != "lengths" else v) for k, v in data.items()}
    d.setdefault("mask", None)
    d.setdefault("zoneout", None)
    nan = lambda *s: torch.full(s, float("nan"), dtype=dtype)  # noqa: E731
    out, h_n, gates, hidden_n = nan(T, B, H), nan(B, H), nan(T, B, 3 * H), nan(T, B, H)
    g = {"x": nan(T, B, I), "w_ih": None if frozen else nan(3 * H, I), "w_hh": None if frozen else nan(3 * H, H),
         "b_ih": nan(3 * H), "b_hh": nan(3 * H),
         "h0": nan(B, H) if d["h0"] is not None else None}
    error = library.rnntl_emulation_gru(
        ctypes.c_int(DTYPE_CODES[dtype]), ctypes.c_int(STRATEGIES[strategy]), ctypes.c_int(THREADS_PER_BLOCK),
        ctypes.c_int(sms), _i(T), _i(B), _i(I), _i(H), ctypes.c_int(int(options.reverse)),
        _d(options.state_clip), _d(options.gate_clip), _ptr(data["lengths"]), _ptr(d["mask"]), _ptr(d["zoneout"]),
        _ptr(d["x"]), _ptr(d["w_ih"]), _ptr(d["w_hh"]), _ptr(d["b_ih"]), _ptr(d["b_hh"]), _ptr(d["h0"]), _ptr(out),
        _ptr(h_n), _ptr(gates), _ptr(hidden_n), _ptr(d["go"]), _ptr(d["ghn"]), _ptr(g["x"]), _ptr(g["w_ih"]),
        _ptr(g["w_hh"]), _ptr(g["b_ih"]), _ptr(g["b_hh"]), _ptr(g["h0"]))
    if error is not None:
        raise RuntimeError(error.decode())
    result = {"output": out, "h_n": h_n}
    result.update({k: v for k, v in g.items() if v is not None})
    _RESERVE[id(result)] = (gates, hidden_n)
    return result


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", GRU_CASES, ids=[c[0] for c in GRU_CASES])
def test_gru_matches_reference(library, case, strategy, dtype):
    _, T, B, I, H, lengths, reverse, grad_clip, mode, with_h0 = case
    data = {"x": _rand(T, B, I), "w_ih": _rand(3 * H, I), "w_hh": _rand(3 * H, H), "b_ih": _rand(3 * H),
            "b_hh": _rand(3 * H), "h0": _rand(B, H) if with_h0 else None, "go": _rand(T, B, H), "ghn": _rand(B, H),
            "lengths": torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None}
    options = sequence_options(reverse, grad_clip=grad_clip, grad_clip_mode=mode)
    reference = _gru_reference_run(torch.float64, data, options)
    baseline = _gru_reference_run(dtype, data, options)
    fast = _gru_emulated_run(library, strategy, dtype, data, (T, B, I, H), options)
    _compare(fast, baseline, reference, dtype)


# Recurrent dropout (docs/semantics.md section 10): a [B, P] mask of 0 and 2 (p = 0.5)
# multiplies h_{t-1} in every step's recurrent product. "frozen": no weight gradients are
# asked for (the dW GEMMs and their buffers are skipped).
# (id, cell, T, B, I, H, proj, lengths, reverse, clip options, frozen)
MASK_CASES = [
    ("lstm", "lstm", 4, 3, 5, 9, None, None, False, dict(), False),
    ("lstm_lengths_reverse_clips", "lstm", 5, 3, 4, 9, None, [3, 5, 0], True,
     dict(cell_clip=0.5, proj_clip=0.2, grad_clip=0.02), False),
    ("lstm_proj_clip_gates", "lstm", 4, 3, 5, 8, 5, [4, 2, 3], False,
     dict(proj_clip=0.3, grad_clip=0.02, grad_clip_mode="gates"), False),
    ("lstm_proj_reverse_frozen", "lstm", 3, 2, 4, 6, 4, [1, 3], True, dict(cell_clip=0.6), True),
    ("gru", "gru", 4, 3, 5, 9, None, None, False, dict(), False),
    ("gru_lengths_reverse_clip", "gru", 5, 3, 4, 9, None, [3, 5, 0], True, dict(grad_clip=0.02), False),
    ("gru_clip_gates_frozen", "gru", 4, 2, 3, 7, None, [2, 4], False,
     dict(grad_clip=0.02, grad_clip_mode="gates"), True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_recurrent_mask_matches_reference(library, case, strategy, dtype):
    """Forward results and every gradient with a recurrent mask against the float64
    reference: the product reads mask * h_{t-1}, the carried state is unmasked, the
    product's part of dL/dh_{t-1} and the h_{t-1} of dW_hh are masked."""
    _, cell, T, B, I, H, proj, lengths, reverse, clips, frozen = case
    if strategy == "persistent" and proj is not None:
        pytest.skip("the persistent kernel keeps W_hh of P == H on chip; proj_size runs stepwise")
    P = proj or H
    G = (4 if cell == "lstm" else 3) * H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, P), "b_ih": _rand(G), "b_hh": _rand(G),
            "h0": _rand(B, P), "go": _rand(T, B, P), "ghn": _rand(B, P),
            "mask": torch.bernoulli(torch.full((B, P), 0.5, dtype=torch.float64)) * 2,
            "lengths": torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None}
    if cell == "lstm":
        data.update({"w_hr": _rand(P, H) if proj else None, "c0": _rand(B, H), "gcn": _rand(B, H)})
    options = sequence_options(reverse, **clips)
    reference = _reference_case(cell, torch.float64, data, options)
    baseline = _reference_case(cell, dtype, data, options)
    if frozen:
        for results in (reference, baseline):
            del results["w_ih"], results["w_hh"]
    if cell == "lstm":
        fast = _lstm_emulated_run(library, strategy, dtype, data, (T, B, I, H, P), options, frozen=frozen)
    else:
        fast = _gru_emulated_run(library, strategy, dtype, data, (T, B, I, H), options, frozen=frozen)
    _compare(fast, baseline, reference, dtype)


# Zoneout (docs/semantics.md section 10): keep weights [T, B, *] as 0/1 draws of Bernoulli(z)
# (training) or every entry z (evaluation); the LSTM's of h ("h"), of c ("c") or both.
# (id, cell, T, B, I, H, proj, lengths, reverse, zoned, keep, mask, clip options, frozen)
ZONEOUT_CASES = [
    ("lstm_h_draws", "lstm", 4, 3, 5, 9, None, None, False, "h", "draws", False, dict(), False),
    ("lstm_c_eval_lengths_reverse_clips", "lstm", 5, 3, 4, 9, None, [3, 5, 0], True, "c", "eval", False,
     dict(cell_clip=0.5, grad_clip=0.02), False),
    ("lstm_hc_draws_mask_lengths_clips", "lstm", 5, 4, 3, 7, None, [2, 5, 0, 4], False, "hc", "draws", True,
     dict(cell_clip=0.5, proj_clip=0.2, grad_clip=0.02), False),
    ("lstm_hc_eval_mask_reverse_gates_frozen", "lstm", 4, 2, 3, 6, None, [4, 2], True, "hc", "eval", True,
     dict(grad_clip=0.02, grad_clip_mode="gates"), True),
    ("lstm_proj_hc_draws_mask_clips", "lstm", 4, 3, 5, 8, 5, [4, 2, 3], False, "hc", "draws", True,
     dict(cell_clip=0.6, proj_clip=0.3, grad_clip=0.05), False),
    ("lstm_proj_h_eval_reverse_gates", "lstm", 3, 2, 4, 7, 3, [1, 3], True, "h", "eval", False,
     dict(proj_clip=0.3, grad_clip=0.02, grad_clip_mode="gates"), False),
    ("gru_draws_lengths_reverse_clip", "gru", 5, 3, 4, 9, None, [3, 5, 0], True, "h", "draws", False,
     dict(grad_clip=0.02), False),
    ("gru_eval_mask_gates_frozen", "gru", 4, 3, 5, 8, None, [4, 1, 3], False, "h", "eval", True,
     dict(grad_clip=0.02, grad_clip_mode="gates"), True),
]
ZONEOUT_RATES = {"zoneout_h": 0.3, "zoneout_c": 0.2, "zoneout": 0.3}


def _zoneout_data(cell, T, B, I, H, proj, lengths, zoned, keep, mask):
    """Inputs of a zoneout case; every leaf is given (h0, c0 and the biases)."""
    P = proj or H
    G = (4 if cell == "lstm" else 3) * H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, P), "b_ih": _rand(G), "b_hh": _rand(G),
            "h0": _rand(B, P), "go": _rand(T, B, P), "ghn": _rand(B, P),
            "mask": torch.bernoulli(torch.full((B, P), 0.5, dtype=torch.float64)) * 2 if mask else None,
            "lengths": torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None}
    if cell == "lstm":
        data.update({"w_hr": _rand(P, H) if proj else None, "c0": _rand(B, H), "gcn": _rand(B, H)})
        names = {"h": ("zoneout_h",), "c": ("zoneout_c",), "hc": ("zoneout_h", "zoneout_c")}[zoned]
    else:
        names = ("zoneout",)
    for name in names:
        rate = torch.full((T, B, P if name == "zoneout_h" else H), ZONEOUT_RATES[name], dtype=torch.float64)
        data[name] = torch.bernoulli(rate) if keep == "draws" else rate
    return data


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", ZONEOUT_CASES, ids=[c[0] for c in ZONEOUT_CASES])
def test_zoneout_matches_reference(library, case, strategy, dtype):
    """Forward results and every gradient with zoneout against the float64 reference: the
    carried state blends the previous and the new one, h~ reads the fresh cell, the
    projected h is the zoned one, and the state clip clamps the carried state's gradient."""
    _, cell, T, B, I, H, proj, lengths, reverse, zoned, keep, mask, clips, frozen = case
    if strategy == "persistent" and proj is not None:
        pytest.skip("the persistent kernel keeps W_hh of P == H on chip; proj_size runs stepwise")
    data = _zoneout_data(cell, T, B, I, H, proj, lengths, zoned, keep, mask)
    options = sequence_options(reverse, **clips)
    reference = _reference_case(cell, torch.float64, data, options)
    baseline = _reference_case(cell, dtype, data, options)
    if frozen:
        for results in (reference, baseline):
            del results["w_ih"], results["w_hh"]
    if cell == "lstm":
        fast = _lstm_emulated_run(library, strategy, dtype, data, (T, B, I, H, proj or H), options, frozen=frozen)
    else:
        fast = _gru_emulated_run(library, strategy, dtype, data, (T, B, I, H), options, frozen=frozen)
    _compare(fast, baseline, reference, dtype)


# Elman RNN (docs/semantics.md section 10): f = tanh or relu, with the recurrent mask
# ([B, H] of 0 and 2) and zoneout keep weights ([T, B, H]: 0/1 draws as in training, or
# every entry 0.3 as in evaluation). "frozen": no weight gradients are asked for.
# (id, T, B, I, H, relu, lengths, reverse, mask, zoneout, clip options, with_h0, frozen)
RNN_CASES = [
    ("tanh", 4, 3, 5, 9, False, None, False, False, None, dict(), True, False),
    ("relu_lengths_reverse_state_clip", 5, 3, 4, 9, True, [3, 5, 0], True, False, None,
     dict(grad_clip=0.02), True, False),
    ("tanh_mask_zoneout_lengths_gates_clip", 5, 4, 3, 7, False, [2, 5, 0, 4], False, True, "draws",
     dict(grad_clip=0.02, grad_clip_mode="gates"), False, False),
    ("relu_mask_zoneout_reverse_frozen", 4, 3, 5, 8, True, [4, 1, 3], True, True, "draws", dict(), True, True),
    ("tanh_zoneout_eval_reverse_state_clip", 4, 2, 3, 6, False, None, True, False, "eval",
     dict(grad_clip=0.05), True, False),
]


def _rnn_data(T, B, I, H, lengths, mask, zoneout, with_h0):
    keep = {None: None, "draws": lambda: torch.bernoulli(torch.full((T, B, H), 0.3, dtype=torch.float64)),
            "eval": lambda: torch.full((T, B, H), 0.3, dtype=torch.float64)}[zoneout]
    return {"x": _rand(T, B, I), "w_ih": _rand(H, I), "w_hh": _rand(H, H), "b_ih": _rand(H), "b_hh": _rand(H),
            "h0": _rand(B, H) if with_h0 else None, "go": _rand(T, B, H), "ghn": _rand(B, H),
            "mask": torch.bernoulli(torch.full((B, H), 0.5, dtype=torch.float64)) * 2 if mask else None,
            "zoneout": keep() if keep else None,
            "lengths": torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None}


def _rnn_reference_run(dtype, data, options, relu):
    tensors = {k: (v.detach().to(dtype).clone().requires_grad_()
                   if v is not None and k not in ("go", "ghn", "lengths", "mask", "zoneout") else v)
               for k, v in data.items()}
    zoneout = data["zoneout"].to(dtype) if data["zoneout"] is not None else None
    out, h_n = rnn_reference(tensors["x"], tensors["w_ih"], tensors["w_hh"], tensors["b_ih"], tensors["b_hh"],
                             tensors["h0"], data["lengths"], nonlinearity="relu" if relu else "tanh",
                             reverse=options.reverse, state_clip=options.state_clip, gate_clip=options.gate_clip,
                             recurrent_mask=_mask_of(data, dtype), zoneout=zoneout)
    loss = (out * data["go"].to(dtype)).sum() + (h_n * data["ghn"].to(dtype)).sum()
    loss.backward()
    grads = {k: tensors[k].grad for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0") if tensors[k] is not None}
    return {"output": out.detach(), "h_n": h_n.detach(), **grads}


def _rnn_emulated_run(library, strategy, dtype, data, shape, options, relu, frozen=False):
    """Forward (saving) and backward of the emulated kernels; the activations reserve
    ([T, B, H], only with zoneout) is kept in _RESERVE."""
    T, B, I, H = shape
    d = {k: (v.to(dtype).contiguous() if v is not None and k != "lengths" else v) for k, v in data.items()}
    nan = lambda *s: torch.full(s, float("nan"), dtype=dtype)  # noqa: E731  catches unwritten outputs
    out, h_n = nan(T, B, H), nan(B, H)
    activations = nan(T, B, H) if d["zoneout"] is not None else None
    g = {"x": nan(T, B, I), "w_ih": None if frozen else nan(H, I), "w_hh": None if frozen else nan(H, H),
         "b_ih": nan(H), "b_hh": nan(H), "h0": nan(B, H) if d["h0"] is not None else None}
    error = library.rnntl_emulation_rnn(
        ctypes.c_int(DTYPE_CODES[dtype]), ctypes.c_int(STRATEGIES[strategy]), ctypes.c_int(THREADS_PER_BLOCK),
        ctypes.c_int(MULTIPROCESSORS), _i(T), _i(B), _i(I), _i(H), ctypes.c_int(int(relu)),
        ctypes.c_int(int(options.reverse)), _d(options.state_clip), _d(options.gate_clip), _ptr(data["lengths"]),
        _ptr(d["mask"]), _ptr(d["zoneout"]), _ptr(d["x"]), _ptr(d["w_ih"]), _ptr(d["w_hh"]), _ptr(d["b_ih"]),
        _ptr(d["b_hh"]), _ptr(d["h0"]), _ptr(out), _ptr(h_n), _ptr(activations), _ptr(d["go"]), _ptr(d["ghn"]),
        _ptr(g["x"]), _ptr(g["w_ih"]), _ptr(g["w_hh"]), _ptr(g["b_ih"]), _ptr(g["b_hh"]), _ptr(g["h0"]))
    if error is not None:
        raise RuntimeError(error.decode())
    result = {"output": out, "h_n": h_n}
    result.update({k: v for k, v in g.items() if v is not None})
    _RESERVE[id(result)] = activations
    return result


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", RNN_CASES, ids=[c[0] for c in RNN_CASES])
def test_rnn_matches_reference(library, case, strategy, dtype):
    """Forward results and every gradient of the Elman RNN against the float64 reference."""
    _, T, B, I, H, relu, lengths, reverse, mask, zoneout, clips, with_h0, frozen = case
    data = _rnn_data(T, B, I, H, lengths, mask, zoneout, with_h0)
    options = sequence_options(reverse, **clips)
    reference = _rnn_reference_run(torch.float64, data, options, relu)
    baseline = _rnn_reference_run(dtype, data, options, relu)
    if frozen:
        for results in (reference, baseline):
            del results["w_ih"], results["w_hh"]
    fast = _rnn_emulated_run(library, strategy, dtype, data, (T, B, I, H), options, relu, frozen=frozen)
    _compare(fast, baseline, reference, dtype)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_rnn_reserve_matches_the_cpu_op(library, strategy, with_lengths):
    """Output, h_n and the activations reserve (with zoneout) equal the CPU op's, layout
    included: the compact rows first, then zeros, also with lengths."""
    from rnntl_fast import _ext

    if not _ext.HAS_CPU_KERNELS:
        pytest.skip(f"the CPU extension is not built here ({_ext.IMPORT_ERROR})")
    import rnntl_fast  # noqa: F401  (registers the ops' fakes and autograd)

    T, B, I, H = 4, 3, 5, 7
    lengths = [2, 4, 0] if with_lengths else None
    data = _rnn_data(T, B, I, H, lengths, True, "draws", True)
    f = {k: (v.float() if v is not None and k != "lengths" else v) for k, v in data.items()}
    options = sequence_options(True)
    cpu = torch.ops.rnntl_fast.rnn_forward(f["x"], f["w_ih"], f["w_hh"], f["b_ih"], f["b_hh"], f["h0"],
                                           data["lengths"], f["mask"], f["zoneout"], False, True, 0.0, 0.0, True)
    fast = _rnn_emulated_run(library, strategy, torch.float32, data, (T, B, I, H), options, relu=False)
    emulated = (fast["output"], fast["h_n"], _RESERVE.pop(id(fast)))
    for name, a, b in zip(("output", "h_n", "activations"), cpu, emulated):
        assert tuple(a.shape) == tuple(b.shape), f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5, msg=f"{name}")


# Non-finite values. Cells of the cases below: (id, cell, proj, clip options); every case
# has lengths (a length-0 row, a full one, rows in unsorted order) so the padded rows matter.
# The Elman RNN runs relu with zoneout (every keep weight 0.3) and a recurrent mask: relu's
# NaN pass-through and the zoneout blend are its own element math.
NONFINITE_T, NONFINITE_B, NONFINITE_I, NONFINITE_H = 5, 4, 3, 6
NONFINITE_LENGTHS = [3, 5, 0, 2]
NONFINITE_CASES = [
    ("lstm", "lstm", None, dict()),
    ("lstm_clips_state", "lstm", None, dict(cell_clip=0.4, proj_clip=0.1, grad_clip=0.02)),
    ("lstm_proj_clips_gates", "lstm", 4, dict(cell_clip=0.4, proj_clip=0.1, grad_clip=0.02, grad_clip_mode="gates")),
    ("gru", "gru", None, dict()),
    ("gru_clip_gates", "gru", None, dict(grad_clip=0.02, grad_clip_mode="gates")),
    ("rnn_relu_zoneout_mask_clip_gates", "rnn", None, dict(grad_clip=0.02, grad_clip_mode="gates")),
]


def _nonfinite_data(cell, proj, lengths=NONFINITE_LENGTHS):
    T, B, I, H = NONFINITE_T, NONFINITE_B, NONFINITE_I, NONFINITE_H
    if cell == "rnn":
        return _rnn_data(T, B, I, H, lengths, True, "eval", True)
    G = (4 if cell == "lstm" else 3) * H
    P = proj or H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, P), "b_ih": _rand(G), "b_hh": _rand(G),
            "h0": _rand(B, P), "go": _rand(T, B, P), "ghn": _rand(B, P),
            "lengths": torch.tensor(lengths, dtype=torch.int64)}
    if cell == "lstm":
        data.update({"w_hr": _rand(P, H) if proj else None, "c0": _rand(B, H), "gcn": _rand(B, H)})
    return data


def _run_case(library, cell, strategy, dtype, data, proj, options):
    T, B, I, H = NONFINITE_T, NONFINITE_B, NONFINITE_I, NONFINITE_H
    if cell == "lstm":
        return _lstm_emulated_run(library, strategy, dtype, data, (T, B, I, H, proj or H), options)
    if cell == "rnn":
        return _rnn_emulated_run(library, strategy, dtype, data, (T, B, I, H), options, relu=True)
    return _gru_emulated_run(library, strategy, dtype, data, (T, B, I, H), options)


def _reference_case(cell, dtype, data, options):
    if cell == "rnn":
        return _rnn_reference_run(dtype, data, options, relu=True)
    return _lstm_reference_run(dtype, data, options) if cell == "lstm" else _gru_reference_run(dtype, data, options)


def _padded_mask(lengths, steps):
    """[T, B] True at the padded steps (t >= lengths[b])."""
    return torch.arange(steps).unsqueeze(1) >= torch.tensor(lengths).unsqueeze(0)


@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=[c[0] for c in NONFINITE_CASES])
def test_non_finite_padded_steps_reach_nothing(library, case, strategy, reverse, dtype):
    """Steps past a row's length are padding and may hold anything: NaN and +-inf there
    change no output and no gradient, bit for bit, and the input's gradient is zero there
    (padded rows enter no product: not the input projection, not dL/dx, not dW_ih)."""
    _, cell, proj, clips = case
    if strategy == "persistent" and proj is not None:
        pytest.skip("the persistent kernel keeps W_hh of P == H on chip; proj_size runs stepwise")
    options = sequence_options(reverse, **clips)
    data = _nonfinite_data(cell, proj)
    clean = _run_case(library, cell, strategy, dtype, data, proj, options)
    padded = _padded_mask(NONFINITE_LENGTHS, NONFINITE_T)
    x = data["x"].clone()
    x[padded] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    dirty = _run_case(library, cell, strategy, dtype, dict(data, x=x), proj, options)
    for name, expected in clean.items():
        assert torch.isfinite(expected).all(), f"{name}: the clean run is not finite"
        torch.testing.assert_close(dirty[name], expected, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert (dirty["x"][padded] == 0).all()


# (leaf, index, value): one non-finite entry. Input index (1, 0, 2) is a valid step of row 0;
# h0 row 3 runs two steps, row 2 none (its h_n is h0).
NONFINITE_POISONS = [("x", (1, 0, 2), float("nan")), ("x", (1, 1, 0), float("inf")),
                     ("w_ih", (2, 1), -float("inf")), ("w_ih", (5, 0), float("nan")),
                     ("h0", (3, 1), float("nan")), ("h0", (2, 0), float("inf"))]


def _assert_same_nonfinite_pattern(name, fast, reference):
    """NaN, +inf and -inf at the same places as the float64 reference; the finite entries close."""
    reference = reference.to(fast.dtype)
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        mismatch = (kind(fast) != kind(reference)).nonzero().tolist()
        assert not mismatch, f"{name}: {kind.__name__} differs from the float64 reference at {mismatch[:6]}"
    finite = torch.isfinite(reference)
    torch.testing.assert_close(fast[finite], reference[finite], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("poison", NONFINITE_POISONS, ids=lambda p: f"{p[0]}{list(p[1])}={p[2]}")
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=[c[0] for c in NONFINITE_CASES])
def test_non_finite_values_propagate_as_in_the_reference(library, case, poison, strategy):
    """+-inf and NaN in a valid step of the input, in weight_ih or in h0 reach every output
    and gradient exactly where they reach them in the float64 reference loop (which runs
    the valid rows only, as torch.nn on a PackedSequence): the clips keep NaN (a NaN
    gradient does not come out of a clamp as +-limit), a saturated gate is exactly 0 or 1,
    and nothing reaches the padded rows' results."""
    _, cell, proj, clips = case
    if strategy == "persistent" and proj is not None:
        pytest.skip("the persistent kernel keeps W_hh of P == H on chip; proj_size runs stepwise")
    leaf, index, value = poison
    options = sequence_options(False, **clips)
    data = _nonfinite_data(cell, proj)
    data[leaf] = data[leaf].clone()
    data[leaf][index] = value
    reference = _reference_case(cell, torch.float64, data, options)
    assert any(not torch.isfinite(v).all() for v in reference.values()), "the poison reached nothing"
    fast = _run_case(library, cell, strategy, torch.float32, data, proj, options)
    assert set(fast) == set(reference)
    for name in reference:
        _assert_same_nonfinite_pattern(name, fast[name], reference[name])


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_padded_steps_reach_nothing(library, cell, strategy):
    """Rows past their length run no step and ignore their keep weights: NaN and +-inf in
    the keep weights (and the input) at padded steps change no output and no gradient."""
    T, B, I, H = NONFINITE_T, NONFINITE_B, NONFINITE_I, NONFINITE_H
    data = _zoneout_data(cell, T, B, I, H, None, NONFINITE_LENGTHS, "hc", "draws", True)
    options = sequence_options(False, cell_clip=0.4, grad_clip=0.02)
    clean = _run_case(library, cell, strategy, torch.float32, data, None, options)
    padded = _padded_mask(NONFINITE_LENGTHS, T)
    dirty = dict(data)
    for name in ("x", "zoneout", "zoneout_h", "zoneout_c"):
        if data.get(name) is not None:
            dirty[name] = data[name].clone()
            width = data[name].shape[-1]
            dirty[name][padded] = torch.tensor([float("nan"), float("inf"), -float("inf")] * width,
                                               dtype=torch.float64)[:width]
    fouled = _run_case(library, cell, strategy, torch.float32, dirty, None, options)
    for name, expected in clean.items():
        assert torch.isfinite(expected).all(), f"{name}: the clean run is not finite"
        torch.testing.assert_close(fouled[name], expected, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_emulated_warp_primitives_and_shared_memory(library):
    """Ballot / any / all / shuffles, per-block shared memory and atomics behave as on CUDA."""
    assert library.rnntl_emulation_warp_selftest() == 0


@pytest.mark.parametrize("zoneout", [False, True], ids=["plain", "zoneout"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reserve_matches_the_cpu_op(library, cell, strategy, with_lengths, zoneout):
    """Forward outputs and the saved reserve the backward reads (gates, cells,
    hidden_pre_clip / hidden_n; with zoneout of c the LSTM's carried_cells) have the CPU op's
    shapes, layout and values, except the reserve with lengths: the CPU ops store only the
    valid rows there (docs/cpu.md), so only its shapes are compared; gradients with lengths
    are compared against the reference by the tests above. Zoneout: keep weights as 0/1 draws."""
    from rnntl_fast import _ext

    if not _ext.HAS_CPU_KERNELS:
        pytest.skip(f"the CPU extension is not built here ({_ext.IMPORT_ERROR})")
    import rnntl_fast  # noqa: F401  (registers the ops' fakes and autograd)

    T, B, I, H = 4, 3, 5, 7
    lengths = torch.tensor([2, 4, 3]) if with_lengths else torch.tensor([T] * B)
    G = (4 if cell == "lstm" else 3) * H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, H), "b_ih": _rand(G), "b_hh": _rand(G),
            "h0": _rand(B, H), "c0": _rand(B, H), "w_hr": None, "go": _rand(T, B, H), "ghn": _rand(B, H),
            "gcn": _rand(B, H), "lengths": lengths}
    f = {k: (v.float() if v is not None and k != "lengths" else v) for k, v in data.items()}
    draws = lambda: torch.bernoulli(torch.full((T, B, H), 0.3, dtype=torch.float64)) if zoneout else None  # noqa: E731
    if cell == "lstm":
        data.update(zoneout_h=draws(), zoneout_c=draws())
        keep = [v.float() if v is not None else None for v in (data["zoneout_h"], data["zoneout_c"])]
        options = sequence_options(True, cell_clip=0.6, proj_clip=0.4)
        cpu = torch.ops.rnntl_fast.lstm_forward(f["x"], f["w_ih"], f["w_hh"], f["b_ih"], f["b_hh"], None, f["h0"],
                                                f["c0"], lengths, None, *keep, *options, True)
        cpu = cpu if zoneout else cpu[:6]  # carried_cells only with zoneout_c
        fast = _lstm_emulated_run(library, strategy, torch.float32, data, (T, B, I, H, H), options)
        emulated = (fast["output"], fast["h_n"], fast["c_n"], *_RESERVE.pop(id(fast)))
    else:
        data["zoneout"] = draws()
        keep = data["zoneout"].float() if zoneout else None
        options = sequence_options(True)
        cpu = torch.ops.rnntl_fast.gru_forward(f["x"], f["w_ih"], f["w_hh"], f["b_ih"], f["b_hh"], f["h0"], lengths,
                                               None, keep, True, 0.0, 0.0, True)
        fast = _gru_emulated_run(library, strategy, torch.float32, data, (T, B, I, H), options)
        emulated = (fast["output"], fast["h_n"], *_RESERVE.pop(id(fast)))
    assert len(cpu) == len(emulated)
    outputs = 3 if cell == "lstm" else 2  # (output, h_n[, c_n]), then the reserve
    for index, (a, b) in enumerate(zip(cpu, emulated)):
        assert tuple(a.shape) == tuple(b.shape), f"output {index}: {tuple(a.shape)} vs {tuple(b.shape)}"
        if index < outputs or not with_lengths:
            torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5, msg=f"output {index}")


# Layer normalisation (docs/semantics.md section 10; docs/cuda.md, "Layer normalisation"):
# the stepwise kernels of rnntl/cuda/layer_norm_kernels.cuh, forward and every gradient
# including the gains', against the float64 reference.
# (id, cell, T, B, I, H, proj, lengths, reverse, bias, cell_terms, mask, zoneout, clip options, frozen)
LAYER_NORM_CASES = [
    ("lstm", "lstm", 4, 3, 5, 7, None, None, False, True, True, False, None, dict(), False),
    ("lstm_lengths_reverse_mask_zoneout_draws_state_clips", "lstm", 5, 3, 4, 9, None, [3, 5, 0], True, True, True,
     True, "draws", dict(cell_clip=0.5, proj_clip=0.2, grad_clip=0.02), False),
    ("lstm_proj_lengths_zoneout_eval_gates_clip", "lstm", 4, 3, 5, 8, 5, [4, 2, 3], False, True, True, True, "eval",
     dict(cell_clip=0.6, proj_clip=0.3, grad_clip=0.02, grad_clip_mode="gates"), False),
    ("lstm_proj_reverse_nobias_no_cell_terms_frozen", "lstm", 3, 2, 4, 6, 4, [1, 3], True, False, False, False, None,
     dict(cell_clip=0.6), True),
    ("gru", "gru", 4, 3, 5, 7, None, None, False, True, False, False, None, dict(), False),
    ("gru_lengths_reverse_mask_zoneout_draws_state_clip", "gru", 5, 3, 4, 9, None, [3, 5, 0], True, True, False,
     True, "draws", dict(grad_clip=0.02), False),
    ("gru_zoneout_eval_gates_clip_nobias_frozen", "gru", 4, 2, 3, 7, None, [2, 4], False, False, False, False, "eval",
     dict(grad_clip=0.02, grad_clip_mode="gates"), True),
]
LAYER_NORM_LEAVES = {"lstm": ("x", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0", "ln_ih", "ln_hh", "ln_cell_weight",
                              "ln_cell_bias"),
                     "gru": ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "ln_ih", "ln_hh")}


def _layer_norm_data(cell, T, B, I, H, proj, lengths, bias, cell_terms, mask, zoneout):
    """Inputs of a layer-norm case in float64; gains around 1 and a cell bias, so that their
    gradients and their effect show; NaN in the input at padded steps, which nothing may read."""
    P = proj or H
    G = (4 if cell == "lstm" else 3) * H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, P), "b_ih": _rand(G) if bias else None,
            "b_hh": _rand(G) if bias else None, "h0": _rand(B, P), "go": _rand(T, B, P), "ghn": _rand(B, P),
            "ln_ih": 1 + _rand(G, scale=0.3), "ln_hh": 1 + _rand(G, scale=0.3),
            "mask": torch.bernoulli(torch.full((B, P), 0.5, dtype=torch.float64)) * 2 if mask else None,
            "lengths": torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None}
    names = ("zoneout",)
    if cell == "lstm":
        data.update({"w_hr": _rand(P, H) if proj else None, "c0": _rand(B, H), "gcn": _rand(B, H),
                     "ln_cell_weight": 1 + _rand(H, scale=0.3) if cell_terms else None,
                     "ln_cell_bias": _rand(H, scale=0.3) if cell_terms and bias else None})
        names = ("zoneout_h", "zoneout_c")
    for name in names * bool(zoneout):
        rate = torch.full((T, B, P if name == "zoneout_h" else H), ZONEOUT_RATES[name], dtype=torch.float64)
        data[name] = torch.bernoulli(rate) if zoneout == "draws" else rate
    for b, n in enumerate(lengths or ()):
        data["x"][n:, b] = float("nan")
    return data


def _layer_norm_reference_run(cell, dtype, data, options):
    tensors = {k: (v.detach().to(dtype).clone().requires_grad_() if v is not None and k not in GIVEN else v)
               for k, v in data.items()}
    norms = LayerNormWeights(tensors["ln_ih"], tensors["ln_hh"], tensors.get("ln_cell_weight"),
                             tensors.get("ln_cell_bias"))
    if cell == "lstm":
        results = lstm_reference(tensors["x"], tensors["w_ih"], tensors["w_hh"], tensors["b_ih"], tensors["b_hh"],
                                 tensors["w_hr"], tensors["h0"], tensors["c0"], data["lengths"],
                                 recurrent_mask=_mask_of(data, dtype), zoneout_h=_keep_of(data, "zoneout_h", dtype),
                                 zoneout_c=_keep_of(data, "zoneout_c", dtype), layer_norm=norms, **options._asdict())
        weights = ("go", "ghn", "gcn")
    else:
        results = gru_reference(tensors["x"], tensors["w_ih"], tensors["w_hh"], tensors["b_ih"], tensors["b_hh"],
                                tensors["h0"], data["lengths"], recurrent_mask=_mask_of(data, dtype),
                                zoneout=_keep_of(data, "zoneout", dtype), reverse=options.reverse,
                                state_clip=options.state_clip, gate_clip=options.gate_clip, layer_norm=norms)
        weights = ("go", "ghn")
    sum(((r * data[w].to(dtype)).sum() for r, w in zip(results, weights))).backward()
    names = ("output", "h_n", "c_n")
    grads = {k: tensors[k].grad for k in LAYER_NORM_LEAVES[cell] if tensors.get(k) is not None}
    return {**{n: r.detach() for n, r in zip(names, results)}, **grads}


def _layer_norm_emulated_run(library, cell, dtype, data, shape, options, frozen=False, strategy="stepwise"):
    """Forward (saving) and backward of the emulated layer-norm kernels; the reserve is kept
    in _RESERVE."""
    T, B, I, H, P = shape
    d = {k: (v.to(dtype).contiguous() if v is not None and k != "lengths" else v) for k, v in data.items()}
    nan = lambda *s: torch.full(s, float("nan"), dtype=dtype)  # noqa: E731  catches unwritten outputs
    given = lambda name, *s: nan(*s) if d.get(name) is not None else None  # noqa: E731
    G = (4 if cell == "lstm" else 3) * H
    out, h_n = nan(T, B, P), nan(B, P)
    g = {"x": nan(T, B, I), "w_ih": None if frozen else nan(G, I), "w_hh": None if frozen else nan(G, P),
         "h0": nan(B, P), "ln_ih": nan(G), "ln_hh": nan(G)}
    common = (ctypes.c_int(DTYPE_CODES[dtype]), ctypes.c_int(STRATEGIES[strategy]), ctypes.c_int(THREADS_PER_BLOCK),
              _i(T), _i(B), _i(I), _i(H))
    if cell == "lstm":
        c_n = nan(B, H)
        reserve = (nan(T, B, G), nan(T, B, 2 * G), nan(T, B, 3 * H), nan(T, B, 3))
        pre = nan(T, B, P) if options.proj_clip else None
        g.update({"bias": given("b_ih", G), "w_hr": given("w_hr", P, H), "c0": nan(B, H),
                  "ln_cell_weight": given("ln_cell_weight", H), "ln_cell_bias": given("ln_cell_bias", H)})
        error = library.rnntl_emulation_layer_norm_lstm(
            *common, _i(P), ctypes.c_int(int(options.reverse)), _d(options.cell_clip), _d(options.proj_clip),
            _d(options.state_clip), _d(options.gate_clip), _ptr(data["lengths"]), _ptr(d.get("mask")),
            _ptr(d.get("zoneout_h")), _ptr(d.get("zoneout_c")), _ptr(d["x"]), _ptr(d["w_ih"]), _ptr(d["w_hh"]),
            _ptr(d["b_ih"]), _ptr(d["b_hh"]), _ptr(d["w_hr"]), _ptr(d["h0"]), _ptr(d["c0"]), _ptr(d["ln_ih"]),
            _ptr(d["ln_hh"]), _ptr(d["ln_cell_weight"]), _ptr(d["ln_cell_bias"]), _ptr(out), _ptr(h_n), _ptr(c_n),
            *map(_ptr, reserve), _ptr(pre), _ptr(d["go"]), _ptr(d["ghn"]), _ptr(d["gcn"]),
            *(_ptr(g[k]) for k in ("x", "w_ih", "w_hh", "bias", "w_hr", "h0", "c0", "ln_ih", "ln_hh",
                                   "ln_cell_weight", "ln_cell_bias")))
        result = {"output": out, "h_n": h_n, "c_n": c_n}
        bias = g.pop("bias")
        if bias is not None:
            result.update(b_ih=bias, b_hh=bias)
        reserve += (pre,) if pre is not None else ()
    else:
        reserve = (nan(T, B, G), nan(T, B, 2 * G), nan(T, B, 2))
        g.update({"b_ih": given("b_ih", G), "b_hh": given("b_hh", G)})
        error = library.rnntl_emulation_layer_norm_gru(
            *common, ctypes.c_int(int(options.reverse)), _d(options.state_clip), _d(options.gate_clip),
            _ptr(data["lengths"]), _ptr(d.get("mask")), _ptr(d.get("zoneout")), _ptr(d["x"]), _ptr(d["w_ih"]),
            _ptr(d["w_hh"]), _ptr(d["b_ih"]), _ptr(d["b_hh"]), _ptr(d["h0"]), _ptr(d["ln_ih"]), _ptr(d["ln_hh"]),
            _ptr(out), _ptr(h_n), *map(_ptr, reserve), _ptr(d["go"]), _ptr(d["ghn"]),
            *(_ptr(g[k]) for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "ln_ih", "ln_hh")))
        result = {"output": out, "h_n": h_n}
    if error is not None:
        raise RuntimeError(error.decode())
    result.update({k: v for k, v in g.items() if v is not None})
    _RESERVE[id(result)] = reserve
    return result


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=[c[0] for c in LAYER_NORM_CASES])
def test_layer_norm_matches_reference(library, case, dtype):
    """Forward results and every gradient (the gains' included) of the layer-normalised
    cells against the float64 reference, with lengths (a length-0 row), reverse, proj_size,
    all clips in both modes, the recurrent mask, zoneout as draws and as evaluation's
    constants, absent biases and cell terms, frozen weights."""
    _, cell, T, B, I, H, proj, lengths, reverse, bias, cell_terms, mask, zoneout, clips, frozen = case
    P = proj or H
    data = _layer_norm_data(cell, T, B, I, H, proj, lengths, bias, cell_terms, mask, zoneout)
    options = sequence_options(reverse, **clips)
    reference = _layer_norm_reference_run(cell, torch.float64, data, options)
    baseline = _layer_norm_reference_run(cell, dtype, data, options)
    if frozen:
        for results in (reference, baseline):
            del results["w_ih"], results["w_hh"]
    fast = _layer_norm_emulated_run(library, cell, dtype, data, (T, B, I, H, P), options, frozen=frozen)
    _compare(fast, baseline, reference, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_refuses_the_persistent_strategy(library, cell):
    """The layer-norm cells run stepwise only: an explicit persistent request is an error
    naming the reason, never a silent fallback."""
    case = next(c for c in LAYER_NORM_CASES if c[0] == cell)
    _, cell, T, B, I, H, proj, lengths, reverse, bias, cell_terms, mask, zoneout, clips, frozen = case
    data = _layer_norm_data(cell, T, B, I, H, proj, lengths, bias, cell_terms, mask, zoneout)
    with pytest.raises(RuntimeError, match="persistent CUDA strategy does not run layer_norm"):
        _layer_norm_emulated_run(library, cell, torch.float32, data, (T, B, I, H, H), sequence_options(),
                                 strategy="persistent")


def _compact_rows(padded, lengths):
    """The valid rows of a padded [T, B, W] reserve in the CPU op's order (step by step in
    time order, rows by decreasing length within a step), as [N, W]."""
    T, B = padded.shape[:2]
    order = sorted(range(B), key=lambda b: -int(lengths[b]))
    return torch.stack([padded[t, b] for t in range(T) for b in order if lengths[b] > t])


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_reserve_matches_the_cpu_op(library, cell, with_lengths):
    """Forward outputs and the saved reserve (gates, normalized, cells, inverse_std,
    hidden_pre_clip) against the CPU op rnntl_fast::layer_norm_*_forward in float64: same
    shapes, and the same values row for row (the CPU op stores compact rows first, these
    kernels padded rows with zeros at padded steps)."""
    from rnntl_fast import _ext

    if not _ext.HAS_CPU_KERNELS:
        pytest.skip(f"the CPU extension is not built here ({_ext.IMPORT_ERROR})")
    import rnntl_fast  # noqa: F401  (registers the ops' fakes and autograd)

    T, B, I, H = 4, 3, 5, 7
    lengths = torch.tensor([2, 4, 0]) if with_lengths else torch.tensor([T] * B)
    data = _layer_norm_data(cell, T, B, I, H, None, lengths.tolist(), True, True, True, "draws")
    options = sequence_options(True, cell_clip=0.6, proj_clip=0.4, grad_clip=0.1)
    d = data
    if cell == "lstm":
        cpu = torch.ops.rnntl_fast.layer_norm_lstm_forward(
            d["x"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], None, d["h0"], d["c0"], lengths, d["mask"],
            d["zoneout_h"], d["zoneout_c"], d["ln_ih"], d["ln_hh"], d["ln_cell_weight"], d["ln_cell_bias"],
            *options, True)
        outputs = 3
    else:
        cpu = torch.ops.rnntl_fast.layer_norm_gru_forward(
            d["x"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], d["h0"], lengths, d["mask"], d["zoneout"],
            d["ln_ih"], d["ln_hh"], True, options.state_clip, options.gate_clip, True)
        outputs = 2
    fast = _layer_norm_emulated_run(library, cell, torch.float64, data, (T, B, I, H, H), options)
    emulated = (fast["output"], fast["h_n"]) + ((fast["c_n"],) if cell == "lstm" else ()) + _RESERVE.pop(id(fast))
    assert len(cpu) == len(emulated)
    for index, (a, b) in enumerate(zip(cpu, emulated)):
        assert tuple(a.shape) == tuple(b.shape), f"output {index}: {tuple(a.shape)} vs {tuple(b.shape)}"
        if index >= outputs:
            N = int(lengths.sum())
            a, b = a.reshape(-1, a.shape[2])[:N], _compact_rows(b, lengths)
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10, msg=f"output {index}")


def test_persistent_plan_refuses_what_does_not_fit(library):
    """On one emulated multiprocessor (96 KiB of shared memory per block) W_hh of H=200
    does not fit on chip: an explicit persistent request is refused with a clear error
    (the glue's auto choice then runs stepwise)."""
    T, B, I, H = 2, 2, 3, 200
    data = {"x": _rand(T, B, I), "w_ih": _rand(3 * H, I), "w_hh": _rand(3 * H, H), "b_ih": None, "b_hh": None,
            "h0": None, "go": _rand(T, B, H), "ghn": _rand(B, H), "lengths": None}
    with pytest.raises(RuntimeError, match="persistent CUDA strategy does not support"):
        _gru_emulated_run(library, "persistent", torch.float64, data, (T, B, I, H), sequence_options(), sms=1)


@pytest.mark.skipif(os.environ.get("RNNTL_SKIP_TSAN") == "1", reason="RNNTL_SKIP_TSAN=1")
def test_kernels_have_no_data_race_under_thread_sanitizer():
    from cuda_emulation.build import run_tsan_program, tsan_runtime_problem

    problem = tsan_runtime_problem()
    if problem is not None:
        pytest.skip(f"no ThreadSanitizer runtime: {problem}")
    ok, output = run_tsan_program()  # a compile error or a timeout here fails the test
    assert ok, output[-6000:]
    assert "OK" in output
