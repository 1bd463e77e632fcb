#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU kernels (`make sanitize`):
#   1. the C++ tests (CMakeLists.txt, tests/cpp) built with -DRNNTL_SANITIZE, run by ctest;
#   2. the extension built with RNNTL_SANITIZE (setup.py) into build/sanitize/lib, and a
#      fast subset of the op tests (tests/test_ops_cpu.py, tests/test_properties.py,
#      tests/test_layer_norm_cpu.py, tests/test_regularizer_draws.py) and the tests of the
#      reused CPU buffers (tests/test_reusable_buffers_cpu.py) run against it in a Python
#      with libasan (and libstdc++) preloaded.
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
# From tests/test_ops_cpu.py: the parity cases of the cpu backend in float64 (every path:
# lengths, reverse, clips, frozen weights, the per-step product kernel's odd sizes),
# gradcheck, opcheck, argument checks and strided arguments (its float32 cases repeat the
# same kernels). From tests/test_properties.py: the op properties, drawn sizes, options and
# memory layouts in float32 and float64 (the ci profile's examples). From
# tests/test_layer_norm_cpu.py: the layer-normalised cells' float64 cases, gradcheck, opcheck.
# From tests/test_regularizer_draws.py: the mask op against its torch-op form, at 1-3 threads.
DEFAULT_TESTS="float64_matches_reference or gradcheck or opcheck or bad_input or rejects_bad_input or non_contiguous or state_and_gate_clip or test_op_float or native_op or thread_count"
TESTS="${RNNTL_SANITIZE_TESTS:-$DEFAULT_TESTS}"
export MAX_JOBS

start=$(date +%s)
echo "sanitize: C++ tests with -fsanitize=$SANITIZERS"
cmake -S . -B "$OUT/cmake" -DRNNTL_SANITIZE="$SANITIZERS" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" > /dev/null
# the compiler's and gmake's output goes to a log (shown on failure, or always with V=1)
if [ "${V:-0}" = "1" ]; then
  cmake --build "$OUT/cmake" -j "$MAX_JOBS"
else
  mkdir -p "$OUT"
  cmake --build "$OUT/cmake" -j "$MAX_JOBS" > "$OUT/cmake-build.log" 2>&1 \
    || { tail -40 "$OUT/cmake-build.log"; echo "sanitize: C++ build failed; log $OUT/cmake-build.log" >&2; exit 1; }
fi
# halt_on_error: UBSan findings fail the test like ASan's do. detect_leaks=0: libtorch keeps its
# registries and thread pools until exit.
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    ctest --test-dir "$OUT/cmake" --output-on-failure

echo "sanitize: extension with -fsanitize=$SANITIZERS into $OUT/lib"
RNNTL_SANITIZE="$SANITIZERS" "$PYTHON" setup.py -q build --build-base "$OUT" --build-lib "$OUT/lib" \
    --build-temp "$OUT/temp" > "$OUT.log" 2>&1 || { tail -40 "$OUT.log"; exit 1; }
libasan="$("$CXX" -print-file-name=libasan.so)"
libstdcxx="$("$CXX" -print-file-name=libstdc++.so)"
[ -f "$libasan" ] || { echo "sanitize: $CXX has no libasan.so ($libasan)" >&2; exit 1; }

echo "sanitize: op tests ($TESTS) against the sanitized extension"
# libasan must come first in a process whose main program (python) is not instrumented;
# libstdc++ with it, else ASan's __cxa_throw interceptor finds no real __cxa_throw and the
# first C++ exception (a TORCH_CHECK) aborts. -P: no current directory on sys.path, so
# `import rnntl_fast` finds $OUT/lib, not the regular build in the source tree (checked
# below). detect_leaks=0: CPython and torch keep allocations alive until exit by design.
export LD_PRELOAD="$libasan $libstdcxx" PYTHONPATH="$PWD/$OUT/lib"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$PYTHON" -P - "$OUT/lib/" <<'PY'
import sys
import torch  # first: rnntl_fast._C links against libtorch, which `import rnntl_fast` alone no longer loads
import rnntl_fast._C as C
library = open(C.__file__, "rb").read()
print("sanitize: loaded", C.__file__)
if sys.argv[1] not in C.__file__ or b"__asan_report" not in library or b"__ubsan_handle" not in library:
    sys.exit("sanitize: that is not the extension built with AddressSanitizer and UBSan")
PY
# --capture=sys: a sanitizer report (written to fd 2 just before the abort) reaches the log.
"$PYTHON" -P -m pytest tests/test_ops_cpu.py tests/test_properties.py tests/test_layer_norm_cpu.py tests/test_regularizer_draws.py -q -p no:cacheprovider \
    --capture=sys -k "$TESTS"
# The reused CPU buffers (idle blocks poisoned): every test, they take seconds.
"$PYTHON" -P -m pytest tests/test_reusable_buffers_cpu.py -q -p no:cacheprovider --capture=sys
echo "sanitize: passed in $(( $(date +%s) - start )) s"
