"""Scale run of streamed language-model pretraining (docs/finetune.md, "Corpora of any size").

    python benchmarks/lm_corpus_scale.py make-corpus --tokens 10000000 --out /tmp/lm10m.txt
    python benchmarks/lm_corpus_scale.py tokenize --corpus /tmp/lm10m.txt --workers 1 --cache /tmp/c10m
    python benchmarks/lm_corpus_scale.py train --corpus /tmp/lm10m.txt --cache /tmp/c10m --steps 30
    python benchmarks/lm_corpus_scale.py read-epoch --corpus /tmp/lm10m.txt --cache /tmp/c10m

make-corpus: a synthetic corpus of about N tokens, one document per line, each document 1-6
sentences drawn at random (seeded) from the embedded texts (Rotten Tomatoes reviews and plot
synopses, gensim's lee_background news): realistic word statistics, for speed and memory
figures only (quality figures come from real text).
tokenize: both passes from scratch (the cache folder is emptied first) with --workers
processes; text MB/s end to end and peak resident memory of the process.
train: --steps truncated-BPTT windows (default recipe, state carried) of rnntl_fast and of the
same model converted to torch.nn, interleaved on the same batches for --rounds rounds; training
tokens/s (median) and peak resident memory, at torch's default thread count (as the
rnntl-fast commands) unless --threads.
read-epoch: every window of one epoch (no model): peak resident memory when windows are read
with pread (as training does) and, with --through-map, through the memory map.
Each subcommand prints one JSON line; run each in its own process so that peak memory is its own.
"""
import argparse
import copy
import json
import os
import re
import resource
import shutil
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rnntl_fast import convert  # noqa: E402
from rnntl_fast.transfer import data  # noqa: E402
from rnntl_fast.machine import set_threads  # noqa: E402
from rnntl_fast.transfer.corpus import TokenStreams, build_token_corpus, file_source  # noqa: E402
from rnntl_fast.transfer.models import LanguageModel, RecurrentEncoder  # noqa: E402
from rnntl_fast.transfer.pipeline import Recipe  # noqa: E402

RECIPE = Recipe()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def make_corpus(args) -> dict:
    reviews, plots = data.load_rotten_tomatoes()
    texts = reviews.texts + plots + data.load_lee_background()
    sentences = [s for text in texts for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    lengths = np.array([len(data.tokenize(s)) for s in sentences])
    rng = np.random.default_rng(args.seed)
    written, lines = 0, 0
    with open(args.out, "w", encoding="utf-8") as handle:
        while written < args.tokens:
            sizes = rng.integers(1, 7, size=10_000)
            picks = rng.integers(0, len(sentences), size=int(sizes.sum()))
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            for start, end in zip(bounds[:-1], bounds[1:]):
                handle.write(" ".join(sentences[i] for i in picks[start:end]) + "\n")
                written += int(lengths[picks[start:end]].sum()) + 1  # + <eos>
                lines += 1
                if written >= args.tokens:
                    break
    return {"corpus": args.out, "tokens": written, "documents": lines, "bytes": os.path.getsize(args.out),
            "distinct_sentences": len(sentences)}


def tokenize(args) -> dict:
    shutil.rmtree(args.cache, ignore_errors=True)
    started = time.perf_counter()
    built = build_token_corpus([file_source(args.corpus)], args.cache, RECIPE.vocab_size, RECIPE.min_freq,
                               workers=args.workers, show_progress=not args.quiet)
    seconds = time.perf_counter() - started
    size = os.path.getsize(args.corpus)
    return {"corpus": args.corpus, "workers": args.workers, "text_mb": size / 1e6, "seconds": seconds,
            "mb_per_s_both_passes": size / 1e6 / seconds, "tokens": len(built.tokens),
            "token_file_mb": os.path.getsize(built.path) / 1e6, "dtype": str(built.tokens.dtype),
            "peak_rss_mb": peak_rss_mb()}


def _corpus(args):
    built = build_token_corpus([file_source(args.corpus)], args.cache, RECIPE.vocab_size, RECIPE.min_freq)
    if not built.describe()["reused_cache"]:
        raise SystemExit(f"{args.cache}: run `tokenize` first (this run would have tokenized)")
    return built


def train(args) -> dict:
    set_threads(args.threads)
    built = _corpus(args)
    torch.manual_seed(0)
    model = LanguageModel(RecurrentEncoder.stacked(**RECIPE.encoder_config(len(built.vocab))),
                          dropout=RECIPE.dropout)
    models = {"rnntl_fast": model, "torch.nn": convert(copy.deepcopy(model), inverse=True)}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    streams = {k: TokenStreams(built.train_tokens(), RECIPE.lm_batch_size, RECIPE.lm_chunk_length) for k in models}
    batches = {k: s.epoch_batches(0) for k, s in streams.items()}

    def run(key: str) -> float:
        started, tokens = time.perf_counter(), 0
        for _ in range(args.steps):
            _, batch = next(batches[key])
            optimizers[key].zero_grad(set_to_none=True)
            loss, count = streams[key].loss(models[key], batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[key].parameters(), 1.0)
            optimizers[key].step()
            tokens += count
        return tokens / (time.perf_counter() - started)

    for key in models:
        run(key)  # warm-up
    samples = {k: [] for k in models}
    for _ in range(args.rounds):
        for key in models:
            samples[key].append(run(key))
    rates = {k: statistics.median(v) for k, v in samples.items()}
    return {"corpus": args.corpus, "tokens": len(built.tokens), "threads": torch.get_num_threads(),
            "steps_per_round": args.steps, "rounds": args.rounds, "tokens_per_s": rates,
            "ratio_rnntl_fast_over_torch_nn": rates["rnntl_fast"] / rates["torch.nn"], "peak_rss_mb": peak_rss_mb()}


def read_epoch(args) -> dict:
    built = _corpus(args)
    tokens = built.tokens[:built.train_count] if args.through_map else built.train_tokens()
    streams = TokenStreams(tokens, RECIPE.lm_batch_size, RECIPE.lm_chunk_length)
    started, checksum, windows = time.perf_counter(), 0, 0
    for _, (inputs, _) in streams.epoch_batches(0):
        checksum += int(inputs[:, 0].sum())
        windows += 1
    return {"corpus": args.corpus, "tokens": len(built.tokens), "windows": windows,
            "seconds": time.perf_counter() - started, "read": "memory map" if args.through_map else "pread",
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-corpus")
    make.add_argument("--tokens", type=int, required=True)
    make.add_argument("--out", required=True)
    make.add_argument("--seed", type=int, default=0)
    for name in ("tokenize", "train", "read-epoch"):
        command = sub.add_parser(name)
        command.add_argument("--corpus", required=True)
        command.add_argument("--cache", required=True)
        if name == "tokenize":
            command.add_argument("--workers", type=int, default=os.cpu_count())
            command.add_argument("--quiet", action="store_true")
        if name == "train":
            command.add_argument("--steps", type=int, default=30)
            command.add_argument("--rounds", type=int, default=3)
            command.add_argument("--threads", type=int, default=None,
                                 help="intra-op threads (default: torch's)")
        if name == "read-epoch":
            command.add_argument("--through-map", action="store_true")
    args = parser.parse_args()
    handler = {"make-corpus": make_corpus, "tokenize": tokenize, "train": train, "read-epoch": read_epoch}
    print(json.dumps(handler[args.command](args)), flush=True)


if __name__ == "__main__":
    main()
