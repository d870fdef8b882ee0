"""The study's MLflow parent run: the experiment, the run (reopened on resume), what it records
before the search (cohort, held-back patients, parameters, search space, config, Optuna study)."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...config import save_config
from ...models.pretrained import pretrained_provenance
from ..pyfunc import git_commit, package_versions
from ..redact import redact
from ..report_logging import ensure_experiment, log_cohort
from ..tracking import end_running_children, mlflow_run, sweep_stale_runs
from .prepare import StudyPlan
from .records import find_parent_run, record_holdout
from .spec import TAG_STUDY, TAG_STUDY_PATH


@dataclass(frozen=True)
class Tracking:
    """Where the study is tracked (``parent_id``: once the parent run is open)."""

    client: object  # MlflowClient
    tracking_uri: str
    experiment_id: str
    digest: str  # the whole cohort's data digest
    commit: str
    parent_id: str | None = None


def connect(plan: StudyPlan) -> Tracking:
    """The experiment (stale runs swept); on resume the parent run found and its dead trials ended."""
    import mlflow
    from mlflow.tracking import MlflowClient

    spec = plan.spec
    tracking_uri = spec.tracking.tracking_uri or mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = spec.tracking.experiment or f"cfcml-{plan.cohort_spec.name}"
    experiment_id = ensure_experiment(client, experiment)  # tagged as model training
    sweep_stale_runs(client, experiment_id, tags={TAG_STUDY: plan.name})  # runs whose driver died (SIGKILL, OOM)
    parent_id = find_parent_run(client, experiment_id, redact(plan.study_path)) if plan.restoring else None
    if parent_id:
        end_running_children(client, parent_id, "KILLED")  # trials that died with the last driver
    return Tracking(
        client=client,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        digest=plan.full.digest(),
        commit=spec.tracking.git_commit or git_commit(),
        parent_id=parent_id,
    )


@contextlib.contextmanager
def parent_run(plan: StudyPlan, tracking: Tracking):
    """The parent run, open (new, or the resumed study's): yields `tracking` with its id."""
    import mlflow

    spec = plan.spec
    if spec.tracking.system_metrics:
        mlflow.system_metrics.set_system_metrics_sampling_interval(spec.tracking.system_metrics_interval)
    tags = {
        TAG_STUDY: plan.name,
        TAG_STUDY_PATH: redact(plan.study_path),
        "optuna.storage": redact(plan.optuna_url),
        "optuna.study_name": plan.name,
        "ray.storage": redact(plan.study_path),
        "data.digest": tracking.digest,
        "git.commit": tracking.commit,
    }
    with mlflow_run(
        run_name=plan.name,
        experiment_id=tracking.experiment_id,
        run_id=tracking.parent_id,
        tracking_uri=tracking.tracking_uri,
        tags=tags,
        log_system_metrics=spec.tracking.system_metrics,
    ) as parent:
        tracking = dataclasses.replace(tracking, parent_id=parent.info.run_id)
        log_cohort(tracking.client, tracking.parent_id, plan.full, plan.data)  # the study's dataset (once per digest)
        record_holdout(tracking.client, tracking.parent_id, spec, plan.held)
        if not plan.restoring:
            log_study_start(plan)
        yield tracking


def study_params(plan: StudyPlan) -> dict:
    spec, cfg, space = plan.spec, plan.cfg, plan.space
    return {
        "preset": spec.preset,
        "dataset": plan.cohort_spec.name,
        "data": redact(plan.data),
        "num_samples": spec.search.num_samples,
        "max_concurrent_trials": plan.concurrent,
        "workers_per_trial": spec.resources.workers_per_trial,
        "cpus_per_worker": spec.resources.cpus_per_worker,
        "gpus_per_worker": spec.resources.gpus_per_worker,
        "epochs": cfg.train.epochs,
        "search_runs": ",".join(r["name"] for r in plan.runs),
        "seed": spec.search.seed,
        "sampler": f"optuna.TPESampler({', '.join(f'{k}={v}' for k, v in space.sampler.items())})",
        "budget_epochs": spec.budget.budget_epochs or "none",
        "scheduler": f"ASHA(time_attr=epoch, grace_period={space.asha['grace_period']}, "
        f"reduction_factor={space.asha['reduction_factor']})",
        "metric": space.metric,
        "mode": space.mode,
        "max_failures": spec.resources.max_failures,
        "overrides": redact(" ".join(spec.search.overrides)) or "none",
        **{f"pretrained.{k}": v for k, v in pretrained_provenance(cfg).items()},
        **{f"space.{k}": v for k, v in space.describe().items()},
    }


def log_study_start(plan: StudyPlan) -> None:
    """A new study's parameters, search space, config, Optuna pointer and package versions."""
    import mlflow

    name, url = plan.name, redact(plan.optuna_url)
    mlflow.log_params(study_params(plan))
    mlflow.log_text(plan.space.source, f"search_space/{plan.space_file.name}")
    with tempfile.TemporaryDirectory() as tmp:
        save_config(plan.cfg, Path(tmp) / "config.yaml")
        mlflow.log_artifact(str(Path(tmp) / "config.yaml"))
    mlflow.log_text(
        f"Optuna study '{name}' in {url}\n"
        f"optuna-dashboard {url}\n"
        f"python -c \"import optuna; print(optuna.load_study(study_name='{name}', storage='{url}').trials_dataframe())\"\n",
        "optuna_study.txt",
    )
    mlflow.set_tags({f"version.{k}": v for k, v in package_versions().items()})
