"""Runs the cases: warm-up, interleaved timing, same-run GEMM throughput, peak memory; one
result row per (case, provider) with the fields the module docstring of rnntl_fast.bench.cli lists."""
import sys
from typing import List

import torch

from . import timing
from .grids import Case
from .workloads import CELLS, HOOKS, TORCH, WITHOUT, Workload, build_steps, gates_of, provider_description

# Step failures that mean "this provider cannot run this case" (unsupported dtype, missing
# backend); they are reported as skipped rows with the error, never hidden.
UNSUPPORTED = (RuntimeError, TypeError, ValueError, NotImplementedError)
GEMM = "gemm"  # not a provider: the same-round matmul that "% of GEMM" divides by


def _progress(cases: List[Case], enabled: bool):
    """The cases, with progress on stderr: a bar on a terminal, else (a log file) one line
    per case, so that a captured log holds no bar redraws."""
    if not enabled or len(cases) < 4:
        yield from cases
        return
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is an optional extra ("bench")
            pass
        else:
            yield from tqdm(cases, desc="bench", unit="case", file=sys.stderr, leave=False)
            return
    for index, case in enumerate(cases):
        print(f"bench: case {index + 1}/{len(cases)}: {case.label} {case.mode}", file=sys.stderr, flush=True)
        yield case


def _base_row(case: Case, provider: str) -> dict:
    row = case.to_dict()
    row.update(label=case.label, provider=provider, description=provider_description(provider, case.device),
               status="ok", note="", time_ms=None, samples_ms=[], calls_per_sample=None, speedup_vs_torch=None,
               speedup_vs_hooks=None, speedup_vs_cells=None, cost_vs_without=None, flops=None, gflops=None, gemm_gflops=None, gemm_fraction=None,
               peak_memory_mb=None, page_faults_per_step=None)
    return row


def _skipped(case: Case, provider: str, note: str) -> dict:
    row = _base_row(case, provider)
    row.update(status="skipped", note=note)
    return row


def run_case(case: Case, providers: List[str], settings: dict, measure_memory: bool,
             verbose: bool = False) -> List[dict]:
    device = torch.device(case.device)
    workload = Workload(case, seed=settings["seed"])
    steps = build_steps(workload, providers)
    rows = {}
    runnable, estimates = {}, {}
    for name, step in steps.items():
        if isinstance(step, str):
            rows[name] = _skipped(case, name, step.removeprefix("skipped: "))
            continue
        try:
            estimates[name] = timing.warm_up(step, device, settings["warmup_ms"] / 1000)
            runnable[name] = step
        except UNSUPPORTED as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            rows[name] = _skipped(case, name, f"{type(error).__name__}: {message}")
    # The GEMM reference point runs in the same rounds, so that it sees the same load.
    recurrent = case.proj_size or case.H
    gemm, gemm_flops = timing.gemm_step(case.T * case.B, case.I + recurrent, gates_of(case.cell) * case.H,
                                        workload.dtype, device)
    timed = dict(runnable)
    try:
        estimates[GEMM] = timing.warm_up(gemm, device, settings["warmup_ms"] / 1000)
        timed[GEMM] = gemm
    except UNSUPPORTED:  # e.g. a dtype without a matmul kernel on this device
        pass
    faults = {}
    samples = timing.interleaved(timed, estimates, device, settings["repeats"], settings["sample_ms"] / 1000,
                                 provider_budget=30.0, faults=faults)
    gemm_gflops = gemm_flops / timing.median(samples[GEMM]) / 1e9 if GEMM in samples else None
    flops = workload.flops()
    for name, step in runnable.items():
        row = _base_row(case, name)
        seconds = timing.median(samples[name])
        row.update(time_ms=seconds * 1e3, samples_ms=[s * 1e3 for s in samples[name]],
                   calls_per_sample=max(1, int(settings["sample_ms"] / 1000 / max(estimates[name], 1e-9))),
                   flops=flops, gflops=flops / seconds / 1e9, gemm_gflops=gemm_gflops)
        row["gemm_fraction"] = row["gflops"] / gemm_gflops if gemm_gflops else None
        if name in faults:
            row["page_faults_per_step"] = timing.median(faults[name])
        if TORCH in samples:
            row["speedup_vs_torch"] = timing.paired_ratio(samples[TORCH], samples[name])
        if HOOKS in samples:
            row["speedup_vs_hooks"] = timing.paired_ratio(samples[HOOKS], samples[name])
        if CELLS in samples:
            row["speedup_vs_cells"] = timing.paired_ratio(samples[CELLS], samples[name])
        if WITHOUT in samples:
            row["cost_vs_without"] = timing.paired_ratio(samples[name], samples[WITHOUT])
        if measure_memory and case.mode != "inference":
            peak = timing.peak_memory_bytes(step, device, verbose=verbose)
            row["peak_memory_mb"] = peak / 2**20 if peak is not None else None
        rows[name] = row
    return [rows[name] for name in steps]  # provider order as asked


def run_cases(cases: List[Case], providers: List[str], settings: dict, measure_memory: bool = True,
              progress: bool = True, verbose: bool = False) -> List[dict]:
    """verbose: let torch's profiler and allocator messages through (see timing.peak_memory_bytes)."""
    rows = []
    for case in _progress(cases, progress):
        rows += run_case(case, providers, settings, measure_memory, verbose)
    return rows
