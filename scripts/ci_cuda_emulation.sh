#!/usr/bin/env bash
# Runs the real CUDA kernel sources on the CPU (emulated CUDA execution model) against
# the float64 reference, then the ThreadSanitizer build of the same. Needs g++ and a
# Python with torch and pytest (PYTHON, default python3). Exits non-zero on failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
start=$(date +%s)
cd "$ROOT"
"$PYTHON" -m pytest -q tests/test_cuda_emulation.py
echo "ci_cuda_emulation: OK in $(( $(date +%s) - start )) s"
