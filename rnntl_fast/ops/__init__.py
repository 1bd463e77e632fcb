"""Functional API: one LSTM or GRU layer-direction over a whole sequence.

    output, h_n, c_n = rnntl_fast.ops.lstm(input, weight_ih, weight_hh, bias_ih, bias_hh, ...)
    output, h_n = rnntl_fast.ops.gru(input, weight_ih, weight_hh, bias_ih, bias_hh, ...)

Weights use torch.nn's names, shapes and gate order. Every backend computes what
`rnntl_fast.ops.reference` defines; `backend` picks which one runs (see
`rnntl_fast.ops.backend.select_backend`).
"""
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from . import native
from .backend import BACKENDS, select_backend
from .checks import check_gru_arguments, check_lstm_arguments, normalize_lengths
from .options import SequenceOptions, sequence_options
from .reference import gru_reference, lstm_reference

native.register()

Lengths = Union[None, Tensor, Sequence[int]]


def _empty_results(input: Tensor, shapes, tensors) -> Tuple[Tensor, ...]:
    """Results of a batch of zero rows (as torch.nn gives): empty tensors that still depend on
    every input, so a backward through them gives zero gradients, not None."""
    anchor = input.sum() + sum(t.sum() for t in tensors if t is not None)  # a scalar over no rows: 0
    return tuple(anchor.expand(shape).clone() for shape in shapes)


def _lstm_backend(name: str):
    """The function of backend `name` that runs one LSTM layer-direction."""
    if name in ("cpu", "cuda"):
        return native.lstm_native
    if name == "triton":
        from .triton import lstm_triton  # imported on first use: triton is optional
        return lstm_triton
    return lambda *tensors, options: lstm_reference(*tensors, **options._asdict())


def _gru_backend(name: str):
    """The function of backend `name` that runs one GRU layer-direction."""
    if name in ("cpu", "cuda"):
        return native.gru_native
    if name == "triton":
        from .triton import gru_triton
        return gru_triton
    return lambda *tensors, options: gru_reference(*tensors, reverse=options.reverse, state_clip=options.state_clip,
                                                   gate_clip=options.gate_clip)


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
    steps, batch, _, hidden, out_size = check_lstm_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh,
                                                             weight_hr, h0, c0)
    lengths = normalize_lengths(lengths, steps, batch)
    options = sequence_options(reverse, cell_clip, proj_clip, grad_clip, grad_clip_mode)
    run = _lstm_backend(select_backend(backend, input.device, input.dtype))
    if batch == 0:
        return _empty_results(input, [(steps, 0, out_size), (0, out_size), (0, hidden)],
                              (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0))
    return run(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, options=options)


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
    steps, batch, _, hidden = check_gru_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    lengths = normalize_lengths(lengths, steps, batch)
    options = sequence_options(reverse, grad_clip=grad_clip, grad_clip_mode=grad_clip_mode)
    run = _gru_backend(select_backend(backend, input.device, input.dtype))
    if batch == 0:
        return _empty_results(input, [(steps, 0, hidden), (0, hidden)], (weight_ih, weight_hh, bias_ih, bias_hh, h0))
    return run(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, options=options)


__all__ = ["lstm", "gru", "lstm_reference", "gru_reference", "select_backend", "BACKENDS", "SequenceOptions",
           "sequence_options"]
