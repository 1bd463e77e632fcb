"""The CUDA backend on a GPU: the registered ops (torch.ops.rnntl_fast.*) on CUDA tensors
against the float64 reference loop (error rule of tests/tolerances.py, baseline: the
reference loop in the same dtype on the GPU), both strategies (RNNTL_CUDA_STRATEGY), the
same reserve outputs as the CPU ops, and a comparison with cuDNN (torch.nn.LSTM / GRU).
Skipped with a reason where there is no GPU or the extension was built without CUDA.
"""
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rnntl_fast  # noqa: E402,F401  (registers fakes and autograd of the native ops)
from rnntl_fast import _ext  # noqa: E402
from rnntl_fast.ops.options import sequence_options  # noqa: E402
from rnntl_fast.ops.reference import gru_reference, lstm_reference  # noqa: E402
from tolerances import assert_within_error_rule  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
    pytest.mark.skipif(not _ext.HAS_CUDA_KERNELS,
                       reason="rnntl_fast was built without its CUDA kernels (RNNTL_BUILD_CUDA=1)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STRATEGIES = ["stepwise", "persistent"]
# What torch says when cuDNN (or torch's CUDA RNN) has no kernel for a dtype: the one
# failure of torch.nn that skips the cuDNN comparison instead of failing it.
UNSUPPORTED_DTYPE = re.compile(r"not (supported|implemented) for '?(BFloat16|Half)|CUDNN_STATUS_NOT_SUPPORTED")

# (name, T, B, I, H, proj, lengths, reverse, cell_clip, proj_clip, grad_clip, mode, with_h0)
LSTM_CASES = [
    ("T1_B1", 1, 1, 3, 4, None, None, False, None, None, None, "state", True),
    ("odd_unsorted", 5, 3, 7, 13, None, [3, 5, 1], False, None, None, None, "state", True),
    ("reverse_clips_state", 5, 3, 7, 13, None, [3, 5, 1], True, 0.5, 0.2, 0.02, "state", True),
    ("gates_mode_no_h0", 4, 2, 5, 9, None, None, True, None, None, 0.01, "gates", False),
    ("zero_length_row", 3, 4, 3, 6, None, [0, 3, 2, 3], False, 0.7, None, 0.05, "state", True),
    ("proj", 4, 3, 6, 8, 5, [4, 2, 3], False, None, 0.3, 0.05, "state", True),
    ("larger", 16, 8, 32, 64, None, None, False, None, None, None, "state", True),
]
GRU_CASES = [
    ("T1_B1", 1, 1, 3, 4, None, False, None, "state", True),
    ("odd_unsorted", 5, 3, 7, 13, [3, 5, 1], False, None, "state", True),
    ("reverse_state_clip", 5, 3, 7, 13, [3, 5, 1], True, 0.02, "state", True),
    ("gates_mode_no_h0", 4, 2, 5, 9, None, True, 0.01, "gates", False),
    ("zero_length_row", 3, 4, 3, 6, [0, 3, 2, 3], False, 0.05, "state", True),
    ("larger", 16, 8, 32, 64, None, False, None, "state", True),
]


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    monkeypatch.setenv("RNNTL_CUDA_STRATEGY", request.param)
    return request.param


def _rand(*shape, scale=0.5):
    return (torch.rand(*shape, dtype=torch.float64) * 2 - 1) * scale


def _leaves(data, dtype, device, skip):
    return {k: (v.to(device=device, dtype=dtype).detach().requires_grad_() if v is not None and k not in skip else v)
            for k, v in data.items()}


def _lstm_run(data, dtype, device, options, native):
    t = _leaves(data, dtype, device, ("go", "ghn", "gcn", "lengths"))
    args = (t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["w_hr"], t["h0"], t["c0"], data["lengths"])
    if native:
        out, h_n, c_n, *_ = torch.ops.rnntl_fast.lstm_forward(*args, None, None, None, *options, True)
    else:
        out, h_n, c_n = lstm_reference(*args, **options._asdict())
    cast = lambda name: data[name].to(device=device, dtype=dtype)  # noqa: E731
    loss = (out * cast("go")).sum() + (h_n * cast("ghn")).sum() + (c_n * cast("gcn")).sum()
    loss.backward()
    result = {"output": out.detach(), "h_n": h_n.detach(), "c_n": c_n.detach()}
    result.update({k: t[k].grad for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "h0", "c0") if t[k] is not None})
    return {k: v.cpu() for k, v in result.items()}


def _check(fast, baseline, reference, dtype):
    assert set(fast) == set(reference)
    for name in reference:
        assert_within_error_rule(name, fast[name], baseline[name], reference[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", LSTM_CASES, ids=[c[0] for c in LSTM_CASES])
def test_lstm_matches_reference(case, dtype, strategy):
    _, T, B, I, H, proj, lengths, reverse, cell_clip, proj_clip, grad_clip, mode, with_h0 = case
    if strategy == "persistent" and proj is not None:
        pytest.skip("the persistent kernel keeps W_hh of P == H on chip; proj_size runs stepwise")
    P = proj or H
    data = {"x": _rand(T, B, I), "w_ih": _rand(4 * H, I), "w_hh": _rand(4 * H, P), "b_ih": _rand(4 * H),
            "b_hh": _rand(4 * H), "w_hr": _rand(P, H) if proj else None,
            "h0": _rand(B, P) if with_h0 else None, "c0": _rand(B, H) if with_h0 else None,
            "go": _rand(T, B, P), "ghn": _rand(B, P), "gcn": _rand(B, H),
            "lengths": torch.tensor(lengths) if lengths is not None else None}
    options = sequence_options(reverse, cell_clip, proj_clip, grad_clip, mode)
    reference = _lstm_run(data, torch.float64, "cpu", options, native=False)
    baseline = _lstm_run(data, dtype, "cuda", options, native=False)
    fast = _lstm_run(data, dtype, "cuda", options, native=True)
    _check(fast, baseline, reference, dtype)


def _gru_run(data, dtype, device, options, native):
    t = _leaves(data, dtype, device, ("go", "ghn", "lengths"))
    args = (t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["h0"], data["lengths"])
    if native:
        out, h_n, *_ = torch.ops.rnntl_fast.gru_forward(*args, None, None, options.reverse, options.state_clip,
                                                        options.gate_clip, True)
    else:
        out, h_n = gru_reference(*args, reverse=options.reverse, state_clip=options.state_clip,
                                 gate_clip=options.gate_clip)
    cast = lambda name: data[name].to(device=device, dtype=dtype)  # noqa: E731
    ((out * cast("go")).sum() + (h_n * cast("ghn")).sum()).backward()
    result = {"output": out.detach(), "h_n": h_n.detach()}
    result.update({k: t[k].grad for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0") if t[k] is not None})
    return {k: v.cpu() for k, v in result.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", GRU_CASES, ids=[c[0] for c in GRU_CASES])
def test_gru_matches_reference(case, dtype, strategy):
    _, T, B, I, H, lengths, reverse, grad_clip, mode, with_h0 = case
    data = {"x": _rand(T, B, I), "w_ih": _rand(3 * H, I), "w_hh": _rand(3 * H, H), "b_ih": _rand(3 * H),
            "b_hh": _rand(3 * H), "h0": _rand(B, H) if with_h0 else None, "go": _rand(T, B, H),
            "ghn": _rand(B, H), "lengths": torch.tensor(lengths) if lengths is not None else None}
    options = sequence_options(reverse, grad_clip=grad_clip, grad_clip_mode=mode)
    reference = _gru_run(data, torch.float64, "cpu", options, native=False)
    baseline = _gru_run(data, dtype, "cuda", options, native=False)
    fast = _gru_run(data, dtype, "cuda", options, native=True)
    _check(fast, baseline, reference, dtype)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reserve_outputs_match_the_cpu_op(cell, strategy, with_lengths):
    """The saved reserve (gates, cells / hidden_n, ...) has the CPU op's shapes, and without
    lengths its values; with lengths the CPU op keeps compact rows first and the CUDA op the
    padded [T, B, *] rows (each layout private to its op), so there only the results agree."""
    T, B, I, H = 4, 3, 5, 7
    lengths = torch.tensor([2, 4, 3]) if with_lengths else None
    G = (4 if cell == "lstm" else 3) * H
    args = [_rand(T, B, I).float(), _rand(G, I).float(), _rand(G, H).float(), _rand(G).float(), _rand(G).float()]
    if cell == "lstm":
        extra = [None, _rand(B, H).float(), _rand(B, H).float(), lengths, None, None, None, False, 0.6, 0.4, 0.0,
                 0.0, True]
        op = torch.ops.rnntl_fast.lstm_forward
    else:
        extra = [_rand(B, H).float(), lengths, None, None, False, 0.0, 0.0, True]
        op = torch.ops.rnntl_fast.gru_forward
    cpu = op(*args, *extra)
    gpu = op(*[a.cuda() for a in args], *[e.cuda() if isinstance(e, torch.Tensor) and e is not lengths else e
                                         for e in extra])
    results = 3 if cell == "lstm" else 2
    for index, (a, b) in enumerate(zip(cpu, gpu)):
        assert a.shape == b.shape, f"output {index}: {tuple(a.shape)} vs {tuple(b.shape)}"
        if index < results or not with_lengths:
            torch.testing.assert_close(b.cpu(), a, atol=2e-5, rtol=1e-4, msg=f"output {index}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_against_cudnn(cell, dtype, strategy):
    """Error of rnntl_fast vs the float64 reference within 2x cuDNN's (torch.nn on the GPU)."""
    T, B, I, H = 12, 6, 16, 32
    module = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H).double()
    x = _rand(T, B, I)
    go = _rand(T, B, H)
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]

    def run(device, dtype_, native):
        m = module.to(device=device, dtype=dtype_)
        m.zero_grad()
        xi = x.to(device=device, dtype=dtype_).requires_grad_()
        if native:
            params = [getattr(m, n) for n in names]
            if cell == "lstm":
                out = torch.ops.rnntl_fast.lstm_forward(xi, *params, None, None, None, None, None, None, None, False,
                                                        0.0, 0.0, 0.0, 0.0, True)[0]
            else:
                out = torch.ops.rnntl_fast.gru_forward(xi, *params, None, None, None, None, False, 0.0, 0.0, True)[0]
        else:
            out = m(xi)[0]
        (out * go.to(device=device, dtype=dtype_)).sum().backward()
        result = {"output": out.detach().cpu(), "x": xi.grad.cpu()}
        result.update({n: getattr(m, n).grad.detach().cpu().clone() for n in names})
        return result

    reference = run("cpu", torch.float64, native=False)
    try:
        cudnn = run("cuda", dtype, native=False)
    except RuntimeError as error:  # a cuDNN without RNNs of this dtype on this GPU; anything else fails
        if not UNSUPPORTED_DTYPE.search(str(error)):
            raise
        pytest.skip(f"torch.nn.{module.__class__.__name__} on CUDA in {dtype}: {error}")
    fast = run("cuda", dtype, native=True)
    _check(fast, cudnn, reference, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck(cell, strategy):
    """Schema, fake (meta) and autograd registration agree with the CUDA kernels."""
    T, B, I, H = 3, 2, 4, 5
    G = (4 if cell == "lstm" else 3) * H
    tensors = [_rand(T, B, I).float().cuda().requires_grad_(), _rand(G, I).float().cuda().requires_grad_(),
               _rand(G, H).float().cuda().requires_grad_(), _rand(G).float().cuda(), _rand(G).float().cuda()]
    lengths = torch.tensor([3, 1])
    if cell == "lstm":
        args = (*tensors, None, None, None, lengths, None, None, None, True, 0.5, 0.0, 0.0, 0.1, True)
        torch.library.opcheck(torch.ops.rnntl_fast.lstm_forward.default, args)
    else:
        args = (*tensors, None, lengths, None, None, False, 0.1, 0.0, True)
        torch.library.opcheck(torch.ops.rnntl_fast.gru_forward.default, args)


# Non-finite values on the GPU (the device branch of rnntl/cell_math.h: expf, tanhf, which
# the CPU emulation of tests/test_cuda_emulation.py does not run). Lengths with a length-0 row.
NONFINITE_LENGTHS = [3, 5, 0, 2]


def _nonfinite_run(cell, data, dtype, device, options, native):
    return (_lstm_run if cell == "lstm" else _gru_run)(data, dtype, device, options, native)


def _nonfinite_data(cell, T=5, B=4, I=3, H=6):
    G = (4 if cell == "lstm" else 3) * H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, H), "b_ih": _rand(G), "b_hh": _rand(G),
            "h0": _rand(B, H), "go": _rand(T, B, H), "ghn": _rand(B, H), "lengths": torch.tensor(NONFINITE_LENGTHS)}
    if cell == "lstm":
        data.update({"w_hr": None, "c0": _rand(B, H), "gcn": _rand(B, H)})
    return data


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_non_finite_padded_steps_reach_nothing(cell, strategy):
    """NaN and +-inf in the padded steps of the input change no output and no gradient, bit
    for bit, and the input's gradient is 0 there (padded rows enter no product)."""
    options = sequence_options(True, grad_clip=0.02)
    data = _nonfinite_data(cell)
    clean = _nonfinite_run(cell, data, torch.float32, "cuda", options, native=True)
    padded = torch.arange(5).unsqueeze(1) >= torch.tensor(NONFINITE_LENGTHS).unsqueeze(0)
    x = data["x"].clone()
    x[padded] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    dirty = _nonfinite_run(cell, dict(data, x=x), torch.float32, "cuda", options, native=True)
    for name, expected in clean.items():
        torch.testing.assert_close(dirty[name], expected, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert (dirty["x"][padded] == 0).all()


@pytest.mark.parametrize("poison", [("x", (1, 0, 2), float("nan")), ("x", (1, 1, 0), float("inf")),
                                    ("w_ih", (2, 1), -float("inf"))], ids=lambda p: f"{p[0]}{list(p[1])}={p[2]}")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_non_finite_values_propagate_as_in_the_reference(cell, poison, strategy):
    """+-inf and NaN at a valid step: NaN, +inf and -inf in every output and gradient exactly
    where the float64 reference has them (sigmoid(-inf) is exactly 0 with the device's expf)."""
    leaf, index, value = poison
    clips = dict(cell_clip=0.4, proj_clip=0.1) if cell == "lstm" else {}
    options = sequence_options(False, grad_clip=0.02, **clips)
    data = _nonfinite_data(cell)
    data[leaf] = data[leaf].clone()
    data[leaf][index] = value
    reference = _nonfinite_run(cell, data, torch.float64, "cpu", options, native=False)
    fast = _nonfinite_run(cell, data, torch.float32, "cuda", options, native=True)
    for name, expected in reference.items():
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            mismatch = (kind(fast[name]) != kind(expected)).nonzero().tolist()
            assert not mismatch, f"{name}: {kind.__name__} differs from the float64 reference at {mismatch[:6]}"
        finite = torch.isfinite(expected)
        torch.testing.assert_close(fast[name][finite], expected[finite].float(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_autocast_like_torch_nn(cell, form, autocast_dtype):
    """Under torch.autocast("cuda", ...) the modules return what torch.nn's cuDNN modules
    return (docs/semantics.md, section 8: on CUDA every cell and input form runs in the
    autocast dtype): the same output and state dtypes, values within that dtype's rounding,
    and float32 parameter gradients."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    reference = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(4, 6, num_layers=2, bidirectional=True).cuda()
    fast = (rnntl_fast.LSTM if cell == "lstm" else rnntl_fast.GRU)(4, 6, num_layers=2, bidirectional=True).cuda()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(6, 3, 4, device="cuda")

    def model_input():
        return pack_padded_sequence(x, [6, 4, 2]) if form == "packed" else x

    def states(state):
        return list(state) if isinstance(state, tuple) else [state]

    with torch.autocast("cuda", autocast_dtype):
        expected_output, expected_state = reference(model_input())
        output, state = fast(model_input())
    if form == "packed":
        expected_output, output = expected_output.data, output.data
    assert output.dtype == expected_output.dtype
    assert [s.dtype for s in states(state)] == [s.dtype for s in states(expected_state)]
    torch.testing.assert_close(output.float(), expected_output.float(), atol=5e-2, rtol=5e-2)
    output.float().square().sum().backward()
    for name, parameter in fast.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name


# Recurrent dropout (recurrent_mask, docs/semantics.md section 10) through the public ops:
# (id, cell, T, B, I, H, proj, lengths, reverse, clip options, frozen leaves).
MASK_CASES = [
    ("lstm", "lstm", 6, 3, 5, 16, None, None, False, dict(), ()),
    ("lstm_lengths_reverse_clips", "lstm", 7, 4, 5, 16, None, [7, 3, 0, 5], True,
     dict(cell_clip=0.5, proj_clip=0.3, grad_clip=0.05), ()),
    ("lstm_proj_clip_gates", "lstm", 6, 3, 4, 16, 8, [6, 2, 4], False,
     dict(grad_clip=0.05, grad_clip_mode="gates"), ()),
    ("lstm_frozen_weights", "lstm", 5, 2, 4, 12, None, [5, 3], False, dict(), ("w_ih", "w_hh")),
    ("gru", "gru", 6, 3, 5, 16, None, None, False, dict(), ()),
    ("gru_lengths_reverse_clip", "gru", 7, 4, 5, 16, None, [7, 3, 0, 5], True, dict(grad_clip=0.05), ()),
    ("gru_clip_gates_frozen", "gru", 6, 3, 4, 12, None, [6, 2, 4], False,
     dict(grad_clip=0.05, grad_clip_mode="gates"), ("w_ih", "w_hh")),
]


def _masked_run(case, data, dtype, device, backend):
    """Results and the gradients of the leaves that are not frozen, on the CPU."""
    _, cell, _, _, _, _, _, _, reverse, clips, frozen = case
    t = {k: (v.to(device=device, dtype=dtype).detach().requires_grad_(k not in frozen)
             if v is not None and k not in ("go", "lengths", "mask") else v) for k, v in data.items()}
    options = dict(lengths=data["lengths"], reverse=reverse, backend=backend,
                   recurrent_mask=data["mask"].to(device=device, dtype=dtype), **clips)
    if cell == "lstm":
        results = rnntl_fast.ops.lstm(t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["w_hr"], t["h0"],
                                      t["c0"], **options)
    else:
        results = rnntl_fast.ops.gru(t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["h0"], **options)
    loss = sum((r * g.to(device=device, dtype=dtype)).sum() for r, g in zip(results, data["go"]))
    loss.backward()
    out = dict(zip(("output", "h_n", "c_n"), (r.detach() for r in results)))
    out.update({k: v.grad for k, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad})
    return {k: v.cpu() for k, v in out.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_recurrent_mask_matches_reference(case, dtype, strategy):
    """Forward results and gradients with a recurrent mask (Bernoulli(0.7) / 0.7) against the
    float64 reference, both strategies."""
    _, cell, T, B, I, H, proj, lengths, *_ = case
    if strategy == "persistent" and proj is not None:
        pytest.skip("the persistent kernel keeps W_hh of P == H on chip; proj_size runs stepwise")
    P = proj or H
    G = (4 if cell == "lstm" else 3) * H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, P), "b_ih": _rand(G), "b_hh": _rand(G),
            "h0": _rand(B, P), "mask": torch.bernoulli(torch.full((B, P), 0.7, dtype=torch.float64)) / 0.7,
            "lengths": torch.tensor(lengths) if lengths is not None else None}
    if cell == "lstm":
        data.update({"w_hr": _rand(P, H) if proj else None, "c0": _rand(B, H)})
        data["go"] = (_rand(T, B, P), _rand(B, P), _rand(B, H))
    else:
        data["go"] = (_rand(T, B, P), _rand(B, P))
    reference = _masked_run(case, data, torch.float64, "cpu", "reference")
    baseline = _masked_run(case, data, dtype, "cuda", "reference")
    fast = _masked_run(case, data, dtype, "cuda", "cuda")
    _check(fast, baseline, reference, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck_with_recurrent_mask(cell, strategy):
    """Schema, fake and autograd registration agree with the CUDA kernels given a mask."""
    T, B, I, H = 3, 2, 4, 5
    G = (4 if cell == "lstm" else 3) * H
    tensors = [_rand(T, B, I).float().cuda().requires_grad_(), _rand(G, I).float().cuda().requires_grad_(),
               _rand(G, H).float().cuda().requires_grad_(), _rand(G).float().cuda(), _rand(G).float().cuda()]
    lengths = torch.tensor([3, 1])
    mask = (torch.rand(B, H) > 0.3).float().cuda() / 0.7
    if cell == "lstm":
        args = (*tensors, None, None, None, lengths, mask, None, None, True, 0.5, 0.0, 0.0, 0.1, True)
        torch.library.opcheck(torch.ops.rnntl_fast.lstm_forward.default, args)
    else:
        args = (*tensors, None, lengths, mask, None, False, 0.1, 0.0, True)
        torch.library.opcheck(torch.ops.rnntl_fast.gru_forward.default, args)


# Elman RNN through rnntl_fast.ops.rnn, backend "cuda" against "reference" (f = tanh or
# relu, recurrent mask Bernoulli(0.7) / 0.7, zoneout keep weights as training draws).
# (id, T, B, I, H, relu, lengths, reverse, mask, zoneout, clip options, frozen leaves)
RNN_CASES = [
    ("tanh", 5, 3, 7, 13, False, None, False, False, False, dict(), ()),
    ("relu_lengths_reverse_state_clip", 5, 3, 7, 13, True, [3, 5, 0], True, False, False, dict(grad_clip=0.02), ()),
    ("tanh_mask_zoneout_lengths_gates_clip", 6, 4, 5, 9, False, [2, 6, 0, 4], False, True, True,
     dict(grad_clip=0.02, grad_clip_mode="gates"), ()),
    ("relu_mask_zoneout_reverse_frozen", 5, 3, 4, 8, True, [5, 1, 3], True, True, True, dict(), ("w_ih", "w_hh")),
    ("larger_mask_zoneout", 16, 8, 32, 64, False, None, False, True, True, dict(), ()),
]


def _rnn_data(case):
    _, T, B, I, H, _, lengths, _, mask, zoneout, _, _ = case
    return {"x": _rand(T, B, I), "w_ih": _rand(H, I), "w_hh": _rand(H, H), "b_ih": _rand(H), "b_hh": _rand(H),
            "h0": _rand(B, H), "go": (_rand(T, B, H), _rand(B, H)),
            "mask": torch.bernoulli(torch.full((B, H), 0.7, dtype=torch.float64)) / 0.7 if mask else None,
            "zoneout": torch.bernoulli(torch.full((T, B, H), 0.3, dtype=torch.float64)) if zoneout else None,
            "lengths": torch.tensor(lengths) if lengths is not None else None}


def _rnn_run(case, data, dtype, device, backend):
    """Results and the gradients of the leaves that are not frozen, on the CPU."""
    _, _, _, _, _, relu, _, reverse, _, _, clips, frozen = case
    given = ("go", "lengths", "mask", "zoneout")
    t = {k: (v.to(device=device, dtype=dtype).detach().requires_grad_(k not in frozen)
             if v is not None and k not in given else v) for k, v in data.items()}
    regularizers = {name: data[key].to(device=device, dtype=dtype)
                    for name, key in (("recurrent_mask", "mask"), ("zoneout", "zoneout")) if data[key] is not None}
    results = rnntl_fast.ops.rnn(t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["h0"], data["lengths"],
                                 nonlinearity="relu" if relu else "tanh", reverse=reverse, backend=backend,
                                 **regularizers, **clips)
    loss = sum((r * g.to(device=device, dtype=dtype)).sum() for r, g in zip(results, data["go"]))
    loss.backward()
    out = dict(zip(("output", "h_n"), (r.detach() for r in results)))
    out.update({k: v.grad for k, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad})
    return {k: v.cpu() for k, v in out.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", RNN_CASES, ids=[c[0] for c in RNN_CASES])
def test_rnn_matches_reference(case, dtype, strategy):
    """Forward results and every gradient of the Elman RNN against the float64 reference."""
    data = _rnn_data(case)
    reference = _rnn_run(case, data, torch.float64, "cpu", "reference")
    baseline = _rnn_run(case, data, dtype, "cuda", "reference")
    fast = _rnn_run(case, data, dtype, "cuda", "cuda")
    _check(fast, baseline, reference, dtype)


@pytest.mark.parametrize("zoneout", [False, True], ids=["no_zoneout", "zoneout"])
def test_rnn_reserve_and_opcheck(zoneout, strategy):
    """The RNN's outputs and activations reserve equal the CPU op's (layout included: the
    compact rows first, then zeros); schema, fake and autograd agree with the CUDA kernels."""
    T, B, I, H = 4, 3, 5, 7
    lengths = torch.tensor([2, 4, 0])
    args = [_rand(T, B, I).float(), _rand(H, I).float(), _rand(H, H).float(), _rand(H).float(), _rand(H).float(),
            _rand(B, H).float()]
    mask = (torch.rand(B, H) > 0.3).float() / 0.7
    keep = torch.bernoulli(torch.full((T, B, H), 0.3)) if zoneout else None
    flags = (True, False, 0.0, 0.1, True)  # relu, reverse, state_clip, gate_clip, save_for_backward
    cpu = torch.ops.rnntl_fast.rnn_forward(*args, lengths, mask, keep, *flags)
    gpu_args = [a.cuda().requires_grad_(i < 3) for i, a in enumerate(args)]
    gpu = torch.ops.rnntl_fast.rnn_forward(*gpu_args, lengths, mask.cuda(), keep.cuda() if zoneout else None, *flags)
    for name, a, b in zip(("output", "h_n", "activations"), cpu, gpu):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
        torch.testing.assert_close(b.detach().cpu(), a, atol=2e-5, rtol=1e-4, msg=name)
    torch.library.opcheck(torch.ops.rnntl_fast.rnn_forward.default,
                          (*gpu_args, lengths, mask.cuda(), keep.cuda() if zoneout else None, *flags))


# Zoneout (docs/semantics.md section 10) through the public ops, backend "cuda" against
# "reference": keep weights [T, B, *] as 0/1 draws of Bernoulli(z) (training) or every entry
# z (evaluation); the LSTM's of h ("h"), of c ("c") or both.
# (id, cell, T, B, I, H, proj, lengths, reverse, zoned, keep, mask, clip options, frozen leaves)
ZONEOUT_CASES = [
    ("lstm_hc_draws", "lstm", 6, 3, 5, 16, None, None, False, "hc", "draws", False, dict(), ()),
    ("lstm_c_eval_lengths_reverse_clips", "lstm", 7, 4, 5, 16, None, [7, 3, 0, 5], True, "c", "eval", False,
     dict(cell_clip=0.5, grad_clip=0.05), ()),
    ("lstm_h_draws_mask_lengths_clips", "lstm", 6, 3, 4, 12, None, [6, 2, 4], False, "h", "draws", True,
     dict(cell_clip=0.5, proj_clip=0.3, grad_clip=0.05), ()),
    ("lstm_proj_hc_draws_mask_clips", "lstm", 6, 3, 4, 16, 8, [6, 2, 4], False, "hc", "draws", True,
     dict(cell_clip=0.6, proj_clip=0.3, grad_clip=0.05), ()),
    ("lstm_proj_h_eval_reverse_gates", "lstm", 5, 2, 4, 12, 6, [5, 3], True, "h", "eval", False,
     dict(grad_clip=0.05, grad_clip_mode="gates"), ()),
    ("lstm_hc_eval_mask_gates_frozen", "lstm", 5, 2, 4, 12, None, [5, 3], True, "hc", "eval", True,
     dict(grad_clip=0.05, grad_clip_mode="gates"), ("w_ih", "w_hh")),
    ("lstm_larger_hc_draws_mask", "lstm", 16, 8, 32, 64, None, None, False, "hc", "draws", True, dict(), ()),
    ("gru_draws_lengths_reverse_clip", "gru", 7, 4, 5, 16, None, [7, 3, 0, 5], True, "h", "draws", False,
     dict(grad_clip=0.05), ()),
    ("gru_eval_mask_gates_frozen", "gru", 6, 3, 4, 12, None, [6, 2, 4], False, "h", "eval", True,
     dict(grad_clip=0.05, grad_clip_mode="gates"), ("w_ih", "w_hh")),
    ("gru_larger_draws_mask", "gru", 16, 8, 32, 64, None, None, False, "h", "draws", True, dict(), ()),
]
ZONEOUT_RATES = {"zoneout_h": 0.3, "zoneout_c": 0.2, "zoneout": 0.3}


def _zoneout_data(case):
    _, cell, T, B, I, H, proj, lengths, _, zoned, keep, mask, _, _ = case
    P = proj or H
    G = (4 if cell == "lstm" else 3) * H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, P), "b_ih": _rand(G), "b_hh": _rand(G),
            "h0": _rand(B, P),
            "mask": torch.bernoulli(torch.full((B, P), 0.7, dtype=torch.float64)) / 0.7 if mask else None,
            "lengths": torch.tensor(lengths) if lengths is not None else None}
    if cell == "lstm":
        data.update({"w_hr": _rand(P, H) if proj else None, "c0": _rand(B, H)})
        data["go"] = (_rand(T, B, P), _rand(B, P), _rand(B, H))
        names = {"h": ("zoneout_h",), "c": ("zoneout_c",), "hc": ("zoneout_h", "zoneout_c")}[zoned]
    else:
        data["go"] = (_rand(T, B, P), _rand(B, P))
        names = ("zoneout",)
    for name in names:
        rate = torch.full((T, B, P if name == "zoneout_h" else H), ZONEOUT_RATES[name], dtype=torch.float64)
        data[name] = torch.bernoulli(rate) if keep == "draws" else rate
    return data


def _zoneout_run(case, data, dtype, device, backend):
    """Results and the gradients of the leaves that are not frozen, on the CPU."""
    _, cell, _, _, _, _, _, _, reverse, _, _, _, clips, frozen = case
    given = ("go", "lengths", "mask", "zoneout", "zoneout_h", "zoneout_c")
    t = {k: (v.to(device=device, dtype=dtype).detach().requires_grad_(k not in frozen)
             if v is not None and k not in given else v) for k, v in data.items()}
    regularizers = {name: data[key].to(device=device, dtype=dtype)
                    for name, key in (("recurrent_mask", "mask"), ("zoneout", "zoneout"), ("zoneout_h", "zoneout_h"),
                                      ("zoneout_c", "zoneout_c")) if data.get(key) is not None}
    options = dict(lengths=data["lengths"], reverse=reverse, backend=backend, **regularizers, **clips)
    if cell == "lstm":
        results = rnntl_fast.ops.lstm(t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["w_hr"], t["h0"],
                                      t["c0"], **options)
    else:
        results = rnntl_fast.ops.gru(t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["h0"], **options)
    loss = sum((r * g.to(device=device, dtype=dtype)).sum() for r, g in zip(results, data["go"]))
    loss.backward()
    out = dict(zip(("output", "h_n", "c_n"), (r.detach() for r in results)))
    out.update({k: v.grad for k, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad})
    return {k: v.cpu() for k, v in out.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", ZONEOUT_CASES, ids=[c[0] for c in ZONEOUT_CASES])
def test_zoneout_matches_reference(case, dtype, strategy):
    """Forward results and every gradient with zoneout against the float64 reference, both
    strategies."""
    if strategy == "persistent" and case[6] is not None:
        pytest.skip("the persistent kernel keeps W_hh of P == H on chip; proj_size runs stepwise")
    data = _zoneout_data(case)
    reference = _zoneout_run(case, data, torch.float64, "cpu", "reference")
    baseline = _zoneout_run(case, data, dtype, "cuda", "reference")
    fast = _zoneout_run(case, data, dtype, "cuda", "cuda")
    _check(fast, baseline, reference, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_reserve_and_opcheck(cell, strategy):
    """With zoneout (keep weights as 0/1 draws) the outputs and the reserve, the LSTM's
    carried_cells included, equal the CPU op's (no lengths: with lengths the CPU op keeps
    compact rows); schema, fake and autograd agree with the CUDA kernels."""
    T, B, I, H = 4, 3, 5, 7
    G = (4 if cell == "lstm" else 3) * H
    args = [_rand(T, B, I).float(), _rand(G, I).float(), _rand(G, H).float(), _rand(G).float(), _rand(G).float()]
    draws = lambda: torch.bernoulli(torch.full((T, B, H), 0.3))  # noqa: E731
    if cell == "lstm":
        # weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h, zoneout_c, reverse, cell_clip, proj_clip,
        # state_clip, gate_clip, save_for_backward
        extra = [None, _rand(B, H).float(), _rand(B, H).float(), None, None, draws(), draws(), True, 0.6, 0.4, 0.1,
                 0.0, True]
        op = torch.ops.rnntl_fast.lstm_forward
    else:
        # h0, lengths, recurrent_mask, zoneout, reverse, state_clip, gate_clip, save_for_backward
        extra = [_rand(B, H).float(), None, None, draws(), True, 0.0, 0.1, True]
        op = torch.ops.rnntl_fast.gru_forward
    cpu = op(*args, *extra)
    gpu_args = [a.cuda().requires_grad_(i < 3) for i, a in enumerate(args)]
    gpu_extra = [e.cuda() if isinstance(e, torch.Tensor) else e for e in extra]
    gpu = op(*gpu_args, *gpu_extra)
    assert len(cpu) == len(gpu)
    for index, (a, b) in enumerate(zip(cpu, gpu)):
        assert a.shape == b.shape, f"output {index}: {tuple(a.shape)} vs {tuple(b.shape)}"
        torch.testing.assert_close(b.detach().cpu(), a, atol=2e-5, rtol=1e-4, msg=f"output {index}")
    torch.library.opcheck(op.default, (*gpu_args, *gpu_extra))


# Layer normalisation (docs/semantics.md section 10; docs/cuda.md, "Layer normalisation"):
# stepwise only. (id, cell, T, B, I, H, proj, lengths, reverse, bias, mask, zoneout, clip options, frozen leaves)
LAYER_NORM_CASES = [
    ("lstm", "lstm", 5, 3, 4, 9, None, None, False, True, False, None, dict(), ()),
    ("lstm_lengths_reverse_mask_zoneout_clips", "lstm", 6, 4, 5, 9, None, [2, 6, 0, 4], True, True, True, "draws",
     dict(cell_clip=0.5, proj_clip=0.2, grad_clip=0.02), ()),
    ("lstm_proj_zoneout_eval_gates_clip_frozen", "lstm", 5, 3, 4, 8, 5, [5, 2, 3], False, False, True, "eval",
     dict(proj_clip=0.3, grad_clip=0.02, grad_clip_mode="gates"), ("w_ih", "w_hh")),
    ("lstm_larger", "lstm", 16, 8, 32, 256, None, None, False, True, False, None, dict(), ()),
    ("gru_lengths_reverse_mask_zoneout_clip", "gru", 6, 4, 5, 9, None, [2, 6, 0, 4], True, True, True, "draws",
     dict(grad_clip=0.02), ()),
    ("gru_zoneout_eval_gates_clip_frozen", "gru", 5, 3, 4, 8, None, [5, 1, 3], False, False, False, "eval",
     dict(grad_clip=0.02, grad_clip_mode="gates"), ("w_ih", "w_hh")),
    ("gru_larger", "gru", 16, 8, 32, 256, None, None, False, True, False, None, dict(), ()),
]


def _layer_norm_data(case):
    _, cell, T, B, I, H, proj, lengths, _, bias, mask, zoneout, _, _ = case
    P = proj or H
    G = (4 if cell == "lstm" else 3) * H
    data = {"x": _rand(T, B, I), "w_ih": _rand(G, I), "w_hh": _rand(G, P), "b_ih": _rand(G) if bias else None,
            "b_hh": _rand(G) if bias else None, "h0": _rand(B, P), "ln_ih": 1 + _rand(G, scale=0.3),
            "ln_hh": 1 + _rand(G, scale=0.3), "lengths": torch.tensor(lengths) if lengths is not None else None,
            "mask": torch.bernoulli(torch.full((B, P), 0.7, dtype=torch.float64)) / 0.7 if mask else None}
    shapes = [(T, B, P), (B, P)]
    if cell == "lstm":
        data.update({"w_hr": _rand(P, H) if proj else None, "c0": _rand(B, H),
                     "ln_cell_weight": 1 + _rand(H, scale=0.3), "ln_cell_bias": _rand(H, scale=0.3) if bias else None})
        shapes.append((B, H))
    data["go"] = [_rand(*shape) for shape in shapes]
    names = ("zoneout_h", "zoneout_c") if cell == "lstm" else ("zoneout",)
    for name in names * bool(zoneout):
        rate = torch.full((T, B, P if name == "zoneout_h" else H), 0.3, dtype=torch.float64)
        data[name] = torch.bernoulli(rate) if zoneout == "draws" else rate
    return data


def _layer_norm_run(case, data, dtype, device, backend):
    """Results and the gradients of the leaves that are not frozen, on the CPU."""
    _, cell, _, _, _, _, _, _, reverse, _, _, _, clips, frozen = case
    given = ("go", "lengths", "mask", "zoneout", "zoneout_h", "zoneout_c")
    t = {k: (v.to(device=device, dtype=dtype).detach().requires_grad_(k not in frozen)
             if v is not None and k not in given else v) for k, v in data.items()}
    regularizers = {name: data[key].to(device=device, dtype=dtype)
                    for name, key in (("recurrent_mask", "mask"), ("zoneout", "zoneout"), ("zoneout_h", "zoneout_h"),
                                      ("zoneout_c", "zoneout_c")) if data.get(key) is not None}
    norms = rnntl_fast.ops.LayerNormWeights(t["ln_ih"], t["ln_hh"], t.get("ln_cell_weight"), t.get("ln_cell_bias"))
    options = dict(lengths=data["lengths"], reverse=reverse, backend=backend, layer_norm=norms, **regularizers,
                   **clips)
    if cell == "lstm":
        results = rnntl_fast.ops.lstm(t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["w_hr"], t["h0"],
                                      t["c0"], **options)
    else:
        results = rnntl_fast.ops.gru(t["x"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["h0"], **options)
    loss = sum((r * g.to(device=device, dtype=dtype)).sum() for r, g in zip(results, data["go"]))
    loss.backward()
    out = dict(zip(("output", "h_n", "c_n"), (r.detach() for r in results)))
    out.update({k: v.grad for k, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad})
    return {k: v.cpu() for k, v in out.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=[c[0] for c in LAYER_NORM_CASES])
def test_layer_norm_matches_reference(case, dtype, monkeypatch):
    """Forward results and every gradient (the gains' included) of the layer-normalised
    cells through rnntl_fast.ops.lstm / gru(backend="cuda") against the float64 reference."""
    monkeypatch.setenv("RNNTL_CUDA_STRATEGY", "auto")
    data = _layer_norm_data(case)
    reference = _layer_norm_run(case, data, torch.float64, "cpu", "reference")
    baseline = _layer_norm_run(case, data, dtype, "cuda", "reference")
    fast = _layer_norm_run(case, data, dtype, "cuda", "cuda")
    _check(fast, baseline, reference, dtype)


def test_layer_norm_refuses_the_persistent_strategy(monkeypatch):
    """The layer-norm cells run stepwise only: RNNTL_CUDA_STRATEGY=persistent is an error."""
    monkeypatch.setenv("RNNTL_CUDA_STRATEGY", "persistent")
    case = LAYER_NORM_CASES[0]
    with pytest.raises(RuntimeError, match="persistent CUDA strategy does not run layer_norm"):
        _layer_norm_run(case, _layer_norm_data(case), torch.float32, "cuda", "cuda")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_reserve_and_opcheck(cell):
    """The layer-norm ops' outputs and reserve on the GPU equal the CPU op's (no lengths:
    with lengths the CPU op keeps compact rows); schema, fake and autograd agree with the
    CUDA kernels."""
    T, B, I, H = 4, 3, 5, 7
    G = (4 if cell == "lstm" else 3) * H
    args = [_rand(T, B, I).float(), _rand(G, I).float(), _rand(G, H).float(), _rand(G).float(), _rand(G).float()]
    draws = lambda: torch.bernoulli(torch.full((T, B, H), 0.3))  # noqa: E731
    mask = torch.bernoulli(torch.full((B, H), 0.5)) * 2
    gains = [1 + _rand(G, scale=0.3).float(), 1 + _rand(G, scale=0.3).float()]
    if cell == "lstm":
        # weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h, zoneout_c, gains, cell terms, reverse, cell_clip,
        # proj_clip, state_clip, gate_clip, save_for_backward
        extra = [None, _rand(B, H).float(), _rand(B, H).float(), None, mask, draws(), draws(), *gains,
                 1 + _rand(H, scale=0.3).float(), _rand(H).float(), True, 0.6, 0.4, 0.1, 0.0, True]
        op = torch.ops.rnntl_fast.layer_norm_lstm_forward
    else:
        # h0, lengths, recurrent_mask, zoneout, gains, reverse, state_clip, gate_clip, save_for_backward
        extra = [_rand(B, H).float(), None, mask, draws(), *gains, True, 0.0, 0.1, True]
        op = torch.ops.rnntl_fast.layer_norm_gru_forward
    cpu = op(*args, *extra)
    gpu_args = [a.cuda().requires_grad_(i < 3) for i, a in enumerate(args)]
    gpu_extra = [e.cuda() if isinstance(e, torch.Tensor) else e for e in extra]
    gpu = op(*gpu_args, *gpu_extra)
    assert len(cpu) == len(gpu)
    for index, (a, b) in enumerate(zip(cpu, gpu)):
        assert a.shape == b.shape, f"output {index}: {tuple(a.shape)} vs {tuple(b.shape)}"
        torch.testing.assert_close(b.detach().cpu(), a, atol=2e-5, rtol=1e-4, msg=f"output {index}")
    torch.library.opcheck(op.default, (*gpu_args, *gpu_extra))
