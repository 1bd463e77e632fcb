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

from ..autograd import (RnnForwardCall, _save, gru_gradients_like, lstm_gradients_like, register_gru_autograd,
                        register_lstm_autograd, rnn_gradients_like)
from . import sequence, step
from .launch import (GruReserve, LstmReserve, RnnReserve, clip_switches, float32_state, previous_states, reserve,
                     times_recurrent_mask, without_padded_steps)

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
# LSTM
# ---------------------------------------------------------------------------------------

LstmForwardResult = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("rnntl_fast::triton_lstm_forward", mutates_args=())
def triton_lstm_forward(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                        bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], h0: Optional[Tensor],
                        c0: Optional[Tensor], lengths: Optional[Tensor], recurrent_mask: Optional[Tensor],
                        zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor], reverse: bool, cell_clip: float,
                        proj_clip: float, state_clip: float, gate_clip: float, save_for_backward: bool,
                        strategy: str) -> LstmForwardResult:
    """LSTM layer-direction forward. Returns output [T, B, P], h_n [B, P], c_n [B, H] and the
    float32 reserve (launch.LstmReserve: gates, cells, hidden states, cell before clip,
    hidden before clip, fresh cells), each empty where not kept.

    input: [T, B, I]; weight_ih: [4H, I]; weight_hh: [4H, P]; bias_ih, bias_hh: [4H] or None;
    weight_hr: [P, H] or None; h0: [B, P] or None; c0: [B, H] or None; lengths: [B] CPU int64
    or None; recurrent_mask: [B, P] in the input dtype or None (multiplies h_{t-1} in
    W_hh h_{t-1} only); zoneout_h: [T, B, P], zoneout_c: [T, B, H] keep weights in the input
    dtype, or None (docs/semantics.md section 10); limits: floats, 0 = off; strategy:
    "sequence" or "step"."""
    hidden = weight_ih.shape[0] // 4
    # Padded steps are zeroed first: what they hold must not reach the saved gates, whose
    # products the backward forms at every step.
    input_gates = F.linear(without_padded_steps(input, lengths), weight_ih, bias_ih).contiguous()
    # Always a bias pointer: a no-bias specialisation of the float32 LSTM sequence
    # kernel crashes LLVM's SLP vectorizer (triton 3.9.0, sm_90), and zeros cost nothing.
    bias_hh = bias_hh.contiguous() if bias_hh is not None else input.new_zeros(4 * hidden)
    output, h_n, c_n, kept = _STRATEGIES[strategy].lstm_forward(
        input_gates, weight_hh.contiguous(), bias_hh, weight_hr.contiguous() if weight_hr is not None else None, h0,
        c0, _device_lengths(lengths, input.device), _contiguous(recurrent_mask), _contiguous(zoneout_h),
        _contiguous(zoneout_c), reverse, cell_clip, proj_clip, bool(save_for_backward))
    return (output, h_n, c_n, *kept)


@triton_lstm_forward.register_fake
def _(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h, zoneout_c,
      reverse, cell_clip, proj_clip, state_clip, gate_clip, save_for_backward, strategy):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    keep, device = bool(save_for_backward), input.device
    switches = clip_switches(cell_clip=cell_clip, proj_clip=proj_clip)
    kept = LstmReserve(reserve(keep, steps, batch, 4 * hidden, device=device),
                       reserve(keep, steps, batch, hidden, device=device),
                       reserve(keep, steps, batch, out_size, device=device),
                       reserve(keep and switches["CELL_CLIP"], steps, batch, hidden, device=device),
                       reserve(keep and switches["PROJ_CLIP"], steps, batch, out_size, device=device),
                       reserve(keep and zoneout_c is not None, steps, batch, hidden, device=device))
    return (input.new_empty(steps, batch, out_size), input.new_empty(batch, out_size), input.new_empty(batch, hidden),
            *kept)


@torch.library.custom_op("rnntl_fast::triton_lstm_backward", mutates_args=())
def triton_lstm_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor],
                         input: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_hr: Optional[Tensor],
                         h0: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor],
                         recurrent_mask: Optional[Tensor], zoneout_h: Optional[Tensor],
                         zoneout_c: Optional[Tensor], gates: Tensor, cells: Tensor, hidden_states: Tensor,
                         cell_pre_clip: Tensor, hidden_pre_clip: Tensor, fresh_cells: Tensor, reverse: bool,
                         cell_clip: float, proj_clip: float, state_clip: float, gate_clip: float, strategy: str,
                         output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """LSTM layer-direction backward from the forward's reserve. Returns the gradients of
    (input, weight_ih, weight_hh, bias (= bias_ih = bias_hh), weight_hr, h0, c0); output_mask
    (7 bools) says which are needed, the others come back empty and cost nothing.

    grad_output: [T, B, P], grad_h_n: [B, P], grad_c_n: [B, H], each None where the loss does
    not use that result; the other arguments as the forward's, the reserve as it returned it."""
    steps, batch, features = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    dtype = input.dtype
    kept = LstmReserve(gates, cells, hidden_states, cell_pre_clip, hidden_pre_clip, fresh_cells)
    grad_gates, grad_proj, grad_h0, grad_c0 = _STRATEGIES[strategy].lstm_backward(
        _gradient_or_zeros(grad_output, (steps, batch, out_size), input),
        _gradient_or_zeros(grad_h_n, (batch, out_size), input), _gradient_or_zeros(grad_c_n, (batch, hidden), input),
        weight_hh.contiguous(), weight_hr.contiguous() if weight_hr is not None else None, c0,
        _device_lengths(lengths, input.device), _contiguous(recurrent_mask), _contiguous(zoneout_h),
        _contiguous(zoneout_c), kept, reverse, cell_clip, proj_clip, state_clip, gate_clip)

    need_input, need_weight_ih, need_weight_hh, need_bias, need_weight_hr, need_h0, need_c0 = output_mask
    flat_grad_gates = grad_gates.reshape(steps * batch, 4 * hidden)
    # As in the forward, padded steps of the input take part in no product.
    grad_input = without_padded_steps((flat_grad_gates @ weight_ih.float()).reshape(steps, batch, features),
                                      lengths).to(dtype) if need_input else input.new_empty(0)
    grad_weight_ih = (flat_grad_gates.t() @ without_padded_steps(input, lengths).reshape(steps * batch, features).float()
                      ).to(dtype) if need_weight_ih else input.new_empty(0)
    if need_weight_hh:
        h_start = float32_state(h0, batch, out_size, input.device)
        # h_{t-1} as the product saw it: times the mask, when there is one
        h_before = times_recurrent_mask(previous_states(hidden_states, h_start, reverse), recurrent_mask)
        grad_weight_hh = (flat_grad_gates.t() @ h_before.reshape(steps * batch, out_size)).to(dtype)
    else:
        grad_weight_hh = input.new_empty(0)
    grad_bias = flat_grad_gates.sum(0).to(dtype) if need_bias else input.new_empty(0)
    if need_weight_hr and weight_hr is not None:
        # m = o * tanh(c~_t): the fresh cell under zoneout of c, else the carried one
        m = gates[..., 3 * hidden:] * torch.tanh(fresh_cells if zoneout_c is not None else cells)
        grad_weight_hr = (grad_proj.reshape(steps * batch, out_size).t() @ m.reshape(steps * batch, hidden)).to(dtype)
    else:
        grad_weight_hr = input.new_empty(0)
    return (grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr,
            grad_h0.to(dtype) if need_h0 else input.new_empty(0), grad_c0.to(dtype) if need_c0 else input.new_empty(0))


@triton_lstm_backward.register_fake
def _(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, recurrent_mask,
      zoneout_h, zoneout_c, gates, cells, hidden_states, cell_pre_clip, hidden_pre_clip, fresh_cells, reverse,
      cell_clip, proj_clip, state_clip, gate_clip, strategy, output_mask):
    return lstm_gradients_like(input, weight_ih, weight_hh, weight_hr, output_mask)


register_lstm_autograd(triton_lstm_forward, triton_lstm_backward, reserve_includes_output=False)

# ---------------------------------------------------------------------------------------
# GRU ("reset after", as torch.nn)
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("rnntl_fast::triton_gru_forward", mutates_args=())
def triton_gru_forward(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                       bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor],
                       recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], reverse: bool, state_clip: float,
                       gate_clip: float, save_for_backward: bool, strategy: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """GRU layer-direction forward. Returns output [T, B, H], h_n [B, H] and the float32
    reserve (launch.GruReserve: gates [T, B, 4H], hidden states [T, B, H]; empty where not kept).

    input: [T, B, I]; weight_ih: [3H, I]; weight_hh: [3H, H]; bias_ih, bias_hh: [3H] or None;
    h0: [B, H] or None; lengths: [B] CPU int64 or None; recurrent_mask: [B, H] in the input
    dtype or None (as for LSTM); zoneout: [T, B, H] keep weights in the input dtype, or None
    (docs/semantics.md section 10); strategy: "sequence" or "step"."""
    hidden = weight_ih.shape[0] // 3
    input_gates = F.linear(without_padded_steps(input, lengths), weight_ih, bias_ih).contiguous()  # as for LSTM
    # Always a bias pointer, zeros when absent, as for LSTM: one kernel variant fewer.
    bias_hh = bias_hh.contiguous() if bias_hh is not None else input.new_zeros(3 * hidden)
    output, h_n, kept = _STRATEGIES[strategy].gru_forward(input_gates, weight_hh.contiguous(), bias_hh, h0,
                                                        _device_lengths(lengths, input.device),
                                                        _contiguous(recurrent_mask), _contiguous(zoneout), reverse,
                                                        bool(save_for_backward))
    return (output, h_n, *kept)


@triton_gru_forward.register_fake
def _(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, recurrent_mask, zoneout, reverse, state_clip,
      gate_clip, save_for_backward, strategy):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    keep, device = bool(save_for_backward), input.device
    return (input.new_empty(steps, batch, hidden), input.new_empty(batch, hidden),
            *GruReserve(reserve(keep, steps, batch, 4 * hidden, device=device),
                        reserve(keep, steps, batch, hidden, device=device)))


@torch.library.custom_op("rnntl_fast::triton_gru_backward", mutates_args=())
def triton_gru_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], input: Tensor, weight_ih: Tensor,
                        weight_hh: Tensor, h0: Optional[Tensor], lengths: Optional[Tensor],
                        recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], gates: Tensor,
                        hidden_states: Tensor, reverse: bool, state_clip: float, gate_clip: float, strategy: str,
                        output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GRU layer-direction backward from the forward's reserve. Returns the gradients of
    (input, weight_ih, weight_hh, bias_ih, bias_hh, h0); output_mask (6 bools) says which are
    needed, the others come back empty.

    grad_output: [T, B, H], grad_h_n: [B, H], each None where the loss does not use that
    result; the other arguments as the forward's, the reserve as it returned it."""
    steps, batch, features = input.shape
    hidden = weight_ih.shape[0] // 3
    dtype = input.dtype
    grad_input_gates, grad_hidden_gates, grad_h0 = _STRATEGIES[strategy].gru_backward(
        _gradient_or_zeros(grad_output, (steps, batch, hidden), input),
        _gradient_or_zeros(grad_h_n, (batch, hidden), input), weight_hh.contiguous(), h0,
        _device_lengths(lengths, input.device), _contiguous(recurrent_mask), _contiguous(zoneout),
        GruReserve(gates, hidden_states), reverse, state_clip, gate_clip)

    need_input, need_weight_ih, need_weight_hh, need_bias_ih, need_bias_hh, need_h0 = output_mask
    flat_input_gates = grad_input_gates.reshape(steps * batch, 3 * hidden)
    flat_hidden_gates = grad_hidden_gates.reshape(steps * batch, 3 * hidden)
    # As in the forward, padded steps of the input take part in no product.
    grad_input = without_padded_steps((flat_input_gates @ weight_ih.float()).reshape(steps, batch, features),
                                      lengths).to(dtype) if need_input else input.new_empty(0)
    grad_weight_ih = (flat_input_gates.t() @ without_padded_steps(input, lengths).reshape(steps * batch, features).float()
                      ).to(dtype) if need_weight_ih else input.new_empty(0)
    if need_weight_hh:
        h_start = float32_state(h0, batch, hidden, input.device)
        h_before = times_recurrent_mask(previous_states(hidden_states, h_start, reverse), recurrent_mask)  # as LSTM
        grad_weight_hh = (flat_hidden_gates.t() @ h_before.reshape(steps * batch, hidden)).to(dtype)
    else:
        grad_weight_hh = input.new_empty(0)
    grad_bias_ih = flat_input_gates.sum(0).to(dtype) if need_bias_ih else input.new_empty(0)
    grad_bias_hh = flat_hidden_gates.sum(0).to(dtype) if need_bias_hh else input.new_empty(0)
    grad_h0 = grad_h0.to(dtype) if need_h0 else input.new_empty(0)
    return grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0


@triton_gru_backward.register_fake
def _(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout, gates, hidden_states,
      reverse, state_clip, gate_clip, strategy, output_mask):
    return gru_gradients_like(input, weight_ih, weight_hh, output_mask)


register_gru_autograd(triton_gru_forward, triton_gru_backward, reserve_includes_output=False)

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
    only with zoneout; empty where not kept).

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
    needed, the others come back empty and cost nothing.

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
