#!/usr/bin/env bash
# `make gpu-check`: everything that needs an NVIDIA GPU, in one command and one report.
#   1. builds the extension with its CUDA kernels (RNNTL_BUILD_CUDA=1) for this GPU's
#      architecture into build/gpu-check/lib (the checkout's CPU build is left alone);
#   2. checks that the built module has the CUDA kernels, runs tests/test_cuda.py, and tests/test_triton.py with the Triton kernels compiled
#      for the GPU (TRITON_INTERPRET unset, RNNTL_TEST_TRITON_COMPILED=1);
#   3. runs `rnntl-fast bench --device cuda --grid default` (rnntl_fast against cuDNN);
#   4. writes build/gpu-check/report.md: GPU, torch, each step's result and time, the
#      bench table (speed vs torch.nn/cuDNN, peak memory).
# Without a GPU it prints one line and exits 0. Exit status: 0 when every step passed.
# Each step has a time limit, so the whole run stays under 10 minutes (docs/cuda.md).
#
# Variables: PYTHON (default .venv/bin/python) or RNNTL_CUDA_PYTHON: the interpreter, whose
# torch must be a CUDA build with pytest, hypothesis and triton beside it; MAX_JOBS (default:
# the core count).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi finds none); nothing was checked"
    exit 0
fi

PYTHON="${RNNTL_CUDA_PYTHON:-${PYTHON:-.venv/bin/python}}"
OUT="build/gpu-check"
REPORT="$OUT/report.md"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
    echo "gpu-check: $PYTHON has no CUDA build of torch that sees the GPU; set RNNTL_CUDA_PYTHON to an interpreter" \
         "with one (e.g. the venv scripts/ci_cuda_extension.sh makes)" >&2
    exit 1
fi
missing="$("$PYTHON" -c "import importlib.util as u; print(' '.join(m for m in ('pytest', 'hypothesis', 'triton', 'ninja') if u.find_spec(m) is None))")"
if [ -n "$missing" ]; then
    echo "gpu-check: $PYTHON lacks $missing: $PYTHON -m pip install $missing" >&2
    exit 1
fi
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
export TORCH_CUDA_ARCH_LIST

failed=0
steps=()
# step NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, output to $OUT/NAME.log;
# records the result, the time and the log's last line for the report.
step() {
    local name="$1" limit="$2"
    shift 2
    local start status
    start=$(date +%s)
    echo "gpu-check: $name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    local result="passed"
    [ "$status" -eq 124 ] && result="TIMED OUT after $limit s"
    [ "$status" -ne 0 ] && [ "$status" -ne 124 ] && result="FAILED (exit $status)"
    [ "$status" -ne 0 ] && failed=1
    steps+=("| $name | $result | $(( $(date +%s) - start )) s | $(tail -n 1 "$OUT/$name.log" | tr '|' '/') |")
    echo "gpu-check: $name: $result"
    return "$status"
}

# The built package first on sys.path (-P: the checkout's directory is not on it, so not
# its CPU-only rnntl_fast/_C*.so either).
BUILT=(env "PYTHONPATH=$PWD/$OUT/lib" "$PYTHON" -P)
rm -f "$OUT"/*.log "$OUT/bench.md" "$OUT/bench.json" "$REPORT"

# Limits (s): 200 + 20 + 90 + 150 + 120 = 580, so the run with its set-up stays under 10 minutes.
if step build 200 env RNNTL_BUILD_CUDA=1 "$PYTHON" setup.py build --build-base "$OUT" --build-lib "$OUT/lib" \
        --build-temp "$OUT/temp"; then
    # (else test_cuda.py would skip every test and pass)
    step extension 20 "${BUILT[@]}" -c "import sys, rnntl_fast._ext as e; print(e.build_info()); sys.exit(0 if e.HAS_CUDA_KERNELS else 1)"
    step test_cuda 90 "${BUILT[@]}" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider
    step test_triton_compiled 150 env -u TRITON_INTERPRET RNNTL_TEST_TRITON_COMPILED=1 "${BUILT[@]}" -m pytest tests/test_triton.py -q -rs -p no:cacheprovider
    step bench 120 "${BUILT[@]}" -m rnntl_fast bench --device cuda --grid default --no-progress \
        --json "$OUT/bench.json" --markdown "$OUT/bench.md"
fi

{
    echo "# gpu-check report"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'); GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
    echo "torch $("$PYTHON" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)"); commit $(git rev-parse --short HEAD 2> /dev/null || echo '?'); TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    echo
    echo "| step | result | time | last line of $OUT/<step>.log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${steps[@]}"
    echo
    echo "## rnntl-fast bench --device cuda --grid default (speed vs torch.nn / cuDNN, peak memory)"
    echo
    if [ -f "$OUT/bench.md" ]; then cat "$OUT/bench.md"; else echo "(no bench results)"; fi
} > "$REPORT"
echo "gpu-check: report in $REPORT"
exit "$failed"
