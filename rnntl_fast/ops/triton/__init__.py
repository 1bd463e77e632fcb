"""The `triton` backend: Triton kernels for one LSTM / GRU / Elman RNN layer-direction, forward
and backward, registered as torch ops `rnntl_fast::triton_{lstm,gru,rnn}_{forward,backward}`.

rnntl_fast.ops imports this package on first use only, so that rnntl_fast imports without
triton. Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set
before import). Supported dtypes: float32, float16, bfloat16 (float32 math inside).

Two strategies (docs/triton.md): "sequence" (one launch for the whole recurrence, weights
on chip; small hidden sizes) and "step" (a launch per step; any size). The choice is
automatic by size; force one per call with ``strategy="sequence" | "step"`` or for every
call with the environment variable RNNTL_TRITON_STRATEGY.
"""
from typing import Optional, Tuple

from torch import Tensor

from ..autograd import needs_grad
from ..options import SequenceOptions
from ..reference import LayerNormWeights
from . import config
from .ops import (triton_gru_backward, triton_gru_forward, triton_lstm_backward, triton_lstm_forward,
                  triton_rnn_backward, triton_rnn_forward)


def _check_dtype(input: Tensor) -> None:
    if input.dtype not in config.SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports float32, float16 and bfloat16 input, got {input.dtype}; "
                        "use backend='cpu' or 'reference' for float64")


def _layer_norm_strategy(op: str, chosen: str, hidden: int, out_size: int, dtype) -> None:
    """Layer normalisation runs in the sequence strategy only: its statistics span a whole gate
    row, which only a sequence program holds (docs/triton.md). Refuses the sizes the automatic
    choice (or RNNTL_TRITON_STRATEGY / strategy=) gives to the step strategy, naming them."""
    if chosen != "sequence":
        raise NotImplementedError(
            f"rnntl_fast.ops.{op}: backend 'triton' runs layer_norm in its sequence strategy only, which the "
            f"automatic choice takes up to hidden and output sizes {config.SEQUENCE_MAX_WIDTH.get(dtype, 0)} in "
            f"{dtype} (strategy='sequence' forces it up to {config.SEQUENCE_HARD_MAX_WIDTH}); got hidden={hidden}, "
            f"output={out_size} on strategy {chosen!r}; pass backend='reference'")


def lstm_triton(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
                lengths: Optional[Tensor], options: SequenceOptions, *, recurrent_mask: Optional[Tensor] = None,
                zoneout_h: Optional[Tensor] = None, zoneout_c: Optional[Tensor] = None,
                layer_norm: Optional[LayerNormWeights] = None,
                strategy: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The `triton` backend of rnntl_fast.ops.lstm (arguments already checked there).

    Args:
        input: [T, B, I]; weight_ih: [4H, I]; weight_hh: [4H, P]; bias_ih, bias_hh: [4H] or None;
        weight_hr: [P, H] or None (then P = H); h0: [B, P] or None; c0: [B, H] or None;
        lengths: CPU int64 [B] or None; options: reverse and clip limits (rnntl_fast.ops.options).
        recurrent_mask: [B, P] in the input dtype or None: multiplies h_{t-1} in W_hh h_{t-1}
            only (recurrent dropout, docs/semantics.md section 10).
        zoneout_h: [T, B, P], zoneout_c: [T, B, H] keep weights of h and c in the input dtype, or None
            (zoneout, docs/semantics.md section 10).
        layer_norm: LayerNormWeights (ih, hh [4H]; cell_weight, cell_bias [H] or None) or None;
            runs in the sequence strategy only (_layer_norm_strategy).
        strategy: None (RNNTL_TRITON_STRATEGY, default "auto"), "auto", "sequence" or "step".
    Returns:
        output [T, B, P], h_n [B, P], c_n [B, H].
    """
    _check_dtype(input)
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    chosen = config.choose_strategy(hidden, out_size, input.dtype, strategy)
    norm = layer_norm if layer_norm is not None else LayerNormWeights(None, None)
    if layer_norm is not None:
        _layer_norm_strategy("lstm", chosen, hidden, out_size, input.dtype)
    save = needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, *norm)
    output, h_n, c_n, *_reserve = triton_lstm_forward(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0,
                                                      c0, lengths, recurrent_mask, zoneout_h, zoneout_c, *norm,
                                                      options.reverse, options.cell_clip, options.proj_clip,
                                                      options.state_clip, options.gate_clip, save, chosen)
    return output, h_n, c_n


def gru_triton(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
               bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor], options: SequenceOptions,
               *, recurrent_mask: Optional[Tensor] = None, zoneout: Optional[Tensor] = None,
               layer_norm: Optional[LayerNormWeights] = None, strategy: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """The `triton` backend of rnntl_fast.ops.gru (arguments already checked there).

    Args:
        input: [T, B, I]; weight_ih: [3H, I]; weight_hh: [3H, H]; bias_ih, bias_hh: [3H] or None;
        h0: [B, H] or None; lengths: CPU int64 [B] or None; options: reverse and clip limits.
        recurrent_mask: [B, H] in the input dtype or None, as in lstm_triton.
        zoneout: [T, B, H] keep weights of h in the input dtype, or None (docs/semantics.md section 10).
        layer_norm: LayerNormWeights (ih, hh [3H]) or None; sequence strategy only, as in lstm_triton.
        strategy: None (RNNTL_TRITON_STRATEGY, default "auto"), "auto", "sequence" or "step".
    Returns:
        output [T, B, H], h_n [B, H].
    """
    _check_dtype(input)
    hidden = weight_ih.shape[0] // 3
    chosen = config.choose_strategy(hidden, hidden, input.dtype, strategy)
    gains = (layer_norm.ih, layer_norm.hh) if layer_norm is not None else (None, None)
    if layer_norm is not None:
        _layer_norm_strategy("gru", chosen, hidden, hidden, input.dtype)
    save = needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, *gains)
    output, h_n, *_reserve = triton_gru_forward(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths,
                                                recurrent_mask, zoneout, *gains, options.reverse, options.state_clip,
                                                options.gate_clip, save, chosen)
    return output, h_n


def rnn_triton(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
               bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor], options: SequenceOptions,
               nonlinearity: str = "tanh", *, recurrent_mask: Optional[Tensor] = None,
               zoneout: Optional[Tensor] = None, strategy: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """The `triton` backend of rnntl_fast.ops.rnn (arguments already checked there).

    Args:
        input: [T, B, I]; weight_ih: [H, I]; weight_hh: [H, H]; bias_ih, bias_hh: [H] or None;
        h0: [B, H] or None; lengths: CPU int64 [B] or None; options: reverse and clip limits.
        nonlinearity: "tanh" or "relu".
        recurrent_mask: [B, H] in the input dtype or None, as in lstm_triton.
        zoneout: [T, B, H] keep weights of h in the input dtype, or None (docs/semantics.md section 10).
        strategy: None (RNNTL_TRITON_STRATEGY, default "auto"), "auto", "sequence" or "step".
    Returns:
        output [T, B, H], h_n [B, H].
    """
    _check_dtype(input)
    hidden = weight_ih.shape[0]
    chosen = config.choose_strategy(hidden, hidden, input.dtype, strategy)
    save = needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    output, h_n, *_reserve = triton_rnn_forward(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths,
                                                recurrent_mask, zoneout, nonlinearity == "relu", options.reverse,
                                                options.state_clip, options.gate_clip, save, chosen)
    return output, h_n


__all__ = ["lstm_triton", "gru_triton", "rnn_triton", "triton_lstm_forward", "triton_lstm_backward",
           "triton_gru_forward", "triton_gru_backward", "triton_rnn_forward", "triton_rnn_backward"]
