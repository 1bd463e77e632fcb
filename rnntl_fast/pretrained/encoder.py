"""The one recurrent text encoder of rnntl_fast (an embedding, then rnntl_fast LSTM/GRU
modules applied in order) and its file, shared by `rnntl_fast.pretrained` (encoders built
from other frameworks' weights) and `rnntl_fast.transfer` (`rnntl-fast pretrain` writes
one, `rnntl-fast finetune --encoder` reads it).

The file is a plain dict readable with torch.load(weights_only=True):
    {"format": "rnntl_fast.encoder", "version": 1, "config": {...}, "state_dict": {...},
     "vocab": [word of each embedding row] or None}
`config` is JSON-compatible (see RecurrentEncoder.config), so a later tool can rebuild
the encoder without importing anything but rnntl_fast. docs/pretrained.md ("Encoder
files") describes it.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import PretrainedFormatError, check_state_dict, naming_file
from ._torch import TORCH_LOAD_ERRORS, _read_source, flatten_tensors, load_torch, unwrap_checkpoint

ENCODER_FORMAT = "rnntl_fast.encoder"
ENCODER_VERSION = 1
_MODULE_FIELDS = ("input_size", "hidden_size", "num_layers", "bias", "dropout", "bidirectional")
_EXTRA_FIELDS = ("grad_clip", "grad_clip_mode", "backend", "recurrent_dropout", "zoneout", "weight_drop", "layer_norm")
_LSTM_FIELDS = ("proj_size", "cell_clip", "proj_clip")
_LAYER_SUFFIX = re.compile(r"_l(\d+)(?:_reverse)?$")


def recurrent_layer_index(parameter_name: str) -> Optional[int]:
    """'weight_ih_l2_reverse' -> 2 (torch.nn / rnntl_fast recurrent parameter names); None
    for a name without a layer suffix."""
    match = _LAYER_SUFFIX.search(parameter_name.rsplit(".", 1)[-1])
    return int(match.group(1)) if match else None


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
    """Embedding followed by recurrent modules applied in sequence.

    Args:
        vocab_size, embedding_dim, padding_idx: the nn.Embedding [vocab_size, embedding_dim].
        layers: per recurrent module, {"kind": "LSTM" | "GRU", **constructor arguments of
            rnntl_fast.LSTM / GRU} (input_size may be omitted: it follows from the
            previous module). A module may hold several layers (num_layers).
        batch_first: layout of tokens and outputs (every module is built with it).
        dropout: dropout on the embeddings and between recurrent modules (training only);
            dropout between the layers of one module is that module's own `dropout`.

    Parameters are named `embedding.weight` and `layers.{m}.{torch.nn name}`: module m's
    `weight_ih_l{k}`, `bias_hh_l{k}_reverse`, ... `RecurrentEncoder.stacked` builds the
    encoder of `rnntl-fast pretrain` / `finetune` (one module, so `layers.0.*`).
    `vocab`: the word of each embedding row when known (save_encoder writes it,
    load_encoder restores it), else None.

    forward(tokens [B, T] ([T, B] if not batch_first) long, lengths [B] optional, state
        optional) -> (output [B, T, F] (or [T, B, F]) of the last module, zero past each
        row's length when lengths are given; final states, one per module: h_n
        [L*D, B, H_out] or (h_n, c_n [L*D, B, H])). `state` is such a list (entries may be
        None) to start from instead of zeros. Padded input and lengths go to the modules
        as they are (their `lengths=` keyword).
    """

    def __init__(self, vocab_size: int, embedding_dim: int, layers: Sequence[Mapping], *,
                 padding_idx: Optional[int] = None, batch_first: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        from .. import nn as fast_nn

        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.vocab: Optional[List[str]] = None
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

    @classmethod
    def stacked(cls, vocab_size: int, embedding_dim: int = 128, hidden_size: int = 256, num_layers: int = 1,
                bidirectional: bool = False, cell: str = "lstm", dropout: float = 0.0, recurrent_dropout: float = 0.0,
                weight_drop: float = 0.0, zoneout: float = 0.0, layer_norm: bool = False) -> "RecurrentEncoder":
        """Embedding [vocab_size, embedding_dim] (row 0 is padding) -> dropout -> one
        batch_first rnntl_fast LSTM/GRU of `num_layers` layers (`dropout` also between
        them; recurrent_dropout, weight_drop, zoneout and layer_norm inside them,
        docs/semantics.md): the encoder `rnntl-fast pretrain` and `finetune` build."""
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        layer = {"kind": cell.upper(), "hidden_size": hidden_size, "num_layers": num_layers,
                 "bidirectional": bidirectional, "dropout": dropout if num_layers > 1 else 0.0,
                 "recurrent_dropout": recurrent_dropout, "weight_drop": weight_drop, "zoneout": zoneout,
                 "layer_norm": layer_norm}
        return cls(vocab_size, embedding_dim, [layer], padding_idx=0, batch_first=True, dropout=dropout)

    @property
    def config(self) -> dict:
        return {"vocab_size": self.embedding.num_embeddings, "embedding_dim": self.embedding.embedding_dim,
                "padding_idx": self.embedding.padding_idx, "batch_first": self.batch_first,
                "dropout": self.dropout, "layers": [_layer_config(module) for module in self.layers]}

    @classmethod
    def from_config(cls, config: Mapping) -> "RecurrentEncoder":
        return cls(config["vocab_size"], config["embedding_dim"], config["layers"],
                   padding_idx=config.get("padding_idx"), batch_first=config.get("batch_first", True),
                   dropout=config.get("dropout", 0.0))

    @property
    def bidirectional(self) -> bool:
        """True when any recurrent module reads right to left too."""
        return any(module.bidirectional for module in self.layers)

    def forward(self, tokens: Tensor, lengths: Optional[Tensor] = None, state: Optional[Sequence] = None):
        from .. import nn as fast_nn

        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state: expected one entry per recurrent module ({len(self.layers)}), got {len(state)}")
        hidden = self.embedding(tokens)
        finals = []
        for index, module in enumerate(self.layers):
            hidden = F.dropout(hidden, self.dropout, self.training)
            hidden, final = fast_nn.run_with_lengths(module, hidden, lengths, None if state is None else state[index])
            finals.append(final)
        return hidden, finals

    def final_features(self, states: Sequence) -> Tensor:
        """states: forward's final states -> [B, F]: the top layer's final hidden state,
        directions concatenated (forward at each row's last real token, reverse at t=0)."""
        top = self.layers[-1]
        h_n = states[-1][0] if isinstance(states[-1], tuple) else states[-1]  # [L*D, B, H_out]
        directions = 2 if top.bidirectional else 1
        return h_n[-directions:].transpose(0, 1).reshape(h_n.shape[1], -1)

    def recurrent_layers(self) -> List[Dict[str, nn.Parameter]]:
        """The recurrent parameters layer by layer, bottom to top ({qualified name:
        parameter}, both directions): the layers of layers[0] (`_l0`, `_l1`, ...), then
        those of layers[1], ... Layer indices of freezing.recurrent_parameters count here."""
        groups: List[Dict[str, nn.Parameter]] = []
        for index, module in enumerate(self.layers):
            own: List[Dict[str, nn.Parameter]] = [{} for _ in range(module.num_layers)]
            for name, parameter in module.named_parameters():
                own[recurrent_layer_index(name)][f"layers.{index}.{name}"] = parameter
            groups.extend(own)
        return groups

    def layer_groups(self) -> List[List[nn.Parameter]]:
        """Parameters bottom to top: [embedding], [recurrent layer 0], [layer 1], ..."""
        return [list(self.embedding.parameters())] + [list(layer.values()) for layer in self.recurrent_layers()]


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


def save_encoder(encoder: RecurrentEncoder, path, *, vocab: Optional[Sequence[str]] = None) -> None:
    """Writes the encoder file (docs/pretrained.md): config, weights and the word of each
    embedding row (`vocab`, else encoder.vocab; None when unknown). It goes through a
    temporary file in the same folder, so an interrupted write leaves no partial file."""
    words = encoder.vocab if vocab is None else [str(word) for word in vocab]
    rows = encoder.embedding.num_embeddings
    if words is not None and len(words) != rows:
        raise ValueError(f"vocab has {len(words)} words; the embedding has {rows} rows")
    path = os.fspath(path)
    temporary = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    torch.save({"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "config": encoder.config,
                "state_dict": encoder.state_dict(), "vocab": words}, temporary)
    os.replace(temporary, path)


def load_encoder(path, *, map_location="cpu", **overrides) -> RecurrentEncoder:
    """Rebuilds an encoder written by save_encoder or `rnntl-fast pretrain`, its `vocab`
    included. `overrides` replace top-level config entries (e.g. dropout=0.1). Any other
    file, a damaged one, and one of an earlier rnntl_fast's `pretrain` (weights named
    `rnn.*`) raise PretrainedFormatError, one line naming the file."""
    with naming_file(path, "torch.save file", TORCH_LOAD_ERRORS):
        saved = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    with naming_file(path):
        if isinstance(saved, dict) and "encoder_config" in saved and "encoder" in saved:
            raise PretrainedFormatError("an encoder file of an earlier rnntl_fast (weights named rnn.*), which this "
                                        "version does not read; write it again with `rnntl-fast pretrain`")
        if not isinstance(saved, dict) or saved.get("format") != ENCODER_FORMAT:
            raise PretrainedFormatError("not an encoder file (written by save_encoder or `rnntl-fast pretrain`)")
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
        vocab = saved.get("vocab")
        rows = encoder.embedding.num_embeddings
        if vocab is not None and not (isinstance(vocab, list) and len(vocab) == rows
                                      and all(isinstance(word, str) for word in vocab)):
            raise PretrainedFormatError(f"its 'vocab' is not a list of {rows} words (one per embedding row)")
        encoder.to(dtype=next(iter(state.values())).dtype)
        encoder.load_state_dict(state, strict=True)
        encoder.vocab = vocab
    return encoder
