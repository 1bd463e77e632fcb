"""rnntl_fast: fused LSTM/GRU kernels with gradient clipping in the backward, drop-in
torch.nn.LSTM / torch.nn.GRU modules, and transfer-learning tools."""
__version__ = "0.1.0"

from . import _ext, ops  # noqa: F401  (ops registers the native ops' fakes and autograd)
from .nn import GRU, LSTM, convert  # noqa: E402

__all__ = ["LSTM", "GRU", "convert", "ops"]
