"""Python side of the native ops `torch.ops.rnntl_fast.{lstm,gru}_{forward,backward}`:
fake (meta) implementations for tracing and autograd registration. The schemas live in
csrc/ops.cpp; the CPU kernels in csrc/cpu, the CUDA ones in csrc/cuda. The same
registered op serves the `cpu` and `cuda` backends: torch's dispatcher picks the kernel
by the tensors' device."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext

REGISTERED = False


def _lstm_forward_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, reverse,
                       cell_clip, proj_clip, grad_clip, grad_clip_mode, save_for_backward):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    empty = lambda *shape: input.new_empty(shape)  # noqa: E731
    keep = bool(save_for_backward)
    return (empty(steps, batch, out_size), empty(batch, out_size), empty(batch, hidden),
            empty(steps, batch, 4 * hidden) if keep else empty(0),
            empty(steps, batch, hidden) if keep else empty(0),
            empty(steps, batch, out_size) if keep and proj_clip is not None else empty(0))


def lstm_gradients_like(input, weight_ih, weight_hh, weight_hr, output_mask):
    """Empty tensors shaped as an LSTM backward's results (grad_input, grad_weight_ih,
    grad_weight_hh, grad_bias, grad_weight_hr, grad_h0, grad_c0); [0] where output_mask is off."""
    steps, batch, features = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    shapes = [(steps, batch, features), tuple(weight_ih.shape), tuple(weight_hh.shape), (4 * hidden,),
              (out_size, hidden) if weight_hr is not None else (0,), (batch, out_size), (batch, hidden)]
    return tuple(input.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask))


def gru_gradients_like(input, weight_ih, weight_hh, output_mask):
    """Empty tensors shaped as a GRU backward's results (grad_input, grad_weight_ih,
    grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0); [0] where output_mask is off."""
    steps, batch, features = input.shape
    hidden = weight_ih.shape[0] // 3
    shapes = [(steps, batch, features), tuple(weight_ih.shape), tuple(weight_hh.shape), (3 * hidden,),
              (3 * hidden,), (batch, hidden)]
    return tuple(input.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask))


def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths,
                        output, gates, cells, hidden_pre_clip, reverse, cell_clip, proj_clip, grad_clip,
                        grad_clip_mode, output_mask):
    return lstm_gradients_like(input, weight_ih, weight_hh, weight_hr, output_mask)


def _gru_forward_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, reverse, grad_clip,
                      grad_clip_mode, save_for_backward):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    keep = bool(save_for_backward)
    return (input.new_empty(steps, batch, hidden), input.new_empty(batch, hidden),
            input.new_empty((steps, batch, 3 * hidden) if keep else (0,)),
            input.new_empty((steps, batch, hidden) if keep else (0,)))


def _gru_backward_fake(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, output, gates, hidden_n,
                       reverse, grad_clip, grad_clip_mode, output_mask):
    return gru_gradients_like(input, weight_ih, weight_hh, output_mask)


# Autograd. The forward ops return what backward needs as extra outputs (cuDNN's
# "reserve space"); backward asks only for the gradients autograd needs, so frozen
# weights cost no weight-gradient GEMM.
def _lstm_setup_context(ctx, inputs, output):
    (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, reverse, cell_clip, proj_clip,
     grad_clip, grad_clip_mode, save_for_backward) = inputs
    out, _, _, gates, cells, hidden_pre_clip = output
    ctx.mark_non_differentiable(gates, cells, hidden_pre_clip)
    # Gradients of outputs that the loss does not use arrive as None (the op takes them as
    # optional) instead of zero tensors: autograd would otherwise allocate and zero-fill one
    # for every unused output, the [T, B, 4H] saved gates included.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, out, gates, cells,
                          hidden_pre_clip)
    ctx.options = (reverse, cell_clip, proj_clip, grad_clip, grad_clip_mode)


def _lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, *_reserve):
    input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, out, gates, cells, hidden_pre_clip = ctx.saved_tensors
    reverse, cell_clip, proj_clip, grad_clip, grad_clip_mode = ctx.options
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[3] or need[4], need[5], need[6], need[7]]
    grads = torch.ops.rnntl_fast.lstm_backward(
        grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, out, gates,
        cells, hidden_pre_clip, reverse, cell_clip, proj_clip, grad_clip, grad_clip_mode, mask)
    g_input, g_weight_ih, g_weight_hh, g_bias, g_weight_hr, g_h0, g_c0 = grads
    pick = lambda g, n: g if need[n] else None  # noqa: E731
    return (pick(g_input, 0), pick(g_weight_ih, 1), pick(g_weight_hh, 2), pick(g_bias, 3), pick(g_bias, 4),
            pick(g_weight_hr, 5), pick(g_h0, 6), pick(g_c0, 7)) + (None,) * 7


def _gru_setup_context(ctx, inputs, output):
    (input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, reverse, grad_clip, grad_clip_mode,
     save_for_backward) = inputs
    out, _, gates, hidden_n = output
    ctx.mark_non_differentiable(gates, hidden_n)
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None (see _lstm_setup_context)
    ctx.save_for_backward(input, weight_ih, weight_hh, h0, lengths, out, gates, hidden_n)
    ctx.options = (reverse, grad_clip, grad_clip_mode)


def _gru_backward(ctx, grad_output, grad_h_n, *_reserve):
    input, weight_ih, weight_hh, h0, lengths, out, gates, hidden_n = ctx.saved_tensors
    reverse, grad_clip, grad_clip_mode = ctx.options
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[3], need[4], need[5]]
    grads = torch.ops.rnntl_fast.gru_backward(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths,
                                              out, gates, hidden_n, reverse, grad_clip, grad_clip_mode, mask)
    return tuple(g if need[n] else None for n, g in enumerate(grads)) + (None,) * 5


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("rnntl_fast: double backward (create_graph=True through the backward of a fused "
                              "LSTM/GRU op) is not supported; use backend='reference' for higher-order gradients")


def _no_double_backward_setup(ctx, inputs, output):
    pass


def register() -> bool:
    """Registers fakes and autograd once; False when the extension is not built."""
    global REGISTERED
    if REGISTERED or not _ext.HAS_CPU_KERNELS:
        return REGISTERED
    torch.library.register_fake("rnntl_fast::lstm_forward")(_lstm_forward_fake)
    torch.library.register_fake("rnntl_fast::lstm_backward")(_lstm_backward_fake)
    torch.library.register_fake("rnntl_fast::gru_forward")(_gru_forward_fake)
    torch.library.register_fake("rnntl_fast::gru_backward")(_gru_backward_fake)
    torch.library.register_autograd("rnntl_fast::lstm_forward", _lstm_backward, setup_context=_lstm_setup_context)
    torch.library.register_autograd("rnntl_fast::gru_forward", _gru_backward, setup_context=_gru_setup_context)
    for name in ("rnntl_fast::lstm_backward", "rnntl_fast::gru_backward"):
        torch.library.register_autograd(name, _no_double_backward, setup_context=_no_double_backward_setup)
    REGISTERED = True
    return True


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lstm_native(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
                lengths: Optional[Tensor], reverse: bool, cell_clip: Optional[float], proj_clip: Optional[float],
                grad_clip: Optional[float], grad_clip_mode: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The `cpu` / `cuda` backends of rnntl_fast.ops.lstm (arguments already checked)."""
    save = _needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0)
    out, h_n, c_n, _, _, _ = torch.ops.rnntl_fast.lstm_forward(
        input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, reverse, cell_clip, proj_clip,
        grad_clip, grad_clip_mode, save)
    return out, h_n, c_n


def gru_native(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
               bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
               grad_clip: Optional[float], grad_clip_mode: str) -> Tuple[Tensor, Tensor]:
    """The `cpu` / `cuda` backends of rnntl_fast.ops.gru (arguments already checked)."""
    save = _needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    out, h_n, _, _ = torch.ops.rnntl_fast.gru_forward(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths,
                                                      reverse, grad_clip, grad_clip_mode, save)
    return out, h_n
