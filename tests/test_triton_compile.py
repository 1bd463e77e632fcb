"""The Triton kernels compiled for a GPU (sm_90) with the ptxas triton bundles; no GPU needed.

The interpreter (tests/test_triton.py) accepts programs the compiler rejects or makes slow:
tile shapes, shared memory beyond what a block may have, register spills. This test
compiles every kernel at every configuration the automatic dispatcher can pick (sequence
kernels at each automatic width, step kernels at each autotune tile offered for the dtype),
float32 and bfloat16, with every boolean switch on, and fails on any spill or shared memory
over the architecture's limit. The compile runs in a subprocess without TRITON_INTERPRET
(tests/conftest.py sets it for this session, and interpreted kernels cannot be compiled);
compiled kernels and ptxas reports stay in triton's cache, so later runs take seconds.

The full table (every tile, float16 too, sm_80 and sm_90) is
`python -m rnntl_fast.ops.triton.resources --table` (docs/triton.md).
"""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the triton backend is optional")

from rnntl_fast.ops.triton import config, resources  # noqa: E402

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ["float32", "bfloat16"]


def _bundled_ptxas_or_skip(arch: int):
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except Exception as error:  # no NVIDIA backend in this triton build
        pytest.skip(f"triton has no bundled ptxas for sm_{arch}: {error}")


def test_check_plan_covers_every_kernel_and_automatic_configuration():
    plan = resources.check_plan(DTYPES)
    names = {c.name for _, c in plan}
    assert names == {"lstm_forward_sequence", "lstm_backward_sequence", "gru_forward_sequence",
                     "gru_backward_sequence", "lstm_forward_step", "lstm_projection_step",
                     "lstm_backward_hidden_step", "lstm_backward_cell_step", "gru_forward_step",
                     "gru_backward_step", "rnn_forward_sequence", "rnn_backward_sequence", "rnn_forward_step",
                     "rnn_backward_step"}
    widths = {("float32", 16), ("float32", 32), ("bfloat16", 16), ("bfloat16", 32), ("bfloat16", 64)}
    for name in ("lstm_forward_sequence", "lstm_backward_sequence", "gru_forward_sequence", "gru_backward_sequence"):
        sequence_tiles = {(d, c.tile) for d, c in plan if c.name == name}
        assert sequence_tiles == ({(d, f"H=P={w}") for d, w in widths}
                                  | {(d, f"H=P={w} layer_norm") for d, w in widths}), name
    # every switch on, the heaviest form (layer_norm off in the LSTM/GRU sequence kernels'
    # plain variant); every kernel in its zoneout variant
    for _, c in plan:
        assert any(name.startswith("HAS_ZONEOUT") for name in c.constexprs), c.name
        switches = {k: v for k, v in c.constexprs.items() if isinstance(v, bool)}
        off = {"FIRST", "REVERSE"} | ({"LAYER_NORM"} if not c.tile.endswith("layer_norm") else set())
        assert all(v for k, v in switches.items() if k not in off), (c.name, c.tile, switches)
        assert switches.get("LAYER_NORM", False) == c.tile.endswith("layer_norm"), (c.name, c.tile)


@pytest.mark.parametrize("kernel,dtype,offered", [
    ("lstm_forward_step", torch.float32, [(32, 32)]),
    ("lstm_forward_step", torch.bfloat16, [(32, 32), (64, 32), (64, 64)]),
    ("gru_forward_step", torch.float32, [(32, 32)]),
    ("lstm_backward_hidden_step", torch.float16, [(64, 32), (32, 64), (64, 64)]),
    ("lstm_backward_hidden_step", torch.float32, [(32, 32), (64, 32), (32, 64), (64, 64)]),
    ("gru_backward_step", torch.bfloat16, [(32, 32), (64, 32), (32, 64), (64, 64)]),
], ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, list) else f"{len(v)}tiles")
def test_autotuner_is_offered_only_tiles_that_do_not_spill(kernel, dtype, offered):
    """The autotune pruning of the step kernels drops the tiles STEP_TILES_THAT_SPILL lists
    for the weights' dtype (the compile check below holds the remaining ones to no spills)."""
    prune = config.spill_free_pruning(kernel)["early_config_prune"]
    kept = prune(config.compiled_step_configs(), {"weight_hh_ptr": torch.empty(0, dtype=dtype)})
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept] == offered


def test_kernels_compile_for_sm90_without_spills_and_within_shared_memory():
    ptxas = _bundled_ptxas_or_skip(90)
    assert os.access(ptxas, os.X_OK), ptxas
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY, environment.get("PYTHONPATH")]))
    environment.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default; set to silence its warning
    result = subprocess.run([sys.executable, "-m", "rnntl_fast.ops.triton.resources", "--check", "--arch", "90",
                             "--dtypes", ",".join(DTYPES)], capture_output=True, text=True, env=environment,
                            cwd=REPOSITORY, timeout=1800)
    summary = re.search(r"checked (\d+) compilations for sm_90: (\d+) failing", result.stdout)
    assert summary, f"no summary line (exit {result.returncode}):\n{result.stdout}\n{result.stderr[-3000:]}"
    failing = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert result.returncode == 0 and not failing, "\n".join(failing) or result.stderr[-3000:]
    assert int(summary.group(1)) == len(resources.check_plan(DTYPES))
