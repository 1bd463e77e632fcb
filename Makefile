# Bootstrap targets: each does its own set-up (virtual environment, install, build).
#   make finetune   the main job: pretrain-then-transfer on the embedded default data
#   make test       the test suite (what .ci/run runs): pytest, C++ tests (ctest), and the
#                   CUDA build checks (nvcc compile + ptxas spill check, full CUDA extension
#                   against torch 2.14.1); those are skipped with a notice where nvcc is absent,
#                   except under CI=true
#   make bench      the benchmark table on this machine
# Variables: PYTHON (interpreter for the venv), VENV (its folder), MAX_JOBS (build jobs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: venv build test pytest ctest cuda-check finetune bench info clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	# textgenrnn ships a real pretrained character model; its own dependencies (TensorFlow) are not needed.
	$(PY) -m pip install -q --no-deps textgenrnn==2.0.0
	touch $@

build: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

pytest: build
	$(PY) -m pytest tests -q -p no:cacheprovider

ctest: build
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build build/cmake -j $(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

test: pytest ctest cuda-check

cuda-check:
	@if command -v nvcc > /dev/null; then \
		bash scripts/ci_cuda_compile.sh && bash scripts/ci_cuda_extension.sh; \
	elif [ "$$CI" = "true" ]; then \
		echo "cuda-check: nvcc not found, and CI needs the CUDA build checks" >&2; exit 1; \
	else \
		echo "cuda-check: SKIPPED (nvcc not found): the CUDA kernels were not compiled"; \
	fi

finetune: build
	$(VENV)/bin/rnntl-fast finetune

bench: build
	$(VENV)/bin/rnntl-fast bench --grid default

info: build
	$(PY) -m rnntl_fast.info

clean:
	rm -rf build $(VENV) rnntl_fast/*.so *.egg-info

# ---- Reliability checks ---------------------------------------------------------------------
#   make sanitize    the C++ tests and a fast subset of the op tests against an
#                    AddressSanitizer + UndefinedBehaviorSanitizer build of the kernels, in
#                    build/sanitize (scripts/sanitize.sh); part of `make test`
#   make gpu-check   on a machine with an NVIDIA GPU and a CUDA build of torch: CUDA extension,
#                    CUDA and compiled-Triton tests, `rnntl-fast bench --device cuda`, one report
#                    (scripts/gpu_check.sh, docs/cuda.md); without a GPU it says so and exits 0
.PHONY: sanitize gpu-check

test: sanitize

sanitize: build
	PYTHON=$(PY) bash scripts/sanitize.sh

gpu-check:
	PYTHON=$(PY) bash scripts/gpu_check.sh
