"""Cost of the in-kernel regularizers (docs/semantics.md section 10) on the CPU, fwd+bwd.

For each cell, size and regularizer that the cpu backend runs, one training step (forward
and backward of sum(output^2)) of:

  plain       rnntl_fast.LSTM / GRU without the regularizer
  with        the same module with it (training mode: masks drawn every call)
  cell loop   what a user writes without rnntl_fast: torch.lstm_cell / torch.gru_cell (the
              kernels behind nn.LSTMCell / nn.GRUCell) in a Python loop over the steps, with
              the same regularizer (h * mask into the cell; weight_hh * mask as its weight)

timed interleaved in one process (median of --repeats rounds) at torch's default thread
count unless --threads is given. Prints a table: cost = with / plain (goal <= 1.15x),
speedup = cell loop / with (goal >= 3x).

    python benchmarks/regularizers.py [--repeats 5] [--threads N]
"""
import argparse
import statistics
import sys
import time

import torch

import rnntl_fast
from rnntl_fast.machine import cpu_model

SIZES = [(100, 32, 256, 256), (200, 16, 128, 128), (500, 1, 256, 256)]
REGULARIZERS = {"recurrent_dropout": dict(recurrent_dropout=0.25), "weight_drop": dict(weight_drop=0.5)}


def cell_loop_step(cell, module, x, options):
    """One fwd+bwd of a Python loop over torch's fused cell with the same regularizer."""
    T, B, _ = x.shape
    H = module.hidden_size
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0
    if "weight_drop" in options:
        p = options["weight_drop"]
        w_hh = w_hh * (torch.bernoulli(torch.full_like(w_hh, 1 - p)) / (1 - p))
    mask = None
    if "recurrent_dropout" in options:
        p = options["recurrent_dropout"]
        mask = torch.bernoulli(torch.full((B, H), 1 - p)) / (1 - p)
    h = x.new_zeros(B, H)
    c = x.new_zeros(B, H)
    outputs = []
    for t in range(T):
        h_in = h * mask if mask is not None else h
        if cell == "lstm":
            h, c = torch.lstm_cell(x[t], (h_in, c), w_ih, w_hh, b_ih, b_hh)
        else:
            # gru_cell blends with the h it is given: the unmasked state must be blended, so
            # the masked one goes only through the recurrent product.
            gi = torch.nn.functional.linear(x[t], w_ih, b_ih)
            gh = torch.nn.functional.linear(h_in, w_hh, b_hh)
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
        outputs.append(h)
    torch.stack(outputs).pow(2).sum().backward()


def module_step(module, x):
    module(x)[0].pow(2).sum().backward()


def timed(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    print(f"**Machine:** {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"ms per fwd+bwd step, median of {args.repeats} interleaved rounds\n")
    print("| cell | T, B, I, H | regularizer | plain (ms) | with (ms) | cost | cell loop (ms) | speedup vs cell loop |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    make = {"lstm": rnntl_fast.LSTM, "gru": rnntl_fast.GRU}
    for cell in ("lstm", "gru"):
        for T, B, I, H in SIZES:
            torch.manual_seed(0)
            x = torch.randn(T, B, I)
            plain = make[cell](I, H, backend="cpu")
            for name, options in REGULARIZERS.items():
                regularized = make[cell](I, H, backend="cpu", **options)
                regularized.load_state_dict(plain.state_dict())
                runs = {"plain": lambda: module_step(plain, x), "with": lambda: module_step(regularized, x),
                        "loop": lambda: cell_loop_step(cell, regularized, x, options)}
                for fn in runs.values():
                    fn()  # warm-up
                times = {key: [] for key in runs}
                for _ in range(args.repeats):
                    for key, fn in runs.items():
                        times[key].append(timed(fn))
                med = {key: statistics.median(v) for key, v in times.items()}
                print(f"| {cell} | {T}, {B}, {I}, {H} | {name} | {med['plain']:.2f} | {med['with']:.2f} | "
                      f"{med['with'] / med['plain']:.2f}x | {med['loop']:.2f} | {med['loop'] / med['with']:.2f}x |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
