"""Paired tests of two models' ROC AUCs on the same patients.

- `delong_test`: DeLong, DeLong & Clarke-Pearson (1988) for two correlated AUCs of a binary
  task, in the fast midrank form of Sun & Xu (2014): the AUC difference, its asymptotic
  variance from the structural components of both models on the same patients, a two-sided
  normal p-value and a Wald interval.
- `paired_bootstrap_auc`: the patient-level percentile bootstrap of the AUC difference: both
  models are scored on the same resample of patients, drawn within each class (class counts
  fixed, as the report's CIs). Multi-class AUC is the macro one-vs-rest AUC of
  `compute_metrics` (the mean over classes present); its two-sided p is twice the smaller
  share of resampled differences on either side of 0 (at most 1).
- `compare_auc`: both, as one record; the p-value reported is DeLong's for two classes and the
  bootstrap's for more (DeLong has no single macro-OvR form).

Inputs are one row per patient: `labels` [N] class indices, `probs_*` [N, K]. A seed protocol
pairs on each patient's mean probability over seeds (see `cfcml.engine.evidence`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm, rankdata

from .resample import bootstrap_weights, percentile_ci, roc_auc

N_BOOTSTRAP = 2000
LEVEL = 0.95


def _binary_inputs(labels, score_a, score_b) -> tuple[np.ndarray, np.ndarray, int]:
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.vstack(
        [np.asarray(score_a, dtype=np.float64).reshape(-1), np.asarray(score_b, dtype=np.float64).reshape(-1)]
    )
    if scores.shape[1] != len(y):
        raise ValueError(f"labels has {len(y)} patients but the scores have {scores.shape[1]}")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"DeLong's test needs binary labels 0/1, got {sorted(set(y.tolist()))}")
    order = np.r_[np.flatnonzero(y == 1), np.flatnonzero(y == 0)]
    return scores[:, order], y[order], int((y == 1).sum())


def delong_test(labels, score_a, score_b, level: float = LEVEL) -> dict:
    """{"auc_a", "auc_b", "difference" (a - b), "se", "z", "p", "ci": [lo, hi]} for a binary task
    (label 1 = positive, scores = P(positive)); NaN where a class is absent. Identical scores
    give difference 0 and p = 1."""
    scores, y, m = _binary_inputs(labels, score_a, score_b)
    n = len(y) - m
    nan = {
        "auc_a": math.nan,
        "auc_b": math.nan,
        "difference": math.nan,
        "se": math.nan,
        "z": math.nan,
        "p": math.nan,
        "ci": [math.nan, math.nan],
    }
    if m == 0 or n == 0:
        return nan
    tx = rankdata(scores[:, :m], axis=1)  # midranks among positives
    ty = rankdata(scores[:, m:], axis=1)  # among negatives
    tz = rankdata(scores, axis=1)  # among all
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # per positive: share of negatives ranked below it
    v10 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives ranked above it
    sx = np.cov(v01) if m > 1 else np.zeros((2, 2))
    sy = np.cov(v10) if n > 1 else np.zeros((2, 2))
    s = sx / m + sy / n
    var = float(s[0, 0] + s[1, 1] - 2.0 * s[0, 1])
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(var, 0.0))
    if se <= 1e-15:  # no variance: identical rankings (p = 1), or two error-free orderings that differ
        same = abs(diff) < 1e-12
        z, p = (0.0, 1.0) if same else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / se
        p = float(2.0 * norm.sf(abs(z)))
    half = norm.ppf(0.5 + level / 2.0) * se
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "difference": diff,
        "se": se,
        "z": z,
        "p": p,
        "ci": [diff - half, diff + half],
    }


def macro_auc(labels, probs, weights=None):
    """The mean one-vs-rest AUC over the classes present (compute_metrics' multi-class `auc`);
    a float, or [B] with bootstrap weights [B, N]."""
    y = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    present = [c for c in range(probs.shape[1]) if (y == c).any()]
    if len(present) < 2:
        return math.nan if weights is None else np.full(len(weights), math.nan)
    per_class = [roc_auc((y == c).astype(np.float64), probs[:, c], weights) for c in present]
    return float(np.mean(per_class)) if weights is None else np.mean(np.vstack(per_class), axis=0)


def _auc(labels, probs, positive: int | None, weights=None):
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        pos = 1 if positive is None else positive
        return roc_auc((np.asarray(labels) == pos).astype(np.float64), probs[:, pos], weights)
    return macro_auc(labels, probs, weights)


def paired_bootstrap_auc(
    labels,
    probs_a,
    probs_b,
    case_ids=None,
    positive: int | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """{"auc_a", "auc_b", "difference", "ci": [lo, hi], "p", "n_boot", "n_valid"}: the AUC
    difference (a - b) and its percentile CI over `n_boot` class-stratified resamples of the
    patients (both models scored on the same resample)."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    a, b = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != len(y):
        raise ValueError(f"probs_a {a.shape} and probs_b {b.shape} must both be [N={len(y)}, K]")
    ids = np.arange(len(y)).astype(str) if case_ids is None else np.asarray(case_ids).astype(str)
    auc_a, auc_b = _auc(y, a, positive), _auc(y, b, positive)
    weights = bootstrap_weights(ids, y, n_boot, seed, stratified=True)
    diffs = np.asarray(_auc(y, a, positive, weights)) - np.asarray(_auc(y, b, positive, weights))
    lo, hi, n_valid = percentile_ci(diffs, level)
    finite = diffs[np.isfinite(diffs)]
    if len(finite) == 0:
        p = math.nan
    elif np.all(finite == 0):
        p = 1.0
    else:
        p = float(min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0))))
    return {
        "auc_a": float(auc_a),
        "auc_b": float(auc_b),
        "difference": float(auc_a - auc_b),
        "ci": [lo, hi],
        "p": p,
        "n_boot": n_boot,
        "n_valid": n_valid,
    }


def compare_auc(
    labels,
    probs_a,
    probs_b,
    case_ids=None,
    positive: int | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """Model a vs model b on the same patients: the paired bootstrap (CI of the difference) and,
    for two classes, DeLong's test (its p is the one reported as "p")."""
    out = paired_bootstrap_auc(
        labels=labels,
        probs_a=probs_a,
        probs_b=probs_b,
        case_ids=case_ids,
        positive=positive,
        n_boot=n_boot,
        seed=seed,
        level=level,
    )
    out |= {
        "n_patients": len(np.asarray(labels).reshape(-1)),
        "ci_method": "paired patient bootstrap (percentile)",
        "p_bootstrap": out["p"],
        "test": "paired bootstrap",
    }
    if np.asarray(probs_a).shape[1] == 2:
        pos = 1 if positive is None else positive
        y = (np.asarray(labels) == pos).astype(np.int64)
        d = delong_test(y, np.asarray(probs_a)[:, pos], np.asarray(probs_b)[:, pos], level)
        out |= {"p": d["p"], "test": "DeLong", "delong": d}
    return out
