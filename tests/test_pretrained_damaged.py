"""Damaged, truncated and crafted files given to every pretrained loader: each is refused
with a PretrainedFormatError (a ValueError) whose message names the file and says what
is wrong, never a KeyError, ZeroDivisionError, unpacking error or a parser's own
exception. Word-vector files: tests/test_pretrained_word_vectors.py."""
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from rnntl_fast import pretrained
from rnntl_fast.pretrained import PretrainedFormatError
from test_pretrained_tf1 import write_tf_checkpoint

h5py = pytest.importorskip("h5py")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[:int(len(data) * keep)])
    return path


# -- torch -----------------------------------------------------------------------------------
def _lstm_state():
    return torch.nn.LSTM(4, 3, num_layers=2).state_dict()


def _torch_file(folder, state):
    torch.save(state, folder / "model.pt")
    return folder / "model.pt"


def torch_truncated(folder):
    return pretrained.load_torch, _truncate(_torch_file(folder, _lstm_state())), "not a readable torch.save file"


def torch_not_a_checkpoint(folder):
    (folder / "model.pt").write_text("hello")
    return pretrained.load_torch, folder / "model.pt", "not a readable torch.save file"


def torch_missing_weight_hh(folder):
    state = {k: v for k, v in _lstm_state().items() if k != "weight_hh_l0"}
    return pretrained.load_torch, _torch_file(folder, state), "<root>: weight_ih_l0 without weight_hh_l0"


def torch_missing_second_layer_tensors(folder):
    state = {k: v for k, v in _lstm_state().items() if not k.startswith(("weight_hh_l1", "bias"))}
    return (pretrained.load_torch, _torch_file(folder, state),
            r"<root>: the tensors do not form torch.nn.LSTM\(input_size=4, hidden_size=3, num_layers=2, bias=False.*"
            r"missing weight_hh_l1")


def torch_one_dimensional_weight(folder):
    state = {**_lstm_state(), "weight_ih_l0": torch.zeros(12)}
    return pretrained.load_torch, _torch_file(folder, state), r"weight_ih_l0 has shape \[12\]; .* 2-D"


def torch_wrong_bias_shape(folder):
    state = {**_lstm_state(), "bias_hh_l1": torch.zeros(5)}
    return pretrained.load_torch, _torch_file(folder, state), r"bias_hh_l1 has shape \[5\], expected \[12\]"


def torch_zero_hidden_size(folder):
    state = {"weight_ih_l0": torch.zeros(0, 4), "weight_hh_l0": torch.zeros(0, 0)}
    return pretrained.load_torch, _torch_file(folder, state), "empty weights"


# -- encoder files ---------------------------------------------------------------------------
def _encoder_file(folder, change=None):
    layers = pretrained.load_torch(torch.nn.LSTM(4, 3).state_dict())
    pretrained.save_encoder(pretrained.build_encoder(torch.zeros(5, 4), layers), folder / "encoder.pt")
    if change is not None:
        saved = torch.load(folder / "encoder.pt")
        change(saved)
        torch.save(saved, folder / "encoder.pt")
    return folder / "encoder.pt"


def encoder_truncated(folder):
    return pretrained.load_encoder, _truncate(_encoder_file(folder)), "not a readable torch.save file"


def encoder_without_config(folder):
    return (pretrained.load_encoder, _encoder_file(folder, lambda saved: saved.pop("config")),
            "lacks its config or its weights")


def encoder_config_missing_entry(folder):
    return (pretrained.load_encoder, _encoder_file(folder, lambda saved: saved["config"].pop("vocab_size")),
            r"the encoder config lacks \['vocab_size'\]")


def encoder_unknown_layer_kind(folder):
    def change(saved):
        saved["config"]["layers"][0]["kind"] = "RNN"
    return pretrained.load_encoder, _encoder_file(folder, change), "kind must be 'LSTM' or 'GRU', got 'RNN'"


def encoder_ill_shaped_embedding(folder):
    def change(saved):
        saved["state_dict"]["embedding.weight"] = torch.zeros(3)
    return (pretrained.load_encoder, _encoder_file(folder, change),
            r"embedding.weight has shape \[3\], expected \[5, 4\]")


def encoder_vocab_of_other_length(folder):
    def change(saved):
        saved["vocab"] = ["a", "b"]
    return pretrained.load_encoder, _encoder_file(folder, change), r"its 'vocab' is not a list of 5 words"


def encoder_of_an_earlier_pretrain(folder):
    path = folder / "encoder.pt"
    torch.save({"encoder_config": {"vocab_size": 5}, "encoder": {"rnn.weight_ih_l0": torch.zeros(12, 4)},
                "vocab": {"itos": ["<pad>"]}, "info": {}}, path)
    return pretrained.load_encoder, path, r"an encoder file of an earlier rnntl_fast \(weights named rnn\.\*\)"


def encoder_from_truncated_checkpoint(folder):
    state = {"embedding.weight": torch.zeros(5, 4), **{f"rnn.{k}": v for k, v in _lstm_state().items()}}
    return pretrained.encoder_from_checkpoint, _truncate(_torch_file(folder, state)), "not a readable torch.save"


# -- Keras -----------------------------------------------------------------------------------
def _keras_file(folder, kernel=(4, 12), recurrent=(3, 12), names=("kernel", "recurrent_kernel", "bias")):
    path = folder / "weights.h5"
    shapes = {"kernel": kernel, "recurrent_kernel": recurrent, "bias": (12,)}
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"lstm"]
        group = handle.create_group("lstm")
        group.attrs["weight_names"] = [f"lstm/{name}:0".encode() for name in names]
        for name in names:
            group[f"lstm/{name}:0"] = np.zeros(shapes[name], np.float32)
    return path


def keras_truncated(folder):
    return pretrained.load_keras, _truncate(_keras_file(folder)), "not an HDF5 file .*truncated file"


def keras_missing_kernel(folder):
    return (pretrained.load_keras, _keras_file(folder, names=("recurrent_kernel", "bias")),
            "lstm: missing kernel")


def keras_one_dimensional_recurrent_kernel(folder):
    return (pretrained.load_keras, _keras_file(folder, recurrent=(12,)), "lstm: kernels must be 2-D")


def keras_zero_size_kernels(folder):
    return (pretrained.load_keras, _keras_file(folder, kernel=(4, 0), recurrent=(0, 0)),
            r"lstm: empty kernel \[4, 0\] or recurrent_kernel \[0, 0\]")


def keras_model_config_not_json(folder):
    path = folder / "model.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = "{not json"
        handle.create_group("model_weights")
    return pretrained.load_keras, path, "the model_config attribute is not valid JSON"


def keras_archive_with_damaged_weights(folder):
    path = folder / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", b"not hdf5")
    return pretrained.load_keras, path, r"not a readable Keras file .*truncated or damaged"


# -- TF1 / ELMo ------------------------------------------------------------------------------
def _tf_variables(kernel=(7, 12), bias=(12,)):
    return {"rnn/lstm_cell/kernel": np.ones(kernel, np.float32), "rnn/lstm_cell/bias": np.ones(bias, np.float32)}


def tf1_truncated_npz(folder):
    np.savez(folder / "cell.npz", **_tf_variables())
    return pretrained.load_tf1, _truncate(folder / "cell.npz"), "not a readable .npz archive"


def tf1_truncated_index(folder):
    write_tf_checkpoint(str(folder / "model.ckpt"), _tf_variables())
    _truncate(folder / "model.ckpt.index", 0.7)
    return pretrained.load_tf1, folder / "model.ckpt.index", "checkpoint index|bad table magic"


def tf1_truncated_data_shard(folder):
    write_tf_checkpoint(str(folder / "model.ckpt"), _tf_variables())
    _truncate(folder / "model.ckpt.data-00000-of-00001", 0.5)
    return pretrained.load_tf1, folder / "model.ckpt", "ends before the tensor rnn/lstm_cell/kernel .truncated"


def tf1_empty_kernel(folder):
    np.savez(folder / "cell.npz", **_tf_variables(kernel=(7, 0)))
    return pretrained.load_tf1, folder / "cell.npz", r"rnn/lstm_cell: kernel of shape \[7, 0\] is not"


def tf1_ill_shaped_bias(folder):
    write_tf_checkpoint(str(folder / "model.ckpt"), _tf_variables(bias=(3, 4)))
    return pretrained.load_tf1, folder / "model.ckpt", r"rnn/lstm_cell: bias of shape \[3, 4\], expected \[12\]"


def _elmo_file(folder, leaves=("W_0", "B")):
    path = folder / "elmo.hdf5"
    with h5py.File(path, "w") as handle:
        for direction in (0, 1):
            for leaf, shape in (("W_0", (6, 12)), ("B", (12,))):
                if leaf in leaves:
                    handle[f"RNN_{direction}/RNN/MultiRNNCell/Cell0/LSTMCell/{leaf}"] = np.zeros(shape, np.float32)
    return path


ELMO_OPTIONS = {"lstm": {"n_layers": 1, "dim": 3}}


def elmo_truncated(folder):
    path = _truncate(_elmo_file(folder))
    return lambda p: pretrained.load_elmo(p, ELMO_OPTIONS), path, "not a readable HDF5 file"


def elmo_missing_bias(folder):
    return (lambda p: pretrained.load_elmo(p, ELMO_OPTIONS), _elmo_file(folder, leaves=("W_0",)),
            r"missing dataset\(s\) \['RNN_0/RNN/MultiRNNCell/Cell0/LSTMCell/B'\]")


def elmo_options_not_json(folder):
    options = folder / "options.json"
    options.write_text("{not json")
    return lambda p: pretrained.load_elmo(_elmo_file(folder), p), options, "not a readable JSON file"


def elmo_options_without_layer_count(folder):
    options = folder / "options.json"
    options.write_text(json.dumps({"lstm": {"n_layers": "two"}}))
    return (lambda p: pretrained.load_elmo(_elmo_file(folder), p), options,
            "lstm.n_layers must be a positive integer, got 'two'")


# -- ONNX ------------------------------------------------------------------------------------
def _onnx_file(folder, weight=(1, 12, 4), recurrent=(1, 12, 3), hidden=3, inputs=("X", "W", "R")):
    initializers = [numpy_helper.from_array(np.zeros(shape, np.float32), name)
                    for name, shape in (("W", weight), ("R", recurrent)) if name in inputs]
    node = helper.make_node("LSTM", list(inputs), ["Y"], hidden_size=hidden, name="lstm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializers)
    onnx.save(helper.make_model(graph), folder / "model.onnx")
    return folder / "model.onnx"


def onnx_truncated(folder):
    return pretrained.load_onnx, _truncate(_onnx_file(folder)), "not a readable ONNX model"


def onnx_missing_recurrence_weights(folder):
    return pretrained.load_onnx, _onnx_file(folder, inputs=("X", "W")), "lstm: input R is missing"


def onnx_zero_hidden_size(folder):
    return (pretrained.load_onnx, _onnx_file(folder, weight=(1, 0, 4), recurrent=(1, 0, 0), hidden=0),
            "lstm: the weights give LSTM hidden_size=0")


def onnx_tensor_data_shorter_than_shape(folder):
    path = _onnx_file(folder)
    model = onnx.load(path)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:10]
    onnx.save(model, path)
    return pretrained.load_onnx, path, r"tensor 'W': its data does not fit its type and shape \[1, 12, 4\]"


CASES = [torch_truncated, torch_not_a_checkpoint, torch_missing_weight_hh, torch_missing_second_layer_tensors,
         torch_one_dimensional_weight, torch_wrong_bias_shape, torch_zero_hidden_size,
         encoder_truncated, encoder_without_config, encoder_config_missing_entry, encoder_unknown_layer_kind,
         encoder_ill_shaped_embedding, encoder_vocab_of_other_length, encoder_of_an_earlier_pretrain,
         encoder_from_truncated_checkpoint,
         keras_truncated, keras_missing_kernel, keras_one_dimensional_recurrent_kernel, keras_zero_size_kernels,
         keras_model_config_not_json, keras_archive_with_damaged_weights,
         tf1_truncated_npz, tf1_truncated_index, tf1_truncated_data_shard, tf1_empty_kernel, tf1_ill_shaped_bias,
         elmo_truncated, elmo_missing_bias, elmo_options_not_json, elmo_options_without_layer_count,
         onnx_truncated, onnx_missing_recurrence_weights, onnx_zero_hidden_size, onnx_tensor_data_shorter_than_shape]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__.replace("_", "-") for case in CASES])
def test_damaged_file_is_refused_naming_file_and_reason(tmp_path, case):
    load, path, reason = case(tmp_path)
    with pytest.raises(PretrainedFormatError, match=f"^{os.fspath(path)}[^ ]*: .*({reason})") as error:
        load(path)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


@pytest.mark.parametrize("load", [pretrained.load_torch, pretrained.load_keras, pretrained.load_onnx,
                                  pretrained.load_tf1, pretrained.load_encoder],
                         ids=["torch", "keras", "onnx", "tf1", "encoder"])
def test_missing_file_is_a_file_not_found_error(tmp_path, load):
    with pytest.raises((FileNotFoundError, PretrainedFormatError), match="no_such_file"):
        load(tmp_path / "no_such_file.npz")
