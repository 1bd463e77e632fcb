"""The reference step loop: the definition of what every backend computes.

Plain PyTorch, one step at a time, autograd for the backward. Gradient clipping is
defined here by hooks (docs/semantics.md gives the same definitions in prose):

* ``state_clip``: a hook clamps the total gradient of every hidden state h_t (and cell
  state c_t) the loop produces to [-state_clip, state_clip] (``grad_clip_mode="state"``
  of the public API);
* ``gate_clip``: a hook clamps the gradient of every gate pre-activation (LSTM:
  a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh; GRU: a_r, a_z and
  a_n = W_in x + b_in + r * (W_hn h + b_hn)) (``grad_clip_mode="gates"``).

Every clip limit may be None or 0 for "off".

Regularizers (docs/semantics.md, section 10) enter as tensors the caller draws, so one
formula serves training and evaluation:

* ``recurrent_mask`` [B, P]: multiplies h_{t-1} where it enters the recurrent product
  W_hh h_{t-1} (variational recurrent dropout); the carried state is not masked;
* zoneout keep weights ``d`` [T, B, *] in [0, 1]: the carried state becomes
  d * (previous state) + (1 - d) * (new state) (0/1 draws in training, z in evaluation);
* ``layer_norm`` (LayerNormWeights): the gain-only layer norms of the two gate products
  (and, LSTM, of the cell state before its tanh).

With state_clip and zoneout the clamped gradients are those of the carried (zoned) states.

Variable lengths: row b is valid at step t iff t < lengths[b], in both directions. Only the
valid rows run a step; the others keep their state and output zeros; the state tensors a
step produces (all rows) are still hooked, as the loop still produces them.

It is slow by design and serves as the oracle of the tests (in float64) and as the
fallback backend when no compiled one exists.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


LAYER_NORM_EPS = 1e-5


class LayerNormWeights(NamedTuple):
    """The gains (and cell bias) of a layer-normalised cell; the gate biases stay bias_ih / bias_hh.

    ih, hh: [G] gains of LN(W_ih x_t) and LN(W_hh h_{t-1}) (G = 4H for the LSTM, 3H for the GRU).
    cell_weight, cell_bias: [H] gain and bias of LN(c_t) (LSTM only; None: gain 1 / bias 0).
    """
    ih: Tensor
    hh: Tensor
    cell_weight: Optional[Tensor] = None
    cell_bias: Optional[Tensor] = None


def _normalized(x: Tensor, gain: Optional[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """LN(x) * gain + bias over the last dim (no affine inside LN; None terms are absent)."""
    y = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
    if gain is not None:
        y = y * gain
    return y + bias if bias is not None else y


def _input_gates(input: Tensor, weight_ih: Tensor, bias_ih: Optional[Tensor], lengths: Optional[Tensor],
                 layer_norm: Optional[LayerNormWeights]) -> Tensor:
    """[T, B, G]: W_ih x_t + b_ih, or LN(W_ih x_t) * g_ih + b_ih, for every step at once."""
    x = _without_padded_steps(input, lengths)
    if layer_norm is None:
        return F.linear(x, weight_ih, bias_ih)
    return _normalized(F.linear(x, weight_ih), layer_norm.ih, bias_ih)


def _recurrent_product(h_prev: Tensor, weight_hh: Tensor, bias_hh: Optional[Tensor], mask: Optional[Tensor],
                       layer_norm: Optional[LayerNormWeights]) -> Tensor:
    """[rows, G]: W_hh (m * h_{t-1}) + b_hh, or LN(W_hh (m * h_{t-1})) * g_hh + b_hh."""
    if mask is not None:
        h_prev = h_prev * mask
    if layer_norm is None:
        return F.linear(h_prev, weight_hh, bias_hh)
    return _normalized(F.linear(h_prev, weight_hh), layer_norm.hh, bias_hh)


def _zoned(keep: Tensor, previous: Tensor, new: Tensor) -> Tensor:
    """keep * previous + (1 - keep) * new (zoneout)."""
    return keep * previous + (1 - keep) * new


def _clamp_hook(limit: float):
    return lambda grad: grad.clamp(-limit, limit)


def _hook(tensor: Tensor, limit: Optional[float]) -> None:
    if limit and tensor.requires_grad:
        tensor.register_hook(_clamp_hook(limit))


def _row_access(lengths: Optional[Tensor], t: int, device):
    """(take, put) for step t: take(x) selects the rows with t < length, put(full, rows)
    writes new values of those rows into a copy of `full` (the other rows carry over).
    Selecting the valid rows, rather than masking a step computed for every row, keeps
    whatever the other rows would compute (a NaN weight times a carried state, say) out of
    every gradient, as packed input does. Without lengths both are the identity."""
    if lengths is None:
        return (lambda x: x), (lambda full, rows: rows)
    index = (lengths > t).nonzero().squeeze(1).to(device)
    return (lambda x: x.index_select(0, index)), (lambda full, rows: full.index_copy(0, index, rows))


def _output(h: Tensor, lengths: Optional[Tensor], t: int) -> Tensor:
    """h_t [B, *] with zeros in the rows past their length (a select, so no gradient reaches them)."""
    if lengths is None:
        return h
    valid = (lengths.to(h.device) > t).unsqueeze(1)
    return torch.where(valid, h, torch.zeros((), dtype=h.dtype, device=h.device))


def _without_padded_steps(input: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """input [T, B, I] with the steps past each row's length replaced by zeros, so that
    whatever they hold (NaN included) reaches no output and no gradient."""
    if lengths is None:
        return input
    steps = torch.arange(input.shape[0], device=input.device).unsqueeze(1)  # [T, 1]
    valid = (steps < lengths.to(input.device).unsqueeze(0)).unsqueeze(2)  # [T, B, 1]
    return torch.where(valid, input, torch.zeros((), dtype=input.dtype, device=input.device))


def lstm_reference(
    input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    weight_hr: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    c0: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
    cell_clip: Optional[float] = None,
    proj_clip: Optional[float] = None,
    state_clip: Optional[float] = None,
    gate_clip: Optional[float] = None,
    recurrent_mask: Optional[Tensor] = None,
    zoneout_h: Optional[Tensor] = None,
    zoneout_c: Optional[Tensor] = None,
    layer_norm: Optional[LayerNormWeights] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer-direction over a sequence.

    Args:
        input: [T, B, I]
        weight_ih: [4H, I]; weight_hh: [4H, P]; bias_ih, bias_hh: [4H] (gate order i, f, g, o)
        weight_hr: [P, H] projection (LSTM proj_size), or None (then P = H)
        h0: [B, P]; c0: [B, H]; None means zeros
        lengths: [B] integer, 0 <= lengths[b] <= T, or None for all T
        reverse: run t = T-1 .. 0
        cell_clip, proj_clip: clamp c_t / h_t in the forward (None or 0: off)
        state_clip, gate_clip: clamp gradients in the backward (None or 0: off)
        recurrent_mask: [B, P] multiplier of h_{t-1} in W_hh h_{t-1}, or None
        zoneout_h: [T, B, P], zoneout_c: [T, B, H]: keep weights in [0, 1], or None
        layer_norm: LayerNormWeights (ih, hh [4H]; cell_weight, cell_bias [H] or None), or None
    Returns:
        output [T, B, P], h_n [B, P], c_n [B, H]
    """
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    h = h0 if h0 is not None else input.new_zeros(batch, out_size)
    c = c0 if c0 is not None else input.new_zeros(batch, hidden)
    input_gates = _input_gates(input, weight_ih, bias_ih, lengths, layer_norm)

    outputs = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        take, put = _row_access(lengths, t, input.device)
        h_prev, c_prev = take(h), take(c)
        mask = take(recurrent_mask) if recurrent_mask is not None else None
        a = take(input_gates[t]) + _recurrent_product(h_prev, weight_hh, bias_hh, mask, layer_norm)
        _hook(a, gate_clip)
        a_i, a_f, a_g, a_o = a.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g), torch.sigmoid(a_o)
        c_rows = f * c_prev + i * g
        if cell_clip:
            c_rows = c_rows.clamp(-cell_clip, cell_clip)
        if zoneout_c is not None:
            # h~ reads the new cell before zoneout, as Krueger et al.; the carried c is the zoned one.
            c_new = put(c, _zoned(take(zoneout_c[t]), c_prev, c_rows))
            cell = c_rows
        else:
            c_new = put(c, c_rows)
            cell = None
        _hook(c_new, state_clip)  # before h reads it: the hook sees c_t's total gradient
        if cell is None:
            cell = take(c_new)
        if layer_norm is not None:
            cell = _normalized(cell, layer_norm.cell_weight, layer_norm.cell_bias)
        h_rows = o * torch.tanh(cell)
        if weight_hr is not None:
            h_rows = F.linear(h_rows, weight_hr)
        if proj_clip:
            h_rows = h_rows.clamp(-proj_clip, proj_clip)
        if zoneout_h is not None:
            h_rows = _zoned(take(zoneout_h[t]), h_prev, h_rows)
        h_new = put(h, h_rows)
        _hook(h_new, state_clip)
        outputs[t] = _output(h_new, lengths, t)
        h, c = h_new, c_new
    return torch.stack(outputs), h, c


def gru_reference(
    input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
    state_clip: Optional[float] = None,
    gate_clip: Optional[float] = None,
    recurrent_mask: Optional[Tensor] = None,
    zoneout: Optional[Tensor] = None,
    layer_norm: Optional[LayerNormWeights] = None,
) -> Tuple[Tensor, Tensor]:
    """One GRU layer-direction over a sequence ("reset after", as torch.nn).

    Args:
        input: [T, B, I]
        weight_ih: [3H, I]; weight_hh: [3H, H]; bias_ih, bias_hh: [3H] (gate order r, z, n)
        h0: [B, H] or None (zeros)
        lengths: [B] integer, 0 <= lengths[b] <= T, or None for all T
        reverse, state_clip, gate_clip: as lstm_reference
        recurrent_mask: [B, H] multiplier of h_{t-1} in W_hh h_{t-1}, or None
        zoneout: [T, B, H] keep weights in [0, 1], or None
        layer_norm: LayerNormWeights (ih, hh [3H]; no cell terms), or None
    Returns:
        output [T, B, H], h_n [B, H]
    """
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    h = h0 if h0 is not None else input.new_zeros(batch, hidden)
    input_gates = _input_gates(input, weight_ih, bias_ih, lengths, layer_norm)

    outputs = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        take, put = _row_access(lengths, t, input.device)
        h_prev = take(h)
        mask = take(recurrent_mask) if recurrent_mask is not None else None
        x_r, x_z, x_n = take(input_gates[t]).chunk(3, dim=1)
        h_r, h_z, h_n = _recurrent_product(h_prev, weight_hh, bias_hh, mask, layer_norm).chunk(3, dim=1)
        a_r = x_r + h_r
        a_z = x_z + h_z
        _hook(a_r, gate_clip)
        _hook(a_z, gate_clip)
        r, z = torch.sigmoid(a_r), torch.sigmoid(a_z)
        a_n = x_n + r * h_n
        _hook(a_n, gate_clip)
        n = torch.tanh(a_n)
        h_rows = (1 - z) * n + z * h_prev
        if zoneout is not None:
            h_rows = _zoned(take(zoneout[t]), h_prev, h_rows)
        h_new = put(h, h_rows)
        _hook(h_new, state_clip)
        outputs[t] = _output(h_new, lengths, t)
        h = h_new
    return torch.stack(outputs), h


def rnn_reference(
    input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    nonlinearity: str = "tanh",
    reverse: bool = False,
    state_clip: Optional[float] = None,
    gate_clip: Optional[float] = None,
    recurrent_mask: Optional[Tensor] = None,
    zoneout: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One Elman RNN layer-direction: h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), f = tanh or relu.

    Args:
        input: [T, B, I]
        weight_ih: [H, I]; weight_hh: [H, H]; bias_ih, bias_hh: [H] or None
        h0: [B, H] or None (zeros)
        lengths: [B] integer, 0 <= lengths[b] <= T, or None for all T
        nonlinearity: "tanh" or "relu"
        reverse, state_clip: as lstm_reference; gate_clip clamps the gradient of the
            pre-activation a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
        recurrent_mask: [B, H] multiplier of h_{t-1} in W_hh h_{t-1}, or None
        zoneout: [T, B, H] keep weights in [0, 1], or None
    Returns:
        output [T, B, H], h_n [B, H]
    """
    activation = {"tanh": torch.tanh, "relu": torch.relu}[nonlinearity]
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0]
    h = h0 if h0 is not None else input.new_zeros(batch, hidden)
    input_gates = _input_gates(input, weight_ih, bias_ih, lengths, None)

    outputs = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        take, put = _row_access(lengths, t, input.device)
        h_prev = take(h)
        mask = take(recurrent_mask) if recurrent_mask is not None else None
        a = take(input_gates[t]) + _recurrent_product(h_prev, weight_hh, bias_hh, mask, None)
        _hook(a, gate_clip)
        h_rows = activation(a)
        if zoneout is not None:
            h_rows = _zoned(take(zoneout[t]), h_prev, h_rows)
        h_new = put(h, h_rows)
        _hook(h_new, state_clip)
        outputs[t] = _output(h_new, lengths, t)
        h = h_new
    return torch.stack(outputs), h
