"""The study's figures: objective / loss curves, confusion matrix (under the study's `predict.decision`),
ROC (matplotlib, Agg)."""

from __future__ import annotations

from ...engine.decision import Decision
from ..train_loop import OBJECTIVE


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in sorted(series.items()):
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", ms=3, label=label, lw=2.2 if label.startswith("cv") else 1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def confusion_counts(y, p, num_classes: int, decision: Decision | None = None):
    """[K, K] counts (rows true, columns predicted) of the hard labels `decision` gives the
    probabilities `p` [N, K] (None: balanced, the argmax)."""
    from sklearn.metrics import confusion_matrix

    predicted = (decision or Decision()).labels(p)
    return confusion_matrix(y, predicted, labels=list(range(num_classes)))


def plot_confusion(y, p, classes, title: str, decision: Decision | None = None):
    """The confusion matrix of the hard labels under `decision` (None: balanced, the argmax);
    the title names a prior rule and its training priors."""
    plt = _plt()
    decision = decision or Decision()
    cm = confusion_counts(y, p, len(classes), decision)
    if decision.rule == "prior":
        priors = ", ".join(f"{c} {x:.2f}" for c, x in zip(classes, decision.priors))
        title = f"{title}\ndecision: prior (training class mix {priors})"
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_roc(y, p, classes, title: str):
    import numpy as np
    from sklearn.metrics import auc, roc_curve

    plt = _plt()
    y, p = np.asarray(y), np.asarray(p)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    shown = range(1, 2) if len(classes) == 2 else range(len(classes))
    for k in shown:
        positives = y == k
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, p[:, k])
        ax.plot(fpr, tpr, label=f"{classes[k]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_figure(client, run_id: str, fig, path: str) -> None:
    try:
        client.log_figure(run_id, fig, path)
    finally:
        _plt().close(fig)


def trial_validation_plot(client, run_id: str, runs: list[str]):
    """Per-fold validation AUC / loss curves of one trial, read back from MLflow."""
    series_auc = {"cv (selected epochs)": [(m.step, m.value) for m in client.get_metric_history(run_id, OBJECTIVE)]}
    series_loss = {}
    for r in runs:
        series_auc[f"{r} val"] = [(m.step, m.value) for m in client.get_metric_history(run_id, f"{r}/val_auc")]
        series_loss[f"{r} val"] = [(m.step, m.value) for m in client.get_metric_history(run_id, f"{r}/val_loss")]
        series_loss[f"{r} train"] = [(m.step, m.value) for m in client.get_metric_history(run_id, f"{r}/train_loss")]
    return plot_curves(series_auc, "validation AUC per fold", "AUC"), plot_curves(series_loss, "loss per fold", "loss")
