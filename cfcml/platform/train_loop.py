"""The Ray Train worker function: one trial's runs (MEN folds / Derm7pt seeds) in lockstep.

Every worker of a `ray.train.torch.TorchTrainer` runs :func:`train_loop_per_worker`. Ray Train
has already initialised torch.distributed (gloo on CPU, NCCL on GPU), so each
:class:`~cfcml.engine.run.TrainingRun` wraps its model in DDP, draws its share of the
class-balanced batches, computes CCRM on the all-gathered global batch and gathers validation
predictions across ranks before metrics — every rank therefore holds the same metrics.

One iteration = one epoch of *every* run of the trial (fold 1, fold 2, fold 3 — or the seeds):
after it the worker reports the cross-validated objective (``cv_val_auc``), so a Tune
scheduler's rungs are epochs of the CV objective and stopping a trial stops all its folds.

Each report carries a checkpoint (rank 0): a directory with each run's ``last.pt`` /
``best.pt`` / ``config.yaml`` and ``state.json``. When Ray Train restarts a failed worker
group (``FailureConfig(max_failures=...)``), or a resumed study re-launches the trial, the
workers download that checkpoint and every run continues from its ``last.pt``.

Rank 0 also logs the per-epoch metrics of every run to the trial's MLflow run (``fold1/val_auc``,
``cv_val_auc``, ...) and samples system metrics there, and tags it with the Ray node of every rank
(``cfcml.train_nodes``: node ids by rank, comma-separated; rewritten when a restart moves them).

Ray (also through `.search_control`), MLflow (also through `.delivery`) and the training run
(`cfcml.engine.run`, which loads MONAI and with it MLflow) are imported inside the functions a
worker runs: the study's callback and plots import this module for ``OBJECTIVE`` and stay free
of Ray and MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cfcml.datasets.reader import load_cohort
from cfcml.datasets.spec import remember

from ..config import config_from_dict
from ..engine.splits import without_cases
from .redact import redact

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
RUN_FILES = ("last.pt", "best.pt", "config.yaml")
OBJECTIVE = "cv_val_auc"
TAG_TRAIN_NODES = "cfcml.train_nodes"


def _nanmean(values) -> float:
    arr = np.array([v for v in values if v is not None], dtype=float)
    if arr.size == 0 or np.isnan(arr).all():
        return float("nan")
    return float(np.nanmean(arr))


def selected_value(run, key: str = "val_auc") -> float:
    """`key` at the epoch model selection currently picks for `run` (NaN before any epoch)."""
    best = run.best.get("epoch")
    if best is None:
        return float("nan")
    return float(run.history[best].get(key, float("nan")))


def cv_metrics(runs, records: list[dict], trained=None) -> dict:
    """What a trial reports after one lockstep epoch (Tune's and Optuna's view of it).

    - ``cv_val_auc``, the study's objective: the mean over runs of the validation AUC (the epoch's
      own, not the windowed score) at the epoch each run's selection picks so far — the weights
      each fold would ship with. It changes only when some run selects a new epoch and can then
      go down (selection ranks epochs by the mean over ``train.select_window`` epochs, this
      reports the selected epoch's own AUC). It is NaN until every run has a candidate epoch
      (``first_candidate_epoch``: a full window after the LR warm-up); ``cv_candidate`` is 0
      then. ASHA's first rung lies at or after the first candidate (search spaces are checked),
      and the searcher skips NaN intermediate values.
    - ``cv_val_auc_epoch``, ``cv_val_loss``, ``cv_train_loss``: means over runs of this epoch.
    - ``<run>/<metric>``: every run's record (train_*, val_*, lr) and ``<run>/selected_epoch``.

    `records` belong to the runs in `trained` (default: all `runs`); a run stopped by
    ``train.patience`` trains no more epochs but keeps its selected epoch in the objective.
    """
    epoch = int(records[0]["epoch"]) + 1  # epochs completed (ASHA's time attribute)
    candidate = all(r.best["epoch"] is not None for r in runs)
    out = {
        "epoch": epoch,
        OBJECTIVE: _nanmean(selected_value(r) for r in runs) if candidate else float("nan"),
        "cv_candidate": int(candidate),
        "cv_val_auc_epoch": _nanmean(rec.get("val_auc") for rec in records),
        "cv_val_loss": _nanmean(rec.get("val_loss") for rec in records),
        "cv_train_loss": _nanmean(rec.get("train_loss") for rec in records),
    }
    for run, rec in zip(runs if trained is None else trained, records):
        name = run.split.name
        for key, value in rec.items():
            if key.startswith(("train_", "val_")) or key in ("lr", "seconds"):
                out[f"{name}/{key}"] = float(value)
        out[f"{name}/selected_epoch"] = -1 if run.best["epoch"] is None else int(run.best["epoch"]) + 1
    return out


class _Tracker:
    """Rank 0's MLflow logging into the trial's run (no-op elsewhere or without MLflow).

    Metrics go through a :class:`~cfcml.platform.delivery.MetricSender`: training never waits for
    the tracking server, values it misses while away are sent when it is back, and what never
    arrives within ``spec["flush_timeout_s"]`` (default 120 s) after the last epoch is counted in
    the run's ``cfcml.metrics_lost`` tag."""

    def __init__(self, spec: dict | None, rank: int, resumed: bool):
        self.client = self.monitor = self.sender = None
        if not spec or rank != 0 or not spec.get("run_id"):
            return
        from mlflow.tracking import MlflowClient

        from .delivery import MetricSender

        self.run_id = spec["run_id"]
        self.client = MlflowClient(spec.get("tracking_uri"))
        self.sender = MetricSender(self.client, self.run_id)
        self.flush_timeout_s = float(spec.get("flush_timeout_s", 120.0))
        if spec.get("system_metrics", True):
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(
                    self.run_id,
                    sampling_interval=float(spec.get("system_metrics_interval", 10)),
                    resume_logging=resumed,
                    node_id="train-rank0",
                    tracking_uri=spec.get("tracking_uri"),
                )
                self.monitor.start()
            except Exception as e:  # noqa: BLE001 - optional telemetry must not fail training
                log.warning("system metrics disabled: %s", redact(str(e)))
                self.monitor = None

    def tag(self, key: str, value: str) -> None:
        """Set a tag on the trial's run; a tracking server that is away loses it, training goes on."""
        if self.client is None:
            return
        try:
            self.client.set_tag(self.run_id, key, value)
        except Exception as e:  # noqa: BLE001 - a missing tag must not fail training
            log.warning("tag %s not set: %s", key, redact(str(e)))

    def log(self, metrics: dict, step: int) -> None:
        if self.sender is not None:  # queued: sent in the background, retried while the server is away
            self.sender.log({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def close(self) -> None:
        """Drain the metric queue and stop system metrics; idempotent."""
        sender, monitor, self.sender, self.monitor = self.sender, self.monitor, None, None
        if sender is not None:
            sender.close(self.flush_timeout_s)
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.debug("system metrics monitor: %s", e)


def _maybe_inject_fault(fault: dict | None, rank: int, epoch: int) -> None:
    """Tests only: SIGKILL this worker once, in the middle of epoch `fault['epoch']` (after its
    first run trained, before the report), so the restarted group must resume from the last
    reported checkpoint. `fault['marker']` (a file) makes it happen exactly once. With
    `fault['hold_s']` the restarted worker then pauses that long, once, in the same epoch: a
    window in which the test interrupts the study with this trial surely unfinished."""
    if not fault or rank != int(fault.get("rank", 0)) or epoch != int(fault["epoch"]):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        record = json.loads(marker.read_text())
        if fault.get("hold_s") and not record.get("held"):
            marker.write_text(json.dumps({**record, "held": True}))
            log.warning("fault injection: holding the restarted worker for %s s", fault["hold_s"])
            time.sleep(float(fault["hold_s"]))
        return
    # Reports reach the Train controller asynchronously: wait until the last one is registered,
    # or the restart could not find the checkpoint this test wants it to resume from.
    try:
        import ray.train

        done = ray.train.get_all_reported_checkpoints(timeout_s=60)
    except Exception as e:  # noqa: BLE001 - an alpha API: fall back to a pause
        log.warning("get_all_reported_checkpoints failed (%s); sleeping instead", redact(str(e)))
        time.sleep(10)
        done = []
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"pid": os.getpid(), "epoch": epoch, "time": time.time(), "checkpoints": len(done)}))
    log.warning("fault injection: killing train worker rank %d (pid %d) during epoch %d", rank, os.getpid(), epoch)
    os.kill(os.getpid(), signal.SIGKILL)


def train_nodes() -> list[str]:
    """The Ray node id of every rank, by rank (a collective: every rank calls it)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def _restore(checkpoint, work: Path) -> dict:
    checkpoint.to_directory(str(work))
    state = json.loads((work / STATE_FILE).read_text())
    state["restarts"] = int(state.get("restarts", 0)) + 1
    return state


def _checkpoint_dir(runs, state: dict, into: Path) -> Path:
    for run in runs:
        dest = into / run.split.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            src = run.out / name
            if src.exists():
                shutil.copy2(src, dest / name)
    (into / STATE_FILE).write_text(json.dumps(state, indent=2))
    return into


def _training_runs(cfg, config: dict, work: Path, cohort, resume: bool) -> list:
    """One TrainingRun per fold/seed of the trial, in this worker's scratch folder."""
    from ..engine.run import TrainingRun

    return [
        TrainingRun(
            cfg, config["data"], work / r["name"], fold=r.get("fold"), seed=r.get("seed"), resume=resume, cohort=cohort
        )
        for r in config["runs"]
    ]


def _train_round(runs: list, fault: dict | None, rank: int, state: dict) -> dict:
    """One epoch of every run not done yet (patience stops runs one by one): -> the trial's metrics."""
    records, trained = [], [r for r in runs if not r.done]
    for i, run in enumerate(trained):
        records.append(run.train_epoch())
        if i == 0:
            _maybe_inject_fault(fault, rank, run.epoch)
    metrics = cv_metrics(runs, records, trained)
    metrics["restarts"] = state["restarts"]
    metrics["resumed_from_epoch"] = state["resumed_from_epoch"] or 0
    return metrics


def _report(runs: list, metrics: dict, state: dict, rank: int) -> None:
    """The epoch's metrics to Ray Train; rank 0 adds the checkpoint of every run."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    tmp = Path(tempfile.mkdtemp(prefix="cfcml-ckpt-"))
    try:
        _checkpoint_dir(runs, state, tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _told_to_stop(config: dict, epoch: int) -> bool:
    """At one of ASHA's rungs (or the budget's), wait for the study's decision: True on STOP."""
    from .search_control import await_decision

    decisions = config.get("decisions") or {}
    if epoch not in decisions.get("epochs", ()):
        return False
    return await_decision(decisions["board"], config.get("trial_id"), epoch) == "STOP"


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config` (built by cfcml.platform.study):

    - ``cfg``: the trial's resolved Config as a dict; ``data``: cohort folder; ``spec``: the
      cohort schema (`cfcml.datasets.spec.shipped`);
    - ``runs``: ``[{"name": "fold1", "fold": 1}, ...]`` or ``[{"name": "seed0", "seed": 0}, ...]``;
    - ``mlflow``: ``{"tracking_uri", "run_id", "system_metrics"}`` or None;
    - ``decisions``: ``{"board", "epochs"}``: after reporting one of these epochs (ASHA's rungs),
      wait for the study's decision and stop here on STOP (`cfcml.platform.search_control`);
    - ``holdout``: case ids the study holds back (no run sees them), or None;
    - ``fault``: tests only, see :func:`_maybe_inject_fault`.
    """
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    spec = remember(config["spec"])  # the schema file may not exist on this node
    cfg = config_from_dict(config["cfg"])
    if cfg.train.device == "auto" and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    work = Path(tempfile.mkdtemp(prefix=f"cfcml-train-r{rank}-"))
    checkpoint = ray.train.get_checkpoint()
    state = {"restarts": 0, "resumed_from_epoch": None, "trial": config.get("trial_id")}
    if checkpoint is not None:
        state = _restore(checkpoint, work)
    try:
        cohort = without_cases(load_cohort(spec, config["data"]), config.get("holdout"))  # the study's held-back ids
        runs = _training_runs(cfg, config, work, cohort, resume=checkpoint is not None)
        if checkpoint is not None:
            state["resumed_from_epoch"] = runs[0].epoch + 1  # 1-based: the epoch it continues with
            log.info(
                "rank %d resumed %d runs at epoch %d (restart %d)",
                rank,
                len(runs),
                runs[0].epoch + 1,
                state["restarts"],
            )
        tracker = _Tracker(config.get("mlflow"), rank, resumed=checkpoint is not None)
        tracker.tag(TAG_TRAIN_NODES, ",".join(train_nodes()))
        try:
            while not all(r.done for r in runs):
                metrics = _train_round(runs, config.get("fault"), rank, state)
                tracker.log(metrics, metrics["epoch"])
                if all(r.done for r in runs):
                    # Tune ends a trial at its last report and its workers with it: deliver (or
                    # count as lost) the queued metrics first, while this process still lives
                    tracker.close()
                _report(runs, metrics, state, rank)
                if _told_to_stop(config, metrics["epoch"]):
                    log.info("rank %d: trial stopped at epoch %d", rank, metrics["epoch"])
                    break
        finally:
            tracker.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
