"""Paired evidence on patients for a `cfcml cv` folder: does each model beat the others on the
same test patients, and do the images add to the table?

Each model's test predictions are pooled over its runs by patient: a cross-validated cohort
tests each patient once (in the fold that held it out); a fixed split tests each patient once
per seed, and the patient's probabilities are averaged over the seeds (the seed ensemble).
Two models are paired on the same patients (`paired.compare_auc`: paired bootstrap CI of the
AUC difference; DeLong's p for two classes). The answer to "do the images add to the table?"
compares the fused model with the attributes-only model (classical baselines, an
attributes-only CFCML given with `--compare`) whose pooled test AUC is highest, so the claim
never rests on a weak baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .paired import compare_auc
from .run import PREDICTIONS
from .summary import wilcoxon_compare

# How a patient's pooled prediction is formed, by the protocol's run unit (`DatasetSpec.run_unit`).
POOLING = {
    "folds": "K-fold cohort: each patient's prediction from the fold that tested it",
    "seeds": "a fixed split: each patient's mean probability over the seeds",
}
KIND_WORDS = {"fused": "", "attributes": " (attributes only)", "images": " (images only)"}


@dataclass
class Model:
    """One model's runs: a name for the table, its inputs ("fused" | "attributes" | "images" |
    "other"), its run folders (each with predictions.npz) and its protocol summary."""

    name: str
    kind: str
    folders: list[Path]
    summary: dict = field(default_factory=dict)


@dataclass
class Pooled:
    case_ids: np.ndarray  # sorted, one per patient
    labels: np.ndarray
    probs: np.ndarray  # the mean over the runs that tested the patient


def model_kind(config: dict | None) -> str:
    """ "fused" | "attributes" | "images" from a config dict's model.use_images/use_tabular."""
    model = (config or {}).get("model")
    if not model:
        return "other"
    images, tabular = model.get("use_images", True), model.get("use_tabular", True)
    return "fused" if images and tabular else ("attributes" if tabular else "images")


def model_name(config: dict | None, default: str = "CFCML") -> str:
    method = ((config or {}).get("model") or {}).get("method", "cfcml")
    base = default if method == "cfcml" else method.upper()
    return base + KIND_WORDS.get(model_kind(config), " (other)")


def config_model(config: dict | None, folders: Sequence[Path], summary: dict) -> Model:
    """The model a config dict trained (named and kinded by `model_name` / `model_kind`), as its run folders."""
    return Model(model_name(config), model_kind(config), [Path(f) for f in folders], summary)


def baseline_models(baselines: dict | None) -> list[Model]:
    """The classical baselines (`engine.baselines.run_baselines`' result: {kind: summary with "label",
    "folder"}) as attributes-only models, their run folders named as the summary's runs."""
    return [
        Model(b["label"], "attributes", [Path(b["folder"]) / r["name"] for r in b["runs"]], b)
        for b in (baselines or {}).values()
    ]


def pooled_test(folders: Sequence[Path]) -> Pooled:
    """The runs' test predictions, one row per patient (mean probabilities over runs)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    labels: dict[str, int] = {}
    for folder in folders:
        path = Path(folder) / PREDICTIONS
        if not path.is_file():
            raise ValueError(f"{path}: missing (the run has no saved test predictions to pair)")
        with np.load(path, allow_pickle=False) as saved:
            missing = [k for k in ("test_case_ids", "test_probs", "test_labels") if k not in saved]
            if missing:
                raise ValueError(f"{path}: no {', '.join(missing)} (expected test_case_ids, test_probs, test_labels)")
            for cid, y, p in zip(saved["test_case_ids"].astype(str), saved["test_labels"], saved["test_probs"]):
                if cid in labels and labels[cid] != int(y):
                    raise ValueError(f"{path}: case {cid} has label {int(y)} here but {labels[cid]} in another run")
                labels[cid] = int(y)
                sums[cid] = sums.get(cid, 0.0) + np.asarray(p, dtype=np.float64)
                counts[cid] = counts.get(cid, 0) + 1
    ids = sorted(labels)
    return Pooled(np.array(ids), np.array([labels[c] for c in ids]), np.vstack([sums[c] / counts[c] for c in ids]))


def _wilcoxon_auc(a: dict, b: dict) -> float:
    if not a.get("runs") or not b.get("runs"):
        return math.nan
    try:
        return wilcoxon_compare(a, b).get("auc", math.nan)
    except ValueError:  # different run names: no per-run pairing
        return math.nan


def pair(a: Model, b: Model, pooled: dict[str, Pooled], spec, seed: int = 0) -> dict:
    """a vs b on the patients both tested (they must be the same patients)."""
    pa, pb = pooled[a.name], pooled[b.name]
    if list(pa.case_ids) != list(pb.case_ids):
        only_a = sorted(set(pa.case_ids) - set(pb.case_ids))
        only_b = sorted(set(pb.case_ids) - set(pa.case_ids))
        raise ValueError(
            f"{a.name} and {b.name} were tested on different patients (only {a.name}: {only_a[:5]}"
            f"{'...' if len(only_a) > 5 else ''}; only {b.name}: {only_b[:5]}"
            f"{'...' if len(only_b) > 5 else ''}): pair models trained on the same cohort and splits"
        )
    if not np.array_equal(pa.labels, pb.labels):
        raise ValueError(f"{a.name} and {b.name} disagree on the labels of the same patients: not the same cohort")
    result = compare_auc(pa.labels, pa.probs, pb.probs, pa.case_ids, spec.positive_index, seed=seed)
    return {
        "a": a.name,
        "b": b.name,
        "kind_a": a.kind,
        "kind_b": b.kind,
        **result,
        "wilcoxon_p_auc": _wilcoxon_auc(a.summary, b.summary),
    }


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.3g}"


def images_add_sentence(record: dict) -> str:
    """One sentence answering "do the images add to the table?" from a fused-vs-attributes pair."""
    d, (lo, hi) = record["difference"], record["ci"]
    evidence = (
        f"95 % CI {lo:.3f} to {hi:.3f}, {record['test']} p {_p(record['p'])}; pooled test predictions "
        f"of {record['n_patients']} patients"
    )
    against = f"the best attributes-only model, {record['b']} (AUC {record['auc_b']:.3f})"
    if lo > 0:
        return f"Yes: the images add {d:.3f} AUC over {against} ({evidence})."
    if hi < 0:
        return f"No: the fused model's AUC is {-d:.3f} below {against} ({evidence})."
    return (
        f"Not shown: with the images the AUC changes by {d:+.3f} over {against}, and the interval includes 0 "
        f"({evidence})."
    )


def paired_evidence(this: Model, others: Sequence[Model], spec, seed: int = 0) -> dict:
    """{"pairs": [this vs each other model], "images_add": {"sentence", "against", ...} or None}."""
    models = [this, *others]
    pooled = {m.name: pooled_test(m.folders) for m in models}
    pairs = [pair(this, other, pooled, spec, seed) for other in others]
    images_add = None
    attribute_pairs = [p for p in pairs if p["kind_b"] == "attributes"]
    if this.kind == "fused" and attribute_pairs:
        strongest = max(attribute_pairs, key=lambda p: -math.inf if math.isnan(p["auc_b"]) else p["auc_b"])
        images_add = {
            "sentence": images_add_sentence(strongest),
            "against": strongest["b"],
            "difference": strongest["difference"],
            "ci": strongest["ci"],
            "p": strongest["p"],
            "test": strongest["test"],
        }
    return {
        "pairs": pairs,
        "images_add": images_add,
        "pooling": "per patient: the fold that tested it (folds), the mean probability over seeds (seeds)",
    }


def _num(x: float, fmt: str = ".3f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def evidence_markdown(evidence: dict, unit: str) -> str:
    """The summary.md section: one row per pair, then the one-sentence answer."""
    lines = [
        "### Paired evidence on patients (pooled test predictions, AUC)",
        "",
        (
            "| Comparison | AUC (first) | AUC (second) | Difference | 95 % CI (paired bootstrap) | p (paired test) "
            f"| p (Wilcoxon over {unit}) |"
        ),
        "|---" * 7 + "|",
    ]
    for p in evidence["pairs"]:
        lines.append(
            f"| {p['a']} vs {p['b']} | {_num(p['auc_a'])} | {_num(p['auc_b'])} | {_num(p['difference'], '+.3f')} "
            f"| {_num(p['ci'][0])} to {_num(p['ci'][1])} | {_num(p['p'], '.3g')} ({p['test']}) "
            f"| {_num(p['wilcoxon_p_auc'], '.3f')} |"
        )
    lines += [
        "",
        (
            f"_Patients pooled over the runs ({POOLING[unit]}); the CI resamples patients within each class; "
            "DeLong's test for two classes, the bootstrap's p for more (macro one-vs-rest AUC)._"
        ),
    ]
    if evidence.get("images_add"):
        lines += ["", f"**Do the images add to the table?** {evidence['images_add']['sentence']}"]
    return "\n".join(lines) + "\n"
