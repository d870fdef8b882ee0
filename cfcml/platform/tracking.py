"""MLflow run lifecycle that never leaves a run RUNNING.

``with mlflow_run(...) as run:`` starts an MLflow run (optionally nested under the active
run, or under ``parent_run_id`` from another process, e.g. a Ray Tune trial under the
job's parent run) and ends it, whatever happens inside:

* normal exit → ``FINISHED``;
* an exception → ``FAILED`` (tags ``error.type``/``error.message``), re-raised;
* ``KeyboardInterrupt``, or SIGTERM/SIGHUP while inside the block (``ray job stop`` sends
  SIGTERM, a closed terminal SIGHUP; installed only in the main thread when no other handler
  is set) → ``KILLED``, re-raised;
* runs started inside the block and left open are ended with the same status;
* finally the server is asked for the run's status and, if it is still ``RUNNING`` (e.g. the
  fluent stack was manipulated), it is terminated through the client.

:func:`end_running_children` closes children that died with their process (SIGKILL, OOM):
call it from the parent after its trials are done.

Every run opened here is tagged with the process that owns it (``cfcml.host``, ``cfcml.pid``,
``cfcml.process``: boot id and process start time, so a recycled pid is not mistaken for
the owner). :func:`sweep_stale_runs` uses them when a study starts: its RUNNING runs whose
process is gone (SIGKILL, OOM, a lost machine's reboot) are ended as ``KILLED``, with their
RUNNING children. Error tags hold redacted, shortened text (:func:`cfcml.platform.redact.one_line`).

When the tracking server goes away for a while, :mod:`cfcml.platform.delivery` retries
bookkeeping (:func:`call_with_retry`) and delivers metrics late (:class:`MetricSender`); both
are re-exported here.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType, TracebackType

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .redact import one_line

logger = logging.getLogger(__name__)

FINISHED = RunStatus.to_string(RunStatus.FINISHED)
FAILED = RunStatus.to_string(RunStatus.FAILED)
KILLED = RunStatus.to_string(RunStatus.KILLED)
RUNNING = RunStatus.to_string(RunStatus.RUNNING)

TAG_HOST, TAG_PID, TAG_PROCESS = "cfcml.host", "cfcml.pid", "cfcml.process"
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
ERROR_MESSAGE_LIMIT = 500


class RunTerminated(BaseException):
    """Raised inside :func:`mlflow_run` when the process receives SIGTERM or SIGHUP."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def status_for(exc: BaseException | None) -> str:
    """The MLflow run status that an exception (or None) maps to."""
    if exc is None:
        return FINISHED
    if isinstance(exc, KeyboardInterrupt | RunTerminated):
        return KILLED
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return FINISHED
    return FAILED


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def process_start(pid: int) -> str | None:
    """``<boot id>:<start time in clock ticks>`` of ``pid`` (None when it does not exist):
    unique across pid reuse and reboots on one host."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None  # a zombie has finished
    return f"{_boot_id()}:{fields[19]}"  # field 22 of stat, counted after "pid (comm)"


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the owner of a run."""
    pid = os.getpid()
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(pid), TAG_PROCESS: process_start(pid) or ""}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process recorded in a run's tags still runs: None when unknown (no
    tags, or another host), else True/False."""
    host, pid, process = tags.get(TAG_HOST), tags.get(TAG_PID), tags.get(TAG_PROCESS)
    if not host or not pid or not pid.isdigit() or host != socket.gethostname():
        return None
    now = process_start(int(pid))
    if now is None:
        return False
    return not process or now == process


def _active_stack_ids() -> list[str] | None:
    """Run ids on this thread's fluent active-run stack (None if MLflow hides it)."""
    try:
        from mlflow.tracking import fluent  # private module: imported where a moved API is caught

        return [r.info.run_id for r in fluent._active_run_stack.get()]
    except Exception:  # noqa: BLE001 - private API moved: fall back to active_run()
        return None


def _get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # created concurrently by another worker
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class mlflow_run:  # lowercase: used like a function, `with mlflow_run(...) as run`
    """Context manager around ``mlflow.start_run`` that always ends the run.

    Args:
        run_name, tags, description: as for ``mlflow.start_run``.
        experiment_name: created if missing; ignored when ``experiment_id`` is given.
        experiment_id: the experiment to log to (default: the active experiment).
        nested: nest under this thread's active run.
        parent_run_id: nest under a run from another process (sets ``mlflow.parentRunId``).
        run_id: resume an existing run instead of creating one.
        tracking_uri: tracking server to use (also becomes the process default).
        handle_sigterm: turn SIGTERM and SIGHUP inside the block into :class:`RunTerminated`
            (main thread only, and only for signals with no handler installed).
        log_system_metrics: as for ``mlflow.start_run``.
    """

    def __init__(
        self,
        run_name: str | None = None,
        *,
        experiment_name: str | None = None,
        experiment_id: str | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        description: str | None = None,
        tracking_uri: str | None = None,
        handle_sigterm: bool = True,
        log_system_metrics: bool | None = None,
    ):
        self.run_name = run_name
        self.experiment_name = experiment_name
        self.experiment_id = experiment_id
        self.nested = nested
        self.parent_run_id = parent_run_id
        self.run_id = run_id
        self.tags = dict(tags or {})
        self.description = description
        self.tracking_uri = tracking_uri
        self.handle_sigterm = handle_sigterm
        self.log_system_metrics = log_system_metrics
        self.active_run: mlflow.ActiveRun | None = None
        self.status: str | None = None
        self._previous_handlers: dict[int, object] = {}

    # -- signal handling
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        raise RunTerminated(signum)

    def _install_signals(self) -> None:
        if not self.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        for sig in TERMINATING_SIGNALS:
            current = signal.getsignal(sig)
            if current not in (signal.SIG_DFL, None):
                continue  # someone else (Ray, a parent mlflow_run, nohup's SIG_IGN) owns it
            self._previous_handlers[sig] = current
            signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous or signal.SIG_DFL)
        self._previous_handlers.clear()

    # -- context manager
    def __enter__(self) -> mlflow.ActiveRun:
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        client = MlflowClient()
        experiment_id = self.experiment_id
        if experiment_id is None and self.experiment_name:
            experiment_id = _get_or_create_experiment(client, self.experiment_name)
        tags = {**self.tags, **owner_tags()}  # also on a resumed run: this process owns it now
        if self.parent_run_id:
            tags.setdefault(MLFLOW_PARENT_RUN_ID, self.parent_run_id)
        self.active_run = mlflow.start_run(
            run_id=self.run_id,
            experiment_id=experiment_id,
            run_name=self.run_name,
            nested=self.nested,
            parent_run_id=self.parent_run_id,
            tags=tags or None,
            description=self.description,
            log_system_metrics=self.log_system_metrics,
        )
        self._install_signals()
        return self.active_run

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._restore_signals()
        assert self.active_run is not None
        run_id = self.active_run.info.run_id
        self.status = status_for(exc)
        try:
            if exc is not None and self.status != FINISHED:
                tag_error(MlflowClient(), run_id, exc)
            _end_fluent(run_id, self.status)
            terminate_run(MlflowClient(), run_id, self.status)
        except Exception as end_error:
            if exc is None:
                raise
            logger.warning("could not end MLflow run %s as %s: %s", run_id, self.status, one_line(end_error))
        return False  # never swallow the exception


def _end_fluent(run_id: str, status: str) -> None:
    """End ``run_id`` on the fluent stack, and any run left open above it."""
    ids = _active_stack_ids()
    if ids is not None:
        if run_id not in ids:
            return
        for _ in range(len(ids) - ids.index(run_id)):
            mlflow.end_run(status)
        return
    for _ in range(64):  # fallback without the private stack
        active = mlflow.active_run()
        if active is None:
            return
        mlflow.end_run(status)
        if active.info.run_id == run_id:
            return


def open_supervised_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    run_id: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create (or reopen, as RUNNING) a run that this process logs to but never ends.

    For runs whose end another process decides: a Tune trial's run is ended by the study
    driver, which alone knows how the trial ended (completed, stopped by ASHA, failed). A
    trainable that also ended its own run would race the driver, and could turn the driver's
    FINISHED into KILLED when Tune stops its actor. If this process dies, the driver's
    :func:`end_running_children` or :func:`sweep_stale_runs` (owner tags) closes the run.
    """
    tags = {**(tags or {}), **owner_tags()}
    if parent_run_id:
        tags.setdefault(MLFLOW_PARENT_RUN_ID, parent_run_id)
    if run_id is None:
        return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    client.update_run(run_id, status=RUNNING)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return run_id


def tag_error(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    """Tag ``run_id`` with a redacted, one-line account of ``exc`` (best effort)."""
    try:
        client.set_tag(run_id, "error.type", type(exc).__name__)
        client.set_tag(run_id, "error.message", one_line(exc, limit=ERROR_MESSAGE_LIMIT) or type(exc).__name__)
    except Exception as e:  # noqa: BLE001 - best effort: the status matters more
        logger.warning("could not tag MLflow run %s with the error: %s", run_id, one_line(e))


def terminate_run(client: MlflowClient, run_id: str, status: str = KILLED) -> bool:
    """End ``run_id`` with ``status`` if the server still has it RUNNING; True if it did."""
    if client.get_run(run_id).info.status != RUNNING:
        return False
    client.set_terminated(run_id, status)
    return True


def end_running_children(client: MlflowClient, parent_run_id: str, status: str = KILLED) -> list[str]:
    """Terminate child runs of ``parent_run_id`` that are still RUNNING (their process
    died without ending them); returns their ids."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and attributes.status = '{RUNNING}'",
        max_results=10000,
    )
    ended = []
    for child in children:
        client.set_terminated(child.info.run_id, status)
        client.set_tag(child.info.run_id, "error.type", "orphaned")
        ended.append(child.info.run_id)
    return ended


def sweep_stale_runs(
    client: MlflowClient, experiment_id: str, tags: dict[str, str] | None = None, status: str = KILLED
) -> list[str]:
    """End RUNNING runs of ``experiment_id`` (optionally only those with all of ``tags``,
    e.g. ``{"cfcml.study": name}``) whose owning process on this host is gone, and their
    RUNNING children; returns the ids ended. Runs of live processes, of other hosts or
    without owner tags are left alone. Call it when a study starts."""
    conditions = [f"attributes.status = '{RUNNING}'"]
    for key, value in (tags or {}).items():
        conditions.append(f"tags.`{key}` = '{value.replace(chr(39), chr(39) * 2)}'")
    runs = client.search_runs([experiment_id], filter_string=" and ".join(conditions), max_results=10000)
    ended: list[str] = []
    for run in runs:
        if owner_alive(run.data.tags) is not False or run.info.run_id in ended:
            continue
        owner = f"{run.data.tags.get(TAG_HOST)}:{run.data.tags.get(TAG_PID)}"
        client.set_terminated(run.info.run_id, status)
        client.set_tag(run.info.run_id, "error.type", "orphaned")
        client.set_tag(run.info.run_id, "error.message", f"its process {owner} ended without closing it (killed?)")
        ended.append(run.info.run_id)
        ended += [c for c in end_running_children(client, run.info.run_id, status) if c not in ended]
    if ended:
        logger.info("ended %d stale RUNNING run(s) of dead processes: %s", len(ended), ", ".join(ended))
    return ended
