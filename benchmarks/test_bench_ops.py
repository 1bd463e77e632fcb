"""Issue 2's op grid as pytest-benchmark tests: `pytest benchmarks/` (not part of the CI run,
which collects tests/ only). Each (cell, mode, size) is a pytest-benchmark group holding
torch.nn and rnntl_fast's cpu backend, so `--benchmark-group-by=group` compares them.

The same-run ratios (docs/benchmarks.md, "Protocol") come from `rnntl-fast bench --grid ops`
(interleaved rounds); pytest-benchmark times one provider after the other, so on a shared
machine its ratios are less trustworthy. Use it for history (--benchmark-autosave,
--benchmark-compare).
"""
import pytest
import torch

from rnntl_fast import _ext
from rnntl_fast.bench.grids import OPS_SIZES, Case
from rnntl_fast.bench.workloads import Workload, provider_description

PROVIDERS = ["torch"] + (["cpu"] if _ext.HAS_CPU_KERNELS else [])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", OPS_SIZES, ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_ops_grid(benchmark, cell, mode, size, provider):
    T, B, I, H = size  # noqa: E741
    case = Case(cell, mode, T, B, I, H, group="ops")
    workload = Workload(case, seed=0)
    module = workload.torch_module if provider == "torch" else workload.rnntl_module(provider)
    step = workload.module_step(module)
    benchmark.group = f"{cell} {mode} T={T} B={B} I={I} H={H}"
    benchmark.extra_info.update(provider=provider_description(provider, "cpu"), flops=workload.flops(),
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, warmup_rounds=2, rounds=7, iterations=1)
