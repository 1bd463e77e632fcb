"""rnntl_fast: fused LSTM/GRU kernels with gradient clipping in the backward, drop-in
torch.nn.LSTM / GRU / RNN modules, and transfer-learning tools.

Every public name and subpackage (`LSTM`, `GRU`, `RNN`, `convert`, `ops`, `pretrained`,
`transfer`, `bench`) is loaded on first access, so `import rnntl_fast` itself imports
neither torch nor the extension and the command line's `--help` stays fast. The native
ops (`torch.ops.rnntl_fast.*`, with their fake and autograd registrations) are registered
when `rnntl_fast.ops` is first imported: by touching any of those names, or by
`import rnntl_fast.ops`.
"""
import importlib

__version__ = "0.1.0"

# public name -> module defining it
_ATTRIBUTES = {"LSTM": "rnntl_fast.nn", "GRU": "rnntl_fast.nn", "RNN": "rnntl_fast.nn", "convert": "rnntl_fast.nn"}
_SUBMODULES = ("ops", "nn", "pretrained", "transfer", "bench", "info", "cli", "_ext")

__all__ = ["LSTM", "GRU", "RNN", "convert", "ops", "pretrained", "transfer", "bench"]


def __getattr__(name: str):
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_ATTRIBUTES) | set(_SUBMODULES))
