"""`cfcml cv --methods`: the protocol once per method, then one table like the paper's Table 2/3.

Each method trains with the same preset, overrides, splits, class-balanced sampler, schedule
and validation-only selection (`run_protocol` with `model.method=X`) into `<out>/<method>/`;
finished runs are reused, so an interrupted comparison continues. The table has one row per
method (mean ± std over folds / seeds, in %) and, in every cell, the two-sided Wilcoxon
signed-rank p-value against CFCML, paired by fold / seed, starred when p < 0.05 as in the
paper. CFCML, the reference, is always run and is the last row (the paper's "Proposed").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from ..config import ConfigError, build_config, cohort_spec
from ..models.methods import method_entry, method_names
from ..util.metric_names import metric_labels, metric_names
from .baselines import LABELS
from .evidence import evidence_markdown
from .protocol import run_protocol
from .summary import wilcoxon_compare

REFERENCE = "cfcml"
ALPHA = 0.05


def _display(method: str) -> str:
    """A method's or a classical baseline's name in the table."""
    return method_entry(method).display if method in method_names() else LABELS.get(method, method)


def parse_methods(text: str) -> list[str]:
    """'etmc, ccml' -> ['etmc', 'ccml', 'cfcml'] (CFCML added last: the reference); 'all' -> every method."""
    known = method_names()
    names = list(known) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown method(s) {unknown or [text]}; choose from {', '.join(known)} or 'all'")
    ordered = list(dict.fromkeys(n for n in names if n != REFERENCE))
    return [*ordered, REFERENCE]


def min_attainable_p(n: int) -> float:
    """Smallest two-sided p of the exact Wilcoxon signed-rank test on n pairs: 2 / 2^n."""
    return 2.0 / 2**n if n else math.nan


def compare_summaries(summaries: dict[str, dict], spec) -> dict:
    """{method: protocol summary} (with a "cfcml" entry) -> the comparison: per method its
    metrics (mean, std), Wilcoxon p against CFCML per metric and whether p < 0.05."""
    reference = summaries[REFERENCE]
    names = metric_names(spec.classes)
    n_runs = len(reference["runs"])
    methods = {}
    for method, summary in summaries.items():
        p = {} if method == REFERENCE else wilcoxon_compare(summary, reference)
        methods[method] = {
            "metrics": {n: summary["metrics"].get(n, {"mean": math.nan, "std": math.nan}) for n in names},
            "wilcoxon_p": {n: p.get(n, math.nan) for n in names} if method != REFERENCE else None,
            "significant": {n: bool(p.get(n, math.nan) < ALPHA) for n in names} if method != REFERENCE else None,
            "runs": [{"name": r["name"], "metrics": r["metrics"]} for r in summary["runs"]],
        }
    return {
        "dataset": spec.name,
        "classes": list(spec.classes),
        "reference": REFERENCE,
        "metric_names": names,
        "runs": n_runs,
        "unit": spec.run_unit,
        "min_attainable_p": min_attainable_p(n_runs),
        "alpha": ALPHA,
        "methods": methods,
    }


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def comparison_markdown(comparison: dict, title: str) -> str:
    """The paper's Table 2/3 layout: one row per method, CFCML last."""
    names = comparison["metric_names"]
    labels = metric_labels(comparison["classes"])
    lines = [
        f"### {title}",
        "",
        "| Method | " + " | ".join(labels.get(n, n) for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for method, row in comparison["methods"].items():
        cells = []
        for n in names:
            stats = row["metrics"][n]
            cell = f"{_pct(stats['mean'])} ± {_pct(stats['std'])}"
            if row["wilcoxon_p"] is not None:
                p = row["wilcoxon_p"][n]
                cell += ("*" if row["significant"][n] else "") + (" (p n/a)" if math.isnan(p) else f" (p={p:.3f})")
            cells.append(cell)
        lines.append(f"| {_display(method)} | " + " | ".join(cells) + " |")
    n, floor, unit = comparison["runs"], comparison["min_attainable_p"], comparison["unit"]
    lines += [
        "",
        f"Mean ± std over {n} {unit}, in %; model selection on validation only. p: two-sided Wilcoxon "
        f"signed-rank test against CFCML, paired by {unit[:-1]}; * p < {ALPHA}. With {n} pairs the exact test "
        f"cannot go below p = {floor:.3f}"
        + (
            ", so no difference can be significant at 0.05: read the p-values, not the stars."
            if floor >= ALPHA
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def run_comparison(
    preset: str,
    overrides: list[str],
    methods: list[str],
    data_root: str | Path,
    out_dir: str | Path,
    epochs: int | None = None,
    jobs: int | None = None,
    report: Callable[[str], None] | None = None,
    baselines: bool = False,
    progress: bool = False,
) -> dict:
    """Run the protocol for every method (CFCML included) into out_dir/<method>/ and write
    out_dir/comparison.md and comparison.json; -> the comparison (with "markdown").
    `baselines`: the classical attribute models too (fitted once, with CFCML's protocol, into
    out_dir/cfcml/baselines/): rows before the methods, and CFCML's paired evidence on patients."""
    out, report = Path(out_dir), report or (lambda message: None)
    configs = {}
    for method in methods:  # every config is checked before anything trains
        epochs_set = [f"train.epochs={epochs}"] if epochs is not None else []
        configs[method] = build_config(preset, [*overrides, f"model.method={method}", *epochs_set])
    summaries = {}
    for i, (method, cfg) in enumerate(configs.items(), 1):
        report(f"[{i}/{len(configs)}] {method}")
        extra = {"baselines": True} if baselines and method == REFERENCE else {}
        summaries[method] = run_protocol(
            cfg, data_root, out / method, jobs=jobs, report=report, progress=progress, **extra
        )
    cfg = configs[REFERENCE]
    classical = summaries[REFERENCE].get("baselines", {})
    comparison = compare_summaries({**classical, **summaries}, cohort_spec(cfg))
    comparison |= {"preset": cfg.name, "overrides": list(overrides), "out": str(out)}
    comparison["markdown"] = comparison_markdown(
        comparison,
        f"{cfg.name}: comparison methods on CFCML's encoders (test, %, mean ± std over {comparison['runs']} "
        f"{comparison['unit']})",
    )
    if "paired" in summaries[REFERENCE]:
        comparison["paired"] = summaries[REFERENCE]["paired"]
        comparison["markdown"] += "\n" + evidence_markdown(comparison["paired"], comparison["unit"])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("comparison.json", json.dumps(comparison, indent=2, default=float)),
        ("comparison.md", comparison["markdown"]),
    ):
        (out / f"{name}.tmp").write_text(text)
        (out / f"{name}.tmp").replace(out / name)
    return comparison
