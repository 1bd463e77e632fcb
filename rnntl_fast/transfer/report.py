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


def plot_learning_curves(metrics: dict, path: str) -> None:
    """Writes a PNG: LM loss, classifier train loss and validation accuracy (transfer vs
    scratch), and the transferred run's learning-rate schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        axes[0][1].plot(history["steps"], _smooth(history["losses"]), color=f"C{color}", label=name)
        for index, seed_run in enumerate(run["runs"]):  # every seed's validation curve
            epochs = seed_run["history"]["epochs"]
            axes[1][0].plot([e["epoch"] for e in epochs], [e["valid_accuracy"] for e in epochs], marker="o",
                            color=f"C{color}", alpha=1.0 if index == 0 else 0.4,
                            label=f"{name} (mean test {run['test_accuracy']:.3f})" if index == 0 else None)
    axes[0][1].set_title("classifier train loss (smoothed, first seed)")
    axes[0][1].set_xlabel("step")
    axes[1][0].set_title("validation accuracy")
    axes[1][0].set_xlabel("epoch")
    for ax in (axes[0][1], axes[1][0]):
        if runs:
            ax.legend()
    if metrics.get("transfer"):
        history = metrics["transfer"]["runs"][0]["history"]
        axes[1][1].plot(history["steps"], history["lrs"], label="top group")
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
    figure.savefig(path, dpi=90)
    plt.close(figure)
