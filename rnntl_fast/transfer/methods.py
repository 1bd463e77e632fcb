"""`rnntl-fast finetune --methods LIST`: several ways of transferring the pretrained
language model into the classifier, on the same data, recipe and seeds, with catastrophic
forgetting measured (docs/finetune.md, "Transfer methods"):

    scratch    no transfer: the classifier from random weights (the baseline)
    finetune   the LM's encoder, every layer fine-tuned (the default transfer arm)
    features   the LM's encoder frozen; only the head trains (feature extraction)
    gradual    ULMFiT: gradual unfreezing + discriminative rates (/2.6 per group) + STLR
    l2sp       finetune + alpha * ||w - w0||^2 on the transferred weights
    ewc        finetune + alpha * sum_i F_i / mean(F) * (w_i - w0_i)^2, F the diagonal
               Fisher of the LM loss on windows of the LM's training tokens
    multitask  finetune + mu * LM loss (next-word NLL on windows of the LM's training
               tokens, the LM head kept frozen)
    adapt      the encoder grown by one new recurrent layer stacked on the transferred ones
    elmo       a frozen forward + backward LM; the head reads a learned scalar mix of layers

Forgetting: the LM perplexity, on the LM corpus's held-out tokens and computed as the LM
phase computes it (corpus.stream_perplexity), of each run's encoder under the pretrained
LM head (kept unchanged), against the pretrained LM's own perplexity. All LM text comes
from the run's TokenCorpus (corpus.py), the one LM data path."""
import argparse
import copy
import dataclasses
import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cli_types import positive_float, positive_int
from .contextual import BiLanguageModelFeatures, ElmoClassifier
from .corpus import TokenCorpus, TokenStreams, reversed_corpus, stream_perplexity
from .data import EncodedTexts
from .models import LanguageModel, RecurrentEncoder, TextClassifier
from .pipeline import (Recipe, RunControl, _seed_model_init, language_model_streams, pretrain_language_model,
                       train_classifier)
from .regularizers import EWC, diagonal_fisher
from .training import load_checkpoint

METHODS = ("scratch", "finetune", "features", "gradual", "l2sp", "ewc", "multitask", "adapt", "elmo")


@dataclass
class MethodSettings:
    """The methods' own hyperparameters (recorded in metrics.json; set before any run,
    never chosen on test data)."""
    penalty_alpha: float = 1e-2      # l2sp and ewc: same alpha, so they differ only by the Fisher weights
    ewc_chunks: int = 256            # LM training windows for the Fisher estimate (one backward each)
    multitask_lm_weight: float = 1.0  # mu: classifier loss + mu * LM loss
    gradual_lr_factor: float = 2.6   # ULMFiT's discriminative factor
    adapt_new_layers: int = 1        # recurrent layers stacked on the transferred ones


def parse_methods(text: str) -> List[str]:
    """'all' or a comma-separated list of METHODS (argparse type: a bad name is a usage error)."""
    if text.strip() == "all":
        return list(METHODS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}; choose from {', '.join(METHODS)} "
                                         "or 'all'")
    return list(dict.fromkeys(names))


def add_method_arguments(parser) -> None:
    defaults = MethodSettings()
    group = parser.add_argument_group("transfer methods (docs/finetune.md)")
    group.add_argument("--methods", type=parse_methods, default=None, metavar="LIST",
                       help=f"compare transfer methods ({', '.join(METHODS)}; 'all'): one table in metrics.json "
                            "under 'methods'. Default: only the transfer and scratch arms")
    group.add_argument("--penalty-alpha", type=positive_float, default=defaults.penalty_alpha,
                       help="alpha of the l2sp and ewc methods")
    group.add_argument("--ewc-chunks", type=positive_int, default=defaults.ewc_chunks,
                       help="LM training windows (of --lm-chunk-length tokens, spread evenly over the "
                            "training tokens) the ewc method's Fisher is estimated on")
    group.add_argument("--multitask-lm-weight", type=positive_float, default=defaults.multitask_lm_weight,
                       help="mu of the multitask method: classifier loss + mu * LM loss")


def settings_from_args(args) -> MethodSettings:
    return MethodSettings(penalty_alpha=args.penalty_alpha, ewc_chunks=args.ewc_chunks,
                          multitask_lm_weight=args.multitask_lm_weight)


def length_sorted(dataset: EncodedTexts) -> EncodedTexts:
    """The same texts and labels ordered by token count (stable), for evaluation only: a
    batch of 256 unsorted reviews is padded to its longest (here 43% of the padded steps
    are real tokens), a batch of neighbours in length hardly at all. Accuracy does not
    depend on the order; training sets keep theirs (their batches are drawn by seed)."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.ids[i]))
    result = copy.copy(dataset)
    result.ids = [dataset.ids[i] for i in order]
    result.labels = dataset.labels[order]
    return result


# -- the pretrained language model, reused across runs in one output folder --------------

# the Recipe fields that decide a pretrained LM's weights (the classifier's fields do not)
LM_RECIPE_FIELDS = ("seed", "vocab_size", "min_freq", "embedding_dim", "hidden_size", "num_layers", "cell",
                    "dropout", "recurrent_dropout", "weight_drop", "zoneout", "layer_norm", "lm_epochs", "lm_batch_size", "lm_chunk_length", "lm_lr", "lm_state",
                    "lm_random_bptt", "lm_valid_fraction", "cut_frac", "ratio", "max_grad_norm")


def language_model_identity(corpus: TokenCorpus, recipe: Recipe, world_size: int) -> dict:
    """What a pretrained LM's weights follow from: the content of its corpus's inputs (names
    and hashes, corpus.py), the token count and split, the LM recipe fields, the number of
    processes and the code versions. Two runs with equal identities pretrain the same LM
    (up to the float rounding of the thread count)."""
    from .. import __version__
    inputs = [{k: item.get(k) for k in ("name", "hash", "vocabulary_only")} for item in corpus.meta["inputs"]]
    return {"corpus_inputs": inputs, "tokens": len(corpus.tokens), "train_tokens": corpus.train_count,
            "vocabulary": len(corpus.vocab), "recipe": {k: getattr(recipe, k) for k in LM_RECIPE_FIELDS},
            "world_size": world_size, "rnntl_fast": __version__, "torch": torch.__version__.split("+")[0]}


def identity_path(checkpoint: str) -> str:
    """The record of what the LM checkpoint `checkpoint` was pretrained from, next to it."""
    return os.path.splitext(checkpoint)[0] + ".identity.json"


def _differences(recorded: dict, wanted: dict, prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} there, {b!r} here" if not isinstance(a, list) else f"{prefix}{key}")
    return out


def cached_language_model_mismatch(checkpoint: str, identity: dict, vocab_state: dict) -> Optional[str]:
    """Why the LM checkpoint `checkpoint` cannot stand in for pretraining an LM of
    `identity` (None: it can): not a finished LM checkpoint, an identity record that is
    missing or differs (the differing fields named), or another vocabulary."""
    try:
        state = load_checkpoint(checkpoint)
    except Exception as error:  # any reason torch.load gives: the file is not ours to reuse
        return f"unreadable ({type(error).__name__}: {error})"
    if not isinstance(state, dict) or not {"model", "finished", "recipe", "vocab"} <= set(state):
        return "not a language-model checkpoint of this command"
    if not state["finished"]:
        return f"an unfinished pretraining ({state.get('global_step')} steps; --resume continues it)"
    record = identity_path(checkpoint)
    if not os.path.isfile(record):
        return f"no record of what it was pretrained on ({os.path.basename(record)})"
    try:
        with open(record) as handle:
            recorded = json.load(handle)
    except (OSError, ValueError) as error:
        return f"{os.path.basename(record)} unreadable ({error})"
    differences = _differences(recorded, json.loads(json.dumps(identity)))
    if differences:
        return "pretrained on other data or settings: " + "; ".join(differences[:4]) + \
            (f" (+{len(differences) - 4} more)" if len(differences) > 4 else "")
    if state["vocab"] != vocab_state:
        return "its vocabulary is not this run's"
    return None


def pretrain_or_reuse_language_model(corpus: TokenCorpus, recipe: Recipe, control: RunControl,
                                     log=print) -> Tuple[LanguageModel, dict]:
    """pipeline.pretrain_language_model, or the LM a previous run left finished in the
    output folder (control.checkpoint("language_model")) when its identity record
    (language_model_identity) equals this run's: loaded as a --resume of a finished run,
    so the model, the summary and the RNG state are the ones that run ended with. A
    checkpoint that does not match is not used: one line says why, and the LM is pretrained
    anew (overwriting it). With control.resume the checkpoint is resumed as before.
    Returns (model, summary + "reused_checkpoint", "seconds", "cpu_seconds")."""
    checkpoint = control.checkpoint("language_model")
    identity = language_model_identity(corpus, recipe, control.place.world_size)
    reused = False
    if checkpoint is not None and not control.resume and os.path.isfile(checkpoint):
        reason = cached_language_model_mismatch(checkpoint, identity, corpus.vocab.state_dict())
        reused = reason is None
        if control.place.is_main:
            log(f"{checkpoint}: reusing this language model (same corpus, LM recipe and code versions)" if reused
                else f"{checkpoint}: not reused, {reason}; pretraining the language model anew")
    control.place.barrier()  # every rank has read the old files before they change
    if checkpoint is not None and not reused and control.place.is_main and os.path.isfile(identity_path(checkpoint)):
        os.remove(identity_path(checkpoint))  # it would describe the old checkpoint until this one is finished
    wall, cpu = time.perf_counter(), time.process_time()
    model, summary = pretrain_language_model(corpus, recipe, dataclasses.replace(control, resume=control.resume or
                                                                                 reused))
    summary.update(reused_checkpoint=checkpoint if reused else None, seconds=time.perf_counter() - wall,
                   cpu_seconds=time.process_time() - cpu)
    if checkpoint is not None and control.place.is_main:
        record = identity_path(checkpoint)
        with open(record + ".tmp", "w") as handle:
            json.dump(identity, handle, indent=1)
        os.replace(record + ".tmp", record)
    return model, summary


# -- models of the methods -------------------------------------------------------------

class ClassifierWithLanguageModel(TextClassifier):
    """A TextClassifier plus the pretrained LM head on its encoder, for multi-task training.

    forward(ids [B, T], lengths [B]) -> logits [B, C]; forward(ids, lengths, labels [B])
    -> cross_entropy + lm_weight * next-word NLL of one window of `lm_windows` (inputs and
    targets [b, L], from a zero state: the encoder changes every step, so no state is
    carried). The LM head stays frozen (so the encoder must keep producing what it reads).
    LM batch k (k counts training calls, kept in the `lm_step` buffer so that a resumed run
    continues the same sequence) is window k (mod the windows of one pass) of the streams."""

    def __init__(self, encoder: RecurrentEncoder, num_classes: int, language_model: LanguageModel,
                 lm_windows: TokenStreams, lm_weight: float, pooling: str = "concat", dropout: float = 0.2):
        super().__init__(encoder, num_classes, pooling=pooling, dropout=dropout)
        self.lm_head = copy.deepcopy(language_model.head)
        for parameter in self.lm_head.parameters():
            parameter.requires_grad_(False)
        self.lm_windows = lm_windows
        lengths = lm_windows.window_lengths(0)
        self.lm_offsets = [0] + list(itertools.accumulate(lengths))[:-1]
        self.lm_lengths = lengths
        self.lm_weight = lm_weight
        self.register_buffer("lm_step", torch.zeros((), dtype=torch.long))

    def _lm_batch(self) -> Tuple[Tensor, Tensor]:
        """(inputs [b, L], targets [b, L]) of LM window lm_step (mod the windows of a pass)."""
        index = int(self.lm_step) % len(self.lm_lengths)
        inputs, targets = self.lm_windows.window(self.lm_offsets[index], self.lm_lengths[index])
        device = self.lm_step.device
        return inputs.to(device), targets.to(device)

    def forward(self, ids: Tensor, lengths: Optional[Tensor] = None, labels: Optional[Tensor] = None):
        logits = super().forward(ids, lengths)
        if labels is None:
            return logits
        inputs, targets = self._lm_batch()
        self.lm_step += 1
        outputs, _ = self.encoder(inputs)
        return F.cross_entropy(logits, labels) + self.lm_weight * self.lm_head.loss(outputs, targets)


def _multitask_loss(model: nn.Module, batch) -> Tuple[Tensor, int]:
    ids, lengths, labels = batch
    return model(ids, lengths, labels), int(lengths.sum())


def encoder_perplexity(language_model: LanguageModel, encoder: nn.Module, held_out: TokenStreams,
                       device=None) -> float:
    """LM perplexity of `encoder`'s weights under `language_model`'s head: the LM's encoder
    weights are replaced by the same-named weights of `encoder` (a grown encoder's new
    layers are not read: the LM's own layers are the transferred ones)."""
    probe = copy.deepcopy(language_model)
    source = encoder.state_dict()
    missing = [k for k in probe.encoder.state_dict() if k not in source]
    if missing:
        raise ValueError(f"encoder lacks the language model's weights {missing}")
    probe.encoder.load_state_dict({k: source[k] for k in probe.encoder.state_dict()})
    return stream_perplexity(probe, held_out, device)


@dataclass
class MethodContext:
    """What every method run shares: the data, the pretrained LM(s) and the settings."""
    sets: Dict[str, EncodedTexts]
    num_classes: int
    vocab_size: int
    language_model: Optional[LanguageModel]  # None: only scratch runs
    lm_train: Optional[TokenStreams]  # windows of the LM's training tokens (multitask batches)
    lm_valid: Optional[TokenStreams]  # the held-out tokens, as the LM phase scores them (forgetting)
    settings: MethodSettings
    backward_language_model: Optional[LanguageModel] = None
    fisher: Optional[Dict[str, Tensor]] = None  # classifier parameter name -> F


def method_recipe(method: str, recipe: Recipe, settings: MethodSettings) -> Recipe:
    """The recipe of one method: the shared recipe with the method's own changes."""
    changes = {"features": dict(freeze="encoder"),
               "gradual": dict(freeze="gradual", lr_factor=settings.gradual_lr_factor),
               "l2sp": dict(l2sp_alpha=settings.penalty_alpha, l2sp_beta=0.0),
               "adapt": dict(num_layers=recipe.num_layers + settings.adapt_new_layers),
               "elmo": dict(scratch_lr=None)}.get(method, {})
    return dataclasses.replace(recipe, **changes)


def build_method_model(method: str, recipe: Recipe, context: MethodContext, device=None) -> Tuple[nn.Module, dict]:
    """The method's model before training and the keyword arguments for train_classifier
    (encoder_state, model, loss_fn, regularizer_factory). `recipe` is method_recipe's."""
    encoder_state = context.language_model.encoder.state_dict()
    if method in ("scratch",):
        return None, {}
    if method in ("finetune", "features", "gradual", "l2sp", "adapt"):
        return None, {"encoder_state": encoder_state}
    if method == "ewc":
        fisher = context.fisher
        return None, {"encoder_state": encoder_state,
                      "regularizer_factory": lambda model: EWC(model, fisher, context.settings.penalty_alpha)}
    if method == "multitask":
        _seed_model_init(recipe.seed + 1)
        model = ClassifierWithLanguageModel(
            RecurrentEncoder.stacked(**recipe.encoder_config(context.vocab_size)), context.num_classes,
            context.language_model, context.lm_train, context.settings.multitask_lm_weight, pooling=recipe.pooling,
            dropout=recipe.dropout).to(device)
        return model, {"encoder_state": encoder_state, "model": model, "loss_fn": _multitask_loss}
    if method == "elmo":
        if context.backward_language_model is None:
            raise ValueError("the elmo method needs the backward language model")
        features = BiLanguageModelFeatures.from_language_models(context.language_model.encoder,
                                                                context.backward_language_model.encoder)
        _seed_model_init(recipe.seed + 1)
        model = ElmoClassifier(features, context.num_classes, recipe.pooling, dropout=recipe.dropout).to(device)
        return model, {"model": model}
    raise ValueError(f"unknown method {method!r}; methods are {METHODS}")


def _forward_lm_unchanged(model: ElmoClassifier, language_model: LanguageModel) -> bool:
    """True when the ELMo classifier's forward LM weights equal the pretrained LM's bitwise."""
    features = model.features
    reference = BiLanguageModelFeatures.from_language_models(language_model.encoder, language_model.encoder)
    pairs = [(features.embeddings[0], reference.embeddings[0])] + list(zip(features.forward_layers,
                                                                           reference.forward_layers))
    return all(torch.equal(a, b) for x, y in pairs for a, b in zip(x.state_dict().values(), y.state_dict().values()))


def run_method(method: str, name: str, recipe: Recipe, context: MethodContext, control: RunControl,
               perplexity_before: float) -> Tuple[nn.Module, dict]:
    """Trains one method at one seed. Returns (model, summary with forgetting fields)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    own_recipe = method_recipe(method, recipe, context.settings)
    model, options = build_method_model(method, own_recipe, context, control.place.device)
    sets = context.sets
    model, summary = train_classifier(name, sets["train"], sets["valid"], sets["test"], context.num_classes,
                                      context.vocab_size, own_recipe, control, **options)
    device = control.place.device
    if method == "scratch":
        after = None  # its encoder never was a language model
    elif method == "elmo":
        if not _forward_lm_unchanged(model, context.language_model):
            raise RuntimeError("the elmo method's frozen forward LM changed during training")
        after = perplexity_before
        summary["transferred"] = True
        summary["transferred_parameters"] = [f"features.{n}" for n, _ in model.features.named_parameters()]
    else:
        after = encoder_perplexity(context.language_model, model.encoder, context.lm_valid, device)
    summary.update(method=method, lm_perplexity_before=perplexity_before, lm_perplexity_after=after,
                   seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started)
    return model, summary


def prepare_context(methods: Sequence[str], language_model: Optional[LanguageModel],
                    lm_corpus: Optional[TokenCorpus], vocab_size: int, sets: Dict[str, EncodedTexts],
                    num_classes: int, recipe: Recipe, control: RunControl, settings: MethodSettings,
                    log=print) -> Tuple[MethodContext, dict]:
    """The shared parts, all from `lm_corpus` (the corpus the LM was pretrained on): the
    held-out streams, the multitask windows, the Fisher (ewc), the backward LM (elmo).
    Without a language model (only scratch runs) there is nothing to share but the data.
    Returns (context, description for metrics.json)."""
    description = {"settings": dataclasses.asdict(settings)}
    if language_model is None:
        return MethodContext(sets, num_classes, vocab_size, None, None, None, settings), description
    if lm_corpus is None:
        raise ValueError("the methods need the corpus the language model was pretrained on")
    _, held_out = language_model_streams(lm_corpus, recipe, control.place)
    train_tokens = lm_corpus.train_tokens()
    # multitask: windows of --lm-chunk-length tokens, one row per classifier batch row
    windows = TokenStreams(train_tokens, recipe.batch_size, recipe.lm_chunk_length, carry_state=False,
                           name=f"{lm_corpus.name} (training part, multitask windows)") \
        if "multitask" in methods else None
    context = MethodContext(sets, num_classes, vocab_size, language_model, windows, held_out, settings)
    device = control.place.device
    if "ewc" in methods:
        started, cpu_started = time.perf_counter(), time.process_time()
        # the first window of each of `rows` streams: windows spread evenly over the training tokens
        rows = min(settings.ewc_chunks, (len(train_tokens) - 1) // recipe.lm_chunk_length)
        spread = TokenStreams(train_tokens, max(rows, 1), recipe.lm_chunk_length, carry_state=False,
                              name=f"{lm_corpus.name} (training part, --ewc-chunks windows)")
        inputs, targets = spread.window(0, recipe.lm_chunk_length)
        examples = [(inputs[i:i + 1].to(device), targets[i:i + 1].to(device)) for i in range(len(inputs))]
        names = [f"encoder.{n}" for n, _ in language_model.encoder.named_parameters()]
        fisher = diagonal_fisher(language_model, lambda model, example: model(*example), examples, names)
        context.fisher = fisher  # the classifier's encoder has the same parameter names
        description["ewc_fisher"] = {"chunks": len(examples), "seconds": time.perf_counter() - started,
                                     "cpu_seconds": time.process_time() - cpu_started,
                                     "mean": sum(float(f.sum()) for f in fisher.values()) /
                                             sum(f.numel() for f in fisher.values())}
    if "elmo" in methods:
        log("elmo: the backward language model (the same tokens reversed, same recipe)")
        backward_control = dataclasses.replace(control, output_dir=None if control.output_dir is None else
                                               os.path.join(control.output_dir, "backward_lm"))
        backward, summary = pretrain_or_reuse_language_model(reversed_corpus(lm_corpus), recipe, backward_control,
                                                              log)
        control.stop_after_steps = None if control.stop_after_steps is None else \
            control.stop_after_steps - summary["steps"]
        context.backward_language_model = backward
        description["backward_language_model"] = {key: summary[key] for key in (
            "valid_perplexity", "steps", "reused_checkpoint", "seconds", "cpu_seconds")}
        description["backward_language_model"]["train_tokens"] = summary["corpus"]["train_tokens"]
    return context, description


def summarise_method(runs: List[dict], scratch_runs: Optional[List[dict]]) -> dict:
    """One method over seeds: accuracies (mean, sample sd, per seed), paired gains vs
    scratch (same seeds), LM perplexity before / after, seconds."""
    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None, values
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values

    row = {}
    for key in ("test_accuracy", "valid_accuracy", "lm_perplexity_after"):
        row[key], row[f"{key}_std"], row[f"{key}_per_seed"] = spread([r[key] for r in runs])
    row["lm_perplexity_before"] = runs[0]["lm_perplexity_before"]
    if scratch_runs:
        gains = [r["test_accuracy"] - s["test_accuracy"] for r, s in zip(runs, scratch_runs)]
        row["gain_vs_scratch"], row["gain_vs_scratch_std"], row["gain_vs_scratch_per_seed"] = spread(gains)
        row["seeds_ahead_of_scratch"] = sum(g > 0 for g in gains)
    row["seconds"] = sum(r["seconds"] for r in runs)
    row["cpu_seconds"] = sum(r["cpu_seconds"] for r in runs)
    row["steps"] = sum(r["steps"] for r in runs)
    row["runs"] = runs
    return row


def methods_table(methods: Dict[str, dict]) -> str:
    """The printed table (one line per method)."""
    lines = [f"{'method':10s} {'test accuracy':>17s} {'gain vs scratch (ahead)':>25s} {'valid':>7s} "
             f"{'LM ppl before -> after':>24s} {'seconds':>8s} {'cpu s':>8s}"]
    for name, row in methods.items():
        seeds = len(row["runs"])
        accuracy = f"{row['test_accuracy']:.4f} +- {row['test_accuracy_std']:.4f}"
        gain = "" if row.get("gain_vs_scratch") is None or name == "scratch" else \
            f"{row['gain_vs_scratch']:+.4f} +- {row['gain_vs_scratch_std']:.4f} ({row['seeds_ahead_of_scratch']}/{seeds})"
        if row["lm_perplexity_after"] is None:
            perplexity = "-"
        else:
            perplexity = f"{row['lm_perplexity_before']:.1f} -> {row['lm_perplexity_after']:.1f}"
        lines.append(f"{name:10s} {accuracy:>17s} {gain:>25s} {row['valid_accuracy']:7.4f} {perplexity:>24s} "
                     f"{row['seconds']:8.0f} {row['cpu_seconds']:8.0f}")
    return "\n".join(lines)


def run_methods(methods: Sequence[str], language_model: Optional[LanguageModel], lm_corpus: Optional[TokenCorpus],
                vocab_size: int, sets: Dict[str, EncodedTexts], num_classes: int,
                recipe: Recipe, control: RunControl, settings: MethodSettings, repeats: int,
                log=print) -> Tuple[dict, Dict[str, List[dict]], Optional[nn.Module]]:
    """Every method at seeds recipe.seed .. recipe.seed + repeats - 1 (methods alternate
    within a seed, so a cut-short run still compares them). Returns (the "methods" section
    of metrics.json, {method: per-seed summaries}, the first TextClassifier trained)."""
    if language_model is None and any(m != "scratch" for m in methods):
        raise SystemExit("--methods: every method but scratch needs the language model pretrained in this run "
                         "(not --encoder / --pretrained-*, and --lm-epochs > 0)")
    sets = {name: dataset if name == "train" else length_sorted(dataset) for name, dataset in sets.items()}
    context, description = prepare_context(methods, language_model, lm_corpus, vocab_size, sets, num_classes,
                                           recipe, control, settings, log)
    before = stream_perplexity(language_model, context.lm_valid, control.place.device) \
        if language_model is not None else None
    runs: Dict[str, List[dict]] = {m: [] for m in methods}
    first_classifier = None
    for repeat in range(repeats):
        seed_recipe = dataclasses.replace(recipe, seed=recipe.seed + repeat)
        for method in methods:
            name = f"{method}_seed{repeat}"
            model, summary = run_method(method, name, seed_recipe, context, control, before)
            runs[method].append(summary)
            if first_classifier is None and type(model) is TextClassifier:
                first_classifier = model
            if control.stop_after_steps is not None:
                control.stop_after_steps -= summary["steps"]
            log(f"{name}: test accuracy {summary['test_accuracy']:.4f}"
                + (f", LM perplexity {before:.1f} -> {summary['lm_perplexity_after']:.1f}"
                   if summary["lm_perplexity_after"] is not None else "") + f" ({summary['seconds']:.0f} s)")
    table = {m: summarise_method(runs[m], runs.get("scratch")) for m in methods}
    description["table"] = table
    if context.lm_valid is not None:  # the tokens the perplexities score
        description["held_out_lm_tokens"] = context.lm_valid.batch_size * context.lm_valid.stream_length
    return description, runs, first_classifier


def run_from_cli(args, language_model, lm_corpus, vocab, sets, num_classes, recipe, control, metrics,
                 log=print) -> Optional[nn.Module]:
    """`finetune --methods`: fills metrics["methods"], and metrics["transfer"] /
    metrics["scratch"] from the finetune / scratch rows (for the summary and the plot).
    Returns the first plain TextClassifier trained (for the throughput timing) or None."""
    from .pipeline import combine_runs
    section, runs, first = run_methods(args.methods, language_model, lm_corpus, len(vocab), sets, num_classes,
                                       recipe, control, settings_from_args(args), args.repeats, log)
    metrics["methods"] = section
    for arm, method in (("transfer", "finetune"), ("scratch", "scratch")):
        if runs.get(method):
            metrics[arm] = combine_runs(runs[method])
    return first
