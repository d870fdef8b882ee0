"""The report's figures as PNG bytes (matplotlib's Agg canvas: no display, no global pyplot state).

Inputs are the dicts of `cfcml.report.stats` / `cfcml.report.subgroups`; every function
returns the encoded PNG so the HTML can embed it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .inputs import Explanation

DPI = 110
MONTAGE_SLICES = 6
TSNE_SINGLE_THREAD_MAX = 5000


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no tool name or URL in the file
    return buf.getvalue()


def _color(i: int):
    return colormaps["tab10"](i % 10)


def _fmt_ci(value: float, ci: Sequence[float]) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def roc_figure(roc_by_class: Mapping[str, dict]) -> bytes:
    """One panel per class (one-vs-rest; binary: the positive class): the ROC curve, its 95 %
    bootstrap band and the chance line."""
    n = len(roc_by_class)
    fig = _figure(3.4 * n, 3.4)
    for i, (name, r) in enumerate(roc_by_class.items()):
        ax = fig.add_subplot(1, n, i + 1)
        ax.fill_between(r["grid"], r["tpr_lo"], r["tpr_hi"], step="post", color=_color(i), alpha=0.2, label="95 % CI")
        ax.plot(r["fpr"], r["tpr"], color=_color(i), lw=1.8, label=f"AUC {_fmt_ci(r['auc'], r['auc_ci'])}")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.01),
            xlabel="1 − specificity",
            ylabel="sensitivity",
            title=f"{name} vs rest" if n > 1 else name,
        )
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7)
    return _png(fig)


def pr_figure(pr_by_class: Mapping[str, dict]) -> bytes:
    """One panel per class: precision-recall curve, band of the interpolated precision, prevalence."""
    n = len(pr_by_class)
    fig = _figure(3.4 * n, 3.4)
    for i, (name, r) in enumerate(pr_by_class.items()):
        ax = fig.add_subplot(1, n, i + 1)
        ax.fill_between(r["grid"], r["precision_lo"], r["precision_hi"], color=_color(i), alpha=0.2, label="95 % CI")
        ax.step(
            r["recall"],
            r["precision"],
            where="pre",
            color=_color(i),
            lw=1.8,
            label=f"AP {_fmt_ci(r['ap'], r['ap_ci'])}",
        )
        ax.axhline(r["prevalence"], ls="--", color="grey", lw=0.8, label=f"prevalence {r['prevalence']:.2f}")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.01),
            xlabel="recall (sensitivity)",
            ylabel="precision (PPV)",
            title=f"{name} vs rest" if n > 1 else name,
        )
        ax.set_aspect("equal")
        ax.legend(loc="lower left", fontsize=7)
    return _png(fig)


def reliability_figure(before: dict, after: dict | None = None, labels: Sequence[str] = ("before", "after")) -> bytes:
    """Reliability diagram of the top-label confidence: accuracy per bin against mean confidence,
    bin counts below; `after` (temperature-scaled) drawn beside `before` when given."""
    fig = _figure(4.2, 4.4)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
    tables = [(before, labels[0])] + ([(after, labels[1])] if after is not None else [])
    for i, (t, label) in enumerate(tables):
        lower, upper = np.asarray(t["lower"]), np.asarray(t["upper"])
        width = (upper - lower) / len(tables)
        filled = np.asarray(t["count"]) > 0
        ax.bar(
            lower[filled] + i * width[filled],
            np.asarray(t["accuracy"])[filled],
            width=width[filled],
            align="edge",
            color=_color(i),
            alpha=0.6,
            edgecolor="black",
            lw=0.4,
            label=f"{label}: accuracy per bin",
        )
        ax.plot(np.asarray(t["confidence"])[filled], np.asarray(t["accuracy"])[filled], "o", ms=3, color=_color(i))
        hist.bar(lower + i * width, t["count"], width=width, align="edge", color=_color(i), alpha=0.6)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="accuracy")
    ax.legend(loc="upper left", fontsize=7)
    hist.set(xlabel="confidence (max probability)", ylabel="cases")
    return _png(fig)


def subgroup_figure(subgroups: Sequence[dict], metric: str = "auc") -> bytes:
    """Forest plot: `metric` with its 95 % CI per subgroup; groups not scored are listed with the reason."""
    rows = [(s["column"], g) for s in subgroups for g in s["groups"]]
    fig = _figure(6.4, 0.9 + 0.28 * max(len(rows), 1))
    ax = fig.add_subplot(1, 1, 1)
    ticks = []
    for y, (column, g) in enumerate(rows):
        ticks.append(f"{column} = {g['name']}  (n={g['n']})")
        m = g.get("metrics", {}).get(metric)
        if m is not None and m["value"] is not None and math.isfinite(m["value"]):
            lo, hi = m["ci"]
            ax.errorbar(
                m["value"], y, xerr=[[m["value"] - lo], [hi - m["value"]]], fmt="o", ms=4, color=_color(0), capsize=2
            )
        else:
            reason = "; ".join(g.get("notes", [])) or "not scored"
            ax.text(0.01, y, reason, va="center", fontsize=7, color="dimgrey", transform=ax.get_yaxis_transform())
    ax.set_yticks(range(len(rows)), ticks, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.02), xlabel=f"{metric.upper()} (95 % CI)")
    ax.axvline(0.5, ls="--", color="grey", lw=0.8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """(coords [N, 2], perplexity): seeded t-SNE of features [N, D]; perplexity 30, lowered to
    (N - 1) / 3 for small N (it must stay below N)."""
    from sklearn.manifold import TSNE  # scikit-learn and threadpoolctl: only for the t-SNE panel
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float64)
    perplexity = float(max(1.0, min(30.0, (len(x) - 1) / 3.0)))
    # A test set of a few hundred points takes well under a second on one thread, while
    # OpenMP threads on a busy machine spin and take 10x longer.
    with threadpool_limits(limits=1 if len(x) <= TSNE_SINGLE_THREAD_MAX else None, user_api="openmp"):
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return coords, perplexity


def embedding_figure(coords: np.ndarray, labels: np.ndarray, classes: Sequence[str], correct: np.ndarray) -> bytes:
    """Fused features in 2D, coloured by true class; wrong predictions drawn as crosses."""
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    labels, correct = np.asarray(labels), np.asarray(correct, dtype=bool)
    for j, name in enumerate(classes):
        ok, bad = (labels == j) & correct, (labels == j) & ~correct
        ax.scatter(coords[ok, 0], coords[ok, 1], s=14, color=_color(j), alpha=0.8, label=f"{name}")
        ax.scatter(coords[bad, 0], coords[bad, 1], s=22, color=_color(j), marker="x", label=f"{name}, misclassified")
    ax.set(xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2")
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _normalise(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    lo, hi = np.nanmin(a), np.nanmax(a)
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def _as_photo(a: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, 3] from [H, W], [1, H, W], [3, H, W] or [H, W, 3]."""
    a = np.squeeze(np.asarray(a))
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    return _normalise(np.squeeze(a))


def _match(heat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The heatmap resampled (linearly) onto the image grid when their shapes differ."""
    heat = np.squeeze(np.asarray(heat, dtype=np.float64))
    if heat.shape != shape:
        from scipy.ndimage import zoom  # scipy.ndimage takes ~1 s: only when shapes differ

        heat = zoom(heat, [s / h for s, h in zip(shape, heat.shape)], order=1)
    return _normalise(heat)


def montage_slices(heat: np.ndarray, n: int = MONTAGE_SLICES) -> list[int]:
    """n slice indices along axis 0, evenly spread over the slices where the heatmap reaches
    at least 10 % of its maximum (all slices when it is flat)."""
    per_slice = heat.reshape(len(heat), -1).max(axis=1)
    hot = np.flatnonzero(per_slice >= 0.1 * per_slice.max()) if per_slice.max() > 0 else np.arange(len(heat))
    lo, hi = int(hot.min()), int(hot.max())
    chosen = np.linspace(lo, hi, min(n, hi - lo + 1)).round().astype(int)
    peak = int(per_slice.argmax())
    chosen[np.abs(chosen - peak).argmin()] = peak  # the hottest slice is always shown
    return sorted(set(chosen.tolist()))


def _volume_panels(e: Explanation, alpha: float) -> Figure:
    """A slice montage per series ([D, H, W]): rows are series, columns the chosen slices."""
    names = list(e.images)
    vols = {s: _normalise(np.squeeze(e.images[s])) for s in names}
    heats = {s: _match(e.heatmaps[s], vols[s].shape) for s in names}
    slices = {s: montage_slices(heats[s]) for s in names}
    cols = max(len(v) for v in slices.values())
    fig = _figure(1.5 * cols + 0.6, 1.6 * len(names) + 0.4)
    axes = np.asarray(fig.subplots(len(names), cols, squeeze=False))
    for r, s in enumerate(names):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(slices[s]):
                k = slices[s][c]
                ax.imshow(vols[s][k], cmap="gray", interpolation="nearest")
                ax.imshow(heats[s][k], cmap="jet", alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
                ax.set_title(f"{s} z={k}", fontsize=7)
    return fig


def _photo_panels(e: Explanation, alpha: float) -> Figure:
    """One panel per photo."""
    names = list(e.images)
    fig = _figure(3.0 * len(names), 3.3)
    axes = np.asarray(fig.subplots(1, len(names), squeeze=False))
    for c, s in enumerate(names):
        img = _as_photo(e.images[s])
        ax = axes[0, c]
        ax.set_axis_off()
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.imshow(_match(e.heatmaps[s], img.shape[:2]), cmap="jet", alpha=alpha, vmin=0, vmax=1)
        ax.set_title(s, fontsize=8)
    return fig


EXPLANATION_PANELS = {"volume": _volume_panels, "photo": _photo_panels}  # image kind -> its Grad-CAM figure


def explanation_figure(e: Explanation, alpha: float = 0.45) -> bytes:
    """Grad-CAM over the input: a slice montage per series (volume, [D, H, W]) or one panel per
    photo, the image in grey / colour with the heatmap in `jet` on top."""
    title = f"{e.case_id}: true {e.true}, predicted {e.pred} ({'correct' if e.correct else 'wrong'})"
    fig = EXPLANATION_PANELS[e.kind](e, alpha)
    fig.suptitle(title, fontsize=9)
    return _png(fig)
