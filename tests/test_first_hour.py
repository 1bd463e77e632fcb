"""What a new user meets first: a light `import rnntl_fast` whose subpackages load on first
access, `--help` texts that start with a whole sentence (without importing torch where the
command allows), progress output fit for a log file, the thread report, the backend report,
the output folder of a failed run, and the learning-curve plot's legends."""
import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

import rnntl_fast
from rnntl_fast import machine
from rnntl_fast.cli import SUBCOMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "COLUMNS": "100"}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


# -- lazy package attributes ------------------------------------------------------------------

def test_import_rnntl_fast_loads_neither_torch_nor_subpackages():
    done = run_python("import sys, rnntl_fast; "
                      "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('rnntl_fast.')))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["pretrained", "transfer", "bench", "ops", "nn"])
def test_subpackages_are_attributes_without_an_explicit_import(name):
    module = getattr(rnntl_fast, name)
    assert module.__name__ == f"rnntl_fast.{name}"
    assert name in dir(rnntl_fast)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "convert"])
def test_public_names_come_from_the_modules_module(name):
    assert getattr(rnntl_fast, name) is getattr(rnntl_fast.nn, name)


def test_touching_a_module_class_registers_the_native_ops():
    done = run_python("import sys, rnntl_fast; rnntl_fast.LSTM; print('rnntl_fast.ops' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_unknown_attribute_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no attribute 'LTSM'"):
        rnntl_fast.LTSM  # noqa: B018


# -- help texts ---------------------------------------------------------------------------------

# Commands whose --help must not import torch (finetune and pretrain build their parsers in
# modules that need torch for their defaults).
TORCH_FREE_HELP = {(), ("info",), ("bench",)}
HELP_COMMANDS = [()] + [(name,) for name in SUBCOMMANDS]


def _description(help_text: str) -> str:
    """The paragraph argparse prints between the usage lines and the first argument section."""
    blocks = [block for block in help_text.split("\n\n") if block.strip()]
    return " ".join(blocks[1].split())


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "rnntl-fast")
def test_help_exits_0_and_starts_with_a_whole_sentence(command):
    code = ("import sys\nfrom rnntl_fast.cli import main\ntry:\n    main([*sys.argv[1:], '--help'])\n"
            "except SystemExit as stop:\n    print('EXIT', stop.code)\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, *command], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "EXIT 0" in done.stdout and done.stderr == ""
    assert done.stdout.startswith("usage: rnntl-fast")
    description = _description(done.stdout)
    # a whole text, not a first line cut mid-sentence
    assert re.match(r"[A-Z`]", description) and description.endswith("."), description
    if command in TORCH_FREE_HELP:
        assert "TORCH False" in done.stdout


def test_every_subcommand_is_listed_with_its_help():
    parser_help = subprocess.run([sys.executable, "-m", "rnntl_fast", "--help"], cwd=ROOT, env=ENV,
                                 capture_output=True, text=True, timeout=300).stdout
    for name, (_, help_text) in SUBCOMMANDS.items():
        assert name in parser_help and help_text.split()[0] in parser_help


# -- output fit for a log file ------------------------------------------------------------------

def test_training_progress_off_a_terminal_is_plain_lines(capsys):
    from rnntl_fast.transfer.training import Trainer
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))

    def loss_fn(module, batch):
        inputs, targets = batch
        return torch.nn.functional.cross_entropy(module(inputs), targets), len(targets)

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, loss_fn, dataset, None,
                      batch_size=4, epochs=2, progress_label="tiny", show_progress=True,
                      evaluate=lambda m: {"valid_accuracy": 0.5})
    trainer.fit()
    log = capsys.readouterr().err
    assert "\r" not in log
    lines = log.splitlines()
    assert "tiny: step 20/20" in lines[-2] and "loss" in lines[-2]
    assert [line for line in lines if line.startswith("tiny epoch")] == [
        "tiny epoch 1: valid_accuracy=0.5000", "tiny epoch 2: valid_accuracy=0.5000"]
    assert 10 <= len(lines) <= 14  # a line every 2 steps (total // 10), plus the epoch lines


def test_bench_log_has_no_bar_redraws_and_no_profiler_chatter(capfd):
    from rnntl_fast.cli import main
    assert main(["bench", "--grid", "tiny", "--cell", "gru", "--device", "cpu",
                 "--backends", "reference", "--repeats", "2", "--sample-ms", "1", "--warmup-ms", "1",
                 "--threads", "1"]) == 0
    captured = capfd.readouterr()
    assert "\r" not in captured.err
    lines = captured.err.splitlines()
    from rnntl_fast.bench import grids
    cases = len(grids.filter_cases(grids.named_grid("tiny", "cpu", ["float32"]), ["gru"], None))
    assert len(lines) == cases and all(line.startswith("bench: case") for line in lines), lines
    assert "USDT" not in captured.out + captured.err and "CPUAllocator" not in captured.out + captured.err
    assert "Columns: case = " in captured.out and "Columns: group = " in captured.out
    assert "| goal |" not in captured.out


# -- threads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("requested", [None, 1], ids=["torch-default", "threads-1"])
def test_run_start_keeps_or_sets_threads_and_reports_them(requested, tmp_path, capsys):
    from rnntl_fast.transfer import cli_common
    before = torch.get_num_threads()
    try:
        args = argparse.Namespace(threads=requested, device="cpu", output_dir=str(tmp_path / "out"))
        cli_common.start(args)
        expected = requested or before
        assert torch.get_num_threads() == expected
        report = capsys.readouterr().err
        word = "thread" if expected == 1 else "threads"
        assert f"threads: {expected} torch intra-op {word} " in report
        assert ("--threads" if requested else "torch's default") in report
        assert machine.cpu_model() in report
    finally:
        torch.set_num_threads(before)


# -- backend report --------------------------------------------------------------------------------

def test_info_calls_a_backend_usable_only_where_it_can_run_here():
    from rnntl_fast import _ext, info
    from rnntl_fast.ops.backend import triton_available, triton_interpreted
    status = info.backend_status()
    gpu = torch.cuda.is_available()
    assert status["cpu"]["usable"] == _ext.HAS_CPU_KERNELS
    assert status["cuda"]["usable"] == (_ext.HAS_CUDA_KERNELS and gpu)
    assert status["triton"]["usable"] == (triton_available() and (gpu or triton_interpreted()))
    assert status["reference"]["usable"]
    text = info.format_report(info.backend_report())
    for name, entry in status.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert ("not usable" in line) != entry["usable"]
        assert entry["why"] in line
    assert "at::parallel_for" in text  # says where the kernels' threads come from


def test_info_json_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "rnntl_fast.info", "--json"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"usable"' in done.stdout and '"why"' in done.stdout


# -- output folders ----------------------------------------------------------------------------------

def test_a_failed_finetune_run_leaves_no_empty_output_folder(tmp_path):
    from rnntl_fast.cli import main
    output = tmp_path / "out"
    bad = tmp_path / "bad.csv"
    bad.write_text("review,sentiment\nfine film,pos\nodd film,meh\n")
    with pytest.raises(SystemExit) as stop:  # a user's mistake: one line, exit code 2 (tests/test_cli_errors.py)
        main(["finetune", "--train-csv", str(bad), "--text-column", "review", "--label-column", "sentiment",
              "--classes", "neg,pos", "--output-dir", str(output), "--threads", "1", "--no-progress"])
    assert stop.value.code == 2
    assert not output.exists()


def test_a_failed_run_keeps_an_output_folder_that_existed(tmp_path):
    from rnntl_fast.cli import main
    output = tmp_path / "out"
    output.mkdir()
    bad = tmp_path / "bad.csv"
    bad.write_text("review,sentiment\nodd film,meh\n")
    with pytest.raises(SystemExit):
        main(["finetune", "--train-csv", str(bad), "--text-column", "review", "--label-column", "sentiment",
              "--classes", "neg,pos", "--output-dir", str(output), "--threads", "1", "--no-progress"])
    assert output.is_dir()


def _git_ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".git")), reason="not a git checkout")
@pytest.mark.parametrize("path", ["rnntl_fast_finetune/metrics.json", "rnntl_fast_pretrain/encoder.pt",
                                  ".venv/bin/python", "build/venv-cuda/bin/python", "build/build.log",
                                  "build/cmake/build.log", "rnntl_fast/_C.cpython-311-x86_64-linux-gnu.so"])
def test_gitignore_covers_what_the_readme_commands_write(path):
    assert _git_ignored(path)


# -- learning-curve plot ----------------------------------------------------------------------------------

def _arm(accuracies, test):
    runs = [{"history": {"steps": [1, 2], "losses": [0.7, 0.6], "lrs": [0.01, 0.005],
                         "epochs": [{"epoch": e + 1, "valid_accuracy": a} for e, a in enumerate(curve)]}}
            for curve in accuracies]
    return {"runs": runs, "test_accuracy": test, "lr_factor": 2.6}


def test_learning_curve_legends_say_what_is_drawn():
    from rnntl_fast.transfer.report import learning_curves_figure
    metrics = {"transfer": _arm([[0.6, 0.65], [0.62, 0.66], [0.61, 0.64]], 0.664),
               "scratch": _arm([[0.55, 0.6], [0.57, 0.62], [0.56, 0.61]], 0.644),
               "test_majority_class_accuracy": 0.59}
    figure = learning_curves_figure(metrics)
    accuracy_axis = figure.axes[2]
    labels = [text.get_text() for text in accuracy_axis.get_legend().get_texts()]
    assert "transfer: validation, each of 3 seeds" in labels
    assert "transfer: validation, mean of seeds" in labels
    assert "transfer: test, mean (0.664)" in labels
    assert "scratch: test, mean (0.644)" in labels
    assert "majority class, test split (0.590)" in labels
    assert not any("mean test" in label for label in labels)
    import matplotlib.pyplot as plt
    plt.close(figure)
