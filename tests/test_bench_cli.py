"""`rnntl-fast bench` end to end on a tiny grid: table, JSON fields, PNG, and argument errors.
No timing is asserted (CI machines are shared and noisy)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rnntl_fast import cli
from rnntl_fast.bench import grids, report, timing
from rnntl_fast.bench.workloads import forward_flops, step_flops

# One thread: CI machines are shared, and OpenMP barriers stall when a core is busy.
FAST = ["--repeats", "2", "--sample-ms", "1", "--warmup-ms", "1", "--threads", "1", "--no-progress"]
TINY_SIZES = ["--T", "4", "--B", "2", "--I", "3", "--H", "5"]

ROW_FIELDS = {"cell", "mode", "T", "B", "I", "H", "layers", "bidirectional", "proj_size", "lengths", "dtype",
              "device", "regularizer", "group", "label", "provider", "description", "status", "note", "time_ms",
              "samples_ms", "calls_per_sample", "speedup_vs_torch", "speedup_vs_hooks", "speedup_vs_cells",
              "cost_vs_without", "flops", "gflops", "gemm_gflops",
              "gemm_fraction", "peak_memory_mb", "page_faults_per_step"}
MACHINE_FIELDS = {"cpu", "cores", "threads", "torch", "rnntl_fast", "device", "torch_backend", "environment"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bench(*flags):
    return cli.main(["bench", *flags])


def test_machine_line_names_the_settings_that_change_timings(monkeypatch):
    from rnntl_fast.bench import report
    monkeypatch.setenv("RNNTL_CPU_BUFFER_CACHE_MB", "0")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    monkeypatch.setenv("UNRELATED_VARIABLE", "1")
    info = report.machine_info("cpu")
    assert info["environment"]["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1"
    assert info["environment"]["RNNTL_CPU_BUFFER_CACHE_MB"] == "0"
    assert "UNRELATED_VARIABLE" not in info["environment"]
    line = report.machine_line(info)
    assert "RNNTL_CPU_BUFFER_CACHE_MB=0" in line and "GLIBC_TUNABLES=" in line and "UNRELATED" not in line


def test_tiny_grid_writes_table_json_and_png(tmp_path, capsys):
    json_path, png_path, md_path = tmp_path / "out.json", tmp_path / "out.png", tmp_path / "out.md"
    threads = torch.get_num_threads()
    code = bench("--grid", "tiny", "--device", "cpu", "--mode", "clip", "--cell", "lstm", *FAST,
                 "--json", str(json_path), "--plot", str(png_path), "--markdown", str(md_path))
    assert code == 0
    assert torch.get_num_threads() == threads  # --threads applies to the run only
    printed = capsys.readouterr().out
    assert printed.startswith("**Machine:**")
    assert "torch.nn (oneDNN/ATen)" in printed and "Geometric means:" in printed
    assert md_path.read_text().strip() == printed.strip()

    document = json.loads(json_path.read_text())
    assert document["schema"] == "rnntl_fast.bench/1"
    assert document["command"].startswith("rnntl-fast bench --grid tiny")
    assert MACHINE_FIELDS <= set(document["machine"])
    assert document["settings"]["repeats"] == 2
    rows = document["results"]
    assert rows and all(set(row) == ROW_FIELDS for row in rows)
    assert {row["mode"] for row in rows} == {"clip"}
    assert {row["cell"] for row in rows} == {"lstm"}
    for row in rows:
        assert row["status"] in ("ok", "skipped")
        if row["status"] == "skipped":
            assert row["note"]
            continue
        assert len(row["samples_ms"]) >= 2 and row["time_ms"] > 0 and row["flops"] > 0
        assert row["speedup_vs_torch"] > 0 and row["gemm_gflops"] > 0
        assert row["peak_memory_mb"] is None or row["peak_memory_mb"] >= 0
        assert row["page_faults_per_step"] is None or row["page_faults_per_step"] >= 0
    torch_rows = [row for row in rows if row["provider"] == "torch"]
    assert torch_rows and all(row["speedup_vs_torch"] == pytest.approx(1.0) for row in torch_rows)
    assert any(row["provider"] == "torch-hooks" and row["mode"] == "clip" for row in rows)
    assert all(row["speedup_vs_hooks"] is not None for row in rows if row["mode"] == "clip" and row["status"] == "ok")
    assert {(s["group"], s["cell"], s["mode"]) for s in document["summary"]} == {("tiny", "lstm", "clip")}
    png = png_path.read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 1000


def test_size_flags_form_a_grid(tmp_path, capsys):
    json_path = tmp_path / "grid.json"
    code = bench("--cell", "gru", "--mode", "inference", "--T", "3,4", "--B", "2", "--I", "3", "--H", "5",
                 "--bidirectional", "false,true", "--lengths", "full,uniform", "--backends", "reference",
                 "--device", "cpu", "--no-memory", *FAST, "--json", str(json_path))
    assert code == 0
    rows = json.loads(json_path.read_text())["results"]
    cases = {(r["T"], r["bidirectional"], r["lengths"]) for r in rows}
    assert len(cases) == 2 * 2 * 2
    assert {r["provider"] for r in rows} == {"torch", "reference"}
    assert all(r["group"] == "custom" and r["peak_memory_mb"] is None for r in rows)


def test_elman_rnn_rows_against_torch_nn_rnn(tmp_path):
    json_path = tmp_path / "rnn.json"
    code = bench("--cell", "rnn", "--mode", "training,clip", "--T", "4", "--B", "2", "--I", "3", "--H", "5",
                 "--lengths", "full,uniform", "--backends", "cpu,torch-hooks", "--device", "cpu", "--no-memory",
                 *FAST, "--json", str(json_path))
    assert code == 0
    rows = json.loads(json_path.read_text())["results"]
    assert {r["cell"] for r in rows} == {"rnn"}
    timed = {(r["mode"], r["lengths"], r["provider"]) for r in rows if r["status"] == "ok"}
    assert {("training", "full", "cpu"), ("clip", "uniform", "cpu"), ("clip", "full", "torch-hooks")} <= timed


def test_regularizer_rows_time_with_without_and_the_cell_loop(tmp_path):
    json_path = tmp_path / "regularizers.json"
    code = bench("--cell", "lstm,gru", "--mode", "training", "--T", "4", "--B", "2", "--I", "3", "--H", "5",
                 "--regularizer", "zoneout,weight_drop", "--backends", "cpu,torch-cells,without", "--device", "cpu",
                 "--no-memory", *FAST, "--json", str(json_path))
    assert code == 0
    document = json.loads(json_path.read_text())
    assert "--regularizer zoneout,weight_drop" in document["command"]
    rows = [r for r in document["results"] if r["status"] == "ok"]
    assert {(r["cell"], r["regularizer"], r["provider"]) for r in rows} == {
        (cell, name, provider) for cell in ("lstm", "gru") for name in ("zoneout", "weight_drop")
        for provider in ("torch", "cpu", "torch-cells", "without")}
    fast = [r for r in rows if r["provider"] == "cpu"]
    assert all(r["speedup_vs_cells"] > 0 and r["cost_vs_without"] > 0 for r in fast)
    summary = [e for e in document["summary"] if e["provider"] == "cpu"]
    assert len(summary) == 4 and all("worst_cost_vs_without" in e and "meets_goal" in e for e in summary)


def test_unsupported_dtype_is_a_skipped_row_with_a_reason(tmp_path):
    json_path = tmp_path / "half.json"
    assert bench("--cell", "lstm", "--mode", "inference", *TINY_SIZES, "--dtype", "float16", "--device", "cpu",
                 "--backends", "auto", "--no-memory", *FAST, "--json", str(json_path)) == 0
    rows = json.loads(json_path.read_text())["results"]
    assert rows
    for row in rows:
        assert row["status"] == "ok" or row["note"], row


@pytest.mark.parametrize("flags, flag", [
    (["--T", "0"], "--T"),
    (["--T", "ten"], "--T"),
    (["--B", "4,,5"], "--B"),
    (["--cell", "elman"], "--cell"),
    (["--cell", "rnn"], "--cell"),  # the named grids time lstm and gru only
    (["--mode", "eval"], "--mode"),
    (["--backends", "cudnn"], "--backends"),
    (["--grid", "huge"], "--grid"),
    (["--grid", "ops", "--T", "5"], "--grid"),
    (["--dtype", "int8"], "--dtype"),
    (["--lengths", "random"], "--lengths"),
    (["--regularizer", "dropconnect"], "--regularizer"),
    (["--grid", "regularizers", "--cell", "rnn,lstm", "--regularizer", "zoneout"], "--grid"),
    (["--repeats", "-1"], "--repeats"),
    (["--device", "tpu"], "--device"),
    (["--bidirectional", "maybe"], "--bidirectional"),
    (["--cell", "gru", "--proj-size", "2", "--T", "3"], "--proj-size"),
    (["--cell", "lstm", "--proj-size", "8", "--H", "5"], "--proj-size"),
    (["--backends", "cuda", "--device", "cpu"], "--backends"),
])
def test_bad_options_exit_2_naming_the_flag(flags, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench(*flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert flag in error and "error" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cuda_device_without_cuda_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench("--device", "cuda")
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_command_line_entry_point_and_light_import(tmp_path):
    """`python -m rnntl_fast bench` runs in a fresh process, and importing the bench modules
    imports neither matplotlib nor tqdm (they load only when a plot or a bar is drawn)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # torch itself imports tqdm (torch.hub), so look at what importing the bench modules adds.
    light = subprocess.run([sys.executable, "-c", "import sys, torch, rnntl_fast; before = set(sys.modules); "
                            "import rnntl_fast.bench.cli, rnntl_fast.bench.runner; added = set(sys.modules) - before; "
                            "print(sorted(m for m in added if m.split('.')[0] in ('matplotlib', 'tqdm')))"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert light.returncode == 0, light.stderr
    assert light.stdout.strip() == "[]"
    done = subprocess.run([sys.executable, "-m", "rnntl_fast", "bench", "--cell", "lstm", "--mode", "inference",
                           *TINY_SIZES, "--device", "cpu", "--backends", "reference", "--no-memory", *FAST],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "**Machine:**" in done.stdout and "rnntl_fast reference" in done.stdout


def test_flop_counts_follow_the_design_formulas():
    lstm = grids.Case("lstm", "inference", T=2, B=3, I=4, H=5)
    gru = grids.Case("gru", "training", T=2, B=3, I=4, H=5)
    assert forward_flops(lstm, None) == 2 * 3 * 8 * 5 * (4 + 5)
    assert step_flops(gru, None) == 3 * 2 * 3 * 6 * 5 * (4 + 5)
    stack = grids.Case("lstm", "inference", T=2, B=1, I=4, H=5, layers=2, bidirectional=True, proj_size=3)
    layer0 = 8 * 5 * (4 + 3) + 2 * 3 * 5
    layer1 = 8 * 5 * (2 * 3 + 3) + 2 * 3 * 5
    assert forward_flops(stack, None) == 2 * 2 * (layer0 + layer1)
    assert forward_flops(lstm, torch.tensor([1, 2, 2])) == 5 * 8 * 5 * (4 + 5)
    assert forward_flops(grids.Case("rnn", "inference", T=2, B=3, I=4, H=5), None) == 2 * 3 * 2 * 5 * (4 + 5)


def test_named_grids_hold_the_goal_rows():
    ops = grids.named_grid("ops", "cpu", ["float32"])
    assert len(ops) == 5 * 2 * 2
    assert {(c.T, c.B, c.I, c.H) for c in ops} == set(grids.OPS_SIZES)
    default = grids.named_grid("default", "cpu", ["float32"])
    groups = {c.group for c in default}
    assert {"stack", "packed", "proj", "frozen", "clip"} <= groups
    assert any(c.layers == 2 and c.bidirectional and c.cell == "gru" for c in default)
    assert any(c.proj_size and c.mode == "training" for c in default)
    regularizers = grids.named_grid("regularizers", "cpu", ["float32"])
    assert {c.regularizer for c in regularizers if c.group == "regularizers"} == set(grids.REGULARIZERS)
    assert {(c.T, c.B, c.I, c.H) for c in regularizers if c.cell == "rnn"} == set(grids.OPS_SIZES)


def test_ratio_helpers():
    assert timing.paired_ratio([2.0, 4.0, 6.0], [1.0, 1.0, 2.0]) == 3.0
    assert report.geometric_mean([1.0, 4.0]) == pytest.approx(2.0)
    assert math.isnan(report.geometric_mean([]))


@pytest.mark.skipif(timing.minor_page_faults() is None, reason="this OS does not count page faults")
def test_interleaved_counts_the_page_faults_of_each_provider():
    """A step that touches every page of a fresh 8 MiB mapping faults at least once per page;
    one that touches nothing new hardly at all; each provider is charged its own."""
    import mmap
    page = mmap.PAGESIZE
    size = (8 << 20) // page * page

    def touch_fresh_pages():
        with mmap.mmap(-1, size) as fresh:
            for offset in range(0, size, page):
                fresh[offset] = 1

    faults = {}
    steps = {"fresh": touch_fresh_pages, "nothing": lambda: None}
    samples = timing.interleaved(steps, {"fresh": 1e-3, "nothing": 1e-6}, torch.device("cpu"), repeats=3,
                                 sample_seconds=1e-3, provider_budget=1.0, faults=faults)
    assert all(len(samples[name]) == 3 for name in steps)
    assert min(faults["fresh"]) >= size // page
    assert max(faults["nothing"]) < 50


def test_short_grid_times_one_step_of_every_cell(capsys):
    """`--grid short`: one step at a time and short sequences, LSTM, GRU and the Elman RNN."""
    cases = grids.named_grid("short", "cpu", ["float32"])
    assert {case.cell for case in cases} == {"lstm", "gru", "rnn"}
    assert {case.mode for case in cases} == {"inference", "training"}
    assert {case.group for case in cases} == {"short"}
    assert any(case.T == 1 and case.B == 1 for case in cases)
    assert bench("--grid", "short", "--cell", "rnn", "--mode", "inference", "--backends", "cpu", "--no-memory",
                 *FAST) == 0
    out = capsys.readouterr().out
    assert "RNN T=1 B=1 I=256 H=256" in out and "| short | rnn | inference | cpu | 6 |" in out
