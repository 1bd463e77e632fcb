"""A small text encoder (embedding + stacked rnntl_fast LSTM/GRU layers) built from loaded
pretrained parts, and saving/loading it together with its configuration.

The saved file is a plain dict readable with torch.load(weights_only=True):
    {"format": "rnntl_fast.encoder", "version": 1, "config": {...}, "state_dict": {...}}
`config` is JSON-compatible (see RecurrentEncoder.config), so a later tool can rebuild
the encoder without importing anything but rnntl_fast.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._common import PretrainedFormatError, check_state_dict, naming_file
from ._torch import TORCH_LOAD_ERRORS, _read_source, flatten_tensors, load_torch, unwrap_checkpoint

ENCODER_FORMAT = "rnntl_fast.encoder"
ENCODER_VERSION = 1
_MODULE_FIELDS = ("input_size", "hidden_size", "num_layers", "bias", "dropout", "bidirectional")
_EXTRA_FIELDS = ("grad_clip", "grad_clip_mode", "backend")
_LSTM_FIELDS = ("proj_size", "cell_clip", "proj_clip")


def _layer_config(module: nn.Module) -> dict:
    """JSON-compatible constructor arguments of an rnntl_fast (or torch.nn) LSTM/GRU."""
    from .. import nn as fast_nn

    if isinstance(module, (fast_nn.LSTM, nn.LSTM)):
        kind = "LSTM"
    elif isinstance(module, (fast_nn.GRU, nn.GRU)):
        kind = "GRU"
    else:
        raise TypeError(f"an encoder layer must be an LSTM or GRU module, got {type(module).__name__}")
    config = {"kind": kind}
    fields = _MODULE_FIELDS + _EXTRA_FIELDS + (_LSTM_FIELDS if kind == "LSTM" else ())
    for name in fields:
        if hasattr(module, name):
            config[name] = getattr(module, name)
    return config


class RecurrentEncoder(nn.Module):
    """Embedding followed by recurrent layers applied in sequence.

    Args:
        vocab_size, embedding_dim, padding_idx: the nn.Embedding.
        layers: per recurrent module, {"kind": "LSTM" | "GRU", **constructor arguments of
            rnntl_fast.LSTM / GRU} (input_size may be omitted: it follows from the
            previous layer).
        batch_first: layout of tokens and outputs (every layer is built with it).
        dropout: dropout on the embeddings and between recurrent modules (training only).

    forward(tokens [B, T] ([T, B] if not batch_first) long, lengths [B] optional) ->
        (output [B, T, F] (or [T, B, F]) of the last layer; padded steps are zero when
        lengths are given, list of each layer's final state (h_n or (h_n, c_n))).
    """

    def __init__(self, vocab_size: int, embedding_dim: int, layers: Sequence[Mapping], *,
                 padding_idx: Optional[int] = None, batch_first: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        from .. import nn as fast_nn

        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        self.layers = nn.ModuleList()
        features = embedding_dim
        for index, layer in enumerate(layers):
            arguments = dict(layer)
            kind = arguments.pop("kind", None)
            arguments.setdefault("input_size", features)
            if arguments["input_size"] != features:
                raise ValueError(f"layer {index} expects {arguments['input_size']} input features, the previous "
                                 f"stage gives {features}")
            arguments["batch_first"] = batch_first
            if kind not in ("LSTM", "GRU"):
                raise ValueError(f"layer {index}: kind must be 'LSTM' or 'GRU', got {kind!r}")
            module = {"LSTM": fast_nn.LSTM, "GRU": fast_nn.GRU}[kind](**arguments)
            self.layers.append(module)
            width = getattr(module, "proj_size", 0) or module.hidden_size
            features = width * (2 if module.bidirectional else 1)
        self.output_size = features

    @property
    def config(self) -> dict:
        layers = []
        for module in self.layers:
            layers.append(_layer_config(module))
        return {"vocab_size": self.embedding.num_embeddings, "embedding_dim": self.embedding.embedding_dim,
                "padding_idx": self.embedding.padding_idx, "batch_first": self.batch_first,
                "dropout": self.dropout, "layers": layers}

    @classmethod
    def from_config(cls, config: Mapping) -> "RecurrentEncoder":
        return cls(config["vocab_size"], config["embedding_dim"], config["layers"],
                   padding_idx=config.get("padding_idx"), batch_first=config.get("batch_first", True),
                   dropout=config.get("dropout", 0.0))

    def forward(self, tokens: Tensor, lengths: Optional[Tensor] = None):
        from .. import nn as fast_nn

        hidden = self.embedding(tokens)
        states = []
        for module in self.layers:
            hidden = nn.functional.dropout(hidden, self.dropout, self.training)
            hidden, state = fast_nn.run_with_lengths(module, hidden, lengths)
            states.append(state)
        return hidden, states


def build_encoder(embedding: Union[nn.Embedding, Tensor], recurrent: Union[Mapping[str, nn.Module],
                  Sequence[nn.Module]], *, batch_first: bool = True, dropout: float = 0.0,
                  padding_idx: Optional[int] = None) -> RecurrentEncoder:
    """A RecurrentEncoder holding copies of `embedding` (nn.Embedding or a [vocab, dim]
    matrix) and of the recurrent modules (a loader's result or a list, applied in order).
    The modules keep their extra settings (cell_clip, grad_clip, backend, ...)."""
    modules = list(recurrent.values()) if isinstance(recurrent, Mapping) else list(recurrent)
    if isinstance(embedding, nn.Embedding):
        weight = embedding.weight.detach()
        padding_idx = embedding.padding_idx if padding_idx is None else padding_idx
    else:
        weight = torch.as_tensor(embedding).detach()
    if weight.dim() != 2:
        raise ValueError(f"embedding must be [vocab, dim], got shape {list(weight.shape)}")
    layers = [_layer_config(module) for module in modules]
    encoder = RecurrentEncoder(weight.shape[0], weight.shape[1], layers, padding_idx=padding_idx,
                               batch_first=batch_first, dropout=dropout)
    reference = next(iter(modules[0].parameters())) if modules else weight
    encoder.to(dtype=reference.dtype)
    with torch.no_grad():
        encoder.embedding.weight.copy_(weight)
        for target, source in zip(encoder.layers, modules):
            target.load_state_dict(source.state_dict(), strict=True)
    return encoder


_EMBEDDING_KEY = re.compile(r"(^|\.)(embedding|embeddings|embed|word_embeddings)\.weight$")


def encoder_from_checkpoint(source, *, embedding_key: Optional[str] = None, prefix: Optional[str] = None,
                            weights_only: bool = True, batch_first: bool = True,
                            dropout: float = 0.0) -> RecurrentEncoder:
    """Builds a RecurrentEncoder from a PyTorch checkpoint holding an embedding matrix and
    LSTM/GRU weights (found as load_torch finds them, applied in checkpoint order).

    embedding_key: the embedding's key (after "module."/"_orig_mod." removal); by default
    the single 2-D tensor whose key ends with embedding(s)/embed/word_embeddings + ".weight".
    """
    with naming_file(source):
        tree = unwrap_checkpoint(_read_source(source, weights_only))
        tensors = {".".join(p for p in key.split(".") if p not in ("module", "_orig_mod")): value
                   for key, value in flatten_tensors(tree).items()}
        if embedding_key is None:
            candidates = [key for key, value in tensors.items() if value.dim() == 2 and _EMBEDDING_KEY.search(key)
                          and (prefix is None or key.startswith(prefix))]
            if len(candidates) != 1:
                raise PretrainedFormatError(f"cannot tell which tensor is the embedding "
                                            f"({candidates or 'none found'}); pass embedding_key=")
            embedding_key = candidates[0]
        if embedding_key not in tensors:
            raise PretrainedFormatError(f"no tensor {embedding_key!r} in the checkpoint")
        recurrent = load_torch(tree, prefix=prefix, batch_first=batch_first)
        try:
            return build_encoder(tensors[embedding_key], recurrent, batch_first=batch_first, dropout=dropout)
        except ValueError as error:   # an embedding that is not [vocab, dim], or does not fit the first layer
            raise PretrainedFormatError(str(error)) from error


def save_encoder(encoder: RecurrentEncoder, path) -> None:
    """Writes the encoder's config and weights to `path` (torch.save of a plain dict)."""
    torch.save({"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "config": encoder.config,
                "state_dict": encoder.state_dict()}, os.fspath(path))


def load_encoder(path, *, map_location="cpu", **overrides) -> RecurrentEncoder:
    """Rebuilds an encoder written by save_encoder. `overrides` replace top-level config
    entries (e.g. dropout=0.1)."""
    with naming_file(path, "torch.save file", TORCH_LOAD_ERRORS):
        saved = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    with naming_file(path):
        if not isinstance(saved, dict) or saved.get("format") != ENCODER_FORMAT:
            raise PretrainedFormatError("not a file written by save_encoder")
        if saved.get("version", 0) > ENCODER_VERSION:
            raise PretrainedFormatError(f"encoder file version {saved['version']} is newer than this rnntl_fast "
                                        f"understands ({ENCODER_VERSION})")
        config, state = saved.get("config"), saved.get("state_dict")
        if not isinstance(config, dict) or not isinstance(state, dict) or not state:
            raise PretrainedFormatError("the encoder file lacks its config or its weights (entries 'config' and "
                                        "'state_dict')")
        missing = [key for key in ("vocab_size", "embedding_dim", "layers") if key not in config]
        if missing:
            raise PretrainedFormatError(f"the encoder config lacks {missing}")
        try:
            encoder = RecurrentEncoder.from_config({**config, **overrides})
        except (TypeError, ValueError) as error:
            raise PretrainedFormatError(f"the encoder config does not build an encoder: {error}") from error
        check_state_dict(encoder.state_dict(), state, "the weights do not fit the encoder config")
        encoder.to(dtype=next(iter(state.values())).dtype)
        encoder.load_state_dict(state, strict=True)
    return encoder
