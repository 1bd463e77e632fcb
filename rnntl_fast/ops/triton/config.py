"""Launch configuration of the Triton kernels: which strategy runs, block sizes, autotune
lists, and the dtype the recurrent matmuls take their operands in.

Nothing here queries CUDA at import time; the only import-time decision is whether the
Triton interpreter is on (TRITON_INTERPRET=1), which must be set before import anyway.

Strategy (see docs/triton.md):

* ``"sequence"``: one launch runs the whole recurrence; each program owns a tile of
  BLOCK_B batch rows and the full hidden state, and keeps W_hh (and W_hr) in registers
  across steps. Chosen when every recurrent weight tile fits on chip: the padded hidden
  size and output size are both <= SEQUENCE_MAX_WIDTH.
* ``"step"``: one launch per step (two with a projection), each program owning a
  (batch tile, hidden tile) block and streaming W_hh through a K loop. Any size.

``RNNTL_TRITON_STRATEGY`` (``auto`` | ``sequence`` | ``step``) forces one for every call;
the ``strategy=`` keyword of lstm_triton / gru_triton does the same for one call.
"""
import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

STRATEGIES = ("auto", "sequence", "step")
STRATEGY_ENV = "RNNTL_TRITON_STRATEGY"

# Widest padded hidden / output size the sequence kernel keeps on chip when chosen
# automatically: 4 gates x 64 x 64 weights = 16K elements, what a program of 8 warps can
# hold in registers without spilling. Forcing "sequence" is allowed up to the hard limit.
SEQUENCE_MAX_WIDTH = 64
SEQUENCE_HARD_MAX_WIDTH = 128

# tl.dot needs every dimension >= 16 when compiled; the batch tile of both strategies is
# therefore 16 rows (more rows per program would cut the parallelism of small batches).
BLOCK_B = 16
MIN_BLOCK = 16

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted() -> bool:
    return INTERPRETED


def autotune_configs(configs: List[triton.Config],
                     interpreter_config: Optional[triton.Config] = None) -> List[triton.Config]:
    """Every autotune list goes through here: under the interpreter, autotuning several
    configs crashes (and timing there means nothing), so one config is kept there:
    `interpreter_config` if given (small tiles, so that small test shapes still run the
    multi-tile paths), else the first."""
    if INTERPRETED:
        return [interpreter_config if interpreter_config is not None else configs[0]]
    return configs


def padded(size: int) -> int:
    """The power-of-two block width (>= 16, for tl.dot) that covers `size`."""
    return max(MIN_BLOCK, triton.next_power_of_2(int(size)))


def choose_strategy(hidden: int, out_size: int, requested: Optional[str] = None) -> str:
    """"sequence" or "step" for a layer of `hidden` cells and `out_size` outputs.

    `requested` (or, when None, the RNNTL_TRITON_STRATEGY variable) may force one."""
    if requested is None:
        requested = os.environ.get(STRATEGY_ENV, "auto") or "auto"
    if requested not in STRATEGIES:
        raise ValueError(f"Triton strategy must be one of {STRATEGIES} (argument strategy= or "
                         f"{STRATEGY_ENV}), got {requested!r}")
    width = max(padded(hidden), padded(out_size))
    if requested == "sequence" and width > SEQUENCE_HARD_MAX_WIDTH:
        raise ValueError(f"the Triton sequence kernel keeps the whole hidden state on chip and supports "
                         f"hidden and output sizes up to {SEQUENCE_HARD_MAX_WIDTH}, got hidden={hidden}, "
                         f"output={out_size}; use strategy='step'")
    if requested == "auto":
        return "sequence" if width <= SEQUENCE_MAX_WIDTH else "step"
    return requested


def sequence_num_warps(gates: int, hidden: int, out_size: int) -> int:
    """More warps for wider on-chip weights, so that each thread holds fewer of them."""
    on_chip = gates * padded(hidden) * padded(out_size)
    return 4 if on_chip <= 4096 else 8


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of the recurrent matmuls (accumulation is always float32).

    Half types feed the tensor cores as they are stored. The interpreter multiplies
    bfloat16 through numpy, which has no bfloat16, so there the operands are widened."""
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return _DOT_DTYPES[dtype]


def step_configs() -> List[triton.Config]:
    """Tiles of the per-step kernels: BLOCK_N output columns per program, BLOCK_K of the
    reduction per iteration."""
    return autotune_configs([
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8),
    ], interpreter_config=triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4))
