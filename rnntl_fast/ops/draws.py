"""The regularizers' random draws (docs/semantics.md section 10): masks and zoneout keep
weights whose entries are `value` with probability `probability`, else 0.

Entry i of a draw of numel entries is a function of a seed, numel and i alone
(Philox-4x32-10, a counter-based generator, csrc/include/rnntl/philox.h); with
C = ceil(numel / 4) counters:

    words(seed, n) = Philox-4x32-10(counter (n mod 2^32, n div 2^32, 0, 0),
                                    key (seed mod 2^32, seed div 2^32))
    u_i = (words(seed, i mod C)[i div C] >> 8) / 2^24
    draw_i = value if u_i < probability else 0

(word j of every counter fills one contiguous quarter, which the CPU op writes with
vector stores).

The seed is one draw of `random_()` from torch's default generator of the device, so
`torch.manual_seed` makes the masks reproducible, and every mask drawn moves the generator
on. On the CPU the native op `rnntl_fast::bernoulli_draws_` fills the tensor (vectorized,
on every torch thread); elsewhere, or without the extension, `philox_draws` computes the
same bits with torch's integer ops on the tensor's device.
"""
import math
from typing import Sequence

import torch
from torch import Tensor

from .. import _ext

_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_LOW32 = 0xFFFFFFFF


def _multiply_high_low(constant: int, word: Tensor):
    """(high, low) 32-bit halves of constant * word for int64 tensors of 32-bit words,
    without int64 overflow: the constant is split into 16-bit halves."""
    high_part, low_part = constant >> 16, constant & 0xFFFF
    t_low, t_high = word * low_part, word * high_part  # each < 2^48
    high = (t_high + (t_low >> 16)) >> 16
    low = (t_low + ((t_high & 0xFFFF) << 16)) & _LOW32
    return high, low


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor) -> Tensor:
    """Philox-4x32-10 of the counters (c0, c1, c2, c3) under the key (k0, k1): int64 tensors of
    32-bit words (broadcast together) -> int64 [..., 4] of the four output words."""
    for round_index in range(10):
        if round_index > 0:
            k0, k1 = (k0 + _KEY_STEPS[0]) & _LOW32, (k1 + _KEY_STEPS[1]) & _LOW32
        high0, low0 = _multiply_high_low(_MULTIPLIERS[0], c0)
        high1, low1 = _multiply_high_low(_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def philox_draws(shape: Sequence[int], probability: float, value: float, seed: Tensor, dtype: torch.dtype,
                 device) -> Tensor:
    """The draws of `shape` in torch ops (the definition; what the native op must equal bit for bit)."""
    numel = math.prod(int(size) for size in shape)
    counters = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    seed = seed.to(device).reshape(())
    zero = torch.zeros_like(counters)
    words = philox4x32_10(counters & _LOW32, counters >> 32, zero, zero, seed & _LOW32, (seed >> 32) & _LOW32)
    uniforms = (words.t().reshape(-1)[:numel] >> 8).to(torch.float64) / 2.0 ** 24  # entry j * C + n: word j of n
    values = torch.tensor([value, 0.0], dtype=torch.float64, device=device)  # float64: value is not rounded twice
    return values[(uniforms >= probability).long()].to(dtype).reshape(tuple(shape))


def draw_seed(device) -> Tensor:
    """One int64 in [0, 2^63) from the default generator of `device`, as a one-element tensor."""
    return torch.empty((), dtype=torch.int64, device=device).random_()


def bernoulli_draws(shape: Sequence[int], probability: float, value: float, like: Tensor) -> Tensor:
    """[shape] in like's dtype and device: `value` with probability `probability`, else 0,
    from a fresh seed of the default generator of like's device."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"bernoulli_draws: probability must be in [0, 1], got {probability}")
    seed = draw_seed(like.device)
    if like.device.type == "cpu" and _ext.HAS_CPU_KERNELS:
        out = torch.empty(tuple(shape), dtype=like.dtype)
        torch.ops.rnntl_fast.bernoulli_draws_(out, probability, value, seed)
        return out
    return philox_draws(shape, probability, value, seed, like.dtype, like.device)
