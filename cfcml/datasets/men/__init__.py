"""MEN (meningioma grading): schema `cohort.yaml`, the authors' layout, the synthetic writer."""

from __future__ import annotations

from cfcml.datasets.men import authors_layout
from cfcml.datasets.men.synthetic import write_synthetic_men

LAYOUTS = [authors_layout]  # on-disk layouts read besides the schema's own (tried first)


def write_synthetic(out, size: int | None = None, seed: int = 0):
    return write_synthetic_men(out, **({"patients": size} if size else {}), seed=seed)
