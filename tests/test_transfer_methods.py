"""The transfer methods of `finetune --methods` and `rnntl-fast domain-adapt` on tiny data:
every method end to end, frozen parts bitwise unchanged, EWC and gradient reversal
against hand computations, exact transfer into a grown encoder, the ELMo scalar mix (also
over load_elmo's modules), and one-line errors for bad CSVs."""
import copy
import csv
import dataclasses
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from rnntl_fast.cli import main
from rnntl_fast.transfer import domain_adapt
from rnntl_fast.transfer.contextual import (BiLanguageModelFeatures, ElmoClassifier, ScalarMix,
                                            reverse_within_length, split_layers)
from rnntl_fast.transfer.corpus import TextSource, TokenStreams, build_token_corpus, reversed_corpus, stream_perplexity
from rnntl_fast.transfer.data import EncodedTexts, collate
from rnntl_fast.transfer.methods import (METHODS, MethodContext, MethodSettings, build_method_model,
                                         cached_language_model_mismatch, encoder_perplexity, identity_path,
                                         language_model_identity, length_sorted, method_recipe,
                                         pretrain_or_reuse_language_model, run_method)
from rnntl_fast.transfer.models import LanguageModel, RecurrentEncoder
from rnntl_fast.transfer.pipeline import Recipe, RunControl, accuracy, build_classifier, transfer_encoder
from rnntl_fast.transfer.regularizers import EWC, diagonal_fisher

POSITIVE = ["good", "great", "fun", "moving", "sharp", "lovely"]
NEGATIVE = ["bad", "dull", "awful", "tedious", "flat", "boring"]
FILLER = ["the", "film", "is", "a", "plot", "with", "actors", "and", "story", "of", "it", "very"]


def _reviews(rng, count):
    rows = []
    for index in range(count):
        label = index % 2
        cues = POSITIVE if label else NEGATIVE
        rows.append((" ".join(rng.sample(FILLER, 4) + [rng.choice(cues)] + rng.sample(FILLER, rng.randint(1, 5))),
                     label))
    return rows


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("methods")
    rng = random.Random(0)
    reviews = folder / "reviews.csv"
    with open(reviews, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for text, label in _reviews(rng, 80):
            writer.writerow([text + " .", "pos" if label else "neg"])
    text = folder / "unlabelled.txt"
    text.write_text("\n".join(" ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=30)) for _ in range(40)))
    return str(reviews), str(text)


TINY = ["--vocab-size", "40", "--min-freq", "1", "--embedding-dim", "8", "--hidden-size", "8", "--lm-epochs", "1",
        "--lm-batch-size", "4", "--lm-chunk-length", "8", "--batch-size", "4", "--max-tokens", "12", "--threads", "1",
        "--no-progress"]


def test_finetune_methods_all_writes_every_row(tiny_files, tmp_path, capsys):
    reviews, text = tiny_files
    assert main(["finetune", "--train-csv", reviews, "--text-column", "review", "--label-column", "sentiment",
                 "--lm-text", text, *TINY, "--epochs", "2", "--repeats", "2", "--throughput-steps", "0",
                 "--ewc-chunks", "4", "--methods", "all", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    table = metrics["methods"]["table"]
    assert list(table) == list(METHODS)
    for name, row in table.items():
        assert name in printed
        assert len(row["runs"]) == 2 and 0 <= row["test_accuracy"] <= 1
        assert row["test_accuracy"] == pytest.approx(sum(row["test_accuracy_per_seed"]) / 2)
        gains = [r["test_accuracy"] - s["test_accuracy"] for r, s in zip(row["runs"], table["scratch"]["runs"])]
        assert row["gain_vs_scratch_per_seed"] == pytest.approx(gains)
        assert (row["lm_perplexity_after"] is None) == (name == "scratch")
    before = table["finetune"]["lm_perplexity_before"]
    assert table["features"]["lm_perplexity_after_per_seed"] == [before, before]  # frozen encoder: no forgetting
    assert table["elmo"]["lm_perplexity_after"] == before
    assert metrics["methods"]["backward_language_model"]["valid_perplexity"] > 1
    # the backward LM reads the forward LM's corpus reversed: the same training tokens
    assert metrics["methods"]["backward_language_model"]["train_tokens"] == \
        metrics["language_model"]["corpus"]["train_tokens"]
    assert metrics["methods"]["ewc_fisher"]["chunks"] == 4 and metrics["methods"]["held_out_lm_tokens"] > 0
    assert metrics["transfer"]["test_accuracy_per_seed"] == table["finetune"]["test_accuracy_per_seed"]
    assert (tmp_path / "multitask_seed1.pt").is_file()
    assert all(run["cpu_seconds"] > 0 for row in table.values() for run in row["runs"])
    assert metrics["language_model"]["cpu_seconds"] > 0 and metrics["cpu_seconds"] > 0
    assert set(metrics["load_average_1min"]) == {"start", "end"}


@pytest.mark.parametrize("flag, value", [("--methods", "finetune,bogus"), ("--ewc-chunks", "0"),
                                         ("--penalty-alpha", "-1"), ("--multitask-lm-weight", "nan")])
def test_finetune_methods_flags_are_range_checked(flag, value, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["finetune", flag, value])
    assert stopped.value.code == 2 and flag in capsys.readouterr().err


# -- the methods' parts on a hand-built context ----------------------------------------------

@pytest.fixture
def context(tmp_path):
    rng = random.Random(1)
    rows = _reviews(rng, 24)
    documents = [" ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=40)) for _ in range(12)]
    lm_corpus = build_token_corpus([TextSource("documents", documents=documents)], str(tmp_path), vocab_size=100,
                                   valid_fraction=0.25)
    vocab = lm_corpus.vocab
    recipe = Recipe(embedding_dim=8, hidden_size=8, epochs=2, batch_size=4, max_tokens=12, lm_chunk_length=8,
                    dropout=0.1)
    sets = {name: EncodedTexts([t for t, _ in rows], [l for _, l in rows], vocab, 12) for name in ("train", "valid",
                                                                                                   "test")}
    torch.manual_seed(0)
    language_model = LanguageModel(RecurrentEncoder.stacked(**recipe.encoder_config(len(vocab))))
    windows = TokenStreams(lm_corpus.train_tokens(), 4, 8, carry_state=False)
    held_out = TokenStreams(lm_corpus.valid_tokens(), 4, 8)
    result = MethodContext(sets, 2, len(vocab), language_model, windows, held_out, MethodSettings())
    return result, recipe


def _control():
    return RunControl(output_dir=None, show_progress=False)


def test_length_sorted_evaluation_set_holds_the_same_examples_and_gives_the_same_accuracy(context):
    context, recipe = context
    test = context.sets["test"]
    ordered = length_sorted(test)
    lengths = [len(ids) for ids in ordered.ids]
    assert lengths == sorted(lengths) and len(ordered) == len(test)
    pairs = lambda dataset: sorted((tuple(ids.tolist()), int(label)) for ids, label in zip(dataset.ids, dataset.labels))
    assert pairs(ordered) == pairs(test)
    model = build_classifier(recipe, context.vocab_size, 2, None)
    assert accuracy(model, ordered, batch_size=5) == accuracy(model, test, batch_size=5)


def test_features_leaves_the_frozen_encoder_bitwise_unchanged(context):
    context, recipe = context
    before = copy.deepcopy(context.language_model.encoder.state_dict())
    model, summary = run_method("features", "features", recipe, context, _control(), perplexity_before=0.0)
    assert summary["steps"] == 2 * 6
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.encoder.parameters())
    fresh = build_classifier(recipe, context.vocab_size, 2, None)  # same seed: the head's starting point
    assert any(not torch.equal(a, b) for a, b in zip(model.head.state_dict().values(), fresh.head.state_dict().values()))


def test_ewc_penalty_and_gradient_match_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    fisher = {"weight": torch.rand(2, 3) + 0.1, "bias": torch.rand(2) + 0.1}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    alpha = 0.3
    ewc = EWC(model, fisher, alpha)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    mean = (fisher["weight"].sum() + fisher["bias"].sum()) / 8
    expected = alpha * sum((fisher[n] / mean * (p - start[n]) ** 2).sum() for n, p in model.named_parameters())
    penalty = ewc(model)
    assert float(penalty.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    penalty.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, 2 * alpha * fisher[name] / mean * (parameter - start[name]).detach())
    model.bias.requires_grad_(False)  # frozen parameters are left out
    expected_weight_only = alpha * (fisher["weight"] / mean * (model.weight - start["weight"]) ** 2).sum()
    assert float(ewc(model).detach()) == pytest.approx(float(expected_weight_only.detach()), rel=1e-6)


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    examples = [(torch.randn(3), torch.randn(())) for _ in range(5)]
    loss = lambda m, ex: 0.5 * (m(ex[0]).squeeze() - ex[1]) ** 2  # noqa: E731
    fisher = diagonal_fisher(model, loss, examples)
    w = model.weight.detach()[0]
    # d/dw 0.5 (w.x - y)^2 = (w.x - y) x
    expected = sum(((w @ x - y) * x) ** 2 for x, y in examples) / len(examples)
    torch.testing.assert_close(fisher["weight"][0], expected)
    with pytest.raises(ValueError, match="names not parameters"):
        diagonal_fisher(model, loss, examples, ["nope"])


def test_adapt_grows_the_encoder_with_the_transferred_parts_exact_at_step_zero(context):
    context, recipe = context
    own = method_recipe("adapt", recipe, context.settings)
    assert own.num_layers == recipe.num_layers + 1
    _, options = build_method_model("adapt", own, context)
    model = build_classifier(own, context.vocab_size, 2, None)  # as train_classifier builds it
    transferred = transfer_encoder(model, options["encoder_state"])
    lm = context.language_model.encoder
    assert sorted(transferred) == sorted(f"encoder.{k}" for k in lm.state_dict())
    for name, value in lm.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    assert "layers.0.weight_ih_l1" in model.encoder.state_dict()  # the new layer
    model.eval()
    lm.eval()
    ids = torch.randint(3, context.vocab_size, (3, 7))
    lm_outputs, _ = lm(ids)
    first_layer = split_layers(model.encoder.layers[0])[0]
    assert torch.equal(first_layer(model.encoder.embedding(ids))[0], lm_outputs)
    held_out = context.lm_valid
    assert encoder_perplexity(context.language_model, model.encoder, held_out) == \
        stream_perplexity(context.language_model, held_out)


def test_multitask_adds_the_frozen_lm_head_loss(context):
    context, recipe = context
    own = method_recipe("multitask", recipe, context.settings)
    model, options = build_method_model("multitask", own, context)
    transfer_encoder(model, options["encoder_state"])
    model.eval()
    ids, lengths, labels = collate([context.sets["train"][i] for i in range(4)])
    inputs, targets = model._lm_batch()
    first_inputs, first_targets = context.lm_train.window(0, 8)  # window 0 of the training streams
    assert torch.equal(inputs, first_inputs) and torch.equal(targets, first_targets)
    expected = torch.nn.functional.cross_entropy(model(ids, lengths), labels) + \
        context.settings.multitask_lm_weight * context.language_model.eval()(inputs, targets)
    torch.testing.assert_close(model(ids, lengths, labels), expected)
    assert int(model.lm_step) == 1 and all(not p.requires_grad for p in model.lm_head.parameters())
    second, _ = model._lm_batch()  # the next window of the same streams
    assert torch.equal(second, context.lm_train.window(8, 8)[0])


def test_reversed_corpus_reverses_each_part_and_keeps_the_split(tmp_path):
    documents = ["a b c", "d e", "f g h i", "j k l"]
    forward = build_token_corpus([TextSource("documents", documents=documents)], str(tmp_path), vocab_size=50,
                                 valid_fraction=0.25)
    backward = reversed_corpus(forward)
    tokens = np.asarray(forward.tokens)
    assert backward.vocab.itos == forward.vocab.itos
    assert (backward.train_count, backward.valid_count) == (forward.train_count, forward.valid_count)
    assert np.array_equal(backward.train_tokens().numpy(), tokens[:forward.train_count][::-1])
    assert np.array_equal(backward.valid_tokens().numpy(), tokens[forward.train_count:][::-1])
    words = [backward.vocab.itos[i] for i in backward.train_tokens().numpy()]
    assert words[:5] == ["<eos>", "i", "h", "g", "f"]  # the last training document first, its <eos> before it


# -- ELMo -------------------------------------------------------------------------------------

def test_scalar_mix_is_a_scaled_softmax_weighted_sum():
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.scalars.copy_(torch.tensor([0.5, -1.0, 2.0]))
        mix.gamma.fill_(1.7)
    layers = [torch.randn(2, 4, 6) for _ in range(3)]
    weights = [math.exp(s) for s in (0.5, -1.0, 2.0)]
    expected = 1.7 * sum(w / sum(weights) * h for w, h in zip(weights, layers))
    torch.testing.assert_close(mix(layers), expected)


def test_bilm_features_read_each_row_both_ways_despite_padding():
    torch.manual_seed(0)
    forward, backward = (RecurrentEncoder.stacked(20, 4, 8, num_layers=2).eval() for _ in range(2))
    features = BiLanguageModelFeatures.from_language_models(forward, backward)
    ids = torch.randint(3, 20, (3, 6))
    lengths = torch.tensor([6, 4, 2])
    ids[1, 4:] = 0
    ids[2, 2:] = 0
    layers = features(ids, lengths)
    assert len(layers) == 3 and all(h.shape == (3, 6, 16) for h in layers)
    for row in range(3):
        real = ids[row:row + 1, :lengths[row]]
        expected_forward, _ = forward(real)
        expected_backward, _ = backward(real.flip(1))
        torch.testing.assert_close(layers[2][row, :lengths[row], :8], expected_forward[0])
        torch.testing.assert_close(layers[2][row, :lengths[row], 8:], expected_backward[0].flip(0))
        embedded = torch.cat([forward.embedding(real)[0]] * 2 + [backward.embedding(real)[0]] * 2, dim=-1)
        torch.testing.assert_close(layers[0][row, :lengths[row]], embedded)
    assert torch.equal(reverse_within_length(reverse_within_length(ids, lengths), lengths), ids)
    ElmoClassifier(features, 2)  # freezes its copies, not the language models
    assert all(p.requires_grad for p in [*forward.parameters(), *backward.parameters()])


def _write_elmo(path, rng, inputs, hidden, proj, n_layers):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as handle:
        for direction in (0, 1):
            for layer in range(n_layers):
                root = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
                handle.create_dataset(f"{root}/W_0", data=0.3 * rng.standard_normal((inputs + proj, 4 * hidden),
                                                                                    dtype=np.float32))
                handle.create_dataset(f"{root}/B", data=0.3 * rng.standard_normal(4 * hidden, dtype=np.float32))
                handle.create_dataset(f"{root}/W_P_0", data=0.3 * rng.standard_normal((hidden, proj),
                                                                                      dtype=np.float32))


def test_the_same_mix_serves_encoders_loaded_with_load_elmo(tmp_path):
    from rnntl_fast.pretrained import load_elmo
    rng = np.random.default_rng(0)
    _write_elmo(tmp_path / "elmo.hdf5", rng, 4, 6, 4, 2)
    options = {"lstm": {"dim": 6, "projection_dim": 4, "n_layers": 2, "use_skip_connections": True}}
    layers = load_elmo(str(tmp_path / "elmo.hdf5"), options)
    torch.manual_seed(0)
    features = BiLanguageModelFeatures.from_elmo(layers, nn.Embedding(30, 4, padding_idx=0), skip_connections=True)
    classifier = ElmoClassifier(features, 3, dropout=0.0)
    ids, lengths = torch.randint(1, 30, (2, 5)), torch.tensor([5, 3])
    outputs = features(ids, lengths)
    assert len(outputs) == 3 and outputs[1].shape == (2, 5, 8)
    # layer 2 = its LSTM output plus its input (skip connection), forward direction
    first = layers["RNN_0/RNN/MultiRNNCell/Cell0"](features.embeddings[0](ids))[0]
    second = layers["RNN_0/RNN/MultiRNNCell/Cell1"](first)[0] + first
    torch.testing.assert_close(outputs[2][..., :4], second)
    classifier(ids, lengths).sum().backward()
    assert all(p.grad is None for p in features.parameters())
    assert classifier.mix.scalars.grad is not None and classifier.mix.gamma.grad is not None


# -- domain-adversarial training ------------------------------------------------------------

def test_dann_lambda_schedule():
    assert domain_adapt.dann_lambda(0.0, 0.5) == 0.0
    assert domain_adapt.dann_lambda(1.0, 0.5) == pytest.approx(0.5 * (2 / (1 + math.exp(-10)) - 1))
    assert domain_adapt.dann_lambda(0.3, 2.0) == pytest.approx(2.0 * (2 / (1 + math.exp(-3)) - 1))


@pytest.mark.parametrize("strength", [0.25, 1.0, 3.0], ids=lambda s: f"lambda={s}")
def test_gradient_reversal_reaches_the_encoder_with_the_sign_and_scale_of_lambda(strength):
    recipe = Recipe(embedding_dim=6, hidden_size=5, dropout=0.0)
    model = domain_adapt.build_model(recipe, 25, 2)
    model.eval()
    torch.manual_seed(3)
    labelled = (torch.randint(3, 25, (4, 7)), torch.tensor([7, 5, 3, 6]), torch.tensor([0, 1, 1, 0]))
    other = (torch.randint(3, 25, (4, 6)), torch.tensor([6, 2, 6, 4]))

    def gradients(reversal):
        model.zero_grad()
        model.reversals["domain"].strength = reversal
        domain_adapt.domain_adversarial_loss(model, labelled, other)[0].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    with_reversal, without = gradients(strength), gradients(0.0)
    # the domain loss's own gradient, straight through (no reversal layer)
    model.zero_grad()
    outputs = [model.encoder(ids, lengths) for ids, lengths in (labelled[:2], other)]
    logits = torch.cat([model.heads["domain"](o, model.encoder.final_features(states), lengths)
                        for (o, states), lengths in zip(outputs, (labelled[1], other[1]))])
    torch.nn.functional.cross_entropy(logits, torch.tensor([0] * 4 + [1] * 4)).backward()
    domain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, gradient in with_reversal.items():
        if name.startswith("encoder."):
            torch.testing.assert_close(gradient - without[name], -strength * domain[name], atol=1e-6, rtol=1e-5)
        elif name.startswith("heads.domain."):  # the domain head itself is not reversed
            torch.testing.assert_close(gradient, domain[name])


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("domains")
    rng = random.Random(2)
    words = {"d": ["care", "union", "teachers", "fair"], "r": ["taxes", "business", "freedom", "border"]}
    for name, rows, style in (("source", 60, ["speech", "tonight", "america"]), ("target", 48, ["debate", "well"])):
        with open(folder / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["words", "side"])
            for index in range(rows):
                side = "d" if index % 2 else "r"
                label = side if name == "source" else side.upper()
                writer.writerow([" ".join(rng.choices(style + FILLER, k=6) + [rng.choice(words[side])]), label])
            if name == "target":
                writer.writerow(["questions to both", "M"])
    return folder


def _domain_args(folder, output, *extra):
    return ["domain-adapt", "--source-csv", str(folder / "source.csv"), "--target-csv", str(folder / "target.csv"),
            "--source-text-column", "words", "--source-label-column", "side", "--target-text-column", "words",
            "--target-label-column", "side", "--classes", "d,r", "--target-classes", "D,R",
            "--target-skip-labels", "M", "--vocab-size", "60", "--min-freq", "1", "--embedding-dim", "8",
            "--hidden-size", "8", "--lm-epochs", "1", "--lm-batch-size", "4", "--lm-chunk-length", "6",
            "--batch-size", "4", "--epochs", "2", "--repeats", "2", "--eval-points", "3", "--threads", "1",
            "--no-progress", "--output-dir", str(output), *extra]


def test_domain_adapt_runs_every_method_on_two_csvs(domain_files, tmp_path, capsys):
    assert main(_domain_args(domain_files, tmp_path)) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data"]["target_rows"] == 48  # the "M" row left out
    assert metrics["data"]["sizes"]["target_test"] == round(0.3 * 48)
    steps = 2 * (metrics["data"]["sizes"]["source_train"] // 4)
    assert metrics["steps_per_run"] == steps
    for name in domain_adapt.DA_METHODS:
        row = metrics["methods"][name]
        assert name in printed and len(row["runs"]) == 2
        for run in row["runs"]:
            assert run["steps"] == steps and [p["step"] for p in run["curve"]][0] == 0
            assert run["curve"][-1]["step"] == steps
            assert 0 <= run["target_test_accuracy"] <= 1 and 0 <= run["domain_accuracy"] <= 1
            assert run["cpu_seconds"] > 0
        expected = 0.0 if name in ("source_only", "target_supervised") else 1.0
        assert row["runs"][0]["lambda_max"] == expected
    assert metrics["methods"]["dann_pretrained"]["runs"][0]["pretrained_encoder"]
    assert (tmp_path / "domain_adapt.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content, line, column", [
    ("words,kind\nsome text,d\n", 1, "side"),
    ("words,side\nsome text,d\n,r\n", 3, "words"),
    ("words,side\nsome text,d\nother text,x\n", 3, "side"),
], ids=["missing-column", "empty-text", "unknown-label"])
def test_domain_adapt_bad_csv_is_one_line_naming_file_line_and_column(domain_files, tmp_path, capsys, content,
                                                                      line, column):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    args = _domain_args(domain_files, tmp_path / "out")
    args[args.index("--source-csv") + 1] = str(bad)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(bad) in error and f"line {line}" in error and repr(column) in error


def test_domain_adapt_usage_errors(domain_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["domain-adapt", "--source-csv", str(domain_files / "source.csv"), "--output-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert "--source-csv and --target-csv go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["domain-adapt", "--methods", "dann,nope"])
    assert stopped.value.code == 2


def test_domain_adapt_bad_lm_text_names_the_flag_and_leaves_no_folder(domain_files, tmp_path, capsys):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"some words\n\x00\x01")
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(_domain_args(domain_files, output, "--lm-text", str(binary)))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2
    assert error.startswith("rnntl-fast domain-adapt: error: --lm-text ") and "binary.txt: NUL byte" in error
    assert not output.exists()  # created by the run, holding only the token cache: removed again


# -- the pretrained LM reused across runs in one output folder --------------------------------

def _methods_args(tiny_files, output, *extra):
    reviews, text = tiny_files
    return ["finetune", "--train-csv", reviews, "--text-column", "review", "--label-column", "sentiment",
            "--lm-text", text, *TINY, "--epochs", "1", "--repeats", "1", "--throughput-steps", "0",
            "--methods", "finetune,elmo", "--output-dir", str(output), *extra]


def test_a_second_run_reuses_both_language_models_and_ends_the_same(tiny_files, tmp_path, capsys):
    assert main(_methods_args(tiny_files, tmp_path)) == 0
    first = json.loads((tmp_path / "metrics.json").read_text())
    assert "reusing" not in capsys.readouterr().err
    assert main(_methods_args(tiny_files, tmp_path)) == 0
    second = json.loads((tmp_path / "metrics.json").read_text())
    printed = capsys.readouterr().err
    for checkpoint in (tmp_path / "language_model.pt", tmp_path / "backward_lm" / "language_model.pt"):
        assert f"{checkpoint}: reusing this language model" in printed
    assert first["language_model"]["reused_checkpoint"] is None
    assert second["language_model"]["reused_checkpoint"] == str(tmp_path / "language_model.pt")
    assert second["methods"]["backward_language_model"]["reused_checkpoint"] == \
        str(tmp_path / "backward_lm" / "language_model.pt")
    for key in ("valid_perplexity", "steps"):
        assert second["language_model"][key] == first["language_model"][key]
        assert second["methods"]["backward_language_model"][key] == first["methods"]["backward_language_model"][key]
    for method in ("finetune", "elmo"):  # the same LMs and seeds: the same classifiers
        assert second["methods"]["table"][method]["test_accuracy_per_seed"] == \
            first["methods"]["table"][method]["test_accuracy_per_seed"]
    assert second["methods"]["table"]["finetune"]["lm_perplexity_after"] == \
        first["methods"]["table"]["finetune"]["lm_perplexity_after"]


def test_a_run_with_other_lm_settings_refuses_the_cached_model(tiny_files, tmp_path, capsys):
    assert main(_methods_args(tiny_files, tmp_path, "--methods", "finetune")) == 0
    capsys.readouterr()
    assert main(_methods_args(tiny_files, tmp_path, "--methods", "finetune", "--lm-epochs", "2")) == 0
    printed = capsys.readouterr().err
    assert f"{tmp_path / 'language_model.pt'}: not reused, pretrained on other data or settings: " \
           "recipe.lm_epochs 1 there, 2 here; pretraining the language model anew" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["language_model"]["reused_checkpoint"] is None
    assert metrics["language_model"]["history"]["epochs"][-1]["epoch"] == 2
    # the record now describes the new checkpoint: a third run with --lm-epochs 2 reuses it
    assert main(_methods_args(tiny_files, tmp_path, "--methods", "finetune", "--lm-epochs", "2")) == 0
    assert "reusing this language model" in capsys.readouterr().err


@pytest.fixture
def cached_lm(tmp_path):
    """A finished LM checkpoint with its identity record, and what it was pretrained from."""
    documents = [" ".join(random.Random(i).choices(FILLER + POSITIVE, k=20)) for i in range(10)]
    corpus = build_token_corpus([TextSource("documents", documents=documents)], str(tmp_path / "tokens"),
                                vocab_size=100, valid_fraction=0.2)
    recipe = Recipe(embedding_dim=8, hidden_size=8, lm_epochs=1, lm_batch_size=2, lm_chunk_length=6)
    control = RunControl(output_dir=str(tmp_path), show_progress=False)
    pretrain_or_reuse_language_model(corpus, recipe, control, log=lambda text: None)
    return corpus, recipe, control, documents


def _mismatch(corpus, recipe, control):
    return cached_language_model_mismatch(control.checkpoint("language_model"),
                                          language_model_identity(corpus, recipe, 1), corpus.vocab.state_dict())


@pytest.mark.parametrize("change, reason", [
    ("nothing", None),
    ("recipe", "pretrained on other data or settings: recipe.lm_lr 0.01 there, 0.001 here"),
    ("documents", "pretrained on other data or settings: corpus_inputs"),
    ("record", "no record of what it was pretrained on (language_model.identity.json)"),
    ("checkpoint", "unreadable"),
    ("foreign", "not a language-model checkpoint of this command"),
    ("unfinished", "an unfinished pretraining (3 steps; --resume continues it)"),
], ids=lambda value: value if isinstance(value, str) and " " not in value else None)
def test_a_stale_or_foreign_cached_language_model_is_refused_naming_why(cached_lm, tmp_path, change, reason):
    corpus, recipe, control, documents = cached_lm
    checkpoint = control.checkpoint("language_model")
    if change == "recipe":
        recipe = dataclasses.replace(recipe, lm_lr=1e-3)
    elif change == "documents":
        corpus = build_token_corpus([TextSource("documents", documents=documents[::-1])], str(tmp_path / "other"),
                                    vocab_size=100, valid_fraction=0.2)
    elif change == "record":
        os.remove(identity_path(checkpoint))
    elif change == "checkpoint":
        with open(checkpoint, "wb") as handle:
            handle.write(b"not a checkpoint")
    elif change == "foreign":
        torch.save({"encoder": {}}, checkpoint)
    elif change == "unfinished":
        state = torch.load(checkpoint, weights_only=False)
        torch.save({**state, "finished": False, "global_step": 3}, checkpoint)
    found = _mismatch(corpus, recipe, control)
    if reason is None:
        assert found is None
    else:
        assert found is not None and found.startswith(reason), found


def test_domain_adapt_reuses_its_pretrained_language_model(domain_files, tmp_path, capsys):
    args = _domain_args(domain_files, tmp_path, "--methods", "dann_pretrained", "--repeats", "1")
    assert main(args) == 0
    first = json.loads((tmp_path / "metrics.json").read_text())
    capsys.readouterr()
    assert main(args) == 0
    second = json.loads((tmp_path / "metrics.json").read_text())
    assert f"{tmp_path / 'language_model.pt'}: reusing this language model" in capsys.readouterr().err
    assert second["language_model"]["reused_checkpoint"] == str(tmp_path / "language_model.pt")
    assert second["methods"]["dann_pretrained"]["target_test_accuracy_per_seed"] == \
        first["methods"]["dann_pretrained"]["target_test_accuracy_per_seed"]
