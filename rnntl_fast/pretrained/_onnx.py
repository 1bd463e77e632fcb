"""ONNX LSTM / GRU nodes -> rnntl_fast modules.

ONNX (opset 7+) stores per node, all with a leading num_directions axis D:
  LSTM: W [D, 4H, I], R [D, 4H, H], B [D, 8H] (W biases then R biases), gates i, o, f, c;
        optional P [D, 3H] (peepholes).
  GRU:  W [D, 3H, I], R [D, 3H, H], B [D, 6H], gates z, r, h.
torch.nn wants LSTM i, f, g, o and GRU r, z, n: the gate blocks are permuted, nothing is
transposed. Directions: forward -> unidirectional; bidirectional -> bidirectional=True;
reverse -> a unidirectional module wrapped in ReversedDirection (time flipped in and out).
layout=1 -> batch_first=True.

Refused: GRU linear_before_reset=0 (reset gate before the recurrent matmul), non-default
activations, `clip` (ONNX clamps the gate pre-activations, which is neither torch.nn nor
rnntl_fast's cell_clip), input_forget=1 (coupled input/forget gates), non-zero peepholes,
weights computed inside the graph (not initializers, Constant nodes, or Identity of those).
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ._common import (ONNX_GRU_TO_TORCH, ONNX_LSTM_TO_TORCH, LayerReport, LoadedLayers, PretrainedFormatError,
                      UnsupportedLayerError, build_module, naming_file, reorder_gates)

_DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}


class ReversedDirection(nn.Module):
    """Runs `module` on the time-reversed input and flips its output back, which is what an
    ONNX direction="reverse" layer computes (torch.nn has no single reversed direction).

    Exact for padded inputs whose sequences all have the full length; PackedSequence
    input is refused (each sequence would need reversing within its own length).
    Input/output forms as the wrapped module's: [T, B, I] or [B, T, I] if batch_first."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input: torch.Tensor, hx=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError("ReversedDirection takes a padded Tensor, not a PackedSequence")
        time_dim = 1 if (self.module.batch_first and input.dim() == 3) else 0
        output, state = self.module(input.flip(time_dim), hx)
        return output.flip(time_dim), state


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:  # pragma: no cover
        raise ImportError("reading ONNX files needs onnx: pip install onnx") from error
    return onnx, numpy_helper


def _constants(graph, numpy_helper) -> Dict[str, np.ndarray]:
    """Initializers and Constant-node outputs: the tensors whose values the file fixes."""
    def array(tensor, name: str) -> np.ndarray:
        try:
            return numpy_helper.to_array(tensor)
        except (ValueError, TypeError, OSError) as error:   # data not matching the declared shape/type, ...
            raise PretrainedFormatError(f"tensor {name!r}: its data does not fit its type and shape "
                                        f"{list(tensor.dims)} ({error})") from error

    values = {tensor.name: array(tensor, tensor.name) for tensor in graph.initializer}
    for node in graph.node:   # nodes are topologically sorted, so one pass follows Identity chains
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = array(attribute.t, node.output[0])
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _attributes(node, onnx) -> dict:
    found = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list):
            value = [item.decode() if isinstance(item, bytes) else item for item in value]
        found[attribute.name] = value
    return found


def load_onnx(source, *, module_kwargs: Optional[Mapping] = None, dtype: Optional[torch.dtype] = torch.float32,
              device=None) -> LoadedLayers:
    """Loads every LSTM and GRU node of an ONNX model (top-level graph).

    source: a path or an onnx.ModelProto.
    Returns {node name (or "<op>_<index>" when unnamed): module} in graph order. The module
    is rnntl_fast.LSTM/GRU, or ReversedDirection(module) for direction="reverse". ONNX's Y
    output is [T, D, B, H]; the module's output is torch's [T, B, D*H] (exporters insert the
    Transpose/Reshape between them).
    """
    onnx, numpy_helper = _onnx()
    from google.protobuf.message import DecodeError
    if isinstance(source, (str, os.PathLike)):
        with naming_file(source, "ONNX model", (DecodeError, ValueError)):
            model = onnx.load(os.fspath(source))
    else:
        model = source
    with naming_file(source):
        return _load(onnx, numpy_helper, model.graph, module_kwargs, dtype, device)


def _load(onnx, numpy_helper, graph, module_kwargs, dtype, device) -> LoadedLayers:
    constants = _constants(graph, numpy_helper)
    result = LoadedLayers()
    for index, node in enumerate(graph.node):
        if node.op_type == "RNN":
            raise UnsupportedLayerError(f"{node.name or index}: ONNX RNN (vanilla) has no rnntl_fast module")
        if node.op_type not in ("LSTM", "GRU"):
            continue
        kind = node.op_type
        name = node.name or f"{kind}_{index}"
        if name in result:
            raise PretrainedFormatError(f"two recurrent nodes are named {name!r}")
        attributes = _attributes(node, onnx)
        inputs = list(node.input) + [""] * 8

        def constant(position: int, label: str, required: bool):
            tensor_name = inputs[position]
            if not tensor_name:
                if required:
                    raise PretrainedFormatError(f"{name}: input {label} is missing")
                return None
            if tensor_name not in constants:
                if required:
                    raise PretrainedFormatError(f"{name}: {label} ({tensor_name!r}) is computed in the graph or fed "
                                                "at run time, not an initializer/Constant; its values are unknown")
                return "dynamic"
            return constants[tensor_name]

        report = LayerReport(name, f"onnx {kind}", kind, {})
        direction = attributes.get("direction", "forward")
        directions = 2 if direction == "bidirectional" else 1
        if direction not in ("forward", "reverse", "bidirectional"):
            raise PretrainedFormatError(f"{name}: unknown direction {direction!r}")
        activations = [a.lower() for a in attributes.get("activations", [])]
        if activations and activations != _DEFAULT_ACTIVATIONS[kind] * directions:
            raise UnsupportedLayerError(f"{name}: activations {attributes['activations']}; torch.nn.{kind} uses "
                                        f"{_DEFAULT_ACTIVATIONS[kind]} per direction")
        if "clip" in attributes:
            raise UnsupportedLayerError(f"{name}: clip={attributes['clip']} clamps the gate pre-activations; "
                                        "torch.nn has no such clamp (rnntl_fast's cell_clip clamps the cell state)")
        if kind == "LSTM" and attributes.get("input_forget", 0):
            raise UnsupportedLayerError(f"{name}: input_forget=1 couples the input and forget gates; torch.nn.LSTM "
                                        "has independent gates")
        if kind == "GRU" and not attributes.get("linear_before_reset", 0):
            raise UnsupportedLayerError(f"{name}: linear_before_reset=0 applies the reset gate before the recurrent "
                                        "matmul; torch.nn.GRU applies it after (linear_before_reset=1)")
        weight = constant(1, "W", True)
        recurrent = constant(2, "R", True)
        bias = constant(3, "B", False)
        gates = 4 if kind == "LSTM" else 3
        if weight.ndim != 3 or recurrent.ndim != 3 or weight.shape[0] != directions:
            raise PretrainedFormatError(f"{name}: W {list(weight.shape)} / R {list(recurrent.shape)} are not "
                                        f"[{directions}, {gates}H, *]")
        hidden = int(attributes.get("hidden_size", recurrent.shape[2]))
        input_size = int(weight.shape[2])
        if tuple(weight.shape[:2]) != (directions, gates * hidden) or \
                tuple(recurrent.shape) != (directions, gates * hidden, hidden):
            raise PretrainedFormatError(f"{name}: W {list(weight.shape)} / R {list(recurrent.shape)} do not match "
                                        f"hidden_size={hidden}, {directions} direction(s), {gates} gates")
        if isinstance(bias, str):
            raise PretrainedFormatError(f"{name}: B is computed in the graph; its values are unknown")
        if bias is not None and tuple(bias.shape) != (directions, 2 * gates * hidden):
            raise PretrainedFormatError(f"{name}: B has shape {list(bias.shape)}, expected "
                                        f"[{directions}, {2 * gates * hidden}]")
        if kind == "LSTM":
            peepholes = constant(7, "P", False)
            if isinstance(peepholes, str):
                raise UnsupportedLayerError(f"{name}: peephole input P is dynamic; torch.nn.LSTM has no peepholes")
            if peepholes is not None and np.any(peepholes != 0):
                raise UnsupportedLayerError(f"{name}: non-zero peephole weights P; torch.nn.LSTM has no peepholes")
            if peepholes is not None:
                report.notes.append("peephole input P is all zeros: ignored")
        for position, label in ((4, "sequence_lens"), (5, "initial_h"), (6, "initial_c")):
            value = constant(position, label, False)
            if isinstance(value, str):
                report.notes.append("sequence_lens is a graph input: give the module a PackedSequence"
                                    if label == "sequence_lens" else
                                    f"{label} is a graph input: pass it to the module as part of hx")
            elif value is not None and label == "sequence_lens":
                report.notes.append(f"sequence_lens is the constant {value.tolist()}: give the module a "
                                    "PackedSequence with these lengths")
            elif value is not None and np.any(value != 0):
                report.notes.append(f"{label} is a non-zero constant in the graph: pass it as hx")

        order = ONNX_LSTM_TO_TORCH if kind == "LSTM" else ONNX_GRU_TO_TORCH
        gate_text = "gate blocks i,o,f,c -> i,f,g,o" if kind == "LSTM" else "gate blocks z,r,h -> r,z,n"
        state = {}
        for d in range(directions):
            suffix = "_reverse" if d == 1 else ""
            state[f"weight_ih_l0{suffix}"] = reorder_gates(weight[d], order)
            state[f"weight_hh_l0{suffix}"] = reorder_gates(recurrent[d], order)
            report.map(f"W[{d}]", weight[d].shape, f"weight_ih_l0{suffix}", weight[d].shape, gate_text)
            report.map(f"R[{d}]", recurrent[d].shape, f"weight_hh_l0{suffix}", recurrent[d].shape, gate_text)
            if bias is not None:
                state[f"bias_ih_l0{suffix}"] = reorder_gates(bias[d, :gates * hidden], order)
                state[f"bias_hh_l0{suffix}"] = reorder_gates(bias[d, gates * hidden:], order)
                report.map(f"B[{d}]", bias[d].shape, f"bias_ih_l0{suffix} + bias_hh_l0{suffix}", (gates * hidden,),
                           "first half (W biases) -> bias_ih, second half (R biases) -> bias_hh; " + gate_text)
        if bias is None:   # ONNX's default B is zeros; keep torch's bias=True layout with zeros
            for d in range(directions):
                suffix = "_reverse" if d == 1 else ""
                for key in ("bias_ih_l0", "bias_hh_l0"):
                    state[key + suffix] = np.zeros(gates * hidden, dtype=weight.dtype)
            report.notes.append("no B input: ONNX's default zero biases")
        batch_first = bool(attributes.get("layout", 0))
        report.config = {"input_size": input_size, "hidden_size": hidden, "num_layers": 1, "bias": True,
                         "batch_first": batch_first, "bidirectional": directions == 2}
        module = build_module(kind, report.config, state, module_kwargs, dtype, device, layer=name)
        if direction == "reverse":
            module = ReversedDirection(module)
            report.notes.append("direction=reverse: wrapped in ReversedDirection (flips time on the way in and out)")
        result[name] = module
        result.reports[name] = report
    if not result:
        raise PretrainedFormatError("no LSTM or GRU node in the ONNX graph (subgraphs of If/Loop/Scan are not "
                                    "searched)")
    return result
