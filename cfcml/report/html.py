"""report.html: one self-contained page (inline CSS, figures as data: URIs, no script, no URL).

A Content-Security-Policy that allows nothing but inline styles and data: images makes the
browser refuse any network access even if some text slipped through.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence

from .card import RULES, bootstrap_sentence, decision_sentence, fmt, fmt_ci, metric_label, value_ci

SECTIONS = (
    ("summary", "Summary"),
    ("discrimination", "Discrimination"),
    ("calibration", "Calibration"),
    ("operating-points", "Operating points"),
    ("subgroups", "Subgroups"),
    ("explanations", "Explanations"),
    ("missing-modalities", "Missing modalities"),
    ("model-card", "Model card"),
)
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2430; }
header { background: #17324d; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; opacity: .85; }
nav { padding: 8px 32px; background: #eef2f6; border-bottom: 1px solid #d5dde6; }
nav a { margin-right: 16px; color: #17324d; text-decoration: none; }
main { padding: 8px 32px 40px; max-width: 1200px; }
section { margin-top: 28px; }
h2 { border-bottom: 2px solid #17324d; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #d5dde6; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #d5dde6; border-radius: 6px; padding: 10px 14px; min-width: 150px; }
.card .v { font-size: 22px; font-weight: 600; }
.card .ci { color: #5b6675; font-size: 12px; }
.warn { background: #fff4d6; border-left: 4px solid #e0a800; padding: 8px 12px; }
.muted { color: #5b6675; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.modelcard { border: 1px solid #d5dde6; border-radius: 6px; padding: 4px 20px; background: #fbfcfd; }
code { background: #eef2f6; padding: 0 3px; border-radius: 3px; }
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def table(header: Sequence[str], rows: Sequence[Sequence], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{esc(c)}</td>' if i >= numeric_from else f"<td>{esc(c)}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline_md(text: str) -> str:
    """Escaped text with `code` and **bold**."""
    out = esc(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def markdown_to_html(md: str) -> str:
    """The Markdown subset `cfcml.report.card` writes: #-headings, > quotes, - lists, | tables, paragraphs."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)", line):
            level = min(len(m.group(1)) + 2, 6)  # the card sits under the page's h2
            out.append(f"<h{level}>{_inline_md(m.group(2))}</h{level}>")
            i += 1
        elif line.startswith(">"):
            out.append(f'<p class="warn">{_inline_md(line.lstrip("> "))}</p>')
            i += 1
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline_md(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", lines[i].strip())[1:-1]]
                if not all(re.fullmatch(r"-+", c) for c in cells):
                    rows.append(cells)
                i += 1
            head = "".join(f"<th>{_inline_md(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|>|- |\|)", lines[i]):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline_md(' '.join(para))}</p>")
    return "\n".join(out)


def _card(label: str, m: Mapping | None) -> str:
    if not m:
        return ""
    return (
        f'<div class="card"><div>{esc(label)}</div><div class="v">{esc(fmt(m.get("value")))}</div>'
        f'<div class="ci">95 % CI {esc(fmt_ci(m.get("ci")))}</div></div>'
    )


def _summary(r: dict) -> str:
    metrics = r["metrics"]
    keys = ["auc", "sen", "spe", "balanced_acc"] if "sen" in metrics else ["auc", "acc", "balanced_acc", "macro_f1"]
    cards = [_card(metric_label(k), metrics.get(k)) for k in keys]
    cards.append(_card("ECE", {"value": r.get("ece"), "ci": r.get("ece_ci")}))
    cards.append(_card("Brier score", {"value": r.get("brier"), "ci": r.get("brier_ci")}))
    counts = r["counts"]
    classes = r["cohort"]["classes"]
    rows = [(s, *[c["classes"].get(k, 0) for k in classes], c["patients"], c["predictions"]) for s, c in counts.items()]
    runs = r.get("runs", {}).get("test", [])
    return (
        f'<div class="cards">{"".join(cards)}</div>'
        f"<p>{esc(bootstrap_sentence(r))}</p>"
        f"<p>Test predictions pooled from {len(runs)} run(s): {esc(', '.join(runs))}.</p>"
        + table(["split", *classes, "patients", "predictions"], rows)
    )


def _discrimination(r: dict, figs: Mapping[str, bytes]) -> str:
    parts = [
        table(
            ["metric", "value", "95 % CI", "resamples used"],
            [(metric_label(k), fmt(m["value"]), fmt_ci(m["ci"]), m["n_valid"]) for k, m in r["metrics"].items()],
        )
    ]
    per_run = r.get("per_run", {})
    if len(per_run.get("runs", {})) > 1:
        names = list(r["metrics"])
        rows = [(run, *[fmt(v.get(k)) for k in names]) for run, v in per_run["runs"].items()]
        rows.append(("mean ± std", *[f"{fmt(per_run['mean'].get(k))} ± {fmt(per_run['std'].get(k))}" for k in names]))
        parts.append("<h3>Per run (the paper's mean ± std)</h3>" + table(["run", *names], rows))
    classes = r["cohort"]["classes"]
    cm = r.get("confusion", [])
    if r.get("decision"):
        parts.append(f"<p>Hard labels (accuracy, recall, F1, confusion): {esc(decision_sentence(r['decision']))}.</p>")
    if cm:
        parts.append(
            "<h3>Confusion matrix (test; rows: true, columns: predicted)</h3>"
            + table(["true \\ predicted", *classes], [(c, *row) for c, row in zip(classes, cm)])
        )
    shown = [
        (k, t)
        for k, t in (
            ("roc", "ROC curves (one vs rest) with 95 % bootstrap bands"),
            ("pr", "Precision-recall curves with 95 % bootstrap bands"),
        )
        if k in figs
    ]
    parts.extend(f"<h3>{esc(t)}</h3>" + img(figs[k], t) for k, t in shown)
    return "".join(parts)


def _calibration(r: dict, figs: Mapping[str, bytes]) -> str:
    cal = r["calibration"]
    rows = [
        (
            "ECE (top-label)",
            fmt(r.get("ece")),
            fmt_ci(r.get("ece_ci")),
            fmt(r.get("ece_after")),
            fmt_ci(r.get("ece_after_ci")),
        ),
        (
            "Brier score (multi-class)",
            fmt(r.get("brier")),
            fmt_ci(r.get("brier_ci")),
            fmt(r.get("brier_after")),
            fmt_ci(r.get("brier_after_ci")),
        ),
    ]
    if r.get("ece_positive") is not None:
        rows.append((f"ECE of P({r['cohort']['positive']})", fmt(r.get("ece_positive")), "", "", ""))
    t = r.get("temperature")
    note = (
        f"Temperature scaling: T = {t:.3f}, fitted on validation logits only (NLL {fmt(cal.get('val_nll_before'))}"
        f" → {fmt(cal.get('val_nll_after'))}), applied to test."
        if t is not None
        else f"No temperature scaling: {cal.get('temperature_note', '')}"
    )
    text = (
        f"<p>{esc(cal['definition'])}</p>"
        + table(["", "before", "95 % CI", "after temperature", "95 % CI"], rows)
        + f"<p>{esc(note)}</p>"
    )
    return text + (img(figs["reliability"], "reliability diagram") if "reliability" in figs else "")


def _operating_points(r: dict) -> str:
    ops = r.get("operating_points", [])
    if not ops:
        return f'<p class="muted">{esc(r.get("operating_points_note", "No validation predictions to choose thresholds."))}</p>'
    rows = []
    for o in ops:
        if o.get("threshold") is None:
            rows.append((o["class"], RULES[o["kind"]].format(t=o["target"]), "—", "—", o.get("reason", ""), "", "", ""))
            continue
        rows.append(
            (
                o["class"],
                RULES[o["kind"]].format(t=o["target"]),
                f"{o['threshold']:.4f}",
                f"{fmt(o['val']['sen'])} / {fmt(o['val']['spe'])}",
                *[value_ci(o["test"][k]) for k in ("sen", "spe", "ppv", "npv")],
            )
        )
    return (
        "<p>Each threshold is chosen on the validation predictions (the highest sensitivity whose specificity "
        "reaches the target, or the reverse) and then applied unchanged to the test set; a case is called "
        "positive when its probability is at least the threshold.</p>"
        + table(
            [
                "class",
                "rule",
                "threshold",
                "validation sen / spe",
                "test sensitivity (95 % CI)",
                "test specificity",
                "test PPV",
                "test NPV",
            ],
            rows,
            numeric_from=2,
        )
    )


def _subgroups(r: dict, figs: Mapping[str, bytes]) -> str:
    subgroups = r.get("subgroups", [])
    if not subgroups:
        return '<p class="muted">The cohort declares no attributes.</p>'
    classes = r["cohort"]["classes"]
    parts = [
        (
            f"<p>Test metrics per group with 95 % bootstrap CIs (each group resampled on its own). Groups with "
            f"fewer than {r.get('subgroup_min_n', '?')} patients are counted but not scored.</p>"
        )
    ]
    if "subgroups" in figs:
        parts.append(img(figs["subgroups"], "subgroup AUC"))
    binary = len(classes) == 2
    for s in subgroups:
        bands = s.get("bands")
        how = f" — bands: {bands['source']} ({bands['rule']})" if bands else ""
        header = [
            "group",
            "patients",
            *classes,
            "accuracy",
            "balanced accuracy",
            "AUC",
            *(["sen", "spe"] if binary else []),
            "note",
        ]
        rows = [
            (
                g["name"],
                g["n"],
                *[g["counts"].get(c, 0) for c in classes],
                *[
                    value_ci(g.get("metrics", {}).get(k)) if g.get("metrics", {}).get(k) else "—"
                    for k in ["acc", "balanced_acc", "auc", *(["sen", "spe"] if binary else [])]
                ],
                "; ".join(g.get("notes", [])),
            )
            for g in s["groups"]
        ]
        parts.append(
            f'<h3>{esc(s["column"])} <span class="muted">({esc(s["type"])}{esc(how)})</span></h3>' + table(header, rows)
        )
    return "".join(parts)


def _explanations(r: dict, figs: Mapping[str, bytes]) -> str:
    parts = []
    emb = r.get("embedding")
    if emb and "embedding" in figs:
        parts.append(
            f"<h3>Fused features (t-SNE, perplexity {emb['perplexity']:.1f}, seed {emb['seed']}, "
            f"{emb['n']} test predictions)</h3>" + img(figs["embedding"], "t-SNE of fused features")
        )
    else:
        parts.append('<p class="muted">No fused features were provided for a 2D map.</p>')
    expl = r.get("explanations", [])
    if expl:
        parts.append(
            "<h3>Grad-CAM on the image encoders</h3><p>Where the image encoders look for the predicted "
            "class: red is the strongest evidence. A heatmap shows what drives the model, not where the "
            "disease is.</p>"
        )
        for i, e in enumerate(expl):
            key = f"explanation_{i}"
            if key in figs:
                parts.append(img(figs[key], f"Grad-CAM of {e['case_id']}"))
    else:
        parts.append('<p class="muted">No Grad-CAM explanations were provided.</p>')
    return "".join(parts)


def _missing(r: dict) -> str:
    mm = r.get("missing_modality") or {}
    if not mm:
        return '<p class="muted">Not evaluated: no test metrics with inputs removed were provided.</p>'
    names = sorted({k for v in mm.values() for k in v})
    reference = next((k for k in ("none", "nothing", "all inputs") if k in mm), None)
    header = ["removed at inference", *names]
    rows = []
    for what, vals in mm.items():
        cells = []
        for n in names:
            v = vals.get(n)
            ref = mm[reference].get(n) if reference else None
            delta = (
                f" ({v - ref:+.3f})"
                if reference
                and what != reference
                and v is not None
                and ref is not None
                and math.isfinite(v)
                and math.isfinite(ref)
                else ""
            )
            cells.append(fmt(v) + delta)
        rows.append((what, *cells))
    note = f" Differences in brackets are against “{reference}”." if reference else ""
    return (
        f"<p>Test metrics when one input is removed at inference (the everyday case of a missing series, "
        f"photo or attribute).{esc(note)}</p>" + table(header, rows)
    )


def render_html(report: dict, figures: Mapping[str, bytes], card_markdown: str) -> str:
    """The full page. figures: PNG bytes keyed roc, pr, reliability, subgroups, embedding,
    explanation_<i> (any may be absent)."""
    meta, cohort = report.get("meta", {}), report["cohort"]
    title = f"Clinical report: {meta.get('method') or 'CFCML'} on {cohort['name']}"
    sub = " · ".join(esc(f"{k} {meta[k]}") for k in ("preset", "date", "commit") if meta.get(k))
    bodies = {
        "summary": _summary(report),
        "discrimination": _discrimination(report, figures),
        "calibration": _calibration(report, figures),
        "operating-points": _operating_points(report),
        "subgroups": _subgroups(report, figures),
        "explanations": _explanations(report, figures),
        "missing-modalities": _missing(report),
        "model-card": f'<div class="modelcard">{markdown_to_html(card_markdown)}</div>',
    }
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name in SECTIONS)
    sections = "".join(f'<section id="{sid}"><h2>{esc(name)}</h2>{bodies[sid]}</section>' for sid, name in SECTIONS)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><p>{sub}</p></header><nav>{nav}</nav>"
        f'<main><p class="warn">Research software, not a medical device: not for diagnosis or treatment '
        f"decisions.</p>{sections}</main></body></html>\n"
    )
