"""What one benchmark row measures (`Case`) and the named grids of cases.

Named grids:

* ``tiny``: a few seconds; the CLI tests run it.
* ``ops``: one layer, (T, B, I, H) in OPS_SIZES, LSTM and GRU, inference and
  training; the summary prints the geometric-mean speedup per cell and mode.
* ``default``: module rows (2-layer bidirectional stacks, packed
  variable-length input, proj_size LSTM) plus frozen-weight fine-tuning and gradient
  clipping against the hook loop users write, at one mid size (DEFAULT_SIZE); a few minutes
  on 2 cores.
* ``regularizers``: training rows of each in-kernel regularizer (docs/semantics.md section
  10) at REGULARIZER_SIZES, LSTM and GRU, each timed with and without the regularizer and
  against the LSTMCell / GRUCell loop users write for it; plus the Elman RNN against
  torch.nn.RNN at OPS_SIZES.
* ``short``: short sequences and one step at a time (a token at a time, as when sampling
  from a language model) at SHORT_SIZES, LSTM, GRU and the Elman RNN, inference and
  training: where packing the weights would cost more than the products that follow
  (docs/cpu.md, "Short sequences").
"""
import itertools
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

CELLS = ("lstm", "gru", "rnn")
# The cells of the named grids (and of a custom grid without --cell); the Elman RNN ("rnn")
# is timed on request (--cell rnn), so the named grids' figures stay comparable over time.
GRID_CELLS = ("lstm", "gru")
MODES = ("inference", "training", "frozen", "clip")
LENGTHS = ("full", "uniform")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Module options of the regularizer rows (Case.regularizer -> rnntl_fast module keyword arguments).
REGULARIZERS = {"recurrent_dropout": {"recurrent_dropout": 0.25}, "zoneout": {"zoneout": 0.1},
                "weight_drop": {"weight_drop": 0.5}, "layer_norm": {"layer_norm": True}}
REGULARIZER_SIZES = ((100, 32, 256, 256), (200, 16, 128, 128), (500, 1, 256, 256))

# (T, B, I, H): one step at batch 1 and 16, a few steps, and 16 steps at batch 1, where the
# automatic packing rules change their choice (gemm_cpu.h).
SHORT_SIZES = ((1, 1, 256, 256), (1, 1, 1024, 1024), (1, 16, 256, 256), (4, 16, 1024, 1024), (16, 1, 256, 256),
               (16, 1, 1024, 1024))

# Issue 2's grid: (T, B, I, H).
OPS_SIZES = ((100, 32, 256, 256), (200, 16, 128, 128), (100, 8, 64, 64), (500, 1, 256, 256), (50, 64, 512, 512))


@dataclass(frozen=True)
class Case:
    """One benchmark row: a layer stack, its input, what is timed, and on what.

    T, B, I, H: steps, batch, input features, hidden size; input is [T, B, I].
    lengths: "full" (every row runs T steps, a plain tensor) or "uniform" (row lengths drawn
        uniformly in [ceil(T/2), T] with a fixed seed, the longest set to T, fed as a
        PackedSequence made inside the timed step).
    mode: "inference" (no_grad forward), "training" (forward + backward, input and weights
        need grads), "frozen" (forward + backward with every recurrent weight frozen; only
        the input gets a gradient, as when fine-tuning what lies below or above a frozen
        encoder), "clip" (training with grad_clip=1.0 "state" clipping in the backward).
    regularizer: "" or a key of REGULARIZERS: the rnntl_fast module runs with it (torch.nn,
        which has none of them, runs without: the floor, as in clip mode).
    group: which summary the row belongs to ("ops", "stack", "packed", "proj", "frozen",
        "clip", "plain", "regularizers", "rnn", "short", "custom").
    """
    cell: str
    mode: str
    T: int
    B: int
    I: int  # noqa: E741  (the flag is --I)
    H: int
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    lengths: str = "full"
    dtype: str = "float32"
    device: str = "cpu"
    regularizer: str = ""
    group: str = "custom"

    @property
    def label(self) -> str:
        """A short human-readable description used in tables and the plot."""
        parts = [f"{self.cell.upper()} T={self.T} B={self.B} I={self.I} H={self.H}"]
        if self.layers != 1:
            parts.append(f"L={self.layers}")
        if self.bidirectional:
            parts.append("bidir")
        if self.proj_size:
            parts.append(f"P={self.proj_size}")
        if self.lengths != "full":
            parts.append("packed")
        if self.dtype != "float32":
            parts.append(self.dtype)
        if self.regularizer:
            parts.append(self.regularizer)
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def ops_grid(device: str = "cpu", dtypes: Sequence[str] = ("float32",)) -> List[Case]:
    return [Case(cell, mode, T, B, I, H, dtype=dtype, device=device, group="ops")
            for dtype in dtypes for cell in GRID_CELLS for mode in ("inference", "training")
            for (T, B, I, H) in OPS_SIZES]


# The default grid's size: mid-size, so that the whole grid (2-layer bidirectional stacks
# included) takes minutes on a 2-core machine; the ops grid covers the larger shapes.
DEFAULT_SIZE = (50, 32, 128, 128)


def default_grid(device: str = "cpu", dtypes: Sequence[str] = ("float32",)) -> List[Case]:
    T, B, I, H = DEFAULT_SIZE
    cases = []
    for dtype in dtypes:
        common = dict(dtype=dtype, device=device)
        for cell in GRID_CELLS:
            for mode in ("inference", "training"):
                cases.append(Case(cell, mode, T, B, I, H, **common, group="plain"))
                cases.append(Case(cell, mode, T, B, I, H, layers=2, bidirectional=True, **common, group="stack"))
                cases.append(Case(cell, mode, T, B, I, H, lengths="uniform", **common, group="packed"))
            cases.append(Case(cell, "frozen", T, B, I, H, **common, group="frozen"))
            cases.append(Case(cell, "clip", T, B, I, H, **common, group="clip"))
        for mode in ("inference", "training"):
            cases.append(Case("lstm", mode, T, B, I, 2 * H, proj_size=H // 2, **common, group="proj"))
    return cases


def tiny_grid(device: str = "cpu", dtypes: Sequence[str] = ("float32",)) -> List[Case]:
    cases = []
    for dtype in dtypes:
        for cell in GRID_CELLS:
            for mode in MODES:
                cases.append(Case(cell, mode, 6, 3, 5, 8, dtype=dtype, device=device, group="tiny"))
        cases.append(Case("lstm", "training", 6, 3, 5, 8, layers=2, bidirectional=True, proj_size=4,
                          lengths="uniform", dtype=dtype, device=device, group="tiny"))
        cases.append(Case("lstm", "training", 6, 3, 5, 8, dtype=dtype, device=device, regularizer="zoneout",
                          group="tiny"))
        cases.append(Case("gru", "training", 6, 3, 5, 8, dtype=dtype, device=device, regularizer="recurrent_dropout",
                          group="tiny"))
    return cases


def regularizer_grid(device: str = "cpu", dtypes: Sequence[str] = ("float32",)) -> List[Case]:
    cases = [Case(cell, "training", T, B, I, H, dtype=dtype, device=device, regularizer=name, group="regularizers")
             for dtype in dtypes for cell in GRID_CELLS for (T, B, I, H) in REGULARIZER_SIZES for name in REGULARIZERS]
    cases += [Case("rnn", mode, T, B, I, H, dtype=dtype, device=device, group="rnn")
              for dtype in dtypes for mode in ("inference", "training") for (T, B, I, H) in OPS_SIZES]
    return cases


def short_grid(device: str = "cpu", dtypes: Sequence[str] = ("float32",)) -> List[Case]:
    return [Case(cell, mode, T, B, I, H, dtype=dtype, device=device, group="short")
            for dtype in dtypes for cell in CELLS for mode in ("inference", "training")
            for (T, B, I, H) in SHORT_SIZES]


GRIDS = {"default": default_grid, "ops": ops_grid, "tiny": tiny_grid, "regularizers": regularizer_grid,
         "short": short_grid}


def named_grid(name: str, device: str, dtypes: Sequence[str]) -> List[Case]:
    return GRIDS[name](device=device, dtypes=dtypes)


def product_grid(axes: Dict[str, Sequence], device: str) -> List[Case]:
    """The cartesian product of the per-flag value lists (keys are Case field names).
    Combinations that do not exist (GRU or RNN with proj_size, proj_size >= H, the Elman RNN
    with layer_norm) are dropped."""
    names = list(axes)
    cases = []
    for values in itertools.product(*(axes[name] for name in names)):
        fields = dict(zip(names, values))
        if fields.get("proj_size", 0) and (fields["cell"] != "lstm" or fields["proj_size"] >= fields["H"]):
            continue
        if fields.get("regularizer") == "layer_norm" and fields["cell"] == "rnn":
            continue
        cases.append(Case(device=device, group="custom", **fields))
    return cases


def filter_cases(cases: List[Case], cells=None, modes=None) -> List[Case]:
    """Keeps the cases whose cell and mode were asked for (None keeps all)."""
    return [case for case in cases if (cells is None or case.cell in cells) and (modes is None or case.mode in modes)]
