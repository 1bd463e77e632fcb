"""The float32 sigmoid and tanh of the Triton kernels (rnntl_fast/ops/triton/cell_math.py)
against float64, in ulp, over a dense grid of x: tiny, mid and saturated, both signs.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it), or compiled on a
GPU with RNNTL_TEST_TRITON_COMPILED=1, as tests/test_triton.py. Measured under the
interpreter (triton 3.9.0) over this grid (3.9 million x): tanh at most 0.85 ulp (mean 0.21),
sigmoid at most 0.94 ulp (mean 0.24); the forms they replaced were off by up to 7.5 ulp
(tanh near |x| = 0.126) and 3.4 ulp (sigmoid, x < 0).
"""
import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the triton backend is optional")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from parity import triton_device_or_skip  # noqa: E402

DEVICE = triton_device_or_skip()

from rnntl_fast.ops.triton.cell_math import sigmoid, tanh  # noqa: E402

MAX_ULP = 1.0


@triton.jit
def _apply_kernel(x_ptr, tanh_ptr, sigmoid_ptr, n, BLOCK: tl.constexpr):
    """x: [n] float32 -> tanh(x), sigmoid(x): [n] float32."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    tl.store(tanh_ptr + offsets, tanh(x), mask=inside)
    tl.store(sigmoid_ptr + offsets, sigmoid(x), mask=inside)


def _apply(x: torch.Tensor):
    """x: [n] float32 -> (tanh(x), sigmoid(x)) by the kernels' functions, [n] float32 each."""
    x = x.to(DEVICE)
    out_tanh, out_sigmoid = torch.empty_like(x), torch.empty_like(x)
    block = 1 << 14
    _apply_kernel[(triton.cdiv(x.numel(), block),)](x, out_tanh, out_sigmoid, x.numel(), BLOCK=block)
    return out_tanh.cpu(), out_sigmoid.cpu()


def _every_float32(low: float, high: float) -> np.ndarray:
    """Every float32 in [low, high) (0 < low < high)."""
    bits = np.arange(np.float32(low).view(np.int32), np.float32(high).view(np.int32), dtype=np.int32)
    return bits.view(np.float32)


def _grid() -> torch.Tensor:
    """[n] float32: magnitudes from the smallest subnormal to 120 (exp(-|x|) underflows near 104),
    every float32 where the forms meet or the old ones cancelled, both signs."""
    magnitudes = np.concatenate([
        np.geomspace(1.4e-45, 1e-3, 20_000),
        np.linspace(1e-3, 20.0, 200_000),
        np.linspace(20.0, 120.0, 10_000),
        _every_float32(0.120, 0.130),  # the old tanh's switch between its two forms
        _every_float32(0.545, 0.553),  # the switch of this tanh at ln(3)/2
        _every_float32(8.9, 9.1),      # tanh rounding to 1
        _every_float32(86.0, 88.8),    # sigmoid(-x) entering the subnormals
    ]).astype(np.float32)
    return torch.from_numpy(np.concatenate([magnitudes, -magnitudes]))


def _ulp_errors(value: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|value - exact| in units of the float32 spacing at `exact` (2^-149 among the subnormals)."""
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0 ** -126))) - 23)
    return (value.double() - exact).abs() / spacing


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_within_one_ulp_of_float64(name):
    x = _grid()
    value = dict(zip(("tanh", "sigmoid"), _apply(x)))[name]
    exact = getattr(torch, name)(x.double())
    errors = _ulp_errors(value, exact)
    worst = int(errors.argmax())
    assert errors.max().item() <= MAX_ULP, (f"{name}({x[worst].item()!r}) = {value[worst].item()!r}, float64 "
                                            f"{exact[worst].item()!r}: {errors.max().item():.3f} ulp")


def test_non_finite_and_signed_inputs():
    """tanh(+-inf) = +-1 and sigmoid(-inf) = 0, sigmoid(inf) = 1 exactly (their derivatives are
    then exactly 0, see cell_math.py), NaN stays NaN, tanh is odd and sigmoid(a) = 1 - sigmoid(-a)
    bit for bit."""
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, 200.0, -200.0, 1e-30, -1e-30])
    out_tanh, out_sigmoid = _apply(special)
    torch.testing.assert_close(out_tanh, torch.tensor([1.0, -1.0, float("nan"), 0.0, 1.0, -1.0, 1e-30, -1e-30]),
                               rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out_sigmoid, torch.tensor([1.0, 0.0, float("nan"), 0.5, 1.0, 0.0, 0.5, 0.5]),
                               rtol=0, atol=0, equal_nan=True)
    x = torch.from_numpy(np.linspace(1e-4, 30.0, 5001, dtype=np.float32))
    positive, negative = _apply(x), _apply(-x)
    assert torch.equal(negative[0], -positive[0])
    assert torch.equal(positive[1], 1.0 - negative[1])  # sigmoid(a) = 1 - sigmoid(-a), rounded once
