"""Case-level bootstrap and ROC primitives shared by the cv protocol's paired comparisons
(`cfcml.engine.paired`) and the clinical report's statistics (`cfcml.report.stats`).

Weights: None is the point estimate (one row of ones); a [B, N] array evaluates B bootstrap
resamples at once (each row the multiplicities of the N rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOTSTRAP = 2000
CI_LEVEL = 0.95


def weight_rows(weights, n: int) -> np.ndarray:
    """[B, N] float weights; None -> one row of ones."""
    if weights is None:
        return np.ones((1, n))
    w = np.asarray(weights, dtype=np.float64)
    return w.reshape(1, -1) if w.ndim == 1 else w


def per_row(values: np.ndarray, weights):
    """A float for a point estimate, the [B] array for bootstrap weights."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return float(values[0]) if weights is None or np.ndim(weights) == 1 else values


def safe_div(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# --------------------------------------------------------------------------- bootstrap
def bootstrap_weights(
    case_ids: Sequence[str], labels, n_boot: int = N_BOOTSTRAP, seed: int = 0, stratified: bool = True
) -> np.ndarray:
    """[n_boot, N] multiplicities of each row in each resample of the cases.

    Rows sharing a case id share its multiplicity. ``stratified``: draw n_c cases with
    replacement among the n_c cases of each class c (class counts fixed); otherwise draw
    n cases among all n.
    """
    case_ids = np.asarray([str(c) for c in case_ids])
    labels = np.asarray(labels).reshape(-1)
    unique, first, inverse = np.unique(case_ids, return_index=True, return_inverse=True)
    case_labels = labels[first]
    strata = (
        [np.flatnonzero(case_labels == c) for c in np.unique(case_labels)] if stratified else [np.arange(len(unique))]
    )
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(unique)))
    for members in strata:
        m = len(members)
        draws = rng.integers(0, m, size=(n_boot, m))
        flat = (np.arange(n_boot)[:, None] * m + draws).ravel()
        counts[:, members] = np.bincount(flat, minlength=n_boot * m).reshape(n_boot, m)
    return counts[:, inverse.reshape(-1)]


def percentile_ci(samples, level: float = CI_LEVEL) -> tuple[float, float, int]:
    """(lo, hi, n_valid): the percentile interval of the finite samples."""
    s = np.asarray(samples, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return float("nan"), float("nan"), 0
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [alpha, 1.0 - alpha])
    return float(lo), float(hi), len(s)


def cumulative_counts(y_bin, score, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted true/false positives when predicting positive for score >= each distinct
    score, scores descending: tp [B, G], fp [B, G], thresholds [G]."""
    y_bin = np.asarray(y_bin).reshape(-1).astype(np.float64)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    w = weight_rows(weights, len(score))
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last row of each tie group
    wo = w[:, order]
    tp = np.cumsum(wo * y_bin[order], axis=1)[:, ends]
    fp = np.cumsum(wo * (1.0 - y_bin[order]), axis=1)[:, ends]
    return tp, fp, s[ends]


def roc_points(tp, fp) -> tuple[np.ndarray, np.ndarray]:
    """fpr, tpr [B, G+1] starting at (0, 0); NaN rows where a class has no weight."""
    zeros = np.zeros((tp.shape[0], 1))
    fpr = safe_div(np.hstack([zeros, fp]), fp[:, -1:])
    tpr = safe_div(np.hstack([zeros, tp]), tp[:, -1:])
    return fpr, tpr


def roc_auc(y_bin, score, weights=None):
    """ROC AUC (ties count one half, = scikit-learn's roc_auc_score); NaN with one class."""
    if len(np.asarray(score)) == 0:
        return per_row(np.array([np.nan]), weights)
    fpr, tpr = roc_points(*cumulative_counts(y_bin, score, weights)[:2])
    return per_row(np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1), weights)
