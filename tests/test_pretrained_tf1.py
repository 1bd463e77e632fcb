"""TF1 LSTM cells and ELMo (bilm-tf) weights -> rnntl_fast.LSTM, checked against a numpy
implementation of tf.nn.rnn_cell.LSTMCell's step written from TF's documented math
(concat([x, h]) @ kernel + bias, gates i, j, f, o, forget_bias added to f, cell_clip,
projection, proj_clip). Tensorflow is not needed: checkpoints are written here in TF's
tensor-bundle format by a small writer that follows the format's spec."""
import json
import struct

import numpy as np
import pytest
import torch

from rnntl_fast import LSTM
from rnntl_fast.pretrained import (PretrainedFormatError, UnsupportedLayerError, load_elmo, load_tf1,
                                   read_tf_checkpoint)


def tf_lstm_cell_reference(x, kernel, bias, forget_bias=1.0, cell_clip=None, projection=None, proj_clip=None):
    """x: [B, T, I] -> outputs [B, T, H_out], float64; TF1 LSTMCell semantics."""
    sigmoid = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    batch, steps, _ = x.shape
    hidden = kernel.shape[1] // 4
    hidden_out = projection.shape[1] if projection is not None else hidden
    h, c = np.zeros((batch, hidden_out)), np.zeros((batch, hidden))
    outputs = []
    for t in range(steps):
        gates = np.concatenate([x[:, t], h], axis=1) @ kernel + bias
        i, j, f, o = np.split(gates, 4, axis=1)
        c = sigmoid(f + forget_bias) * c + sigmoid(i) * np.tanh(j)
        if cell_clip is not None:
            c = np.clip(c, -cell_clip, cell_clip)
        h = sigmoid(o) * np.tanh(c)
        if projection is not None:
            h = h @ projection
            if proj_clip is not None:
                h = np.clip(h, -proj_clip, proj_clip)
        outputs.append(h)
    return np.stack(outputs, axis=1)


# -- a TF tensor-bundle writer, for the tests --------------------------------------------
def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number, wire, payload):
    key = _varint(number << 3 | wire)
    return key + (_varint(payload) if wire == 0 else _varint(len(payload)) + payload)


def _block(entries, restart_interval=2):
    """A table block with prefix-compressed keys and a restart point every 2 entries."""
    out, restarts, previous = bytearray(), [], b""
    for index, (key, value) in enumerate(entries):
        shared = 0
        if index % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def write_tf_checkpoint(prefix, variables):
    """Writes {name: float32 array} as <prefix>.index + <prefix>.data-00000-of-00001."""
    data, entries = bytearray(), []
    for name in sorted(variables):
        array = np.ascontiguousarray(variables[name], dtype="<f4")
        shape = b"".join(_field(2, 2, _field(1, 0, size)) for size in array.shape)
        entry = _field(1, 0, 1) + _field(2, 2, shape) + _field(4, 0, len(data)) + _field(5, 0, array.nbytes)
        entries.append((name.encode(), entry))
        data += array.tobytes()
    header = _field(1, 0, 1) + _field(3, 2, _field(1, 0, 1))
    table = bytearray()
    data_block = _block([(b"", header)] + entries)
    table += data_block + b"\0" * 5
    index_block = _block([(entries[-1][0] + b"\xff", _varint(0) + _varint(len(data_block)))])
    index_offset = len(table)
    table += index_block + b"\0" * 5
    meta_offset = len(table)
    meta_block = _block([])
    table += meta_block + b"\0" * 5
    handles = _varint(meta_offset) + _varint(len(meta_block)) + _varint(index_offset) + _varint(len(index_block))
    table += handles + b"\0" * (40 - len(handles)) + struct.pack("<Q", 0xDB4775248B80FB57)
    with open(f"{prefix}.index", "wb") as handle:
        handle.write(table)
    with open(f"{prefix}.data-00000-of-00001", "wb") as handle:
        handle.write(data)


def _cell_variables(rng, scope, inputs, hidden, proj=None):
    rows = inputs + (proj or hidden)
    variables = {f"{scope}/kernel": 0.4 * rng.standard_normal((rows, 4 * hidden)),
                 f"{scope}/bias": 0.4 * rng.standard_normal(4 * hidden)}
    if proj:
        variables[f"{scope}/projection/kernel"] = 0.4 * rng.standard_normal((hidden, proj))
    return {name: value.astype(np.float32) for name, value in variables.items()}


def _run(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x.astype(np.float32)))[0].double().numpy()


def test_tf_checkpoint_bundle_reader_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    variables = {"a/kernel": rng.standard_normal((3, 8)), "a/kernel/Adam": rng.standard_normal((3, 8)),
                 "a/bias": rng.standard_normal(8), "global_step": np.array(7.0), "b/x": rng.standard_normal((2, 2, 2))}
    write_tf_checkpoint(str(tmp_path / "model.ckpt-7"), variables)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-7"\n')
    for source in (tmp_path / "model.ckpt-7", tmp_path / "model.ckpt-7.index", tmp_path):
        read = read_tf_checkpoint(source)
        assert list(read) == sorted(variables)
        for name, value in variables.items():
            np.testing.assert_array_equal(read[name], value.astype(np.float32))


@pytest.mark.parametrize("source_kind", ["checkpoint", "npz", "dict"])
def test_tf1_stacked_cells_with_forget_bias(tmp_path, source_kind):
    rng = np.random.default_rng(1)
    scopes = ["rnn/multi_rnn_cell/cell_0/lstm_cell", "rnn/multi_rnn_cell/cell_1/lstm_cell"]
    variables = {**_cell_variables(rng, scopes[0], 3, 5), **_cell_variables(rng, scopes[1], 5, 4),
                 "dense/kernel": rng.standard_normal((4, 2)).astype(np.float32),
                 "dense/bias": np.zeros(2, np.float32)}
    if source_kind == "checkpoint":
        source = str(tmp_path / "model.ckpt")
        write_tf_checkpoint(source, variables)
    elif source_kind == "npz":
        source = str(tmp_path / "variables.npz")
        np.savez(source, **variables)
    else:
        source = variables
    layers = load_tf1(source, forget_bias=1.0)
    assert list(layers) == scopes and all(type(m) is LSTM for m in layers.values())
    assert "forget_bias 1.0 added" in layers.reports[scopes[0]].mappings[2]
    x = rng.standard_normal((2, 6, 3))
    hidden = x
    expected = x
    for scope in scopes:
        hidden = _run(layers[scope], hidden)
        expected = tf_lstm_cell_reference(expected, variables[f"{scope}/kernel"], variables[f"{scope}/bias"], 1.0)
    np.testing.assert_allclose(hidden, expected, atol=2e-5)
    # forget_bias is really applied: with 0 the outputs differ.
    without = load_tf1(variables, forget_bias=0.0)[scopes[0]]
    assert not np.allclose(_run(without, x), _run(layers[scopes[0]], x), atol=1e-3)
    np.testing.assert_allclose(_run(without, x), tf_lstm_cell_reference(
        x, variables[f"{scopes[0]}/kernel"], variables[f"{scopes[0]}/bias"], 0.0), atol=2e-5)


def test_tf1_projection_and_clips():
    rng = np.random.default_rng(2)
    scope = "lm/lstm_cell"
    variables = _cell_variables(rng, scope, 3, 6, proj=4)
    variables = {name: 3 * value for name, value in variables.items()}   # large, so the clips bite
    layers = load_tf1(variables, forget_bias=1.0, cell_clip=0.5, proj_clip=0.3)
    module = layers[scope]
    assert (module.proj_size, module.cell_clip, module.proj_clip) == (4, 0.5, 0.3)
    x = rng.standard_normal((2, 5, 3))
    expected = tf_lstm_cell_reference(x, variables[f"{scope}/kernel"], variables[f"{scope}/bias"], 1.0, 0.5,
                                      variables[f"{scope}/projection/kernel"], 0.3)
    np.testing.assert_allclose(_run(module, x), expected, atol=2e-5)
    assert np.abs(expected).max() == pytest.approx(0.3)


def test_tf1_refusals_and_errors():
    rng = np.random.default_rng(3)
    peephole = {**_cell_variables(rng, "rnn/lstm_cell", 2, 3), "rnn/lstm_cell/w_f_diag": np.zeros(3, np.float32)}
    with pytest.raises(UnsupportedLayerError, match="peephole"):
        load_tf1(peephole)
    layer_norm = {**_cell_variables(rng, "rnn/layer_norm_basic_lstm_cell", 2, 3),
                  "rnn/layer_norm_basic_lstm_cell/input/gamma": np.ones(3, np.float32)}
    with pytest.raises(UnsupportedLayerError, match="not those of a plain LSTMCell"):
        load_tf1(layer_norm)
    slots = {**_cell_variables(rng, "rnn/lstm_cell", 2, 3), "rnn/lstm_cell/kernel/Adam": np.zeros((5, 12))}
    assert list(load_tf1(slots)) == ["rnn/lstm_cell"]   # optimizer slots are not variables of the cell
    gru = {"rnn/gru_cell/gates/kernel": np.zeros((5, 6), np.float32), "rnn/gru_cell/gates/bias": np.zeros(6),
           "rnn/gru_cell/candidate/kernel": np.zeros((5, 3), np.float32)}
    with pytest.raises(UnsupportedLayerError, match="GRUCell"):
        load_tf1(gru)
    with pytest.raises(PretrainedFormatError, match="no LSTM cell found"):
        load_tf1({"dense/kernel": np.zeros((2, 2))})
    bad_bias = {"rnn/lstm_cell/kernel": np.zeros((5, 12), np.float32), "rnn/lstm_cell/bias": np.zeros(10)}
    with pytest.raises(PretrainedFormatError, match="bias of shape"):
        load_tf1(bad_bias)


def test_tf_checkpoint_truncated_data(tmp_path):
    prefix = str(tmp_path / "model.ckpt")
    write_tf_checkpoint(prefix, {"rnn/lstm_cell/kernel": np.ones((5, 12)), "rnn/lstm_cell/bias": np.ones(12)})
    data_path = prefix + ".data-00000-of-00001"
    data = open(data_path, "rb").read()
    open(data_path, "wb").write(data[:-10])
    with pytest.raises(PretrainedFormatError, match="truncated"):
        load_tf1(prefix)
    open(prefix + ".index", "wb").write(b"not a table" * 10)
    with pytest.raises(PretrainedFormatError, match="magic"):
        read_tf_checkpoint(prefix)


def test_elmo_bilm_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(4)
    inputs, hidden, proj = 4, 6, 4   # ELMo's LSTM input is the projection size too
    options = {"lstm": {"cell_clip": 0.8, "proj_clip": 0.6, "dim": hidden, "projection_dim": proj, "n_layers": 2,
                        "use_skip_connections": True}, "char_cnn": {}}
    weights = {}
    path = str(tmp_path / "elmo_weights.hdf5")
    with h5py.File(path, "w") as handle:
        handle.create_dataset("char_embed", data=rng.standard_normal((10, 3)).astype(np.float32))
        for direction in (0, 1):
            for layer in range(2):
                root = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
                arrays = {"W_0": 2 * rng.standard_normal((inputs + proj, 4 * hidden)),
                          "B": rng.standard_normal(4 * hidden), "W_P_0": 2 * rng.standard_normal((hidden, proj))}
                for leaf, value in arrays.items():
                    handle.create_dataset(f"{root}/{leaf}", data=value.astype(np.float32))
                weights[(direction, layer)] = {k: v.astype(np.float32) for k, v in arrays.items()}
    options_path = tmp_path / "options.json"
    options_path.write_text(json.dumps(options))

    layers = load_elmo(path, str(options_path))
    assert list(layers) == [f"RNN_{d}/RNN/MultiRNNCell/Cell{k}" for d in (0, 1) for k in (0, 1)]
    x = rng.standard_normal((2, 5, inputs))
    for (direction, layer), arrays in weights.items():
        module = layers[f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}"]
        assert (module.cell_clip, module.proj_clip, module.proj_size) == (0.8, 0.6, proj)
        expected = tf_lstm_cell_reference(x, arrays["W_0"], arrays["B"], 1.0, 0.8, arrays["W_P_0"], 0.6)
        np.testing.assert_allclose(_run(module, x), expected, atol=2e-5)
    assert any("skip" in note for note in layers.reports["RNN_0/RNN/MultiRNNCell/Cell1"].notes)
    assert any("reversed" in note for note in layers.reports["RNN_1/RNN/MultiRNNCell/Cell0"].notes)

    with pytest.raises(PretrainedFormatError, match="missing dataset"):
        load_elmo(path, {"lstm": {**options["lstm"], "n_layers": 3}})
