"""Test set-up. TRITON_INTERPRET must be set before any triton kernel is imported so that
the Triton backend runs on CPU tensors here (machines without a GPU)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
