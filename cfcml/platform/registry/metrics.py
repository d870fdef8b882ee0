"""Which metrics the gate may compare, which way is better and the range a valid value lies in.

Pure functions over names and numbers: no server, no MLflow.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import PromotionError
from .evaluation import EVALUATION_FILE

DEFAULT_METRIC = "auc"


@dataclass(frozen=True)
class MetricSpec:
    """How to compare a metric: its direction and the range a valid value lies in."""

    name: str
    greater_is_better: bool
    low: float = -math.inf
    high: float = math.inf
    known: bool = True

    def check(self, value: float, who: str) -> float:
        if not math.isfinite(value):
            raise PromotionError(f"{who}: {self.name} = {value!r} is not a finite number; refusing to compare")
        if not self.low <= value <= self.high:
            raise PromotionError(
                f"{who}: {self.name} = {value:.6g} is outside its valid range [{self.low:g}, {self.high:g}]; "
                "refusing to compare"
            )
        return value

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a > b if self.greater_is_better else a < b


# base metric name → (greater_is_better, low, high); names as in summary.json and run metrics
_KNOWN = {
    **{
        m: (True, 0.0, 1.0)
        for m in (
            "auc",
            "acc",
            "sen",
            "spe",
            "g_mean",
            "balanced_acc",
            "auprc",
            "auprc_label",
            "weighted_f1",
            "macro_f1",
            "f1",
            "precision",
            "recall",
            "accuracy",
            "sensitivity",
            "specificity",
            "ppv",
            "npv",
        )
    },
    "loss": (False, 0.0, math.inf),
    "brier": (False, 0.0, 2.0),  # multi-class: sum over classes of (p - y)^2
    "ece": (False, 0.0, 1.0),
}
_PREFIXES = ("cv_", "val_", "test_", "train_", "best_", "mean_")
_SEARCH_PREFIXES = ("val_", "cv_", "best_")


def base_name(metric: str) -> str:
    """``fold1/val_auc`` → ``auc``; ``test_auc_mean`` → ``auc``; ``cv_val_auc_epoch`` → ``auc``."""
    name = metric.rsplit("/", 1)[-1].lower()
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix) :], True
    for suffix in ("_mean", "_epoch"):
        name = name.removesuffix(suffix)
    if re.fullmatch(r"acc_.+", name):  # per-class accuracy, acc_<class>
        return "acc"
    return name


def is_known(metric: str) -> bool:
    """True when the gate knows ``metric``'s direction and range."""
    return base_name(metric) in _KNOWN


def metric_spec(metric: str, greater_is_better: bool | None = None) -> MetricSpec:
    """The direction and range of ``metric``; ``greater_is_better`` is required for an
    unknown metric and must agree with a known one. Raises :class:`PromotionError`."""
    known = _KNOWN.get(base_name(metric))
    if known is None:
        if greater_is_better is None:
            raise PromotionError(
                f"unknown metric {metric!r}: say which way is better with --greater-is-better or "
                f"--lower-is-better (known: {', '.join(sorted(_KNOWN))}, with val_/test_/cv_ prefixes)"
            )
        return MetricSpec(metric, greater_is_better, known=False)
    direction, low, high = known
    if greater_is_better is not None and greater_is_better != direction:
        raise PromotionError(
            f"{metric} is {'higher' if direction else 'lower'} is better; "
            f"--{'lower' if direction else 'greater'}-is-better contradicts it"
        )
    return MetricSpec(metric, direction, low, high)


def check_gate_metric(metric: str) -> str:
    """``metric`` if it may be a gate metric: a plain name of the artifact's own metrics
    (``auc``, ``balanced_acc``, ``brier``, ...). Raises :class:`PromotionError` for the search's
    maximum and for the members' metrics."""
    name = metric.strip().lower()
    if not name:
        raise PromotionError("--metric is empty; the default is the artifact's own 'auc'")
    if "/" in name:
        raise PromotionError(
            f"{metric!r} is a member run's metric (one fold or seed model), not the registered model's; "
            f"give a plain name measured on the package, e.g. --metric {DEFAULT_METRIC}"
        )
    if name.startswith(_SEARCH_PREFIXES) or name.endswith("_epoch"):
        raise PromotionError(
            f"{metric!r} is the search's maximum (selected on validation over epochs and trials: a study with more "
            "trials would win without being better), so it can never be the gate metric; the gate compares the "
            f"registered model's own metric on untouched patients ({EVALUATION_FILE}), e.g. --metric {DEFAULT_METRIC}"
        )
    if name.startswith(("test_", "train_", "mean_")) or name.endswith(("_mean", "_std")):
        raise PromotionError(
            f"{metric!r} summarises the study's member runs (each fold or seed model on its own split), not the "
            f"registered model; the gate reads the package's own metrics from {EVALUATION_FILE}: use the plain name, "
            f"e.g. --metric {base_name(name) if is_known(name) else DEFAULT_METRIC}"
        )
    return metric.strip()


def format_value(value: float | None) -> str:
    """A metric value as messages show it (``n/a`` when there is none)."""
    return "n/a" if value is None else f"{value:.6g}"
