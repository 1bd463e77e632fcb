"""rnntl_fast.LSTM / GRU as drop-in replacements for torch.nn.LSTM / GRU."""
import copy
import io
import itertools
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnntl_fast
from tolerances import assert_within_error_rule

pytestmark = pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="rnntl_fast._C is not built")

T, B, I, H, PROJ = 5, 3, 4, 6, 3
LENGTHS = (3, 5, 2)  # unsorted


def _module_configs():
    configs = []
    for cell, layers, bidirectional, proj, bias, batch_first in itertools.product(
            ("lstm", "gru"), (1, 2), (False, True), (0, PROJ), (True, False), (False, True)):
        if cell == "gru" and proj:
            continue
        if not bias and (layers == 2 or bidirectional):  # keep the grid small: bias off with the simplest stacks
            continue
        configs.append(dict(cell=cell, num_layers=layers, bidirectional=bidirectional, proj_size=proj, bias=bias,
                            batch_first=batch_first))
    return configs


INPUT_FORMS = ("padded", "unbatched", "packed-sorted", "packed-unsorted")


def _config_id(config, form, with_hx):
    parts = [config["cell"], f"L{config['num_layers']}", "bi" if config["bidirectional"] else "uni"]
    if config["proj_size"]:
        parts.append(f"P{config['proj_size']}")
    if not config["bias"]:
        parts.append("nobias")
    if config["batch_first"]:
        parts.append("bf")
    return "-".join(parts + [form, "hx" if with_hx else "nohx"])


GRID = [(c, f, h) for c in _module_configs() for f in INPUT_FORMS for h in (True, False)
        if not (f == "unbatched" and c["batch_first"]) and not (f.startswith("packed") and c["batch_first"])]


def _make_pair(config, dtype):
    kwargs = {k: v for k, v in config.items() if k != "cell"}
    if config["cell"] == "gru":
        kwargs.pop("proj_size")
    torch_class, fast_class = (nn.LSTM, rnntl_fast.LSTM) if config["cell"] == "lstm" else (nn.GRU, rnntl_fast.GRU)
    torch.manual_seed(1)
    reference = torch_class(I, H, dtype=dtype, **kwargs)
    torch.manual_seed(1)
    fast = fast_class(I, H, dtype=dtype, **kwargs)
    return reference, fast


def _inputs(config, form, with_hx, seed=2):
    g = torch.Generator().manual_seed(seed)
    directions = 2 if config["bidirectional"] else 1
    out = config["proj_size"] or H
    states = directions * config["num_layers"]
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    hx = [torch.randn(states, B, out, generator=g, dtype=torch.float64)]
    if config["cell"] == "lstm":
        hx.append(torch.randn(states, B, H, generator=g, dtype=torch.float64))
    if form == "unbatched":
        x, hx = x[:, 0], [h[:, 0] for h in hx]
    elif config["batch_first"]:
        x = x.transpose(0, 1).contiguous()
    return x, (hx if with_hx else None)


def _run(module, config, form, x, hx, dtype):
    """Forward + backward of a fixed random loss; returns outputs and every gradient."""
    x = x.to(dtype).detach().requires_grad_(True)
    hx = None if hx is None else [h.to(dtype).detach().requires_grad_(True) for h in hx]
    given_hx = None if hx is None else (tuple(hx) if config["cell"] == "lstm" else hx[0])
    if form.startswith("packed"):
        lengths = torch.tensor(LENGTHS if form == "packed-unsorted" else sorted(LENGTHS, reverse=True))
        inp = pack_padded_sequence(x, lengths, enforce_sorted=(form == "packed-sorted"))
    else:
        inp = x
    output, state = module(inp, given_hx)
    if form.startswith("packed"):
        assert isinstance(output, PackedSequence)
        output_tensor = output.data
    else:
        output_tensor = output
    states = list(state) if isinstance(state, tuple) else [state]
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
               for t in [output_tensor] + states)
    leaves = [x] + (hx or []) + list(module.parameters())
    grads = torch.autograd.grad(loss, leaves)
    names = ["input"] + [f"hx{i}" for i in range(len(hx or []))] + [n for n, _ in module.named_parameters()]
    results = {"output": output_tensor.detach(), **{f"state{i}": s.detach() for i, s in enumerate(states)}}
    results.update({"grad_" + n: g for n, g in zip(names, grads)})
    return results, output


@pytest.mark.parametrize("config,form,with_hx", GRID, ids=[_config_id(*g) for g in GRID])
def test_parity_with_torch_nn(config, form, with_hx):
    x, hx = _inputs(config, form, with_hx)
    reference64, fast64 = _make_pair(config, torch.float64)
    reference32, fast32 = _make_pair(config, torch.float32)
    expected, reference_output = _run(reference64, config, form, x, hx, torch.float64)
    baseline, _ = _run(reference32, config, form, x, hx, torch.float32)
    fast, fast_output = _run(fast32, config, form, x, hx, torch.float32)
    assert expected.keys() == fast.keys()
    for name in expected:
        assert_within_error_rule(name, fast[name], baseline[name], expected[name], torch.float32)
    exact, _ = _run(fast64, config, form, x, hx, torch.float64)
    for name in expected:
        torch.testing.assert_close(exact[name], expected[name], rtol=1e-9, atol=1e-9)
    if form.startswith("packed"):
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(fast_output, field), getattr(reference_output, field)
            assert (a is None and b is None) or torch.equal(a, b), field


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_same_seed_same_weights_names_and_repr(cell):
    config = dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.25,
                  **({"proj_size": 2} if cell == "lstm" else {}))
    torch.manual_seed(5)
    reference = (nn.LSTM if cell == "lstm" else nn.GRU)(3, 4, **config)
    torch.manual_seed(5)
    fast = (rnntl_fast.LSTM if cell == "lstm" else rnntl_fast.GRU)(3, 4, **config)
    assert list(reference.state_dict()) == list(fast.state_dict())
    for (name, a), (_, b) in zip(reference.named_parameters(), fast.named_parameters()):
        assert torch.equal(a, b), name
    assert repr(fast) == repr(reference)
    assert [[p.shape for p in w] for w in fast.all_weights] == [[p.shape for p in w] for w in reference.all_weights]
    assert fast._flat_weights_names == reference._flat_weights_names
    fast.flatten_parameters()
    # state_dict loads both ways with strict=True
    fast.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(fast.state_dict(), strict=True)


def test_extra_arguments_in_repr_and_validated():
    module = rnntl_fast.LSTM(3, 4, grad_clip=1.0, cell_clip=3.0, backend="reference")
    assert repr(module) == "LSTM(3, 4, grad_clip=1.0, backend='reference', cell_clip=3.0)"
    with pytest.raises(ValueError, match="grad_clip must be a finite"):
        rnntl_fast.GRU(3, 4, grad_clip=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        rnntl_fast.LSTM(3, 4, backend="fastest")
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        rnntl_fast.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        rnntl_fast.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="dropout should be a number in range"):
        rnntl_fast.LSTM(3, 4, dropout=1.5)


def test_copy_pickle_to_and_double():
    module = rnntl_fast.LSTM(3, 4, num_layers=2, grad_clip=0.5)
    x = torch.randn(5, 2, 3)
    expected = module(x)[0]
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        torch.testing.assert_close(clone(x)[0], expected)
        assert clone.grad_clip == 0.5
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], expected)
    double = copy.deepcopy(module).double()
    assert double.weight_ih_l0.dtype == torch.float64
    torch.testing.assert_close(double(x.double())[0].float(), expected, rtol=1e-5, atol=1e-6)
    assert module.to(torch.device("cpu")) is module


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 5)
        self.encoder = nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.blocks = nn.ModuleList([nn.GRU(12, 4), nn.Linear(4, 3)])

    def forward(self, tokens):
        y, _ = self.encoder(self.embedding(tokens))
        z, _ = self.blocks[0](y.transpose(0, 1))
        return self.blocks[1](z)


def test_convert_round_trip_keeps_state_dict_and_outputs():
    torch.manual_seed(0)
    model = Tagger()
    model.encoder.weight_hh_l1.requires_grad_(False)
    tokens = torch.randint(0, 20, (2, 7))
    expected = model(tokens)
    state = copy.deepcopy(model.state_dict())
    converted = rnntl_fast.convert(model, grad_clip=1.0)
    assert type(converted.encoder) is rnntl_fast.LSTM and type(converted.blocks[0]) is rnntl_fast.GRU
    assert converted.encoder.grad_clip == 1.0 and not converted.encoder.weight_hh_l1.requires_grad
    torch.testing.assert_close(converted(tokens), expected, rtol=1e-5, atol=1e-6)
    assert list(converted.state_dict()) == list(state)
    fresh = rnntl_fast.convert(Tagger())
    fresh.load_state_dict(state, strict=True)  # an nn.LSTM checkpoint loads into the converted model
    torch.testing.assert_close(fresh(tokens), expected, rtol=1e-5, atol=1e-6)
    back = rnntl_fast.convert(converted, inverse=True)
    assert type(back.encoder) is nn.LSTM and type(back.blocks[0]) is nn.GRU
    Tagger().load_state_dict(back.state_dict(), strict=True)
    torch.testing.assert_close(back(tokens), expected, rtol=1e-5, atol=1e-6)
    standalone = rnntl_fast.convert(nn.GRU(3, 4))
    assert type(standalone) is rnntl_fast.GRU


def test_dropout_rate_only_in_training(monkeypatch):
    calls = []
    real_dropout = torch.nn.functional.dropout

    def recording_dropout(input, p=0.5, training=True, inplace=False):
        output = real_dropout(input, p, training, inplace)
        calls.append((input.detach(), output.detach(), p, training))
        return output

    monkeypatch.setattr(rnntl_fast.nn.F, "dropout", recording_dropout)
    module = rnntl_fast.LSTM(8, 64, num_layers=3, dropout=0.3)
    x = torch.randn(20, 16, 8)
    module.train()
    module(x)
    assert len(calls) == 2  # after every layer but the last
    for inp, out, p, training in calls:
        assert p == 0.3 and training
        dropped = (out == 0) & (inp != 0)
        rate = dropped.float().mean().item()
        n = inp.numel()
        assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5, rate  # within 4 standard errors
        kept = out != 0
        torch.testing.assert_close(out[kept], inp[kept] / 0.7)
    calls.clear()
    module.eval()
    eval_out = module(x)[0]
    assert calls == []
    torch.testing.assert_close(module(x)[0], eval_out)  # deterministic in eval


BAD_CALLS = [
    ("hx-shape", lambda m, x: m(x, (torch.randn(1, 3, 6), torch.randn(1, 2, 6))), RuntimeError,
     r"Expected hidden\[0\] size \(1, 2, 6\), got \[1, 3, 6\]"),
    ("cx-shape", lambda m, x: m(x, (torch.randn(1, 2, 6), torch.randn(2, 2, 6))), RuntimeError,
     r"Expected hidden\[1\] size \(1, 2, 6\), got \[2, 2, 6\]"),
    ("hx-not-tuple", lambda m, x: m(x, torch.randn(1, 2, 6)), TypeError, "hx must be a tuple"),
    ("input-size", lambda m, x: m(torch.randn(5, 2, 7)), RuntimeError, "input.size\\(-1\\) must be equal to input_size. Expected 4, got 7"),
    ("input-dtype", lambda m, x: m(x.double()), ValueError, "does not match the module's parameters' dtype"),
    ("input-rank", lambda m, x: m(x[None]), ValueError, "Expected input to be 2D or 3D, got 4D"),
    ("unbatched-hx-rank", lambda m, x: m(x[:, 0], (torch.randn(1, 2, 6), torch.randn(1, 2, 6))), RuntimeError,
     "For unbatched 2-D input, hx should also be 2-D"),
    ("not-a-tensor", lambda m, x: m([[1.0]]), TypeError, "input must be a Tensor or a PackedSequence"),
]


@pytest.mark.parametrize("call,error,message", [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS])
def test_bad_module_input_raises_clear_error(call, error, message):
    module = rnntl_fast.LSTM(4, 6)
    with pytest.raises(error, match=message):
        call(module, torch.randn(5, 2, 4))


@pytest.mark.parametrize("cell,T,B,I,H", [("lstm", 50, 16, 64, 64), ("gru", 50, 16, 64, 64),
                                          ("lstm", 100, 32, 96, 96), ("gru", 100, 32, 96, 96)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("seed", [0, 1])
def test_long_reductions_within_error_rule(cell, T, B, I, H, seed):
    """Weight and bias gradients sum over T*B rows: at these sizes a float32 sum taken in one
    pass is measurably less accurate than torch.nn's; the rule must still hold."""
    torch.manual_seed(seed)
    torch_class, fast_class = (nn.LSTM, rnntl_fast.LSTM) if cell == "lstm" else (nn.GRU, rnntl_fast.GRU)
    reference = torch_class(I, H)
    fast = fast_class(I, H)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(T, B, I)

    def outputs_and_grads(module, dtype):
        module = copy.deepcopy(module).to(dtype)
        inp = x.to(dtype).requires_grad_(True)
        out = module(inp)[0]
        weights = torch.linspace(-2, 2, out.numel(), dtype=torch.float64).reshape(out.shape).to(dtype)
        return [out] + list(torch.autograd.grad((out * weights).sum(), [inp] + list(module.parameters())))

    expected = outputs_and_grads(reference, torch.float64)
    baseline = outputs_and_grads(reference, torch.float32)
    result = outputs_and_grads(fast, torch.float32)
    names = ["output", "input"] + [name for name, _ in reference.named_parameters()]
    for name, f, b, e in zip(names, result, baseline, expected):
        assert_within_error_rule(name, f, b, e, torch.float32)


@pytest.mark.parametrize("used", ["output", "h_n", "c_n"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_loss_on_one_output_only_matches_torch_nn(cell, used):
    """The ops' autograd passes None for the gradients of unused outputs (no zero-filled
    tensors): a loss on one output alone, through a packed 2-layer bidirectional stack,
    must still give torch.nn's gradients."""
    if cell == "gru" and used == "c_n":
        pytest.skip("a GRU has no c_n")
    torch.manual_seed(3)
    fast_class, reference_class = (rnntl_fast.LSTM, nn.LSTM) if cell == "lstm" else (rnntl_fast.GRU, nn.GRU)
    fast = fast_class(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    reference = reference_class(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    reference.load_state_dict(fast.state_dict())
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    gradients = []
    for module in (fast, reference):
        leaf = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(leaf, torch.tensor([6, 2, 4]), enforce_sorted=False)
        output, state = module(packed)
        chosen = {"output": output.data, "h_n": state[0] if cell == "lstm" else state,
                  "c_n": state[1] if cell == "lstm" else None}[used]
        chosen.pow(2).sum().backward()
        gradients.append([leaf.grad] + [p.grad for p in module.parameters()])
    for mine, theirs in zip(*gradients):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


LENGTHS_GRID = [c for c in _module_configs() if c["bias"]]


@pytest.mark.parametrize("config", LENGTHS_GRID, ids=[_config_id(c, "lengths", False) for c in LENGTHS_GRID])
def test_lengths_keyword_equals_packed_input(config):
    """module(padded, lengths=L) gives what torch.nn gives for the same rows packed: outputs
    (zero past each length), final states and every gradient, in float64."""
    reference, fast = _make_pair(config, torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    x[3:, 2] = float("nan")  # past row 2's length: must reach nothing
    lengths = torch.tensor(LENGTHS)
    valid = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)  # [T, B]
    weights = torch.randn(T, B, (2 if config["bidirectional"] else 1) * (config["proj_size"] or H), generator=g,
                          dtype=torch.float64)

    def run(module, padded_form):
        leaf = x.clone().requires_grad_(True)
        if padded_form:
            inp = leaf.transpose(0, 1) if config["batch_first"] else leaf
            output, state = module(inp, lengths=lengths)
            output = output.transpose(0, 1) if config["batch_first"] else output
        else:
            clean = torch.where(valid.unsqueeze(2), leaf, torch.zeros((), dtype=leaf.dtype))
            packed = pack_padded_sequence(clean, lengths, enforce_sorted=False)
            if config["batch_first"]:
                module = copy.deepcopy(module)
                module.batch_first = False
            packed_out, state = module(packed)
            output, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out, total_length=T)
        states = list(state) if isinstance(state, tuple) else [state]
        loss = (output * weights).sum() + sum(s.sum() for s in states)
        grads = torch.autograd.grad(loss, [leaf] + list(module.parameters()))
        return [output.detach()] + [s.detach() for s in states] + [grads[0].nan_to_num(0.0)] + list(grads[1:])

    expected = run(reference, padded_form=False)
    got = run(fast, padded_form=True)
    assert torch.isfinite(got[0]).all() and (got[0][~valid] == 0).all()
    for index, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"result {index}")


@pytest.mark.parametrize("call,error,message", [
    ("packed", TypeError, "lengths= is for padded Tensor input"),
    ("unbatched", ValueError, "lengths= needs batched 3-D input"),
    ("too-long", ValueError, "lengths must be <= the number of steps"),
    ("wrong-count", ValueError, r"lengths must have shape \[2\]"),
    ("float", TypeError, "lengths must be integers"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else "")
def test_lengths_keyword_errors(call, error, message):
    module = rnntl_fast.GRU(4, 6)
    x = torch.randn(5, 2, 4)
    arguments = {"packed": (pack_padded_sequence(x, [5, 3]), [5, 3]), "unbatched": (x[:, 0], [5]),
                 "too-long": (x, [6, 1]), "wrong-count": (x, [5, 4, 3]), "float": (x, torch.tensor([2.0, 1.0]))}
    inp, lengths = arguments[call]
    with pytest.raises(error, match=message):
        module(inp, lengths=lengths)
