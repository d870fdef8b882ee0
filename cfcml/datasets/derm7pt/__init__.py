"""Derm7pt (melanoma vs nevus): schema `cohort.yaml` (the release as distributed), the synthetic writer."""

from __future__ import annotations

from cfcml.datasets.derm7pt.synthetic import write_synthetic_derm7pt


def write_synthetic(out, size: int | None = None, seed: int = 0):
    return write_synthetic_derm7pt(out, **({"cases": size} if size else {}), seed=seed)
