"""The registered model measured as itself: the packaged ensemble, loaded exactly as `cfcml
predict` loads it, scored on patients that nothing in the study saw.

- ``holdout``: a `folds` cohort with ``--holdout FRACTION``: the held-back patients (no
  trial trained, validated or selected on them).
- ``test_split``: a `files` cohort: its test split (every seed model trains on train and
  selects its epoch on valid).
- ``out_of_fold``: a `folds` cohort without a hold-back: every patient trained or selected
  K-1 of the packaged fold models, so the ensemble has no untouched patient. The numbers are
  then the pooled out-of-fold predictions of the single fold models — the cross-validated
  estimate of *one fold model*, not a measurement of the shipped ensemble.

What comes out is ``evaluation.json`` (shipped inside the package):
``{"kind", "ids", "ids_digest", "data_digest", "n", "metrics", "estimates"}``, and the same
metrics named ``<kind>_<metric>`` (``holdout_auc``, ``test_split_auc``, ``oof_auc``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import softmax

from cfcml.datasets.cohort import Case, Cohort

from ..engine.metrics import compute_metrics
from ..engine.splits import ids_digest, run_split, seen_ids
from ..report.inputs import CohortInfo, ReportInputs, SplitPredictions
from ..report.stats import TEMPERATURE_BOUNDS
from .pyfunc import cohort_frame

EVALUATION_FILE = "evaluation.json"
KINDS = ("holdout", "test_split", "out_of_fold")
METRIC_PREFIX = {"holdout": "holdout", "test_split": "test_split", "out_of_fold": "oof"}
ESTIMATES = {
    "holdout": "the shipped ensemble on patients held back from the whole study (no training, validation or "
    "selection saw them)",
    "test_split": "the shipped ensemble on the cohort's test split (the seed models trained on train and selected "
    "their epochs on valid)",
    "out_of_fold": "the cross-validated estimate of a single fold model (pooled out-of-fold predictions); no "
    "patient is untouched by the shipped ensemble, whose own accuracy is not measured",
}


@dataclass(frozen=True)
class EvaluationSet:
    """The patients the registered model is measured on and what that measurement estimates."""

    kind: str
    cases: list[Case] = field(default_factory=list)  # untouched patients (empty for out_of_fold)
    data_digest: str = ""

    @property
    def ids(self) -> list[str]:
        return [c.case_id for c in self.cases]


def evaluation_set(full: Cohort, kept: Cohort, held: list[Case], data_digest: str) -> EvaluationSet:
    """`full`: the cohort as read; `kept`: what the study trains on; `held`: the held-back cases."""
    if held:
        return EvaluationSet("holdout", sorted(held, key=lambda c: c.case_id), data_digest)
    if kept.spec.split.kind == "files":
        return EvaluationSet("test_split", kept.split("test"), data_digest)
    return EvaluationSet("out_of_fold", [], data_digest)


def member_seen_ids(cfg, kept: Cohort, runs: list[dict]) -> dict[str, dict[str, list[str]]]:
    """{run name: {"train": ids, "selection": ids}} of every packaged member."""
    return {r["name"]: seen_ids(run_split(cfg, kept, r.get("fold"), r.get("seed"))) for r in runs}


def metric_names_for(kind: str, metrics: dict) -> dict[str, float]:
    """`metrics` under the names a model version carries: ``holdout_auc``, ``test_split_auc``, ``oof_auc``."""
    return {f"{METRIC_PREFIX[kind]}_{k}": float(v) for k, v in metrics.items() if math.isfinite(v)}


def score_frame(model, cohort: Cohort, cases: list[Case]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, labels, [N, K] probabilities) of `cases` scored by a loaded pyfunc, as `cfcml predict` does."""
    preds = model.predict(cohort_frame(cohort, cases))
    probs = preds[[f"prob_{c}" for c in cohort.classes]].to_numpy(dtype=np.float64)
    if not np.isfinite(probs).all():
        bad = preds.loc[~np.isfinite(probs).all(1), ["case_id", "status"]].head(3).to_dict("records")
        raise RuntimeError(f"the packaged model could not score every evaluation case: {bad}")
    by_id = {c.case_id: c for c in cases}
    ids = [str(i) for i in preds["case_id"]]
    return ids, np.array([by_id[i].label for i in ids], dtype=np.int64), probs


def evaluation_record(evalset: EvaluationSet, spec, ids: list[str], labels, probs, decision=None) -> dict:
    """The content of evaluation.json for predictions on `ids` (hard labels by the package's
    `decision`, a `cfcml.engine.decision.Decision`; None: argmax)."""
    metrics = {k: float(v) for k, v in compute_metrics(spec, np.asarray(labels), np.asarray(probs), decision).items()}
    return {
        "kind": evalset.kind,
        "ids": list(ids),
        "ids_digest": ids_digest(ids),
        "data_digest": evalset.data_digest,
        "n": len(ids),
        "metrics": metrics,
        "estimates": ESTIMATES[evalset.kind],
    }


def write_evaluation(record: dict, package_dir: Path) -> Path:
    """evaluation.json into the package (temp file, then rename)."""
    path = Path(package_dir) / EVALUATION_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def ensemble_temperature(run_dirs: list[Path]) -> float | None:
    """The temperature T minimising the NLL of the *ensemble*'s probabilities, mean over
    members of softmax(logits / T), on the validation cases that every member selected on and
    none trained on (a `files` cohort's valid split). None when the members' validation cases
    differ (cross-validation: no such case)."""
    members = []
    for d in run_dirs:
        with np.load(Path(d) / "predictions.npz", allow_pickle=False) as saved:
            if "val_logits" not in saved:
                return None
            order = np.argsort(saved["val_case_ids"])
            members.append((saved["val_case_ids"][order], saved["val_labels"][order], saved["val_logits"][order]))
    if any(len(m[0]) != len(members[0][0]) or (m[0] != members[0][0]).any() for m in members):
        return None
    labels, logits = members[0][1].astype(np.int64), np.stack([m[2] for m in members]).astype(np.float64)

    def nll(log_t: float) -> float:
        p = softmax(logits / np.exp(log_t), axis=2).mean(0)
        return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())

    lo, hi = TEMPERATURE_BOUNDS
    res = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def artifact_report_inputs(cohort: Cohort, record: dict, labels, probs, val, meta: dict):
    """ReportInputs whose test split is the shipped model's own predictions on the evaluation
    ids and whose validation split (`val`, SplitPredictions or None) chooses thresholds."""
    spec = cohort.spec
    attrs = [{"column": a.column, "type": a.type} for a in spec.attributes]
    info = CohortInfo(spec.name, list(spec.classes), spec.positive, attrs)
    test = SplitPredictions(record["ids"], labels, probs, runs=["package"] * len(record["ids"]))
    splits = {"test": test} | ({"val": val} if val is not None else {})
    wanted = {c for s in splits.values() for c in s.case_ids}
    attributes = {c.case_id: dict(c.attributes) for c in cohort.cases if c.case_id in wanted}
    return ReportInputs(cohort=info, splits=splits, attributes=attributes, meta=meta)
