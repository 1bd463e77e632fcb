"""Cell math of the Triton kernels, shared by both strategies: element-wise helpers and the
LSTM / GRU / Elman RNN cell forward and backward on [BLOCK_B, N] tiles (float32 in, float32 out).

The formulas are those of rnntl_fast.ops.reference (docs/semantics.md); each strategy
(sequence.py, step.py) only loads the operands and stores the results.

Non-finite values propagate as in torch: sigmoid(-inf) is exactly 0 and tanh(+-inf) exactly
+-1 (so their derivatives are exactly 0 there), a clamp keeps NaN, and a clamp's backward
selects (never multiplies) the gradient, so an inf gradient outside the bounds becomes 0,
not NaN.
"""
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------
# sigmoid and tanh in float32, within 1 ulp of the exact value over a dense grid of x from
# tiny to saturated (tests/test_triton_cell_math.py; figures in docs/triton.md "Precision").
# Both rest on exp(-a) = 2^k (1 + p), a >= 0, p = expm1(r) from a polynomial (not tl.exp,
# which lowers to ex2.approx.f32 of x * log2(e), whose error grows with |x|), and on
# w = e / (1 + e) <= 1/2 with the roundings of e and 1 + e compensated:
# sigmoid(-a) = w(exp(-a)), sigmoid(a) = 1 - w(exp(-a)), tanh(a) = 1 - 2 w(exp(-2a)) for
# tanh(a) >= 1/2, and an odd polynomial below. No form subtracts two nearly equal numbers.
# ---------------------------------------------------------------------------------------


@triton.jit
def _exp_reduced(y):
    """y: float32, -160 < y <= 0 -> (k, p) with exp(y) = 2^k * (1 + p): k integer-valued, p = expm1(r),
    r = y - k ln2 in about [-ln2/2, ln2/2] (ln2 split in two: k times the high part is exact for |k| < 512)."""
    k = tl.floor(y * 1.4426950408889634 + 0.5)
    r = tl.fma(k, -0.693145751953125, y)
    r = tl.fma(k, -1.4286067653301870e-06, r)
    # Taylor series of expm1 to r^8: the next term is below 6e-10 of r for |r| <= ln2/2
    q = tl.fma(r, 2.4801587301587302e-05, 1.9841269841269841e-04)
    q = tl.fma(r, q, 1.3888888888888889e-03)
    q = tl.fma(r, q, 8.3333333333333333e-03)
    q = tl.fma(r, q, 4.1666666666666667e-02)
    q = tl.fma(r, q, 1.6666666666666667e-01)
    q = tl.fma(r, q, 0.5)
    return k, tl.fma(r * r, q, r)


@triton.jit
def _pow2(k):
    """2^k as float32 for integer-valued k in [-126, 127], built from its exponent bits."""
    return ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _ratio_to_one_plus(scale, p):
    """w = e / (1 + e) for e = scale * (1 + p) <= 1 (scale a power of two): a quotient of the
    rounded e and 1 + e, corrected by its residual, which also holds the roundings of e and of
    1 + e (each exact by an fma or Fast2Sum). The correction makes the quotient's own error
    (the plain division, div.full.f32 compiled: 2 ulp) count only to second order."""
    e = tl.fma(scale, p, scale)
    e_low = tl.fma(scale, p, scale - e)  # scale - e is exact: e lies within [scale / 2, 2 scale]
    d = 1.0 + e
    d_low = (1.0 - d) + e + e_low  # 1 + e - d exactly (1 >= e), plus e_low
    w = e / d
    residual = tl.fma(-w, d, e) + e_low - w * d_low  # e + e_low - w (d + d_low)
    return tl.fma(residual, 1.0 - w, w)  # 1 - w ~ 1 / (1 + e)


@triton.jit
def sigmoid(x):
    # Past |x| = 110 exp(-|x|) is below the smallest subnormal: e is 0 there, so sigmoid(-inf)
    # is exactly 0 and sigmoid(inf) exactly 1. tl.minimum drops NaN (a = 110), hence the last select.
    a = tl.minimum(tl.abs(x), 110.0)
    k, p = _exp_reduced(-a)
    k_half = tl.floor(k * 0.5)  # 2^k in two normal factors: k reaches -159, below the normal range
    w = _ratio_to_one_plus(_pow2(k_half) * _pow2(k - k_half), p)
    value = tl.where(x >= 0.0, 1.0 - w, w)
    return tl.where(x == x, value, x)


@triton.jit
def tanh(x):
    # tanh(10) rounds to 1 in float32 (so does anything past 9.02): a is clamped there, which
    # keeps 2^k normal and gives tanh(+-inf) = +-1 exactly. NaN: as in sigmoid.
    a = tl.minimum(tl.abs(x), 10.0)
    k, p = _exp_reduced(-2.0 * a)
    far = 1.0 - 2.0 * _ratio_to_one_plus(_pow2(k), p)
    # below tanh = 1/2 (a < ln(3)/2): a + a^3 P(a^2), P fitted to (tanh(a) - a) / a^3 (relative
    # error of the sum 2.5e-9 with these float32 coefficients)
    s = a * a
    poly = tl.fma(s, -0.006258251611143351, 0.021058546379208565)
    poly = tl.fma(s, poly, -0.053848542273044586)
    poly = tl.fma(s, poly, 0.13332542777061462)
    poly = tl.fma(s, poly, -0.33333316445350647)
    near = tl.fma(a * s, poly, a)
    magnitude = tl.where(a < 0.5493061443340549, near, far)
    value = tl.where(x < 0.0, -magnitude, magnitude)
    return tl.where(x == x, value, x)


@triton.jit
def clamp(x, limit):
    """torch.clamp(x, -limit, limit): NaN stays NaN (tl.minimum/maximum drop it by default)."""
    return tl.minimum(tl.maximum(x, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def clamp_backward(grad, x, limit):
    """The gradient through torch.clamp(x, -limit, limit): `grad` where -limit <= x <= limit
    (bounds included), else 0, also where `grad` is inf or NaN."""
    return tl.where((x >= -limit) & (x <= limit), grad, 0.0)


@triton.jit
def rows_valid(lengths_ptr, rows, batch, step, HAS_LENGTHS: tl.constexpr):
    """[BLOCK_B, 1] mask: row exists and step < lengths[row] (every step without lengths).

    lengths_ptr: [B] int64."""
    if HAS_LENGTHS:
        row_lengths = tl.load(lengths_ptr + rows, mask=rows < batch, other=0)
        valid = (rows < batch) & (row_lengths > step)
    else:
        valid = rows < batch
    return valid[:, None]


# ---------------------------------------------------------------------------------------
# Layer normalisation over a row held as one, three or four [BLOCK_B, BLOCK_N] tiles (the
# gates of the sequence kernels): LN(x) = (x - mean) / sqrt(var + eps), biased variance,
# over the `count` valid columns (cols_valid [1, BLOCK_N]; padded columns hold 0 and give 0).
# ---------------------------------------------------------------------------------------


@triton.jit
def _row_sum(x):
    return tl.sum(x, axis=1)[:, None]


@triton.jit
def layer_norm_rows(x0, x1, x2, x3, cols_valid, count, eps, TILES: tl.constexpr):
    """LN over the row formed by the first TILES of x0..x3 -> (normalized tiles, rstd [BB, 1])."""
    total = _row_sum(tl.where(cols_valid, x0, 0.0))
    if TILES >= 3:
        total += _row_sum(tl.where(cols_valid, x1, 0.0)) + _row_sum(tl.where(cols_valid, x2, 0.0))
    if TILES == 4:
        total += _row_sum(tl.where(cols_valid, x3, 0.0))
    mean = total / count
    d0 = tl.where(cols_valid, x0 - mean, 0.0)
    d1 = tl.where(cols_valid, x1 - mean, 0.0)
    d2 = tl.where(cols_valid, x2 - mean, 0.0)
    d3 = tl.where(cols_valid, x3 - mean, 0.0)
    squares = _row_sum(d0 * d0)
    if TILES >= 3:
        squares += _row_sum(d1 * d1) + _row_sum(d2 * d2)
    if TILES == 4:
        squares += _row_sum(d3 * d3)
    rstd = 1.0 / tl.sqrt_rn(squares / count + eps)
    return d0 * rstd, d1 * rstd, d2 * rstd, d3 * rstd, rstd


@triton.jit
def layer_norm_backward(dy0, dy1, dy2, dy3, n0, n1, n2, n3, rstd, cols_valid, count, TILES: tl.constexpr):
    """dL/dx of n = LN(x) over the row of the first TILES tiles, from dL/dn (dy), n and rstd:
    rstd * (dy - mean(dy) - n * mean(dy * n))."""
    total = _row_sum(dy0)
    dot = _row_sum(dy0 * n0)
    if TILES >= 3:
        total += _row_sum(dy1) + _row_sum(dy2)
        dot += _row_sum(dy1 * n1) + _row_sum(dy2 * n2)
    if TILES == 4:
        total += _row_sum(dy3)
        dot += _row_sum(dy3 * n3)
    mean_dy = total / count
    mean_dyn = dot / count
    return (tl.where(cols_valid, rstd * (dy0 - mean_dy - n0 * mean_dyn), 0.0),
            tl.where(cols_valid, rstd * (dy1 - mean_dy - n1 * mean_dyn), 0.0),
            tl.where(cols_valid, rstd * (dy2 - mean_dy - n2 * mean_dyn), 0.0),
            tl.where(cols_valid, rstd * (dy3 - mean_dy - n3 * mean_dyn), 0.0))


@triton.jit
def layer_norm_backward_means(dy0, dy1, dy2, n_ptrs, stride, mask, count):
    """(mean(dy), mean(dy * n)) [BB, 1] over a three-tile row, the normalized tiles loaded from
    n_ptrs + k * stride (float32); with layer_norm_backward_tile, layer_norm_backward one tile
    at a time."""
    total = _row_sum(dy0) + _row_sum(dy1) + _row_sum(dy2)
    dot = (_row_sum(dy0 * tl.load(n_ptrs, mask=mask, other=0.0))
           + _row_sum(dy1 * tl.load(n_ptrs + stride, mask=mask, other=0.0))
           + _row_sum(dy2 * tl.load(n_ptrs + 2 * stride, mask=mask, other=0.0)))
    return total / count, dot / count


@triton.jit
def layer_norm_backward_tile(dy, n_ptrs, mask, rstd, mean_dy, mean_dyn, cols_valid):
    """One tile of dL/dx of n = LN(x): rstd * (dy - mean(dy) - n * mean(dy * n))."""
    return tl.where(cols_valid, rstd * (dy - mean_dy - tl.load(n_ptrs, mask=mask, other=0.0) * mean_dyn), 0.0)


@triton.jit
def dot_float32_operand(a, w, DOT_DTYPE: tl.constexpr):
    """a @ w, float32 [BB, K] x DOT_DTYPE [K, N] -> float32 [BB, N], a kept to about float32
    accuracy: with a half DOT_DTYPE, a goes in as two parts of that dtype (a's rounding and what
    it left), two tensor-core dots; w is exact in its dtype. For the operands whose rounding
    layer normalisation's 1/std enlarges (h_{t-1} forward, dL/d(W_hh h) backward): rounded to
    the half type once, they cost the error rule (docs/triton.md, "Layer normalisation")."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, w, input_precision="ieee")
    high = a.to(DOT_DTYPE)
    low = (a - high.to(tl.float32)).to(DOT_DTYPE)
    return tl.dot(high, w, input_precision="ieee") + tl.dot(low, w, input_precision="ieee")


# ---------------------------------------------------------------------------------------
# LSTM cell
# ---------------------------------------------------------------------------------------


@triton.jit
def lstm_cell_forward(a_i, a_f, a_g, a_o, c_prev, keep_c, valid, cell_clip, CELL_CLIP: tl.constexpr,
                      HAS_ZONEOUT_C: tl.constexpr):
    """Gate pre-activations [BB, BH] -> activations, c_t before clip, the fresh c~_t (after the
    clip; what h~_t reads), the carried c_t and m = o*tanh(c~_t). keep_c: the zoneout keep
    weights e_t (HAS_ZONEOUT_C): carried c_t = e_t * c_{t-1} + (1 - e_t) * c~_t; without
    zoneout the fresh and the carried cell are one."""
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    o = sigmoid(a_o)
    c_raw = f * c_prev + i * g
    if CELL_CLIP:
        c_fresh = clamp(c_raw, cell_clip)
    else:
        c_fresh = c_raw
    if HAS_ZONEOUT_C:
        c_new = tl.where(valid, keep_c * c_prev + (1.0 - keep_c) * c_fresh, c_prev)
    else:
        c_fresh = tl.where(valid, c_fresh, c_prev)
        c_new = c_fresh
    m = o * tanh(c_fresh)
    return i, f, g, o, c_raw, c_fresh, c_new, m


@triton.jit
def lstm_hidden_forward(h_raw, h_prev, keep_h, valid, proj_clip, PROJ_CLIP: tl.constexpr,
                        HAS_ZONEOUT_H: tl.constexpr):
    """W_hr m (or m) -> carried h_t and the output (0 past a row's length). keep_h: the zoneout
    keep weights d_t (HAS_ZONEOUT_H): h_t = d_t * h_{t-1} + (1 - d_t) * h~_t, h~_t after proj_clip."""
    if PROJ_CLIP:
        h_new = clamp(h_raw, proj_clip)
    else:
        h_new = h_raw
    if HAS_ZONEOUT_H:
        h_new = keep_h * h_prev + (1.0 - keep_h) * h_new
    h_new = tl.where(valid, h_new, h_prev)
    return h_new, tl.where(valid, h_new, 0.0)


@triton.jit
def lstm_hidden_backward(grad_carry, grad_out, h_raw, keep_h, valid, proj_clip, state_clip, PROJ_CLIP: tl.constexpr,
                          STATE_CLIP: tl.constexpr, HAS_ZONEOUT_H: tl.constexpr):
    """Total dL/dh_t (clipped in "state" mode) -> (gradient of W_hr m_t, the part passed
    straight to h_{t-1}: zoneout's d_t * dL/dh_t, all of dL/dh_t where the row is past its length)."""
    grad_h = grad_carry + tl.where(valid, grad_out, 0.0)
    if STATE_CLIP:
        grad_h = clamp(grad_h, state_clip)
    grad_proj = tl.where(valid, grad_h, 0.0)
    if HAS_ZONEOUT_H:
        grad_proj = grad_proj * (1.0 - keep_h)
    if PROJ_CLIP:
        grad_proj = clamp_backward(grad_proj, h_raw, proj_clip)
    if HAS_ZONEOUT_H:
        grad_keep = tl.where(valid, grad_h * keep_h, grad_h)
    else:
        grad_keep = tl.where(valid, 0.0, grad_h)
    return grad_proj, grad_keep


@triton.jit
def lstm_cell_backward(grad_m, grad_c_carry, i, f, g, o, c_fresh, c_prev, c_raw, keep_c, valid, grad_c_normed,
                        tanh_normed, cell_clip, state_clip, gate_clip, CELL_CLIP: tl.constexpr,
                        STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr, HAS_ZONEOUT_C: tl.constexpr,
                        CELL_NORM: tl.constexpr):
    """dL/dm_t and dL/dc_t from step t+1 -> dL/da (4 gates) and dL/dc_{t-1}. c_fresh: c~_t as
    h~_t read it (the carried c_t without zoneout). Under zoneout h~_t reads c~_t, not the
    carried c_t, so the state clip applies to the carried gradient alone. With CELL_NORM
    (layer normalisation, m = o * tanh(y), y = LN(c~_t) * g_c + b_c) the caller gives
    tanh(y) and the part of dL/dc~_t through m (layer_norm_backward)."""
    if CELL_NORM:
        tanh_c = tanh_normed
        grad_c_from_m = grad_c_normed
    else:
        tanh_c = tanh(c_fresh)
        grad_c_from_m = grad_m * o * (1.0 - tanh_c * tanh_c)
    if HAS_ZONEOUT_C:
        grad_c = grad_c_carry
        if STATE_CLIP:
            grad_c = clamp(grad_c, state_clip)
        grad_c_raw = tl.where(valid, (1.0 - keep_c) * grad_c + grad_c_from_m, 0.0)
    else:
        grad_c = grad_c_carry + grad_c_from_m
        if STATE_CLIP:
            grad_c = clamp(grad_c, state_clip)
        grad_c_raw = tl.where(valid, grad_c, 0.0)
    if CELL_CLIP:
        grad_c_raw = clamp_backward(grad_c_raw, c_raw, cell_clip)
    if HAS_ZONEOUT_C:
        # dL/dc_{t-1} before the gate math, so that keep_c and the carried gradient are not
        # held through it (held, the bfloat16 step and sequence kernels spilled on sm_90)
        grad_c_prev = tl.where(valid, grad_c_raw * f + keep_c * grad_c, grad_c)
    d_i = grad_c_raw * g * i * (1.0 - i)
    d_f = grad_c_raw * c_prev * f * (1.0 - f)
    d_g = grad_c_raw * i * (1.0 - g * g)
    d_o = grad_m * tanh_c * o * (1.0 - o)
    if GATE_CLIP:
        d_i = clamp(d_i, gate_clip)
        d_f = clamp(d_f, gate_clip)
        d_g = clamp(d_g, gate_clip)
        d_o = clamp(d_o, gate_clip)
    # A padded step's gates were computed from whatever its row holds (an infinite weight
    # times the zeroed input is NaN): select zeros there rather than multiply by them.
    d_i = tl.where(valid, d_i, 0.0)
    d_f = tl.where(valid, d_f, 0.0)
    d_g = tl.where(valid, d_g, 0.0)
    d_o = tl.where(valid, d_o, 0.0)
    if not HAS_ZONEOUT_C:
        grad_c_prev = tl.where(valid, grad_c_raw * f, grad_c)
    return d_i, d_f, d_g, d_o, grad_c_prev


# ---------------------------------------------------------------------------------------
# GRU cell ("reset after", as torch.nn), with zoneout of h
# ---------------------------------------------------------------------------------------


@triton.jit
def gru_cell_forward(x_r, x_z, x_n, hh_r, hh_z, hh_n, h_prev, keep, valid, HAS_ZONEOUT: tl.constexpr):
    """Input-side and hidden-side gate sums [BB, BH] -> r, z, n, carried h_t, output. keep: the
    zoneout keep weights d_t (HAS_ZONEOUT): h_t = d_t * h_{t-1} + (1 - d_t) * h~_t."""
    r = sigmoid(x_r + hh_r)
    z = sigmoid(x_z + hh_z)
    n = tanh(x_n + r * hh_n)
    h_new = (1.0 - z) * n + z * h_prev
    if HAS_ZONEOUT:
        h_new = keep * h_prev + (1.0 - keep) * h_new
    h_new = tl.where(valid, h_new, h_prev)
    return r, z, n, h_new, tl.where(valid, h_new, 0.0)


@triton.jit
def gru_cell_backward(grad_carry, grad_out, r, z, n, hh_n, h_prev, keep, valid, state_clip, gate_clip,
                      STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr, HAS_ZONEOUT: tl.constexpr):
    """dL/dh_t from step t+1 and from output_t -> gate gradients and the part of dL/dh_{t-1}
    that does not go through W_hh (z * dL/dh~_t, plus zoneout's d_t * dL/dh_t)."""
    grad_h = grad_carry + tl.where(valid, grad_out, 0.0)
    if STATE_CLIP:
        grad_h = clamp(grad_h, state_clip)
    grad_step = tl.where(valid, grad_h, 0.0)
    if HAS_ZONEOUT:
        grad_step = grad_step * (1.0 - keep)
    d_n = grad_step * (1.0 - z) * (1.0 - n * n)
    if GATE_CLIP:
        d_n = clamp(d_n, gate_clip)
    d_r = d_n * hh_n * r * (1.0 - r)
    d_z = grad_step * (h_prev - n) * z * (1.0 - z)
    if GATE_CLIP:
        d_r = clamp(d_r, gate_clip)
        d_z = clamp(d_z, gate_clip)
    # padded steps: zeros selected, not multiplied by gates computed from their rows (see LSTM)
    d_r = tl.where(valid, d_r, 0.0)
    d_z = tl.where(valid, d_z, 0.0)
    d_n = tl.where(valid, d_n, 0.0)
    if HAS_ZONEOUT:
        grad_keep = tl.where(valid, grad_h * keep + grad_step * z, grad_h)
    else:
        grad_keep = tl.where(valid, grad_h * z, grad_h)
    return d_r, d_z, d_n, tl.where(valid, d_n * r, 0.0), grad_keep


# ---------------------------------------------------------------------------------------
# Elman RNN cell (torch.nn.RNN's, tanh or relu), with zoneout of h
# ---------------------------------------------------------------------------------------


@triton.jit
def rnn_cell_forward(a, h_prev, keep, valid, RELU: tl.constexpr, HAS_ZONEOUT: tl.constexpr):
    """Pre-activation a_t [BB, BH] -> f(a_t), carried h_t, output (0 past a row's length).
    keep: the zoneout keep weights d_t (HAS_ZONEOUT): h_t = d_t * h_{t-1} + (1 - d_t) * f(a_t)."""
    if RELU:
        activation = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) is NaN, as torch's
    else:
        activation = tanh(a)
    if HAS_ZONEOUT:
        h_new = keep * h_prev + (1.0 - keep) * activation
    else:
        h_new = activation
    h_new = tl.where(valid, h_new, h_prev)
    return activation, h_new, tl.where(valid, h_new, 0.0)


@triton.jit
def rnn_cell_backward(grad_carry, grad_out, activation, keep, valid, state_clip, gate_clip, RELU: tl.constexpr,
                      HAS_ZONEOUT: tl.constexpr, STATE_CLIP: tl.constexpr, GATE_CLIP: tl.constexpr):
    """dL/dh_t from step t+1 and from output_t, f(a_t) -> dL/da_t and the part of dL/dh_{t-1}
    that does not go through W_hh (zoneout's d_t * dL/dh_t; all of dL/dh_t past a row's length)."""
    grad_h = grad_carry + tl.where(valid, grad_out, 0.0)
    if STATE_CLIP:
        grad_h = clamp(grad_h, state_clip)
    grad_step = tl.where(valid, grad_h, 0.0)
    if HAS_ZONEOUT:
        grad_activation = grad_step * (1.0 - keep)
    else:
        grad_activation = grad_step
    if RELU:
        # torch's relu backward selects by the result: the gradient passes where f(a) > 0 (and where it is NaN)
        d_a = tl.where(activation <= 0.0, 0.0, grad_activation)
    else:
        d_a = grad_activation * (1.0 - activation * activation)
    if GATE_CLIP:
        d_a = clamp(d_a, gate_clip)
    d_a = tl.where(valid, d_a, 0.0)  # padded steps: zeros selected (see the LSTM)
    if HAS_ZONEOUT:
        grad_keep = tl.where(valid, grad_h * keep, grad_h)
    else:
        grad_keep = tl.where(valid, 0.0, grad_h)
    return d_a, grad_keep
