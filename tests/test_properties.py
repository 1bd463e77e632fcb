"""Property-based tests (hypothesis): drawn shapes, options, lengths, memory layouts, dtypes
and non-finite values, for the ops (cpu backend against the float64 reference loop and
torch.nn) and the modules (against torch.nn).

How many examples each property runs is the hypothesis settings profile that
tests/conftest.py loads from RNNTL_HYPOTHESIS_PROFILE ("ci" by default: a few dozen,
derandomized; "long" for local runs; see docs/ENVIRONMENT.md).

Non-finite values, with torch.nn as the oracle: a NaN or +-inf in an input, weight or state must give
the NaN / +-inf pattern torch.nn gives, in the outputs and in every gradient; values in
padded steps (t >= length) must not reach any result.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnntl_fast
from parity import LEAVES, Case, assert_case_matches, make_tensors, run, run_torch_nn, torch_nn_expressible
from tolerances import assert_within_error_rule

pytestmark = pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="rnntl_fast._C is not built")

# A known failure needs no shrinking: a strict xfail only has to see it once.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)

# ---- strategies -----------------------------------------------------------------------------

# How the op receives a leaf: the same values in another memory layout.
LAYOUTS = ("contiguous", "strided", "transposed")


def relayout(kind: str, leaf: torch.Tensor) -> torch.Tensor:
    """`leaf` (any shape) as a differentiable view with the same values and other strides:
    "strided" takes every other element of a buffer twice as long in the last dimension;
    "transposed" stores the dimensions in reverse order (e.g. input [T, B, I] batch-major)."""
    if kind == "contiguous":
        return leaf
    if kind == "strided" or leaf.dim() < 2:
        return torch.stack([leaf, torch.zeros_like(leaf)], dim=-1)[..., 0]
    order = tuple(reversed(range(leaf.dim())))
    return leaf.permute(order).contiguous().permute(order)


@st.composite
def op_cases(draw, cell=None, torch_nn_only=False, lengths="any"):
    """A Case of one layer-direction. torch_nn_only: no clips and no zero lengths (what
    torch.nn can express); lengths: "any", "none" (every row runs T steps) or "padded"
    (at least one row shorter than T)."""
    padded = lengths == "padded"
    cell = cell or draw(st.sampled_from(("lstm", "gru")))
    T = draw(st.integers(2 if padded else 1, 7))
    B = draw(st.integers(1, 6))
    I = draw(st.integers(1, 9))
    H = draw(st.integers(1, 12))
    proj = draw(st.integers(1, H - 1)) if cell == "lstm" and H > 1 and draw(st.booleans()) else 0
    if lengths == "none" or (lengths == "any" and draw(st.booleans())):
        lengths = None
    else:
        lengths = tuple(draw(st.lists(st.integers(1 if torch_nn_only else 0, T), min_size=B, max_size=B)))
        if padded:
            assume(min(lengths) < T)
    clip = st.none() if torch_nn_only else st.none() | st.floats(0.01, 2.0)
    cell_clip = draw(clip) if cell == "lstm" else None
    proj_clip = draw(clip) if cell == "lstm" else None
    grad_clip = draw(clip)
    present = ["input", "weight_ih", "weight_hh"]
    bias = draw(st.booleans())
    initial_state = draw(st.booleans())
    present += ["bias_ih", "bias_hh"] if bias else []
    present += ["weight_hr"] if proj else []
    present += (["h0", "c0"] if cell == "lstm" else ["h0"]) if initial_state else []
    frozen = draw(st.sets(st.sampled_from(present), max_size=len(present) - 1))
    return Case(cell, T=T, B=B, I=I, H=H, proj=proj, reverse=draw(st.booleans()), lengths=lengths,
                initial_state=initial_state, bias=bias, cell_clip=cell_clip, proj_clip=proj_clip,
                grad_clip=grad_clip, grad_clip_mode=draw(st.sampled_from(("state", "gates"))),
                frozen=tuple(sorted(frozen)))


layouts = st.fixed_dictionaries({name: st.sampled_from(LAYOUTS) for name in LEAVES})
seeds = st.integers(0, 2 ** 16)


def _layout_of(drawn):
    return lambda name, leaf: relayout(drawn[name], leaf)


# ---- ops: cpu backend against the reference and torch.nn ------------------------------------

@given(case=op_cases(), layout=layouts, seed=seeds)
def test_op_float64_equals_reference(case, layout, seed):
    tensors = make_tensors(case, seed)
    expected = run(case, tensors, torch.float64, "reference")
    fast = run(case, tensors, torch.float64, "cpu", layout=_layout_of(layout))
    for name, value in expected.items():
        if value is None:
            assert fast[name] is None, f"{name}: a gradient for a frozen leaf"
        else:
            torch.testing.assert_close(fast[name], value, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@given(case=op_cases(), layout=layouts, seed=seeds)
def test_op_float32_within_error_rule(case, layout, seed):
    tensors = make_tensors(case, seed)
    reference64 = run(case, tensors, torch.float64, "reference")
    fast = run(case, tensors, torch.float32, "cpu", layout=_layout_of(layout))
    if torch_nn_expressible(case):
        baseline = run_torch_nn(case, tensors, torch.float32)
    else:  # torch.nn has no clipping and no zero lengths: the reference loop in float32
        baseline = run(case, tensors, torch.float32, "reference")
    assert_case_matches(case, fast, baseline, reference64, torch.float32)


# ---- non-finite values -----------------------------------------------------------------------

NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def assert_same_non_finite_pattern(fast, expected, dtype):
    """Same NaN / +inf / -inf positions in every result; the finite entries close."""
    tolerance = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for name, value in expected.items():
        if value is None:
            continue
        got = fast[name]
        for kind, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            mismatch = (where(got) != where(value)).nonzero().tolist()
            assert not mismatch, (f"{name}: {kind} at {mismatch[:4]} differs from torch.nn "
                                  f"(got {[got[tuple(i)].item() for i in mismatch[:4]]}, "
                                  f"torch.nn {[value[tuple(i)].item() for i in mismatch[:4]]})")
        finite = torch.isfinite(value)
        torch.testing.assert_close(got[finite], value[finite], **tolerance, msg=lambda m: f"{name}: {m}")


@st.composite
def poisoned(draw, case_strategy, values, padded=False):
    """(case, seed, leaf name, index, value): a torch.nn-expressible case and one entry to
    set to a non-finite value, anywhere in a leaf (padded=False) or in the input at a step
    past its row's length (padded=True)."""
    case = draw(case_strategy)
    seed = draw(seeds)
    value = draw(st.sampled_from(values))
    if padded:
        row = draw(st.sampled_from([b for b, length in enumerate(case.lengths) if length < case.T]))
        return case, seed, "input", (draw(st.integers(case.lengths[row], case.T - 1)), row,
                                     draw(st.integers(0, case.I - 1))), value
    shapes = {name: tensor.shape for name, tensor in make_tensors(case, seed).items() if name in LEAVES}
    name = draw(st.sampled_from(sorted(shapes)))
    return case, seed, name, tuple(draw(st.integers(0, size - 1)) for size in shapes[name]), value


def _poisoned_tensors(case, seed, name, index, value):
    tensors = make_tensors(case, seed)
    tensors[name] = tensors[name].clone()
    tensors[name][index] = NON_FINITE[value]
    return tensors


def _check_non_finite(case, tensors, dtype):
    expected = run_torch_nn(case, tensors, dtype)
    fast = run(case, tensors, dtype, "cpu")
    assert_same_non_finite_pattern(fast, expected, dtype)


@pytest.mark.parametrize("dtype,values", [
    pytest.param(torch.float64, ("nan", "inf", "-inf"), id="float64-nan-inf"),
    pytest.param(torch.float32, ("nan",), id="float32-nan"),
    pytest.param(torch.float32, ("inf", "-inf"), id="float32-inf"),
])
@settings(phases=NO_SHRINK)
@given(data=st.data())
def test_non_finite_values_propagate_like_torch_nn(dtype, values, data):
    """One NaN or +-inf anywhere in the input, a weight, a bias or an initial state."""
    case, *poison = data.draw(poisoned(op_cases(torch_nn_only=True, lengths="none"), values))
    _check_non_finite(case, _poisoned_tensors(case, *poison), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@settings(phases=NO_SHRINK)
@given(data=st.data())
def test_non_finite_values_in_padded_steps_reach_no_result(cell, dtype, data):
    """A NaN or +-inf in the input at a step past its row's length: torch.nn never reads it."""
    case, *poison = data.draw(poisoned(op_cases(cell, torch_nn_only=True, lengths="padded"), tuple(NON_FINITE),
                                       padded=True))
    tensors = _poisoned_tensors(case, *poison)
    expected = run_torch_nn(case, tensors, dtype)
    for name, value in expected.items():  # the harness itself: torch.nn keeps them out
        assert value is None or torch.isfinite(value).all(), f"torch.nn {name} not finite"
    _check_non_finite(case, tensors, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@settings(phases=NO_SHRINK)
@given(data=st.data())
def test_nan_weight_ih_leaves_padded_input_gradients_zero(cell, dtype, data):
    """A NaN in weight_ih with lengths: the gradient of the input at padded steps is 0 in
    torch.nn (the step is not computed), whatever the weights hold."""
    case = data.draw(op_cases(cell, torch_nn_only=True, lengths="padded"))
    seed = data.draw(seeds)
    index = (data.draw(st.integers(0, case.H * (4 if cell == "lstm" else 3) - 1)), data.draw(st.integers(0, case.I - 1)))
    _check_non_finite(case, _poisoned_tensors(case, seed, "weight_ih", index, "nan"), dtype)


# ---- modules against torch.nn ----------------------------------------------------------------

@st.composite
def module_configs(draw):
    cell = draw(st.sampled_from(("lstm", "gru")))
    H = draw(st.integers(1, 9))
    config = dict(cell=cell, input_size=draw(st.integers(1, 7)), hidden_size=H, num_layers=draw(st.integers(1, 3)),
                  bidirectional=draw(st.booleans()), bias=draw(st.booleans()), batch_first=draw(st.booleans()))
    if cell == "lstm" and H > 1 and draw(st.booleans()):
        config["proj_size"] = draw(st.integers(1, H - 1))
    return config


def _module_pair(config, seed):
    kwargs = {k: v for k, v in config.items() if k != "cell"}
    torch_class, fast_class = (nn.LSTM, rnntl_fast.LSTM) if config["cell"] == "lstm" else (nn.GRU, rnntl_fast.GRU)
    torch.manual_seed(seed)
    reference = torch_class(**kwargs)
    fast = fast_class(**kwargs)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _run_module(module, config, dtype, x, lengths, hx, layout, frozen):
    """Forward + backward of a fixed random loss in `dtype`; the outputs and every gradient.
    x: [T, B, I] float64 (or [T, I] unbatched); lengths: [B] or None (packed input when given)."""
    module = copy.deepcopy(module).to(dtype)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(name not in frozen)
    x = x.to(dtype).requires_grad_(True)
    hx = None if hx is None else [h.to(dtype).requires_grad_(True) for h in hx]
    given_x = relayout(layout, x.transpose(0, 1) if config["batch_first"] and lengths is None else x)
    if lengths is not None:
        given_x = pack_padded_sequence(given_x, lengths, batch_first=False, enforce_sorted=False)
    given_hx = None if hx is None else (tuple(hx) if config["cell"] == "lstm" else hx[0])
    output, state = module(given_x, given_hx)
    output = output.data if isinstance(output, PackedSequence) else output
    results = {"output": output}
    results.update({f"state{i}": s for i, s in enumerate(state if isinstance(state, tuple) else (state,))})
    g = torch.Generator().manual_seed(3)
    loss = sum((v * torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype)).sum() for v in results.values())
    leaves = {"input": x, **{f"hx{i}": h for i, h in enumerate(hx or [])},
              **{n: p for n, p in module.named_parameters() if p.requires_grad}}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {name: value.detach() for name, value in results.items()}
    results.update({"grad_" + name: grad for name, grad in zip(leaves, grads)})
    return results


@given(config=module_configs(), form=st.sampled_from(("padded", "packed", "unbatched")), with_hx=st.booleans(),
       T=st.integers(1, 6), B=st.integers(1, 5), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from((torch.float32, torch.float64)), data=st.data())
def test_module_matches_torch_nn(config, form, with_hx, T, B, layout, dtype, data):
    """rnntl_fast.LSTM / GRU against torch.nn.LSTM / GRU with the same weights: float64
    equal to 1e-9, float32 within the error rule against torch.nn in float64."""
    seed = data.draw(seeds)
    reference, fast = _module_pair(config, seed)
    names = [name for name, _ in reference.named_parameters()]
    frozen = data.draw(st.sets(st.sampled_from(names)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, config["input_size"], generator=g, dtype=torch.float64)
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))) if form == "packed" else None
    states = (2 if config["bidirectional"] else 1) * config["num_layers"]
    widths = [config.get("proj_size") or config["hidden_size"]] + ([config["hidden_size"]] * (config["cell"] == "lstm"))
    hx = [torch.randn(states, B, w, generator=g, dtype=torch.float64) for w in widths] if with_hx else None
    if form == "unbatched":
        x, hx = x[:, 0], None if hx is None else [h[:, 0] for h in hx]
        config = dict(config, batch_first=False)  # batch_first does not apply to unbatched input
    arguments = (x, lengths, hx, layout, frozen)
    if dtype == torch.float64:
        expected = _run_module(reference, config, dtype, *arguments)
        got = _run_module(fast, config, dtype, *arguments)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
        return
    expected = _run_module(reference, config, torch.float64, *arguments)
    baseline = _run_module(reference, config, torch.float32, *arguments)
    got = _run_module(fast, config, torch.float32, *arguments)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert_within_error_rule(name, got[name], baseline[name], value, torch.float32)


def test_unknown_hypothesis_profile_is_an_error_naming_the_variable():
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                             os.path.join(tests, "test_gpu_check.py")], capture_output=True, text=True, cwd=tests,
                            env=dict(os.environ, RNNTL_HYPOTHESIS_PROFILE="longer"))
    assert result.returncode != 0
    assert "RNNTL_HYPOTHESIS_PROFILE must be one of ('ci', 'long'), got 'longer'" in result.stdout + result.stderr
