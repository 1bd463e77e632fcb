#!/usr/bin/env python
"""Issue 2's op grid through the `rnntl-fast bench` CLI: (T, B, I, H) in
rnntl_fast.bench.grids.OPS_SIZES, LSTM and GRU, inference and training, rnntl_fast against
torch.nn in the same process, geometric-mean speedup per cell and mode at the end.

    python benchmarks/bench_ops.py                       # table on stdout
    python benchmarks/bench_ops.py --json ops.json --plot ops.png --repeats 15

Any other `rnntl-fast bench` flag (except the size flags, fixed by the grid) passes through.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from rnntl_fast.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--grid", "ops", *sys.argv[1:]]))
