"""Loads the native extension `rnntl_fast._C` if it was built, and says what it holds.

Importing rnntl_fast never fails because a backend is missing: the flags below say what
is available, and `rnntl_fast.ops.backend.select_backend` turns a missing one into a clear
error at call time.
"""
import importlib

import torch  # noqa: F401  (loads libtorch and libc10, which _C links against)

_C = None
IMPORT_ERROR = None
try:
    _C = importlib.import_module("rnntl_fast._C")
except ImportError as error:  # not built (e.g. a source checkout without build_ext)
    IMPORT_ERROR = error

HAS_CPU_KERNELS = _C is not None
HAS_CUDA_KERNELS = bool(_C is not None and getattr(_C, "with_cuda", False))


def build_info():
    """A dict describing how the extension was built (empty when it was not)."""
    if _C is None:
        return {}
    return {"with_cuda": HAS_CUDA_KERNELS, "compiler": getattr(_C, "compiler", "?"),
            "openmp": getattr(_C, "openmp", 0), "path": getattr(_C, "__file__", "?"),
            "product_kernel": _C.product_kernel() if hasattr(_C, "product_kernel") else "?"}
