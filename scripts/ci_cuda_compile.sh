#!/usr/bin/env bash
# Compiles every CUDA kernel file (csrc/cuda/*.cu) with nvcc for the default GPU
# architectures, without torch, and checks the ptxas resource report: the persistent
# kernels must not spill registers. Standalone; exits non-zero on any failure.
#   NVCC            compiler (default: nvcc on PATH)
#   RNNTL_CUDA_ARCHS space-separated compute capabilities (default "75 80 86 90")
#   MAX_JOBS        files compiled at a time (default 2)
#   V               1 prints the per-kernel register/spill table (default: only its summary,
#                   and the table when a check fails)
# Writes the ptxas log to build/ci-cuda-compile/ptxas.log and the table to .../spills.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
ARCHS="${RNNTL_CUDA_ARCHS:-75 80 86 90}"
OUT="$ROOT/build/ci-cuda-compile"
mkdir -p "$OUT"
command -v "$NVCC" >/dev/null || { echo "ci_cuda_compile: $NVCC not found" >&2; exit 1; }

gencode=()
for arch in $ARCHS; do gencode+=("-gencode" "arch=compute_${arch},code=sm_${arch}"); done

start=$(date +%s)
status=0
shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
[ ${#sources[@]} -gt 0 ] || { echo "ci_cuda_compile: no .cu files" >&2; exit 1; }

compile() {  # one .cu file for every architecture; its ptxas report to $OUT/<name>.log
  local source="$1" name t0
  name="$(basename "$source" .cu)"
  t0=$(date +%s)
  # Same flags as setup.py's nvcc branch, plus the resource report; warnings are errors
  # for our own code (-Werror all-warnings), so that host/device mistakes do not slip by.
  if "$NVCC" -std=c++17 -O3 -lineinfo -I"$ROOT/csrc/include" "${gencode[@]}" \
      -Xptxas -v -Werror all-warnings -c "$source" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1; then
    echo "compiled $name.cu for sm_{${ARCHS// /,}} in $(( $(date +%s) - t0 )) s"
  else
    echo "FAILED: $name.cu" >&2
    grep -E "error|warning" "$OUT/$name.log" | tail -20 >&2 || true
    return 1
  fi
}

# MAX_JOBS files at a time (nvcc itself runs one architecture after another).
jobs_max="${MAX_JOBS:-2}"
running=0
for source in "${sources[@]}"; do
  if [ "$running" -ge "$jobs_max" ]; then
    wait -n || status=1
    running=$((running - 1))
  fi
  compile "$source" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done
: > "$OUT/ptxas.log"
for source in "${sources[@]}"; do cat "$OUT/$(basename "$source" .cu).log" >> "$OUT/ptxas.log"; done
[ $status -eq 0 ] || exit $status

if [ "${V:-0}" = "1" ]; then
  python3 "$ROOT/scripts/check_ptxas_spills.py" "$OUT/ptxas.log" --pattern persistent
else
  python3 "$ROOT/scripts/check_ptxas_spills.py" "$OUT/ptxas.log" --pattern persistent > "$OUT/spills.txt" 2>&1 || {
    cat "$OUT/spills.txt" >&2; exit 1; }
  tail -n 2 "$OUT/spills.txt"
fi
echo "ci_cuda_compile: OK in $(( $(date +%s) - start )) s"
