"""Evaluation metrics for the two CFCML benchmarks (SPEC §5, paper Tables 2–5).

Every function here is a pure function of ``y_true`` (integer labels) and ``probs``
(per-class probabilities, one row per sample).  Both may be numpy arrays, lists or
torch tensors.  Predictions are ``argmax(probs, axis=1)``.  All values are fractions in
[0, 1]; the reporting layer (:mod:`cfcml.engine.summary`) turns them into percentages.

Robustness: the functions never raise on degenerate input (an absent class, a single
class, an empty batch, NaN probabilities).  A value that is undefined is returned as
``NaN`` instead:

* the per-class accuracy (recall) of a class absent from ``y_true`` is NaN;
* the MEN AUC is the macro one-vs-rest AUC over the classes *present* in ``y_true``
  (identical to ``roc_auc_score(..., multi_class="ovr", average="macro")`` when all
  classes are present) and NaN when fewer than two classes are present;
* Derm7pt SEN / SPE / G-Mean / BA are NaN when MEL / NEV is absent; AUC and AUPRC are NaN
  when ``y_true`` holds a single class.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    roc_auc_score,
)

MEN_CLASSES = ("G1", "G2inv", "G2ninv")
DERM7PT_CLASSES = ("NEV", "MEL")

METRIC_NAMES: dict[str, list[str]] = {
    "men": ["acc", "acc_g1", "acc_g2inv", "acc_g2ninv", "weighted_f1", "macro_f1", "auc"],
    "derm7pt": ["sen", "spe", "acc", "g_mean", "balanced_acc", "auprc", "auc"],
}

# Column headers used by the paper's Table 2 (MEN) and Table 3 (Derm7pt).
METRIC_LABELS: dict[str, dict[str, str]] = {
    "men": {
        "acc": "ACC",
        "acc_g1": "ACC_G1",
        "acc_g2inv": "ACC_G2inv",
        "acc_g2ninv": "ACC_G2ninv",
        "weighted_f1": "W-F1",
        "macro_f1": "M-F1",
        "auc": "AUC",
    },
    "derm7pt": {
        "sen": "SEN",
        "spe": "SPE",
        "acc": "ACC",
        "g_mean": "G-Mean",
        "balanced_acc": "BA",
        "auprc": "AUPRC",
        "auc": "AUC",
    },
}

# The paper's reported means (SPEC §5), as fractions.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "men": {
        "acc": 0.9561,
        "acc_g1": 0.9677,
        "acc_g2inv": 0.9324,
        "acc_g2ninv": 0.8857,
        "weighted_f1": 0.9576,
        "macro_f1": 0.9113,
        "auc": 0.9857,
    },
    "derm7pt": {
        "sen": 0.7591,
        "spe": 0.8949,
        "acc": 0.8521,
        "g_mean": 0.8240,
        "balanced_acc": 0.8270,
        "auprc": 0.6607,
        "auc": 0.9052,
    },
}

# Ablation AUCs of the paper's Tables 4/5 (SPEC §5), as fractions.
PAPER_ABLATION_AUC: dict[str, dict[str, float]] = {
    "men": {"neither": 0.9577, "mg_cie_only": 0.9590, "ccrm_only": 0.9602,
            "full": 0.9857},
    "derm7pt": {"neither": 0.8752, "mg_cie_only": 0.8951, "ccrm_only": 0.8896,
                "full": 0.9052},
}

NAN = float("nan")


def _to_numpy(x) -> np.ndarray:
    """Convert a list / numpy array / torch tensor to a numpy array (on CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _prepare(y_true, probs, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes and return ``(y, probs, pred)`` as numpy arrays."""
    y = _to_numpy(y_true).reshape(-1).astype(np.int64)
    p = _to_numpy(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"probs must have shape [N, {n_classes}], got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but probs has {p.shape[0]}")
    pred = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=np.int64)
    return y, p, pred


def _class_recall(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    """Recall of class ``c`` (the paper's per-class accuracy); NaN if ``c`` is absent."""
    mask = y == c
    return float(np.mean(pred[mask] == c)) if mask.any() else NAN


def _safe(fn, *args, **kwargs) -> float:
    """Call a scikit-learn metric, returning NaN if it is undefined for this input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(*args, **kwargs))
    except ValueError:
        return NAN


def _binary_auc(y_bin: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a binary problem; NaN when only one class is present."""
    if y_bin.min(initial=1) == y_bin.max(initial=0):  # single class (or empty)
        return NAN
    return _safe(roc_auc_score, y_bin, score)


def men_metrics(y_true, probs) -> dict[str, float]:
    """MEN 3-class metrics (G1=0, G2inv=1, G2ninv=2).

    Returns ``acc`` (overall accuracy), ``acc_g1`` / ``acc_g2inv`` / ``acc_g2ninv``
    (recall of each class, NaN if the class is absent), ``weighted_f1`` and ``macro_f1``
    (scikit-learn ``f1_score`` over the labels seen in ``y_true`` or the predictions,
    ``zero_division=0``) and ``auc``: the macro one-vs-rest ROC AUC on the probabilities,
    averaged over the classes present in ``y_true`` (NaN if fewer than two are present).
    """
    y, p, pred = _prepare(y_true, probs, 3)
    if len(y) == 0:
        return {name: NAN for name in METRIC_NAMES["men"]}
    present = [c for c in range(3) if (y == c).any()]
    if len(present) >= 2:
        # Macro OvR = unweighted mean of per-class binary AUCs, exactly as in
        # roc_auc_score(multi_class="ovr", average="macro"), but tolerant of absent
        # classes and of rows that do not sum to one.
        aucs = [_binary_auc((y == c).astype(int), p[:, c]) for c in present]
        auc = float(np.mean(aucs))
    else:
        auc = NAN
    return {
        "acc": float(accuracy_score(y, pred)),
        "acc_g1": _class_recall(y, pred, 0),
        "acc_g2inv": _class_recall(y, pred, 1),
        "acc_g2ninv": _class_recall(y, pred, 2),
        "weighted_f1": _safe(f1_score, y, pred, average="weighted", zero_division=0),
        "macro_f1": _safe(f1_score, y, pred, average="macro", zero_division=0),
        "auc": auc,
    }


def derm7pt_metrics(y_true, probs) -> dict[str, float]:
    """Derm7pt binary metrics, NEV=0 vs MEL=1 (positive = MEL).

    ``sen`` = recall of MEL, ``spe`` = recall of NEV, ``acc``, ``g_mean`` =
    sqrt(sen * spe), ``balanced_acc`` = (sen + spe) / 2, ``auprc`` = average precision of
    the MEL probability (not of hard labels) and ``auc`` = ROC AUC of the MEL probability.
    """
    y, p, pred = _prepare(y_true, probs, 2)
    if len(y) == 0:
        return {name: NAN for name in METRIC_NAMES["derm7pt"]}
    sen = _class_recall(y, pred, 1)
    spe = _class_recall(y, pred, 0)
    y_pos = (y == 1).astype(int)
    single_class = y_pos.min() == y_pos.max()
    return {
        "sen": sen,
        "spe": spe,
        "acc": float(accuracy_score(y, pred)),
        "g_mean": math.sqrt(sen * spe),  # NaN propagates
        "balanced_acc": (sen + spe) / 2.0,
        "auprc": NAN if single_class else _safe(average_precision_score, y_pos, p[:, 1]),
        "auc": _binary_auc(y_pos, p[:, 1]),
    }


_DISPATCH = {"men": men_metrics, "derm7pt": derm7pt_metrics}


def compute_metrics(dataset: str, y_true, probs) -> dict[str, float]:
    """Compute the metric set of ``dataset`` (``"men"`` or ``"derm7pt"``)."""
    try:
        fn = _DISPATCH[dataset.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_DISPATCH)}") from None
    return fn(y_true, probs)
