"""ELMo-style contextual features (Peters et al. 2018): a frozen bidirectional language
model (a forward LM and a backward LM, each a stack of recurrent layers) whose layer
outputs a task model reads through a learned scalar mix.

    layer k   h_k = [forward layer k output ; backward layer k output]        [B, T, 2D]
              k = 0 is the token layer (the embedding, tiled to width D as ELMo duplicates
              its token representation), k = 1..L the recurrent layers
    mix       ELMo = gamma * sum_k softmax(s)_k * h_k                         [B, T, 2D]

The backward LM reads each row's real tokens in reverse order (padding stays at the end),
and its outputs are put back in the original order, so position t of every layer sees
the words left of t (forward half) and right of t (backward half). The same modules serve
the LMs pretrained by `rnntl-fast finetune --methods elmo` and the biLM LSTMs of a
bilm-tf / AllenNLP weight file loaded with `rnntl_fast.pretrained.load_elmo`."""
import copy
from typing import List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import nn as fast_nn
from ..pretrained.encoder import RecurrentEncoder, recurrent_layer_index
from .models import ClassificationHead


class ScalarMix(nn.Module):
    """gamma * sum_k softmax(s)_k * layers[k]: `num_layers` scalars s (start equal: a
    plain average) and one scale gamma (starts at 1), all learned.

    Forward: layers, a sequence of num_layers tensors of one shape [..., D] -> [..., D]."""

    def __init__(self, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.scalars = nn.Parameter(torch.zeros(num_layers))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, layers: Sequence[Tensor]) -> Tensor:
        if len(layers) != self.scalars.numel():
            raise ValueError(f"layers: expected {self.scalars.numel()} tensors, got {len(layers)}")
        weights = torch.softmax(self.scalars, dim=0)
        return self.gamma * sum(w * h for w, h in zip(weights, layers))


def reverse_within_length(x: Tensor, lengths: Tensor) -> Tensor:
    """x [B, T, ...], lengths [B] -> x with each row's first lengths[b] steps reversed
    (steps past the length stay where they are). Applying it twice gives x back."""
    steps = torch.arange(x.shape[1], device=x.device)[None, :]          # [1, T]
    lengths = lengths.to(x.device)[:, None]                              # [B, 1]
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)     # [B, T]
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def split_layers(rnn: nn.Module) -> List[nn.Module]:
    """A stacked unidirectional rnntl_fast / torch.nn LSTM or GRU -> one single-layer module
    per layer with the same weights (copies), so each layer's output can be read."""
    if getattr(rnn, "bidirectional", False):
        raise ValueError("split_layers: expected a unidirectional recurrent module")
    cell = fast_nn.LSTM if rnn.mode.upper() == "LSTM" else fast_nn.GRU
    layers = []
    for index in range(rnn.num_layers):
        input_size = rnn.input_size if index == 0 else rnn.hidden_size
        layer = cell(input_size, rnn.hidden_size, batch_first=True, bias=rnn.bias)
        state = {name.replace(f"_l{index}", "_l0"): value.detach().clone()
                 for name, value in rnn.named_parameters() if recurrent_layer_index(name) == index}
        layer.load_state_dict(state)
        layers.append(layer)
    return layers


class BiLanguageModelFeatures(nn.Module):
    """The layers of a bidirectional LM: token layer + L recurrent layers per direction.

    Args:
        forward_embedding, backward_embedding: token embeddings [V, E] of each direction
            (ELMo shares one: pass the same module twice).
        forward_layers, backward_layers: L single-layer recurrent modules each (batch_first,
            unidirectional), bottom to top; layer k + 1 reads layer k's output.
        skip_connections: add each recurrent layer's input to its output for layers >= 2
            (bilm-tf's use_skip_connections).
    Forward: ids [B, T], lengths [B] or None -> list of L + 1 tensors [B, T, 2D], where D
        is the recurrent output width (hidden or projection size). The token layer is the
        embedding tiled D / E times (E must divide D). Steps past a row's length hold
        values that the caller must mask."""

    def __init__(self, forward_embedding: nn.Module, backward_embedding: nn.Module,
                 forward_layers: Sequence[nn.Module], backward_layers: Sequence[nn.Module],
                 skip_connections: bool = False):
        super().__init__()
        if len(forward_layers) != len(backward_layers) or not forward_layers:
            raise ValueError(f"forward_layers and backward_layers must be equally many (>= 1), got "
                             f"{len(forward_layers)} and {len(backward_layers)}")
        self.embeddings = nn.ModuleList([forward_embedding, backward_embedding])
        self.forward_layers = nn.ModuleList(forward_layers)
        self.backward_layers = nn.ModuleList(backward_layers)
        self.skip_connections = skip_connections
        top = forward_layers[-1]
        self.width = getattr(top, "proj_size", 0) or top.hidden_size
        embedding_dim = forward_embedding.embedding_dim
        if self.width % embedding_dim:
            raise ValueError(f"the token layer (embedding {embedding_dim}) cannot be tiled to the recurrent width "
                             f"{self.width}")
        self.output_size = 2 * self.width
        self.num_outputs = len(forward_layers) + 1

    @classmethod
    def from_language_models(cls, forward_encoder: RecurrentEncoder, backward_encoder: RecurrentEncoder):
        """From the encoders of a forward and a backward LanguageModel (weights copied: the
        LMs themselves are left as they are); every layer of every recurrent module, bottom
        to top."""
        def layers(encoder: RecurrentEncoder) -> List[nn.Module]:
            return [layer for module in encoder.layers for layer in split_layers(module)]

        return cls(copy.deepcopy(forward_encoder.embedding), copy.deepcopy(backward_encoder.embedding),
                   layers(forward_encoder), layers(backward_encoder))

    @classmethod
    def from_elmo(cls, layers: Mapping[str, nn.Module], embedding: nn.Module, skip_connections: bool = True):
        """From `rnntl_fast.pretrained.load_elmo`'s result ({"RNN_0/.../Cell{k}": LSTM,
        "RNN_1/...": ...}) and a token embedding of the LSTMs' input width (ELMo's
        character CNN is not loaded: bring word vectors or a trained embedding). Pass
        skip_connections as the options file's use_skip_connections."""
        forward = [module for name, module in layers.items() if name.startswith("RNN_0/")]
        backward = [module for name, module in layers.items() if name.startswith("RNN_1/")]
        return cls(embedding, embedding, forward, backward, skip_connections)

    def _direction(self, embedding: nn.Module, layers: Sequence[nn.Module], ids: Tensor) -> List[Tensor]:
        x = embedding(ids)
        tiles = self.width // x.shape[-1]
        outputs = [x.repeat(1, 1, tiles)]
        for index, layer in enumerate(layers):
            y = layer(x)[0]
            if self.skip_connections and index >= 1:
                y = y + x
            outputs.append(y)
            x = y
        return outputs

    def forward(self, ids: Tensor, lengths: Optional[Tensor] = None) -> List[Tensor]:
        if lengths is None:
            lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        forward = self._direction(self.embeddings[0], self.forward_layers, ids)
        backward = self._direction(self.embeddings[1], self.backward_layers, reverse_within_length(ids, lengths))
        return [torch.cat([f, reverse_within_length(b, lengths)], dim=-1) for f, b in zip(forward, backward)]


class ElmoClassifier(nn.Module):
    """Frozen BiLanguageModelFeatures -> ScalarMix -> ClassificationHead.

    Only the mix (scalars, gamma) and the head train. The head's "last" input is the mix
    at the row's last token (forward half) and at its first token (backward half).
    Forward: ids [B, T], lengths [B] or None -> logits [B, num_classes]."""

    def __init__(self, features: BiLanguageModelFeatures, num_classes: int, pooling: str = "concat",
                 hidden: int = 64, dropout: float = 0.2):
        super().__init__()
        self.features = features
        for parameter in self.features.parameters():
            parameter.requires_grad_(False)
        self.mix = ScalarMix(features.num_outputs)
        self.dropout = nn.Dropout(dropout)
        self.head = ClassificationHead(features.output_size, num_classes, pooling, hidden, dropout)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen LMs: no dropout inside them
        return self

    def forward(self, ids: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        if lengths is None:
            lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        with torch.no_grad():
            layers = self.features(ids, lengths)
        mixed = self.dropout(self.mix(layers))                                   # [B, T, 2D]
        width = self.features.width
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = torch.cat([mixed[rows, lengths.to(ids.device) - 1, :width], mixed[:, 0, width:]], dim=-1)
        return self.head(mixed, last, lengths)

    def layer_groups(self) -> List[List[nn.Parameter]]:
        return [list(self.mix.parameters()) + list(self.head.parameters())]
