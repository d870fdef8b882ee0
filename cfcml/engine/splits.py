"""Which cases train, validate and test in one run. Selection never looks at the test part."""

from __future__ import annotations

from dataclasses import dataclass

from sklearn.model_selection import train_test_split

from cfcml.datasets.cohort import Case, Cohort

from ..config import Config


@dataclass
class RunSplit:
    name: str  # "fold1", "seed0", ...
    train: list[Case]
    val: list[Case]
    test: list[Case]


def men_split(cohort: Cohort, fold: int, val_fraction: float, seed: int = 0) -> RunSplit:
    """Test = fold `fold`; validation = a stratified, patient-level part of the other folds."""
    name = f"fold{fold}"
    if name not in cohort.splits:
        raise ValueError(f"--fold {fold}: the cohort has folds {list(cohort.splits)}")
    rest = [c for c in cohort.cases if c.split != name]
    train, val = train_test_split(rest, test_size=val_fraction, stratify=[c.label for c in rest], random_state=seed + fold)
    return RunSplit(name, sorted(train, key=_key), sorted(val, key=_key), cohort.split(name))


def derm7pt_split(cohort: Cohort, seed: int) -> RunSplit:
    """The creator's split; runs differ by seed only."""
    return RunSplit(f"seed{seed}", cohort.split("train"), cohort.split("valid"), cohort.split("test"))


def run_split(cfg: Config, cohort: Cohort, fold: int | None, seed: int | None) -> RunSplit:
    if cfg.dataset == "men":
        return men_split(cohort, fold or 1, cfg.data.val_fraction)
    return derm7pt_split(cohort, cfg.train.seed if seed is None else seed)


def _key(c: Case) -> str:
    return c.case_id
