"""Keras files -> rnntl_fast modules, checked against Keras itself (Keras 3, torch backend)
and against textgenrnn's real pretrained CuDNNLSTM character model.

Needs: h5py, keras>=3 (KERAS_BACKEND=torch is set here), and for the textgenrnn test the
package data of `pip install --no-deps textgenrnn==2.0.0` (only its files are read; its
code imports tensorflow and is never imported).
"""
import importlib.util
import json
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rnntl_fast import GRU, LSTM  # noqa: E402
from rnntl_fast.pretrained import (PretrainedFormatError, UnsupportedLayerError, keras_weights,  # noqa: E402
                                   load_keras)

h5py = pytest.importorskip("h5py")


def _textgenrnn_dir():
    spec = importlib.util.find_spec("textgenrnn")   # finds the files without importing tensorflow
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = list(spec.submodule_search_locations)[0]
    return directory if os.path.exists(os.path.join(directory, "textgenrnn_weights.hdf5")) else None


# -- textgenrnn --------------------------------------------------------------------------
def textgenrnn_next_char_probabilities(weights_path, recurrent, tokens, vocab, max_length=40):
    """textgenrnn's forward pass in torch: embedding -> rnn_1 -> rnn_2, concatenation of
    [embedding, rnn_1, rnn_2] on features, attention-weighted average over time, dense
    softmax. tokens: list of vocabulary symbols; returns probabilities [num_classes]."""
    raw = keras_weights(weights_path)
    embedding = torch.from_numpy(raw["embedding"]["embedding/embeddings:0"])        # [classes, 100]
    attention = torch.from_numpy(raw["attention"]["attention/attention_W:0"])       # [356, 1]
    dense_kernel = torch.from_numpy(raw["output"]["output/kernel:0"])               # [356, classes]
    dense_bias = torch.from_numpy(raw["output"]["output/bias:0"])                   # [classes]
    # textgenrnn_encode_sequence: unknown symbols -> 0, then Keras pad_sequences (zeros in front).
    indices = [vocab.get(token, 0) for token in tokens][-max_length:]
    indices = [0] * (max_length - len(indices)) + indices
    with torch.no_grad():
        embedded = embedding[torch.tensor([indices])]                   # [1, T, 100]
        rnn_1, _ = recurrent["rnn_1"](embedded)                          # [1, T, 128]
        rnn_2, _ = recurrent["rnn_2"](rnn_1)                             # [1, T, 128]
        features = torch.cat([embedded, rnn_1, rnn_2], dim=2)            # [1, T, 356]
        logits = (features @ attention).squeeze(2)                      # [1, T]
        weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        weights = weights / (weights.sum(dim=1, keepdim=True) + 1e-7)    # Keras epsilon
        pooled = (features * weights.unsqueeze(2)).sum(dim=1)            # [1, 356]
        return torch.softmax(pooled @ dense_kernel + dense_bias, dim=1)[0]


@pytest.mark.skipif(_textgenrnn_dir() is None, reason="needs `pip install --no-deps textgenrnn==2.0.0` (its data "
                    "files: textgenrnn_weights.hdf5, textgenrnn_vocab.json)")
def test_textgenrnn_cudnnlstm_completes_thank_you():
    directory = _textgenrnn_dir()
    weights_path = os.path.join(directory, "textgenrnn_weights.hdf5")
    with open(os.path.join(directory, "textgenrnn_vocab.json"), encoding="utf8") as handle:
        vocab = json.load(handle)
    index_to_char = {index: char for char, index in vocab.items()}

    recurrent = load_keras(weights_path)
    assert list(recurrent) == ["rnn_1", "rnn_2"]
    assert all(type(module) is LSTM for module in recurrent.values())
    assert recurrent.reports["rnn_1"].source_kind == "CuDNNLSTM"
    assert (recurrent["rnn_1"].input_size, recurrent["rnn_1"].hidden_size) == (100, 128)

    # textgenrnn_generate starts every text with the meta token.
    tokens = ["<s>"] + list("Thank yo")
    probabilities = textgenrnn_next_char_probabilities(weights_path, recurrent, tokens, vocab)
    assert index_to_char[int(probabilities.argmax())] == "u"
    assert probabilities.max() > 0.5

    # The same weights in torch.nn.LSTM give the same prediction (same layout).
    reference = {}
    for name, module in recurrent.items():
        twin = torch.nn.LSTM(module.input_size, module.hidden_size, batch_first=True)
        twin.load_state_dict(module.state_dict())
        reference[name] = twin
    expected = textgenrnn_next_char_probabilities(weights_path, reference, tokens, vocab)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-4)


# -- Keras 3 models ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("these tests run Keras with KERAS_BACKEND=torch")
    return keras


def _run_stack(modules, x):
    hidden = torch.from_numpy(x)
    with torch.no_grad():
        for module in modules.values():
            hidden = module(hidden)[0]
    return hidden.numpy()


def _keras_model(keras):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((7, 5))
    x = keras.layers.LSTM(6, return_sequences=True, name="lstm_a")(inputs)
    x = keras.layers.GRU(4, return_sequences=True, name="gru_b")(x)          # reset_after=True
    x = keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True), name="bi_lstm")(x)
    x = keras.layers.Bidirectional(keras.layers.GRU(5, return_sequences=True, use_bias=False), name="bi_gru")(x)
    x = keras.layers.RNN(keras.layers.GRUCell(3), return_sequences=True, name="rnn_gru_cell")(x)
    x = keras.layers.LSTM(4, return_sequences=True, name="lstm_top")(x)
    model = keras.Model(inputs, x)
    # Random biases: the defaults (zeros, forget bias 1) would hide bias-mapping mistakes.
    rng = np.random.default_rng(2)
    model.set_weights([w + 0.3 * rng.standard_normal(w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_model_matches_keras(keras, tmp_path, suffix):
    model = _keras_model(keras)
    path = str(tmp_path / f"model{suffix}")
    model.save(path)
    x = np.random.default_rng(3).standard_normal((3, 7, 5)).astype(np.float32)
    expected = np.asarray(model.predict(x, verbose=0))

    layers = load_keras(path)
    assert list(layers) == ["lstm_a", "gru_b", "bi_lstm", "bi_gru", "rnn_gru_cell", "lstm_top"]
    assert [type(m) for m in layers.values()] == [LSTM, GRU, LSTM, GRU, GRU, LSTM]
    assert layers.reports["rnn_gru_cell"].source_kind == "RNN(GRUCell)"
    assert layers["bi_gru"].bidirectional and not layers["bi_gru"].bias
    np.testing.assert_allclose(_run_stack(layers, x), expected, atol=2e-5, rtol=1e-4)
    assert "z,r,h -> r,z,n" in layers.reports["gru_b"].mappings[0]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_nested_sequential(keras, tmp_path, suffix):
    inner = keras.Sequential([keras.Input((5, 4)), keras.layers.LSTM(3, return_sequences=True, name="inner_lstm"),
                              keras.layers.Bidirectional(keras.layers.GRU(2, return_sequences=True), name="inner_bi")],
                             name="inner")
    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, inner(keras.layers.LSTM(4, return_sequences=True, name="outer_lstm")(inputs)))
    path = str(tmp_path / f"nested{suffix}")
    model.save(path)
    layers = load_keras(path)
    assert list(layers) == ["outer_lstm", "inner_lstm", "inner_bi"]
    x = np.random.default_rng(6).standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(_run_stack(layers, x), np.asarray(model.predict(x, verbose=0)), atol=2e-5, rtol=1e-4)


def test_keras3_weights_only_file(keras, tmp_path):
    model = _keras_model(keras)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    x = np.random.default_rng(4).standard_normal((2, 7, 5)).astype(np.float32)
    layers = load_keras(path)
    # No config in the file: HDF5 groups come back by name, so order by the model.
    ordered = {name: layers[name] for name in ["lstm_a", "gru_b", "bi_lstm", "bi_gru", "rnn_gru_cell", "lstm_top"]}
    np.testing.assert_allclose(_run_stack(ordered, x), np.asarray(model.predict(x, verbose=0)), atol=2e-5, rtol=1e-4)


def _write_keras2_weights(path, layers):
    """A file as Keras 2's save_weights wrote it: root attr layer_names; per layer a group with
    attr weight_names and datasets at those paths. layers: {name: {weight_name: array}}."""
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = np.array([name.encode() for name in layers])
        handle.attrs["backend"] = b"tensorflow"
        handle.attrs["keras_version"] = b"2.1.5"
        for name, weights in layers.items():
            group = handle.create_group(name)
            group.attrs["weight_names"] = np.array([w.encode() for w in weights])
            for weight_name, array in weights.items():
                group.create_dataset(weight_name, data=array)


def _cudnn_to_plain_kernel(kernel, gates):
    """Keras 2's own CuDNN -> plain conversion of input kernels (saving.py, transpose_input
    with from_cudnn=True): per gate block, kernel.T reshaped to kernel.shape in Fortran order."""
    return np.hstack([block.T.reshape(block.shape, order="F") for block in np.hsplit(kernel, gates)])


def _cudnn_to_plain_recurrent(kernel, gates):
    """Keras 2's conversion of recurrent kernels: each gate block transposed."""
    return np.hstack([block.T for block in np.hsplit(kernel, gates)])


def test_keras2_cudnn_layouts_match_keras_layers(keras, tmp_path):
    """CuDNNLSTM / CuDNNGRU files give what Keras LSTM / GRU(reset_after=True) give with the
    weights converted the way Keras 2 converted them when loading CuDNN weights into them."""
    rng = np.random.default_rng(5)
    inputs, hidden = 4, 3
    k_lstm, r_lstm, b_lstm = (rng.standard_normal(s).astype(np.float32) for s in [(inputs, 4 * hidden),
                                                                                  (hidden, 4 * hidden), (8 * hidden,)])
    k_gru, r_gru, b_gru = (rng.standard_normal(s).astype(np.float32) for s in [(hidden, 3 * hidden),
                                                                               (hidden, 3 * hidden), (6 * hidden,)])
    path = str(tmp_path / "cudnn.h5")
    _write_keras2_weights(path, {
        "cu_dnnlstm_1": {"cu_dnnlstm_1/kernel:0": k_lstm, "cu_dnnlstm_1/recurrent_kernel:0": r_lstm,
                         "cu_dnnlstm_1/bias:0": b_lstm},
        "dense_1": {"dense_1/kernel:0": rng.standard_normal((3, 2)).astype(np.float32)},
        "cu_dnngru_1": {"cu_dnngru_1/kernel:0": k_gru, "cu_dnngru_1/recurrent_kernel:0": r_gru,
                        "cu_dnngru_1/bias:0": b_gru},
    })
    layers = load_keras(path)
    assert list(layers) == ["cu_dnnlstm_1", "cu_dnngru_1"]
    assert layers.reports["cu_dnngru_1"].source_kind == "CuDNNGRU"

    lstm = keras.layers.LSTM(hidden, return_sequences=True)
    gru = keras.layers.GRU(hidden, return_sequences=True, reset_after=True)
    model = keras.Sequential([keras.Input((6, inputs)), lstm, gru])
    lstm.set_weights([_cudnn_to_plain_kernel(k_lstm, 4), _cudnn_to_plain_recurrent(r_lstm, 4),
                      b_lstm[:4 * hidden] + b_lstm[4 * hidden:]])
    gru.set_weights([_cudnn_to_plain_kernel(k_gru, 3), _cudnn_to_plain_recurrent(r_gru, 3),
                     b_gru.reshape(2, 3 * hidden)])
    x = rng.standard_normal((2, 6, inputs)).astype(np.float32)
    np.testing.assert_allclose(_run_stack(layers, x), np.asarray(model.predict(x, verbose=0)), atol=2e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("layer, why", [
    ("GRU(4, reset_after=False)", "reset_after=False"),
    ("LSTM(4, recurrent_activation='hard_sigmoid')", "hard_sigmoid"),
    ("LSTM(4, activation='relu')", "activation='relu'"),
    ("Bidirectional(keras.layers.LSTM(4), merge_mode='sum')", "merge_mode='sum'"),
    ("LSTM(4, go_backwards=True)", "go_backwards"),
])
def test_keras_refuses_what_torch_cannot_express(keras, tmp_path, layer, why):
    model = keras.Sequential([keras.Input((3, 2)), eval(f"keras.layers.{layer}")])
    path = str(tmp_path / "refused.keras")
    model.save(path)
    with pytest.raises(UnsupportedLayerError, match=why.replace("(", r"\(").replace(")", r"\)")):
        load_keras(path)


def test_keras_weights_only_gru_reset_before_refused(tmp_path):
    path = str(tmp_path / "gru_v1.h5")
    _write_keras2_weights(path, {"gru_1": {"gru_1/kernel:0": np.zeros((2, 9), np.float32),
                                           "gru_1/recurrent_kernel:0": np.zeros((3, 9), np.float32),
                                           "gru_1/bias:0": np.zeros(9, np.float32)}})
    with pytest.raises(UnsupportedLayerError, match="reset_after=False"):
        load_keras(path)


def test_keras_extra_cell_weights_refused(tmp_path):
    path = str(tmp_path / "peephole.h5")
    _write_keras2_weights(path, {"lstm_1": {"lstm_1/kernel:0": np.zeros((2, 12), np.float32),
                                            "lstm_1/recurrent_kernel:0": np.zeros((3, 12), np.float32),
                                            "lstm_1/bias:0": np.zeros(12, np.float32),
                                            "lstm_1/input_gate_peephole_weights:0": np.zeros(3, np.float32)}})
    with pytest.raises(UnsupportedLayerError, match="peephole"):
        load_keras(path)


def test_keras_malformed_files(tmp_path):
    missing = str(tmp_path / "missing.h5")
    with h5py.File(missing, "w") as handle:
        handle.attrs["layer_names"] = np.array([b"lstm_1"])
        group = handle.create_group("lstm_1")
        group.attrs["weight_names"] = np.array([b"lstm_1/kernel:0", b"lstm_1/recurrent_kernel:0"])
        group.create_dataset("lstm_1/kernel:0", data=np.zeros((2, 8), np.float32))
    with pytest.raises(PretrainedFormatError, match="recurrent_kernel.*missing"):
        load_keras(missing)

    wrong = str(tmp_path / "wrong.h5")
    _write_keras2_weights(wrong, {"lstm_1": {"lstm_1/kernel:0": np.zeros((2, 8), np.float32),
                                             "lstm_1/recurrent_kernel:0": np.zeros((2, 8), np.float32),
                                             "lstm_1/bias:0": np.zeros(5, np.float32)}})
    with pytest.raises(PretrainedFormatError, match="bias of shape"):
        load_keras(wrong)

    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("hello")
    with pytest.raises(PretrainedFormatError, match="not an HDF5"):
        load_keras(str(not_hdf5))
