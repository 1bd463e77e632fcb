"""Word vectors (word2vec text/binary, GloVe, fastText .vec) -> nn.Embedding aligned to a
vocabulary, with a coverage report.

Formats (all read in one streaming pass; nothing is read twice, and with a vocabulary
only the vectors it needs are kept in memory):
- "word2vec": header "<count> <dim>", then one "<token> <v1> ... <vdim>" line per vector,
  fields separated by single spaces (the token holds no space). fastText's .vec is this
  format ("fasttext" is accepted as a synonym).
- "word2vec-binary": the same header line, then per vector: the token's UTF-8 bytes, one
  space, dim little-endian float32 (optionally followed by "\\n", as word2vec.c writes).
- "glove": no header; "<token> <v1> ... <vdim>" lines. The token is everything before the
  last dim fields, so GloVe tokens containing spaces load (unless the token's last word is
  a number: that is a line with one number too many); dim is taken from the first line
  (fields - 1) unless given.
- "auto": a first line of two integers means word2vec; then text if the first record is a
  line without ASCII control bytes, else binary (float bytes nearly always hold some).
  Otherwise GloVe.
Files compressed with gzip, bzip2 or xz (.gz / .bz2 / .xz, recognised by their first
bytes) are decompressed while reading.

Parsing is strict (gensim's KeyedVectors.load_word2vec_format rejects all of these too,
except where noted): a record with a field too many or too few, a non-number, an empty
field (two spaces in a row), a header that is not two integers "count dim" with count >= 0
and dim >= 1, fewer records than the header announces, a blank line between records, text
that is not valid in `encoding`, and a damaged compressed stream raise
PretrainedFormatError naming the file, the line (binary files: the record and its byte
offset) and the reason. Stricter than gensim: records after the header's count, an empty
token, a binary token with control characters (the previous vector's bytes, when the
header's dimension is too small) and dim 0 are errors too. With a vocabulary, records it
does not use are not parsed: they are checked for their field count, empty fields and
characters no number contains (so "x" is an error there, a malformed "1..2" is not).

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

import bz2
import codecs
import dataclasses
import gzip
import io
import lzma
import os
import re
import zlib
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


# -- bytes -----------------------------------------------------------------------------------
_CHUNK = 1 << 20
# The compressed formats gensim reads (through smart_open, by file extension), recognised
# here by their first bytes so that a misnamed file reads too.
_COMPRESSED = (("gzip", re.compile(rb"\x1f\x8b")), ("bzip2", re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")),
               ("xz", re.compile(rb"\xfd7zXZ\x00")))
_DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


class _Bytes:
    """A vector file's bytes (decompressed when it is gzip / bzip2 / xz), read by lines or
    blocks. A damaged or truncated compressed stream is a PretrainedFormatError naming the
    file and where in it (`binary` switches that from a line number to a byte offset)."""

    def __init__(self, path: str):
        self.path = path
        self.lines = 0         # lines returned by readline
        self.offset = 0        # (decompressed) bytes returned so far
        self.binary = False
        self._file = io.BufferedReader(io.FileIO(path, "rb"), buffer_size=_CHUNK)
        try:
            head = self._file.peek(16)[:16]
            self.compression = next((name for name, magic in _COMPRESSED if magic.match(head)), None)
            self._stream = {"gzip": lambda f: gzip.GzipFile(fileobj=f), "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile,
                            None: lambda f: f}[self.compression](self._file)
        except BaseException:
            self._file.close()
            raise

    def _call(self, method, argument: int) -> bytes:
        try:
            data = method(argument)
        except _DECOMPRESSION_ERRORS as error:
            if self.compression is None:
                raise
            where = f"byte {self.offset}" if self.binary else f"line {self.lines + 1}"
            raise PretrainedFormatError(f"{self.path}: {where}: the {self.compression} stream is damaged or "
                                        f"truncated ({error or type(error).__name__})") from error
        self.offset += len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        line = self._call(self._stream.readline, limit)
        self.lines += bool(line)
        return line

    def read(self, size: int) -> bytes:
        return self._call(self._stream.read, size)

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._file.close()


# -- records ---------------------------------------------------------------------------------
_INTEGER = re.compile(rb"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NUMBER_BYTES = b"0123456789.+-eEnNaAiIfFtTyY"   # every character of a number (nan, inf, infinity)
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")   # tab, \n, \r allowed


def _decode(raw: bytes, path: str, where: str, encoding: str, errors: str) -> str:
    try:
        return raw.decode(encoding, errors)
    except UnicodeDecodeError as error:
        raise PretrainedFormatError(f"{path}: {where}: byte {error.start} is not valid {encoding} ({error.reason}); "
                                    "pass encoding= or unicode_errors='replace'") from None


def _text_record(line: bytes, dim: int, line_number: int, path: str, encoding: str, errors: str,
                 glove: bool, dim_source: str, keep=None):
    """(token, vector [dim] float32) of one text line, or (token, None) when keep(token) is
    false (its fields are then checked, not parsed). GloVe tokens may contain spaces;
    word2vec's may not."""
    where = f"line {line_number}"
    text = _decode(line.rstrip(), path, where, encoding, errors)
    parts = text.rsplit(" ", dim) if glove else text.split(" ")
    if len(parts) != dim + 1:
        raise PretrainedFormatError(f"{path}: {where}: expected a token and {dim} numbers ({dim_source}), found "
                                    f"a token and {len(parts) - 1} fields")
    token = parts[0]
    if glove and " " in token:   # a token with spaces, unless its last words are numbers
        words, extra = token.split(" "), 0
        while extra < len(words) - 1 and _NUMBER.fullmatch(words[-1 - extra]):
            extra += 1
        if extra:
            raise PretrainedFormatError(f"{path}: {where}: expected a token and {dim} numbers ({dim_source}), "
                                        f"found {' '.join(words[:-extra])!r} and {dim + extra} numbers")
    if not token:
        raise PretrainedFormatError(f"{path}: {where}: empty token (the line starts with a space)")
    wanted = keep is None or keep(token)
    if not wanted:
        # Not parsed (the expensive part of reading a big file), only checked for empty
        # fields and characters no number has; anything suspicious is parsed for the error.
        numbers = text[len(token) + 1:]
        leftover = numbers.encode("utf-8", "replace").translate(None, _NUMBER_BYTES)
        if leftover == b" " * (dim - 1) and not numbers.startswith(" ") and "  " not in numbers:
            return token, None
    try:
        vector = np.array(parts[1:], dtype=np.float32)
    except ValueError:
        for position, field in enumerate(parts[1:], start=1):
            try:
                float(field)
            except ValueError:
                what = "is empty (two spaces in a row?)" if not field else f"{field[:40]!r} is not a number"
                raise PretrainedFormatError(f"{path}: {where}: field {position} after the token {what}") from None
        raise PretrainedFormatError(f"{path}: {where}: the fields after the token are not all numbers") from None
    return token, (vector if wanted else None)


def _lines(source: _Bytes, first: Optional[bytes], number: int) -> Iterator[Tuple[int, bytes]]:
    """(line number, bytes) from line `number` on; `first` is that line if already read."""
    if first is not None:
        yield number, first
        number += 1
    while True:
        line = source.readline()
        if not line:
            return
        yield number, line
        number += 1


def _iter_text(source: _Bytes, path: str, dim: int, glove: bool, dim_source: str, first: Optional[bytes],
               first_number: int, announced: Optional[int], stop: Optional[int], check_rest: bool, encoding: str,
               errors: str, keep) -> Iterator:
    """Text records from line `first_number` until `stop` records (None: end of file).
    `announced`: the header's count, which the file must hold; with `check_rest` nothing
    but blank lines may follow the announced records."""
    read, blank, number = 0, None, first_number - 1
    lines = _lines(source, first, first_number)
    if stop is None or stop > 0:
        for number, line in lines:
            if not line.strip():
                blank = blank or number
                continue
            if blank is not None:
                raise PretrainedFormatError(f"{path}: line {blank}: blank line between vectors")
            yield _text_record(line, dim, number, path, encoding, errors, glove, dim_source, keep)
            read += 1
            if stop is not None and read >= stop:
                break
    if announced is not None and read < stop:
        raise PretrainedFormatError(f"{path}: line {number}: the file ends after {read} of the {announced} vectors "
                                    "the header announces (truncated?)")
    if check_rest:
        for number, line in lines:
            if line.strip():
                raise PretrainedFormatError(f"{path}: line {number}: more vectors than the {announced} the header "
                                            "announces")


def _iter_binary(source: _Bytes, path: str, dim: int, buffer: bytes, base: int, announced: int, stop: int,
                 check_rest: bool, encoding: str, errors: str, keep) -> Iterator:
    """Binary records: token bytes, a space, dim little-endian float32. `buffer` holds bytes
    already read, starting at byte `base` of the file. Errors name the record and its byte."""
    source.binary = True
    vector_bytes = 4 * dim
    position = 0
    for record in range(1, stop + 1):
        where = f"record {record} of {announced} (byte {base + position})"
        while True:   # the token: bytes up to the next space
            space = buffer.find(b" ", position)
            if space >= 0:
                break
            more = source.read(_CHUNK)
            if not more:
                raise PretrainedFormatError(f"{path}: {where}: the file ends inside the token (truncated, or the "
                                            "header's count or dimension is wrong?)")
            buffer, base, position = buffer[position:] + more, base + position, 0
        # word2vec.c ends each vector with "\n", which the next record's token starts with
        token = buffer[position:space].lstrip(b"\n")
        where = f"record {record} of {announced} (byte {base + space - len(token)})"
        word = _decode(token, path, where, encoding, errors)
        if not word:
            raise PretrainedFormatError(f"{path}: {where}: empty token (wrong dimension in the header?)")
        if _CONTROL.search(word):
            raise PretrainedFormatError(f"{path}: {where}: the token {word[:40]!r} holds control characters (wrong "
                                        "dimension in the header, or not a word2vec binary file?)")
        start = space + 1
        if len(buffer) - start < vector_bytes:
            pieces, have = [buffer[start:]], len(buffer) - start
            while have < vector_bytes:
                more = source.read(_CHUNK)
                if not more:
                    raise PretrainedFormatError(f"{path}: {where}: the file ends inside the vector ({have} of "
                                                f"{vector_bytes} bytes; truncated, or the header's dimension is "
                                                "wrong?)")
                pieces.append(more)
                have += len(more)
            buffer, base, start = b"".join(pieces), base + start, 0
        vector = None
        if keep is None or keep(word):
            vector = np.frombuffer(buffer, dtype="<f4", count=dim, offset=start).astype(np.float32)
        position = start + vector_bytes
        yield word, vector
        if position > _CHUNK:   # drop what was consumed, keep memory bounded
            buffer, base, position = buffer[position:], base + position, 0
    if check_rest:
        rest = buffer[position:]
        while True:
            if rest.strip():
                offset = base + position + len(rest) - len(rest.lstrip())
                raise PretrainedFormatError(f"{path}: byte {offset}: more data after the {announced} vectors the "
                                            "header announces (wrong count or dimension in the header?)")
            base, position = base + position + len(rest), 0
            rest = source.read(_CHUNK)
            if not rest:
                return


def _parse_header(first: bytes, path: str, format: str) -> Optional[Tuple[int, int]]:
    """(count, dim) of a word2vec header line; None when the first line is not one (GloVe)."""
    fields = first.split()
    if len(fields) < 2 or not all(_INTEGER.fullmatch(field) for field in fields):
        return None
    if len(fields) > 2:
        if format == "glove":   # a GloVe record whose token and numbers are all integers
            return None
        raise PretrainedFormatError(f"{path}: line 1: {len(fields)} integers; a word2vec header is 'count dim' "
                                    "(pass format='glove' if this line is a vector)")
    count, dim = int(fields[0]), int(fields[1])
    if count < 0 or dim < 1:
        raise PretrainedFormatError(f"{path}: line 1: header {first.strip().decode()!r}: "
                                    + ("the vector count is negative" if count < 0 else "the dimension must be >= 1"))
    return count, dim


def _looks_like_text(line: bytes) -> bool:
    """Whether the first record after a header is a text line (else: binary): a whole line
    without ASCII control bytes. Binary records hold float bytes, which almost always
    include some (0x00 in most); text does not, even when damaged or in another encoding."""
    return (not line or line.endswith(b"\n")) and not _CONTROL_BYTES.search(line)


def _detect(source: _Bytes, path: str, format: str, dim: Optional[int], encoding: str, errors: str):
    """Reads the header (if any) and the first record's line. Returns (format, dim, count or
    None, the first record's bytes or None, its line number, dim_source)."""
    first = source.readline()
    if not first:
        raise PretrainedFormatError(f"{path}: the file is empty")
    header = _parse_header(first, path, format)
    if header is None:
        if format in ("word2vec", "word2vec-binary"):
            raise PretrainedFormatError(f"{path}: line 1: format={format!r} needs a header line 'count dim', found "
                                        f"{first[:60]!r}")
        if dim is None:
            dim = len(_decode(first.rstrip(), path, "line 1", encoding, errors).split(" ")) - 1
            if dim < 1:
                raise PretrainedFormatError(f"{path}: line 1: no vector after the token (a GloVe line is "
                                            "'token v1 ... vdim')")
            return "glove", dim, None, first, 1, "the dimension of line 1"
        return "glove", dim, None, first, 1, f"dim={dim}"
    if format == "glove":
        raise PretrainedFormatError(f"{path}: line 1: format='glove' but the file has a word2vec header line "
                                    f"{first.strip().decode()!r}")
    count, header_dim = header
    if dim is not None and dim != header_dim:
        raise PretrainedFormatError(f"{path}: line 1: the header says dim {header_dim}, dim={dim} was given")
    if count == 0:
        return ("word2vec" if format == "auto" else format), header_dim, 0, None, 2, "the header's dimension"
    # A text record of header_dim numbers is far shorter than this; a binary one may hold a "\n" anywhere.
    probe = source.readline(1024 + 64 * header_dim)
    if format == "auto":
        format = "word2vec" if _looks_like_text(probe) else "word2vec-binary"
    return format, header_dim, count, probe, 2, "the header's dimension"


def iter_word_vectors(path, *, format: str = "auto", dim: Optional[int] = None, limit: Optional[int] = None,
                      encoding: str = "utf-8", unicode_errors: str = "strict", keep=None):
    """Streams (token, vector [dim] float32) records from a vector file, in file order,
    stopping after `limit` records. Returns (format, dim, count or None, iterator).

    keep: optional predicate on tokens; records it rejects come back as (token, None), their
    fields checked (count, empty fields, characters no number has) but not parsed."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    codecs.lookup(encoding)   # an unknown encoding is the caller's error, before the file is opened
    if format == "fasttext":
        format = "word2vec"
    path = os.fspath(path)
    source = _Bytes(path)
    try:
        format, dim, count, first, first_number, dim_source = _detect(source, path, format, dim, encoding,
                                                                      unicode_errors)
    except BaseException:
        source.close()
        raise
    stop = count if limit is None else (limit if count is None else min(count, limit))
    check_rest = count is not None and (limit is None or limit >= count)

    def records():
        try:
            if format == "word2vec-binary":
                yield from _iter_binary(source, path, dim, first or b"", source.offset - len(first or b""), count,
                                        stop, check_rest, encoding, unicode_errors, keep)
            else:
                yield from _iter_text(source, path, dim, format == "glove", dim_source, first, first_number, count,
                                      stop, check_rest, encoding, unicode_errors, keep)
        finally:
            source.close()
    return format, dim, count, records()


# -- alignment -----------------------------------------------------------------------------
def _zeros(rows: int, dim: int, path, records: int) -> np.ndarray:
    """A [rows, dim] float32 zero matrix; a dimension no memory can hold is the file's error."""
    try:
        return np.zeros((rows, dim), dtype=np.float32)
    except MemoryError:
        raise PretrainedFormatError(f"{os.fspath(path)}: line 1: the header's dimension {dim} needs a [{rows}, {dim}] "
                                    f"matrix ({4 * rows * dim / 2**30:.1f} GiB), and the file's {records} vector(s) "
                                    "do not show it is right") from None


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
    read = 0
    if vocab is None:
        if padding_idx is not None:
            raise ValueError("padding_idx needs a vocab (the file's rows have no padding row)")
        detected, dim, count, records = iter_word_vectors(path, format=format, dim=dim, limit=limit,
                                                          encoding=encoding, unicode_errors=unicode_errors)
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
        exact_vectors: Dict[int, np.ndarray] = {}
        lower_vectors: Dict[str, np.ndarray] = {}
        for token, vector in records:
            read += 1
            if vector is None:   # a token nobody asked for
                continue
            index = rows.get(token)
            if index is not None and index != padding_idx and index not in exact_vectors:
                exact_vectors[index] = vector
            if token in lower_wanted and token not in lower_vectors:
                lower_vectors[token] = vector
        # allocated only now: `dim` is the header's claim until a record confirmed it
        matrix = _zeros(len(tokens), dim, path, read)
        exact = np.zeros(len(tokens), dtype=bool)
        for index, vector in exact_vectors.items():
            matrix[index] = vector
            exact[index] = True
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
