"""The model card as Markdown, from the report dict (the content of report.json).

A pure function of the report, so the registry can set it as a model version's description
from a stored report.json without recomputing anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SMALL_TEST_SET = 100  # cases; below this the card warns about wide intervals
REGISTRY_DESCRIPTION_MAX = 5000  # MLflow's SQL stores keep a model version description in VARCHAR(5000)

METRIC_LABELS = {
    "sen": "Sensitivity",
    "spe": "Specificity",
    "acc": "Accuracy",
    "g_mean": "G-mean",
    "balanced_acc": "Balanced accuracy",
    "auprc": "AUPRC (average precision)",
    "auprc_label": "AUPRC on hard labels",
    "auc": "ROC AUC",
    "weighted_f1": "Weighted F1",
    "macro_f1": "Macro F1",
    "ppv": "PPV",
    "npv": "NPV",
}
RULES = {"sen_at_spe": "sensitivity at specificity ≥ {t:.2f}", "spe_at_sen": "specificity at sensitivity ≥ {t:.2f}"}


def metric_label(name: str) -> str:
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    if name.startswith("acc_"):
        return f"Accuracy (recall) {name[4:]}"
    return name


def fmt(value) -> str:
    """A fraction with 3 decimals; "n/a" when undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}"


def fmt_ci(ci: Sequence | None) -> str:
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return "n/a"
    return f"{ci[0]:.3f} – {ci[1]:.3f}"


def value_ci(m: dict | None) -> str:
    """ "0.912 (0.871 – 0.950)" from {"value", "ci"}."""
    if not m:
        return "n/a"
    return f"{fmt(m.get('value'))} ({fmt_ci(m.get('ci'))})"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " ")

    return [
        "| " + " | ".join(map(cell, header)) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(map(cell, r)) + " |" for r in rows],
        "",
    ]


def decision_sentence(decision: dict | None) -> str:
    """The hard-label rule (`predict.decision`, as `Decision.to_dict` records it) in words."""
    decision = decision or {}
    if decision.get("rule", "balanced") == "balanced":
        return "`balanced`: argmax of the probabilities (equal class priors, as class-balanced training assumes)"
    counts, priors = decision.get("train_counts") or [], decision.get("priors") or []
    shown = ", ".join(f"{p:.3f}" for p in priors)
    return (
        f"`prior`: argmax of the logits plus the log class priors of the training split (logit adjustment, "
        f"Menon et al. 2021); priors {shown} from {sum(counts)} training cases"
    )


def bootstrap_sentence(report: dict) -> str:
    b = report.get("bootstrap", {})
    strata = "stratified by class" if b.get("stratified") else "not stratified"
    return (
        f"95 % confidence intervals: percentile bootstrap over the {b.get('n_cases', '?')} test patients "
        f"(cases, not runs), {b.get('n', '?')} resamples ({strata}), seed {b.get('seed', '?')}."
    )


def limitations(report: dict) -> list[str]:
    """The known limitations, most specific first."""
    meta, cohort = report.get("meta", {}), report.get("cohort", {})
    columns = [a.get("column") for a in cohort.get("attributes", [])]
    out = []
    if meta.get("synthetic"):
        out.append("Evaluated on **synthetic** data: these numbers say nothing about performance on patients.")
    if "management" in columns:
        out.append(
            "The `management` attribute leaks the label: in Derm7pt every melanoma has "
            "`management = excision`, a decision taken after the diagnosis. The paper keeps the "
            "attribute; compare with the tabular-only baseline to see how much it alone carries."
        )
    baselines = meta.get("baselines") or {}
    if baselines:
        parts = [f"{name}: AUC {fmt(m.get('auc'))}" for name, m in baselines.items()]
        out.append(
            "Single-modality baselines on the same split — " + "; ".join(parts) + f" (this model: AUC "
            f"{fmt(report.get('auc'))}). A margin within the confidence interval is no evidence that "
            "fusion helps."
        )
    else:
        out.append(
            "No tabular-only baseline is recorded with this report: train one "
            "(`--set model.use_images=false`) before crediting the images with the result."
        )
    if meta.get("images_add"):
        out.append(f"Do the images add to the table? {meta['images_add']}")
    n = report.get("bootstrap", {}).get("n_cases")
    if isinstance(n, int) and n < SMALL_TEST_SET:
        out.append(f"The test set is small ({n} patients): intervals are wide and subgroup results are exploratory.")
    out.append(
        "The intervals cover the sampling of test patients only: not the variation between training "
        "runs, scanners, sites or populations other than the cohort's."
    )
    small = [
        f"{s['column']} = {g['name']}"
        for s in report.get("subgroups", [])
        for g in s["groups"]
        if not g.get("reportable")
    ]
    if small:
        out.append("Subgroups too small to score: " + ", ".join(small) + ".")
    out.extend(meta.get("limitations", []))
    out.append("A research tool, not a medical device: not cleared for diagnosis or treatment decisions.")
    return out


def model_card_markdown(report: dict, max_chars: int | None = None) -> str:
    """The model card (Markdown) of a report dict as written to report.json.

    max_chars: a limit for where the card is stored, e.g. REGISTRY_DESCRIPTION_MAX for an
    MLflow model version's description (a 5000-character column in SQL stores). Over the
    limit the card takes a compact form (fewer columns, scored subgroups by AUC only), then
    leaves out whole sections, least essential first, naming them and pointing to report.html.
    """
    sections = _sections(report, compact=False)
    card = _join(sections)
    if max_chars is None or len(card) <= max_chars:
        return card
    sections = _sections(report, compact=True)
    omitted: list[str] = []
    for key in DROP_ORDER:
        card = _join(sections, omitted)
        if len(card) <= max_chars:
            return card
        if key in sections:
            omitted.append(sections.pop(key)[0].removeprefix("## "))
    card = _join(sections, omitted)
    if len(card) > max_chars:
        raise ValueError(f"the essential model card needs {len(card)} characters, more than {max_chars}")
    return card


DROP_ORDER = ("subgroups", "missing", "operating_points", "model", "cohort", "calibration")


def _join(sections: dict[str, list[str]], omitted: Sequence[str] = ()) -> str:
    lines = [line for part in sections.values() for line in part]
    if omitted:
        lines += [f"Left out here for length, see report.html: {', '.join(omitted)}.", ""]
    return "\n".join(lines)


def _sections(report: dict, compact: bool) -> dict[str, list[str]]:
    """The card's sections in reading order, each a list of lines (the first is the heading;
    "intro" has the title instead); a section with nothing to show is left out."""
    parts = {
        "intro": _intro,
        "model": _model,
        "cohort": _cohort,
        "performance": _performance,
        "calibration": _calibration,
        "operating_points": _operating_points,
        "subgroups": _subgroups,
        "missing": _missing,
        "limitations": _limitations,
    }
    out = {name: part(report, compact) for name, part in parts.items()}
    return {name: lines for name, lines in out.items() if lines}


def _names(report: dict) -> tuple[dict, dict, list[str], str]:
    meta, cohort = report.get("meta", {}), report.get("cohort", {})
    return meta, cohort, cohort.get("classes", []), meta.get("method") or "CFCML"


def _intro(report: dict, compact: bool) -> list[str]:
    meta, cohort, classes, method = _names(report)
    return [
        f"# Model card: {method} on {cohort.get('name', '?')}",
        "",
        "> Research software, **not a medical device**. Not for diagnosis or treatment decisions.",
        "",
        "## Intended use",
        "",
        meta.get("intended_use")
        or (
            f"Research on classifying {', '.join(classes)} from images and tabular attributes in the "
            f"{cohort.get('name', '?')} cohort: retrospective evaluation and method comparison. Not "
            "for clinical decisions, nor for patients outside the population this cohort represents."
        ),
        "",
    ]


def _model(report: dict, compact: bool) -> list[str]:
    meta, _, _, method = _names(report)
    facts = [
        ("method", method),
        ("preset", meta.get("preset")),
        ("selection rule", meta.get("selection_rule")),
        ("config digest", meta.get("config_digest")),
        ("code commit", meta.get("commit")),
        ("report date", meta.get("date")),
    ]
    return [
        "## Model",
        "",
        *_table(
            ["field", "value"], [(k, f"`{v}`" if "digest" in k or k == "code commit" else v) for k, v in facts if v]
        ),
    ]


def _cohort(report: dict, compact: bool) -> list[str]:
    meta, cohort, classes, _ = _names(report)
    positive = f" (positive: {cohort['positive']})" if cohort.get("positive") else ""
    lines = [
        "## Cohort and split",
        "",
        f"Cohort **{cohort.get('name', '?')}**, classes {', '.join(classes)}{positive}.",
    ]
    if meta.get("data_digest"):
        lines += [f"Data digest `{meta['data_digest']}`."]
    if meta.get("split_description"):
        lines += [str(meta["split_description"])]
    lines += [""]
    counts = report.get("counts", {})
    if counts:
        lines += _table(
            ["split", *classes, "patients", "predictions"],
            [
                (s, *[c["classes"].get(k, 0) for k in classes], c["patients"], c["predictions"])
                for s, c in counts.items()
            ],
        )
    return lines


def _performance(report: dict, compact: bool) -> list[str]:
    decision = report.get("decision") or report.get("meta", {}).get("decision")  # kept in the compact card too
    rule = [f"Hard labels (accuracy, recall, F1): {decision_sentence(decision)}.", ""] if decision else []
    return [
        "## Performance on the test set",
        "",
        bootstrap_sentence(report),
        "",
        *rule,
        *_table(
            ["metric", "value", "95 % CI"],
            [(metric_label(k), fmt(m["value"]), fmt_ci(m["ci"])) for k, m in report.get("metrics", {}).items()],
        ),
    ]


def _calibration(report: dict, compact: bool) -> list[str]:
    n_bins = report.get("calibration", {}).get("n_bins", "?")
    lines = [
        "## Calibration",
        "",
        (
            f"- ECE (top-label confidence, {n_bins} equal-width bins): {fmt(report.get('ece'))} "
            f"({fmt_ci(report.get('ece_ci'))})"
        ),
        f"- Brier score (multi-class): {fmt(report.get('brier'))} ({fmt_ci(report.get('brier_ci'))})",
    ]
    if report.get("temperature") is not None:
        lines += [
            (
                f"- Temperature scaling fitted on validation: T = {report['temperature']:.3f}; on test ECE "
                f"{fmt(report.get('ece_after'))}, Brier {fmt(report.get('brier_after'))}"
            )
        ]
    else:
        lines += [f"- No temperature scaling: {report.get('calibration', {}).get('temperature_note', 'no logits')}"]
    return [*lines, ""]


def _operating_points(report: dict, compact: bool) -> list[str]:
    ops = [o for o in report.get("operating_points", []) if o.get("threshold") is not None]
    if not ops:
        return []
    rates = ("sen", "spe") if compact else ("sen", "spe", "ppv", "npv")
    return [
        "## Operating points",
        "",
        "Thresholds chosen on validation, reported on test.",
        "",
        *_table(
            ["class", "rule", "threshold", *[METRIC_LABELS[k] for k in rates]],
            [
                (
                    o["class"],
                    RULES[o["kind"]].format(t=o["target"]),
                    f"{o['threshold']:.4f}",
                    *[value_ci(o["test"][k]) for k in rates],
                )
                for o in ops
            ],
        ),
    ]


def _subgroups(report: dict, compact: bool) -> list[str]:
    groups = [(s["column"], g) for s in report.get("subgroups", []) for g in s["groups"]]
    if not groups:
        return []
    if compact:
        table = _table(
            ["attribute", "group", "patients", "AUC"],
            [(col, g["name"], g["n"], value_ci(g["metrics"].get("auc"))) for col, g in groups if g.get("reportable")],
        )
    else:
        table = _table(
            ["attribute", "group", "patients", "accuracy", "balanced accuracy", "AUC", "note"],
            [
                (
                    col,
                    g["name"],
                    g["n"],
                    value_ci(g.get("metrics", {}).get("acc")),
                    value_ci(g.get("metrics", {}).get("balanced_acc")),
                    value_ci(g.get("metrics", {}).get("auc")),
                    "; ".join(g.get("notes", [])),
                )
                for col, g in groups
            ],
        )
    return ["## Subgroups (test)", "", *table]


def _missing(report: dict, compact: bool) -> list[str]:
    mm = report.get("missing_modality") or {}
    lines = ["## Missing inputs", ""]
    if not mm:
        return [*lines, "Not evaluated for this model.", ""]
    names = sorted({k for v in mm.values() for k in v})
    if compact and "auc" in names:
        names = ["auc"]
    return lines + _table(
        ["removed at inference", *names], [(w, *[fmt(v.get(n)) for n in names]) for w, v in mm.items()]
    )


def _limitations(report: dict, compact: bool) -> list[str]:
    lines = ["## Known limitations", "", *[f"- {x}" for x in limitations(report)], ""]
    if compact:
        lines += ["Full evidence (curves, calibration, all subgroup metrics, explanations): report.html.", ""]
    return lines
