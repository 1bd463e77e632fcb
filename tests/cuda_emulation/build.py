"""Builds tests/cuda_emulation/emulation_driver.cpp with g++ (no nvcc, no torch headers).

Two products, cached by a hash of the sources and flags under build/cuda_emulation/:
  * the shared library the pytest parity tests load with ctypes;
  * the ThreadSanitizer program (``-fsanitize=thread``, ``-DRNNTL_EMULATION_MAIN``).
Run as a script (``python tests/cuda_emulation/build.py --tsan``) to build and run the
TSan program; it exits non-zero on a race report or a failed self-check.
"""
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "cuda_emulation")
SOURCE = os.path.join(HERE, "emulation_driver.cpp")
EMULATION_HEADER = os.path.join(HERE, "cuda_emulation.h")  # found by rnntl/cuda_compat.h on the include path
INCLUDE = os.path.join(ROOT, "csrc", "include")
BUILD_DIR = os.path.join(ROOT, "build", "cuda_emulation")


def _sources_digest(flags):
    digest = hashlib.sha256(" ".join(flags).encode())
    paths = [SOURCE, EMULATION_HEADER]
    for directory, _, files in os.walk(os.path.join(INCLUDE, "rnntl")):
        paths += [os.path.join(directory, f) for f in sorted(files)]
    for path in sorted(paths):
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def _build(name, flags):
    compiler = os.environ.get("CXX", "g++")
    flags = ["-std=c++20", "-pthread", "-I" + INCLUDE, "-I" + HERE, "-Wall", "-Wno-unknown-pragmas"] + flags
    os.makedirs(BUILD_DIR, exist_ok=True)
    target = os.path.join(BUILD_DIR, f"{name}-{_sources_digest([compiler] + flags)}")
    if not os.path.exists(target):
        partial = f"{target}.{os.getpid()}.partial"  # parallel test processes may build it at once
        subprocess.run([compiler, *flags, SOURCE, "-o", partial], check=True)
        os.replace(partial, target)
    return target


# -g1: line tables are all a sanitizer report or a backtrace names; full -g costs about
# half again the compile time (25 s against 16 s for the TSan program on Zen 3).
def build_library():
    """Path of the shared library with the ctypes entry points."""
    return _build("librnntl_emulation.so", ["-O1", "-g1", "-shared", "-fPIC"])


def build_tsan_program():
    return _build("rnntl_emulation_tsan", ["-O1", "-g1", "-fsanitize=thread", "-DRNNTL_EMULATION_MAIN"])


def tsan_runtime_problem():
    """None when the compiler can build and run a -fsanitize=thread program here, else why
    not (a toolchain without libtsan, or a kernel whose address layout TSan refuses). Only
    this probe may turn into a skip: a failure to build the emulation driver itself is a bug."""
    compiler = os.environ.get("CXX", "g++")
    os.makedirs(BUILD_DIR, exist_ok=True)
    probe_source = os.path.join(BUILD_DIR, f"tsan_probe.{os.getpid()}.cpp")
    probe = os.path.join(BUILD_DIR, f"tsan_probe.{os.getpid()}")
    with open(probe_source, "w") as handle:
        handle.write("#include <thread>\nint main() { std::thread t([] {}); t.join(); return 0; }\n")
    built = subprocess.run([compiler, "-fsanitize=thread", "-pthread", probe_source, "-o", probe],
                           capture_output=True, text=True)
    if built.returncode != 0:
        return f"{compiler} cannot link -fsanitize=thread: {built.stderr.strip().splitlines()[-1:]}"
    ran = subprocess.run([probe], capture_output=True, text=True, timeout=60)
    if ran.returncode != 0:
        return f"a -fsanitize=thread program does not run here: {(ran.stdout + ran.stderr).strip()[-300:]}"
    return None


def run_tsan_program():
    """Runs the TSan build; returns (ok, combined output)."""
    program = build_tsan_program()
    env = dict(os.environ)
    env["TSAN_OPTIONS"] = "halt_on_error=1 exitcode=66 second_deadlock_stack=1"
    result = subprocess.run([program], capture_output=True, text=True, env=env, timeout=900)
    output = result.stdout + result.stderr
    ok = result.returncode == 0 and "ThreadSanitizer" not in output
    return ok, output


if __name__ == "__main__":
    if "--tsan" in sys.argv:
        ok, output = run_tsan_program()
        print(output)
        sys.exit(0 if ok else 1)
    print(build_library())
