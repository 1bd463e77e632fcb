"""Recurrent dropout and zoneout (the ops' `recurrent_mask` and zoneout keep weights,
docs/semantics.md section 10) in the CPU LSTM and GRU kernels, against the float64 reference.

float64: the step-at-a-time loop, to 1e-10. float32: at 1 thread (the step-at-a-time loop)
and at 2 threads on each multi-core loop (the row split and the unit split, each forced with
RNNTL_CPU_ENGINE and checked to have really run), within the error
rule of tests/tolerances.py with the float32 reference as the baseline. Every case draws
its mask as the modules do (Bernoulli(1 - p) / (1 - p), p = 0.3) and its zoneout keep
weights as training does (0/1 draws of Bernoulli(z)) or as evaluation does (every entry z),
and covers forward results and the gradients of every input that requires one.
"""
import pytest
import torch

import rnntl_fast
from rnntl_fast import ops
from parity import threads
from tolerances import assert_within_error_rule

pytestmark = pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="the compiled extension is not built")

F64 = torch.float64
GATES = {"lstm": 4, "gru": 3}


def _case(cell, T, B, I, H, proj=0, lengths=None, reverse=False, clips=False, grad_clip=None, frozen=(), mask=True,
          zoneout=None):
    """zoneout: None, "train" (0/1 keep weights, z = 0.3) or "eval" (every keep weight z = 0.3);
    for the LSTM of both h and c, or of one with "train-h" / "train-c"."""
    return dict(cell=cell, T=T, B=B, I=I, H=H, proj=proj, lengths=lengths, reverse=reverse, clips=clips,
                grad_clip=grad_clip, frozen=frozen, mask=mask, zoneout=zoneout)


def _case_id(c):
    parts = [c["cell"], f"T{c['T']}-B{c['B']}-I{c['I']}-H{c['H']}", "rev" if c["reverse"] else "fwd"]
    parts += [f"proj{c['proj']}"] * bool(c["proj"]) + ["lengths"] * (c["lengths"] is not None)
    parts += ["clips"] * c["clips"] + [f"gradclip_{c['grad_clip']}"] * bool(c["grad_clip"])
    parts += [f"frozen_{'_'.join(c['frozen'])}"] * bool(c["frozen"])
    parts += ["recurrent_mask"] * c["mask"] + [f"zoneout_{c['zoneout']}"] * bool(c["zoneout"])
    return "-".join(parts)


# H >= 33 so that two threads can run the unit split (at least two 16-unit slices).
CASES = [
    _case("lstm", T=7, B=3, I=5, H=40),
    _case("lstm", T=9, B=4, I=6, H=48, lengths=(9, 5, 2, 7), reverse=True),
    _case("lstm", T=6, B=3, I=5, H=48, proj=24, lengths=(6, 0, 4), clips=True),
    _case("lstm", T=7, B=3, I=4, H=40, grad_clip="state", lengths=(7, 4, 1)),
    _case("lstm", T=7, B=3, I=4, H=40, proj=20, grad_clip="gates", reverse=True),
    _case("lstm", T=6, B=2, I=4, H=36, frozen=("weight_hh", "input")),
    _case("gru", T=7, B=3, I=5, H=40),
    _case("gru", T=9, B=4, I=6, H=48, lengths=(9, 5, 2, 7), reverse=True),
    _case("gru", T=7, B=3, I=4, H=40, grad_clip="state", lengths=(7, 4, 1)),
    _case("gru", T=7, B=3, I=4, H=40, grad_clip="gates", reverse=True, lengths=(3, 7, 0)),
    _case("gru", T=6, B=2, I=4, H=36, frozen=("weight_ih", "h0")),
    # zoneout, alone and with the mask
    _case("lstm", T=7, B=3, I=5, H=40, mask=False, zoneout="train"),
    _case("lstm", T=9, B=4, I=6, H=48, lengths=(9, 5, 2, 7), reverse=True, zoneout="train"),
    _case("lstm", T=6, B=3, I=5, H=48, proj=24, lengths=(6, 0, 4), clips=True, zoneout="train"),
    _case("lstm", T=7, B=3, I=4, H=40, grad_clip="state", lengths=(7, 4, 1), zoneout="train"),
    _case("lstm", T=7, B=3, I=4, H=40, proj=20, grad_clip="gates", reverse=True, mask=False, zoneout="train-h"),
    _case("lstm", T=6, B=2, I=4, H=36, clips=True, grad_clip="state", mask=False, zoneout="train-c"),
    _case("lstm", T=6, B=2, I=4, H=36, frozen=("weight_hh", "input"), zoneout="eval"),
    _case("gru", T=7, B=3, I=5, H=40, mask=False, zoneout="train"),
    _case("gru", T=9, B=4, I=6, H=48, lengths=(9, 5, 2, 7), reverse=True, zoneout="train"),
    _case("gru", T=7, B=3, I=4, H=40, grad_clip="state", lengths=(7, 4, 1), zoneout="train"),
    _case("gru", T=7, B=3, I=4, H=40, grad_clip="gates", reverse=True, lengths=(3, 7, 0), mask=False, zoneout="eval"),
]


def _tensors(c, seed=0):
    """Leaves in float64 (name -> tensor) and the regularizer arguments of the op (name -> float64 tensor)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.4: torch.randn(*shape, generator=g, dtype=F64) * scale  # noqa: E731
    G, H = GATES[c["cell"]] * c["H"], c["H"]
    P = c["proj"] or H
    leaves = dict(input=rand(c["T"], c["B"], c["I"], scale=1.0), weight_ih=rand(G, c["I"]), weight_hh=rand(G, P),
                  bias_ih=rand(G), bias_hh=rand(G), h0=rand(c["B"], P))
    if c["cell"] == "lstm":
        leaves.update(weight_hr=rand(P, H) if c["proj"] else None, c0=rand(c["B"], H))
    extras = {}
    if c["mask"]:
        extras["recurrent_mask"] = torch.bernoulli(torch.full((c["B"], P), 0.7, dtype=F64), generator=g) / 0.7
    if c["zoneout"]:
        draw = lambda width: (torch.full((c["T"], c["B"], width), 0.3, dtype=F64) if c["zoneout"] == "eval"  # noqa: E731
                              else torch.bernoulli(torch.full((c["T"], c["B"], width), 0.3, dtype=F64), generator=g))
        if c["cell"] == "gru":
            extras["zoneout"] = draw(H)
        else:
            if not c["zoneout"].endswith("-c"):
                extras["zoneout_h"] = draw(P)
            if not c["zoneout"].endswith("-h"):
                extras["zoneout_c"] = draw(H)
    return leaves, extras


def _run(c, leaves, extras, dtype, backend):
    """(results, gradients) of one op call in `dtype`; gradients of the leaves that are not frozen."""
    fresh = {k: None if v is None else v.to(dtype).requires_grad_(k not in c["frozen"]) for k, v in leaves.items()}
    options = dict(lengths=c["lengths"], reverse=c["reverse"], backend=backend,
                   grad_clip=0.05 if c["grad_clip"] else None, grad_clip_mode=c["grad_clip"] or "state",
                   **{k: v.to(dtype) for k, v in extras.items()})
    if c["cell"] == "lstm":
        clips = dict(cell_clip=0.5, proj_clip=0.3) if c["clips"] else {}
        results = ops.lstm(fresh["input"], fresh["weight_ih"], fresh["weight_hh"], fresh["bias_ih"], fresh["bias_hh"],
                           fresh["weight_hr"], fresh["h0"], fresh["c0"], **clips, **options)
    else:
        results = ops.gru(fresh["input"], fresh["weight_ih"], fresh["weight_hh"], fresh["bias_ih"], fresh["bias_hh"],
                          fresh["h0"], **options)
    g = torch.Generator().manual_seed(3)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=F64).to(dtype)).sum() for r in results)
    wanted = {k: v for k, v in fresh.items() if v is not None and v.requires_grad}
    grads = dict(zip(wanted, torch.autograd.grad(loss, list(wanted.values()))))
    return [r.detach() for r in results], grads


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_float64_matches_the_reference(case):
    leaves, extras = _tensors(case)
    expected, expected_grads = _run(case, leaves, extras, F64, "reference")
    with threads(1):
        actual, actual_grads = _run(case, leaves, extras, F64, "cpu")
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name)
    assert actual_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(actual_grads[name], expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


# (threads, RNNTL_CPU_ENGINE, the profiler suffix of the loop that must run)
LOOPS = {"1thread-stepwise": (1, "auto", "_steps"), "2threads-rows": (2, "rows", "_steps_rows"),
         "2threads-units": (2, "units", "_steps_persistent")}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_float32_within_the_error_rule(case, loop, monkeypatch):
    thread_count, engine, want = LOOPS[loop]
    monkeypatch.setenv("RNNTL_CPU_ENGINE", engine)
    leaves, extras = _tensors(case)
    reference64, reference64_grads = _run(case, leaves, extras, F64, "reference")
    baseline, baseline_grads = _run(case, leaves, extras, torch.float32, "reference")
    with threads(thread_count), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        actual, actual_grads = _run(case, leaves, extras, torch.float32, "cpu")
    loops = {e.name for e in profile.events() if e.name.endswith(("_steps", "_steps_rows", "_steps_persistent"))}
    assert loops and all(name.endswith(want) for name in loops), f"loops that ran: {sorted(loops)}"
    for name, a, b, r in zip(("output", "h_n", "c_n"), actual, baseline, reference64):
        assert_within_error_rule(name, a, b, r, torch.float32)
    for name in reference64_grads:
        assert_within_error_rule(f"grad {name}", actual_grads[name], baseline_grads[name], reference64_grads[name],
                                 torch.float32)


def test_mask_of_ones_is_bitwise_no_mask():
    """A mask of ones changes nothing: the kernels multiply by it, nothing else differs."""
    case = CASES[1]
    leaves, extras = _tensors(case)
    ones = {"recurrent_mask": torch.ones_like(extras["recurrent_mask"])}
    plain, plain_grads = _run(case, leaves, ones, torch.float32, "cpu")
    options = dict(case, frozen=())
    without, without_grads = _run_without_mask(options, leaves)
    for a, b in zip(plain, without):
        assert torch.equal(a, b)
    for name in without_grads:
        assert torch.equal(plain_grads[name], without_grads[name]), name


def _run_without_mask(c, leaves):
    fresh = {k: None if v is None else v.float().requires_grad_() for k, v in leaves.items()}
    results = ops.lstm(fresh["input"], fresh["weight_ih"], fresh["weight_hh"], fresh["bias_ih"], fresh["bias_hh"],
                       fresh["weight_hr"], fresh["h0"], fresh["c0"], lengths=c["lengths"], reverse=c["reverse"],
                       backend="cpu")
    g = torch.Generator().manual_seed(3)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=F64).float()).sum() for r in results)
    wanted = {k: v for k, v in fresh.items() if v is not None}
    return [r.detach() for r in results], dict(zip(wanted, torch.autograd.grad(loss, list(wanted.values()))))


REGULARIZERS = {"recurrent_dropout": dict(recurrent_dropout=0.3), "zoneout": dict(zoneout=0.2),
                "both": dict(recurrent_dropout=0.3, zoneout=0.2)}


@pytest.mark.parametrize("regularizer", sorted(REGULARIZERS))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_module_on_cpu_matches_the_reference_module(cell, regularizer):
    """The module draws the same masks and zoneout keep weights from the same seed on either
    backend (2-layer, bidirectional, packed lengths, float64)."""
    make = rnntl_fast.LSTM if cell == "lstm" else rnntl_fast.GRU
    torch.manual_seed(0)
    options = REGULARIZERS[regularizer]
    fast = make(5, 40, num_layers=2, bidirectional=True, backend="cpu", dtype=F64, **options)
    slow = make(5, 40, num_layers=2, bidirectional=True, backend="reference", dtype=F64, **options)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(6, 3, 5, dtype=F64)
    lengths = torch.tensor([6, 2, 4])
    results = []
    for module in (fast, slow):
        torch.manual_seed(11)
        module.zero_grad()
        out = rnntl_fast.nn.run_with_lengths(module, x, lengths)[0]
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in module.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("thread_count", [1, 2], ids=["1thread-stepwise", "2threads-multicore"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_limits(cell, thread_count):
    """Keep weights of 0 give the plain op bit for bit (forward and gradients); keep weights
    of 1 hold the initial state at every valid step."""
    case = next(c for c in CASES if c["cell"] == cell and c["zoneout"] == "train" and c["lengths"])
    leaves, extras = _tensors(case)
    keep = {k: v for k, v in extras.items() if k.startswith("zoneout")}
    with threads(thread_count):
        plain, plain_grads = _run(case, leaves, {}, torch.float32, "cpu")
        zero, zero_grads = _run(case, leaves, {k: torch.zeros_like(v) for k, v in keep.items()}, torch.float32, "cpu")
        held, _ = _run(case, leaves, {k: torch.ones_like(v) for k, v in keep.items()}, torch.float32, "cpu")
    for a, b in zip(zero, plain):
        assert torch.equal(a, b)
    for name in plain_grads:
        assert torch.equal(zero_grads[name], plain_grads[name]), name
    h0 = leaves["h0"].float()
    assert torch.equal(held[1], h0)
    if cell == "lstm":
        assert torch.equal(held[2], leaves["c0"].float())
    valid = (torch.arange(case["T"])[:, None] < torch.tensor(case["lengths"])[None, :])[:, :, None]
    assert torch.equal(held[0], torch.where(valid, h0.expand_as(held[0]), torch.zeros(())))
