"""Argument checks shared by every backend, so bad input gets the same clear error
whichever kernel would have run. Each message names the argument at fault."""
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .reference import LayerNormWeights

GRAD_CLIP_MODES = ("state", "gates")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_clip(value: Optional[float], name: str) -> Optional[float]:
    """None, or a finite number > 0 (returned as float)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 or None, got {value}")
    return value


def check_grad_clip_mode(mode: str) -> str:
    if mode not in GRAD_CLIP_MODES:
        raise ValueError(f"grad_clip_mode must be one of {GRAD_CLIP_MODES}, got {mode!r}")
    return mode


def _check_tensor(t: Tensor, name: str, input: Tensor, shape: Sequence[int]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if t.dtype != input.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {input.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_input(input: Tensor) -> Tuple[int, int, int]:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 3:
        raise ValueError(f"input must have shape [T, B, I] (3 dims), got {input.dim()} dims {list(input.shape)}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {input.dtype}")
    steps, batch, features = input.shape
    if steps == 0:
        raise ValueError("input must have at least one step (T > 0)")
    return steps, batch, features  # batch 0 is allowed: empty results, as torch.nn


def normalize_lengths(lengths: Union[None, Tensor, Sequence[int]], steps: int, batch: int) -> Optional[Tensor]:
    """lengths as a CPU int64 tensor [B] with 0 <= lengths <= T (or None)."""
    if lengths is None:
        return None
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, (Tensor, Sequence)):
        raise TypeError(f"lengths must be a tensor or a sequence of ints, got {type(lengths).__name__}")
    if not isinstance(lengths, Tensor):
        bad = [value for value in lengths if isinstance(value, bool) or not isinstance(value, numbers.Integral)
               and not (isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_floating_point)]
        if bad:
            raise TypeError(f"lengths must hold integers, got {bad[0]!r} ({type(bad[0]).__name__})")
        lengths = torch.as_tensor([int(value) for value in lengths], dtype=torch.int64)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    lengths = lengths.to("cpu", torch.int64)
    if lengths.dim() != 1 or lengths.numel() != batch:
        raise ValueError(f"lengths must have shape [{batch}] (one per batch row), got {list(lengths.shape)}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lengths.min())}")
    if lengths.numel() and int(lengths.max()) > steps:
        raise ValueError(f"lengths must be <= the number of steps T={steps}, got {int(lengths.max())}")
    return lengths


def _hidden_size_from_weight_ih(weight_ih, gates: int, features: int) -> int:
    """H from weight_ih [gates*H, I], checking its rank and its input width against the input's."""
    if not isinstance(weight_ih, Tensor) or weight_ih.dim() != 2 or weight_ih.shape[0] % gates or weight_ih.shape[0] == 0:
        rows = f"{gates}*hidden_size" if gates > 1 else "hidden_size"
        raise ValueError(f"weight_ih must have shape [{rows}, input_size], got "
                         f"{list(weight_ih.shape) if isinstance(weight_ih, Tensor) else type(weight_ih).__name__}")
    if weight_ih.shape[1] != features:
        raise ValueError(f"input has {features} features (last dim) but weight_ih expects input_size={weight_ih.shape[1]}")
    return weight_ih.shape[0] // gates


def check_recurrent_mask(mask: Optional[Tensor], input: Tensor, batch: int, width: int) -> None:
    """recurrent_mask: [B, width] in the input's dtype and device, or None."""
    if mask is not None:
        _check_tensor(mask, "recurrent_mask", input, (batch, width))


def check_zoneout(keep: Optional[Tensor], name: str, input: Tensor, steps: int, batch: int, width: int) -> None:
    """Zoneout keep weights: [T, B, width] with every entry in [0, 1], or None."""
    if keep is None:
        return
    _check_tensor(keep, name, input, (steps, batch, width))
    if torch.compiler.is_compiling():
        return  # the range check reads the values: eager calls only, no graph break when traced
    if not keep.numel():
        return
    # One reduction pass (comparisons and all() took 8x as long, a tenth of zoneout's cost)
    low, high = (float(v) for v in torch.aminmax(keep))
    if not (low >= 0 and high <= 1):  # NaN fails too
        raise ValueError(f"{name} must hold keep weights in [0, 1] (0/1 draws in training, the zoneout "
                         f"probability in evaluation), got values in [{low}, {high}]")


def check_layer_norm(layer_norm, input: Tensor, gate_size: int, hidden: Optional[int]) -> None:
    """layer_norm: LayerNormWeights with ih, hh [gate_size] and, where `hidden` is given (LSTM),
    cell_weight, cell_bias [hidden] or None; without `hidden` (GRU) both must be None."""
    if layer_norm is None:
        return
    if not isinstance(layer_norm, LayerNormWeights):
        raise TypeError(f"layer_norm must be a rnntl_fast.ops.LayerNormWeights or None, got "
                        f"{type(layer_norm).__name__}")
    _check_tensor(layer_norm.ih, "layer_norm.ih", input, (gate_size,))
    _check_tensor(layer_norm.hh, "layer_norm.hh", input, (gate_size,))
    for name in ("cell_weight", "cell_bias"):
        value = getattr(layer_norm, name)
        if value is None:
            continue
        if hidden is None:
            raise ValueError(f"layer_norm.{name} is for the LSTM's cell state; this cell has none, pass None")
        _check_tensor(value, f"layer_norm.{name}", input, (hidden,))


def check_lstm_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0):
    """Returns (T, B, I, H, P) after checking every shape, dtype and device."""
    steps, batch, features = check_input(input)
    hidden = _hidden_size_from_weight_ih(weight_ih, 4, features)
    out_size = hidden
    if weight_hr is not None:
        if (not isinstance(weight_hr, Tensor) or weight_hr.dim() != 2 or weight_hr.shape[1] != hidden
                or weight_hr.shape[0] == 0):
            raise ValueError(f"weight_hr must have shape [proj_size, {hidden}] with proj_size > 0, got "
                             f"{list(weight_hr.shape) if isinstance(weight_hr, Tensor) else type(weight_hr).__name__}")
        out_size = weight_hr.shape[0]
        _check_tensor(weight_hr, "weight_hr", input, (out_size, hidden))
    _check_tensor(weight_ih, "weight_ih", input, (4 * hidden, features))
    _check_tensor(weight_hh, "weight_hh", input, (4 * hidden, out_size))
    for name, t, shape in (("bias_ih", bias_ih, (4 * hidden,)), ("bias_hh", bias_hh, (4 * hidden,)),
                           ("h0", h0, (batch, out_size)), ("c0", c0, (batch, hidden))):
        if t is not None:
            _check_tensor(t, name, input, shape)
    return steps, batch, features, hidden, out_size


def check_gru_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, gates: int = 3):
    """Returns (T, B, I, H) after checking every shape, dtype and device (gates=1: Elman RNN)."""
    steps, batch, features = check_input(input)
    hidden = _hidden_size_from_weight_ih(weight_ih, gates, features)
    _check_tensor(weight_ih, "weight_ih", input, (gates * hidden, features))
    _check_tensor(weight_hh, "weight_hh", input, (gates * hidden, hidden))
    for name, t, shape in (("bias_ih", bias_ih, (gates * hidden,)), ("bias_hh", bias_hh, (gates * hidden,)),
                           ("h0", h0, (batch, hidden))):
        if t is not None:
            _check_tensor(t, name, input, shape)
    return steps, batch, features, hidden
