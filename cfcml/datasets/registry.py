"""Dataset name -> reader, checker and synthetic writer (one place that knows both cohorts)."""

from __future__ import annotations

from pathlib import Path

from cfcml.datasets.cohort import Cohort, CohortError, Problem

DATASET_NAMES = ("men", "derm7pt")


def _check(name: str):
    if name == "men":
        from cfcml.datasets.men.reader import check_men

        return check_men
    if name == "derm7pt":
        from cfcml.datasets.derm7pt.reader import check_derm7pt

        return check_derm7pt
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def check_cohort(name: str, root: str | Path) -> tuple[Cohort | None, list[Problem]]:
    """Every problem with the cohort at `root` (an empty list when it is fit to train on)."""
    root = Path(root)
    if not root.is_dir():
        return None, [Problem(str(root), None, None, "cohort folder does not exist")]
    return _check(name)(root)


def load_cohort(name: str, root: str | Path) -> Cohort:
    """The checked cohort; raises CohortError listing every problem (training refuses bad data)."""
    cohort, problems = check_cohort(name, root)
    if problems or cohort is None:
        raise CohortError(Path(root), problems)
    return cohort


def write_synthetic(name: str, out: str | Path, size: int | None, seed: int) -> Path:
    if name == "men":
        from cfcml.datasets.men.synthetic import write_synthetic_men

        return write_synthetic_men(out, **({"patients": size} if size else {}), seed=seed)
    if name == "derm7pt":
        from cfcml.datasets.derm7pt.synthetic import write_synthetic_derm7pt

        return write_synthetic_derm7pt(out, **({"cases": size} if size else {}), seed=seed)
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")


_SHAPES = {  # interim, until each cohort's schema file describes it
    "men": {"classes": ("G1", "G2inv", "G2ninv"), "series": ("T1C", "FLAIR_C", "ADC"), "attributes": 6, "kind": "volume"},
    "derm7pt": {"classes": ("NEV", "MEL"), "series": ("clinic", "derm"), "attributes": 5, "kind": "photo"},
}


def cohort_classes(name: str) -> tuple[str, ...]:
    return _SHAPES[name]["classes"]


def cohort_series(name: str) -> tuple[str, ...]:
    return _SHAPES[name]["series"]


def cohort_shape(name: str):
    from cfcml.models.shape import CohortShape

    s = _SHAPES[name]
    return CohortShape(len(s["classes"]), len(s["series"]), s["attributes"], s["kind"])
