"""Gradient reversal (Ganin & Lempitsky 2015) for domain-adversarial training."""
import torch
from torch import Tensor, nn


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by -strength."""

    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return grad_output.neg() * ctx.strength, None


def reverse_gradient(x: Tensor, strength: float = 1.0) -> Tensor:
    """x (any shape) unchanged in the forward; dL/dx becomes -strength * dL/dy in the backward."""
    return _ReverseGradient.apply(x, float(strength))


class GradientReversal(nn.Module):
    """Module form of `reverse_gradient`; `strength` (lambda) may be changed during training
    (DANN ramps it from 0 to 1)."""

    def __init__(self, strength: float = 1.0):
        super().__init__()
        self.strength = float(strength)

    def forward(self, x: Tensor) -> Tensor:
        return reverse_gradient(x, self.strength)

    def extra_repr(self) -> str:
        return f"strength={self.strength}"
