"""The numbers of a clinical report: metrics with bootstrap CIs, curves, calibration, operating points.

Pure numpy/scipy. The paper's metric set itself (`classification_metrics`, `confusion`,
`average_precision`) is defined once, in `cfcml.engine.metrics` (the numbers of a run's
metrics.json), and re-exported here; this module adds its CIs (`metrics_with_ci`), the
ROC/PR curves with bootstrap bands, calibration and operating points. Conventions:

* ``labels`` [N] int class indices, ``probs`` [N, K]; hard predictions follow the report's
  ``decision`` (`cfcml.engine.decision`: argmax, or argmax after the training-prior logit
  adjustment); curves, AUC and calibration use the probabilities and never depend on it.
* Every metric takes optional ``weights`` [B, N]: one row of case multiplicities per
  bootstrap resample (a case drawn twice weighs 2). A resample is then one matrix row, so
  2000 resamples cost a few array operations instead of 2000 scikit-learn calls. Without
  weights a function returns a float; with weights an array [B].
* Bootstrap = patient-level percentile bootstrap: cases (not runs, not rows) are resampled;
  all rows of a drawn case (one per seed in a seed protocol) come along. By default cases
  are drawn within each class (stratified, as pROC does for AUC CIs), so no resample lacks a
  class; with ``stratified=False`` a resample where a metric is undefined (e.g. a class
  absent) is left out of that metric's CI and ``n_valid`` says how many remained.
* A value that is undefined is NaN, never an exception.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from ..engine.decision import Decision
from ..engine.metrics import (  # the one definition of the metric set, so metrics.json and the report agree
    average_precision,
    classification_metrics,
    confusion,  # noqa: F401 - part of the report's statistics API
)
from ..engine.resample import (  # N_BOOTSTRAP, bootstrap_weights: part of the report's statistics API
    CI_LEVEL,
    N_BOOTSTRAP,  # noqa: F401
    bootstrap_weights,  # noqa: F401
    cumulative_counts,
    per_row,
    percentile_ci,
    roc_auc,
    roc_points,
    safe_div,
    weight_rows,
)
from ..util.metric_names import metric_names  # noqa: F401 - part of the report's statistics API

N_BINS = 15  # reliability bins (Guo et al. 2017)
GRID_SIZE = 101  # points of the FPR / recall grid of the CI bands
OPERATING_TARGETS = (("sen_at_spe", 0.90), ("sen_at_spe", 0.95), ("spe_at_sen", 0.90), ("spe_at_sen", 0.95))
TEMPERATURE_BOUNDS = (0.05, 20.0)
_TOL = 1e-12


def with_ci(point: float, samples, level: float = CI_LEVEL) -> dict:
    """{"value", "ci": [lo, hi], "n_valid"} (NaN stays NaN; the JSON writer makes it null)."""
    lo, hi, n_valid = percentile_ci(samples, level)
    return {"value": float(point), "ci": [lo, hi], "n_valid": n_valid}


def _step_at(x, y, grid, side: str) -> np.ndarray:
    """y at the grid points of a monotone path: side="right" -> y of the last x <= g (ROC);
    side="left" -> max y over x >= g (interpolated precision)."""
    if side == "right":
        idx = np.searchsorted(x, grid, side="right") - 1
        return np.where(idx >= 0, y[np.clip(idx, 0, None)], np.nan)
    suffix_max = np.maximum.accumulate(y[::-1])[::-1]
    idx = np.searchsorted(x, grid, side="left")
    return np.where(idx < len(x), suffix_max[np.clip(idx, None, len(x) - 1)], np.nan)


def roc_curve_band(y_bin, score, boot_weights, level: float = CI_LEVEL, grid_size: int = GRID_SIZE) -> dict:
    """ROC curve of a binary problem with a pointwise bootstrap band.

    -> {"fpr", "tpr", "thresholds"} (the curve), "auc", "auc_ci", "grid" [G] (FPR),
    "tpr_grid" (the curve as a step function on the grid: best TPR at FPR <= grid),
    "tpr_lo", "tpr_hi" (percentiles over resamples).
    """
    tp, fp, thresholds = cumulative_counts(y_bin, score, None)
    fpr, tpr = roc_points(tp, fp)
    grid = np.linspace(0.0, 1.0, grid_size)
    btp, bfp, _ = cumulative_counts(y_bin, score, boot_weights)
    bfpr, btpr = roc_points(btp, bfp)
    curves = np.array(
        [
            _step_at(f, t, grid, "right") if np.isfinite(f[-1]) and np.isfinite(t[-1]) else np.full(grid_size, np.nan)
            for f, t in zip(bfpr, btpr)
        ]
    )
    lo, hi = _band(curves, level)
    auc = roc_auc(y_bin, score)
    return {
        "fpr": fpr[0],
        "tpr": tpr[0],
        "thresholds": thresholds,
        "auc": auc,
        "auc_ci": list(percentile_ci(roc_auc(y_bin, score, boot_weights), level)[:2]),
        "grid": grid,
        "tpr_grid": _step_at(fpr[0], tpr[0], grid, "right"),
        "tpr_lo": lo,
        "tpr_hi": hi,
    }


def pr_curve_band(y_bin, score, boot_weights, level: float = CI_LEVEL, grid_size: int = GRID_SIZE) -> dict:
    """Precision-recall curve with a pointwise bootstrap band of the interpolated precision.

    -> {"recall", "precision"} (the curve, from recall 0 / precision 1 as scikit-learn),
    "ap", "ap_ci", "prevalence", "grid" [G] (recall), "precision_grid", "precision_lo", "precision_hi".
    """

    def curve(w):
        tp, fp, _ = cumulative_counts(y_bin, score, w)
        return safe_div(tp, tp[:, -1:]), np.nan_to_num(safe_div(tp, tp + fp))

    recall, precision = curve(None)
    recall = np.hstack([[0.0], recall[0]])
    precision = np.hstack([[1.0], precision[0]])
    grid = np.linspace(0.0, 1.0, grid_size)
    brecall, bprecision = curve(boot_weights)
    curves = np.array(
        [
            _step_at(r, p, grid, "left") if np.isfinite(r[-1]) else np.full(grid_size, np.nan)
            for r, p in zip(brecall, bprecision)
        ]
    )
    lo, hi = _band(curves, level)
    y = np.asarray(y_bin, dtype=np.float64)
    return {
        "recall": recall,
        "precision": precision,
        "ap": average_precision(y_bin, score),
        "ap_ci": list(percentile_ci(average_precision(y_bin, score, boot_weights), level)[:2]),
        "prevalence": float(y.mean()) if len(y) else float("nan"),
        "grid": grid,
        "precision_grid": _step_at(recall, precision, grid, "left"),
        "precision_lo": lo,
        "precision_hi": hi,
    }


def _band(curves: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        lo, hi = np.nanquantile(curves, [alpha, 1.0 - alpha], axis=0)
    return lo, hi


# --------------------------------------------------------------------------- the metric set
def metrics_with_ci(
    labels,
    probs,
    classes: Sequence[str],
    positive: str | None,
    boot_weights,
    level: float = CI_LEVEL,
    decision: Decision | None = None,
) -> dict:
    """{metric: {"value", "ci": [lo, hi], "n_valid"}} for the paper's metric set."""
    point = classification_metrics(labels, probs, classes, positive, decision=decision)
    samples = classification_metrics(labels, probs, classes, positive, boot_weights, decision=decision)
    return {name: with_ci(point[name], samples[name], level) for name in point}


# --------------------------------------------------------------------------- calibration
def _bin_of(conf, n_bins: int) -> np.ndarray:
    """Equal-width bins (lo, hi] over [0, 1], 0 in the first (scikit-learn's calibration_curve)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], conf, side="left")


def _binned_gap(conf, outcome, n_bins: int, weights) -> np.ndarray:
    """sum_b |sum outcome - sum conf| / total over bins b: [B]."""
    conf = np.asarray(conf, dtype=np.float64)
    onehot = np.zeros((len(conf), n_bins))
    onehot[np.arange(len(conf)), _bin_of(conf, n_bins)] = 1.0
    w = weight_rows(weights, len(conf))
    gap = np.abs(w @ (onehot * outcome[:, None]) - w @ (onehot * conf[:, None])).sum(axis=1)
    return safe_div(gap, w.sum(axis=1))


def expected_calibration_error(labels, probs, n_bins: int = N_BINS, weights=None):
    """ECE of the top-label confidence: sum_b n_b / N |accuracy_b - mean confidence_b| over
    equal-width bins of max_k p_k (Guo et al. 2017; torchmetrics' multiclass L1 calibration error)."""
    probs = np.asarray(probs, dtype=np.float64)
    correct = (probs.argmax(axis=1) == np.asarray(labels).reshape(-1)).astype(np.float64)
    return per_row(_binned_gap(probs.max(axis=1), correct, n_bins, weights), weights)


def positive_class_ece(labels, probs, positive_index: int, n_bins: int = N_BINS, weights=None):
    """ECE of P(positive) against the positive rate, over equal-width bins of P(positive)
    (the gap of scikit-learn's calibration_curve, weighted by bin counts)."""
    probs = np.asarray(probs, dtype=np.float64)
    outcome = (np.asarray(labels).reshape(-1) == positive_index).astype(np.float64)
    return per_row(_binned_gap(probs[:, positive_index], outcome, n_bins, weights), weights)


def brier_score(labels, probs, weights=None):
    """Multi-class Brier score: mean over cases of sum_k (p_k - onehot_k)^2 (in [0, 2]; for
    two classes twice scikit-learn's binary brier_score_loss of P(positive))."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    per_case = ((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(axis=1)
    w = weight_rows(weights, len(labels))
    return per_row(safe_div(w @ per_case, w.sum(axis=1)), weights)


def reliability_table(labels, probs, n_bins: int = N_BINS) -> dict:
    """Reliability diagram data of the top-label confidence: per bin "lower", "upper",
    "count", "confidence" (mean max-probability), "accuracy" (NaN for empty bins)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels).reshape(-1)).astype(np.float64)
    b = _bin_of(conf, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "count": count.astype(int),
        "confidence": safe_div(np.bincount(b, conf, n_bins), count),
        "accuracy": safe_div(np.bincount(b, correct, n_bins), count),
    }


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits, labels, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017). The NLL is convex
    in 1/T, so a bounded 1-D search over log T finds the optimum (or the bound it lies beyond)."""
    res = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(res.x))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """softmax(logits / T) [N, K]."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


# --------------------------------------------------------------------------- operating points
def choose_threshold(y_bin, score, kind: str, target: float) -> dict:
    """The threshold t (predict positive when score >= t) chosen on validation data.

    kind "sen_at_spe": among thresholds with specificity >= target, the highest sensitivity
    (then the highest specificity); "spe_at_sen": the reverse. Candidates are the distinct
    scores and one value above them all (never positive). -> {"threshold", "sen", "spe"}
    achieved on this data, or {"threshold": None, "reason"} when a class is absent.
    """
    y = np.asarray(y_bin).reshape(-1).astype(bool)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.all() or not y.any():
        return {"threshold": None, "reason": "validation lacks a positive or a negative case"}
    candidates = np.r_[np.unique(score), np.nextafter(score.max(), np.inf)]
    pos, neg = np.sort(score[y]), np.sort(score[~y])
    sen = (len(pos) - np.searchsorted(pos, candidates, side="left")) / len(pos)
    spe = np.searchsorted(neg, candidates, side="left") / len(neg)
    if kind == "sen_at_spe":
        feasible, primary, secondary = spe >= target - _TOL, sen, spe
    elif kind == "spe_at_sen":
        feasible, primary, secondary = sen >= target - _TOL, spe, sen
    else:
        raise ValueError(f"kind must be 'sen_at_spe' or 'spe_at_sen', got {kind!r}")
    idx = np.flatnonzero(feasible)
    best = idx[np.lexsort((secondary[idx], primary[idx]))[-1]]
    return {"threshold": float(candidates[best]), "sen": float(sen[best]), "spe": float(spe[best])}


def rates_at_threshold(y_bin, score, threshold: float, weights=None) -> dict:
    """sen, spe, ppv, npv of "positive when score >= threshold" (floats, or [B] with weights)."""
    y = np.asarray(y_bin).reshape(-1).astype(np.float64)
    hit = (np.asarray(score, dtype=np.float64).reshape(-1) >= threshold).astype(np.float64)
    w = weight_rows(weights, len(y))
    tp, fp = w @ (y * hit), w @ ((1 - y) * hit)
    fn, tn = w @ (y * (1 - hit)), w @ ((1 - y) * (1 - hit))
    rates = {
        "sen": safe_div(tp, tp + fn),
        "spe": safe_div(tn, tn + fp),
        "ppv": safe_div(tp, tp + fp),
        "npv": safe_div(tn, tn + fn),
    }
    return {k: per_row(v, weights) for k, v in rates.items()}


def operating_points(
    val_labels,
    val_probs,
    test_labels,
    test_probs,
    classes: Sequence[str],
    positive: str | None,
    test_boot_weights,
    level: float = CI_LEVEL,
    targets=OPERATING_TARGETS,
) -> list[dict]:
    """Thresholds chosen on validation, reported on test with bootstrap CIs.

    Binary: the positive class; 3+ classes: each class one-vs-rest on its probability.
    -> [{"class", "kind", "target", "threshold", "val": {sen, spe}, "test": {sen|spe|ppv|npv:
    {"value", "ci", "n_valid"}}, "n_test"}] (threshold None with a "reason" when validation
    cannot choose one).
    """
    val_labels, test_labels = np.asarray(val_labels).reshape(-1), np.asarray(test_labels).reshape(-1)
    val_probs, test_probs = np.asarray(val_probs, dtype=np.float64), np.asarray(test_probs, dtype=np.float64)
    indices = [list(classes).index(positive)] if len(classes) == 2 else range(len(classes))
    out = []
    for j in indices:
        y_val, y_test = (val_labels == j), (test_labels == j)
        for kind, target in targets:
            chosen = choose_threshold(y_val, val_probs[:, j], kind, target)
            row = {
                "class": classes[j],
                "kind": kind,
                "target": target,
                "threshold": chosen["threshold"],
                "n_test": len(y_test),
            }
            if chosen["threshold"] is None:
                row["reason"] = chosen["reason"]
                out.append(row)
                continue
            row["val"] = {"sen": chosen["sen"], "spe": chosen["spe"]}
            point = rates_at_threshold(y_test, test_probs[:, j], chosen["threshold"])
            samples = rates_at_threshold(y_test, test_probs[:, j], chosen["threshold"], test_boot_weights)
            row["test"] = {k: with_ci(point[k], samples[k], level) for k in point}
            out.append(row)
    return out
