"""Penalties that keep transferred weights near their pretrained values: L2-SP (Li,
Grandvalet & Davoine 2018) and elastic weight consolidation with a diagonal Fisher."""
from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn


class L2SP(nn.Module):
    """penalty = alpha * sum_i ||w_i - w0_i||^2 over the transferred parameters
               + beta  * sum_j ||w_j||^2        over the new parameters (e.g. the head).

    The starting point w0 is a snapshot (buffers, so it moves with .to() and is saved in
    state_dict) of the transferred parameters when the regulariser is built. Gradient:
    2*alpha*(w - w0) and 2*beta*w. Frozen parameters (requires_grad=False) are left out:
    they cannot move, so their terms would only add a constant.

    model: the model being fine-tuned; transferred: names of its parameters that came from
    the pretrained model (default: all parameters not under `new_prefixes`)."""

    def __init__(self, model: nn.Module, alpha: float = 1e-3, beta: float = 1e-4,
                 transferred: Optional[Iterable[str]] = None, new_prefixes: Iterable[str] = ("head.",)):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        named = dict(model.named_parameters())
        if transferred is None:
            prefixes = tuple(new_prefixes)
            transferred = [n for n in named if not n.startswith(prefixes)]
        self.transferred = list(transferred)
        unknown = [n for n in self.transferred if n not in named]
        if unknown:
            raise ValueError(f"transferred names not in the model: {unknown}")
        self.new = [n for n in named if n not in set(self.transferred)]
        self._names: Dict[str, str] = {}
        for index, name in enumerate(self.transferred):
            buffer_name = f"start_{index}"
            self.register_buffer(buffer_name, named[name].detach().clone())
            self._names[name] = buffer_name

    def forward(self, model: nn.Module) -> Tensor:
        """The penalty, a scalar with autograd into the model's parameters."""
        named = dict(model.named_parameters())
        first = named[self.transferred[0]] if self.transferred else next(iter(named.values()))
        total = first.new_zeros(())
        for name in self.transferred:
            parameter = named[name]
            if parameter.requires_grad:
                total = total + self.alpha * (parameter - getattr(self, self._names[name])).pow(2).sum()
        for name in self.new:
            parameter = named[name]
            if parameter.requires_grad:
                total = total + self.beta * parameter.pow(2).sum()
        return total


def diagonal_fisher(model: nn.Module, loss_fn: Callable[[nn.Module, object], Tensor], examples: Iterable,
                    names: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
    """The empirical diagonal Fisher information of `model` on `examples`:

        F_i = (1 / N) * sum_n (d loss_fn(model, example_n) / d w_i)^2

    one backward pass per example (a per-example gradient, not a batch mean's), in eval
    mode (no dropout). names: the parameters to cover (default: all); returns {name: F}
    with F shaped like the parameter. Gradients left on the model are cleared."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"names not parameters of the model: {unknown}")
    was_training = model.training
    model.eval()
    sums = {n: torch.zeros_like(named[n]) for n in names}
    count = 0
    for example in examples:
        gradients = torch.autograd.grad(loss_fn(model, example), [named[n] for n in names], allow_unused=True)
        for name, gradient in zip(names, gradients):
            if gradient is not None:
                sums[name] += gradient.detach().pow(2)
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("examples: no example to estimate the Fisher information from")
    return {name: total / count for name, total in sums.items()}


class EWC(nn.Module):
    """Elastic weight consolidation (Kirkpatrick et al. 2017) with a normalised Fisher:

        penalty = alpha * sum_i (F_i / mean(F)) * (w_i - w0_i)^2

    over the parameters named in `fisher` ({name: F_i}, e.g. diagonal_fisher of the source
    task's loss), w0 their values when the regulariser is built. mean(F) is over every
    entry of every covered parameter, so alpha has L2-SP's scale (L2-SP is the case F_i =
    const) and the Fisher only says which weights matter more. The original form
    (lambda / 2) * sum_i F_i (w_i - w0_i)^2 is this with lambda = 2 * alpha / mean(F).
    Gradient: 2 * alpha * F_i / mean(F) * (w_i - w0_i). Frozen parameters are left out."""

    def __init__(self, model: nn.Module, fisher: Mapping[str, Tensor], alpha: float = 1e-2):
        super().__init__()
        named = dict(model.named_parameters())
        unknown = [n for n in fisher if n not in named]
        if unknown:
            raise ValueError(f"fisher: names not parameters of the model: {unknown}")
        mismatched = [n for n, f in fisher.items() if f.shape != named[n].shape]
        if mismatched:
            raise ValueError(f"fisher: shapes differ from the parameters' for {mismatched}")
        total = sum(float(f.sum()) for f in fisher.values())
        entries = sum(f.numel() for f in fisher.values())
        if entries == 0 or total <= 0:
            raise ValueError("fisher: all zero; the source loss does not depend on these parameters")
        self.alpha = float(alpha)
        self.fisher_mean = total / entries
        self.names = list(fisher)
        for index, name in enumerate(self.names):
            self.register_buffer(f"start_{index}", named[name].detach().clone())
            self.register_buffer(f"importance_{index}", fisher[name].detach() / self.fisher_mean)

    def forward(self, model: nn.Module) -> Tensor:
        """The penalty, a scalar with autograd into the model's parameters."""
        named = dict(model.named_parameters())
        total = named[self.names[0]].new_zeros(())
        for index, name in enumerate(self.names):
            parameter = named[name]
            if parameter.requires_grad:
                difference = parameter - getattr(self, f"start_{index}")
                total = total + self.alpha * (getattr(self, f"importance_{index}") * difference.pow(2)).sum()
        return total
