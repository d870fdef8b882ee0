"""The Tune trainable: one trial = one Ray Train run over all of the trial's folds.

:func:`_trial` is a small driver (0 CPU): it builds the trial's config (the study's overrides
and the trial's parameters as nested dicts), opens the trial's MLflow child run and runs a
``TorchTrainer`` whose workers execute :func:`cfcml.platform.train_loop.train_loop_per_worker`.
"""

from __future__ import annotations

from ...config import Config
from ..delivery import call_with_retry
from ..search_space import trial_run_name
from ..tracking import open_supervised_run, tag_error
from ..train_loop import OBJECTIVE, train_loop_per_worker
from .callback import _report_counter_cls
from .config import resolve_trial_config
from .context import LoopConfig, TrialContext
from .records import find_child_run
from .spec import TAG_STUDY, TAG_TRIAL


def _trial(config: dict, ctx: dict) -> None:
    """Tune function trainable (``ctx``: a :class:`TrialContext` as a dict)."""
    from ray import tune

    context = TrialContext.from_dict(ctx)
    trial_id = tune.get_context().get_trial_id()
    params = dict(config)
    cfg = resolve_trial_config(context.preset, context.overrides, params, context.epochs)

    # the trial's MLflow run: opened here, ended only by the study driver (StudyCallback), which
    # alone knows whether Tune completed, stopped (ASHA) or lost the trial
    client, run_id, mlflow_spec = None, None, None
    if context.tracking_uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(context.tracking_uri)
        run_id = _open_trial_run(client, context, trial_id, params, cfg)
        mlflow_spec = {
            "tracking_uri": context.tracking_uri,
            "run_id": run_id,
            "system_metrics": context.system_metrics,
            "system_metrics_interval": context.system_metrics_interval,
        }
    try:
        _fit_trial(cfg, params, trial_id, context, mlflow_spec)
    except Exception as e:
        if client is not None:
            tag_error(client, run_id, e)  # the driver marks the run FAILED (on_trial_error)
        raise


def _open_trial_run(client, context: TrialContext, trial_id: str, params: dict, cfg: Config) -> str:
    """The trial's child run (found again after a restart), its parameters and config logged once."""
    import yaml
    from mlflow.entities import Param

    def open_run() -> str:  # retried whole while the server is away: a try finds the run an earlier one made
        existing = find_child_run(client, context.experiment_id, context.parent_run_id, trial_id)
        run_id = open_supervised_run(
            client,
            context.experiment_id,
            run_id=existing,
            run_name=trial_run_name(params),
            parent_run_id=context.parent_run_id,
            tags={TAG_TRIAL: trial_id, TAG_STUDY: context.study},
        )
        if existing is None or "trial_id" not in client.get_run(run_id).data.params:
            logged = {
                **params,
                "trial_id": trial_id,
                "workers": context.workers,
                "runs": ",".join(r["name"] for r in context.runs),
            }
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in logged.items()])
            client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        return run_id

    return call_with_retry(open_run, f"open the MLflow run of trial {trial_id}")


def _loop_config(cfg: Config, params: dict, trial_id: str, context: TrialContext, mlflow_spec: dict | None):
    fault = context.fault
    return LoopConfig(
        cfg=cfg.to_dict(),
        data=context.data,
        runs=context.runs,
        mlflow=mlflow_spec,
        trial_id=trial_id,
        spec=context.spec,
        decisions=context.decisions,
        holdout=context.holdout,
        fault=fault if fault and params == fault.get("params") else None,
    )


def _fit_trial(cfg: Config, params: dict, trial_id: str, context: TrialContext, mlflow_spec: dict | None) -> None:
    """Run the trial's folds as one Ray Train run, reporting every epoch to Tune."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    gpus = context.gpus_per_worker
    reports = Queue(actor_options={"num_cpus": 0})  # filled by the Train controller as reports reach Tune
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_loop_config(cfg, params, trial_id, context, mlflow_spec).to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=context.workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": context.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=ray.train.RunConfig(
            name=trial_id,
            storage_path=context.train_storage,
            failure_config=ray.train.FailureConfig(max_failures=context.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback(), _report_counter_cls()(reports)],
        ),
    )
    try:
        result = trainer.fit()
        if reports.empty() and OBJECTIVE in (result.metrics or {}):
            # the Train run had already finished (its last epoch ran while the study was being
            # interrupted): nothing reached Tune in this call, so hand it the run's final result
            tune.report({k: v for k, v in result.metrics.items() if k != "checkpoint_path"})
    finally:
        reports.shutdown()
