"""Word-vector files -> nn.Embedding, checked against gensim's reader on gensim's own test
files (gensim/test/test_data, shipped in the gensim wheel)."""
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


def test_truncated_binary(tmp_path):
    data = open(os.path.join(DATA, "euclidean_vectors.bin"), "rb").read()
    path = tmp_path / "truncated.bin"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(PretrainedFormatError, match="truncated"):
        load_word_vectors(path)


def test_binary_with_wrong_header_dimension(tmp_path):
    path = tmp_path / "wrong_dim.bin"
    records = b"".join(word + b" " + struct.pack("<3f", 1, 2, 3) + b"\n" for word in (b"a", b"b"))
    path.write_bytes(b"2 4\n" + records)
    with pytest.raises(PretrainedFormatError):
        load_word_vectors(path, format="word2vec-binary")


def test_text_wrong_dimension_and_short_file(tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("2 3\na 1 2 3\nb 1 2\n", encoding="utf8")
    with pytest.raises(PretrainedFormatError, match=r"wrong.txt:3: expected a token and 3 numbers"):
        load_word_vectors(wrong)
    short = tmp_path / "short.txt"
    short.write_text("5 2\na 1 2\nb 3 4\n", encoding="utf8")
    with pytest.raises(PretrainedFormatError, match="announces 5 vectors"):
        load_word_vectors(short)
    bad_glove = tmp_path / "bad_glove.txt"
    bad_glove.write_text("a 1 2\nb 1 x\n", encoding="utf8")
    with pytest.raises(PretrainedFormatError, match="not a number"):
        load_word_vectors(bad_glove)
    with pytest.raises(PretrainedFormatError, match="header"):
        load_word_vectors(short, format="glove")
