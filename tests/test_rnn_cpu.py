"""The cpu backend's Elman RNN (csrc/cpu/rnn_cpu.cpp) against the float64 reference loop and
torch.nn.RNN (error rule: docs/semantics.md section 7), over every option of rnntl_fast.ops.rnn."""
import os
import subprocess
import sys
from typing import NamedTuple, Optional, Tuple

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnntl_fast
from rnntl_fast import ops
from parity import threads
from tolerances import assert_within_error_rule

pytestmark = pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="rnntl_fast._C is not built")
F64 = torch.float64


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    """Every torch.empty (also inside the kernels) comes back NaN-filled, so an output
    element the kernel forgot to write shows up as NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


class Case(NamedTuple):
    T: int = 5
    B: int = 3
    I: int = 4
    H: int = 6
    relu: bool = False
    reverse: bool = False
    lengths: Optional[Tuple[int, ...]] = None
    h0: bool = True
    bias: bool = True
    clip: float = 0.0
    clip_mode: str = "state"
    mask: bool = False
    zoneout: Optional[str] = None      # "draws" (0/1, training) or "fractions" (evaluation)
    frozen: Tuple[str, ...] = ()       # leaves that do not require grad

    @property
    def id(self) -> str:
        parts = [f"T{self.T}-B{self.B}-I{self.I}-H{self.H}", "relu" if self.relu else "tanh"]
        parts += ["rev"] * self.reverse
        if self.lengths is not None:  # long length lists by their range
            lengths = self.lengths if len(self.lengths) <= 6 else (min(self.lengths), max(self.lengths))
            parts.append("len" + "_".join(map(str, lengths)) + ("var" if len(self.lengths) > 6 else ""))
        parts += ["noh0"] * (not self.h0) + ["nobias"] * (not self.bias)
        parts += [f"clip{self.clip_mode}{self.clip}"] * (self.clip > 0) + ["mask"] * self.mask
        parts += [f"zoneout{self.zoneout}"] * (self.zoneout is not None)
        parts += ["frozen_" + "_".join(self.frozen)] * bool(self.frozen)
        return "-".join(parts)


LEAVES = ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0")


def make_tensors(case: Case, dtype=F64, seed=0):
    """(leaves by name, recurrent_mask, zoneout) in dtype, from one float64 draw."""
    g = torch.Generator().manual_seed(seed)
    T, B, I, H = case.T, case.B, case.I, case.H
    draw = lambda *shape, scale=0.5: (torch.randn(*shape, generator=g, dtype=F64) * scale)  # noqa: E731
    leaves = {"input": draw(T, B, I, scale=1.0), "weight_ih": draw(H, I), "weight_hh": draw(H, H),
              "bias_ih": draw(H) if case.bias else None, "bias_hh": draw(H) if case.bias else None,
              "h0": draw(B, H) if case.h0 else None}
    if case.lengths is not None:  # padded steps hold NaN: nothing may read them
        for b, n in enumerate(case.lengths):
            leaves["input"][n:, b] = float("nan")
    mask = (torch.rand(B, H, generator=g, dtype=F64) > 0.3).to(F64) / 0.7 if case.mask else None
    if case.zoneout == "draws":
        keep = (torch.rand(T, B, H, generator=g, dtype=F64) < 0.4).to(F64)
    elif case.zoneout == "fractions":
        keep = torch.full((T, B, H), 0.3, dtype=F64)
    else:
        keep = None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    leaves = {k: cast(v) for k, v in leaves.items()}
    for name, t in leaves.items():
        if t is not None and name not in case.frozen:
            t.requires_grad_(True)
    return leaves, cast(mask), cast(keep)


def run(case: Case, backend: str, dtype=F64, seed=0):
    """[output, h_n, gradients of the leaves (None where frozen or absent)] of one call."""
    leaves, mask, keep = make_tensors(case, dtype, seed)
    out, h_n = ops.rnn(*(leaves[n] for n in LEAVES), case.lengths, nonlinearity="relu" if case.relu else "tanh",
                       reverse=case.reverse, grad_clip=case.clip or None, grad_clip_mode=case.clip_mode,
                       recurrent_mask=mask, zoneout=keep, backend=backend)
    g = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(t.shape, generator=g, dtype=F64).to(dtype) for t in (out, h_n)]
    loss = (out * weights[0]).sum() + (h_n * weights[1]).sum()
    wanted = [n for n in LEAVES if leaves[n] is not None and leaves[n].requires_grad]
    grads = dict(zip(wanted, torch.autograd.grad(loss, [leaves[n] for n in wanted]))) if wanted else {}
    return [out.detach(), h_n.detach()] + [grads.get(n) for n in LEAVES]


NAMES = ("output", "h_n") + tuple("grad_" + n for n in LEAVES)

CASES = [
    Case(),
    Case(T=1, B=1, I=3, H=5),
    Case(T=7, B=3, I=5, H=13, relu=True, reverse=True, lengths=(4, 7, 2)),
    Case(relu=True),
    Case(reverse=True),
    Case(h0=False),
    Case(bias=False),
    Case(T=7, B=4, lengths=(3, 7, 0, 5)),
    Case(T=7, B=4, lengths=(3, 7, 0, 5), reverse=True),
    Case(T=4, B=3, lengths=(0, 0, 0)),
    Case(clip=0.05, clip_mode="state"),
    Case(clip=0.05, clip_mode="gates"),
    Case(T=7, B=4, lengths=(3, 7, 1, 5), reverse=True, clip=0.05),
    Case(T=7, B=4, lengths=(3, 7, 1, 5), clip=0.05, clip_mode="gates", relu=True),
    Case(mask=True),
    Case(zoneout="draws"),
    Case(zoneout="fractions", relu=True),
    Case(T=7, B=4, lengths=(3, 7, 0, 5), reverse=True, mask=True, zoneout="draws", clip=0.05),
    Case(T=6, B=3, lengths=(6, 2, 4), mask=True, zoneout="fractions", clip=0.05, clip_mode="gates", bias=False),
    Case(frozen=("weight_ih", "weight_hh")),
    Case(frozen=("bias_ih", "bias_hh", "input")),
    Case(T=7, B=4, lengths=(3, 7, 1, 5), mask=True, frozen=("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh")),
    # Sizes aimed at the per-step product kernel: 17 rows, a width ending in a partial panel.
    Case(T=4, B=17, I=9, H=70, lengths=tuple(range(4, 0, -1)) * 4 + (2,)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_float64_matches_reference(case):
    fast, expected = run(case, "cpu"), run(case, "reference")
    for name, a, e in zip(NAMES, fast, expected):
        if e is None:
            assert a is None, f"{name}: a gradient where the reference has none"
            continue
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


F32_CASES = [Case(T=20, B=5, I=8, H=32), Case(T=20, B=5, I=8, H=32, relu=True, reverse=True, lengths=(20, 3, 11, 0, 7)),
             Case(T=12, B=4, I=8, H=24, mask=True, zoneout="fractions", clip=0.1, lengths=(12, 5, 9, 1)),
             Case(T=12, B=4, I=8, H=24, relu=True, zoneout="draws", clip=0.1, clip_mode="gates"),
             # A per-step weight over 1 MiB at batch 64: the per-step products run on MKL's packed
             # GEMM (Intel CPUs) or oneDNN (others), not on the own kernel.
             Case(T=3, B=64, I=16, H=520, lengths=(3,) * 40 + (2,) * 20 + (0,) * 4, mask=True)]


@pytest.mark.parametrize("case", F32_CASES, ids=[c.id for c in F32_CASES])
def test_float32_within_error_rule(case):
    oracle = run(case, "reference")
    baseline = run(case, "reference", torch.float32)
    fast = run(case, "cpu", torch.float32)
    for name, a, b, e in zip(NAMES, fast, baseline, oracle):
        if e is not None:
            assert a.dtype == torch.float32
            assert_within_error_rule(name, a, b, e, torch.float32)


@pytest.mark.parametrize("choice", ["library", "aten"])
def test_library_products_within_error_rule(choice):
    """RNNTL_CPU_GEMM (read once per process) moves the float32 products off the own kernel onto
    oneDNN / MKL (library) or at::mm (aten): the float32 cases again, in a child process."""
    child = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                            "-k", "test_float32_within_error_rule"], env=dict(os.environ, RNNTL_CPU_GEMM=choice),
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert f"{len(F32_CASES)} passed" in child.stdout, child.stdout[-2000:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_dtypes_run_widened(dtype):
    case = Case(T=6, B=3, I=4, H=8, lengths=(6, 2, 4), mask=True, zoneout="fractions")
    oracle, baseline, fast = run(case, "reference"), run(case, "reference", dtype), run(case, "cpu", dtype)
    for name, a, b, e in zip(NAMES, fast, baseline, oracle):
        if e is not None:
            assert a.dtype == dtype
            assert_within_error_rule(name, a, b, e, dtype)


@pytest.mark.parametrize("batch", [0, 1], ids=["B0", "B1"])
def test_small_batches(batch):
    case = Case(T=4, B=batch, mask=True, zoneout="fractions")
    for name, a, e in zip(NAMES, run(case, "cpu"), run(case, "reference")):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_padded_steps_give_zero_output_and_no_nan():
    case = Case(T=6, B=3, lengths=(2, 6, 0), zoneout="draws", mask=True)
    out, h_n, *grads = run(case, "cpu")
    assert bool((out[2:, 0] == 0).all()) and bool((out[:, 2] == 0).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads if g is not None)  # the NaN input reaches none
    assert bool((grads[0][2:, 0] == 0).all())  # dL/dx of padded steps: zero, not NaN


def test_gradcheck_every_option():
    case = Case(T=3, B=2, I=2, H=3, lengths=(3, 2), mask=True, zoneout="fractions", reverse=True)
    leaves, mask, keep = make_tensors(case)
    lengths = torch.tensor(case.lengths)
    leaves["input"] = leaves["input"].nan_to_num().detach().requires_grad_(True)

    def fn(*tensors):
        return ops.rnn(*tensors, lengths, recurrent_mask=mask, zoneout=keep, reverse=True, backend="cpu")

    args = tuple(leaves[n] for n in LEAVES)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def _op_arguments(zoneout: bool):
    case = Case(T=3, B=2, I=3, H=4, lengths=(3, 1), mask=True, zoneout="fractions" if zoneout else None)
    leaves, mask, keep = make_tensors(case)
    leaves["input"] = leaves["input"].nan_to_num().detach().requires_grad_(True)
    return (leaves["input"], leaves["weight_ih"], leaves["weight_hh"], leaves["bias_ih"], leaves["bias_hh"],
            leaves["h0"], torch.tensor(case.lengths), mask, keep, True, False, 0.0, 0.1, True)


@pytest.mark.parametrize("zoneout", [False, True], ids=["mask", "mask-zoneout"])
def test_opcheck(zoneout):
    args = _op_arguments(zoneout)
    torch.library.opcheck(torch.ops.rnntl_fast.rnn_forward.default, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, h_n, activations = torch.ops.rnntl_fast.rnn_forward(*detached)
    input, weight_ih, weight_hh, _, _, h0, lengths, mask, keep = detached[:9]
    backward_args = (torch.randn_like(out), torch.randn_like(h_n), input, weight_ih, weight_hh, h0, lengths, mask, keep,
                     out, activations, True, False, 0.0, 0.1, [True] * 6)
    torch.library.opcheck(torch.ops.rnntl_fast.rnn_backward.default, backward_args)


def _backward_inputs(args):
    """input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout of forward arguments."""
    return [args[n] for n in (0, 1, 2, 5, 6, 7, 8)]


def test_backward_skips_unwanted_gradients():
    """An output_mask entry that is off comes back empty (frozen weights cost no product)."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_arguments(True)]
    out, h_n, activations = torch.ops.rnntl_fast.rnn_forward(*args)
    grads = torch.ops.rnntl_fast.rnn_backward(torch.randn_like(out), None, *_backward_inputs(args), out, activations,
                                              True, False, 0.0, 0.1, [False, False, False, False, False, True])
    assert [g.numel() for g in grads[:5]] == [0] * 5 and grads[5].shape == h_n.shape


def test_op_arguments_are_named_in_errors():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_arguments(True)]
    bad = list(args)
    bad[2] = torch.randn(4, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape \[4, 4\]"):
        torch.ops.rnntl_fast.rnn_forward(*bad)
    bad = list(args)
    bad[8] = torch.rand(2, 2, 4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"zoneout must have shape \[3, 2, 4\]"):
        torch.ops.rnntl_fast.rnn_forward(*bad)
    out, h_n, _ = torch.ops.rnntl_fast.rnn_forward(*args)
    with pytest.raises(RuntimeError, match="activations .forward run without save_for_backward"):
        torch.ops.rnntl_fast.rnn_backward(out, h_n, *_backward_inputs(args), out, torch.empty(0, dtype=F64), True,
                                          False, 0.0, 0.1, [True] * 6)


def test_results_identical_across_thread_counts():
    case = Case(T=30, B=24, I=32, H=96, relu=False, lengths=tuple(range(30, 6, -1)), mask=True, zoneout="draws")
    results = []
    for count in (1, 2):
        with threads(count):
            results.append(run(case, "cpu", torch.float32))
    for name, a, b in zip(NAMES, *results):
        assert torch.equal(a, b), name


# -- through the module, against torch.nn.RNN ---------------------------------------------------
MODULE_CONFIGS = [dict(), dict(nonlinearity="relu", bias=False), dict(batch_first=True),
                  dict(num_layers=2, bidirectional=True), dict(num_layers=2, bidirectional=True, nonlinearity="relu")]
MODULE_FORMS = ("padded", "packed")
MODULE_GRID = [(c, f) for c in MODULE_CONFIGS for f in MODULE_FORMS if not (f == "packed" and c.get("batch_first"))]


def _module_id(config, form):
    parts = [f"L{config.get('num_layers', 1)}", "bi" if config.get("bidirectional") else "uni",
             config.get("nonlinearity", "tanh")]
    parts += ["nobias"] * (config.get("bias") is False) + ["bf"] * bool(config.get("batch_first"))
    return "-".join(parts + [form])


def _module_run(module, config, form, dtype):
    g = torch.Generator().manual_seed(2)
    T, B, I, H = 7, 4, 5, 12
    D = 2 if config.get("bidirectional") else 1
    x = torch.randn(T, B, I, generator=g, dtype=F64)
    hx = torch.randn(D * config.get("num_layers", 1), B, H, generator=g, dtype=F64)
    if config.get("batch_first"):
        x = x.transpose(0, 1).contiguous()
    x, hx = x.to(dtype).requires_grad_(True), hx.to(dtype).requires_grad_(True)
    inp = pack_padded_sequence(x, torch.tensor([3, 7, 2, 5]), enforce_sorted=False) if form == "packed" else x
    output, h_n = module(inp, hx)
    out = output.data if isinstance(output, PackedSequence) else output
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64).to(dtype)).sum()
    loss = loss + (h_n * torch.randn(h_n.shape, generator=g, dtype=F64).to(dtype)).sum()
    grads = torch.autograd.grad(loss, [x, hx] + list(module.parameters()))
    return [out.detach(), h_n.detach()] + list(grads)


@pytest.mark.parametrize("config,form", MODULE_GRID, ids=[_module_id(*g) for g in MODULE_GRID])
def test_module_matches_torch_nn(config, form):
    """float32 rnntl_fast.RNN (default backend: cpu) within the error rule of float32 torch.nn.RNN
    against float64 torch.nn.RNN, outputs and every gradient."""
    torch.manual_seed(1)
    oracle = nn.RNN(5, 12, dtype=F64, **config)
    baseline = nn.RNN(5, 12, **config)
    fast = rnntl_fast.RNN(5, 12, **config)
    baseline.load_state_dict(oracle.state_dict())
    fast.load_state_dict(oracle.state_dict())
    expected = _module_run(oracle, config, form, F64)
    for n, (a, b, e) in enumerate(zip(_module_run(fast, config, form, torch.float32),
                                      _module_run(baseline, config, form, torch.float32), expected)):
        assert_within_error_rule(f"result {n}", a, b, e, torch.float32)


def test_module_float64_equals_torch_nn_tightly():
    config = dict(num_layers=2, bidirectional=True, batch_first=True)
    torch.manual_seed(1)
    reference = nn.RNN(5, 12, dtype=F64, **config)
    fast = rnntl_fast.RNN(5, 12, dtype=F64, backend="cpu", **config)
    fast.load_state_dict(reference.state_dict())
    for a, e in zip(_module_run(fast, config, "padded", F64), _module_run(reference, config, "padded", F64)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_module_regularizers_run_on_cpu_as_on_reference():
    """recurrent_dropout, weight_drop and zoneout draw the same masks from the same seed on either backend."""
    results = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(3)
        module = rnntl_fast.RNN(4, 6, num_layers=2, dtype=F64, backend=backend, recurrent_dropout=0.3,
                                weight_drop=0.2, zoneout=0.25)
        x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
        torch.manual_seed(4)
        out = module(x, lengths=torch.tensor([5, 2, 4]))[0]
        grads = torch.autograd.grad(out.pow(2).sum(), [x] + list(module.parameters()))
        results.append([out.detach(), *grads])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
