"""Freezing and unfreezing parts of a model.

Freezing sets requires_grad=False. For rnntl_fast.LSTM/GRU that is what makes the backward
kernels skip the weight-gradient GEMMs of frozen weights (the op's backward asks only for
the gradients autograd needs), and when everything below a layer is frozen, autograd does
not ask for that layer's input gradient either. Frozen parameters get grad None, so
optimizers leave them unchanged (torch optimizers skip parameters whose grad is None).

Recurrent parameter names follow torch.nn: `weight_ih_l{k}`, `bias_hh_l{k}_reverse`, ...;
in a RecurrentEncoder they sit under `layers.{m}.` (module m), and its layers are counted
bottom to top across the modules (RecurrentEncoder.recurrent_layers).
"""
import fnmatch
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pretrained.encoder import RecurrentEncoder, recurrent_layer_index

Target = Union[nn.Module, nn.Parameter, Iterable[nn.Parameter]]


def _parameters(target: Target) -> List[nn.Parameter]:
    if isinstance(target, nn.Parameter):
        return [target]
    if isinstance(target, nn.Module):
        return list(target.parameters())
    return list(target)


def freeze(target: Target) -> None:
    """Freezes a module, a parameter, or an iterable of parameters."""
    for parameter in _parameters(target):
        parameter.requires_grad_(False)


def unfreeze(target: Target) -> None:
    for parameter in _parameters(target):
        parameter.requires_grad_(True)


def set_trainable(model: nn.Module, patterns: Sequence[str], trainable: bool) -> List[str]:
    """Sets requires_grad on every parameter whose qualified name matches a glob pattern
    (e.g. "encoder.layers.0.*_l0*", "head.*"). Returns the names changed; a pattern that
    matches nothing is an error (it is almost always a typo)."""
    changed = []
    named = dict(model.named_parameters())
    for pattern in patterns:
        hits = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(f"pattern {pattern!r} matches no parameter; names are e.g. {list(named)[:8]}")
        for name in hits:
            named[name].requires_grad_(trainable)
            changed.append(name)
    return changed


def _numbered_parameters(rnn: nn.Module) -> List[Tuple[int, str, nn.Parameter]]:
    """(layer index, name, parameter) of every recurrent parameter of `rnn`."""
    if isinstance(rnn, RecurrentEncoder):
        return [(index, name, parameter) for index, layer in enumerate(rnn.recurrent_layers())
                for name, parameter in layer.items()]
    numbered = [(recurrent_layer_index(name), name, parameter) for name, parameter in rnn.named_parameters()]
    return [entry for entry in numbered if entry[0] is not None]


def recurrent_parameters(rnn: nn.Module, layers: Optional[Iterable[int]] = None,
                         direction: Optional[str] = None) -> List[nn.Parameter]:
    """Parameters of a torch.nn / rnntl_fast LSTM or GRU, or of a RecurrentEncoder's
    recurrent layers (counted across its modules), selected by layer index and/or
    direction ("forward" or "reverse"); None selects all."""
    if direction not in (None, "forward", "reverse"):
        raise ValueError(f"direction must be 'forward', 'reverse' or None, got {direction!r}")
    numbered = _numbered_parameters(rnn)
    wanted = None if layers is None else set(layers)
    if wanted is not None:
        available = {layer for layer, _, _ in numbered}
        missing = wanted - available
        if missing:
            raise ValueError(f"layers {sorted(missing)} do not exist; the module has layers {sorted(available)}")
    picked = []
    for layer, name, parameter in numbered:
        is_reverse = name.endswith("_reverse")
        if wanted is not None and layer not in wanted:
            continue
        if direction == "forward" and is_reverse or direction == "reverse" and not is_reverse:
            continue
        picked.append(parameter)
    return picked


def freeze_layers(rnn: nn.Module, layers: Iterable[int], direction: Optional[str] = None) -> None:
    """Freezes recurrent layers by index (both directions unless `direction` is given) of
    an LSTM/GRU or a RecurrentEncoder."""
    freeze(recurrent_parameters(rnn, layers, direction))


def unfreeze_layers(rnn: nn.Module, layers: Iterable[int], direction: Optional[str] = None) -> None:
    unfreeze(recurrent_parameters(rnn, layers, direction))


def freeze_direction(rnn: nn.Module, direction: str) -> None:
    """Freezes every layer's "forward" or "reverse" direction (LSTM/GRU or RecurrentEncoder)."""
    freeze(recurrent_parameters(rnn, None, direction))


def trainable_row_mask(num_rows: int, trainable_rows: Union[Tensor, Sequence[int]]) -> Tensor:
    """[V] bool, True for rows that train."""
    mask = torch.zeros(num_rows, dtype=torch.bool)
    mask[torch.as_tensor(trainable_rows, dtype=torch.long)] = True
    return mask


def mask_embedding_rows(embedding: nn.Embedding, trainable_rows: Union[Tensor, Sequence[int]]) -> Callable:
    """Lets only `trainable_rows` of an embedding train (e.g. the words missing from the
    pretrained vectors) by zeroing the other rows' gradient in a hook. Returns the hook's
    handle (call .remove() to undo). Use an optimizer without weight decay (or
    PartiallyFrozenEmbedding) so that zero-gradient rows do not move at all."""
    mask = trainable_row_mask(embedding.num_embeddings, trainable_rows).to(embedding.weight.device)
    keep = mask.unsqueeze(1).to(embedding.weight.dtype)  # [V, 1]
    return embedding.weight.register_hook(lambda grad: grad * keep)


class PartiallyFrozenEmbedding(nn.Module):
    """An embedding split into a frozen table and trainable rows: `frozen_weight` [V, E]
    (requires_grad=False) and `trainable_weight` [K, E] holding rows `trainable_rows` [K].
    Only the K rows get gradients and optimizer state; the frozen rows cannot move.

    Forward: ids [...] -> [..., E]."""

    def __init__(self, weight: Tensor, trainable_rows: Union[Tensor, Sequence[int]], padding_idx: Optional[int] = 0):
        super().__init__()
        rows = torch.as_tensor(trainable_rows, dtype=torch.long).unique()
        self.frozen_weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.trainable_weight = nn.Parameter(weight.detach()[rows].clone())
        self.register_buffer("trainable_rows", rows)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, trainable_rows) -> "PartiallyFrozenEmbedding":
        return cls(embedding.weight, trainable_rows, embedding.padding_idx)

    @property
    def weight(self) -> Tensor:
        """The full [V, E] table (frozen rows with the trainable rows written in)."""
        return self.frozen_weight.index_copy(0, self.trainable_rows, self.trainable_weight)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)


class GradualUnfreezer:
    """ULMFiT's gradual unfreezing: starts with only the top group trainable, then unfreezes
    one more group (from the top down) every `every` epochs (or steps: call `step()` at
    whatever unit you choose).

    groups: parameter lists ordered bottom to top (e.g. TextClassifier.layer_groups()).
    After `step(k)` for k = 0, 1, ..., the top 1 + k // every groups are trainable.
    Returns True from `step` when the set of trainable parameters changed (a
    DistributedDataParallel wrapper must then be rebuilt)."""

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]], every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.groups = [list(g) for g in groups]
        self.every = every
        self.trainable_groups = 0

    def trainable_count(self, unit: int) -> int:
        return min(len(self.groups), 1 + unit // self.every)

    def step(self, unit: int) -> bool:
        count = self.trainable_count(unit)
        if count == self.trainable_groups:
            return False
        for index, group in enumerate(self.groups):
            (unfreeze if index >= len(self.groups) - count else freeze)(group)
        self.trainable_groups = count
        return True
