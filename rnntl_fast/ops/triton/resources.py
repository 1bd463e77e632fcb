"""Compile the Triton kernels for a CUDA architecture without a GPU and print what ptxas
reports per kernel: registers per thread, spilled bytes, shared memory.

    python -m rnntl_fast.ops.triton.resources [--arch 90] [--dtype float16] [--widths 16,32,64] [--sweep]

Uses the ptxas bundled with triton; needs no GPU and no CUDA driver. Run it without
TRITON_INTERPRET (the interpreter compiles nothing). The sequence kernels keep W_hh (and
W_hr) in registers, so their spill count per width is what bounds
config.SEQUENCE_MAX_WIDTH.
"""
import argparse
import os
import re
import subprocess
import tempfile
from typing import Dict, Iterable, List, Tuple


import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from . import config, sequence, step

_TL_NAMES = {tl.float16: "fp16", tl.bfloat16: "bf16", tl.float32: "fp32"}

# Pointer arguments in the input dtype (everything else is float32 reserve, or int64 lengths).
_INPUT_DTYPE_POINTERS = {"input_gates_ptr", "weight_hh_ptr", "bias_hh_ptr", "weight_hr_ptr", "h0_ptr", "c0_ptr",
                         "output_ptr", "h_n_ptr", "c_n_ptr", "grad_output_ptr", "grad_h_n_ptr", "grad_c_n_ptr"}
_FLOAT_SCALARS = {"cell_clip", "proj_clip", "state_clip", "gate_clip"}


def _signature(fn, dtype_name: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "lengths_ptr":
            signature[name] = "*i64"
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
    (the compiled kernel object only knows them once loaded on a device)."""
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas triton itself uses for this arch
    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", source, "-o",
                                 os.path.join(folder, "kernel.cubin")], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr.strip()}")
    text = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return registers, spilled


def _sequence_kernels(dtype, width: int):
    common = dict(HAS_LENGTHS=True, REVERSE=False, DOT_DTYPE=dtype, BLOCK_B=config.BLOCK_B)
    lstm_forward = dict(common, HAS_PROJ=False, HAS_H0=True, HAS_C0=True, CELL_CLIP=True,
                        PROJ_CLIP=True, SAVE=True, BLOCK_H=width, BLOCK_P=width)
    lstm_backward = dict(common, HAS_PROJ=False, HAS_C0=True, CELL_CLIP=True, PROJ_CLIP=True, STATE_CLIP=True,
                         GATE_CLIP=False, BLOCK_H=width, BLOCK_P=width)
    gru_forward = dict(common, HAS_H0=True, SAVE=True, BLOCK_H=width)
    gru_backward = dict(common, HAS_H0=True, STATE_CLIP=True, GATE_CLIP=False, BLOCK_H=width)
    return [("lstm_forward_sequence", sequence.lstm_forward_sequence_kernel, lstm_forward, 4),
            ("lstm_backward_sequence", sequence.lstm_backward_sequence_kernel, lstm_backward, 4),
            ("gru_forward_sequence", sequence.gru_forward_sequence_kernel, gru_forward, 3),
            ("gru_backward_sequence", sequence.gru_backward_sequence_kernel, gru_backward, 3)]


def _step_kernels(dtype, block_n: int, block_k: int):
    common = dict(HAS_LENGTHS=True, DOT_DTYPE=dtype, BLOCK_B=config.BLOCK_B, BLOCK_N=block_n, BLOCK_K=block_k)
    return [
        ("lstm_forward_step", step.lstm_forward_step_kernel.fn,
         dict(common, HAS_PROJ=False, CELL_CLIP=True, PROJ_CLIP=True, SAVE=True)),
        ("lstm_projection_step", step.lstm_projection_step_kernel.fn, dict(common, PROJ_CLIP=True, SAVE=True)),
        ("lstm_backward_hidden_step", step.lstm_backward_hidden_step_kernel.fn,
         dict(common, FIRST=False, PROJ_CLIP=True, STATE_CLIP=True)),
        ("lstm_backward_cell_step", step.lstm_backward_cell_step_kernel.fn,
         dict(common, HAS_PROJ=True, HAS_C_PREV=True, CELL_CLIP=True, STATE_CLIP=True, GATE_CLIP=False)),
        ("gru_forward_step", step.gru_forward_step_kernel.fn, dict(common, SAVE=True)),
        ("gru_backward_step", step.gru_backward_step_kernel.fn,
         dict(common, FIRST=False, HAS_H_PREV=True, STATE_CLIP=True, GATE_CLIP=False)),
    ]


def report(arch: int, dtype, widths: Iterable[int]) -> List[str]:
    lines = [f"sm_{arch}, {_TL_NAMES[dtype]}: kernel | tile | warps | registers/thread | spilled bytes | shared bytes",
             "---|---|---|---|---|---"]
    for width in widths:
        for name, fn, constexprs, gates in _sequence_kernels(dtype, width):
            warps = config.sequence_num_warps()
            r = compile_report(fn, constexprs, dtype, arch, warps)
            lines.append(f"{name} | H=P={width} | {warps} | {r['registers']} | {r['spills']} | {r['shared']}")
    for step_config in config.step_configs():
        block_n, block_k = step_config.kwargs["BLOCK_N"], step_config.kwargs["BLOCK_K"]
        for name, fn, constexprs in _step_kernels(dtype, block_n, block_k):
            r = compile_report(fn, constexprs, dtype, arch, step_config.num_warps)
            lines.append(f"{name} | N={block_n} K={block_k} | {step_config.num_warps} | {r['registers']} | "
                         f"{r['spills']} | {r['shared']}")
    return lines


def sweep(arch: int, dtype, width: int, step_tile: int) -> List[str]:
    """Compiles every kernel with its boolean specialisations all on, all off, and each
    flipped alone from the report's defaults; returns one line per specialisation. A
    compiler error raises; a compiler crash ends the process (run it in its own)."""
    kernels = [(name, fn, constexprs, config.sequence_num_warps())
               for name, fn, constexprs, _ in _sequence_kernels(dtype, width)]
    kernels += [(name, fn, constexprs, 4) for name, fn, constexprs in _step_kernels(dtype, step_tile, step_tile)]
    lines = []
    for name, fn, constexprs, warps in kernels:
        flags = [k for k, v in constexprs.items() if isinstance(v, bool)]
        variants = [dict(constexprs, **{k: value for k in flags}) for value in (True, False)]
        variants += [dict(constexprs, **{k: not constexprs[k]}) for k in flags]
        for variant in variants:
            r = compile_report(fn, variant, dtype, arch, warps)
            switched_on = "+".join(k for k in flags if variant[k]) or "none"
            lines.append(f"{name} [{switched_on}]: {r['registers']} registers, {r['spills']} spilled bytes")
    return lines


def main() -> None:
    if config.interpreted():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--widths", default="16,32,64", help="padded hidden sizes of the sequence kernels")
    parser.add_argument("--sweep", action="store_true",
                        help="compile every boolean specialisation of every kernel (first width, 32x32 step tiles)")
    args = parser.parse_args()
    dtype = {"float16": tl.float16, "bfloat16": tl.bfloat16, "float32": tl.float32}[args.dtype]
    widths = [int(w) for w in args.widths.split(",")]
    lines = sweep(args.arch, dtype, widths[0], 32) if args.sweep else report(args.arch, dtype, widths)
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
