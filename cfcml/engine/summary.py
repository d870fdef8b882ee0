"""Aggregation of per-fold / per-seed results into the paper's table format.

A *run* is one fold (MEN) or one seed (Derm7pt): ``{"name": "fold0", "metrics": {...}}``
with metric values as fractions (see :mod:`cfcml.engine.metrics`).  A *summary* is
``{"metrics": {name: {"mean": m, "std": s}}, "runs": runs}``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.stats import wilcoxon

from cfcml.engine.metrics import METRIC_LABELS, METRIC_NAMES, PAPER_RESULTS

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


def markdown_table(
    summary: dict,
    dataset: str,
    title: str | None = None,
    method: str = "CFCML (ours)",
    include_paper: bool = True,
    pvalues: dict[str, float] | None = None,
    pvalue_label: str = "p (Wilcoxon)",
) -> str:
    """Render ``summary`` as a Markdown table laid out like the paper's Table 2 / 3.

    Columns are the paper's (MEN: ACC, ACC_G1, ACC_G2inv, ACC_G2ninv, W-F1, M-F1, AUC;
    Derm7pt: SEN, SPE, ACC, G-Mean, BA, AUPRC, AUC).  Rows: ``method`` with
    ``mean ± std`` in percent (2 decimals); the paper's reported means if
    ``include_paper``; the Wilcoxon p-values (``pvalues``, e.g. from
    :func:`wilcoxon_compare`, printed as plain p with 3 decimals) if given.
    Undefined values are shown as ``n/a``.  ``title`` (default: generated from the
    dataset and number of runs) is printed as a level-3 heading above the table.
    """
    dataset = dataset.lower()
    names = METRIC_NAMES[dataset]
    labels = METRIC_LABELS[dataset]
    if title is None:
        unit = "folds" if dataset == "men" else "seeds"
        n = len(summary.get("runs", []))
        shown = {"men": "MEN", "derm7pt": "Derm7pt"}[dataset]
        title = f"{shown} results (%, mean ± std over {n} {unit})"

    lines = [f"### {title}", "", _row(["Method"] + [labels[n] for n in names]),
             _row(["---"] * (len(names) + 1))]
    cells = []
    for name in names:
        stats = summary["metrics"].get(name, {"mean": NAN, "std": NAN})
        cells.append(f"{_pct(stats['mean'])} ± {_pct(stats['std'])}")
    lines.append(_row([method] + cells))
    if include_paper:
        paper = PAPER_RESULTS[dataset]
        lines.append(_row(["CFCML (paper)"] + [_pct(paper[n]) for n in names]))
    if pvalues is not None:
        lines.append(_row([pvalue_label] + [
            "n/a" if math.isnan(pvalues.get(n, NAN)) else f"{pvalues[n]:.3f}" for n in names
        ]))
    return "\n".join(lines) + "\n"


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
