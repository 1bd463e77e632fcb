"""The whole-sequence products of the CPU kernels against torch.mm, in one process.

For each size of the ops grid (`rnntl-fast bench --grid ops`) and each thread count (1 and
torch's default), a training step of `rnntl_fast.LSTM` / `GRU` runs under torch.profiler;
the time of its whole-sequence products (names in docs/cpu.md, "Matrix products") gives
their GFLOP/s, compared with a same-shape `torch.mm` timed in the same process:

    input_projection  x [N, I] @ W_ih^T            2*N*I*G FLOPs
    input_gradient    dL/da [N, G] @ W_ih          2*N*G*I
    weight_gradient   dL/da^T @ [x | h_prev]       2*G*N*(I+H)   (LSTM: one product;
                                                                  GRU: two, I and H)

N = T*B rows, G = 4H (LSTM) or 3H (GRU). The step-at-a-time loop runs (RNNTL_CPU_ENGINE=
stepwise), which projects the input a block of steps at a time, as the product sizes here
assume (the row split projects every row in one call; the unit split inside its workers,
where the profiler cannot time it apart); all use the same product kernel.

    python benchmarks/sequence_products.py [--repeats 5] [--cell lstm,gru]
"""
import argparse
import os
import statistics
import sys
import time

os.environ["RNNTL_CPU_ENGINE"] = "stepwise"  # read at every CPU op call

import torch  # noqa: E402

import rnntl_fast  # noqa: E402
from rnntl_fast.machine import cpu_model  # noqa: E402

SIZES = [(100, 32, 256, 256), (200, 16, 128, 128), (100, 8, 64, 64), (500, 1, 256, 256), (50, 64, 512, 512)]
NAMES = ("rnntl_fast::input_projection", "rnntl_fast::input_gradient", "rnntl_fast::weight_gradient")


def product_times_ms(cell, T, B, I, H, repeats):
    """Median ms per training step of each whole-sequence product (all calls of a step)."""
    module = (rnntl_fast.LSTM if cell == "lstm" else rnntl_fast.GRU)(I, H, backend="cpu")
    x = torch.randn(T, B, I, requires_grad=True)

    def step():
        output, _ = module(x)
        output.sum().backward()

    step()
    samples = {name: [] for name in NAMES}
    for _ in range(repeats):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            step()
        totals = {name: 0.0 for name in NAMES}
        for event in profile.events():
            if event.name in totals:
                totals[event.name] += event.cpu_time_total / 1000.0
        for name in NAMES:
            samples[name].append(totals[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def mm_ms(a_shape, b_shape, transpose_a, repeats):
    a = torch.randn(*a_shape)
    b = torch.randn(*b_shape)
    left = a.t() if transpose_a else a
    torch.mm(left, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(left, b)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def rows_for(cell, T, B, I, H, repeats):
    G = (4 if cell == "lstm" else 3) * H
    N = T * B
    ours = product_times_ms(cell, T, B, I, H, repeats)
    # (name, FLOPs, same-shape torch.mm products: (a shape, b shape, a transposed))
    products = [
        ("input_projection", 2 * N * I * G, [((N, I), (I, G), False)]),
        ("input_gradient", 2 * N * G * I, [((N, G), (G, I), False)]),
        ("weight_gradient", 2 * G * N * (I + H),
         [((N, G), (N, I + H), True)] if cell == "lstm" else [((N, G), (N, I), True), ((N, G), (N, H), True)]),
    ]
    rows = []
    for name, flops, shapes in products:
        reference = sum(mm_ms(a, b, transposed, repeats) for a, b, transposed in shapes)
        measured = ours["rnntl_fast::" + name]
        if measured <= 0:
            continue
        rows.append((name, flops / measured / 1e6, flops / reference / 1e6))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, choices=range(1, 101), metavar="1..100",
                        help="profiled steps and torch.mm calls per figure (median)")
    parser.add_argument("--cell", default="lstm,gru", help="lstm, gru or both (comma list)")
    args = parser.parse_args(argv)
    cells = [c.strip() for c in args.cell.split(",") if c.strip()]
    if not cells or any(c not in ("lstm", "gru") for c in cells):
        parser.error(f"--cell: expected lstm, gru or lstm,gru, got {args.cell!r}")
    default_threads = torch.get_num_threads()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads 1 and {default_threads}")
    print("| cell | T, B, I, H | product | threads | rnntl_fast GFLOP/s | torch.mm GFLOP/s | ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    worst = None
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for cell in cells:
            for T, B, I, H in SIZES:
                for name, ours, reference in rows_for(cell, T, B, I, H, args.repeats):
                    ratio = ours / reference
                    worst = ratio if worst is None else min(worst, ratio)
                    print(f"| {cell} | {T}, {B}, {I}, {H} | {name} | {threads} | {ours:.1f} | {reference:.1f} "
                          f"| {ratio:.2f} |", flush=True)
    torch.set_num_threads(default_threads)
    print(f"lowest ratio: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
