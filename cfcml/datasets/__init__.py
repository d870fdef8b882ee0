"""Cohorts described by schema files: read, check, split, load and synthesise them.

`cfcml.datasets.<name>/` holds what is special to a built-in cohort (its `cohort.yaml`, its
synthetic writer, other on-disk layouts it accepts); everything else is generic.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from cfcml.datasets.spec import DatasetSpec, SpecError, builtin_names, load_spec
from cfcml.datasets.synthetic import write_synthetic_cohort

SYNTHETIC_MARKER = ".cfcml-synthetic"  # in a cohort's root: its data are synthetic

__all__ = ["SYNTHETIC_MARKER", "DatasetSpec", "SpecError", "builtin_names", "load_spec", "write_synthetic"]


def write_synthetic(dataset: DatasetSpec | str, out, size: int | None = None, seed: int = 0) -> Path:
    """A synthetic cohort in the dataset's on-disk format. Built-in cohorts have their own
    writers (reproducing their real releases' quirks); any other schema gets the generic one."""
    spec = dataset if isinstance(dataset, DatasetSpec) else load_spec(dataset)
    root = None
    if spec.source.startswith("builtin:"):
        module = importlib.import_module(f"cfcml.datasets.{spec.source.removeprefix('builtin:')}")
        if hasattr(module, "write_synthetic"):
            root = module.write_synthetic(out, size, seed)
    if root is None:
        root = write_synthetic_cohort(spec, out, **({"cases": size} if size else {}), seed=seed)
    # reports and model cards say "synthetic" when they find this file (not part of the cohort digest)
    (Path(root) / SYNTHETIC_MARKER).write_text(f"synthetic {spec.name} cohort written by cfcml (seed {seed})\n")
    return root
