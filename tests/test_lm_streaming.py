"""Language-model corpora of any size (rnntl_fast/transfer/corpus.py): the token file against
the in-memory tokenizer, its cache, the truncated-BPTT streams (continuity, detached state,
sharding over ranks), exact resumption mid-epoch, and the one-line errors for bad input."""
import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rnntl_fast.transfer import corpus
from rnntl_fast.transfer.corpus import TextSource, TokenStreams, build_token_corpus, file_source
from rnntl_fast.transfer.data import EOS, DataError, Vocab, read_text_file, tokenize
from rnntl_fast.transfer.models import LanguageModel, RecurrentEncoder
from rnntl_fast.transfer.pipeline import Recipe, RunControl, pretrain_language_model
from rnntl_fast.transfer.training import StopRequested

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# blank and whitespace-only lines, \r\n and lone \r line ends, contractions, digits,
# punctuation, non-ASCII letters and a last line without a line break
TRICKY_TEXT = ("Don't STOP believing!  It's 3.5 km, isn't it?\r\n\r\n   \n"
               "Ünïcode café — naïve\tWORDS; a b c.\rnext line: a b\n\n"
               "the cat sat on the mat . the dog sat too\nlast line 42 without newline")
OPENERS = {"plain": open, "gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}


def _write(path, text, kind="plain"):
    with OPENERS[kind](path, "wb") as handle:
        handle.write(text.encode("utf-8"))
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: OpenMP threads only wait on each other, worse on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _in_memory_ids(path, vocab_size, min_freq, valid_fraction=0.05):
    """The reference: read_text_file's documents through data.tokenize, each followed by
    <eos>, and Vocab.build over the words before the held-out end."""
    words = []
    for document in read_text_file(path):
        words += tokenize(document) + [EOS]
    training_part = words[:len(words) - round(len(words) * valid_fraction)]
    vocab = Vocab.build([[w for w in training_part if w != EOS]], max_size=vocab_size, min_freq=min_freq)
    return vocab, vocab.encode(words)


@pytest.mark.parametrize("kind,workers,block_bytes", [
    ("plain", 1, 1 << 20), ("plain", 2, 40), ("gz", 1, 40), ("bz2", 2, 1 << 20), ("xz", 1, 64)],
    ids=["plain", "plain-2-workers-small-blocks", "gz-small-blocks", "bz2-2-workers", "xz-small-blocks"])
def test_token_file_has_the_in_memory_ids(tmp_path, monkeypatch, kind, workers, block_bytes):
    monkeypatch.setattr(corpus, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(corpus, "NUMBER_CHUNK", 7)  # pass 2 and the held-out count read in many chunks
    text = TRICKY_TEXT * 3
    suffix = "" if kind == "plain" else f".{kind}"
    path = _write(tmp_path / f"text.txt{suffix}", text, kind)
    reference_path = _write(tmp_path / "reference.txt", text)
    vocab, ids = _in_memory_ids(reference_path, vocab_size=20, min_freq=2)  # small: some words become <unk>
    built = build_token_corpus([file_source(path)], str(tmp_path / "cache"), vocab_size=20, min_freq=2,
                               workers=workers)
    assert built.vocab.itos == vocab.itos
    assert built.tokens.dtype == np.uint16
    assert built.tokens.tolist() == ids
    assert Vocab.unk_id in ids


def test_in_memory_documents_and_files_make_one_stream(tmp_path):
    path = _write(tmp_path / "a.txt", "x y z\nz z y\n")
    documents = ["first doc\nwith an inner line break", "second doc"]
    built = build_token_corpus([TextSource("docs", documents=documents), file_source(path)], str(tmp_path),
                               vocab_size=100)
    words = [built.vocab.itos[i] for i in built.tokens]
    assert words == ["first", "doc", "with", "an", "inner", "line", "break", "<eos>", "second", "doc", "<eos>",
                     "x", "y", "z", "<eos>", "z", "z", "y", "<eos>"]


def test_vocabulary_only_source_counts_but_is_not_streamed(tmp_path):
    path = _write(tmp_path / "a.txt", "a b\n")
    built = build_token_corpus([file_source(path), TextSource("extra", documents=["c c c"], vocabulary_only=True)],
                               str(tmp_path), vocab_size=100)
    assert built.vocab.itos[3] == "c" and len(built.tokens) == 3


def test_large_vocabulary_uses_uint32(tmp_path):
    words = [f"w{i}" for i in range(70_000)]
    path = _write(tmp_path / "many.txt", "\n".join(" ".join(words[i:i + 100]) for i in range(0, len(words), 100)))
    built = build_token_corpus([file_source(path)], str(tmp_path / "cache"), vocab_size=80_000, valid_fraction=0)
    assert built.tokens.dtype == np.uint32 and len(built.vocab) == 70_003
    assert int(built.tokens.max()) == 70_002


def test_cache_is_reused_and_invalidated_when_an_input_changes(tmp_path, monkeypatch):
    path = _write(tmp_path / "text.txt", TRICKY_TEXT)
    cache = str(tmp_path / "cache")
    first = build_token_corpus([file_source(path)], cache, vocab_size=50)
    assert not first.describe()["reused_cache"]
    first_ids = first.tokens.tolist()

    counted = []
    original_tokenize = corpus._tokenize
    monkeypatch.setattr(corpus, "_tokenize", lambda *a: counted.append(1) or original_tokenize(*a))
    again = build_token_corpus([file_source(path)], cache, vocab_size=50)
    assert again.describe()["reused_cache"] and not counted and again.tokens.tolist() == first_ids

    os.utime(path, ns=(1, 1))  # touched, same content: the hash decides, still reused
    touched = build_token_corpus([file_source(path)], cache, vocab_size=50)
    assert touched.describe()["reused_cache"] and not counted

    _write(path, TRICKY_TEXT + "\nnew words here")
    changed = build_token_corpus([file_source(path)], cache, vocab_size=50)
    assert not changed.describe()["reused_cache"] and counted
    assert changed.tokens.tolist() == _in_memory_ids(path, 50, 1)[1] != first_ids

    counted.clear()
    resized = build_token_corpus([file_source(path)], cache, vocab_size=10)  # tokenizer settings changed
    assert not resized.describe()["reused_cache"] and counted and len(resized.vocab) == 10


def test_held_out_part_is_the_end_of_the_stream_and_not_in_the_vocabulary(tmp_path):
    path = _write(tmp_path / "text.txt", "\n".join(f"line {i} of words" for i in range(100)))
    built = build_token_corpus([file_source(path)], str(tmp_path), vocab_size=500, valid_fraction=0.1)
    assert built.valid_count == round(len(built.tokens) * 0.1) == 50  # 100 lines of 5 tokens
    train, valid = built.train_tokens().numpy(), built.valid_tokens().numpy()
    assert np.array_equal(np.concatenate([train, valid]), built.tokens)
    assert built.vocab.itos[valid[-2]] == "words"  # the last line's last word
    assert "89" in built.vocab.stoi and "90" not in built.vocab.stoi  # the last 10 lines are held out
    assert set(valid[1::5].tolist()) == {Vocab.unk_id}


def test_windows_read_from_the_file_equal_windows_of_the_array(tmp_path):
    path = _write(tmp_path / "text.txt", "\n".join(f"line {i} of some words" for i in range(300)))
    built = build_token_corpus([file_source(path)], str(tmp_path), vocab_size=500, valid_fraction=0.1)
    from_file = TokenStreams(built.train_tokens(), batch_size=4, bptt=7, rank=1, world_size=2)
    from_array = TokenStreams(np.array(built.tokens[:built.train_count]), batch_size=4, bptt=7, rank=1, world_size=2)
    for (_, (inputs, targets)), (_, (array_inputs, array_targets)) in zip(from_file.epoch_batches(0),
                                                                          from_array.epoch_batches(0)):
        assert torch.equal(inputs, array_inputs) and torch.equal(targets, array_targets)


@pytest.mark.parametrize("random_bptt", [False, True], ids=["fixed-bptt", "random-bptt"])
def test_streams_continue_across_batches(random_bptt):
    tokens = np.arange(1000, dtype=np.uint32)
    streams = TokenStreams(tokens, batch_size=4, bptt=12, random_bptt=random_bptt, seed=3)
    windows = [batch for _, batch in streams.epoch_batches(epoch=0)]
    assert len(windows) == streams.steps(0) > 2
    for (inputs, targets), (next_inputs, _) in zip(windows, windows[1:]):
        assert torch.equal(targets[:, -1], next_inputs[:, 0])  # window k's last target: window k+1's first input
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
    rows = torch.cat([inputs for inputs, _ in windows], dim=1)
    length = streams.stream_length
    assert torch.equal(rows, torch.arange(4 * length).reshape(4, length))  # row s: stream s, contiguous
    if random_bptt:
        assert len(set(streams.window_lengths(0))) > 1 and streams.window_lengths(0) != streams.window_lengths(1)


def test_two_ranks_read_disjoint_shards_covering_the_corpus():
    tokens = np.arange(10_001, dtype=np.uint32)
    single = TokenStreams(tokens, batch_size=8, bptt=10)
    ranks = [TokenStreams(tokens, batch_size=8, bptt=10, rank=r, world_size=2) for r in range(2)]
    shards = [ranks[r].shard_ranges() for r in range(2)]
    assert shards[0] + shards[1] == single.shard_ranges()
    covered = sorted(position for shard in shards[0] + shards[1] for position in range(*shard))
    assert covered == list(range(8 * single.stream_length))  # each input token read by exactly one rank
    first = [next(r.epoch_batches(0))[1][0] for r in ranks]
    assert torch.equal(torch.cat(first), next(single.epoch_batches(0))[1][0])


def _graph_size(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_carried_state_is_detached_and_the_graph_stays_flat():
    torch.manual_seed(0)
    model = LanguageModel(RecurrentEncoder.stacked(30, 8, 8, num_layers=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = np.random.default_rng(0).integers(3, 30, size=4 * 5 * 200 + 1).astype(np.uint16)
    streams = TokenStreams(tokens, batch_size=4, bptt=5)
    sizes = []
    for index, batch in streams.epoch_batches(0):
        optimizer.zero_grad()
        loss, _ = streams.loss(model, batch)
        sizes.append(_graph_size(loss))
        loss.backward()
        optimizer.step()
        (h, c), = streams.state  # one recurrent module
        assert h.grad_fn is None and c.grad_fn is None and not h.requires_grad and h.shape == (2, 4, 8)
    assert len(sizes) == 200 and index == 199
    assert len(set(sizes)) == 1  # the graph of window 200 is as large as that of window 1
    assert streams.position == 200 * 5


def test_carried_state_changes_the_loss_and_reset_starts_from_zeros():
    torch.manual_seed(0)
    model = LanguageModel(RecurrentEncoder.stacked(30, 8, 8)).eval()
    tokens = np.random.default_rng(1).integers(3, 30, size=2 * 30 + 1).astype(np.uint16)
    losses = {}
    with torch.no_grad():
        for mode in (True, False):
            streams = TokenStreams(tokens, batch_size=2, bptt=10, carry_state=mode)
            losses[mode] = [float(streams.loss(model, batch)[0]) for _, batch in streams.epoch_batches(0)]
        inputs, targets = TokenStreams(tokens, batch_size=2, bptt=10).window(10, 10)
        window_alone = float(model(inputs, targets))
    assert losses[True][0] == losses[False][0] and losses[True][1] != losses[False][1]
    assert losses[False][1] == pytest.approx(window_alone)


def _tiny_corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(25)]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(120)]
    path = _write(tmp_path / "lm.txt", "\n".join(lines))
    return build_token_corpus([file_source(path)], str(tmp_path / "cache"), vocab_size=40, valid_fraction=0.1)


def _final_weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("stop_after,epoch", [(7, 0), (40, 1)], ids=["mid-first-epoch", "mid-second-epoch"])
def test_stopped_and_resumed_pretraining_equals_uninterrupted(tmp_path, stop_after, epoch):
    tokens = _tiny_corpus(tmp_path)
    recipe = Recipe(embedding_dim=8, hidden_size=8, num_layers=2, lm_epochs=2, lm_batch_size=4, lm_chunk_length=6,
                    lm_random_bptt=True, dropout=0.2, vocab_size=40)
    whole = RunControl(output_dir=str(tmp_path / "whole"), show_progress=False)
    pretrain_language_model(tokens, recipe, whole)
    parts = RunControl(output_dir=str(tmp_path / "parts"), show_progress=False, stop_after_steps=stop_after)
    with pytest.raises(StopRequested):
        pretrain_language_model(tokens, recipe, parts)
    saved = torch.load(parts.checkpoint("language_model"), weights_only=False)
    assert saved["epoch"] == epoch and saved["step_in_epoch"] > 0
    assert saved["batch_source"][0]["position"] > 0 and saved["batch_source"][0]["state"] is not None
    resumed = RunControl(output_dir=str(tmp_path / "parts"), show_progress=False, resume=True)
    _, summary = pretrain_language_model(tokens, recipe, resumed)
    first = _final_weights(whole.checkpoint("language_model"))
    second = _final_weights(parts.checkpoint("language_model"))
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert summary["history"]["epochs"][-1]["valid_perplexity"] > 1


def test_two_process_pretraining_reads_each_ranks_own_streams(tmp_path):
    lines = [" ".join(f"w{(i * 7 + j) % 23}" for j in range(10)) for i in range(200)]
    path = _write(tmp_path / "lm.txt", "\n".join(lines))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "rnntl_fast", "pretrain", "--lm-text", path,
               "--no-lm-train-text", "--vocab-size", "40", "--embedding-dim", "8", "--hidden-size", "8",
               "--lm-epochs", "1", "--lm-batch-size", "4", "--lm-chunk-length", "8", "--threads", "1",
               "--no-progress", "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = torch.load(tmp_path / "out" / "language_model.pt", weights_only=False)
    assert saved["world_size"] == 2 and len(saved["batch_source"]) == 2
    rank_states = [entry["state"][0][0] for entry in saved["batch_source"]]  # module 0's h_n
    assert rank_states[0].shape == (1, 2, 8)  # each rank carried the state of its own 2 of the 4 streams
    assert not torch.equal(rank_states[0], rank_states[1])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["language_model"]["corpus"]["train_tokens"] + metrics["language_model"]["corpus"]["valid_tokens"] \
        == 200 * 11


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case,content,message", [
    ("missing", None, r"missing\.txt: no such file"),
    ("empty", b"", r"empty\.txt: the file is empty"),
    ("blank", b"\n  \n\t\n", r"blank\.txt: no text"),
    ("binary", b"text\nmore\x00\x01\x02", r"binary\.txt: NUL byte at byte 9; is this a binary file"),
    ("latin1", "caf\xe9\n".encode("latin-1"), r"latin1\.txt: not UTF-8 text at byte 3"),
    ("corrupt-gz", b"not gzip data at all", r"corrupt-gz\.txt\.gz: cannot read"),
    ("rare-words", b"a b c d\n", r"rare-words\.txt: no word occurs at least 2 times"),
], ids=["missing", "empty", "blank-lines-only", "binary", "latin-1", "corrupt-gz", "vocabulary-too-small"])
def test_bad_input_is_one_line_naming_the_file(tmp_path, case, content, message):
    name = f"{case}.txt.gz" if case == "corrupt-gz" else f"{case}.txt"
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as raised:
        build_token_corpus([file_source(str(path))], str(tmp_path / "cache"), vocab_size=50, min_freq=2)
    assert "\n" not in str(raised.value)


def test_corpus_shorter_than_one_batch_names_the_file(tmp_path):
    path = _write(tmp_path / "short.txt", "only a few words here\n" * 3)
    built = build_token_corpus([file_source(path)], str(tmp_path), vocab_size=50)
    recipe = Recipe(lm_batch_size=8, lm_chunk_length=10)
    with pytest.raises(DataError, match=r"short\.txt \(training part\): 17 tokens are fewer than one batch of 8"):
        pretrain_language_model(built, recipe, RunControl(show_progress=False))


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "argument --lm-text: {path}: no such file"),
    ("empty.txt", b"", "--lm-text {path}: the file is empty"),
    ("binary.txt", b"words\n\x00\x01", "--lm-text {path}: NUL byte at byte 6; is this a binary file?"),
    ("latin1.txt", "un caf\u00e9\n".encode("latin-1"), "--lm-text {path}: not UTF-8 text at byte 6"),
], ids=["missing", "empty", "binary", "not-utf8"])
def test_pretrain_command_reports_a_bad_file_in_one_line(tmp_path, capsys, name, content, message):
    from rnntl_fast.cli import main
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--lm-text", str(path), "--no-lm-train-text", "--lm-workers", "1", "--no-progress",
              "--threads", "1", "--output-dir", str(output)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and error.startswith("rnntl-fast pretrain: error: ")
    assert message.format(path=path) in error
    assert not output.exists()  # created by the run, holding only the token cache: removed again
