"""Triton GRU ("reset after", as torch.nn): one layer-direction over a sequence, forward and
backward.

Math, clipping and lengths semantics are those of rnntl_fast.ops.reference.gru_reference;
docs/triton.md explains the tiling. Shapes: T steps, B batch rows, I input features,
H cells. All kernels take contiguous tensors and compute in float32.

Forward saves, per step t (float32):
  gates   [T, B, 4H] r, z, n and W_hn h_{t-1} + b_hn (what the reset gate multiplies)
  hidden  [T, B, H]  h_t as the recurrence carries it (kept past a row's length)
Backward produces the gradients of the input-side gate sums [T, B, 3H] (dL/da_r, dL/da_z,
dL/da_n) and of the hidden-side ones (dL/da_r, dL/da_z, r * dL/da_n); the weight
gradients are then matmuls over all steps, skipped for weights that need none.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..autograd import gru_gradients_like, register_gru_autograd
from . import config
from .common import clamp, rows_valid, sigmoid, tanh


@triton.jit
def _gru_cell_forward(x_r, x_z, x_n, hh_r, hh_z, hh_n, h_prev, valid):
    """Input-side and hidden-side gate sums [BB, BH] -> r, z, n, carried h_t, output."""
    r = sigmoid(x_r + hh_r)
    z = sigmoid(x_z + hh_z)
    n = tanh(x_n + r * hh_n)
    h_new = (1.0 - z) * n + z * h_prev
    h_new = tl.where(valid, h_new, h_prev)
    return r, z, n, h_new, tl.where(valid, h_new, 0.0)


@triton.jit
def _gru_cell_backward(grad_carry, grad_out, r, z, n, hh_n, h_prev, valid, state_clip, gate_clip, STATE_CLIP: tl.constexpr,
                       GATE_CLIP: tl.constexpr):
    """dL/dh_t from step t+1 and from output_t -> gate gradients and the part of dL/dh_{t-1}
    that does not go through W_hh."""
    grad_h = grad_carry + tl.where(valid, grad_out, 0.0)
    if STATE_CLIP:
        grad_h = clamp(grad_h, state_clip)
    grad_step = tl.where(valid, grad_h, 0.0)
    d_n = grad_step * (1.0 - z) * (1.0 - n * n)
    if GATE_CLIP:
        d_n = clamp(d_n, gate_clip)
    d_r = d_n * hh_n * r * (1.0 - r)
    d_z = grad_step * (h_prev - n) * z * (1.0 - z)
    if GATE_CLIP:
        d_r = clamp(d_r, gate_clip)
        d_z = clamp(d_z, gate_clip)
    grad_keep = tl.where(valid, grad_h * z, grad_h)
    return d_r, d_z, d_n, d_n * r, grad_keep


# ---------------------------------------------------------------------------------------
# Strategy "sequence"
# ---------------------------------------------------------------------------------------


@triton.jit
def _gru_forward_sequence_kernel(
        input_gates_ptr,  # [T, B, 3H] W_ih x_t + b_ih, input dtype
        weight_hh_ptr,  # [3H, H]
        bias_hh_ptr,  # [3H] (zeros when the layer has no bias)
        h0_ptr,  # [B, H] (HAS_H0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        output_ptr,  # [T, B, H] input dtype
        h_n_ptr,  # [B, H] input dtype
        gates_ptr, hidden_ptr,  # reserve (SAVE), see module doc
        steps, batch, hidden,
        HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
        SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    offs = rows[:, None] * hidden + cols[None, :]
    offs_3h = rows[:, None] * (3 * hidden) + cols[None, :]
    offs_4h = rows[:, None] * (4 * hidden) + cols[None, :]

    # W_hh^T of each gate, [BLOCK_H (k), BLOCK_H (j)], loaded once for all steps.
    w_mask = (cols < hidden)[:, None] & (cols < hidden)[None, :]
    w_ptrs = weight_hh_ptr + cols[None, :] * hidden + cols[:, None]
    w_r = tl.load(w_ptrs, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_z = tl.load(w_ptrs + hidden * hidden, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_n = tl.load(w_ptrs + 2 * hidden * hidden, mask=w_mask, other=0.0).to(DOT_DTYPE)
    b_r = tl.load(bias_hh_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    b_z = tl.load(bias_hh_ptr + hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    b_n = tl.load(bias_hh_ptr + 2 * hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)

    for k in range(steps):
        if REVERSE:
            t = steps - 1 - k
        else:
            t = k
        h_dot = h.to(DOT_DTYPE)
        hh_r = tl.dot(h_dot, w_r, input_precision="ieee")
        hh_z = tl.dot(h_dot, w_z, input_precision="ieee")
        hh_n = tl.dot(h_dot, w_n, input_precision="ieee")
        hh_r += b_r
        hh_z += b_z
        hh_n += b_n
        x_ptrs = input_gates_ptr + t * batch * 3 * hidden + offs_3h
        x_r = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x_z = tl.load(x_ptrs + hidden, mask=mask, other=0.0).to(tl.float32)
        x_n = tl.load(x_ptrs + 2 * hidden, mask=mask, other=0.0).to(tl.float32)
        valid = rows_valid(lengths_ptr, rows, batch, t, HAS_LENGTHS)
        r, z, n, h_new, out = _gru_cell_forward(x_r, x_z, x_n, hh_r, hh_z, hh_n, h, valid)
        tl.store(output_ptr + t * batch * hidden + offs, out.to(output_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            g_ptrs = gates_ptr + t * batch * 4 * hidden + offs_4h
            tl.store(g_ptrs, r, mask=mask)
            tl.store(g_ptrs + hidden, z, mask=mask)
            tl.store(g_ptrs + 2 * hidden, n, mask=mask)
            tl.store(g_ptrs + 3 * hidden, hh_n, mask=mask)
            tl.store(hidden_ptr + t * batch * hidden + offs, h_new, mask=mask)
        h = h_new
    tl.store(h_n_ptr + offs, h.to(h_n_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_backward_sequence_kernel(
        grad_output_ptr,  # [T, B, H] input dtype
        grad_h_n_ptr,  # [B, H] input dtype
        weight_hh_ptr,  # [3H, H]
        h0_ptr,  # [B, H] (HAS_H0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        gates_ptr, hidden_ptr,  # forward reserve, float32
        grad_input_gates_ptr,  # out [T, B, 3H] float32: dL/da_r, dL/da_z, dL/da_n
        grad_hidden_gates_ptr,  # out [T, B, 3H] float32: dL/da_r, dL/da_z, r * dL/da_n
        grad_h0_ptr,  # out [B, H] float32
        steps, batch, hidden, state_clip, gate_clip,
        HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, STATE_CLIP: tl.constexpr,
        GATE_CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    offs = rows[:, None] * hidden + cols[None, :]
    offs_3h = rows[:, None] * (3 * hidden) + cols[None, :]
    offs_4h = rows[:, None] * (4 * hidden) + cols[None, :]

    # W_hh of each gate as stored, [BLOCK_H (j), BLOCK_H (k)]: d @ W_hh is dL/dh_{t-1}.
    w_mask = (cols < hidden)[:, None] & (cols < hidden)[None, :]
    w_ptrs = weight_hh_ptr + cols[:, None] * hidden + cols[None, :]
    w_r = tl.load(w_ptrs, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_z = tl.load(w_ptrs + hidden * hidden, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_n = tl.load(w_ptrs + 2 * hidden * hidden, mask=w_mask, other=0.0).to(DOT_DTYPE)

    grad_carry = tl.load(grad_h_n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in range(steps):
        if REVERSE:
            t = k
            t_prev = k + 1
        else:
            t = steps - 1 - k
            t_prev = t - 1
        # [1, 1] tensors (not scalars) so that they combine with the [BB, BH] masks
        has_prev = tl.full((1, 1), k, tl.int32) < steps - 1
        is_first = tl.full((1, 1), k, tl.int32) == steps - 1
        h_prev = tl.load(hidden_ptr + t_prev * batch * hidden + offs, mask=mask & has_prev, other=0.0)
        if HAS_H0:
            h_prev += tl.load(h0_ptr + offs, mask=mask & is_first, other=0.0).to(tl.float32)
        g_ptrs = gates_ptr + t * batch * 4 * hidden + offs_4h
        r = tl.load(g_ptrs, mask=mask, other=0.0)
        z = tl.load(g_ptrs + hidden, mask=mask, other=0.0)
        n = tl.load(g_ptrs + 2 * hidden, mask=mask, other=0.0)
        hh_n = tl.load(g_ptrs + 3 * hidden, mask=mask, other=0.0)
        grad_out = tl.load(grad_output_ptr + t * batch * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        valid = rows_valid(lengths_ptr, rows, batch, t, HAS_LENGTHS)
        d_r, d_z, d_n, d_hh_n, grad_keep = _gru_cell_backward(grad_carry, grad_out, r, z, n, hh_n, h_prev, valid,
                                                              state_clip, gate_clip, STATE_CLIP, GATE_CLIP)
        x_ptrs = grad_input_gates_ptr + t * batch * 3 * hidden + offs_3h
        tl.store(x_ptrs, d_r, mask=mask)
        tl.store(x_ptrs + hidden, d_z, mask=mask)
        tl.store(x_ptrs + 2 * hidden, d_n, mask=mask)
        hg_ptrs = grad_hidden_gates_ptr + t * batch * 3 * hidden + offs_3h
        tl.store(hg_ptrs, d_r, mask=mask)
        tl.store(hg_ptrs + hidden, d_z, mask=mask)
        tl.store(hg_ptrs + 2 * hidden, d_hh_n, mask=mask)
        grad_carry = grad_keep + tl.dot(d_r.to(DOT_DTYPE), w_r, input_precision="ieee")
        grad_carry += tl.dot(d_z.to(DOT_DTYPE), w_z, input_precision="ieee")
        grad_carry += tl.dot(d_hh_n.to(DOT_DTYPE), w_n, input_precision="ieee")
    tl.store(grad_h0_ptr + offs, grad_carry, mask=mask)


# ---------------------------------------------------------------------------------------
# Strategy "step"
# ---------------------------------------------------------------------------------------


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden"])
@triton.jit
def _gru_forward_step_kernel(
        input_gates_ptr,  # [B, 3H] this step's W_ih x_t + b_ih, input dtype
        h_prev_ptr,  # [B, H] float32
        weight_hh_ptr,  # [3H, H]
        bias_hh_ptr,  # [3H] (zeros when the layer has no bias)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        gates_ptr,  # out [B, 4H] float32 (SAVE)
        hidden_ptr,  # out [B, H] float32: carried h_t
        output_ptr,  # out [B, H] input dtype
        step, batch, hidden,
        HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    hh_r = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    hh_z = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    hh_n = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h_chunk = tl.load(h_prev_ptr + rows[:, None] * hidden + ks[None, :],
                          mask=(rows < batch)[:, None] & (ks < hidden)[None, :], other=0.0).to(DOT_DTYPE)
        w_mask = (ks < hidden)[:, None] & (cols < hidden)[None, :]
        w_ptrs = weight_hh_ptr + cols[None, :] * hidden + ks[:, None]  # W_hh^T chunk [BLOCK_K, BLOCK_N]
        hh_r += tl.dot(h_chunk, tl.load(w_ptrs, mask=w_mask, other=0.0).to(DOT_DTYPE), input_precision="ieee")
        hh_z += tl.dot(h_chunk, tl.load(w_ptrs + hidden * hidden, mask=w_mask, other=0.0).to(DOT_DTYPE),
                       input_precision="ieee")
        hh_n += tl.dot(h_chunk, tl.load(w_ptrs + 2 * hidden * hidden, mask=w_mask, other=0.0).to(DOT_DTYPE),
                       input_precision="ieee")
    hh_r += tl.load(bias_hh_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    hh_z += tl.load(bias_hh_ptr + hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    hh_n += tl.load(bias_hh_ptr + 2 * hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    offs = rows[:, None] * hidden + cols[None, :]
    offs_3h = rows[:, None] * (3 * hidden) + cols[None, :]
    x_r = tl.load(input_gates_ptr + offs_3h, mask=mask, other=0.0).to(tl.float32)
    x_z = tl.load(input_gates_ptr + hidden + offs_3h, mask=mask, other=0.0).to(tl.float32)
    x_n = tl.load(input_gates_ptr + 2 * hidden + offs_3h, mask=mask, other=0.0).to(tl.float32)
    h_prev = tl.load(h_prev_ptr + offs, mask=mask, other=0.0)
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    r, z, n, h_new, out = _gru_cell_forward(x_r, x_z, x_n, hh_r, hh_z, hh_n, h_prev, valid)
    tl.store(hidden_ptr + offs, h_new, mask=mask)
    tl.store(output_ptr + offs, out.to(output_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        offs_4h = rows[:, None] * (4 * hidden) + cols[None, :]
        tl.store(gates_ptr + offs_4h, r, mask=mask)
        tl.store(gates_ptr + hidden + offs_4h, z, mask=mask)
        tl.store(gates_ptr + 2 * hidden + offs_4h, n, mask=mask)
        tl.store(gates_ptr + 3 * hidden + offs_4h, hh_n, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden"])
@triton.jit
def _gru_backward_step_kernel(
        grad_output_ptr,  # [B, H] this step's dL/d output_t, input dtype
        grad_keep_ptr,  # [B, H] float32: part of dL/dh_t from step t+1 not through W_hh (or dL/dh_n)
        grad_hidden_gates_next_ptr,  # [B, 3H] float32: hidden-side gate gradients of step t+1 (not FIRST)
        weight_hh_ptr,  # [3H, H]
        gates_ptr,  # [B, 4H] float32 saved r, z, n, W_hn h + b_hn of step t
        h_prev_ptr,  # [B, H] float32 h_{t-1} (HAS_H_PREV)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        grad_input_gates_ptr,  # out [B, 3H] float32
        grad_hidden_gates_ptr,  # out [B, 3H] float32
        grad_keep_out_ptr,  # out [B, H] float32
        step, batch, hidden, state_clip, gate_clip,
        FIRST: tl.constexpr, HAS_H_PREV: tl.constexpr, HAS_LENGTHS: tl.constexpr, STATE_CLIP: tl.constexpr,
        GATE_CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    offs = rows[:, None] * hidden + cols[None, :]
    grad_carry = tl.load(grad_keep_ptr + offs, mask=mask, other=0.0)
    if not FIRST:
        for k0 in range(0, 3 * hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            d_chunk = tl.load(grad_hidden_gates_next_ptr + rows[:, None] * (3 * hidden) + ks[None, :],
                              mask=(rows < batch)[:, None] & (ks < 3 * hidden)[None, :], other=0.0).to(DOT_DTYPE)
            w_chunk = tl.load(weight_hh_ptr + ks[:, None] * hidden + cols[None, :],
                              mask=(ks < 3 * hidden)[:, None] & (cols < hidden)[None, :], other=0.0).to(DOT_DTYPE)
            grad_carry += tl.dot(d_chunk, w_chunk, input_precision="ieee")
    offs_4h = rows[:, None] * (4 * hidden) + cols[None, :]
    r = tl.load(gates_ptr + offs_4h, mask=mask, other=0.0)
    z = tl.load(gates_ptr + hidden + offs_4h, mask=mask, other=0.0)
    n = tl.load(gates_ptr + 2 * hidden + offs_4h, mask=mask, other=0.0)
    hh_n = tl.load(gates_ptr + 3 * hidden + offs_4h, mask=mask, other=0.0)
    if HAS_H_PREV:
        h_prev = tl.load(h_prev_ptr + offs, mask=mask, other=0.0)
    else:
        h_prev = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    grad_out = tl.load(grad_output_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    d_r, d_z, d_n, d_hh_n, grad_keep = _gru_cell_backward(grad_carry, grad_out, r, z, n, hh_n, h_prev, valid,
                                                          state_clip, gate_clip, STATE_CLIP, GATE_CLIP)
    offs_3h = rows[:, None] * (3 * hidden) + cols[None, :]
    tl.store(grad_input_gates_ptr + offs_3h, d_r, mask=mask)
    tl.store(grad_input_gates_ptr + hidden + offs_3h, d_z, mask=mask)
    tl.store(grad_input_gates_ptr + 2 * hidden + offs_3h, d_n, mask=mask)
    tl.store(grad_hidden_gates_ptr + offs_3h, d_r, mask=mask)
    tl.store(grad_hidden_gates_ptr + hidden + offs_3h, d_z, mask=mask)
    tl.store(grad_hidden_gates_ptr + 2 * hidden + offs_3h, d_hh_n, mask=mask)
    tl.store(grad_keep_out_ptr + offs, grad_keep, mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _step_grid(batch: int, columns: int):
    return lambda meta: (triton.cdiv(batch, config.BLOCK_B), triton.cdiv(columns, meta["BLOCK_N"]))


def _processing_order(steps: int, reverse: bool) -> List[int]:
    return list(range(steps - 1, -1, -1)) if reverse else list(range(steps))


def _empty(device) -> Tensor:
    """Placeholder for a reserve tensor that is not kept (float32, like the kept ones)."""
    return torch.empty(0, device=device, dtype=torch.float32)


def _gru_forward_impl(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                      bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
                      save_for_backward: bool, strategy: str):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    device, dtype = input.device, input.dtype
    f32 = dict(device=device, dtype=torch.float32)
    input_gates = F.linear(input, weight_ih, bias_ih).contiguous()  # every step's input projection at once
    weight_hh = weight_hh.contiguous()
    # Always a bias pointer, zeros when absent, as for LSTM (where a no-bias specialisation
    # crashes the compiler): one kernel variant fewer to compile and test.
    bias_hh = bias_hh.contiguous() if bias_hh is not None else input.new_zeros(3 * hidden)
    lengths_dev = lengths.to(device) if lengths is not None else None
    dummy = input_gates  # stands in for absent optional pointers; never read (constexpr flags)
    save = bool(save_for_backward)
    output = torch.empty(steps, batch, hidden, device=device, dtype=dtype)
    gates = torch.empty(steps, batch, 4 * hidden, **f32) if save else _empty(device)
    dot_dtype = config.dot_dtype(dtype)
    if strategy == "sequence":
        hidden_states = torch.empty(steps, batch, hidden, **f32) if save else _empty(device)
        h_n = torch.empty(batch, hidden, device=device, dtype=dtype)
        _gru_forward_sequence_kernel[(triton.cdiv(batch, config.BLOCK_B),)](
            input_gates, weight_hh, bias_hh,
            h0.contiguous() if h0 is not None else dummy, lengths_dev if lengths_dev is not None else dummy,
            output, h_n, gates if save else dummy, hidden_states if save else dummy,
            steps, batch, hidden,
            HAS_H0=h0 is not None, HAS_LENGTHS=lengths is not None,
            REVERSE=bool(reverse), SAVE=save, DOT_DTYPE=dot_dtype, BLOCK_B=config.BLOCK_B,
            BLOCK_H=config.padded(hidden), num_warps=config.sequence_num_warps())
        return output, h_n, gates, hidden_states

    # Strategy "step": step t reads the float32 state step t-1 wrote: one slot per step
    # when training (they are the saved activations), two alternating slots otherwise.
    hidden_states = torch.empty(steps if save else 2, batch, hidden, **f32)
    h_prev = h0.float().contiguous() if h0 is not None else torch.zeros(batch, hidden, **f32)
    for n, t in enumerate(_processing_order(steps, reverse)):
        slot = t if save else n % 2
        _gru_forward_step_kernel[_step_grid(batch, hidden)](
            input_gates[t], h_prev, weight_hh, bias_hh,
            lengths_dev if lengths_dev is not None else dummy, gates[t] if save else dummy, hidden_states[slot],
            output[t], t, batch, hidden,
            HAS_LENGTHS=lengths is not None, SAVE=save, DOT_DTYPE=dot_dtype,
            BLOCK_B=config.BLOCK_B)
        h_prev = hidden_states[slot]
    h_n = h_prev.to(dtype, copy=True)
    return output, h_n, gates, hidden_states if save else _empty(device)


def _previous_states(states: Tensor, start: Tensor, reverse: bool) -> Tensor:
    """[T, B, H] state before each step, in step order."""
    if reverse:
        return torch.cat([states[1:], start.unsqueeze(0)])
    return torch.cat([start.unsqueeze(0), states[:-1]])


def _gru_backward_impl(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], input: Tensor, weight_ih: Tensor,
                       weight_hh: Tensor, h0: Optional[Tensor], lengths: Optional[Tensor], gates: Tensor,
                       hidden_states: Tensor, reverse: bool, state_clip: float, gate_clip: float,
                       strategy: str, output_mask: List[bool]):
    """Returns (d input, d weight_ih, d weight_hh, d bias_ih, d bias_hh, d h0), each empty
    where output_mask says it is not needed."""
    steps, batch, features = input.shape
    hidden = weight_ih.shape[0] // 3
    device, dtype = input.device, input.dtype
    f32 = dict(device=device, dtype=torch.float32)
    grad_output = grad_output.contiguous() if grad_output is not None else torch.zeros(steps, batch, hidden,
                                                                                       device=device, dtype=dtype)
    grad_h_n = grad_h_n.contiguous() if grad_h_n is not None else torch.zeros(batch, hidden, device=device,
                                                                              dtype=dtype)
    weight_hh = weight_hh.contiguous()
    lengths_dev = lengths.to(device) if lengths is not None else None
    dummy = gates  # stands in for absent optional pointers; never read (constexpr flags)
    grad_input_gates = torch.empty(steps, batch, 3 * hidden, **f32)
    grad_hidden_gates = torch.empty(steps, batch, 3 * hidden, **f32)
    clips = dict(STATE_CLIP=state_clip > 0, GATE_CLIP=gate_clip > 0)
    dot_dtype = config.dot_dtype(dtype)
    if strategy == "sequence":
        grad_h0 = torch.empty(batch, hidden, **f32)
        _gru_backward_sequence_kernel[(triton.cdiv(batch, config.BLOCK_B),)](
            grad_output, grad_h_n, weight_hh, h0.contiguous() if h0 is not None else dummy,
            lengths_dev if lengths_dev is not None else dummy, gates, hidden_states, grad_input_gates,
            grad_hidden_gates, grad_h0, steps, batch, hidden, float(state_clip), float(gate_clip),
            HAS_H0=h0 is not None, HAS_LENGTHS=lengths is not None, REVERSE=bool(reverse), **clips,
            DOT_DTYPE=dot_dtype, BLOCK_B=config.BLOCK_B, BLOCK_H=config.padded(hidden),
            num_warps=config.sequence_num_warps())
    else:
        # The carry ping-pongs between two buffers: no launch rewrites what it reads.
        grad_keep = torch.empty(2, batch, hidden, **f32)
        grad_keep[0].copy_(grad_h_n)
        h_start = h0.float().contiguous() if h0 is not None else None
        order = _processing_order(steps, reverse)
        for n, t in enumerate(reversed(order)):
            source, target = n % 2, (n + 1) % 2
            previous = order[len(order) - 2 - n] if n < steps - 1 else None  # processed just before t
            h_prev = hidden_states[previous] if previous is not None else h_start
            _gru_backward_step_kernel[_step_grid(batch, hidden)](
                grad_output[t], grad_keep[source], grad_hidden_gates[order[len(order) - n]] if n > 0 else dummy,
                weight_hh, gates[t], h_prev if h_prev is not None else dummy,
                lengths_dev if lengths_dev is not None else dummy, grad_input_gates[t], grad_hidden_gates[t],
                grad_keep[target], t, batch, hidden, float(state_clip), float(gate_clip),
                FIRST=n == 0, HAS_H_PREV=h_prev is not None, HAS_LENGTHS=lengths is not None,
                **clips, DOT_DTYPE=dot_dtype, BLOCK_B=config.BLOCK_B)
        # dL/dh0: what the first processed step passes back.
        grad_h0 = grad_keep[steps % 2] + grad_hidden_gates[order[0]] @ weight_hh.float()

    need_input, need_weight_ih, need_weight_hh, need_bias_ih, need_bias_hh, need_h0 = output_mask
    flat_input_gates = grad_input_gates.reshape(steps * batch, 3 * hidden)
    flat_hidden_gates = grad_hidden_gates.reshape(steps * batch, 3 * hidden)
    grad_input = (flat_input_gates @ weight_ih.float()).reshape(steps, batch, features).to(dtype) \
        if need_input else input.new_empty(0)
    grad_weight_ih = (flat_input_gates.t() @ input.reshape(steps * batch, features).float()).to(dtype) \
        if need_weight_ih else input.new_empty(0)
    if need_weight_hh:
        h_start = h0.float() if h0 is not None else torch.zeros(batch, hidden, **f32)
        h_before = _previous_states(hidden_states, h_start, reverse).reshape(steps * batch, hidden)
        grad_weight_hh = (flat_hidden_gates.t() @ h_before).to(dtype)
    else:
        grad_weight_hh = input.new_empty(0)
    grad_bias_ih = flat_input_gates.sum(0).to(dtype) if need_bias_ih else input.new_empty(0)
    grad_bias_hh = flat_hidden_gates.sum(0).to(dtype) if need_bias_hh else input.new_empty(0)
    grad_h0 = grad_h0.to(dtype) if need_h0 else input.new_empty(0)
    return grad_input, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0


# ---------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("rnntl_fast::triton_gru_forward", mutates_args=())
def triton_gru_forward(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                       bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
                       state_clip: float, gate_clip: float, save_for_backward: bool,
                       strategy: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """GRU layer-direction forward (contract: rnntl_fast/ops/autograd.py). Returns output
    [T, B, H], h_n [B, H] and the float32 reserve (gates [T, B, 4H], hidden states
    [T, B, H]; empty where not kept)."""
    return _gru_forward_impl(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, reverse, save_for_backward,
                             strategy)


@triton_gru_forward.register_fake
def _(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, reverse, state_clip, gate_clip,
      save_for_backward, strategy):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    keep = bool(save_for_backward)
    return (input.new_empty(steps, batch, hidden), input.new_empty(batch, hidden),
            input.new_empty((steps, batch, 4 * hidden) if keep else (0,), dtype=torch.float32),
            input.new_empty((steps, batch, hidden) if keep else (0,), dtype=torch.float32))


@torch.library.custom_op("rnntl_fast::triton_gru_backward", mutates_args=())
def triton_gru_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], input: Tensor, weight_ih: Tensor,
                        weight_hh: Tensor, h0: Optional[Tensor], lengths: Optional[Tensor], gates: Tensor,
                        hidden_states: Tensor, reverse: bool, state_clip: float, gate_clip: float, strategy: str,
                        output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GRU layer-direction backward from the forward's reserve. output_mask (6 bools): which
    of (input, weight_ih, weight_hh, bias_ih, bias_hh, h0) need a gradient."""
    return _gru_backward_impl(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, gates, hidden_states,
                              reverse, state_clip, gate_clip, strategy, output_mask)


@triton_gru_backward.register_fake
def _(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, gates, hidden_states, reverse, state_clip,
      gate_clip, strategy, output_mask):
    return gru_gradients_like(input, weight_ih, weight_hh, output_mask)


register_gru_autograd(triton_gru_forward, triton_gru_backward, reserve_includes_output=False)
