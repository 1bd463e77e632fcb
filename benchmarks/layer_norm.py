"""Cost of layer_norm=True (docs/semantics.md section 10) on the CPU, fwd+bwd.

For each size, one training step (forward and backward of sum(output^2)) of:

  plain       rnntl_fast.LSTM without layer_norm
  layer norm  rnntl_fast.LSTM(layer_norm=True) (the cpu kernel, csrc/cpu/layer_norm_cpu.cpp)
  cell loop   what a user writes without rnntl_fast: the LSTM cell's math with nn.LayerNorm
              in a Python loop over the steps (the input product and its norm for the whole
              sequence at once, then per step the recurrent product, its norm, the gates, the
              cell and the norm of the cell)

and, for the GRU, plain against layer norm. Timed interleaved in one process, the fastest of
--repeats rounds (on a shared machine the least disturbed one; --median for the median), at
torch's default thread count unless --threads is given.

    python benchmarks/layer_norm.py [--repeats 5] [--threads N] [--median]
"""
import argparse
import statistics
import sys
import time

import torch
from torch import nn

import rnntl_fast
from rnntl_fast.machine import cpu_model

SIZES = [(100, 32, 256, 256), (100, 1, 256, 256)]


class LayerNormLstmLoop(nn.Module):
    """The layer-normalised LSTM of docs/semantics.md section 10 as a Python step loop."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        H = hidden_size
        self.linear_ih = nn.Linear(input_size, 4 * H, bias=False)
        self.linear_hh = nn.Linear(H, 4 * H, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * H))
        self.norm_ih = nn.LayerNorm(4 * H, bias=False)
        self.norm_hh = nn.LayerNorm(4 * H, bias=False)
        self.norm_cell = nn.LayerNorm(H)

    def forward(self, x):  # x: [T, B, I] -> output [T, B, H]
        steps, batch, _ = x.shape
        H = self.norm_cell.normalized_shape[0]
        h, c = x.new_zeros(batch, H), x.new_zeros(batch, H)
        input_gates = self.norm_ih(self.linear_ih(x)) + self.bias
        outputs = []
        for t in range(steps):
            a = input_gates[t] + self.norm_hh(self.linear_hh(h))
            i, f, g, o = a.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.norm_cell(c))
            outputs.append(h)
        return torch.stack(outputs)


def training_step(module, x):
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.pow(2).sum().backward()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, choices=range(1, 101), metavar="N")
    parser.add_argument("--threads", type=int, default=None, choices=range(1, 257), metavar="N")
    parser.add_argument("--median", action="store_true", help="report the median round, not the fastest")
    args = parser.parse_args(argv)
    statistic = statistics.median if args.median else min
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"{'median' if args.median else 'fastest'} of {args.repeats}")
    print("| cell | T, B, I, H | plain (ms) | layer norm (ms) | cell loop (ms) | cost vs plain "
          "| speedup vs cell loop |")
    print("|---|---|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for cell in ("lstm", "gru"):
        make = rnntl_fast.LSTM if cell == "lstm" else rnntl_fast.GRU
        for T, B, I, H in SIZES:
            x = torch.randn(T, B, I)
            runs = {"plain": make(I, H), "layer norm": make(I, H, layer_norm=True)}
            if cell == "lstm":
                runs["cell loop"] = LayerNormLstmLoop(I, H)
            for module in runs.values():
                training_step(module, x)  # warm-up
            times = {name: [] for name in runs}
            for _ in range(args.repeats):  # interleaved rounds
                for name, module in runs.items():
                    times[name] += timed(lambda: training_step(module, x), 1)
            ms = {name: 1e3 * statistic(t) for name, t in times.items()}
            loop = ms.get("cell loop")
            loop_ms = f"{loop:.1f}" if loop else "-"
            speedup = f"{loop / ms['layer norm']:.2f}x" if loop else "-"
            name = "LSTM" if cell == "lstm" else "GRU"
            print(f"| {name} | {T}, {B}, {I}, {H} | {ms['plain']:.1f} | {ms['layer norm']:.1f} | {loop_ms} | "
                  f"{ms['layer norm'] / ms['plain']:.2f}x | {speedup} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
