"""Print the versions, the machine and which backends can run here; `rnntl-fast info` or
`python -m rnntl_fast.info` (add --json for a machine-readable report).

A backend is "usable" only when it can run on this machine now: compiled in (or its
package installed) and, for cuda and triton, a GPU visible to torch (triton also runs on
CPU tensors under TRITON_INTERPRET=1). Each line says why not where it cannot.
"""
import argparse
import json
import platform
import sys

from . import __version__


def _parallel_backend() -> str:
    """ATen's intra-op parallel backend (OpenMP, native thread pool or TBB), as torch reports it."""
    import torch
    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def backend_status() -> dict:
    """{backend: {"built": compiled in / package installed, "usable": can run here now,
    "why": one sentence}} for cpu, cuda, triton and reference."""
    import torch

    from . import _ext
    from .ops.backend import triton_available, triton_interpreted
    gpu = torch.cuda.is_available()
    if _ext.HAS_CPU_KERNELS:
        cpu = (True, True, "C++ kernels in rnntl_fast._C; CPU tensors, float32 and float64")
    else:
        cpu = (False, False, f"rnntl_fast._C is not built ({_ext.IMPORT_ERROR}); "
                             "reinstall with `pip install --no-build-isolation .`")
    if not _ext.HAS_CUDA_KERNELS:
        cuda = (False, False, "not built: rnntl_fast._C has no CUDA kernels (build with RNNTL_BUILD_CUDA=1 "
                              "against a CUDA build of torch, docs/cuda.md)")
    elif not gpu:
        cuda = (True, False, "built, but torch sees no GPU here")
    else:
        cuda = (True, True, f"CUDA kernels in rnntl_fast._C, on {torch.cuda.get_device_name()}")
    if not triton_available():
        triton = (False, False, "the triton package is not installed (pip install triton)")
    elif gpu:
        triton = (True, True, f"Triton kernels, on {torch.cuda.get_device_name()}")
    elif triton_interpreted():
        triton = (True, True, "no GPU, but TRITON_INTERPRET=1: Triton's interpreter runs the kernels on CPU "
                              "tensors (slow; for tests)")
    else:
        triton = (True, False, "the triton package is installed, but torch sees no GPU here (TRITON_INTERPRET=1 "
                               "would run the kernels on CPU tensors, slowly)")
    reference = (True, True, "the PyTorch step loop that defines the semantics; any device (slow)")
    return {name: {"built": built, "usable": usable, "why": why}
            for name, (built, usable, why) in (("cpu", cpu), ("cuda", cuda), ("triton", triton),
                                               ("reference", reference))}


def backend_report() -> dict:
    import torch

    from . import _ext
    from .machine import cpu_model
    from .ops.backend import triton_interpreted
    return {
        "rnntl_fast": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "torch_cuda_build": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": backend_status(),
        "triton_interpret": triton_interpreted(),
        "extension": _ext.build_info() or f"not built ({_ext.IMPORT_ERROR})",
        "threads": torch.get_num_threads(),
        "aten_parallel_backend": _parallel_backend(),
    }


def _extension_lines(extension, parallel_backend: str, threads: int) -> list:
    if not isinstance(extension, dict):
        return [f"extension: {extension}"]
    # The kernels parallelise with at::parallel_for on torch's own threads, which is parallel
    # only in code compiled with OpenMP (setup.py passes -fopenmp; docs/cpu.md).
    openmp = extension.get("openmp", 0)
    openmp_text = (f"the extension is built with OpenMP {openmp} (the _OPENMP version date), so its "
                   f"parallel_for calls use those threads" if openmp else
                   "the extension was built without OpenMP ('openmp': 0): every parallel_for of its kernels "
                   "runs on the calling thread")
    return [f"extension: {extension.get('path')} (compiler version {extension.get('compiler')}); own product "
            f"kernel variant on this CPU: {extension.get('product_kernel')} (docs/cpu.md, \"Matrix products\")",
            f"multi-threading: the CPU kernels run on torch's intra-op pool (at::parallel_for; ATen backend "
            f"{parallel_backend}, {threads} thread{'s' if threads != 1 else ''}); {openmp_text}"]


def format_report(info: dict) -> str:
    lines = [f"rnntl_fast {info['rnntl_fast']}  torch {info['torch']}  python {info['python']}  {info['machine']}",
             f"CPU: {info['cpu']}; torch threads: {info['threads']}; "
             f"torch CUDA build: {info['torch_cuda_build'] or 'none (CPU build)'}; GPU: {info['gpu'] or 'none visible'}",
             "backends (usable = can run on this machine now):"]
    for name, status in info["backends"].items():
        lines.append(f"  {name:<9}  {'usable' if status['usable'] else 'not usable':<10}  {status['why']}")
    lines += _extension_lines(info["extension"], info["aten_parallel_backend"], info["threads"])
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    report = backend_report()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnntl_fast.info")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
