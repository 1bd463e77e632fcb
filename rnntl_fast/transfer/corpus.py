"""Language-model corpora of any size and their stateful batching.

A corpus is a list of sources, text files (plain, .gz, .bz2 or .xz; one document per
non-blank line) or in-memory documents. Pass 1 tokenizes blocks of whole lines in parallel
over worker processes, counts words and writes every document (its words, then <eos>) as
numbers of a table of the words seen so far (in order of first appearance); the vocabulary
is then the most frequent words, and pass 2 (numpy, no text) renumbers the tokens into
vocabulary ids in the token-id file, uint16 when the vocabulary has at most 65,536 words,
else uint32. Text is thus tokenized once. The file and a JSON description sit
in a cache folder (the run's output folder); a later run with the same inputs (same size and
mtime, or the same content hash when only the mtime changed) and the same tokenizer settings
maps the file and starts training at once. Tokens are the ones `data.tokenize` gives, so a
corpus read here has exactly the ids of the in-memory path.

`TokenCorpus.tokens` maps the file read-only for random access. Training and validation
read their windows with pread instead (`TokenFileRange`): pages of a map count as resident
memory of the process, and touching one page of a large file maps up to a couple of MB
around it (large page-cache folios), so 64 streams far apart would keep ~100 MB of the file
resident; pread leaves them in the page cache only. `TokenStreams` cuts the tokens into
B contiguous streams (one per batch row) and walks them window by window; window k+1 of a
row continues window k, and the recurrent state at the end of window k, detached, is the
state window k+1 starts from (truncated backpropagation through time). The held-out part
is the end of the token stream (docs/finetune.md).
"""
import bz2
import collections
import gzip
import hashlib
import itertools
import json
import lzma
import multiprocessing
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .data import DataError, Vocab

BLOCK_BYTES = 1 << 20
NUMBER_CHUNK = 1 << 20  # tokens per read of pass 1's numbers
# The word rules of data.tokenize plus "\n", which marks the end of a document (<eos>).
_STREAM_TOKEN = re.compile(r"\n|[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_EOS_MARK = "\n"
TOKENIZER_SETTINGS = {"tokens": _STREAM_TOKEN.pattern, "lowercase": True, "documents": "non-blank lines",
                      "file_format": 1}
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")
TOKEN_FILE, DESCRIPTION_FILE = "lm_tokens.bin", "lm_tokens.json"


def cache_files(folder: str) -> List[str]:
    """The names of the files in `folder` that corpus building wrote (the token file, its
    description, the reversed copy, and what a cut-short build leaves)."""
    stems = (TOKEN_FILE, DESCRIPTION_FILE, TOKEN_FILE.replace(".bin", "_reversed.bin"))
    return [name for name in os.listdir(folder) if name.startswith(stems)]


# -- sources and blocks ------------------------------------------------------------------

@dataclass
class TextSource:
    """One input of a corpus: a file (`path`) or in-memory `documents`. A `vocabulary_only`
    source counts towards the vocabulary but is not part of the token stream."""
    name: str
    path: Optional[str] = None
    documents: Optional[Sequence[str]] = None
    vocabulary_only: bool = False


def file_source(path: str) -> TextSource:
    return TextSource(os.path.abspath(path), path=path)


def check_text_file(path: str) -> None:
    """Raises DataError (naming the file) for a missing path, a folder or an empty file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _file_blocks(path: str) -> Iterator[Tuple[int, bytes]]:
    """(offset, bytes) blocks of about BLOCK_BYTES of the (decompressed) file, each ending at a
    line break except possibly the last."""
    offset, pending = 0, []  # pending: the start of a line not ended yet
    try:
        with _open_binary(path) as handle:
            while True:
                chunk = handle.read(BLOCK_BYTES)
                if not chunk:
                    break
                cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
                if cut == 0:  # a line longer than a block: read on
                    pending.append(chunk)
                    continue
                block = b"".join(pending) + chunk[:cut]
                yield offset, block
                offset, pending = offset + len(block), [chunk[cut:]]
            if any(pending):
                yield offset, b"".join(pending)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as error:
        raise DataError(f"{path}: cannot read: {error}") from None


def _document_blocks(documents: Sequence[str]) -> Iterator[Tuple[int, bytes]]:
    """In-memory documents as blocks of lines (a document's own line breaks become spaces)."""
    lines, size, offset = [], 0, 0
    for document in documents:
        line = document.replace("\r", " ").replace("\n", " ").encode("utf-8")
        lines.append(line)
        size += len(line) + 1
        if size >= BLOCK_BYTES:
            yield offset, b"\n".join(lines) + b"\n"
            lines, offset, size = [], offset + size, 0
    if lines:
        yield offset, b"\n".join(lines) + b"\n"


def _blocks(source: TextSource) -> Iterator[Tuple[int, bytes]]:
    return _file_blocks(source.path) if source.path is not None else _document_blocks(source.documents)


def _words(name: str, offset: int, raw: bytes) -> List[str]:
    """The tokens of a block of whole lines; "\n" marks every line end (runs of them, from
    blank lines, are merged later)."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{name}: NUL byte at byte {offset + nul}; is this a binary file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{name}: not UTF-8 text at byte {offset + error.start}; is this a binary file?") from None
    text = text.lower().replace("\r", _EOS_MARK).strip()
    return _STREAM_TOKEN.findall(text + _EOS_MARK) if text else []


def _tokenize_block(task: Tuple[int, str, int, bytes]) -> Tuple[int, List[str], np.ndarray, np.ndarray]:
    """(source index, the block's distinct words, their counts [k], the block's tokens as ids
    [n] into those words): one "\n" (<eos>) after each non-blank line."""
    index, name, offset, raw = task
    words = _words(name, offset, raw)
    first: Dict[str, int] = {}  # word -> position of its first occurrence
    positions = np.fromiter(map(first.setdefault, words, itertools.count()), dtype=np.int64, count=len(words))
    dense = np.zeros(len(words), dtype=np.int64)
    dense[np.fromiter(first.values(), dtype=np.int64, count=len(first))] = np.arange(len(first))
    ids = dense[positions]
    if _EOS_MARK in first:  # blank lines: a run of line ends is one document end
        eos = dense[first[_EOS_MARK]]
        repeated = (ids[1:] == eos) & (ids[:-1] == eos)
        ids = ids[np.concatenate(([True], ~repeated))]
    return index, list(first), np.bincount(ids, minlength=len(first)), ids


class _WordTable:
    """Every distinct word seen so far, numbered in order of first appearance, with counts."""

    def __init__(self):
        self.ids: Dict[str, int] = {}
        self.counts = np.zeros(1 << 12, dtype=np.int64)

    def add(self, words: List[str], counts: np.ndarray) -> np.ndarray:
        """Counts `words` (distinct) `counts` [k] times; returns their numbers [k]."""
        new = [w for w in words if w not in self.ids]
        self.ids.update(zip(new, range(len(self.ids), len(self.ids) + len(new))))
        if len(self.ids) > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(max(len(self.ids), len(self.counts)), np.int64)])
        numbers = np.fromiter(map(self.ids.__getitem__, words), dtype=np.int64, count=len(words))
        self.counts[numbers] += counts
        return numbers

    def word_counts(self) -> Dict[str, int]:
        return {w: int(self.counts[i]) for w, i in self.ids.items() if w != _EOS_MARK}


def _map_ordered(function: Callable, tasks: Iterator, workers: int, initializer=None, initargs=()) -> Iterator:
    """function(task) for every task, in order, over `workers` processes; at most two tasks
    per worker are in flight, so memory stays bounded whatever the corpus size."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, tasks)
        return
    # fork: workers inherit the loaded modules; they run only this module's pure-Python code
    with multiprocessing.get_context("fork").Pool(workers, initializer, initargs) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(function, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    """Text processed and its rate: a bar with MB/s on a terminal, otherwise one plain line
    every `every_mb` MB and one at the end."""

    def __init__(self, label: str, total_bytes: Optional[int], enabled: bool, every_mb: int = 100):
        self.label, self.enabled, self.every = label, enabled, every_mb * 10**6
        self.done, self.started, self.next_line = 0, time.perf_counter(), self.every
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, desc=label, unit="B", unit_scale=True, unit_divisor=1000,
                            dynamic_ncols=True, leave=False)

    def rate(self) -> float:
        return self.done / 1e6 / max(time.perf_counter() - self.started, 1e-9)

    def update(self, size: int) -> None:
        self.done += size
        if self.bar is not None:
            self.bar.update(size)
        elif self.enabled and self.done >= self.next_line:
            self.next_line += self.every
            print(f"{self.label}: {self.done / 1e6:.0f} MB, {self.rate():.1f} MB/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"{self.label}: {self.done / 1e6:.1f} MB in {time.perf_counter() - self.started:.1f} s "
                  f"({self.rate():.1f} MB/s)", file=sys.stderr, flush=True)


def _tasks(sources: Sequence[TextSource], progress: _Progress) -> Iterator[Tuple[int, str, int, bytes]]:
    """Every block of `sources` as a worker task (source index, source name, offset, bytes)."""
    for index, source in enumerate(sources):
        for offset, raw in _blocks(source):
            progress.update(len(raw))
            yield index, source.name, offset, raw


# -- the token file ------------------------------------------------------------------------

def _file_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _documents_hash(documents: Sequence[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for document in documents:
        digest.update(document.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _describe_input(source: TextSource, previous: Optional[dict]) -> dict:
    """What identifies a source's content: size, mtime and content hash of a file (the hash
    is reused from `previous` when size and mtime are unchanged), or the documents' hash."""
    if source.path is None:
        return {"name": source.name, "documents": len(source.documents), "hash": _documents_hash(source.documents),
                "vocabulary_only": source.vocabulary_only}
    status = os.stat(source.path)
    described = {"name": source.name, "size": status.st_size, "mtime_ns": status.st_mtime_ns,
                 "vocabulary_only": source.vocabulary_only}
    if previous is not None and all(previous.get(k) == described[k] for k in described):
        described["hash"] = previous["hash"]
    else:
        described["hash"] = _file_hash(source.path)
    return described


def _same_content(a: dict, b: dict) -> bool:
    keys = ("name", "hash", "vocabulary_only")
    return all(a.get(k) == b.get(k) for k in keys)


class TokenFileRange:
    """Tokens [start, start + count) of a token file, read with pread: the page cache serves
    them, nothing is mapped, so resident memory stays one batch whatever the file size."""

    def __init__(self, path: str, dtype, start: int, count: int):
        self.path, self.dtype, self.start, self.count = path, np.dtype(dtype), start, count
        self._file = open(path, "rb")

    def __len__(self) -> int:
        return self.count

    def rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length]: row i is tokens [starts[i], starts[i] + length) of the range."""
        size = self.dtype.itemsize
        data = b"".join(os.pread(self._file.fileno(), length * size, (self.start + int(s)) * size) for s in starts)
        return np.frombuffer(data, dtype=self.dtype).reshape(len(starts), length)

    def numpy(self) -> np.ndarray:
        """The whole range [count] in memory (for small ranges and tests)."""
        return self.rows(np.zeros(1, dtype=np.int64), self.count)[0]


class TokenCorpus:
    """A tokenized corpus: `tokens` [N] (uint16 or uint32, a read-only numpy.memmap of the
    token file), the vocabulary, and the split: the first `train_count` tokens train, the last
    `valid_count` (a `valid_fraction` of N, rounded) are held out."""

    def __init__(self, token_path: str, meta: dict):
        self.path, self.meta = token_path, meta
        self.vocab = Vocab.from_state_dict({"itos": meta["itos"]})
        self.name = ", ".join(s["name"] for s in meta["inputs"] if not s["vocabulary_only"])
        self.tokens = np.memmap(token_path, dtype=np.dtype(meta["dtype"]), mode="r")
        if len(self.tokens) != meta["tokens"]:
            raise DataError(f"{token_path}: holds {len(self.tokens)} tokens, its description says {meta['tokens']}")
        self.valid_fraction = meta["settings"]["valid_fraction"]
        self.valid_count = int(round(len(self.tokens) * self.valid_fraction))
        self.train_count = len(self.tokens) - self.valid_count

    def train_tokens(self) -> "TokenFileRange":
        """The first train_count token ids."""
        return TokenFileRange(self.path, self.tokens.dtype, 0, self.train_count)

    def valid_tokens(self) -> "TokenFileRange":
        """The last valid_count token ids: the end of the stream, never trained on."""
        return TokenFileRange(self.path, self.tokens.dtype, self.train_count, self.valid_count)

    def describe(self) -> dict:
        return {"token_file": self.path, "tokens": len(self.tokens), "dtype": self.meta["dtype"],
                "vocabulary": len(self.vocab), "train_tokens": self.train_count, "valid_tokens": self.valid_count,
                "valid_fraction": self.valid_fraction, "inputs": self.meta["inputs"],
                "reused_cache": self.meta.get("reused", False)}


def build_token_corpus(sources: Sequence[TextSource], cache_dir: str, vocab_size: int, min_freq: int = 1,
                       valid_fraction: float = 0.05, workers: int = 1, show_progress: bool = False) -> TokenCorpus:
    """Tokenizes `sources` in order into `cache_dir`/lm_tokens.bin (or reuses it: see the
    module docstring) and returns the mapped corpus, whose last `valid_fraction` of tokens
    are held out (the vocabulary counts only the rest). Raises DataError naming the file for
    a missing, empty or binary input, an input without text, or a vocabulary without words."""
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (three special tokens and a word), got {vocab_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    streamed = [s for s in sources if not s.vocabulary_only]
    if not streamed:
        raise ValueError("a corpus needs at least one source that is not vocabulary_only")
    for source in sources:
        if source.path is not None:
            check_text_file(source.path)
    os.makedirs(cache_dir, exist_ok=True)
    token_path, meta_path = os.path.join(cache_dir, TOKEN_FILE), os.path.join(cache_dir, DESCRIPTION_FILE)
    previous = None
    if os.path.isfile(meta_path) and os.path.isfile(token_path):
        with open(meta_path) as handle:
            previous = json.load(handle)
    settings = {**TOKENIZER_SETTINGS, "vocab_size": vocab_size, "min_freq": min_freq, "valid_fraction": valid_fraction}
    old_inputs = previous["inputs"] if previous is not None and previous.get("settings") == settings else []
    inputs = [_describe_input(s, old_inputs[i] if i < len(old_inputs) else None) for i, s in enumerate(sources)]
    if old_inputs and len(old_inputs) == len(inputs) and all(map(_same_content, old_inputs, inputs)):
        meta = {**previous, "inputs": inputs}  # refresh mtimes of touched-only files
        with open(meta_path, "w") as handle:
            json.dump(meta, handle)
        return TokenCorpus(token_path, {**meta, "reused": True})

    if previous is not None:
        os.remove(meta_path)  # a build cut short must not leave a description of another file
    numbered_path = token_path + ".numbered"
    table, source_tokens = _tokenize(sources, numbered_path, workers, show_progress)
    for source, count in zip(sources, source_tokens):
        if count == 0:
            os.remove(numbered_path)
            raise DataError(f"{source.name}: no text")
    _uncount_held_out(table, numbered_path, valid_fraction)
    vocab = Vocab.from_counts(table.word_counts(), vocab_size, min_freq)
    if len(vocab) <= 3:
        os.remove(numbered_path)
        names = ", ".join(s.name for s in sources)
        raise DataError(f"{names}: no word occurs at least {min_freq} times (--min-freq); the vocabulary "
                        "would hold only <pad>, <unk> and <eos>")
    dtype = np.uint16 if len(vocab) <= 1 << 16 else np.uint32
    total = _renumber(numbered_path, table, vocab, dtype, token_path)
    meta = {"settings": settings, "inputs": inputs, "itos": vocab.itos, "dtype": np.dtype(dtype).name,
            "tokens": total}
    with open(meta_path + ".tmp", "w") as handle:
        json.dump(meta, handle)
    os.replace(meta_path + ".tmp", meta_path)
    return TokenCorpus(token_path, meta)


def reversed_corpus(corpus: TokenCorpus) -> TokenCorpus:
    """The corpus read backwards, for a right-to-left language model: its training part
    reversed, then its held-out part reversed, written next to its token file (read in
    NUMBER_CHUNK pieces, so memory stays small whatever the size). Same vocabulary and the
    same split, so the held-out tokens are again never trained on. Each document's words
    come in reverse order and its <eos> now stands before it: in the reversed stream the
    word after a document's first word is the previous document's <eos>, a document start."""
    path = os.path.splitext(corpus.path)[0] + "_reversed.bin"
    with open(path + ".tmp", "wb") as out:
        for start, end in ((0, corpus.train_count), (corpus.train_count, len(corpus.tokens))):
            while end > start:
                begin = max(start, end - NUMBER_CHUNK)
                np.ascontiguousarray(corpus.tokens[begin:end][::-1]).tofile(out)
                end = begin
    os.replace(path + ".tmp", path)
    inputs = [{**item, "name": f"{item['name']} (reversed)"} for item in corpus.meta["inputs"]]
    return TokenCorpus(path, {**corpus.meta, "inputs": inputs, "reused": False, "reversed_from": corpus.path})


def _known_size(sources: Sequence[TextSource]) -> Optional[int]:
    if any(s.path is None or s.path.endswith(COMPRESSED_SUFFIXES) for s in sources):
        return None
    return sum(os.path.getsize(s.path) for s in sources)


def _tokenize(sources: Sequence[TextSource], numbered_path: str, workers: int,
              show_progress: bool) -> Tuple[_WordTable, List[int]]:
    """Pass 1: tokenizes every source, counting words; the streamed sources' tokens go to
    `numbered_path` as uint32 numbers of the word table. Returns (table, tokens per source)."""
    progress = _Progress("tokenizing", _known_size(sources), show_progress)
    table, source_tokens = _WordTable(), [0] * len(sources)
    with open(numbered_path, "wb") as handle:
        for index, words, counts, ids in _map_ordered(_tokenize_block, _tasks(sources, progress), workers):
            numbers = table.add(words, counts)
            source_tokens[index] += len(ids)
            if not sources[index].vocabulary_only:
                numbers.astype(np.uint32)[ids].tofile(handle)
    progress.close()
    return table, source_tokens


def _numbered_chunks(numbered_path: str, start: int = 0) -> Iterator[np.ndarray]:
    """The numbers of pass 1 from token `start` on, in chunks of NUMBER_CHUNK (bounded memory)."""
    with open(numbered_path, "rb") as handle:
        handle.seek(start * 4)
        while True:
            numbers = np.fromfile(handle, dtype=np.uint32, count=NUMBER_CHUNK)
            if len(numbers) == 0:
                return
            yield numbers


def _uncount_held_out(table: _WordTable, numbered_path: str, valid_fraction: float) -> None:
    """Takes the held-out end of the stream out of the word counts: the vocabulary is the
    training part's."""
    total = os.path.getsize(numbered_path) // 4
    held_out = int(round(total * valid_fraction))
    if held_out:
        for numbers in _numbered_chunks(numbered_path, total - held_out):
            table.counts -= np.bincount(numbers, minlength=len(table.counts))


def _renumber(numbered_path: str, table: _WordTable, vocab: Vocab, dtype, token_path: str) -> int:
    """Pass 2: the word-table numbers of pass 1 -> vocabulary ids, chunk by chunk, into
    `token_path`; removes `numbered_path`. Returns the token count."""
    words = list(table.ids)  # in number order
    id_of_number = np.fromiter(map(vocab.stoi.get, words, itertools.repeat(vocab.unk_id)), dtype=dtype,
                               count=len(words))
    if _EOS_MARK in table.ids:
        id_of_number[table.ids[_EOS_MARK]] = vocab.eos_id
    temporary, total = token_path + ".tmp", 0
    with open(temporary, "wb") as target:
        for numbers in _numbered_chunks(numbered_path):
            id_of_number[numbers].tofile(target)
            total += len(numbers)
    os.replace(temporary, token_path)
    os.remove(numbered_path)
    return total


# -- streams -----------------------------------------------------------------------------

def map_state(function, state):
    """`function` applied to every tensor of a recurrent state: a tensor, None, or a list /
    tuple of those (an encoder's final states: one h_n or (h_n, c_n) per module)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return function(state)
    return type(state)(map_state(function, part) for part in state)


def detach_state(state):
    """A recurrent state (see map_state) cut from its graph."""
    return map_state(Tensor.detach, state)


class TokenStreams:
    """Truncated-BPTT batches over a token stream.

    The first `batch_size * L + 1` of `tokens` [N] (an array, or a TokenFileRange; L =
    (N - 1) // batch_size) are cut into
    `batch_size` contiguous streams; stream s is tokens[s*L : (s+1)*L] (its targets run one
    token further). Under `world_size` processes, rank r owns streams
    [r*b, (r+1)*b), b = batch_size / world_size, so ranks read disjoint parts of the same
    array. An epoch walks every stream in windows of `bptt` tokens (the last one shorter),
    or, with `random_bptt`, of lengths drawn as AWD-LSTM does (mean bptt, or bptt/2 with
    probability 0.05, plus normal noise of sd 5, at least 5) from a generator seeded by
    (seed, epoch), the same on every rank. Window k+1 continues window k in every row.

    `loss(model, (inputs, targets))` runs `model(inputs, targets, state=..., return_state=True)`
    and, with `carry_state`, keeps the final state, detached, for the next window; at the
    start of an epoch the state is zero. `state_dict()` holds the position in the streams and
    the carried state, so a run stopped mid-epoch resumes exactly.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, bptt: int, *, rank: int = 0, world_size: int = 1,
                 random_bptt: bool = False, seed: int = 0, carry_state: bool = True, name: str = "corpus"):
        if batch_size < 1 or bptt < 1:
            raise ValueError(f"batch_size and bptt must be >= 1, got {batch_size} and {bptt}")
        if batch_size % world_size:
            raise ValueError(f"the batch size {batch_size} must be divisible by the number of processes {world_size}")
        self.tokens, self.batch_size, self.bptt = tokens, batch_size, bptt
        self.stream_length = (len(tokens) - 1) // batch_size
        if self.stream_length < bptt:
            raise DataError(f"{name}: {len(tokens)} tokens are fewer than one batch of {batch_size} streams of "
                            f"{bptt} + 1 tokens (--lm-batch-size x --lm-chunk-length)")
        rows = batch_size // world_size
        self.starts = np.arange(rank * rows, (rank + 1) * rows, dtype=np.int64) * self.stream_length
        self.random_bptt, self.seed, self.carry_state = random_bptt, seed, carry_state
        self.state = None
        self.position = 0

    def shard_ranges(self) -> List[Tuple[int, int]]:
        """[start, end) of the input tokens of each of this rank's streams."""
        return [(int(s), int(s) + self.stream_length) for s in self.starts]

    def window_lengths(self, epoch: int) -> List[int]:
        if not self.random_bptt:
            whole, rest = divmod(self.stream_length, self.bptt)
            return [self.bptt] * whole + ([rest] if rest else [])
        generator = np.random.default_rng([self.seed, epoch])
        lengths, remaining = [], self.stream_length
        while remaining > 0:
            mean = self.bptt if generator.random() < 0.95 else self.bptt / 2
            length = min(remaining, max(5, int(generator.normal(mean, 5))))
            lengths.append(length)
            remaining -= length
        return lengths

    def steps(self, epoch: int) -> int:
        return len(self.window_lengths(epoch))

    def window(self, position: int, length: int) -> Tuple[Tensor, Tensor]:
        """(inputs [b, length], targets [b, length]) int64 of this rank's rows at `position`."""
        if isinstance(self.tokens, TokenFileRange):
            rows = self.tokens.rows(self.starts + position, length + 1)
        else:
            rows = self.tokens[self.starts[:, None] + position + np.arange(length + 1)]
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[int, Tuple[Tensor, Tensor]]]:
        """(window index, (inputs, targets)) for windows start, start+1, ... of `epoch`."""
        lengths = self.window_lengths(epoch)
        offsets = [0] + list(itertools.accumulate(lengths))
        if start == 0:
            self.state, self.position = None, 0
        elif self.position != offsets[start]:
            raise ValueError(f"resuming at window {start} of epoch {epoch} (stream position {offsets[start]}), but the "
                             f"carried state is at stream position {self.position}")
        for index in range(start, len(lengths)):
            yield index, self.window(offsets[index], lengths[index])

    def loss(self, model, batch: Tuple[Tensor, Tensor]) -> Tuple[Tensor, int]:
        """Mean next-token loss of one window (inputs [b, T], targets [b, T]) and its token count."""
        inputs, targets = batch
        loss, state = model(inputs, targets, state=self.state if self.carry_state else None, return_state=True)
        self.state = detach_state(state) if self.carry_state else None
        self.position += inputs.shape[1]
        return loss, targets.numel()

    def state_dict(self) -> dict:
        return {"position": self.position, "state": map_state(Tensor.cpu, self.state)}

    def load_state_dict(self, saved: dict, device=None) -> None:
        self.position = saved["position"]
        self.state = map_state(lambda tensor: tensor.to(device), saved["state"])


@torch.no_grad()
def stream_perplexity(model, streams: TokenStreams, device=None) -> float:
    """exp(mean next-token cross-entropy) over one pass of `streams` (state carried between
    windows when `streams.carry_state`), the model in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for _, (inputs, targets) in streams.epoch_batches(0):
        loss, _ = streams.loss(model, (inputs.to(device), targets.to(device)))
        total += float(loss) * targets.numel()
        count += targets.numel()
    model.train(was_training)
    return float(np.exp(total / count))
