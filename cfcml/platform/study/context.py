"""What crosses into Ray: the :class:`TrialContext` every trial driver gets (through
``tune.with_parameters``) and the :class:`LoopConfig` each Train worker gets (as
``train_loop_config``, read by :func:`cfcml.platform.train_loop.train_loop_per_worker`).
Both travel as plain dicts (``to_dict``) and are rebuilt with ``from_dict``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class _Plain:
    """``to_dict`` / ``from_dict`` for a dataclass of plain values."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class TrialContext(_Plain):
    """The study's facts a trial driver needs (the same for every trial)."""

    preset: str
    overrides: dict  # the study's `--set` overrides as a nested dict (the cohort among them)
    epochs: int
    data: str
    runs: list  # [{"name": "fold1", "fold": 1}, ...]
    spec: dict  # the cohort's schema, shipped (`cfcml.datasets.spec.shipped`)
    study: str
    tracking_uri: str | None
    experiment_id: str
    parent_run_id: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    train_storage: str
    system_metrics: bool
    system_metrics_interval: float
    fault: dict | None = None  # tests: the first trial's worker is killed once (params: that trial's point)
    holdout: list | None = None  # the held-back patients' ids
    decisions: dict | None = None  # {"board", "epochs"}: where ASHA's rung decisions are posted


@dataclass(frozen=True)
class LoopConfig(_Plain):
    """One trial's Train run: the keys `train_loop_per_worker` reads."""

    cfg: dict  # Config.to_dict()
    data: str
    runs: list
    mlflow: dict | None  # {"tracking_uri", "run_id", "system_metrics", "system_metrics_interval"}
    trial_id: str
    spec: dict
    decisions: dict | None = None
    holdout: list | None = None
    fault: dict | None = None
