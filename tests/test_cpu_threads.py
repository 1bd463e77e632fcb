"""The CPU kernels at 1, 2 and 3 threads (3 oversubscribes a 2-core machine).

At one thread the step-at-a-time loop runs; at two or more one of the two multi-core loops
(docs/cpu.md, "Multi-core engine"): the row split (each thread runs every step for its own
batch rows) or the unit split of csrc/cpu/persistent_cpu.h (each thread owns a slice of the
hidden units; one barrier per step). Each multi-core loop, forced with RNNTL_CPU_ENGINE
(read at every op call), must give the results of the float64 reference within the error
rule (tests/tolerances.py), the one-thread run being the baseline, for every option the ops
have: lengths, reverse, proj_size, clips, frozen weights; each case also checks that the
loop it asked for really ran.
"""
import os
import subprocess
import sys

import pytest
import torch

from parity import Case, assert_case_matches, make_tensors, run, threads

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.rnntl_fast, "lstm_forward"),
                                reason="the compiled extension is not built")

CASES = [
    Case("lstm", T=7, B=3, I=5, H=40),
    Case("lstm", T=9, B=4, I=6, H=64, lengths=(9, 5, 2, 7), reverse=True),
    Case("lstm", T=8, B=4, I=5, H=33, lengths=(3, 8, 0, 6)),
    Case("lstm", T=6, B=3, I=5, H=48, proj=24, lengths=(6, 2, 4), cell_clip=0.5, proj_clip=0.3),
    Case("lstm", T=6, B=3, I=5, H=48, proj=20, reverse=True, initial_state=False),
    Case("lstm", T=7, B=3, I=4, H=40, grad_clip=0.05, grad_clip_mode="state", lengths=(7, 4, 1)),
    Case("lstm", T=7, B=3, I=4, H=40, grad_clip=0.05, grad_clip_mode="gates", reverse=True),
    Case("lstm", T=6, B=2, I=4, H=36, frozen=("weight_hh", "weight_ih", "input")),
    Case("gru", T=7, B=3, I=5, H=40),
    Case("gru", T=9, B=4, I=6, H=100, lengths=(9, 5, 2, 7), reverse=True),
    Case("gru", T=8, B=4, I=5, H=48, lengths=(3, 8, 0, 6), bias=False),
    Case("gru", T=7, B=3, I=4, H=40, grad_clip=0.05, grad_clip_mode="state", lengths=(7, 4, 1)),
    Case("gru", T=7, B=3, I=4, H=40, grad_clip=0.05, grad_clip_mode="gates", initial_state=False),
    Case("gru", T=6, B=2, I=4, H=36, frozen=("weight_hh", "bias_hh")),
]


def run_recording_engine(case, tensors, dtype):
    """(results, names of the step loops that ran)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        results = run(case, tensors, dtype, backend="cpu")
    loops = {event.name for event in profile.events() if event.name.endswith(LOOP_SUFFIXES)}
    return results, loops


# The profiler names of each step loop: rnntl_fast::{cell}_{forward,backward}_steps{suffix}.
LOOP_NAMES = {"stepwise": "_steps", "rows": "_steps_rows", "units": "_steps_persistent"}
LOOP_SUFFIXES = tuple(LOOP_NAMES.values())


def loop_names(cell, engine):
    return {f"rnntl_fast::{cell}_{direction}{LOOP_NAMES[engine]}" for direction in ("forward", "backward")}


# 3 threads (more workers than cores) on the cases with lengths, a projection or clips.
THREAD_CASES = [(case, 2) for case in CASES] + [(case, 3) for case in CASES if case.lengths or case.proj
                                                  or case.grad_clip]


@pytest.mark.parametrize("engine", ["rows", "units"])
@pytest.mark.parametrize("case,thread_count", THREAD_CASES, ids=lambda v: v.id if isinstance(v, Case) else f"threads{v}")
def test_threads_match_one_thread_and_reference(case, thread_count, engine, monkeypatch):
    tensors = make_tensors(case, seed=3)
    reference64 = run(case, tensors, torch.float64, backend="reference")
    monkeypatch.setenv("RNNTL_CPU_ENGINE", engine)
    with threads(1):
        one_thread, loops_one = run_recording_engine(case, tensors, torch.float32)
    with threads(thread_count):
        many_threads, loops_many = run_recording_engine(case, tensors, torch.float32)
    assert loops_one == loop_names(case.cell, "stepwise"), loops_one
    assert loops_many == loop_names(case.cell, engine), loops_many
    assert assert_case_matches(case, many_threads, one_thread, reference64, torch.float32)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("batch,hidden,engine", [(1, 64, "units"), (4, 64, "rows"), (16, 128, "rows"),
                                                 (8, 512, "units"), (64, 600, "stepwise")],
                         ids=lambda v: str(v))
def test_automatic_choice_of_the_step_loop(cell, batch, hidden, engine, monkeypatch):
    """The automatic choice (docs/cpu.md, "Multi-core engine"): the row split where every
    thread gets a row and W_hh fits a core's L2 (1 MiB), else the unit split where its W_hh
    slices suit the own product kernel, else the step-at-a-time loop."""
    monkeypatch.delenv("RNNTL_CPU_ENGINE", raising=False)
    case = Case(cell, T=2, B=batch, I=4, H=hidden)
    with threads(2):
        _, loops = run_recording_engine(case, make_tensors(case, seed=0), torch.float32)
    assert loops == loop_names(cell, engine), loops


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_many_short_sequences_in_a_row(cell):
    """Hundreds of sequences of 1-3 steps back to back: each starts and ends a parallel region
    and meets its barrier once per step; every result equals the one-thread loop's."""
    module_class = __import__("rnntl_fast").LSTM if cell == "lstm" else __import__("rnntl_fast").GRU
    torch.manual_seed(0)
    module = module_class(6, 48, bidirectional=True)
    inputs = [torch.randn(1 + i % 3, 1 + i % 4, 6) for i in range(300)]

    def outputs():
        results = []
        for x in inputs:
            x = x.clone().requires_grad_()
            output, _ = module(x)
            output.square().sum().backward()
            results.append((output.detach(), x.grad))
        return results

    with threads(1):
        expected = outputs()
    with threads(2):
        actual = outputs()
    for (out1, grad1), (out2, grad2) in zip(expected, actual):
        torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad2, grad1, rtol=1e-5, atol=1e-6)


def _engine_probe(environment):
    code = ("import torch, rnntl_fast; torch.set_num_threads(2); m = rnntl_fast.LSTM(4, 64)\n"
            "with torch.profiler.profile() as p: m(torch.randn(3, 2, 4))\n"
            "print(sorted(e.name for e in p.events() if e.name.startswith('rnntl_fast::lstm_forward_steps')))")
    env = {**os.environ, **environment}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("value,loop", [("stepwise", "_steps"), ("rows", "_steps_rows"),
                                        ("units", "_steps_persistent"), ("auto", "_steps_rows")])
def test_engine_variable_selects_the_step_loop(value, loop):
    result = _engine_probe({"RNNTL_CPU_ENGINE": value})
    assert result.returncode == 0, result.stderr
    assert f"['rnntl_fast::lstm_forward{loop}']" in result.stdout


def test_engine_variable_rejects_unknown_values():
    result = _engine_probe({"RNNTL_CPU_ENGINE": "fastest"})
    assert result.returncode != 0
    assert "RNNTL_CPU_ENGINE must be auto, stepwise, rows or units" in result.stderr


# Modules whose every option reaches the row split: lengths, reverse (bidirectional),
# proj_size with clips, layer norm, the regularizers (in training, from one seed).
ROW_SPLIT_MODULES = {
    "lstm-proj-clips-bidir": lambda: __import__("rnntl_fast").LSTM(5, 40, proj_size=24, bidirectional=True,
                                                                   cell_clip=0.8, proj_clip=0.6),
    "lstm-zoneout-dropout": lambda: __import__("rnntl_fast").LSTM(5, 40, zoneout=0.2, recurrent_dropout=0.3,
                                                                  grad_clip=0.05, grad_clip_mode="state"),
    "lstm-layer-norm-proj": lambda: __import__("rnntl_fast").LSTM(5, 40, proj_size=20, layer_norm=True, zoneout=0.1),
    "gru-bidir-dropout": lambda: __import__("rnntl_fast").GRU(5, 40, bidirectional=True, recurrent_dropout=0.3),
    "gru-layer-norm-zoneout": lambda: __import__("rnntl_fast").GRU(5, 40, layer_norm=True, zoneout=0.2),
    "rnn-relu-bidir-zoneout": lambda: __import__("rnntl_fast").RNN(5, 40, nonlinearity="relu", bidirectional=True,
                                                                   zoneout=0.2),
}


@pytest.mark.parametrize("thread_count", [2, 3])
@pytest.mark.parametrize("name", ROW_SPLIT_MODULES)
def test_row_split_equals_the_step_at_a_time_loop_bit_for_bit(name, thread_count, monkeypatch):
    """A row's products and pointwise math are the same in both loops (the own product kernel
    sums each result row in one order whatever the row count), so the row split must give the
    step-at-a-time loop's results exactly, with lengths, in training mode (masks from one seed)."""
    torch.manual_seed(0)
    module = ROW_SPLIT_MODULES[name]().train()
    x = torch.randn(9, 5, 5)
    lengths = torch.tensor([9, 4, 9, 1, 6])

    def outputs(engine):
        monkeypatch.setenv("RNNTL_CPU_ENGINE", engine)
        module.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        with threads(thread_count), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            output, _ = module(xi, lengths=lengths)
            (output * torch.linspace(-1, 1, output.shape[-1])).sum().backward()
        loops = {e.name for e in p.events() if e.name.endswith(LOOP_SUFFIXES)}
        grads = [xi.grad] + [param.grad for param in module.parameters()]
        return [output.detach()] + grads, loops

    stepwise, loops_stepwise = outputs("stepwise")
    rows, loops_rows = outputs("rows")
    assert loops_stepwise and all(name.endswith("_steps") for name in loops_stepwise), loops_stepwise
    assert loops_rows and all(name.endswith("_steps_rows") for name in loops_rows), loops_rows
    for index, (a, b) in enumerate(zip(rows, stepwise)):
        assert torch.equal(a, b), f"result {index}: max difference {(a - b).abs().max().item():.3e}"
