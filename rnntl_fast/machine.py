"""What a run ran on: CPU model and torch's thread count, in the words every command prints."""
import os
import platform
from typing import Optional


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(requested: Optional[int]) -> None:
    """torch.set_num_threads(requested) when given; otherwise torch's own default is kept."""
    if requested:
        import torch
        torch.set_num_threads(requested)


def thread_report(requested: Optional[int] = None) -> str:
    """One line: the intra-op thread count torch uses now, where it came from, and the CPU."""
    import torch
    threads = torch.get_num_threads()
    source = "--threads" if requested else "torch's default"
    return (f"threads: {threads} torch intra-op thread{'s' if threads != 1 else ''} ({source}); "
            f"CPU: {cpu_model()}, {os.cpu_count()} logical cores")
