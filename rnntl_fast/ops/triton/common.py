"""Element-wise helpers shared by the LSTM and GRU kernels (float32 in, float32 out)."""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # (1 - e) / (1 + e) with e = exp(-2|x|) never overflows, but loses relative accuracy
    # near 0 where 1 - e cancels; a short odd series (error < 2e-10 below 0.125) takes over.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    near = ax * (1.0 + x2 * (-0.333333333333 + x2 * (0.133333333333 + x2 * -0.0539682539683)))
    magnitude = tl.where(ax < 0.125, near, far)
    return tl.where(x < 0.0, -magnitude, magnitude)


@triton.jit
def clamp(x, limit):
    return tl.minimum(tl.maximum(x, -limit), limit)


@triton.jit
def clamp_pass(x, limit):
    """1 where torch.clamp(x, -limit, limit) lets the gradient through (bounds included)."""
    return ((x >= -limit) & (x <= limit)).to(tl.float32)


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
