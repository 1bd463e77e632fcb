"""Keras recurrent layers -> rnntl_fast modules.

Files read (h5py only; neither keras nor tensorflow is needed):
- legacy HDF5 written by Keras 2 / tf.keras / Keras 3 `model.save("x.h5")` (whole model:
  `model_config` attribute + `model_weights` group) and Keras 2 `save_weights("x.h5")`
  (root `layer_names` attribute, one group per layer, `weight_names` per group);
- Keras 3 `.keras` zip archives (config.json + model.weights.h5) and Keras 3
  `save_weights("x.weights.h5")` files (`layers/<path>/cell/vars/<i>`).

Layouts (Keras stores kernels as [input, gates*H], torch as [gates*H, input]):
- LSTM: kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H]; gates i, f, c, o = torch's
  i, f, g, o. The single bias goes to bias_ih; bias_hh is zero.
- CuDNNLSTM (Keras 2): kernel [I, 4H], recurrent_kernel [H, 4H], bias [8H] = input biases
  (i, f, c, o) then recurrent biases (i, f, c, o) -> bias_ih, bias_hh. Keras passed each
  gate's kernel block to cuDNN flattened in C order, and cuDNN reads it as a row-major
  [H, rows] matrix, so torch's block is the stored block *reshaped* to [H, rows] (not
  transposed); for the recurrent kernel that is the stored [H, H] block as is.
- GRU (reset_after=True): kernels [I, 3H] / [H, 3H] with gates z, r, h; bias [2, 3H] (row 0
  input, row 1 recurrent). torch wants r, z, n: the z and r blocks are swapped.
- CuDNNGRU (Keras 2): the same per-gate reshape; bias [6H] = input biases (z, r, h) then
  recurrent biases; z and r swapped as for GRU.
Refused: GRU reset_after=False (bias [3H]; the reset gate multiplies h before the matmul,
which torch.nn.GRU cannot express), activations other than tanh / sigmoid (Keras 2's
default recurrent_activation was hard_sigmoid), go_backwards outside Bidirectional,
Bidirectional merge modes other than concat / None.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ._common import (KERAS_GRU_TO_TORCH, LayerReport, LoadedLayers, PretrainedFormatError,
                      UnsupportedLayerError, build_module, naming_file, reorder_gates)

_MODEL_CLASSES = {"Model", "Functional", "Sequential"}

Weights = "OrderedDict[str, np.ndarray]"  # weight name -> array


def _h5py():
    try:
        import h5py
    except ImportError as error:  # pragma: no cover - h5py is in the pretrained extra
        raise ImportError("reading Keras files needs h5py: pip install h5py") from error
    return h5py


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _name_list(attribute) -> List[str]:
    """h5 attributes written as arrays of bytes/str (Keras 2) or as one string (Keras 3)."""
    if attribute is None:
        return []
    if isinstance(attribute, (bytes, str)):
        text = _text(attribute).strip("[]")
        return [part.strip(" '\"\n") for part in text.split("'") if part.strip(" '\"\n")]
    return [_text(item) for item in np.asarray(attribute).ravel()]


# -- reading the files ---------------------------------------------------------------------
class _Source:
    """One Keras file: model config (or None) and the weights of every top-level entry."""

    def __init__(self, config: Optional[dict], layer_weights: "OrderedDict[str, Weights]", layout: str):
        self.config = config
        self.layer_weights = layer_weights   # {layer name: {weight path: array}} in file order
        self.layout = layout                 # "legacy-h5" or "keras3"


def _read_legacy_group(root, configs: Mapping[str, Tuple[str, dict]]) -> "OrderedDict[str, Weights]":
    """Keras 2-style HDF5: root.attrs['layer_names'], each group has attrs['weight_names'].
    configs: {layer name: (class name, config)} from the model config ({} if none)."""
    layers: "OrderedDict[str, Weights]" = OrderedDict()
    for layer_name in _name_list(root.attrs.get("layer_names")):
        if layer_name not in root:
            raise PretrainedFormatError(f"layer {layer_name!r} is listed in layer_names but has no group")
        group = root[layer_name]
        weights: Weights = OrderedDict()
        for weight_name in _name_list(group.attrs.get("weight_names")):
            if weight_name not in group:
                raise PretrainedFormatError(f"layer {layer_name!r}: weight {weight_name!r} is listed in "
                                            "weight_names but the dataset is missing")
            weights[weight_name] = np.asarray(group[weight_name])
        if configs.get(layer_name, ("",))[0] in _MODEL_CLASSES:
            # A nested model's group holds its layers' weights, named ".../<layer>/...": file
            # each under the first path segment that is a (non-model) layer of the config.
            for weight_name, array in weights.items():
                owner = next((segment for segment in weight_name.split("/")[:-1]
                              if configs.get(segment, ("",))[0] not in _MODEL_CLASSES | {""}), layer_name)
                layers.setdefault(owner, OrderedDict())[weight_name] = array
            continue
        # Without a config, a group whose weights start with several other names is a nested model.
        first_segments = OrderedDict((name.split("/")[0], None) for name in weights)
        if not configs and len(first_segments) > 1 and layer_name not in first_segments:
            for segment in first_segments:
                layers[segment] = OrderedDict((n, a) for n, a in weights.items() if n.split("/")[0] == segment)
        else:
            layers[layer_name] = weights
    return layers


def _read_keras3_group(group, layers: "OrderedDict[str, Weights]") -> None:
    """Keras 3 weights: layers/<key>/vars/<i> with attrs['name'] on `vars`, sub-objects as groups
    (cell, forward_layer, backward_layer, layers/...)."""
    for key in group:
        child = group[key]
        if not hasattr(child, "keys"):
            continue
        if "layers" in child:   # a nested model
            _read_keras3_group(child["layers"], layers)
            continue
        name = _text(child["vars"].attrs.get("name", key)) if "vars" in child else key
        weights: Weights = OrderedDict()

        def collect(node, prefix):
            for sub in node:
                item = node[sub]
                if sub == "vars":
                    names = list(item)
                    if not all(index.isdigit() for index in names):
                        raise PretrainedFormatError(f"{name}: variables named {names[:5]} under {prefix}vars; Keras 3 "
                                                    "numbers them 0, 1, ...")
                    for index in sorted(names, key=int):
                        weights[f"{prefix}{index}"] = np.asarray(item[index])
                elif hasattr(item, "keys"):
                    collect(item, f"{prefix}{sub}/")
        collect(child, "")
        layers[name] = weights


def _json(text, what: str):
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise PretrainedFormatError(f"{what} is not valid JSON ({error})") from None


def _open(path) -> _Source:
    """Reads the whole file; what h5py / zipfile raise for damaged bytes becomes a
    PretrainedFormatError naming the file."""
    path = os.fspath(path)
    with naming_file(path, "Keras file (HDF5 or .keras archive)", (OSError, zipfile.BadZipFile, EOFError)):
        return _read(path)


def _read(path: str) -> _Source:
    h5py = _h5py()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "config.json" not in names or "model.weights.h5" not in names:
                raise PretrainedFormatError(f"{path}: a zip without config.json and model.weights.h5 is not a "
                                            f".keras archive (entries: {names[:10]})")
            config = _json(archive.read("config.json"), "config.json")
            weights_bytes = archive.read("model.weights.h5")
        with h5py.File(io.BytesIO(weights_bytes), "r") as weights_file:
            layers: "OrderedDict[str, Weights]" = OrderedDict()
            if "layers" in weights_file:
                _read_keras3_group(weights_file["layers"], layers)
        return _Source(config, layers, "keras3")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        if isinstance(error, FileNotFoundError) or not os.path.exists(path):
            raise
        raise PretrainedFormatError(f"{path}: not an HDF5 file or a .keras archive ({error})") from error
    with handle:
        if "model_config" in handle.attrs:
            config = _json(_text(handle.attrs["model_config"]), "the model_config attribute")
            if "model_weights" not in handle:
                raise PretrainedFormatError(f"{path}: has model_config but no model_weights group "
                                            "(saved with include_optimizer only?)")
            return _Source(config, _read_legacy_group(handle["model_weights"], _layer_configs(config)), "legacy-h5")
        if "layer_names" in handle.attrs:
            return _Source(None, _read_legacy_group(handle, {}), "legacy-h5")
        if "layers" in handle:
            layers = OrderedDict()
            _read_keras3_group(handle["layers"], layers)
            return _Source(None, layers, "keras3")
    raise PretrainedFormatError(f"{path}: no Keras weights found (neither model_config, layer_names nor a "
                                "Keras 3 'layers' group)")


def keras_weights(path) -> "OrderedDict[str, OrderedDict[str, np.ndarray]]":
    """Every layer's raw weights, {layer name: {weight name: array}}, as stored (Keras
    layout, no conversion). For the non-recurrent parts of a model: embeddings, dense
    heads. Keras 3 files name weights by path and index ("cell/0"), legacy files by their
    saved names ("embedding/embeddings:0")."""
    return _open(path).layer_weights


# -- model config --------------------------------------------------------------------------
def _layer_configs(config, found: Optional[Dict[str, Tuple[str, dict]]] = None) -> Dict[str, Tuple[str, dict]]:
    """{layer name: (class name, layer config)} for every layer, nested models included."""
    found = {} if found is None else found
    if config is None:
        return found
    body = config.get("config", config) if isinstance(config, dict) else config
    entries = body if isinstance(body, list) else body.get("layers", []) if isinstance(body, dict) else []
    for index, entry in enumerate(entries):
        layer_config = entry.get("config", {}) if isinstance(entry, dict) else None
        if not isinstance(layer_config, dict):
            raise PretrainedFormatError(f"model config: layer entry {index} is not a Keras layer "
                                        f"({str(entry)[:80]})")
        class_name = entry.get("class_name", "")
        name = layer_config.get("name") or entry.get("name")
        if name is not None:
            found[name] = (class_name, layer_config)
        if class_name in _MODEL_CLASSES:
            _layer_configs(entry, found)
    return found


def _activation_name(value) -> str:
    if isinstance(value, dict):   # serialized function: {"class_name": "function", "config": "tanh"}
        inner = value.get("config")
        if isinstance(inner, str):
            return inner
        if isinstance(inner, dict) and "name" in inner:
            return str(inner["name"])
        return str(value.get("class_name"))
    return str(value)


def _check_config(layer: str, class_name: str, config: dict, in_bidirectional: bool, report: LayerReport) -> str:
    """Refuses what torch.nn cannot express; returns "LSTM" or "GRU"."""
    if class_name == "RNN":   # keras.layers.RNN(LSTMCell(...)) / RNN(GRUCell(...))
        cell = config.get("cell", {})
        cell_class = cell.get("class_name", "")
        if cell_class not in ("LSTMCell", "GRUCell"):
            raise UnsupportedLayerError(f"{layer}: RNN with a {cell_class or 'custom'} cell; only LSTMCell and "
                                        "GRUCell map to torch.nn.LSTM / GRU")
        merged = dict(cell.get("config", {}))
        merged.update({key: config[key] for key in ("go_backwards",) if key in config})
        config, class_name = merged, cell_class[:-4]
    kind = "GRU" if "GRU" in class_name else "LSTM" if "LSTM" in class_name else None
    if kind is None:
        raise UnsupportedLayerError(f"{layer}: {class_name} is not an LSTM or GRU")
    if not class_name.startswith("CuDNN"):
        activation = _activation_name(config.get("activation", "tanh"))
        recurrent = _activation_name(config.get("recurrent_activation", "sigmoid"))
        if activation != "tanh":
            raise UnsupportedLayerError(f"{layer}: activation={activation!r}; torch.nn.{kind} uses tanh")
        if recurrent != "sigmoid":
            raise UnsupportedLayerError(f"{layer}: recurrent_activation={recurrent!r}; torch.nn.{kind} uses sigmoid "
                                        "(Keras 2 defaulted to hard_sigmoid, a different function)")
        if kind == "GRU" and not config.get("reset_after", False):
            raise UnsupportedLayerError(f"{layer}: GRU with reset_after=False applies the reset gate before the "
                                        "recurrent matmul; torch.nn.GRU applies it after (reset_after=True)")
    if config.get("go_backwards") and not in_bidirectional:
        raise UnsupportedLayerError(f"{layer}: go_backwards=True returns the sequence in reversed order; "
                                    "torch.nn has no single-direction reversed layer")
    if config.get("stateful"):
        report.notes.append("stateful=True in Keras: carry (h, c) between calls yourself")
    if config.get("recurrent_dropout"):
        report.notes.append("recurrent_dropout is a training-time Keras feature with no torch.nn equivalent; "
                            "inference is unaffected")
    if config.get("return_sequences") is False:
        report.notes.append("return_sequences=False in Keras: the Keras output is output[:, -1] here")
    return kind


# -- conversion ----------------------------------------------------------------------------
def _short(name: str) -> str:
    """'bi/forward_lstm/lstm_cell/kernel:0' -> 'kernel'; Keras 3 'cell/0' -> '0'."""
    return name.split("/")[-1].split(":")[0]


_CELL_ROLES = ("kernel", "recurrent_kernel", "bias")


def _role(name: str) -> str:
    """What a stored weight is: Keras 3 numbers a cell's variables in creation order
    (kernel, recurrent_kernel, bias); legacy files name them."""
    segments = name.split("/")
    short = _short(name)
    if short.isdigit() and len(segments) >= 2 and segments[-2] == "cell" and int(short) < 3:
        return _CELL_ROLES[int(short)]
    return short


def _direction_arrays(layer: str, weights: Weights) -> Dict[str, Tuple[str, np.ndarray]]:
    """{"kernel"|"recurrent_kernel"|"bias": (stored name, array)} for one direction."""
    arrays: Dict[str, Tuple[str, np.ndarray]] = {}
    for name, array in weights.items():
        role = _role(name)
        if role not in _CELL_ROLES:   # e.g. peephole weights: another computation
            raise UnsupportedLayerError(f"{layer}: weight {name!r} is not a kernel, recurrent_kernel or bias; "
                                        "torch.nn.LSTM/GRU have no such parameter")
        if role in arrays:
            raise PretrainedFormatError(f"{layer}: two {role} weights ({arrays[role][0]!r}, {name!r})")
        arrays[role] = (name, array)
    for role in ("kernel", "recurrent_kernel"):
        if role not in arrays:
            raise PretrainedFormatError(f"{layer}: missing {role} (weights present: {list(weights)})")
    return arrays


def _convert_direction(layer: str, arrays, suffix: str, report: LayerReport, expected_kind: Optional[str],
                       expected_layout: Optional[str] = None):
    """One direction's Keras weights -> (kind, sizes, torch.nn state_dict entries for layer 0)."""
    kernel_name, kernel = arrays["kernel"]
    recurrent_name, recurrent = arrays["recurrent_kernel"]
    if kernel.ndim != 2 or recurrent.ndim != 2:
        raise PretrainedFormatError(f"{layer}: kernels must be 2-D, got {kernel.shape} and {recurrent.shape}")
    hidden, gate_columns = recurrent.shape
    if min(kernel.shape) == 0 or min(recurrent.shape) == 0:
        raise PretrainedFormatError(f"{layer}: empty kernel {list(kernel.shape)} or recurrent_kernel "
                                    f"{list(recurrent.shape)}")
    if gate_columns % hidden or kernel.shape[1] != gate_columns:
        raise PretrainedFormatError(f"{layer}: kernel {list(kernel.shape)} and recurrent_kernel "
                                    f"{list(recurrent.shape)} do not describe one recurrent layer")
    gates = gate_columns // hidden
    if gates not in (3, 4):
        raise UnsupportedLayerError(f"{layer}: {gates} gate blocks: neither an LSTM (4) nor a GRU (3)")
    kind = "LSTM" if gates == 4 else "GRU"
    if expected_kind is not None and expected_kind != kind:
        raise PretrainedFormatError(f"{layer}: the config says {expected_kind} but the weights have {gates} gates")
    order = tuple(range(4)) if kind == "LSTM" else KERAS_GRU_TO_TORCH
    gate_note = "" if kind == "LSTM" else ", gate blocks z,r,h -> r,z,n"
    size = gates * hidden
    state: Dict[str, np.ndarray] = {}
    layout = "plain"
    if "bias" in arrays:
        bias_name, bias = arrays["bias"]
        if bias.shape == (size,):
            if kind == "GRU":
                raise UnsupportedLayerError(f"{layer}: GRU bias of shape [3H] means reset_after=False (reset gate "
                                            "before the recurrent matmul); torch.nn.GRU cannot express it")
            input_bias, recurrent_bias = bias, np.zeros_like(bias)
            bias_line = (bias_name, bias.shape, f"bias_ih_l0{suffix}", bias.shape, "copy; bias_hh is zero" + gate_note)
        elif bias.shape == (2 * size,):   # cuDNN: input biases then recurrent biases
            layout = "cudnn"
            input_bias, recurrent_bias = bias[:size], bias[size:]
            bias_line = (bias_name, bias.shape, f"bias_ih_l0{suffix} + bias_hh_l0{suffix}", (size,),
                         "cuDNN split: first half input biases, second half recurrent biases" + gate_note)
        elif bias.shape == (2, size) and kind == "GRU":   # Keras GRU reset_after=True
            input_bias, recurrent_bias = bias[0], bias[1]
            bias_line = (bias_name, bias.shape, f"bias_ih_l0{suffix} + bias_hh_l0{suffix}", (size,),
                         "row 0 input bias, row 1 recurrent bias" + gate_note)
        else:
            raise PretrainedFormatError(f"{layer}: bias of shape {list(bias.shape)} fits no Keras {kind} layout "
                                        f"(hidden size {hidden})")
        state[f"bias_ih_l0{suffix}"] = reorder_gates(input_bias, order)
        state[f"bias_hh_l0{suffix}"] = reorder_gates(recurrent_bias, order)
    if expected_layout is not None and expected_layout != layout:
        raise PretrainedFormatError(f"{layer}: the config says a {expected_layout} layer but the bias shape says "
                                    f"{layout}")
    if layout == "cudnn":
        # Keras 2's CuDNN layers hand cuDNN each gate block [rows, H] flattened in C order,
        # and cuDNN reads that buffer as the row-major [H, rows] matrix: a per-gate reshape,
        # not a transpose (for the square recurrent blocks: the block as stored).
        weight_ih = np.concatenate([block.reshape(hidden, -1) for block in np.split(kernel, gates, axis=1)])
        weight_hh = np.concatenate([block.reshape(hidden, -1) for block in np.split(recurrent, gates, axis=1)])
        how = "per gate block [rows, H] reshaped (C order) to [H, rows] (cuDNN layout)"
    else:
        weight_ih, weight_hh, how = kernel.T, recurrent.T, "transpose"
    state[f"weight_ih_l0{suffix}"] = reorder_gates(weight_ih, order)
    state[f"weight_hh_l0{suffix}"] = reorder_gates(weight_hh, order)
    report.map(kernel_name, kernel.shape, f"weight_ih_l0{suffix}", weight_ih.shape, how + gate_note)
    report.map(recurrent_name, recurrent.shape, f"weight_hh_l0{suffix}", weight_hh.shape, how + gate_note)
    if "bias" in arrays:
        report.map(*bias_line)
    return kind, layout, int(kernel.shape[0]), int(hidden), "bias" in arrays, state


def _split_bidirectional(layer: str, weights: Weights) -> Optional[Tuple[Weights, Weights]]:
    forward: Weights = OrderedDict()
    backward: Weights = OrderedDict()
    for name, array in weights.items():
        segments = name.split("/")
        if any(s.startswith("forward") for s in segments[:-1]):
            forward[name] = array
        elif any(s.startswith("backward") for s in segments[:-1]):
            backward[name] = array
        else:
            return None
    if not forward or not backward:
        return None
    return forward, backward


def load_keras(path, *, batch_first: bool = True, module_kwargs: Optional[Mapping] = None,
               dtype: Optional[torch.dtype] = torch.float32, device=None) -> LoadedLayers:
    """Loads every LSTM / GRU / CuDNNLSTM / CuDNNGRU / Bidirectional layer of a Keras file.

    path: .h5 / .hdf5 (whole model or Keras 2 save_weights), .keras, or Keras 3 .weights.h5.
    batch_first: Keras tensors are [batch, time, features], hence True by default.
    module_kwargs: extra constructor arguments of the rnntl_fast modules.

    Returns {Keras layer name: rnntl_fast.LSTM/GRU} in file order; stacked Keras layers are
    separate modules (Keras feeds each layer the previous one's output, as you will), a
    Bidirectional wrapper is one bidirectional module. Weights-only files carry no config:
    the layer type is then inferred from shapes and the activations are assumed to be the
    cuDNN-compatible ones (tanh, sigmoid), which the report says.
    """
    source = _open(path)
    with naming_file(path):
        return _load(path, source, batch_first, module_kwargs, dtype, device)


def _load(path, source: _Source, batch_first, module_kwargs, dtype, device) -> LoadedLayers:
    configs = _layer_configs(source.config)
    result = LoadedLayers()
    layer_names = list(source.layer_weights)
    if configs:   # HDF5 groups iterate alphabetically; the config has the model's order
        position = {name: index for index, name in enumerate(configs)}
        layer_names.sort(key=lambda name: position.get(name, len(position)))
    for layer in layer_names:
        weights = source.layer_weights[layer]
        if not any(_role(name) == "recurrent_kernel" for name in weights):
            continue   # not a recurrent layer (embedding, dense, attention, ...)
        class_name, layer_config = configs.get(layer, (None, None))
        if source.config is not None and class_name is None:
            raise PretrainedFormatError(f"{layer}: weights without a matching layer in the model config")
        report = LayerReport(layer, class_name or "?", "?", {})
        halves = _split_bidirectional(layer, weights)
        if class_name == "Bidirectional" or (class_name is None and halves is not None):
            if halves is None:
                raise PretrainedFormatError(f"{layer}: Bidirectional without forward_*/backward_* weights")
            inner_class, inner_config = None, None
            if layer_config is not None:
                merge_mode = layer_config.get("merge_mode", "concat")
                if merge_mode not in ("concat", None):
                    raise UnsupportedLayerError(f"{layer}: Bidirectional merge_mode={merge_mode!r}; torch.nn "
                                                "concatenates the two directions (merge_mode='concat')")
                inner = layer_config.get("layer", {})
                inner_class, inner_config = inner.get("class_name"), inner.get("config", {})
                backward_config = layer_config.get("backward_layer")
                if backward_config is not None and backward_config.get("class_name") != inner_class:
                    raise UnsupportedLayerError(f"{layer}: forward {inner_class} and backward "
                                                f"{backward_config.get('class_name')} differ")
            directions = [("", halves[0]), ("_reverse", halves[1])]
            bidirectional = True
        else:
            inner_class, inner_config = class_name, layer_config
            directions = [("", weights)]
            bidirectional = False
        expected, expected_layout = None, None
        if inner_class is not None:
            expected = _check_config(layer, inner_class, inner_config, bidirectional, report)
            expected_layout = "cudnn" if inner_class.startswith("CuDNN") else "plain"
        state: Dict[str, np.ndarray] = {}
        shapes = set()
        for suffix, direction_weights in directions:
            kind, layout, input_size, hidden, has_bias, direction_state = _convert_direction(
                layer, _direction_arrays(layer, direction_weights), suffix, report, expected, expected_layout)
            shapes.add((kind, layout, input_size, hidden, has_bias))
            state.update(direction_state)
        if len(shapes) != 1:
            raise PretrainedFormatError(f"{layer}: forward and backward layers differ: {sorted(shapes)}")
        kind, layout, input_size, hidden, has_bias = shapes.pop()
        if inner_class is None:
            inferred = "CuDNN" + kind if layout == "cudnn" else kind
            report.notes.append(f"no model config in the file: {inferred} inferred from the weight shapes; "
                                "activations assumed tanh/sigmoid")
            inner_class = inferred
        if inner_class == "RNN":
            inner_class = f"RNN({inner_config.get('cell', {}).get('class_name', '?')})"
        report.source_kind = f"Bidirectional({inner_class})" if bidirectional else inner_class
        report.module_kind = kind
        report.config = {"input_size": input_size, "hidden_size": hidden, "num_layers": 1, "bias": has_bias,
                         "batch_first": batch_first, "bidirectional": bidirectional}
        result[layer] = build_module(kind, report.config, state, module_kwargs, dtype, device, layer=layer)
        result.reports[layer] = report
    masking = [name for name, (class_name, config) in configs.items()
               if class_name == "Masking" or (isinstance(config, dict) and config.get("mask_zero"))]
    if masking:
        result.notes.append(f"{masking} mask steps in Keras (masked steps keep the state); give the modules "
                            "PackedSequence input or lengths to get the same outputs")
    if not result:
        raise PretrainedFormatError(f"{path}: no recurrent layers (kernel + recurrent_kernel) found; layers: "
                                    f"{list(source.layer_weights)}")
    return result
