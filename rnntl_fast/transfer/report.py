"""Learning-curve plot of a finetune run (matplotlib, Agg backend: no display needed)."""
import math
from typing import List


def _smooth(values: List[float], window: int = 25) -> List[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def _plot_accuracy(ax, name: str, run: dict, color: str) -> None:
    """One arm on the accuracy panel: each seed's validation curve (faint), their mean per
    epoch (solid, when there are several seeds), and the mean test accuracy after the last
    epoch (a star)."""
    curves = [[e["valid_accuracy"] for e in seed_run["history"]["epochs"]] for seed_run in run["runs"]]
    epochs = [e["epoch"] for e in run["runs"][0]["history"]["epochs"]]
    several = len(curves) > 1
    for index, curve in enumerate(curves):
        ax.plot(epochs[:len(curve)], curve, color=color, alpha=0.3 if several else 1.0, linewidth=1,
                label=(f"{name}: validation, each of {len(curves)} seeds" if several else f"{name}: validation")
                if index == 0 else None)
    if several and all(len(curve) == len(epochs) for curve in curves):
        mean = [sum(values) / len(values) for values in zip(*curves)]
        ax.plot(epochs, mean, color=color, marker="o", label=f"{name}: validation, mean of seeds")
    if run.get("test_accuracy") is not None and epochs:
        ax.scatter([epochs[-1]], [run["test_accuracy"]], color=color, marker="*", s=140, zorder=3,
                   label=f"{name}: test, mean ({run['test_accuracy']:.3f})")


def plot_learning_curves(metrics: dict, path: str) -> None:
    """Writes learning_curves_figure(metrics) as a PNG to `path`."""
    import matplotlib.pyplot as plt
    figure = learning_curves_figure(metrics)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def learning_curves_figure(metrics: dict):
    """A matplotlib figure of a finetune run's metrics: LM loss, classifier train loss,
    validation and test accuracy (transfer vs scratch, per seed and mean, with the
    majority-class level), and the transferred run's learning-rate schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    lm = metrics.get("language_model")
    ax = axes[0][0]
    if lm and lm["history"]["losses"]:
        history = lm["history"]
        ax.plot(history["steps"], _smooth(history["losses"]), label="train NLL (smoothed)")
        for epoch in history["epochs"]:
            ax.scatter([epoch["step"]], [math.log(epoch["valid_perplexity"])], color="C1")
        ax.scatter([], [], color="C1", label="valid NLL (epoch end)")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no language-model pretraining in this run", ha="center", va="center")
    ax.set_title("language model")
    ax.set_xlabel("step")
    runs = [(name, metrics[name]) for name in ("transfer", "scratch") if metrics.get(name)]
    for color, (name, run) in enumerate(runs):
        history = run["runs"][0]["history"]
        axes[0][1].plot(history["steps"], _smooth(history["losses"]), color=f"C{color}", label=f"{name}, first seed")
        _plot_accuracy(axes[1][0], name, run, f"C{color}")
    majority = metrics.get("test_majority_class_accuracy")
    if majority is not None:
        axes[1][0].axhline(majority, color="grey", linestyle=":",
                           label=f"majority class, test split ({majority:.3f})")
    axes[0][1].set_title("classifier train loss (smoothed, first seed)")
    axes[0][1].set_xlabel("step")
    axes[1][0].set_title("classifier accuracy: validation per epoch, test after training")
    axes[1][0].set_xlabel("epoch")
    axes[1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1][0].set_ylabel("accuracy")
    if runs:
        axes[0][1].legend()
        axes[1][0].legend(fontsize=7)
    if metrics.get("transfer"):
        history = metrics["transfer"]["runs"][0]["history"]
        factor = metrics["transfer"].get("lr_factor")
        axes[1][1].plot(history["steps"], history["lrs"], label="top layer group, first seed" +
                        (f" (each lower group: / {factor:g})" if factor and factor != 1 else ""))
        axes[1][1].set_yscale("log")
        axes[1][1].legend()
    axes[1][1].set_title("transfer: learning rate (slanted triangular)")
    axes[1][1].set_xlabel("step")
    throughput = metrics.get("throughput")
    title = "rnntl-fast finetune"
    if throughput:
        rates = throughput["tokens_per_s"]
        title += (f" | training tokens/s: rnntl_fast {rates['rnntl_fast']:.0f}, torch.nn {rates['torch.nn']:.0f} "
                  f"(x{throughput['ratio_rnntl_fast_over_torch_nn']:.2f})")
    figure.suptitle(title)
    figure.tight_layout()
    return figure
