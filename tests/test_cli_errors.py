"""A user's mistake on the command line (a flag value out of range, a missing, malformed or
damaged file, an output path that cannot be written) ends `rnntl-fast` with exit code 2
and one line on stderr naming the flag or file and what is wrong; no traceback, and no
empty output folder left behind. Each case runs in-process through rnntl_fast.cli.main."""
import struct

import pytest
import torch

from rnntl_fast.cli import main

ROWS = [("a fine film", "pos"), ("a dull film", "neg"), ("great fun", "pos"), ("tedious plot", "neg")] * 3


@pytest.fixture
def files(tmp_path):
    """Paths of good and bad input files, written on demand by name."""
    def write(name, content):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    good_csv = "review,sentiment\n" + "".join(f"{text},{label}\n" for text, label in ROWS)
    lstm = torch.nn.LSTM(8, 8, batch_first=True)
    torch.save(lstm.state_dict(), tmp_path / "lstm.pt")
    torch.save(torch.nn.LSTM(8, 6).state_dict(), tmp_path / "lstm_h6.pt")
    checkpoint = (tmp_path / "lstm.pt").read_bytes()
    made = {
        "good.csv": write("good.csv", good_csv),
        "good.txt": write("good.txt", "some unlabelled text\nmore text\n"),
        "empty.csv": write("empty.csv", ""),
        "one_class.csv": write("one_class.csv", "review,sentiment\na fine film,pos\ngreat fun,pos\n"),
        "ragged.csv": write("ragged.csv", "review,sentiment\na fine film,pos\na dull film,neg,extra\n"),
        "latin1.csv": write("latin1.csv", "review,sentiment\na fine film,pos\nun café,neg\n".encode("latin-1")),
        "binary.csv": write("binary.csv", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        "binary.txt": write("binary.txt", b"\x00\x01\x02\xff\xfe" * 50),
        "unknown_label.csv": write("unknown_label.csv", "review,sentiment\nfine film,pos\nodd film,meh\n"),
        "no_label.csv": write("no_label.csv", "review,stars\na fine film,5\n"),
        "truncated.pt": write("truncated.pt", checkpoint[:len(checkpoint) // 2]),
        "lstm.pt": str(tmp_path / "lstm.pt"),
        "lstm_h6.pt": str(tmp_path / "lstm_h6.pt"),
        "not_an_encoder.pt": str(tmp_path / "lstm.pt"),
        "vectors_bad.vec": write("vectors_bad.vec", "2 8\nfilm" + " 0.5" * 9 + "\nfun" + " 0.5" * 8 + "\n"),
        "vectors_dim4.vec": write("vectors_dim4.vec", "1 4\nfilm 1 2 3 4\n"),
        "vectors.bin": write("vectors.bin", b"1 8\nfilm " + struct.pack("<4f", 1, 2, 3, 4)),
        "a_file": write("a_file", "not a folder"),
        "folder": str(tmp_path),
        "missing.csv": str(tmp_path / "missing.csv"),
        "no_dir/out.json": str(tmp_path / "no_dir" / "out.json"),
    }
    return made


def _run(argv, capsys):
    """Runs main(argv); returns (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code, capsys.readouterr().err


PRETRAIN_BASE = ["--no-progress", "--threads", "1", "--lm-epochs", "1", "--vocab-size", "40", "--min-freq", "1",
                 "--embedding-dim", "8", "--hidden-size", "8"]
BASE = PRETRAIN_BASE + ["--epochs", "1", "--repeats", "1", "--throughput-steps", "0"]
CSV = ["--text-column", "review", "--label-column", "sentiment"]

# (id, command, arguments ({name} is the path of files[name]), what the line must say)
ARGUMENTS = [
    ("lr-nan", "finetune", ["--lr", "nan"], ["--lr", "'nan'"]),
    ("lm-lr-inf", "finetune", ["--lm-lr", "inf"], ["--lm-lr", "finite"]),
    ("vocab-size-0", "finetune", ["--vocab-size", "0"], ["--vocab-size", ">= 4"]),
    ("min-freq-0", "finetune", ["--min-freq", "0"], ["--min-freq", ">= 1"]),
    ("max-tokens-0", "finetune", ["--max-tokens", "0"], ["--max-tokens"]),
    ("embedding-dim-0", "finetune", ["--embedding-dim", "0"], ["--embedding-dim"]),
    ("hidden-size-0", "finetune", ["--hidden-size", "0"], ["--hidden-size"]),
    ("num-layers-0", "finetune", ["--num-layers", "0"], ["--num-layers"]),
    ("dropout-1.5", "finetune", ["--dropout", "1.5"], ["--dropout", "[0.0, 1.0)"]),
    ("dropout-text", "finetune", ["--dropout", "half"], ["--dropout", "'half'"]),
    ("seed-negative", "finetune", ["--seed", "-1"], ["--seed"]),
    ("cut-frac-1", "finetune", ["--cut-frac", "1"], ["--cut-frac", "(0.0, 1.0)"]),
    ("ratio-below-1", "finetune", ["--ratio", "0.5"], ["--ratio", ">= 1.0"]),
    ("max-grad-norm-0", "finetune", ["--max-grad-norm", "0"], ["--max-grad-norm"]),
    ("lm-epochs-negative", "finetune", ["--lm-epochs", "-1"], ["--lm-epochs"]),
    ("lm-batch-size-0", "finetune", ["--lm-batch-size", "0"], ["--lm-batch-size"]),
    ("lm-chunk-length-0", "finetune", ["--lm-chunk-length", "0"], ["--lm-chunk-length"]),
    ("epochs-negative", "finetune", ["--epochs", "-1"], ["--epochs"]),
    ("batch-size-0", "finetune", ["--batch-size", "0"], ["--batch-size"]),
    ("unfreeze-every-0", "finetune", ["--unfreeze-every", "0"], ["--unfreeze-every"]),
    ("scratch-lr-0", "finetune", ["--scratch-lr", "0"], ["--scratch-lr"]),
    ("lr-factor-negative", "finetune", ["--lr-factor", "-2"], ["--lr-factor"]),
    ("l2sp-alpha-negative", "finetune", ["--l2sp-alpha", "-1"], ["--l2sp-alpha"]),
    ("labelled-size-negative", "finetune", ["--labelled-size", "-3"], ["--labelled-size"]),
    ("repeats-0", "finetune", ["--repeats", "0"], ["--repeats"]),
    ("throughput-steps-negative", "finetune", ["--throughput-steps", "-1"], ["--throughput-steps"]),
    ("split-seed-negative", "finetune", ["--split-seed", "-1"], ["--split-seed"]),
    ("stop-after-steps-negative", "finetune", ["--stop-after-steps", "-1"], ["--stop-after-steps"]),
    ("checkpoint-every-negative", "finetune", ["--checkpoint-every", "-1"], ["--checkpoint-every"]),
    ("threads-0", "finetune", ["--threads", "0"], ["--threads"]),
    ("device-tpu", "finetune", ["--device", "tpu"], ["--device", "'tpu'"]),
    ("pretrain-lm-epochs-0", "pretrain", ["--lm-epochs", "0"], ["--lm-epochs", ">= 1"]),
    ("lm-valid-fraction-0", "finetune", ["--lm-valid-fraction", "0"], ["--lm-valid-fraction"]),
    ("lm-valid-fraction-1", "pretrain", ["--lm-valid-fraction", "1"], ["--lm-valid-fraction"]),
    ("lm-workers-0", "pretrain", ["--lm-workers", "0"], ["--lm-workers"]),
    ("lm-state-unknown", "finetune", ["--lm-state", "keep"], ["--lm-state", "invalid choice"]),
    ("domain-adapt-lm-valid-fraction-nan", "domain-adapt", ["--lm-valid-fraction", "nan"], ["--lm-valid-fraction"]),
    ("pretrain-device-tpu", "pretrain", ["--device", "tpu"], ["--device"]),
    ("output-dir-is-a-file", "finetune", ["--output-dir", "{a_file}"], ["--output-dir", "a_file", "not a directory"]),
    ("output-dir-under-a-file", "finetune", ["--output-dir", "{a_file}/run"], ["--output-dir", "is a file"]),
    ("train-csv-missing", "finetune", ["--train-csv", "{missing.csv}"], ["--train-csv", "missing.csv", "no such file"]),
    ("train-csv-directory", "finetune", ["--train-csv", "{folder}"], ["--train-csv", "is a directory"]),
    ("test-csv-missing", "finetune", ["--train-csv", "{good.csv}", "--test-csv", "{missing.csv}"], ["--test-csv"]),
    ("lm-text-missing", "finetune", ["--lm-text", "{missing.csv}"], ["--lm-text", "no such file"]),
    ("encoder-missing", "finetune", ["--encoder", "{missing.csv}"], ["--encoder", "no such file"]),
    ("vectors-directory", "finetune", ["--pretrained-vectors", "{folder}"], ["--pretrained-vectors", "directory"]),
    ("bench-json-unwritable", "bench", ["--json", "{no_dir/out.json}"], ["--json", "out.json", "cannot write"]),
    ("bench-json-directory", "bench", ["--json", "{folder}"], ["--json", "is a directory"]),
    ("bench-plot-unwritable", "bench", ["--plot", "{no_dir/out.json}"], ["--plot", "cannot write"]),
    ("bench-markdown-unwritable", "bench", ["--markdown", "{no_dir/out.json}"], ["--markdown", "cannot write"]),
]
if not torch.cuda.is_available():
    ARGUMENTS.append(("device-cuda-not-here", "finetune", ["--device", "cuda"], ["--device", "CUDA is not available"]))

# Mistakes found while the run reads its files: (id, arguments, what the line must say).
DATA = [
    ("csv-empty", ["--train-csv", "{empty.csv}", *CSV], ["--train-csv", "empty.csv", "the file is empty"]),
    ("csv-one-class", ["--train-csv", "{one_class.csv}", *CSV], ["--train-csv", "need at least two classes"]),
    ("csv-ragged-row", ["--train-csv", "{ragged.csv}", *CSV], ["--train-csv", "line 3: expected 2 fields"]),
    ("csv-latin1", ["--train-csv", "{latin1.csv}", *CSV], ["--train-csv", "latin1.csv: line 3: not utf-8 text"]),
    ("csv-binary", ["--train-csv", "{binary.csv}", *CSV], ["--train-csv", "binary.csv: line 1: not utf-8 text"]),
    ("csv-missing-label-column", ["--train-csv", "{no_label.csv}", *CSV],
     ["--train-csv", "no column named 'sentiment'"]),
    ("csv-missing-text-column", ["--train-csv", "{good.csv}", "--text-column", "body", "--label-column", "sentiment"],
     ["--train-csv", "no column named 'body'"]),
    ("csv-unknown-label", ["--train-csv", "{unknown_label.csv}", *CSV, "--classes", "neg,pos"],
     ["--train-csv", "line 3: unknown label 'meh'"]),
    ("test-csv-missing-column", ["--train-csv", "{good.csv}", "--test-csv", "{no_label.csv}", *CSV],
     ["--test-csv", "no_label.csv", "no column named 'sentiment'"]),
    ("lm-text-binary", ["--train-csv", "{good.csv}", *CSV, "--lm-text", "{binary.txt}"],
     ["--lm-text", "binary.txt", "NUL byte at byte 0; is this a binary file?"]),
    ("pretrained-rnn-truncated", ["--train-csv", "{good.csv}", *CSV, "--pretrained-rnn", "{truncated.pt}"],
     ["--pretrained-rnn", "truncated.pt", "not a readable torch.save file"]),
    ("pretrained-rnn-missing", ["--train-csv", "{good.csv}", *CSV, "--pretrained-rnn", "{missing.csv}"],
     ["--pretrained-rnn", "missing.csv", "No such file"]),
    ("pretrained-rnn-wrong-format", ["--train-csv", "{good.csv}", *CSV, "--pretrained-rnn", "{lstm.pt}",
                                     "--pretrained-format", "keras"], ["--pretrained-rnn", "not a .keras archive"]),
    ("pretrained-rnn-other-shape", ["--train-csv", "{good.csv}", *CSV, "--pretrained-rnn", "{lstm_h6.pt}"],
     ["lstm_h6.pt", "this run expects"]),
    ("pretrained-vectors-malformed", ["--train-csv", "{good.csv}", *CSV, "--pretrained-vectors", "{vectors_bad.vec}"],
     ["--pretrained-vectors", "vectors_bad.vec: line 2: expected a token and 8 numbers"]),
    ("pretrained-vectors-truncated-binary",
     ["--train-csv", "{good.csv}", *CSV, "--pretrained-vectors", "{vectors.bin}"],
     ["--pretrained-vectors", "vectors.bin: record 1 of 1", "truncated"]),
    ("pretrained-vectors-other-dim", ["--train-csv", "{good.csv}", *CSV, "--pretrained-vectors", "{vectors_dim4.vec}"],
     ["vectors_dim4.vec", "pass --embedding-dim 4"]),
    ("missing-rows-only-without-vectors", ["--train-csv", "{good.csv}", *CSV, "--train-missing-rows-only"],
     ["--train-missing-rows-only needs --pretrained-vectors"]),
    ("encoder-truncated", ["--train-csv", "{good.csv}", *CSV, "--encoder", "{truncated.pt}"],
     ["--encoder", "truncated.pt"]),
    ("encoder-not-an-encoder", ["--train-csv", "{good.csv}", *CSV, "--encoder", "{not_an_encoder.pt}"],
     ["--encoder", "lstm.pt: not an encoder file"]),
    ("freeze-pattern-matching-nothing", ["--train-csv", "{good.csv}", *CSV, "--freeze-pattern", "encoder.layers.0.*_l7"],
     ["--freeze-pattern: pattern 'encoder.layers.0.*_l7' matches no parameter"]),
    ("pretrain-lm-text-binary", ["--lm-text", "{binary.txt}"], ["--lm-text", "binary file"]),
]


def _fill(arguments, files):
    """The arguments with each {name} replaced by the path of files[name]."""
    filled = []
    for argument in arguments:
        for name, path in files.items():
            argument = argument.replace("{" + name + "}", path)
        filled.append(argument)
    return filled


def _assert_one_line(code, error, expected, command, progress_before=False):
    """Exit code 2; the error is stderr's only line (with progress_before: its last line,
    after the run's progress lines)."""
    assert code == 2, error
    assert "Traceback" not in error
    lines = error.strip().splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:], error
    assert progress_before or len(lines) == 1, error
    assert lines[-1].startswith(f"rnntl-fast {command}: error: "), error
    for text in expected:
        assert text in lines[-1], (text, lines[-1])


@pytest.mark.parametrize("command, arguments, expected", [case[1:] for case in ARGUMENTS],
                         ids=[case[0] for case in ARGUMENTS])
def test_bad_argument_is_one_line_and_exit_code_2(files, tmp_path, capsys, command, arguments, expected):
    output = ["--output-dir", str(tmp_path / "out")] if command != "bench" else []
    code, error = _run([command, *output, *_fill(arguments, files)], capsys)
    _assert_one_line(code, error, expected, command)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments, expected", [case[1:] for case in DATA], ids=[case[0] for case in DATA])
def test_bad_data_is_one_line_and_exit_code_2_without_an_empty_output_folder(files, tmp_path, capsys, arguments,
                                                                             expected):
    command = "pretrain" if arguments[0] == "--lm-text" and len(arguments) == 2 else "finetune"
    output = tmp_path / "runs" / "out"
    base = PRETRAIN_BASE if command == "pretrain" else BASE
    code, error = _run([command, "--output-dir", str(output), *base, *_fill(arguments, files)], capsys)
    _assert_one_line(code, error, expected, command, progress_before=True)
    assert not output.exists()   # the run created it, found the mistake, and removed it again


def test_an_existing_output_folder_is_kept(files, tmp_path, capsys):
    output = tmp_path / "existing"
    output.mkdir()
    code, error = _run(["finetune", "--output-dir", str(output), *BASE, "--train-csv", files["empty.csv"], *CSV],
                       capsys)
    _assert_one_line(code, error, ["empty.csv"], "finetune", progress_before=True)
    assert output.is_dir()


def test_argument_error_of_the_top_level_command(capsys):
    code, error = _run(["no-such-command"], capsys)
    assert code == 2 and "\n" not in error.strip() and "invalid choice" in error
