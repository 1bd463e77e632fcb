"""The non-tensor options of one layer-direction, as every backend receives them.

The public functions (`rnntl_fast.ops.lstm` / `gru`) and modules take `grad_clip` and
`grad_clip_mode`; `sequence_options` turns them into the two backward limits once, after
checking every value, and backends never see the mode string (docs/semantics.md)."""
from typing import NamedTuple, Optional

from .checks import check_clip, check_grad_clip_mode


class SequenceOptions(NamedTuple):
    """Limits are floats >= 0 where 0 means off."""
    reverse: bool = False
    cell_clip: float = 0.0    # clamp of c_t (LSTM)
    proj_clip: float = 0.0    # clamp of h_t after the projection (LSTM)
    state_clip: float = 0.0   # clamp of dL/dh_t and dL/dc_t in the backward
    gate_clip: float = 0.0    # clamp of dL/d(gate pre-activations) in the backward


def sequence_options(reverse: bool = False, cell_clip: Optional[float] = None, proj_clip: Optional[float] = None,
                     grad_clip: Optional[float] = None, grad_clip_mode: str = "state") -> SequenceOptions:
    """Checks the public options (None = off) and returns them as backends take them."""
    cell_clip = check_clip(cell_clip, "cell_clip")
    proj_clip = check_clip(proj_clip, "proj_clip")
    grad_clip = check_clip(grad_clip, "grad_clip")
    check_grad_clip_mode(grad_clip_mode)
    limit = grad_clip or 0.0
    return SequenceOptions(reverse=bool(reverse), cell_clip=cell_clip or 0.0, proj_clip=proj_clip or 0.0,
                           state_clip=limit if grad_clip_mode == "state" else 0.0,
                           gate_clip=limit if grad_clip_mode == "gates" else 0.0)
