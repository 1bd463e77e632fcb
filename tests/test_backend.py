"""Backend choice (rnntl_fast.ops.backend.select_backend) and the info report."""
import re
import subprocess
import sys
import warnings

import pytest
import torch

import rnntl_fast
from rnntl_fast.ops import backend


def test_auto_on_cpu_is_the_cpu_kernels():
    assert backend.select_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert backend.select_backend("auto", torch.device("cpu"), torch.float64) == "cpu"


def test_cpu_kernels_take_half_precision_and_refuse_other_dtypes_clearly():
    for dtype in (torch.float16, torch.bfloat16):  # float32 kernels inside (rnntl_fast/ops/native.py)
        assert backend.select_backend("auto", torch.device("cpu"), dtype) == "cpu"
    with pytest.raises(TypeError, match="cpu backend supports float32, float64, float16 and bfloat16"):
        backend.select_backend("cpu", torch.device("cpu"), torch.complex64)


@pytest.mark.skipif(rnntl_fast._ext.HAS_CUDA_KERNELS, reason="the CUDA kernels are built: auto picks them")
@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
def test_auto_on_cuda_without_cuda_kernels_is_triton_then_reference():
    cuda = torch.device("cuda")
    assert backend.select_backend("auto", cuda, torch.float16) == "triton"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend._warned.clear()
        assert backend.select_backend("auto", cuda, torch.float64) == "reference"
    assert any("no compiled backend" in str(w.message) for w in caught)


@pytest.mark.skipif(rnntl_fast._ext.HAS_CUDA_KERNELS, reason="the CUDA kernels are built")
def test_missing_cuda_backend_says_how_to_build_it():
    with pytest.raises(RuntimeError, match="RNNTL_BUILD_CUDA=1"):
        backend.select_backend("cuda", torch.device("cuda"), torch.float32)


def test_backend_device_mismatch():
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        backend.select_backend("cpu", torch.device("cuda"), torch.float32)


def test_info_reports_backends():
    output = subprocess.run([sys.executable, "-m", "rnntl_fast.info"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^  cpu +usable ", output, re.MULTILINE)
    assert re.search(r"^  reference +usable ", output, re.MULTILINE)
