"""Time rnntl_fast's LSTM/GRU/RNN against torch.nn on the same device, in one process, and
report same-run speedups; `rnntl-fast bench` (also `python -m rnntl_fast bench`).

    rnntl-fast bench                         # the default grid (module rows: stacks, packed, proj_size, ...)
    rnntl-fast bench --grid ops              # the op grid, geometric means per cell/mode
    rnntl-fast bench --cell lstm --T 50,100 --B 16 --I 128 --H 128,256 --mode training
    rnntl-fast bench --grid regularizers     # each regularizer's cost and speedup vs the cell loop; Elman RNN rows
    rnntl-fast bench --grid short            # one step at a time and short sequences (LSTM, GRU, Elman RNN)
    rnntl-fast bench --cell lstm --T 100 --B 32 --mode training --regularizer zoneout,layer_norm
    rnntl-fast bench --grid tiny --json out.json --plot out.png

Protocol (docs/benchmarks.md): every provider is warmed up, then timed in interleaved
rounds (order rotated per round, each sample long enough for the timer); the table gives
median seconds per step, and the speedup over torch.nn is the median of the per-round
ratios taken in this run. Size flags take comma lists and form a cartesian grid; named
grids (--grid) fix the sizes, and --cell / --mode then filter them.

Modes: inference (no_grad forward); training (forward + backward, input and weights get
gradients); frozen (forward + backward with all recurrent weights frozen, only the input
gets a gradient); clip (training with grad_clip=1.0, "state" mode; torch.nn runs unclipped
as the floor, and the cell loop with clamp hooks, what users write otherwise, is timed too).
--lengths uniform draws row lengths uniformly in [ceil(T/2), T] (seed --seed, longest = T)
and feeds both torch.nn and rnntl_fast a PackedSequence packed inside the timed step.

GFLOP/s counts per step and batch row 8*H*(I+P) (+2*P*H projection) for LSTM,
6*H*(I+H) for GRU and 2*H*(I+H) for the Elman RNN, per layer and direction, over valid
steps only; training = 3x forward, frozen = 2x, inference = 1x. "% of GEMM" divides that
by the GFLOP/s of a torch.mm of [T*B, I+P] @ [I+P, G*H] timed in the same rounds as the providers (same FLOPs as one
forward layer-direction; oneDNN's fused RNN can beat a plain torch.mm, so > 100% happens).
Peak memory (training modes): bytes torch allocates during one step above what was live
before it; CUDA: torch.cuda.max_memory_allocated; CPU: running sum of torch.profiler's
allocator events (memory a library takes from malloc directly is not seen).

JSON (--json FILE), schema "rnntl_fast.bench/1":
    schema: str; command: str (the flags, as a command that reproduces the run);
    machine: {cpu, cores, threads, torch, rnntl_fast, rnntl_fast_extension, device, python,
        load_average (1-minute, at start), torch_backend, environment (the variables set for the
        run that change what is timed: RNNTL_CPU_*, the GPU strategies, TRITON_INTERPRET and
        the allocator settings, docs/benchmarks.md)[, gpu, cuda]};
    settings: {grid, repeats, sample_ms, warmup_ms, seed, threads, providers,
        reference_max_steps, reference_max_forward_flops, clip_value};
    results: list of rows, one per (case, provider):
        cell, mode, T, B, I, H, layers, bidirectional, proj_size, lengths, dtype, device,
        group, label: the case;
        regularizer: "" or recurrent_dropout, zoneout, weight_drop, layer_norm (docs/semantics.md);
        provider: "torch", "torch-hooks", "torch-cells", "without", "cpu", "cuda", "triton" or
            "reference";
        description: human name; status: "ok" or "skipped"; note: why skipped (else "");
        time_ms: median ms per step; samples_ms: every sample (ms per step);
        calls_per_sample: int; speedup_vs_torch: median per-round torch.nn/this ratio;
        speedup_vs_hooks: same against the hook loop (clip mode), else null;
        flops: FLOPs per step (as above); gflops: flops / median time;
        gemm_gflops: the same-run GEMM throughput; gemm_fraction: gflops / gemm_gflops;
        peak_memory_mb: MiB (training modes, else null);
        page_faults_per_step: minor page faults of the process per step, median over the rounds
            (null where the OS does not count them);
        speedup_vs_cells: regularizer rows, same against the cell loop with the regularizer, else
        null; cost_vs_without: regularizer rows, median per-round this/without-the-regularizer;
    summary: list of {group, cell, mode, regularizer, provider, rows, geomean_speedup_vs_torch
        [, geomean_speedup_vs_hooks][, geomean_speedup_vs_cells, worst_speedup_vs_cells,
        geomean_cost_vs_without, worst_cost_vs_without][, goal][, meets_goal]}; goal: the
        project's target speedup of the compiled backend over torch.nn for that group
        (docs/benchmarks.md), where one is set; regularizer rows meet theirs when every row
        costs <= 1.15x and is >= 3x faster than the cell loop.
Times, speedups and FLOP rates of skipped rows are null.
"""
import argparse
import shlex
from typing import Callable, List

from ..cli_types import device as _device
from ..cli_types import non_negative_int as _non_negative_int
from ..cli_types import output_file as _output_file
from ..cli_types import positive_float as _positive_float
from ..cli_types import positive_int as _positive_int
from . import grids
from .grids import CELLS, DTYPES, GRID_CELLS, LENGTHS, MODES

SCHEMA = "rnntl_fast.bench/1"
DEFAULT_REPEATS = 15
BACKEND_CHOICES = ("auto", "cpu", "cuda", "triton", "reference", "torch", "torch-hooks", "torch-cells", "without")
SIZE_FLAGS = ("T", "B", "I", "H", "layers", "bidirectional", "proj_size", "lengths", "regularizer")
NO_REGULARIZER = "none"
# Sizes of a custom grid for the size flags that were not given.
CUSTOM_DEFAULTS = {"T": [100], "B": [32], "I": [256], "H": [256], "layers": [1], "bidirectional": [False],
                   "proj_size": [0], "lengths": ["full"], "regularizer": [""]}


# -- argument types: each raises ArgumentTypeError, which argparse reports naming the flag --
def _list_of(convert: Callable, what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",")]
        if not items or any(item == "" for item in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return [convert(item) for item in items]
    return parse


def _choice(choices) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def _regularizer(text: str) -> str:
    """A --regularizer item: "" for none, else a key of grids.REGULARIZERS."""
    if text == NO_REGULARIZER:
        return ""
    return _choice(tuple(grids.REGULARIZERS))(text)


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser.epilog = "Named grids: default, tiny, ops, regularizers, short. The JSON fields: docs/benchmarks.md."
    what = parser.add_argument_group("what to time (size flags take comma lists and form a grid)")
    what.add_argument("--grid", choices=sorted(grids.GRIDS), help="a named grid (default: 'default' unless "
                      "size flags are given); --cell and --mode filter it")
    what.add_argument("--cell", type=_list_of(_choice(CELLS), "cells"),
                      help="lstm, gru, rnn (Elman, tanh; size flags only) (default: lstm,gru)")
    what.add_argument("--mode", type=_list_of(_choice(MODES), "modes"),
                      help="inference, training, frozen, clip (custom grid default: inference,training)")
    what.add_argument("--T", type=_list_of(_positive_int, "step counts"), help="sequence length(s)")
    what.add_argument("--B", type=_list_of(_positive_int, "batch sizes"), help="batch size(s)")
    what.add_argument("--I", type=_list_of(_positive_int, "input sizes"), help="input size(s)")
    what.add_argument("--H", type=_list_of(_positive_int, "hidden sizes"), help="hidden size(s)")
    what.add_argument("--layers", type=_list_of(_positive_int, "layer counts"), help="num_layers")
    what.add_argument("--bidirectional", nargs="?", const="true", type=_list_of(_boolean, "true/false values"),
                      help="bidirectional stacks; alone means true, or a list such as false,true")
    what.add_argument("--proj-size", dest="proj_size", type=_list_of(_non_negative_int, "sizes"),
                      help="LSTM proj_size(s), 0 = none (GRU and RNN rows skip values > 0)")
    what.add_argument("--lengths", type=_list_of(_choice(LENGTHS), "length modes"),
                      help="full (every row T steps) or uniform (seeded lengths in [ceil(T/2), T], packed)")
    what.add_argument("--regularizer", type=_list_of(_regularizer, "regularizers"),
                      help=f"none or {', '.join(grids.REGULARIZERS)} (rnntl_fast runs with it, torch.nn "
                           "without; timed with and without it and against the cell loop; training modes)")
    where = parser.add_argument_group("where and how")
    where.add_argument("--dtype", type=_list_of(_choice(DTYPES), "dtypes"),
                       help="float32 (default; on CUDA named grids add float16,bfloat16), float64, float16, bfloat16")
    where.add_argument("--device", type=_device, default=None, help="cpu or cuda[:N] (default: cuda if available)")
    where.add_argument("--backends", type=_list_of(_choice(BACKEND_CHOICES), "backends"), default=["auto"],
                       help="providers to time besides torch.nn: cpu, cuda, triton, reference, torch-hooks, or "
                            "auto = the compiled backend(s) for the device + reference + torch-hooks (default)")
    where.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS,
                       help=f"timed rounds per provider (default {DEFAULT_REPEATS})")
    where.add_argument("--sample-ms", type=_positive_float, default=50.0,
                       help="minimum length of one timed sample in ms (short steps repeat within it)")
    where.add_argument("--warmup-ms", type=_positive_float, default=200.0, help="warm-up per provider, ms")
    where.add_argument("--threads", type=_positive_int, help="torch.set_num_threads (default: torch's)")
    where.add_argument("--seed", type=int, default=0, help="seed of inputs, weights and lengths")
    where.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", type=_output_file, help="write results as JSON (fields: module docstring)")
    out.add_argument("--plot", metavar="FILE", type=_output_file, help="write a PNG of speedup vs torch.nn across the grid")
    out.add_argument("--markdown", metavar="FILE", type=_output_file, help="also write the markdown report to FILE")
    out.add_argument("--no-progress", action="store_true",
                     help="no progress on stderr (a bar on a terminal, else one line per case)")
    out.add_argument("--verbose", action="store_true",
                     help="also show what torch's profiler and allocator print while peak memory is measured")
    parser.set_defaults(bench_parser=parser)


def resolve_cases(args, parser) -> List[grids.Case]:
    """The cases the flags ask for; errors go through parser.error (exit code 2)."""
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    given = [name for name in SIZE_FLAGS if getattr(args, name) is not None]
    if args.grid and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"argument --grid: a named grid fixes the sizes; drop --grid to build a grid from {flags}")
    if given:
        axes = {"cell": args.cell or list(GRID_CELLS), "mode": args.mode or ["inference", "training"]}
        for name in SIZE_FLAGS:
            axes[name] = getattr(args, name) if getattr(args, name) is not None else CUSTOM_DEFAULTS[name]
        axes["dtype"] = args.dtype or ["float32"]
        for proj in axes["proj_size"]:
            if proj and all(proj >= h for h in axes["H"]):
                parser.error(f"argument --proj-size: proj_size {proj} must be smaller than --H")
        cases = grids.product_grid(axes, device)
        if not cases:
            parser.error("argument --proj-size: proj_size applies to LSTM only; add --cell lstm")
        return cases
    dtypes = args.dtype or (["float32", "float16", "bfloat16"] if device.startswith("cuda") else ["float32"])
    grid = grids.named_grid(args.grid or "default", device, dtypes)
    present = sorted({case.cell for case in grid})
    outside = [cell for cell in args.cell or [] if cell not in present]
    if outside:
        parser.error(f"argument --cell: grid {args.grid or 'default'!r} times {', '.join(present)}; give size "
                     f"flags (--T, --B, --I, --H) to time {', '.join(outside)}")
    cases = grids.filter_cases(grid, args.cell, args.mode)
    if not cases:
        parser.error(f"argument --mode: grid {args.grid or 'default'!r} has no rows with cell "
                     f"{args.cell} and mode {args.mode}")
    return cases


def resolve_providers(args, parser) -> List[str]:
    """torch.nn first (every ratio's denominator), then the asked-for providers."""
    import torch
    from .. import _ext
    from ..ops.backend import triton_available
    device = torch.device(args.device)
    providers = ["torch"]
    for name in args.backends:
        if name == "auto":
            if device.type == "cpu":
                expanded = ["cpu"] if _ext.HAS_CPU_KERNELS else []
            else:
                expanded = (["cuda"] if _ext.HAS_CUDA_KERNELS else []) + (["triton"] if triton_available() else [])
            expanded += ["reference", "torch-hooks", "torch-cells", "without"]
        else:
            expanded = [name]
        for provider in expanded:
            if provider in ("cuda", "triton") and device.type != "cuda":
                parser.error(f"argument --backends: backend {provider!r} needs --device cuda")
            if provider == "cpu" and device.type != "cpu":
                parser.error("argument --backends: backend 'cpu' needs --device cpu")
            if provider == "cpu" and not _ext.HAS_CPU_KERNELS:
                parser.error(f"argument --backends: backend 'cpu' needs the compiled extension rnntl_fast._C "
                             f"({_ext.IMPORT_ERROR})")
            if provider == "cuda" and not _ext.HAS_CUDA_KERNELS:
                parser.error("argument --backends: rnntl_fast was built without CUDA kernels (RNNTL_BUILD_CUDA=1)")
            if provider == "triton" and not triton_available():
                parser.error("argument --backends: backend 'triton' needs the triton package")
            if provider not in providers:
                providers.append(provider)
    return providers


def command_line(args) -> str:
    """The flags of this run written back as a command (what reproduces it)."""
    words = ["rnntl-fast", "bench"]
    for action in args.bench_parser._actions:
        if not action.option_strings or action.dest in ("help", "json", "plot", "markdown", "no_progress", "verbose"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value is False or value == action.default:
            continue
        flag = action.option_strings[0]
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, ",".join(str(v).lower() if isinstance(v, bool) else str(v) or NO_REGULARIZER
                                     for v in value)]
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(word) for word in words)


def run(args) -> int:
    import torch
    parser = args.bench_parser
    cases = resolve_cases(args, parser)
    providers = resolve_providers(args, parser)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, cases, providers)
    finally:
        torch.set_num_threads(threads_before)  # callers in the same process keep their setting


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _run(args, cases, providers) -> int:
    from . import report
    from .runner import run_cases
    from .workloads import CLIP_VALUE, REFERENCE_MAX_FORWARD_FLOPS, REFERENCE_MAX_STEPS
    machine = report.machine_info(args.device)  # before the run: the load average at start
    settings = {"grid": args.grid or ("custom" if cases and cases[0].group == "custom" else "default"),
                "repeats": args.repeats, "sample_ms": args.sample_ms, "warmup_ms": args.warmup_ms,
                "seed": args.seed, "threads": torch_threads(), "providers": providers,
                "reference_max_steps": REFERENCE_MAX_STEPS, "reference_max_forward_flops": REFERENCE_MAX_FORWARD_FLOPS,
                "clip_value": CLIP_VALUE}
    rows = run_cases(cases, providers, settings, measure_memory=not args.no_memory,
                     progress=not args.no_progress, verbose=args.verbose)
    summary = report.summarize(rows)
    command = command_line(args)
    text = "\n\n".join([report.machine_line(machine), report.markdown_table(rows), report.TABLE_COLUMNS,
                        "Geometric means:", report.summary_markdown(summary), report.SUMMARY_COLUMNS])
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")
    if args.json:
        report.write_json(args.json, {"schema": SCHEMA, "command": command, "machine": machine,
                                      "settings": settings, "results": rows, "summary": summary})
    if args.plot:
        report.write_plot(args.plot, rows, report.machine_line(machine).replace("**", ""))
    return 0
