"""Triton LSTM: one layer-direction over a sequence, forward and backward.

Math, clipping and lengths semantics are those of rnntl_fast.ops.reference.lstm_reference;
docs/triton.md explains the tiling. Shapes: T steps, B batch rows, I input features,
H cells, P outputs (P = proj_size with weight_hr, else H). All kernels take contiguous
tensors and compute in float32; saved activations ("reserve") are float32.

Forward saves, per step t (all [T, B, *] float32):
  gates           [T, B, 4H] i, f, g, o after their nonlinearities
  cells           [T, B, H]  c_t as the recurrence carries it (clipped; kept past a row's length)
  hidden          [T, B, P]  h_t as the recurrence carries it
  cell_pre_clip   [T, B, H]  f*c_{t-1} + i*g before cell_clip (only with cell_clip)
  hidden_pre_clip [T, B, P]  h_t before proj_clip (only with proj_clip)
Backward produces the gradient of the gate pre-activations da [T, B, 4H] (and, with a
projection, the gradient of W_hr m_t [T, B, P]); every weight gradient is then one matmul
over all steps, skipped for weights that need none.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..autograd import lstm_gradients_like, register_lstm_autograd
from . import config
from .common import clamp, clamp_pass, rows_valid, sigmoid, tanh

# ---------------------------------------------------------------------------------------
# Cell math shared by both strategies
# ---------------------------------------------------------------------------------------


@triton.jit
def _lstm_cell_forward(a_i, a_f, a_g, a_o, c_prev, valid, cell_clip, CELL_CLIP: tl.constexpr):
    """Gate pre-activations [BB, BH] -> activations, c_t before clip, carried c_t, m = o*tanh(c_t)."""
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    o = sigmoid(a_o)
    c_raw = f * c_prev + i * g
    if CELL_CLIP:
        c_new = clamp(c_raw, cell_clip)
    else:
        c_new = c_raw
    c_new = tl.where(valid, c_new, c_prev)
    m = o * tanh(c_new)
    return i, f, g, o, c_raw, c_new, m


@triton.jit
def _lstm_hidden_forward(h_raw, h_prev, valid, proj_clip, PROJ_CLIP: tl.constexpr):
    """W_hr m (or m) -> carried h_t and the output (0 past a row's length)."""
    if PROJ_CLIP:
        h_new = clamp(h_raw, proj_clip)
    else:
        h_new = h_raw
    h_new = tl.where(valid, h_new, h_prev)
    return h_new, tl.where(valid, h_new, 0.0)


@triton.jit
def _lstm_hidden_backward(grad_carry, grad_out, h_raw, valid, proj_clip, state_clip, PROJ_CLIP: tl.constexpr,
                          STATE_CLIP: tl.constexpr):
    """Total dL/dh_t (clipped in "state" mode) -> (gradient of W_hr m_t, the part passed
    straight to h_{t-1} where the row is past its length)."""
    grad_h = grad_carry + tl.where(valid, grad_out, 0.0)
    if STATE_CLIP:
        grad_h = clamp(grad_h, state_clip)
    grad_proj = tl.where(valid, grad_h, 0.0)
    if PROJ_CLIP:
        grad_proj = grad_proj * clamp_pass(h_raw, proj_clip)
    return grad_proj, tl.where(valid, 0.0, grad_h)


@triton.jit
def _lstm_cell_backward(grad_m, grad_c_carry, i, f, g, o, c_new, c_prev, c_raw, valid, cell_clip, state_clip, gate_clip,
                        CELL_CLIP: tl.constexpr, STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr):
    """dL/dm_t and dL/dc_t from step t+1 -> dL/da (4 gates) and dL/dc_{t-1}."""
    tanh_c = tanh(c_new)
    grad_c = grad_c_carry + grad_m * o * (1.0 - tanh_c * tanh_c)
    if STATE_CLIP:
        grad_c = clamp(grad_c, state_clip)
    grad_c_raw = tl.where(valid, grad_c, 0.0)
    if CELL_CLIP:
        grad_c_raw = grad_c_raw * clamp_pass(c_raw, cell_clip)
    d_i = grad_c_raw * g * i * (1.0 - i)
    d_f = grad_c_raw * c_prev * f * (1.0 - f)
    d_g = grad_c_raw * i * (1.0 - g * g)
    d_o = grad_m * tanh_c * o * (1.0 - o)
    if GATE_CLIP:
        d_i = clamp(d_i, gate_clip)
        d_f = clamp(d_f, gate_clip)
        d_g = clamp(d_g, gate_clip)
        d_o = clamp(d_o, gate_clip)
    grad_c_prev = tl.where(valid, grad_c_raw * f, grad_c)
    return d_i, d_f, d_g, d_o, grad_c_prev


# ---------------------------------------------------------------------------------------
# Strategy "sequence": one launch, program = BLOCK_B rows x the whole state, weights on chip
# ---------------------------------------------------------------------------------------


@triton.jit
def _lstm_forward_sequence_kernel(
        input_gates_ptr,  # [T, B, 4H] W_ih x_t + b_ih, input dtype
        weight_hh_ptr,  # [4H, P]
        bias_hh_ptr,  # [4H] (zeros when the layer has no bias)
        weight_hr_ptr,  # [P, H] (HAS_PROJ)
        h0_ptr,  # [B, P] (HAS_H0)
        c0_ptr,  # [B, H] (HAS_C0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        output_ptr,  # [T, B, P] input dtype
        h_n_ptr,  # [B, P] input dtype
        c_n_ptr,  # [B, H] input dtype
        gates_ptr, cells_ptr, hidden_ptr, cell_pre_clip_ptr, hidden_pre_clip_ptr,  # reserve (SAVE), see module doc
        steps, batch, hidden, out_size, cell_clip, proj_clip,
        HAS_PROJ: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, CELL_CLIP: tl.constexpr, PROJ_CLIP: tl.constexpr,
        SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols_h = tl.arange(0, BLOCK_H)
    cols_p = tl.arange(0, BLOCK_P)
    mask_h = (rows < batch)[:, None] & (cols_h < hidden)[None, :]
    mask_p = (rows < batch)[:, None] & (cols_p < out_size)[None, :]
    offs_h = rows[:, None] * hidden + cols_h[None, :]
    offs_p = rows[:, None] * out_size + cols_p[None, :]
    offs_4h = rows[:, None] * (4 * hidden) + cols_h[None, :]

    # W_hh^T of each gate, [BLOCK_P, BLOCK_H]: loaded once, reused by every step.
    w_mask = (cols_p < out_size)[:, None] & (cols_h < hidden)[None, :]
    w_ptrs = weight_hh_ptr + cols_h[None, :] * out_size + cols_p[:, None]
    w_i = tl.load(w_ptrs, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_f = tl.load(w_ptrs + hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_g = tl.load(w_ptrs + 2 * hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_o = tl.load(w_ptrs + 3 * hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE)
    b_mask = cols_h < hidden
    b_i = tl.load(bias_hh_ptr + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    b_f = tl.load(bias_hh_ptr + hidden + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    b_g = tl.load(bias_hh_ptr + 2 * hidden + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    b_o = tl.load(bias_hh_ptr + 3 * hidden + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_PROJ:
        # W_hr^T, [BLOCK_H, BLOCK_P]
        w_hr = tl.load(weight_hr_ptr + cols_p[None, :] * hidden + cols_h[:, None],
                       mask=(cols_h < hidden)[:, None] & (cols_p < out_size)[None, :], other=0.0).to(DOT_DTYPE)

    if HAS_H0:
        h = tl.load(h0_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    if HAS_C0:
        c = tl.load(c0_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    else:
        c = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)

    for k in range(steps):
        if REVERSE:
            t = steps - 1 - k
        else:
            t = k
        x_ptrs = input_gates_ptr + t * batch * 4 * hidden + offs_4h
        h_dot = h.to(DOT_DTYPE)
        a_i = tl.load(x_ptrs, mask=mask_h, other=0.0).to(tl.float32) + tl.dot(h_dot, w_i, input_precision="ieee")
        a_f = tl.load(x_ptrs + hidden, mask=mask_h, other=0.0).to(tl.float32) + tl.dot(
            h_dot, w_f, input_precision="ieee")
        a_g = tl.load(x_ptrs + 2 * hidden, mask=mask_h, other=0.0).to(tl.float32) + tl.dot(
            h_dot, w_g, input_precision="ieee")
        a_o = tl.load(x_ptrs + 3 * hidden, mask=mask_h, other=0.0).to(tl.float32) + tl.dot(
            h_dot, w_o, input_precision="ieee")
        a_i += b_i
        a_f += b_f
        a_g += b_g
        a_o += b_o
        valid = rows_valid(lengths_ptr, rows, batch, t, HAS_LENGTHS)
        i, f, g, o, c_raw, c_new, m = _lstm_cell_forward(a_i, a_f, a_g, a_o, c, valid, cell_clip, CELL_CLIP)
        if HAS_PROJ:
            h_raw = tl.dot(m.to(DOT_DTYPE), w_hr, input_precision="ieee")
        else:
            h_raw = m
        h_new, out = _lstm_hidden_forward(h_raw, h, valid, proj_clip, PROJ_CLIP)
        tl.store(output_ptr + t * batch * out_size + offs_p, out.to(output_ptr.dtype.element_ty), mask=mask_p)
        if SAVE:
            g_ptrs = gates_ptr + t * batch * 4 * hidden + offs_4h
            tl.store(g_ptrs, i, mask=mask_h)
            tl.store(g_ptrs + hidden, f, mask=mask_h)
            tl.store(g_ptrs + 2 * hidden, g, mask=mask_h)
            tl.store(g_ptrs + 3 * hidden, o, mask=mask_h)
            tl.store(cells_ptr + t * batch * hidden + offs_h, c_new, mask=mask_h)
            tl.store(hidden_ptr + t * batch * out_size + offs_p, h_new, mask=mask_p)
            if CELL_CLIP:
                tl.store(cell_pre_clip_ptr + t * batch * hidden + offs_h, c_raw, mask=mask_h)
            if PROJ_CLIP:
                tl.store(hidden_pre_clip_ptr + t * batch * out_size + offs_p, h_raw, mask=mask_p)
        h = h_new
        c = c_new
    tl.store(h_n_ptr + offs_p, h.to(h_n_ptr.dtype.element_ty), mask=mask_p)
    tl.store(c_n_ptr + offs_h, c.to(c_n_ptr.dtype.element_ty), mask=mask_h)


@triton.jit
def _lstm_backward_sequence_kernel(
        grad_output_ptr,  # [T, B, P] input dtype
        grad_h_n_ptr,  # [B, P] input dtype
        grad_c_n_ptr,  # [B, H] input dtype
        weight_hh_ptr,  # [4H, P]
        weight_hr_ptr,  # [P, H] (HAS_PROJ)
        c0_ptr,  # [B, H] (HAS_C0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        gates_ptr, cells_ptr, cell_pre_clip_ptr, hidden_pre_clip_ptr,  # forward reserve, float32
        grad_gates_ptr,  # out [T, B, 4H] float32: dL/da_t
        grad_proj_ptr,  # out [T, B, P] float32: dL/d(W_hr m_t) (HAS_PROJ)
        grad_h0_ptr,  # out [B, P] float32
        grad_c0_ptr,  # out [B, H] float32
        steps, batch, hidden, out_size, cell_clip, proj_clip, state_clip, gate_clip,
        HAS_PROJ: tl.constexpr, HAS_C0: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
        CELL_CLIP: tl.constexpr, PROJ_CLIP: tl.constexpr, STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr,
        DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols_h = tl.arange(0, BLOCK_H)
    cols_p = tl.arange(0, BLOCK_P)
    mask_h = (rows < batch)[:, None] & (cols_h < hidden)[None, :]
    mask_p = (rows < batch)[:, None] & (cols_p < out_size)[None, :]
    offs_h = rows[:, None] * hidden + cols_h[None, :]
    offs_p = rows[:, None] * out_size + cols_p[None, :]
    offs_4h = rows[:, None] * (4 * hidden) + cols_h[None, :]

    # W_hh of each gate as stored, [BLOCK_H, BLOCK_P]: da_t @ W_hh is dL/dh_{t-1}.
    w_mask = (cols_h < hidden)[:, None] & (cols_p < out_size)[None, :]
    w_ptrs = weight_hh_ptr + cols_h[:, None] * out_size + cols_p[None, :]
    w_i = tl.load(w_ptrs, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_f = tl.load(w_ptrs + hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_g = tl.load(w_ptrs + 2 * hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE)
    w_o = tl.load(w_ptrs + 3 * hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE)
    if HAS_PROJ:
        # W_hr as stored, [BLOCK_P, BLOCK_H]
        w_hr = tl.load(weight_hr_ptr + cols_p[:, None] * hidden + cols_h[None, :],
                       mask=(cols_p < out_size)[:, None] & (cols_h < hidden)[None, :], other=0.0).to(DOT_DTYPE)

    grad_h_carry = tl.load(grad_h_n_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    grad_c_carry = tl.load(grad_c_n_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    for k in range(steps):
        # walk the forward order backwards; t_prev is the step processed just before t
        if REVERSE:
            t = k
            t_prev = k + 1
        else:
            t = steps - 1 - k
            t_prev = t - 1
        # [1, 1] tensors (not scalars) so that they combine with the [BB, BH] masks
        has_prev = tl.full((1, 1), k, tl.int32) < steps - 1
        is_first = tl.full((1, 1), k, tl.int32) == steps - 1
        valid = rows_valid(lengths_ptr, rows, batch, t, HAS_LENGTHS)
        grad_out = tl.load(grad_output_ptr + t * batch * out_size + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        if PROJ_CLIP:
            h_raw = tl.load(hidden_pre_clip_ptr + t * batch * out_size + offs_p, mask=mask_p, other=0.0)
        else:
            h_raw = grad_out  # unused
        grad_proj, grad_h_keep = _lstm_hidden_backward(grad_h_carry, grad_out, h_raw, valid, proj_clip, state_clip,
                                                       PROJ_CLIP, STATE_CLIP)
        if HAS_PROJ:
            tl.store(grad_proj_ptr + t * batch * out_size + offs_p, grad_proj, mask=mask_p)
            grad_m = tl.dot(grad_proj.to(DOT_DTYPE), w_hr, input_precision="ieee")
        else:
            grad_m = grad_proj

        g_ptrs = gates_ptr + t * batch * 4 * hidden + offs_4h
        i = tl.load(g_ptrs, mask=mask_h, other=0.0)
        f = tl.load(g_ptrs + hidden, mask=mask_h, other=0.0)
        g = tl.load(g_ptrs + 2 * hidden, mask=mask_h, other=0.0)
        o = tl.load(g_ptrs + 3 * hidden, mask=mask_h, other=0.0)
        c_new = tl.load(cells_ptr + t * batch * hidden + offs_h, mask=mask_h, other=0.0)
        c_prev = tl.load(cells_ptr + t_prev * batch * hidden + offs_h, mask=mask_h & has_prev, other=0.0)
        if HAS_C0:
            c_prev += tl.load(c0_ptr + offs_h, mask=mask_h & is_first, other=0.0).to(tl.float32)
        if CELL_CLIP:
            c_raw = tl.load(cell_pre_clip_ptr + t * batch * hidden + offs_h, mask=mask_h, other=0.0)
        else:
            c_raw = c_new  # unused
        d_i, d_f, d_g, d_o, grad_c_carry = _lstm_cell_backward(
            grad_m, grad_c_carry, i, f, g, o, c_new, c_prev, c_raw, valid, cell_clip, state_clip, gate_clip, CELL_CLIP,
            STATE_CLIP, GATE_CLIP)
        d_ptrs = grad_gates_ptr + t * batch * 4 * hidden + offs_4h
        tl.store(d_ptrs, d_i, mask=mask_h)
        tl.store(d_ptrs + hidden, d_f, mask=mask_h)
        tl.store(d_ptrs + 2 * hidden, d_g, mask=mask_h)
        tl.store(d_ptrs + 3 * hidden, d_o, mask=mask_h)
        grad_h_carry = grad_h_keep + tl.dot(d_i.to(DOT_DTYPE), w_i, input_precision="ieee")
        grad_h_carry += tl.dot(d_f.to(DOT_DTYPE), w_f, input_precision="ieee")
        grad_h_carry += tl.dot(d_g.to(DOT_DTYPE), w_g, input_precision="ieee")
        grad_h_carry += tl.dot(d_o.to(DOT_DTYPE), w_o, input_precision="ieee")
    tl.store(grad_h0_ptr + offs_p, grad_h_carry, mask=mask_p)
    tl.store(grad_c0_ptr + offs_h, grad_c_carry, mask=mask_h)


# ---------------------------------------------------------------------------------------
# Strategy "step": launches per step, program = BLOCK_B rows x BLOCK_N columns, K loop
# ---------------------------------------------------------------------------------------


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden", "out_size"])
@triton.jit
def _lstm_forward_step_kernel(
        input_gates_ptr,  # [B, 4H] this step's W_ih x_t + b_ih, input dtype
        h_prev_ptr,  # [B, P] float32
        c_prev_ptr,  # [B, H] float32
        weight_hh_ptr,  # [4H, P]
        bias_hh_ptr,  # [4H] (zeros when the layer has no bias)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        gates_ptr,  # out [B, 4H] float32 (SAVE)
        cells_ptr,  # out [B, H] float32: carried c_t
        cell_pre_clip_ptr,  # out [B, H] float32 (SAVE and CELL_CLIP)
        m_ptr,  # out [B, H] float32: o * tanh(c_t) (HAS_PROJ; the projection kernel finishes h_t)
        hidden_ptr,  # out [B, P] float32: carried h_t (not HAS_PROJ)
        output_ptr,  # out [B, P] input dtype (not HAS_PROJ)
        hidden_pre_clip_ptr,  # out [B, P] float32 (not HAS_PROJ, SAVE and PROJ_CLIP)
        step, batch, hidden, out_size, cell_clip, proj_clip,
        HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, CELL_CLIP: tl.constexpr,
        PROJ_CLIP: tl.constexpr, SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    acc_i = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, out_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h_chunk = tl.load(h_prev_ptr + rows[:, None] * out_size + ks[None, :],
                          mask=(rows < batch)[:, None] & (ks < out_size)[None, :], other=0.0).to(DOT_DTYPE)
        w_mask = (ks < out_size)[:, None] & (cols < hidden)[None, :]
        w_ptrs = weight_hh_ptr + cols[None, :] * out_size + ks[:, None]  # W_hh^T chunk [BLOCK_K, BLOCK_N]
        acc_i += tl.dot(h_chunk, tl.load(w_ptrs, mask=w_mask, other=0.0).to(DOT_DTYPE), input_precision="ieee")
        acc_f += tl.dot(h_chunk, tl.load(w_ptrs + hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE),
                        input_precision="ieee")
        acc_g += tl.dot(h_chunk, tl.load(w_ptrs + 2 * hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE),
                        input_precision="ieee")
        acc_o += tl.dot(h_chunk, tl.load(w_ptrs + 3 * hidden * out_size, mask=w_mask, other=0.0).to(DOT_DTYPE),
                        input_precision="ieee")
    offs_4h = rows[:, None] * (4 * hidden) + cols[None, :]
    acc_i += tl.load(input_gates_ptr + offs_4h, mask=mask, other=0.0).to(tl.float32)
    acc_f += tl.load(input_gates_ptr + hidden + offs_4h, mask=mask, other=0.0).to(tl.float32)
    acc_g += tl.load(input_gates_ptr + 2 * hidden + offs_4h, mask=mask, other=0.0).to(tl.float32)
    acc_o += tl.load(input_gates_ptr + 3 * hidden + offs_4h, mask=mask, other=0.0).to(tl.float32)
    b_mask = cols < hidden
    acc_i += tl.load(bias_hh_ptr + cols, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    acc_f += tl.load(bias_hh_ptr + hidden + cols, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    acc_g += tl.load(bias_hh_ptr + 2 * hidden + cols, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    acc_o += tl.load(bias_hh_ptr + 3 * hidden + cols, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    offs_h = rows[:, None] * hidden + cols[None, :]
    c_prev = tl.load(c_prev_ptr + offs_h, mask=mask, other=0.0)
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    i, f, g, o, c_raw, c_new, m = _lstm_cell_forward(acc_i, acc_f, acc_g, acc_o, c_prev, valid, cell_clip, CELL_CLIP)
    tl.store(cells_ptr + offs_h, c_new, mask=mask)
    if SAVE:
        tl.store(gates_ptr + offs_4h, i, mask=mask)
        tl.store(gates_ptr + hidden + offs_4h, f, mask=mask)
        tl.store(gates_ptr + 2 * hidden + offs_4h, g, mask=mask)
        tl.store(gates_ptr + 3 * hidden + offs_4h, o, mask=mask)
        if CELL_CLIP:
            tl.store(cell_pre_clip_ptr + offs_h, c_raw, mask=mask)
    if HAS_PROJ:
        tl.store(m_ptr + offs_h, m, mask=mask)
    else:
        # P == H: this tile of m is this tile of h_t
        h_prev = tl.load(h_prev_ptr + offs_h, mask=mask, other=0.0)
        h_new, out = _lstm_hidden_forward(m, h_prev, valid, proj_clip, PROJ_CLIP)
        tl.store(hidden_ptr + offs_h, h_new, mask=mask)
        tl.store(output_ptr + offs_h, out.to(output_ptr.dtype.element_ty), mask=mask)
        if SAVE and PROJ_CLIP:
            tl.store(hidden_pre_clip_ptr + offs_h, m, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden", "out_size"])
@triton.jit
def _lstm_projection_step_kernel(
        m_ptr,  # [B, H] float32: o * tanh(c_t)
        weight_hr_ptr,  # [P, H]
        h_prev_ptr,  # [B, P] float32
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        hidden_ptr,  # out [B, P] float32: carried h_t
        output_ptr,  # out [B, P] input dtype
        hidden_pre_clip_ptr,  # out [B, P] float32 (SAVE and PROJ_CLIP)
        step, batch, hidden, out_size, proj_clip,
        HAS_LENGTHS: tl.constexpr, PROJ_CLIP: tl.constexpr, SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < out_size)[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m_chunk = tl.load(m_ptr + rows[:, None] * hidden + ks[None, :],
                          mask=(rows < batch)[:, None] & (ks < hidden)[None, :], other=0.0).to(DOT_DTYPE)
        w_chunk = tl.load(weight_hr_ptr + cols[None, :] * hidden + ks[:, None],  # W_hr^T [BLOCK_K, BLOCK_N]
                          mask=(ks < hidden)[:, None] & (cols < out_size)[None, :], other=0.0).to(DOT_DTYPE)
        acc += tl.dot(m_chunk, w_chunk, input_precision="ieee")
    offs = rows[:, None] * out_size + cols[None, :]
    h_prev = tl.load(h_prev_ptr + offs, mask=mask, other=0.0)
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    h_new, out = _lstm_hidden_forward(acc, h_prev, valid, proj_clip, PROJ_CLIP)
    tl.store(hidden_ptr + offs, h_new, mask=mask)
    tl.store(output_ptr + offs, out.to(output_ptr.dtype.element_ty), mask=mask)
    if SAVE and PROJ_CLIP:
        tl.store(hidden_pre_clip_ptr + offs, acc, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden", "out_size"])
@triton.jit
def _lstm_backward_hidden_step_kernel(
        grad_output_ptr,  # [B, P] this step's dL/d output_t, input dtype
        grad_keep_ptr,  # [B, P] float32: dL/dh_t passed straight from step t+1 (rows past their length)
        grad_gates_next_ptr,  # [B, 4H] float32: dL/da_{t+1} (not FIRST)
        weight_hh_ptr,  # [4H, P]
        hidden_pre_clip_ptr,  # [B, P] float32 (PROJ_CLIP)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        grad_proj_ptr,  # out [B, P] float32: dL/d(W_hr m_t), or dL/dm_t without projection
        grad_keep_out_ptr,  # out [B, P] float32: the part of dL/dh_t passed straight to h_{t-1}
        step, batch, hidden, out_size, proj_clip, state_clip,
        FIRST: tl.constexpr, HAS_LENGTHS: tl.constexpr, PROJ_CLIP: tl.constexpr, STATE_CLIP: tl.constexpr,
        DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dh_t = keep_{t+1} + da_{t+1} @ W_hh + dL/d output_t, clipped in "state" mode."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < out_size)[None, :]
    offs = rows[:, None] * out_size + cols[None, :]
    grad_carry = tl.load(grad_keep_ptr + offs, mask=mask, other=0.0)
    if not FIRST:
        for k0 in range(0, 4 * hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            d_chunk = tl.load(grad_gates_next_ptr + rows[:, None] * (4 * hidden) + ks[None, :],
                              mask=(rows < batch)[:, None] & (ks < 4 * hidden)[None, :], other=0.0).to(DOT_DTYPE)
            w_chunk = tl.load(weight_hh_ptr + ks[:, None] * out_size + cols[None, :],
                              mask=(ks < 4 * hidden)[:, None] & (cols < out_size)[None, :], other=0.0).to(DOT_DTYPE)
            grad_carry += tl.dot(d_chunk, w_chunk, input_precision="ieee")
    grad_out = tl.load(grad_output_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PROJ_CLIP:
        h_raw = tl.load(hidden_pre_clip_ptr + offs, mask=mask, other=0.0)
    else:
        h_raw = grad_out  # unused
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    grad_proj, grad_keep = _lstm_hidden_backward(grad_carry, grad_out, h_raw, valid, proj_clip, state_clip, PROJ_CLIP,
                                                 STATE_CLIP)
    tl.store(grad_proj_ptr + offs, grad_proj, mask=mask)
    tl.store(grad_keep_out_ptr + offs, grad_keep, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden", "out_size"])
@triton.jit
def _lstm_backward_cell_step_kernel(
        grad_proj_ptr,  # [B, P] float32 from the hidden step kernel
        weight_hr_ptr,  # [P, H] (HAS_PROJ)
        grad_c_carry_ptr,  # [B, H] float32: dL/dc_t from step t+1
        gates_ptr,  # [B, 4H] float32 saved activations of step t
        cells_ptr,  # [B, H] float32 c_t
        c_prev_ptr,  # [B, H] float32 c_{t-1} (HAS_C_PREV)
        cell_pre_clip_ptr,  # [B, H] float32 (CELL_CLIP)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        grad_gates_ptr,  # out [B, 4H] float32: dL/da_t
        grad_c_carry_out_ptr,  # out [B, H] float32: dL/dc_{t-1}
        step, batch, hidden, out_size, cell_clip, state_clip, gate_clip,
        HAS_PROJ: tl.constexpr, HAS_C_PREV: tl.constexpr, HAS_LENGTHS: tl.constexpr, CELL_CLIP: tl.constexpr,
        STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    offs_h = rows[:, None] * hidden + cols[None, :]
    if HAS_PROJ:
        grad_m = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, out_size, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            p_chunk = tl.load(grad_proj_ptr + rows[:, None] * out_size + ks[None, :],
                              mask=(rows < batch)[:, None] & (ks < out_size)[None, :], other=0.0).to(DOT_DTYPE)
            w_chunk = tl.load(weight_hr_ptr + ks[:, None] * hidden + cols[None, :],
                              mask=(ks < out_size)[:, None] & (cols < hidden)[None, :], other=0.0).to(DOT_DTYPE)
            grad_m += tl.dot(p_chunk, w_chunk, input_precision="ieee")
    else:
        grad_m = tl.load(grad_proj_ptr + offs_h, mask=mask, other=0.0)
    offs_4h = rows[:, None] * (4 * hidden) + cols[None, :]
    i = tl.load(gates_ptr + offs_4h, mask=mask, other=0.0)
    f = tl.load(gates_ptr + hidden + offs_4h, mask=mask, other=0.0)
    g = tl.load(gates_ptr + 2 * hidden + offs_4h, mask=mask, other=0.0)
    o = tl.load(gates_ptr + 3 * hidden + offs_4h, mask=mask, other=0.0)
    c_new = tl.load(cells_ptr + offs_h, mask=mask, other=0.0)
    if HAS_C_PREV:
        c_prev = tl.load(c_prev_ptr + offs_h, mask=mask, other=0.0)
    else:
        c_prev = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if CELL_CLIP:
        c_raw = tl.load(cell_pre_clip_ptr + offs_h, mask=mask, other=0.0)
    else:
        c_raw = c_new  # unused
    grad_c_carry = tl.load(grad_c_carry_ptr + offs_h, mask=mask, other=0.0)
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    d_i, d_f, d_g, d_o, grad_c_prev = _lstm_cell_backward(grad_m, grad_c_carry, i, f, g, o, c_new, c_prev, c_raw,
                                                          valid, cell_clip, state_clip, gate_clip, CELL_CLIP, STATE_CLIP,
                                                          GATE_CLIP)
    tl.store(grad_gates_ptr + offs_4h, d_i, mask=mask)
    tl.store(grad_gates_ptr + hidden + offs_4h, d_f, mask=mask)
    tl.store(grad_gates_ptr + 2 * hidden + offs_4h, d_g, mask=mask)
    tl.store(grad_gates_ptr + 3 * hidden + offs_4h, d_o, mask=mask)
    tl.store(grad_c_carry_out_ptr + offs_h, grad_c_prev, mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers (registered as torch ops below)
# ---------------------------------------------------------------------------------------


def _step_grid(batch: int, columns: int):
    return lambda meta: (triton.cdiv(batch, config.BLOCK_B), triton.cdiv(columns, meta["BLOCK_N"]))


def _processing_order(steps: int, reverse: bool) -> List[int]:
    return list(range(steps - 1, -1, -1)) if reverse else list(range(steps))


def _empty(device) -> Tensor:
    """Placeholder for a reserve tensor that is not kept (float32, like the kept ones)."""
    return torch.empty(0, device=device, dtype=torch.float32)


def _lstm_forward_impl(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                       bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], h0: Optional[Tensor],
                       c0: Optional[Tensor], lengths: Optional[Tensor], reverse: bool, cell_clip: float,
                       proj_clip: float, save_for_backward: bool, strategy: str):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    device, dtype = input.device, input.dtype
    f32 = dict(device=device, dtype=torch.float32)
    # One matmul for the input projection of every step.
    input_gates = F.linear(input, weight_ih, bias_ih).contiguous()
    weight_hh = weight_hh.contiguous()
    weight_hr_c = weight_hr.contiguous() if weight_hr is not None else None
    # Always a bias pointer: a no-bias specialisation of the float32 LSTM sequence
    # kernel crashes LLVM's SLP vectorizer (triton 3.9.0, sm_90), and zeros cost nothing.
    bias_hh = bias_hh.contiguous() if bias_hh is not None else input.new_zeros(4 * hidden)
    lengths_dev = lengths.to(device) if lengths is not None else None
    dummy = input_gates  # stands in for absent optional pointers; never read (constexpr flags)
    output = torch.empty(steps, batch, out_size, device=device, dtype=dtype)
    save = bool(save_for_backward)
    flags = dict(HAS_LENGTHS=lengths is not None, CELL_CLIP=cell_clip > 0, PROJ_CLIP=proj_clip > 0,
                 DOT_DTYPE=config.dot_dtype(dtype))
    cell_clip_value = float(cell_clip)
    proj_clip_value = float(proj_clip)

    if strategy == "sequence":
        gates = torch.empty(steps, batch, 4 * hidden, **f32) if save else _empty(device)
        cells = torch.empty(steps, batch, hidden, **f32) if save else _empty(device)
        hidden_states = torch.empty(steps, batch, out_size, **f32) if save else _empty(device)
        cell_pre_clip = torch.empty(steps, batch, hidden, **f32) if save and cell_clip > 0 else _empty(device)
        hidden_pre_clip = torch.empty(steps, batch, out_size, **f32) if save and proj_clip > 0 else _empty(device)
        h_n = torch.empty(batch, out_size, device=device, dtype=dtype)
        c_n = torch.empty(batch, hidden, device=device, dtype=dtype)
        _lstm_forward_sequence_kernel[(triton.cdiv(batch, config.BLOCK_B),)](
            input_gates, weight_hh, bias_hh,
            weight_hr_c if weight_hr_c is not None else dummy,
            h0.contiguous() if h0 is not None else dummy, c0.contiguous() if c0 is not None else dummy,
            lengths_dev if lengths_dev is not None else dummy,
            output, h_n, c_n,
            gates if save else dummy, cells if save else dummy, hidden_states if save else dummy,
            cell_pre_clip if cell_pre_clip.numel() else dummy, hidden_pre_clip if hidden_pre_clip.numel() else dummy,
            steps, batch, hidden, out_size, cell_clip_value, proj_clip_value,
            HAS_PROJ=weight_hr is not None, HAS_H0=h0 is not None,
            HAS_C0=c0 is not None, REVERSE=bool(reverse), SAVE=save,
            BLOCK_B=config.BLOCK_B, BLOCK_H=config.padded(hidden), BLOCK_P=config.padded(out_size),
            num_warps=config.sequence_num_warps(), **flags)
        return output, h_n, c_n, gates, cells, hidden_states, cell_pre_clip, hidden_pre_clip

    # Strategy "step": the state lives in float32 buffers, step t reading the slot step t-1
    # wrote. Training keeps one slot per step (they are the saved activations); inference
    # alternates between two.
    gates = torch.empty(steps, batch, 4 * hidden, **f32) if save else _empty(device)
    slots = steps if save else 2
    cells = torch.empty(slots, batch, hidden, **f32)
    hidden_states = torch.empty(slots, batch, out_size, **f32)
    cell_pre_clip = torch.empty(steps, batch, hidden, **f32) if save and cell_clip > 0 else _empty(device)
    hidden_pre_clip = torch.empty(steps, batch, out_size, **f32) if save and proj_clip > 0 else _empty(device)
    m = torch.empty(batch, hidden, **f32) if weight_hr is not None else None
    h_prev = h0.float().contiguous() if h0 is not None else torch.zeros(batch, out_size, **f32)
    c_prev = c0.float().contiguous() if c0 is not None else torch.zeros(batch, hidden, **f32)
    for n, t in enumerate(_processing_order(steps, reverse)):
        slot = t if save else n % 2
        _lstm_forward_step_kernel[_step_grid(batch, hidden)](
            input_gates[t], h_prev, c_prev, weight_hh, bias_hh,
            lengths_dev if lengths_dev is not None else dummy,
            gates[t] if save else dummy, cells[slot], cell_pre_clip[t] if cell_pre_clip.numel() else dummy,
            m if m is not None else dummy, hidden_states[slot], output[t],
            hidden_pre_clip[t] if hidden_pre_clip.numel() else dummy,
            t, batch, hidden, out_size, cell_clip_value, proj_clip_value,
            HAS_PROJ=weight_hr is not None, SAVE=save, BLOCK_B=config.BLOCK_B,
            **flags)
        if weight_hr is not None:
            _lstm_projection_step_kernel[_step_grid(batch, out_size)](
                m, weight_hr_c, h_prev, lengths_dev if lengths_dev is not None else dummy, hidden_states[slot],
                output[t], hidden_pre_clip[t] if hidden_pre_clip.numel() else dummy,
                t, batch, hidden, out_size, proj_clip_value,
                HAS_LENGTHS=flags["HAS_LENGTHS"], PROJ_CLIP=flags["PROJ_CLIP"], SAVE=save,
                DOT_DTYPE=flags["DOT_DTYPE"], BLOCK_B=config.BLOCK_B)
        h_prev, c_prev = hidden_states[slot], cells[slot]
    h_n = h_prev.to(dtype, copy=True)
    c_n = c_prev.to(dtype, copy=True)
    if not save:
        cells, hidden_states = _empty(device), _empty(device)
    return output, h_n, c_n, gates, cells, hidden_states, cell_pre_clip, hidden_pre_clip


def _previous_states(states: Tensor, start: Tensor, reverse: bool) -> Tensor:
    """[T, B, N] state before each step, in step order: states shifted by one in the
    processing direction, `start` [B, N] where the processing begins."""
    if reverse:
        return torch.cat([states[1:], start.unsqueeze(0)])
    return torch.cat([start.unsqueeze(0), states[:-1]])


def _lstm_backward_impl(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor],
                        input: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_hr: Optional[Tensor],
                        h0: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor], gates: Tensor,
                        cells: Tensor, hidden_states: Tensor, cell_pre_clip: Tensor, hidden_pre_clip: Tensor,
                        reverse: bool, cell_clip: float, proj_clip: float, state_clip: float, gate_clip: float,
                        strategy: str, output_mask: List[bool]):
    """Returns (d input, d weight_ih, d weight_hh, d bias (= d bias_ih = d bias_hh), d weight_hr, d h0, d c0),
    each an empty tensor where output_mask says it is not needed."""
    steps, batch, features = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    device, dtype = input.device, input.dtype
    f32 = dict(device=device, dtype=torch.float32)
    grad_output = grad_output.contiguous() if grad_output is not None else torch.zeros(steps, batch, out_size,
                                                                                       device=device, dtype=dtype)
    grad_h_n = grad_h_n.contiguous() if grad_h_n is not None else torch.zeros(batch, out_size, device=device,
                                                                              dtype=dtype)
    grad_c_n = grad_c_n.contiguous() if grad_c_n is not None else torch.zeros(batch, hidden, device=device,
                                                                              dtype=dtype)
    weight_hh = weight_hh.contiguous()
    weight_hr_c = weight_hr.contiguous() if weight_hr is not None else None
    lengths_dev = lengths.to(device) if lengths is not None else None
    dummy = gates  # stands in for absent optional pointers; never read (constexpr flags)
    grad_gates = torch.empty(steps, batch, 4 * hidden, **f32)
    grad_proj = torch.empty(steps, batch, out_size, **f32) if weight_hr is not None else None
    flags = dict(HAS_LENGTHS=lengths is not None, CELL_CLIP=cell_clip > 0,
                 STATE_CLIP=state_clip > 0,
                 DOT_DTYPE=config.dot_dtype(dtype))
    cell_clip_value = float(cell_clip)
    proj_clip_value = float(proj_clip)

    if strategy == "sequence":
        grad_h0 = torch.empty(batch, out_size, **f32)
        grad_c0 = torch.empty(batch, hidden, **f32)
        _lstm_backward_sequence_kernel[(triton.cdiv(batch, config.BLOCK_B),)](
            grad_output, grad_h_n, grad_c_n, weight_hh, weight_hr_c if weight_hr_c is not None else dummy,
            c0.contiguous() if c0 is not None else dummy, lengths_dev if lengths_dev is not None else dummy,
            gates, cells, cell_pre_clip if cell_clip > 0 else dummy,
            hidden_pre_clip if proj_clip > 0 else dummy,
            grad_gates, grad_proj if grad_proj is not None else dummy, grad_h0, grad_c0,
            steps, batch, hidden, out_size, cell_clip_value, proj_clip_value, float(state_clip), float(gate_clip),
            HAS_PROJ=weight_hr is not None, HAS_C0=c0 is not None, REVERSE=bool(reverse),
            PROJ_CLIP=proj_clip > 0, GATE_CLIP=gate_clip > 0,
            BLOCK_B=config.BLOCK_B, BLOCK_H=config.padded(hidden), BLOCK_P=config.padded(out_size),
            num_warps=config.sequence_num_warps(), **flags)
    else:
        # Carries ping-pong between two buffers so that every launch reads what the
        # previous one wrote and rewrites nothing it reads (safe to re-run when autotuning).
        grad_keep = torch.empty(2, batch, out_size, **f32)
        grad_keep[0].copy_(grad_h_n)
        grad_c_carry = torch.empty(2, batch, hidden, **f32)
        grad_c_carry[0].copy_(grad_c_n)
        grad_m_buffer = torch.empty(batch, out_size, **f32) if grad_proj is None else None
        c_start = c0.float().contiguous() if c0 is not None else None
        order = _processing_order(steps, reverse)
        for n, t in enumerate(reversed(order)):
            source, target = n % 2, (n + 1) % 2
            previous = order[len(order) - 2 - n] if n < steps - 1 else None  # processed just before t
            grad_proj_t = grad_proj[t] if grad_proj is not None else grad_m_buffer
            _lstm_backward_hidden_step_kernel[_step_grid(batch, out_size)](
                grad_output[t], grad_keep[source], grad_gates[order[len(order) - n]] if n > 0 else dummy,
                weight_hh, hidden_pre_clip[t] if proj_clip > 0 else dummy,
                lengths_dev if lengths_dev is not None else dummy, grad_proj_t, grad_keep[target],
                t, batch, hidden, out_size, proj_clip_value, float(state_clip),
                FIRST=n == 0, HAS_LENGTHS=flags["HAS_LENGTHS"], PROJ_CLIP=proj_clip > 0,
                STATE_CLIP=flags["STATE_CLIP"], DOT_DTYPE=flags["DOT_DTYPE"], BLOCK_B=config.BLOCK_B)
            c_prev = cells[previous] if previous is not None else c_start
            _lstm_backward_cell_step_kernel[_step_grid(batch, hidden)](
                grad_proj_t, weight_hr_c if weight_hr_c is not None else dummy, grad_c_carry[source], gates[t],
                cells[t], c_prev if c_prev is not None else dummy,
                cell_pre_clip[t] if cell_clip > 0 else dummy,
                lengths_dev if lengths_dev is not None else dummy, grad_gates[t], grad_c_carry[target],
                t, batch, hidden, out_size, cell_clip_value, float(state_clip), float(gate_clip),
                HAS_PROJ=weight_hr is not None, HAS_C_PREV=c_prev is not None, GATE_CLIP=gate_clip > 0,
                BLOCK_B=config.BLOCK_B, **flags)
        last = steps % 2
        first_step = order[0]
        # dL/dh0: what the first processed step passes back, as the kernels would for h_{-1}.
        grad_h0 = grad_keep[last] + grad_gates[first_step] @ weight_hh.float()
        grad_c0 = grad_c_carry[last].clone()  # a fresh tensor, not a view into the carry buffer

    need_input, need_weight_ih, need_weight_hh, need_bias, need_weight_hr, need_h0, need_c0 = output_mask
    flat_grad_gates = grad_gates.reshape(steps * batch, 4 * hidden)
    grad_input = (flat_grad_gates @ weight_ih.float()).reshape(steps, batch, features).to(dtype) \
        if need_input else input.new_empty(0)
    grad_weight_ih = (flat_grad_gates.t() @ input.reshape(steps * batch, features).float()).to(dtype) \
        if need_weight_ih else input.new_empty(0)
    if need_weight_hh:
        h_start = h0.float() if h0 is not None else torch.zeros(batch, out_size, **f32)
        h_before = _previous_states(hidden_states, h_start, reverse).reshape(steps * batch, out_size)
        grad_weight_hh = (flat_grad_gates.t() @ h_before).to(dtype)
    else:
        grad_weight_hh = input.new_empty(0)
    grad_bias = flat_grad_gates.sum(0).to(dtype) if need_bias else input.new_empty(0)
    if need_weight_hr and weight_hr is not None:
        m = gates[..., 3 * hidden:] * torch.tanh(cells)
        grad_weight_hr = (grad_proj.reshape(steps * batch, out_size).t() @ m.reshape(steps * batch, hidden)).to(dtype)
    else:
        grad_weight_hr = input.new_empty(0)
    grad_h0 = grad_h0.to(dtype) if need_h0 else input.new_empty(0)
    grad_c0 = grad_c0.to(dtype) if need_c0 else input.new_empty(0)
    return grad_input, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr, grad_h0, grad_c0


# ---------------------------------------------------------------------------------------
# Registered ops: torch.library.custom_op + fake + autograd
# ---------------------------------------------------------------------------------------

LstmForwardResult = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("rnntl_fast::triton_lstm_forward", mutates_args=())
def triton_lstm_forward(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                        bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], h0: Optional[Tensor],
                        c0: Optional[Tensor], lengths: Optional[Tensor], reverse: bool, cell_clip: float,
                        proj_clip: float, state_clip: float, gate_clip: float, save_for_backward: bool,
                        strategy: str) -> LstmForwardResult:
    """LSTM layer-direction forward (contract: rnntl_fast/ops/autograd.py). Returns output
    [T, B, P], h_n [B, P], c_n [B, H] and the float32 reserve (gates, cells, hidden states,
    cell before clip, hidden before clip; see the module doc), each empty where not kept."""
    return _lstm_forward_impl(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, reverse,
                              cell_clip, proj_clip, save_for_backward, strategy)


@triton_lstm_forward.register_fake
def _(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, reverse, cell_clip, proj_clip,
      state_clip, gate_clip, save_for_backward, strategy):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    keep = bool(save_for_backward)
    reserve = lambda needed, *shape: input.new_empty(shape if needed else (0,), dtype=torch.float32)  # noqa: E731
    return (input.new_empty(steps, batch, out_size), input.new_empty(batch, out_size), input.new_empty(batch, hidden),
            reserve(keep, steps, batch, 4 * hidden), reserve(keep, steps, batch, hidden),
            reserve(keep, steps, batch, out_size), reserve(keep and cell_clip > 0, steps, batch, hidden),
            reserve(keep and proj_clip > 0, steps, batch, out_size))


@torch.library.custom_op("rnntl_fast::triton_lstm_backward", mutates_args=())
def triton_lstm_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor],
                         input: Tensor, weight_ih: Tensor, weight_hh: Tensor, weight_hr: Optional[Tensor],
                         h0: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor], gates: Tensor,
                         cells: Tensor, hidden_states: Tensor, cell_pre_clip: Tensor, hidden_pre_clip: Tensor,
                         reverse: bool, cell_clip: float, proj_clip: float, state_clip: float, gate_clip: float,
                         strategy: str,
                         output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """LSTM layer-direction backward from the forward's reserve. output_mask (7 bools) says
    which of (input, weight_ih, weight_hh, bias, weight_hr, h0, c0) need a gradient; the
    others come back empty and cost nothing."""
    return _lstm_backward_impl(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0,
                               lengths, gates, cells, hidden_states, cell_pre_clip, hidden_pre_clip, reverse,
                               cell_clip, proj_clip, state_clip, gate_clip, strategy, output_mask)


@triton_lstm_backward.register_fake
def _(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, gates, cells,
      hidden_states, cell_pre_clip, hidden_pre_clip, reverse, cell_clip, proj_clip, state_clip, gate_clip,
      strategy, output_mask):
    return lstm_gradients_like(input, weight_ih, weight_hh, weight_hr, output_mask)


register_lstm_autograd(triton_lstm_forward, triton_lstm_backward, reserve_includes_output=False)
