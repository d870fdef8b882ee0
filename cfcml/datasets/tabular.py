"""Tabular attributes as numbers, for the MLP-embedding ablation (Fig. 9) and baselines.

One-hot columns for each categorical attribute (in the schema's word order), then each
numeric attribute standardised with statistics of the training cases only and clipped to
±CLIP standard deviations (one absurd value cannot flatten a feature for everyone).
"""

from __future__ import annotations

import numpy as np

from cfcml.datasets.spec import DatasetSpec

CLIP = 6.0


def feature_names(spec: DatasetSpec) -> list[str]:
    names = []
    for a in spec.attributes:
        names += [f"{a.column}={w}" for w in a.words] if a.type == "categorical" else [a.column]
    return names


def num_features(spec: DatasetSpec) -> int:
    return len(feature_names(spec))


def numeric_stats(spec: DatasetSpec, fit_on) -> dict[str, tuple[float, float]]:
    """{numeric column: (mean, std)} over `fit_on` cases (std 1 where constant)."""
    stats = {}
    for a in spec.attributes:
        if a.type == "numeric":
            x = np.array([float(c.attributes[a.column]) for c in fit_on], dtype=np.float64)
            mean, std = (float(x.mean()), float(x.std())) if len(x) else (0.0, 1.0)
            stats[a.column] = (mean, std if std > 0 else 1.0)
    return stats


def tabular_features(spec: DatasetSpec, cases, fit_on=None, stats: dict | None = None) -> np.ndarray:
    """float32 [len(cases), num_features(spec)]; numerics scaled with `stats` (or fitted on `fit_on`)."""
    stats = stats if stats is not None else numeric_stats(spec, cases if fit_on is None else fit_on)
    cols = []
    for a in spec.attributes:
        if a.type == "categorical":
            index = {w: i for i, w in enumerate(a.words)}
            block = np.zeros((len(cases), len(index)), dtype=np.float32)
            for row, c in enumerate(cases):
                i = index.get(c.attributes.get(a.column))
                if i is not None:  # a missing attribute is all zeros
                    block[row, i] = 1.0
            cols.append(block)
        else:
            mean, std = stats[a.column]
            x = np.array(
                [np.nan if c.attributes.get(a.column) is None else float(c.attributes[a.column]) for c in cases],
                dtype=np.float64,
            )
            z = np.clip(np.nan_to_num((x - mean) / std, nan=0.0), -CLIP, CLIP)
            cols.append(z.astype(np.float32)[:, None])
    return np.concatenate(cols, axis=1) if cols else np.zeros((len(cases), 0), dtype=np.float32)
