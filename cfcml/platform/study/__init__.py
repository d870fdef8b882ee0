"""A hyper-parameter study: Ray Tune + Optuna TPE + ASHA over Ray Train trials, in MLflow.

Shape of a study (Ray 2.60, Train V2; see docs/platform.md), module by module:

- :mod:`.spec`: :class:`StudySpec`, what a study is asked to do (`cfcml tune`'s options are
  generated from its fields by :mod:`.options`).
- :mod:`.prepare`: the study's config (preset + `--set` overrides, built once), search space,
  cohort (minus the held-back patients), runs (folds / seeds), storage and Optuna RDB; then Ray,
  and the trials that fit at once (``floor(cluster CPUs / (workers x CPUs per worker))``, the
  same for GPUs, capped by ``max_concurrent``).
- :mod:`.parent`: the MLflow experiment and parent run (reopened on ``resume``).
- :mod:`.search`: Optuna's seeded TPE (the preset's own point enqueued first), the
  rung-synchronised ASHA (``time_attr="epoch"``), the epoch budget and the Tuner (restored on
  ``resume``: finished trials are not re-run, unfinished ones continue from their checkpoints).
- :mod:`.trial`: the Tune trainable, a 0-CPU driver running a ``TorchTrainer`` whose workers
  train all folds / seeds in lockstep and report ``cv_val_auc`` every epoch; it receives a
  :class:`~.context.TrialContext` and hands its workers a :class:`~.context.LoopConfig`. Test
  data is never looked at during the search.
- :mod:`.callback`: closes each trial's MLflow run on the driver and plots its curves.
- :mod:`.finalise`: the best trial tested once, logged, reported, packaged as an MLflow pyfunc
  measured as `cfcml predict` loads it (:mod:`.measure`) and registered as ``cfcml-<dataset>``
  with alias ``challenger``.
"""

from .config import default_search_space, resolve_trial_config, warm_caches
from .context import LoopConfig, TrialContext
from .evaluate import evaluate_best
from .measure import describe_model, evaluation_metrics, measure_package
from .prepare import plan_concurrency
from .records import find_child_run, find_parent_run, record_holdout
from .run import run_study
from .spec import (
    TAG_FINAL,
    TAG_HOLDOUT_DIGEST,
    TAG_STUDY,
    TAG_STUDY_PATH,
    TAG_TRIAL,
    StudyError,
    StudyInterrupted,
    StudySpec,
)
from .storage import join_uri, normalize_storage, storage_filesystem

__all__ = [
    "TAG_FINAL",
    "TAG_HOLDOUT_DIGEST",
    "TAG_STUDY",
    "TAG_STUDY_PATH",
    "TAG_TRIAL",
    "LoopConfig",
    "StudyError",
    "StudyInterrupted",
    "StudySpec",
    "TrialContext",
    "default_search_space",
    "describe_model",
    "evaluate_best",
    "evaluation_metrics",
    "find_child_run",
    "find_parent_run",
    "join_uri",
    "measure_package",
    "normalize_storage",
    "plan_concurrency",
    "record_holdout",
    "resolve_trial_config",
    "run_study",
    "storage_filesystem",
    "warm_caches",
]
