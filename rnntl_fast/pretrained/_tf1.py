"""TF1 LSTM cells (tf.nn.rnn_cell.LSTMCell, BasicLSTMCell, tf.contrib.rnn.LSTMBlockCell)
and ELMo (bilm-tf) weights -> rnntl_fast.LSTM.

TF1 cell variables, under the cell's scope S (e.g. "rnn/multi_rnn_cell/cell_0/lstm_cell"):
  S/kernel [I + H_out, 4H]   inputs and recurrent state stacked on rows; gates i, j, f, o
                             (j is the candidate, torch's g)   (older: S/W_0, S/weights)
  S/bias [4H]                                                  (older: S/B, S/biases)
  S/projection/kernel [H, P] with num_proj                     (older: S/W_P_0)
  S/w_f_diag, w_i_diag, w_o_diag: peepholes -> refused
H_out = P with a projection, else H. The forget bias (constructor argument, default 1.0)
is added to f at run time and not stored, so it is added to torch's bias_ih here; bias_hh
is zero. cell_clip / proj_clip are constructor arguments too: pass them to load_tf1.

Conversion: weight_ih = kernel[:I].T, weight_hh = kernel[I:].T, gate blocks (i, j, f, o)
-> (i, f, g, o); weight_hr = projection.T.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ._common import (TF_LSTM_TO_TORCH, LayerReport, LoadedLayers, PretrainedFormatError, UnsupportedLayerError,
                      build_module, naming_file, reorder_gates)
from ._tf_bundle import is_tf_checkpoint, read_tf_checkpoint

_KERNEL_NAMES = ("kernel", "W_0", "weights")
_BIAS_NAMES = ("bias", "B", "biases")
_PROJECTION_NAMES = ("projection/kernel", "W_P_0", "projection/weights")
_PEEPHOLE_NAMES = ("w_f_diag", "w_i_diag", "w_o_diag")


def _read_variables(source) -> "OrderedDict[str, np.ndarray]":
    if isinstance(source, Mapping):
        return OrderedDict((str(name), np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value))
                           for name, value in source.items())
    path = os.fspath(source)
    if path.endswith(".npz"):
        # np.load's errors for a damaged archive: BadZipFile, a truncated member (EOFError,
        # zlib.error), a member that is not an .npy (ValueError)
        with naming_file(path, ".npz archive", (zipfile.BadZipFile, EOFError, zlib.error, ValueError, OSError)):
            with np.load(path, allow_pickle=False) as archive:
                return OrderedDict((name, archive[name]) for name in archive.files)
    if is_tf_checkpoint(path):
        return read_tf_checkpoint(path)
    raise PretrainedFormatError(f"{path}: neither a .npz of variables nor a TF checkpoint prefix with a .index file")


def _first(variables: Mapping[str, np.ndarray], scope: str, names: Sequence[str]):
    for name in names:
        if f"{scope}/{name}" in variables:
            return f"{scope}/{name}", variables[f"{scope}/{name}"]
    return None, None


def _find_cells(variables: Mapping[str, np.ndarray], scopes: Optional[Sequence[str]]):
    """Scopes of LSTM cells, in variable order."""
    if scopes is not None:
        missing = [scope for scope in scopes if _first(variables, scope, _KERNEL_NAMES)[0] is None]
        if missing:
            raise PretrainedFormatError(f"no kernel (one of {_KERNEL_NAMES}) under scope(s) {missing}")
        return list(scopes)
    found = []
    for name in variables:
        scope, _, leaf = name.rpartition("/")
        if leaf not in _KERNEL_NAMES or not scope or scope.endswith("/projection") or scope in found:
            continue
        cell = scope.rsplit("/", 1)[-1].lower()
        if "gru" in scope.lower() and cell in ("gates", "candidate"):
            raise UnsupportedLayerError(f"{scope}: a TF1 GRUCell applies the reset gate to h before the matmul; "
                                        "torch.nn.GRU applies it after. Pass scopes=[...] to load only the LSTMs")
        if "lstm" in cell:
            found.append(scope)
    return found


def convert_tf_lstm_cell(scope: str, kernel: np.ndarray, bias: Optional[np.ndarray],
                         projection: Optional[np.ndarray], forget_bias: float, report: LayerReport,
                         names=("kernel", "bias", "projection")):
    """One TF1 LSTM cell -> (config, torch.nn.LSTM state_dict for layer 0).

    kernel: [I + H_out, 4H], gates i, j, f, o; bias: [4H] or None (zeros);
    projection: [H, P] or None."""
    if kernel.ndim != 2 or kernel.shape[1] % 4 or not kernel.size:
        raise PretrainedFormatError(f"{scope}: kernel of shape {list(kernel.shape)} is not [I + H_out, 4H]")
    hidden = kernel.shape[1] // 4
    if projection is not None:
        if projection.ndim != 2 or projection.shape[0] != hidden:
            raise PretrainedFormatError(f"{scope}: projection of shape {list(projection.shape)} is not [{hidden}, P]")
        hidden_out = projection.shape[1]
    else:
        hidden_out = hidden
    input_size = kernel.shape[0] - hidden_out
    if input_size <= 0:
        raise PretrainedFormatError(f"{scope}: kernel rows {kernel.shape[0]} leave no room for the input after "
                                    f"{hidden_out} recurrent rows")
    if bias is None:
        bias = np.zeros(4 * hidden, dtype=kernel.dtype)
    elif bias.shape != (4 * hidden,):
        raise PretrainedFormatError(f"{scope}: bias of shape {list(bias.shape)}, expected [{4 * hidden}]")
    gate_text = "gate blocks i,j,f,o -> i,f,g(=j),o"
    bias_ih = reorder_gates(bias, TF_LSTM_TO_TORCH).astype(np.float64)
    bias_ih[hidden:2 * hidden] += forget_bias   # torch's f block
    state = {"weight_ih_l0": reorder_gates(kernel[:input_size].T, TF_LSTM_TO_TORCH),
             "weight_hh_l0": reorder_gates(kernel[input_size:].T, TF_LSTM_TO_TORCH),
             "bias_ih_l0": bias_ih.astype(kernel.dtype),
             "bias_hh_l0": np.zeros(4 * hidden, dtype=kernel.dtype)}
    report.map(f"{names[0]}[:{input_size}]", (input_size, 4 * hidden), "weight_ih_l0", (4 * hidden, input_size),
               "transpose, " + gate_text)
    report.map(f"{names[0]}[{input_size}:]", (hidden_out, 4 * hidden), "weight_hh_l0", (4 * hidden, hidden_out),
               "transpose, " + gate_text)
    report.map(names[1], (4 * hidden,), "bias_ih_l0", (4 * hidden,),
               f"{gate_text}, forget_bias {forget_bias} added to f; bias_hh is zero")
    if projection is not None:
        state["weight_hr_l0"] = projection.T
        report.map(names[2], projection.shape, "weight_hr_l0", projection.T.shape, "transpose")
    config = {"input_size": int(input_size), "hidden_size": int(hidden), "num_layers": 1, "bias": True,
              "proj_size": int(hidden_out) if projection is not None else 0}
    return config, state


def load_tf1(source, *, forget_bias: Union[float, Mapping[str, float]] = 1.0, cell_clip: Optional[float] = None,
             proj_clip: Optional[float] = None, scopes: Optional[Sequence[str]] = None, batch_first: bool = True,
             module_kwargs: Optional[Mapping] = None, dtype: Optional[torch.dtype] = torch.float32,
             device=None) -> LoadedLayers:
    """Loads TF1 LSTM cells (LSTMCell, BasicLSTMCell, LSTMBlockCell) from a checkpoint.

    source: a TF V2 checkpoint (prefix, .index file, or directory with a `checkpoint` file;
        read without tensorflow), a .npz of variables, or a {variable name: array} dict
        (e.g. from tf.train.list_variables / load_variable).
    forget_bias: what the cells were built with (TF's default 1.0), or {scope: value}.
    cell_clip, proj_clip: the cells' constructor values, if any (TF does not store them);
        proj_clip is only applied to cells with a projection, as TF does.
    scopes: the cell scopes to load; by default every scope whose last part names an LSTM
        cell ("lstm_cell", "basic_lstm_cell", "LSTMCell", ...) and holds a kernel.
    batch_first: tf.nn.dynamic_rnn is batch-major by default, hence True.

    Returns {cell scope: rnntl_fast.LSTM} (one single-layer module per cell; for
    MultiRNNCell stacks and bidirectional fw/bw pairs, chain / combine them as the graph did).
    """
    with naming_file(source):
        return _load_tf1(_read_variables(source), forget_bias, cell_clip, proj_clip, scopes, batch_first, module_kwargs,
                         dtype, device)


def _load_tf1(variables, forget_bias, cell_clip, proj_clip, scopes, batch_first, module_kwargs, dtype,
              device) -> LoadedLayers:
    result = LoadedLayers()
    for scope in _find_cells(variables, scopes):
        peepholes = [name for name in _PEEPHOLE_NAMES if f"{scope}/{name}" in variables]
        if peepholes:
            raise UnsupportedLayerError(f"{scope}: peephole weights {peepholes}; torch.nn.LSTM has no peepholes")
        # Anything else in the cell's scope (e.g. LayerNormBasicLSTMCell's gamma/beta) means
        # another computation; optimizer slots ("kernel/Adam") sit under known names.
        known = {name.split("/")[0] for name in _KERNEL_NAMES + _BIAS_NAMES + _PROJECTION_NAMES}
        unknown = sorted(name for name in variables if name.startswith(scope + "/")
                         and name[len(scope) + 1:].split("/")[0] not in known)
        if unknown:
            raise UnsupportedLayerError(f"{scope}: variables {unknown[:5]} are not those of a plain LSTMCell (layer "
                                        "norm? other cell?); torch.nn.LSTM cannot express them")
        kernel_name, kernel = _first(variables, scope, _KERNEL_NAMES)
        bias_name, bias = _first(variables, scope, _BIAS_NAMES)
        projection_name, projection = _first(variables, scope, _PROJECTION_NAMES)
        value = forget_bias.get(scope, 1.0) if isinstance(forget_bias, Mapping) else float(forget_bias)
        report = LayerReport(scope, "tf1 LSTMCell" + (" with projection" if projection is not None else ""), "LSTM", {})
        config, state = convert_tf_lstm_cell(scope, np.asarray(kernel), None if bias is None else np.asarray(bias),
                                             None if projection is None else np.asarray(projection), value, report,
                                             (kernel_name, bias_name or "(no bias)", projection_name))
        if bias is None:
            report.notes.append("no bias variable: zeros (plus forget_bias)")
        config["batch_first"] = batch_first
        if cell_clip is not None:
            config["cell_clip"] = cell_clip
        if proj_clip is not None and projection is not None:
            config["proj_clip"] = proj_clip
        report.config = config
        result[scope] = build_module("LSTM", config, state, module_kwargs, dtype, device, layer=scope)
        result.reports[scope] = report
    if not result:
        raise PretrainedFormatError(f"no LSTM cell found (looked for <scope>/kernel|W_0|weights with a scope naming an "
                                    f"LSTM cell among {len(variables)} variables); pass scopes=[...]")
    return result


def load_elmo(weight_file, options, *, batch_first: bool = True, module_kwargs: Optional[Mapping] = None,
              dtype: Optional[torch.dtype] = torch.float32, device=None) -> LoadedLayers:
    """Loads the biLM LSTMs of an ELMo / bilm-tf weight file.

    weight_file: the hdf5 written by bilm-tf's dump_weights, with datasets
        RNN_{d}/RNN/MultiRNNCell/Cell{k}/LSTMCell/{W_0, B, W_P_0} (d = 0 forward, 1 backward;
        W_0 [I + P, 4H] gates i, j, f, o; B [4H]; W_P_0 [H, P]).
    options: the options json (path or dict); its "lstm" section gives cell_clip,
        proj_clip, n_layers, dim, projection_dim, use_skip_connections.

    bilm-tf builds tf.nn.rnn_cell.LSTMCell with the default forget_bias=1.0: it is added to
    the f bias here. Returns {"RNN_{d}/RNN/MultiRNNCell/Cell{k}": rnntl_fast.LSTM} with
    cell_clip/proj_clip set; forward cells first. The backward cells (RNN_1) read the
    time-reversed sequence, and with use_skip_connections bilm-tf adds each layer's input
    to its output for layers k >= 1: both happen outside the modules (see .notes).
    The character CNN and highway layers are not loaded.
    """
    import h5py

    if not isinstance(options, (Mapping, str, os.PathLike)):
        raise TypeError(f"options must be a dict or the path of the options json, got {type(options).__name__}")
    options_path = None
    if not isinstance(options, Mapping):
        options_path = os.fspath(options)
        with naming_file(options_path, "JSON file", (ValueError,)), open(options_path, encoding="utf8") as handle:
            options = json.load(handle)
    with naming_file(options_path):
        lstm_options = options.get("lstm") if isinstance(options, Mapping) else None
        if not isinstance(lstm_options, Mapping):
            raise PretrainedFormatError(f"ELMo options need an 'lstm' object, got {str(lstm_options)[:60]}")
        layers = lstm_options.get("n_layers", 2)
        if not isinstance(layers, int) or layers < 1:
            raise PretrainedFormatError(f"ELMo options: lstm.n_layers must be a positive integer, got {layers!r}")
        for key in ("cell_clip", "proj_clip", "dim", "projection_dim"):
            if not isinstance(lstm_options.get(key, 0), (int, float)):
                raise PretrainedFormatError(f"ELMo options: lstm.{key} must be a number, got {lstm_options[key]!r}")
    with naming_file(weight_file, "HDF5 file", (OSError,)):
        return _load_elmo(h5py, os.fspath(weight_file), lstm_options, layers, batch_first, module_kwargs, dtype,
                          device)


def _load_elmo(h5py, weight_file: str, lstm_options, layers: int, batch_first, module_kwargs, dtype,
               device) -> LoadedLayers:
    cell_clip, proj_clip = lstm_options.get("cell_clip"), lstm_options.get("proj_clip")
    result = LoadedLayers()
    with h5py.File(weight_file, "r") as handle:
        for direction in (0, 1):
            for layer in range(layers):
                scope = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}"
                names = [f"{scope}/LSTMCell/{leaf}" for leaf in ("W_0", "B", "W_P_0")]
                missing = [name for name in names[:2] if name not in handle]
                if missing:
                    raise PretrainedFormatError(f"missing dataset(s) {missing} (options say n_layers={layers})")
                kernel, bias = np.asarray(handle[names[0]]), np.asarray(handle[names[1]])
                projection = np.asarray(handle[names[2]]) if names[2] in handle else None
                report = LayerReport(scope, f"bilm-tf LSTMCell ({'backward' if direction else 'forward'})", "LSTM", {})
                config, state = convert_tf_lstm_cell(scope, kernel, bias, projection, 1.0, report,
                                                     tuple(name.rsplit("/", 1)[1] for name in names))
                if "dim" in lstm_options and config["hidden_size"] != int(lstm_options["dim"]):
                    raise PretrainedFormatError(f"{scope}: hidden size {config['hidden_size']} but options say dim="
                                                f"{lstm_options['dim']}")
                if projection is not None and "projection_dim" in lstm_options and \
                        config["proj_size"] != int(lstm_options["projection_dim"]):
                    raise PretrainedFormatError(f"{scope}: projection {config['proj_size']} but options say "
                                                f"projection_dim={lstm_options['projection_dim']}")
                config["batch_first"] = batch_first
                if cell_clip is not None:
                    config["cell_clip"] = float(cell_clip)
                if proj_clip is not None and projection is not None:
                    config["proj_clip"] = float(proj_clip)
                if direction == 1:
                    report.notes.append("backward direction: feed the time-reversed sequence, reverse the output")
                if layer >= 1 and lstm_options.get("use_skip_connections"):
                    report.notes.append("use_skip_connections: bilm-tf adds this layer's input to its output")
                report.config = config
                result[scope] = build_module("LSTM", config, state, module_kwargs, dtype, device, layer=scope)
                result.reports[scope] = report
    result.notes.append("character CNN / highway / projection layers of ELMo are not loaded (only the biLM LSTMs)")
    return result
