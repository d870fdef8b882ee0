"""Classical baselines on the attributes alone (`cfcml cv --baselines`): does the table already say it all?

Two scikit-learn models read the cohort's tabular attributes (the schema's `table.attributes`)
and nothing else:

- ``logreg``: L2-regularised logistic regression; categories one-hot (the schema's words plus
  "unknown" for an empty cell, the word the model's sentence route uses), numbers
  standardised after mean imputation with a missing-value indicator.
- ``hgb``: `HistGradientBoostingClassifier` with native categorical splits (an empty or
  unknown cell is a missing value, which the trees route natively) and raw numbers.

Both are fitted on exactly the training part of each fold / seed that the deep model trains
on (`run_split`, the same stratified validation carve-out), with class-balanced weights (the
deep model trains on class-balanced batches); each grid point is scored on that run's
validation part and the one with the best validation AUC (ties: the first, i.e. the most
regularised) is tested once on the test part with `compute_metrics`, the deep run's metrics.
Per run: `<out>/<kind>/<run>/metrics.json` (`"test"` shaped like a deep run's) and
`predictions.npz` (`val_/test_case_ids`, `_probs`, `_labels`, as `run.py` writes them).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from ..config import Config, ConfigError
from .decision import run_decision
from .metrics import compute_metrics
from .modality_dropout import MISSING_WORD
from .run import METRICS, PREDICTIONS, _save_npz, _write_json
from .splits import run_split
from .summary import summarize_runs

LABELS = {"logreg": "LogReg (attributes)", "hgb": "HistGB (attributes)"}
GRIDS = {
    "logreg": [{"C": c} for c in (0.01, 0.1, 1.0, 10.0, 100.0)],  # smallest C (strongest penalty) first
    "hgb": [
        {"learning_rate": lr, "max_leaf_nodes": leaves, "min_samples_leaf": leaf}
        for leaves, leaf, lr in itertools.product((4, 15), (20, 5), (0.03, 0.1))
    ],  # simplest first
}


def attribute_frame(spec, cases) -> pd.DataFrame:
    """One row per case, one column per attribute: categorical words (an empty cell is
    MISSING_WORD) as strings, numbers as floats (an empty cell is NaN)."""
    columns = {}
    for a in spec.attributes:
        values = [c.attributes.get(a.column) for c in cases]
        if a.type == "categorical":
            columns[a.column] = pd.Series([MISSING_WORD if v is None else str(v) for v in values], dtype=object)
        else:
            columns[a.column] = pd.Series([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return pd.DataFrame(columns)


def make_model(kind: str, spec, params: dict, seed: int = 0) -> Pipeline:
    """The unfitted pipeline of baseline `kind` with hyper-parameters `params`."""
    cats = [a for a in spec.attributes if a.type == "categorical"]
    nums = [a.column for a in spec.attributes if a.type == "numeric"]
    if kind == "logreg":
        parts = [
            (
                "categories",
                OneHotEncoder(
                    categories=[list(dict.fromkeys([*a.words, MISSING_WORD])) for a in cats], handle_unknown="ignore"
                ),
                [a.column for a in cats],
            ),
            ("numbers", make_pipeline(SimpleImputer(strategy="mean", add_indicator=True), StandardScaler()), nums),
        ]
        model = LogisticRegression(C=params["C"], class_weight="balanced", max_iter=5000)
    elif kind == "hgb":
        parts = [
            (
                "categories",
                OrdinalEncoder(
                    categories=[list(a.words) for a in cats], handle_unknown="use_encoded_value", unknown_value=np.nan
                ),
                [a.column for a in cats],
            ),
            ("numbers", "passthrough", nums),
        ]
        model = HistGradientBoostingClassifier(
            **params,
            class_weight="balanced",
            early_stopping=False,
            random_state=seed,
            categorical_features=[True] * len(cats) + [False] * len(nums) if cats else None,
        )
    else:
        raise ConfigError(f"unknown baseline {kind!r}; choose from {', '.join(LABELS)}")
    parts = [p for p in parts if p[2]]  # a cohort without numbers (or categories) has no such block
    return Pipeline([("attributes", ColumnTransformer(parts, sparse_threshold=0.0)), ("model", model)])


def class_probs(model: Pipeline, frame: pd.DataFrame, num_classes: int) -> np.ndarray:
    """[N, num_classes] probabilities in class-index order (0 for a class absent from training)."""
    probs = np.zeros((len(frame), num_classes))
    probs[:, model.classes_.astype(int)] = model.predict_proba(frame)
    return probs


def fit_baseline(kind: str, spec, split, seed: int = 0, decision: str = "balanced") -> dict:
    """Fit every grid point on `split.train`, pick the best validation AUC, test it once.
    -> {"params", "grid": [{"params", "val_auc"}], "val": {...}, "test": {...}} with each part's
    "case_ids", "labels", "probs" and "metrics" (hard labels by the `decision` rule, as the deep run's)."""
    frames = {part: attribute_frame(spec, getattr(split, part)) for part in ("train", "val", "test")}
    labels = {part: np.array([c.label for c in getattr(split, part)], dtype=np.int64) for part in frames}
    k = spec.num_classes
    best, grid = None, []
    for params in GRIDS[kind]:
        model = make_model(kind, spec, params, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on tiny folds
            model.fit(frames["train"], labels["train"])
        val_probs = class_probs(model, frames["val"], k)
        auc = compute_metrics(spec, labels["val"], val_probs)["auc"]
        grid.append({"params": params, "val_auc": auc})
        if best is None or (not math.isnan(auc) and (math.isnan(best[0]) or auc > best[0])):
            best = (auc, params, model, val_probs)
    _, params, model, val_probs = best
    out = {"params": params, "grid": grid, "decision": run_decision(decision, labels["train"], k)}
    for part, probs in (("val", val_probs), ("test", class_probs(model, frames["test"], k))):
        out[part] = {
            "case_ids": [c.case_id for c in getattr(split, part)],
            "labels": labels[part],
            "probs": probs,
            "metrics": compute_metrics(spec, labels[part], probs, out["decision"]),
        }
    return out


def write_baseline_run(folder: Path, kind: str, run: str, fitted: dict, spec) -> dict:
    """predictions.npz, then metrics.json (last, as a deep run); -> the metrics.json content."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for part in ("val", "test"):
        p = fitted[part]
        arrays |= {
            f"{part}_case_ids": np.array(p["case_ids"]),
            f"{part}_labels": p["labels"],
            f"{part}_probs": p["probs"],
        }
    _save_npz(folder / PREDICTIONS, **arrays)
    result = {
        "run": run,
        "baseline": kind,
        "method": LABELS[kind],
        "dataset": spec.name,
        "params": fitted["params"],
        "grid": fitted["grid"],
        "selection": "validation AUC (never test)",
        "decision": fitted["decision"].to_dict(),
        "validation": fitted["val"]["metrics"],
        "test": fitted["test"]["metrics"],
        "sizes": {part: len(fitted[part]["case_ids"]) for part in ("val", "test")},
        "finished": True,
    }
    _write_json(folder / METRICS, result)
    return result


def run_baselines(
    cfg: Config,
    cohort,
    planned: list[dict],
    out_dir: str | Path,
    kinds=tuple(LABELS),
    report: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Every baseline on every planned run (`protocol_runs`) -> {kind: summary (summarize_runs)
    with "label"}; files under out_dir/<kind>/<run>/."""
    spec, out = cohort.spec, Path(out_dir)
    if not spec.attributes:
        raise ConfigError(
            f"--baselines: the cohort {spec.name} has no tabular attributes (table.attributes in its "
            "schema) for a classical model to read"
        )
    results = {}
    for kind in kinds:
        runs = []
        for r in planned:
            split = run_split(cfg, cohort, r.get("fold"), r.get("seed"))
            fitted = fit_baseline(kind, spec, split, seed=r.get("seed") or 0, decision=cfg.predict.decision)
            saved = write_baseline_run(out / kind / r["name"], kind, r["name"], fitted, spec)
            runs.append({"name": r["name"], "metrics": saved["test"], "params": saved["params"]})
        results[kind] = summarize_runs(runs) | {"label": LABELS[kind], "folder": str(out / kind)}
        if report is not None:
            auc = results[kind]["metrics"].get("auc", {}).get("mean", math.nan)
            report(f"baseline {LABELS[kind]}: mean test AUC {auc:.4f} over {len(runs)} run(s)")
    return results
