"""Synthetic, fixed `ReportInputs` (random but seeded predictions) for tests and demos.

The logits carry a class signal and are made over-confident (x3), so temperature scaling has
something to correct; attributes include a rare category (a group too small to score).
"""

from __future__ import annotations

import numpy as np

from .inputs import CohortInfo, Explanation, ReportInputs, SplitPredictions

MEN_LIKE = CohortInfo(
    "synthetic-men",
    ["G1", "G2inv", "G2ninv"],
    None,
    [
        {"column": "sex", "type": "categorical"},
        {"column": "age", "type": "numeric"},
        {"column": "location", "type": "categorical"},
        {"column": "tumor_area", "type": "numeric"},
    ],
)
DERM_LIKE = CohortInfo(
    "synthetic-derm7pt",
    ["NEV", "MEL"],
    "MEL",
    [
        {"column": "sex", "type": "categorical"},
        {"column": "elevation", "type": "categorical"},
        {"column": "management", "type": "categorical"},
    ],
)


def _split(rng, prefix: str, n: int, k: int, runs: int, signal: float, dim: int) -> SplitPredictions:
    prior = np.linspace(1.5, 0.6, k)
    labels = rng.choice(k, size=n, p=prior / prior.sum())
    logits = 3.0 * (signal * np.eye(k)[labels] + rng.normal(size=(n, k)))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    features = 1.5 * np.eye(k, dim)[labels] + rng.normal(size=(n, dim))
    return SplitPredictions(
        case_ids=[f"{prefix}{i:03d}" for i in range(n)],
        labels=labels,
        probs=probs / probs.sum(1, keepdims=True),
        logits=logits,
        runs=[f"fold{i % runs}" for i in range(n)],
        features=features,
    )


def _attributes(rng, cohort: CohortInfo, case_ids) -> dict:
    out = {}
    for c in case_ids:
        if cohort.positive is None:
            a = {
                "sex": float(rng.integers(0, 2)),
                "age": float(np.clip(rng.normal(56, 13), 20, 85).round()),
                "location": str(rng.choice(["convex surface", "skull base", "other location"], p=[0.6, 0.34, 0.06])),
                "tumor_area": float(rng.gamma(4.0, 250.0)),
            }
        else:
            a = {
                "sex": str(rng.choice(["female", "male"])),
                "elevation": str(rng.choice(["flat", "palpable", "nodular"])),
                "management": str(
                    rng.choice(["excision", "clinical follow up", "no further examination"], p=[0.5, 0.45, 0.05])
                ),
            }
        out[c] = a
    # one case without a value: a "missing" group
    out[case_ids[0]].pop(cohort.attributes[0]["column"])
    return out


def _volume_pictures(rng) -> tuple[dict, dict]:
    zz, yy, xx = np.meshgrid(np.arange(8), np.arange(16), np.arange(16), indexing="ij")
    blob = np.exp(-((zz - 4) ** 2 / 4 + (yy - 6) ** 2 / 10 + (xx - 9) ** 2 / 10))
    images = {s: rng.normal(size=(8, 16, 16)) + 3 * blob for s in ("T1C", "FLAIR_C", "ADC")}
    return images, {s: blob for s in images}


def _photo_pictures(rng) -> tuple[dict, dict]:
    yy, xx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    heat = np.exp(-((yy - 3) ** 2 + (xx - 4) ** 2) / 6)  # coarser than the photo: resized when drawn
    images = {s: rng.uniform(size=(32, 32, 3)) for s in ("clinic", "derm")}
    return images, {s: heat for s in images}


_PICTURES = {"volume": _volume_pictures, "photo": _photo_pictures}  # image kind -> (images, heatmaps) of one case


def _explanations(rng, test: SplitPredictions, classes, kind: str) -> list[Explanation]:
    pred = test.probs.argmax(1)
    right = np.flatnonzero(pred == test.labels)[:2].tolist()
    wrong = np.flatnonzero(pred != test.labels)[:1].tolist()
    out = []
    for i in right + wrong:
        images, heatmaps = _PICTURES[kind](rng)
        out.append(
            Explanation(
                case_id=test.case_ids[i],
                true=int(test.labels[i]),
                pred=int(pred[i]),
                correct=bool(pred[i] == test.labels[i]),
                kind=kind,
                images=images,
                heatmaps=heatmaps,
            )
        )
    return out


def synthetic_inputs(
    num_classes: int = 3,
    n_val: int = 90,
    n_test: int = 120,
    runs: int = 3,
    seed: int = 0,
    signal: float = 1.2,
    feature_dim: int = 16,
    explanations: bool = True,
) -> ReportInputs:
    """A MEN-like (3 classes, volumes) or Derm7pt-like (2 classes, photos) set of inputs."""
    if num_classes not in (2, 3):
        raise ValueError("num_classes must be 2 or 3")
    rng = np.random.default_rng(seed)
    cohort = DERM_LIKE if num_classes == 2 else MEN_LIKE
    val = _split(rng=rng, prefix="v", n=n_val, k=num_classes, runs=runs, signal=signal, dim=feature_dim)
    test = _split(rng=rng, prefix="t", n=n_test, k=num_classes, runs=runs, signal=signal, dim=feature_dim)
    attrs = _attributes(rng, cohort, val.case_ids) | _attributes(rng, cohort, test.case_ids)
    removed = ["series T1C", "series FLAIR_C", "series ADC"] if num_classes == 3 else ["photo clinic", "photo derm"]
    removed += [f"attribute {a['column']}" for a in cohort.attributes]
    missing = {"none": {"auc": 0.9, "acc": 0.8}} | {
        w: {"auc": float(0.9 - rng.uniform(0, 0.2)), "acc": float(0.8 - rng.uniform(0, 0.2))} for w in removed
    }
    kind = "volume" if num_classes == 3 else "photo"
    return ReportInputs(
        cohort=CohortInfo(cohort.name, list(cohort.classes), cohort.positive, [dict(a) for a in cohort.attributes]),
        splits={"val": val, "test": test},
        attributes=attrs,
        missing_modality=missing,
        explanations=_explanations(rng, test, cohort.classes, kind) if explanations else [],
        meta={
            "preset": "men-smoke" if num_classes == 3 else "derm7pt-smoke",
            "method": "CFCML",
            "config_digest": "0123abcd",
            "data_digest": "4567ef01",
            "commit": "89ab",
            "date": "2025-01-01",
            "selection_rule": "best validation AUC epoch per run",
            "synthetic": True,
            "split_description": f"{runs}-fold cross-validation; test predictions pooled over folds",
        },
    )
