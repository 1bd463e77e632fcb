"""The cpu backend's layer-normalised LSTM and GRU (csrc/cpu/layer_norm_cpu.cpp, the ops
rnntl_fast::layer_norm_{lstm,gru}_{forward,backward}) against the float64 reference loop and
an independent cell loop written here with torch.nn.functional.layer_norm (docs/semantics.md
section 10; error rule: section 7), forward and every gradient, over every option of
rnntl_fast.ops.lstm / gru; the modules with layer_norm=True on the default backend against
backend="reference"."""
import os
import subprocess
import sys
from typing import NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import rnntl_fast
from rnntl_fast import ops
from rnntl_fast.ops import LayerNormWeights
from parity import threads
from tolerances import assert_within_error_rule

pytestmark = pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="rnntl_fast._C is not built")
F64 = torch.float64
GATES = {"lstm": 4, "gru": 3}


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    """Every torch.empty (also inside the kernels) comes back NaN-filled, so an element the
    kernel forgot to write shows up as NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


class Case(NamedTuple):
    cell: str = "lstm"
    T: int = 5
    B: int = 3
    I: int = 4
    H: int = 6
    proj: int = 0                       # LSTM proj_size
    lengths: Optional[Tuple[int, ...]] = None
    reverse: bool = False
    h0: bool = True
    bias: bool = True
    cell_terms: bool = True             # LSTM: pass layer_norm.cell_weight (and cell_bias with bias)
    cell_clip: float = 0.0
    proj_clip: float = 0.0
    clip: float = 0.0                   # grad_clip
    clip_mode: str = "state"
    mask: bool = False                  # recurrent_mask
    zoneout: Optional[str] = None       # "draws" (0/1, training) or "fractions" (evaluation)
    frozen: Tuple[str, ...] = ()        # leaves that do not require grad

    @property
    def id(self) -> str:
        parts = [self.cell, f"T{self.T}-B{self.B}-I{self.I}-H{self.H}"] + [f"proj{self.proj}"] * bool(self.proj)
        parts += ["rev"] * self.reverse
        if self.lengths is not None:
            parts.append("len" + "_".join(map(str, self.lengths)))
        parts += ["noh0"] * (not self.h0) + ["nobias"] * (not self.bias) + ["nocellterms"] * (not self.cell_terms)
        parts += [f"cellclip{self.cell_clip}"] * bool(self.cell_clip)
        parts += [f"projclip{self.proj_clip}"] * bool(self.proj_clip)
        parts += [f"clip{self.clip_mode}{self.clip}"] * bool(self.clip) + ["mask"] * self.mask
        parts += [f"zoneout{self.zoneout}"] * bool(self.zoneout)
        parts += ["frozen_" + "_".join(self.frozen)] * bool(self.frozen)
        return "-".join(parts)


LSTM_LEAVES = ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "h0", "c0", "ln_ih", "ln_hh",
               "ln_cell_weight", "ln_cell_bias")
GRU_LEAVES = ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "ln_ih", "ln_hh")


def leaves_of(case: Case):
    return LSTM_LEAVES if case.cell == "lstm" else GRU_LEAVES


def _round_to(tensor, dtype, rounding):
    """tensor (float64) in dtype: to nearest with rounding 0; else each entry rounded down or
    up at random (generator seeded with `rounding`), so still within one ulp of the draw."""
    nearest = tensor.to(dtype)
    if rounding == 0 or dtype == F64:
        return nearest
    g = torch.Generator().manual_seed(rounding)
    below = torch.where(nearest.double() > tensor, torch.nextafter(nearest, nearest.new_tensor(-float("inf"))), nearest)
    above = torch.where(nearest.double() < tensor, torch.nextafter(nearest, nearest.new_tensor(float("inf"))), nearest)
    return torch.where(torch.rand(tensor.shape, generator=g) < 0.5, below, above)


def make_tensors(case: Case, dtype=F64, seed=0, rounding=0):
    """(leaves by name, recurrent_mask, keep_h, keep_c) in dtype, from one float64 draw; the
    leaves rounded as _round_to(..., rounding) says."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape, scale=0.5: torch.randn(*shape, generator=g, dtype=F64) * scale  # noqa: E731
    T, B, I, H = case.T, case.B, case.I, case.H
    G = GATES[case.cell] * H
    P = case.proj or H
    lstm = case.cell == "lstm"
    leaves = {"input": draw(T, B, I, scale=1.0), "weight_ih": draw(G, I), "weight_hh": draw(G, P),
              "bias_ih": draw(G) if case.bias else None, "bias_hh": draw(G) if case.bias else None,
              "weight_hr": draw(P, H) if case.proj else None, "h0": draw(B, P) if case.h0 else None,
              "c0": draw(B, H) if lstm and case.h0 else None,
              # gains around 1 and a cell bias, so that their gradients and their effect show
              "ln_ih": 1 + draw(G, scale=0.3), "ln_hh": 1 + draw(G, scale=0.3),
              "ln_cell_weight": 1 + draw(H, scale=0.3) if lstm and case.cell_terms else None,
              "ln_cell_bias": draw(H, scale=0.3) if lstm and case.cell_terms and case.bias else None}
    leaves = {k: v for k, v in leaves.items() if k in leaves_of(case)}
    if case.lengths is not None:  # padded steps hold NaN: nothing may read them
        for b, n in enumerate(case.lengths):
            leaves["input"][n:, b] = float("nan")
    mask = (torch.rand(B, P, generator=g, dtype=F64) > 0.3).to(F64) / 0.7 if case.mask else None
    if case.zoneout == "draws":
        keep_h = (torch.rand(T, B, P, generator=g, dtype=F64) < 0.4).to(F64)
        keep_c = (torch.rand(T, B, H, generator=g, dtype=F64) < 0.3).to(F64)
    elif case.zoneout == "fractions":
        keep_h, keep_c = torch.full((T, B, P), 0.3, dtype=F64), torch.full((T, B, H), 0.15, dtype=F64)
    else:
        keep_h = keep_c = None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    leaves = {k: None if v is None else _round_to(v, dtype, rounding) for k, v in leaves.items()}
    for name, t in leaves.items():
        if t is not None and name not in case.frozen:
            t.requires_grad_(True)
    return leaves, cast(mask), cast(keep_h), cast(keep_c)


def _layer_norm_weights(leaves):
    return LayerNormWeights(leaves["ln_ih"], leaves["ln_hh"], leaves.get("ln_cell_weight"), leaves.get("ln_cell_bias"))


def call(case: Case, backend: str, leaves, mask, keep_h, keep_c):
    """The op's results (output, h_n[, c_n]) on `backend`."""
    common = dict(reverse=case.reverse, grad_clip=case.clip or None, grad_clip_mode=case.clip_mode,
                  recurrent_mask=mask, layer_norm=_layer_norm_weights(leaves), backend=backend)
    args = [leaves[n] for n in ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    if case.cell == "lstm":
        return ops.lstm(*args, leaves["weight_hr"], leaves["h0"], leaves["c0"], case.lengths,
                        cell_clip=case.cell_clip or None, proj_clip=case.proj_clip or None, zoneout_h=keep_h,
                        zoneout_c=keep_c, **common)
    return ops.gru(*args, leaves["h0"], case.lengths, zoneout=keep_h, **common)


def _results_and_gradients(case: Case, results, leaves, seed):
    """[results..., gradients of the leaves (None where frozen or absent)] for a fixed random loss."""
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=F64).to(r.dtype)).sum() for r in results)
    names = leaves_of(case)
    wanted = [n for n in names if leaves[n] is not None and leaves[n].requires_grad]
    grads = dict(zip(wanted, torch.autograd.grad(loss, [leaves[n] for n in wanted]))) if wanted else {}
    return [r.detach() for r in results] + [grads.get(n) for n in names]


def run(case: Case, backend: str, dtype=F64, seed=0, rounding=0):
    leaves, mask, keep_h, keep_c = make_tensors(case, dtype, seed, rounding)
    return _results_and_gradients(case, call(case, backend, leaves, mask, keep_h, keep_c), leaves, seed)


def reference_baselines(case: Case, dtype, seed=0):
    """The error rule's baselines (tests/tolerances.py): per result, the reference loop in
    dtype on the inputs rounded to nearest and on three directed roundings. Through these
    recurrences one float32 run's error is one sample of a wide distribution: at
    Case(T=20, B=5, I=8, H=32), seed 11, the reference's float32 gradient errors were 1.9e-5
    with round to nearest and 5.5e-5 to 7.4e-4 with W_hh moved by one ulp at random."""
    runs = [run(case, "reference", dtype, seed, rounding) for rounding in range(4)]
    return [list(results) for results in zip(*runs)]


def names_of(case: Case):
    results = ("output", "h_n", "c_n") if case.cell == "lstm" else ("output", "h_n")
    return results + tuple("grad_" + n for n in leaves_of(case))


# -- an independent cell loop: the equations of docs/semantics.md section 10 written out with
#    torch.nn.functional.layer_norm, whole batch per step, rows past their length kept with
#    torch.where (the reference selects rows instead) --------------------------------------------
def _norm(v, gain, bias=None):
    return F.layer_norm(v, v.shape[-1:], gain, bias, eps=1e-5)


def _clamp_gradient(tensor, limit):
    if limit and tensor.requires_grad:
        tensor.register_hook(lambda grad: grad.clamp(-limit, limit))


def cell_loop(case: Case, leaves, mask, keep_h, keep_c):
    p = leaves
    x = p["input"] if case.lengths is None else p["input"].nan_to_num()  # padded steps are never selected
    steps, batch, _ = x.shape
    lstm = case.cell == "lstm"
    P = case.proj or case.H
    h = p["h0"] if p["h0"] is not None else x.new_zeros(batch, P)
    c = (p["c0"] if p["c0"] is not None else x.new_zeros(batch, case.H)) if lstm else None
    state_clip = case.clip if case.clip_mode == "state" else 0
    gate_clip = case.clip if case.clip_mode == "gates" else 0
    zero_bias = x.new_zeros(GATES[case.cell] * case.H)
    outputs = [None] * steps
    for t in (reversed(range(steps)) if case.reverse else range(steps)):
        valid = torch.ones(batch, 1, dtype=torch.bool) if case.lengths is None else \
            (torch.tensor(case.lengths) > t)[:, None]
        h_in = h * mask if mask is not None else h
        gx = _norm(x[t] @ p["weight_ih"].t(), p["ln_ih"], p["bias_ih"] if case.bias else zero_bias)
        gh = _norm(h_in @ p["weight_hh"].t(), p["ln_hh"], p["bias_hh"] if case.bias else zero_bias)
        if lstm:
            a = gx + gh
            _clamp_gradient(a, gate_clip)
            i, f, g, o = a.chunk(4, 1)
            fresh = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if case.cell_clip:
                fresh = fresh.clamp(-case.cell_clip, case.cell_clip)
            carried = keep_c[t] * c + (1 - keep_c[t]) * fresh if keep_c is not None else fresh
            carried = torch.where(valid, carried, c)
            _clamp_gradient(carried, state_clip)
            read = fresh if keep_c is not None else carried  # h~ reads the cell before zoneout
            h_new = torch.sigmoid(o) * torch.tanh(_norm(read, p["ln_cell_weight"], p["ln_cell_bias"]))
            if p["weight_hr"] is not None:
                h_new = h_new @ p["weight_hr"].t()
            if case.proj_clip:
                h_new = h_new.clamp(-case.proj_clip, case.proj_clip)
            c = carried
        else:
            (x_r, x_z, x_n), (h_r, h_z, h_n) = gx.chunk(3, 1), gh.chunk(3, 1)
            a_r, a_z = x_r + h_r, x_z + h_z
            _clamp_gradient(a_r, gate_clip)
            _clamp_gradient(a_z, gate_clip)
            r, z = torch.sigmoid(a_r), torch.sigmoid(a_z)
            a_n = x_n + r * h_n
            _clamp_gradient(a_n, gate_clip)
            h_new = (1 - z) * torch.tanh(a_n) + z * h
        if keep_h is not None:
            h_new = keep_h[t] * h + (1 - keep_h[t]) * h_new
        h = torch.where(valid, h_new, h)
        _clamp_gradient(h, state_clip)
        outputs[t] = torch.where(valid, h, torch.zeros((), dtype=h.dtype))
    return (torch.stack(outputs), h) + ((c,) if lstm else ())


def run_cell_loop(case: Case, seed=0):
    leaves, mask, keep_h, keep_c = make_tensors(case, F64, seed)
    return _results_and_gradients(case, cell_loop(case, leaves, mask, keep_h, keep_c), leaves, seed)


def assert_all_close(case, fast, expected, rtol=1e-9, atol=1e-11):
    for name, a, e in zip(names_of(case), fast, expected):
        if e is None:
            assert a is None, f"{name}: a gradient where the oracle has none"
            continue
        assert a is not None, f"{name}: no gradient where the oracle has one"
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


LSTM_ONLY = ("proj", "cell_clip", "proj_clip", "cell_terms")


def _both(**kwargs):
    """The case for the LSTM and the GRU."""
    return [Case(cell="lstm", **kwargs), Case(cell="gru", **{k: v for k, v in kwargs.items() if k not in LSTM_ONLY})]


F64_CASES = [
    *_both(),
    Case(T=1, B=1, I=3, H=5),
    *_both(reverse=True, h0=False),
    *_both(T=7, B=4, lengths=(3, 7, 0, 5)),
    *_both(T=7, B=4, lengths=(3, 7, 0, 5), reverse=True),
    Case(T=4, B=3, lengths=(0, 0, 0)),
    Case(proj=3),
    Case(T=7, B=4, proj=4, lengths=(7, 2, 0, 5), reverse=True, cell_clip=0.4, proj_clip=0.15),
    Case(bias=False, cell_terms=False),
    Case(bias=False),
    *_both(clip=0.02, clip_mode="state"),
    *_both(clip=0.02, clip_mode="gates"),
    *_both(mask=True),
    *_both(zoneout="draws"),
    *_both(zoneout="fractions"),
    Case(T=7, B=4, proj=3, lengths=(7, 3, 0, 5), reverse=True, mask=True, zoneout="draws", clip=0.02,
         cell_clip=0.5, proj_clip=0.3),
    Case(T=6, B=3, lengths=(6, 2, 4), mask=True, zoneout="fractions", clip=0.05, clip_mode="gates", bias=False),
    Case(cell="gru", T=7, B=4, lengths=(3, 7, 0, 5), reverse=True, mask=True, zoneout="draws", clip=0.02),
    *_both(frozen=("weight_ih", "weight_hh", "ln_ih")),
    Case(frozen=("bias_ih", "bias_hh", "input", "ln_cell_weight", "ln_cell_bias", "ln_hh")),
    Case(cell="gru", frozen=("bias_ih", "input", "ln_hh", "h0")),
    Case(T=5, B=4, proj=3, lengths=(5, 3, 1, 5), mask=True,
         frozen=("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")),
    # 17 rows and a width ending in a partial panel of the per-step product kernel.
    *_both(T=4, B=17, I=9, H=70, lengths=tuple(range(4, 0, -1)) * 4 + (2,)),
]


@pytest.mark.parametrize("case", F64_CASES, ids=[c.id for c in F64_CASES])
def test_float64_matches_reference(case):
    assert_all_close(case, run(case, "cpu"), run(case, "reference"))


CELL_LOOP_CASES = [c for c in F64_CASES if c.B * c.T < 40 and (c.lengths or c.zoneout or c.clip or c.proj or c.mask)]


@pytest.mark.parametrize("case", CELL_LOOP_CASES, ids=[c.id for c in CELL_LOOP_CASES])
def test_float64_matches_independent_cell_loop(case):
    assert_all_close(case, run(case, "cpu"), run_cell_loop(case), rtol=1e-8, atol=1e-10)


F32_CASES = [Case(T=20, B=5, I=8, H=32),
             Case(T=20, B=5, I=8, H=32, proj=16, reverse=True, lengths=(20, 3, 11, 0, 7), cell_clip=1.0,
                  proj_clip=0.5),
             Case(T=12, B=4, I=8, H=24, mask=True, zoneout="draws", clip=0.1, lengths=(12, 5, 9, 1)),
             Case(cell="gru", T=20, B=5, I=8, H=32, reverse=True, lengths=(20, 3, 11, 0, 7)),
             Case(cell="gru", T=12, B=4, I=8, H=24, mask=True, zoneout="fractions", clip=0.1, clip_mode="gates")]


@pytest.mark.parametrize("case", F32_CASES, ids=[c.id for c in F32_CASES])
def test_float32_within_error_rule(case):
    oracle, baseline = run(case, "reference"), reference_baselines(case, torch.float32)
    fast = run(case, "cpu", torch.float32)
    for name, a, b, e in zip(names_of(case), fast, baseline, oracle):
        if e is not None:
            assert a.dtype == torch.float32
            assert_within_error_rule(name, a, b, e, torch.float32)


def test_library_products_within_error_rule():
    """RNNTL_CPU_GEMM=library (read once per process) moves the float32 products off the own
    kernel onto oneDNN / MKL: the float32 cases again, in a child process. (at::mm, what
    RNNTL_CPU_GEMM=aten picks, is what every float64 case runs.)"""
    child = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                            "-k", "test_float32_within_error_rule"], env=dict(os.environ, RNNTL_CPU_GEMM="library"),
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert f"{len(F32_CASES)} passed" in child.stdout, child.stdout[-2000:]


def test_float32_on_two_threads_equals_one_thread():
    """Rows are split across threads, each row whole: two threads give one thread's results
    (up to the rounding of the library products, which may split their sums by thread)."""
    case = Case(T=6, B=24, I=16, H=64, lengths=tuple(range(6, 0, -1)) * 4, mask=True, zoneout="draws")
    with threads(1):
        one = run(case, "cpu", torch.float32)
    with threads(2):
        two = run(case, "cpu", torch.float32)
    for name, a, b in zip(names_of(case), one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _steps_loops_run(case, dtype):
    """The results of run(case, "cpu", dtype) and the names of the step loops that ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        results = run(case, "cpu", dtype)
    return results, {e.name for e in profile.events() if "_steps" in e.name}


# Fewer rows than threads (the automatic choice) and more (forced), with every option.
PRODUCTS_LOOP_CASES = [
    Case(T=6, B=1, I=8, H=40, mask=True, zoneout="draws"),
    Case(T=7, B=3, I=5, H=48, proj=16, reverse=True, lengths=(7, 2, 5), cell_clip=0.5, proj_clip=0.3, clip=0.05),
    Case(T=5, B=2, I=4, H=36, frozen=("weight_ih", "weight_hh", "input"), clip=0.05, clip_mode="gates"),
    Case(cell="gru", T=6, B=1, I=8, H=40, clip=0.05, clip_mode="gates", zoneout="fractions"),
    Case(cell="gru", T=7, B=3, I=5, H=70, lengths=(7, 0, 4), reverse=True, mask=True, zoneout="draws"),
]


@pytest.mark.parametrize("thread_count", [2, 3], ids=["2threads", "3threads"])
@pytest.mark.parametrize("case", PRODUCTS_LOOP_CASES, ids=[c.id for c in PRODUCTS_LOOP_CASES])
def test_products_loop_matches_one_thread_and_reference(case, thread_count, monkeypatch):
    """The products loop (RNNTL_CPU_ENGINE=units for these ops, docs/cpu.md): one worker runs
    the steps while the team splits each step's recurrent product by columns. Within the
    error rule of the float64 reference, and equal to the one-thread loop up to the rounding
    of the whole-sequence library products (the step products are the same sums)."""
    monkeypatch.setenv("RNNTL_CPU_ENGINE", "units")
    oracle, baseline = run(case, "reference"), reference_baselines(case, torch.float32)
    with threads(1):
        one, loops_one = _steps_loops_run(case, torch.float32)
    with threads(thread_count):
        many, loops_many = _steps_loops_run(case, torch.float32)
    assert loops_one and all(name.endswith("_steps") for name in loops_one), loops_one
    assert loops_many and all(name.endswith("_steps_products") for name in loops_many), loops_many
    for name, a, b, e, o in zip(names_of(case), many, baseline, oracle, one):
        if e is not None:
            assert_within_error_rule(name, a, b, e, torch.float32)
            torch.testing.assert_close(a, o, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("batch,hidden,loop", [(1, 64, "_steps_products"), (2, 64, "_steps_rows"),
                                               (1, 8, "_steps"), (8, 600, "_steps")], ids=lambda v: str(v))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_automatic_choice_of_the_step_loop(cell, batch, hidden, loop, monkeypatch):
    """At two threads: the row split where every thread gets a row and W_hh fits a core's L2,
    the products loop for fewer rows than threads (where W_hh has at least two 16-column
    slices), else the step-at-a-time loop."""
    monkeypatch.delenv("RNNTL_CPU_ENGINE", raising=False)
    with threads(2):
        _, loops = _steps_loops_run(Case(cell, T=2, B=batch, I=4, H=hidden), torch.float32)
    assert loops and all(name.endswith(loop) for name in loops), loops


@pytest.mark.parametrize("cell,dtype", [("lstm", torch.float16), ("gru", torch.bfloat16)],
                         ids=["lstm-float16", "gru-bfloat16"])
def test_half_dtypes_run_widened(cell, dtype):
    case = Case(cell=cell, T=6, B=3, I=4, H=8, lengths=(6, 2, 4), mask=True, zoneout="fractions")
    oracle, baseline, fast = run(case, "reference"), reference_baselines(case, dtype), run(case, "cpu", dtype)
    for name, a, b, e in zip(names_of(case), fast, baseline, oracle):
        if e is not None:
            assert a.dtype == dtype
            assert_within_error_rule(name, a, b, e, dtype)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_empty_batch(cell):
    case = Case(cell=cell, B=0, h0=False, zoneout="fractions")
    for name, a, e in zip(names_of(case), run(case, "cpu"), run(case, "reference")):
        assert (a is None) == (e is None), name
        if a is not None:
            assert a.shape == e.shape, name
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_steps_give_zero_output_and_no_nan(cell):
    case = Case(cell=cell, T=6, B=3, lengths=(2, 6, 0), zoneout="draws", mask=True)
    results = run(case, "cpu")
    out, grads = results[0], results[len(names_of(case)) - len(leaves_of(case)):]
    assert bool((out[2:, 0] == 0).all()) and bool((out[:, 2] == 0).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
    assert bool((grads[0][2:, 0] == 0).all())  # dL/dx of padded steps: zero, not NaN


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradcheck_every_option(cell):
    lstm = cell == "lstm"
    case = Case(cell=cell, T=3, B=2, I=2, H=3, proj=2 if lstm else 0, lengths=(3, 2), mask=True, zoneout="fractions",
                reverse=True, cell_clip=2.0 if lstm else 0.0)
    leaves, mask, keep_h, keep_c = make_tensors(case)
    leaves["input"] = leaves["input"].nan_to_num().detach().requires_grad_(True)
    names = [n for n in leaves_of(case) if leaves[n] is not None]

    def fn(*tensors):
        given = dict(leaves, **dict(zip(names, tensors)))
        return call(case._replace(lengths=torch.tensor(case.lengths)), "cpu", given, mask, keep_h, keep_c)

    assert torch.autograd.gradcheck(fn, tuple(leaves[n] for n in names), eps=1e-6, atol=1e-7)


# -- the ops themselves ----------------------------------------------------------------------
def _lstm_op_arguments(save=True):
    case = Case(T=3, B=2, I=3, H=4, proj=3, lengths=(3, 1), mask=True, zoneout="fractions")
    p, mask, keep_h, keep_c = make_tensors(case)
    p["input"] = p["input"].nan_to_num().detach().requires_grad_(True)
    return (p["input"], p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], p["weight_hr"], p["h0"], p["c0"],
            torch.tensor(case.lengths), mask, keep_h, keep_c, p["ln_ih"], p["ln_hh"], p["ln_cell_weight"],
            p["ln_cell_bias"], False, 1.0, 0.5, 0.0, 0.1, save)


def _gru_op_arguments(save=True):
    case = Case(cell="gru", T=3, B=2, I=3, H=4, lengths=(3, 1), mask=True, zoneout="fractions")
    p, mask, keep, _ = make_tensors(case)
    p["input"] = p["input"].nan_to_num().detach().requires_grad_(True)
    return (p["input"], p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], p["h0"],
            torch.tensor(case.lengths), mask, keep, p["ln_ih"], p["ln_hh"], True, 0.1, 0.0, save)


def _detached(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def _lstm_backward_arguments(mask):
    args = _detached(_lstm_op_arguments())
    out, h_n, c_n, *reserve = torch.ops.rnntl_fast.layer_norm_lstm_forward(*args)
    forward_tensors = [args[n] for n in (0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)]
    return (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), *forward_tensors, out, *reserve,
            *args[16:21], mask)


def _gru_backward_arguments(mask):
    args = _detached(_gru_op_arguments())
    out, h_n, *reserve = torch.ops.rnntl_fast.layer_norm_gru_forward(*args)
    forward_tensors = [args[n] for n in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)]
    return (torch.randn_like(out), torch.randn_like(h_n), *forward_tensors, out, *reserve, *args[11:14], mask)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck(cell):
    forward_args = _lstm_op_arguments() if cell == "lstm" else _gru_op_arguments()
    ops_ = torch.ops.rnntl_fast
    forward = ops_.layer_norm_lstm_forward if cell == "lstm" else ops_.layer_norm_gru_forward
    backward = ops_.layer_norm_lstm_backward if cell == "lstm" else ops_.layer_norm_gru_backward
    torch.library.opcheck(forward.default, forward_args)
    torch.library.opcheck(forward.default, _detached(forward_args[:-1]) + [False])  # no reserve
    outputs = 11 if cell == "lstm" else 8
    backward_args = (_lstm_backward_arguments if cell == "lstm" else _gru_backward_arguments)([True] * outputs)
    torch.library.opcheck(backward.default, backward_args)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backward_computes_only_the_wanted_gradients(cell):
    """An output_mask entry that is off comes back empty (a frozen weight costs no product);
    the entries that are on equal those of the all-on call."""
    outputs = 11 if cell == "lstm" else 8
    arguments = _lstm_backward_arguments if cell == "lstm" else _gru_backward_arguments
    backward = torch.ops.rnntl_fast.layer_norm_lstm_backward if cell == "lstm" else \
        torch.ops.rnntl_fast.layer_norm_gru_backward
    torch.manual_seed(0)
    full = backward(*arguments([True] * outputs))
    for wanted in range(outputs):
        mask = [n == wanted for n in range(outputs)]
        torch.manual_seed(0)
        partial = backward(*arguments(mask))
        for n, (a, b) in enumerate(zip(partial, full)):
            if n == wanted:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
            else:
                assert a.numel() == 0, f"gradient {n} computed though only {wanted} was asked for"


def test_frozen_weights_ask_for_no_gradient(monkeypatch):
    """requires_grad=False on the weights reaches the backward op as output_mask entries that are off."""
    masks = []
    op = torch.ops.rnntl_fast.layer_norm_lstm_backward

    class Spy:
        def __call__(self, *args):
            masks.append(list(args[-1]))
            return op(*args)

    monkeypatch.setattr(torch.ops.rnntl_fast, "layer_norm_lstm_backward", Spy())
    case = Case(proj=3, frozen=("weight_ih", "weight_hh", "weight_hr", "ln_ih", "ln_cell_bias", "bias_ih", "bias_hh"))
    grads = run(case, "cpu")[3:]
    assert masks == [[True, False, False, False, False, True, True, False, True, True, False]]
    assert [g is not None for g in grads] == [n not in case.frozen for n in LSTM_LEAVES]


# -- the modules -----------------------------------------------------------------------------
MODULES = [("lstm", dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=3, zoneout=(0.2, 0.1),
                         recurrent_dropout=0.3, grad_clip=0.5)),
           ("lstm", dict(num_layers=2, bias=False, cell_clip=0.8, grad_clip=0.05, grad_clip_mode="gates")),
           ("gru", dict(num_layers=2, bidirectional=True, batch_first=True, zoneout=0.2, recurrent_dropout=0.3,
                        weight_drop=0.3))]


def _module_pair(cell, config):
    make = rnntl_fast.LSTM if cell == "lstm" else rnntl_fast.GRU
    torch.manual_seed(0)
    fast = make(4, 6, layer_norm=True, dtype=F64, **config)
    reference = make(4, 6, layer_norm=True, dtype=F64, backend="reference", **config)
    reference.load_state_dict(fast.state_dict())
    with torch.no_grad():  # gains and cell bias away from their initial 1 and 0
        for module in (fast, reference):
            torch.manual_seed(1)
            for name, p in module.named_parameters():
                if name.startswith("layer_norm"):
                    p.add_(torch.randn_like(p) * 0.3)
    return fast, reference


def _module_run(module, x, lengths, packed, seed):
    batch_first = module.batch_first
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)  # the same training draws on both sides
    if packed:
        out, state = module(pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False))
        out = out.data
    else:
        out, state = module(x, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    g = torch.Generator().manual_seed(5)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=F64)).sum() for r in (out,) + states)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, [x] + params)
    return [out.detach(), *(s.detach() for s in states), *grads]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("cell,config", MODULES, ids=["lstm-bidir-proj-zoneout", "lstm-nobias-clips", "gru-bidir"])
def test_module_default_backend_matches_reference(cell, config, packed, training):
    fast, reference = _module_pair(cell, config)
    fast.train(training)
    reference.train(training)
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 2, 0, 4]) if not packed else torch.tensor([5, 2, 1, 4])
    shape = (4, 5, 4) if fast.batch_first else (5, 4, 4)
    x = torch.randn(*shape, generator=g, dtype=F64)
    names = ["output", "h_n", "c_n"][:3 if cell == "lstm" else 2] + ["grad_x"] + [n for n, _ in fast.named_parameters()]
    expected = _module_run(reference, x, lengths, packed, seed=7)
    for name, a, e in zip(names, _module_run(fast, x, lengths, packed, seed=7), expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


def test_module_default_backend_is_the_cpu_kernel(monkeypatch):
    """The default backend of a CPU module with layer_norm=True runs the fused op."""
    calls = []
    op = torch.ops.rnntl_fast.layer_norm_gru_forward

    def spy(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(torch.ops.rnntl_fast, "layer_norm_gru_forward", spy)
    rnntl_fast.GRU(4, 6, num_layers=2, layer_norm=True)(torch.randn(3, 2, 4))
    assert len(calls) == 2
