"""ONNX LSTM/GRU nodes -> rnntl_fast modules, checked against onnxruntime."""
import warnings

import numpy as np
import pytest
import torch

from rnntl_fast import GRU, LSTM
from rnntl_fast.pretrained import PretrainedFormatError, UnsupportedLayerError, load_onnx
from rnntl_fast.pretrained._onnx import ReversedDirection

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _run_ort(model_or_path, feeds):
    payload = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else model_or_path
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _chain(layers, x):
    hidden = torch.from_numpy(x)
    with torch.no_grad():
        for module in layers.values():
            hidden = module(hidden)[0]
    return hidden.numpy()


@pytest.mark.parametrize("torch_class", [torch.nn.LSTM, torch.nn.GRU])
def test_torch_onnx_export_roundtrip(tmp_path, torch_class):
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    source = torch_class(5, 6, num_layers=2, bidirectional=True).eval()
    x = torch.randn(7, 3, 5)
    path = str(tmp_path / "rnn.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(source, (x,), path, input_names=["input"], dynamo=True, verbose=False)
    expected = _run_ort(path, {"input": x.numpy()})[0]

    layers = load_onnx(path)
    assert len(layers) == 2   # one ONNX node per layer
    expected_class = LSTM if torch_class is torch.nn.LSTM else GRU
    assert all(type(m) is expected_class and m.bidirectional for m in layers.values())
    np.testing.assert_allclose(_chain(layers, x.numpy()), expected, atol=1e-5, rtol=1e-4)
    # ... and the layers reassemble into the exported module's parameters exactly.
    for index, module in enumerate(layers.values()):
        for name, value in module.state_dict().items():
            torch.testing.assert_close(value, source.state_dict()[name.replace("_l0", f"_l{index}")])


def _graph_model(kind, W, R, B=None, P=None, attributes=None, x_shape=(6, 2, 3), extra_inputs=()):
    """A one-node ONNX model; initializers W, R, B (and P) as given."""
    initializers = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")]
    inputs = ["X", "W", "R", "B" if B is not None else ""]
    if B is not None:
        initializers.append(numpy_helper.from_array(B, "B"))
    if kind == "LSTM" and P is not None:
        inputs += ["", "", "", "P"]
        initializers.append(numpy_helper.from_array(P, "P"))
    node = helper.make_node(kind, inputs, ["Y", "Y_h"], name=f"my_{kind.lower()}", **(attributes or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)], initializers)
    # IR version 8: what onnxruntime releases of the last years all accept.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def _random(rng, *shape):
    return (0.5 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_onnx_graph_matches_onnxruntime(kind, direction, layout=0):
    rng = np.random.default_rng(7)
    gates, hidden, inputs, steps, batch = (4 if kind == "LSTM" else 3), 5, 3, 6, 2
    D = 2 if direction == "bidirectional" else 1
    W, R, B = _random(rng, D, gates * hidden, inputs), _random(rng, D, gates * hidden, hidden), \
        _random(rng, D, 2 * gates * hidden)
    attributes = {"hidden_size": hidden, "direction": direction, "layout": layout}
    if kind == "GRU":
        attributes["linear_before_reset"] = 1
    P = np.zeros((D, 3 * hidden), np.float32) if kind == "LSTM" else None
    x_shape = (steps, batch, inputs) if layout == 0 else (batch, steps, inputs)
    model = _graph_model(kind, W, R, B, P, attributes, x_shape)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y, y_h = _run_ort(model, {"X": x})

    layers = load_onnx(model)
    module = layers[f"my_{kind.lower()}"]
    assert isinstance(module, ReversedDirection) == (direction == "reverse")
    with torch.no_grad():
        output, state = module(torch.from_numpy(x))
    h_n = state[0] if kind == "LSTM" else state
    # ONNX Y: layout 0 [T, D, B, H], layout 1 [B, T, D, H]; torch: [T, B, D*H] / [B, T, D*H].
    expected = y.transpose(0, 2, 1, 3).reshape(steps, batch, D * hidden) if layout == 0 else \
        y.reshape(batch, steps, D * hidden)
    np.testing.assert_allclose(output.numpy(), expected, atol=1e-5, rtol=1e-4)
    expected_h = y_h if layout == 0 else y_h.transpose(1, 0, 2)
    np.testing.assert_allclose(h_n.numpy(), expected_h, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind, attributes, peepholes, why", [
    ("GRU", {"linear_before_reset": 0}, None, "linear_before_reset=0"),
    ("GRU", {}, None, "linear_before_reset=0"),
    ("LSTM", {"clip": 3.0}, None, "clip=3.0"),
    ("LSTM", {"input_forget": 1}, None, "input_forget=1"),
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"]}, None, "activations"),
    ("LSTM", {}, "nonzero", "peephole"),
])
def test_onnx_refuses_what_torch_cannot_express(kind, attributes, peepholes, why):
    rng = np.random.default_rng(8)
    gates, hidden = (4 if kind == "LSTM" else 3), 2
    P = _random(rng, 1, 3 * hidden) if peepholes else None
    model = _graph_model(kind, _random(rng, 1, gates * hidden, 3), _random(rng, 1, gates * hidden, hidden),
                         _random(rng, 1, 2 * gates * hidden), P, {"hidden_size": hidden, **attributes})
    with pytest.raises(UnsupportedLayerError, match=why):
        load_onnx(model)


def test_onnx_layout_1_is_batch_first():
    """onnxruntime's CPU kernels refuse layout=1, so compare with the layout=0 node instead."""
    rng = np.random.default_rng(10)
    W, R, B = _random(rng, 2, 12, 3), _random(rng, 2, 12, 4), _random(rng, 2, 24)
    attributes = {"hidden_size": 4, "direction": "bidirectional", "linear_before_reset": 1}
    time_major = load_onnx(_graph_model("GRU", W, R, B, attributes=attributes))["my_gru"]
    batch_major = load_onnx(_graph_model("GRU", W, R, B, attributes={**attributes, "layout": 1}))["my_gru"]
    assert batch_major.batch_first and not time_major.batch_first
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(batch_major(x.transpose(0, 1))[0].transpose(0, 1), time_major(x)[0])


def test_onnx_malformed():
    rng = np.random.default_rng(9)
    model = _graph_model("LSTM", _random(rng, 1, 8, 3), _random(rng, 1, 8, 2), _random(rng, 1, 7),
                         attributes={"hidden_size": 2})
    with pytest.raises(PretrainedFormatError, match="B has shape"):
        load_onnx(model)
    no_rnn = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"])], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])]))
    with pytest.raises(PretrainedFormatError, match="no LSTM or GRU node"):
        load_onnx(no_rnn)
