"""Autograd for the fused ops, shared by every backend that registers a forward/backward op
pair (the native `rnntl_fast::{lstm,gru,rnn}_{forward,backward}` and the Triton
`rnntl_fast::triton_{lstm,gru}_{forward,backward}`).

The contract of such a pair (docs/semantics.md, "Op contract"):

* forward(input, weights..., lengths, recurrent_mask, zoneout keep weights, reverse, [cell_clip,
  proj_clip,] state_clip, gate_clip, save_for_backward, *extra) -> (results..., *reserve).
  `reserve` holds what the backward reads (cuDNN's "reserve space"); it is empty unless
  save_for_backward.
* backward(grads of the results..., input, weights..., lengths, recurrent_mask, zoneout keep
  weights, *reserve, reverse, [cell_clip, proj_clip,] state_clip, gate_clip, *extra,
  output_mask) -> gradients, one per entry of
  output_mask; an entry whose mask is off comes back empty and costs nothing (frozen
  weights cost no weight-gradient product).

Clip limits are floats where 0 means off. state_clip and gate_clip are taken by the forward
op only to be handed to the backward op here.
"""
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

_LIBRARY = torch.library.Library("rnntl_fast", "IMPL")  # the Autograd kernels of register_autograd


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """torch.library.register_autograd(op, backward, setup_context=setup_context), for an op
    defined in C++ (a qualified name such as "rnntl_fast::lstm_forward").

    torch's generated Autograd kernel calls torch._library.utils.fill_defaults at every call to
    restore arguments the dispatcher dropped for equalling their defaults; it rebuilds the
    schema's argument list once per argument, 68 us per call for the ~19 arguments of
    lstm_forward (the op itself takes 27 us at (T, B, I, H) = (2, 2, 8, 16)). The schemas of
    csrc/ops.cpp declare no defaults and no keyword-only arguments, so nothing is dropped: this
    kernel is torch's without that step. Any other op (a torch.library.custom_op, or a schema
    with defaults) gets torch.library.register_autograd itself.
    The dispatch key set rides as apply's last argument: backward functions pad their result
    with None up to len(ctx.needs_input_grad), which covers it."""
    if not isinstance(op, str):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
        return
    namespace, name = op.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default
    if any(a.kwarg_only or a.has_default_value() for a in overload._schema.arguments):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
        return
    below_autograd = torch._C._after_autograd_keyset

    def run_below_autograd(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & below_autograd, *args)

    def forward(ctx, *args_and_keyset):
        *args, keyset = args_and_keyset
        output = run_below_autograd(keyset, args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{name}_autograd", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        return run_below_autograd(keyset, args)

    _LIBRARY.impl(name, autograd_kernel, "Autograd", with_keyset=True)


class LstmForwardCall(NamedTuple):
    """The arguments of an LSTM forward op, by name."""
    input: Tensor                 # [T, B, I]
    weight_ih: Tensor             # [4H, I]
    weight_hh: Tensor             # [4H, P]
    bias_ih: Optional[Tensor]     # [4H]
    bias_hh: Optional[Tensor]     # [4H]
    weight_hr: Optional[Tensor]   # [P, H]
    h0: Optional[Tensor]          # [B, P]
    c0: Optional[Tensor]          # [B, H]
    lengths: Optional[Tensor]     # [B] CPU int64
    recurrent_mask: Optional[Tensor]  # [B, P]
    zoneout_h: Optional[Tensor]   # [T, B, P] keep weights
    zoneout_c: Optional[Tensor]   # [T, B, H] keep weights
    reverse: bool
    cell_clip: float
    proj_clip: float
    state_clip: float
    gate_clip: float
    save_for_backward: bool
    strategy: Optional[str] = None  # Triton only: "sequence" or "step"


class GruForwardCall(NamedTuple):
    """The arguments of a GRU forward op, by name."""
    input: Tensor                 # [T, B, I]
    weight_ih: Tensor             # [3H, I]
    weight_hh: Tensor             # [3H, H]
    bias_ih: Optional[Tensor]     # [3H]
    bias_hh: Optional[Tensor]     # [3H]
    h0: Optional[Tensor]          # [B, H]
    lengths: Optional[Tensor]     # [B] CPU int64
    recurrent_mask: Optional[Tensor]  # [B, H]
    zoneout: Optional[Tensor]     # [T, B, H] keep weights
    reverse: bool
    state_clip: float
    gate_clip: float
    save_for_backward: bool
    strategy: Optional[str] = None


def _extra(call) -> tuple:
    return () if call.strategy is None else (call.strategy,)


def _save(ctx, tensors, output, results: int, reserve_includes_output: bool) -> None:
    reserve = output[results:]
    ctx.mark_non_differentiable(*reserve)
    # Gradients of outputs that the loss does not use arrive as None (the backward ops take
    # them as optional) instead of zero tensors: autograd would otherwise allocate and
    # zero-fill one for every unused output, the [T, B, 4H] reserve included.
    ctx.set_materialize_grads(False)
    kept = (output[0], *reserve) if reserve_includes_output else tuple(reserve)
    ctx.save_for_backward(*tensors, *kept)


def register_lstm_autograd(forward_op, backward_op: Callable, reserve_includes_output: bool) -> None:
    """Autograd for an LSTM forward op (a registered op or its qualified name).
    reserve_includes_output: the backward op reads the forward's `output` before the reserve."""

    def setup_context(ctx, inputs, output):
        call = LstmForwardCall(*inputs)
        _save(ctx, (call.input, call.weight_ih, call.weight_hh, call.weight_hr, call.h0, call.c0, call.lengths,
                    call.recurrent_mask, call.zoneout_h, call.zoneout_c), output, 3, reserve_includes_output)
        ctx.call = call._replace(input=None, weight_ih=None, weight_hh=None, bias_ih=None, bias_hh=None,
                                 weight_hr=None, h0=None, c0=None, lengths=None, recurrent_mask=None, zoneout_h=None,
                                 zoneout_c=None)

    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_reserve_grads):
        (input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, recurrent_mask, zoneout_h, zoneout_c,
         *reserve) = ctx.saved_tensors
        call, need = ctx.call, ctx.needs_input_grad
        # bias_ih and bias_hh share one gradient.
        mask = [need[0], need[1], need[2], need[3] or need[4], need[5], need[6], need[7]]
        g_input, g_weight_ih, g_weight_hh, g_bias, g_weight_hr, g_h0, g_c0 = backward_op(
            grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, h0, c0, lengths, recurrent_mask,
            zoneout_h, zoneout_c, *reserve,
            call.reverse, call.cell_clip, call.proj_clip, call.state_clip, call.gate_clip, *_extra(call), mask)
        grads = (g_input, g_weight_ih, g_weight_hh, g_bias, g_bias, g_weight_hr, g_h0, g_c0)
        return tuple(g if need[n] else None for n, g in enumerate(grads)) + (None,) * (len(need) - len(grads))

    register_autograd(forward_op, backward, setup_context=setup_context)


def register_gru_autograd(forward_op, backward_op: Callable, reserve_includes_output: bool) -> None:
    """Autograd for a GRU forward op; as register_lstm_autograd."""

    def setup_context(ctx, inputs, output):
        call = GruForwardCall(*inputs)
        _save(ctx, (call.input, call.weight_ih, call.weight_hh, call.h0, call.lengths, call.recurrent_mask,
                    call.zoneout), output, 2, reserve_includes_output)
        ctx.call = call._replace(input=None, weight_ih=None, weight_hh=None, bias_ih=None, bias_hh=None, h0=None,
                                 lengths=None, recurrent_mask=None, zoneout=None)

    def backward(ctx, grad_output, grad_h_n, *_reserve_grads):
        input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout, *reserve = ctx.saved_tensors
        call, need = ctx.call, ctx.needs_input_grad
        grads = backward_op(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout,
                            *reserve,
                            call.reverse,
                            call.state_clip, call.gate_clip, *_extra(call), list(need[:6]))
        return tuple(g if need[n] else None for n, g in enumerate(grads)) + (None,) * (len(need) - len(grads))

    register_autograd(forward_op, backward, setup_context=setup_context)


class RnnForwardCall(NamedTuple):
    """The arguments of an Elman RNN forward op, by name."""
    input: Tensor                     # [T, B, I]
    weight_ih: Tensor                 # [H, I]
    weight_hh: Tensor                 # [H, H]
    bias_ih: Optional[Tensor]         # [H]
    bias_hh: Optional[Tensor]         # [H]
    h0: Optional[Tensor]              # [B, H]
    lengths: Optional[Tensor]         # [B] CPU int64
    recurrent_mask: Optional[Tensor]  # [B, H]
    zoneout: Optional[Tensor]         # [T, B, H] keep weights
    relu: bool
    reverse: bool
    state_clip: float
    gate_clip: float
    save_for_backward: bool


def register_rnn_autograd(forward_op, backward_op: Callable) -> None:
    """Autograd for an Elman RNN forward op; as register_gru_autograd, with the backward op
    reading the forward's output and then its reserve (the activations). recurrent_mask and
    zoneout are inputs of the backward op and get no gradient (docs/semantics.md section 10)."""

    def setup_context(ctx, inputs, output):
        call = RnnForwardCall(*inputs)
        _save(ctx, (call.input, call.weight_ih, call.weight_hh, call.h0, call.lengths, call.recurrent_mask,
                    call.zoneout), output, 2, reserve_includes_output=True)
        ctx.call = call._replace(input=None, weight_ih=None, weight_hh=None, bias_ih=None, bias_hh=None, h0=None,
                                 lengths=None, recurrent_mask=None, zoneout=None)

    def backward(ctx, grad_output, grad_h_n, *_reserve_grads):
        input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout, output, activations = ctx.saved_tensors
        call, need = ctx.call, ctx.needs_input_grad
        grads = backward_op(grad_output, grad_h_n, input, weight_ih, weight_hh, h0, lengths, recurrent_mask, zoneout,
                            output, activations, call.relu, call.reverse, call.state_clip, call.gate_clip,
                            list(need[:6]))
        return tuple(g if need[n] else None for n, g in enumerate(grads)) + (None,) * (len(need) - len(grads))

    register_autograd(forward_op, backward, setup_context=setup_context)


def rnn_gradients_like(input, weight_ih, weight_hh, output_mask):
    """Empty tensors shaped as an Elman RNN backward's results (grad_input, grad_weight_ih,
    grad_weight_hh, grad_bias_ih, grad_bias_hh, grad_h0); [0] where output_mask is off."""
    steps, batch, features = input.shape
    hidden = weight_ih.shape[0]
    shapes = [(steps, batch, features), tuple(weight_ih.shape), tuple(weight_hh.shape), (hidden,), (hidden,),
              (batch, hidden)]
    return tuple(input.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask))


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


def needs_grad(*tensors) -> bool:
    """Whether a forward must keep its reserve: grad mode on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
