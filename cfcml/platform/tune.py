"""A hyper-parameter study: Ray Tune + Optuna TPE + ASHA over Ray Train trials, in MLflow.

Shape of a study (Ray 2.60, Train V2; see docs/platform.md):

- The Tune trainable :func:`_trial` is a small *driver* (0 CPU): it resolves the trial's
  config, opens the trial's MLflow child run and runs a ``ray.train.torch.TorchTrainer``
  whose workers execute :func:`cfcml.platform.train_loop.train_loop_per_worker` (DDP over
  ``workers_per_trial`` workers). Metrics reach Tune through ``TuneReportCallback``; the
  Train run is named after the trial id under ``<storage>/<study>_train/``, so a trial that
  restarts (worker failure, or a resumed study) continues from its last checkpoint.
- A trial trains all folds (MEN) / seeds (Derm7pt) in lockstep and reports ``cv_val_auc``
  (mean over runs of the validation AUC at each run's selected epoch) after every epoch:
  ASHA's rungs (``time_attr="epoch"``) are epochs of the cross-validated objective, and
  stopping a trial stops all its folds. Test data is never looked at during the search.
- Optuna's TPE sampler (seeded) proposes configurations; the preset's own values (the
  paper's hand-tuned point) are enqueued as the first trial. The study lives in an RDB
  storage (SQLite by default) whose URL is tagged on the MLflow parent run.
- Concurrency follows resources: at most ``floor(cluster CPUs / (workers x CPUs per
  worker))`` (and the same for GPUs) trials run at once, capped by ``max_concurrent``.
- After the search, the best trial's checkpointed runs are tested once (test metrics per
  fold, mean ± std in the paper's layout), logged, and shipped as an MLflow pyfunc
  registered as ``cfcml-<dataset>`` with alias ``challenger``.
- ``resume=True`` restores the Tune experiment (finished trials are not re-run; unfinished
  ones continue from their checkpoints) and reopens the same MLflow parent run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from cfcml.datasets.spec import load_spec

from ..config import Config, ConfigError, build_config, parse_overrides, save_config
from ..engine.splits import hold_out, ids_digest, without_cases
from ..models.pretrained import check_pretrained, pretrained_provenance
from .redact import redact
from .search_space import SearchSpace, load_search_space, trial_run_name
from .study_progress import study_progress_callback
from .train_loop import OBJECTIVE

log = logging.getLogger(__name__)

TAG_STUDY = "cfcml.study"
TAG_STUDY_PATH = "cfcml.study_path"
TAG_TRIAL = "cfcml.trial_id"
TAG_FINAL = "cfcml.final_evaluation"
SEARCH_SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"  # package data


class StudyError(RuntimeError):
    pass


class StudyInterrupted(KeyboardInterrupt):
    """The search was stopped (SIGINT/SIGTERM) before every trial finished: resume it."""


@dataclass
class StudySpec:
    """Everything a study needs; built by jobs/tune_*.py from the command line."""

    preset: str
    data: str
    dataset: str | None = None  # a built-in cohort or a schema path (default: the preset's)
    name: str | None = None  # default: the preset name (so `--resume` needs no name)
    overrides: list[str] = field(default_factory=list)
    search_space: str | None = None  # default search_spaces/<men|derm7pt|smoke>.yaml
    num_samples: int = 8
    max_concurrent: int | None = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    epochs: int | None = None
    budget_epochs: int | None = None  # cap on epochs over every run of every trial, stopped ones included
    storage: str = "~/ray_results/cfcml"  # local path or URI (s3://bucket/path?endpoint_override=...)
    resume: bool = False
    seed: int = 0
    max_failures: int = 2  # Ray Train worker-group restarts per trial
    search_runs: int | None = None  # first N folds/seeds only (default: all)
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


# ----------------------------------------------------------------------------- helpers


def join_uri(base: str, *parts: str) -> str:
    """`base`/parts for a local path or a URI whose query (``?endpoint_override=...``) stays last."""
    if "://" not in base:
        return str(Path(base, *parts))
    head, sep, query = base.partition("?")
    return head.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts) + (sep + query if sep else "")


def normalize_storage(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def storage_filesystem(storage: str):
    """(pyarrow filesystem, path) of a storage location (query parameters understood)."""
    import pyarrow.fs

    if "://" not in storage:
        return pyarrow.fs.LocalFileSystem(), storage
    return pyarrow.fs.FileSystem.from_uri(storage)


def default_search_space(cfg: Config) -> Path:
    """The search space shipped for the preset: search_spaces/<preset>.yaml (smoke.yaml for the
    *-smoke presets); for a comparison method, search_spaces/<method>.yaml (its own
    hyper-parameters). The space is about the model, so it follows the preset, not the cohort."""
    if cfg.model.method != "cfcml":  # a comparison method: its own hyper-parameters
        name = f"{cfg.model.method}.yaml"
    else:
        name = f"{'smoke' if cfg.name.endswith('-smoke') else cfg.name}.yaml"
    path = SEARCH_SPACES_DIR / name
    if not path.exists():
        known = ", ".join(sorted(p.name for p in SEARCH_SPACES_DIR.glob("*.yaml")))
        raise StudyError(f"no search space ships for preset {cfg.name!r} ({known}): pass --search-space FILE")
    return path


def resolve_trial_config(preset: str, overrides: list[str], params: dict, epochs: int | None) -> Config:
    """The preset + the study's `--set` overrides (the cohort among them) + the trial's parameters."""
    items = list(overrides) + [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items()]
    items += [f"train.epochs={int(epochs)}"] if epochs else []  # validated with the rest (e.g. against selection)
    return build_config(preset, parse_overrides(items))


def plan_concurrency(resources: dict, spec: StudySpec) -> int:
    """Trials that fit at once: trials x workers x (CPU, GPU) per worker within the cluster."""
    w, gpus = max(1, spec.workers_per_trial), spec.gpus_per_worker or 0.0  # None (auto) is resolved before
    limits = [spec.num_samples]
    if spec.cpus_per_worker > 0:
        limits.append(int(resources.get("CPU", 0) // (w * spec.cpus_per_worker)))
    if gpus > 0:
        limits.append(int(resources.get("GPU", 0) // (w * gpus)))
    if spec.max_concurrent:
        limits.append(spec.max_concurrent)
    fit = min(limits)
    if fit < 1:
        raise StudyError(
            f"one trial needs {w} worker(s) x {spec.cpus_per_worker:g} CPU / {gpus:g} GPU, the cluster "
            f"has {resources.get('CPU', 0):g} CPU / {resources.get('GPU', 0):g} GPU: lower --workers-per-trial"
        )
    return fit


def warm_caches(cfg: Config, cohort) -> None:
    """Fill the on-disk sentence-embedding cache once in the driver, so that no trial builds
    the text encoder (concurrent trials would each build it)."""
    if cfg.model.use_tabular and cfg.model.tabular_embedding == "clip":
        from ..models.text import sentence_cache

        sentence_cache(cfg.data.cache_dir, cfg.model.text_pretrained).embed(
            sorted({s for c in cohort.cases for s in c.sentences})
        )


def find_child_run(client, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
        max_results=5,
    )
    return runs[0].info.run_id if runs else None


def find_parent_run(client, experiment_id: str, study_path: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_STUDY_PATH}` = '{study_path}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


TAG_HOLDOUT_DIGEST = "cfcml.holdout_ids_digest"
HOLDOUT_ARTIFACT = "holdout_ids.json"


def record_holdout(client, parent_id: str, spec: StudySpec, held: list) -> None:
    """The held-back patients on the parent run: param ``holdout`` (the fraction), tag
    ``cfcml.holdout_ids_digest`` and artifact ``holdout_ids.json`` (fraction, seed, ids, digest).
    A resumed study must hold back the same patients, or it is refused."""
    ids = [c.case_id for c in held]
    digest = ids_digest(ids) if ids else "none"
    tags = client.get_run(parent_id).data.tags
    if TAG_HOLDOUT_DIGEST in tags:
        if tags[TAG_HOLDOUT_DIGEST] != digest:
            raise StudyError(
                f"this study held back other patients (ids digest {tags[TAG_HOLDOUT_DIGEST][:12]}, now "
                f"{digest[:12]}): resume it with its own --holdout and --seed"
            )
        return
    client.log_param(parent_id, "holdout", spec.holdout)
    client.set_tag(parent_id, TAG_HOLDOUT_DIGEST, digest)
    record = {"fraction": spec.holdout, "seed": spec.seed, "ids": ids, "ids_digest": digest}
    client.log_text(parent_id, json.dumps(record, indent=2), HOLDOUT_ARTIFACT)


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in sorted(series.items()):
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", ms=3, label=label, lw=2.2 if label.startswith("cv") else 1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_confusion(y, p, classes, title: str):
    import numpy as np
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    cm = confusion_matrix(y, np.asarray(p).argmax(1), labels=list(range(len(classes))))
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_roc(y, p, classes, title: str):
    import numpy as np
    from sklearn.metrics import auc, roc_curve

    plt = _plt()
    y, p = np.asarray(y), np.asarray(p)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    shown = range(1, 2) if len(classes) == 2 else range(len(classes))
    for k in shown:
        positives = y == k
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, p[:, k])
        ax.plot(fpr, tpr, label=f"{classes[k]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _log_figure(client, run_id: str, fig, path: str) -> None:
    try:
        client.log_figure(run_id, fig, path)
    finally:
        _plt().close(fig)


def trial_validation_plot(client, run_id: str, runs: list[str]):
    """Per-fold validation AUC / loss curves of one trial, read back from MLflow."""
    series_auc = {"cv (selected epochs)": [(m.step, m.value) for m in client.get_metric_history(run_id, OBJECTIVE)]}
    series_loss = {}
    for r in runs:
        series_auc[f"{r} val"] = [(m.step, m.value) for m in client.get_metric_history(run_id, f"{r}/val_auc")]
        series_loss[f"{r} val"] = [(m.step, m.value) for m in client.get_metric_history(run_id, f"{r}/val_loss")]
        series_loss[f"{r} train"] = [(m.step, m.value) for m in client.get_metric_history(run_id, f"{r}/train_loss")]
    return plot_curves(series_auc, "validation AUC per fold", "AUC"), plot_curves(series_loss, "loss per fold", "loss")


# ----------------------------------------------------------------------------- the trial


def _trial(config: dict, ctx: dict) -> None:
    """Tune function trainable: one trial = one TorchTrainer run over all of the trial's folds."""
    from ray import tune

    from .tracking import call_with_retry, open_supervised_run, tag_error

    trial_id = tune.get_context().get_trial_id()
    params = dict(config)
    cfg = resolve_trial_config(ctx["preset"], ctx["overrides"], params, ctx["epochs"])

    # the trial's MLflow run: opened here, ended only by the study driver (StudyCallback), which
    # alone knows whether Tune completed, stopped (ASHA) or lost the trial
    mlflow_spec, client, run_id = None, None, None
    if ctx.get("tracking_uri"):
        import yaml
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(ctx["tracking_uri"])

        def open_run() -> str:  # retried whole while the server is away: a try finds the run an earlier one made
            existing = find_child_run(client, ctx["experiment_id"], ctx["parent_run_id"], trial_id)
            run_id = open_supervised_run(
                client,
                ctx["experiment_id"],
                run_id=existing,
                run_name=trial_run_name(params),
                parent_run_id=ctx["parent_run_id"],
                tags={TAG_TRIAL: trial_id, TAG_STUDY: ctx["study"]},
            )
            if existing is None or "trial_id" not in client.get_run(run_id).data.params:
                logged = {
                    **params,
                    "trial_id": trial_id,
                    "workers": ctx["workers"],
                    "runs": ",".join(r["name"] for r in ctx["runs"]),
                }
                client.log_batch(run_id, params=[Param(k, str(v)) for k, v in logged.items()])
                client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
            return run_id

        run_id = call_with_retry(open_run, f"open the MLflow run of trial {trial_id}")
        mlflow_spec = {
            "tracking_uri": ctx["tracking_uri"],
            "run_id": run_id,
            "system_metrics": ctx["system_metrics"],
            "system_metrics_interval": ctx["system_metrics_interval"],
        }
    try:
        _fit_trial(cfg, params, trial_id, ctx, mlflow_spec)
    except Exception as e:
        if client is not None:
            tag_error(client, run_id, e)  # the driver marks the run FAILED (on_trial_error)
        raise


def _fit_trial(cfg: Config, params: dict, trial_id: str, ctx: dict, mlflow_spec: dict | None) -> None:
    """Run the trial's folds as one Ray Train run, reporting every epoch to Tune."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    from .train_loop import train_loop_per_worker

    fault = ctx.get("fault")
    loop_config = {
        "cfg": cfg.to_dict(),
        "data": ctx["data"],
        "runs": ctx["runs"],
        "mlflow": mlflow_spec,
        "trial_id": trial_id,
        "spec": ctx["spec"],
        "decisions": ctx.get("decisions"),
        "holdout": ctx.get("holdout"),
        "fault": fault if fault and params == fault.get("params") else None,
    }
    gpus = ctx["gpus_per_worker"]
    reports = Queue(actor_options={"num_cpus": 0})  # filled by the Train controller as reports reach Tune
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=ctx["workers"],
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": ctx["cpus_per_worker"], **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=ray.train.RunConfig(
            name=trial_id,
            storage_path=ctx["train_storage"],
            failure_config=ray.train.FailureConfig(max_failures=ctx["max_failures"]),
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


def _report_counter_cls():
    """A Train callback that counts, in a Ray queue the trial driver reads, the reports that
    reached Tune during one `fit()` (public APIs only: `ray.train.UserCallback`, `ray.util.queue`)."""
    import ray.train

    class ReportCounter(ray.train.UserCallback):
        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            self.queue.put(1)

    return ReportCounter


def _study_callback_cls():
    from ray import tune

    class StudyCallback(tune.Callback):
        """Driver side: closes each trial's MLflow run (ASHA-stopped trials never return from
        their trainable) and logs its final objective and validation curves.

        The run's status, objective and outcome tags are written at once; the curves (metric
        histories read back, two figures rendered and uploaded: tens of seconds on a loaded
        2-core driver) are drawn on one background thread, so Tune's event loop is not held up.
        ``on_experiment_end`` (also on an interrupt) waits for the plots still being drawn."""

        def __init__(
            self,
            tracking_uri: str,
            experiment_id: str,
            parent_run_id: str,
            max_epochs: int,
            runs: list[str],
            rungs: list[int] = (),
        ):
            self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
            self.max_epochs, self.runs, self.rungs = max_epochs, runs, list(rungs)
            self._client = self._plotter = None
            self._plots, self._gave_up = [], False

        def __getstate__(self):  # Tune pickles callbacks with the experiment state
            state = dict(self.__dict__)
            state.update(_client=None, _plotter=None, _plots=[], _gave_up=False)
            return state

        @property
        def client(self):
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(self.tracking_uri)
            return self._client

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED")

        def on_experiment_end(self, trials, **info):
            self.wait_for_plots()

        def _close(self, trial, status: str) -> None:
            from .search_control import trial_outcome

            if self._plotter is None:
                from concurrent.futures import ThreadPoolExecutor

                self._plotter = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="trial-plots"
                )  # pyplot: one thread
            last = dict(trial.last_result or {})
            epochs = int(last.get("epoch", 0) or 0)
            tags, metrics = trial_outcome(status, last, self.max_epochs, self.rungs)  # PRUNED / COMPLETE / FAIL
            if OBJECTIVE in last:
                metrics = {"val_auc": float(last[OBJECTIVE]), **metrics}
            # on the background thread, retried while the tracking server is away: Tune's loop never waits for it
            now = int(time.time() * 1000)
            job = self._plotter.submit(self._finish, trial.trial_id, status, epochs, tags, metrics, now)
            self._plots.append((trial.trial_id, job))

        def _finish(self, trial_id: str, status: str, epochs: int, tags: dict, metrics: dict, now: int) -> None:
            from mlflow.entities import Metric, RunTag

            from .tracking import call_with_retry, terminate_run

            def close() -> str | None:  # idempotent: MLflow stores a metric with the same timestamp once
                run_id = find_child_run(self.client, self.experiment_id, self.parent_run_id, trial_id)
                if run_id is not None:
                    self.client.log_batch(
                        run_id,
                        metrics=[Metric(k, v, now, epochs) for k, v in metrics.items()],
                        tags=[RunTag(k, v) for k, v in tags.items()],
                    )
                    terminate_run(self.client, run_id, status)
                return run_id

            try:  # once the server has stayed away past one deadline, later trials try once
                run_id = call_with_retry(
                    close, f"close the run of trial {trial_id}", deadline_s=0 if self._gave_up else 300
                )
            except Exception as e:  # noqa: BLE001 - bookkeeping must not stop the study
                self._gave_up = True
                log.warning("could not close the MLflow run of trial %s: %s", trial_id, redact(e))
                return
            if run_id is not None:
                self._plot(run_id)

        def _plot(self, run_id: str) -> None:
            auc_fig, loss_fig = trial_validation_plot(self.client, run_id, self.runs)
            _log_figure(self.client, run_id, auc_fig, "plots/validation_auc.png")
            _log_figure(self.client, run_id, loss_fig, "plots/loss.png")

        def wait_for_plots(self) -> None:
            for trial_id, future in self._plots:
                try:
                    future.result()
                except Exception as e:  # noqa: BLE001 - a missing plot must not stop the study
                    log.warning("could not plot the validation curves of trial %s: %s", trial_id, redact(e))
            self._plots = []
            if self._plotter is not None:
                self._plotter.shutdown(wait=True)
                self._plotter = None

    return StudyCallback


# ----------------------------------------------------------------------------- the study


def _init_ray(spec: StudySpec) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=spec.ray_address, log_to_driver=True)


def _trial_counts(name: str, optuna_url: str) -> tuple[int, int]:
    """(closed, open) trials of the Optuna study: closed = COMPLETE, PRUNED or FAIL; open =
    asked but never told (RUNNING/WAITING). After a SIGINT, Tune returns normally and marks its
    live trials TERMINATED in memory, so the Optuna study (told only when a trial really ends)
    is what tells a finished search from an interrupted one."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=optuna_url)
    closed = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in study.trials)
    return closed, len(study.trials) - closed


def run_study(spec: StudySpec) -> dict:
    """Run (or resume) a study end to end; returns a summary (best trial, test table, model)."""
    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient
    from ray import tune

    from cfcml.datasets.reader import load_cohort
    from cfcml.datasets.spec import shipped

    from ..engine.protocol import protocol_runs
    from . import search_control as sc  # budget, pruned trials, rung decisions
    from .pyfunc import git_commit, package_versions
    from .report_logging import ensure_experiment, log_cohort
    from .study_views import log_study_views
    from .tracking import end_running_children, mlflow_run, sweep_stale_runs
    from .tracking_server import TrackingServerError, check_tracking_server

    if spec.tracking_uri and spec.tracking_uri.split("://", 1)[0].lower() in ("http", "https"):
        try:  # a server that does not answer: one line in seconds, before Ray or Optuna start anything
            check_tracking_server(spec.tracking_uri)
        except TrackingServerError as e:
            raise StudyError(str(e)) from None

    overrides = list(spec.overrides)
    if spec.dataset:
        overrides.insert(0, f"dataset={json.dumps(spec.dataset)}")
    base = build_config(spec.preset, parse_overrides(overrides))
    if not Path(base.data.cache_dir).is_absolute():  # trials run in other working directories
        overrides.append(f"data.cache_dir={Path(base.data.cache_dir).resolve()}")
    cfg = resolve_trial_config(spec.preset, overrides, {}, spec.epochs)
    space_file = Path(spec.search_space) if spec.search_space else default_search_space(cfg)
    space = load_search_space(space_file, cfg)
    first = space.first_point(cfg)
    data = str(Path(spec.data).expanduser().resolve())
    check_pretrained(cfg)  # refuse in the driver, before any trial starts
    cohort_spec = load_spec(cfg.dataset)
    full = load_cohort(cohort_spec, data)
    try:  # `cohort` is what the study sees; `held`: patients nothing in it ever sees
        cohort, held = hold_out(full, spec.holdout, spec.seed)
    except ConfigError as e:
        raise StudyError(str(e)) from None
    runs = protocol_runs(cfg, cohort)[: spec.search_runs or None]
    name = spec.name or cfg.name
    storage = normalize_storage(spec.storage)
    study_path = join_uri(storage, name)
    train_storage = join_uri(storage, f"{name}_train")
    fs, _ = storage_filesystem(study_path)
    exists = tune.Tuner.can_restore(study_path)
    if exists and not spec.resume:
        raise StudyError(
            f"a study already exists at {redact(study_path)}: pass --resume to continue it, or another --name"
        )
    restoring = spec.resume and exists
    if spec.resume and not exists:
        log.warning("nothing to resume at %s: starting the study", redact(study_path))
    optuna_url = spec.optuna_storage or (
        f"sqlite:///{Path(storage) / f'{name}.optuna.db'}"
        if "://" not in storage
        else f"sqlite:///{Path('~/.cache/cfcml/optuna').expanduser() / f'{name}.db'}"
    )
    if optuna_url.startswith("sqlite:///"):
        Path(optuna_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if not restoring:
        try:
            optuna.load_study(study_name=name, storage=optuna_url)
            raise StudyError(
                f"Optuna study {name!r} already exists in {redact(optuna_url)}; use --resume or another --name"
            )
        except KeyError:
            pass

    _init_ray(spec)
    import ray

    resources = ray.cluster_resources()
    if spec.gpus_per_worker is None:  # "auto": use the hardware the cluster has
        spec = dataclasses.replace(spec, gpus_per_worker=1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    concurrent = plan_concurrency(resources, spec)
    log.info("cluster %s: up to %d concurrent trial(s) of %d worker(s)", resources, concurrent, spec.workers_per_trial)
    warm_caches(cfg, full)

    tracking_uri = spec.tracking_uri or mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = spec.experiment or f"cfcml-{cohort_spec.name}"
    experiment_id = ensure_experiment(client, experiment)  # tagged as model training
    sweep_stale_runs(client, experiment_id, tags={TAG_STUDY: name})  # runs whose driver died (SIGKILL, OOM)
    parent_id = find_parent_run(client, experiment_id, redact(study_path)) if restoring else None
    if parent_id:
        end_running_children(client, parent_id, "KILLED")  # trials that died with the last driver
    digest = full.digest()
    commit = spec.git_commit or git_commit()

    if spec.system_metrics:
        mlflow.system_metrics.set_system_metrics_sampling_interval(spec.system_metrics_interval)
    with mlflow_run(
        run_name=name,
        experiment_id=experiment_id,
        run_id=parent_id,
        tracking_uri=tracking_uri,
        tags={
            TAG_STUDY: name,
            TAG_STUDY_PATH: redact(study_path),
            "optuna.storage": redact(optuna_url),
            "optuna.study_name": name,
            "ray.storage": redact(study_path),
            "data.digest": digest,
            "git.commit": commit,
        },
        log_system_metrics=spec.system_metrics,
    ) as parent:
        parent_id = parent.info.run_id
        log_cohort(client, parent_id, full, data)  # the cohort as the study's dataset (once per digest)
        record_holdout(client, parent_id, spec, held)
        if not restoring:
            mlflow.log_params(
                {
                    "preset": spec.preset,
                    "dataset": cohort_spec.name,
                    "data": redact(data),
                    "num_samples": spec.num_samples,
                    "max_concurrent_trials": concurrent,
                    "workers_per_trial": spec.workers_per_trial,
                    "cpus_per_worker": spec.cpus_per_worker,
                    "gpus_per_worker": spec.gpus_per_worker,
                    "epochs": cfg.train.epochs,
                    "search_runs": ",".join(r["name"] for r in runs),
                    "seed": spec.seed,
                    "sampler": f"optuna.TPESampler({', '.join(f'{k}={v}' for k, v in space.sampler.items())})",
                    "budget_epochs": spec.budget_epochs or "none",
                    "scheduler": f"ASHA(time_attr=epoch, grace_period={space.asha['grace_period']}, "
                    f"reduction_factor={space.asha['reduction_factor']})",
                    "metric": space.metric,
                    "mode": space.mode,
                    "max_failures": spec.max_failures,
                    "overrides": redact(" ".join(spec.overrides)) or "none",
                    **{f"pretrained.{k}": v for k, v in pretrained_provenance(cfg).items()},
                    **{f"space.{k}": v for k, v in space.describe().items()},
                }
            )
            mlflow.log_text(space.source, f"search_space/{space_file.name}")
            with tempfile.TemporaryDirectory() as tmp:
                save_config(cfg, Path(tmp) / "config.yaml")
                mlflow.log_artifact(str(Path(tmp) / "config.yaml"))
            mlflow.log_text(
                f"Optuna study '{name}' in {redact(optuna_url)}\n"
                f"optuna-dashboard {redact(optuna_url)}\n"
                f"python -c \"import optuna; print(optuna.load_study(study_name='{name}', storage='{redact(optuna_url)}').trials_dataframe())\"\n",
                "optuna_study.txt",
            )
            mlflow.set_tags({f"version.{k}": v for k, v in package_versions().items()})

        ctx = {
            "preset": spec.preset,
            "overrides": overrides,
            "epochs": cfg.train.epochs,
            "data": data,
            "runs": runs,
            "spec": shipped(cohort_spec),
            "study": name,
            "tracking_uri": tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_id,
            "workers": spec.workers_per_trial,
            "cpus_per_worker": spec.cpus_per_worker,
            "gpus_per_worker": spec.gpus_per_worker,
            "max_failures": spec.max_failures,
            "train_storage": train_storage,
            "system_metrics": spec.system_metrics,
            "system_metrics_interval": spec.system_metrics_interval,
            "fault": spec.fault and {**spec.fault, "params": first},  # the first trial (the preset's point)
            "holdout": [c.case_id for c in held] or None,
        }
        grace = min(int(space.asha["grace_period"]), cfg.train.epochs)
        try:
            sc.check_first_rung(grace, sc.latest_first_candidate(cfg.train, space.params), "search space")
        except ValueError as e:
            raise StudyError(str(e)) from None
        rungs = sc.asha_rungs(grace, float(space.asha["reduction_factor"]), cfg.train.epochs)
        board = sc.board_name(name)  # rung decisions reach the Train workers through it (search_control)
        sc.open_board(board)
        ctx["decisions"] = {"board": board, "epochs": [r for r in rungs if r < cfg.train.epochs]}
        # the trial driver only waits on its Train run: it takes no CPU (a token of memory, as Tune
        # refuses an empty request), so CPUs/GPUs go to Train workers and concurrency is set above
        trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"CPU": 0, "memory": 2**20})
        budget = None
        if spec.budget_epochs and not restoring:  # a restored study restores its budget with the searcher
            budget = sc.EpochBudget(spec.budget_epochs, len(runs), [*rungs, cfg.train.epochs])
        if restoring:
            tuner = tune.Tuner.restore(
                study_path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
            )
        else:
            searcher = sc.PrunedAwareOptunaSearch(
                space=space.distributions(),
                metric=space.metric,
                mode=space.mode,
                points_to_evaluate=[first],
                sampler=optuna.samplers.TPESampler(seed=spec.seed, **space.sampler),
                study_name=name,
                storage=optuna.storages.RDBStorage(optuna_url),
                max_epochs=cfg.train.epochs,
                budget=budget,
            )
            scheduler = sc.RungSyncASHA(
                time_attr="epoch",
                max_t=cfg.train.epochs,
                grace_period=grace,
                reduction_factor=float(space.asha["reduction_factor"]),
                board=board,
                decision_epochs=ctx["decisions"]["epochs"],
            )
            callback = _study_callback_cls()(
                tracking_uri, experiment_id, parent_id, cfg.train.epochs, [r["name"] for r in runs], rungs
            )
            progress = study_progress_callback(spec.num_samples, cfg.train.epochs, space.metric, spec.quiet)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=space.metric,
                    mode=space.mode,
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=spec.num_samples,
                    max_concurrent_trials=concurrent,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    callbacks=[c for c in (callback, progress) if c],
                    verbose=1,
                    stop=sc.BudgetStopper(budget, board) if budget else None,
                ),
            )
        t0 = time.time()
        try:
            results = tuner.fit()
        finally:
            end_running_children(client, parent_id, "KILLED")
        mlflow.log_metric("search_seconds", time.time() - t0)
        finished, unfinished = _trial_counts(name, optuna_url)
        # a budget ends the search before num_samples: then only trials left open mean an interrupt
        ended_by_budget = bool(spec.budget_epochs) and not unfinished and (budget is None or budget.exhausted)
        if unfinished or (finished < spec.num_samples and not ended_by_budget):
            mlflow.set_tag("cfcml.status", "interrupted")
            raise StudyInterrupted(
                f"study {name} interrupted; continue it with --resume (same --name {name} and --storage)"
            )
        mlflow.set_tag("cfcml.status", "searched")
        views = log_study_views(client, parent_id, name, optuna_url, len(runs), budget)  # importances, history, ...
        return views | _after_search(
            spec,
            results,
            cfg,
            space,
            cohort,
            runs,
            client,
            parent_id,
            experiment_id,
            fs,
            study_path,
            overrides,
            digest,
            commit,
            optuna_url,
            name,
            full=full,
            held=held,
        )


def _after_search(
    spec,
    results,
    cfg,
    space: SearchSpace,
    cohort,
    runs,
    client,
    parent_id,
    experiment_id,
    fs,
    study_path,
    overrides,
    digest,
    commit,
    optuna_url,
    name,
    full=None,
    held=(),
) -> dict:
    import mlflow
    import ray.train

    from .report_logging import study_report
    from .train_loop import OBJECTIVE as objective

    frame = results.get_dataframe()
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / "trials.csv", index=False)
        mlflow.log_artifact(str(Path(tmp) / "trials.csv"))
    curves = {}
    for r in results:
        if r.metrics_dataframe is not None and objective in r.metrics_dataframe:
            df = r.metrics_dataframe
            curves[r.metrics.get("trial_id", "?")] = list(zip(df["epoch"].astype(int), df[objective].astype(float)))
    _log_figure(
        client,
        parent_id,
        plot_curves(curves, "cv_val_auc of every trial (ASHA rungs)", "cv_val_auc"),
        "plots/search_curves.png",
    )

    ok = [r for r in results if r.error is None and objective in (r.metrics or {})]
    if not ok:
        raise StudyError("no trial finished without error: nothing to evaluate")
    best = results.get_best_result(metric=objective, mode=space.mode, scope="last")
    trial_id = best.metrics["trial_id"]
    params = {k: v for k, v in best.config.items()}
    best_cfg = resolve_trial_config(spec.preset, overrides, params, cfg.train.epochs)
    best_run = find_child_run(client, experiment_id, parent_id, trial_id)
    summary = {
        "study": name,
        "study_path": redact(study_path),
        "parent_run_id": parent_id,
        "experiment_id": experiment_id,
        "trials": len(results),
        "best_trial_id": trial_id,
        "best_run_id": best_run,
        "best_params": params,
        "best_cv_val_auc": float(best.metrics[objective]),
        "best_epochs": int(best.metrics.get("epoch", 0)),
        "optuna_storage": redact(optuna_url),
        "tracking_uri": redact(mlflow.get_tracking_uri()),
    }
    mlflow.log_metric("best_cv_val_auc", summary["best_cv_val_auc"])
    mlflow.set_tags({"cfcml.best_trial_id": trial_id, "cfcml.best_run_id": best_run or ""})
    parent_tags = client.get_run(parent_id).data.tags
    if parent_tags.get(TAG_FINAL) == "done":
        log.info("the best trial was already evaluated and registered; nothing left to do")
        summary |= json.loads(parent_tags.get("cfcml.final_summary", "{}"))
        return summary

    work = Path(spec.work_dir) if spec.work_dir else Path(tempfile.mkdtemp(prefix="cfcml-study-"))
    try:
        ckpt_dir = work / "best_checkpoint"
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ray.train.Checkpoint(best.metrics["checkpoint_path"], filesystem=fs).to_directory(str(ckpt_dir))
        test = evaluate_where_trials_ran(
            spec,
            best_cfg,
            cohort,
            runs,
            ckpt_dir,
            best.metrics["checkpoint_path"],
            study_path,
            holdout=[c.case_id for c in held],
        )
        _log_test(client, parent_id, best_run, test, best_cfg)
        summary["test"] = {k: v for k, v in test["summary"]["metrics"].items()}
        summary["test_markdown"] = test["markdown"]
        report = study_report(cohort, runs, ckpt_dir, work / "report", client, [parent_id, best_run], summary, commit)
        if spec.register:
            summary |= register_best(
                spec,
                best_cfg,
                cohort,
                runs,
                test,
                ckpt_dir,
                work,
                client,
                best_run,
                trial_id,
                summary,
                digest,
                commit,
                name,
                report=report,
                full=full,
                held=held,
            )
        final = {k: summary[k] for k in ("model_name", "model_version", "model_uri", "evaluation") if k in summary}
        client.set_tag(parent_id, "cfcml.final_summary", json.dumps(final))
        client.set_tag(parent_id, TAG_FINAL, "done")
    finally:
        if not spec.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def evaluate_where_trials_ran(
    spec: StudySpec,
    cfg: Config,
    cohort,
    runs: list[dict],
    ckpt_dir: Path,
    checkpoint_path: str,
    storage: str,
    holdout: list[str] | None = None,
) -> dict:
    """`evaluate_best` on the hardware the trials used: in the driver (CPU) when they trained
    on CPUs, else as a Ray task holding a GPU; its predictions and metrics files come back
    into `ckpt_dir` either way."""
    if not spec.gpus_per_worker:
        return evaluate_best(cfg, spec.data, cohort, runs, ckpt_dir, device="cpu")
    import ray

    from cfcml.datasets.spec import shipped

    task = ray.remote(num_gpus=min(1.0, spec.gpus_per_worker), num_cpus=spec.cpus_per_worker)(_evaluate_task)
    args = (cfg.to_dict(), shipped(cohort.spec), spec.data, runs, checkpoint_path, storage, holdout)
    result, files = ray.get(task.remote(*args))
    for rel, blob in files.items():
        (ckpt_dir / rel).write_bytes(blob)
    return result


def _evaluate_task(
    cfg_dict: dict,
    cohort_spec: dict,
    data: str,
    runs: list[dict],
    checkpoint_path: str,
    storage: str,
    holdout: list[str] | None = None,
) -> tuple[dict, dict]:
    """Ray task body: fetch the best trial's checkpoint, evaluate it on this node's device."""
    import ray.train

    from cfcml.datasets.reader import load_cohort
    from cfcml.datasets.spec import remember

    from ..config import config_from_dict
    from ..engine.run import METRICS, PREDICTIONS

    spec = remember(cohort_spec)
    cfg = config_from_dict(cfg_dict)
    fs, _ = storage_filesystem(storage)
    with tempfile.TemporaryDirectory(prefix="cfcml-eval-") as tmp:
        ray.train.Checkpoint(checkpoint_path, filesystem=fs).to_directory(tmp)
        cohort = without_cases(load_cohort(spec, data), holdout)  # what the trials trained on
        result = evaluate_best(cfg, data, cohort, runs, Path(tmp), device=cfg.train.device)
        files = {
            f"{r['name']}/{n}": (Path(tmp) / r["name"] / n).read_bytes() for r in runs for n in (PREDICTIONS, METRICS)
        }
    return result, files


def evaluate_best(cfg: Config, data: str, cohort, runs: list[dict], ckpt_dir: Path, device: str = "cpu") -> dict:
    """Test the best trial once: each run from its checkpoint, with the weights of its epoch
    selected on validation; also its validation predictions (for plots)."""
    import numpy as np

    from ..engine.metrics import metric_names
    from ..engine.run import PREDICTIONS, TrainingRun
    from ..engine.summary import markdown_table, summarize_runs

    cfg.train.device = device
    per_run, preds = [], {"test": ([], []), "val": ([], [])}
    for r in runs:
        run = TrainingRun(
            cfg, data, ckpt_dir / r["name"], fold=r.get("fold"), seed=r.get("seed"), resume=True, cohort=cohort
        )
        result = run.finish()
        saved = np.load(ckpt_dir / r["name"] / PREDICTIONS)
        for part in ("test", "val"):
            preds[part][0].append(saved[f"{part}_labels"])
            preds[part][1].append(saved[f"{part}_probs"])
        per_run.append(
            {
                "name": r["name"],
                "metrics": result["test"],
                "selected_epoch": result["selected_epoch"],
                "numeric_stats": run.numeric_stats,
            }
        )
    summary = summarize_runs([{k: v for k, v in r.items() if k != "numeric_stats"} for r in per_run])
    spec = cohort.spec
    md = markdown_table(
        summary,
        spec,
        title=f"best trial: test results (%, mean ± std over {len(per_run)} {spec.run_unit}; "
        "epochs selected on validation, test evaluated once)",
    )
    pooled = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in preds.items()}
    return {
        "runs": per_run,
        "summary": summary,
        "markdown": md,
        "pooled": pooled,
        "metric_names": metric_names(spec.classes),
    }


def _log_test(client, parent_id: str, best_run: str | None, test: dict, cfg: Config) -> None:
    from ..config import cohort_spec

    classes = cohort_spec(cfg).classes
    targets = [parent_id] + ([best_run] if best_run else [])
    for run_id in targets:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for name, stats in test["summary"]["metrics"].items():
            for stat in ("mean", "std"):
                if not math.isnan(stats[stat]):
                    metrics.append(Metric(f"test_{name}_{stat}", float(stats[stat]), now, 0))
        for r in test["runs"]:
            metrics += [
                Metric(f"test/{r['name']}/{k}", float(v), now, 0) for k, v in r["metrics"].items() if not math.isnan(v)
            ]
        client.log_batch(run_id, metrics=metrics)
        client.log_text(run_id, test["markdown"] + "\n", "best_trial/test_summary.md")
        client.log_text(
            run_id,
            json.dumps(
                {k: v for k, v in test["summary"].items() if k != "runs"}
                | {"runs": [{k: v for k, v in r.items() if k != "numeric_stats"} for r in test["runs"]]},
                indent=2,
                default=float,
            ),
            "best_trial/test_summary.json",
        )
        for split, (y, p) in test["pooled"].items():
            label = "test (pooled over folds)" if split == "test" else "validation at the selected epochs"
            _log_figure(
                client,
                run_id,
                plot_confusion(y, p, classes, f"confusion matrix, {label}"),
                f"plots/confusion_{split}.png",
            )
            _log_figure(client, run_id, plot_roc(y, p, classes, f"ROC, {label}"), f"plots/roc_{split}.png")


def register_best(
    spec,
    cfg,
    cohort,
    runs,
    test,
    ckpt_dir: Path,
    work: Path,
    client,
    best_run,
    trial_id,
    summary,
    digest,
    commit,
    study,
    report: dict | None = None,
    full=None,
    held=(),
) -> dict:
    """Package the best trial's runs as a pyfunc, measure the package as `cfcml predict` loads
    it on the patients nothing in the study saw (`cfcml.platform.artifact_eval`), ship that as
    evaluation.json inside it, and register it: the version's metrics, tags, card and report
    are the package's own (or, without untouched patients, say that they are a single fold
    model's cross-validated estimate)."""
    import mlflow

    from .artifact_eval import evaluation_set, member_seen_ids, write_evaluation
    from .protocol_digest import protocol_record
    from .pyfunc import ALIAS, build_package, log_model, package_versions, tag_version
    from .report_logging import cohort_dataset, link_model, package_meta, version_tags
    from .tracking import mlflow_run

    full = full or cohort
    evalset = evaluation_set(full, cohort, list(held), digest)
    by_name = {r["name"]: r for r in test["runs"]}
    meta = {
        "study": study,
        "trial_id": trial_id,
        "cv_val_auc": summary["best_cv_val_auc"],
        "data_digest": digest,
        "evaluation_kind": evalset.kind,
        "members_seen": member_seen_ids(cfg, cohort, runs),
        **_calibration_meta(cfg, ckpt_dir, runs, package_meta),
    }
    members = [
        {
            "name": r["name"],
            "weights": ckpt_dir / r["name"] / "best.pt",
            "numeric_stats": by_name[r["name"]]["numeric_stats"],
        }
        for r in runs
    ]
    package = build_package(cfg, members, full, work / "package", extra_meta=meta)
    record, own_report = measure_package(
        package, cohort, full, evalset, ckpt_dir, runs, work, report, study_meta_for(summary, commit, cfg, evalset)
    )
    write_evaluation(record, package)
    suffix = "" if cfg.model.method == "cfcml" else f"-{cfg.model.method}"  # baselines never meet CFCML's gate
    model_name = spec.model_name or f"cfcml-{cohort.spec.name}{suffix}"
    with mlflow_run(run_id=best_run, nested=True, tracking_uri=spec.tracking_uri) if best_run else nullcontext():
        mlflow.log_param("data.digest", digest)  # the promotion gate compares it between versions
        protocol = protocol_record(cfg, runs, spec.holdout)  # and the protocol (cfcml.protocol_digest)
        mlflow.log_params(protocol)
        info = log_model(
            package,
            full.spec,
            registered_model_name=model_name,
            metadata={
                "trial_id": trial_id,
                "study": study,
                "cv_val_auc": summary["best_cv_val_auc"],
                "evaluation_kind": evalset.kind,
            },
        )
    version = str(info.registered_model_version)
    own = evaluation_metrics(record, own_report)
    link_model(client, summary["parent_run_id"], info.model_id, None, cohort_dataset(full, str(full.root)))
    mlflow.log_metrics(own, run_id=summary["parent_run_id"], synchronous=True)
    if evalset.kind != "out_of_fold":  # the model's own numbers; a fold model's CV estimate is not
        mlflow.log_metrics(own, run_id=summary["parent_run_id"], model_id=info.model_id, synchronous=True)
    client.log_text(summary["parent_run_id"], json.dumps(record, indent=2), "evaluation.json")
    tags = version_tags(trial_id, digest, commit, pretrained_provenance(cfg), package_versions()["cfcml"])
    tags |= {
        "method": cfg.model.method,
        "evaluation.kind": evalset.kind,
        "evaluation.ids_digest": record["ids_digest"],
        "evaluation.data_digest": record["data_digest"],
        "evaluation.n": str(record["n"]),
        **protocol,
    }
    if evalset.kind != "out_of_fold":
        tags |= {k: f"{v:.6g}" for k, v in own.items()}
    tag_version(client, model_name, version, tags, alias=ALIAS)
    describe_model(client, model_name, version, own_report, evalset.kind)
    uri = f"models:/{model_name}@{ALIAS}"
    log.info(
        "registered %s version %s (%s); measured on %d %s patient(s)",
        model_name,
        version,
        uri,
        record["n"],
        evalset.kind,
    )
    evaluation = {k: record[k] for k in ("kind", "ids_digest", "n", "metrics")}
    return {
        "model_name": model_name,
        "model_version": version,
        "model_uri": uri,
        "model_info_uri": info.model_uri,
        "evaluation": evaluation,
    }


def _calibration_meta(cfg: Config, ckpt_dir: Path, runs: list[dict], package_meta) -> dict:
    """The package's temperature: fitted on the ensemble's own validation probabilities where
    every member selected on the same patients (a `files` cohort's valid split); with folds
    (no patient is unseen by every member) on the members' pooled validation logits, as said."""
    from .artifact_eval import ensemble_temperature

    if not cfg.report.temperature:
        return {}
    t = ensemble_temperature([ckpt_dir / r["name"] for r in runs])
    if t is not None:
        return {"temperature": t, "temperature_fitted_on": "the ensemble's probabilities on the validation split"}
    return package_meta(cfg, ckpt_dir, runs) | {
        "temperature_fitted_on": "each fold model's validation logits, pooled (no validation patient is unseen by "
        "every fold model)"
    }


def study_meta_for(summary: dict, commit: str, cfg: Config, evalset) -> dict:
    """Report header facts for the package's own report."""
    from .artifact_eval import ESTIMATES
    from .report_logging import study_meta

    return study_meta(summary, commit) | {
        "preset": cfg.name,
        "method": cfg.model.method,
        "data_digest": evalset.data_digest,
        "selection_rule": "the study's best trial; per member the epoch selected on its validation part",
        "split_description": f"{evalset.kind}: {ESTIMATES[evalset.kind]}",
    }


def measure_package(
    package: Path,
    cohort,
    full,
    evalset,
    ckpt_dir: Path,
    runs: list[dict],
    work: Path,
    members_report: dict | None,
    meta: dict,
) -> tuple[dict, dict | None]:
    """(evaluation.json's record, the report the version carries). With untouched patients the
    package is saved as an MLflow model, loaded by `cfcml predict`'s loader and scored on them;
    its report takes thresholds from the ensemble's validation-side probabilities (a `files`
    cohort's valid split scored by the package; with folds, the members' own validation parts).
    Without (out_of_fold), the members' pooled out-of-fold predictions and their report."""
    from ..engine.decision import decision_from_dict
    from ..report.build import build_report
    from ..report.from_runs import pooled_predictions, read_run
    from ..report.inputs import SplitPredictions
    from .artifact_eval import artifact_report_inputs, evaluation_record, score_frame
    from .predict import load_model
    from .pyfunc import save_model

    folders = [read_run(ckpt_dir / r["name"]) for r in runs]
    decision = decision_from_dict(json.loads((Path(package) / "meta.json").read_text()).get("decision"))
    meta = {**meta, "decision": decision.to_dict()}  # the package's hard-label rule, for its own report and card
    if evalset.kind == "out_of_fold":
        oof = pooled_predictions(folders, "test")
        return evaluation_record(evalset, full.spec, oof.case_ids, oof.labels, oof.probs, decision), members_report
    local = work / "measured_model"
    shutil.rmtree(local, ignore_errors=True)
    model = load_model(str(save_model(package, full.spec, local)))
    ids, labels, probs = score_frame(model, full, evalset.cases)
    record = evaluation_record(evalset, full.spec, ids, labels, probs, decision)
    if evalset.kind == "test_split":
        v_ids, v_labels, v_probs = score_frame(model, full, cohort.split("valid"))
        val = SplitPredictions(v_ids, v_labels, v_probs, runs=["package"] * len(v_ids))
    else:
        val = pooled_predictions(folders, "val")
    try:
        inputs = artifact_report_inputs(full, record, labels, probs, val, meta)
        own = build_report(inputs, work / "model_report")
    except Exception as e:  # noqa: BLE001 - the report is evidence; evaluation.json stands without it
        log.warning("could not build the registered model's own report: %s", redact(e))
        return record, None
    return record, own


def evaluation_metrics(record: dict, report: dict | None) -> dict[str, float]:
    """The version's metrics: ``<kind>_<metric>`` from evaluation.json, with the report's
    bootstrap CI as ``<kind>_<metric>_ci_low`` / ``_ci_high`` where it has one."""
    from .artifact_eval import METRIC_PREFIX, metric_names_for

    out = metric_names_for(record["kind"], record["metrics"])
    if report is not None and record["kind"] != "out_of_fold":
        prefix = METRIC_PREFIX[record["kind"]]
        for name, m in (report.get("metrics") or {}).items():
            lo, hi = (m.get("ci") or [None, None])[:2]
            if f"{prefix}_{name}" in out and isinstance(lo, int | float) and isinstance(hi, int | float):
                out[f"{prefix}_{name}_ci_low"], out[f"{prefix}_{name}_ci_high"] = float(lo), float(hi)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def describe_model(client, name: str, version: str, report: dict | None, kind: str) -> None:
    """The model card as the version's description, opening with what its numbers estimate."""
    from ..report.card import REGISTRY_DESCRIPTION_MAX, model_card_markdown
    from .artifact_eval import ESTIMATES

    if kind == "out_of_fold":
        lead = (
            "**What these numbers are:** the cross-validated estimate of a single fold model (each patient scored "
            "by the fold model that did not train on it). The registered model averages the fold models; every "
            "patient here trained or selected some of them, so its own accuracy has not been measured: run a "
            "study with --holdout to measure it.\n\n"
        )
    else:
        lead = f"**What these numbers are:** {ESTIMATES[kind]}; measured by loading this package as `cfcml predict` does.\n\n"
    card = model_card_markdown(report, REGISTRY_DESCRIPTION_MAX - len(lead)) if report else ""
    client.update_model_version(name, str(version), description=lead + card)
