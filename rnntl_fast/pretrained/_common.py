"""What every loader shares: errors, the per-layer report, gate reordering, and the one
function that turns (kind, config, torch.nn-layout state_dict) into an rnntl_fast module.

Converters never build modules themselves: they produce a config dict (torch.nn
constructor arguments) and a state_dict in torch.nn's layout, and hand both to
`build_module`. That keeps every format's mapping testable on its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from torch import nn


class PretrainedFormatError(ValueError):
    """The file is not what it claims to be: truncated, wrong shapes, missing entries."""


class UnsupportedLayerError(ValueError):
    """The source layer computes something torch.nn.LSTM / GRU cannot express (peepholes,
    other activations, GRU with the reset gate before the matmul, ...). Loading it anyway
    would silently give other outputs, so the loaders refuse."""


@contextlib.contextmanager
def naming_file(source, what: str = "", unreadable: Tuple[Type[BaseException], ...] = ()):
    """Errors while loading from `source` name the file (when it is a path): the loaders'
    own errors get it in front (a layer's error names the layer, not the file), and
    `unreadable`, what a parser raises for bytes it cannot read (torch.load's RuntimeError,
    h5py's OSError, protobuf's DecodeError, ...), becomes a PretrainedFormatError saying
    the file is not a readable `what`."""
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    try:
        yield
    except (PretrainedFormatError, UnsupportedLayerError) as error:
        if path is None or str(error).startswith(path):
            raise
        raise type(error)(f"{path}: {error}") from error
    except unreadable as error:
        if isinstance(error, FileNotFoundError):
            raise
        detail = f"{type(error).__name__}: {' '.join(str(error).split())}"
        raise PretrainedFormatError(f"{path or 'source'}: not a readable {what} (truncated or damaged?): "
                                    f"{detail[:300]}") from error


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    """Raises PretrainedFormatError "<what>: <the missing, extra and wrongly shaped tensors
    of `given`>" against `expected` (a module's state_dict), instead of load_state_dict's
    multi-line RuntimeError."""
    missing = [key for key in expected if key not in given]
    extra = [key for key in given if key not in expected]
    problems = [f"{label} {', '.join(keys)}" for label, keys in (("missing", missing), ("unexpected", extra)) if keys]
    problems += [f"{key} has shape {list(given[key].shape)}, expected {list(value.shape)}"
                 for key, value in expected.items() if key in given and tuple(given[key].shape) != tuple(value.shape)]
    if problems:
        raise PretrainedFormatError(f"{what}: {'; '.join(problems)}")


# Gate orders, as the index of each torch gate in the source's gate blocks.
# torch.nn: LSTM i, f, g, o; GRU r, z, n.
# Keras LSTM i, f, c, o is already torch's order: no table.
KERAS_GRU_TO_TORCH = (1, 0, 2)       # Keras z, r, h -> torch r, z, n
TF_LSTM_TO_TORCH = (0, 2, 1, 3)      # TF1 i, j, f, o -> torch i, f, g(=j), o
ONNX_LSTM_TO_TORCH = (0, 2, 3, 1)    # ONNX i, o, f, c -> torch i, f, g(=c), o
ONNX_GRU_TO_TORCH = (1, 0, 2)        # ONNX z, r, h -> torch r, z, n


def reorder_gates(array: np.ndarray, order: Sequence[int], axis: int = 0) -> np.ndarray:
    """Splits `array` along `axis` into len(order) equal gate blocks and returns them
    concatenated as [block order[0], block order[1], ...].

    array: [..., G*H, ...] with the gate blocks on `axis`."""
    gates = len(order)
    if array.shape[axis] % gates:
        raise PretrainedFormatError(f"axis {axis} of shape {array.shape} does not split into {gates} gates")
    blocks = np.split(np.asarray(array), gates, axis=axis)
    return np.concatenate([blocks[index] for index in order], axis=axis)


def to_tensor(array) -> torch.Tensor:
    """A contiguous torch tensor holding a copy of `array` (numpy, h5py dataset, tensor)."""
    if isinstance(array, torch.Tensor):
        return array.detach().clone().contiguous()
    return torch.from_numpy(np.ascontiguousarray(np.array(array)))


@dataclasses.dataclass
class LayerReport:
    """What a loader did with one source layer."""

    name: str                 # the source layer's name (the key in the loader's result)
    source_kind: str          # e.g. "CuDNNLSTM", "onnx LSTM", "tf1 LSTMCell"
    module_kind: str          # "LSTM" or "GRU"
    config: dict              # constructor arguments of the rnntl_fast module
    mappings: List[str] = dataclasses.field(default_factory=list)  # "source [shape] -> target [shape]: how"
    notes: List[str] = dataclasses.field(default_factory=list)     # assumptions the user should know

    def map(self, source: str, source_shape, target: str, target_shape, how: str) -> None:
        self.mappings.append(f"{source} {list(source_shape)} -> {target} {list(target_shape)}: {how}")

    def __str__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.config.items())
        lines = [f"{self.name}: {self.source_kind} -> rnntl_fast.{self.module_kind}({settings})"]
        lines += [f"    {line}" for line in self.mappings]
        lines += [f"    note: {line}" for line in self.notes]
        return "\n".join(lines)


class LoadedLayers(dict):
    """The loaders' result: a dict {source layer name: rnntl_fast module} in source order,
    with `.reports` ({name: LayerReport}) saying how each was mapped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reports: Dict[str, LayerReport] = {}
        self.notes: List[str] = []   # file-level notes (e.g. skipped non-recurrent layers)

    @property
    def report(self) -> str:
        parts = [str(report) for report in self.reports.values()]
        parts += [f"note: {note}" for note in self.notes]
        return "\n".join(parts)


def build_module(kind: str, config: Mapping, state_dict: Mapping[str, torch.Tensor],
                 module_kwargs: Optional[Mapping] = None, dtype: Optional[torch.dtype] = torch.float32,
                 device=None, layer: str = "") -> nn.Module:
    """Constructs rnntl_fast.LSTM / GRU from torch.nn constructor arguments and loads a
    torch.nn-layout state_dict into it, every key and shape checked (a missing, extra or
    wrongly shaped tensor is a PretrainedFormatError naming `layer`, not something to ignore).

    module_kwargs: extra constructor arguments (backend, grad_clip, dropout, ...) the user
    wants; they may not change the shapes the file fixed."""
    from .. import nn as fast_nn  # late: rnntl_fast imports this package lazily

    classes = {"LSTM": fast_nn.LSTM, "GRU": fast_nn.GRU}
    if kind not in classes:
        raise UnsupportedLayerError(f"rnntl_fast has no {kind} module (only LSTM and GRU)")
    where = f"{layer}: " if layer else ""
    for key in ("input_size", "hidden_size"):
        if config.get(key, 1) < 1:
            raise PretrainedFormatError(f"{where}the weights give {kind} {key}={config[key]} (empty tensors)")
    arguments = dict(config)
    for key, value in (module_kwargs or {}).items():
        if key in ("input_size", "hidden_size", "num_layers", "bidirectional", "proj_size", "bias"):
            if key in arguments and arguments[key] != value:
                raise ValueError(f"module_kwargs[{key!r}]={value!r} contradicts the file ({arguments[key]!r})")
        arguments[key] = value
    module = classes[kind](**arguments, device=device, dtype=dtype)
    tensors = {key: to_tensor(value) for key, value in state_dict.items()}
    settings = ", ".join(f"{key}={value!r}" for key, value in config.items())
    check_state_dict(module.state_dict(), tensors, f"{where}the tensors do not form torch.nn.{kind}({settings})")
    # load_state_dict copies into the module's parameters, casting to their dtype/device.
    module.load_state_dict(tensors, strict=True)
    return module


def lstm_gru_kind(gates: int, where: str) -> str:
    if gates == 4:
        return "LSTM"
    if gates == 3:
        return "GRU"
    if gates == 1:
        raise UnsupportedLayerError(f"{where}: a vanilla RNN (1 gate); rnntl_fast has only LSTM and GRU")
    raise PretrainedFormatError(f"{where}: {gates} gate blocks is neither an LSTM (4) nor a GRU (3)")
