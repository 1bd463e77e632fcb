"""Strategy "sequence": the whole recurrence in one launch (docs/triton.md).

A program owns BLOCK_B batch rows and the full state of those rows, keeps W_hh (and W_hr)
on chip for every step and walks the steps in its own loop; chosen for small hidden sizes
(config.choose_strategy). Shapes: T steps, B batch rows, H cells, P outputs (P = H without
a projection). Kernels take contiguous tensors and compute in float32.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import config
from .cell_math import (dot_float32_operand, gru_cell_backward, gru_cell_forward, layer_norm_backward,
                        layer_norm_backward_means, layer_norm_backward_tile, layer_norm_rows, lstm_cell_backward,
                        lstm_cell_forward, lstm_hidden_backward, lstm_hidden_forward, rnn_cell_backward,
                        rnn_cell_forward, rows_valid, tanh)
from ..reference import LAYER_NORM_EPS
from .launch import (GruRecurrenceGradients, GruReserve, LayerNormGains, LstmRecurrenceGradients, LstmReserve,
                     RnnReserve, clip_switches, or_placeholder, reserve)

# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _row_vector(ptr, cols, count):
    """[1, BLOCK] float32 of a per-unit vector (a layer-norm gain or bias) at `ptr` [count]. The
    LSTM forward loads these at each step rather than hold them for all steps (held, its
    bfloat16 kernel at width 64 spilled 8 bytes on sm_90), and so does the GRU backward (fewer
    registers held across the step loop)."""
    return tl.load(ptr + cols, mask=cols < count, other=0.0).to(tl.float32)[None, :]


@triton.jit
def lstm_forward_sequence_kernel(
        input_gates_ptr,  # [T, B, 4H] W_ih x_t + b_ih, input dtype
        weight_hh_ptr,  # [4H, P]
        bias_hh_ptr,  # [4H] (zeros when the layer has no bias)
        weight_hr_ptr,  # [P, H] (HAS_PROJ)
        h0_ptr,  # [B, P] (HAS_H0)
        c0_ptr,  # [B, H] (HAS_C0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, P] input dtype: multiplier of h_{t-1} in W_hh h_{t-1} (HAS_RECURRENT_MASK)
        zoneout_h_ptr,  # [T, B, P] input dtype: keep weights d_t of h (HAS_ZONEOUT_H)
        zoneout_c_ptr,  # [T, B, H] input dtype: keep weights e_t of c (HAS_ZONEOUT_C)
        norm_hh_ptr,  # [4H] input dtype: gain g_hh of LN(W_hh h_{t-1}) (LAYER_NORM)
        cell_norm_weight_ptr, cell_norm_bias_ptr,  # [H] input dtype: g_c, b_c of LN(c~_t) (LAYER_NORM)
        output_ptr,  # [T, B, P] input dtype
        h_n_ptr,  # [B, P] input dtype
        c_n_ptr,  # [B, H] input dtype
        gates_ptr, cells_ptr, hidden_ptr, cell_pre_clip_ptr, hidden_pre_clip_ptr,  # reserve (SAVE), launch.LstmReserve
        fresh_cells_ptr,  # reserve (SAVE and HAS_ZONEOUT_C)
        normalized_products_ptr, product_rstd_ptr, normalized_cells_ptr, cell_rstd_ptr,  # reserve (SAVE and LAYER_NORM)
        steps, batch, hidden, out_size, cell_clip, proj_clip, norm_eps,
        HAS_PROJ: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr, HAS_ZONEOUT_H: tl.constexpr,
        HAS_ZONEOUT_C: tl.constexpr, LAYER_NORM: tl.constexpr, REVERSE: tl.constexpr,
        CELL_CLIP: tl.constexpr, PROJ_CLIP: tl.constexpr, SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
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
    if HAS_RECURRENT_MASK:  # one draw per sequence: loaded once
        recurrent_mask = tl.load(recurrent_mask_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    if LAYER_NORM:
        cols_valid = (cols_h < hidden)[None, :]
        offs_rows = (rows < batch)[:, None]

    for k in range(steps):
        if REVERSE:
            t = steps - 1 - k
        else:
            t = k
        x_ptrs = input_gates_ptr + t * batch * 4 * hidden + offs_4h
        if HAS_RECURRENT_MASK:  # masks h_{t-1} in the product only; h itself is carried unmasked
            h_operand = h * recurrent_mask
        else:
            h_operand = h
        if LAYER_NORM:
            # LN(W_hh (m * h_{t-1})) over the whole 4H row this program holds, times its gain;
            # the norm's 1/std enlarges the rounding of a half-type h, so h goes in unrounded
            n_i, n_f, n_g, n_o, rstd = layer_norm_rows(
                dot_float32_operand(h_operand, w_i, DOT_DTYPE), dot_float32_operand(h_operand, w_f, DOT_DTYPE),
                dot_float32_operand(h_operand, w_g, DOT_DTYPE), dot_float32_operand(h_operand, w_o, DOT_DTYPE),
                cols_valid, 4 * hidden, norm_eps, 4)
            if SAVE:
                n_ptrs = normalized_products_ptr + t * batch * 4 * hidden + offs_4h
                tl.store(n_ptrs, n_i, mask=mask_h)
                tl.store(n_ptrs + hidden, n_f, mask=mask_h)
                tl.store(n_ptrs + 2 * hidden, n_g, mask=mask_h)
                tl.store(n_ptrs + 3 * hidden, n_o, mask=mask_h)
                tl.store(product_rstd_ptr + t * batch + rows[:, None], rstd, mask=offs_rows)
            a_i = tl.load(x_ptrs, mask=mask_h, other=0.0).to(tl.float32) + n_i * _row_vector(norm_hh_ptr, cols_h,
                                                                                              hidden)
            a_f = tl.load(x_ptrs + hidden, mask=mask_h, other=0.0).to(tl.float32) + n_f * _row_vector(
                norm_hh_ptr + hidden, cols_h, hidden)
            a_g = tl.load(x_ptrs + 2 * hidden, mask=mask_h, other=0.0).to(tl.float32) + n_g * _row_vector(
                norm_hh_ptr + 2 * hidden, cols_h, hidden)
            a_o = tl.load(x_ptrs + 3 * hidden, mask=mask_h, other=0.0).to(tl.float32) + n_o * _row_vector(
                norm_hh_ptr + 3 * hidden, cols_h, hidden)
        else:
            h_dot = h_operand.to(DOT_DTYPE)
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
        if HAS_ZONEOUT_C:
            keep_c = tl.load(zoneout_c_ptr + t * batch * hidden + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        else:
            keep_c = c  # unused
        i, f, g, o, c_raw, c_fresh, c_new, m = lstm_cell_forward(a_i, a_f, a_g, a_o, c, keep_c, valid, cell_clip,
                                                                 CELL_CLIP, HAS_ZONEOUT_C)
        if LAYER_NORM:  # m = o * tanh(LN(c~_t) * g_c + b_c); the carried c_t stays un-normalised
            c_normed, _unused1, _unused2, _unused3, c_rstd = layer_norm_rows(c_fresh, c_fresh, c_fresh, c_fresh,
                                                                            cols_valid, hidden, norm_eps, 1)
            m = o * tanh(c_normed * _row_vector(cell_norm_weight_ptr, cols_h, hidden)
                         + _row_vector(cell_norm_bias_ptr, cols_h, hidden))
            if SAVE:
                tl.store(normalized_cells_ptr + t * batch * hidden + offs_h, c_normed, mask=mask_h)
                tl.store(cell_rstd_ptr + t * batch + rows[:, None], c_rstd, mask=offs_rows)
        if HAS_PROJ:
            h_raw = tl.dot(m.to(DOT_DTYPE), w_hr, input_precision="ieee")
        else:
            h_raw = m
        if HAS_ZONEOUT_H:
            keep_h = tl.load(zoneout_h_ptr + t * batch * out_size + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        else:
            keep_h = h  # unused
        h_new, out = lstm_hidden_forward(h_raw, h, keep_h, valid, proj_clip, PROJ_CLIP, HAS_ZONEOUT_H)
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
            if HAS_ZONEOUT_C:
                tl.store(fresh_cells_ptr + t * batch * hidden + offs_h, c_fresh, mask=mask_h)
        h = h_new
        c = c_new
    tl.store(h_n_ptr + offs_p, h.to(h_n_ptr.dtype.element_ty), mask=mask_p)
    tl.store(c_n_ptr + offs_h, c.to(c_n_ptr.dtype.element_ty), mask=mask_h)


@triton.jit
def lstm_backward_sequence_kernel(
        grad_output_ptr,  # [T, B, P] input dtype
        grad_h_n_ptr,  # [B, P] input dtype
        grad_c_n_ptr,  # [B, H] input dtype
        weight_hh_ptr,  # [4H, P]
        weight_hr_ptr,  # [P, H] (HAS_PROJ)
        c0_ptr,  # [B, H] (HAS_C0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, P] input dtype (HAS_RECURRENT_MASK)
        zoneout_h_ptr,  # [T, B, P] input dtype (HAS_ZONEOUT_H)
        zoneout_c_ptr,  # [T, B, H] input dtype (HAS_ZONEOUT_C)
        norm_hh_ptr, cell_norm_weight_ptr, cell_norm_bias_ptr,  # [4H], [H], [H] input dtype (LAYER_NORM)
        gates_ptr, cells_ptr, cell_pre_clip_ptr, hidden_pre_clip_ptr,  # forward reserve, float32
        fresh_cells_ptr,  # forward reserve, float32 (HAS_ZONEOUT_C)
        normalized_products_ptr, product_rstd_ptr, normalized_cells_ptr, cell_rstd_ptr,  # reserve (LAYER_NORM)
        grad_gates_ptr,  # out [T, B, 4H] float32: dL/da_t
        grad_proj_ptr,  # out [T, B, P] float32: dL/d(W_hr m_t) (HAS_PROJ)
        grad_h0_ptr,  # out [B, P] float32
        grad_c0_ptr,  # out [B, H] float32
        grad_products_ptr,  # out [T, B, 4H] float32: dL/d(W_hh (mask * h_{t-1})) before LN (LAYER_NORM)
        grad_cell_norm_ptr,  # out [T, B, H] float32: dL/d(LN(c~_t) * g_c + b_c) (LAYER_NORM)
        steps, batch, hidden, out_size, cell_clip, proj_clip, state_clip, gate_clip,
        HAS_PROJ: tl.constexpr, HAS_C0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr,
        HAS_ZONEOUT_H: tl.constexpr, HAS_ZONEOUT_C: tl.constexpr, LAYER_NORM: tl.constexpr,
        REVERSE: tl.constexpr, CELL_CLIP: tl.constexpr, PROJ_CLIP: tl.constexpr, STATE_CLIP: tl.constexpr,
        GATE_CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_P: tl.constexpr):
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

    if HAS_RECURRENT_MASK:
        recurrent_mask = tl.load(recurrent_mask_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    if LAYER_NORM:
        b_mask = cols_h < hidden
        cols_valid = b_mask[None, :]
        offs_rows = (rows < batch)[:, None]
        gn_i = tl.load(norm_hh_ptr + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        gn_f = tl.load(norm_hh_ptr + hidden + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        gn_g = tl.load(norm_hh_ptr + 2 * hidden + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        gn_o = tl.load(norm_hh_ptr + 3 * hidden + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        gain_c = tl.load(cell_norm_weight_ptr + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        bias_c = tl.load(cell_norm_bias_ptr + cols_h, mask=b_mask, other=0.0).to(tl.float32)[None, :]
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
        if HAS_ZONEOUT_H:
            keep_h = tl.load(zoneout_h_ptr + t * batch * out_size + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        else:
            keep_h = grad_out  # unused
        grad_proj, grad_h_keep = lstm_hidden_backward(grad_h_carry, grad_out, h_raw, keep_h, valid, proj_clip,
                                                       state_clip, PROJ_CLIP, STATE_CLIP, HAS_ZONEOUT_H)
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
        if HAS_ZONEOUT_C:  # h~_t read the fresh cell; the carried one only enters through c_prev
            c_fresh = tl.load(fresh_cells_ptr + t * batch * hidden + offs_h, mask=mask_h, other=0.0)
            keep_c = tl.load(zoneout_c_ptr + t * batch * hidden + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        else:
            c_fresh = tl.load(cells_ptr + t * batch * hidden + offs_h, mask=mask_h, other=0.0)
            keep_c = c_fresh  # unused
        c_prev = tl.load(cells_ptr + t_prev * batch * hidden + offs_h, mask=mask_h & has_prev, other=0.0)
        if HAS_C0:
            c_prev += tl.load(c0_ptr + offs_h, mask=mask_h & is_first, other=0.0).to(tl.float32)
        if CELL_CLIP:
            c_raw = tl.load(cell_pre_clip_ptr + t * batch * hidden + offs_h, mask=mask_h, other=0.0)
        else:
            c_raw = c_fresh  # unused
        if LAYER_NORM:  # m = o * tanh(y), y = LN(c~_t) * g_c + b_c
            c_normed = tl.load(normalized_cells_ptr + t * batch * hidden + offs_h, mask=mask_h, other=0.0)
            c_rstd = tl.load(cell_rstd_ptr + t * batch + rows[:, None], mask=offs_rows, other=0.0)
            tanh_y = tanh(c_normed * gain_c + bias_c)
            grad_y = tl.where(valid, grad_m * o * (1.0 - tanh_y * tanh_y), 0.0)
            tl.store(grad_cell_norm_ptr + t * batch * hidden + offs_h, grad_y, mask=mask_h)
            grad_c_normed, _unused1, _unused2, _unused3 = layer_norm_backward(
                grad_y * gain_c, grad_y, grad_y, grad_y, c_normed, c_normed, c_normed, c_normed, c_rstd, cols_valid,
                hidden, 1)
        else:
            tanh_y = c_fresh  # unused
            grad_c_normed = c_fresh  # unused
        d_i, d_f, d_g, d_o, grad_c_carry = lstm_cell_backward(
            grad_m, grad_c_carry, i, f, g, o, c_fresh, c_prev, c_raw, keep_c, valid, grad_c_normed, tanh_y, cell_clip,
            state_clip, gate_clip, CELL_CLIP, STATE_CLIP, GATE_CLIP, HAS_ZONEOUT_C, LAYER_NORM)
        d_ptrs = grad_gates_ptr + t * batch * 4 * hidden + offs_4h
        tl.store(d_ptrs, d_i, mask=mask_h)
        tl.store(d_ptrs + hidden, d_f, mask=mask_h)
        tl.store(d_ptrs + 2 * hidden, d_g, mask=mask_h)
        tl.store(d_ptrs + 3 * hidden, d_o, mask=mask_h)
        if LAYER_NORM:
            # through the gain and LN(W_hh (mask * h_{t-1})): the product's own gradient, which
            # both dL/dh_{t-1} below and d W_hh (ops.py) take
            n_ptrs = normalized_products_ptr + t * batch * 4 * hidden + offs_4h
            d_i, d_f, d_g, d_o = layer_norm_backward(
                d_i * gn_i, d_f * gn_f, d_g * gn_g, d_o * gn_o, tl.load(n_ptrs, mask=mask_h, other=0.0),
                tl.load(n_ptrs + hidden, mask=mask_h, other=0.0), tl.load(n_ptrs + 2 * hidden, mask=mask_h, other=0.0),
                tl.load(n_ptrs + 3 * hidden, mask=mask_h, other=0.0),
                tl.load(product_rstd_ptr + t * batch + rows[:, None], mask=offs_rows, other=0.0), cols_valid,
                4 * hidden, 4)
            p_ptrs = grad_products_ptr + t * batch * 4 * hidden + offs_4h
            tl.store(p_ptrs, d_i, mask=mask_h)
            tl.store(p_ptrs + hidden, d_f, mask=mask_h)
            tl.store(p_ptrs + 2 * hidden, d_g, mask=mask_h)
            tl.store(p_ptrs + 3 * hidden, d_o, mask=mask_h)
        # dL/dh_{t-1}: the straight-through part plus da_t @ W_hh, which reaches h_{t-1}
        # times the mask where the product saw mask * h_{t-1}.
        if HAS_RECURRENT_MASK:
            grad_h_carry = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
        else:
            grad_h_carry = grad_h_keep
        if LAYER_NORM:
            grad_h_carry += dot_float32_operand(d_i, w_i, DOT_DTYPE)
            grad_h_carry += dot_float32_operand(d_f, w_f, DOT_DTYPE)
            grad_h_carry += dot_float32_operand(d_g, w_g, DOT_DTYPE)
            grad_h_carry += dot_float32_operand(d_o, w_o, DOT_DTYPE)
        else:
            grad_h_carry += tl.dot(d_i.to(DOT_DTYPE), w_i, input_precision="ieee")
            grad_h_carry += tl.dot(d_f.to(DOT_DTYPE), w_f, input_precision="ieee")
            grad_h_carry += tl.dot(d_g.to(DOT_DTYPE), w_g, input_precision="ieee")
            grad_h_carry += tl.dot(d_o.to(DOT_DTYPE), w_o, input_precision="ieee")
        if HAS_RECURRENT_MASK:
            grad_h_carry = grad_h_keep + recurrent_mask * grad_h_carry
    tl.store(grad_h0_ptr + offs_p, grad_h_carry, mask=mask_p)
    tl.store(grad_c0_ptr + offs_h, grad_c_carry, mask=mask_h)


@triton.jit
def gru_forward_sequence_kernel(
        input_gates_ptr,  # [T, B, 3H] W_ih x_t + b_ih, input dtype
        weight_hh_ptr,  # [3H, H]
        bias_hh_ptr,  # [3H] (zeros when the layer has no bias)
        h0_ptr,  # [B, H] (HAS_H0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, H] input dtype: multiplier of h_{t-1} in W_hh h_{t-1} (HAS_RECURRENT_MASK)
        zoneout_ptr,  # [T, B, H] input dtype: keep weights d_t (HAS_ZONEOUT)
        norm_hh_ptr,  # [3H] input dtype: gain g_hh of LN(W_hh h_{t-1}) (LAYER_NORM)
        output_ptr,  # [T, B, H] input dtype
        h_n_ptr,  # [B, H] input dtype
        gates_ptr, hidden_ptr,  # reserve (SAVE), launch.GruReserve
        normalized_products_ptr, product_rstd_ptr,  # reserve (SAVE and LAYER_NORM)
        steps, batch, hidden, norm_eps,
        HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr, HAS_ZONEOUT: tl.constexpr,
        LAYER_NORM: tl.constexpr, REVERSE: tl.constexpr, SAVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
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
    if HAS_RECURRENT_MASK:  # one draw per sequence: loaded once
        recurrent_mask = tl.load(recurrent_mask_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LAYER_NORM:
        cols_valid = (cols < hidden)[None, :]
        offs_rows = (rows < batch)[:, None]
        gn_r = tl.load(norm_hh_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
        gn_z = tl.load(norm_hh_ptr + hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
        gn_n = tl.load(norm_hh_ptr + 2 * hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]

    for k in range(steps):
        if REVERSE:
            t = steps - 1 - k
        else:
            t = k
        if HAS_RECURRENT_MASK:  # masks h_{t-1} in the product only; z * h_{t-1} takes it unmasked
            h_operand = h * recurrent_mask
        else:
            h_operand = h
        if LAYER_NORM:  # h unrounded, as in the LSTM
            hh_r = dot_float32_operand(h_operand, w_r, DOT_DTYPE)
            hh_z = dot_float32_operand(h_operand, w_z, DOT_DTYPE)
            hh_n = dot_float32_operand(h_operand, w_n, DOT_DTYPE)
        else:
            h_dot = h_operand.to(DOT_DTYPE)
            hh_r = tl.dot(h_dot, w_r, input_precision="ieee")
            hh_z = tl.dot(h_dot, w_z, input_precision="ieee")
            hh_n = tl.dot(h_dot, w_n, input_precision="ieee")
        if LAYER_NORM:  # LN(W_hh (m * h_{t-1})) over the whole 3H row, times its gain
            hh_r, hh_z, hh_n, _unused, rstd = layer_norm_rows(hh_r, hh_z, hh_n, hh_n, cols_valid, 3 * hidden,
                                                              norm_eps, 3)
            if SAVE:
                n_ptrs = normalized_products_ptr + t * batch * 3 * hidden + offs_3h
                tl.store(n_ptrs, hh_r, mask=mask)
                tl.store(n_ptrs + hidden, hh_z, mask=mask)
                tl.store(n_ptrs + 2 * hidden, hh_n, mask=mask)
                tl.store(product_rstd_ptr + t * batch + rows[:, None], rstd, mask=offs_rows)
            hh_r = hh_r * gn_r
            hh_z = hh_z * gn_z
            hh_n = hh_n * gn_n
        hh_r += b_r
        hh_z += b_z
        hh_n += b_n
        x_ptrs = input_gates_ptr + t * batch * 3 * hidden + offs_3h
        x_r = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x_z = tl.load(x_ptrs + hidden, mask=mask, other=0.0).to(tl.float32)
        x_n = tl.load(x_ptrs + 2 * hidden, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZONEOUT:
            keep = tl.load(zoneout_ptr + t * batch * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            keep = h  # unused
        valid = rows_valid(lengths_ptr, rows, batch, t, HAS_LENGTHS)
        r, z, n, h_new, out = gru_cell_forward(x_r, x_z, x_n, hh_r, hh_z, hh_n, h, keep, valid, HAS_ZONEOUT)
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
def gru_backward_sequence_kernel(
        grad_output_ptr,  # [T, B, H] input dtype
        grad_h_n_ptr,  # [B, H] input dtype
        weight_hh_ptr,  # [3H, H]
        h0_ptr,  # [B, H] (HAS_H0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, H] input dtype (HAS_RECURRENT_MASK)
        zoneout_ptr,  # [T, B, H] input dtype (HAS_ZONEOUT)
        norm_hh_ptr,  # [3H] input dtype (LAYER_NORM)
        gates_ptr, hidden_ptr,  # forward reserve, float32
        normalized_products_ptr, product_rstd_ptr,  # forward reserve, float32 (LAYER_NORM)
        grad_input_gates_ptr,  # out [T, B, 3H] float32: dL/da_r, dL/da_z, dL/da_n
        grad_hidden_gates_ptr,  # out [T, B, 3H] float32: dL/da_r, dL/da_z, r * dL/da_n
        grad_h0_ptr,  # out [B, H] float32
        grad_products_ptr,  # out [T, B, 3H] float32: dL/d(W_hh (mask * h_{t-1})) before LN (LAYER_NORM)
        steps, batch, hidden, state_clip, gate_clip,
        HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr, HAS_ZONEOUT: tl.constexpr,
        LAYER_NORM: tl.constexpr, REVERSE: tl.constexpr, STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr,
        DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
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

    if HAS_RECURRENT_MASK:
        recurrent_mask = tl.load(recurrent_mask_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LAYER_NORM:
        cols_valid = (cols < hidden)[None, :]
        offs_rows = (rows < batch)[:, None]
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
        g_ptrs = gates_ptr + t * batch * 4 * hidden + offs_4h
        r = tl.load(g_ptrs, mask=mask, other=0.0)
        z = tl.load(g_ptrs + hidden, mask=mask, other=0.0)
        n = tl.load(g_ptrs + 2 * hidden, mask=mask, other=0.0)
        hh_n = tl.load(g_ptrs + 3 * hidden, mask=mask, other=0.0)
        grad_out = tl.load(grad_output_ptr + t * batch * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZONEOUT:
            keep = tl.load(zoneout_ptr + t * batch * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            keep = grad_out  # unused
        valid = rows_valid(lengths_ptr, rows, batch, t, HAS_LENGTHS)
        # h_{t-1} loaded just before the cell: loaded first in the step, the layer-normalised
        # bfloat16 kernel at width 32 spilled 16 bytes on sm_90
        h_prev = tl.load(hidden_ptr + t_prev * batch * hidden + offs, mask=mask & has_prev, other=0.0)
        if HAS_H0:
            h_prev += tl.load(h0_ptr + offs, mask=mask & is_first, other=0.0).to(tl.float32)
        d_r, d_z, d_n, d_hh_n, grad_keep = gru_cell_backward(grad_carry, grad_out, r, z, n, hh_n, h_prev, keep, valid,
                                                              state_clip, gate_clip, STATE_CLIP, GATE_CLIP,
                                                              HAS_ZONEOUT)
        x_ptrs = grad_input_gates_ptr + t * batch * 3 * hidden + offs_3h
        tl.store(x_ptrs, d_r, mask=mask)
        tl.store(x_ptrs + hidden, d_z, mask=mask)
        tl.store(x_ptrs + 2 * hidden, d_n, mask=mask)
        hg_ptrs = grad_hidden_gates_ptr + t * batch * 3 * hidden + offs_3h
        tl.store(hg_ptrs, d_r, mask=mask)
        tl.store(hg_ptrs + hidden, d_z, mask=mask)
        tl.store(hg_ptrs + 2 * hidden, d_hh_n, mask=mask)
        # as in the LSTM: the product's part reaches h_{t-1} times the mask, grad_keep
        # (z * dL/dh_t, and rows past their length) does not
        if HAS_RECURRENT_MASK:
            grad_carry = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        else:
            grad_carry = grad_keep
        if LAYER_NORM:
            # Through the gain and LN: the product's own gradient (as the LSTM's), one gate at a
            # time after the row statistics, so that one tile of it is live (all three held,
            # the bfloat16 kernel at width 64 spilled on sm_90).
            n_ptrs = normalized_products_ptr + t * batch * 3 * hidden + offs_3h
            p_ptrs = grad_products_ptr + t * batch * 3 * hidden + offs_3h
            y_r = d_r * _row_vector(norm_hh_ptr, cols, hidden)
            y_z = d_z * _row_vector(norm_hh_ptr + hidden, cols, hidden)
            y_n = d_hh_n * _row_vector(norm_hh_ptr + 2 * hidden, cols, hidden)
            mean_dy, mean_dyn = layer_norm_backward_means(y_r, y_z, y_n, n_ptrs, hidden, mask, 3 * hidden)
            rstd = tl.load(product_rstd_ptr + t * batch + rows[:, None], mask=offs_rows, other=0.0)
            d_p = layer_norm_backward_tile(y_r, n_ptrs, mask, rstd, mean_dy, mean_dyn, cols_valid)
            tl.store(p_ptrs, d_p, mask=mask)
            grad_carry += dot_float32_operand(d_p, w_r, DOT_DTYPE)
            d_p = layer_norm_backward_tile(y_z, n_ptrs + hidden, mask, rstd, mean_dy, mean_dyn, cols_valid)
            tl.store(p_ptrs + hidden, d_p, mask=mask)
            grad_carry += dot_float32_operand(d_p, w_z, DOT_DTYPE)
            d_p = layer_norm_backward_tile(y_n, n_ptrs + 2 * hidden, mask, rstd, mean_dy, mean_dyn, cols_valid)
            tl.store(p_ptrs + 2 * hidden, d_p, mask=mask)
            grad_carry += dot_float32_operand(d_p, w_n, DOT_DTYPE)
        else:
            grad_carry += tl.dot(d_r.to(DOT_DTYPE), w_r, input_precision="ieee")
            grad_carry += tl.dot(d_z.to(DOT_DTYPE), w_z, input_precision="ieee")
            grad_carry += tl.dot(d_hh_n.to(DOT_DTYPE), w_n, input_precision="ieee")
        if HAS_RECURRENT_MASK:
            grad_carry = grad_keep + recurrent_mask * grad_carry
    tl.store(grad_h0_ptr + offs, grad_carry, mask=mask)


@triton.jit
def rnn_forward_sequence_kernel(
        input_gates_ptr,  # [T, B, H] W_ih x_t + b_ih, input dtype
        weight_hh_ptr,  # [H, H]
        bias_hh_ptr,  # [H] (zeros when the layer has no bias)
        h0_ptr,  # [B, H] (HAS_H0)
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, H] input dtype: multiplier of h_{t-1} in W_hh h_{t-1} (HAS_RECURRENT_MASK)
        zoneout_ptr,  # [T, B, H] input dtype: keep weights d_t (HAS_ZONEOUT)
        output_ptr,  # [T, B, H] input dtype
        h_n_ptr,  # [B, H] input dtype
        hidden_ptr, activations_ptr,  # reserve (SAVE; activations also HAS_ZONEOUT), launch.RnnReserve
        steps, batch, hidden,
        HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr,
        HAS_ZONEOUT: tl.constexpr, RELU: tl.constexpr, REVERSE: tl.constexpr, SAVE: tl.constexpr,
        DOT_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    offs = rows[:, None] * hidden + cols[None, :]

    # W_hh^T, [BLOCK_H (k), BLOCK_H (j)], loaded once for all steps.
    w_hh = tl.load(weight_hh_ptr + cols[None, :] * hidden + cols[:, None],
                   mask=(cols < hidden)[:, None] & (cols < hidden)[None, :], other=0.0).to(DOT_DTYPE)
    b_hh = tl.load(bias_hh_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_RECURRENT_MASK:  # one draw per sequence: loaded once
        recurrent_mask = tl.load(recurrent_mask_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    for k in range(steps):
        if REVERSE:
            t = steps - 1 - k
        else:
            t = k
        if HAS_RECURRENT_MASK:  # masks h_{t-1} in the product only; zoneout keeps the unmasked state
            h_dot = (h * recurrent_mask).to(DOT_DTYPE)
        else:
            h_dot = h.to(DOT_DTYPE)
        a = tl.dot(h_dot, w_hh, input_precision="ieee") + b_hh
        a += tl.load(input_gates_ptr + t * batch * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZONEOUT:
            keep = tl.load(zoneout_ptr + t * batch * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            keep = a  # unused
        valid = rows_valid(lengths_ptr, rows, batch, t, HAS_LENGTHS)
        activation, h_new, out = rnn_cell_forward(a, h, keep, valid, RELU, HAS_ZONEOUT)
        tl.store(output_ptr + t * batch * hidden + offs, out.to(output_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(hidden_ptr + t * batch * hidden + offs, h_new, mask=mask)
            if HAS_ZONEOUT:
                tl.store(activations_ptr + t * batch * hidden + offs, activation, mask=mask)
        h = h_new
    tl.store(h_n_ptr + offs, h.to(h_n_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rnn_backward_sequence_kernel(
        grad_output_ptr,  # [T, B, H] input dtype
        grad_h_n_ptr,  # [B, H] input dtype
        weight_hh_ptr,  # [H, H]
        lengths_ptr,  # [B] int64 (HAS_LENGTHS)
        recurrent_mask_ptr,  # [B, H] input dtype (HAS_RECURRENT_MASK)
        zoneout_ptr,  # [T, B, H] input dtype (HAS_ZONEOUT)
        activations_ptr,  # [T, B, H] float32 f(a_t): the activations reserve with zoneout, else the hidden states
        grad_gates_ptr,  # out [T, B, H] float32: dL/da_t
        grad_h0_ptr,  # out [B, H] float32
        steps, batch, hidden, state_clip, gate_clip,
        HAS_LENGTHS: tl.constexpr, HAS_RECURRENT_MASK: tl.constexpr, HAS_ZONEOUT: tl.constexpr, RELU: tl.constexpr,
        REVERSE: tl.constexpr, STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < batch)[:, None] & (cols < hidden)[None, :]
    offs = rows[:, None] * hidden + cols[None, :]

    # W_hh as stored, [BLOCK_H (j), BLOCK_H (k)]: dL/da_t @ W_hh is dL/d(mask * h_{t-1}).
    w_hh = tl.load(weight_hh_ptr + cols[:, None] * hidden + cols[None, :],
                   mask=(cols < hidden)[:, None] & (cols < hidden)[None, :], other=0.0).to(DOT_DTYPE)
    if HAS_RECURRENT_MASK:
        recurrent_mask = tl.load(recurrent_mask_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad_carry = tl.load(grad_h_n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in range(steps):
        if REVERSE:
            t = k
        else:
            t = steps - 1 - k
        activation = tl.load(activations_ptr + t * batch * hidden + offs, mask=mask, other=0.0)
        if HAS_ZONEOUT:
            keep = tl.load(zoneout_ptr + t * batch * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            keep = activation  # unused
        grad_out = tl.load(grad_output_ptr + t * batch * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        valid = rows_valid(lengths_ptr, rows, batch, t, HAS_LENGTHS)
        d_a, grad_keep = rnn_cell_backward(grad_carry, grad_out, activation, keep, valid, state_clip, gate_clip,
                                           RELU, HAS_ZONEOUT, STATE_CLIP, GATE_CLIP)
        tl.store(grad_gates_ptr + t * batch * hidden + offs, d_a, mask=mask)
        product = tl.dot(d_a.to(DOT_DTYPE), w_hh, input_precision="ieee")
        if HAS_RECURRENT_MASK:  # the product saw mask * h_{t-1}; grad_keep reaches h_{t-1} directly
            product = recurrent_mask * product
        grad_carry = grad_keep + product
    tl.store(grad_h0_ptr + offs, grad_carry, mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _grid(batch: int) -> Tuple[int]:
    return (triton.cdiv(batch, config.BLOCK_B),)


def lstm_forward(input_gates: Tensor, weight_hh: Tensor, bias_hh: Tensor, weight_hr: Optional[Tensor],
                 h0: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor],
                 recurrent_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor],
                 norm: Optional[LayerNormGains], reverse: bool, cell_clip: float, proj_clip: float,
                 save: bool) -> Tuple[Tensor, Tensor, Tensor, LstmReserve]:
    """LSTM forward in one launch.

    Args:
        input_gates: [T, B, 4H] W_ih x_t + b_ih, contiguous, in the input dtype (float32 with norm)
        weight_hh: [4H, P] contiguous; bias_hh: [4H] (zeros for a layer without bias)
        weight_hr: [P, H] contiguous, or None (then P = H)
        h0: [B, P] or None; c0: [B, H] or None; lengths: [B] int64 on the device, or None
        recurrent_mask: [B, P] contiguous, in the input dtype, or None
        zoneout_h: [T, B, P], zoneout_c: [T, B, H] keep weights, contiguous, in the input dtype, or None
        norm: the gains of layer normalisation (launch.LayerNormGains), or None; input_gates
            then hold LN(W_ih x_t) * g_ih + b_ih
        cell_clip, proj_clip: limits, 0 = off; save: keep the reserve for the backward
    Returns:
        output [T, B, P], h_n [B, P], c_n [B, H] in the input dtype, and the reserve.
    """
    steps, batch, _ = input_gates.shape
    hidden = input_gates.shape[2] // 4
    out_size = weight_hh.shape[1]
    device, dtype = input_gates.device, weight_hh.dtype  # the input dtype (input_gates are float32 with LN)
    switches = clip_switches(cell_clip=cell_clip, proj_clip=proj_clip)
    kept = LstmReserve(gates=reserve(save, steps, batch, 4 * hidden, device=device),
                       cells=reserve(save, steps, batch, hidden, device=device),
                       hidden_states=reserve(save, steps, batch, out_size, device=device),
                       cell_pre_clip=reserve(save and switches["CELL_CLIP"], steps, batch, hidden, device=device),
                       hidden_pre_clip=reserve(save and switches["PROJ_CLIP"], steps, batch, out_size, device=device),
                       fresh_cells=reserve(save and zoneout_c is not None, steps, batch, hidden, device=device),
                       normalized_products=reserve(save and norm is not None, steps, batch, 4 * hidden, device=device),
                       product_rstd=reserve(save and norm is not None, steps, batch, device=device),
                       normalized_cells=reserve(save and norm is not None, steps, batch, hidden, device=device),
                       cell_rstd=reserve(save and norm is not None, steps, batch, device=device))
    output = torch.empty(steps, batch, out_size, device=device, dtype=dtype)
    h_n = torch.empty(batch, out_size, device=device, dtype=dtype)
    c_n = torch.empty(batch, hidden, device=device, dtype=dtype)
    unused = input_gates  # fills the pointer slots of absent tensors (never read)
    lstm_forward_sequence_kernel[_grid(batch)](
        input_gates, weight_hh, bias_hh, or_placeholder(weight_hr, unused),
        or_placeholder(h0, unused).contiguous(), or_placeholder(c0, unused).contiguous(),
        or_placeholder(lengths, unused), or_placeholder(recurrent_mask, unused), or_placeholder(zoneout_h, unused),
        or_placeholder(zoneout_c, unused), *(norm if norm is not None else (unused,) * 3), output, h_n, c_n,
        *(tensor if tensor.numel() else unused for tensor in kept),
        steps, batch, hidden, out_size, cell_clip, proj_clip, LAYER_NORM_EPS,
        HAS_PROJ=weight_hr is not None, HAS_H0=h0 is not None, HAS_C0=c0 is not None,
        HAS_LENGTHS=lengths is not None, HAS_RECURRENT_MASK=recurrent_mask is not None,
        HAS_ZONEOUT_H=zoneout_h is not None, HAS_ZONEOUT_C=zoneout_c is not None, LAYER_NORM=norm is not None,
        REVERSE=bool(reverse),
        **switches, SAVE=save,
        DOT_DTYPE=config.dot_dtype(dtype), BLOCK_B=config.BLOCK_B, BLOCK_H=config.padded(hidden),
        BLOCK_P=config.padded(out_size), num_warps=config.sequence_num_warps())
    return output, h_n, c_n, kept


def lstm_backward(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, weight_hh: Tensor,
                  weight_hr: Optional[Tensor], c0: Optional[Tensor], lengths: Optional[Tensor],
                  recurrent_mask: Optional[Tensor], zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor],
                  norm: Optional[LayerNormGains], kept: LstmReserve, reverse: bool, cell_clip: float,
                  proj_clip: float, state_clip: float, gate_clip: float) -> LstmRecurrenceGradients:
    """LSTM backward recurrence in one launch, from the forward's reserve.

    Args:
        grad_output: [T, B, P], grad_h_n: [B, P], grad_c_n: [B, H], contiguous, in the input dtype
        weight_hh: [4H, P] contiguous; weight_hr: [P, H] contiguous or None
        c0: [B, H] or None; lengths: [B] int64 on the device, or None
        recurrent_mask: [B, P], zoneout_h: [T, B, P], zoneout_c: [T, B, H], contiguous, in the input
            dtype, or None (as the forward's); norm: as the forward's
        kept: the forward's reserve; limits: as the forward, state_clip and gate_clip 0 = off
    Returns:
        launch.LstmRecurrenceGradients, all float32.
    """
    steps, batch, out_size = grad_output.shape
    hidden = kept.cells.shape[2]
    device = grad_output.device
    f32 = dict(device=device, dtype=torch.float32)
    grad_gates = torch.empty(steps, batch, 4 * hidden, **f32)
    grad_proj = torch.empty(steps, batch, out_size, **f32) if weight_hr is not None else None
    grad_h0 = torch.empty(batch, out_size, **f32)
    grad_c0 = torch.empty(batch, hidden, **f32)
    grad_products = torch.empty(steps, batch, 4 * hidden, **f32) if norm is not None else None
    grad_cell_norm = torch.empty(steps, batch, hidden, **f32) if norm is not None else None
    switches = clip_switches(cell_clip=cell_clip, proj_clip=proj_clip, state_clip=state_clip, gate_clip=gate_clip)
    unused = kept.gates  # fills the pointer slots of absent tensors (never read)
    norm_reserve = (kept.normalized_products, kept.product_rstd, kept.normalized_cells, kept.cell_rstd)
    lstm_backward_sequence_kernel[_grid(batch)](
        grad_output, grad_h_n, grad_c_n, weight_hh, or_placeholder(weight_hr, unused),
        or_placeholder(c0, unused).contiguous(), or_placeholder(lengths, unused),
        or_placeholder(recurrent_mask, unused), or_placeholder(zoneout_h, unused), or_placeholder(zoneout_c, unused),
        *(norm if norm is not None else (unused,) * 3), kept.gates, kept.cells,
        or_placeholder(kept.cell_pre_clip if switches["CELL_CLIP"] else None, unused),
        or_placeholder(kept.hidden_pre_clip if switches["PROJ_CLIP"] else None, unused),
        or_placeholder(kept.fresh_cells if zoneout_c is not None else None, unused),
        *(norm_reserve if norm is not None else (unused,) * 4),
        grad_gates, or_placeholder(grad_proj, unused), grad_h0, grad_c0, or_placeholder(grad_products, unused),
        or_placeholder(grad_cell_norm, unused), steps, batch, hidden, out_size, cell_clip, proj_clip, state_clip,
        gate_clip, HAS_PROJ=weight_hr is not None, HAS_C0=c0 is not None, HAS_LENGTHS=lengths is not None,
        HAS_RECURRENT_MASK=recurrent_mask is not None, HAS_ZONEOUT_H=zoneout_h is not None,
        HAS_ZONEOUT_C=zoneout_c is not None, LAYER_NORM=norm is not None, REVERSE=bool(reverse), **switches,
        DOT_DTYPE=config.dot_dtype(grad_output.dtype), BLOCK_B=config.BLOCK_B,
        BLOCK_H=config.padded(hidden), BLOCK_P=config.padded(out_size), num_warps=config.sequence_num_warps())
    return LstmRecurrenceGradients(grad_gates, grad_proj, grad_h0, grad_c0, grad_products, grad_cell_norm)


def gru_forward(input_gates: Tensor, weight_hh: Tensor, bias_hh: Tensor, h0: Optional[Tensor],
                lengths: Optional[Tensor], recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor],
                norm_hh: Optional[Tensor], reverse: bool, save: bool) -> Tuple[Tensor, Tensor, GruReserve]:
    """GRU forward in one launch.

    Args:
        input_gates: [T, B, 3H] W_ih x_t + b_ih, contiguous, in the input dtype (float32 with norm_hh)
        weight_hh: [3H, H] contiguous; bias_hh: [3H] (zeros for a layer without bias)
        h0: [B, H] or None; lengths: [B] int64 on the device, or None
        recurrent_mask: [B, H] contiguous, in the input dtype, or None
        zoneout: [T, B, H] keep weights, contiguous, in the input dtype, or None
        norm_hh: [3H] gain of LN(W_hh h_{t-1}), contiguous, or None (no layer normalisation;
            with it input_gates hold LN(W_ih x_t) * g_ih + b_ih); save: keep the reserve
    Returns:
        output [T, B, H], h_n [B, H] in the input dtype, and the reserve.
    """
    steps, batch, _ = input_gates.shape
    hidden = input_gates.shape[2] // 3
    device, dtype = input_gates.device, weight_hh.dtype  # the input dtype (input_gates are float32 with LN)
    normed = norm_hh is not None
    kept = GruReserve(gates=reserve(save, steps, batch, 4 * hidden, device=device),
                      hidden_states=reserve(save, steps, batch, hidden, device=device),
                      normalized_products=reserve(save and normed, steps, batch, 3 * hidden, device=device),
                      product_rstd=reserve(save and normed, steps, batch, device=device))
    output = torch.empty(steps, batch, hidden, device=device, dtype=dtype)
    h_n = torch.empty(batch, hidden, device=device, dtype=dtype)
    unused = input_gates  # fills the pointer slots of absent tensors (never read)
    gru_forward_sequence_kernel[_grid(batch)](
        input_gates, weight_hh, bias_hh, or_placeholder(h0, unused).contiguous(), or_placeholder(lengths, unused),
        or_placeholder(recurrent_mask, unused), or_placeholder(zoneout, unused), or_placeholder(norm_hh, unused),
        output, h_n, *(tensor if tensor.numel() else unused for tensor in kept), steps, batch, hidden, LAYER_NORM_EPS,
        HAS_H0=h0 is not None, HAS_LENGTHS=lengths is not None, HAS_RECURRENT_MASK=recurrent_mask is not None,
        HAS_ZONEOUT=zoneout is not None, LAYER_NORM=normed, REVERSE=bool(reverse), SAVE=save,
        DOT_DTYPE=config.dot_dtype(dtype), BLOCK_B=config.BLOCK_B, BLOCK_H=config.padded(hidden),
        num_warps=config.sequence_num_warps())
    return output, h_n, kept


def gru_backward(grad_output: Tensor, grad_h_n: Tensor, weight_hh: Tensor, h0: Optional[Tensor],
                 lengths: Optional[Tensor], recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor],
                 norm_hh: Optional[Tensor], kept: GruReserve, reverse: bool, state_clip: float,
                 gate_clip: float) -> GruRecurrenceGradients:
    """GRU backward recurrence in one launch, from the forward's reserve.

    Args:
        grad_output: [T, B, H], grad_h_n: [B, H], contiguous, in the input dtype
        weight_hh: [3H, H] contiguous; h0: [B, H] or None; lengths: [B] int64 on the device, or None
        recurrent_mask: [B, H], zoneout: [T, B, H], contiguous, in the input dtype, or None (as the forward's)
        norm_hh: as the forward's; kept: the forward's reserve; state_clip, gate_clip: limits, 0 = off
    Returns:
        launch.GruRecurrenceGradients, all float32.
    """
    steps, batch, hidden = grad_output.shape
    f32 = dict(device=grad_output.device, dtype=torch.float32)
    grad_input_gates = torch.empty(steps, batch, 3 * hidden, **f32)
    grad_hidden_gates = torch.empty(steps, batch, 3 * hidden, **f32)
    grad_h0 = torch.empty(batch, hidden, **f32)
    normed = norm_hh is not None
    grad_products = torch.empty(steps, batch, 3 * hidden, **f32) if normed else None
    unused = kept.gates  # fills the pointer slots of absent tensors (never read)
    gru_backward_sequence_kernel[_grid(batch)](
        grad_output, grad_h_n, weight_hh, or_placeholder(h0, unused).contiguous(), or_placeholder(lengths, unused),
        or_placeholder(recurrent_mask, unused), or_placeholder(zoneout, unused), or_placeholder(norm_hh, unused),
        kept.gates, kept.hidden_states, *((kept.normalized_products, kept.product_rstd) if normed else (unused,) * 2),
        grad_input_gates, grad_hidden_gates, grad_h0, or_placeholder(grad_products, unused), steps, batch, hidden,
        state_clip, gate_clip,
        HAS_H0=h0 is not None, HAS_LENGTHS=lengths is not None, HAS_RECURRENT_MASK=recurrent_mask is not None,
        HAS_ZONEOUT=zoneout is not None, LAYER_NORM=normed, REVERSE=bool(reverse),
        **clip_switches(state_clip=state_clip, gate_clip=gate_clip), DOT_DTYPE=config.dot_dtype(grad_output.dtype),
        BLOCK_B=config.BLOCK_B, BLOCK_H=config.padded(hidden), num_warps=config.sequence_num_warps())
    return GruRecurrenceGradients(grad_input_gates, grad_hidden_gates, grad_h0, grad_products)


def rnn_forward(input_gates: Tensor, weight_hh: Tensor, bias_hh: Tensor, h0: Optional[Tensor],
                lengths: Optional[Tensor], recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], relu: bool,
                reverse: bool, save: bool) -> Tuple[Tensor, Tensor, RnnReserve]:
    """Elman RNN forward in one launch.

    Args:
        input_gates: [T, B, H] W_ih x_t + b_ih, contiguous, in the input dtype
        weight_hh: [H, H] contiguous; bias_hh: [H] (zeros for a layer without bias)
        h0: [B, H] or None; lengths: [B] int64 on the device, or None
        recurrent_mask: [B, H] contiguous, in the input dtype, or None
        zoneout: [T, B, H] keep weights, contiguous, in the input dtype, or None
        relu: f = relu, else tanh; save: keep the reserve for the backward
    Returns:
        output [T, B, H], h_n [B, H] in the input dtype, and the reserve.
    """
    steps, batch, hidden = input_gates.shape
    device, dtype = input_gates.device, input_gates.dtype
    kept = RnnReserve(hidden_states=reserve(save, steps, batch, hidden, device=device),
                      activations=reserve(save and zoneout is not None, steps, batch, hidden, device=device))
    output = torch.empty(steps, batch, hidden, device=device, dtype=dtype)
    h_n = torch.empty(batch, hidden, device=device, dtype=dtype)
    unused = input_gates  # fills the pointer slots of absent tensors (never read)
    rnn_forward_sequence_kernel[_grid(batch)](
        input_gates, weight_hh, bias_hh, or_placeholder(h0, unused).contiguous(), or_placeholder(lengths, unused),
        or_placeholder(recurrent_mask, unused), or_placeholder(zoneout, unused), output, h_n,
        *(tensor if tensor.numel() else unused for tensor in kept), steps, batch, hidden,
        HAS_H0=h0 is not None, HAS_LENGTHS=lengths is not None, HAS_RECURRENT_MASK=recurrent_mask is not None,
        HAS_ZONEOUT=zoneout is not None, RELU=bool(relu), REVERSE=bool(reverse), SAVE=save,
        DOT_DTYPE=config.dot_dtype(dtype), BLOCK_B=config.BLOCK_B, BLOCK_H=config.padded(hidden),
        num_warps=config.sequence_num_warps())
    return output, h_n, kept


def rnn_backward(grad_output: Tensor, grad_h_n: Tensor, weight_hh: Tensor, lengths: Optional[Tensor],
                 recurrent_mask: Optional[Tensor], zoneout: Optional[Tensor], kept: RnnReserve, relu: bool,
                 reverse: bool, state_clip: float, gate_clip: float) -> Tuple[Tensor, Tensor]:
    """Elman RNN backward recurrence in one launch, from the forward's reserve.

    Args:
        grad_output: [T, B, H], grad_h_n: [B, H], contiguous, in the input dtype
        weight_hh: [H, H] contiguous; lengths: [B] int64 on the device, or None
        recurrent_mask: [B, H], zoneout: [T, B, H], contiguous, in the input dtype, or None (as the forward's)
        kept: the forward's reserve; relu, reverse: as the forward; state_clip, gate_clip: limits, 0 = off
    Returns:
        dL/da [T, B, H] (the pre-activations) and dL/dh0 [B, H], float32.
    """
    steps, batch, hidden = grad_output.shape
    f32 = dict(device=grad_output.device, dtype=torch.float32)
    grad_gates = torch.empty(steps, batch, hidden, **f32)
    grad_h0 = torch.empty(batch, hidden, **f32)
    unused = kept.hidden_states  # fills the pointer slots of absent tensors (never read)
    rnn_backward_sequence_kernel[_grid(batch)](
        grad_output, grad_h_n, weight_hh, or_placeholder(lengths, unused), or_placeholder(recurrent_mask, unused),
        or_placeholder(zoneout, unused), kept.activations if zoneout is not None else kept.hidden_states,
        grad_gates, grad_h0, steps, batch, hidden, state_clip, gate_clip,
        HAS_LENGTHS=lengths is not None, HAS_RECURRENT_MASK=recurrent_mask is not None,
        HAS_ZONEOUT=zoneout is not None, RELU=bool(relu), REVERSE=bool(reverse),
        **clip_switches(state_clip=state_clip, gate_clip=gate_clip), DOT_DTYPE=config.dot_dtype(grad_output.dtype),
        BLOCK_B=config.BLOCK_B, BLOCK_H=config.padded(hidden), num_warps=config.sequence_num_warps())
    return grad_gates, grad_h0
