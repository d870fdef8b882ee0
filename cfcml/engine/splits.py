"""Which cases train, validate and test in one run. Selection never looks at the test part."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from sklearn.model_selection import train_test_split

from cfcml.datasets.cohort import Case, Cohort

from ..config import Config, ConfigError


@dataclass
class RunSplit:
    name: str  # "fold1", "seed0", ...
    train: list[Case]
    val: list[Case]
    test: list[Case]


def fold_split(cohort: Cohort, fold: int, val_fraction: float, seed: int = 0) -> RunSplit:
    """Test = fold `fold`; validation = a stratified, patient-level part of the other folds."""
    name = f"fold{fold}"
    if name not in cohort.splits:
        raise ConfigError(f"--fold {fold}: the cohort has folds 1..{len(cohort.splits)}")
    rest = [c for c in cohort.cases if c.split != name]
    labels = [c.label for c in rest]
    try:
        train, val = train_test_split(rest, test_size=val_fraction, stratify=labels, random_state=seed + fold)
    except ValueError as e:  # a class too rare to put one case on each side
        raise ConfigError(
            f"fold {fold}: cannot carve a stratified {val_fraction:.0%} validation part from "
            f"{len(rest)} training cases ({e}); use a larger data.val_fraction or more cases"
        ) from None
    return RunSplit(name, sorted(train, key=_key), sorted(val, key=_key), cohort.split(name))


def fixed_split(cohort: Cohort, seed: int) -> RunSplit:
    """The cohort's own train/valid/test split; runs differ by seed only."""
    return RunSplit(f"seed{seed}", cohort.split("train"), cohort.split("valid"), cohort.split("test"))


def run_split(cfg: Config, cohort: Cohort, fold: int | None, seed: int | None) -> RunSplit:
    if cohort.spec.split.kind == "folds":
        if seed is not None and fold is None:
            raise ConfigError(f"{cohort.dataset} is cross-validated: choose a run with --fold, not --seed")
        return fold_split(cohort, fold or 1, cfg.data.val_fraction)
    if fold is not None:
        raise ConfigError(f"{cohort.dataset} has a fixed train/valid/test split: choose a run with --seed, not --fold")
    return fixed_split(cohort, cfg.train.seed if seed is None else seed)


def protocol_runs(cfg: Config, cohort: Cohort) -> list[dict]:
    """[{"name": "fold1", "fold": 1}, ...] (cross-validation) or [{"name": "seed0", "seed": 0}, ...]."""
    if cohort.spec.split.kind == "folds":
        return [{"name": s, "fold": int(s.removeprefix("fold"))} for s in cohort.splits]
    return [{"name": f"seed{s}", "seed": s} for s in cfg.train.seeds]


def _key(c: Case) -> str:
    return c.case_id


def hold_out(cohort: Cohort, fraction: float, seed: int = 0) -> tuple[Cohort, list[Case]]:
    """(the cohort without a held-back part, the held-back cases): a stratified, patient-level,
    seeded `fraction` of a `folds` cohort that no run trains, validates or selects on. The kept
    patients stay in their folds. `fraction` 0 holds nothing back."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"--holdout {fraction}: expected a fraction in [0, 1)")
    if fraction == 0:
        return cohort, []
    if cohort.spec.split.kind != "folds":
        raise ConfigError(
            f"--holdout {fraction}: {cohort.dataset} has a fixed train/valid/test split whose test part no run "
            "sees already; --holdout is for cross-validated (folds) cohorts"
        )
    cases = sorted(cohort.cases, key=_key)
    try:
        _, held = train_test_split(cases, test_size=fraction, stratify=[c.label for c in cases], random_state=seed)
    except ValueError as e:  # a class too rare to put one case on each side
        raise ConfigError(
            f"--holdout {fraction}: cannot hold back a stratified part of {len(cases)} patients ({e})"
        ) from None
    return without_cases(cohort, {c.case_id for c in held}), sorted(held, key=_key)


def without_cases(cohort: Cohort, ids) -> Cohort:
    """The cohort minus the cases whose id is in `ids` (the study's held-back patients)."""
    ids = set(ids or ())
    if not ids:
        return cohort
    return dataclasses.replace(cohort, cases=[c for c in cohort.cases if c.case_id not in ids])


def ids_digest(ids) -> str:
    """sha256 over the sorted, newline-joined case ids: names a set of patients."""
    return hashlib.sha256("\n".join(sorted(str(i) for i in ids)).encode()).hexdigest()


def seen_ids(split: RunSplit) -> dict[str, list[str]]:
    """The ids a run trained on and selected its epoch on."""
    return {"train": [c.case_id for c in split.train], "selection": [c.case_id for c in split.val]}
