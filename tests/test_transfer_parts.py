"""rnntl_fast.transfer building blocks: each freezing tool, schedule and regulariser does
what it says; models do not let padding leak; data files with errors are named by line."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnntl_fast
from rnntl_fast.transfer import (L2SP, GradualUnfreezer, GradientReversal, LanguageModel, MultiTaskModel,
                                 PartiallyFrozenEmbedding, RecurrentEncoder, SlantedTriangularLR, TextClassifier,
                                 discriminative_param_groups, freeze, freeze_direction, freeze_layers,
                                 mask_embedding_rows, recurrent_parameters, reverse_gradient, set_trainable,
                                 slanted_triangular)
from rnntl_fast.transfer.data import DataError, Vocab, read_labelled_csv, read_text_file


def _lstm_step(rnn, optimizer):
    x = torch.randn(5, 3, rnn.input_size)
    out, _ = rnn(x)
    out.pow(2).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("cell", [rnntl_fast.LSTM, rnntl_fast.GRU])
def test_freeze_layers_get_no_gradient_and_no_update(cell):
    rnn = cell(4, 6, num_layers=3, bidirectional=True)
    freeze_layers(rnn, [0, 2])
    before = {n: p.detach().clone() for n, p in rnn.named_parameters()}
    _lstm_step(rnn, torch.optim.Adam(rnn.parameters(), lr=0.1, weight_decay=0.1))
    for name, parameter in rnn.named_parameters():
        frozen = "_l0" in name or "_l2" in name
        assert parameter.requires_grad is not frozen
        if frozen:
            assert parameter.grad is None, name
            assert torch.equal(parameter, before[name]), name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            assert not torch.equal(parameter, before[name]), name


def test_frozen_weights_do_not_change_the_trainable_gradients():
    # The kernels are asked for fewer gradients; the ones they still compute must not change.
    rnn = rnntl_fast.LSTM(4, 6, num_layers=2)
    x = torch.randn(7, 2, 4, requires_grad=True)
    rnn(x)[0].sum().backward()
    full = {n: p.grad.clone() for n, p in rnn.named_parameters()}
    input_grad = x.grad.clone()
    rnn.zero_grad(set_to_none=True)
    x.grad = None
    freeze_layers(rnn, [0])
    rnn(x)[0].sum().backward()
    torch.testing.assert_close(x.grad, input_grad)
    for name, parameter in rnn.named_parameters():
        if "_l1" in name:
            torch.testing.assert_close(parameter.grad, full[name])


@pytest.mark.skipif(not rnntl_fast._ext.HAS_CPU_KERNELS, reason="needs the compiled cpu kernels")
def test_frozen_layer_asks_the_kernel_for_no_weight_gradients(monkeypatch):
    """The backward op's output_mask (input, w_ih, w_hh, bias, w_hr, h0, c0) says "not needed"
    for what is frozen, and for the input of a layer with nothing trainable below it."""
    masks = []
    original = torch.ops.rnntl_fast.lstm_backward

    def recording(*args):
        masks.append(list(args[-1]))
        return original(*args)

    monkeypatch.setattr(torch.ops.rnntl_fast, "lstm_backward", recording)
    rnn = rnntl_fast.LSTM(4, 6, num_layers=2, backend="cpu")
    freeze_layers(rnn, [0])
    rnn(torch.randn(5, 3, 4))[0].sum().backward()
    # Layer 0 and the input need no gradient, so layer 0 records no backward at all; layer 1
    # trains its weights but is not asked for its input's gradient.
    assert masks == [[False, True, True, True, False, False, False]]


def test_freeze_direction_and_set_trainable():
    rnn = rnntl_fast.LSTM(4, 6, num_layers=2, bidirectional=True)
    freeze_direction(rnn, "reverse")
    assert all(p.requires_grad is not n.endswith("_reverse") for n, p in rnn.named_parameters())
    model = nn.Sequential(rnntl_fast.GRU(3, 3))
    changed = set_trainable(model, ["0.*_l0"], False)
    assert sorted(changed) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="matches no parameter"):
        set_trainable(model, ["0.weight_xx*"], False)
    with pytest.raises(ValueError, match="do not exist"):
        freeze_layers(rnn, [5])


RECURRENT_TENSORS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def test_encoder_layers_are_counted_across_its_modules():
    # module 0: a bidirectional 2-layer LSTM (layers 0, 1), module 1: a GRU (layer 2)
    encoder = RecurrentEncoder(20, 4, [{"kind": "LSTM", "hidden_size": 5, "num_layers": 2, "bidirectional": True},
                                       {"kind": "GRU", "hidden_size": 3}])
    expected = [{f"layers.0.{t}_l{k}{d}" for t in RECURRENT_TENSORS for d in ("", "_reverse")} for k in (0, 1)]
    expected.append({f"layers.1.{t}_l0" for t in RECURRENT_TENSORS})
    assert [set(layer) for layer in encoder.recurrent_layers()] == expected
    named = dict(encoder.named_parameters())
    assert all(named[name] is parameter for layer in encoder.recurrent_layers() for name, parameter in layer.items())
    groups = encoder.layer_groups()
    assert len(groups) == 4 and groups[0] == [encoder.embedding.weight]
    assert [{id(p) for p in group} for group in groups[1:]] == [{id(named[n]) for n in layer} for layer in expected]

    freeze_layers(encoder, [1, 2], direction="forward")
    frozen = {name for name, parameter in named.items() if not parameter.requires_grad}
    assert frozen == {f"layers.0.{t}_l1" for t in RECURRENT_TENSORS} | expected[2]
    reverse = {id(parameter) for parameter in recurrent_parameters(encoder, None, "reverse")}
    assert reverse == {id(parameter) for name, parameter in named.items() if name.endswith("_reverse")}
    with pytest.raises(ValueError, match=r"layers \[3\] do not exist; the module has layers \[0, 1, 2\]"):
        freeze_layers(encoder, [3])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_encoder_final_features_are_the_top_layers_last_states(bidirectional):
    torch.manual_seed(0)
    encoder = RecurrentEncoder.stacked(20, 4, 5, num_layers=2, bidirectional=bidirectional).eval()
    ids, lengths = torch.tensor([[4, 5, 6, 0], [7, 8, 9, 10]]), torch.tensor([3, 4])
    outputs, states = encoder(ids, lengths)
    features = encoder.final_features(states)
    assert len(states) == 1 and features.shape == (2, 10 if bidirectional else 5)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(features[row, :5], outputs[row, length - 1, :5])  # forward: last real token
        if bidirectional:
            torch.testing.assert_close(features[row, 5:], outputs[row, 0, 5:])     # reverse: t = 0
    assert not outputs[0, 3].any()  # zero past the row's length


def test_masked_embedding_rows_train_only_the_missing_words():
    embedding = nn.Embedding(10, 4)
    before = embedding.weight.detach().clone()
    mask_embedding_rows(embedding, [2, 7])
    ids = torch.tensor([[1, 2, 3, 7, 9]])
    embedding(ids).sum().backward()
    assert embedding.weight.grad[[2, 7]].abs().sum() > 0
    others = [i for i in range(10) if i not in (2, 7)]
    assert embedding.weight.grad[others].abs().sum() == 0
    torch.optim.SGD(embedding.parameters(), lr=1.0).step()
    assert torch.equal(embedding.weight[others], before[others])
    assert not torch.equal(embedding.weight[[2, 7]], before[[2, 7]])


def test_partially_frozen_embedding_matches_and_updates_only_its_rows():
    table = nn.Embedding(10, 4, padding_idx=0)
    split = PartiallyFrozenEmbedding.from_embedding(table, [3, 5])
    ids = torch.tensor([[0, 3, 4, 5]])
    torch.testing.assert_close(split(ids), table(ids))
    assert [n for n, p in split.named_parameters() if p.requires_grad] == ["trainable_weight"]
    optimizer = torch.optim.Adam([p for p in split.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    split(ids).pow(2).sum().backward()
    optimizer.step()
    after = split.weight.detach()
    unchanged = [i for i in range(10) if i not in (3, 5)]
    assert torch.equal(after[unchanged], table.weight.detach()[unchanged])
    assert not torch.equal(after[[3, 5]], table.weight.detach()[[3, 5]])


def test_gradual_unfreezing_unfreezes_one_group_from_the_top_per_period():
    groups = [[nn.Parameter(torch.zeros(1))] for _ in range(4)]
    unfreezer = GradualUnfreezer(groups, every=2)
    expected = {0: 1, 1: 1, 2: 2, 3: 2, 4: 3, 6: 4, 9: 4}
    for unit, count in expected.items():
        unfreezer.step(unit)
        assert [g[0].requires_grad for g in groups] == [i >= 4 - count for i in range(4)], unit


def test_discriminative_learning_rates_follow_the_factor():
    groups = [[nn.Parameter(torch.zeros(1))] for _ in range(4)]
    param_groups = discriminative_param_groups(groups, lr=0.01)
    assert [g["lr"] for g in param_groups] == pytest.approx([0.01 / 2.6 ** 3, 0.01 / 2.6 ** 2, 0.01 / 2.6, 0.01])
    assert [g["lr"] for g in discriminative_param_groups(groups, 1.0, factor=2.0)] == [1 / 8, 1 / 4, 1 / 2, 1]


def _stlr(t, total, cut_frac, ratio):
    cut = math.floor(total * cut_frac)
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    return (1 + p * (ratio - 1)) / ratio


def test_slanted_triangular_schedule_follows_the_ulmfit_formula():
    total, cut_frac, ratio = 200, 0.1, 32
    assert slanted_triangular(0, total, cut_frac, ratio) == pytest.approx(1 / 32)
    assert slanted_triangular(20, total, cut_frac, ratio) == pytest.approx(1.0)  # the peak at cut
    for t in (0, 7, 19, 20, 21, 100, 199):
        assert slanted_triangular(t, total, cut_frac, ratio) == pytest.approx(_stlr(t, total, cut_frac, ratio))
    groups = [[nn.Parameter(torch.zeros(1))] for _ in range(3)]
    optimizer = torch.optim.SGD(discriminative_param_groups(groups, lr=0.5), lr=0.5)
    scheduler = SlantedTriangularLR(optimizer, total, cut_frac, ratio)
    peaks = [0.5 / 2.6 ** 2, 0.5 / 2.6, 0.5]
    for t in range(total):
        for group, peak in zip(optimizer.param_groups, peaks):
            assert group["lr"] == pytest.approx(peak * _stlr(t, total, cut_frac, ratio))
        optimizer.step()
        scheduler.step()


def test_gradient_reversal_flips_and_scales():
    x = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -0.3 * upstream)
    x.grad = None
    GradientReversal(2.0)(x).backward(upstream)
    torch.testing.assert_close(x.grad, -2.0 * upstream)


def test_l2sp_value_and_gradient():
    model = nn.ModuleDict({"encoder": nn.Linear(3, 3), "head": nn.Linear(3, 2)})
    regularizer = L2SP(model, alpha=0.1, beta=0.01)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        head_only = 0.01 * sum(float(p.pow(2).sum()) for n, p in model.named_parameters() if n.startswith("head"))
        assert float(regularizer(model)) == pytest.approx(head_only)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    with torch.no_grad():
        expected = sum(0.1 * float((p - start[n]).pow(2).sum()) for n, p in model.named_parameters()
                       if n.startswith("encoder")) + sum(0.01 * float(p.pow(2).sum())
                                                         for n, p in model.named_parameters() if n.startswith("head"))
    penalty = regularizer(model)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    for name, parameter in model.named_parameters():
        want = 2 * 0.1 * (parameter - start[name]) if name.startswith("encoder") else 2 * 0.01 * parameter
        torch.testing.assert_close(parameter.grad, want.detach())


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "attention", "concat"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_does_not_leak_into_the_classifier(pooling, bidirectional):
    model = TextClassifier(RecurrentEncoder.stacked(20, 5, 6, num_layers=2, bidirectional=bidirectional), 3, pooling=pooling)
    model.eval()
    short = torch.tensor([[4, 5, 6]])
    alone = model(short, torch.tensor([3]))
    padded = torch.tensor([[4, 5, 6, 0, 0], [7, 8, 9, 10, 11]])
    together = model(padded, torch.tensor([3, 5]))
    torch.testing.assert_close(together[0:1], alone)
    garbage = padded.clone()
    garbage[0, 3:] = 13  # whatever sits past a row's length must not matter
    torch.testing.assert_close(model(garbage, torch.tensor([3, 5])), together)


def test_multitask_reversed_head_sends_negated_gradient_to_the_encoder():
    torch.manual_seed(0)
    encoder = RecurrentEncoder.stacked(20, 4, 5)
    plain = MultiTaskModel(encoder, {"sentiment": 2, "domain": 2})
    reversed_ = MultiTaskModel(encoder, {"sentiment": 2, "domain": 2}, reversed_heads={"domain": 0.5})
    reversed_.heads.load_state_dict(plain.heads.state_dict())
    ids, lengths = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    grads = []
    for model in (plain, reversed_):
        model.eval()  # no dropout: both passes must see the same features
        encoder.zero_grad(set_to_none=True)
        model(ids, lengths, task="domain").sum().backward()
        grads.append(encoder.layers[0].weight_hh_l0.grad.clone())
    torch.testing.assert_close(grads[1], -0.5 * grads[0])
    assert set(plain(ids, lengths)) == {"sentiment", "domain"}


def test_language_model_loss_matches_its_log_probabilities():
    model = LanguageModel(RecurrentEncoder.stacked(50, 6, 8))
    ids = torch.randint(0, 50, (2, 7))
    targets = torch.randint(0, 50, (2, 7))
    log_prob = model(ids)
    assert log_prob.shape == (2, 7, 50)
    expected = -log_prob.gather(-1, targets.unsqueeze(-1)).mean()
    torch.testing.assert_close(model(ids, targets), expected)


def test_encoder_frozen_everywhere_but_head_still_trains():
    model = TextClassifier(RecurrentEncoder.stacked(20, 4, 5), 2)
    freeze(model.encoder)
    loss = F.cross_entropy(model(torch.tensor([[1, 2, 3]]), torch.tensor([3])), torch.tensor([1]))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


# -- data errors name the line -----------------------------------------------------------

def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_missing_label_names_the_line(tmp_path):
    path = _write(tmp_path, "d.csv", "text,label\ngood film,pos\nbad film,\n")
    with pytest.raises(DataError, match=r"d\.csv: line 3: missing label"):
        read_labelled_csv(path)


def test_csv_unknown_label_names_the_line(tmp_path):
    path = _write(tmp_path, "d.csv", "text,label\ngood film,pos\n\"a\nlong one\",neg\nmeh,neutral\n")
    with pytest.raises(DataError, match=r"line 5: unknown label 'neutral'"):
        read_labelled_csv(path, classes=["neg", "pos"])


def test_csv_missing_column_and_short_row(tmp_path):
    with pytest.raises(DataError, match="no column named 'sentiment'"):
        read_labelled_csv(_write(tmp_path, "a.csv", "text,label\nx,pos\n"), label_column="sentiment")
    with pytest.raises(DataError, match=r"line 3: expected 2 fields"):
        read_labelled_csv(_write(tmp_path, "b.csv", "text,label\nx,pos\ny\n"))
    with pytest.raises(DataError, match="no such file"):
        read_labelled_csv(str(tmp_path / "missing.csv"))


def test_text_file_errors(tmp_path):
    with pytest.raises(DataError, match="no text"):
        read_text_file(_write(tmp_path, "empty.txt", "\n\n"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\nbad\x00line\n")
    with pytest.raises(DataError, match="line 2: NUL byte"):
        read_text_file(str(binary))
