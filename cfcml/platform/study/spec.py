"""What a study is asked to do: :class:`StudySpec` (one command-line option per field, see
:mod:`cfcml.platform.study.options`), the study's errors and the MLflow tags it writes.

The spec is nested by concern: :class:`Search`, :class:`Resources`, :class:`Budget`,
:class:`Storage` and :class:`Tracking` under :class:`StudySpec`. Leaf field names are unique
across the parts, because each is one command-line option; :meth:`StudySpec.of` builds a spec
from those flat names (what `cfcml tune`'s parser, the benchmarks and the tests hold).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TAG_STUDY = "cfcml.study"
TAG_STUDY_PATH = "cfcml.study_path"
TAG_TRIAL = "cfcml.trial_id"
TAG_FINAL = "cfcml.final_evaluation"
TAG_HOLDOUT_DIGEST = "cfcml.holdout_ids_digest"
HOLDOUT_ARTIFACT = "holdout_ids.json"


class StudyError(RuntimeError):
    pass


class StudyInterrupted(KeyboardInterrupt):
    """The search was stopped (SIGINT/SIGTERM) before every trial finished: resume it."""


class NodeLost(StudyInterrupted):
    """The search was stopped because a lost node left trials the remaining nodes cannot place:
    resume it once the node (or a replacement) is back."""


@dataclass
class Search:
    """What is searched: the search space, how many trials, on which runs and patients."""

    overrides: list[str] = field(default_factory=list)  # config overrides for every trial
    search_space: str | None = None  # default search_spaces/<men|derm7pt|smoke>.yaml
    num_samples: int = 8
    seed: int = 0  # the TPE sampler's and the holdout's
    search_runs: int | None = None  # first N folds/seeds only (default: all)
    holdout: float = 0.0  # a folds cohort: this stratified fraction of patients held back from the whole study


@dataclass
class Resources:
    """Where trials run: the Ray cluster and each trial's share of it."""

    ray_address: str | None = None
    max_concurrent: int | None = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_failures: int = 2  # Ray Train worker-group restarts per trial
    node_loss_timeout: float = 600.0  # s a lost node's trials may wait for room before the study stops (0: forever)


@dataclass
class Budget:
    """How much training: epochs per trial and a cap over the whole study."""

    epochs: int | None = None
    budget_epochs: int | None = None  # cap on epochs over every run of every trial, stopped ones included


@dataclass
class Storage:
    """Where the study's state lives: Ray's trial storage, Optuna's, and local scratch."""

    location: str = "~/ray_results/cfcml"  # --storage: local path or URI (s3://bucket/path?endpoint_override=...)
    resume: bool = False
    optuna_storage: str | None = None  # SQLAlchemy URL; default SQLite beside the study
    work_dir: str | None = None  # local scratch for the final evaluation (default: a temp dir)


@dataclass
class Tracking:
    """What MLflow records: server, experiment, registered model, system metrics."""

    tracking_uri: str | None = None
    experiment: str | None = None  # default cfcml-<cohort name>
    model_name: str | None = None  # default cfcml-<cohort name>
    register: bool = True
    git_commit: str | None = None
    system_metrics: bool = True
    system_metrics_interval: float = 10.0


PARTS = {"search": Search, "resources": Resources, "budget": Budget, "storage": Storage, "tracking": Tracking}


@dataclass
class StudySpec:
    """Everything a study needs; built by `cfcml tune` / jobs/tune_*.py from the command line."""

    preset: str
    data: str
    dataset: str | None = None  # a built-in cohort or a schema path (default: the preset's)
    name: str | None = None  # default: the preset name (so `--resume` needs no name)
    search: Search = field(default_factory=Search)
    resources: Resources = field(default_factory=Resources)
    budget: Budget = field(default_factory=Budget)
    storage: Storage = field(default_factory=Storage)
    tracking: Tracking = field(default_factory=Tracking)
    quiet: bool = False  # no live progress line on the driver's stderr
    fault: dict | None = None  # tests: {"epoch": 2, "marker": path}: kill the first trial's worker once

    @classmethod
    def of(cls, **options) -> StudySpec:
        """A spec from flat option names (``num_samples=4, storage="s3://..."``), each routed to
        its part; an unknown name is a TypeError, as for a dataclass."""
        parts = {name: {} for name in PARTS}
        owner = {f.name: name for name, part in PARTS.items() for f in dataclasses.fields(part)}
        top = {}
        for key, value in options.items():
            if key in PARTS and not isinstance(value, PARTS[key]):
                raise TypeError(f"StudySpec.of: {key} must be a {PARTS[key].__name__}, got {value!r}")
            if key in owner:
                parts[owner[key]][key] = value
            else:
                top[key] = value
        return cls(**top, **{name: PARTS[name](**values) for name, values in parts.items()})

    def flat(self) -> dict:
        """The inverse of :meth:`of`: every leaf field by its option name."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out |= dataclasses.asdict(value) if f.name in PARTS else {f.name: value}
        return out
