"""Word-vector files -> nn.Embedding, checked against gensim's reader on gensim's own test
files (gensim/test/test_data, shipped in the gensim wheel)."""
import bz2
import gzip
import lzma
import os
import struct

import numpy as np
import pytest
import torch

from rnntl_fast.pretrained import PretrainedFormatError, load_word_vectors

gensim = pytest.importorskip("gensim")
from gensim.models import KeyedVectors  # noqa: E402

DATA = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data")

# file, our format name, gensim's reader arguments
FILES = [
    ("test_glove.txt", "glove", dict(binary=False, no_header=True)),
    ("word2vec_pre_kv_c", "word2vec", dict(binary=False)),
    ("euclidean_vectors.bin", "word2vec-binary", dict(binary=True)),
    ("lee_fasttext.vec", "word2vec", dict(binary=False)),
]


@pytest.fixture(scope="module")
def gensim_vectors():
    return {name: KeyedVectors.load_word2vec_format(os.path.join(DATA, name), **kwargs)
            for name, _, kwargs in FILES}


@pytest.mark.parametrize("name, expected_format, _", FILES)
def test_whole_file_matches_gensim(gensim_vectors, name, expected_format, _):
    reference = gensim_vectors[name]
    embedding, report = load_word_vectors(os.path.join(DATA, name))
    assert report.format == expected_format
    assert report.tokens == list(reference.index_to_key)
    assert report.coverage == 1.0 and report.dim == reference.vector_size
    np.testing.assert_array_equal(embedding.weight.detach().numpy(), reference.vectors)


@pytest.mark.parametrize("name, expected_format, kwargs", FILES)
def test_limit_matches_gensim(name, expected_format, kwargs):
    reference = KeyedVectors.load_word2vec_format(os.path.join(DATA, name), limit=50, **kwargs)
    matrix, report = load_word_vectors(os.path.join(DATA, name), limit=50, format=expected_format, as_matrix=True)
    assert report.vectors_read == 50
    assert report.tokens == list(reference.index_to_key)
    np.testing.assert_array_equal(matrix.numpy(), reference.vectors)


@pytest.mark.parametrize("name", [name for name, _, _ in FILES])
def test_vocabulary_alignment(gensim_vectors, name):
    reference = gensim_vectors[name]
    known = reference.index_to_key
    upper = next(token for token in known[5:] if token.upper() != token and token.upper() not in reference)
    vocab = ["<pad>", known[3], "zzz-not-a-word", upper.upper(), known[0]]
    embedding, report = load_word_vectors(os.path.join(DATA, name), vocab, padding_idx=0, seed=1)
    weight = embedding.weight.detach()
    assert embedding.padding_idx == 0 and not weight[0].any()
    np.testing.assert_array_equal(weight[1].numpy(), reference[known[3]])
    np.testing.assert_array_equal(weight[3].numpy(), reference[upper])   # found lower-cased
    np.testing.assert_array_equal(weight[4].numpy(), reference[known[0]])
    assert (report.exact, report.lowercase, report.missing) == (2, 1, ["zzz-not-a-word"])
    assert report.lowercase_matches == {upper.upper(): upper}
    assert report.coverage == pytest.approx(3 / 4)
    # OOV row: N(0, s^2), s = std of the found vectors; reproducible from the seed.
    again, _ = load_word_vectors(os.path.join(DATA, name), vocab, padding_idx=0, seed=1)
    torch.testing.assert_close(again.weight[2], weight[2])
    assert weight[2].abs().max() < 10 * float(weight[[1, 3, 4]].std())
    zeros, _ = load_word_vectors(os.path.join(DATA, name), vocab, oov_init="zeros", as_matrix=True)
    assert not zeros[2].any()


def test_exact_match_beats_lowercase_and_first_occurrence_wins(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("3 2\napple 1 1\nApple 2 2\napple 3 3\n", encoding="utf8")
    matrix, report = load_word_vectors(path, ["Apple", "apple", "APPLE"], as_matrix=True)
    assert matrix.tolist() == [[2, 2], [1, 1], [1, 1]]
    assert (report.exact, report.lowercase) == (2, 1)
    matrix, report = load_word_vectors(path, as_matrix=True)
    assert report.tokens == ["apple", "Apple"] and matrix.tolist() == [[1, 1], [2, 2]]


def test_glove_tokens_with_spaces(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text("the 0.5 1.5 2.5\nnew york 1 2 3\n. 4 5 6\n", encoding="utf8")
    matrix, report = load_word_vectors(path, ["new york", "."], as_matrix=True)
    assert report.format == "glove" and report.coverage == 1.0
    assert matrix.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_reads_the_file_once(monkeypatch):
    import io

    from rnntl_fast.pretrained import word_vectors

    counts = {"opened": 0, "bytes": 0}

    class CountingFileIO(io.FileIO):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            counts["opened"] += 1

        def readinto(self, buffer):
            read = super().readinto(buffer)
            counts["bytes"] += read or 0
            return read

    monkeypatch.setattr(word_vectors.io, "FileIO", CountingFileIO)
    path = os.path.join(DATA, "lee_fasttext.vec")
    matrix, report = load_word_vectors(path, ["the", "of"], as_matrix=True)
    assert matrix.shape == (2, 10) and report.vectors_read == 1762
    assert counts["opened"] == 1 and counts["bytes"] <= os.path.getsize(path)


def _binary(header: bytes, records) -> bytes:
    """A word2vec binary file: header line, then per record token, space, float32s, newline."""
    return header + b"".join(token + b" " + struct.pack(f"<{len(values)}f", *values) + b"\n"
                             for token, values in records)


# (id, file name, bytes, gensim reader arguments, where the error is, what it says). gensim
# rejects every one of these files too.
MALFORMED = [
    ("one-number-too-many", "v.txt", b"2 2\ncat 0.4 0.1 0.2\ndog 1 2\n", {}, "line 2",
     "expected a token and 2 numbers .*found a token and 3 fields"),
    ("one-number-too-few", "v.txt", b"2 3\ncat 1 2 3\ndog 1 2\n", {}, "line 3",
     "expected a token and 3 numbers .*found a token and 2 fields"),
    ("negative-count-header", "v.txt", b"-2 3\na 1 2 3\nb 1 2 3\n", {}, "line 1", "vector count is negative"),
    ("zero-dim-header", "v.txt", b"2 0\na 1 2\nb 1 2\n", {}, "line 1", "dimension must be >= 1"),
    ("billion-dim-header", "v.txt", b"1 1000000000\na 1 2\n", {}, "line 2",
     "expected a token and 1000000000 numbers"),
    ("three-integer-header", "v.txt", b"2 2 2\na 1 2\nb 3 4\n", {}, "line 1", "a word2vec header is 'count dim'"),
    ("non-numeric", "v.txt", b"2 2\na 1 x\nb 3 4\n", {}, "line 2", "field 2 after the token 'x' is not a number"),
    ("empty-field", "v.txt", b"2 3\na  1 2\nb 3 4 5\n", {}, "line 2", r"field 1 after the token is empty"),
    ("fewer-rows-than-header", "v.txt", b"5 2\na 1 2\nb 3 4\n", {}, "line 3",
     "ends after 2 of the 5 vectors the header announces"),
    ("blank-line-between-rows", "v.txt", b"2 2\na 1 2\n\nb 3 4\n", {}, "line 3", "blank line between vectors"),
    ("latin1-token", "v.txt", "1 2\ncafé 1 2\n".encode("latin-1"), {}, "line 2", "byte 3 is not valid utf-8"),
    ("glove-one-number-too-many", "v.txt", b"the 1 2\ncat 0.4 0.1 0.2\n", dict(no_header=True), "line 2",
     "expected a token and 2 numbers .*found 'cat' and 3 numbers"),
    ("glove-one-number-too-few", "v.txt", b"the 1 2 3\ncat 1 2\n", dict(no_header=True), "line 2",
     "found a token and 2 fields"),
    ("glove-non-numeric", "v.txt", b"a 1 2\nb 1 two\n", dict(no_header=True), "line 2", "'two' is not a number"),
    ("float-header-read-as-glove", "v.txt", b"2.0 2\na 1 2\nb 3 4\n", {}, "line 2",
     "expected a token and 1 numbers"),
    ("binary-truncated", "v.bin", _binary(b"2 3\n", [(b"a", (1, 2, 3)), (b"b", (4, 5, 6))])[:-7],
     dict(binary=True), r"record 2 of 2 \(byte 19\)", "ends inside the vector"),
    ("binary-header-dim-too-large", "v.bin", _binary(b"2 4\n", [(b"a", (1, 2, 3)), (b"b", (4, 5, 6))]),
     dict(binary=True), r"record 2 of 2 \(byte 22\)", "ends inside the token"),
    ("binary-billion-dim-header", "v.bin", _binary(b"1 1000000000\n", [(b"a", (1, 2))]), dict(binary=True),
     r"record 1 of 1 \(byte 13\)", "ends inside the vector .9 of 4000000000 bytes"),
    ("binary-token-not-utf8", "v.bin", _binary(b"1 2\n", [(b"caf\xe9", (1, 2))]), dict(binary=True),
     r"record 1 of 1 \(byte 4\)", "byte 3 is not valid utf-8"),
    ("gzip-truncated", "v.txt.gz", gzip.compress(b"3 2\n" + b"".join(b"w%d 1 2\n" % i for i in range(3)))[:-12],
     {}, "line 4", "gzip stream is damaged or truncated"),
    ("bzip2-damaged", "v.txt.bz2", bz2.compress(b"1 2\na 1 2\n")[:20] + b"\0" * 20, {}, "line 1",
     "bzip2 stream is damaged or truncated"),
]


@pytest.mark.parametrize("name, data, gensim_kwargs, where, reason",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_files_are_refused_naming_file_line_and_reason(tmp_path, name, data, gensim_kwargs, where,
                                                                 reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(PretrainedFormatError, match=f"^{path}: {where}: .*{reason}") as error:
        load_word_vectors(path)
    assert isinstance(error.value, ValueError)
    with pytest.raises(Exception):   # gensim refuses the same file
        KeyedVectors.load_word2vec_format(str(path), **gensim_kwargs)
    if "no_header" in gensim_kwargs:   # the same error when the format is given
        with pytest.raises(PretrainedFormatError, match=f"{where}: .*{reason}"):
            load_word_vectors(path, format="glove")


# Refused here, but gensim 4.3.3 accepts them: it stops reading after the header's count,
# keeps an empty token or one made of the previous vector's bytes, broadcasts a single
# number over the whole vector, and accepts dim 0.
STRICTER_THAN_GENSIM = [
    ("more-rows-than-header", b"1 2\na 1 2\nb 3 4\n", "line 3: more vectors than the 1 the header announces"),
    ("empty-token", b"2 2\n 1 2\nb 3 4\n", "line 2: empty token"),
    ("single-number-broadcast", b"1 2\na 1\n", "line 2: expected a token and 2 numbers"),
    ("zero-dim-empty-rows", b"2 0\na\nb\n", "line 1: .*dimension must be >= 1"),
    ("binary-header-dim-too-small", _binary(b"2 2\n", [(b"a", (1, 2, 3)), (b"b", (4, 5, 6))]),
     r"record 2 of 2 \(byte 14\): the token '\\x00\\x00@@\\nb' holds control characters"),
    ("binary-data-after-the-records", _binary(b"1 2\n", [(b"a", (1, 2)), (b"b", (3, 4))]),
     "byte 15: more data after the 1 vectors"),
]


@pytest.mark.parametrize("data, message", [case[1:] for case in STRICTER_THAN_GENSIM],
                         ids=[case[0] for case in STRICTER_THAN_GENSIM])
def test_damage_gensim_lets_through_is_refused(tmp_path, data, message):
    path = tmp_path / "v.txt"
    path.write_bytes(data)
    with pytest.raises(PretrainedFormatError, match=message):
        load_word_vectors(path)


# Files both readers accept: the vectors must be the same.
def _compressed(opener, source):
    def build(folder):
        target = folder / (os.path.basename(source) + {gzip.open: ".gz", bz2.open: ".bz2", lzma.open: ".xz"}[opener])
        with open(os.path.join(DATA, source), "rb") as raw, opener(target, "wb") as packed:
            packed.write(raw.read())
        return target
    return build


def _written(name, data):
    def build(folder):
        (folder / name).write_bytes(data)
        return folder / name
    return build


ACCEPTED = [
    ("txt-gz", _compressed(gzip.open, "lee_fasttext.vec"), {}),
    ("txt-bz2", _compressed(bz2.open, "word2vec_pre_kv_c"), {}),
    ("txt-xz", _compressed(lzma.open, "lee_fasttext.vec"), {}),
    ("bin-gz", _compressed(gzip.open, "euclidean_vectors.bin"), dict(binary=True)),
    ("glove-gz", _compressed(gzip.open, "test_glove.txt"), dict(no_header=True)),
    ("crlf-and-trailing-spaces", _written("v.txt", b"2 2\r\na 1 2 \r\nb 3 4\r\n\r\n"), {}),
    ("signed-header-nan-inf-underscore", _written("v.txt", b"+2 3\na nan -inf 1_0\nb 1e400 -0 .5\n"), {}),
    ("no-vectors", _written("v.txt", b"0 3\n"), {}),
    ("binary-without-newlines", _written("v.bin", b"2 2\na " + struct.pack("<2f", 1, 2) + b"b "
                                         + struct.pack("<2f", 3, 4)), dict(binary=True)),
]


@pytest.mark.parametrize("build, gensim_kwargs", [case[1:] for case in ACCEPTED], ids=[case[0] for case in ACCEPTED])
def test_files_gensim_reads_load_to_the_same_vectors(tmp_path, build, gensim_kwargs):
    path = build(tmp_path)
    reference = KeyedVectors.load_word2vec_format(str(path), **gensim_kwargs)
    matrix, report = load_word_vectors(path, as_matrix=True)
    assert report.tokens == list(reference.index_to_key)
    assert report.dim == reference.vector_size
    np.testing.assert_array_equal(matrix.numpy(), reference.vectors.reshape(-1, report.dim))


def test_format_given_but_not_matching(tmp_path):
    text = tmp_path / "v.txt"
    text.write_bytes(b"2 2\na 1 2\nb 3 4\n")
    with pytest.raises(PretrainedFormatError, match="line 1: format='glove' but the file has a word2vec header"):
        load_word_vectors(text, format="glove")
    glove = tmp_path / "g.txt"
    glove.write_bytes(b"a 1 2\nb 3 4\n")
    with pytest.raises(PretrainedFormatError, match="line 1: format='word2vec' needs a header line"):
        load_word_vectors(glove, format="word2vec")
    with pytest.raises(PretrainedFormatError, match="line 1: the header says dim 2, dim=3 was given"):
        load_word_vectors(text, dim=3)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(PretrainedFormatError, match="the file is empty"):
        load_word_vectors(empty)


def test_limit_stops_before_damage_further_down(tmp_path):
    path = tmp_path / "v.txt"
    path.write_bytes(b"3 2\na 1 2\nb 3 4\nc 5 x\n")
    matrix, report = load_word_vectors(path, limit=2, as_matrix=True)
    assert report.tokens == ["a", "b"] and matrix.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(PretrainedFormatError, match="line 4: field 2 after the token 'x' is not a number"):
        load_word_vectors(path, ["a"])   # with a vocabulary, unused records are still checked
