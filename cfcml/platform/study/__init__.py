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

import importlib

# name -> the submodule that defines it. Imported on first use (PEP 562), so that `cfcml tune --help`
# (which reads only .spec and .options) does not import torch, MONAI, Ray and MLflow.
_EXPORTS = {
    "default_search_space": "config",
    "resolve_trial_config": "config",
    "warm_caches": "config",
    "LoopConfig": "context",
    "TrialContext": "context",
    "evaluate_best": "evaluate",
    "describe_model": "measure",
    "evaluation_metrics": "measure",
    "measure_package": "measure",
    "plan_concurrency": "prepare",
    "find_child_run": "records",
    "find_parent_run": "records",
    "record_holdout": "records",
    "run_study": "run",
    "TAG_FINAL": "spec",
    "TAG_HOLDOUT_DIGEST": "spec",
    "TAG_STUDY": "spec",
    "TAG_STUDY_PATH": "spec",
    "TAG_TRIAL": "spec",
    "StudyError": "spec",
    "StudyInterrupted": "spec",
    "StudySpec": "spec",
    "join_uri": "storage",
    "normalize_storage": "storage",
    "storage_filesystem": "storage",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
