"""Word vectors (word2vec text/binary, GloVe, fastText .vec) -> nn.Embedding aligned to a
vocabulary, with a coverage report.

Formats (all read in one streaming pass; nothing is read twice, and with a vocabulary
only the vectors it needs are parsed and kept in memory; other lines are only checked for
their number of fields):
- "word2vec": header "<count> <dim>", then one "<token> <v1> ... <vdim>" line per vector.
  fastText's .vec is this format ("fasttext" is accepted as a synonym).
- "word2vec-binary": the same header line, then per vector: the token's UTF-8 bytes, one
  space, dim little-endian float32 (optionally followed by "\\n", as word2vec.c writes).
- "glove": no header; "<token> <v1> ... <vdim>" lines. The token is everything before the
  last dim fields, so GloVe tokens containing spaces load; dim is taken from the first line
  (fields - 1) unless given.
- "auto": a first line of two integers means word2vec; then text if the first record
  parses as a text line of dim numbers, else binary. Otherwise GloVe.

Alignment to the user's vocabulary, per token, in this order: the exact token, then (if
lowercase_fallback) its lower-case form; the first occurrence in the file wins. Rows
nobody found are OOV rows, initialised as `oov_init` says:
- "normal" (default): N(0, s^2) with s the standard deviation of all loaded vector
  entries (so OOV rows have the pretrained rows' scale), drawn from a torch.Generator
  seeded with `seed` (reproducible);
- "zeros"; "mean": the mean of the found vectors.
The padding row (padding_idx) is zero and is neither looked up nor counted as OOV.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._common import PretrainedFormatError

FORMATS = ("auto", "word2vec", "fasttext", "word2vec-binary", "glove")


@dataclasses.dataclass
class CoverageReport:
    """How a vocabulary was matched against a vector file."""

    path: str
    format: str                   # the format actually read
    dim: int
    vectors_read: int             # records read from the file (stops at `limit`)
    vocab_size: int               # rows of the embedding
    exact: int = 0                # rows found under their exact token
    lowercase: int = 0            # rows found only under the lower-cased token
    missing: List[str] = dataclasses.field(default_factory=list)   # OOV tokens, in row order
    lowercase_matches: Dict[str, str] = dataclasses.field(default_factory=dict)  # token -> file token
    padding_idx: Optional[int] = None
    tokens: List[str] = dataclasses.field(default_factory=list)    # the vocabulary, in row order
    oov_init: str = "normal"

    @property
    def found(self) -> int:
        return self.exact + self.lowercase

    @property
    def coverage(self) -> float:
        """Found rows / rows that needed a vector (the padding row excluded)."""
        wanted = self.vocab_size - (self.padding_idx is not None)
        return self.found / wanted if wanted else 1.0

    def __str__(self) -> str:
        return (f"{self.path} ({self.format}, dim {self.dim}, {self.vectors_read} vectors read): "
                f"{self.found}/{self.vocab_size - (self.padding_idx is not None)} tokens found "
                f"({100 * self.coverage:.1f}%: {self.exact} exact, {self.lowercase} lower-case), "
                f"{len(self.missing)} OOV initialised '{self.oov_init}'"
                + (f", padding row {self.padding_idx}" if self.padding_idx is not None else ""))


# -- readers -------------------------------------------------------------------------------
def _parse_header(line: bytes) -> Optional[Tuple[int, int]]:
    parts = line.split()
    if len(parts) == 2 and all(part.isdigit() for part in parts):
        return int(parts[0]), int(parts[1])
    return None


def _text_record(line: bytes, dim: int, line_number: int, path: str, encoding: str, errors: str, keep=None):
    """(token, vector [dim] float32), or (token, None) when keep(token) is false: the numbers
    of unwanted lines are counted but not parsed, the expensive part of reading a big file."""
    text = line.decode(encoding, errors=errors).rstrip()
    parts = text.rsplit(" ", dim)
    if len(parts) != dim + 1 or not parts[0]:
        raise PretrainedFormatError(f"{path}:{line_number}: expected a token and {dim} numbers, got "
                                    f"{len(text.split())} fields (wrong dimension, or for GloVe a token with "
                                    "spaces on the first line: pass dim=)")
    if keep is not None and not keep(parts[0]):
        return parts[0], None
    try:
        vector = np.array(parts[1:], dtype=np.float32)
    except ValueError as error:
        raise PretrainedFormatError(f"{path}:{line_number}: not a number in {parts[1:]!r:.80}") from error
    return parts[0], vector


def _iter_text(stream, path, dim, stop, announced, encoding, errors, line_number, keep=None) -> Iterator:
    """Text records until `stop` records (None: end of file); `announced` is the header's count,
    which the file must hold."""
    read = 0
    while stop is None or read < stop:
        line = stream.readline()
        if not line:
            if announced is not None and read < stop:
                raise PretrainedFormatError(f"{path}: the header announces {announced} vectors but the file ends "
                                            f"after {read} (truncated?)")
            return
        line_number += 1
        if not line.strip():
            continue
        yield _text_record(line, dim, line_number, path, encoding, errors, keep)
        read += 1


def _iter_binary(stream, path, dim, count, encoding, errors, keep=None) -> Iterator:
    vector_bytes = 4 * dim
    buffer = b""
    position = 0
    chunk_size = 1 << 20
    for read in range(count):
        # Token: bytes up to the next space (word2vec.c may leave a newline before it).
        while True:
            space = buffer.find(b" ", position)
            if space >= 0:
                break
            more = stream.read(chunk_size)
            if not more:
                raise PretrainedFormatError(f"{path}: file ends inside record {read + 1} of {count} (truncated?)")
            buffer, position = buffer[position:] + more, 0
        token = buffer[position:space].lstrip(b"\n")
        start = space + 1
        while len(buffer) - start < vector_bytes:
            more = stream.read(max(chunk_size, vector_bytes))
            if not more:
                raise PretrainedFormatError(f"{path}: file ends inside the vector of record {read + 1} of {count} "
                                            f"({len(buffer) - start} of {vector_bytes} bytes; truncated, or the "
                                            "header's dimension is wrong?)")
            buffer, start = buffer[start:] + more, 0
        try:
            word = token.decode(encoding, errors=errors)
        except UnicodeDecodeError as error:
            raise PretrainedFormatError(f"{path}: record {read + 1}: token is not {encoding} (wrong format or "
                                        "dimension?); pass unicode_errors='replace' to accept it") from error
        if not word:
            raise PretrainedFormatError(f"{path}: record {read + 1}: empty token (wrong dimension in the header?)")
        vector = None
        if keep is None or keep(word):
            vector = np.frombuffer(buffer, dtype="<f4", count=dim, offset=start).astype(np.float32)
        position = start + vector_bytes
        yield word, vector
        if position > chunk_size:   # drop what was consumed, keep memory bounded
            buffer, position = buffer[position:], 0


def _detect(stream, path: str, dim: Optional[int], encoding: str, errors: str):
    """Returns (format, dim, count or None, index of the first data line)."""
    start = stream.tell()
    first = stream.readline()
    header = _parse_header(first)
    if header is None:
        stream.seek(start)
        if dim is None:
            dim = len(first.decode(encoding, errors=errors).rstrip().split(" ")) - 1
            if dim < 1:
                raise PretrainedFormatError(f"{path}: the first line holds no vector")
        return "glove", dim, None, 0
    count, header_dim = header
    if dim is not None and dim != header_dim:
        raise PretrainedFormatError(f"{path}: header says dim {header_dim}, dim={dim} was given")
    after_header = stream.tell()
    probe = stream.read(64 + 32 * header_dim)
    stream.seek(after_header)
    line = probe.split(b"\n", 1)[0]
    try:
        _text_record(line, header_dim, 2, path, encoding, "strict")
        return "word2vec", header_dim, count, 1
    except (PretrainedFormatError, UnicodeDecodeError):
        return "word2vec-binary", header_dim, count, 1


def iter_word_vectors(path, *, format: str = "auto", dim: Optional[int] = None, limit: Optional[int] = None,
                      encoding: str = "utf-8", unicode_errors: str = "strict", keep=None):
    """Streams (token, vector [dim] float32) records from a vector file, in file order,
    stopping after `limit` records. Returns (format, dim, count or None, iterator).

    keep: optional predicate on tokens; records it rejects come back as (token, None)
    without their numbers being parsed (their field count is still checked)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = os.fspath(path)
    stream = io.BufferedReader(io.FileIO(path, "rb"), buffer_size=1 << 20)
    try:
        detected, found_dim, count, data_line = _detect(stream, path, dim, encoding, unicode_errors)
        if format == "fasttext":
            format = "word2vec"
        if format != "auto":
            if (format == "glove") != (detected == "glove"):
                raise PretrainedFormatError(f"{path}: format={format!r} but the file "
                                            f"{'has no' if detected == 'glove' else 'has a'} word2vec header line")
            detected = format
    except BaseException:
        stream.close()
        raise
    wanted = count if limit is None else (limit if count is None else min(count, limit))

    def records():
        with stream:
            if detected == "word2vec-binary":
                yield from _iter_binary(stream, path, found_dim, wanted, encoding, unicode_errors, keep)
            else:
                yield from _iter_text(stream, path, found_dim, wanted, count, encoding, unicode_errors, data_line,
                                      keep)
    return detected, found_dim, count, records()


# -- alignment -----------------------------------------------------------------------------
def _vocab_rows(vocab: Union[Sequence[str], Mapping[str, int]]) -> Tuple[List[str], Dict[str, int]]:
    if isinstance(vocab, Mapping):
        size = max(vocab.values()) + 1 if vocab else 0
        tokens: List[Optional[str]] = [None] * size
        for token, index in vocab.items():
            if not 0 <= index < size or tokens[index] is not None:
                raise ValueError(f"vocab maps two tokens to row {index} (or a negative row)")
            tokens[index] = token
        if any(token is None for token in tokens):
            raise ValueError("vocab's indices must be 0..N-1 without gaps")
        return tokens, dict(vocab)
    tokens = list(vocab)
    rows = {}
    for index, token in enumerate(tokens):
        if token in rows:
            raise ValueError(f"vocab lists {token!r} twice (rows {rows[token]} and {index})")
        rows[token] = index
    return tokens, rows


def load_word_vectors(path, vocab: Union[Sequence[str], Mapping[str, int], None] = None, *, format: str = "auto",
                      limit: Optional[int] = None, dim: Optional[int] = None, lowercase_fallback: bool = True,
                      oov_init: str = "normal", padding_idx: Optional[int] = None, freeze: bool = False,
                      seed: int = 0, dtype: torch.dtype = torch.float32, as_matrix: bool = False,
                      encoding: str = "utf-8", unicode_errors: str = "strict"):
    """Reads a word-vector file into an nn.Embedding whose rows follow `vocab`.

    vocab: tokens in row order (a list) or {token: row}; None keeps the file's tokens in file
        order (duplicates after the first dropped), as gensim does.
    limit: read at most this many vectors from the start of the file (files are usually
        sorted by frequency).
    lowercase_fallback: a token not in the file is looked up again lower-cased.
    oov_init: "normal", "zeros" or "mean" (see the module docstring); `seed` makes "normal"
        reproducible.
    padding_idx: a row kept at zero (and passed to nn.Embedding).
    as_matrix: return the [vocab, dim] tensor instead of an nn.Embedding.

    Returns (nn.Embedding or matrix [vocab_size, dim], CoverageReport).
    """
    if oov_init not in ("normal", "zeros", "mean"):
        raise ValueError(f"oov_init must be 'normal', 'zeros' or 'mean', got {oov_init!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    read = 0
    if vocab is None:
        detected, dim, count, records = iter_word_vectors(path, format=format, dim=dim, limit=limit,
                                                          encoding=encoding, unicode_errors=unicode_errors)
        if padding_idx is not None:
            raise ValueError("padding_idx needs a vocab (the file's rows have no padding row)")
        tokens, vectors, seen = [], [], set()
        for token, vector in records:
            read += 1
            if token in seen:
                continue
            seen.add(token)
            tokens.append(token)
            vectors.append(vector)
        matrix = np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)
        report = CoverageReport(os.fspath(path), detected, dim, read, len(tokens), exact=len(tokens),
                                tokens=tokens, oov_init=oov_init)
        found_rows = np.ones(len(tokens), dtype=bool)
    else:
        tokens, rows = _vocab_rows(vocab)
        if padding_idx is not None and not -len(tokens) <= padding_idx < len(tokens):
            raise ValueError(f"padding_idx {padding_idx} is outside the vocabulary of {len(tokens)}")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += len(tokens)
        # Lower-case keys to look for, only for tokens whose lower-case form differs.
        lower_wanted = {}
        if lowercase_fallback:
            for index, token in enumerate(tokens):
                if index != padding_idx and token.lower() != token:
                    lower_wanted.setdefault(token.lower(), []).append(index)
        detected, dim, count, records = iter_word_vectors(
            path, format=format, dim=dim, limit=limit, encoding=encoding, unicode_errors=unicode_errors,
            keep=lambda token: token in rows or token in lower_wanted)
        matrix = np.zeros((len(tokens), dim), dtype=np.float32)
        exact = np.zeros(len(tokens), dtype=bool)
        lower_vectors: Dict[str, np.ndarray] = {}
        for token, vector in records:
            read += 1
            if vector is None:   # a token nobody asked for (its numbers were not parsed)
                continue
            index = rows.get(token)
            if index is not None and index != padding_idx and not exact[index]:
                matrix[index] = vector
                exact[index] = True
            if token in lower_wanted and token not in lower_vectors:
                lower_vectors[token] = vector
        report = CoverageReport(os.fspath(path), detected, dim, read, len(tokens), padding_idx=padding_idx,
                                tokens=tokens, oov_init=oov_init)
        found_rows = exact.copy()
        for index, token in enumerate(tokens):
            if index == padding_idx:
                continue
            if exact[index]:
                report.exact += 1
            elif token.lower() in lower_vectors:
                matrix[index] = lower_vectors[token.lower()]
                found_rows[index] = True
                report.lowercase += 1
                report.lowercase_matches[token] = token.lower()
            else:
                report.missing.append(token)
        missing_rows = [i for i in range(len(tokens)) if not found_rows[i] and i != padding_idx]
        if missing_rows:
            found = matrix[found_rows]
            if oov_init == "normal":
                scale = float(found.std()) if found.size else 1.0
                generator = torch.Generator().manual_seed(seed)
                noise = torch.randn(len(missing_rows), dim, generator=generator, dtype=torch.float64) * scale
                matrix[missing_rows] = noise.numpy().astype(np.float32)
            elif oov_init == "mean":
                matrix[missing_rows] = found.mean(axis=0) if found.size else 0.0
    weights = torch.from_numpy(matrix).to(dtype)
    if as_matrix:
        return weights, report
    return nn.Embedding.from_pretrained(weights, freeze=freeze, padding_idx=padding_idx), report
