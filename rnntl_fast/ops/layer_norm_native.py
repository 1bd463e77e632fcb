"""The native ops of the layer-normalised cells,
`torch.ops.rnntl_fast.layer_norm_{lstm,gru}_{forward,backward}` (the `cpu` and `cuda`
backends of rnntl_fast.ops.lstm / gru with `layer_norm`; docs/semantics.md section 10): their
fake (meta) implementations, their autograd, and the calls that run them. The schemas live in
csrc/ops.cpp, the kernels in csrc/cpu/layer_norm_cpu.cpp (docs/cpu.md, "Layer
normalisation", describes the reserve the forward returns and the backward reads) and
csrc/cuda/layer_norm_cuda.cpp (docs/cuda.md, "Layer normalisation": the same shapes, padded
rows).

The contract is the plain ops' (rnntl_fast/ops/autograd.py): the forward returns its results
and then the reserve (empty unless save_for_backward); the backward takes the results'
gradients (each optional), the forward's tensors, its output and reserve, the options and an
output_mask, and returns one gradient per entry of output_mask (empty where it is off, so a
frozen weight costs no product). Masks and zoneout keep weights get no gradient."""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .autograd import _save, gru_gradients_like, lstm_gradients_like, needs_grad, register_autograd
from .native import HALF_DTYPES, _widened
from .options import SequenceOptions
from .reference import LayerNormWeights


class LayerNormLstmForwardCall(NamedTuple):
    """The arguments of rnntl_fast::layer_norm_lstm_forward, by name."""
    input: Tensor                         # [T, B, I]
    weight_ih: Tensor                     # [4H, I]
    weight_hh: Tensor                     # [4H, P]
    bias_ih: Optional[Tensor]             # [4H]
    bias_hh: Optional[Tensor]             # [4H]
    weight_hr: Optional[Tensor]           # [P, H]
    h0: Optional[Tensor]                  # [B, P]
    c0: Optional[Tensor]                  # [B, H]
    lengths: Optional[Tensor]             # [B] CPU int64
    recurrent_mask: Optional[Tensor]      # [B, P]
    zoneout_h: Optional[Tensor]           # [T, B, P] keep weights
    zoneout_c: Optional[Tensor]           # [T, B, H] keep weights
    layer_norm_ih: Tensor                 # [4H] gain of LN(W_ih x)
    layer_norm_hh: Tensor                 # [4H] gain of LN(W_hh h)
    layer_norm_cell_weight: Optional[Tensor]  # [H] gain of LN(c)
    layer_norm_cell_bias: Optional[Tensor]    # [H] bias of LN(c)
    reverse: bool
    cell_clip: float
    proj_clip: float
    state_clip: float
    gate_clip: float
    save_for_backward: bool


class LayerNormGruForwardCall(NamedTuple):
    """The arguments of rnntl_fast::layer_norm_gru_forward, by name."""
    input: Tensor                     # [T, B, I]
    weight_ih: Tensor                 # [3H, I]
    weight_hh: Tensor                 # [3H, H]
    bias_ih: Optional[Tensor]         # [3H]
    bias_hh: Optional[Tensor]         # [3H]
    h0: Optional[Tensor]              # [B, H]
    lengths: Optional[Tensor]         # [B] CPU int64
    recurrent_mask: Optional[Tensor]  # [B, H]
    zoneout: Optional[Tensor]         # [T, B, H] keep weights
    layer_norm_ih: Tensor             # [3H]
    layer_norm_hh: Tensor             # [3H]
    reverse: bool
    state_clip: float
    gate_clip: float
    save_for_backward: bool


# Which forward input each backward result is the gradient of (the LSTM's bias result serves
# bias_ih and bias_hh alike).
LSTM_GRADIENT_INPUTS = ((0,), (1,), (2,), (3, 4), (5,), (6,), (7,), (12,), (13,), (14,), (15,))
GRU_GRADIENT_INPUTS = ((0,), (1,), (2,), (3,), (4,), (5,), (9,), (10,))


def _routed(grads, gradient_inputs, need):
    """The backward op's results as autograd's per-input gradients (None where not needed)."""
    out = [None] * len(need)
    for grad, inputs in zip(grads, gradient_inputs):
        for n in inputs:
            if need[n]:
                out[n] = grad
    return tuple(out)


def _lstm_forward_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, recurrent_mask,
                       zoneout_h, zoneout_c, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight,
                       layer_norm_cell_bias, reverse, cell_clip, proj_clip, state_clip, gate_clip, save_for_backward):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    keep = bool(save_for_backward)
    reserve = lambda *shape, kept=keep: input.new_empty(shape if kept else (0,))  # noqa: E731
    return (input.new_empty(steps, batch, out_size), input.new_empty(batch, out_size), input.new_empty(batch, hidden),
            reserve(steps, batch, 4 * hidden), reserve(steps, batch, 8 * hidden), reserve(steps, batch, 3 * hidden),
            reserve(steps, batch, 3), reserve(steps, batch, out_size, kept=keep and proj_clip > 0))


def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths,
                        recurrent_mask, zoneout_h, zoneout_c, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight,
                        layer_norm_cell_bias, output, gates, normalized, cells, inverse_std, hidden_pre_clip, reverse,
                        cell_clip, proj_clip, state_clip, gate_clip, output_mask):
    # The plain LSTM's seven gradients, then the gains' (and the cell bias').
    hidden = weight_ih.shape[0] // 4
    gains = [(4 * hidden,), (4 * hidden,), (hidden,), (hidden,)]
    return (*lstm_gradients_like(input, weight_ih, weight_hh, weight_hr, output_mask[:7]),
            *(input.new_empty(shape if need else (0,)) for shape, need in zip(gains, output_mask[7:])))


def _gru_forward_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, recurrent_mask, zoneout,
                      layer_norm_ih, layer_norm_hh, reverse, state_clip, gate_clip, save_for_backward):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    reserve = lambda *shape: input.new_empty(shape if save_for_backward else (0,))  # noqa: E731
    return (input.new_empty(steps, batch, hidden), input.new_empty(batch, hidden), reserve(steps, batch, 3 * hidden),
            reserve(steps, batch, 6 * hidden), reserve(steps, batch, 2))


def _gru_backward_fake(grad_output, grad_h_n, input, weight_ih, weight_hh, bias_hh, h0, lengths, recurrent_mask,
                       zoneout, layer_norm_ih, layer_norm_hh, output, gates, normalized, inverse_std, reverse,
                       state_clip, gate_clip, output_mask):
    # The plain GRU's six gradients, then the two gains'.
    gains = (3 * (weight_ih.shape[0] // 3),)
    return (*gru_gradients_like(input, weight_ih, weight_hh, output_mask[:6]),
            *(input.new_empty(gains if need else (0,)) for need in output_mask[6:]))


def _lstm_setup_context(ctx, inputs, output):
    call = LayerNormLstmForwardCall(*inputs)
    _save(ctx, (call.input, call.weight_ih, call.weight_hh, call.weight_hr, call.h0, call.c0, call.lengths,
                call.recurrent_mask, call.zoneout_h, call.zoneout_c, call.layer_norm_ih, call.layer_norm_hh,
                call.layer_norm_cell_weight, call.layer_norm_cell_bias), output, 3, reserve_includes_output=True)
    ctx.options = (call.reverse, call.cell_clip, call.proj_clip, call.state_clip, call.gate_clip)


def _lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, *_reserve_grads):
    need = ctx.needs_input_grad
    mask = [any(need[n] for n in inputs) for inputs in LSTM_GRADIENT_INPUTS]
    grads = torch.ops.rnntl_fast.layer_norm_lstm_backward(grad_output, grad_h_n, grad_c_n, *ctx.saved_tensors,
                                                          *ctx.options, mask)
    return _routed(grads, LSTM_GRADIENT_INPUTS, need)


def _gru_setup_context(ctx, inputs, output):
    call = LayerNormGruForwardCall(*inputs)
    _save(ctx, (call.input, call.weight_ih, call.weight_hh, call.bias_hh, call.h0, call.lengths, call.recurrent_mask,
                call.zoneout, call.layer_norm_ih, call.layer_norm_hh), output, 2, reserve_includes_output=True)
    ctx.options = (call.reverse, call.state_clip, call.gate_clip)


def _gru_backward(ctx, grad_output, grad_h_n, *_reserve_grads):
    need = ctx.needs_input_grad
    mask = [any(need[n] for n in inputs) for inputs in GRU_GRADIENT_INPUTS]
    grads = torch.ops.rnntl_fast.layer_norm_gru_backward(grad_output, grad_h_n, *ctx.saved_tensors, *ctx.options,
                                                         mask)
    return _routed(grads, GRU_GRADIENT_INPUTS, need)


def register(no_double_backward, no_double_backward_setup) -> None:
    """Registers the fakes and autograd of the layer-norm ops (called once by native.register,
    which passes its refusal of double backward for the backward ops)."""
    for cell in ("lstm", "gru"):
        forward_fake, backward_fake = {"lstm": (_lstm_forward_fake, _lstm_backward_fake),
                                       "gru": (_gru_forward_fake, _gru_backward_fake)}[cell]
        torch.library.register_fake(f"rnntl_fast::layer_norm_{cell}_forward")(forward_fake)
        torch.library.register_fake(f"rnntl_fast::layer_norm_{cell}_backward")(backward_fake)
        register_autograd(f"rnntl_fast::layer_norm_{cell}_backward", no_double_backward,
                          setup_context=no_double_backward_setup)
    register_autograd("rnntl_fast::layer_norm_lstm_forward", _lstm_backward, setup_context=_lstm_setup_context)
    register_autograd("rnntl_fast::layer_norm_gru_forward", _gru_backward, setup_context=_gru_setup_context)


def lstm_layer_norm_native(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                           bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], h0: Optional[Tensor],
                           c0: Optional[Tensor], lengths: Optional[Tensor], options: SequenceOptions,
                           recurrent_mask: Optional[Tensor] = None, zoneout_h: Optional[Tensor] = None,
                           zoneout_c: Optional[Tensor] = None,
                           layer_norm: Optional[LayerNormWeights] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The `cpu` and `cuda` backends of rnntl_fast.ops.lstm with layer_norm (arguments already checked
    there). Shapes as rnntl_fast.ops.lstm: recurrent_mask [B, P], zoneout_h [T, B, P],
    zoneout_c [T, B, H], layer_norm (ih, hh [4H]; cell_weight, cell_bias [H] or None).
    Returns output [T, B, P], h_n [B, P], c_n [B, H]."""
    if layer_norm is None:
        raise ValueError("lstm_layer_norm_native needs layer_norm (rnntl_fast.ops.LayerNormWeights)")
    if input.device.type == "cpu" and input.dtype in HALF_DTYPES:  # the CUDA kernels take half types
        tensors = _widened((input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0))
        mask, keep_h, keep_c = _widened((recurrent_mask, zoneout_h, zoneout_c))
        norms = LayerNormWeights(*_widened(layer_norm))
        results = lstm_layer_norm_native(*tensors, lengths, options, recurrent_mask=mask, zoneout_h=keep_h,
                                         zoneout_c=keep_c, layer_norm=norms)
        return tuple(r.to(input.dtype) for r in results)
    save = needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, *layer_norm)
    out, h_n, c_n, *_reserve = torch.ops.rnntl_fast.layer_norm_lstm_forward(
        input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h,
        zoneout_c, layer_norm.ih, layer_norm.hh, layer_norm.cell_weight, layer_norm.cell_bias, options.reverse,
        options.cell_clip, options.proj_clip, options.state_clip, options.gate_clip, save)
    return out, h_n, c_n


def gru_layer_norm_native(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                          bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor],
                          options: SequenceOptions, recurrent_mask: Optional[Tensor] = None,
                          zoneout: Optional[Tensor] = None,
                          layer_norm: Optional[LayerNormWeights] = None) -> Tuple[Tensor, Tensor]:
    """The `cpu` and `cuda` backends of rnntl_fast.ops.gru with layer_norm (arguments already checked
    there). Shapes as rnntl_fast.ops.gru: recurrent_mask [B, H], zoneout [T, B, H],
    layer_norm (ih, hh [3H]). Returns output [T, B, H], h_n [B, H]."""
    if layer_norm is None:
        raise ValueError("gru_layer_norm_native needs layer_norm (rnntl_fast.ops.LayerNormWeights)")
    if input.device.type == "cpu" and input.dtype in HALF_DTYPES:  # the CUDA kernels take half types
        tensors = _widened((input, weight_ih, weight_hh, bias_ih, bias_hh, h0))
        mask, keep = _widened((recurrent_mask, zoneout))
        norms = LayerNormWeights(*_widened(layer_norm))
        results = gru_layer_norm_native(*tensors, lengths, options, recurrent_mask=mask, zoneout=keep,
                                        layer_norm=norms)
        return tuple(r.to(input.dtype) for r in results)
    save = needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, layer_norm.ih, layer_norm.hh)
    out, h_n, *_reserve = torch.ops.rnntl_fast.layer_norm_gru_forward(
        input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, recurrent_mask, zoneout, layer_norm.ih,
        layer_norm.hh, options.reverse, options.state_clip, options.gate_clip, save)
    return out, h_n
