"""Build of rnntl_fast and its native extension rnntl_fast._C.

What gets built is decided by environment variables only (never by probing for a GPU);
docs/ENVIRONMENT.md documents each one:
  RNNTL_BUILD_CUDA=1      also build the CUDA kernels (csrc/cuda) into _C; needs nvcc and a
                          CUDA build of torch.
  CUDA_HOME               CUDA toolkit root for that build (default: found from nvcc, else
                          /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST    GPU architectures for the CUDA build (default "7.5;8.0;8.6;9.0").
  MAX_JOBS                parallel compile jobs (read by torch's build_ext).
  RNNTL_CUDA_ONLY=1       with RNNTL_BUILD_CUDA=1: leave the CPU kernels (csrc/cpu) out, so the
                          ops have only CUDA kernels; for the CUDA build check of CI
                          (scripts/ci_cuda_extension.sh), whose CPU kernels the regular build
                          compiles and tests.
  RNNTL_DEBUG=1           -O0 -g, for debuggers.
  RNNTL_BUILD_EXTENSION=0 build no extension: only the Python package is installed. `make build`
                          compiles _C in place first (`setup.py build_ext --inplace`, whose object
                          files the C++ tests link) and then installs the package editable with it.
  RNNTL_SANITIZE          sanitizers to build with, as for -fsanitize= (e.g. "address,undefined");
                          -O1 -g1, errors abort. `make sanitize` (scripts/sanitize.sh) uses it.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0"


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _default_cuda_home():
    """CUDA_HOME for torch's build helpers when unset: torch derives it from `which nvcc`,
    which is wrong where nvcc is a wrapper script outside the toolkit (/usr/local/bin);
    the toolkit is the directory whose include/ holds cuda_runtime_api.h."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return


def extensions():
    if os.environ.get("RNNTL_BUILD_EXTENSION", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    if _flag("RNNTL_BUILD_CUDA"):
        _default_cuda_home()  # before torch.utils.cpp_extension reads it at import
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = _flag("RNNTL_DEBUG")
    sanitize = os.environ.get("RNNTL_SANITIZE", "").strip()
    # -g0 in the regular build: Python's own CFLAGS carry -g, whose debug info of the
    # templated kernels costs a third of the compile time (symbols stay for profilers).
    # Sanitized builds keep line tables (-g1) for the reports' stack traces.
    cxx_flags = ["-O0", "-g"] if debug else ["-O1", "-g1"] if sanitize else ["-O3", "-g0"]
    link_flags = []
    define_macros = []
    if sanitize:
        # Every finding aborts (a test then fails) instead of printing and going on.
        cxx_flags += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        link_flags += [f"-fsanitize={sanitize}"]
        # target_clones relies on ifunc resolvers, which run before the sanitizer runtime is up.
        define_macros.append(("RNNTL_NO_TARGET_CLONES", None))
    # -fopenmp: ATen's parallel_for runs on torch's threads only in code compiled with
    # OpenMP (ATen/ParallelOpenMP.h tests _OPENMP; without it every parallel_for of the
    # kernels runs on the calling thread); the library is the libgomp torch already loaded.
    # -fno-trapping-math lets the float selects of the pointwise loops vectorize (torch
    # itself is built with it); -fno-math-errno keeps libm calls free of side effects.
    cxx_flags += ["-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    link_flags += ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cpu")]
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    if not _flag("RNNTL_BUILD_CUDA"):
        if _flag("RNNTL_CUDA_ONLY"):
            raise SystemExit("setup.py: RNNTL_CUDA_ONLY=1 needs RNNTL_BUILD_CUDA=1 (without it nothing would be built)")
        return [CppExtension("rnntl_fast._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    if _flag("RNNTL_CUDA_ONLY"):  # ops.cpp still reports the CPU's product kernel and buffer blocks: keep those files
        sources = ["csrc/ops.cpp", "csrc/cpu/small_gemm_cpu.cpp", "csrc/cpu/reusable_buffers_cpu.cpp"]
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_cuda.cpp")
    # No --use_fast_math: the gate math must match the CPU/reference rounding closely.
    # The .cu files include no torch headers, so C++17 is enough there; the glue
    # (*_cuda.cpp) needs C++20 for torch's headers. GEMMs go through ATen (cuBLAS), so no
    # extra link libraries.
    nvcc_flags = ["-O3", "-lineinfo", "-std=c++17"]
    return [CUDAExtension("rnntl_fast._C", sources, include_dirs=include_dirs,
                          define_macros=define_macros + [("RNNTL_WITH_CUDA", None)], extra_link_args=link_flags,
                          extra_compile_args={"cxx": cxx_flags + ["-std=c++20"], "nvcc": nvcc_flags})]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="rnntl-fast",
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
