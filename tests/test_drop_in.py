"""Drop-in where torch.nn works: empty batches, float16 / bfloat16 modules on CPU,
torch.autocast, torch.export, and the same exception types as torch.nn for the same
mistakes; torch.jit.trace is refused with a message that names what to use instead."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnntl_fast
from tolerances import assert_within_error_rule

pytestmark = pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="rnntl_fast._C is not built")

CELLS = {"lstm": (nn.LSTM, rnntl_fast.LSTM), "gru": (nn.GRU, rnntl_fast.GRU)}


def _pair(cell, dtype=torch.float32, **kwargs):
    torch_class, fast_class = CELLS[cell]
    torch.manual_seed(0)
    reference = torch_class(4, 6, dtype=dtype, **kwargs)
    torch.manual_seed(0)
    return reference, fast_class(4, 6, dtype=dtype, **kwargs)


def _states(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
def test_empty_batch_like_torch_nn(cell, batch_first):
    reference, fast = _pair(cell, num_layers=2, bidirectional=True, batch_first=batch_first)
    shape = (0, 5, 4) if batch_first else (5, 0, 4)
    results = []
    for module in (reference, fast):
        x = torch.randn(shape, requires_grad=True)
        output, state = module(x)
        (output.sum() + sum(s.sum() for s in _states(state))).backward()
        results.append((output, _states(state), x.grad, [p.grad for p in module.parameters()]))
    (out_a, states_a, gx_a, gp_a), (out_b, states_b, gx_b, gp_b) = results
    assert out_a.shape == out_b.shape and [s.shape for s in states_a] == [s.shape for s in states_b]
    assert gx_b.shape == gx_a.shape
    for a, b in zip(gp_a, gp_b):
        torch.testing.assert_close(b, a)  # zeros, not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_half_precision_modules_on_cpu(cell, dtype):
    """States and sums stay in float32 inside; results and gradients come back in `dtype`,
    within the error rule against torch.nn in the same dtype."""
    reference64, _ = _pair(cell, torch.float64)
    baseline_module, fast = _pair(cell, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    weights = torch.randn(7, 3, 6, generator=g, dtype=torch.float64)

    def run(module, run_dtype):
        leaf = x.to(run_dtype).clone().requires_grad_(True)
        output, _ = module(leaf)
        (output * weights.to(run_dtype)).sum().backward()
        return {"output": output.detach(), "grad_input": leaf.grad,
                **{"grad_" + n: p.grad for n, p in module.named_parameters()}}

    expected = run(reference64, torch.float64)
    baseline = run(baseline_module, dtype)
    got = run(fast, dtype)
    for name, value in got.items():
        assert value.dtype == dtype, f"{name} is {value.dtype}"
        assert_within_error_rule(name, value, baseline[name], expected[name], dtype)


@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_autocast_like_torch_nn(cell, form):
    """Under torch.autocast("cpu", bfloat16) the modules return what torch.nn returns: the
    same dtypes (LSTM with padded input in bfloat16; GRU and packed input in float32) and
    values within bfloat16 rounding of each other."""
    reference, fast = _pair(cell, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 4)
    inp = pack_padded_sequence(x, [6, 4, 2]) if form == "packed" else x
    with torch.autocast("cpu", torch.bfloat16):
        output, state = fast(inp)
        try:
            expected_output, expected_state = reference(inp)
        except RuntimeError as error:  # oneDNN without a bfloat16 LSTM primitive (AVX2-only CPUs)
            if "primitive descriptor" not in str(error):
                raise
            expected_output = None
    if expected_output is None:
        # Still within bfloat16 rounding of torch.nn's float32 results; the dtypes have nothing to compare with.
        expected_output, _ = reference(inp)
        if form == "packed":
            expected_output, output = expected_output.data, output.data
        torch.testing.assert_close(output.float(), expected_output, atol=5e-2, rtol=5e-2)
        pytest.skip(f"torch.nn's own {cell.upper()} does not run under bfloat16 autocast on this CPU (oneDNN has no "
                    "bfloat16 primitive for it): its output dtypes cannot be compared")
    if form == "packed":
        expected_output, output = expected_output.data, output.data
    assert output.dtype == expected_output.dtype
    assert [s.dtype for s in _states(state)] == [s.dtype for s in _states(expected_state)]
    # torch.nn's float32 results under autocast still come from bfloat16 products inside.
    torch.testing.assert_close(output.float(), expected_output.float(), atol=5e-2, rtol=5e-2)


def test_jit_trace_is_refused_with_what_to_use_instead():
    module = rnntl_fast.LSTM(4, 6)
    with pytest.raises(RuntimeError, match="torch.compile or torch.export.export"):
        torch.jit.trace(module, (torch.randn(5, 2, 4),), check_trace=False)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 4)
        self.lstm = rnntl_fast.LSTM(4, 6, batch_first=True, bidirectional=True)
        self.gru = rnntl_fast.GRU(12, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embedding(tokens))
        hidden, _ = self.gru(hidden)
        return self.head(hidden)


def test_torch_export_of_a_model_holding_the_modules():
    model = Tagger().eval()
    tokens = torch.randint(0, 20, (2, 7))
    exported = torch.export.export(model, (tokens,))
    other = torch.randint(0, 20, (2, 7))
    torch.testing.assert_close(exported.module()(other), model(other))


BAD = [
    ("dtype-mismatch", lambda m: m(torch.randn(5, 2, 4, dtype=torch.float64)), ValueError),
    ("float-batch-sizes", lambda m: m(PackedSequence(torch.randn(6, 4), torch.tensor([3.7, 2.2]))), TypeError),
]


@pytest.mark.parametrize("call,error", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
@pytest.mark.parametrize("cell", CELLS)
def test_same_exception_type_as_torch_nn(cell, call, error):
    reference, fast = _pair(cell)
    with pytest.raises(error):
        call(reference)
    with pytest.raises(error):
        call(fast)


@pytest.mark.parametrize("inp,message", [
    (PackedSequence(torch.randn(9, 4), torch.tensor([3, 2])), r"data must have shape \[sum\(batch_sizes\)=5"),
    (PackedSequence(torch.randn(5, 4), torch.tensor([2, 3])), "positive and non-increasing"),
], ids=["extra-rows", "increasing-batch-sizes"])
def test_malformed_packed_sequence_is_a_clear_error(inp, message):
    with pytest.raises(ValueError, match=message):
        rnntl_fast.LSTM(4, 6)(inp)


@pytest.mark.parametrize("lengths,error,message", [
    ("321", TypeError, "lengths must be a tensor or a sequence of ints, got str"),
    ([3, None, 1], TypeError, "lengths must hold integers, got None"),
    ([3.0, 2.0, 1.0], TypeError, "lengths must hold integers, got 3.0"),
    (3, TypeError, "got int"),
], ids=["string", "none-entry", "floats", "scalar"])
def test_bad_lengths_name_the_problem(lengths, error, message):
    x = torch.randn(4, 3, 5)
    with pytest.raises(error, match=message):
        rnntl_fast.ops.gru(x, torch.randn(6, 5), torch.randn(6, 2), lengths=lengths)


def test_empty_projection_weight_is_named():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"weight_hr must have shape \[proj_size, 2\] with proj_size > 0"):
        rnntl_fast.ops.lstm(x, torch.randn(8, 5), torch.randn(8, 0), weight_hr=torch.randn(0, 2))
