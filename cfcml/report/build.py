"""build_report: ReportInputs -> out_dir/report.json + out_dir/report.html (both written atomically)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..engine.decision import decision_from_dict
from . import figures as fig
from . import stats
from .card import model_card_markdown
from .html import render_html
from .inputs import ReportInputs, SplitPredictions
from .subgroups import MIN_GROUP_SIZE, subgroup_analysis

SCHEMA = "cfcml-report/1"
MIN_TSNE_POINTS = 5
CURVE_DECIMALS = 5


def to_jsonable(x):
    """numpy -> lists/floats, NaN/inf -> None, tuples -> lists (the JSON stays strict)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.bool_ | bool):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the report from an artifact server run by another user
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _counts(split: SplitPredictions, classes) -> dict:
    per_case = dict(zip(split.case_ids, split.labels.tolist()))
    return {
        "classes": {c: sum(1 for y in per_case.values() if y == j) for j, c in enumerate(classes)},
        "patients": len(per_case),
        "predictions": len(split),
    }


def _per_run(split: SplitPredictions, classes, positive, decision=None) -> dict:
    """The paper's view: each run's metrics and their mean ± std (ddof=1)."""
    runs = list(dict.fromkeys(split.runs))
    by_run = {}
    for run in runs:
        rows = np.flatnonzero(np.asarray(split.runs) == run)
        by_run[run] = stats.classification_metrics(
            split.labels[rows], split.probs[rows], classes, positive, decision=decision
        )
    names = stats.metric_names(classes)
    values = {k: np.array([by_run[r][k] for r in runs], dtype=np.float64) for k in names}
    mean = {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in values.items()}
    std = {k: float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else math.nan for k, v in values.items()}
    return {"runs": by_run, "mean": mean, "std": std}


def _class_name(value, classes) -> str:
    """A class index (int-like) as its name; names pass through."""
    if isinstance(value, int | np.integer) and 0 <= int(value) < len(classes):
        return classes[int(value)]
    return str(value)


def _round(a) -> list:
    return np.round(np.asarray(a, dtype=np.float64), CURVE_DECIMALS).tolist()


def _calibration(report: dict, inputs: ReportInputs, weights, n_bins: int, level: float) -> dict:
    """ece/brier (+ after temperature) into `report`; returns the reliability tables for the figure."""
    test, val = inputs.splits["test"], inputs.splits.get("val")
    y, p = test.labels, test.probs
    report["ece"] = stats.expected_calibration_error(y, p, n_bins)
    report["ece_ci"] = list(stats.percentile_ci(stats.expected_calibration_error(y, p, n_bins, weights), level)[:2])
    report["brier"] = stats.brier_score(y, p)
    report["brier_ci"] = list(stats.percentile_ci(stats.brier_score(y, p, weights), level)[:2])
    if inputs.cohort.positive is not None:
        report["ece_positive"] = stats.positive_class_ece(y, p, inputs.cohort.positive_index, n_bins)
    cal = {
        "n_bins": n_bins,
        "definition": (
            f"ECE: expected calibration error of the top-label confidence (max probability) over "
            f"{n_bins} equal-width bins, sum_b n_b/N |accuracy_b − confidence_b|; Brier: mean over "
            "cases of sum_k (p_k − 1[y = k])², between 0 and 2."
            + (
                " ece_positive: the same gap for P(positive) against the positive rate."
                if inputs.cohort.positive is not None
                else ""
            )
        ),
        "before": stats.reliability_table(y, p, n_bins),
    }
    report.update(temperature=None, ece_after=None, brier_after=None, ece_after_ci=None, brier_after_ci=None)
    if val is None or val.logits is None or test.logits is None:
        cal["temperature_note"] = "needs validation and test logits"
    else:
        t = stats.fit_temperature(val.logits, val.labels)
        after = stats.apply_temperature(test.logits, t)
        report.update(
            temperature=t,
            ece_after=stats.expected_calibration_error(y, after, n_bins),
            ece_after_ci=list(
                stats.percentile_ci(stats.expected_calibration_error(y, after, n_bins, weights), level)[:2]
            ),
            brier_after=stats.brier_score(y, after),
            brier_after_ci=list(stats.percentile_ci(stats.brier_score(y, after, weights), level)[:2]),
        )
        cal.update(
            after=stats.reliability_table(y, after, n_bins),
            val_nll_before=stats.nll(val.logits, val.labels),
            val_nll_after=stats.nll(val.logits, val.labels, t),
            temperature_note="fitted on validation logits only (minimum NLL), applied to test logits",
        )
    report["calibration"] = cal
    return cal


@dataclass(frozen=True)
class _Test:
    """What every part of the report reads: the inputs, the test split's labels and
    probabilities, their bootstrap weights and the hard-label rule, and the options."""

    inputs: ReportInputs
    y: np.ndarray
    p: np.ndarray
    pred: np.ndarray
    weights: np.ndarray
    decision: object
    n_bootstrap: int
    seed: int
    level: float
    stratified: bool
    min_group: int

    @property
    def classes(self) -> list[str]:
        return list(self.inputs.cohort.classes)

    @property
    def positive(self) -> str | None:
        return self.inputs.cohort.positive


def compute_report(
    inputs: ReportInputs,
    n_bootstrap: int = stats.N_BOOTSTRAP,
    seed: int = 0,
    level: float = stats.CI_LEVEL,
    n_bins: int = stats.N_BINS,
    stratified: bool = True,
    min_group: int = MIN_GROUP_SIZE,
    tsne: bool = True,
) -> tuple[dict, dict[str, bytes]]:
    """(report dict, figures as PNG bytes) without writing anything."""
    inputs.validate()
    test = inputs.splits["test"]
    y, p = test.labels, test.probs
    decision = decision_from_dict(inputs.meta.get("decision"))  # predict.decision; absent: argmax
    t = _Test(
        inputs=inputs,
        y=y,
        p=p,
        pred=decision.labels(p),
        weights=stats.bootstrap_weights(test.case_ids, y, n_bootstrap, seed, stratified),
        decision=decision,
        n_bootstrap=n_bootstrap,
        seed=seed,
        level=level,
        stratified=stratified,
        min_group=min_group,
    )
    report = _summary(t)
    figures: dict[str, bytes] = {}
    _add_curves(t, report, figures)
    cal = _calibration(report, inputs, t.weights, n_bins, level)
    figures["reliability"] = fig.reliability_figure(
        cal["before"], cal.get("after"), ("uncalibrated", "after temperature scaling")
    )
    _add_operating_points(t, report)
    _add_subgroups(t, report, figures)
    _add_embedding(t, report, figures, tsne)
    _add_explanations(t, report, figures)
    report["missing_modality"] = dict(inputs.missing_modality or {})
    return to_jsonable(report), figures


def _summary(t: _Test) -> dict:
    """The report's head: cohort, counts, the bootstrap, test metrics with CIs, per-run metrics."""
    inputs, classes, test = t.inputs, t.classes, t.inputs.splits["test"]
    metrics = stats.metrics_with_ci(t.y, t.p, classes, t.positive, t.weights, t.level, decision=t.decision)
    return {
        "schema": SCHEMA,
        "cohort": {
            "name": inputs.cohort.name,
            "classes": classes,
            "positive": t.positive,
            "attributes": list(inputs.cohort.attributes),
        },
        "meta": dict(inputs.meta),
        "counts": {name: _counts(s, classes) for name, s in inputs.splits.items()},
        "runs": {name: list(dict.fromkeys(s.runs)) for name, s in inputs.splits.items()},
        "bootstrap": {
            "n": t.n_bootstrap,
            "seed": t.seed,
            "level": t.level,
            "method": "percentile",
            "unit": "case",
            "stratified": t.stratified,
            "n_cases": len(set(test.case_ids)),
        },
        "n_bootstrap": t.n_bootstrap,
        "headline": "auc",
        "auc": metrics["auc"]["value"],
        "auc_ci": metrics["auc"]["ci"],
        "metrics": metrics,
        "per_run": _per_run(test, classes, t.positive, t.decision),
        "decision": t.decision.to_dict(),
        "confusion": stats.confusion(t.y, t.pred, len(classes))[0].astype(int).tolist(),
    }


def _add_curves(t: _Test, report: dict, figures: dict[str, bytes]) -> None:
    """ROC and PR curves with bootstrap bands: the positive class, or each class (one-vs-rest)."""
    classes = t.classes
    curve_classes = [t.inputs.cohort.positive_index] if len(classes) == 2 else range(len(classes))
    roc, pr = {}, {}
    for j in curve_classes:
        roc[classes[j]] = stats.roc_curve_band(t.y == j, t.p[:, j], t.weights, t.level)
        pr[classes[j]] = stats.pr_curve_band(t.y == j, t.p[:, j], t.weights, t.level)
    figures["roc"], figures["pr"] = fig.roc_figure(roc), fig.pr_figure(pr)
    roc_keys, pr_keys = (
        ("fpr", "tpr", "grid", "tpr_lo", "tpr_hi"),
        ("recall", "precision", "grid", "precision_lo", "precision_hi"),
    )
    report["curves"] = {
        "roc": {
            c: {"auc": r["auc"], "auc_ci": r["auc_ci"], **{k: _round(r[k]) for k in roc_keys}} for c, r in roc.items()
        },
        "pr": {c: {"ap": r["ap"], "ap_ci": r["ap_ci"], **{k: _round(r[k]) for k in pr_keys}} for c, r in pr.items()},
    }


def _add_operating_points(t: _Test, report: dict) -> None:
    val = t.inputs.splits.get("val")
    if val is None:
        report["operating_points"] = []
        report["operating_points_note"] = "no validation predictions to choose thresholds on"
        return
    report["operating_points"] = stats.operating_points(
        val.labels,
        val.probs,
        t.y,
        t.p,
        classes=t.classes,
        positive=t.positive,
        test_boot_weights=t.weights,
        level=t.level,
    )


def _add_subgroups(t: _Test, report: dict, figures: dict[str, bytes]) -> None:
    report["subgroup_min_n"] = t.min_group
    report["subgroups"] = subgroup_analysis(
        t.inputs.splits["test"],
        t.inputs.attributes,
        t.inputs.cohort.attributes,
        classes=t.classes,
        positive=t.positive,
        val=t.inputs.splits.get("val"),
        n_boot=t.n_bootstrap,
        seed=t.seed,
        level=t.level,
        min_n=t.min_group,
        decision=t.decision,
    )
    if report["subgroups"]:
        figures["subgroups"] = fig.subgroup_figure(report["subgroups"])


def _add_embedding(t: _Test, report: dict, figures: dict[str, bytes], tsne: bool) -> None:
    test = t.inputs.splits["test"]
    report["embedding"] = None
    if tsne and test.features is not None and len(test) >= MIN_TSNE_POINTS:
        coords, perplexity = fig.tsne_embedding(test.features, t.seed)
        figures["embedding"] = fig.embedding_figure(coords, t.y, t.classes, t.pred == t.y)
        report["embedding"] = {
            "method": "t-SNE (scikit-learn)",
            "perplexity": perplexity,
            "seed": t.seed,
            "n": len(test),
            "features_dim": int(test.features.shape[1]),
        }


def _add_explanations(t: _Test, report: dict, figures: dict[str, bytes]) -> None:
    report["explanations"] = []
    for i, e in enumerate(t.inputs.explanations):
        e = replace(e, true=_class_name(e.true, t.classes), pred=_class_name(e.pred, t.classes))
        figures[f"explanation_{i}"] = fig.explanation_figure(e)
        report["explanations"].append(
            {
                "case_id": e.case_id,
                "true": e.true,
                "pred": e.pred,
                "correct": bool(e.correct),
                "kind": e.kind,
                "inputs": list(e.images),
            }
        )


def build_report(inputs: ReportInputs, out_dir: str | os.PathLike, **options) -> dict:
    """Compute the report and write out_dir/report.json, out_dir/report.html and
    out_dir/model_card.md (the card also sits inside the HTML); returns the JSON dict. options: n_bootstrap (2000), seed (0), level (0.95), n_bins (15), stratified
    (True), min_group (10), tsne (True)."""
    report, figures = compute_report(inputs, **options)
    card = model_card_markdown(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    write_atomic(out / "model_card.md", card)
    write_atomic(out / "report.html", render_html(report, figures, card))
    return report
