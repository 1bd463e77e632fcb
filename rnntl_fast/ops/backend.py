"""Backend choice, in one function.

``auto`` picks ``cpu`` for CPU tensors; for CUDA tensors ``cuda`` when the CUDA kernels
were built, else ``triton`` when triton imports, else ``reference`` (with one warning).
Asking for a backend that is not available raises an error that says what to install
or set; nothing falls back silently. `check_backend_runs` refuses, in the same way, an op or
an option the chosen backend has no kernel for (`BACKEND_RUNS` is the one table of them).
"""
import importlib.util
import os
import warnings

import torch

from .. import _ext

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_warned = set()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# float16 / bfloat16 CPU tensors run the float32 kernels (rnntl_fast/ops/native.py).
CPU_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def select_backend(requested: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that will run an op on tensors of `device` and `dtype` when `requested` was asked."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return requested
    if requested == "auto":
        if device.type == "cpu" and _ext.HAS_CPU_KERNELS:
            return select_backend("cpu", device, dtype)
        if device.type == "cuda" and _ext.HAS_CUDA_KERNELS:
            return "cuda"
        if device.type == "cuda" and triton_available() and dtype in TRITON_DTYPES:
            return "triton"
        _warn_once(f"rnntl_fast: no compiled backend for {dtype} {device.type} tensors "
                   f"({'rnntl_fast._C is not built: ' + str(_ext.IMPORT_ERROR) if _ext._C is None else 'build with RNNTL_BUILD_CUDA=1 or pip install triton'}); "
                   "running the (slow) reference step loop")
        return "reference"
    if requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not _ext.HAS_CPU_KERNELS:
            raise RuntimeError(f"backend='cpu' needs the compiled extension rnntl_fast._C, which failed to import "
                               f"({_ext.IMPORT_ERROR}); reinstall with `pip install --no-build-isolation .`")
        if dtype not in CPU_KERNEL_DTYPES:
            raise TypeError(f"the cpu backend supports float32, float64, float16 and bfloat16, got {dtype}")
        return requested
    if requested == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not _ext.HAS_CUDA_KERNELS:
            raise RuntimeError("backend='cuda' needs rnntl_fast built with its CUDA kernels: reinstall with "
                               "RNNTL_BUILD_CUDA=1 against a CUDA build of torch (see docs/ENVIRONMENT.md)")
        return requested
    # triton
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                         f"before rnntl_fast is imported), got tensors on {device}")
    return requested


# What each backend runs beyond an op's plain cell: op -> the optional arguments it runs.
# An op missing from a backend's entry has no kernel there. The reference loop runs everything.
BACKEND_RUNS = {
    "reference": {"lstm": frozenset({"recurrent_mask", "zoneout_h", "zoneout_c", "layer_norm"}),
                  "gru": frozenset({"recurrent_mask", "zoneout", "layer_norm"}),
                  "rnn": frozenset({"recurrent_mask", "zoneout"})},
    "cpu": {"lstm": frozenset({"recurrent_mask", "zoneout_h", "zoneout_c", "layer_norm"}),
            "gru": frozenset({"recurrent_mask", "zoneout", "layer_norm"}),
            "rnn": frozenset({"recurrent_mask", "zoneout"})},
    "cuda": {"lstm": frozenset({"recurrent_mask", "zoneout_h", "zoneout_c", "layer_norm"}),
             "gru": frozenset({"recurrent_mask", "zoneout", "layer_norm"}),
             "rnn": frozenset({"recurrent_mask", "zoneout"})},
    "triton": {"lstm": frozenset({"recurrent_mask", "zoneout_h", "zoneout_c", "layer_norm"}),
               "gru": frozenset({"recurrent_mask", "zoneout", "layer_norm"}),
               "rnn": frozenset({"recurrent_mask", "zoneout"})},
}


def check_backend_runs(op: str, backend: str, requested: str, **given) -> None:
    """Raises NotImplementedError unless `backend` (resolved from `requested`) has a kernel for
    `op` that runs every argument of `given` that is not None (name -> value)."""
    runs = BACKEND_RUNS[backend].get(op)
    chosen = f"backend '{backend}'" + (f" (chosen by backend='{requested}')" if requested != backend else "")
    if runs is None:
        cell = {"lstm": "LSTM", "gru": "GRU", "rnn": "Elman RNN"}[op]
        raise NotImplementedError(f"rnntl_fast.ops.{op}: {chosen} has no {cell} kernel yet; pass backend='reference'")
    for name, value in given.items():
        if value is not None and name not in runs:
            raise NotImplementedError(f"rnntl_fast.ops.{op}: {chosen} does not run {name} yet; "
                                      "pass backend='reference'")
