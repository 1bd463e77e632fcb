"""The triton backend against the float64 reference (error rule: docs/semantics.md section 7).

Runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets
it), so shapes stay small: the interpreter executes every program with numpy. With
RNNTL_TEST_TRITON_COMPILED=1 (and no TRITON_INTERPRET) the same tests run the compiled
kernels on CUDA tensors instead (`make gpu-check`), the interpreter accepting programs the
compiler rejects. Each parity
test runs once per strategy, forced through RNNTL_TRITON_STRATEGY: "sequence" (whole
recurrence in one launch, weights on chip) and "step" (a launch per step); under the
interpreter the step kernels use 16-wide tiles, so H=20 exercises their multi-tile paths.
"""
import os
import random

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed: the triton backend is optional")

import rnntl_fast  # noqa: E402
from rnntl_fast import ops  # noqa: E402
from rnntl_fast.ops.options import sequence_options  # noqa: E402
from parity import LEAVES, Case, assert_case_matches, make_tensors, run, triton_device_or_skip  # noqa: E402
from tolerances import assert_within_error_rule  # noqa: E402

DEVICE = triton_device_or_skip()

from rnntl_fast.ops import triton as triton_ops  # noqa: E402
from rnntl_fast.ops.triton import config  # noqa: E402

STRATEGIES = ("sequence", "step")


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    monkeypatch.setenv(config.STRATEGY_ENV, request.param)
    return request.param


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    """torch.empty comes back NaN-filled, so an element a kernel forgot to write shows up."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def _cases():
    cases = []
    for cell in ("lstm", "gru"):
        cases += [
            Case(cell, T=3, B=2, I=5, H=7),
            Case(cell, T=1, B=1, I=3, H=5),
            Case(cell, T=4, B=3, I=7, H=13),
            Case(cell, T=4, B=3, I=7, H=13, reverse=True, lengths=(2, 4, 1)),
            Case(cell, T=4, B=3, I=3, H=5, lengths=(3, 0, 4), initial_state=False),
            Case(cell, T=3, B=2, I=3, H=5, bias=False, reverse=True),
            Case(cell, T=2, B=17, I=3, H=5, lengths=tuple(i % 3 for i in range(17))),
            Case(cell, T=3, B=2, I=3, H=20),
            Case(cell, T=4, B=3, I=3, H=5, lengths=(2, 4, 1), grad_clip=0.05, grad_clip_mode="state"),
            Case(cell, T=4, B=3, I=3, H=5, lengths=(2, 4, 1), reverse=True, grad_clip=0.05, grad_clip_mode="state"),
            Case(cell, T=4, B=3, I=3, H=5, lengths=(2, 4, 1), reverse=True, grad_clip=0.05,
                 grad_clip_mode="gates"),
            Case(cell, T=3, B=2, I=3, H=5, frozen=("weight_ih", "weight_hh", "input")),
        ]
    cases += [
        Case("lstm", T=3, B=2, I=4, H=6, proj=3),
        Case("lstm", T=4, B=3, I=4, H=6, proj=3, reverse=True, lengths=(2, 4, 3)),
        Case("lstm", T=3, B=2, I=3, H=20, proj=17, initial_state=False),
        Case("lstm", T=3, B=2, I=4, H=6, cell_clip=0.3),
        Case("lstm", T=3, B=2, I=4, H=6, proj_clip=0.2),
        Case("lstm", T=4, B=3, I=4, H=6, proj=3, cell_clip=0.3, proj_clip=0.1, lengths=(2, 4, 3), reverse=True),
        Case("lstm", T=4, B=3, I=4, H=6, proj=3, cell_clip=0.3, proj_clip=0.1, grad_clip=0.02),
        Case("lstm", T=4, B=3, I=4, H=6, proj=3, grad_clip=0.02, grad_clip_mode="gates", lengths=(4, 1, 3)),
        Case("lstm", T=3, B=2, I=4, H=6, proj=3, frozen=("weight_hr", "bias_ih", "bias_hh")),
    ]
    return cases


CASES = _cases()


def _torch_nn_expressible(case: Case) -> bool:
    return case.cell_clip is None and case.proj_clip is None and case.grad_clip is None and 0 not in (case.lengths or ())


def _baseline(case: Case, tensors, dtype):
    """torch.nn in `dtype` where it can express the case (float32), else the reference
    loop in `dtype` (torch.nn has no clipping, and the reference runs in any dtype)."""
    if dtype == torch.float32 and _torch_nn_expressible(case):
        from parity import run_torch_nn
        return run_torch_nn(case, tensors, dtype)
    return run(case, tensors, dtype, "reference")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float32_within_error_rule(case, strategy):
    tensors = make_tensors(case)
    reference64 = run(case, tensors, torch.float64, "reference")
    fast = run(case, tensors, torch.float32, "triton", device=DEVICE)
    checked = assert_case_matches(case, fast, _baseline(case, tensors, torch.float32), reference64, torch.float32)
    assert "output" in checked and "h_n" in checked


LOW_PRECISION_CASES = [
    Case("lstm", T=3, B=2, I=5, H=7, lengths=(3, 1), reverse=True),
    Case("lstm", T=3, B=2, I=4, H=6, proj=3, cell_clip=0.3, proj_clip=0.2, grad_clip=0.05),
    Case("gru", T=3, B=2, I=5, H=7, lengths=(1, 3)),
    Case("gru", T=3, B=2, I=4, H=6, reverse=True, grad_clip=0.05, grad_clip_mode="gates"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=lambda c: c.id)
def test_low_precision_within_error_rule(case, dtype, strategy):
    tensors = make_tensors(case)
    reference64 = run(case, tensors, torch.float64, "reference")
    fast = run(case, tensors, dtype, "triton", device=DEVICE)
    for name, value in fast.items():
        assert value is None or value.dtype == dtype, f"{name} has dtype {value.dtype}"
    assert_case_matches(case, fast, _baseline(case, tensors, dtype), reference64, dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c.grad_clip], ids=lambda c: c.id)
def test_grad_clip_changes_gradients(case, strategy):
    """The clip binds in these cases: clipped gradients differ from unclipped ones (both
    from the triton backend); test_float32_within_error_rule checks the clipped values."""
    tensors = make_tensors(case)
    clipped = run(case, tensors, torch.float32, "triton", device=DEVICE)
    unclipped = run(case, tensors, torch.float32, "triton", grad_clip=None, device=DEVICE)
    differing = [name for name in clipped if name.startswith("grad_") and clipped[name] is not None
                 and (clipped[name] - unclipped[name]).abs().max() > 1e-4]
    assert "grad_weight_hh" in differing and "grad_input" in differing, differing


def _recurrent_mask(case: Case, seed: int = 1) -> torch.Tensor:
    """A float64 recurrent-dropout mask [B, P] drawn as the modules draw it (Bernoulli(0.7) / 0.7),
    with unit 0 of row 0 dropped so that every case drops at least one."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.bernoulli(torch.full((case.B, case.out_size), 0.7, dtype=torch.float64), generator=g) / 0.7
    mask[0, 0] = 0.0
    assert (mask > 0).any()
    return mask


def _op_arguments(cell, proj=0, lengths=None, reverse=False, clips=False, grad_clip=None, mode="state",
                  masked=False, zoned=False, normed=False):
    """The forward op's arguments; clip limits as the op contract takes them (0 = off); zoned:
    zoneout keep weights (0/1 draws, z = 0.3) of h and c (LSTM) or h (GRU); normed: layer-norm
    gains (and the LSTM's cell gain and bias) that require grad."""
    limits = sequence_options(reverse, 0.5 if clips else None, 0.4 if clips else None, grad_clip, mode)
    case = Case(cell, T=3, B=2, I=3, H=5, proj=proj, lengths=lengths)
    tensors = make_tensors(case)
    leaves = [tensors[n].float().to(DEVICE).requires_grad_(True) if n in tensors else None for n in LEAVES]
    input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0 = leaves
    length_tensor = torch.tensor(lengths) if lengths else None
    mask = _recurrent_mask(case).float().to(DEVICE) if masked else None
    g = torch.Generator().manual_seed(2)
    keep = lambda width: torch.bernoulli(torch.full((case.T, case.B, width), 0.3), generator=g).to(DEVICE)  # noqa: E731
    gain = lambda width: (1 + 0.3 * torch.randn(width, generator=g)).to(DEVICE).requires_grad_(True)  # noqa: E731
    gates = weight_ih.shape[0]
    norm = (gain(gates), gain(gates)) if normed else (None, None)
    if cell == "lstm":
        zoneout = (keep(case.out_size), keep(case.H)) if zoned else (None, None)
        cell_norm = (gain(case.H), gain(case.H) - 1) if normed else (None, None)
        return (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, length_tensor, mask, *zoneout, *norm,
                *cell_norm, *limits, True)
    return (input, weight_ih, weight_hh, bias_ih, bias_hh, h0, length_tensor, mask, keep(case.H) if zoned else None,
            *norm, reverse, limits.state_clip, limits.gate_clip, True)


# (cell, proj, lengths, reverse, clips, grad_clip, regularizers)
OPCHECK = [("lstm", 0, None, False, False, None, ()), ("lstm", 2, (3, 1), True, True, 0.1, ()),
           ("lstm", 2, (3, 1), True, True, 0.1, ("recurrent_mask",)),
           ("lstm", 2, (3, 1), True, True, 0.1, ("recurrent_mask", "zoneout")),
           ("lstm", 2, (3, 1), True, True, 0.1, ("recurrent_mask", "zoneout", "layer_norm")),
           ("gru", 0, None, False, False, None, ()), ("gru", 0, (2, 3), True, False, 0.1, ()),
           ("gru", 0, (2, 3), True, False, 0.1, ("recurrent_mask",)),
           ("gru", 0, (2, 3), True, False, 0.1, ("recurrent_mask", "zoneout")),
           ("gru", 0, (2, 3), True, False, 0.1, ("recurrent_mask", "zoneout", "layer_norm"))]


@pytest.mark.parametrize("cell,proj,lengths,reverse,clips,grad_clip,regularizers", OPCHECK,
                         ids=[f"{c}-P{p}-len{'_'.join(map(str, l or ())) or 'none'}-{'rev' if r else 'fwd'}"
                              f"-clips{int(k)}-gradclip{g}" + "".join(f"-{name}" for name in regs)
                              for c, p, l, r, k, g, regs in OPCHECK])
def test_opcheck(cell, proj, lengths, reverse, clips, grad_clip, regularizers, strategy):
    normed = "layer_norm" in regularizers
    if normed and strategy == "step":
        pytest.skip("layer_norm runs in the sequence strategy only (the step strategy refuses it: "
                    "test_layer_norm_refused_on_the_step_strategy)")
    args = _op_arguments(cell, proj, lengths, reverse, clips, grad_clip, masked="recurrent_mask" in regularizers,
                         zoned="zoneout" in regularizers, normed=normed) + (strategy,)
    forward = torch.ops.rnntl_fast.triton_lstm_forward if cell == "lstm" else torch.ops.rnntl_fast.triton_gru_forward
    torch.library.opcheck(forward.default, args)
    # The backward op on its own, fed with the forward's reserve.
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    saved = forward(*plain)
    input = plain[0]
    if cell == "lstm":
        out, h_n, c_n, *reserve = saved
        backward_args = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), input, plain[1],
                         plain[2], plain[5], plain[6], plain[7], plain[8], *plain[9:16], *reserve, *plain[16:21],
                         strategy, [True, True, True, True, proj > 0, True, True] + [normed] * 4)
        torch.library.opcheck(torch.ops.rnntl_fast.triton_lstm_backward.default, backward_args)
    else:
        out, h_n, *reserve = saved
        backward_args = (torch.randn_like(out), torch.randn_like(h_n), input, plain[1], plain[2], plain[5], plain[6],
                         plain[7], plain[8], plain[9], plain[10], *reserve, *plain[11:14], strategy,
                         [True] * 6 + [normed] * 2)
        torch.library.opcheck(torch.ops.rnntl_fast.triton_gru_backward.default, backward_args)


# recurrent_mask (recurrent dropout, docs/semantics.md section 10). H = 20 runs the step
# kernels' K loops over two chunks of h_{t-1} and of the mask.
MASKED_CASES = [
    Case("lstm", T=3, B=2, I=3, H=20),
    Case("lstm", T=4, B=3, I=4, H=6, proj=3, lengths=(2, 4, 3), cell_clip=0.3, proj_clip=0.1, grad_clip=0.05),
    Case("lstm", T=4, B=3, I=4, H=6, reverse=True, grad_clip=0.05, grad_clip_mode="gates",
         frozen=("input", "weight_ih")),
    Case("gru", T=3, B=2, I=3, H=20),
    Case("gru", T=4, B=3, I=4, H=6, lengths=(2, 4, 1), reverse=True),
    Case("gru", T=4, B=3, I=4, H=6, lengths=(3, 1, 4), grad_clip=0.05, grad_clip_mode="state"),
]


def _pass_recurrent_mask(monkeypatch, mask: torch.Tensor) -> None:
    """Every ops.lstm / ops.gru call (those parity.run makes) gets `mask` [B, P] in its input's
    dtype and device, whatever backend it asks for."""
    for name in ("lstm", "gru"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda input, *args, _op=op, **kwargs: _op(
            input, *args, recurrent_mask=mask.to(input.dtype).to(input.device), **kwargs))


@pytest.mark.parametrize("case", MASKED_CASES, ids=lambda c: c.id + "-recurrent_mask")
def test_recurrent_mask_within_error_rule(case, strategy, monkeypatch):
    """Forward results and every gradient with a recurrent mask, against the float64
    reference with the same mask; the baseline of the error rule is the float32 reference
    (torch.nn has no recurrent dropout)."""
    tensors = make_tensors(case)
    _pass_recurrent_mask(monkeypatch, _recurrent_mask(case))
    reference64 = run(case, tensors, torch.float64, "reference")
    baseline = run(case, tensors, torch.float32, "reference")
    fast = run(case, tensors, torch.float32, "triton", device=DEVICE)
    checked = assert_case_matches(case, fast, baseline, reference64, torch.float32)
    assert {"output", "h_n", "grad_weight_hh", "grad_h0"} <= set(checked), checked


MASKED_LOW_PRECISION_CASES = [Case("lstm", T=3, B=2, I=4, H=6, proj=3, lengths=(3, 1), reverse=True),
                              Case("gru", T=3, B=2, I=5, H=7, lengths=(1, 3))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", MASKED_LOW_PRECISION_CASES, ids=lambda c: c.id + "-recurrent_mask")
def test_recurrent_mask_low_precision_within_error_rule(case, dtype, strategy, monkeypatch):
    """The mask arrives in the input dtype and is widened to float32 in the kernels."""
    tensors = make_tensors(case)
    _pass_recurrent_mask(monkeypatch, _recurrent_mask(case))
    reference64 = run(case, tensors, torch.float64, "reference")
    fast = run(case, tensors, dtype, "triton", device=DEVICE)
    assert_case_matches(case, fast, run(case, tensors, dtype, "reference"), reference64, dtype)


# Zoneout of the LSTM and GRU (docs/semantics.md section 10): the cases, tensors and keep
# weights of tests/test_recurrent_regularizers_cpu.py at interpreter sizes. "train": 0/1 draws
# of Bernoulli(0.3) for h and c, "train-h" / "train-c" of one of them, "eval": every keep
# weight 0.3. H = 20 runs the step kernels' second column tile and K chunk, B = 17 two row tiles.
from test_recurrent_regularizers_cpu import _case as _zoned_case  # noqa: E402
from test_recurrent_regularizers_cpu import _case_id as _zoned_case_id  # noqa: E402
from test_recurrent_regularizers_cpu import _tensors as _zoned_tensors  # noqa: E402

ZONEOUT_CASES = [
    _zoned_case("lstm", T=4, B=3, I=4, H=6, mask=False, zoneout="train"),
    _zoned_case("lstm", T=4, B=3, I=4, H=6, proj=3, lengths=(4, 0, 2), clips=True, reverse=True, zoneout="train"),
    _zoned_case("lstm", T=4, B=3, I=4, H=6, grad_clip="state", lengths=(4, 1, 3), zoneout="train"),
    _zoned_case("lstm", T=3, B=2, I=3, H=20, proj=17, grad_clip="gates", reverse=True, mask=False, zoneout="train-h"),
    _zoned_case("lstm", T=4, B=3, I=4, H=6, clips=True, grad_clip="state", mask=False, zoneout="train-c"),
    _zoned_case("lstm", T=3, B=2, I=4, H=6, frozen=("weight_hh", "input"), zoneout="eval"),
    _zoned_case("lstm", T=2, B=17, I=3, H=5, lengths=tuple(i % 3 for i in range(17)), mask=False, zoneout="train"),
    _zoned_case("gru", T=4, B=3, I=4, H=6, mask=False, zoneout="train"),
    _zoned_case("gru", T=3, B=2, I=3, H=20, grad_clip="state", lengths=(3, 1), reverse=True, zoneout="eval"),
    _zoned_case("gru", T=4, B=3, I=4, H=6, grad_clip="gates", lengths=(3, 4, 0), frozen=("weight_ih", "h0"),
                zoneout="train"),
    _zoned_case("gru", T=2, B=17, I=3, H=5, lengths=tuple(i % 3 for i in range(17)), zoneout="train"),
]


LAYER_NORM_LEAVES = ("layer_norm_ih", "layer_norm_hh", "layer_norm_cell_weight", "layer_norm_cell_bias")


def _run_zoned(c, leaves, extras, dtype, backend, device="cpu", grad=True):
    """{name: result or gradient} of one ops.lstm / ops.gru call in `dtype` on `device` with the
    regularizer arguments `extras` (float64, name -> tensor) and, where `leaves` has them, the
    layer-norm terms (LAYER_NORM_LEAVES, leaves with gradients); gradients of the leaves that
    are not frozen (none with grad=False, under torch.no_grad)."""
    fresh = {k: None if v is None else v.to(dtype).to(device, copy=True).requires_grad_(grad and k not in c["frozen"])
             for k, v in leaves.items()}
    options = dict(lengths=c["lengths"], reverse=c["reverse"], backend=backend,
                   grad_clip=0.05 if c["grad_clip"] else None, grad_clip_mode=c["grad_clip"] or "state",
                   **{k: v.to(dtype).to(device) for k, v in extras.items()})
    if "layer_norm_ih" in fresh:
        options["layer_norm"] = ops.LayerNormWeights(*(fresh.get(n) for n in LAYER_NORM_LEAVES))
    with torch.set_grad_enabled(grad):
        if c["cell"] == "lstm":
            clips = dict(cell_clip=0.5, proj_clip=0.3) if c["clips"] else {}
            results = ops.lstm(*(fresh[n] for n in ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                    "weight_hr", "h0", "c0")), **clips, **options)
        else:
            results = ops.gru(*(fresh[n] for n in ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0")),
                              **options)
    named = dict(zip(("output", "h_n", "c_n"), (r.detach().cpu() for r in results)))
    if grad:
        g = torch.Generator().manual_seed(3)
        loss = sum((r * torch.randn(r.shape, generator=g, dtype=torch.float64).to(dtype).to(device)).sum()
                   for r in results)
        wanted = {k: v for k, v in fresh.items() if v is not None and v.requires_grad}
        named.update({f"grad_{k}": v.cpu() for k, v in zip(wanted, torch.autograd.grad(loss, list(wanted.values())))})
    return named


def _assert_zoned_within_error_rule(fast, baseline, reference64, dtype):
    assert fast.keys() == reference64.keys(), (sorted(fast), sorted(reference64))
    for name in reference64:
        assert fast[name].dtype == dtype, f"{name} has dtype {fast[name].dtype}"
        assert_within_error_rule(name, fast[name], baseline[name], reference64[name], dtype)


@pytest.mark.parametrize("case", ZONEOUT_CASES, ids=[_zoned_case_id(c) for c in ZONEOUT_CASES])
def test_zoneout_within_error_rule(case, strategy):
    """Forward results and every gradient with zoneout keep weights (and the recurrent mask
    where the case has it), against the float64 reference by the error rule with the float32
    reference as the baseline (torch.nn has no zoneout). The inference forward (no reserve;
    the step strategy alternates two state slots) must give the training forward's results
    bit for bit."""
    leaves, extras = _zoned_tensors(case)
    reference64 = _run_zoned(case, leaves, extras, torch.float64, "reference")
    baseline = _run_zoned(case, leaves, extras, torch.float32, "reference")
    fast = _run_zoned(case, leaves, extras, torch.float32, "triton", DEVICE)
    _assert_zoned_within_error_rule(fast, baseline, reference64, torch.float32)
    inference = _run_zoned(case, leaves, extras, torch.float32, "triton", DEVICE, grad=False)
    for name, value in inference.items():
        torch.testing.assert_close(value, fast[name], rtol=0, atol=0, msg=name)


def test_zoneout_changes_results(strategy):
    """Keep weights of 1 freeze the state at h0 / c0 (every output row is h0), of 0 give the
    results without zoneout: the kernels do read them."""
    case = _zoned_case("lstm", T=3, B=2, I=3, H=5, proj=2, mask=False, zoneout="train")
    leaves, extras = _zoned_tensors(case)
    frozen = _run_zoned(case, leaves, {k: torch.ones_like(v) for k, v in extras.items()}, torch.float32, "triton",
                        DEVICE, grad=False)
    torch.testing.assert_close(frozen["output"], leaves["h0"].float().expand(3, 2, 2), rtol=0, atol=0)
    torch.testing.assert_close(frozen["c_n"], leaves["c0"].float(), rtol=0, atol=0)
    open_ = _run_zoned(case, leaves, {k: torch.zeros_like(v) for k, v in extras.items()}, torch.float32, "triton",
                       DEVICE, grad=False)
    plain = _run_zoned(case, leaves, {}, torch.float32, "triton", DEVICE, grad=False)
    for name in plain:
        torch.testing.assert_close(open_[name], plain[name], rtol=0, atol=0, msg=name)


ZONEOUT_LOW_PRECISION_CASES = [
    _zoned_case("lstm", T=3, B=2, I=4, H=6, proj=3, lengths=(3, 1), reverse=True, zoneout="train"),
    _zoned_case("gru", T=3, B=2, I=5, H=7, lengths=(1, 3), mask=False, zoneout="eval"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ZONEOUT_LOW_PRECISION_CASES,
                         ids=[_zoned_case_id(c) for c in ZONEOUT_LOW_PRECISION_CASES])
def test_zoneout_low_precision_within_error_rule(case, dtype, strategy):
    """The keep weights arrive in the input dtype and are widened to float32 in the kernels."""
    leaves, extras = _zoned_tensors(case)
    reference64 = _run_zoned(case, leaves, extras, torch.float64, "reference")
    fast = _run_zoned(case, leaves, extras, dtype, "triton", DEVICE)
    _assert_zoned_within_error_rule(fast, _run_zoned(case, leaves, extras, dtype, "reference"), reference64, dtype)


# Layer normalisation (docs/semantics.md section 10): the sequence strategy only (the step
# strategy refuses it, below), so these cases run once. The gains are 1 + N(0, 0.3), the cell
# bias N(0, 0.3); "cell" says which of the LSTM's cell terms are given (None: gain 1, bias 0).
def _normed_case(cell, T, B, I, H, cell_terms=("weight", "bias"), **kwargs):
    return dict(_zoned_case(cell, T, B, I, H, **{"mask": False, **kwargs}), cell_terms=cell_terms)


def _normed_case_id(c):
    terms = "-cell_" + "_".join(c["cell_terms"] or ("none",)) if c["cell"] == "lstm" else ""
    return _zoned_case_id(c) + "-layer_norm" + terms


def _normed_tensors(c, seed=5, tensor_seed=0):
    """_zoned_tensors(c, tensor_seed) with the layer-norm terms (drawn from `seed`) added to the leaves."""
    leaves, extras = _zoned_tensors(c, tensor_seed)
    g = torch.Generator().manual_seed(seed)
    gates = (4 if c["cell"] == "lstm" else 3) * c["H"]
    leaves["layer_norm_ih"] = 1 + 0.3 * torch.randn(gates, generator=g, dtype=torch.float64)
    leaves["layer_norm_hh"] = 1 + 0.3 * torch.randn(gates, generator=g, dtype=torch.float64)
    if c["cell"] == "lstm":
        if "weight" in c["cell_terms"]:
            leaves["layer_norm_cell_weight"] = 1 + 0.3 * torch.randn(c["H"], generator=g, dtype=torch.float64)
        if "bias" in c["cell_terms"]:
            leaves["layer_norm_cell_bias"] = 0.3 * torch.randn(c["H"], generator=g, dtype=torch.float64)
    return leaves, extras


LAYER_NORM_CASES = [
    _normed_case("lstm", T=4, B=3, I=4, H=6),
    _normed_case("lstm", T=4, B=3, I=4, H=6, proj=3, lengths=(4, 0, 2), clips=True, reverse=True, mask=True,
                 zoneout="train"),
    _normed_case("lstm", T=4, B=3, I=4, H=6, grad_clip="state", lengths=(4, 1, 3), cell_terms=()),
    _normed_case("lstm", T=3, B=2, I=3, H=20, proj=17, grad_clip="gates", reverse=True, cell_terms=("weight",),
                 frozen=("weight_hh", "layer_norm_ih")),
    _normed_case("lstm", T=2, B=17, I=3, H=5, lengths=tuple(i % 3 for i in range(17)), zoneout="eval"),
    _normed_case("gru", T=4, B=3, I=4, H=6),
    _normed_case("gru", T=4, B=3, I=4, H=6, lengths=(3, 4, 0), reverse=True, grad_clip="gates", zoneout="eval"),
    _normed_case("gru", T=3, B=2, I=3, H=20, grad_clip="state", mask=True, frozen=("layer_norm_hh", "input")),
    _normed_case("gru", T=2, B=17, I=3, H=5, lengths=tuple(i % 3 for i in range(17)), zoneout="train"),
]


@pytest.fixture
def sequence_strategy(monkeypatch):
    monkeypatch.setenv(config.STRATEGY_ENV, "sequence")


@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=[_normed_case_id(c) for c in LAYER_NORM_CASES])
def test_layer_norm_within_error_rule(case, sequence_strategy):
    """Forward results and every gradient, those of the gains and the cell bias included,
    against the float64 reference by the error rule (the float32 reference as the baseline:
    torch.nn has no layer normalisation); the inference forward bit-equal to the training one."""
    leaves, extras = _normed_tensors(case)
    reference64 = _run_zoned(case, leaves, extras, torch.float64, "reference")
    fast = _run_zoned(case, leaves, extras, torch.float32, "triton", DEVICE)
    assert {f"grad_{n}" for n in LAYER_NORM_LEAVES if n in leaves} - {f"grad_{n}" for n in case["frozen"]} <= set(fast)
    _assert_zoned_within_error_rule(fast, _run_zoned(case, leaves, extras, torch.float32, "reference"), reference64,
                                    torch.float32)
    inference = _run_zoned(case, leaves, extras, torch.float32, "triton", DEVICE, grad=False)
    for name, value in inference.items():
        torch.testing.assert_close(value, fast[name], rtol=0, atol=0, msg=name)


LAYER_NORM_LOW_PRECISION_CASES = [
    _normed_case("lstm", T=3, B=2, I=4, H=6, proj=3, lengths=(3, 1), reverse=True, zoneout="train"),
    _normed_case("gru", T=3, B=2, I=5, H=7, lengths=(1, 3), mask=True),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LAYER_NORM_LOW_PRECISION_CASES,
                         ids=[_normed_case_id(c) for c in LAYER_NORM_LOW_PRECISION_CASES])
def test_layer_norm_low_precision_within_error_rule(case, dtype, sequence_strategy):
    """The gains arrive in the input dtype; the statistics are float32 in the kernels."""
    leaves, extras = _normed_tensors(case)
    reference64 = _run_zoned(case, leaves, extras, torch.float64, "reference")
    fast = _run_zoned(case, leaves, extras, dtype, "triton", DEVICE)
    _assert_zoned_within_error_rule(fast, _run_zoned(case, leaves, extras, dtype, "reference"), reference64, dtype)


def _drawn_normed_case(cell, seed):
    """A layer-normalised case with sizes and options drawn from `seed`: up to 5 steps, 1 to 17
    rows (17: two programs), H from 3 to 32 (the float32 sequence strategy's widest), lengths
    with zeros, either direction, projection, clips, both gradient clips, the recurrent mask,
    zoneout of either kind, any subset of the LSTM's cell terms."""
    rng = random.Random(seed)
    T, B, I, H = rng.randint(1, 5), rng.choice((1, 2, 3, 5, 17)), rng.randint(1, 6), rng.choice((3, 5, 8, 13, 20, 32))
    lstm = cell == "lstm"
    zoneouts = (None, "train", "eval") + (("train-h", "train-c") if lstm else ())
    return _normed_case(
        cell, T, B, I, H, proj=rng.choice((0, rng.randint(1, H))) if lstm and H > 1 else 0,
        lengths=tuple(rng.randint(0, T) for _ in range(B)) if rng.random() < 0.5 else None,
        reverse=rng.random() < 0.5, clips=lstm and rng.random() < 0.3,
        grad_clip=rng.choice((None, None, "state", "gates")), mask=rng.random() < 0.5, zoneout=rng.choice(zoneouts),
        cell_terms=tuple(t for t in ("weight", "bias") if rng.random() < 0.7))


LAYER_NORM_DRAWS = [(cell, seed) for cell in ("lstm", "gru") for seed in range(100, 112)]


@pytest.mark.parametrize("cell,seed", LAYER_NORM_DRAWS, ids=[f"{c}-draw{s}" for c, s in LAYER_NORM_DRAWS])
def test_layer_norm_random_draws_within_error_rule(cell, seed, sequence_strategy):
    """Random sizes, options and tensors (_drawn_normed_case), float32: every result and gradient
    by the error rule, the float32 reference as the baseline."""
    case = _drawn_normed_case(cell, seed)
    leaves, extras = _normed_tensors(case, seed, tensor_seed=seed)
    reference64 = _run_zoned(case, leaves, extras, torch.float64, "reference")
    fast = _run_zoned(case, leaves, extras, torch.float32, "triton", DEVICE)
    _assert_zoned_within_error_rule(fast, _run_zoned(case, leaves, extras, torch.float32, "reference"), reference64,
                                    torch.float32)


LAYER_NORM_HALF_DRAWS = [(cell, dtype, seed) for cell in ("lstm", "gru") for dtype in ("float16", "bfloat16")
                         for seed in range(200, 206)]


@pytest.mark.parametrize("cell,dtype,seed", LAYER_NORM_HALF_DRAWS,
                         ids=[f"{c}-{d}-draw{s}" for c, d, s in LAYER_NORM_HALF_DRAWS])
def test_layer_norm_low_precision_random_draws_within_error_rule(cell, dtype, seed, sequence_strategy):
    """As test_layer_norm_random_draws_within_error_rule in float16 / bfloat16, the reference in
    that dtype as the baseline."""
    dtype = getattr(torch, dtype)
    case = _drawn_normed_case(cell, seed)
    leaves, extras = _normed_tensors(case, seed, tensor_seed=seed)
    reference64 = _run_zoned(case, leaves, extras, torch.float64, "reference")
    fast = _run_zoned(case, leaves, extras, dtype, "triton", DEVICE)
    _assert_zoned_within_error_rule(fast, _run_zoned(case, leaves, extras, dtype, "reference"), reference64, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_refused_on_the_step_strategy(cell, monkeypatch):
    """Forced (strategy='step') or chosen by size (float32 past width 32), the step strategy
    refuses layer_norm with an error naming it, never a silent fallback."""
    case = _normed_case(cell, T=2, B=2, I=3, H=5)
    leaves, extras = _normed_tensors(case)
    monkeypatch.setenv(config.STRATEGY_ENV, "step")
    with pytest.raises(NotImplementedError, match=rf"ops.{cell}: backend 'triton' runs layer_norm in its sequence "
                                                  r"strategy only.*strategy 'step'"):
        _run_zoned(case, leaves, extras, torch.float32, "triton", DEVICE)
    monkeypatch.setenv(config.STRATEGY_ENV, "auto")
    wide = _normed_case(cell, T=2, B=2, I=3, H=40)
    with pytest.raises(NotImplementedError, match="hidden=40, output=40 on strategy 'step'"):
        _run_zoned(wide, *_normed_tensors(wide), torch.float32, "triton", DEVICE)


def test_layer_norm_module_matches_the_reference_backend(sequence_strategy):
    """rnntl_fast.LSTM / GRU(layer_norm=True, backend="triton") against the same module on the
    reference backend: outputs and every parameter's gradient (the layer_norm_* ones included)."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4)
    for cls in (rnntl_fast.LSTM, rnntl_fast.GRU):
        modules = [cls(4, 5, layer_norm=True, bidirectional=True, backend=backend).to(DEVICE)
                   for backend in ("reference", "triton")]
        modules[1].load_state_dict(modules[0].state_dict())
        with torch.no_grad():  # gains other than 1, so that they matter
            for module in modules:
                for name, parameter in module.named_parameters():
                    if name.startswith("layer_norm"):
                        parameter.copy_(torch.linspace(0.5, 1.5, parameter.numel()))
        results = []
        for module in modules:
            out = module(x.to(DEVICE))[0]
            out.square().sum().backward()
            results.append((out.detach().cpu(), {n: p.grad.cpu() for n, p in module.named_parameters()}))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
        assert any(n.startswith("layer_norm") for n in results[0][1])
        for name, grad in results[0][1].items():
            torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_strategy_choice(monkeypatch):
    monkeypatch.delenv(config.STRATEGY_ENV, raising=False)
    half, single = torch.float16, torch.float32
    assert config.choose_strategy(13, 13, single) == "sequence"
    assert config.choose_strategy(32, 20, single) == "sequence"
    assert config.choose_strategy(33, 33, single) == "step"  # float32 weights spill past 32
    assert config.choose_strategy(64, 64, half) == "sequence"
    assert config.choose_strategy(65, 65, torch.bfloat16) == "step"
    assert config.choose_strategy(256, 64, half) == "step"
    assert config.choose_strategy(13, 13, single, "step") == "step"
    monkeypatch.setenv(config.STRATEGY_ENV, "step")
    assert config.choose_strategy(13, 13, single) == "step"
    assert config.choose_strategy(13, 13, single, "sequence") == "sequence"
    with pytest.raises(ValueError, match="supports hidden and output sizes up to"):
        config.choose_strategy(100, 100, half, "sequence")
    monkeypatch.setenv(config.STRATEGY_ENV, "fastest")
    with pytest.raises(ValueError, match="RNNTL_TRITON_STRATEGY"):
        config.choose_strategy(13, 13, single)


def test_strategy_keyword_matches_environment(monkeypatch):
    monkeypatch.delenv(config.STRATEGY_ENV, raising=False)
    x = torch.randn(3, 2, 4, device=DEVICE)
    weights = [torch.randn(shape, device=DEVICE) for shape in ((20, 4), (20, 5), (20,), (20,))]
    args = (x, *weights, None, None, None, None, sequence_options())
    by_sequence = triton_ops.lstm_triton(*args, strategy="sequence")
    by_step = triton_ops.lstm_triton(*args, strategy="step")
    for a, b in zip(by_sequence, by_step):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _count_matmuls(case):
    tensors = make_tensors(case)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:  # host-side op calls
        run(case, tensors, torch.float32, "triton", device=DEVICE)
    return sum(event.count for event in profile.key_averages() if event.key in ("aten::mm", "aten::addmm"))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_frozen_weights_skip_weight_gradient_matmuls(cell, strategy):
    proj = 3 if cell == "lstm" else 0
    full = _count_matmuls(Case(cell, T=2, B=2, I=3, H=5, proj=proj))
    frozen_names = ("weight_ih", "weight_hh") + (("weight_hr",) if proj else ())
    frozen = _count_matmuls(Case(cell, T=2, B=2, I=3, H=5, proj=proj, frozen=frozen_names))
    assert frozen == full - len(frozen_names), (full, frozen)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_without_grad_saves_nothing(cell, strategy):
    args = _op_arguments(cell)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]] + [False, strategy]
    op = torch.ops.rnntl_fast.triton_lstm_forward if cell == "lstm" else torch.ops.rnntl_fast.triton_gru_forward
    results = op(*plain)
    reserve = results[3:] if cell == "lstm" else results[2:]
    assert all(r.numel() == 0 for r in reserve)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_forward_matches_training_forward(cell, strategy):
    """Without grad the forward keeps no reserve (the step strategy then alternates two
    state slots); its results must be those of the training forward."""
    case = Case(cell, T=4, B=3, I=3, H=5, proj=3 if cell == "lstm" else 0, lengths=(2, 4, 1), reverse=True,
                cell_clip=0.5 if cell == "lstm" else None)
    tensors = make_tensors(case)
    training = run(case, tensors, torch.float32, "triton", device=DEVICE)
    with torch.no_grad():
        args = [tensors[n].float().to(DEVICE) if n in tensors else None for n in LEAVES]
        if cell == "lstm":
            inference = ops.lstm(*args, torch.tensor(case.lengths), reverse=True, cell_clip=0.5, backend="triton")
        else:
            inference = ops.gru(*args[:5], args[6], torch.tensor(case.lengths), reverse=True, backend="triton")
    for name, value in zip(("output", "h_n", "c_n"), inference):
        torch.testing.assert_close(value.cpu(), training[name], rtol=0, atol=0)


NONFINITE_CASES = [
    Case("lstm", T=3, B=2, I=3, H=5, lengths=(3, 2)),
    Case("gru", T=3, B=2, I=3, H=5, lengths=(3, 2), reverse=True),
    Case("lstm", T=3, B=2, I=3, H=5, proj=3, cell_clip=0.3, proj_clip=0.2, grad_clip=0.05),
    Case("gru", T=3, B=2, I=3, H=5, grad_clip=0.05, grad_clip_mode="gates"),
]
# (leaf, index, value): one entry of a leaf replaced by a non-finite value, at a valid step
POISONS = [("input", (1, 0, 1), float("inf")), ("input", (1, 1, 0), float("nan")),
           ("weight_ih", (2, 1), float("-inf"))]


def _assert_same_nonfinite_pattern(name, fast, reference):
    """NaN, +inf and -inf at the same places; the finite entries close."""
    reference = reference.to(fast.dtype)
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        mismatch = (kind(fast) != kind(reference)).nonzero().tolist()
        assert not mismatch, f"{name}: {kind.__name__} differs from the float64 reference at {mismatch[:5]}"
    finite = torch.isfinite(reference)
    torch.testing.assert_close(fast[finite], reference[finite], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("poison", POISONS, ids=lambda p: f"{p[0]}{list(p[1])}={p[2]}")
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=lambda c: c.id)
def test_nonfinite_values_propagate_as_in_the_reference(case, poison, strategy):
    """+-inf and NaN in the input or in weight_ih reach the outputs and every gradient
    exactly where they reach them in the float64 reference (sigmoid(-inf) is 0, a NaN
    gradient stays NaN through the clips), forward and backward."""
    leaf, index, value = poison
    tensors = make_tensors(case)
    tensors[leaf] = tensors[leaf].clone()
    tensors[leaf][index] = value
    reference64 = run(case, tensors, torch.float64, "reference")
    fast = run(case, tensors, torch.float32, "triton")
    assert any(not torch.isfinite(v).all() for v in reference64.values() if v is not None), "poison reached nothing"
    for name, expected in reference64.items():
        if expected is not None:
            _assert_same_nonfinite_pattern(name, fast[name], expected)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_nonfinite_input_past_the_lengths_reaches_nothing(cell, strategy):
    """Steps past a row's length are padding: NaN and inf there change no output and no
    gradient (they never enter a product), as in the reference and torch.nn."""
    case = Case(cell, T=4, B=3, I=3, H=5, lengths=(2, 4, 1), reverse=cell == "gru")
    tensors = make_tensors(case)
    clean = run(case, tensors, torch.float32, "triton")
    tensors["input"] = tensors["input"].clone()
    tensors["input"][2:, 0] = float("nan")
    tensors["input"][1:, 2] = float("inf")
    poisoned = run(case, tensors, torch.float32, "triton")
    for name, value in clean.items():
        if value is not None:
            torch.testing.assert_close(poisoned[name], value, rtol=0, atol=0, msg=name)


def test_float64_is_rejected_with_a_clear_error():
    double = dict(dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="supports float32, float16 and bfloat16"):
        ops.gru(torch.randn(2, 1, 3, **double), torch.randn(9, 3, **double), torch.randn(9, 3, **double),
                backend="triton")


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_module_matches_torch_nn(cls, strategy):
    """rnntl_fast.LSTM / GRU with backend="triton": 2 layers, bidirectional, batch_first,
    packed sequence with unsorted lengths, against torch.nn with the same weights."""
    ours_cls = rnntl_fast.LSTM if cls is nn.LSTM else rnntl_fast.GRU
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True)
    if cls is nn.LSTM:
        kwargs["proj_size"] = 3
    torch.manual_seed(0)
    theirs = cls(4, 5, **kwargs).to(DEVICE)
    ours = ours_cls(4, 5, backend="triton", **kwargs).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 4, device=DEVICE)
    lengths = torch.tensor([2, 4, 1])
    outputs, grads = [], []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_(True)
        packed = nn.utils.rnn.pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=False)
        out, state = module(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        states = state if isinstance(state, tuple) else (state,)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), device=DEVICE).reshape(padded.shape)).sum() + sum(
            s.square().sum() for s in states)
        grads.append(torch.autograd.grad(loss, [xi] + list(module.parameters())))
        outputs.append([padded.detach()] + [s.detach() for s in states])
    for a, b in zip(outputs[0], outputs[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_matches_eager():
    """The registered ops trace through their fakes: a model of triton-backed modules
    compiles with fullgraph=True and gives the eager results and gradients."""
    torch._dynamo.reset()
    lstm = rnntl_fast.LSTM(4, 6, num_layers=2, bidirectional=True, grad_clip=1.0, backend="triton").to(DEVICE)
    gru = rnntl_fast.GRU(12, 5, backend="triton").to(DEVICE)

    def model(x):
        y, _ = lstm(x)
        z, h = gru(y)
        return z.square().sum() + h.sum()

    x = torch.randn(5, 2, 4, device=DEVICE, requires_grad=True)
    eager = model(x)
    (eager_grad,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (grad,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_rnntl_fast_imports_without_triton():
    """With triton unimportable, rnntl_fast still imports and runs the cpu / reference
    backends: the triton package is only imported on first use."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, rnntl_fast\n"
        "x = torch.randn(2, 1, 3)\n"
        "out = rnntl_fast.ops.gru(x, torch.randn(12, 3), torch.randn(12, 4), backend='reference')[0]\n"
        "assert out.shape == (2, 1, 4)\n"
        "assert 'rnntl_fast.ops.triton' not in sys.modules and 'triton' not in sys.modules\n"
        "print('ok')\n")
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repository)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


# ---------------------------------------------------------------------------------------
# Elman RNN (docs/semantics.md section 10): the cases and tensors of tests/test_rnn_cpu.py
# ---------------------------------------------------------------------------------------

from test_rnn_cpu import LEAVES as RNN_LEAVES  # noqa: E402
from test_rnn_cpu import NAMES as RNN_NAMES  # noqa: E402
from test_rnn_cpu import Case as RnnCase  # noqa: E402
from test_rnn_cpu import make_tensors as make_rnn_tensors  # noqa: E402


def _run_rnn(case: RnnCase, backend: str, dtype, device="cpu", poison=None, **overrides):
    """[output, h_n, gradients of RNN_LEAVES (None where frozen or absent)] of one ops.rnn call,
    on CPU; the tensors of tests/test_rnn_cpu.py (NaN in the padded steps), moved to `device`.
    poison: (leaf, index, value) to write into one leaf; overrides: RnnCase fields to replace
    (clip=0.0 turns the gradient clip off)."""
    case = case._replace(**overrides)
    leaves, mask, keep = make_rnn_tensors(case, dtype)
    moved = {}
    for name, leaf in leaves.items():
        moved[name] = None if leaf is None else leaf.detach().to(device, copy=True)
        if poison is not None and poison[0] == name:
            moved[name][poison[1]] = poison[2]
        if leaf is not None:
            moved[name].requires_grad_(leaf.requires_grad)
    out, h_n = ops.rnn(*(moved[n] for n in RNN_LEAVES), case.lengths, nonlinearity="relu" if case.relu else "tanh",
                       reverse=case.reverse, grad_clip=case.clip or None, grad_clip_mode=case.clip_mode,
                       recurrent_mask=None if mask is None else mask.to(device),
                       zoneout=None if keep is None else keep.to(device), backend=backend)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype).to(device) for t in (out, h_n)]
    loss = (out * weights[0]).sum() + (h_n * weights[1]).sum()
    wanted = [n for n in RNN_LEAVES if moved[n] is not None and moved[n].requires_grad]
    grads = dict(zip(wanted, torch.autograd.grad(loss, [moved[n] for n in wanted]))) if wanted else {}
    return [t if t is None else t.detach().cpu() for t in [out, h_n] + [grads.get(n) for n in RNN_LEAVES]]


def _assert_rnn_within_error_rule(fast, baseline, reference64, dtype):
    for name, a, b, e in zip(RNN_NAMES, fast, baseline, reference64):
        if e is None:
            assert a is None, f"{name}: a gradient where the reference has none"
            continue
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}"
        assert_within_error_rule(name, a, b, e, dtype)


# H = 20 runs the step kernels' K loops and column tiles over two chunks; B = 17 two row tiles.
RNN_CASES = [
    RnnCase(T=3, B=2, I=3, H=5),
    RnnCase(T=3, B=2, I=3, H=20, relu=True, h0=False),
    RnnCase(T=4, B=3, I=3, H=5, reverse=True, lengths=(2, 4, 0), bias=False),
    RnnCase(T=4, B=3, I=3, H=5, lengths=(3, 1, 4), relu=True, clip=0.05, clip_mode="state", mask=True),
    RnnCase(T=4, B=3, I=3, H=5, lengths=(3, 1, 4), reverse=True, clip=0.05, clip_mode="gates", zoneout="draws"),
    RnnCase(T=3, B=2, I=3, H=20, mask=True, zoneout="fractions", relu=True, reverse=True),
    RnnCase(T=2, B=17, I=3, H=5, lengths=tuple(i % 3 for i in range(17)), mask=True, zoneout="draws"),
    RnnCase(T=3, B=2, I=3, H=5, frozen=("weight_ih", "weight_hh")),
    RnnCase(T=3, B=2, I=3, H=5, lengths=(3, 2), mask=True, zoneout="fractions", frozen=("input", "bias_ih", "h0")),
]


@pytest.mark.parametrize("case", RNN_CASES, ids=lambda c: c.id)
def test_rnn_float32_within_error_rule(case, strategy):
    """Forward results and every gradient against the float64 reference; the baseline of the
    error rule is the float32 reference (torch.nn has no clip, mask or zoneout)."""
    reference64 = _run_rnn(case, "reference", torch.float64)
    fast = _run_rnn(case, "triton", torch.float32, DEVICE)
    _assert_rnn_within_error_rule(fast, _run_rnn(case, "reference", torch.float32), reference64, torch.float32)
    if case.clip:  # the clip binds: the unclipped gradients differ
        unclipped = _run_rnn(case, "triton", torch.float32, DEVICE, clip=0.0)
        differing = [name for name, a, b in zip(RNN_NAMES, fast, unclipped)
                     if name.startswith("grad_") and a is not None and (a - b).abs().max() > 1e-4]
        assert "grad_weight_hh" in differing and "grad_input" in differing, differing


RNN_LOW_PRECISION_CASES = [RnnCase(T=3, B=2, I=4, H=6, lengths=(3, 1), reverse=True, mask=True, zoneout="fractions"),
                           RnnCase(T=3, B=2, I=4, H=6, relu=True, clip=0.05, clip_mode="gates")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", RNN_LOW_PRECISION_CASES, ids=lambda c: c.id)
def test_rnn_low_precision_within_error_rule(case, dtype, strategy):
    """The mask and keep weights arrive in the input dtype and are widened to float32 in the kernels."""
    reference64 = _run_rnn(case, "reference", torch.float64)
    fast = _run_rnn(case, "triton", dtype, DEVICE)
    _assert_rnn_within_error_rule(fast, _run_rnn(case, "reference", dtype), reference64, dtype)


def _rnn_op_arguments(relu, lengths, reverse, grad_clip, mode, masked, zoned):
    """triton_rnn_forward's arguments without the strategy (clip limits as the op takes them, 0 = off)."""
    case = RnnCase(T=3, B=2, I=3, H=5, relu=relu, lengths=lengths, reverse=reverse, mask=masked,
                   zoneout="draws" if zoned else None)
    leaves, mask, keep = make_rnn_tensors(case, torch.float32)
    limits = sequence_options(reverse, grad_clip=grad_clip, grad_clip_mode=mode)
    leaves = [leaves[n].detach().nan_to_num(0.0).to(DEVICE).requires_grad_(True) for n in RNN_LEAVES]
    return (*leaves, torch.tensor(lengths) if lengths else None, None if mask is None else mask.to(DEVICE),
            None if keep is None else keep.to(DEVICE), relu, reverse, limits.state_clip, limits.gate_clip, True)


RNN_OPCHECK = [(False, None, False, None, "state", False, False), (True, (3, 1), True, 0.1, "gates", True, True)]


@pytest.mark.parametrize("relu,lengths,reverse,grad_clip,mode,masked,zoned", RNN_OPCHECK,
                         ids=[f"{'relu' if r else 'tanh'}-len{'_'.join(map(str, l or ())) or 'none'}"
                              f"-{'rev' if v else 'fwd'}-gradclip{g}{m}" + "-recurrent_mask" * k + "-zoneout" * z
                              for r, l, v, g, m, k, z in RNN_OPCHECK])
def test_rnn_opcheck(relu, lengths, reverse, grad_clip, mode, masked, zoned, strategy):
    args = _rnn_op_arguments(relu, lengths, reverse, grad_clip, mode, masked, zoned) + (strategy,)
    forward = torch.ops.rnntl_fast.triton_rnn_forward
    torch.library.opcheck(forward.default, args)
    # The backward op on its own, fed with the forward's reserve.
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, h_n, *reserve = forward(*plain)
    assert reserve[1].numel() == (out.numel() if zoned else 0)  # activations: kept with zoneout only
    backward_args = (torch.randn_like(out), torch.randn_like(h_n), *plain[0:2], plain[2], *plain[5:9], *reserve,
                     *plain[9:13], strategy, [True] * 6)
    torch.library.opcheck(torch.ops.rnntl_fast.triton_rnn_backward.default, backward_args)


def _count_rnn_matmuls(case):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:  # host-side op calls
        _run_rnn(case, "triton", torch.float32, DEVICE)
    return sum(event.count for event in profile.key_averages() if event.key in ("aten::mm", "aten::addmm"))


def test_rnn_frozen_weights_skip_weight_gradient_matmuls(strategy):
    full = _count_rnn_matmuls(RnnCase(T=2, B=2, I=3, H=5))
    frozen = _count_rnn_matmuls(RnnCase(T=2, B=2, I=3, H=5, frozen=("weight_ih", "weight_hh")))
    assert frozen == full - 2, (full, frozen)


def test_rnn_inference_forward_saves_nothing_and_matches_training(strategy):
    """Without grad the forward keeps no reserve (the step strategy then alternates two state
    slots); its results are those of the training forward, bit for bit."""
    args = _rnn_op_arguments(False, (3, 1), True, None, "state", True, True)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]]
    out, h_n, *reserve = torch.ops.rnntl_fast.triton_rnn_forward(*plain, False, strategy)
    assert all(r.numel() == 0 for r in reserve)
    training = torch.ops.rnntl_fast.triton_rnn_forward(*plain, True, strategy)
    assert all(r.numel() for r in training[2:])
    for name, value, expected in zip(("output", "h_n"), (out, h_n), training):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_module_matches_torch_nn(nonlinearity, strategy):
    """rnntl_fast.RNN with backend="triton": 2 layers, bidirectional, batch_first, packed
    sequence with unsorted lengths, against torch.nn.RNN with the same weights."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True, nonlinearity=nonlinearity)
    theirs = nn.RNN(4, 5, **kwargs).to(DEVICE)
    ours = rnntl_fast.RNN(4, 5, backend="triton", **kwargs).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 4, device=DEVICE)
    lengths = torch.tensor([2, 4, 1])
    results = []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_(True)
        packed = nn.utils.rnn.pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=False)
        out, h_n = module(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), device=DEVICE).reshape(padded.shape)).sum() + \
            h_n.square().sum()
        results.append([padded.detach(), h_n.detach(), *torch.autograd.grad(loss, [xi, *module.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


RNN_NONFINITE_CASES = [RnnCase(T=3, B=2, I=3, H=5, lengths=(3, 2), zoneout="fractions"),
                       RnnCase(T=3, B=2, I=3, H=5, relu=True, reverse=True, mask=True, clip=0.05, clip_mode="gates")]


@pytest.mark.parametrize("poison", POISONS, ids=lambda p: f"{p[0]}{list(p[1])}={p[2]}")
@pytest.mark.parametrize("case", RNN_NONFINITE_CASES, ids=lambda c: c.id)
def test_rnn_nonfinite_values_propagate_as_in_the_reference(case, poison, strategy):
    """As test_nonfinite_values_propagate_as_in_the_reference, for the Elman RNN: relu(NaN)
    is NaN and its gradient passes there, tanh(+-inf) is +-1 with derivative exactly 0."""
    reference64 = _run_rnn(case, "reference", torch.float64, poison=poison)
    fast = _run_rnn(case, "triton", torch.float32, DEVICE, poison=poison)
    assert any(not torch.isfinite(v).all() for v in reference64 if v is not None), "poison reached nothing"
    for name, value, expected in zip(RNN_NAMES, fast, reference64):
        if expected is not None:
            _assert_same_nonfinite_pattern(name, value, expected)
