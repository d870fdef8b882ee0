"""Evaluation metrics (SPEC §5, paper Tables 2–5), chosen by the cohort's class count.

- 2 classes (positive = the schema's `positive`): ``sen, spe, acc, g_mean, balanced_acc,
  auprc, auprc_label, auc``. ``auprc`` is the average precision of the positive-class
  probability (good practice); ``auprc_label`` the average precision of the hard
  predictions, which is what the paper's Derm7pt "AUPRC" column reports.
- 3+ classes: ``acc``, ``balanced_acc`` (mean recall over the classes present), ``acc_<class>``
  (recall of each class, names lower-cased), ``weighted_f1``, ``macro_f1`` (over the labels
  seen in y or the predictions, zero_division=0) and ``auc`` (mean one-vs-rest AUC of the
  probabilities over the classes present).

One implementation, `classification_metrics`, defines the set (numpy only; its definitions
are scikit-learn's, and the tests hold it to scikit-learn). It takes optional bootstrap
``weights`` [B, N] (one row of case multiplicities per resample, `cfcml.engine.resample`) and
then returns [B] arrays: the clinical report's CIs (`cfcml.report.stats`) evaluate 2000
resamples in a few array operations. `compute_metrics` (metrics.json, every epoch's
validation), `binary_metrics` and `multiclass_metrics` are its point-estimate entry points.

Every function is a pure function of ``y_true`` (integer labels 0..K-1), ``probs`` (one row
per sample, [N, K]; numpy arrays or torch tensors) and the hard-label rule ``decision``
(`cfcml.engine.decision`; None = argmax, i.e. ``balanced``). The rule changes hard-label
metrics only, never AUC/AUPRC of probabilities. Values are fractions in [0, 1]. They never
raise on degenerate input: an undefined value (absent class, one class only, empty input,
an AUC/AUPRC of scores that are not all finite) is NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..util.metric_names import class_key, metric_names  # noqa: F401 - metric_names: part of this module's API
from .decision import Decision
from .resample import cumulative_counts, per_row, roc_auc, safe_div, weight_rows

NAN = float("nan")


def higher_is_better(metric: str) -> bool:
    return metric != "loss"


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _prepare(y_true, probs, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N] int64 and probabilities [N, K] float64, shapes and label range checked."""
    y = _to_numpy(y_true).reshape(-1).astype(np.int64)
    p = _to_numpy(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"probs must have shape [N, {n_classes}], got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but probs has {p.shape[0]}")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true must hold class indices 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    return y, p


# --------------------------------------------------------------------------- primitives
def confusion(labels, pred, num_classes: int, weights=None) -> np.ndarray:
    """Weighted confusion matrices [B, K, K] (rows: true class, columns: predicted)."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    onehot = np.zeros((len(labels), num_classes * num_classes))
    onehot[np.arange(len(labels)), labels * num_classes + pred] = 1.0
    return (weight_rows(weights, len(labels)) @ onehot).reshape(-1, num_classes, num_classes)


def average_precision(y_bin, score, weights=None):
    """Average precision, scikit-learn's definition sum_k (R_k - R_{k-1}) P_k; NaN unless both
    classes are present (as `classification_metrics`' AUPRC)."""
    if len(np.asarray(score)) == 0:
        return per_row(np.array([np.nan]), weights)
    tp, fp, _ = cumulative_counts(y_bin, score, weights)
    precision = np.nan_to_num(safe_div(tp, tp + fp))  # 0/0 only where the recall step is 0 too
    recall = safe_div(tp, tp[:, -1:])
    ap = np.sum(np.diff(np.hstack([np.zeros((len(tp), 1)), recall]), axis=1) * precision, axis=1)
    ap[(tp[:, -1] <= 0) | (fp[:, -1] <= 0)] = np.nan
    return per_row(ap, weights)


def _ranking(metric, y_bin, score, weights):
    """metric(y_bin, score, weights) ([B] rows, weights None -> one row); NaN when a score is
    not finite (scikit-learn refuses such input; a diverged model's probabilities are NaN)."""
    w = weight_rows(weights, len(score))
    if not np.isfinite(score).all():
        return np.full(len(w), np.nan)
    return np.atleast_1d(metric(y_bin, score, w))


# --------------------------------------------------------------------------- the metric set
def _metric_set(y: np.ndarray, p: np.ndarray, classes: Sequence, positive: int | None, weights, decision) -> dict:
    """The metric set of checked labels `y` [N] and probabilities `p` [N, K]: the binary set
    with `positive` (the positive class index), else the multi-class set."""
    k = len(classes)
    pred = (decision or Decision()).labels(p)  # hard labels: `decision` (None: argmax)
    c = confusion(y, pred, k, weights)
    support, predicted, tp = c.sum(axis=2), c.sum(axis=1), np.diagonal(c, axis1=1, axis2=2)
    recall = safe_div(tp, support)
    acc = safe_div(tp.sum(axis=1), support.sum(axis=1))
    if positive is not None:
        sen, spe = recall[:, positive], recall[:, 1 - positive]
        y_pos = (y == positive).astype(np.float64)
        values = {
            "sen": sen,
            "spe": spe,
            "acc": acc,
            "g_mean": np.sqrt(sen * spe),
            "balanced_acc": (sen + spe) / 2.0,
            "auprc": _ranking(average_precision, y_pos, p[:, positive], weights),
            "auprc_label": _ranking(average_precision, y_pos, (pred == positive).astype(np.float64), weights),
            "auc": _ranking(roc_auc, y_pos, p[:, positive], weights),
        }
    else:
        present = (support + predicted) > 0  # scikit-learn's F1 labels: seen in y or prediction
        f1 = np.where(present, safe_div(2.0 * tp, support + predicted), 0.0)
        per_class_auc = np.array([_ranking(roc_auc, (y == j).astype(np.float64), p[:, j], weights) for j in range(k)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # mean of nothing (empty input, one class)
            auc = np.nanmean(per_class_auc, axis=0)
            balanced_acc = np.nanmean(recall, axis=1)
        # a present class whose probabilities are not all finite: no AUC (scikit-learn refuses them)
        auc[(support[:, ~np.isfinite(p).all(axis=0)] > 0).any(axis=1)] = np.nan
        values = {
            "acc": acc,
            "balanced_acc": balanced_acc,
            **{f"acc_{class_key(name)}": recall[:, j] for j, name in enumerate(classes)},
            "weighted_f1": safe_div((f1 * support).sum(axis=1), support.sum(axis=1)),
            "macro_f1": safe_div((f1 * present).sum(axis=1), present.sum(axis=1)),
            "auc": auc,
        }
    return {name: per_row(v, weights) for name, v in values.items()}


def classification_metrics(
    labels, probs, classes: Sequence[str], positive: str | None = None, weights=None, decision: Decision | None = None
) -> dict:
    """The paper's metric set (`metric_names(classes)`); floats, or [B] arrays with weights [B, N].

    Binary (positive class p, a name in `classes`): sen = recall of p, spe = recall of the other
    class, acc, g_mean = sqrt(sen * spe), balanced_acc = (sen + spe) / 2, auprc = average
    precision of P(p), auprc_label = average precision of the hard prediction (the paper's
    definition), auc. 3+ classes: acc, balanced_acc (mean recall over the classes present,
    = scikit-learn's balanced_accuracy_score), acc_<class> (recall), weighted_f1 / macro_f1
    (scikit-learn's f1_score: labels present in y or prediction, zero_division=0) and auc =
    mean one-vs-rest AUC over the classes present (scikit-learn's macro OvR when all are
    present; NaN with fewer than two). Hard labels follow `decision` (None: argmax).
    """
    classes = list(classes)
    y, p = _prepare(labels, probs, len(classes))
    return _metric_set(y, p, classes, classes.index(positive) if len(classes) == 2 else None, weights, decision)


def binary_metrics(y_true, probs, positive: int = 1, decision: Decision | None = None) -> dict[str, float]:
    """SEN = recall of `positive` (a class index), SPE = recall of the other class, ACC,
    G-Mean = √(SEN·SPE), BA = (SEN + SPE) / 2, AUPRC (probabilities), AUPRC on hard labels, AUC."""
    y, p = _prepare(y_true, probs, 2)
    return _metric_set(y, p, (0, 1), positive, None, decision)


def multiclass_metrics(y_true, probs, classes, decision: Decision | None = None) -> dict[str, float]:
    """ACC, balanced accuracy (mean recall over the classes present in y), per-class recall,
    weighted/macro F1 (over labels seen in y or predictions, zero_division=0) and the macro
    one-vs-rest AUC over the classes present in y."""
    y, p = _prepare(y_true, probs, len(classes))
    return _metric_set(y, p, classes, None, None, decision)


def compute_metrics(spec, y_true, probs, decision: Decision | None = None) -> dict[str, float]:
    """The cohort's metric set (`spec`: a DatasetSpec, or anything with classes/positive_index),
    hard labels by `decision` (None: argmax)."""
    if len(spec.classes) == 2:
        positive = spec.positive_index if spec.positive_index is not None else 1
        return binary_metrics(y_true, probs, positive=positive, decision=decision)
    return multiclass_metrics(y_true, probs, spec.classes, decision=decision)
