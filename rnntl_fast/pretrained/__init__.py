"""Pretrained weights into rnntl_fast modules, and word vectors into nn.Embedding.

Loaders (each returns {source layer name: rnntl_fast.LSTM/GRU} in source order, with
`.reports` saying what was mapped and how; each refuses what torch.nn.LSTM/GRU cannot
express with UnsupportedLayerError instead of loading something else):

    load_torch   PyTorch state_dicts / checkpoints
    load_keras   Keras HDF5 (whole models, save_weights files), Keras 3 .keras
    load_tf1     TF1 LSTMCell / LSTMBlockCell checkpoints (tensor bundles, npz, dicts)
    load_elmo    bilm-tf / ELMo weight files (hdf5 + options json)
    load_onnx    ONNX LSTM / GRU nodes

    load_word_vectors  word2vec text/binary, GloVe, fastText .vec -> nn.Embedding + coverage

    RecurrentEncoder                           embedding + LSTM/GRU modules: the one text encoder,
                                               rnntl_fast.transfer's too
    build_encoder / encoder_from_checkpoint    a RecurrentEncoder from loaded parts
    save_encoder / load_encoder                the encoder file (config, weights, vocabulary),
                                               also written by `rnntl-fast pretrain`

See docs/pretrained.md for the formats and the exact conversions.
"""
from ._common import LayerReport, LoadedLayers, PretrainedFormatError, UnsupportedLayerError
from ._keras import keras_weights, load_keras
from ._onnx import ReversedDirection, load_onnx
from ._tf1 import load_elmo, load_tf1
from ._tf_bundle import read_tf_checkpoint
from ._torch import load_torch
from .encoder import RecurrentEncoder, build_encoder, encoder_from_checkpoint, load_encoder, save_encoder
from .word_vectors import CoverageReport, iter_word_vectors, load_word_vectors

__all__ = [
    "load_torch", "load_keras", "load_tf1", "load_elmo", "load_onnx", "load_word_vectors",
    "keras_weights", "read_tf_checkpoint", "iter_word_vectors", "ReversedDirection",
    "RecurrentEncoder", "build_encoder", "encoder_from_checkpoint", "save_encoder", "load_encoder",
    "LayerReport", "LoadedLayers", "CoverageReport", "PretrainedFormatError", "UnsupportedLayerError",
]
