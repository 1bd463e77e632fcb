"""PyTorch state_dicts and checkpoints -> rnntl_fast modules.

torch.nn's layout is rnntl_fast's layout, so nothing is converted: the work is finding the
recurrent layers in whatever a checkpoint holds (nested dicts such as {"model": {...}},
"module." prefixes from DataParallel, "_orig_mod." from torch.compile, several layers
under different prefixes) and recovering each layer's constructor arguments from shapes.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from ._common import LayerReport, LoadedLayers, PretrainedFormatError, build_module, lstm_gru_kind, naming_file

# What torch.load raises for a file it cannot read: a truncated zip archive (RuntimeError),
# bytes that are not a pickle (UnpicklingError, or KeyError / EOFError / ValueError from
# the legacy format's reader).
TORCH_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError)

# Wrappers that add a path segment without adding a layer.
_WRAPPER_SEGMENTS = ("module", "_orig_mod")
_RNN_KEY = re.compile(r"^(?:(?P<prefix>.*)\.)?(?P<base>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)"
                      r"(?P<layer>_l\d+)?(?P<reverse>_reverse)?$")


def flatten_tensors(tree, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """All tensors in a nested dict/list checkpoint, keyed by dotted path, in the order found."""
    found: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    if isinstance(tree, torch.Tensor):
        found[prefix] = tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            found.update(flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            found.update(flatten_tensors(value, f"{prefix}.{index}" if prefix else str(index)))
    return found


# Keys under which training scripts commonly nest the model's state_dict in a checkpoint.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")


def unwrap_checkpoint(tree):
    """Descends through {"state_dict": {...}}-style containers while the current level holds
    no tensors itself, so that layer names do not start with "model." or "state_dict."."""
    while isinstance(tree, Mapping) and not any(isinstance(v, torch.Tensor) for v in tree.values()):
        inner = next((tree[key] for key in _CONTAINER_KEYS if isinstance(tree.get(key), Mapping)), None)
        if inner is None:
            break
        tree = inner
    return tree


def _strip_wrappers(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)


def _read_source(source, weights_only: bool):
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        try:
            with naming_file(source, "torch.save file", TORCH_LOAD_ERRORS):
                loaded = torch.load(source, map_location="cpu", weights_only=weights_only)
        except PretrainedFormatError as error:
            if weights_only and "weights_only" in str(error.__cause__):
                raise PretrainedFormatError(
                    f"{os.fspath(source)}: torch.load(weights_only=True) refused it (it pickles objects, e.g. a whole "
                    f"module). If you trust the file, pass weights_only=False. Cause: {error.__cause__}") from error
            raise
        return loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"source must be a path, a state_dict/checkpoint dict or an nn.Module, got {type(source).__name__}")


def _group_layers(tensors: Mapping[str, torch.Tensor]) -> "OrderedDict[str, Dict[str, torch.Tensor]]":
    """{layer prefix: {torch.nn parameter name: tensor}} for every LSTM/GRU-shaped group.
    Cell-style keys (torch.nn.LSTMCell: weight_ih without _l0) become layer 0."""
    groups: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
    for key, tensor in tensors.items():
        match = _RNN_KEY.match(_strip_wrappers(key))
        if not match:
            continue
        prefix = match.group("prefix") or ""
        layer = match.group("layer") or "_l0"
        name = f"{match.group('base')}{layer}{match.group('reverse') or ''}"
        group = groups.setdefault(prefix, {})
        if name in group:
            raise PretrainedFormatError(f"two tensors map to {prefix + '.' if prefix else ''}{name} "
                                        f"(one of them is {key!r})")
        group[name] = tensor
    # A group must have layer 0's input weights; anything else is not a recurrent layer.
    return OrderedDict((prefix, group) for prefix, group in groups.items() if "weight_ih_l0" in group)


def _config_from_shapes(prefix: str, group: Dict[str, torch.Tensor]):
    where = prefix or "<root>"
    for name, tensor in group.items():
        rank = 1 if name.startswith("bias") else 2
        if tensor.dim() != rank:
            raise PretrainedFormatError(f"{where}: {name} has shape {list(tensor.shape)}; torch.nn.LSTM/GRU's is "
                                        f"{rank}-D")
    if "weight_hh_l0" not in group:
        raise PretrainedFormatError(f"{where}: weight_ih_l0 without weight_hh_l0 (tensors: {sorted(group)})")
    layers = 1 + max(int(re.search(r"_l(\d+)", name).group(1)) for name in group)
    bidirectional = any(name.endswith("_reverse") for name in group)
    has_bias = "bias_ih_l0" in group
    gate_rows, input_size = group["weight_ih_l0"].shape
    if "weight_hr_l0" in group:
        proj_size, hidden_size = group["weight_hr_l0"].shape
    else:
        proj_size, hidden_size = 0, group["weight_hh_l0"].shape[1]
    if min(gate_rows, input_size, hidden_size) == 0:
        raise PretrainedFormatError(f"{where}: empty weights (weight_ih_l0 {list(group['weight_ih_l0'].shape)}, "
                                    f"hidden size {hidden_size})")
    if gate_rows % hidden_size:
        raise PretrainedFormatError(f"{where}: weight_ih_l0 has {gate_rows} rows, not a multiple of hidden size "
                                    f"{hidden_size}")
    kind = lstm_gru_kind(gate_rows // hidden_size, where)
    config = {"input_size": int(input_size), "hidden_size": int(hidden_size), "num_layers": layers,
              "bias": has_bias, "bidirectional": bidirectional}
    if kind == "LSTM":
        config["proj_size"] = int(proj_size)
    return kind, config


def load_torch(source, *, weights_only: bool = True, prefix: Optional[str] = None, batch_first: bool = False,
               module_kwargs: Optional[Mapping] = None, dtype: Optional[torch.dtype] = torch.float32,
               device=None) -> LoadedLayers:
    """Loads every LSTM/GRU found in a PyTorch state_dict or checkpoint.

    source: a path for torch.load, a (possibly nested) checkpoint dict, a state_dict, or an
        nn.Module. A checkpoint's {"state_dict"|"model_state_dict"|"model"|"net": {...}}
        container is entered; tensors are found at any depth below; "module."
        (DataParallel/DDP) and "_orig_mod." (torch.compile) path segments are ignored.
    prefix: keep only layers whose dotted prefix (after removing those segments) starts
        with this.
    batch_first: the returned modules' batch_first (a state_dict does not record it).
    module_kwargs: extra constructor arguments (dropout, backend, grad_clip, ...).

    Returns {layer prefix: rnntl_fast.LSTM/GRU} in checkpoint order (the prefix is "" for
    the state_dict of a bare nn.LSTM/GRU); `.reports` tells the recovered configuration. Shapes fix everything except batch_first and dropout.
    """
    with naming_file(source):
        tensors = flatten_tensors(unwrap_checkpoint(_read_source(source, weights_only)))
        groups = _group_layers(tensors)
        result = LoadedLayers()
        for layer_prefix, group in groups.items():
            if prefix is not None and not layer_prefix.startswith(prefix):
                continue
            kind, config = _config_from_shapes(layer_prefix, group)
            config["batch_first"] = batch_first
            report = LayerReport(layer_prefix, f"torch {kind}", kind, config)
            for name, tensor in group.items():
                report.map(f"{layer_prefix}.{name}" if layer_prefix else name, tensor.shape, name, tensor.shape, "copy")
            report.notes.append("dropout between layers is not stored in a state_dict; pass "
                                "module_kwargs={'dropout': p}")
            result[layer_prefix] = build_module(kind, config, group, module_kwargs, dtype, device,
                                                layer=layer_prefix or "<root>")
            result.reports[layer_prefix] = report
        if not result:
            what = f" under prefix {prefix!r}" if prefix is not None else ""
            raise PretrainedFormatError(f"no LSTM/GRU weights (weight_ih_l0, weight_hh_l0, ...) found{what}; "
                                        f"{len(tensors)} tensors were read")
    return result
