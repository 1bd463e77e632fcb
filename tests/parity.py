"""Shared machinery of the parity tests: one case description, the runs it needs (fast
backend, float64 reference, baseline in the test dtype) and the comparison by the error
rule of tests/tolerances.py."""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnntl_fast import ops
from tolerances import assert_within_error_rule


def _lengths_id(lengths: tuple) -> str:
    """3_7_1_5; past 8 rows runs of one length as 3x40 (3x40_2x20_0x4), to keep ids readable."""
    if len(lengths) <= 8:
        return "_".join(map(str, lengths))
    runs = [[lengths[0], 0]]
    for value in lengths:
        if value != runs[-1][0]:
            runs.append([value, 0])
        runs[-1][1] += 1
    return "_".join(f"{value}x{count}" if count > 1 else str(value) for value, count in runs)


@dataclass(frozen=True)
class Case:
    cell: str = "lstm"              # "lstm" or "gru"
    T: int = 5
    B: int = 3
    I: int = 4
    H: int = 6
    proj: int = 0                   # LSTM proj_size (0 = none)
    reverse: bool = False
    lengths: Optional[tuple] = None  # per-row lengths, unsorted allowed
    initial_state: bool = True
    bias: bool = True
    cell_clip: Optional[float] = None
    proj_clip: Optional[float] = None
    grad_clip: Optional[float] = None
    grad_clip_mode: str = "state"
    frozen: tuple = ()              # names of weights with requires_grad=False

    @property
    def id(self) -> str:
        parts = [self.cell, f"T{self.T}-B{self.B}-I{self.I}-H{self.H}"]
        if self.proj:
            parts.append(f"P{self.proj}")
        if self.reverse:
            parts.append("rev")
        if self.lengths:
            parts.append("len" + _lengths_id(self.lengths))
        if not self.initial_state:
            parts.append("nostate")
        if not self.bias:
            parts.append("nobias")
        if self.cell_clip:
            parts.append(f"cellclip{self.cell_clip}")
        if self.proj_clip:
            parts.append(f"projclip{self.proj_clip}")
        if self.grad_clip:
            parts.append(f"gradclip{self.grad_clip}-{self.grad_clip_mode}")
        if self.frozen:
            parts.append("frozen-" + "+".join(self.frozen))
        return "-".join(parts)

    @property
    def out_size(self) -> int:
        return self.proj or self.H


def triton_device_or_skip() -> str:
    """Where the Triton tests run: "cpu" under TRITON_INTERPRET=1, "cuda" on a GPU; otherwise
    the calling test module is skipped (call it at import, after importorskip("triton"))."""
    import pytest
    from rnntl_fast.ops.backend import triton_interpreted

    if triton_interpreted():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no GPU, and TRITON_INTERPRET=1 (which runs the Triton kernels on CPU tensors) was not set before "
                "import", allow_module_level=True)


@contextmanager
def threads(count: int):
    """torch.set_num_threads(count) for the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_tensors(case: Case, seed: int = 0) -> Dict[str, torch.Tensor]:
    """float64 leaves: input, weights, states, and random loss weights for each output."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale  # noqa
    gates = 4 if case.cell == "lstm" else 3
    bound = 1.0 / case.H ** 0.5
    t = {"input": rand(case.T, case.B, case.I),
         "weight_ih": rand(gates * case.H, case.I, scale=bound * 2),
         "weight_hh": rand(gates * case.H, case.out_size, scale=bound * 2)}
    if case.bias:
        t["bias_ih"] = rand(gates * case.H, scale=bound)
        t["bias_hh"] = rand(gates * case.H, scale=bound)
    if case.proj:
        t["weight_hr"] = rand(case.proj, case.H, scale=bound * 2)
    if case.initial_state:
        t["h0"] = rand(case.B, case.out_size)
        if case.cell == "lstm":
            t["c0"] = rand(case.B, case.H)
    t["loss_output"] = rand(case.T, case.B, case.out_size, scale=3.0)
    t["loss_h_n"] = rand(case.B, case.out_size, scale=3.0)
    t["loss_c_n"] = rand(case.B, case.H, scale=3.0)
    return t


LEAVES = ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "h0", "c0")


def run(case: Case, tensors, dtype, backend, grad_clip="case", device="cpu", layout=None):
    """Runs one case; returns {name: tensor} of outputs and gradients (None when no grad),
    on the CPU whatever `device` ran it. layout(name, leaf) -> tensor, if given, is what the
    op receives for each leaf (e.g. a non-contiguous view of the same values)."""
    leaves = {}
    for name in LEAVES:
        if name in tensors:
            leaves[name] = tensors[name].to(device=device, dtype=dtype).detach().requires_grad_(
                name not in case.frozen)
    lengths = torch.tensor(case.lengths) if case.lengths else None
    clip = case.grad_clip if grad_clip == "case" else grad_clip
    arguments = {name: layout(name, leaf) if layout else leaf for name, leaf in leaves.items()}
    get = arguments.get
    if case.cell == "lstm":
        output, h_n, c_n = ops.lstm(get("input"), get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                                    get("weight_hr"), get("h0"), get("c0"), lengths, reverse=case.reverse,
                                    cell_clip=case.cell_clip, proj_clip=case.proj_clip, grad_clip=clip,
                                    grad_clip_mode=case.grad_clip_mode, backend=backend)
        results = {"output": output, "h_n": h_n, "c_n": c_n}
    else:
        output, h_n = ops.gru(get("input"), get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                              get("h0"), lengths, reverse=case.reverse, grad_clip=clip,
                              grad_clip_mode=case.grad_clip_mode, backend=backend)
        results = {"output": output, "h_n": h_n}
    loss = sum((value * tensors["loss_" + name].to(device=device, dtype=dtype)).sum()
               for name, value in results.items())
    wrt = [name for name, leaf in leaves.items() if leaf.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[n] for n in wrt], allow_unused=True)
    results = {name: value.detach().cpu() for name, value in results.items()}
    for name in leaves:
        results["grad_" + name] = None
    for name, grad in zip(wrt, grads):
        results["grad_" + name] = None if grad is None else grad.cpu()
    return results


def assert_case_matches(case: Case, fast, baseline, reference64, dtype) -> List[str]:
    checked = []
    for name, expected in reference64.items():
        if expected is None:
            assert fast[name] is None, f"{name}: expected no gradient (frozen), got one"
            continue
        assert fast[name] is not None, f"{name}: missing"
        assert_within_error_rule(f"{case.id}:{name}", fast[name], baseline[name], expected, dtype)
        checked.append(name)
    return checked


def torch_nn_expressible(case: Case) -> bool:
    return case.cell_clip is None and case.proj_clip is None and case.grad_clip is None and 0 not in (case.lengths or ())


def run_torch_nn(case: Case, tensors, dtype):
    """The same case through torch.nn (a bidirectional module's reverse half for reverse=True)."""
    cls = nn.LSTM if case.cell == "lstm" else nn.GRU
    kwargs = {"proj_size": case.proj} if case.cell == "lstm" else {}
    module = cls(case.I, case.H, bias=case.bias, bidirectional=case.reverse, dtype=dtype, **kwargs)
    suffix = "_reverse" if case.reverse else ""
    leaves = {}
    for name in LEAVES[1:6]:
        if name in tensors:
            parameter = getattr(module, f"{name}_l0{suffix}")
            with torch.no_grad():
                parameter.copy_(tensors[name])
            parameter.requires_grad_(name not in case.frozen)
            leaves[name] = parameter
    for name in ("input", "h0", "c0"):
        if name in tensors:
            leaves[name] = tensors[name].to(dtype).detach().requires_grad_(name not in case.frozen)
    x = leaves["input"]
    directions = 2 if case.reverse else 1
    states = []
    for name, width in (("h0", case.out_size), ("c0", case.H)):
        if case.cell == "gru" and name == "c0":
            continue
        state = leaves.get(name, torch.zeros(case.B, width, dtype=dtype))
        states.append(state.unsqueeze(0) if directions == 1 else torch.stack([torch.zeros_like(state), state]))
    hx = (tuple(states) if case.cell == "lstm" else states[0]) if case.initial_state else None
    inp = pack_padded_sequence(x, torch.tensor(case.lengths), enforce_sorted=False) if case.lengths else x
    out, state = module(inp, hx)
    if case.lengths:
        out = pad_packed_sequence(out, total_length=case.T)[0]
    if case.reverse:
        out = out[..., case.out_size:]
    results = {"output": out}
    if case.cell == "lstm":
        results["h_n"], results["c_n"] = state[0][-1], state[1][-1]
    else:
        results["h_n"] = state[-1]
    loss = sum((value * tensors["loss_" + name].to(dtype)).sum() for name, value in results.items())
    wrt = [name for name, leaf in leaves.items() if leaf.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[n] for n in wrt])
    results = {name: value.detach() for name, value in results.items()}
    results.update({"grad_" + name: None for name in leaves})
    results.update({"grad_" + name: grad for name, grad in zip(wrt, grads)})
    return results
