"""Test set-up.

TRITON_INTERPRET: set to 1 before any triton kernel is imported, so that the Triton
backend runs on CPU tensors here (machines without a GPU). RNNTL_TEST_TRITON_COMPILED=1
leaves it unset, so tests/test_triton.py runs the compiled kernels on a GPU instead
(`make gpu-check`); an explicit TRITON_INTERPRET is never overridden.

RNNTL_CPU_PACKING: "always" unless already set, so that the CPU kernels pack their weights
at the tests' small sizes too and the packed kernels and multi-core loops run there (by
default short sequences skip packing; tests/test_short_sequences.py runs that default).

RNNTL_HYPOTHESIS_PROFILE: the hypothesis settings of the property tests
(tests/test_properties.py), "ci" (default) or "long"; see docs/ENVIRONMENT.md.
"""
import os

if os.environ.get("RNNTL_TEST_TRITON_COMPILED", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RNNTL_CPU_PACKING", "always")  # read by the CPU kernels at each op call

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# ci: a few dozen examples per property, the same ones every run (derandomize), nothing
# stored. long: 500 fresh examples per property, failures kept in .hypothesis/ and
# replayed first next time.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
HYPOTHESIS_PROFILES = ("ci", "long")
_profile = os.environ.get("RNNTL_HYPOTHESIS_PROFILE", "ci")
if _profile not in HYPOTHESIS_PROFILES:
    raise pytest.UsageError(f"RNNTL_HYPOTHESIS_PROFILE must be one of {HYPOTHESIS_PROFILES}, got {_profile!r}")
settings.load_profile(_profile)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
