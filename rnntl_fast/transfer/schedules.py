"""Discriminative learning rates and the slanted triangular schedule (Howard & Ruder 2018)."""
import math
from typing import List, Sequence

import torch
from torch import nn


def discriminative_param_groups(groups: Sequence[Sequence[nn.Parameter]], lr: float, factor: float = 2.6,
                                **options) -> List[dict]:
    """Optimizer parameter groups, one per layer group, with lr / factor**depth where depth
    counts from the top (the last group gets `lr`, the one below lr/2.6, ...).

    groups: parameter lists ordered bottom to top. Every group is included, frozen or
    not, so that unfreezing later needs no new optimizer (frozen parameters get no grad and
    are skipped). `options` (e.g. weight_decay) go into every group."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    top = len(groups) - 1
    return [{"params": list(params), "lr": lr / factor ** (top - index), "depth": top - index, **options}
            for index, params in enumerate(groups)]


def slanted_triangular(step: int, total_steps: int, cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """The STLR multiplier of the peak learning rate at `step` (0-based) of `total_steps`:

        cut = floor(T * cut_frac)
        p   = t / cut                                   if t < cut
              1 - (t - cut) / (cut * (1 / cut_frac - 1))  otherwise
        lr  = lr_max * (1 + p * (ratio - 1)) / ratio
    """
    if not 0 < cut_frac < 1:
        raise ValueError(f"cut_frac must be in (0, 1), got {cut_frac}")
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    cut = max(1, math.floor(total_steps * cut_frac))
    if step < cut:
        p = step / cut
    else:
        p = max(0.0, 1 - (step - cut) / (cut * (1 / cut_frac - 1)))
    return (1 + p * (ratio - 1)) / ratio


class SlantedTriangularLR(torch.optim.lr_scheduler.LRScheduler):
    """Every group's lr follows its own initial lr (its peak) times `slanted_triangular`,
    so discriminative per-group factors are kept. Step once per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cut_frac: float = 0.1,
                 ratio: float = 32.0, last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.cut_frac = cut_frac
        self.ratio = ratio
        slanted_triangular(0, total_steps, cut_frac, ratio)  # validates the arguments
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        scale = slanted_triangular(self.last_epoch, self.total_steps, self.cut_frac, self.ratio)
        return [base * scale for base in self.base_lrs]
