"""Recurrent dropout, zoneout, weight drop, layer normalisation (docs/semantics.md, section 10)
and the Elman RNN: the reference loop against an independent cell loop written here, the
modules' use of them, rnntl_fast.RNN against torch.nn.RNN, and the errors."""
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnntl_fast
from rnntl_fast import ops
from rnntl_fast.ops import LayerNormWeights
from rnntl_fast.ops.backend import BACKEND_RUNS
from rnntl_fast.ops.draws import draw_seed, philox_draws

F64 = torch.float64
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


# -- an independent cell loop: torch.nn's cell equations written out, whole batch per step,
#    rows past their length carried with torch.where, every regularizer explicit ------------------
def _layer_norm(v, gain, bias=None):
    centred = v - v.mean(-1, keepdim=True)
    y = centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + 1e-5)
    y = y * gain if gain is not None else y
    return y + bias if bias is not None else y


def _clamp_gradient(tensor, limit):
    if limit and tensor.requires_grad:
        tensor.register_hook(lambda g: g.clamp(-limit, limit))


def _cell_loop(cell, x, p, h0, c0=None, lengths=None, reverse=False, nonlinearity="tanh", cell_clip=None,
               proj_clip=None, state_clip=None, gate_clip=None, mask=None, keep_h=None, keep_c=None, ln=None):
    """x [T, B, I]; p: dict of weight_ih, weight_hh, bias_ih, bias_hh, weight_hr (or None);
    mask [B, P]; keep_h [T, B, P]; keep_c [T, B, H]; ln: LayerNormWeights. Returns output, h_n(, c_n)."""
    steps, batch, _ = x.shape
    h, c = h0, c0
    outputs = [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        valid = torch.ones(batch, 1, dtype=torch.bool) if lengths is None else (torch.as_tensor(lengths) > t)[:, None]
        h_in = h * mask if mask is not None else h
        gx, gh = x[t] @ p["weight_ih"].t(), h_in @ p["weight_hh"].t()
        if ln is not None:
            gx, gh = _layer_norm(gx, ln.ih), _layer_norm(gh, ln.hh)
        if p["bias_ih"] is not None:
            gx, gh = gx + p["bias_ih"], gh + p["bias_hh"]
        if cell == "lstm":
            a = gx + gh
            _clamp_gradient(a, gate_clip)
            i, f, g, o = a.chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if cell_clip:
                c_new = c_new.clamp(-cell_clip, cell_clip)
            c_carried = torch.where(valid, keep_c[t] * c + (1 - keep_c[t]) * c_new if keep_c is not None else c_new, c)
            _clamp_gradient(c_carried, state_clip)
            cell_read = c_new if keep_c is not None else c_carried
            if ln is not None:
                cell_read = _layer_norm(cell_read, ln.cell_weight, ln.cell_bias)
            h_new = torch.sigmoid(o) * torch.tanh(cell_read)
            if p["weight_hr"] is not None:
                h_new = h_new @ p["weight_hr"].t()
            if proj_clip:
                h_new = h_new.clamp(-proj_clip, proj_clip)
            c = c_carried
        elif cell == "gru":
            (x_r, x_z, x_n), (h_r, h_z, h_n) = gx.chunk(3, 1), gh.chunk(3, 1)
            a_r, a_z = x_r + h_r, x_z + h_z
            _clamp_gradient(a_r, gate_clip)
            _clamp_gradient(a_z, gate_clip)
            r, z = torch.sigmoid(a_r), torch.sigmoid(a_z)
            a_n = x_n + r * h_n
            _clamp_gradient(a_n, gate_clip)
            h_new = (1 - z) * torch.tanh(a_n) + z * h
        else:
            a = gx + gh
            _clamp_gradient(a, gate_clip)
            h_new = torch.tanh(a) if nonlinearity == "tanh" else torch.relu(a)
        if keep_h is not None:
            h_new = keep_h[t] * h + (1 - keep_h[t]) * h_new
        h = torch.where(valid, h_new, h)
        _clamp_gradient(h, state_clip)
        outputs[t] = torch.where(valid, h, torch.zeros(()))
    return (torch.stack(outputs), h) + ((c,) if cell == "lstm" else ())


# -- cases ------------------------------------------------------------------------------------
def _case(cell, T=5, B=3, I=4, H=6, proj=0, lengths=None, reverse=False, mask=False, zoneout=None, ln=False,
          clips=False, grad_clip=None, nonlinearity="tanh", bias=True):
    return dict(cell=cell, T=T, B=B, I=I, H=H, proj=proj, lengths=lengths, reverse=reverse, mask=mask,
                zoneout=zoneout, ln=ln, clips=clips, grad_clip=grad_clip, nonlinearity=nonlinearity, bias=bias)


def _case_id(c):
    parts = [c["cell"], f"T{c['T']}-B{c['B']}-I{c['I']}-H{c['H']}", "rev" if c["reverse"] else "fwd"]
    parts += [f"proj{c['proj']}"] * bool(c["proj"]) + ["lengths"] * (c["lengths"] is not None)
    parts += ["rdrop"] * c["mask"] + [f"zone_{c['zoneout']}"] * bool(c["zoneout"]) + ["ln"] * c["ln"]
    parts += ["clips"] * c["clips"] + [f"gclip_{c['grad_clip']}"] * bool(c["grad_clip"])
    parts += ["relu"] * (c["nonlinearity"] == "relu") + ["nobias"] * (not c["bias"])
    return "-".join(parts)


def _cases():
    cases = []
    for cell in ("lstm", "gru", "rnn"):
        ln_options = (False,) if cell == "rnn" else (False, True)
        cases += [_case(cell, mask=True), _case(cell, zoneout="draws"), _case(cell, zoneout="fractions")]
        cases += [_case(cell, ln=True)] * (cell != "rnn")
        for ln, mode in itertools.product(ln_options, ("state", "gates")):
            cases.append(_case(cell, T=7, B=4, I=5, H=13 if cell != "lstm" else 8, proj=3 if cell == "lstm" else 0,
                               lengths=(7, 3, 0, 5), reverse=mode == "gates", mask=True, zoneout="draws", ln=ln,
                               clips=cell == "lstm", grad_clip=mode,
                               nonlinearity="relu" if mode == "gates" else "tanh"))
        cases.append(_case(cell, lengths=(2, 5, 4), mask=True, zoneout="fractions", ln=cell != "rnn", bias=False))
    return cases


CASES = _cases()


def _make_case_tensors(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.5: (torch.randn(*shape, generator=g, dtype=F64) * scale)  # noqa: E731
    G, H = GATES[c["cell"]] * c["H"], c["H"]
    P = c["proj"] or H
    params = dict(weight_ih=rand(G, c["I"]), weight_hh=rand(G, P), bias_ih=rand(G) if c["bias"] else None,
                  bias_hh=rand(G) if c["bias"] else None, weight_hr=rand(P, H) if c["proj"] else None)
    x, h0 = rand(c["T"], c["B"], c["I"], scale=1.0), rand(c["B"], P)
    c0 = rand(c["B"], H) if c["cell"] == "lstm" else None
    mask = (torch.rand(c["B"], P, generator=g, dtype=F64) > 0.3).to(F64) / 0.7 if c["mask"] else None
    keep_h = keep_c = None
    if c["zoneout"]:
        def keep(width):
            u = torch.rand(c["T"], c["B"], width, generator=g, dtype=F64)
            return (u < 0.4).to(F64) if c["zoneout"] == "draws" else u
        keep_h = keep(P)
        keep_c = keep(H) if c["cell"] == "lstm" else None
    ln = None
    if c["ln"]:
        ln = LayerNormWeights(1 + rand(G, scale=0.3), 1 + rand(G, scale=0.3),
                              *((1 + rand(H, scale=0.3), rand(H) if c["bias"] else None) if c["cell"] == "lstm"
                                else (None, None)))
    return params, x, h0, c0, mask, keep_h, keep_c, ln


def _run_reference_op(c, params, x, h0, c0, mask, keep_h, keep_c, ln):
    common = dict(lengths=c["lengths"], reverse=c["reverse"], grad_clip=0.05 if c["grad_clip"] else None,
                  grad_clip_mode=c["grad_clip"] or "state", recurrent_mask=mask, backend="reference")
    args = (x, params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"])
    if c["cell"] == "lstm":
        clips = dict(cell_clip=0.7, proj_clip=0.3) if c["clips"] else {}
        return ops.lstm(*args, params["weight_hr"], h0, c0, zoneout_h=keep_h, zoneout_c=keep_c, layer_norm=ln,
                        **clips, **common)
    if c["cell"] == "gru":
        return ops.gru(*args, h0, zoneout=keep_h, layer_norm=ln, **common)
    return ops.rnn(*args, h0, zoneout=keep_h, nonlinearity=c["nonlinearity"], **common)


def _run_cell_loop(c, params, x, h0, c0, mask, keep_h, keep_c, ln):
    clip = 0.05 if c["grad_clip"] else None
    return _cell_loop(c["cell"], x, params, h0, c0, c["lengths"], c["reverse"], c["nonlinearity"],
                      cell_clip=0.7 if c["clips"] else None, proj_clip=0.3 if c["clips"] else None,
                      state_clip=clip if c["grad_clip"] == "state" else None,
                      gate_clip=clip if c["grad_clip"] == "gates" else None,
                      mask=mask, keep_h=keep_h, keep_c=keep_c, ln=ln)


def _leaves(params, x, h0, c0, mask, keep_h, keep_c, ln):
    """Fresh leaf copies that require grad (None stays None), in one flat list plus the
    structure the runs take."""
    fresh = lambda t: None if t is None else t.detach().clone().requires_grad_(True)  # noqa: E731
    params = {k: fresh(v) for k, v in params.items()}
    x, h0, c0, mask, keep_h, keep_c = map(fresh, (x, h0, c0, mask, keep_h, keep_c))
    ln = None if ln is None else LayerNormWeights(*map(fresh, ln))
    flat = [t for t in list(params.values()) + [x, h0, c0, mask, keep_h, keep_c] + list(ln or ()) if t is not None]
    return (params, x, h0, c0, mask, keep_h, keep_c, ln), flat


def _outputs_and_gradients(run, c, tensors):
    (structure, flat) = _leaves(*tensors)
    results = run(c, *structure)
    g = torch.Generator().manual_seed(7)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=F64)).sum() for r in results)
    return [r.detach() for r in results], torch.autograd.grad(loss, flat, allow_unused=True)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_reference_matches_an_independent_cell_loop(case):
    tensors = _make_case_tensors(case)
    expected, expected_grads = _outputs_and_gradients(_run_cell_loop, case, tensors)
    actual, actual_grads = _outputs_and_gradients(_run_reference_op, case, tensors)
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name)
    assert len(actual_grads) == len(expected_grads)
    for index, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        a = torch.zeros(()) if a is None else a
        e = torch.zeros(()) if e is None else e
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=f"gradient {index}")
    assert any(float(g.abs().max()) > 0 for g in actual_grads if g is not None)


GRADCHECK_CASES = [_case("lstm", T=3, B=2, I=2, H=3, proj=2, lengths=(3, 1), mask=True, zoneout="fractions", ln=True,
                         clips=True),
                   _case("gru", T=3, B=2, I=2, H=3, lengths=(2, 3), reverse=True, mask=True, zoneout="fractions",
                         ln=True),
                   _case("rnn", T=3, B=2, I=2, H=3, lengths=(3, 2), mask=True, zoneout="fractions")]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[_case_id(c) for c in GRADCHECK_CASES])
def test_reference_gradcheck_with_fixed_masks_and_layer_norm(case):
    (params, x, h0, c0, mask, keep_h, keep_c, ln), _ = _leaves(*_make_case_tensors(case, seed=3))
    names = [k for k, v in params.items() if v is not None]
    ln_fields = [f for f in LayerNormWeights._fields if ln is not None and getattr(ln, f) is not None]

    def run(*inputs):
        it = iter(inputs)
        p = {k: (next(it) if k in names else None) for k in params}
        x_, h0_ = next(it), next(it)
        c0_ = next(it) if c0 is not None else None
        ln_ = LayerNormWeights(**{f: next(it) for f in ln_fields}) if ln is not None else None
        return _run_reference_op(case, p, x_, h0_, c0_, mask.detach(), keep_h.detach(),
                                 None if keep_c is None else keep_c.detach(), ln_)

    inputs = [params[k] for k in names] + [x, h0] + ([c0] if c0 is not None else []) + \
        [getattr(ln, f) for f in ln_fields]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6)


# -- what each regularizer reaches ------------------------------------------------------------
def test_recurrent_mask_reaches_only_the_recurrent_product():
    case = _case("lstm", T=6)
    params, x, h0, c0, *_ = _make_case_tensors(case)
    mask = torch.ones(case["B"], case["H"], dtype=F64)
    mask[:, 2] = 0  # unit 2 of h_{t-1} never enters W_hh h_{t-1}
    out, h_n, c_n = _run_reference_op(case, params, x, h0, c0, mask, None, None, None)
    assert bool((out[:, :, 2] != 0).all()) and bool((h_n[:, 2] != 0).all()) and bool((c_n[:, 2] != 0).all())
    # the same as zeroing column 2 of weight_hh: the mask is the same at every step
    zeroed = dict(params, weight_hh=params["weight_hh"] * mask[0])
    expected = _run_reference_op(case, zeroed, x, h0, c0, None, None, None, None)
    for a, e in zip((out, h_n, c_n), expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-14)


def test_zoneout_weights_zero_give_the_plain_cell_and_one_keep_the_initial_state():
    case = _case("lstm", proj=2, lengths=(5, 2, 4))
    params, x, h0, c0, *_ = _make_case_tensors(case)
    plain = _run_reference_op(case, params, x, h0, c0, None, None, None, None)
    zeros = lambda width: torch.zeros(case["T"], case["B"], width, dtype=F64)  # noqa: E731
    for a, e in zip(_run_reference_op(case, params, x, h0, c0, None, zeros(2), zeros(case["H"]), None), plain):
        assert torch.equal(a, e)
    out, h_n, c_n = _run_reference_op(case, params, x, h0, c0, None, zeros(2) + 1, zeros(case["H"]) + 1, None)
    assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    valid = (torch.arange(case["T"])[:, None] < torch.tensor(case["lengths"])[None, :])[:, :, None]
    assert torch.equal(out, torch.where(valid, h0.expand_as(out), torch.zeros(())))


def _lstm_module(**extras):
    torch.manual_seed(11)
    return rnntl_fast.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, backend="reference",
                           dtype=F64, **extras)


def _module_inputs(batch=3, steps=5):
    g = torch.Generator().manual_seed(12)
    return torch.randn(steps, batch, 4, generator=g, dtype=F64)


def _stack_with_ops(module, x, draws, lengths=None):
    """The module's forward written out with ops.lstm per layer-direction and the given
    draws per layer-direction (recurrent mask, weight mask, keep_h, keep_c; each or None)."""
    layer_input, finals_h, finals_c = x, [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(module.num_directions):
            weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = module._layer_weights(layer, direction)
            mask, weight_mask, keep_h, keep_c = draws[layer * module.num_directions + direction]
            weight_hh = weight_hh * weight_mask if weight_mask is not None else weight_hh
            out, h_n, c_n = ops.lstm(layer_input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, None, None,
                                     lengths, reverse=direction == 1, recurrent_mask=mask, zoneout_h=keep_h,
                                     zoneout_c=keep_c, layer_norm=module._layer_norm_weights(layer, direction),
                                     backend="reference")
            outputs.append(out)
            finals_h.append(h_n)
            finals_c.append(c_n)
        layer_input = torch.cat(outputs, 2)
    return layer_input, torch.stack(finals_h), torch.stack(finals_c)


def _draws(shape, probability):
    """The modules' Bernoulli draws as docs/semantics.md section 10 defines them: u < probability
    for u the Philox stream of a seed drawn from the default generator (torch ops only)."""
    return philox_draws(shape, probability, 1.0, draw_seed("cpu"), F64, "cpu")


def test_module_training_step_uses_one_draw_per_call_and_layer_direction():
    """Masks come from the default generator, per layer-direction in the documented order
    (recurrent mask, weight mask, zoneout of h, of c), once per forward call."""
    p, w, z_h, z_c = 0.3, 0.4, 0.2, 0.1
    module = _lstm_module(recurrent_dropout=p, weight_drop=w, zoneout=(z_h, z_c), layer_norm=True)
    x = _module_inputs()
    torch.manual_seed(21)
    out, (h_n, c_n) = module(x)
    torch.manual_seed(21)
    draws = []
    for _ in range(4):
        draws.append((_draws((3, 3), 1 - p) / (1 - p), _draws((24, 3), 1 - w) / (1 - w), _draws((5, 3, 3), z_h),
                      _draws((5, 3, 6), z_c)))
    expected = _stack_with_ops(module, x, draws)
    for a, e in zip((out, h_n, c_n), expected):
        assert torch.equal(a, e)


def test_module_eval_uses_expectations_and_is_deterministic():
    module = _lstm_module(recurrent_dropout=0.3, weight_drop=0.4, zoneout=(0.2, 0.1), layer_norm=True).eval()
    x = _module_inputs()
    first, second = module(x), module(x)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1][1], second[1][1])
    keep = lambda z, width: torch.full((5, 3, width), z, dtype=F64)  # noqa: E731
    expected = _stack_with_ops(module, x, [(None, None, keep(0.2, 3), keep(0.1, 6))] * 4)
    for a, e in zip((first[0], *first[1]), expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-14)


def test_module_zoneout_one_keeps_the_initial_state_in_training():
    module = rnntl_fast.GRU(4, 5, backend="reference", dtype=F64, zoneout=1.0)
    x, h0 = _module_inputs(), torch.randn(1, 3, 5, dtype=F64)
    out, h_n = module(x, h0)
    assert torch.equal(h_n, h0) and torch.equal(out, h0.expand_as(out))


def test_module_input_forms_agree_in_eval_and_frozen_weights_train():
    torch.manual_seed(2)
    module = rnntl_fast.LSTM(4, 6, batch_first=True, bidirectional=True, proj_size=3, backend="reference",
                             dtype=F64, zoneout=(0.3, 0.2), recurrent_dropout=0.2, weight_drop=0.2,
                             layer_norm=True).eval()
    x, lengths = _module_inputs().transpose(0, 1), torch.tensor([3, 5, 2])
    padded_out, (padded_h, _) = module(x, lengths=lengths)
    packed_out, (packed_h, _) = module(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    torch.testing.assert_close(packed_out.data, pack_padded_sequence(padded_out, lengths, batch_first=True,
                                                                     enforce_sorted=False).data, rtol=0, atol=1e-14)
    torch.testing.assert_close(packed_h, padded_h, rtol=0, atol=1e-14)
    module.train()
    for name in ("weight_hh_l0", "layer_norm_hh_weight_l0_reverse"):
        getattr(module, name).requires_grad_(False)
    module(x, lengths=lengths)[0].sum().backward()
    assert module.weight_hh_l0.grad is None and module.layer_norm_hh_weight_l0_reverse.grad is None
    assert module.weight_hh_l0_reverse.grad is not None and module.layer_norm_cell_weight_l0.grad is not None


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_weight_drop_zeroes_the_gradient_of_dropped_weights_and_keeps_the_state_dict(cell):
    make = {"lstm": rnntl_fast.LSTM, "gru": rnntl_fast.GRU, "rnn": rnntl_fast.RNN}[cell]
    module = make(4, 5, backend="reference", dtype=F64, weight_drop=0.5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(31)
    out = module(_module_inputs())[0]
    out.pow(2).sum().backward()
    torch.manual_seed(31)
    kept = _draws(tuple(module.weight_hh_l0.shape), 0.5) > 0
    grad = module.weight_hh_l0.grad
    assert bool((grad[~kept] == 0).all()) and bool((grad[kept] != 0).all())
    assert list(module.state_dict()) == list(before)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_seeded_training_step_is_reproducible(cell):
    make = {"lstm": rnntl_fast.LSTM, "gru": rnntl_fast.GRU, "rnn": rnntl_fast.RNN}[cell]
    module = make(4, 5, num_layers=2, backend="reference", dtype=F64, recurrent_dropout=0.3, weight_drop=0.3,
                  zoneout=0.3)
    x = _module_inputs()

    def step(seed):
        module.zero_grad()
        torch.manual_seed(seed)
        out = module(x)[0]
        out.pow(2).sum().backward()
        return [out.detach()] + [p.grad.clone() for p in module.parameters()]

    first, again, other = step(5), step(5), step(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


# -- off means exactly the plain module ----------------------------------------------------------
OFF = dict(recurrent_dropout=0.0, zoneout=0.0, weight_drop=0.0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_options_off_are_bitwise_the_plain_module(cell):
    make = rnntl_fast.LSTM if cell == "lstm" else rnntl_fast.GRU
    x = torch.randn(5, 3, 4)
    runs = []
    for extras in ({}, dict(OFF, layer_norm=False, **({"zoneout": (0.0, 0.0)} if cell == "lstm" else {}))):
        torch.manual_seed(3)
        module = make(4, 6, num_layers=2, bidirectional=True, dropout=0.2, **extras)
        assert list(module.state_dict()) == list(make(4, 6, num_layers=2, bidirectional=True).state_dict())
        torch.manual_seed(4)
        out = module(x)[0]
        out.sum().backward()
        runs.append([out] + [p.grad for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_dropouts_need_no_kernel_in_eval_mode():
    """recurrent_dropout and weight_drop draw nothing in eval: the compiled backend runs, equal to the plain module."""
    if not rnntl_fast._ext.HAS_CPU_KERNELS:
        pytest.skip("rnntl_fast._C is not built")
    torch.manual_seed(3)
    plain = rnntl_fast.LSTM(4, 6).eval()
    torch.manual_seed(3)
    regularized = rnntl_fast.LSTM(4, 6, recurrent_dropout=0.5, weight_drop=0.5).eval()
    x = torch.randn(5, 3, 4)
    assert torch.equal(plain(x)[0], regularized(x)[0])
    # In training the cpu kernels run the drawn masks (tests/test_recurrent_regularizers_cpu.py checks the values).
    trained = regularized.train()(x)[0]
    assert torch.isfinite(trained).all() and not torch.equal(trained, plain(x)[0])


# -- layer norm parameters and convert ----------------------------------------------------------
@pytest.mark.parametrize("cell,bias", [("lstm", True), ("lstm", False), ("gru", True)], ids=["lstm", "lstm-nobias",
                                                                                           "gru"])
def test_layer_norm_parameters_order_and_initial_values(cell, bias):
    torch_class, fast_class = (nn.LSTM, rnntl_fast.LSTM) if cell == "lstm" else (nn.GRU, rnntl_fast.GRU)
    torch.manual_seed(1)
    reference = torch_class(4, 6, num_layers=2, bidirectional=True, bias=bias)
    torch.manual_seed(1)
    module = fast_class(4, 6, num_layers=2, bidirectional=True, bias=bias, layer_norm=True)
    names = list(module.state_dict())
    G = 6 * (4 if cell == "lstm" else 3)
    expected = []
    for layer, suffix in itertools.product((0, 1), ("", "_reverse")):
        expected += [n for n in reference.state_dict() if n.endswith(f"_l{layer}{suffix}")]
        expected += [f"layer_norm_ih_weight_l{layer}{suffix}", f"layer_norm_hh_weight_l{layer}{suffix}"]
        if cell == "lstm":
            expected += [f"layer_norm_cell_weight_l{layer}{suffix}"] + [f"layer_norm_cell_bias_l{layer}{suffix}"] * bias
    assert names == expected
    for name, value in reference.state_dict().items():  # same seed: torch.nn's weights
        assert torch.equal(module.state_dict()[name], value), name
    assert module.layer_norm_ih_weight_l1_reverse.shape == (G,)
    assert torch.equal(module.layer_norm_hh_weight_l0, torch.ones(G))
    if cell == "lstm":
        assert torch.equal(module.layer_norm_cell_weight_l0, torch.ones(6))
    if cell == "lstm" and bias:
        assert torch.equal(module.layer_norm_cell_bias_l0, torch.zeros(6))
    assert module._flat_weights_names == reference._flat_weights_names


def test_convert_passes_regularizers_through_and_refuses_to_swap_them_back():
    model = nn.Sequential(nn.LSTM(4, 6), nn.GRU(6, 5))
    torch.manual_seed(0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rnntl_fast.convert(model, layer_norm=True, recurrent_dropout=0.2, backend="reference")
    assert isinstance(model[0], rnntl_fast.LSTM) and model[1].layer_norm and model[1].recurrent_dropout == 0.2
    for name, value in weights.items():
        assert torch.equal(model.state_dict()[name], value)
    assert torch.equal(model[0].layer_norm_cell_weight_l0, torch.ones(6))
    with pytest.raises(ValueError, match=r"layer_norm=True.*torch\.nn\.LSTM cannot run"):
        rnntl_fast.convert(model, inverse=True)
    plain = rnntl_fast.convert(rnntl_fast.GRU(3, 4, grad_clip=1.0), inverse=True)
    assert type(plain) is nn.GRU


# -- rnntl_fast.RNN against torch.nn.RNN ----------------------------------------------------------
def _rnn_configs():
    configs = []
    for layers, bidirectional, bias, batch_first, nonlinearity in itertools.product(
            (1, 2), (False, True), (True, False), (False, True), ("tanh", "relu")):
        if not bias and (layers == 2 or bidirectional):  # bias off with the simplest stacks only
            continue
        configs.append(dict(num_layers=layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first,
                            nonlinearity=nonlinearity))
    return configs


RNN_FORMS = ("padded", "unbatched", "packed")
RNN_GRID = [(c, f, hx) for c in _rnn_configs() for f in RNN_FORMS for hx in (False, True)
            if not (f != "padded" and c["batch_first"])]


def _rnn_id(config, form, with_hx):
    parts = [f"L{config['num_layers']}", "bi" if config["bidirectional"] else "uni", config["nonlinearity"]]
    parts += ["nobias"] * (not config["bias"]) + ["bf"] * config["batch_first"]
    return "-".join(parts + [form, "hx" if with_hx else "nohx"])


def _rnn_run(module, config, form, with_hx):
    g = torch.Generator().manual_seed(2)
    T, B, I, H, D = 5, 3, 4, 6, 2 if config["bidirectional"] else 1
    x = torch.randn(T, B, I, generator=g, dtype=F64)
    hx = torch.randn(D * config["num_layers"], B, H, generator=g, dtype=F64)
    if form == "unbatched":
        x, hx = x[:, 0], hx[:, 0]
    elif config["batch_first"]:
        x = x.transpose(0, 1).contiguous()
    x.requires_grad_(True)
    hx.requires_grad_(True)
    inp = pack_padded_sequence(x, torch.tensor([3, 5, 2]), enforce_sorted=False) if form == "packed" else x
    output, h_n = module(inp, hx if with_hx else None)
    out = output.data if isinstance(output, PackedSequence) else output
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum() + (h_n * torch.randn(h_n.shape, generator=g,
                                                                                            dtype=F64)).sum()
    grads = torch.autograd.grad(loss, [x, hx] + list(module.parameters()), allow_unused=True)
    return [out.detach(), h_n.detach()] + [torch.zeros(()) if g is None else g for g in grads]


@pytest.mark.parametrize("config,form,with_hx", RNN_GRID, ids=[_rnn_id(*g) for g in RNN_GRID])
def test_rnn_parity_with_torch_nn(config, form, with_hx):
    torch.manual_seed(1)
    reference = nn.RNN(4, 6, dtype=F64, **config)
    torch.manual_seed(1)
    fast = rnntl_fast.RNN(4, 6, dtype=F64, backend="reference", **config)
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), reference.parameters()))
    for a, e in zip(_rnn_run(fast, config, form, with_hx), _rnn_run(reference, config, form, with_hx)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_rnn_state_dict_repr_and_convert_both_ways():
    torch.manual_seed(0)
    reference = nn.RNN(3, 5, 2, "relu", batch_first=True, bidirectional=True, dropout=0.1)
    fast = rnntl_fast.RNN(3, 5, 2, "relu", batch_first=True, bidirectional=True, dropout=0.1)
    fast.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(fast.state_dict(), strict=True)
    assert repr(fast) == repr(reference) and fast.nonlinearity == "relu"
    converted = rnntl_fast.convert(reference, backend="reference")
    assert type(converted) is rnntl_fast.RNN and converted.nonlinearity == "relu" and converted.backend == "reference"
    back = rnntl_fast.convert(converted, inverse=True)
    assert type(back) is nn.RNN and back.nonlinearity == "relu" and back.batch_first
    for name, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], value)
    assert "RNN" in rnntl_fast.__all__ and rnntl_fast.RNN is rnntl_fast.nn.RNN


@pytest.mark.parametrize("args,kwargs", [
    ((3, 4, 1, "sigmoid"), {}), ((3, 4), {"nonlinearity": "gelu"}), ((3, 4), {"proj_size": 2}),
    ((3, 0), {}), ((3, 4, 0), {}), ((3, 4), {"dropout": 1.5}), ((3, 4.0), {}),
], ids=["positional-nonlinearity", "keyword-nonlinearity", "proj_size", "hidden0", "layers0", "dropout", "float-size"])
def test_rnn_constructor_errors_as_torch_nn(args, kwargs):
    with pytest.raises(Exception) as expected:
        nn.RNN(*args, **kwargs)
    with pytest.raises(expected.type) as actual:
        rnntl_fast.RNN(*args, **kwargs)
    assert str(actual.value).startswith(str(expected.value))  # rnntl_fast may add the value given


# -- clear errors ------------------------------------------------------------------------------
def _op_call(cell, backend, **given):
    x = torch.randn(4, 2, 3)
    G, H = GATES[cell] * 5, 5
    args = (x, torch.randn(G, 3), torch.randn(G, H))
    if cell == "lstm":
        return ops.lstm(*args, backend=backend, **given)
    return (ops.gru if cell == "gru" else ops.rnn)(*args, backend=backend, **given)


# The optional arguments of the LSTM and GRU (the cpu backend's Elman RNN runs both of the
# RNN's: tests/test_rnn_cpu.py).
OPTIONAL = [("lstm", "recurrent_mask", (2, 5)), ("lstm", "zoneout_h", (4, 2, 5)), ("lstm", "zoneout_c", (4, 2, 5)),
            ("lstm", "layer_norm", None), ("gru", "recurrent_mask", (2, 5)), ("gru", "zoneout", (4, 2, 5)),
            ("gru", "layer_norm", None)]


def _optional_value(cell, shape):
    if shape is None:
        G = GATES[cell] * 5
        return LayerNormWeights(torch.ones(G), torch.ones(G), *((torch.ones(5), None) if cell == "lstm" else ()))
    return torch.full(shape, 0.5)


@pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="rnntl_fast._C is not built")
@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("cell,name,shape", OPTIONAL, ids=[f"{c}-{n}" for c, n, _ in OPTIONAL])
def test_a_backend_without_the_option_refuses_it_by_name(cell, name, shape, backend):
    if name in BACKEND_RUNS["cpu"].get(cell, ()):
        tests = "tests/test_layer_norm_cpu.py" if name == "layer_norm" else "tests/test_recurrent_regularizers_cpu.py"
        pytest.skip(f"the cpu backend runs {name} of {cell} ({tests})")
    value = _optional_value(cell, shape)
    pattern = rf"rnntl_fast.ops.{cell}: backend 'cpu'.* does not run {name} yet; pass backend='reference'"
    with pytest.raises(NotImplementedError, match=pattern):
        _op_call(cell, backend, **{name: value})
    _op_call(cell, "reference", **{name: value})  # the reference runs it


@pytest.mark.skipif(not rnntl_fast.ops.backend.triton_available(), reason="triton is not installed")
def test_rnn_module_on_a_backend_without_the_kernel_is_refused_not_replaced(monkeypatch):
    # triton runs CPU tensors here (TRITON_INTERPRET=1, tests/conftest.py); taking its Elman
    # RNN entry away stands in for a backend without the kernel (cuda needs CUDA tensors).
    monkeypatch.delitem(BACKEND_RUNS["triton"], "rnn")
    with pytest.raises(NotImplementedError, match="backend 'triton' has no Elman RNN kernel yet"):
        rnntl_fast.RNN(3, 5, backend="triton")(torch.randn(4, 2, 3))


@pytest.mark.parametrize("cell,given,error,pattern", [
    ("lstm", {"recurrent_mask": torch.ones(2, 4)}, ValueError, r"recurrent_mask must have shape \[2, 5\]"),
    ("lstm", {"recurrent_mask": torch.ones(2, 5, dtype=F64)}, TypeError, "recurrent_mask has dtype"),
    ("lstm", {"zoneout_h": torch.full((4, 2, 5), 1.5)}, ValueError, r"zoneout_h must hold keep weights in \[0, 1\]"),
    ("lstm", {"zoneout_c": torch.full((4, 2, 5), float("nan"))}, ValueError, "zoneout_c must hold keep weights"),
    ("lstm", {"zoneout_c": torch.ones(4, 2)}, ValueError, r"zoneout_c must have shape \[4, 2, 5\]"),
    ("lstm", {"layer_norm": (torch.ones(20), torch.ones(20))}, TypeError, "layer_norm must be a rnntl_fast.ops"),
    ("lstm", {"layer_norm": LayerNormWeights(torch.ones(20), torch.ones(15))}, ValueError,
     r"layer_norm.hh must have shape \[20\]"),
    ("lstm", {"layer_norm": LayerNormWeights(torch.ones(20), torch.ones(20), None, torch.ones(4))}, ValueError,
     r"layer_norm.cell_bias must have shape \[5\]"),
    ("gru", {"layer_norm": LayerNormWeights(torch.ones(15), torch.ones(15), torch.ones(5))}, ValueError,
     "layer_norm.cell_weight is for the LSTM"),
    ("gru", {"zoneout": -torch.ones(4, 2, 5)}, ValueError, "zoneout must hold keep weights"),
    ("rnn", {"nonlinearity": "sigmoid"}, ValueError, "nonlinearity must be one of"),
    ("rnn", {"recurrent_mask": torch.ones(5)}, ValueError, r"recurrent_mask must have shape \[2, 5\]"),
], ids=["mask-shape", "mask-dtype", "zoneout-range", "zoneout-nan", "zoneout-shape", "ln-type", "ln-shape",
        "ln-cell-bias", "gru-ln-cell", "gru-zoneout-range", "rnn-nonlinearity", "rnn-mask-shape"])
def test_bad_op_arguments_are_named(cell, given, error, pattern):
    with pytest.raises(error, match=pattern):
        _op_call(cell, "reference", **given)


@pytest.mark.parametrize("make,kwargs,error,pattern", [
    (rnntl_fast.LSTM, {"recurrent_dropout": 1.0}, ValueError, r"recurrent_dropout must be in \[0, 1\)"),
    (rnntl_fast.GRU, {"weight_drop": -0.1}, ValueError, r"weight_drop must be in \[0, 1\)"),
    (rnntl_fast.RNN, {"weight_drop": True}, TypeError, "weight_drop must be a number"),
    (rnntl_fast.LSTM, {"zoneout": 1.5}, ValueError, r"zoneout must be in \[0, 1\]"),
    (rnntl_fast.LSTM, {"zoneout": (0.1, 2.0)}, ValueError, r"zoneout\[1\] \(z_c\) must be in"),
    (rnntl_fast.LSTM, {"zoneout": (0.1,)}, ValueError, r"zoneout must be a number or a pair"),
    (rnntl_fast.GRU, {"zoneout": (0.1, 0.2)}, TypeError, "zoneout must be a number"),
    (rnntl_fast.GRU, {"layer_norm": 1}, TypeError, "layer_norm must be a bool"),
    (rnntl_fast.RNN, {"layer_norm": True}, ValueError, "layer_norm is not defined for the Elman RNN"),
], ids=["lstm-rdrop-1", "gru-wdrop-neg", "rnn-wdrop-bool", "lstm-zoneout", "lstm-zoneout-c", "lstm-zoneout-len",
        "gru-zoneout-pair", "gru-ln-int", "rnn-ln"])
def test_bad_module_options_are_named(make, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        make(3, 5, **kwargs)
