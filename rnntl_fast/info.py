"""`python -m rnntl_fast.info`: versions and which backends this installation has."""
import platform
import sys

import torch


def backend_report() -> dict:
    from . import __version__, _ext
    from .ops.backend import triton_available, triton_interpreted
    info = {
        "rnntl_fast": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "torch_cuda_build": torch.version.cuda,
        "backends": {
            "cpu": _ext.HAS_CPU_KERNELS,
            "cuda": _ext.HAS_CUDA_KERNELS,
            "triton": triton_available(),
            "reference": True,
        },
        "triton_interpret": triton_interpreted(),
        "extension": _ext.build_info() or f"not built ({_ext.IMPORT_ERROR})",
        "threads": torch.get_num_threads(),
    }
    return info


def format_report(info: dict) -> str:
    lines = [f"rnntl_fast {info['rnntl_fast']}  torch {info['torch']}  python {info['python']}  {info['machine']}"]
    lines.append(f"torch CUDA build: {info['torch_cuda_build'] or 'none (CPU build)'}; threads: {info['threads']}")
    for name, available in info["backends"].items():
        lines.append(f"  backend {name:<9} {'available' if available else 'not built / not installed'}")
    lines.append(f"extension: {info['extension']}")
    return "\n".join(lines)


def main() -> int:
    print(format_report(backend_report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
