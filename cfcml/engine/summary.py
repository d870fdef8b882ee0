"""Aggregation of per-fold / per-seed results into the paper's table format.

A *run* is one fold or one seed: ``{"name": "fold1", "metrics": {...}}``
with metric values as fractions (see :mod:`cfcml.engine.metrics`).  A *summary* is
``{"metrics": {name: {"mean": m, "std": s}}, "runs": runs}``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import wilcoxon

from cfcml.util.metric_names import metric_labels, metric_names

NAN = float("nan")


def summarize_runs(runs: list[dict]) -> dict:
    """Mean and standard deviation of every metric over ``runs``.

    NaN values (an undefined metric in one fold) are ignored.  ``std`` is the sample
    standard deviation (``ddof=1``) when at least two finite values exist, ``0.0`` when
    exactly one does, and NaN (like ``mean``) when none does.  Metric order follows the
    first appearance across runs.
    """
    names: list[str] = []
    for run in runs:
        names.extend(n for n in run["metrics"] if n not in names)
    metrics = {}
    for name in names:
        values = np.array([float(r["metrics"].get(name, NAN)) for r in runs])
        finite = values[~np.isnan(values)]
        if len(finite) == 0:
            mean, std = NAN, NAN
        else:
            mean = float(finite.mean())
            std = float(finite.std(ddof=1)) if len(finite) >= 2 else 0.0
        metrics[name] = {"mean": mean, "std": std}
    return {"metrics": metrics, "runs": list(runs)}


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cells(summary: dict, names: list[str]) -> list[str]:
    cells = []
    for name in names:
        stats = summary["metrics"].get(name, {"mean": NAN, "std": NAN})
        cells.append(f"{_pct(stats['mean'])} ± {_pct(stats['std'])}")
    return cells


def markdown_table(
    summary: dict,
    spec,
    title: str | None = None,
    method: str = "CFCML (ours)",
    include_paper: bool = True,
    pvalues: dict[str, float] | None = None,
    pvalue_label: str = "p (Wilcoxon)",
    extra_rows: list[tuple[str, dict]] = (),
) -> str:
    """Render ``summary`` as a Markdown table laid out like the paper's Table 2 / 3.

    Columns follow the cohort's metric set (`metric_names(spec.classes)`), in percent with
    ``mean ± std``; a row of the paper's reported means when the schema carries them
    (``paper.metrics``) and ``include_paper``; a row of Wilcoxon p-values when given; then one
    row per ``extra_rows`` entry ``(label, summary)`` (e.g. the classical baselines).
    Undefined values are ``n/a``. The paper's Derm7pt AUPRC is average precision on hard
    labels, so it sits in the ``auprc_label`` column and a footnote says so.
    """
    names = metric_names(spec.classes)
    labels = metric_labels(spec.classes)
    if title is None:
        n = len(summary.get("runs", []))
        title = f"{spec.name} results (%, mean ± std over {n} {spec.run_unit})"

    lines = [f"### {title}", "", _row(["Method"] + [labels[n] for n in names]), _row(["---"] * (len(names) + 1))]
    lines.append(_row([method] + _cells(summary, names)))
    paper = (spec.paper or {}).get("metrics") if include_paper else None
    if paper:
        lines.append(_row(["CFCML (paper)"] + [_pct(paper[n]) if n in paper else "n/a" for n in names]))
    if pvalues is not None:
        lines.append(
            _row([pvalue_label] + ["n/a" if math.isnan(pvalues.get(n, NAN)) else f"{pvalues[n]:.3f}" for n in names])
        )
    lines += [_row([label] + _cells(other, names)) for label, other in extra_rows]
    notes = []
    if paper and "auprc_label" in paper and "auprc" not in paper:
        notes.append(
            "The paper's AUPRC is average precision on hard predictions: compare it with AUPRC (labels); "
            "our AUPRC is on probabilities."
        )
    return "\n".join(lines + ([""] + [f"_{n}_" for n in notes] if notes else [])) + "\n"


def _runs_by_name(summary: dict, which: str) -> dict[str, dict]:
    runs = {}
    for run in summary["runs"]:
        if run["name"] in runs:
            raise ValueError(f"duplicate run name {run['name']!r} in summary {which}")
        runs[run["name"]] = run["metrics"]
    return runs


def wilcoxon_compare(summary_a: dict, summary_b: dict, **wilcoxon_kwargs) -> dict[str, float]:
    """Paired Wilcoxon signed-rank p-value per metric between two summaries.

    Runs are paired by ``name`` (fold or seed); both summaries must hold the same run
    names, otherwise ``ValueError`` names the unmatched ones.  For each metric present in
    both summaries, pairs with a NaN on either side are dropped and
    ``scipy.stats.wilcoxon(a, b, **wilcoxon_kwargs)`` (two-sided by default) is applied.
    The p-value is NaN when it cannot be computed: no nonzero paired difference, or scipy
    rejects the input.

    Note: with few pairs the exact test has a floor on p.  With the 3 MEN folds there
    are 2**3 = 8 equally likely sign patterns, so the smallest attainable two-sided p is
    2/8 = 0.25 — the test can never reach 0.05 on 3 folds; report it, but do not read
    "not significant" as "no difference".
    """
    runs_a = _runs_by_name(summary_a, "a")
    runs_b = _runs_by_name(summary_b, "b")
    only_a = sorted(set(runs_a) - set(runs_b))
    only_b = sorted(set(runs_b) - set(runs_a))
    if only_a or only_b:
        raise ValueError(f"unmatched runs: only in a: {only_a}, only in b: {only_b}")

    order = list(runs_a)
    names = [n for n in summary_a["metrics"] if n in summary_b["metrics"]]
    pvalues = {}
    for name in names:
        a = np.array([float(runs_a[r].get(name, NAN)) for r in order])
        b = np.array([float(runs_b[r].get(name, NAN)) for r in order])
        keep = ~(np.isnan(a) | np.isnan(b))
        a, b = a[keep], b[keep]
        if np.count_nonzero(a - b) < 1:
            pvalues[name] = NAN
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pvalues[name] = float(wilcoxon(a, b, **wilcoxon_kwargs).pvalue)
        except ValueError:
            pvalues[name] = NAN
    return pvalues
