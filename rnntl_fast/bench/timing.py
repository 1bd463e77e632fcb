"""Interleaved timing, GEMM throughput and peak memory, all in the calling process.

The machines this runs on are shared and noisy, so providers are timed in rounds: each
round times every provider once, in an order rotated from round to round, and a ratio is
taken between samples of the same round. Medians then discard the rounds a neighbour
disturbed.
"""
import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(step: Callable[[], None], calls: int, device: torch.device) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def minor_page_faults() -> Optional[int]:
    """Minor page faults of this process so far, all threads (None where the OS does not say).
    A fault is the kernel mapping a fresh page on first touch, ~1 us each on the machines of
    docs/benchmarks.md: where a step allocates memory that glibc has just given back to the
    OS, its time includes thousands of them."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(step: Callable[[], None], device: torch.device, seconds: float) -> float:
    """Runs `step` at least twice and for about `seconds`; returns the last call's time."""
    start = time.perf_counter()
    calls = 0
    last = math.inf
    while calls < 2 or time.perf_counter() - start < seconds:
        last = _time_calls(step, 1, device)
        calls += 1
    return last


def interleaved(steps: Dict[str, Callable[[], None]], estimates: Dict[str, float], device: torch.device,
                repeats: int, sample_seconds: float, provider_budget: float,
                faults: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Per provider, `repeats` samples of seconds per call, taken round-robin; `faults`, when
    given, receives per provider the minor page faults per call of each sample.

    A sample repeats the step until it lasts about `sample_seconds` (short steps are
    below the timer's resolution and the noise otherwise). A provider whose samples would
    take more than `provider_budget` seconds in all gets fewer rounds (at least 3): the
    first rounds, so that its samples still pair with the other providers' of the same round.
    """
    names = list(steps)
    calls = {name: max(1, int(sample_seconds / max(estimates[name], 1e-9))) for name in names}
    rounds = {name: max(3, min(repeats, int(provider_budget / max(estimates[name] * calls[name], 1e-9))))
              for name in names}
    samples: Dict[str, List[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one sample would be charged to whichever provider ran
    try:
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if round_index < rounds[name]:
                    faults_before = minor_page_faults()
                    samples[name].append(_time_calls(steps[name], calls[name], device))
                    if faults is not None and faults_before is not None:
                        faults.setdefault(name, []).append((minor_page_faults() - faults_before) / calls[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def median(values: List[float]) -> float:
    return statistics.median(values) if values else math.nan


def paired_ratio(baseline: List[float], other: List[float]) -> float:
    """Median over rounds of baseline_time / other_time (speedup of `other`; > 1 is faster)."""
    pairs = [b / o for b, o in zip(baseline, other) if o > 0]
    return median(pairs)


def gemm_step(rows: int, inner: int, cols: int, dtype: torch.dtype, device: torch.device):
    """A torch.mm([rows, inner] @ [inner, cols]) step and its FLOPs. The bench times it in the
    same rounds as the providers, with the layer-0 shapes [T*B, I+P] @ [I+P, G*H] (the FLOPs of
    one forward layer-direction), as "the GEMM throughput this machine gives right now"."""
    a = torch.randn(rows, inner, device=device).to(dtype)
    b = torch.randn(inner, cols, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), 2.0 * rows * inner * cols


@contextlib.contextmanager
def native_stderr_hidden(hidden: bool = True):
    """Runs the block with file descriptor 2 (where C++ libraries such as torch's profiler and
    allocator write) and Python warnings sent to a temporary file; `hidden=False` lets them
    through. What was hidden is dropped: it is library chatter, not a result."""
    if not hidden:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def peak_memory_bytes(step: Callable[[], None], device: torch.device, verbose: bool = False) -> Optional[int]:
    """Peak bytes allocated by torch during one call of `step`, above what was allocated
    when it started (inputs and weights that already exist are not counted).

    CUDA: torch.cuda.max_memory_allocated (the caching allocator's peak of live tensors).
    CPU: the running sum of torch.profiler's allocation/free events of the CPU allocator,
    in time order (every tensor torch allocates, including those oneDNN gets from torch;
    memory a library takes straight from malloc is not seen). None when unavailable.
    The profiler's own messages (start/stop trace lines, allocator warnings) are shown
    only when `verbose`.
    """
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    if device.type != "cpu":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    try:
        with native_stderr_hidden(not verbose):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
                step()
            events = profiler.profiler.kineto_results.events()
    except Exception:  # the profiler is an optional diagnostic here, not what is measured
        return None
    cpu_types = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() in cpu_types),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in memory:
        running += event.nbytes()
        peak = max(peak, running)
    return int(peak)
