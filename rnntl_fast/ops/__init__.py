"""Functional API: one LSTM or GRU layer-direction over a whole sequence.

    output, h_n, c_n = rnntl_fast.ops.lstm(input, weight_ih, weight_hh, bias_ih, bias_hh, ...)
    output, h_n = rnntl_fast.ops.gru(input, weight_ih, weight_hh, bias_ih, bias_hh, ...)

Weights use torch.nn's names, shapes and gate order. Every backend computes what
`rnntl_fast.ops.reference` defines; `backend` picks which one runs (see
`rnntl_fast.ops.backend.select_backend`).
"""
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from . import cpp
from .backend import BACKENDS, select_backend
from .checks import check_clip, check_grad_clip_mode, check_gru_arguments, check_lstm_arguments, normalize_lengths
from .reference import gru_reference, lstm_reference

cpp.register()

Lengths = Union[None, Tensor, Sequence[int]]


def _triton():
    from . import triton as triton_ops  # imported on first use: triton is optional
    return triton_ops


def lstm(
    input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    weight_hr: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    c0: Optional[Tensor] = None,
    lengths: Lengths = None,
    *,
    reverse: bool = False,
    cell_clip: Optional[float] = None,
    proj_clip: Optional[float] = None,
    grad_clip: Optional[float] = None,
    grad_clip_mode: str = "state",
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer-direction over a sequence, forward with autograd.

    Args:
        input: [T, B, I] (time-major).
        weight_ih: [4H, I]; weight_hh: [4H, P]; bias_ih, bias_hh: [4H] or None. Gates i, f, g, o.
        weight_hr: [P, H] projection (torch.nn's proj_size) or None, then P = H.
        h0: [B, P], c0: [B, H]; None means zeros.
        lengths: [B] ints (tensor or sequence), 0 <= lengths[b] <= T; rows past their length
            keep their state and output zeros. None means every row runs T steps.
        reverse: run t = T-1 .. 0, each row starting at its own last step.
        cell_clip: clamp c_t to [-cell_clip, cell_clip] after each update (ELMo style).
        proj_clip: clamp h_t (after the projection, if any) to [-proj_clip, proj_clip].
        grad_clip: clamp gradients inside the backward to [-grad_clip, grad_clip];
            grad_clip_mode "state" clamps dL/dh_t and dL/dc_t at every step, "gates"
            clamps the gradient of the gate pre-activations (Graves 2013).
        backend: "auto", "cpu", "cuda", "triton" or "reference".
    Returns:
        output [T, B, P], h_n [B, P], c_n [B, H].
    """
    steps, batch, _, _, _ = check_lstm_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0)
    lengths = normalize_lengths(lengths, steps, batch)
    cell_clip = check_clip(cell_clip, "cell_clip")
    proj_clip = check_clip(proj_clip, "proj_clip")
    grad_clip = check_clip(grad_clip, "grad_clip")
    check_grad_clip_mode(grad_clip_mode)
    chosen = select_backend(backend, input.device, input.dtype)
    args = (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, bool(reverse), cell_clip,
            proj_clip, grad_clip, grad_clip_mode)
    if chosen in ("cpu", "cuda"):
        return cpp.lstm_native(*args)
    if chosen == "triton":
        return _triton().lstm_triton(*args)
    return lstm_reference(*args)


def gru(
    input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    lengths: Lengths = None,
    *,
    reverse: bool = False,
    grad_clip: Optional[float] = None,
    grad_clip_mode: str = "state",
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One GRU layer-direction over a sequence ("reset after", as torch.nn), with autograd.

    Args:
        input: [T, B, I] (time-major).
        weight_ih: [3H, I]; weight_hh: [3H, H]; bias_ih, bias_hh: [3H] or None. Gates r, z, n.
        h0: [B, H] or None (zeros).
        lengths, reverse, grad_clip, grad_clip_mode, backend: as in `lstm`.
    Returns:
        output [T, B, H], h_n [B, H].
    """
    steps, batch, _, _ = check_gru_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    lengths = normalize_lengths(lengths, steps, batch)
    grad_clip = check_clip(grad_clip, "grad_clip")
    check_grad_clip_mode(grad_clip_mode)
    chosen = select_backend(backend, input.device, input.dtype)
    args = (input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, bool(reverse), grad_clip, grad_clip_mode)
    if chosen in ("cpu", "cuda"):
        return cpp.gru_native(*args)
    if chosen == "triton":
        return _triton().gru_triton(*args)
    return gru_reference(*args)


__all__ = ["lstm", "gru", "lstm_reference", "gru_reference", "select_backend", "BACKENDS"]
