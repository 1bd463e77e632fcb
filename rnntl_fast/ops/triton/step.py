"""Strategy "step": a launch per step (two with an LSTM projection), any size (docs/triton.md).

A program computes a [BLOCK_B, BLOCK_N] tile of one step's result, streaming the weights
through a K loop; tiles are autotuned (config.step_configs). The state is carried in
float32 buffers between launches. Shapes: T steps, B batch rows, H cells, P outputs
(P = H without a projection). Kernels take contiguous tensors and compute in float32.
"""
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import config
from .cell_math import (gru_cell_backward, gru_cell_forward, lstm_cell_backward, lstm_cell_forward,
                        lstm_hidden_backward, lstm_hidden_forward, rnn_cell_backward, rnn_cell_forward, rows_valid)
from .launch import (GruRecurrenceGradients, GruReserve, LayerNormGains, LstmRecurrenceGradients, LstmReserve,
                     RnnReserve, clip_switches, empty_reserve, float32_state, or_placeholder, processing_order, reserve,
                     times_recurrent_mask)

# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def recurrent_operand(h_prev_ptr, recurrent_mask_ptr, rows, ks, batch, width, HAS_RECURRENT_MASK: tl.constexpr,
                      DOT_DTYPE: tl.constexpr):
    """The [BLOCK_B, BLOCK_K] chunk (columns `ks`) of h_{t-1} as it enters W_hh h_{t-1}: times the
    recurrent mask where there is one. h_prev_ptr: [B, width] float32; recurrent_mask_ptr:
    [B, width] in the input dtype."""
    offs = rows[:, None] * width + ks[None, :]
    valid = (rows < batch)[:, None] & (ks < width)[None, :]
    h_chunk = tl.load(h_prev_ptr + offs, mask=valid, other=0.0)
    if HAS_RECURRENT_MASK:
        h_chunk = h_chunk * tl.load(recurrent_mask_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return h_chunk.to(DOT_DTYPE)


@triton.jit
def masked_product_plus_carry(product, grad_keep_ptr, recurrent_mask_ptr, offs, valid):
    """dL/dh_t from a [BLOCK_B, BLOCK_N] tile of the next step's da @ W_hh: the product times
    the recurrent mask (the product saw mask * h_t) plus the part carried around it.
    grad_keep_ptr: [B, N] float32; recurrent_mask_ptr: [B, N] in the input dtype."""
    recurrent_mask = tl.load(recurrent_mask_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return tl.load(grad_keep_ptr + offs, mask=valid, other=0.0) + recurrent_mask * product


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden", "out_size"],
                 prune_configs_by=config.spill_free_pruning("lstm_forward_step"))
@triton.jit
def lstm_forward_step_kernel(
        input_gates_ptr,  # [B, 4H] this step's W_ih x_t + b_ih, input dtype
        h_prev_ptr,  # [B, P] float32
        c_prev_ptr,  # [B, H] float32
        weight_hh_ptr,  # [4H, P]
        bias_hh_ptr,  # [4H] (zeros when the layer has no bias)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, P] input dtype: multiplier of h_{t-1} in W_hh h_{t-1} (HAS_RECURRENT_MASK)
        zoneout_h_ptr,  # [B, P] this step's keep weights of h, input dtype (HAS_ZONEOUT_H, not HAS_PROJ)
        zoneout_c_ptr,  # [B, H] this step's keep weights of c, input dtype (HAS_ZONEOUT_C)
        gates_ptr,  # out [B, 4H] float32 (SAVE)
        cells_ptr,  # out [B, H] float32: carried c_t
        cell_pre_clip_ptr,  # out [B, H] float32 (SAVE and CELL_CLIP)
        fresh_cells_ptr,  # out [B, H] float32: c~_t before zoneout (SAVE and HAS_ZONEOUT_C)
        m_ptr,  # out [B, H] float32: o * tanh(c~_t) (HAS_PROJ; the projection kernel finishes h_t)
        hidden_ptr,  # out [B, P] float32: carried h_t (not HAS_PROJ)
        output_ptr,  # out [B, P] input dtype (not HAS_PROJ)
        hidden_pre_clip_ptr,  # out [B, P] float32 (not HAS_PROJ, SAVE and PROJ_CLIP)
        step, batch, hidden, out_size, cell_clip, proj_clip,
        HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr,
        HAS_ZONEOUT_H: tl.constexpr, HAS_ZONEOUT_C: tl.constexpr, CELL_CLIP: tl.constexpr,
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
        h_chunk = recurrent_operand(h_prev_ptr, recurrent_mask_ptr, rows, ks, batch, out_size, HAS_RECURRENT_MASK,
                                    DOT_DTYPE)
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
    if HAS_ZONEOUT_C:
        keep_c = tl.load(zoneout_c_ptr + offs_h, mask=mask, other=0.0).to(tl.float32)
    else:
        keep_c = c_prev  # unused
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    i, f, g, o, c_raw, c_fresh, c_new, m = lstm_cell_forward(acc_i, acc_f, acc_g, acc_o, c_prev, keep_c, valid,
                                                             cell_clip, CELL_CLIP, HAS_ZONEOUT_C)
    tl.store(cells_ptr + offs_h, c_new, mask=mask)
    if SAVE:
        tl.store(gates_ptr + offs_4h, i, mask=mask)
        tl.store(gates_ptr + hidden + offs_4h, f, mask=mask)
        tl.store(gates_ptr + 2 * hidden + offs_4h, g, mask=mask)
        tl.store(gates_ptr + 3 * hidden + offs_4h, o, mask=mask)
        if CELL_CLIP:
            tl.store(cell_pre_clip_ptr + offs_h, c_raw, mask=mask)
        if HAS_ZONEOUT_C:
            tl.store(fresh_cells_ptr + offs_h, c_fresh, mask=mask)
    if HAS_PROJ:
        tl.store(m_ptr + offs_h, m, mask=mask)
    else:
        # P == H: this tile of m is this tile of h~_t
        h_prev = tl.load(h_prev_ptr + offs_h, mask=mask, other=0.0)
        if HAS_ZONEOUT_H:
            keep_h = tl.load(zoneout_h_ptr + offs_h, mask=mask, other=0.0).to(tl.float32)
        else:
            keep_h = h_prev  # unused
        h_new, out = lstm_hidden_forward(m, h_prev, keep_h, valid, proj_clip, PROJ_CLIP, HAS_ZONEOUT_H)
        tl.store(hidden_ptr + offs_h, h_new, mask=mask)
        tl.store(output_ptr + offs_h, out.to(output_ptr.dtype.element_ty), mask=mask)
        if SAVE and PROJ_CLIP:
            tl.store(hidden_pre_clip_ptr + offs_h, m, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden", "out_size"])
@triton.jit
def lstm_projection_step_kernel(
        m_ptr,  # [B, H] float32: o * tanh(c_t)
        weight_hr_ptr,  # [P, H]
        h_prev_ptr,  # [B, P] float32
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        zoneout_h_ptr,  # [B, P] this step's keep weights of h, input dtype (HAS_ZONEOUT_H)
        hidden_ptr,  # out [B, P] float32: carried h_t
        output_ptr,  # out [B, P] input dtype
        hidden_pre_clip_ptr,  # out [B, P] float32 (SAVE and PROJ_CLIP)
        step, batch, hidden, out_size, proj_clip,
        HAS_LENGTHS: tl.constexpr, HAS_ZONEOUT_H: tl.constexpr, PROJ_CLIP: tl.constexpr, SAVE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
    if HAS_ZONEOUT_H:
        keep_h = tl.load(zoneout_h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        keep_h = h_prev  # unused
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    h_new, out = lstm_hidden_forward(acc, h_prev, keep_h, valid, proj_clip, PROJ_CLIP, HAS_ZONEOUT_H)
    tl.store(hidden_ptr + offs, h_new, mask=mask)
    tl.store(output_ptr + offs, out.to(output_ptr.dtype.element_ty), mask=mask)
    if SAVE and PROJ_CLIP:
        tl.store(hidden_pre_clip_ptr + offs, acc, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden", "out_size"],
                 prune_configs_by=config.spill_free_pruning("lstm_backward_hidden_step"))
@triton.jit
def lstm_backward_hidden_step_kernel(
        grad_output_ptr,  # [B, P] this step's dL/d output_t, input dtype
        grad_keep_ptr,  # [B, P] float32: dL/dh_t passed straight from step t+1 (rows past their length)
        grad_gates_next_ptr,  # [B, 4H] float32: dL/da_{t+1} (not FIRST)
        weight_hh_ptr,  # [4H, P]
        hidden_pre_clip_ptr,  # [B, P] float32 (PROJ_CLIP)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, P] input dtype (HAS_RECURRENT_MASK)
        zoneout_h_ptr,  # [B, P] this step's keep weights of h, input dtype (HAS_ZONEOUT_H)
        grad_proj_ptr,  # out [B, P] float32: dL/d(W_hr m_t), or dL/dm_t without projection
        grad_keep_out_ptr,  # out [B, P] float32: the part of dL/dh_t passed straight to h_{t-1}
        step, batch, hidden, out_size, proj_clip, state_clip,
        FIRST: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr,
        HAS_ZONEOUT_H: tl.constexpr, PROJ_CLIP: tl.constexpr, STATE_CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dh_t = keep_{t+1} + (da_{t+1} @ W_hh) [* recurrent mask] + dL/d output_t, clipped in
    "state" mode."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < out_size)[None, :]
    offs = rows[:, None] * out_size + cols[None, :]
    if HAS_RECURRENT_MASK:
        # The product alone first: it reaches h_t times the mask, the carried part does not
        # (loaded after the K loop, so that it holds no registers during it).
        grad_carry = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        grad_carry = tl.load(grad_keep_ptr + offs, mask=mask, other=0.0)
    if not FIRST:
        for k0 in range(0, 4 * hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            d_chunk = tl.load(grad_gates_next_ptr + rows[:, None] * (4 * hidden) + ks[None, :],
                              mask=(rows < batch)[:, None] & (ks < 4 * hidden)[None, :], other=0.0).to(DOT_DTYPE)
            w_chunk = tl.load(weight_hh_ptr + ks[:, None] * out_size + cols[None, :],
                              mask=(ks < 4 * hidden)[:, None] & (cols < out_size)[None, :], other=0.0).to(DOT_DTYPE)
            grad_carry += tl.dot(d_chunk, w_chunk, input_precision="ieee")
    if HAS_RECURRENT_MASK:
        grad_carry = masked_product_plus_carry(grad_carry, grad_keep_ptr, recurrent_mask_ptr, offs, mask)
    grad_out = tl.load(grad_output_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PROJ_CLIP:
        h_raw = tl.load(hidden_pre_clip_ptr + offs, mask=mask, other=0.0)
    else:
        h_raw = grad_out  # unused
    if HAS_ZONEOUT_H:
        keep_h = tl.load(zoneout_h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        keep_h = grad_out  # unused
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    grad_proj, grad_keep = lstm_hidden_backward(grad_carry, grad_out, h_raw, keep_h, valid, proj_clip, state_clip,
                                                 PROJ_CLIP, STATE_CLIP, HAS_ZONEOUT_H)
    tl.store(grad_proj_ptr + offs, grad_proj, mask=mask)
    tl.store(grad_keep_out_ptr + offs, grad_keep, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden", "out_size"])
@triton.jit
def lstm_backward_cell_step_kernel(
        grad_proj_ptr,  # [B, P] float32 from the hidden step kernel
        weight_hr_ptr,  # [P, H] (HAS_PROJ)
        grad_c_carry_ptr,  # [B, H] float32: dL/dc_t from step t+1
        gates_ptr,  # [B, 4H] float32 saved activations of step t
        cells_ptr,  # [B, H] float32 c~_t as h~_t read it: the fresh cells with zoneout of c, else the carried c_t
        c_prev_ptr,  # [B, H] float32 c_{t-1} (HAS_C_PREV)
        cell_pre_clip_ptr,  # [B, H] float32 (CELL_CLIP)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        zoneout_c_ptr,  # [B, H] this step's keep weights of c, input dtype (HAS_ZONEOUT_C)
        grad_gates_ptr,  # out [B, 4H] float32: dL/da_t
        grad_c_carry_out_ptr,  # out [B, H] float32: dL/dc_{t-1}
        step, batch, hidden, out_size, cell_clip, state_clip, gate_clip,
        HAS_PROJ: tl.constexpr, HAS_C_PREV: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_ZONEOUT_C: tl.constexpr,
        CELL_CLIP: tl.constexpr,
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
    if HAS_ZONEOUT_C:
        keep_c = tl.load(zoneout_c_ptr + offs_h, mask=mask, other=0.0).to(tl.float32)
    else:
        keep_c = c_new  # unused
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    d_i, d_f, d_g, d_o, grad_c_prev = lstm_cell_backward(grad_m, grad_c_carry, i, f, g, o, c_new, c_prev, c_raw,
                                                          keep_c, valid, c_new, c_new, cell_clip, state_clip, gate_clip,
                                                          CELL_CLIP, STATE_CLIP, GATE_CLIP, HAS_ZONEOUT_C, False)
    tl.store(grad_gates_ptr + offs_4h, d_i, mask=mask)
    tl.store(grad_gates_ptr + hidden + offs_4h, d_f, mask=mask)
    tl.store(grad_gates_ptr + 2 * hidden + offs_4h, d_g, mask=mask)
    tl.store(grad_gates_ptr + 3 * hidden + offs_4h, d_o, mask=mask)
    tl.store(grad_c_carry_out_ptr + offs_h, grad_c_prev, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden"],
                 prune_configs_by=config.spill_free_pruning("gru_forward_step"))
@triton.jit
def gru_forward_step_kernel(
        input_gates_ptr,  # [B, 3H] this step's W_ih x_t + b_ih, input dtype
        h_prev_ptr,  # [B, H] float32
        weight_hh_ptr,  # [3H, H]
        bias_hh_ptr,  # [3H] (zeros when the layer has no bias)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, H] input dtype: multiplier of h_{t-1} in W_hh h_{t-1} (HAS_RECURRENT_MASK)
        zoneout_ptr,  # [B, H] this step's keep weights, input dtype (HAS_ZONEOUT)
        gates_ptr,  # out [B, 4H] float32 (SAVE)
        hidden_ptr,  # out [B, H] float32: carried h_t
        output_ptr,  # out [B, H] input dtype
        step, batch, hidden,
        HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr, HAS_ZONEOUT: tl.constexpr, SAVE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    hh_r = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    hh_z = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    hh_n = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h_chunk = recurrent_operand(h_prev_ptr, recurrent_mask_ptr, rows, ks, batch, hidden, HAS_RECURRENT_MASK,
                                    DOT_DTYPE)
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
    if HAS_ZONEOUT:
        keep = tl.load(zoneout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        keep = h_prev  # unused
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    r, z, n, h_new, out = gru_cell_forward(x_r, x_z, x_n, hh_r, hh_z, hh_n, h_prev, keep, valid, HAS_ZONEOUT)
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
def gru_backward_step_kernel(
        grad_output_ptr,  # [B, H] this step's dL/d output_t, input dtype
        grad_keep_ptr,  # [B, H] float32: part of dL/dh_t from step t+1 not through W_hh (or dL/dh_n)
        grad_hidden_gates_next_ptr,  # [B, 3H] float32: hidden-side gate gradients of step t+1 (not FIRST)
        weight_hh_ptr,  # [3H, H]
        gates_ptr,  # [B, 4H] float32 saved r, z, n, W_hn h + b_hn of step t
        h_prev_ptr,  # [B, H] float32 h_{t-1} (HAS_H_PREV)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, H] input dtype (HAS_RECURRENT_MASK)
        zoneout_ptr,  # [B, H] this step's keep weights, input dtype (HAS_ZONEOUT)
        grad_input_gates_ptr,  # out [B, 3H] float32
        grad_hidden_gates_ptr,  # out [B, 3H] float32
        grad_keep_out_ptr,  # out [B, H] float32
        step, batch, hidden, state_clip, gate_clip,
        FIRST: tl.constexpr, HAS_H_PREV: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr,
        HAS_ZONEOUT: tl.constexpr, STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    offs = rows[:, None] * hidden + cols[None, :]
    if HAS_RECURRENT_MASK:  # as in lstm_backward_hidden_step_kernel
        grad_carry = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        grad_carry = tl.load(grad_keep_ptr + offs, mask=mask, other=0.0)
    if not FIRST:
        for k0 in range(0, 3 * hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            d_chunk = tl.load(grad_hidden_gates_next_ptr + rows[:, None] * (3 * hidden) + ks[None, :],
                              mask=(rows < batch)[:, None] & (ks < 3 * hidden)[None, :], other=0.0).to(DOT_DTYPE)
            w_chunk = tl.load(weight_hh_ptr + ks[:, None] * hidden + cols[None, :],
                              mask=(ks < 3 * hidden)[:, None] & (cols < hidden)[None, :], other=0.0).to(DOT_DTYPE)
            grad_carry += tl.dot(d_chunk, w_chunk, input_precision="ieee")
    if HAS_RECURRENT_MASK:
        grad_carry = masked_product_plus_carry(grad_carry, grad_keep_ptr, recurrent_mask_ptr, offs, mask)
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
    if HAS_ZONEOUT:
        keep = tl.load(zoneout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        keep = grad_out  # unused
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    d_r, d_z, d_n, d_hh_n, grad_keep = gru_cell_backward(grad_carry, grad_out, r, z, n, hh_n, h_prev, keep, valid,
                                                          state_clip, gate_clip, STATE_CLIP, GATE_CLIP, HAS_ZONEOUT)
    offs_3h = rows[:, None] * (3 * hidden) + cols[None, :]
    tl.store(grad_input_gates_ptr + offs_3h, d_r, mask=mask)
    tl.store(grad_input_gates_ptr + hidden + offs_3h, d_z, mask=mask)
    tl.store(grad_input_gates_ptr + 2 * hidden + offs_3h, d_n, mask=mask)
    tl.store(grad_hidden_gates_ptr + offs_3h, d_r, mask=mask)
    tl.store(grad_hidden_gates_ptr + hidden + offs_3h, d_z, mask=mask)
    tl.store(grad_hidden_gates_ptr + 2 * hidden + offs_3h, d_hh_n, mask=mask)
    tl.store(grad_keep_out_ptr + offs, grad_keep, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden"],
                 prune_configs_by=config.spill_free_pruning("rnn_forward_step"))
@triton.jit
def rnn_forward_step_kernel(
        input_gates_ptr,  # [B, H] this step's W_ih x_t + b_ih, input dtype
        h_prev_ptr,  # [B, H] float32
        weight_hh_ptr,  # [H, H]
        bias_hh_ptr,  # [H] (zeros when the layer has no bias)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, H] input dtype: multiplier of h_{t-1} in W_hh h_{t-1} (HAS_RECURRENT_MASK)
        zoneout_ptr,  # [B, H] this step's keep weights, input dtype (HAS_ZONEOUT)
        activations_ptr,  # out [B, H] float32 f(a_t) (SAVE and HAS_ZONEOUT)
        hidden_ptr,  # out [B, H] float32: carried h_t
        output_ptr,  # out [B, H] input dtype
        step, batch, hidden,
        HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr, HAS_ZONEOUT: tl.constexpr, RELU: tl.constexpr,
        SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    a = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h_chunk = recurrent_operand(h_prev_ptr, recurrent_mask_ptr, rows, ks, batch, hidden, HAS_RECURRENT_MASK,
                                    DOT_DTYPE)
        w_ptrs = weight_hh_ptr + cols[None, :] * hidden + ks[:, None]  # W_hh^T chunk [BLOCK_K, BLOCK_N]
        w_chunk = tl.load(w_ptrs, mask=(ks < hidden)[:, None] & (cols < hidden)[None, :], other=0.0)
        a += tl.dot(h_chunk, w_chunk.to(DOT_DTYPE), input_precision="ieee")
    offs = rows[:, None] * hidden + cols[None, :]
    a += tl.load(bias_hh_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    a += tl.load(input_gates_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h_prev = tl.load(h_prev_ptr + offs, mask=mask, other=0.0)
    if HAS_ZONEOUT:
        keep = tl.load(zoneout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        keep = a  # unused
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    activation, h_new, out = rnn_cell_forward(a, h_prev, keep, valid, RELU, HAS_ZONEOUT)
    tl.store(hidden_ptr + offs, h_new, mask=mask)
    tl.store(output_ptr + offs, out.to(output_ptr.dtype.element_ty), mask=mask)
    if SAVE and HAS_ZONEOUT:
        tl.store(activations_ptr + offs, activation, mask=mask)


@triton.autotune(configs=config.step_configs(), key=["batch", "hidden"])
@triton.jit
def rnn_backward_step_kernel(
        grad_output_ptr,  # [B, H] this step's dL/d output_t, input dtype
        grad_keep_ptr,  # [B, H] float32: part of dL/dh_t from step t+1 not through W_hh (or dL/dh_n)
        grad_gates_next_ptr,  # [B, H] float32: dL/da of step t+1 (not FIRST)
        weight_hh_ptr,  # [H, H]
        activations_ptr,  # [B, H] float32 f(a_t): the activations reserve with zoneout, else the hidden states
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, H] input dtype (HAS_RECURRENT_MASK)
        zoneout_ptr,  # [B, H] this step's keep weights, input dtype (HAS_ZONEOUT)
        grad_gates_ptr,  # out [B, H] float32: dL/da_t
        grad_keep_out_ptr,  # out [B, H] float32
        step, batch, hidden, state_clip, gate_clip,
        FIRST: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr, HAS_ZONEOUT: tl.constexpr,
        RELU: tl.constexpr, STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    offs = rows[:, None] * hidden + cols[None, :]
    if HAS_RECURRENT_MASK:  # as in lstm_backward_hidden_step_kernel
        grad_carry = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        grad_carry = tl.load(grad_keep_ptr + offs, mask=mask, other=0.0)
    if not FIRST:
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            d_chunk = tl.load(grad_gates_next_ptr + rows[:, None] * hidden + ks[None, :],
                              mask=(rows < batch)[:, None] & (ks < hidden)[None, :], other=0.0).to(DOT_DTYPE)
            w_chunk = tl.load(weight_hh_ptr + ks[:, None] * hidden + cols[None, :],  # W_hh chunk [BLOCK_K, BLOCK_N]
                              mask=(ks < hidden)[:, None] & (cols < hidden)[None, :], other=0.0).to(DOT_DTYPE)
            grad_carry += tl.dot(d_chunk, w_chunk, input_precision="ieee")
    if HAS_RECURRENT_MASK:
        grad_carry = masked_product_plus_carry(grad_carry, grad_keep_ptr, recurrent_mask_ptr, offs, mask)
    activation = tl.load(activations_ptr + offs, mask=mask, other=0.0)
    if HAS_ZONEOUT:
        keep = tl.load(zoneout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        keep = activation  # unused
    grad_out = tl.load(grad_output_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    valid = rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS)
    d_a, grad_keep = rnn_cell_backward(grad_carry, grad_out, activation, keep, valid, state_clip, gate_clip, RELU,
                                       HAS_ZONEOUT, STATE_CLIP, GATE_CLIP)
    tl.store(grad_gates_ptr + offs, d_a, mask=mask)
    tl.store(grad_keep_out_ptr + offs, grad_keep, mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _refuse_layer_norm(norm) -> None:
    """Layer normalisation takes statistics over a whole gate row, which no program of this
    strategy holds (docs/triton.md); ops.py sends it to the sequence strategy."""
    if norm is not None:
        raise NotImplementedError("the Triton step strategy does not run layer_norm; it runs in the sequence strategy")


def _grid(batch: int, columns: int):
    return lambda meta: (triton.cdiv(batch, config.BLOCK_B), triton.cdiv(columns, meta["BLOCK_N"]))


def _backward_walk(steps: int, reverse: bool) -> Iterator[Tuple[int, int, Optional[int], Optional[int]]]:
    """The steps in reverse processing order, as (n, t, later, earlier): n counts from 0,
    `later` is the step processed just after t (whose gradients flow into t; None for the
    first one walked), `earlier` the one processed just before t (None for the last)."""
    order = processing_order(steps, reverse)
    for n in range(steps):
        position = steps - 1 - n
        yield (n, order[position], order[position + 1] if n > 0 else None,
               order[position - 1] if position > 0 else None)


def lstm_forward(input_gates: Tensor, weight_hh: Tensor, bias_hh: Tensor, weight_hr: Optional[Tensor],
                 h0: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor],
                 recurrent_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor],
                 norm: Optional[LayerNormGains], reverse: bool, cell_clip: float, proj_clip: float,
                 save: bool) -> Tuple[Tensor, Tensor, Tensor, LstmReserve]:
    """LSTM forward, a launch per step; arguments and results as sequence.lstm_forward, but
    without layer normalisation (norm must be None)."""
    _refuse_layer_norm(norm)
    steps, batch, _ = input_gates.shape
    hidden = input_gates.shape[2] // 4
    out_size = weight_hh.shape[1]
    device, dtype = input_gates.device, input_gates.dtype
    switches = clip_switches(cell_clip=cell_clip, proj_clip=proj_clip)
    unused = input_gates  # fills the pointer slots of absent tensors (never read)
    # Step t reads the state slot step t-1 wrote. Training keeps one slot per step (they
    # are the saved activations); inference alternates between two.
    slots = steps if save else 2
    gates = reserve(save, steps, batch, 4 * hidden, device=device)
    cells = torch.empty(slots, batch, hidden, device=device, dtype=torch.float32)
    hidden_states = torch.empty(slots, batch, out_size, device=device, dtype=torch.float32)
    cell_pre_clip = reserve(save and switches["CELL_CLIP"], steps, batch, hidden, device=device)
    hidden_pre_clip = reserve(save and switches["PROJ_CLIP"], steps, batch, out_size, device=device)
    fresh_cells = reserve(save and zoneout_c is not None, steps, batch, hidden, device=device)
    m = torch.empty(batch, hidden, device=device, dtype=torch.float32) if weight_hr is not None else None
    output = torch.empty(steps, batch, out_size, device=device, dtype=dtype)
    h_prev = float32_state(h0, batch, out_size, device)
    c_prev = float32_state(c0, batch, hidden, device)
    lengths_or_unused = or_placeholder(lengths, unused)
    mask_or_unused = or_placeholder(recurrent_mask, unused)
    dot_dtype = config.dot_dtype(dtype)
    for n, t in enumerate(processing_order(steps, reverse)):
        slot = t if save else n % 2
        hidden_pre_clip_t = hidden_pre_clip[t] if hidden_pre_clip.numel() else unused
        zoneout_h_t = zoneout_h[t] if zoneout_h is not None else unused
        lstm_forward_step_kernel[_grid(batch, hidden)](
            input_gates[t], h_prev, c_prev, weight_hh, bias_hh, lengths_or_unused, mask_or_unused, zoneout_h_t,
            zoneout_c[t] if zoneout_c is not None else unused,
            gates[t] if save else unused, cells[slot], cell_pre_clip[t] if cell_pre_clip.numel() else unused,
            fresh_cells[t] if fresh_cells.numel() else unused,
            or_placeholder(m, unused), hidden_states[slot], output[t], hidden_pre_clip_t,
            t, batch, hidden, out_size, cell_clip, proj_clip,
            HAS_PROJ=weight_hr is not None, HAS_LENGTHS=lengths is not None,
            HAS_RECURRENT_MASK=recurrent_mask is not None, HAS_ZONEOUT_H=zoneout_h is not None,
            HAS_ZONEOUT_C=zoneout_c is not None, **switches, SAVE=save, DOT_DTYPE=dot_dtype, BLOCK_B=config.BLOCK_B)
        if weight_hr is not None:
            lstm_projection_step_kernel[_grid(batch, out_size)](
                m, weight_hr, h_prev, lengths_or_unused, zoneout_h_t, hidden_states[slot], output[t],
                hidden_pre_clip_t, t, batch, hidden, out_size, proj_clip,
                HAS_LENGTHS=lengths is not None, HAS_ZONEOUT_H=zoneout_h is not None, PROJ_CLIP=switches["PROJ_CLIP"],
                SAVE=save, DOT_DTYPE=dot_dtype, BLOCK_B=config.BLOCK_B)
        h_prev, c_prev = hidden_states[slot], cells[slot]
    h_n = h_prev.to(dtype, copy=True)
    c_n = c_prev.to(dtype, copy=True)
    if not save:
        cells, hidden_states = empty_reserve(device), empty_reserve(device)
    no_norm = [empty_reserve(device) for _ in range(4)]  # separate tensors: op results may not alias
    return output, h_n, c_n, LstmReserve(gates, cells, hidden_states, cell_pre_clip, hidden_pre_clip, fresh_cells,
                                         *no_norm)


def lstm_backward(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, weight_hh: Tensor,
                  weight_hr: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor],
                  recurrent_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor],
                  norm: Optional[LayerNormGains], kept: LstmReserve, reverse: bool, cell_clip: float,
                  proj_clip: float, state_clip: float, gate_clip: float) -> LstmRecurrenceGradients:
    """LSTM backward recurrence, two launches per step; arguments and results as
    sequence.lstm_backward (norm must be None)."""
    _refuse_layer_norm(norm)
    steps, batch, out_size = grad_output.shape
    hidden = kept.cells.shape[2]
    f32 = dict(device=grad_output.device, dtype=torch.float32)
    switches = clip_switches(cell_clip=cell_clip, proj_clip=proj_clip, state_clip=state_clip, gate_clip=gate_clip)
    unused = kept.gates  # fills the pointer slots of absent tensors (never read)
    lengths_or_unused = or_placeholder(lengths, unused)
    dot_dtype = config.dot_dtype(grad_output.dtype)
    grad_gates = torch.empty(steps, batch, 4 * hidden, **f32)
    grad_proj = torch.empty(steps, batch, out_size, **f32) if weight_hr is not None else None
    # Carries ping-pong between two buffers so that every launch reads what the previous
    # one wrote and rewrites nothing it reads (safe to re-run when autotuning).
    grad_keep = torch.empty(2, batch, out_size, **f32)
    grad_keep[0].copy_(grad_h_n)
    grad_c_carry = torch.empty(2, batch, hidden, **f32)
    grad_c_carry[0].copy_(grad_c_n)
    grad_m_buffer = torch.empty(batch, out_size, **f32) if grad_proj is None else None
    c_start = c0.float().contiguous() if c0 is not None else None
    for n, t, later, earlier in _backward_walk(steps, reverse):
        source, target = n % 2, (n + 1) % 2
        grad_proj_t = grad_proj[t] if grad_proj is not None else grad_m_buffer
        lstm_backward_hidden_step_kernel[_grid(batch, out_size)](
            grad_output[t], grad_keep[source], grad_gates[later] if later is not None else unused, weight_hh,
            kept.hidden_pre_clip[t] if switches["PROJ_CLIP"] else unused, lengths_or_unused,
            or_placeholder(recurrent_mask, unused), zoneout_h[t] if zoneout_h is not None else unused,
            grad_proj_t, grad_keep[target], t, batch, hidden, out_size,
            proj_clip, state_clip, FIRST=later is None, HAS_LENGTHS=lengths is not None,
            HAS_RECURRENT_MASK=recurrent_mask is not None, HAS_ZONEOUT_H=zoneout_h is not None,
            PROJ_CLIP=switches["PROJ_CLIP"],
            STATE_CLIP=switches["STATE_CLIP"], DOT_DTYPE=dot_dtype, BLOCK_B=config.BLOCK_B)
        c_prev = kept.cells[earlier] if earlier is not None else c_start
        # h~_t read the fresh cell: under zoneout of c that is not the carried one
        cell_read = kept.fresh_cells[t] if zoneout_c is not None else kept.cells[t]
        lstm_backward_cell_step_kernel[_grid(batch, hidden)](
            grad_proj_t, or_placeholder(weight_hr, unused), grad_c_carry[source], kept.gates[t], cell_read,
            or_placeholder(c_prev, unused), kept.cell_pre_clip[t] if switches["CELL_CLIP"] else unused,
            lengths_or_unused, zoneout_c[t] if zoneout_c is not None else unused, grad_gates[t], grad_c_carry[target],
            t, batch, hidden, out_size, cell_clip, state_clip, gate_clip,
            HAS_PROJ=weight_hr is not None, HAS_C_PREV=c_prev is not None, HAS_LENGTHS=lengths is not None,
            HAS_ZONEOUT_C=zoneout_c is not None,
            CELL_CLIP=switches["CELL_CLIP"], STATE_CLIP=switches["STATE_CLIP"], GATE_CLIP=switches["GATE_CLIP"],
            DOT_DTYPE=dot_dtype, BLOCK_B=config.BLOCK_B)
    last = steps % 2
    first_step = processing_order(steps, reverse)[0]
    # dL/dh0: what the first processed step passes back, as the kernels would for h_{-1}.
    grad_h0 = grad_keep[last] + times_recurrent_mask(grad_gates[first_step] @ weight_hh.float(), recurrent_mask)
    grad_c0 = grad_c_carry[last].clone()  # a fresh tensor, not a view into the carry buffer
    return LstmRecurrenceGradients(grad_gates, grad_proj, grad_h0, grad_c0, None, None)


def gru_forward(input_gates: Tensor, weight_hh: Tensor, bias_hh: Tensor, h0: Optional[Tensor],
                lengths: Optional[Tensor], recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor],
                norm_hh: Optional[Tensor], reverse: bool, save: bool) -> Tuple[Tensor, Tensor, GruReserve]:
    """GRU forward, a launch per step; arguments and results as sequence.gru_forward (norm_hh
    must be None)."""
    _refuse_layer_norm(norm_hh)
    steps, batch, _ = input_gates.shape
    hidden = input_gates.shape[2] // 3
    device, dtype = input_gates.device, input_gates.dtype
    unused = input_gates  # fills the pointer slots of absent tensors (never read)
    output = torch.empty(steps, batch, hidden, device=device, dtype=dtype)
    gates = reserve(save, steps, batch, 4 * hidden, device=device)
    # Step t reads the float32 state step t-1 wrote: one slot per step when training (they
    # are the saved activations), two alternating slots otherwise.
    hidden_states = torch.empty(steps if save else 2, batch, hidden, device=device, dtype=torch.float32)
    h_prev = float32_state(h0, batch, hidden, device)
    for n, t in enumerate(processing_order(steps, reverse)):
        slot = t if save else n % 2
        gru_forward_step_kernel[_grid(batch, hidden)](
            input_gates[t], h_prev, weight_hh, bias_hh, or_placeholder(lengths, unused),
            or_placeholder(recurrent_mask, unused), zoneout[t] if zoneout is not None else unused,
            gates[t] if save else unused, hidden_states[slot], output[t], t, batch, hidden,
            HAS_LENGTHS=lengths is not None, HAS_RECURRENT_MASK=recurrent_mask is not None,
            HAS_ZONEOUT=zoneout is not None, SAVE=save,
            DOT_DTYPE=config.dot_dtype(dtype), BLOCK_B=config.BLOCK_B)
        h_prev = hidden_states[slot]
    h_n = h_prev.to(dtype, copy=True)
    return output, h_n, GruReserve(gates, hidden_states if save else empty_reserve(device), empty_reserve(device),
                                   empty_reserve(device))


def gru_backward(grad_output: Tensor, grad_h_n: Tensor, weight_hh: Tensor, h0: Optional[Tensor],
                 lengths: Optional[Tensor], recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor],
                 norm_hh: Optional[Tensor], kept: GruReserve, reverse: bool, state_clip: float,
                 gate_clip: float) -> GruRecurrenceGradients:
    """GRU backward recurrence, a launch per step; arguments and results as
    sequence.gru_backward (norm_hh must be None)."""
    _refuse_layer_norm(norm_hh)
    steps, batch, hidden = grad_output.shape
    f32 = dict(device=grad_output.device, dtype=torch.float32)
    unused = kept.gates  # fills the pointer slots of absent tensors (never read)
    switches = clip_switches(state_clip=state_clip, gate_clip=gate_clip)
    grad_input_gates = torch.empty(steps, batch, 3 * hidden, **f32)
    grad_hidden_gates = torch.empty(steps, batch, 3 * hidden, **f32)
    # The carry ping-pongs between two buffers: no launch rewrites what it reads.
    grad_keep = torch.empty(2, batch, hidden, **f32)
    grad_keep[0].copy_(grad_h_n)
    h_start = h0.float().contiguous() if h0 is not None else None
    for n, t, later, earlier in _backward_walk(steps, reverse):
        source, target = n % 2, (n + 1) % 2
        h_prev = kept.hidden_states[earlier] if earlier is not None else h_start
        gru_backward_step_kernel[_grid(batch, hidden)](
            grad_output[t], grad_keep[source], grad_hidden_gates[later] if later is not None else unused, weight_hh,
            kept.gates[t], or_placeholder(h_prev, unused), or_placeholder(lengths, unused),
            or_placeholder(recurrent_mask, unused), zoneout[t] if zoneout is not None else unused, grad_input_gates[t],
            grad_hidden_gates[t], grad_keep[target], t, batch, hidden, state_clip, gate_clip,
            FIRST=later is None, HAS_H_PREV=h_prev is not None, HAS_LENGTHS=lengths is not None,
            HAS_RECURRENT_MASK=recurrent_mask is not None, HAS_ZONEOUT=zoneout is not None, **switches,
            DOT_DTYPE=config.dot_dtype(grad_output.dtype), BLOCK_B=config.BLOCK_B)
    # dL/dh0: what the first processed step passes back.
    first_step = processing_order(steps, reverse)[0]
    grad_h0 = grad_keep[steps % 2] + times_recurrent_mask(grad_hidden_gates[first_step] @ weight_hh.float(),
                                                          recurrent_mask)
    return GruRecurrenceGradients(grad_input_gates, grad_hidden_gates, grad_h0, None)


def rnn_forward(input_gates: Tensor, weight_hh: Tensor, bias_hh: Tensor, h0: Optional[Tensor],
                lengths: Optional[Tensor], recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], relu: bool,
                reverse: bool, save: bool) -> Tuple[Tensor, Tensor, RnnReserve]:
    """Elman RNN forward, a launch per step; arguments and results as sequence.rnn_forward."""
    steps, batch, hidden = input_gates.shape
    device, dtype = input_gates.device, input_gates.dtype
    unused = input_gates  # fills the pointer slots of absent tensors (never read)
    output = torch.empty(steps, batch, hidden, device=device, dtype=dtype)
    activations = reserve(save and zoneout is not None, steps, batch, hidden, device=device)
    # Step t reads the float32 state step t-1 wrote: one slot per step when training (they
    # are the saved activations), two alternating slots otherwise.
    hidden_states = torch.empty(steps if save else 2, batch, hidden, device=device, dtype=torch.float32)
    h_prev = float32_state(h0, batch, hidden, device)
    for n, t in enumerate(processing_order(steps, reverse)):
        slot = t if save else n % 2
        rnn_forward_step_kernel[_grid(batch, hidden)](
            input_gates[t], h_prev, weight_hh, bias_hh, or_placeholder(lengths, unused),
            or_placeholder(recurrent_mask, unused), zoneout[t] if zoneout is not None else unused,
            activations[t] if activations.numel() else unused, hidden_states[slot], output[t], t, batch, hidden,
            HAS_LENGTHS=lengths is not None, HAS_RECURRENT_MASK=recurrent_mask is not None,
            HAS_ZONEOUT=zoneout is not None, RELU=bool(relu), SAVE=save, DOT_DTYPE=config.dot_dtype(dtype),
            BLOCK_B=config.BLOCK_B)
        h_prev = hidden_states[slot]
    h_n = h_prev.to(dtype, copy=True)
    return output, h_n, RnnReserve(hidden_states if save else empty_reserve(device), activations)


def rnn_backward(grad_output: Tensor, grad_h_n: Tensor, weight_hh: Tensor, lengths: Optional[Tensor],
                 recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], kept: RnnReserve, relu: bool,
                 reverse: bool, state_clip: float, gate_clip: float) -> Tuple[Tensor, Tensor]:
    """Elman RNN backward recurrence, a launch per step; arguments and results as
    sequence.rnn_backward."""
    steps, batch, hidden = grad_output.shape
    f32 = dict(device=grad_output.device, dtype=torch.float32)
    unused = kept.hidden_states  # fills the pointer slots of absent tensors (never read)
    activations = kept.activations if zoneout is not None else kept.hidden_states
    grad_gates = torch.empty(steps, batch, hidden, **f32)
    # The carry ping-pongs between two buffers: no launch rewrites what it reads.
    grad_keep = torch.empty(2, batch, hidden, **f32)
    grad_keep[0].copy_(grad_h_n)
    for n, t, later, _earlier in _backward_walk(steps, reverse):
        source, target = n % 2, (n + 1) % 2
        rnn_backward_step_kernel[_grid(batch, hidden)](
            grad_output[t], grad_keep[source], grad_gates[later] if later is not None else unused, weight_hh,
            activations[t], or_placeholder(lengths, unused), or_placeholder(recurrent_mask, unused),
            zoneout[t] if zoneout is not None else unused, grad_gates[t], grad_keep[target],
            t, batch, hidden, state_clip, gate_clip,
            FIRST=later is None, HAS_LENGTHS=lengths is not None, HAS_RECURRENT_MASK=recurrent_mask is not None,
            HAS_ZONEOUT=zoneout is not None, RELU=bool(relu), **clip_switches(state_clip=state_clip,
                                                                             gate_clip=gate_clip),
            DOT_DTYPE=config.dot_dtype(grad_output.dtype), BLOCK_B=config.BLOCK_B)
    # dL/dh0: what the first processed step passes back.
    first_step = processing_order(steps, reverse)[0]
    grad_h0 = grad_keep[steps % 2] + times_recurrent_mask(grad_gates[first_step] @ weight_hh.float(), recurrent_mask)
    return grad_gates, grad_h0
