"""The names of the evaluation metrics, chosen by the cohort's class count (SPEC §5).

The config checks `train.select_metric` against these; `cfcml.engine.metrics` computes them.
"""

from __future__ import annotations

import re

BINARY_METRICS = ["sen", "spe", "acc", "g_mean", "balanced_acc", "auprc", "auprc_label", "auc"]
BINARY_LABELS = {
    "sen": "SEN",
    "spe": "SPE",
    "acc": "ACC",
    "g_mean": "G-Mean",
    "balanced_acc": "BA",
    "auprc": "AUPRC",
    "auprc_label": "AUPRC (labels)",
    "auc": "AUC",
}


def class_key(name: str) -> str:
    """A class name as a metric-name suffix: `G2inv` -> `g2inv`, `Grade 2` -> `grade_2`,
    `Méningiome` -> `méningiome` (letters of any script stay: MLflow metric names take them)."""
    return re.sub(r"\W+", "_", str(name).lower()).strip("_")


def metric_names(classes) -> list[str]:
    if len(classes) == 2:
        return list(BINARY_METRICS)
    return ["acc", "balanced_acc", *[f"acc_{class_key(c)}" for c in classes], "weighted_f1", "macro_f1", "auc"]


def metric_labels(classes) -> dict[str, str]:
    """Column headers in the paper's style (Table 2: ACC_G1, W-F1...; Table 3: SEN, SPE...)."""
    if len(classes) == 2:
        return dict(BINARY_LABELS)
    return {
        "acc": "ACC",
        "balanced_acc": "BA",
        **{f"acc_{class_key(c)}": f"ACC_{c}" for c in classes},
        "weighted_f1": "W-F1",
        "macro_f1": "M-F1",
        "auc": "AUC",
    }
