"""Launch configuration of the Triton kernels: which strategy runs, block sizes, autotune
lists, and the dtype the recurrent matmuls take their operands in.

Nothing here queries CUDA at import time; the only import-time decision is whether the
Triton interpreter is on (TRITON_INTERPRET=1), which must be set before import anyway.

Strategy (see docs/triton.md):

* ``"sequence"``: one launch runs the whole recurrence; each program owns a tile of
  BLOCK_B batch rows and the full hidden state, and keeps W_hh (and W_hr) in registers
  across steps. Chosen when every recurrent weight tile fits on chip without spilling:
  the padded hidden and output sizes are both <= SEQUENCE_MAX_WIDTH[dtype].
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

# Widest padded hidden / output size the sequence kernel is chosen for automatically,
# by dtype: up to these widths every sequence kernel compiles for sm_90 with 8 warps and
# no register spills (python -m rnntl_fast.ops.triton.resources; table in docs/triton.md).
# float32 weights take twice the registers of half ones. Forcing "sequence" is allowed up
# to the hard limit, past which the backward kernel needs more shared memory than an
# H100 has (>228 KB at 128).
SEQUENCE_MAX_WIDTH = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
SEQUENCE_HARD_MAX_WIDTH = 64
SEQUENCE_NUM_WARPS = 8

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


def choose_strategy(hidden: int, out_size: int, dtype: torch.dtype, requested: Optional[str] = None) -> str:
    """"sequence" or "step" for a layer of `hidden` cells and `out_size` outputs in `dtype`.

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
        return "sequence" if width <= SEQUENCE_MAX_WIDTH.get(dtype, 0) else "step"
    return requested


def sequence_num_warps() -> int:
    """8 warps spread the on-chip weights thin enough not to spill at every automatic
    width; 4 spill at some (docs/triton.md)."""
    return SEQUENCE_NUM_WARPS


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of the recurrent matmuls (accumulation is always float32).

    Half types feed the tensor cores as they are stored. The interpreter multiplies
    bfloat16 through numpy, which has no bfloat16, so there the operands are widened."""
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return _DOT_DTYPES[dtype]


def compiled_step_configs() -> List[triton.Config]:
    """Tiles of the per-step kernels when compiled: BLOCK_N output columns per program,
    BLOCK_K of the reduction per iteration."""
    return [
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8),
    ]


def step_configs() -> List[triton.Config]:
    """The autotune list of the per-step kernels: compiled_step_configs(), or under the
    interpreter one 16x16 tile."""
    return autotune_configs(compiled_step_configs(),
                            interpreter_config=triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4))


# Autotune tiles (BLOCK_N, BLOCK_K) at which ptxas spills registers in a step kernel, by
# kernel and weight dtype (sm_80 and sm_90, triton 3.9: python -m
# rnntl_fast.ops.triton.resources --table, table in docs/triton.md); the autotuner is not
# offered them. The float32 forward kernels hold 3-4 float32 gate accumulators and a W_hh
# tile per gate, too many registers above 32x32.
_HALF_TYPES = (torch.float16, torch.bfloat16)
STEP_TILES_THAT_SPILL = {
    "lstm_forward_step": {torch.float32: {(64, 32), (32, 64), (64, 64)}, **{t: {(32, 64)} for t in _HALF_TYPES}},
    "gru_forward_step": {torch.float32: {(64, 32), (32, 64), (64, 64)}},
    "lstm_backward_hidden_step": {t: {(32, 32)} for t in _HALF_TYPES},
}


def spill_free_step_configs(kernel: str, configs: List[triton.Config], dtype: torch.dtype) -> List[triton.Config]:
    """The tiles of `configs` that step kernel `kernel` (its name without "_kernel") may take
    with weights in `dtype`."""
    spilling = STEP_TILES_THAT_SPILL.get(kernel, {}).get(dtype, set())
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) not in spilling]


def spill_free_pruning(kernel: str) -> dict:
    """triton.autotune's prune_configs_by for step kernel `kernel`: keeps the tiles
    spill_free_step_configs allows for the dtype of its weight_hh argument."""
    def prune(configs, named_args, **_kwargs):
        return spill_free_step_configs(kernel, configs, named_args["weight_hh_ptr"].dtype)
    return {"early_config_prune": prune}
