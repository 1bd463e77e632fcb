"""Functional API: one LSTM, GRU or Elman RNN layer-direction over a whole sequence.

    output, h_n, c_n = rnntl_fast.ops.lstm(input, weight_ih, weight_hh, bias_ih, bias_hh, ...)
    output, h_n = rnntl_fast.ops.gru(input, weight_ih, weight_hh, bias_ih, bias_hh, ...)
    output, h_n = rnntl_fast.ops.rnn(input, weight_ih, weight_hh, bias_ih, bias_hh, ...)

Weights use torch.nn's names, shapes and gate order. Every backend computes what
`rnntl_fast.ops.reference` defines; `backend` picks which one runs (see
`rnntl_fast.ops.backend.select_backend`); a backend without a kernel for the op or for one
of its optional arguments (regularizers, docs/semantics.md section 10) refuses it with
NotImplementedError (`rnntl_fast.ops.backend.BACKEND_RUNS`).
"""
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from .. import _ext
from . import layer_norm_native, native
from .backend import BACKENDS, check_backend_runs, select_backend
from .checks import (check_gru_arguments, check_layer_norm, check_lstm_arguments, check_recurrent_mask,
                     check_zoneout, normalize_lengths)
from .options import SequenceOptions, sequence_options
from .reference import LayerNormWeights, gru_reference, lstm_reference, rnn_reference

native.register()

Lengths = Union[None, Tensor, Sequence[int]]


def _empty_results(input: Tensor, shapes, tensors, extras) -> Tuple[Tensor, ...]:
    """Results of a batch of zero rows (as torch.nn gives): empty tensors that still depend on
    every input, so a backward through them gives zero gradients, not None."""
    layer_norm = extras.get("layer_norm")
    tensors = tuple(tensors) + tuple(v for k, v in extras.items() if k != "layer_norm")
    tensors += tuple(layer_norm) if layer_norm is not None else ()
    anchor = input.sum() + sum(t.sum() for t in tensors if t is not None)  # a scalar over no rows: 0
    return tuple(anchor.expand(shape).clone() for shape in shapes)


def _given(**arguments):
    """The optional tensor arguments that were passed (not None), by name."""
    return {name: value for name, value in arguments.items() if value is not None}


def _lstm_backend(name: str, layer_norm: bool = False):
    """The function of backend `name` that runs one LSTM layer-direction (layer_norm: a
    layer-normalised one)."""
    if name in ("cpu", "cuda") and layer_norm:  # the native ops dispatch by device
        return layer_norm_native.lstm_layer_norm_native
    if name in ("cpu", "cuda"):
        return native.lstm_native
    if name == "triton":
        from .triton import lstm_triton  # imported on first use: triton is optional
        return lstm_triton
    return lambda *tensors, options, **extras: lstm_reference(*tensors, **options._asdict(), **extras)


def _gru_backend(name: str, layer_norm: bool = False):
    """The function of backend `name` that runs one GRU layer-direction (layer_norm: a
    layer-normalised one)."""
    if name in ("cpu", "cuda") and layer_norm:
        return layer_norm_native.gru_layer_norm_native
    if name in ("cpu", "cuda"):
        return native.gru_native
    if name == "triton":
        from .triton import gru_triton
        return gru_triton
    return lambda *tensors, options, **extras: gru_reference(*tensors, reverse=options.reverse,
                                                             state_clip=options.state_clip,
                                                             gate_clip=options.gate_clip, **extras)


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
    recurrent_mask: Optional[Tensor] = None,
    zoneout_h: Optional[Tensor] = None,
    zoneout_c: Optional[Tensor] = None,
    layer_norm: Optional[LayerNormWeights] = None,
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
        recurrent_mask: [B, P] multiplier of h_{t-1} in the recurrent product W_hh h_{t-1}
            only (variational recurrent dropout: one Bernoulli(1-p)/(1-p) draw per sequence).
        zoneout_h: [T, B, P], zoneout_c: [T, B, H]: zoneout keep weights d in [0, 1]; the
            carried state is d * previous + (1 - d) * new (training: 0/1 draws of
            Bernoulli(z); evaluation: every entry z).
        layer_norm: LayerNormWeights(ih [4H], hh [4H], cell_weight [H] or None,
            cell_bias [H] or None): layer-normalised gate products and cell state.
        backend: "auto", "cpu", "cuda", "triton" or "reference". Which backend runs which of
            recurrent_mask, zoneout_h, zoneout_c and layer_norm: the table BACKEND_RUNS in
            rnntl_fast/ops/backend.py (the reference runs all); the others refuse them by name.
    Returns:
        output [T, B, P], h_n [B, P], c_n [B, H].
    See docs/semantics.md (sections 2-4 and 10) for the math.
    """
    steps, batch, _, hidden, out_size = check_lstm_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh,
                                                             weight_hr, h0, c0)
    check_recurrent_mask(recurrent_mask, input, batch, out_size)
    check_zoneout(zoneout_h, "zoneout_h", input, steps, batch, out_size)
    check_zoneout(zoneout_c, "zoneout_c", input, steps, batch, hidden)
    check_layer_norm(layer_norm, input, 4 * hidden, hidden)
    lengths = normalize_lengths(lengths, steps, batch)
    options = sequence_options(reverse, cell_clip, proj_clip, grad_clip, grad_clip_mode)
    chosen = select_backend(backend, input.device, input.dtype)
    extras = _given(recurrent_mask=recurrent_mask, zoneout_h=zoneout_h, zoneout_c=zoneout_c, layer_norm=layer_norm)
    check_backend_runs("lstm", chosen, backend, **extras)
    if batch == 0:
        return _empty_results(input, [(steps, 0, out_size), (0, out_size), (0, hidden)],
                              (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0), extras)
    run = _lstm_backend(chosen, "layer_norm" in extras)
    return run(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, options=options, **extras)


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
    recurrent_mask: Optional[Tensor] = None,
    zoneout: Optional[Tensor] = None,
    layer_norm: Optional[LayerNormWeights] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One GRU layer-direction over a sequence ("reset after", as torch.nn), with autograd.

    Args:
        input: [T, B, I] (time-major).
        weight_ih: [3H, I]; weight_hh: [3H, H]; bias_ih, bias_hh: [3H] or None. Gates r, z, n.
        h0: [B, H] or None (zeros).
        lengths, reverse, grad_clip, grad_clip_mode, backend: as in `lstm`.
        recurrent_mask: [B, H], as in `lstm`.
        zoneout: [T, B, H] keep weights of h, as `zoneout_h` in `lstm`.
        layer_norm: LayerNormWeights(ih [3H], hh [3H]) (no cell terms): the GRU equations
            with LN(W_ih x_t) * ih + b_ih and LN(W_hh h_{t-1}) * hh + b_hh.
    Returns:
        output [T, B, H], h_n [B, H].
    """
    steps, batch, _, hidden = check_gru_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    check_recurrent_mask(recurrent_mask, input, batch, hidden)
    check_zoneout(zoneout, "zoneout", input, steps, batch, hidden)
    check_layer_norm(layer_norm, input, 3 * hidden, None)
    lengths = normalize_lengths(lengths, steps, batch)
    options = sequence_options(reverse, grad_clip=grad_clip, grad_clip_mode=grad_clip_mode)
    chosen = select_backend(backend, input.device, input.dtype)
    extras = _given(recurrent_mask=recurrent_mask, zoneout=zoneout, layer_norm=layer_norm)
    check_backend_runs("gru", chosen, backend, **extras)
    if batch == 0:
        return _empty_results(input, [(steps, 0, hidden), (0, hidden)], (weight_ih, weight_hh, bias_ih, bias_hh, h0),
                              extras)
    run = _gru_backend(chosen, "layer_norm" in extras)
    return run(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, options=options, **extras)


NONLINEARITIES = ("tanh", "relu")


def _rnn_backend(name: str):
    """The function of backend `name` that runs one Elman RNN layer-direction (BACKEND_RUNS
    has refused the backends without one)."""
    if name in ("cpu", "cuda"):
        return native.rnn_native
    if name == "triton":
        from .triton import rnn_triton
        return rnn_triton
    return lambda *tensors, options, **extras: rnn_reference(*tensors, reverse=options.reverse,
                                                             state_clip=options.state_clip,
                                                             gate_clip=options.gate_clip, **extras)


def rnn(
    input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    lengths: Lengths = None,
    *,
    nonlinearity: str = "tanh",
    reverse: bool = False,
    grad_clip: Optional[float] = None,
    grad_clip_mode: str = "state",
    recurrent_mask: Optional[Tensor] = None,
    zoneout: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One Elman RNN layer-direction (torch.nn.RNN's cell): h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    Args:
        input: [T, B, I] (time-major).
        weight_ih: [H, I]; weight_hh: [H, H]; bias_ih, bias_hh: [H] or None.
        h0: [B, H] or None (zeros).
        nonlinearity: f, "tanh" or "relu".
        lengths, reverse, grad_clip, backend: as in `lstm`; grad_clip_mode "state" clamps
            dL/dh_t, "gates" the gradient of the pre-activation a_t.
        recurrent_mask: [B, H]; zoneout: [T, B, H] keep weights: as in `gru`.
    Returns:
        output [T, B, H], h_n [B, H].
    Backends "cpu" (what "auto" picks for CPU tensors), "cuda", "triton" and "reference" run
    it, with every argument.
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    steps, batch, _, hidden = check_gru_arguments(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, gates=1)
    check_recurrent_mask(recurrent_mask, input, batch, hidden)
    check_zoneout(zoneout, "zoneout", input, steps, batch, hidden)
    lengths = normalize_lengths(lengths, steps, batch)
    options = sequence_options(reverse, grad_clip=grad_clip, grad_clip_mode=grad_clip_mode)
    chosen = select_backend(backend, input.device, input.dtype)
    extras = _given(recurrent_mask=recurrent_mask, zoneout=zoneout)
    check_backend_runs("rnn", chosen, backend, **extras)
    if batch == 0:
        return _empty_results(input, [(steps, 0, hidden), (0, hidden)], (weight_ih, weight_hh, bias_ih, bias_hh, h0),
                              extras)
    return _rnn_backend(chosen)(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, options=options,
                                nonlinearity=nonlinearity, **extras)


def empty_cpu_cache() -> int:
    """Frees the memory the CPU kernels keep for reuse and returns how many bytes that was.

    The CPU kernels take their large tensors (saved reserves, outputs, whole-sequence
    gradient buffers) from blocks that earlier steps gave back, so that a training step does
    not fault in fresh pages (docs/cpu.md, "Memory"). Idle blocks are bounded by
    RNNTL_CPU_BUFFER_CACHE_MB (docs/ENVIRONMENT.md); this frees them now, as
    torch.cuda.empty_cache does for CUDA memory. 0 without the native extension."""
    return int(_ext._C.empty_cpu_cache()) if _ext.HAS_CPU_KERNELS else 0


def cpu_cache_bytes() -> int:
    """Bytes the CPU kernels hold in idle blocks for reuse now (see empty_cpu_cache)."""
    return int(_ext._C.cpu_cache_bytes()) if _ext.HAS_CPU_KERNELS else 0


__all__ = ["lstm", "gru", "rnn", "lstm_reference", "gru_reference", "rnn_reference", "LayerNormWeights",
           "select_backend", "BACKENDS", "SequenceOptions", "sequence_options",
           "empty_cpu_cache", "cpu_cache_bytes"]
