"""The finetune command end to end on a tiny config: outputs, exact resumption after a
stopped run, and DistributedDataParallel (two gloo processes on loopback) matching a
single process on the same global batch."""
import csv
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from rnntl_fast import LSTM
from rnntl_fast.cli import main
from rnntl_fast.pretrained import build_encoder, load_encoder, load_torch, save_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ["good", "great", "fun", "moving", "sharp", "lovely"]
NEGATIVE = ["bad", "dull", "awful", "tedious", "flat", "boring"]
FILLER = ["the", "film", "is", "a", "plot", "with", "actors", "and", "story", "of", "it", "very"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A labelled CSV (pos/neg reviews from a few cue words) and an unlabelled text file."""
    folder = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    csv_path = folder / "reviews.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for index in range(80):
            label = "pos" if index % 2 else "neg"
            cues = POSITIVE if label == "pos" else NEGATIVE
            words = rng.sample(FILLER, 4) + [rng.choice(cues)] + rng.sample(FILLER, rng.randint(1, 5))
            writer.writerow([" ".join(words) + " .", label])
    text_path = folder / "unlabelled.txt"
    text_path.write_text("\n".join(" ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=30)) for _ in range(40)))
    return str(csv_path), str(text_path)


def tiny_args(tiny_data, output_dir, *extra):
    csv_path, text_path = tiny_data
    return ["finetune", "--train-csv", csv_path, "--text-column", "review", "--label-column", "sentiment",
            "--lm-text", text_path, "--vocab-size", "40", "--min-freq", "1", "--embedding-dim", "8",
            "--hidden-size", "8", "--lm-epochs", "1", "--lm-batch-size", "4", "--lm-chunk-length", "8",
            "--epochs", "2", "--batch-size", "4", "--max-tokens", "12", "--threads", "1", "--no-progress",
            "--repeats", "1", "--output-dir", str(output_dir), *extra]


def test_finetune_with_regularizers_in_the_recurrence_saves_them_and_times_torch_nn_without(tiny_data, tmp_path,
                                                                                              capsys):
    """--recurrent-dropout / --weight-drop / --zoneout reach the encoder's LSTM (and its saved
    file); the throughput comparison runs torch.nn, which cannot run them, without them, and says so."""
    assert main(tiny_args(tiny_data, tmp_path, "--throughput-steps", "2", "--recurrent-dropout", "0.2",
                          "--weight-drop", "0.4", "--zoneout", "0.1")) == 0
    assert ("torch.nn without --recurrent-dropout and --weight-drop and --zoneout, which it cannot run"
            in capsys.readouterr().err)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["throughput"]["torch_nn_without"] == ["recurrent_dropout", "weight_drop", "zoneout"]
    assert metrics["throughput"]["tokens_per_s"]["torch.nn"] > 0 and metrics["recipe"]["zoneout"] == 0.1
    encoder = load_encoder(str(tmp_path / "encoder.pt"))
    layer = encoder.layers[0]
    assert (layer.recurrent_dropout, layer.weight_drop, layer.zoneout) == (0.2, 0.4, 0.1)


def test_finetune_with_layer_norm_builds_layer_normalised_cells_and_skips_the_torch_nn_timing(tiny_data, tmp_path,
                                                                                               capsys):
    assert main(tiny_args(tiny_data, tmp_path, "--throughput-steps", "2", "--layer-norm")) == 0
    assert "no throughput comparison: a layer-normalised model has no torch.nn form" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["recipe"]["layer_norm"] is True and "throughput" not in metrics
    encoder = load_encoder(str(tmp_path / "encoder.pt"))
    assert encoder.layers[0].layer_norm and hasattr(encoder.layers[0], "layer_norm_hh_weight_l0")


def test_finetune_cli_smoke_writes_metrics_and_plot(tiny_data, tmp_path):
    assert main(tiny_args(tiny_data, tmp_path, "--throughput-steps", "2")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("transfer", "scratch"):
        assert 0.0 <= metrics[name]["test_accuracy"] <= 1.0
        assert len(metrics[name]["runs"][0]["history"]["epochs"]) == 2
    assert metrics["transfer"]["transferred"] and not metrics["scratch"]["transferred"]
    assert metrics["language_model"]["valid_perplexity"] > 1
    assert metrics["throughput"]["tokens_per_s"]["rnntl_fast"] > 0
    assert metrics["throughput"]["tokens_per_s"]["torch.nn"] > 0
    assert metrics["data"]["test_texts_used_for_pretraining"] is False
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("language_model.pt", "encoder.pt", "transfer.pt", "scratch.pt"):
        assert (tmp_path / name).is_file()


def test_finetune_cli_repeats_seeds_on_a_labelled_subset(tiny_data, tmp_path):
    assert main(tiny_args(tiny_data, tmp_path, "--throughput-steps", "0", "--repeats", "3",
                          "--labelled-size", "30")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    split = metrics["data"]["split"]
    assert (split["train"], split["training_split"]) == (30, 56)  # 80 rows: 70% training split
    # the whole training split still reaches the language model, without labels
    assert metrics["data"]["language_model_documents"]["classifier_training_split_texts_without_labels"] == 56
    for name in ("transfer", "scratch"):
        arm = metrics[name]
        per_seed = [run["test_accuracy"] for run in arm["runs"]]
        assert len(per_seed) == 3 and arm["test_accuracy_per_seed"] == per_seed
        assert arm["test_accuracy"] == pytest.approx(sum(per_seed) / 3)
        mean = sum(per_seed) / 3
        assert arm["test_accuracy_std"] == pytest.approx((sum((a - mean) ** 2 for a in per_seed) / 2) ** 0.5)
        assert arm["steps"] == sum(run["steps"] for run in arm["runs"]) == 3 * 2 * 7  # 2 epochs of 30 rows in full batches of 4
        for seed in range(3):
            assert (tmp_path / f"{name}_seed{seed}.pt").is_file()
    gains = [t - s for t, s in zip(metrics["transfer"]["test_accuracy_per_seed"],
                                   metrics["scratch"]["test_accuracy_per_seed"])]
    assert metrics["transfer_minus_scratch_test_accuracy_per_seed"] == pytest.approx(gains)
    # different seeds: different new-weight initialisation, so the scratch runs differ
    first, second = (torch.load(tmp_path / f"scratch_seed{k}.pt", weights_only=False)["model"] for k in (0, 1))
    assert any(not torch.equal(first[key], second[key]) for key in first)


def _final_weights(output_dir):
    weights = {}
    for name in ("language_model", "transfer", "scratch"):
        state = torch.load(os.path.join(output_dir, f"{name}.pt"), map_location="cpu", weights_only=False)
        assert state["finished"]
        weights.update({f"{name}.{k}": v for k, v in state["model"].items()})
    return weights


@pytest.mark.parametrize("where", ["mid_finetune", "end_of_pretraining"])
def test_stopped_and_resumed_run_ends_at_the_same_weights(tiny_data, tmp_path, where):
    # dropout stays on: resuming must also restore the RNG streams
    common = ("--throughput-steps", "0", "--dropout", "0.3", "--freeze", "gradual", "--l2sp-alpha", "0.01")
    assert main(tiny_args(tiny_data, tmp_path / "whole", *common)) == 0
    whole_metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    lm_steps, transfer_steps = whole_metrics["language_model"]["steps"], whole_metrics["transfer"]["steps"]
    # stop inside the fine-tuning's second epoch (past a gradual-unfreezing change), then resume
    stop_at = lm_steps + transfer_steps // 2 + 2 if where == "mid_finetune" else lm_steps
    assert main(tiny_args(tiny_data, tmp_path / "parts", *common, "--stop-after-steps", str(stop_at))) == 0
    assert not (tmp_path / "parts" / "metrics.json").exists()
    if where == "mid_finetune":
        state = torch.load(tmp_path / "parts" / "transfer.pt", weights_only=False)
        assert not state["finished"] and state["global_step"] == transfer_steps // 2 + 2
    else:  # stopped on the LM's last step, before its epoch-end evaluation
        assert not (tmp_path / "parts" / "transfer.pt").exists()
    assert main(tiny_args(tiny_data, tmp_path / "parts", *common, "--resume")) == 0
    whole, parts = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
    a = whole_metrics
    b = json.loads((tmp_path / "parts" / "metrics.json").read_text())
    assert a["transfer"]["test_accuracy"] == b["transfer"]["test_accuracy"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_matches_one_process(tiny_data, tmp_path):
    # No random masks: each rank draws its own (dropout, weight drop), a single process one set.
    common = ("--throughput-steps", "0", "--dropout", "0", "--weight-drop", "0", "--freeze", "gradual")
    assert main(tiny_args(tiny_data, tmp_path / "single", *common)) == 0
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "rnntl_fast",
               *tiny_args(tiny_data, tmp_path / "ddp", *common)[0:]]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    single, ddp = _final_weights(tmp_path / "single"), _final_weights(tmp_path / "ddp")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_pretrain_then_finetune_from_the_encoder_file(tiny_data, tmp_path, capsys):
    """One encoder file: what `pretrain` writes is what rnntl_fast.pretrained.load_encoder
    rebuilds (vocabulary included) and what `finetune --encoder` starts from."""
    csv_path, text_path = tiny_data
    assert main(["pretrain", "--lm-text", text_path, "--no-lm-train-text", "--vocab-size", "40", "--min-freq", "1",
                 "--embedding-dim", "8", "--hidden-size", "8", "--lm-epochs", "1", "--lm-batch-size", "4",
                 "--lm-chunk-length", "8", "--threads", "1", "--no-progress", "--output-dir",
                 str(tmp_path / "lm")]) == 0
    encoder = tmp_path / "lm" / "encoder.pt"
    loaded = load_encoder(encoder)
    language_model = torch.load(tmp_path / "lm" / "language_model.pt", weights_only=False)
    trained = {k[len("encoder."):]: v for k, v in language_model["model"].items() if k.startswith("encoder.")}
    assert set(loaded.state_dict()) == set(trained) and "layers.0.weight_ih_l0" in trained
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
    assert loaded.vocab == language_model["vocab"]["itos"] and len(loaded.vocab) == loaded.embedding.num_embeddings
    assert list(load_torch(encoder)) == ["layers.0"]  # the generic checkpoint loader finds its LSTM too

    args = tiny_args(tiny_data, tmp_path / "ft", "--encoder", str(encoder), "--throughput-steps", "0",
                     "--no-scratch", "--freeze", "encoder", "--bidirectional")
    assert main(args) == 0
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert "language_model" not in metrics and "scratch" not in metrics
    transferred = metrics["transfer"]["transferred_parameters"]
    assert "encoder.layers.0.weight_ih_l0" in transferred and "encoder.layers.0.weight_ih_l0_reverse" not in transferred
    classifier = torch.load(tmp_path / "ft" / "transfer.pt", weights_only=False)["model"]
    for name, value in loaded.state_dict().items():  # frozen with --freeze encoder: still the file's weights
        assert torch.equal(classifier[f"encoder.{name}"], value), name

    code, error = _run_cli(tiny_args(tiny_data, tmp_path / "bad", "--encoder", str(encoder), "--hidden-size", "6"),
                           capsys)
    assert code == 2 and f"--encoder {encoder}: layer 'layers.0' is" in error and "this run expects" in error


def _run_cli(argv, capsys):
    """(exit code, stderr) of main(argv) for a run that stops on the user's mistake."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code, capsys.readouterr().err


def _earlier_pretrain_file(path):
    """An encoder file as `rnntl-fast pretrain` wrote it before the encoder format was shared."""
    lstm = torch.nn.LSTM(8, 8, batch_first=True)
    torch.save({"encoder_config": {"vocab_size": 40, "embedding_dim": 8, "hidden_size": 8, "num_layers": 1},
                "encoder": {"embedding.weight": torch.zeros(40, 8),
                            **{f"rnn.{k}": v for k, v in lstm.state_dict().items()}},
                "vocab": {"itos": ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(37)]}, "info": {}}, path)


def _foreign_encoder_file(path):
    """An encoder file of the shared format without a vocabulary (pretrained.save_encoder of
    a built encoder)."""
    save_encoder(build_encoder(torch.zeros(40, 8), [LSTM(8, 8, batch_first=True)]), path)


def _truncated_encoder_file(path):
    _foreign_encoder_file(path)
    path.write_bytes(path.read_bytes()[:400])


@pytest.mark.parametrize("make, reason", [
    (_truncated_encoder_file, "not a readable torch.save file"),
    (_earlier_pretrain_file, "an encoder file of an earlier rnntl_fast (weights named rnn.*)"),
    (_foreign_encoder_file, "its vocabulary is missing or not rnntl_fast.transfer's"),
], ids=["truncated", "earlier-format", "no-vocabulary"])
def test_finetune_refuses_a_bad_encoder_file_in_one_line(tiny_data, tmp_path, capsys, make, reason):
    path = tmp_path / "encoder.pt"
    make(path)
    code, error = _run_cli(tiny_args(tiny_data, tmp_path / "out", "--encoder", str(path)), capsys)
    lines = error.strip().splitlines()  # the run's settings line may come first
    assert code == 2 and "Traceback" not in error and [line for line in lines if "error" in line] == lines[-1:], error
    assert lines[-1].startswith(f"rnntl-fast finetune: error: --encoder {path}: ") and reason in lines[-1], lines[-1]


def _gensim_test_file(name):
    gensim = pytest.importorskip("gensim")
    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", name)
    if not os.path.exists(path):
        pytest.skip(f"gensim's test file {name} is not installed")
    return path


def test_finetune_with_pretrained_word_vectors_and_missing_rows_only(tiny_data, tmp_path):
    vectors = _gensim_test_file("lee_fasttext.vec")  # fastText .vec, 10 dimensions
    args = tiny_args(tiny_data, tmp_path, "--pretrained-vectors", vectors, "--train-missing-rows-only",
                     "--no-scratch", "--throughput-steps", "0")
    args[args.index("--embedding-dim") + 1] = "10"
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    report = metrics["pretrained_files"]
    assert "lee_fasttext.vec" in report["word_vectors"] and "tokens found" in report["word_vectors"]
    assert report["trainable_embedding_rows"] > 0
    assert "transfer" in metrics


def test_finetune_with_a_pretrained_torch_lstm(tiny_data, tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "lstm.pt"
    torch.save({"model": {"encoder." + k: v for k, v in torch.nn.LSTM(8, 8, batch_first=True).state_dict().items()}},
               checkpoint)
    out = tmp_path / "run"
    assert main(tiny_args(tiny_data, out, "--pretrained-rnn", str(checkpoint), "--no-scratch",
                          "--throughput-steps", "0")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pretrained_files"]["rnn"]["format"] == "torch"
