# Bootstrap targets: each does its own set-up (virtual environment, install, build); what
# they cost on a 2-core machine is in README.md.
#   make finetune   the main job: pretrain-then-transfer on the embedded default data
#   make test       the test suite (what .ci/run runs): pytest, C++ tests (ctest), and the
#                   CUDA build checks where nvcc is on the PATH (nvcc compile + ptxas spill
#                   check; the full CUDA extension against torch 2.14.1 in build/venv-cuda).
#                   Without nvcc they are skipped with a notice, except under CI=true.
#                   `make test CUDA_CHECK=0` skips them; only the command line sets it
#                   (an environment variable of that name is ignored), so CI runs them.
#   make bench      the benchmark table on this machine
#   make info       versions and which backends can run here
# Variables: PYTHON (interpreter for the venv), VENV (its folder), MAX_JOBS (build jobs),
#   PYTEST_WORKERS (pytest processes, default 2),
#   V=1 (show compiler, CMake, ninja and pip output in full; default: progress lines only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
export MAX_JOBS
V ?= 0
CUDA_CHECK = 1
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

# The extension is compiled by `setup.py build_ext --inplace` only: its ninja build tree
# (build/temp.*) is kept, so a later change of the C++ sources recompiles only what changed,
# and the C++ tests (ctest) link the kernels' object files from there instead of compiling
# them again. The editable install (pip install -e, for the `rnntl-fast` command) runs with
# RNNTL_BUILD_EXTENSION=0, so it compiles nothing; it runs again only when the package
# metadata or the build script changed.
EXTENSION := rnntl_fast/_C$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
EXTENSION_SOURCES := $(shell find csrc -type f)
BUILD_LOG := build/build.log

ifeq ($(V),1)
  SHOW_BUILD := cat
  QUIET_LOG = 2>&1 | tee $(1)
else
  # ninja's "[3/12] c++ ... -c /path/csrc/cpu/lstm_cpu.cpp -o ..." -> "  [3/12] csrc/cpu/lstm_cpu.cpp"
  # (sed -u: a line as soon as ninja prints it; awk may wait for a full input buffer)
  SHOW_BUILD := sed -nu -E 's|^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]*/)?(csrc/[^ ]+) .*|  \1 \3|p'
  QUIET_LOG = > $(1) 2>&1 || { tail -40 $(1); echo "failed; full log: $(1)" >&2; exit 1; }
endif

.PHONY: venv build test pytest ctest cuda-check finetune bench info clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt
	@echo "venv: creating $(VENV) (torch 2.13.0 CPU build and requirements-dev.txt)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	# textgenrnn ships a real pretrained character model; its own dependencies (TensorFlow) are not needed.
	$(PY) -m pip install -q --no-deps textgenrnn==2.0.0
	touch $@

build: $(EXTENSION) $(VENV)/.editable

$(EXTENSION): $(EXTENSION_SOURCES) setup.py $(VENV)/.installed
	@mkdir -p build
	@echo "build: compiling rnntl_fast._C (setup.py build_ext --inplace: ninja, $(MAX_JOBS) jobs, only what changed; log $(BUILD_LOG))"
	@start=$$(date +%s); \
	$(PY) setup.py build_ext --inplace 2>&1 | tee $(BUILD_LOG) | $(SHOW_BUILD) \
		|| { tail -40 $(BUILD_LOG); echo "build failed; full log: $(BUILD_LOG)" >&2; exit 1; }; \
	echo "build: done in $$(( $$(date +%s) - start )) s"
	@touch $@

$(VENV)/.editable: pyproject.toml setup.py | $(EXTENSION)
	@echo "build: pip install -e . (the package and the rnntl-fast command; no compiling)"
	@RNNTL_BUILD_EXTENSION=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e . > build/install.log 2>&1 \
		|| { tail -40 build/install.log; echo "pip install -e . failed; full log: build/install.log" >&2; exit 1; }
	@touch $@

# PYTEST_WORKERS: test processes (pytest-xdist; 0 runs them in this process). Two keep both
# cores of a 2-core machine busy: most tests are small and run on one thread.
PYTEST_WORKERS ?= 2
pytest: build
	$(PY) -m pytest tests -q -p no:cacheprovider -n $(PYTEST_WORKERS)

# The kernels' object files of the extension's build (empty: CMake compiles the kernels itself).
KERNEL_OBJECTS = $(wildcard build/temp.$(shell $(PYTHON) -c 'import sys, sysconfig; print(sysconfig.get_platform() + "-" + sys.implementation.cache_tag)')/csrc/cpu/*.o)
space := $(subst ,, )
ctest: build
	@mkdir -p build/cmake
	@echo "ctest: configuring and building the C++ tests (log build/cmake/build.log)"
	@cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DRNNTL_KERNEL_OBJECTS="$(subst $(space),;,$(strip $(KERNEL_OBJECTS)))" \
		$(call QUIET_LOG,build/cmake/configure.log)
	@cmake --build build/cmake -j $(MAX_JOBS) $(call QUIET_LOG,build/cmake/build.log)
	ctest --test-dir build/cmake --output-on-failure

test: pytest ctest cuda-check

cuda-check:
	@if [ "$(CUDA_CHECK)" = "0" ]; then \
		echo "cuda-check: SKIPPED (CUDA_CHECK=0): the CUDA kernels were not compiled"; \
	elif command -v nvcc > /dev/null; then \
		V=$(V) bash scripts/ci_cuda_compile.sh && V=$(V) bash scripts/ci_cuda_extension.sh; \
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
	PYTHON=$(PY) V=$(V) bash scripts/sanitize.sh

gpu-check:
	PYTHON=$(PY) bash scripts/gpu_check.sh
