"""What a study is asked to do: :class:`StudySpec` (one command-line option per field, see
:mod:`cfcml.platform.study.options`), the study's errors and the MLflow tags it writes.

The spec stays one flat dataclass, its fields grouped below by concern (the search, resources,
storage, tracking, budget); `cfcml tune`'s options, `jobs/tune*.py` and the tests build it by
field name.
"""

from __future__ import annotations

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


@dataclass
class StudySpec:
    """Everything a study needs; built by `cfcml tune` / jobs/tune_*.py from the command line."""

    # the model, the cohort and the search
    preset: str
    data: str
    dataset: str | None = None  # a built-in cohort or a schema path (default: the preset's)
    name: str | None = None  # default: the preset name (so `--resume` needs no name)
    overrides: list[str] = field(default_factory=list)
    search_space: str | None = None  # default search_spaces/<men|derm7pt|smoke>.yaml
    num_samples: int = 8
    # resources
    max_concurrent: int | None = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    # budget
    epochs: int | None = None
    budget_epochs: int | None = None  # cap on epochs over every run of every trial, stopped ones included
    # storage
    storage: str = "~/ray_results/cfcml"  # local path or URI (s3://bucket/path?endpoint_override=...)
    resume: bool = False
    seed: int = 0
    max_failures: int = 2  # Ray Train worker-group restarts per trial
    search_runs: int | None = None  # first N folds/seeds only (default: all)
    # tracking
    tracking_uri: str | None = None
    experiment: str | None = None  # default cfcml-<cohort name>
    model_name: str | None = None  # default cfcml-<cohort name>
    register: bool = True
    optuna_storage: str | None = None  # SQLAlchemy URL; default SQLite beside the study
    git_commit: str | None = None
    ray_address: str | None = None
    system_metrics: bool = True
    system_metrics_interval: float = 10.0
    quiet: bool = False  # no live progress line on the driver's stderr
    work_dir: str | None = None  # local scratch for the final evaluation (default: a temp dir)
    fault: dict | None = None  # tests: {"epoch": 2, "marker": path}: kill the first trial's worker once
    holdout: float = 0.0  # a folds cohort: this stratified fraction of patients held back from the whole study
