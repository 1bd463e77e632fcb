"""L2-SP (Li, Grandvalet & Davoine 2018): keep transferred weights near their pretrained
values instead of near zero."""
from typing import Dict, Iterable, Optional

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
