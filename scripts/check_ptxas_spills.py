#!/usr/bin/env python3
"""Parses `ptxas -v` output (nvcc -Xptxas -v) and fails when a persistent kernel spills.

The persistent kernels keep their slice of W_hh in shared memory and their per-thread
state in registers for the whole sequence; a spill there turns every step's inner loop
into local-memory traffic. Their register use does not depend on the sizes (sizes are
runtime arguments and the weights live in shared memory), so 0 spill bytes in this report
holds for every size the host-side plan accepts.

Usage: check_ptxas_spills.py PTXAS_LOG [--pattern persistent] [--all-kernels]
  --pattern     substring of the (demangled) kernel name that must not spill
  --all-kernels fail on a spill in any kernel
Prints a table: kernel, arch, registers, spill stores/loads, stack, shared.
"""
import argparse
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse(text):
    kernels = []
    current = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                       "spill_loads": 0, "stack": 0, "smem": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = SPILL.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return kernels


def short(name, width=90):
    name = re.sub(r"\(.*\)$", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--pattern", default="persistent")
    parser.add_argument("--all-kernels", action="store_true")
    args = parser.parse_args()
    with open(args.log) as handle:
        kernels = parse(handle.read())
    if not kernels:
        print(f"check_ptxas_spills: no ptxas entries in {args.log} (was -Xptxas -v passed?)", file=sys.stderr)
        return 2
    names = demangle(sorted({k["name"] for k in kernels}))
    failures = []
    print(f"{'kernel':90s} {'arch':7s} {'regs':>4s} {'spill st':>8s} {'spill ld':>8s} {'stack':>5s}")
    for k in sorted(kernels, key=lambda k: (names[k["name"]], k["arch"])):
        pretty = names[k["name"]]
        print(f"{short(pretty):90s} {k['arch']:7s} {k['registers'] or 0:4d} {k['spill_stores']:8d} "
              f"{k['spill_loads']:8d} {k['stack']:5d}")
        spills = k["spill_stores"] or k["spill_loads"]
        if spills and (args.all_kernels or args.pattern in pretty):
            failures.append(f"{short(pretty)} on {k['arch']}: {k['spill_stores']} B spill stores, "
                            f"{k['spill_loads']} B spill loads")
    checked = [k for k in kernels if args.pattern in names[k["name"]]]
    if not checked:
        print(f"check_ptxas_spills: no kernel matching '{args.pattern}' found", file=sys.stderr)
        return 2
    print(f"\n{len(kernels)} kernel builds, {len(checked)} matching '{args.pattern}'; "
          f"max registers there: {max(k['registers'] or 0 for k in checked)}")
    if failures:
        print("SPILLS:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
