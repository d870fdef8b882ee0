"""The hard-label rule (`predict.decision`): which class a patient's probabilities name.

- ``balanced``: argmax of the probabilities. Class-balanced batches train a model for equal
  class priors, so this is the Bayes decision when every class is equally common.
- ``prior``: logit adjustment by the training split's class priors (Menon et al. 2021,
  "Long-tail learning via logit adjustment"): argmax_k (logit_k + log pi_k), computed as
  argmax_k (p_k · pi_k) since p = softmax(logits). On a cohort where one class dominates
  this recovers the accuracy that argmax loses on the common classes.

The rule changes hard labels only (accuracy, recall, F1, confusion, the predicted class);
probabilities, AUC and calibration are untouched. `pi` is the class mix of the training part
of the run (or, for an ensemble of runs, of their training parts together), recorded as
counts so a report or a package can state where it came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RULES = ("balanced", "prior")


@dataclass(frozen=True)
class Decision:
    """rule: one of RULES; train_counts: training cases per class (class-index order), needed
    for ``prior``."""

    rule: str = "balanced"
    train_counts: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"predict.decision: expected one of {', '.join(RULES)}, got {self.rule!r}")
        if self.train_counts is not None:
            counts = tuple(int(c) for c in self.train_counts)
            if any(c < 0 for c in counts) or sum(counts) == 0:
                raise ValueError(f"decision train_counts must be non-negative with a positive total, got {counts}")
            object.__setattr__(self, "train_counts", counts)
        if self.rule == "prior" and self.train_counts is None:
            raise ValueError("predict.decision=prior needs the training split's class counts")

    @property
    def priors(self) -> np.ndarray | None:
        """pi_k = training count_k / total, or None without counts."""
        if self.train_counts is None:
            return None
        counts = np.asarray(self.train_counts, dtype=np.float64)
        return counts / counts.sum()

    def labels(self, probs) -> np.ndarray:
        """[N] hard labels of [N, K] probabilities under this rule (argmax ties: the lowest index)."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2:
            raise ValueError(f"probs must have shape [N, K], got {p.shape}")
        if len(p) == 0:
            return np.zeros(0, dtype=np.int64)
        if self.rule == "prior":
            pi = self.priors
            if len(pi) != p.shape[1]:
                raise ValueError(f"decision has {len(pi)} class counts but probs have {p.shape[1]} classes")
            p = p * pi  # = softmax(logits + log pi) up to a per-row constant
        return p.argmax(axis=1).astype(np.int64)

    def to_dict(self) -> dict:
        out = {"rule": self.rule, "train_counts": None if self.train_counts is None else list(self.train_counts)}
        if self.train_counts is not None:
            out["priors"] = [round(float(x), 6) for x in self.priors]
        return out

    def describe(self) -> str:
        """One line for a model card."""
        if self.rule == "balanced":
            return "argmax of the probabilities (balanced class priors, as class-balanced training assumes)"
        shown = ", ".join(f"{x:.3f}" for x in self.priors)
        return (
            f"argmax of logits + log training class priors (Menon et al. 2021); priors {shown} from "
            f"{sum(self.train_counts)} training cases"
        )


def class_counts(labels: Iterable[int], num_classes: int) -> tuple[int, ...]:
    """Cases per class in class-index order."""
    y = np.asarray(list(labels), dtype=np.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    return tuple(int(c) for c in np.bincount(y, minlength=num_classes))


def run_decision(rule: str, train_labels: Iterable[int], num_classes: int) -> Decision:
    """The decision of one run: its rule, with the class counts of its training part recorded."""
    return Decision(rule, class_counts(train_labels, num_classes))


def pooled_decision(rule: str, counts: Sequence[Sequence[int] | None]) -> Decision:
    """One decision for an ensemble or a pooled report over runs: the rule with the runs'
    training counts summed (each run trained on its own part; their mix is what the
    ensemble saw). Runs without recorded counts are allowed only for ``balanced``."""
    known = [c for c in counts if c is not None]
    if len(known) < len(counts):
        if rule == "prior":
            raise ValueError(
                "predict.decision=prior: a run has no recorded training class counts "
                "(metrics.json 'decision'); retrain it with this version"
            )
        return Decision(rule)
    if not known:
        return Decision(rule)
    if len({len(c) for c in known}) != 1:
        raise ValueError(f"runs disagree on the number of classes: {[len(c) for c in known]}")
    return Decision(rule, tuple(int(x) for x in np.sum(np.asarray(known, dtype=np.int64), axis=0)))


def decision_from_dict(data: dict | None) -> Decision:
    """The Decision recorded by `Decision.to_dict` (None or {} -> balanced)."""
    if not data:
        return Decision()
    return Decision(data.get("rule", "balanced"), data.get("train_counts"))


def recorded_train_counts(run_dir) -> tuple[int, ...] | None:
    """The training class counts a finished run recorded (metrics.json "decision"), or None."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text()).get("decision") or {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    counts = recorded.get("train_counts")
    return None if counts is None else tuple(int(c) for c in counts)
