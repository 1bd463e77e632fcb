#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU kernels (`make sanitize`):
#   1. the C++ tests (CMakeLists.txt, tests/cpp) built with -DRNNTL_SANITIZE, run by ctest;
#   2. the extension built with RNNTL_SANITIZE (setup.py) into build/sanitize/lib, and a
#      fast subset of the op tests run against it in a Python with libasan preloaded.
# Everything goes to build/sanitize (incremental); the regular build is untouched. Any
# sanitizer finding aborts the process, so the run fails.
#
# Variables: PYTHON (the venv's interpreter, default .venv/bin/python), MAX_JOBS (build
# jobs, default 2), CXX (the compiler whose libasan is preloaded, default c++),
# RNNTL_SANITIZE_TESTS (pytest -k expression of the op tests to run; default below).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
MAX_JOBS="${MAX_JOBS:-2}"
CXX="${CXX:-c++}"
SANITIZERS="address,undefined"
OUT="build/sanitize"
# The parity cases of the cpu backend in float64 (every path: lengths, reverse, clips,
# frozen weights, the per-step product kernel's odd sizes), gradcheck, opcheck, argument
# checks and strided arguments; the float32 cases repeat the same kernels.
DEFAULT_TESTS="float64_matches_reference or gradcheck or opcheck or bad_input or rejects_bad_input or non_contiguous or state_and_gate_clip"
TESTS="${RNNTL_SANITIZE_TESTS:-$DEFAULT_TESTS}"
export MAX_JOBS

start=$(date +%s)
echo "sanitize: C++ tests with -fsanitize=$SANITIZERS"
cmake -S . -B "$OUT/cmake" -DRNNTL_SANITIZE="$SANITIZERS" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" > /dev/null
cmake --build "$OUT/cmake" -j "$MAX_JOBS"
# halt_on_error: UBSan findings fail the test like ASan's do.
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    ctest --test-dir "$OUT/cmake" --output-on-failure

echo "sanitize: extension with -fsanitize=$SANITIZERS into $OUT/lib"
RNNTL_SANITIZE="$SANITIZERS" "$PYTHON" setup.py -q build --build-base "$OUT" --build-lib "$OUT/lib" \
    --build-temp "$OUT/temp" > "$OUT.log" 2>&1 || { tail -40 "$OUT.log"; exit 1; }
libasan="$("$CXX" -print-file-name=libasan.so)"
[ -f "$libasan" ] || { echo "sanitize: $CXX has no libasan.so ($libasan)" >&2; exit 1; }

echo "sanitize: op tests ($TESTS) against the sanitized extension"
# -P: no current directory on sys.path, so `import rnntl_fast` finds $OUT/lib (checked
# first), not the regular build in the source tree. detect_leaks=0: CPython and torch keep
# allocations alive until exit by design.
export LD_PRELOAD="$libasan" PYTHONPATH="$PWD/$OUT/lib"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$PYTHON" -P -c "import rnntl_fast._C as c, sys; p = c.__file__; print('sanitize: loaded', p); sys.exit(0 if '$OUT/lib/' in p else 1)"
"$PYTHON" -P -m pytest tests/test_ops_cpu.py -q -p no:cacheprovider -k "$TESTS"
echo "sanitize: passed in $(( $(date +%s) - start )) s"
