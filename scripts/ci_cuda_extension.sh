#!/usr/bin/env bash
# Builds the full extension with the CUDA kernels (RNNTL_BUILD_CUDA=1) against a CUDA
# build of torch in a venv of its own, and checks that the built module reports the CUDA
# backend and that all ten ops have a CUDA kernel registered. Nothing runs on a GPU. The CPU
# kernels are left out (RNNTL_CUDA_ONLY=1): the regular build compiles and tests them.
# Standalone; exits non-zero on any failure.
#   RNNTL_CUDA_VENV        venv to create or reuse (default build/venv-cuda)
#   RNNTL_CUDA_TORCH       torch requirement (default torch==2.14.1)
#   TORCH_CUDA_ARCH_LIST   default "9.0" here: this check is about the torch-facing glue and the
#                          ops' registration; scripts/ci_cuda_compile.sh compiles the kernels for
#                          every architecture setup.py builds by default (7.5, 8.0, 8.6, 9.0)
#   MAX_JOBS               parallel compile jobs (default 2)
#   V                      1 also prints pip's output and the full `rnntl_fast.info` report
# The build runs in a copy of the tracked sources under build/ci-cuda-extension/src
# (kept between runs, so ninja only recompiles what changed; RNNTL_CI_CLEAN=1 starts over), never in the checkout,
# whose CPU-only rnntl_fast/_C*.so it would replace.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RNNTL_CUDA_VENV:-$ROOT/build/venv-cuda}"
TORCH_REQ="${RNNTL_CUDA_TORCH:-torch==2.14.1}"
WORK="$ROOT/build/ci-cuda-extension"
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
start=$(date +%s)
mkdir -p "$WORK"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "== creating $VENV with $TORCH_REQ"
  python3 -m venv "$VENV"
  if [ "${V:-0}" = "1" ]; then
    "$VENV/bin/pip" install "$TORCH_REQ" numpy pytest ninja setuptools
  else
    "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_REQ" numpy pytest ninja setuptools \
      > "$WORK/venv.log" 2>&1 || { tail -20 "$WORK/venv.log" >&2; exit 1; }
  fi
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "venv ready after $(( $(date +%s) - start )) s"

echo "== copying tracked sources to $WORK/src"
[ "${RNNTL_CI_CLEAN:-0}" = "1" ] && rm -rf "$WORK/src"
mkdir -p "$WORK/src"
# Only files whose content changed are copied (and so get a fresh mtime): ninja then
# rebuilds exactly what depends on them. Preserving the checkout's mtimes instead could
# leave objects built from an older copy looking up to date.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
  if ! cmp -s "$file" "$WORK/src/$file"; then
    mkdir -p "$WORK/src/$(dirname "$file")"
    cp "$file" "$WORK/src/$file"
  fi
done)

echo "== building with RNNTL_BUILD_CUDA=1 RNNTL_CUDA_ONLY=1 (log $WORK/build.log)"
t0=$(date +%s)
(cd "$WORK/src" && RNNTL_BUILD_CUDA=1 RNNTL_CUDA_ONLY=1 "$VENV/bin/python" setup.py build_ext --inplace > "$WORK/build.log" 2>&1) || {
  grep -E "error|FAILED" "$WORK/build.log" | head -30 >&2
  echo "ci_cuda_extension: build failed, see $WORK/build.log" >&2
  exit 1
}
echo "built in $(( $(date +%s) - t0 )) s"

echo "== checking the built module"
(cd "$WORK/src" && "$VENV/bin/python" - <<'PY'
import sys

import torch
import rnntl_fast._ext as ext

print("build info:", ext.build_info())
if not ext.HAS_CUDA_KERNELS:
    sys.exit(f"rnntl_fast._ext.HAS_CUDA_KERNELS is False (import error: {ext.IMPORT_ERROR})")
missing = [op for op in ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward", "rnn_forward",
                         "rnn_backward", "layer_norm_lstm_forward", "layer_norm_lstm_backward",
                         "layer_norm_gru_forward", "layer_norm_gru_backward")
           if "\nCUDA: registered" not in torch._C._dispatch_dump(f"rnntl_fast::{op}")]
if missing:
    sys.exit(f"no CUDA kernel registered for: {missing}")
print("CUDA kernels registered for all ten ops")
import json
import os
import subprocess
out = subprocess.run([sys.executable, "-m", "rnntl_fast.info", "--json"], capture_output=True, text=True)
if out.returncode != 0:
    sys.exit(f"python -m rnntl_fast.info --json failed: {out.stderr[-2000:]}")
cuda = json.loads(out.stdout)["backends"]["cuda"]
if os.environ.get("V", "0") == "1":
    print(subprocess.run([sys.executable, "-m", "rnntl_fast.info"], capture_output=True, text=True).stdout)
if not cuda["built"]:
    sys.exit(f"python -m rnntl_fast.info does not report the CUDA backend as built: {cuda['why']}")
print(f"rnntl_fast.info: cuda backend built, {'usable' if cuda['usable'] else 'not usable here'} ({cuda['why']})")
PY
)
echo "ci_cuda_extension: OK in $(( $(date +%s) - start )) s"
