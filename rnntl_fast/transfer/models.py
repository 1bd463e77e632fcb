"""Models for transfer: the recurrent text encoder (rnntl_fast.pretrained.RecurrentEncoder:
embedding + rnntl_fast LSTM/GRU, one class and one file format for both packages), a
language-model head for pretraining, pooling classification heads for fine-tuning, and a
multi-task model that shares one encoder between several heads.

Padding never leaks: padded batches go through the recurrent modules with their lengths
(the kernels stop each row at its length), and the pooling heads mask padded steps."""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..pretrained.encoder import RecurrentEncoder

POOLINGS = ("last", "mean", "max", "attention", "concat")

# The transfer layer's earlier class name: it builds the same RecurrentEncoder (see
# RecurrentEncoder.stacked for the arguments).
TextEncoder = RecurrentEncoder.stacked


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
    """RecurrentEncoder (unidirectional, batch_first) + LanguageModelHead.

    forward(ids [B, T], targets [B, T]) -> mean NLL (scalar); without targets ->
    log-probabilities [B, T, V]. With return_state=True: (that, final recurrent states),
    the encoder starting from `state` (its final states' form: one entry per recurrent
    module; None: zeros). Every row is T long."""

    def __init__(self, encoder: RecurrentEncoder, dropout: float = 0.0):
        super().__init__()
        if encoder.bidirectional:
            raise ValueError("a left-to-right language model needs a unidirectional encoder")
        self.encoder = encoder
        self.head = LanguageModelHead(encoder.output_size, encoder.embedding.num_embeddings, dropout)

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, state=None, return_state: bool = False):
        outputs, final = self.encoder(ids, state=state)
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
    """RecurrentEncoder (batch_first) + ClassificationHead, whose "last" input is the
    encoder's final_features. ids [B, T], lengths [B] -> logits [B, C]."""

    def __init__(self, encoder: RecurrentEncoder, num_classes: int, pooling: str = "concat", hidden: int = 64,
                 dropout: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.head = ClassificationHead(encoder.output_size, num_classes, pooling, hidden, dropout)

    def forward(self, ids: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        outputs, states = self.encoder(ids, lengths)
        return self.head(outputs, self.encoder.final_features(states), lengths)

    def layer_groups(self) -> List[List[nn.Parameter]]:
        """Bottom to top: embedding, each recurrent layer, head (for gradual unfreezing and
        discriminative learning rates)."""
        return self.encoder.layer_groups() + [list(self.head.parameters())]


class MultiTaskModel(nn.Module):
    """One shared RecurrentEncoder (batch_first), one ClassificationHead per task.

    Forward: ids [B, T], lengths [B], task name -> logits [B, C_task]; with task=None, a
    dict of every task's logits from one encoder pass. Heads listed in `reversed_heads`
    see the encoder features through a gradient-reversal layer (domain-adversarial
    training: the encoder learns features the head cannot separate)."""

    def __init__(self, encoder: RecurrentEncoder, num_classes: Dict[str, int], pooling: str = "concat",
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
        outputs, states = self.encoder(ids, lengths)
        last = self.encoder.final_features(states)
        if task is not None:
            if task not in self.heads:
                raise KeyError(f"unknown task {task!r}; tasks are {list(self.heads)}")
            return self._run_head(task, outputs, last, lengths)
        return {name: self._run_head(name, outputs, last, lengths) for name in self.heads}
