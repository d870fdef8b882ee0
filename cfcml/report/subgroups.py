"""Metrics by subgroup: every value of a categorical attribute, bands of each numeric one.

Bands: `age` in fixed clinical bands (< 40, 40–64, >= 65); any other numeric attribute in
tertiles computed on the validation cases (so the test set does not choose its own cut
points; on test only when validation holds no value). A band holds lower edge <= x < upper.
A group with fewer than `min_n` cases is counted but not scored; a metric that a missing
class makes undefined (AUC without both outcomes, a sensitivity without positives) is left
out with the reason.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .inputs import SplitPredictions
from .stats import CI_LEVEL, N_BOOTSTRAP, bootstrap_weights, classification_metrics, with_ci

AGE_BAND_EDGES = (40.0, 65.0)
MIN_GROUP_SIZE = 10
MISSING = "missing"


def category_name(value: Any) -> str | None:
    """A categorical cell as a group name (1.0 -> "1"); None for an empty / NaN cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def numeric_value(value: Any) -> float:
    """A numeric cell as a float; NaN when empty or not a number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def band_edges(column: str, val_values: Sequence[float], test_values: Sequence[float]) -> tuple[list[float], str]:
    """(edges, source): the inner cut points of a numeric attribute's bands."""
    if column.lower() == "age":
        return list(AGE_BAND_EDGES), "fixed clinical bands"
    for values, source in ((val_values, "validation tertiles"), (test_values, "test tertiles (no validation values)")):
        finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
        if len(finite):
            return sorted(set(np.quantile(finite, [1 / 3, 2 / 3]).tolist())), source
    return [], "no values"


def band_names(edges: Sequence[float], integer: bool = False) -> list[str]:
    """Names of the len(edges) + 1 bands: "< a", "a–b", "≥ b"; `integer` (ages in years):
    "< 40", "40–64", "≥ 65"."""
    if integer:
        inner = [f"{lo:.0f}–{hi - 1:.0f}" for lo, hi in itertools.pairwise(edges)]
        return [f"< {edges[0]:.0f}", *inner, f"≥ {edges[-1]:.0f}"]
    if not edges:
        return ["all"]
    inner = [f"{_fmt(lo)}–{_fmt(hi)}" for lo, hi in itertools.pairwise(edges)]
    return [f"< {_fmt(edges[0])}", *inner, f"≥ {_fmt(edges[-1])}"]


def _groups_of(
    split: SplitPredictions, attributes: Mapping[str, Mapping[str, Any]], spec: dict, val_case_ids: Sequence[str]
) -> tuple[list[str | None], list[str], dict]:
    """(group name per row, ordered group names, description of the bands)."""
    column = spec["column"]

    def cell(case_id):
        return attributes.get(case_id, {}).get(column)

    if spec["type"] == "categorical":
        names = [category_name(cell(c)) for c in split.case_ids]
        distinct = {n for n in names if n is not None}
        order = sorted(distinct, key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0.0, s))
        return names, order, {}
    values = [numeric_value(cell(c)) for c in split.case_ids]
    edges, source = band_edges(column, [numeric_value(cell(c)) for c in val_case_ids], values)
    labels = band_names(edges, integer=source == "fixed clinical bands")
    names = [None if math.isnan(v) else labels[int(np.searchsorted(edges, v, side="right"))] for v in values]
    return names, labels, {"edges": edges, "source": source, "rule": "lower edge <= value < upper edge"}


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _score_group(
    split: SplitPredictions,
    rows: np.ndarray,
    classes: Sequence[str],
    positive: str | None,
    min_n: int,
    n_boot: int,
    seed: int,
    level: float,
    decision=None,
) -> dict:
    ids = [split.case_ids[i] for i in rows]
    labels, probs = split.labels[rows], split.probs[rows]
    case_label = dict(zip(ids, labels.tolist()))
    counts = {c: sum(1 for y in case_label.values() if y == j) for j, c in enumerate(classes)}
    group = {"n": len(case_label), "n_rows": len(rows), "counts": counts, "notes": []}
    if len(case_label) < min_n:
        group.update(reportable=False, metrics={})
        group["notes"].append(f"too small to report: n={len(case_label)} < {min_n}")
        return group
    absent = [c for c, n in counts.items() if n == 0]
    wanted = ["acc", "balanced_acc", "auc"] + (["sen", "spe"] if len(classes) == 2 else [])
    withheld = {}
    if absent:
        withheld["auc"] = f"no AUC: no {', '.join(absent)} case"
        if len(classes) == 2:
            pos_absent = positive in absent
            withheld["sen" if pos_absent else "spe"] = f"no {'sen' if pos_absent else 'spe'}: no {absent[0]} case"
            withheld["balanced_acc"] = f"no balanced accuracy: no {absent[0]} case"
    wanted = [m for m in wanted if m not in withheld]
    point = classification_metrics(labels, probs, classes, positive, decision=decision)
    samples = classification_metrics(
        labels, probs, classes, positive, bootstrap_weights(ids, labels, n_boot=n_boot, seed=seed), decision=decision
    )
    group["metrics"] = {m: with_ci(point[m], samples[m], level) for m in wanted}
    group["reportable"] = True
    group["notes"].extend(withheld.values())
    return group


def subgroup_analysis(
    test: SplitPredictions,
    attributes: Mapping[str, Mapping[str, Any]],
    specs: Sequence[dict],
    classes: Sequence[str],
    positive: str | None,
    val: SplitPredictions | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = CI_LEVEL,
    min_n: int = MIN_GROUP_SIZE,
    decision=None,
) -> list[dict]:
    """Per attribute: {"column", "type", "bands" (numeric only: edges, source, rule),
    "groups": [{"name", "n" (cases), "n_rows", "counts" {class: cases}, "reportable",
    "notes", "metrics" {acc, balanced_acc, auc[, sen, spe]: {"value", "ci", "n_valid"}}}]}; cases
    without a value form a "missing" group. Each group is bootstrapped on its own cases. Hard
    labels follow `decision` (a `cfcml.engine.decision.Decision`; None: argmax)."""
    val_ids = list(dict.fromkeys(val.case_ids)) if val is not None else []
    out = []
    for a, spec in enumerate(specs):
        names, order, bands = _groups_of(test, attributes, spec, val_ids)
        if any(n is None for n in names):
            order = [*order, MISSING]
            names = [MISSING if n is None else n for n in names]
        groups = []
        for g, name in enumerate(order):
            rows = np.flatnonzero(np.asarray(names, dtype=object) == name)
            if len(rows) == 0:
                groups.append(
                    {
                        "name": name,
                        "n": 0,
                        "n_rows": 0,
                        "counts": {c: 0 for c in classes},
                        "reportable": False,
                        "notes": ["no test case"],
                        "metrics": {},
                    }
                )
                continue
            scored = _score_group(
                split=test,
                rows=rows,
                classes=classes,
                positive=positive,
                min_n=min_n,
                n_boot=n_boot,
                seed=seed + 1000 * a + g,
                level=level,
                decision=decision,
            )
            groups.append({"name": name, **scored})
        entry = {"column": spec["column"], "type": spec["type"], "groups": groups}
        if bands:
            entry["bands"] = bands
        out.append(entry)
    return out
