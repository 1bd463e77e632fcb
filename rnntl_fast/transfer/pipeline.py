"""The pretrain-then-fine-tune recipe behind `rnntl-fast pretrain` and `rnntl-fast
finetune`: a word-level LSTM language model, its encoder transferred into a classifier
(ULMFiT: gradual unfreezing, discriminative learning rates, slanted triangular schedule;
optionally L2-SP), the same classifier trained from scratch for comparison, and training
throughput of rnntl_fast against torch.nn on identical steps."""
import copy
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .corpus import TokenCorpus, TokenStreams, stream_perplexity
from .data import EncodedTexts, collate
from .freezing import GradualUnfreezer, set_trainable
from .models import LanguageModel, RecurrentEncoder, TextClassifier
from .regularizers import L2SP
from .schedules import SlantedTriangularLR, discriminative_param_groups
from .training import Distributed, Trainer, quiet_generator

FREEZE_POLICIES = ("gradual", "none", "encoder", "embedding")


@dataclass
class Recipe:
    """Everything that decides a run's result (recorded in the metrics JSON)."""
    seed: int = 0
    vocab_size: int = 6000
    min_freq: int = 2
    max_tokens: int = 64
    embedding_dim: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    cell: str = "lstm"
    dropout: float = 0.3
    recurrent_dropout: float = 0.0  # variational dropout of h_{t-1} inside the recurrence (docs/semantics.md)
    weight_drop: float = 0.5        # DropConnect on weight_hh (docs/semantics.md); chosen on validation (docs/finetune.md)
    zoneout: float = 0.0            # zoneout of h and c (docs/semantics.md)
    layer_norm: bool = False        # layer-normalised cells (docs/semantics.md)
    # language model
    lm_epochs: int = 10
    lm_batch_size: int = 64
    lm_chunk_length: int = 40  # BPTT window (the mean one with lm_random_bptt)
    lm_lr: float = 1e-2
    lm_state: str = "carry"  # "carry": state carried across windows (truncated BPTT); "reset": zeros each window
    lm_random_bptt: bool = False
    lm_valid_fraction: float = 0.05  # held out from the end of the token stream
    # classifier: defaults chosen on the embedded data's validation split (docs/finetune.md)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-2
    lr_factor: float = 1.0
    cut_frac: float = 0.1
    ratio: float = 32.0
    freeze: str = "none"
    unfreeze_every: int = 1
    freeze_patterns: List[str] = field(default_factory=list)
    l2sp_alpha: float = 0.0
    l2sp_beta: float = 0.0
    pooling: str = "concat"
    max_grad_norm: Optional[float] = 1.0
    scratch_lr: Optional[float] = None  # None: same as lr

    def encoder_config(self, vocab_size: int) -> dict:
        """The arguments of RecurrentEncoder.stacked for a vocabulary of `vocab_size` words."""
        return dict(vocab_size=vocab_size, embedding_dim=self.embedding_dim, hidden_size=self.hidden_size,
                    num_layers=self.num_layers, bidirectional=self.bidirectional, cell=self.cell,
                    dropout=self.dropout, recurrent_dropout=self.recurrent_dropout, weight_drop=self.weight_drop,
                    zoneout=self.zoneout, layer_norm=self.layer_norm)


@dataclass
class RunControl:
    """How a run is executed (not what it computes): where, checkpoints, resume, stop."""
    place: Distributed = field(default_factory=Distributed)
    output_dir: Optional[str] = None
    resume: bool = False
    checkpoint_every: int = 0
    stop_after_steps: Optional[int] = None
    show_progress: bool = True

    def checkpoint(self, name: str) -> Optional[str]:
        return None if self.output_dir is None else os.path.join(self.output_dir, f"{name}.pt")


def _seed_model_init(seed: int) -> None:
    # identical initial weights on every rank; dropout streams then differ by rank
    torch.manual_seed(seed)


def _seed_rank(seed: int, place: Distributed) -> None:
    torch.manual_seed(seed * 1000 + 17 + place.rank)


def _classifier_loss(model: nn.Module, batch) -> Tuple[torch.Tensor, int]:
    ids, lengths, labels = batch
    return F.cross_entropy(model(ids, lengths), labels), int(lengths.sum())


@torch.no_grad()
def accuracy(model: nn.Module, dataset: EncodedTexts, batch_size: int = 256, device=None) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         generator=quiet_generator())
    for ids, lengths, labels in loader:
        predictions = model(ids.to(device), lengths.to(device)).argmax(-1)
        correct += int((predictions == labels.to(device)).sum())
    model.train(was_training)
    return correct / max(len(dataset), 1)


def language_model_streams(corpus: TokenCorpus, recipe: Recipe,
                           place: Distributed) -> Tuple[TokenStreams, TokenStreams]:
    """(this rank's training streams, the whole held-out part as streams) of `corpus`."""
    if recipe.lm_state not in ("carry", "reset"):
        raise ValueError(f"lm_state must be 'carry' or 'reset', got {recipe.lm_state!r}")
    carry = recipe.lm_state == "carry"
    train = TokenStreams(corpus.train_tokens(), recipe.lm_batch_size, recipe.lm_chunk_length, rank=place.rank,
                         world_size=place.world_size, random_bptt=recipe.lm_random_bptt, seed=recipe.seed,
                         carry_state=carry, name=f"{corpus.name} (training part)")
    valid = TokenStreams(corpus.valid_tokens(), recipe.lm_batch_size, recipe.lm_chunk_length, carry_state=carry,
                         name=f"{corpus.name} (held-out last {recipe.lm_valid_fraction:g}, --lm-valid-fraction)")
    return train, valid


def pretrain_language_model(corpus: TokenCorpus, recipe: Recipe, control: RunControl) -> Tuple[LanguageModel, dict]:
    """Trains a left-to-right word LM on the corpus's training tokens with truncated BPTT
    (TokenStreams); perplexity on the held-out tokens each epoch, computed the same way.
    Returns (model, summary with history)."""
    if recipe.bidirectional:
        raise ValueError("language-model pretraining needs a unidirectional encoder (drop --bidirectional)")
    place = control.place
    vocab = corpus.vocab
    train_streams, valid_streams = language_model_streams(corpus, recipe, place)
    _seed_model_init(recipe.seed)
    model = LanguageModel(RecurrentEncoder.stacked(**recipe.encoder_config(len(vocab))),
                          dropout=recipe.dropout).to(place.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lm_lr, betas=(0.8, 0.99))
    trainer = Trainer(model, optimizer, None, train_streams.loss, train_streams, None, recipe.lm_batch_size,
                      recipe.lm_epochs, seed=recipe.seed, place=place,
                      evaluate=lambda m: {"valid_perplexity": stream_perplexity(m, valid_streams, place.device)},
                      checkpoint_path=control.checkpoint("language_model"), checkpoint_every=control.checkpoint_every,
                      stop_after_steps=control.stop_after_steps, max_grad_norm=recipe.max_grad_norm,
                      progress_label="pretrain LM", show_progress=control.show_progress,
                      find_unused_parameters=True,  # adaptive-softmax tails may see no target in a batch
                      extra_state={"vocab": vocab.state_dict(), "recipe": asdict(recipe)})
    trainer.scheduler = SlantedTriangularLR(optimizer, trainer.total_steps, recipe.cut_frac, recipe.ratio)
    resumed = control.resume and trainer.resume_from(control.checkpoint("language_model") or "")
    if not resumed:
        _seed_rank(recipe.seed, place)
    trainer.fit()
    summary = {"corpus": corpus.describe(), "lm_state": recipe.lm_state, "random_bptt": recipe.lm_random_bptt,
               "stream_length": train_streams.stream_length,
               "steps": trainer.global_step, "history": trainer.history.state_dict(),
               "valid_perplexity": trainer.history.epochs[-1]["valid_perplexity"] if trainer.history.epochs else None}
    return model, summary


def transfer_encoder(classifier: TextClassifier, encoder_state: Dict[str, torch.Tensor]) -> List[str]:
    """Copies pretrained encoder weights (a RecurrentEncoder state_dict or part of one:
    `embedding.weight`, `layers.{m}.weight_ih_l{k}`, ...) into the classifier's encoder. A
    bidirectional classifier takes the forward direction from a unidirectional LM; its
    `_reverse` weights stay new, and so do the layers a grown encoder adds. Returns the
    qualified names of the parameters that were transferred."""
    target = classifier.encoder.state_dict()
    mismatched = [k for k, v in encoder_state.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"pretrained encoder weights do not fit the classifier: {mismatched}")
    unexpected = [k for k in encoder_state if k not in target]
    if unexpected:
        raise ValueError(f"pretrained encoder has weights the classifier lacks: {unexpected}")
    classifier.encoder.load_state_dict(encoder_state, strict=False)
    return [f"encoder.{k}" for k in encoder_state]


def build_classifier(recipe: Recipe, vocab_size: int, num_classes: int, device) -> TextClassifier:
    _seed_model_init(recipe.seed + 1)
    encoder = RecurrentEncoder.stacked(**recipe.encoder_config(vocab_size))
    return TextClassifier(encoder, num_classes, pooling=recipe.pooling, dropout=recipe.dropout).to(device)


def _apply_freeze_policy(model: TextClassifier, recipe: Recipe, transferred: bool):
    """Returns a GradualUnfreezer or None, after setting requires_grad for the policy."""
    policy = recipe.freeze if transferred else "none"
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"freeze policy must be one of {FREEZE_POLICIES}, got {policy!r}")
    unfreezer = None
    if policy == "gradual":
        unfreezer = GradualUnfreezer(model.layer_groups(), every=recipe.unfreeze_every)
    elif policy == "encoder":
        for parameter in model.encoder.parameters():
            parameter.requires_grad_(False)
    elif policy == "embedding":
        for parameter in model.encoder.embedding.parameters():
            parameter.requires_grad_(False)
    if transferred and recipe.freeze_patterns:
        set_trainable(model, recipe.freeze_patterns, False)
    return unfreezer


def train_classifier(name: str, train_set: EncodedTexts, valid_set: EncodedTexts, test_set: EncodedTexts,
                     num_classes: int, vocab_size: int, recipe: Recipe, control: RunControl,
                     encoder_state: Optional[dict] = None, embedding: Optional[nn.Module] = None,
                     model: Optional[nn.Module] = None, loss_fn=_classifier_loss,
                     regularizer_factory=None) -> Tuple[TextClassifier, dict]:
    """Fine-tunes (encoder_state given: ULMFiT recipe) or trains from scratch (plain: all
    layers, one lr, same schedule and epochs). Returns (model, summary).

    For the transfer methods (rnntl_fast/transfer/methods.py): `model` replaces the
    recipe's TextClassifier (it needs .layer_groups(), and .encoder to receive encoder_state), `loss_fn(model,
    batch)` the cross-entropy, and `regularizer_factory(model)` the L2-SP penalty."""
    place = control.place
    if model is None:
        model = build_classifier(recipe, vocab_size, num_classes, place.device)
    transferred_names: List[str] = []
    if encoder_state is not None:
        transferred_names = transfer_encoder(model, encoder_state)
    if embedding is not None:  # user-supplied pretrained vectors (possibly partially frozen)
        model.encoder.embedding = embedding.to(place.device)
        transferred_names = sorted(set(transferred_names + [f"encoder.embedding.{n}" for n, _ in embedding.named_parameters()]))
    transferred = bool(transferred_names)
    unfreezer = _apply_freeze_policy(model, recipe, transferred)
    factor = recipe.lr_factor if transferred else 1.0
    lr = recipe.lr if transferred or recipe.scratch_lr is None else recipe.scratch_lr
    optimizer = torch.optim.Adam(discriminative_param_groups(model.layer_groups(), lr, factor), betas=(0.8, 0.99))
    regularizer = None
    if regularizer_factory is not None:
        regularizer = regularizer_factory(model).to(place.device)
    elif transferred and (recipe.l2sp_alpha > 0 or recipe.l2sp_beta > 0):
        regularizer = L2SP(model, recipe.l2sp_alpha, recipe.l2sp_beta, transferred=transferred_names).to(place.device)
    trainer = Trainer(model, optimizer, None, loss_fn, train_set, collate, recipe.batch_size, recipe.epochs,
                      seed=recipe.seed, place=place, unfreezer=unfreezer, regularizer=regularizer,
                      evaluate=lambda m: {"valid_accuracy": accuracy(m, valid_set, device=place.device)},
                      checkpoint_path=control.checkpoint(name), checkpoint_every=control.checkpoint_every,
                      stop_after_steps=control.stop_after_steps, max_grad_norm=recipe.max_grad_norm,
                      progress_label=f"fine-tune {name}" if transferred else f"train {name}",
                      show_progress=control.show_progress, extra_state={"recipe": asdict(recipe)})
    trainer.scheduler = SlantedTriangularLR(optimizer, trainer.total_steps, recipe.cut_frac, recipe.ratio)
    resumed = control.resume and trainer.resume_from(control.checkpoint(name) or "")
    if not resumed:
        _seed_rank(recipe.seed + 2, place)
    trainer.fit()
    summary = {"transferred": transferred, "transferred_parameters": transferred_names,
               "freeze": recipe.freeze if transferred else "none", "lr": lr, "lr_factor": factor,
               "steps": trainer.global_step, "train_tokens_per_epoch": train_set.token_count(),
               "valid_accuracy": trainer.history.epochs[-1]["valid_accuracy"] if trainer.history.epochs else None,
               "test_accuracy": accuracy(model, test_set, device=place.device),
               "history": trainer.history.state_dict()}
    return model, summary


def combine_runs(summaries: Sequence[dict]) -> dict:
    """One arm (transfer or scratch) over repeated seeds: mean and sample standard deviation
    of the accuracies, every run's summary (with its history) under "runs", and the fields
    that describe the arm (what was transferred, its freezing and learning rates)."""
    first = summaries[0]
    combined = {key: first[key] for key in ("transferred", "transferred_parameters", "freeze", "lr", "lr_factor")}
    for key in ("test_accuracy", "valid_accuracy"):
        values = [s[key] for s in summaries if s[key] is not None]
        combined[key] = statistics.fmean(values) if values else None
        combined[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        combined[f"{key}_per_seed"] = values
    combined["steps"] = sum(s["steps"] for s in summaries)
    combined["runs"] = list(summaries)
    return combined


def measure_throughput(model: TextClassifier, dataset: EncodedTexts, batch_size: int, steps: int = 10,
                       rounds: int = 3, seed: int = 0) -> dict:
    """Training tokens/s (forward + backward + Adam step) of `model` as is (rnntl_fast) and
    of a copy converted to torch.nn (rnntl_fast.convert(inverse=True); recurrent_dropout,
    weight_drop and zoneout, which torch.nn cannot run, turned off in that copy; a model with
    layer_norm has no torch.nn form and is refused), on the same batches,
    interleaved A/B for `rounds` rounds in this process; the median of each and their ratio.
    All parameters train (no freezing) so that both do the full work."""
    from .. import convert
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                                         collate_fn=collate, drop_last=True)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps:
            break
    device = next(model.parameters()).device
    batches = [tuple(t.to(device) for t in batch) for batch in batches]
    tokens = sum(int(batch[1].sum()) for batch in batches)
    fast = copy.deepcopy(model)
    for parameter in fast.parameters():
        parameter.requires_grad_(True)
    reference = copy.deepcopy(fast)
    torch_nn_without = _turn_off_in_recurrence_dropouts(reference)
    reference = convert(reference, inverse=True)
    providers = {"rnntl_fast": fast, "torch.nn": reference}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in providers.items()}

    def run(key: str) -> float:
        module, optimizer = providers[key], optimizers[key]
        module.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = _classifier_loss(module, batch)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - start)

    for key in providers:  # warm-up (allocator, oneDNN primitive caches)
        run(key)
    samples: Dict[str, List[float]] = {k: [] for k in providers}
    for _ in range(rounds):
        for key in providers:
            samples[key].append(run(key))
    ratios = [a / b for a, b in zip(samples["rnntl_fast"], samples["torch.nn"])]
    return {"steps_per_round": len(batches), "tokens_per_round": tokens, "rounds": rounds,
            "tokens_per_s": {k: statistics.median(v) for k, v in samples.items()},
            "samples_tokens_per_s": samples, "ratio_rnntl_fast_over_torch_nn": statistics.median(ratios),
            "torch_nn_without": torch_nn_without}


# The Recipe fields (and module options) of the dropouts inside the recurrence.
IN_RECURRENCE_DROPOUTS = ("recurrent_dropout", "weight_drop", "zoneout")


def _turn_off_in_recurrence_dropouts(model: nn.Module) -> List[str]:
    """Sets recurrent_dropout, weight_drop and zoneout of every rnntl_fast recurrent module in
    `model` to 0 (torch.nn cannot run them); returns the names of those that were on."""
    from ..nn import _RecurrentStack
    names = set()
    for module in model.modules():
        if isinstance(module, _RecurrentStack):
            for name in IN_RECURRENCE_DROPOUTS:
                if getattr(module, name) != 0:
                    names.add(name)
                    setattr(module, name, 0.0)
    return sorted(names)
