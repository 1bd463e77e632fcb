"""The registered Triton ops, `rnntl_fast::triton_{lstm,gru,rnn}_{forward,backward}`
(contract: rnntl_fast/ops/autograd.py; math: docs/semantics.md).

Each forward computes the input projection of every step in one matmul, then runs the
recurrence with the chosen strategy (sequence.py or step.py). Each backward runs the
backward recurrence with the same strategy, which yields the gradients of the gate
pre-activations; every weight gradient is then one matmul over all steps, skipped for
weights that need none. Shapes: T steps, B batch rows, I input features, H cells,
P outputs (P = proj_size with weight_hr, else H). The reserve is float32 (launch.py).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..autograd import RnnForwardCall, _save, gru_gradients_like, lstm_gradients_like, rnn_gradients_like
from ..reference import LAYER_NORM_EPS
from . import sequence, step
from .launch import (GruReserve, LayerNormGains, LstmReserve, RnnReserve, clip_switches, float32_state,
                     previous_states, reserve, times_recurrent_mask, without_padded_steps)

# The launchers of each strategy, by the name the ops take.
_STRATEGIES = {"sequence": sequence, "step": step}


def _device_lengths(lengths: Optional[Tensor], device) -> Optional[Tensor]:
    return lengths.to(device) if lengths is not None else None


def _contiguous(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return tensor.contiguous() if tensor is not None else None


def _gradient_or_zeros(grad: Optional[Tensor], like_shape, like: Tensor) -> Tensor:
    """An incoming gradient as a contiguous tensor; None (the loss does not use that result) as zeros."""
    if grad is None:
        return torch.zeros(like_shape, device=like.device, dtype=like.dtype)
    return grad.contiguous()


# ---------------------------------------------------------------------------------------
# Layer normalisation of the input side (docs/semantics.md section 10): LN(W_ih x_t) for
# every step at once, in torch, before the recurrence and after it
# ---------------------------------------------------------------------------------------


def _check_layer_norm_pair(op: str, ih: Optional[Tensor], hh: Optional[Tensor], strategy: str) -> bool:
    """Whether the call is layer-normalised: layer_norm_ih and layer_norm_hh come together,
    and only the sequence strategy holds the whole gate row the statistics need."""
    if (ih is None) != (hh is None):
        raise ValueError(f"rnntl_fast::{op}: layer_norm_ih and layer_norm_hh must both be given or both be None")
    if ih is not None and strategy != "sequence":
        raise NotImplementedError(f"rnntl_fast::{op}: layer_norm runs in the sequence strategy only, got {strategy!r}")
    return ih is not None


def _layer_norm_rows(u: Tensor) -> Tuple[Tensor, Tensor]:
    """(LN(u), 1 / sqrt(var + eps)) over the last dimension of a float32 tensor u [..., G]
    (torch's layer_norm: the forward's values, which the reference's are)."""
    var, _ = torch.var_mean(u, -1, unbiased=False, keepdim=True)
    return F.layer_norm(u, u.shape[-1:], eps=LAYER_NORM_EPS), torch.rsqrt(var + LAYER_NORM_EPS)


def _layer_norm_backward(grad: Tensor, normalized: Tensor, rstd: Tensor) -> Tensor:
    """dL/du of n = LN(u) from dL/dn (grad), n and rstd, all [..., G] float32 (rstd [..., 1])."""
    return rstd * (grad - grad.mean(-1, keepdim=True) - normalized * (grad * normalized).mean(-1, keepdim=True))


def _input_gates(input: Tensor, weight_ih: Tensor, bias_ih: Optional[Tensor], lengths: Optional[Tensor],
                 layer_norm_ih: Optional[Tensor]) -> Tensor:
    """[T, B, G] contiguous: W_ih x_t + b_ih in the input dtype, or LN(W_ih x_t) * g_ih + b_ih in
    float32 (the kernels widen them anyway; rounded to float16, these normalised gates made the
    float16 LSTM's gradients exceed the error rule, docs/triton.md). Padded steps are zeroed
    first: what they hold must not reach the saved gates, whose products the backward forms at
    every step."""
    x = without_padded_steps(input, lengths)
    if layer_norm_ih is None:
        return F.linear(x, weight_ih, bias_ih).contiguous()
    product = F.linear(x.float(), weight_ih.float())
    gates = F.layer_norm(product, product.shape[-1:], eps=LAYER_NORM_EPS) * layer_norm_ih.float()
    if bias_ih is not None:
        gates = gates + bias_ih.float()
    return gates.contiguous()


def _input_side_gradients(grad_gates: Tensor, input: Tensor, weight_ih: Tensor, lengths: Optional[Tensor],
                          layer_norm_ih: Optional[Tensor], need_input: bool, need_weight_ih: bool,
                          need_gain: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of input [T, B, I], weight_ih [G, I] and layer_norm_ih [G] (input.new_empty(0) where not
    needed), in the input dtype, from dL/d(input gates) grad_gates [T·B, G] float32."""
    steps, batch, features = input.shape
    x = without_padded_steps(input, lengths).reshape(steps * batch, features)  # as in the forward
    grad_gain = input.new_empty(0)
    grad_product = grad_gates
    if layer_norm_ih is not None and (need_input or need_weight_ih or need_gain):
        normalized, rstd = _layer_norm_rows(F.linear(x.float(), weight_ih.float()))
        if need_gain:
            grad_gain = (grad_gates * normalized).sum(0).to(input.dtype)
        grad_product = _layer_norm_backward(grad_gates * layer_norm_ih.float(), normalized, rstd)
    grad_input = without_padded_steps((grad_product @ weight_ih.float()).reshape(steps, batch, features),
                                      lengths).to(input.dtype) if need_input else input.new_empty(0)
    grad_weight_ih = (grad_product.t() @ x.float()).to(input.dtype) if need_weight_ih else input.new_empty(0)
    return grad_input, grad_weight_ih, grad_gain


def _hidden_gain_gradient(grad_gates: Tensor, normalized_products: Tensor, like: Tensor, need: bool) -> Tensor:
    """dL/dg_hh [G] = Σ dL/d(LN(p) * g_hh) · LN(p) over steps and rows, or input.new_empty(0)."""
    if not need or normalized_products.numel() == 0:
        return like.new_empty(0)
    return (grad_gates * normalized_products.reshape(grad_gates.shape)).sum(0).to(like.dtype)


# ---------------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------------

LstmForwardResult = Tuple[(Tensor,) * (3 + len(LstmReserve._fields))]


@torch.library.custom_op("rnntl_fast::triton_lstm_forward", mutates_args=())
def triton_lstm_forward(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                        bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], h0: Optional[Tensor],
                        c0: Optional[Tensor], lengths: Optional[Tensor], recurrent_mask: Optional[Tensor],
                        zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor], layer_norm_ih: Optional[Tensor],
                        layer_norm_hh: Optional[Tensor], layer_norm_cell_weight: Optional[Tensor],
                        layer_norm_cell_bias: Optional[Tensor], reverse: bool, cell_clip: float, proj_clip: float,
                        state_clip: float, gate_clip: float, save_for_backward: bool,
                        strategy: str) -> LstmForwardResult:
    """LSTM layer-direction forward. Returns output [T, B, P], h_n [B, P], c_n [B, H] and the
    float32 reserve (launch.LstmReserve), each of its tensors input.new_empty(0) where not kept.

    input: [T, B, I]; weight_ih: [4H, I]; weight_hh: [4H, P]; bias_ih, bias_hh: [4H] or None;
    weight_hr: [P, H] or None; h0: [B, P] or None; c0: [B, H] or None; lengths: [B] CPU int64
    or None; recurrent_mask: [B, P] in the input dtype or None (multiplies h_{t-1} in
    W_hh h_{t-1} only); zoneout_h: [T, B, P], zoneout_c: [T, B, H] keep weights in the input
    dtype, or None; layer_norm_ih, layer_norm_hh: [4H] gains of LN(W_ih x_t) and
    LN(W_hh h_{t-1}), both or neither (sequence strategy only); layer_norm_cell_weight,
    layer_norm_cell_bias: [H] gain and bias of LN(c~_t), or None (gain 1, bias 0); limits:
    floats, 0 = off; strategy: "sequence" or "step". Math: docs/semantics.md sections 2-4, 10."""
    normed = _check_layer_norm_pair("triton_lstm_forward", layer_norm_ih, layer_norm_hh, strategy)
    hidden = weight_ih.shape[0] // 4
    input_gates = _input_gates(input, weight_ih, bias_ih, lengths, layer_norm_ih)
    # Always a bias pointer: a no-bias specialisation of the float32 LSTM sequence
    # kernel crashes LLVM's SLP vectorizer (triton 3.9.0, sm_90), and zeros cost nothing.
    bias_hh = bias_hh.contiguous() if bias_hh is not None else input.new_zeros(4 * hidden)
    norm = _lstm_norm_gains(layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, input) if normed else None
    output, h_n, c_n, kept = _STRATEGIES[strategy].lstm_forward(
        input_gates, weight_hh.contiguous(), bias_hh, weight_hr.contiguous() if weight_hr is not None else None, h0,
        c0, _device_lengths(lengths, input.device), _contiguous(recurrent_mask), _contiguous(zoneout_h),
        _contiguous(zoneout_c), norm, reverse, cell_clip, proj_clip, bool(save_for_backward))
    return (output, h_n, c_n, *kept)


def _lstm_norm_gains(layer_norm_hh: Tensor, cell_weight: Optional[Tensor], cell_bias: Optional[Tensor],
                     like: Tensor) -> LayerNormGains:
    """The recurrence's layer-norm terms, an absent cell gain as ones and bias as zeros."""
    hidden = layer_norm_hh.shape[0] // 4
    return LayerNormGains(layer_norm_hh.contiguous(),
                          cell_weight.contiguous() if cell_weight is not None else like.new_ones(hidden),
                          cell_bias.contiguous() if cell_bias is not None else like.new_zeros(hidden))


@triton_lstm_forward.register_fake
def _(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h, zoneout_c,
      layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, reverse, cell_clip, proj_clip,
      state_clip, gate_clip, save_for_backward, strategy):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    keep, device = bool(save_for_backward), input.device
    switches = clip_switches(cell_clip=cell_clip, proj_clip=proj_clip)
    normed = keep and layer_norm_ih is not None
    kept = LstmReserve(reserve(keep, steps, batch, 4 * hidden, device=device),
                       reserve(keep, steps, batch, hidden, device=device),
                       reserve(keep, steps, batch, out_size, device=device),
                       reserve(keep and switches["CELL_CLIP"], steps, batch, hidden, device=device),
                       reserve(keep and switches["PROJ_CLIP"], steps, batch, out_size, device=device),
                       reserve(keep and zoneout_c is not None, steps, batch, hidden, device=device),
                       reserve(normed, steps, batch, 4 * hidden, device=device),
                       reserve(normed, steps, batch, device=device),
                       reserve(normed, steps, batch, hidden, device=device),
                       reserve(normed, steps, batch, device=device))
    return (input.new_empty(steps, batch, out_size), input.new_empty(batch, out_size), input.new_empty(batch, hidden),
            *kept)


@torch.library.custom_op("rnntl_fast::triton_lstm_backward", mutates_args=())
def triton_lstm_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor],
                         input: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_hr: Optional[Tensor],
                         h0: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor],
                         recurrent_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor],
                         layer_norm_ih: Optional[Tensor], layer_norm_hh: Optional[Tensor],
                         layer_norm_cell_weight: Optional[Tensor], layer_norm_cell_bias: Optional[Tensor],
                         gates: Tensor, cells: Tensor, hidden_states: Tensor, cell_pre_clip: Tensor,
                         hidden_pre_clip: Tensor, fresh_cells: Tensor, normalized_products: Tensor,
                         product_rstd: Tensor, normalized_cells: Tensor, cell_rstd: Tensor, reverse: bool,
                         cell_clip: float, proj_clip: float, state_clip: float, gate_clip: float, strategy: str,
                         output_mask: List[bool]) -> Tuple[(Tensor,) * 11]:
    """LSTM layer-direction backward from the forward's reserve. Returns the gradients of
    (input, weight_ih, weight_hh, bias (= bias_ih = bias_hh), weight_hr, h0, c0,
    layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias); output_mask
    (11 bools) says which are needed, the others come back input.new_empty(0) and cost nothing.

    grad_output: [T, B, P], grad_h_n: [B, P], grad_c_n: [B, H], each None where the loss does
    not use that result; the other arguments as the forward's, the reserve (launch.LstmReserve)
    as it returned it."""
    normed = _check_layer_norm_pair("triton_lstm_backward", layer_norm_ih, layer_norm_hh, strategy)
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    dtype = input.dtype
    kept = LstmReserve(gates, cells, hidden_states, cell_pre_clip, hidden_pre_clip, fresh_cells, normalized_products,
                       product_rstd, normalized_cells, cell_rstd)
    norm = _lstm_norm_gains(layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, input) if normed else None
    rec = _STRATEGIES[strategy].lstm_backward(
        _gradient_or_zeros(grad_output, (steps, batch, out_size), input),
        _gradient_or_zeros(grad_h_n, (batch, out_size), input), _gradient_or_zeros(grad_c_n, (batch, hidden), input),
        weight_hh.contiguous(), weight_hr.contiguous() if weight_hr is not None else None, c0,
        _device_lengths(lengths, input.device), _contiguous(recurrent_mask), _contiguous(zoneout_h),
        _contiguous(zoneout_c), norm, kept, reverse, cell_clip, proj_clip, state_clip, gate_clip)

    (need_input, need_weight_ih, need_weight_hh, need_bias, need_weight_hr, need_h0, need_c0, need_norm_ih,
     need_norm_hh, need_cell_weight, need_cell_bias) = output_mask
    flat_grad_gates = rec.gates.reshape(steps * batch, 4 * hidden)
    grad_input, grad_weight_ih, grad_norm_ih = _input_side_gradients(
        flat_grad_gates, input, weight_ih, lengths, layer_norm_ih, need_input, need_weight_ih, need_norm_ih)
    if need_weight_hh:
        h_start = float32_state(h0, batch, out_size, input.device)
        # h_{t-1} as the product saw it: times the mask, when there is one
        h_before = times_recurrent_mask(previous_states(hidden_states, h_start, reverse), recurrent_mask)
        grad_product = rec.products if normed else rec.gates  # with LN, of the product before it
        grad_weight_hh = (grad_product.reshape(steps * batch, 4 * hidden).t()
                          @ h_before.reshape(steps * batch, out_size)).to(dtype)
    else:
        grad_weight_hh = input.new_empty(0)
    grad_bias = flat_grad_gates.sum(0).to(dtype) if need_bias else input.new_empty(0)
    grad_norm_hh = _hidden_gain_gradient(flat_grad_gates, normalized_products, input, need_norm_hh)
    if normed:  # y = LN(c~_t) * g_c + b_c, m = o * tanh(y)
        normalized_y = normalized_cells * norm.cell_weight.float() + norm.cell_bias.float()
        grad_cell_weight = ((rec.cell_norm * normalized_cells).sum((0, 1)).to(dtype) if need_cell_weight
                            else input.new_empty(0))
        grad_cell_bias = rec.cell_norm.sum((0, 1)).to(dtype) if need_cell_bias else input.new_empty(0)
    else:
        # m = o * tanh(c~_t): the fresh cell under zoneout of c, else the carried one
        normalized_y = fresh_cells if zoneout_c is not None else cells
        grad_cell_weight, grad_cell_bias = input.new_empty(0), input.new_empty(0)
    if need_weight_hr and weight_hr is not None:
        m = gates[..., 3 * hidden:] * torch.tanh(normalized_y)
        grad_weight_hr = (rec.proj.reshape(steps * batch, out_size).t() @ m.reshape(steps * batch, hidden)).to(dtype)
    else:
        grad_weight_hr = input.new_empty(0)
    return (grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr,
            rec.h0.to(dtype) if need_h0 else input.new_empty(0), rec.c0.to(dtype) if need_c0 else input.new_empty(0),
            grad_norm_ih, grad_norm_hh, grad_cell_weight, grad_cell_bias)


@triton_lstm_backward.register_fake
def _(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, recurrent_mask,
      zoneout_h, zoneout_c, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, gates, cells,
      hidden_states, cell_pre_clip, hidden_pre_clip, fresh_cells, normalized_products, product_rstd, normalized_cells,
      cell_rstd, reverse, cell_clip, proj_clip, state_clip, gate_clip, strategy, output_mask):
    hidden = weight_ih.shape[0] // 4
    norm_shapes = [(4 * hidden,), (4 * hidden,), (hidden,), (hidden,)]
    return (*lstm_gradients_like(input, weight_ih, weight_hh, weight_hr, output_mask[:7]),
            *(input.new_empty(shape if need else (0,)) for shape, need in zip(norm_shapes, output_mask[7:])))


def _register_lstm_autograd() -> None:
    """Autograd for triton_lstm_forward. Not autograd.register_lstm_autograd's: the op takes
    the layer-norm terms after the native op's arguments and returns their gradients too."""
    tensor_arguments = 16  # input .. layer_norm_cell_bias

    def setup_context(ctx, inputs, output):
        (input, weight_ih, weight_hh, _bias_ih, _bias_hh, weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h,
         zoneout_c, norm_ih, norm_hh, cell_weight, cell_bias) = inputs[:tensor_arguments]
        _save(ctx, (input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h, zoneout_c,
                    norm_ih, norm_hh, cell_weight, cell_bias), output, 3, reserve_includes_output=False)
        ctx.options = inputs[tensor_arguments:]  # reverse, the four limits, save_for_backward, strategy

    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_reserve_grads):
        saved = ctx.saved_tensors
        reverse, cell_clip, proj_clip, state_clip, gate_clip, _save_for_backward, strategy = ctx.options
        need = ctx.needs_input_grad
        # bias_ih and bias_hh share one gradient
        mask = [need[0], need[1], need[2], need[3] or need[4], need[5], need[6], need[7], *need[12:16]]
        (g_input, g_weight_ih, g_weight_hh, g_bias, g_weight_hr, g_h0, g_c0, g_norm_ih, g_norm_hh, g_cell_weight,
         g_cell_bias) = triton_lstm_backward(grad_output, grad_h_n, grad_c_n, *saved, reverse, cell_clip, proj_clip,
                                             state_clip, gate_clip, strategy, mask)
        grads = (g_input, g_weight_ih, g_weight_hh, g_bias, g_bias, g_weight_hr, g_h0, g_c0, None, None, None, None,
                 g_norm_ih, g_norm_hh, g_cell_weight, g_cell_bias)
        return tuple(g if need[n] else None for n, g in enumerate(grads)) + (None,) * (len(need) - len(grads))

    torch.library.register_autograd(triton_lstm_forward, backward, setup_context=setup_context)


_register_lstm_autograd()

# ---------------------------------------------------------------------------------------
# GRU ("reset after", as torch.nn)
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("rnntl_fast::triton_gru_forward", mutates_args=())
def triton_gru_forward(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                       bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor],
                       recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], layer_norm_ih: Optional[Tensor],
                       layer_norm_hh: Optional[Tensor], reverse: bool, state_clip: float, gate_clip: float,
                       save_for_backward: bool, strategy: str) -> Tuple[(Tensor,) * (2 + len(GruReserve._fields))]:
    """GRU layer-direction forward. Returns output [T, B, H], h_n [B, H] and the float32
    reserve (launch.GruReserve), each of its tensors input.new_empty(0) where not kept.

    input: [T, B, I]; weight_ih: [3H, I]; weight_hh: [3H, H]; bias_ih, bias_hh: [3H] or None;
    h0: [B, H] or None; lengths: [B] CPU int64 or None; recurrent_mask: [B, H] in the input
    dtype or None (as for LSTM); zoneout: [T, B, H] keep weights in the input dtype, or None;
    layer_norm_ih, layer_norm_hh: [3H] gains of LN(W_ih x_t) and LN(W_hh h_{t-1}), both or
    neither (sequence strategy only); strategy: "sequence" or "step". Math: docs/semantics.md."""
    _check_layer_norm_pair("triton_gru_forward", layer_norm_ih, layer_norm_hh, strategy)
    hidden = weight_ih.shape[0] // 3
    input_gates = _input_gates(input, weight_ih, bias_ih, lengths, layer_norm_ih)
    # Always a bias pointer, zeros when absent, as for LSTM: one kernel variant fewer.
    bias_hh = bias_hh.contiguous() if bias_hh is not None else input.new_zeros(3 * hidden)
    output, h_n, kept = _STRATEGIES[strategy].gru_forward(input_gates, weight_hh.contiguous(), bias_hh, h0,
                                                        _device_lengths(lengths, input.device),
                                                        _contiguous(recurrent_mask), _contiguous(zoneout),
                                                        _contiguous(layer_norm_hh), reverse, bool(save_for_backward))
    return (output, h_n, *kept)


@triton_gru_forward.register_fake
def _(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, recurrent_mask, zoneout, layer_norm_ih,
      layer_norm_hh, reverse, state_clip, gate_clip, save_for_backward, strategy):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    keep, device = bool(save_for_backward), input.device
    normed = keep and layer_norm_ih is not None
    return (input.new_empty(steps, batch, hidden), input.new_empty(batch, hidden),
            *GruReserve(reserve(keep, steps, batch, 4 * hidden, device=device),
                        reserve(keep, steps, batch, hidden, device=device),
                        reserve(normed, steps, batch, 3 * hidden, device=device),
                        reserve(normed, steps, batch, device=device)))


@torch.library.custom_op("rnntl_fast::triton_gru_backward", mutates_args=())
def triton_gru_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], input: Tensor, weight_ih: Tensor,
                        weight_hh: Tensor, h0: Optional[Tensor], lengths: Optional[Tensor],
                        recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], layer_norm_ih: Optional[Tensor],
                        layer_norm_hh: Optional[Tensor], gates: Tensor, hidden_states: Tensor,
                        normalized_products: Tensor, product_rstd: Tensor, reverse: bool, state_clip: float,
                        gate_clip: float, strategy: str, output_mask: List[bool]) -> Tuple[(Tensor,) * 8]:
    """GRU layer-direction backward from the forward's reserve. Returns the gradients of
    (input, weight_ih, weight_hh, bias_ih, bias_hh, h0, layer_norm_ih, layer_norm_hh);
    output_mask (8 bools) says which are needed, the others come back input.new_empty(0).

    grad_output: [T, B, H], grad_h_n: [B, H], each None where the loss does not use that
    result; the other arguments as the forward's, the reserve as it returned it."""
    normed = _check_layer_norm_pair("triton_gru_backward", layer_norm_ih, layer_norm_hh, strategy)
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    dtype = input.dtype
    rec = _STRATEGIES[strategy].gru_backward(
        _gradient_or_zeros(grad_output, (steps, batch, hidden), input),
        _gradient_or_zeros(grad_h_n, (batch, hidden), input), weight_hh.contiguous(), h0,
        _device_lengths(lengths, input.device), _contiguous(recurrent_mask), _contiguous(zoneout),
        _contiguous(layer_norm_hh), GruReserve(gates, hidden_states, normalized_products, product_rstd), reverse,
        state_clip, gate_clip)

    (need_input, need_weight_ih, need_weight_hh, need_bias_ih, need_bias_hh, need_h0, need_norm_ih,
     need_norm_hh) = output_mask
    flat_input_gates = rec.input_gates.reshape(steps * batch, 3 * hidden)
    flat_hidden_gates = rec.hidden_gates.reshape(steps * batch, 3 * hidden)
    grad_input, grad_weight_ih, grad_norm_ih = _input_side_gradients(
        flat_input_gates, input, weight_ih, lengths, layer_norm_ih, need_input, need_weight_ih, need_norm_ih)
    if need_weight_hh:
        h_start = float32_state(h0, batch, hidden, input.device)
        h_before = times_recurrent_mask(previous_states(hidden_states, h_start, reverse), recurrent_mask)  # as LSTM
        grad_product = (rec.products if normed else rec.hidden_gates).reshape(steps * batch, 3 * hidden)
        grad_weight_hh = (grad_product.t() @ h_before.reshape(steps * batch, hidden)).to(dtype)
    else:
        grad_weight_hh = input.new_empty(0)
    grad_bias_ih = flat_input_gates.sum(0).to(dtype) if need_bias_ih else input.new_empty(0)
    grad_bias_hh = flat_hidden_gates.sum(0).to(dtype) if need_bias_hh else input.new_empty(0)
    grad_norm_hh = _hidden_gain_gradient(flat_hidden_gates, normalized_products, input, need_norm_hh)
    return (grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh,
            rec.h0.to(dtype) if need_h0 else input.new_empty(0), grad_norm_ih, grad_norm_hh)


@triton_gru_backward.register_fake
def _(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout, layer_norm_ih,
      layer_norm_hh, gates, hidden_states, normalized_products, product_rstd, reverse, state_clip, gate_clip, strategy,
      output_mask):
    gate_size = weight_ih.shape[0]
    return (*gru_gradients_like(input, weight_ih, weight_hh, output_mask[:6]),
            *(input.new_empty((gate_size,) if need else (0,)) for need in output_mask[6:]))


def _register_gru_autograd() -> None:
    """Autograd for triton_gru_forward (as _register_lstm_autograd)."""
    tensor_arguments = 11  # input .. layer_norm_hh

    def setup_context(ctx, inputs, output):
        (input, weight_ih, weight_hh, _bias_ih, _bias_hh, h0, lengths, recurrent_mask, zoneout, norm_ih,
         norm_hh) = inputs[:tensor_arguments]
        _save(ctx, (input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout, norm_ih, norm_hh), output, 2,
              reserve_includes_output=False)
        ctx.options = inputs[tensor_arguments:]  # reverse, state_clip, gate_clip, save_for_backward, strategy

    def backward(ctx, grad_output, grad_h_n, *_reserve_grads):
        reverse, state_clip, gate_clip, _save_for_backward, strategy = ctx.options
        need = ctx.needs_input_grad
        mask = [*need[:6], need[9], need[10]]
        (g_input, g_weight_ih, g_weight_hh, g_bias_ih, g_bias_hh, g_h0, g_norm_ih,
         g_norm_hh) = triton_gru_backward(grad_output, grad_h_n, *ctx.saved_tensors, reverse, state_clip, gate_clip,
                                          strategy, mask)
        grads = (g_input, g_weight_ih, g_weight_hh, g_bias_ih, g_bias_hh, g_h0, None, None, None, g_norm_ih,
                 g_norm_hh)
        return tuple(g if need[n] else None for n, g in enumerate(grads)) + (None,) * (len(need) - len(grads))

    torch.library.register_autograd(triton_gru_forward, backward, setup_context=setup_context)


_register_gru_autograd()

# ---------------------------------------------------------------------------------------
# Elman RNN (torch.nn.RNN's cell, tanh or relu; docs/semantics.md section 10)
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("rnntl_fast::triton_rnn_forward", mutates_args=())
def triton_rnn_forward(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                       bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor],
                       recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], relu: bool, reverse: bool,
                       state_clip: float, gate_clip: float, save_for_backward: bool,
                       strategy: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Elman RNN layer-direction forward: h_t = f(W_ih x_t + b_ih + W_hh (m * h_{t-1}) + b_hh),
    with zoneout h_t = d_t * h_{t-1} + (1 - d_t) * f(...). Returns output [T, B, H], h_n [B, H]
    and the float32 reserve (launch.RnnReserve: hidden states [T, B, H], activations [T, B, H]
    only with zoneout; input.new_empty(0) where not kept).

    input: [T, B, I]; weight_ih: [H, I]; weight_hh: [H, H]; bias_ih, bias_hh: [H] or None;
    h0: [B, H] or None; lengths: [B] CPU int64 or None; recurrent_mask: [B, H] (m) and
    zoneout: [T, B, H] keep weights (d), in the input dtype, or None; relu: f = relu, else
    tanh; limits: floats, 0 = off; strategy: "sequence" or "step". The arguments before
    `strategy` are those of the native rnntl_fast::rnn_forward."""
    hidden = weight_ih.shape[0]
    # As in the LSTM: padded steps are zeroed before they reach the saved state.
    input_gates = F.linear(without_padded_steps(input, lengths), weight_ih, bias_ih).contiguous()
    bias_hh = bias_hh.contiguous() if bias_hh is not None else input.new_zeros(hidden)
    output, h_n, kept = _STRATEGIES[strategy].rnn_forward(
        input_gates, weight_hh.contiguous(), bias_hh, h0, _device_lengths(lengths, input.device),
        _contiguous(recurrent_mask), _contiguous(zoneout), relu, reverse, bool(save_for_backward))
    return (output, h_n, *kept)


@triton_rnn_forward.register_fake
def _(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, recurrent_mask, zoneout, relu, reverse, state_clip,
      gate_clip, save_for_backward, strategy):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0]
    keep, device = bool(save_for_backward), input.device
    return (input.new_empty(steps, batch, hidden), input.new_empty(batch, hidden),
            *RnnReserve(reserve(keep, steps, batch, hidden, device=device),
                        reserve(keep and zoneout is not None, steps, batch, hidden, device=device)))


@torch.library.custom_op("rnntl_fast::triton_rnn_backward", mutates_args=())
def triton_rnn_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], input: Tensor, weight_ih: Tensor,
                        weight_hh: Tensor, h0: Optional[Tensor], lengths: Optional[Tensor],
                        recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], hidden_states: Tensor,
                        activations: Tensor, relu: bool, reverse: bool, state_clip: float, gate_clip: float,
                        strategy: str,
                        output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Elman RNN layer-direction backward from the forward's reserve. Returns the gradients of
    (input, weight_ih, weight_hh, bias_ih, bias_hh, h0); output_mask (6 bools) says which are
    needed, the others come back input.new_empty(0) and cost nothing.

    grad_output: [T, B, H], grad_h_n: [B, H], each None where the loss does not use that
    result; the other arguments as the forward's, the reserve as it returned it."""
    steps, batch, features = input.shape
    hidden = weight_ih.shape[0]
    dtype = input.dtype
    grad_gates, grad_h0 = _STRATEGIES[strategy].rnn_backward(
        _gradient_or_zeros(grad_output, (steps, batch, hidden), input),
        _gradient_or_zeros(grad_h_n, (batch, hidden), input), weight_hh.contiguous(),
        _device_lengths(lengths, input.device), _contiguous(recurrent_mask), _contiguous(zoneout),
        RnnReserve(hidden_states, activations), relu, reverse, state_clip, gate_clip)

    need_input, need_weight_ih, need_weight_hh, need_bias_ih, need_bias_hh, need_h0 = output_mask
    flat_grad_gates = grad_gates.reshape(steps * batch, hidden)
    # As in the forward, padded steps of the input take part in no product.
    grad_input = without_padded_steps((flat_grad_gates @ weight_ih.float()).reshape(steps, batch, features),
                                      lengths).to(dtype) if need_input else input.new_empty(0)
    grad_weight_ih = (flat_grad_gates.t() @ without_padded_steps(input, lengths).reshape(steps * batch, features)
                      .float()).to(dtype) if need_weight_ih else input.new_empty(0)
    if need_weight_hh:
        h_start = float32_state(h0, batch, hidden, input.device)
        h_before = times_recurrent_mask(previous_states(hidden_states, h_start, reverse), recurrent_mask)  # as LSTM
        grad_weight_hh = (flat_grad_gates.t() @ h_before.reshape(steps * batch, hidden)).to(dtype)
    else:
        grad_weight_hh = input.new_empty(0)
    # b_ih and b_hh enter a_t alike: each gets the sum (two tensors: results may not alias)
    grad_bias_ih = flat_grad_gates.sum(0).to(dtype) if need_bias_ih else input.new_empty(0)
    grad_bias_hh = flat_grad_gates.sum(0).to(dtype) if need_bias_hh else input.new_empty(0)
    grad_h0 = grad_h0.to(dtype) if need_h0 else input.new_empty(0)
    return grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0


@triton_rnn_backward.register_fake
def _(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout, hidden_states,
      activations, relu, reverse, state_clip, gate_clip, strategy, output_mask):
    return rnn_gradients_like(input, weight_ih, weight_hh, output_mask)


def _register_rnn_autograd() -> None:
    """Autograd for triton_rnn_forward: autograd.register_rnn_autograd's, but the forward takes
    the strategy after the native op's arguments (handed on to the backward op), and the
    backward reads this op's reserve (hidden states, activations) instead of the native
    op's output and activations."""

    def setup_context(ctx, inputs, output):
        *arguments, strategy = inputs
        call = RnnForwardCall(*arguments)
        _save(ctx, (call.input, call.weight_ih, call.weight_hh, call.h0, call.lengths, call.recurrent_mask,
                    call.zoneout), output, 2, reserve_includes_output=False)
        ctx.call = call._replace(input=None, weight_ih=None, weight_hh=None, bias_ih=None, bias_hh=None, h0=None,
                                 lengths=None, recurrent_mask=None, zoneout=None)
        ctx.strategy = strategy

    def backward(ctx, grad_output, grad_h_n, *_reserve_grads):
        input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout, *kept = ctx.saved_tensors
        call, need = ctx.call, ctx.needs_input_grad
        grads = triton_rnn_backward(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, recurrent_mask,
                                    zoneout, *kept, call.relu, call.reverse, call.state_clip, call.gate_clip,
                                    ctx.strategy, list(need[:6]))
        return tuple(g if need[n] else None for n, g in enumerate(grads)) + (None,) * (len(need) - len(grads))

    torch.library.register_autograd(triton_rnn_forward, backward, setup_context=setup_context)


_register_rnn_autograd()
