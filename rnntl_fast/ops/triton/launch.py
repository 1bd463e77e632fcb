"""Host-side helpers shared by the launchers of both strategies (sequence.py, step.py) and
the registered ops (ops.py)."""
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import Tensor


class LstmReserve(NamedTuple):
    """What the LSTM forward keeps for the backward, all float32 (empty where not kept):"""
    gates: Tensor            # [T, B, 4H] i, f, g, o after their nonlinearities
    cells: Tensor            # [T, B, H] c_t as the recurrence carries it (clipped, zoned; kept past a row's length)
    hidden_states: Tensor    # [T, B, P] h_t as the recurrence carries it (zoned)
    cell_pre_clip: Tensor    # [T, B, H] f*c_{t-1} + i*g before cell_clip (only with cell_clip)
    hidden_pre_clip: Tensor  # [T, B, P] h_t before proj_clip (only with proj_clip)
    fresh_cells: Tensor      # [T, B, H] c~_t after cell_clip, before zoneout: what h~_t reads (only with zoneout_c)
    # only with layer normalisation (sequence strategy):
    normalized_products: Tensor  # [T, B, 4H] LN(W_hh (mask * h_{t-1})) before its gain
    product_rstd: Tensor         # [T, B] 1 / sqrt(var + eps) of that row
    normalized_cells: Tensor     # [T, B, H] LN(c~_t) before its gain and bias
    cell_rstd: Tensor            # [T, B]


class GruReserve(NamedTuple):
    """What the GRU forward keeps for the backward, float32 (empty where not kept):"""
    gates: Tensor          # [T, B, 4H] r, z, n and W_hn h_{t-1} + b_hn (what the reset gate multiplies)
    hidden_states: Tensor  # [T, B, H] h_t as the recurrence carries it (zoned; kept past a row's length)
    normalized_products: Tensor  # [T, B, 3H] LN(W_hh (mask * h_{t-1})) before its gain (only with layer norm)
    product_rstd: Tensor         # [T, B] (only with layer norm)


class LayerNormGains(NamedTuple):
    """The recurrence's terms of layer normalisation (docs/semantics.md section 10), contiguous,
    in the input dtype; LN(W_ih x_t) * g_ih is formed before the recurrence."""
    hh: Tensor           # [G] gain of LN(W_hh h_{t-1}) (G = 4H LSTM, 3H GRU)
    cell_weight: Tensor  # [H] gain of LN(c~_t) (LSTM; ones where the layer has none)
    cell_bias: Tensor    # [H] bias of LN(c~_t) (LSTM; zeros where the layer has none)


class LstmRecurrenceGradients(NamedTuple):
    """What the LSTM backward recurrence gives the weight gradients, float32 (None where absent):"""
    gates: Tensor                # [T, B, 4H] dL/da_t (gate pre-activations)
    proj: Optional[Tensor]       # [T, B, P] dL/d(W_hr m_t) (with a projection)
    h0: Tensor                   # [B, P]
    c0: Tensor                   # [B, H]
    products: Optional[Tensor]   # [T, B, 4H] dL/d(W_hh (mask * h_{t-1})) before LN (with layer norm)
    cell_norm: Optional[Tensor]  # [T, B, H] dL/d(LN(c~_t) * g_c + b_c) (with layer norm)


class GruRecurrenceGradients(NamedTuple):
    """What the GRU backward recurrence gives the weight gradients, float32 (None where absent):"""
    input_gates: Tensor         # [T, B, 3H] dL/da_r, dL/da_z, dL/da_n
    hidden_gates: Tensor        # [T, B, 3H] dL/da_r, dL/da_z, r * dL/da_n: of W_hh h_{t-1} + b_hh as a whole
    h0: Tensor                  # [B, H]
    products: Optional[Tensor]  # [T, B, 3H] dL/d(W_hh (mask * h_{t-1})) before LN (with layer norm)


class RnnReserve(NamedTuple):
    """What the Elman RNN forward keeps for the backward, float32 (empty where not kept):"""
    hidden_states: Tensor  # [T, B, H] h_t as the recurrence carries it (kept past a row's length)
    activations: Tensor    # [T, B, H] f(a_t), only with zoneout (without it f(a_t) is h_t where the row is valid)


def clip_switches(**limits: float) -> Dict[str, bool]:
    """The kernels' constexpr switches for clip limits, where 0 means off (docs/semantics.md):
    clip_switches(cell_clip=0.5, proj_clip=0.0) == {"CELL_CLIP": True, "PROJ_CLIP": False}.
    The kernels also take each limit itself, as a float."""
    return {name.upper(): limit > 0 for name, limit in limits.items()}


def empty_reserve(device) -> Tensor:
    """Placeholder for a reserve tensor that is not kept (float32, like the kept ones)."""
    return torch.empty(0, device=device, dtype=torch.float32)


def reserve(needed: bool, *shape: int, device) -> Tensor:
    """An uninitialised float32 reserve tensor of `shape`, or the empty placeholder."""
    return torch.empty(shape, device=device, dtype=torch.float32) if needed else empty_reserve(device)


def or_placeholder(tensor: Optional[Tensor], placeholder: Tensor) -> Tensor:
    """`tensor`, or `placeholder` for a pointer argument the kernel never reads (its
    constexpr switch is off): Triton needs a tensor in every pointer slot."""
    return tensor if tensor is not None else placeholder


def float32_state(state: Optional[Tensor], batch: int, width: int, device) -> Tensor:
    """An initial state [B, width] as a contiguous float32 tensor (zeros for None)."""
    if state is None:
        return torch.zeros(batch, width, device=device, dtype=torch.float32)
    return state.float().contiguous()


def without_padded_steps(tensor: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """`tensor` [T, B, N] with the steps past each row's length (`lengths` [B], any device)
    replaced by zeros, so that what they hold (NaN, inf) enters no product; `tensor`
    itself without lengths."""
    if lengths is None:
        return tensor
    steps = torch.arange(tensor.shape[0], device=tensor.device).unsqueeze(1)  # [T, 1]
    valid = (steps < lengths.to(tensor.device).unsqueeze(0)).unsqueeze(2)  # [T, B, 1]
    return torch.where(valid, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def times_recurrent_mask(tensor: Tensor, recurrent_mask: Optional[Tensor]) -> Tensor:
    """`tensor` [..., B, N] float32 times `recurrent_mask` [B, N] (any float dtype), or `tensor`
    itself without a mask: h_{t-1} as W_hh h_{t-1} sees it, and the product's gradient as it
    reaches h_{t-1} (docs/semantics.md section 10)."""
    return tensor if recurrent_mask is None else tensor * recurrent_mask.float()


def processing_order(steps: int, reverse: bool) -> List[int]:
    """The steps in the order the recurrence visits them."""
    return list(range(steps - 1, -1, -1)) if reverse else list(range(steps))


def previous_states(states: Tensor, start: Tensor, reverse: bool) -> Tensor:
    """[T, B, N] state before each step, in step order: `states` [T, B, N] shifted by one
    in the processing direction, `start` [B, N] where the processing begins."""
    if reverse:
        return torch.cat([states[1:], start.unsqueeze(0)])
    return torch.cat([start.unsqueeze(0), states[:-1]])
