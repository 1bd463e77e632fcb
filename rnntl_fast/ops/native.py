"""The native ops `torch.ops.rnntl_fast.{lstm,gru,rnn}_{forward,backward}` (the `cpu` and `cuda`
backends): their fake (meta) implementations for tracing, their autograd, and the calls
that run them. The schemas live in csrc/ops.cpp, the CPU kernels in csrc/cpu, the CUDA ones
in csrc/cuda; torch's dispatcher picks the kernel by the tensors' device."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext
from .autograd import (gru_gradients_like, lstm_gradients_like, needs_grad, register_gru_autograd,
                       register_lstm_autograd)
from .autograd import register_autograd, register_rnn_autograd, rnn_gradients_like
from .options import SequenceOptions

REGISTERED = False


def _lstm_forward_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, recurrent_mask,
                       zoneout_h, zoneout_c, reverse, cell_clip, proj_clip, state_clip, gate_clip, save_for_backward):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 4
    out_size = weight_hr.shape[0] if weight_hr is not None else hidden
    empty = lambda *shape: input.new_empty(shape)  # noqa: E731
    keep = bool(save_for_backward)
    return (empty(steps, batch, out_size), empty(batch, out_size), empty(batch, hidden),
            empty(steps, batch, 4 * hidden) if keep else empty(0),
            empty(steps, batch, hidden) if keep else empty(0),
            empty(steps, batch, out_size) if keep and proj_clip > 0 else empty(0),
            empty(steps, batch, hidden) if keep and zoneout_c is not None else empty(0))


def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths,
                        recurrent_mask, zoneout_h, zoneout_c, output, gates, cells, hidden_pre_clip, carried_cells,
                        reverse, cell_clip, proj_clip, state_clip, gate_clip, output_mask):
    return lstm_gradients_like(input, weight_ih, weight_hh, weight_hr, output_mask)


def _gru_forward_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, recurrent_mask, zoneout, reverse,
                      state_clip, gate_clip, save_for_backward):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0] // 3
    keep = bool(save_for_backward)
    return (input.new_empty(steps, batch, hidden), input.new_empty(batch, hidden),
            input.new_empty((steps, batch, 3 * hidden) if keep else (0,)),
            input.new_empty((steps, batch, hidden) if keep else (0,)))


def _gru_backward_fake(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout, output,
                       gates, hidden_n, reverse, state_clip, gate_clip, output_mask):
    return gru_gradients_like(input, weight_ih, weight_hh, output_mask)


def _rnn_forward_fake(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, recurrent_mask, zoneout, relu,
                      reverse, state_clip, gate_clip, save_for_backward):
    steps, batch, _ = input.shape
    hidden = weight_ih.shape[0]
    keep = bool(save_for_backward) and zoneout is not None  # activations differ from the output only then
    return (input.new_empty(steps, batch, hidden), input.new_empty(batch, hidden),
            input.new_empty((steps, batch, hidden) if keep else (0,)))


def _rnn_backward_fake(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout,
                       output, activations, relu, reverse, state_clip, gate_clip, output_mask):
    return rnn_gradients_like(input, weight_ih, weight_hh, output_mask)


def _bernoulli_draws_fake(out, probability, value, seed):
    return None  # fills out in place


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("rnntl_fast: double backward (create_graph=True through the backward of a fused "
                              "LSTM/GRU/RNN op) is not supported; use backend='reference' for higher-order gradients")


def _no_double_backward_setup(ctx, inputs, output):
    pass


def register() -> None:
    """Registers the fakes and autograd of the native ops once (no-op without the extension)."""
    global REGISTERED
    if REGISTERED or not _ext.HAS_CPU_KERNELS:
        return
    torch.library.register_fake("rnntl_fast::bernoulli_draws_")(_bernoulli_draws_fake)
    torch.library.register_fake("rnntl_fast::lstm_forward")(_lstm_forward_fake)
    torch.library.register_fake("rnntl_fast::lstm_backward")(_lstm_backward_fake)
    torch.library.register_fake("rnntl_fast::gru_forward")(_gru_forward_fake)
    torch.library.register_fake("rnntl_fast::gru_backward")(_gru_backward_fake)
    # The native backward ops read the forward's output before the reserve. They are looked
    # up at each call (not bound here) so that a wrapped or patched op is the one that runs.
    register_lstm_autograd("rnntl_fast::lstm_forward", lambda *args: torch.ops.rnntl_fast.lstm_backward(*args),
                           reserve_includes_output=True)
    register_gru_autograd("rnntl_fast::gru_forward", lambda *args: torch.ops.rnntl_fast.gru_backward(*args),
                          reserve_includes_output=True)
    torch.library.register_fake("rnntl_fast::rnn_forward")(_rnn_forward_fake)
    torch.library.register_fake("rnntl_fast::rnn_backward")(_rnn_backward_fake)
    register_rnn_autograd("rnntl_fast::rnn_forward", lambda *args: torch.ops.rnntl_fast.rnn_backward(*args))
    for name in ("rnntl_fast::lstm_backward", "rnntl_fast::gru_backward", "rnntl_fast::rnn_backward"):
        register_autograd(name, _no_double_backward, setup_context=_no_double_backward_setup)
    from . import layer_norm_native  # the layer-normalised cells' ops (imports this module)
    layer_norm_native.register(_no_double_backward, _no_double_backward_setup)
    REGISTERED = True


# CPU kernels for float16 / bfloat16 tensors: the float32 kernels on widened copies, results
# rounded back to the input dtype (autograd rounds the gradients back too), so states and
# sums stay in float32 as in the CUDA and Triton kernels (error rule: tests/tolerances.py).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _widened(tensors):
    return [t.float() if t is not None else None for t in tensors]


def lstm_native(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                bias_hh: Optional[Tensor], weight_hr: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
                lengths: Optional[Tensor], options: SequenceOptions, recurrent_mask: Optional[Tensor] = None,
                zoneout_h: Optional[Tensor] = None, zoneout_c: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The `cpu` / `cuda` backends of rnntl_fast.ops.lstm (arguments already checked there).
    Shapes as rnntl_fast.ops.lstm (recurrent_mask [B, P], zoneout_h [T, B, P], zoneout_c
    [T, B, H] or None); returns output [T, B, P], h_n [B, P], c_n [B, H]."""
    if input.device.type == "cpu" and input.dtype in HALF_DTYPES:
        tensors = _widened((input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0))
        mask, keep_h, keep_c = _widened((recurrent_mask, zoneout_h, zoneout_c))
        return tuple(r.to(input.dtype) for r in lstm_native(*tensors, lengths, options, recurrent_mask=mask,
                                                            zoneout_h=keep_h, zoneout_c=keep_c))
    save = needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0)
    out, h_n, c_n, *_reserve = torch.ops.rnntl_fast.lstm_forward(
        input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h, zoneout_c,
        options.reverse, options.cell_clip, options.proj_clip, options.state_clip, options.gate_clip, save)
    return out, h_n, c_n


def gru_native(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
               bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor],
               options: SequenceOptions, recurrent_mask: Optional[Tensor] = None,
               zoneout: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The `cpu` / `cuda` backends of rnntl_fast.ops.gru (arguments already checked there).
    Shapes as rnntl_fast.ops.gru (recurrent_mask [B, H], zoneout [T, B, H] or None); returns
    output [T, B, H], h_n [B, H]."""
    if input.device.type == "cpu" and input.dtype in HALF_DTYPES:
        tensors = _widened((input, weight_ih, weight_hh, bias_ih, bias_hh, h0))
        mask, keep = _widened((recurrent_mask, zoneout))
        return tuple(r.to(input.dtype) for r in gru_native(*tensors, lengths, options, recurrent_mask=mask,
                                                           zoneout=keep))
    save = needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    out, h_n, _, _ = torch.ops.rnntl_fast.gru_forward(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths,
                                                      recurrent_mask, zoneout, options.reverse, options.state_clip,
                                                      options.gate_clip, save)
    return out, h_n


def rnn_native(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
               bias_hh: Optional[Tensor], h0: Optional[Tensor], lengths: Optional[Tensor], options: SequenceOptions,
               nonlinearity: str = "tanh", recurrent_mask: Optional[Tensor] = None,
               zoneout: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The `cpu` / `cuda` backends of rnntl_fast.ops.rnn (arguments already checked there). Shapes as
    rnntl_fast.ops.rnn (recurrent_mask [B, H], zoneout [T, B, H]); returns output [T, B, H], h_n [B, H]."""
    if input.device.type == "cpu" and input.dtype in HALF_DTYPES:
        tensors = _widened((input, weight_ih, weight_hh, bias_ih, bias_hh, h0))
        mask, keep = _widened((recurrent_mask, zoneout))
        return tuple(r.to(input.dtype) for r in rnn_native(*tensors, lengths, options, nonlinearity,
                                                           recurrent_mask=mask, zoneout=keep))
    save = needs_grad(input, weight_ih, weight_hh, bias_ih, bias_hh, h0)
    out, h_n, _ = torch.ops.rnntl_fast.rnn_forward(input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths,
                                                   recurrent_mask, zoneout, nonlinearity == "relu", options.reverse,
                                                   options.state_clip, options.gate_clip, save)
    return out, h_n
