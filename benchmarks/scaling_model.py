"""What the multi-core CPU loops should do on more cores: the scaling model of docs/cpu.md.

One LSTM step (forward, P = H) on W workers of the unit split costs

    t(W) = work / W / rate(slice) + barrier(W) + exchange(W)

    work          2 * B * H * 4H FLOPs (the recurrent product; the pointwise pass, about
                  30 FLOPs per unit and row, is added)
    slice         4H * H * 4 bytes / W: a worker's packed rows of W_hh, read once per step
    rate(slice)   per-core GFLOP/s of the product kernel: `--rate-cache` while the slice fits
                  the core's L2 (`--l2-kib`), else `--rate-memory` (read from L3/DRAM at
                  batch 1 a weight element feeds 2 FLOPs per 4 bytes, so the step is bound
                  by the read; each further row up to the kernel's block of 6 reuses the read)
    barrier(W)    `--barrier-ns` per arriving worker (a centralised barrier's arrivals
                  serialise on one cache line), so W * barrier-ns per step
    exchange(W)   the (W - 1) / W of h_{t-1} [B, H] that every worker reads from the other
                  cores' caches, `--exchange-ns` per 64-byte line (measured on this VM:
                  20-40 ns a line, the reads of a step hardly overlapping)

against the step-at-a-time loop with the same split of the work but a fork/join of the
team paid three times per step (one per parallel pass), each `--fork-join-ns` per thread
(waking and joining the team grows with it, like the barrier's arrivals), and against the
row split: min(W, B) workers, each with its own rows and the whole W_hh (rate(4H * H * 4
bytes) as above, with its rows' reuse), no barrier. Measured inputs for
this machine come from build/cmake/bench_step_sync_cost and the one-thread bench rows
(docs/cpu.md); the defaults are those figures.

    python benchmarks/scaling_model.py [--barrier-ns 40] [--exchange-ns 30] [--fork-join-ns 600] [--l2-kib 2048] ...
"""
import argparse
import sys


def step_time_us(batch, hidden, workers, args):
    flops = 2 * batch * hidden * 4 * hidden + 30 * batch * hidden
    slice_kib = 4 * hidden * hidden * 4 / workers / 1024
    in_cache = slice_kib <= args.l2_kib
    if in_cache:
        rate = args.rate_cache
    else:
        # batch 1: bound by reading the slice; more rows reuse each weight element read
        rate = min(args.rate_cache, args.rate_memory * max(1, min(batch, 6)))
    compute_us = flops / workers / (rate * 1e9) * 1e6
    barrier_us = workers * args.barrier_ns / 1000 if workers > 1 else 0.0
    lines = batch * hidden * 4 / 64 * (workers - 1) / workers
    exchange_us = lines * args.exchange_ns / 1000
    return compute_us + barrier_us + exchange_us, compute_us, barrier_us + exchange_us, slice_kib, in_cache


def row_split_time_us(batch, hidden, workers, args):
    """The row split: min(workers, batch) workers, each its rows against the whole W_hh."""
    row_workers = min(workers, batch)
    rows = -(-batch // row_workers)  # the busiest worker's rows
    flops = 2 * rows * hidden * 4 * hidden + 30 * rows * hidden
    in_cache = 4 * hidden * hidden * 4 / 1024 <= args.l2_kib
    rate = args.rate_cache if in_cache else min(args.rate_cache, args.rate_memory * max(1, min(rows, 6)))
    return flops / (rate * 1e9) * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--barrier-ns", type=float, default=40.0, help="per arriving worker, ns")
    parser.add_argument("--exchange-ns", type=float, default=30.0, help="per cache line read from another core, ns")
    parser.add_argument("--fork-join-ns", type=float, default=600.0, help="one fork/join of the team, ns per thread")
    parser.add_argument("--rate-cache", type=float, default=45.0, help="GFLOP/s per core, slice in L2")
    parser.add_argument("--rate-memory", type=float, default=6.0, help="GFLOP/s per core at batch 1, slice outside L2")
    parser.add_argument("--l2-kib", type=float, default=2048.0, help="L2 per core, KiB")
    args = parser.parse_args(argv)
    if min(args.barrier_ns, args.exchange_ns, args.fork_join_ns, args.rate_cache, args.rate_memory, args.l2_kib) <= 0:
        parser.error("every figure must be positive")
    print("| B | H | workers | slice of W_hh (KiB) | in L2 | compute (us) | barrier + exchange (us) "
          "| unit split step (us) | speedup vs 1 worker | step-at-a-time loop (us) | row split (us) |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 16, 64):
        for hidden in (256, 1024):
            one, *_ = step_time_us(batch, hidden, 1, args)
            for workers in (2, 8, 16, 64):
                total, compute, barrier, slice_kib, in_cache = step_time_us(batch, hidden, workers, args)
                # step at a time with the same split of the work (OpenMP's static chunks give a
                # thread the same panels every step), but a fork/join per parallel pass: the
                # product, the pointwise pass and the output's zero rows or projection
                stepwise = compute + 3 * workers * args.fork_join_ns / 1000
                rows = row_split_time_us(batch, hidden, workers, args) if batch > 1 else float("nan")
                print(f"| {batch} | {hidden} | {workers} | {slice_kib:.0f} | {'yes' if in_cache else 'no'} "
                      f"| {compute:.2f} | {barrier:.2f} | {total:.2f} | {one / total:.1f}x | {stepwise:.2f} "
                      f"| {'-' if batch == 1 else f'{rows:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
