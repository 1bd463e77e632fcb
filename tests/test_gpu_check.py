"""scripts/gpu_check.sh (`make gpu-check`) on the paths a machine without a usable GPU takes;
the GPU path itself runs only on a GPU machine (docs/cuda.md). A fake nvidia-smi first on
PATH decides what the script sees, whatever this machine has."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _run_with_fake_nvidia_smi(tmp_path, exit_code, **env):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\nexit {exit_code}\n")
    (fake / "nvidia-smi").chmod(0o755)
    environment = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=120)


def test_without_gpu_says_so_in_one_line_and_succeeds(tmp_path):
    result = _run_with_fake_nvidia_smi(tmp_path, exit_code=9)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["gpu-check: no NVIDIA GPU on this machine (nvidia-smi finds none); "
                                          "nothing was checked"], result.stdout
    assert result.stderr == ""


def test_gpu_without_cuda_torch_is_one_line_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this interpreter's torch sees a GPU: the error path cannot be reached")
    result = _run_with_fake_nvidia_smi(tmp_path, exit_code=0, RNNTL_CUDA_PYTHON=sys.executable)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and sys.executable in result.stderr
    assert "no CUDA build of torch" in result.stderr and "RNNTL_CUDA_PYTHON" in result.stderr
