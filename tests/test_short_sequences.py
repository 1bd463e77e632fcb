"""Short sequences on the CPU: the automatic packing rules (docs/cpu.md, "Short sequences").

The rest of the test suite runs with RNNTL_CPU_PACKING=always (tests/conftest.py), so that its
small sequences run the packed kernels and the multi-core loops. Here the default rules run
(RNNTL_CPU_PACKING=auto, read at each op call): a weight is packed only where enough products
follow (a whole-sequence product from 256 rows on; a per-step weight from 8 steps and 16 rows
on, at a batch below 8 only if it fits 1 MiB per thread); below, products read the weights
as they are (at::mm) and the sequence runs a step at a time. Each case must meet the error
rule against the float64 reference (tests/tolerances.py), for every option of the ops, at
sizes on both sides of each threshold; the loop and the products that ran are checked in
torch.profiler's events.
"""
import pytest
import torch

import rnntl_fast
from parity import Case, assert_case_matches, make_tensors, run, threads
from tolerances import assert_within_error_rule

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.rnntl_fast, "lstm_forward"),
                                reason="the compiled extension is not built")


@pytest.fixture(autouse=True)
def _automatic_packing(monkeypatch):
    monkeypatch.setenv("RNNTL_CPU_PACKING", "auto")


# Around the thresholds: T*B rows for a whole-sequence product (256), steps (8) and step rows
# (16) for a per-step weight.
CASES = [
    Case("lstm", T=1, B=1, I=5, H=40),
    Case("lstm", T=1, B=300, I=5, H=24),
    Case("lstm", T=4, B=16, I=6, H=48, lengths=tuple(4 - i % 4 for i in range(16))),
    Case("lstm", T=7, B=3, I=5, H=40, reverse=True),
    Case("lstm", T=8, B=2, I=5, H=33, proj=16, cell_clip=0.5, proj_clip=0.3),
    Case("lstm", T=15, B=1, I=4, H=40, grad_clip=0.05, grad_clip_mode="state"),
    Case("lstm", T=16, B=1, I=4, H=40, grad_clip=0.05, grad_clip_mode="gates", reverse=True),
    Case("lstm", T=3, B=5, I=4, H=36, frozen=("weight_hh", "weight_ih", "input")),
    Case("gru", T=1, B=1, I=5, H=40),
    Case("gru", T=1, B=300, I=5, H=24, bias=False),
    Case("gru", T=4, B=16, I=6, H=48, lengths=tuple(1 + i % 4 for i in range(16)), reverse=True),
    Case("gru", T=8, B=2, I=5, H=33, initial_state=False),
    Case("gru", T=16, B=1, I=4, H=40, grad_clip=0.05, grad_clip_mode="state"),
    Case("gru", T=3, B=5, I=4, H=36, frozen=("weight_hh", "bias_hh")),
]


@pytest.mark.parametrize("thread_count", [1, 2], ids=["1thread", "2threads"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ops_match_reference(case, thread_count):
    tensors = make_tensors(case, seed=5)
    reference64 = run(case, tensors, torch.float64, "reference")
    baseline = run(case, tensors, torch.float32, "reference")
    with threads(thread_count):
        fast = run(case, tensors, torch.float32, "cpu")
    assert assert_case_matches(case, fast, baseline, reference64, torch.float32)


def _module_results(module, x, dtype):
    """Output, h_n (and c_n) and every gradient of a weighted sum of them."""
    module = module.to(dtype)
    module.zero_grad(set_to_none=True)
    x = x.detach().to(dtype).requires_grad_()
    output, state = module(x)
    states = list(state) if isinstance(state, tuple) else [state]
    results = [output] + states
    generator = torch.Generator().manual_seed(1)
    loss = sum((value * torch.rand(value.shape, generator=generator, dtype=torch.float64).to(dtype)).sum()
               for value in results)
    loss.backward()
    return [value.detach() for value in results] + [x.grad] + [p.grad for p in module.parameters()]


# The Elman RNN and the layer-normalised cells: float32 with the automatic rules against the
# same module in float64 (the oracle) and in float32 with every weight packed (the baseline).
MODULE_CASES = [("RNN", {}, 1, 1), ("RNN", {"nonlinearity": "relu"}, 4, 16), ("RNN", {}, 16, 1),
                ("LSTM", {"layer_norm": True}, 1, 1), ("LSTM", {"layer_norm": True, "proj_size": 8}, 8, 2),
                ("GRU", {"layer_norm": True}, 4, 16), ("GRU", {"layer_norm": True}, 16, 1)]


@pytest.mark.parametrize("cell,options,T,B", MODULE_CASES,
                         ids=[f"{c}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'plain'}-T{t}-B{b}"
                              for c, o, t, b in MODULE_CASES])
def test_modules_match_float64(cell, options, T, B, monkeypatch):
    torch.manual_seed(2)
    module = getattr(rnntl_fast, cell)(6, 24, **options)
    x = torch.randn(T, B, 6, dtype=torch.float64)
    expected = _module_results(module.double(), x, torch.float64)
    with threads(2):
        monkeypatch.setenv("RNNTL_CPU_PACKING", "always")
        packed = _module_results(module.float(), x, torch.float32)
        monkeypatch.setenv("RNNTL_CPU_PACKING", "auto")
        automatic = _module_results(module.float(), x, torch.float32)
    for index, (fast, baseline, oracle) in enumerate(zip(automatic, packed, expected)):
        assert_within_error_rule(f"{cell}[{index}]", fast, baseline, oracle, torch.float32)


def _events(case, packing, monkeypatch, training=True):
    """Names of torch.profiler's events of one run of `case` on 2 threads."""
    monkeypatch.setenv("RNNTL_CPU_PACKING", packing)
    tensors = make_tensors(case, seed=0)
    with threads(2), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        if training:
            run(case, tensors, torch.float32, "cpu")
        else:
            with torch.no_grad():
                getattr(rnntl_fast.ops, case.cell)(tensors["input"].float(), tensors["weight_ih"].float(),
                                                    tensors["weight_hh"].float(), backend="cpu")
    return {event.name for event in profile.events()}


def _loops(events, cell):
    return {name for name in events if name.startswith(f"rnntl_fast::{cell}_") and "_steps" in name}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H,loop", [(1, 1, 64, "_steps"), (7, 2, 64, "_steps"), (8, 2, 64, "_steps_rows"),
                                        (15, 1, 64, "_steps"), (16, 1, 64, "_steps_persistent"),
                                        (16, 1, 600, "_steps"), (16, 8, 600, "_steps_persistent")],
                         ids=lambda v: str(v))
def test_automatic_rules_choose_the_loop(cell, T, B, H, loop, monkeypatch):
    """Per-step weights packed (and a multi-core loop) from 8 steps and 16 rows on; at a batch
    below 8 only a W_hh of at most 1 MiB a thread (H = 600: 5.8 MB for the LSTM, 4.3 MB for
    the GRU)."""
    case = Case(cell, T=T, B=B, I=4, H=H)
    loops = _loops(_events(case, "auto", monkeypatch), cell)
    assert loops == {f"rnntl_fast::{cell}_{direction}{loop}" for direction in ("forward", "backward")}, loops


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_short_sequences_read_weights_in_place(cell, monkeypatch):
    """One step of one row: BLAS reads the weights as they are (aten::mm / aten::addmm under the
    op); with RNNTL_CPU_PACKING=always the own kernel's packed products run instead."""
    case = Case(cell, T=1, B=1, I=4, H=64)
    blas = {"aten::mm", "aten::addmm"}
    assert _events(case, "auto", monkeypatch, training=False) & blas
    assert not _events(case, "always", monkeypatch, training=False) & blas
    assert _loops(_events(case, "always", monkeypatch), cell) == {
        f"rnntl_fast::{cell}_{direction}_steps_persistent" for direction in ("forward", "backward")}


def test_never_packs(monkeypatch):
    """RNNTL_CPU_PACKING=never: a step at a time and BLAS products even for a long sequence."""
    case = Case("lstm", T=40, B=16, I=8, H=32)
    events = _events(case, "never", monkeypatch)
    assert _loops(events, "lstm") == {"rnntl_fast::lstm_forward_steps", "rnntl_fast::lstm_backward_steps"}
    tensors = make_tensors(case, seed=0)
    reference64 = run(case, tensors, torch.float64, "reference")
    baseline = run(case, tensors, torch.float32, "reference")
    assert assert_case_matches(case, run(case, tensors, torch.float32, "cpu"), baseline, reference64, torch.float32)


def test_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("RNNTL_CPU_PACKING", "sometimes")
    with pytest.raises(RuntimeError, match="RNNTL_CPU_PACKING must be auto, always or never.*'sometimes'"):
        rnntl_fast.ops.gru(torch.randn(2, 1, 3), torch.randn(12, 3), torch.randn(12, 4), backend="cpu")
