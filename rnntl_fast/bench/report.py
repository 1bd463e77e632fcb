"""Machine description, markdown table, summaries (geometric means, goals), JSON and plot."""
import json
import math
import os
import platform
import textwrap
from typing import Dict, List, Optional, Sequence

import torch

from ..machine import cpu_model
from .workloads import CELLS, HOOKS, TORCH, WITHOUT

# The project's targets (docs/benchmarks.md), written into the JSON summary next to the
# measured geometric means (never asserted):
# (group, cell, mode) -> minimum speedup of the compiled rnntl_fast backend over torch.nn.
GOALS = {
    ("ops", "lstm", "training"): 0.9,
    ("ops", "gru", "training"): 1.5,
    ("packed", "lstm", "training"): 2.0,
    ("proj", "lstm", "training"): 1.5,
    ("proj", "lstm", "inference"): 1.5,
    ("stack", "gru", "training"): 1.5,
    ("stack", "gru", "inference"): 1.5,
    ("rnn", "rnn", "training"): 1.5,
}
# Regularizer rows (group "regularizers"): the most a regularizer may cost over the same
# module without it, and the least speedup over the cell loop that users write for it.
REGULARIZER_MAX_COST = 1.15
REGULARIZER_MIN_SPEEDUP_VS_CELLS = 3.0
BASELINES = (TORCH, HOOKS, CELLS, WITHOUT)  # the providers other rows are compared with


# Printed under the tables: what each column means.
TABLE_COLUMNS = textwrap.fill(
    "Columns: case = cell, T steps, B batch rows, I input and H hidden features (L layers, bidir, P proj_size, "
    "packed = variable lengths as a PackedSequence); mode = inference (no-grad forward), training (forward + "
    "backward), frozen (backward with the recurrent weights frozen), clip (training with grad_clip=1.0); "
    "time = median ms per step; speedup vs torch.nn = median over rounds of torch.nn's time / this time "
    "(> 1 is faster), and for regularizer rows the same against the cell loop with the regularizer and the cost "
    "= this time / the time without the regularizer; GFLOP/s = the recurrent layers' FLOPs per step / time; "
    "% of GEMM = that rate over a "
    "same-size torch.mm timed in the same rounds; peak MB = memory torch allocates during one step "
    "(training modes only, else -); faults/step = minor page faults of the process per step, median over "
    "rounds (fresh pages touched: about 1 us each, part of the time; docs/benchmarks.md).", 100)
SUMMARY_COLUMNS = textwrap.fill("Columns: group = the kind of rows summarised (plain, stack = 2-layer bidirectional, packed, "
                   "proj = proj_size, frozen, clip, ops = the op grid, regularizers, rnn = the Elman RNN, short = short "
                   "sequences, tiny = the smoke-test grid, custom = size flags); rows = how many "
                   "cases; geomean speedup = geometric mean of those rows' speedups over torch.nn (and over "
                   "the per-step clamp-hook loop for clip rows, over the cell loop and the cost for regularizer "
                   "rows).", 100)


def timing_environment() -> dict:
    """The environment variables set for this run that change what is timed: rnntl_fast's
    kernel choices (docs/ENVIRONMENT.md: the CPU products, step loops and reused buffers, the
    GPU strategies, Triton's interpreter) and glibc's and torch's allocator settings (page
    faults: docs/cpu.md, "Memory")."""
    names = ("RNNTL_CUDA_STRATEGY", "RNNTL_TRITON_STRATEGY", "TRITON_INTERPRET", "GLIBC_TUNABLES",
             "THP_MEM_ALLOC_ENABLE")
    return {name: value for name, value in sorted(os.environ.items())
            if name.startswith(("RNNTL_CPU_", "MALLOC_")) or name in names}


def machine_info(device: str) -> dict:
    """What the timings depend on: hardware, thread count, versions and torch's backend."""
    from .. import __version__, _ext
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rnntl_fast": __version__,
        "rnntl_fast_extension": bool(_ext.HAS_CPU_KERNELS),
        "device": device,
        "python": platform.python_version(),
        # Shared machines: the load when the run started says how much the numbers can be trusted.
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "environment": timing_environment(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
        info["torch_backend"] = f"cuDNN {torch.backends.cudnn.version()}"
    else:
        info["torch_backend"] = "oneDNN (mkldnn)" if torch.backends.mkldnn.is_available() else "ATen"
    return info


def machine_line(info: dict) -> str:
    where = f"GPU {info['gpu']} (CUDA {info['cuda']}), " if "gpu" in info else ""
    return (f"**Machine:** {where}CPU {info['cpu']}, {info['cores']} cores, {info['threads']} torch "
            f"thread{'s' if info['threads'] != 1 else ''}; "
            f"torch {info['torch']}, rnntl_fast {info['rnntl_fast']}; torch.nn backend {info['torch_backend']}; "
            f"device {info['device']}; load average {info['load_average']} at start"
            + "".join(f"; {name}={value}" for name, value in info.get("environment", {}).items()))


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) + suffix


def markdown_table(rows: List[dict]) -> str:
    """One line per (case, provider). Speedup = torch.nn time / this time, median of the
    per-round ratios; > 1 means faster than torch.nn."""
    lines = ["| case | mode | provider | time (ms) | speedup vs torch.nn | GFLOP/s | % of GEMM | peak MB | faults/step |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for row in rows:
        if row["status"] != "ok":
            notes.append(f"- {row['label']} {row['mode']}, {row['provider']}: {row['note']}")
            continue
        speedup = _fmt(row["speedup_vs_torch"], ".2f", "x")
        if row.get("speedup_vs_hooks") is not None and row["provider"] != HOOKS:
            speedup += f" ({row['speedup_vs_hooks']:.1f}x vs hooks)"
        if row["provider"] not in BASELINES:
            extra = [f"{row['speedup_vs_cells']:.1f}x vs cell loop"] if row.get("speedup_vs_cells") is not None else []
            extra += [f"cost {row['cost_vs_without']:.2f}x"] if row.get("cost_vs_without") is not None else []
            speedup += f" ({', '.join(extra)})" if extra else ""
        lines.append(f"| {row['label']} | {row['mode']} | {row['description']} | {row['time_ms']:.3f} | {speedup} | "
                     f"{_fmt(row['gflops'], '.1f')} | {_fmt(row['gemm_fraction'], '.0%')} | "
                     f"{_fmt(row['peak_memory_mb'], '.1f')} | {_fmt(row.get('page_faults_per_step'), '.0f')} |")
    if notes:
        lines += ["", "Not measured:"] + notes
    return "\n".join(lines)


def geometric_mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and v > 0 and not math.isnan(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def summarize(rows: List[dict]) -> List[dict]:
    """Geometric-mean speedup vs torch.nn per (group, cell, mode, regularizer, provider), over
    the rnntl_fast providers and the cell loops, with the speed goal where there is one."""
    buckets: Dict[tuple, List[dict]] = {}
    for row in rows:
        if row["status"] == "ok" and row["provider"] != TORCH:
            key = (row["group"], row["cell"], row["mode"], row.get("regularizer", ""), row["provider"])
            buckets.setdefault(key, []).append(row)
    summary = []
    for (group, cell, mode, regularizer, provider), members in sorted(buckets.items()):
        entry = {"group": group, "cell": cell, "mode": mode, "regularizer": regularizer, "provider": provider,
                 "rows": len(members),
                 "geomean_speedup_vs_torch": geometric_mean([m["speedup_vs_torch"] for m in members])}
        hooks = [m["speedup_vs_hooks"] for m in members if m.get("speedup_vs_hooks") is not None]
        if hooks and provider != HOOKS:
            entry["geomean_speedup_vs_hooks"] = geometric_mean(hooks)
        cells = [m["speedup_vs_cells"] for m in members if m.get("speedup_vs_cells") is not None]
        costs = [m["cost_vs_without"] for m in members if m.get("cost_vs_without") is not None]
        if cells and provider not in BASELINES:
            entry["geomean_speedup_vs_cells"] = geometric_mean(cells)
            entry["worst_speedup_vs_cells"] = min(cells)
        if costs and provider not in BASELINES:
            entry["geomean_cost_vs_without"] = geometric_mean(costs)
            entry["worst_cost_vs_without"] = max(costs)
        if cells and costs and provider not in BASELINES:
            if provider != "reference":
                entry["meets_goal"] = (entry["worst_cost_vs_without"] <= REGULARIZER_MAX_COST
                                       and entry["worst_speedup_vs_cells"] >= REGULARIZER_MIN_SPEEDUP_VS_CELLS)
        goal = GOALS.get((group, cell, mode))
        if goal is not None and provider not in BASELINES + ("reference",):
            entry["goal"] = goal
            entry["meets_goal"] = entry["geomean_speedup_vs_torch"] >= goal
        summary.append(entry)
    return summary


def summary_markdown(summary: List[dict]) -> str:
    lines = ["| group | cell | mode | provider | rows | geomean speedup vs torch.nn |",
             "|---|---|---|---|---:|---:|"]
    for entry in summary:
        speedup = _fmt(entry["geomean_speedup_vs_torch"], ".2f", "x")
        if "geomean_speedup_vs_hooks" in entry:
            speedup += f" ({entry['geomean_speedup_vs_hooks']:.1f}x vs hooks)"
        extra = []
        if "geomean_speedup_vs_cells" in entry:
            extra.append(f"{entry['geomean_speedup_vs_cells']:.1f}x vs cell loop, worst "
                         f"{entry['worst_speedup_vs_cells']:.1f}x")
        if "geomean_cost_vs_without" in entry:
            extra.append(f"cost {entry['geomean_cost_vs_without']:.2f}x, worst {entry['worst_cost_vs_without']:.2f}x")
        speedup += f" ({'; '.join(extra)})" if extra else ""
        cell = f"{entry['cell']} {entry['regularizer']}".strip()
        lines.append(f"| {entry['group']} | {cell} | {entry['mode']} | {entry['provider']} | "
                     f"{entry['rows']} | {speedup} |")
    return "\n".join(lines)


def write_json(path: str, document: dict) -> None:
    def clean(value):  # JSON has no NaN
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    with open(path, "w") as handle:
        json.dump(clean(document), handle, indent=2)
        handle.write("\n")


def write_plot(path: str, rows: List[dict], title: str) -> None:
    """Speedup vs torch.nn (log scale) per case and mode, one marker per provider."""
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    measured = [r for r in rows if r["status"] == "ok" and r["provider"] != TORCH and r["speedup_vs_torch"]]
    keys = []
    for row in measured:
        key = f"{row['label']} {row['mode']}"
        if key not in keys:
            keys.append(key)
    providers = sorted({r["provider"] for r in measured})
    markers = "os^Dv<>P"
    figure, axis = plt.subplots(figsize=(9, 1.5 + 0.22 * max(len(keys), 1)), dpi=80)
    for index, provider in enumerate(providers):
        points = [(r["speedup_vs_torch"], keys.index(f"{r['label']} {r['mode']}"))
                  for r in measured if r["provider"] == provider]
        if points:
            xs, ys = zip(*points)
            axis.scatter(xs, ys, marker=markers[index % len(markers)], label=provider, s=22)
    axis.axvline(1.0, color="grey", linewidth=0.8)
    axis.set_xscale("log")
    speedup_format = FuncFormatter(lambda value, _: f"{value:g}x")
    axis.xaxis.set_major_formatter(speedup_format)
    # label the 2s and 5s of each decade between the major ticks (0.2x, 0.5x, 2x, 5x)
    axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}x" if f"{value:.0e}"[0] in "25" else ""))
    axis.set_yticks(range(len(keys)))
    axis.set_yticklabels(keys, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("speedup vs torch.nn (torch.nn time / time; > 1 is faster)")
    axis.set_title(textwrap.fill(title, 120), fontsize=7)
    axis.grid(axis="x", which="both", alpha=0.3)
    if providers:
        axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
