"""Evaluation metrics (SPEC §5, paper Tables 2–5), chosen by the cohort's class count.

- 2 classes (positive = the schema's `positive`): ``sen, spe, acc, g_mean, balanced_acc,
  auprc, auprc_label, auc``. ``auprc`` is the average precision of the positive-class
  probability (good practice); ``auprc_label`` the average precision of the hard
  predictions, which is what the paper's Derm7pt "AUPRC" column reports.
- 3+ classes: ``acc``, ``balanced_acc`` (mean recall over the classes present), ``acc_<class>``
  (recall of each class, names lower-cased), ``weighted_f1``, ``macro_f1`` and ``auc`` (macro
  one-vs-rest on probabilities).

Every function is a pure function of ``y_true`` (integer labels), ``probs`` (one row per
sample) and the hard-label rule ``decision`` (`cfcml.engine.decision`; None = argmax, i.e.
``balanced``). The rule changes hard-label metrics only, never AUC/AUPRC of probabilities.
Values are fractions in [0, 1]. They never raise on degenerate input: an undefined value
(absent class, one class only, empty input) is NaN.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from ..util.metric_names import BINARY_METRICS, class_key, metric_names
from .decision import Decision

NAN = float("nan")


def higher_is_better(metric: str) -> bool:
    return metric != "loss"


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _prepare(y_true, probs, n_classes: int, decision: Decision | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = _to_numpy(y_true).reshape(-1).astype(np.int64)
    p = _to_numpy(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"probs must have shape [N, {n_classes}], got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but probs has {p.shape[0]}")
    return y, p, (decision or Decision()).labels(p)


def _recall(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    mask = y == c
    return float(np.mean(pred[mask] == c)) if mask.any() else NAN


def _safe(fn, *args, **kwargs) -> float:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(*args, **kwargs))
    except ValueError:
        return NAN


def _binary_auc(y_bin: np.ndarray, score: np.ndarray) -> float:
    if y_bin.min(initial=1) == y_bin.max(initial=0):
        return NAN
    return _safe(roc_auc_score, y_bin, score)


def binary_metrics(y_true, probs, positive: int = 1, decision: Decision | None = None) -> dict[str, float]:
    """SEN = recall of `positive`, SPE = recall of the other class, ACC, G-Mean = √(SEN·SPE),
    BA = (SEN + SPE) / 2, AUPRC (probabilities), AUPRC on hard labels, AUC."""
    y, p, pred = _prepare(y_true, probs, 2, decision)
    if len(y) == 0:
        return {n: NAN for n in BINARY_METRICS}
    negative = 1 - positive
    sen, spe = _recall(y, pred, positive), _recall(y, pred, negative)
    y_pos = (y == positive).astype(int)
    single = y_pos.min() == y_pos.max()
    return {
        "sen": sen,
        "spe": spe,
        "acc": float(accuracy_score(y, pred)),
        "g_mean": math.sqrt(sen * spe),  # NaN propagates
        "balanced_acc": (sen + spe) / 2.0,
        "auprc": NAN if single else _safe(average_precision_score, y_pos, p[:, positive]),
        "auprc_label": NAN if single else _safe(average_precision_score, y_pos, (pred == positive).astype(float)),
        "auc": _binary_auc(y_pos, p[:, positive]),
    }


def multiclass_metrics(y_true, probs, classes, decision: Decision | None = None) -> dict[str, float]:
    """ACC, balanced accuracy (mean recall over the classes present in y), per-class recall, weighted/macro F1 (over labels seen in y or predictions,
    zero_division=0) and the macro one-vs-rest AUC over the classes present in y."""
    k = len(classes)
    y, p, pred = _prepare(y_true, probs, k, decision)
    names = metric_names(classes)
    if len(y) == 0:
        return {n: NAN for n in names}
    present = [c for c in range(k) if (y == c).any()]
    auc = float(np.mean([_binary_auc((y == c).astype(int), p[:, c]) for c in present])) if len(present) >= 2 else NAN
    out = {"acc": float(accuracy_score(y, pred)), "balanced_acc": _safe(balanced_accuracy_score, y, pred)}
    out |= {f"acc_{class_key(c)}": _recall(y, pred, i) for i, c in enumerate(classes)}
    out |= {
        "weighted_f1": _safe(f1_score, y, pred, average="weighted", zero_division=0),
        "macro_f1": _safe(f1_score, y, pred, average="macro", zero_division=0),
        "auc": auc,
    }
    return out


def compute_metrics(spec, y_true, probs, decision: Decision | None = None) -> dict[str, float]:
    """The cohort's metric set (`spec`: a DatasetSpec, or anything with classes/positive_index),
    hard labels by `decision` (None: argmax)."""
    if len(spec.classes) == 2:
        positive = spec.positive_index if spec.positive_index is not None else 1
        return binary_metrics(y_true, probs, positive=positive, decision=decision)
    return multiclass_metrics(y_true, probs, spec.classes, decision=decision)
