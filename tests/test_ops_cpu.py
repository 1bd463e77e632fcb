"""The cpu backend's ops against the float64 reference and torch.nn (error rule: docs/semantics.md section 7)."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import rnntl_fast
from rnntl_fast import ops
from parity import LEAVES, Case, assert_case_matches, make_tensors, run, run_torch_nn, torch_nn_expressible
from tolerances import assert_within_error_rule

pytestmark = pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="rnntl_fast._C is not built")


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    """Every torch.empty (also inside the kernels) comes back NaN-filled, so an output
    element the kernel forgot to write shows up as NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def _cases():
    cases = []
    for cell in ("lstm", "gru"):
        cases += [
            Case(cell),
            Case(cell, T=1, B=1, I=3, H=5),
            Case(cell, T=9, B=4, I=7, H=13),
            Case(cell, reverse=True),
            Case(cell, initial_state=False),
            Case(cell, bias=False),
            Case(cell, T=7, B=4, lengths=(3, 7, 1, 5)),
            Case(cell, T=7, B=4, lengths=(3, 7, 1, 5), reverse=True),
            Case(cell, T=6, B=3, lengths=(6, 0, 2), initial_state=True),
            Case(cell, grad_clip=0.05, grad_clip_mode="state"),
            Case(cell, grad_clip=0.05, grad_clip_mode="gates"),
            Case(cell, T=7, B=4, lengths=(3, 7, 1, 5), reverse=True, grad_clip=0.05),
            Case(cell, T=7, B=4, lengths=(3, 7, 1, 5), grad_clip=0.05, grad_clip_mode="gates"),
            Case(cell, frozen=("weight_ih", "weight_hh")),
            Case(cell, frozen=("bias_ih", "bias_hh", "input")),
            # Sizes aimed at the per-step product kernel (csrc/cpu/small_gemm_cpu.cpp): 17
            # rows (row blocks 6 + 6 + 5), gate widths that end in a partial 16-column panel,
            # a backward depth 4H > 256 (two depth chunks), and lengths that take the active
            # rows through every count from 8 down to 1 (incl. the 1- and 2-row paths).
            Case(cell, T=4, B=17, I=9, H=70),
            Case(cell, T=6, B=8, I=6, H=33, lengths=(6, 5, 5, 4, 3, 2, 2, 1), reverse=True),
            Case(cell, T=5, B=2, I=5, H=19, lengths=(5, 2)),
            # With lengths the whole-sequence buffers hold only the valid rows: none at all,
            # and frozen weights / input over a partly valid batch.
            Case(cell, T=4, B=3, lengths=(0, 0, 0), initial_state=True),
            Case(cell, T=7, B=4, lengths=(3, 7, 1, 5), frozen=("weight_ih", "weight_hh")),
            Case(cell, T=7, B=4, lengths=(3, 7, 1, 5), reverse=True, frozen=("input",)),
            # A per-step weight over 1 MiB at batch 64: the per-step products run on MKL's
            # packed GEMM (Intel CPUs; the backward's W_hh^T packed in place from W_hh) or
            # oneDNN (others), not on the own kernel.
            Case(cell, T=3, B=64, I=16, H=520, lengths=(3,) * 40 + (2,) * 20 + (0,) * 4, reverse=cell == "gru"),
        ]
    cases += [
        Case("lstm", proj=3),
        Case("lstm", proj=3, reverse=True, lengths=(2, 5, 4)),
        Case("lstm", T=9, B=4, I=7, H=13, proj=5, initial_state=False),
        Case("lstm", cell_clip=0.3),
        Case("lstm", proj_clip=0.2),
        Case("lstm", proj=3, cell_clip=0.3, proj_clip=0.1, lengths=(2, 5, 4), reverse=True),
        Case("lstm", proj=3, cell_clip=0.3, proj_clip=0.1, grad_clip=0.02),
        Case("lstm", proj=3, grad_clip=0.02, grad_clip_mode="gates", lengths=(5, 1, 3)),
        Case("lstm", proj=3, frozen=("weight_hr",)),
        Case("lstm", proj=3, frozen=("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
        Case("lstm", T=5, B=7, I=8, H=40, proj=17, lengths=(5, 4, 4, 3, 2, 1, 5)),
        Case("lstm", T=3, B=64, I=16, H=520, proj=300),  # W_hh^T [300, 2080] packed in place by MKL (Intel)
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cpu_float32_within_error_rule(case):
    tensors = make_tensors(case)
    reference64 = run(case, tensors, torch.float64, "reference")
    fast = run(case, tensors, torch.float32, "cpu")
    if torch_nn_expressible(case):
        baseline = run_torch_nn(case, tensors, torch.float32)
    else:  # torch.nn has no clipping: the reference loop in float32 is the baseline
        baseline = run(case, tensors, torch.float32, "reference")
    checked = assert_case_matches(case, fast, baseline, reference64, torch.float32)
    assert "output" in checked and "h_n" in checked


@pytest.mark.parametrize("choice", ["library", "aten"])
def test_library_products_within_error_rule(choice):
    """RNNTL_CPU_GEMM (read once per process) moves the float32 products off the own kernel
    onto oneDNN / MKL (library) or at::mm (aten); those paths must pass the same error rule,
    so the float32 cases above run again in a child process with the variable set."""
    env = dict(os.environ, RNNTL_CPU_GEMM=choice)
    child = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                            "-k", "test_cpu_float32_within_error_rule"], env=env, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " failed" not in child.stdout, child.stdout[-2000:]
    # ... and the child really ran without the own whole-sequence kernel.
    probe = ("import torch, rnntl_fast\n"
             "m = rnntl_fast.LSTM(8, 16)\n"
             "with torch.profiler.profile() as p:\n"
             "    m(torch.randn(5, 3, 8, requires_grad=True))[0].sum().backward()\n"
             "print(sorted({e.key for e in p.key_averages()}))\n")
    events = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert "rnntl_fast::lstm_forward" in events and "rnntl_fast::sequence_gemm" not in events, events


def test_unknown_cpu_gemm_choice_is_a_clear_error():
    """A misspelt RNNTL_CPU_GEMM must not silently mean the automatic choice."""
    probe = "import torch, rnntl_fast\nrnntl_fast.LSTM(3, 4)(torch.randn(2, 1, 3))\n"
    child = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, RNNTL_CPU_GEMM="libary"),
                           capture_output=True, text=True)
    assert child.returncode != 0
    assert "RNNTL_CPU_GEMM must be auto, aten or library" in child.stderr and "'libary'" in child.stderr, child.stderr


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cpu_float64_matches_reference(case):
    tensors = make_tensors(case)
    reference64 = run(case, tensors, torch.float64, "reference")
    fast = run(case, tensors, torch.float64, "cpu")
    for name, expected in reference64.items():
        if expected is None:
            assert fast[name] is None, name
        else:
            torch.testing.assert_close(fast[name], expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", [c for c in CASES if torch_nn_expressible(c)][:6], ids=lambda c: c.id)
def test_torch_nn_runner_agrees_with_reference(case):
    """Guards the test harness itself: torch.nn in float64 equals the reference loop."""
    tensors = make_tensors(case)
    reference64 = run(case, tensors, torch.float64, "reference")
    nn64 = run_torch_nn(case, tensors, torch.float64)
    for name, expected in reference64.items():
        if expected is not None:
            torch.testing.assert_close(nn64[name], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if c.grad_clip], ids=lambda c: c.id)
def test_grad_clip_changes_gradients(case):
    """The clipped gradients differ from the unclipped ones (the clip binds) and the cpu
    backend's clipped gradients equal the reference's."""
    tensors = make_tensors(case)
    clipped = run(case, tensors, torch.float64, "cpu")
    unclipped = run(case, tensors, torch.float64, "cpu", grad_clip=None)
    reference = run(case, tensors, torch.float64, "reference")
    differing = [name for name in clipped if name.startswith("grad_") and clipped[name] is not None
                 and (clipped[name] - unclipped[name]).abs().max() > 1e-6]
    assert "grad_weight_hh" in differing and "grad_input" in differing, differing
    for name in differing:
        torch.testing.assert_close(clipped[name], reference[name], rtol=1e-10, atol=1e-10)


def _small_double_inputs(cell, proj=0, lengths=None, with_states=True):
    case = Case(cell, T=3, B=2, I=3, H=4, proj=proj, lengths=lengths, initial_state=with_states)
    tensors = make_tensors(case)
    return case, [tensors[n].clone().requires_grad_(True) if n in tensors else None for n in LEAVES]


def _fixed_regularizers(cell, proj, steps=3, batch=2, hidden=4):
    """A recurrent mask and zoneout keep weights (0/1 draws and fractions), fixed by a seed."""
    g = torch.Generator().manual_seed(5)
    width = proj or hidden
    keep = lambda size: torch.bernoulli(torch.full((steps, batch, size), 0.4, dtype=torch.float64),  # noqa: E731
                                        generator=g) * torch.rand(steps, batch, size, generator=g, dtype=torch.float64)
    extras = {"recurrent_mask": torch.bernoulli(torch.full((batch, width), 0.7, dtype=torch.float64), generator=g) / 0.7}
    if cell == "lstm":
        return dict(extras, zoneout_h=keep(width), zoneout_c=keep(hidden))
    return dict(extras, zoneout=keep(hidden))


GRADCHECK = [("lstm", 0, None, {}), ("lstm", 2, (3, 1), {"reverse": True}),
             ("lstm", 0, (2, 3), {"cell_clip": 0.4, "proj_clip": 0.3}), ("gru", 0, None, {}),
             ("gru", 0, (1, 3), {"reverse": True}),
             ("lstm", 2, (3, 1), {"reverse": True, "proj_clip": 0.3, "regularizers": True}),
             ("gru", 0, (1, 3), {"regularizers": True})]


@pytest.mark.parametrize("cell,proj,lengths,options", GRADCHECK,
                         ids=[f"{c}-P{p}-len{l}-{'+'.join(o) or 'plain'}" for c, p, l, o in GRADCHECK])
def test_gradcheck_float64(cell, proj, lengths, options):
    options = dict(options)
    if options.pop("regularizers", False):  # recurrent mask and zoneout, fixed
        options.update(_fixed_regularizers(cell, proj))
    case, leaves = _small_double_inputs(cell, proj, lengths)
    input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0 = leaves
    length_tensor = torch.tensor(lengths) if lengths else None
    if cell == "lstm":
        fn = lambda *a: ops.lstm(*a, length_tensor, backend="cpu", **options)  # noqa: E731
        args = (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0)
    else:
        fn = lambda *a: ops.gru(*a, length_tensor, backend="cpu", **options)  # noqa: E731
        args = (input, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def _opcheck_args(cell, proj=0, lengths=None, clip=None, masked=False, zoneout=False):
    case, leaves = _small_double_inputs(cell, proj, lengths)
    input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0 = leaves
    length_tensor = torch.tensor(lengths) if lengths else None
    width = proj or weight_hh.shape[1]
    # A recurrent-dropout mask as the modules draw it (p = 0.5: entries 0 or 2).
    mask = torch.bernoulli(torch.full((input.shape[1], width), 0.5, dtype=input.dtype)) * 2 if masked else None
    # Zoneout keep weights as drawn in training (z = 0.3: entries 0 or 1).
    keep = (lambda size: torch.bernoulli(torch.full((input.shape[0], input.shape[1], size), 0.3,
                                                    dtype=input.dtype))) if zoneout else (lambda size: None)
    hidden = weight_hh.shape[0] // (4 if cell == "lstm" else 3)
    if cell == "lstm":
        return (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, length_tensor, mask, keep(width),
                keep(hidden), False, 0.5, 0.4, clip, 0.0, True)
    return (input, weight_ih, weight_hh, bias_ih, bias_hh, h0, length_tensor, mask, keep(hidden), True, 0.0, clip,
            True)


OPCHECK = [("lstm", 0, None, 0.0, False, False), ("lstm", 2, (3, 1), 0.1, False, False),
           ("gru", 0, None, 0.0, False, False), ("gru", 0, (2, 3), 0.1, False, False),
           ("lstm", 2, (3, 1), 0.1, True, False), ("gru", 0, (2, 3), 0.0, True, False),
           ("lstm", 2, (3, 1), 0.1, True, True), ("lstm", 0, None, 0.0, False, True), ("gru", 0, (2, 3), 0.1, True, True)]


@pytest.mark.parametrize("cell,proj,lengths,clip,masked,zoneout", OPCHECK,
                         ids=[f"{c}-P{p}-len{l}-clip{g}{'-recurrent_mask' if m else ''}{'-zoneout' if z else ''}"
                              for c, p, l, g, m, z in OPCHECK])
def test_opcheck(cell, proj, lengths, clip, masked, zoneout):
    op = torch.ops.rnntl_fast.lstm_forward.default if cell == "lstm" else torch.ops.rnntl_fast.gru_forward.default
    args = _opcheck_args(cell, proj, lengths, clip, masked, zoneout)
    torch.library.opcheck(op, args)
    # The backward op on its own, with the forward's saved outputs.
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    saved = op(*args)
    input = args[0]
    if cell == "lstm":
        out, h_n, c_n, gates, cells, pre, carried = saved
        bargs = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), input, args[1], args[2],
                 args[5], args[6], args[7], args[8], args[9], args[10], args[11], out, gates, cells, pre, carried, False,
                 0.5, 0.4, clip, 0.0,
            [True, True, True, True, proj > 0, True, True])
        torch.library.opcheck(torch.ops.rnntl_fast.lstm_backward.default, bargs)
    else:
        out, h_n, gates, hidden_n = saved
        bargs = (torch.randn_like(out), torch.randn_like(h_n), input, args[1], args[2], args[5], args[6], args[7],
                 args[8], out, gates, hidden_n, True, 0.0, clip, [True] * 6)
        torch.library.opcheck(torch.ops.rnntl_fast.gru_backward.default, bargs)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_op_with_state_and_gate_clip_together_matches_reference(cell):
    """The op contract takes the two backward limits separately (docs/semantics.md section 3):
    both at once are the reference's two hooks at once, tight enough that both bind."""
    from rnntl_fast.ops.native import gru_native, lstm_native
    from rnntl_fast.ops.options import SequenceOptions

    options = SequenceOptions(reverse=True, state_clip=0.05, gate_clip=0.02)
    case, leaves = _small_double_inputs(cell, 0, (3, 1))
    lengths = torch.tensor([3, 1])
    input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0 = leaves
    if cell == "lstm":
        args = (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths)
        fast = lstm_native(*args, options)
        expected = ops.lstm_reference(*args, **options._asdict())
    else:
        args = (input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths)
        fast = gru_native(*args, options)
        expected = ops.gru_reference(*args, reverse=True, state_clip=0.05, gate_clip=0.02)
    leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    weights = [torch.randn_like(t) * 10 for t in expected]  # large upstream gradients: the clips bind
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(fast, weights)), leaves)
    want = torch.autograd.grad(sum((t * w).sum() for t, w in zip(expected, weights)), leaves)
    unclipped = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ops.lstm(*args, backend="reference")
                                                                         if cell == "lstm" else
                                                                         ops.gru(*args, backend="reference"),
                                                                         weights)), leaves)
    assert any(not torch.allclose(a, b) for a, b in zip(want, unclipped)), "the clips did not bind"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode,expected", [("state", (0.5, 0.0)), ("gates", (0.0, 0.5))])
def test_public_grad_clip_becomes_two_limits_once(mode, expected):
    from rnntl_fast.ops.options import sequence_options

    options = sequence_options(True, cell_clip=None, proj_clip=2, grad_clip=0.5, grad_clip_mode=mode)
    assert (options.state_clip, options.gate_clip) == expected
    assert options.reverse is True and options.cell_clip == 0.0 and options.proj_clip == 2.0
    assert sequence_options() == (False, 0.0, 0.0, 0.0, 0.0)


class TinyTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnntl_fast.LSTM(4, 6, num_layers=2, bidirectional=True, grad_clip=1.0)
        self.gru = rnntl_fast.GRU(12, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        z, h = self.gru(y)
        return self.head(z) + h.sum()


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TinyTagger()
    x = torch.randn(5, 2, 4, requires_grad=True)
    eager = model(x)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


# The whole-sequence products as the CPU kernels name them in profiles (docs/cpu.md).
MATMUL_EVENTS = ("rnntl_fast::input_projection", "rnntl_fast::input_gradient", "rnntl_fast::weight_gradient")


def _count_backward_matmuls(case):
    tensors = make_tensors(case)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run(case, tensors, torch.float32, "cpu")
    return sum(event.count for event in profile.key_averages() if event.key in MATMUL_EVENTS)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_frozen_weights_skip_weight_gradient_gemms(cell):
    """With every weight frozen only the forward's input projection and dL/dx remain; with the
    input frozen too (only h0/c0 need a gradient) only the forward's."""
    proj = 3 if cell == "lstm" else 0
    weights = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_hr",) if proj else ())
    full = _count_backward_matmuls(Case(cell, proj=proj))
    frozen = _count_backward_matmuls(Case(cell, proj=proj, frozen=weights))
    input_frozen = _count_backward_matmuls(Case(cell, proj=proj, frozen=weights + ("input",)))
    assert (frozen, input_frozen) == (2, 1), (full, frozen, input_frozen)
    assert full > frozen


def test_double_backward_raises_instead_of_silently_wrong():
    module = rnntl_fast.LSTM(3, 4)
    x = torch.randn(2, 1, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x)[0].sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("module", [
    pytest.param(lambda: rnntl_fast.LSTM(3, 4, proj_size=2), id="lstm-proj"),
    pytest.param(lambda: rnntl_fast.GRU(3, 4), id="gru"),
    pytest.param(lambda: rnntl_fast.RNN(3, 4, nonlinearity="relu"), id="rnn-relu"),
    pytest.param(lambda: rnntl_fast.LSTM(3, 4, layer_norm=True), id="lstm-layer_norm"),
    pytest.param(lambda: rnntl_fast.GRU(3, 4, layer_norm=True), id="gru-layer_norm"),
])
def test_native_autograd_kernel_skips_fill_defaults(module, monkeypatch):
    """autograd.register_autograd's kernel (the native ops' schemas have no defaults) never calls
    torch's per-call fill_defaults, which costs more than the op at small sizes; the
    gradients are those of the same call without the patch."""
    module = module()
    x = torch.randn(5, 2, 3, requires_grad=True)
    out = module(x)[0]
    expected = torch.autograd.grad(out.sum(), [x, *module.parameters()])

    def refuse(*args):
        raise AssertionError("fill_defaults called")
    monkeypatch.setattr(torch._library.utils, "fill_defaults", refuse)
    out = module(x)[0]
    for got, want in zip(torch.autograd.grad(out.sum(), [x, *module.parameters()]), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backward_works_in_eval_mode_and_under_no_grad_forward_saves_nothing():
    module = rnntl_fast.LSTM(3, 4).eval()
    x = torch.randn(2, 1, 3, requires_grad=True)
    out, _ = module(x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        results = torch.ops.rnntl_fast.lstm_forward(x, module.weight_ih_l0, module.weight_hh_l0, None, None, None,
                                                    None, None, None, None, None, None, False, 0.0, 0.0, 0.0, 0.0,
                                                    False)
    assert all(r.numel() == 0 for r in results[3:])


# ---------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, never a crash or garbage.
# ---------------------------------------------------------------------------------------
def _lstm_args(T=3, B=2, I=4, H=5, dtype=torch.float32):
    return dict(input=torch.randn(T, B, I, dtype=dtype), weight_ih=torch.randn(4 * H, I, dtype=dtype),
                weight_hh=torch.randn(4 * H, H, dtype=dtype))


BAD_INPUTS = [
    ("rank", lambda a: a.update(input=a["input"][0]), ValueError, "input must have shape \\[T, B, I\\]"),
    ("features", lambda a: a.update(input=torch.randn(3, 2, 6)), ValueError, "input_size=4"),
    ("weight_hh", lambda a: a.update(weight_hh=torch.randn(20, 4)), ValueError, "weight_hh must have shape"),
    ("h0-shape", lambda a: a.update(h0=torch.randn(3, 5)), ValueError, "h0 must have shape \\[2, 5\\]"),
    ("c0-dtype", lambda a: a.update(c0=torch.randn(2, 5, dtype=torch.float64)), TypeError, "c0 has dtype"),
    ("bias-shape", lambda a: a.update(bias_ih=torch.randn(7)), ValueError, "bias_ih must have shape"),
    ("weight-dtype", lambda a: a.update(weight_ih=a["weight_ih"].double()), TypeError, "weight_ih has dtype"),
    ("lengths-negative", lambda a: a.update(lengths=[2, -1]), ValueError, "lengths must be >= 0"),
    ("lengths-too-long", lambda a: a.update(lengths=[4, 1]), ValueError, "lengths must be <= the number of steps"),
    ("lengths-count", lambda a: a.update(lengths=[1, 2, 3]), ValueError, "lengths must have shape \\[2\\]"),
    ("lengths-float", lambda a: a.update(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths must be integers"),
    ("grad_clip-nan", lambda a: a.update(grad_clip=float("nan")), ValueError, "grad_clip must be a finite"),
    ("cell_clip-inf", lambda a: a.update(cell_clip=math.inf), ValueError, "cell_clip must be a finite"),
    ("proj_clip-negative", lambda a: a.update(proj_clip=-1.0), ValueError, "proj_clip must be a finite"),
    ("grad_clip_mode", lambda a: a.update(grad_clip_mode="global"), ValueError, "grad_clip_mode must be one of"),
    ("no-steps", lambda a: a.update(input=torch.randn(0, 2, 4)), ValueError, "at least one step"),
    ("int-input", lambda a: a.update(input=torch.ones(3, 2, 4, dtype=torch.int64)), TypeError, "floating tensor"),
    ("backend", lambda a: a.update(backend="fast"), ValueError, "backend must be one of"),
    ("cuda-backend-on-cpu", lambda a: a.update(backend="cuda"), ValueError, "needs CUDA tensors"),
    ("complex-input", lambda a: a.update(input=torch.ones(3, 2, 4, dtype=torch.complex64)), TypeError,
     "floating tensor"),
]


@pytest.mark.parametrize("mutate,error,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(mutate, error, message):
    args = _lstm_args()
    mutate(args)
    with pytest.raises(error, match=message):
        ops.lstm(**args)


def test_native_op_rejects_bad_input_directly():
    """Calling the registered op without the Python checks still fails cleanly."""
    args = _lstm_args()
    op = torch.ops.rnntl_fast.lstm_forward
    with pytest.raises(RuntimeError, match="lengths must be <= the number of steps"):
        op(args["input"], args["weight_ih"], args["weight_hh"], None, None, None, None, None,
           torch.tensor([9, 1]), None, None, None, False, 0.0, 0.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        op(args["input"], args["weight_ih"], args["weight_hh"], None, None, None, torch.randn(5, 5), None, None,
           None, None, None, False, 0.0, 0.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="gate_clip must be a finite number >= 0"):
        op(args["input"], args["weight_ih"], args["weight_hh"], None, None, None, None, None, None, None, None, None,
           False, 0.0, 0.0, 0.0, -1.0, False)
    with pytest.raises(RuntimeError, match="cell_clip must be a finite number >= 0"):
        op(args["input"], args["weight_ih"], args["weight_hh"], None, None, None, None, None, None, None, None, None,
           False, float("nan"), 0.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"recurrent_mask must have shape \[2, 5\]"):
        op(args["input"], args["weight_ih"], args["weight_hh"], None, None, None, None, None, None, torch.ones(5, 2),
           None, None, False, 0.0, 0.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"zoneout_c must have shape \[3, 2, 5\]"):
        op(args["input"], args["weight_ih"], args["weight_hh"], None, None, None, None, None, None, None, None,
           torch.ones(3, 2, 4), False, 0.0, 0.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="gates"):
        torch.ops.rnntl_fast.gru_backward(None, None, torch.randn(3, 2, 4), torch.randn(15, 4), torch.randn(15, 5),
                                          None, None, None, None, torch.randn(3, 2, 5), torch.empty(0), torch.empty(0),
                                          False,
                                          0.0, 0.0, [True] * 6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_native_backward_names_a_saved_tensor_of_the_wrong_dtype(cell):
    """The backward op reads the forward's reserve; one of another dtype (float64 gates with
    float32 input) is an error naming it, not memory read as the wrong type."""
    args = _lstm_args() if cell == "lstm" else None
    x = torch.randn(3, 2, 4)
    if cell == "lstm":
        w_ih, w_hh = args["weight_ih"], args["weight_hh"]
        out, h_n, c_n, gates, cells, pre, carried = torch.ops.rnntl_fast.lstm_forward(
            x, w_ih, w_hh, None, None, None, None, None, None, None, None, None, False, 0.0, 0.0, 0.0, 0.0, True)
        with pytest.raises(RuntimeError, match="gates has dtype Double but input has dtype Float"):
            torch.ops.rnntl_fast.lstm_backward(out, None, None, x, w_ih, w_hh, None, None, None, None, None, None, None,
                                               out, gates.double(), cells, pre, carried, False, 0.0, 0.0, 0.0, 0.0,
                                               [True] * 7)
    else:
        w_ih, w_hh = torch.randn(15, 4), torch.randn(15, 5)
        out, h_n, gates, hidden_n = torch.ops.rnntl_fast.gru_forward(x, w_ih, w_hh, None, None, None, None, None,
                                                                     None, False, 0.0, 0.0, True)
        with pytest.raises(RuntimeError, match="hidden_n has dtype Double but input has dtype Float"):
            torch.ops.rnntl_fast.gru_backward(out, None, x, w_ih, w_hh, None, None, None, None, out, gates,
                                              hidden_n.double(),
                                              False, 0.0, 0.0, [True] * 6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_non_contiguous_arguments(cell):
    """Transposed weights, strided biases and a batch-first input viewed as time-major."""
    T, B, I, H, P = 6, 20, 33, 40, 7
    gates = 4 if cell == "lstm" else 3
    out_size = P if cell == "lstm" else H
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64).transpose(0, 1)
    weight_ih = torch.randn(I, gates * H, generator=g, dtype=torch.float64).t() * 0.2
    weight_hh = torch.randn(out_size, gates * H, generator=g, dtype=torch.float64).t() * 0.2
    bias = torch.randn(2 * gates * H, generator=g, dtype=torch.float64)[::2]
    h0 = torch.randn(out_size, B, generator=g, dtype=torch.float64).t()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if cell == "lstm":
        weight_hr = torch.randn(H, P, generator=g, dtype=torch.float64).t() * 0.2
        c0 = torch.randn(H, B, generator=g, dtype=torch.float64).t()
        leaves = [x, weight_ih, weight_hh, bias, bias.clone(), weight_hr, h0, c0]
        fn = lambda *a, backend: ops.lstm(*a, lengths, cell_clip=0.5, backend=backend)  # noqa: E731
    else:
        leaves = [x, weight_ih, weight_hh, bias, bias.clone(), h0]
        fn = lambda *a, backend: ops.gru(*a, lengths, backend=backend)  # noqa: E731
    assert not all(t.is_contiguous() for t in leaves)

    def outputs_and_grads(dtype, backend):
        args = [t.to(dtype).detach().requires_grad_(True) for t in leaves]
        outs = fn(*args, backend=backend)
        loss = sum((o * (k + 1)).sum() for k, o in enumerate(outs))
        return list(outs) + list(torch.autograd.grad(loss, args))

    expected = outputs_and_grads(torch.float64, "reference")
    fast = outputs_and_grads(torch.float32, "cpu")
    baseline = outputs_and_grads(torch.float32, "reference")
    for index, (f, b, e) in enumerate(zip(fast, baseline, expected)):
        assert_within_error_rule(f"{cell}[{index}]", f, b, e, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_non_finite_padded_steps_reach_nothing(cell, reverse, dtype):
    """With lengths the steps past a row's length are padding and may hold anything: NaN and
    +-inf there change no output and no gradient, bit for bit (the ops multiply valid rows
    only; padded rows' input gradient is zero)."""
    case = Case(cell, T=7, B=4, lengths=(3, 7, 1, 5), reverse=reverse)
    tensors = make_tensors(case)
    clean = run(case, tensors, dtype, "cpu")
    padded = torch.arange(case.T).unsqueeze(1) >= torch.tensor(case.lengths).unsqueeze(0)  # [T, B]
    x = tensors["input"].clone()
    x[padded] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype).repeat(case.I)[:case.I]
    dirty = run(case, dict(tensors, input=x), dtype, "cpu")
    for name, expected in clean.items():
        if expected is not None:
            torch.testing.assert_close(dirty[name], expected, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert (dirty["grad_input"][padded] == 0).all()



# (leaf, index, value): one non-finite element. Index (1, 0, 2) of the input is a valid step
# of every row in the lengths case below; h0 row 2 runs one step there.
NON_FINITE = [(leaf, index, value) for leaf, index in (("input", (1, 0, 2)), ("weight_ih", (5, 1)), ("h0", (2, 3)))
              for value in (float("inf"), -float("inf"), float("nan"))]


def _same_non_finite_pattern(name, got, expected, rtol, atol):
    """Equal NaN, +inf and -inf positions; the finite values close."""
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = (test(got) != test(expected)).sum().item()
        assert mismatch == 0, (f"{name}: {kind} at {mismatch} positions that differ "
                               f"({test(got).sum().item()} vs {test(expected).sum().item()})")
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite].to(got.dtype), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("lengths", [None, (3, 7, 1, 5)], ids=["full", "lengths"])
@pytest.mark.parametrize("leaf,index,value", NON_FINITE,
                         ids=[f"{leaf}-{value}" for leaf, _, value in NON_FINITE])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_non_finite_values_propagate_as_torch_nn(cell, leaf, index, value, lengths):
    """+-inf or NaN in the input, weight_ih or h0: every output and gradient has NaN and
    +-inf exactly where torch.nn has them in the same dtype (a saturated gate is exactly 0
    or 1, so its gradient times an infinite operand is NaN, not +-inf), float32 and float64,
    and the finite values agree. Without lengths the float64 reference loop too; with
    lengths it is no oracle here: it computes the padded rows and masks them with
    torch.where, whose backward turns their NaN into NaN gradients (0 * NaN)."""
    case = Case(cell, T=7, B=4, lengths=lengths)
    tensors = make_tensors(case)
    tensors[leaf] = tensors[leaf].clone()
    tensors[leaf][index] = value
    for dtype, rtol, atol in ((torch.float32, 1e-4, 1e-4), (torch.float64, 1e-10, 1e-10)):
        fast = run(case, tensors, dtype, "cpu")
        expected_runs = [run_torch_nn(case, tensors, dtype)]
        if lengths is None:
            expected_runs.append(run(case, tensors, torch.float64, "reference"))
        for expected in expected_runs:
            for name, value_expected in expected.items():
                if value_expected is not None:
                    _same_non_finite_pattern(f"{dtype}:{name}", fast[name], value_expected, rtol, atol)


CLIPPED_NON_FINITE_CASES = [
    Case("lstm", T=5, B=4, I=3, H=6, lengths=(3, 5, 0, 2), cell_clip=0.4, proj_clip=0.1, grad_clip=0.02),
    Case("lstm", T=5, B=4, I=3, H=40, proj=4, lengths=(3, 5, 0, 2), cell_clip=0.4, proj_clip=0.1, grad_clip=0.02,
         grad_clip_mode="gates"),
    Case("lstm", T=5, B=4, I=3, H=40, lengths=(3, 5, 0, 2), cell_clip=0.4, grad_clip=0.02),
    Case("gru", T=5, B=4, I=3, H=40, lengths=(3, 5, 0, 2), grad_clip=0.02, grad_clip_mode="gates"),
]
CLIPPED_POISONS = [("input", (1, 0, 2), float("nan")), ("input", (1, 1, 0), float("inf")),
                   ("weight_ih", (2, 1), -float("inf")), ("h0", (3, 1), float("nan"))]


@pytest.mark.parametrize("leaf,index,value", CLIPPED_POISONS,
                         ids=[f"{leaf}{list(index)}={value}" for leaf, index, value in CLIPPED_POISONS])
@pytest.mark.parametrize("case", CLIPPED_NON_FINITE_CASES, ids=lambda c: c.id)
def test_non_finite_values_through_clips_as_in_the_reference(case, leaf, index, value):
    """With every clip on (H=40 runs a multi-core loop at 2+ threads): NaN and +-inf reach
    outputs and gradients exactly where they reach the float64 reference's, a clamp keeps a
    NaN value, and a clamp's backward gives 0 where the clamp was active even for a NaN or
    infinite incoming gradient (torch.clamp's select, not a product with a 0/1 mask)."""
    tensors = make_tensors(case)
    tensors[leaf] = tensors[leaf].clone()
    tensors[leaf][index] = value
    reference = run(case, tensors, torch.float64, "reference")
    assert any(v is not None and not torch.isfinite(v).all() for v in reference.values()), "poison reached nothing"
    fast = run(case, tensors, torch.float32, "cpu")
    for name, expected in reference.items():
        if expected is not None:
            _same_non_finite_pattern(name, fast[name], expected, 1e-4, 1e-4)
