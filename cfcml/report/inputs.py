"""What a clinical report is computed from: predictions per split, attributes, explanations.

Everything here is plain data (numpy arrays, strings, dicts). The loader that reads run
folders and the model-side computations (missing-modality metrics, Grad-CAM) fill it in;
`cfcml.report.build.build_report` turns it into `report.json` + `report.html`.

Shapes: N predictions in a split, K classes, D fused-feature dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..datasets.image_kinds import IMAGE_KINDS

ATTRIBUTE_TYPES = ("numeric", "categorical")
EXPLANATION_KINDS = IMAGE_KINDS
SPLIT_NAMES = ("val", "test")


@dataclass
class CohortInfo:
    """name; classes in class-index order; positive: the positive class name of a binary
    cohort (None for 3+ classes); attributes: `[{"column": str, "type": "numeric"|"categorical"}]`."""

    name: str
    classes: list[str]
    positive: str | None = None
    attributes: list[dict] = field(default_factory=list)

    @property
    def positive_index(self) -> int | None:
        return None if self.positive is None else self.classes.index(self.positive)

    def validate(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"cohort {self.name!r}: need >= 2 distinct classes, got {self.classes}")
        if len(self.classes) == 2 and self.positive not in self.classes:
            raise ValueError(
                f"cohort {self.name!r}: a binary cohort needs positive in {self.classes}, got {self.positive!r}"
            )
        if len(self.classes) > 2 and self.positive is not None:
            raise ValueError(f"cohort {self.name!r}: positive is for binary cohorts only, got {self.positive!r}")
        for a in self.attributes:
            if "column" not in a or a.get("type") not in ATTRIBUTE_TYPES:
                raise ValueError(
                    f"cohort {self.name!r}: attribute {a!r} needs a column and a type in {ATTRIBUTE_TYPES}"
                )


@dataclass
class SplitPredictions:
    """Predictions of one split, one row per (case, run).

    case_ids [N]; labels [N] int class index; probs [N, K]; logits [N, K] or None (no
    temperature scaling then); runs [N]: the fold/seed each row came from (CV pools the test
    folds, so a case appears once; a seed protocol repeats each test case once per seed);
    features [N, D] fused features (for t-SNE) or None.
    """

    case_ids: Sequence[str]
    labels: np.ndarray
    probs: np.ndarray
    logits: np.ndarray | None = None
    runs: Sequence[str] | None = None
    features: np.ndarray | None = None

    def __post_init__(self):
        self.case_ids = [str(c) for c in self.case_ids]
        self.labels = np.asarray(self.labels).astype(np.int64).reshape(-1)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        if self.logits is not None:
            self.logits = np.asarray(self.logits, dtype=np.float64)
        self.runs = ["all"] * len(self.case_ids) if self.runs is None else [str(r) for r in self.runs]
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.case_ids)

    def validate(self, name: str, num_classes: int) -> None:
        n = len(self.case_ids)
        if n == 0:
            raise ValueError(f"split {name!r} has no predictions")
        checks = [
            ("labels", self.labels, (n,)),
            ("probs", self.probs, (n, num_classes)),
            ("runs", np.asarray(self.runs), (n,)),
        ]
        if self.logits is not None:
            checks.append(("logits", self.logits, (n, num_classes)))
        for what, arr, shape in checks:
            if arr.shape != shape:
                raise ValueError(f"split {name!r}: {what} has shape {arr.shape}, expected {shape}")
        if self.features is not None and (self.features.ndim != 2 or len(self.features) != n):
            raise ValueError(f"split {name!r}: features must be [N={n}, D], got {self.features.shape}")
        if self.labels.min() < 0 or self.labels.max() >= num_classes:
            raise ValueError(
                f"split {name!r}: labels must lie in [0, {num_classes}), got {self.labels.min()}..{self.labels.max()}"
            )
        if not np.isfinite(self.probs).all():
            raise ValueError(f"split {name!r}: probs hold non-finite values")
        pairs = set(zip(self.case_ids, self.runs))
        if len(pairs) != n:
            raise ValueError(f"split {name!r}: a (case, run) pair appears twice")
        label_of: dict[str, int] = {}
        for c, y in zip(self.case_ids, self.labels.tolist()):
            if label_of.setdefault(c, y) != y:
                raise ValueError(f"split {name!r}: case {c!r} has two different labels")


@dataclass
class Explanation:
    """One explained case. kind "volume": images/heatmaps per series as [D, H, W];
    kind "photo": images per photo as [H, W, 3] (or [3, H, W], or [H, W]) and heatmaps [H, W].
    true / pred: class names or indices."""

    case_id: str
    true: Any
    pred: Any
    correct: bool
    kind: str
    images: Mapping[str, np.ndarray]
    heatmaps: Mapping[str, np.ndarray]

    def validate(self) -> None:
        if self.kind not in EXPLANATION_KINDS:
            raise ValueError(
                f"explanation {self.case_id!r}: kind must be one of {EXPLANATION_KINDS}, got {self.kind!r}"
            )
        missing = set(self.images) ^ set(self.heatmaps)
        if missing:
            raise ValueError(f"explanation {self.case_id!r}: images and heatmaps differ on {sorted(missing)}")


@dataclass
class ReportInputs:
    """Everything a report is computed from.

    splits: {"val": SplitPredictions, "test": SplitPredictions}; "test" is required, "val"
    chooses the operating points, the numeric-attribute tertiles and the temperature.
    attributes: {case_id: {column: value}} (float for numeric columns, word for categorical).
    missing_modality: {what_was_removed: {metric: value}} computed with the model, or None.
    meta: model and study facts for the header and the model card, e.g. preset, method,
    config_digest, data_digest, commit, selection_rule, split_description, date, run_dir,
    synthetic (bool), baselines ({name: {metric: value}}), limitations (extra lines).
    """

    cohort: CohortInfo
    splits: dict[str, SplitPredictions]
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing_modality: dict[str, dict[str, float]] | None = None
    explanations: list[Explanation] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.cohort, Mapping):
            self.cohort = CohortInfo(**self.cohort)
        self.splits = {
            k: v if isinstance(v, SplitPredictions) else SplitPredictions(**v) for k, v in self.splits.items()
        }
        self.explanations = [e if isinstance(e, Explanation) else Explanation(**e) for e in self.explanations]

    @property
    def num_classes(self) -> int:
        return len(self.cohort.classes)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency."""
        self.cohort.validate()
        if "test" not in self.splits:
            raise ValueError("splits must hold 'test' predictions")
        unknown = set(self.splits) - set(SPLIT_NAMES)
        if unknown:
            raise ValueError(f"unknown splits {sorted(unknown)}; expected {SPLIT_NAMES}")
        for name, split in self.splits.items():
            split.validate(name, self.num_classes)
        for e in self.explanations:
            e.validate()
