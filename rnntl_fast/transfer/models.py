"""Models for transfer: a recurrent text encoder (embedding + rnntl_fast LSTM/GRU), a
language-model head for pretraining, pooling classification heads for fine-tuning, and a
multi-task model that shares one encoder between several heads.

Padding never leaks: padded batches go through the recurrent stack as a PackedSequence
(the kernels mask by length), and the pooling heads mask padded steps."""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import nn as fast_nn

POOLINGS = ("last", "mean", "max", "attention", "concat")


class TextEncoder(nn.Module):
    """Embedding -> dropout -> rnntl_fast LSTM/GRU (batch_first).

    Args:
        vocab_size, embedding_dim: the embedding table [V, E] (row 0 is padding).
        hidden_size, num_layers, bidirectional: of the recurrent stack.
        cell: "lstm" or "gru".
        dropout: on the embedded input and between recurrent layers.
    Forward: ids [B, T], lengths [B] or None (every row is T long) ->
        outputs [B, T, D*H] (zeros past each row's length), last [B, D*H] (top layer's
        final state: forward direction at the row's last token, reverse direction at t=0).
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 128, hidden_size: int = 256, num_layers: int = 1,
                 bidirectional: bool = False, cell: str = "lstm", dropout: float = 0.0):
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.config = dict(vocab_size=vocab_size, embedding_dim=embedding_dim, hidden_size=hidden_size,
                           num_layers=num_layers, bidirectional=bidirectional, cell=cell, dropout=dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        rnn_class = fast_nn.LSTM if cell == "lstm" else fast_nn.GRU
        self.rnn = rnn_class(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True,
                             bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.num_layers = num_layers
        self.directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions

    def forward(self, ids: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        embedded = self.dropout(self.embedding(ids))
        outputs, state = fast_nn.run_with_lengths(self.rnn, embedded, lengths)
        h_n = state[0] if isinstance(state, tuple) else state  # [L*D, B, H]
        last = h_n[-self.directions:].transpose(0, 1).reshape(ids.shape[0], -1)
        return outputs, last

    def forward_with_state(self, ids: Tensor, state=None):
        """ids [B, T] (every row T long), state: the recurrent stack's initial state (LSTM:
        (h [L, B, H], c [L, B, H]); GRU: h [L, B, H]) or None for zeros ->
        (outputs [B, T, H], final state in the same form), for stateful language modelling."""
        return self.rnn(self.dropout(self.embedding(ids)), state)

    def layer_groups(self) -> List[List[nn.Parameter]]:
        """Parameters bottom to top: [embedding], [rnn layer 0], ..., [rnn layer L-1]."""
        groups = [list(self.embedding.parameters())]
        for layer in range(self.num_layers):
            groups.append([p for name, p in self.rnn.named_parameters() if _layer_of(name) == layer])
        return groups


def _layer_of(parameter_name: str) -> Optional[int]:
    """'weight_ih_l2_reverse' -> 2 (torch.nn / rnntl_fast recurrent parameter names)."""
    for part in parameter_name.split(".")[-1].split("_"):
        if part.startswith("l") and part[1:].isdigit():
            return int(part[1:])
    return None


def adaptive_cutoffs(vocab_size: int) -> List[int]:
    """Cluster boundaries for the adaptive softmax: ~15% and ~45% of the vocabulary (word
    frequencies are Zipfian, so the head cluster covers most tokens)."""
    cutoffs = []
    for fraction in (0.15, 0.45):
        cut = max(1, round(vocab_size * fraction))
        if cut < vocab_size - 1 and (not cutoffs or cut > cutoffs[-1]):
            cutoffs.append(cut)
    return cutoffs or [max(1, vocab_size - 1)]


class LanguageModelHead(nn.Module):
    """Next-word distribution from encoder outputs through an adaptive softmax (Grave et al.
    2017): frequent words get full-width logits, rare words cheaper low-rank ones, which
    makes the output layer several times cheaper than a full softmax on CPU."""

    def __init__(self, input_size: int, vocab_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        # tail clusters get input_size / div**k dimensions: keep them >= 2 for small models
        div_value = 4.0 if input_size >= 64 else 2.0
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(input_size, vocab_size, adaptive_cutoffs(vocab_size),
                                                     div_value=div_value)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """outputs [B, T, H], targets [B, T] -> mean next-word negative log-likelihood."""
        flat = self.dropout(outputs).reshape(-1, outputs.shape[-1])
        return self.softmax(flat, targets.reshape(-1)).loss

    def log_prob(self, outputs: Tensor) -> Tensor:
        """outputs [B, T, H] -> log-probabilities [B, T, V]."""
        flat = outputs.reshape(-1, outputs.shape[-1])
        return self.softmax.log_prob(flat).reshape(*outputs.shape[:-1], -1)


class LanguageModel(nn.Module):
    """TextEncoder (unidirectional) + LanguageModelHead.

    forward(ids [B, T], targets [B, T]) -> mean NLL (scalar); without targets ->
    log-probabilities [B, T, V]. With return_state=True: (that, final recurrent state), the
    recurrent stack starting from `state` (see TextEncoder.forward_with_state; None: zeros)."""

    def __init__(self, encoder: TextEncoder, dropout: float = 0.0):
        super().__init__()
        if encoder.directions != 1:
            raise ValueError("a left-to-right language model needs a unidirectional encoder")
        self.encoder = encoder
        self.head = LanguageModelHead(encoder.output_size, encoder.embedding.num_embeddings, dropout)

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, state=None, return_state: bool = False):
        outputs, final = self.encoder.forward_with_state(ids, state)
        result = self.head.log_prob(outputs) if targets is None else self.head.loss(outputs, targets)
        return (result, final) if return_state else result


def _mask(lengths: Tensor, steps: int) -> Tensor:
    """[B] lengths -> [B, T] bool, True at real tokens."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


class ClassificationHead(nn.Module):
    """Pools encoder outputs over time, then dropout -> Linear -> ReLU -> dropout -> Linear.

    pooling: "last" (final state), "mean" / "max" (over real tokens only), "attention"
    (softmax of a learned score over real tokens), "concat" ([last, max, mean], ULMFiT).
    Forward: outputs [B, T, H], last [B, H], lengths [B] -> logits [B, num_classes].
    """

    def __init__(self, input_size: int, num_classes: int, pooling: str = "concat", hidden: int = 64,
                 dropout: float = 0.2):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        pooled = input_size * (3 if pooling == "concat" else 1)
        if pooling == "attention":
            self.score = nn.Linear(input_size, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(pooled, hidden), nn.ReLU(),
                                        nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def pool(self, outputs: Tensor, last: Tensor, lengths: Optional[Tensor]) -> Tensor:
        if lengths is None:
            lengths = torch.full((outputs.shape[0],), outputs.shape[1], dtype=torch.long, device=outputs.device)
        mask = _mask(lengths.to(outputs.device), outputs.shape[1]).unsqueeze(-1)  # [B, T, 1]
        if self.pooling == "last":
            return last
        mean = (outputs * mask).sum(1) / lengths.clamp(min=1).to(outputs.dtype).unsqueeze(-1).to(outputs.device)
        if self.pooling == "mean":
            return mean
        maxed = outputs.masked_fill(~mask, float("-inf")).amax(1)
        if self.pooling == "max":
            return maxed
        if self.pooling == "concat":
            return torch.cat([last, maxed, mean], dim=-1)
        scores = self.score(outputs).masked_fill(~mask, float("-inf"))  # attention: [B, T, 1]
        return (torch.softmax(scores, dim=1) * outputs).sum(1)

    def forward(self, outputs: Tensor, last: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        return self.classifier(self.pool(outputs, last, lengths))


class TextClassifier(nn.Module):
    """TextEncoder + ClassificationHead. ids [B, T], lengths [B] -> logits [B, C]."""

    def __init__(self, encoder: TextEncoder, num_classes: int, pooling: str = "concat", hidden: int = 64,
                 dropout: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.head = ClassificationHead(encoder.output_size, num_classes, pooling, hidden, dropout)

    def forward(self, ids: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        outputs, last = self.encoder(ids, lengths)
        return self.head(outputs, last, lengths)

    def layer_groups(self) -> List[List[nn.Parameter]]:
        """Bottom to top: embedding, each recurrent layer, head (for gradual unfreezing and
        discriminative learning rates)."""
        return self.encoder.layer_groups() + [list(self.head.parameters())]


class MultiTaskModel(nn.Module):
    """One shared TextEncoder, one ClassificationHead per task.

    Forward: ids [B, T], lengths [B], task name -> logits [B, C_task]; with task=None, a
    dict of every task's logits from one encoder pass. Heads listed in `reversed_heads`
    see the encoder features through a gradient-reversal layer (domain-adversarial
    training: the encoder learns features the head cannot separate)."""

    def __init__(self, encoder: TextEncoder, num_classes: Dict[str, int], pooling: str = "concat",
                 reversed_heads: Dict[str, float] = None, hidden: int = 64, dropout: float = 0.2):
        super().__init__()
        from .layers import GradientReversal
        self.encoder = encoder
        self.heads = nn.ModuleDict({task: ClassificationHead(encoder.output_size, count, pooling, hidden, dropout)
                                    for task, count in num_classes.items()})
        self.reversals = nn.ModuleDict({task: GradientReversal(strength)
                                        for task, strength in (reversed_heads or {}).items()})
        for task in self.reversals:
            if task not in self.heads:
                raise ValueError(f"reversed head {task!r} is not one of the tasks {list(self.heads)}")

    def _run_head(self, task: str, outputs: Tensor, last: Tensor, lengths: Optional[Tensor]) -> Tensor:
        if task in self.reversals:
            outputs, last = self.reversals[task](outputs), self.reversals[task](last)
        return self.heads[task](outputs, last, lengths)

    def forward(self, ids: Tensor, lengths: Optional[Tensor] = None, task: Optional[str] = None):
        outputs, last = self.encoder(ids, lengths)
        if task is not None:
            if task not in self.heads:
                raise KeyError(f"unknown task {task!r}; tasks are {list(self.heads)}")
            return self._run_head(task, outputs, last, lengths)
        return {name: self._run_head(name, outputs, last, lengths) for name in self.heads}
