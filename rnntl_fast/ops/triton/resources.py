"""Compile the Triton kernels for a CUDA architecture without a GPU and report what ptxas
says per kernel: registers per thread, spilled bytes, shared memory.

    python -m rnntl_fast.ops.triton.resources [--arch 90] [--dtype float16] [--widths 16,32,64]
    python -m rnntl_fast.ops.triton.resources --check [--arch 90] [--dtypes float32,bfloat16]
    python -m rnntl_fast.ops.triton.resources --table [--archs 80,90] [--dtypes float16,bfloat16,float32]
    python -m rnntl_fast.ops.triton.resources --sweep [--arch 90] [--dtype float16]

--check compiles every kernel at each configuration the automatic dispatcher can pick
(sequence kernels at every width config.choose_strategy gives them, step kernels at every
autotune tile offered for the dtype) and exits 1 if any spills registers or needs more
shared memory than the architecture allows a block; tests/test_triton_compile.py runs it.
--table compiles every kernel at every sequence width and every autotune tile for each
architecture and dtype and prints the markdown table of docs/triton.md.

Kernels are compiled with every boolean switch on (projection, clips, lengths, recurrent
mask, zoneout, saving), their heaviest form; the LSTM and GRU sequence kernels also with
layer normalisation on (sequence_compilations). Uses the ptxas bundled
with triton; needs no GPU and no CUDA driver, but TRITON_INTERPRET must be unset (the
interpreter compiles nothing). Compiled kernels and ptxas reports are kept in triton's
cache (TRITON_CACHE_DIR), so a second run is quick.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, NamedTuple, Tuple

import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile
from triton.runtime.cache import get_cache_manager

from . import config, sequence, step

_TL_NAMES = {tl.float16: "fp16", tl.bfloat16: "bf16", tl.float32: "fp32"}
_DTYPES = {"float16": (tl.float16, torch.float16), "bfloat16": (tl.bfloat16, torch.bfloat16),
           "float32": (tl.float32, torch.float32)}

# Most shared memory one block may use, bytes: the hardware limit of compute capability
# 8.0 (A100) and 9.0 (H100).
SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}

# Pointer arguments in the input dtype (everything else is float32 reserve, or int64 lengths).
_INPUT_DTYPE_POINTERS = {"input_gates_ptr", "weight_hh_ptr", "bias_hh_ptr", "weight_hr_ptr", "h0_ptr", "c0_ptr",
                         "recurrent_mask_ptr", "zoneout_ptr", "zoneout_h_ptr", "zoneout_c_ptr", "output_ptr", "h_n_ptr",
                         "c_n_ptr", "grad_output_ptr", "grad_h_n_ptr", "grad_c_n_ptr", "norm_hh_ptr",
                         "cell_norm_weight_ptr", "cell_norm_bias_ptr"}
_FLOAT_SCALARS = {"cell_clip", "proj_clip", "state_clip", "gate_clip", "norm_eps"}
# Boolean switches that are not "on" in the heaviest form: the backward step kernels' first
# step skips the K loop, and the direction changes only the order of the steps.
_SWITCHES_OFF = {"FIRST": False, "REVERSE": False}


class Compilation(NamedTuple):
    """One kernel specialisation to compile: kernel name, JITFunction, constexprs, tile, warps."""
    name: str
    fn: object
    constexprs: Dict[str, object]
    tile: str
    num_warps: int


def _signature(fn, dtype_name: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "lengths_ptr":
            signature[name] = "*i64"
        elif name == "input_gates_ptr" and constexprs.get("LAYER_NORM"):
            signature[name] = "*fp32"  # the normalised input gates are float32 (ops._input_gates)
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype_name}" if name in _INPUT_DTYPE_POINTERS else "*fp32"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_report(fn, constexprs: Dict[str, object], dtype, arch: int, num_warps: int) -> Dict[str, int]:
    """ptxas numbers of one specialisation of `fn` (a JITFunction) for sm_`arch`."""
    signature = _signature(fn, _TL_NAMES[dtype], constexprs)
    source = ASTSource(fn, signature, constexprs=constexprs)
    kernel = triton_compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    registers, spilled = _ptxas_verbose(kernel.asm["ptx"], arch)
    return {"registers": registers, "spills": spilled, "shared": kernel.metadata.shared, "num_warps": num_warps}


def _ptxas_verbose(ptx: str, arch: int) -> Tuple[int, int]:
    """(registers per thread, spill store + load bytes) from `ptxas -v` on the kernel's PTX
    (the compiled kernel object only knows them once loaded on a device); cached in
    triton's cache by the PTX, the architecture and the ptxas version."""
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas triton itself uses for this arch
    ptxas = get_ptxas(arch)
    key = hashlib.sha256(f"{ptxas.version}|sm_{arch}|{ptx}".encode()).hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file("ptxas_verbose.json")
    if cached is not None:
        with open(cached) as handle:
            numbers = json.load(handle)
        return numbers["registers"], numbers["spills"]
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas.path, "-v", f"--gpu-name=sm_{arch}{suffix}", source, "-o",
                                 os.path.join(folder, "kernel.cubin")], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr.strip()}")
    text = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    cache.put(json.dumps({"registers": registers, "spills": spilled}), "ptxas_verbose.json")
    return registers, spilled


def _heaviest(fn, **constexprs) -> Dict[str, object]:
    """`constexprs` plus every boolean switch of `fn` on (but those in _SWITCHES_OFF)."""
    switches = {name: _SWITCHES_OFF.get(name, True) for name in fn.arg_names
                if name.isupper() and name not in constexprs and not name.startswith("BLOCK_")
                and name != "DOT_DTYPE"}
    return dict(switches, **constexprs)


def sequence_compilations(dtype, width: int) -> List[Compilation]:
    """The six sequence kernels at padded hidden = output width `width`; the LSTM and GRU ones
    twice, without and with layer normalisation (tile "... layer_norm"): two different programs
    (row reductions and float32 input gates with it), each in its heaviest form."""
    warps = config.sequence_num_warps()
    compilations = []
    for name, fn, blocks in [("lstm_forward_sequence", sequence.lstm_forward_sequence_kernel, ("BLOCK_H", "BLOCK_P")),
                             ("lstm_backward_sequence", sequence.lstm_backward_sequence_kernel,
                              ("BLOCK_H", "BLOCK_P")),
                             ("gru_forward_sequence", sequence.gru_forward_sequence_kernel, ("BLOCK_H",)),
                             ("gru_backward_sequence", sequence.gru_backward_sequence_kernel, ("BLOCK_H",)),
                             ("rnn_forward_sequence", sequence.rnn_forward_sequence_kernel, ("BLOCK_H",)),
                             ("rnn_backward_sequence", sequence.rnn_backward_sequence_kernel, ("BLOCK_H",))]:
        fixed = dict(DOT_DTYPE=dtype, BLOCK_B=config.BLOCK_B, **{block: width for block in blocks})
        if "LAYER_NORM" in fn.arg_names:
            compilations.append(Compilation(name, fn, _heaviest(fn, LAYER_NORM=False, **fixed), f"H=P={width}", warps))
            compilations.append(Compilation(name, fn, _heaviest(fn, **fixed), f"H=P={width} layer_norm", warps))
        else:
            compilations.append(Compilation(name, fn, _heaviest(fn, **fixed), f"H=P={width}", warps))
    return compilations


def step_compilations(dtype, torch_dtype: torch.dtype, all_tiles: bool) -> List[Compilation]:
    """The eight step kernels at each autotune tile: those offered for `torch_dtype`, or
    every tile of config.compiled_step_configs() with all_tiles."""
    kernels = [("lstm_forward_step", step.lstm_forward_step_kernel),
               ("lstm_projection_step", step.lstm_projection_step_kernel),
               ("lstm_backward_hidden_step", step.lstm_backward_hidden_step_kernel),
               ("lstm_backward_cell_step", step.lstm_backward_cell_step_kernel),
               ("gru_forward_step", step.gru_forward_step_kernel),
               ("gru_backward_step", step.gru_backward_step_kernel),
               ("rnn_forward_step", step.rnn_forward_step_kernel),
               ("rnn_backward_step", step.rnn_backward_step_kernel)]
    compilations = []
    for name, autotuned in kernels:
        tiles = config.compiled_step_configs()
        if not all_tiles:
            tiles = config.spill_free_step_configs(name, tiles, torch_dtype)
        for tile in tiles:
            block_n, block_k = tile.kwargs["BLOCK_N"], tile.kwargs["BLOCK_K"]
            constexprs = _heaviest(autotuned.fn, DOT_DTYPE=dtype, BLOCK_B=config.BLOCK_B, BLOCK_N=block_n,
                                   BLOCK_K=block_k)
            compilations.append(Compilation(name, autotuned.fn, constexprs, f"N={block_n} K={block_k}",
                                            tile.num_warps))
    return compilations


def automatic_widths(torch_dtype: torch.dtype) -> List[int]:
    """Padded widths at which config.choose_strategy picks the sequence kernels for `torch_dtype`."""
    widths, width = [], config.MIN_BLOCK
    while width <= config.SEQUENCE_MAX_WIDTH.get(torch_dtype, 0):
        widths.append(width)
        width *= 2
    return widths


def check_plan(dtype_names: Iterable[str]) -> List[Tuple[str, Compilation]]:
    """(dtype name, compilation) for every kernel at every configuration the automatic
    dispatcher can pick in those dtypes."""
    plan = []
    for dtype_name in dtype_names:
        dtype, torch_dtype = _DTYPES[dtype_name]
        for width in automatic_widths(torch_dtype):
            plan += [(dtype_name, c) for c in sequence_compilations(dtype, width)]
        plan += [(dtype_name, c) for c in step_compilations(dtype, torch_dtype, all_tiles=False)]
    return plan


def check(arch: int, dtype_names: List[str]) -> int:
    """Compiles check_plan(dtype_names) for sm_`arch`; prints one line per compilation and a
    summary; returns the number of compilations that spill or exceed the shared memory."""
    limit = SHARED_MEMORY_PER_BLOCK[arch]
    failures = 0
    plan = check_plan(dtype_names)
    for dtype_name, c in plan:
        r = compile_report(c.fn, c.constexprs, _DTYPES[dtype_name][0], arch, c.num_warps)
        problems = ([f"{r['spills']} bytes spilled"] if r["spills"] else []) + (
            [f"shared memory {r['shared']} > {limit}"] if r["shared"] > limit else [])
        failures += bool(problems)
        print(f"sm_{arch} {dtype_name} {c.name} {c.tile} warps={c.num_warps}: {r['registers']} registers, "
              f"{r['spills']} spilled bytes, {r['shared']} shared bytes" + (f"  FAIL: {', '.join(problems)}"
                                                                            if problems else ""), flush=True)
    print(f"checked {len(plan)} compilations for sm_{arch}: {failures} failing (limit: no spills, "
          f"shared memory <= {limit} bytes)")
    return failures


def table(archs: List[int], dtype_names: List[str], widths: Iterable[int]) -> List[str]:
    """Markdown table: one row per kernel and configuration, one column per arch and dtype
    with registers / spilled bytes / shared bytes; rows the automatic dispatcher never
    picks in some dtype are marked."""
    columns = [(arch, name) for arch in archs for name in dtype_names]
    rows: Dict[Tuple[str, str, int], Dict[Tuple[int, str], str]] = {}
    automatic = {name: {(c.name, c.tile) for _, c in check_plan([name])} for name in dtype_names}
    for arch in archs:
        for dtype_name in dtype_names:
            dtype, torch_dtype = _DTYPES[dtype_name]
            compilations = [c for width in widths for c in sequence_compilations(dtype, width)]
            compilations += step_compilations(dtype, torch_dtype, all_tiles=True)
            for c in compilations:
                r = compile_report(c.fn, c.constexprs, dtype, arch, c.num_warps)
                cell = f"{r['registers']} / {r['spills']} / {r['shared']}"
                if (c.name, c.tile) not in automatic[dtype_name]:
                    cell += " (not auto)"
                rows.setdefault((c.name, c.tile, c.num_warps), {})[(arch, dtype_name)] = cell
                print(f"compiled sm_{arch} {dtype_name} {c.name} {c.tile}: {cell}", file=sys.stderr, flush=True)
    header = "| kernel | config | warps | " + " | ".join(f"sm_{a} {n}" for a, n in columns) + " |"
    lines = [header, "|" + "---|" * (3 + len(columns))]
    for (name, tile, warps), cells in rows.items():
        lines.append(f"| {name} | {tile} | {warps} | " + " | ".join(cells.get(col, "") for col in columns) + " |")
    return lines


def report(arch: int, dtype, widths: Iterable[int]) -> List[str]:
    """One arch and dtype: every kernel at `widths` and at every autotune tile."""
    lines = [f"sm_{arch}, {_TL_NAMES[dtype]}: kernel | tile | warps | registers/thread | spilled bytes | shared bytes",
             "---|---|---|---|---|---"]
    torch_dtype = next(t for d, t in _DTYPES.values() if d == dtype)
    compilations = [c for width in widths for c in sequence_compilations(dtype, width)]
    for c in compilations + step_compilations(dtype, torch_dtype, all_tiles=True):
        r = compile_report(c.fn, c.constexprs, dtype, arch, c.num_warps)
        lines.append(f"{c.name} | {c.tile} | {c.num_warps} | {r['registers']} | {r['spills']} | {r['shared']}")
    return lines


def sweep(arch: int, dtype, width: int, step_tile: int) -> List[str]:
    """Compiles every kernel with its boolean specialisations all on, all off, and each
    flipped alone from the heaviest form; returns one line per specialisation. A compiler
    error raises; a compiler crash ends the process (run it in its own)."""
    kernels = sequence_compilations(dtype, width)
    kernels += [c for c in step_compilations(dtype, torch.float16, all_tiles=True)
                if c.tile == f"N={step_tile} K={step_tile}"]
    lines = []
    for c in kernels:
        flags = [k for k, v in c.constexprs.items() if isinstance(v, bool)]
        variants = [dict(c.constexprs, **{k: value for k in flags}) for value in (True, False)]
        variants += [dict(c.constexprs, **{k: not c.constexprs[k]}) for k in flags]
        for variant in variants:
            r = compile_report(c.fn, variant, dtype, arch, c.num_warps)
            switched_on = "+".join(k for k in flags if variant[k]) or "none"
            lines.append(f"{c.name} [{switched_on}]: {r['registers']} registers, {r['spills']} spilled bytes")
    return lines


def _int_list(text: str) -> List[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _dtype_list(text: str) -> List[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in _DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(_DTYPES)}")
    return names


def _arch(text: str) -> int:
    arch = int(text) if text.isdigit() else -1
    if arch not in SHARED_MEMORY_PER_BLOCK:
        raise argparse.ArgumentTypeError(f"supported architectures: {', '.join(map(str, SHARED_MEMORY_PER_BLOCK))}")
    return arch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail on spills or shared memory over the limit at "
                      "every configuration the automatic dispatcher picks")
    mode.add_argument("--table", action="store_true", help="every kernel x config x arch x dtype, as markdown")
    mode.add_argument("--sweep", action="store_true",
                      help="compile every boolean specialisation of every kernel (first width, 32x32 step tiles)")
    parser.add_argument("--arch", type=_arch, default=90, help="compute capability: 80 or 90")
    parser.add_argument("--archs", type=lambda t: [_arch(a) for a in t.split(",")], default=[80, 90],
                        help="--table: compute capabilities")
    parser.add_argument("--dtype", default="float16", choices=list(_DTYPES))
    parser.add_argument("--dtypes", type=_dtype_list, default=None,
                        help="--check (default float32,bfloat16) / --table (default float16,bfloat16,float32)")
    parser.add_argument("--widths", type=_int_list, default=[16, 32, config.SEQUENCE_HARD_MAX_WIDTH],
                        help="padded hidden sizes of the sequence kernels")
    args = parser.parse_args()
    if config.interpreted():
        parser.exit(2, "resources: unset TRITON_INTERPRET: the interpreter compiles nothing\n")
    if args.check:
        sys.exit(1 if check(args.arch, args.dtypes or ["float32", "bfloat16"]) else 0)
    if args.table:
        lines = table(args.archs, args.dtypes or ["float16", "bfloat16", "float32"], args.widths)
    elif args.sweep:
        lines = sweep(args.arch, _DTYPES[args.dtype][0], args.widths[0], 32)
    else:
        lines = report(args.arch, _DTYPES[args.dtype][0], args.widths)
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
