"""Callbacks: :func:`_study_callback_cls` (Tune, on the driver: closes each trial's MLflow run
and plots its curves) and :func:`_report_counter_cls` (Train: counts the reports that reached
Tune). Built by functions so that importing this module does not import Ray."""

from __future__ import annotations

import logging
import time

from ..redact import redact
from ..train_loop import OBJECTIVE
from .plots import log_figure, trial_validation_plot
from .records import find_child_run

log = logging.getLogger(__name__)


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


class _TrialCloser:
    """Closes a trial's MLflow run (metrics, tags, status) and then plots its curves; runs on the
    study callback's background thread, retried while the tracking server is away."""

    def _finish(self, trial_id: str, status: str, *, epochs: int, tags: dict, metrics: dict, now: int) -> None:
        from mlflow.entities import Metric, RunTag

        from ..delivery import call_with_retry
        from ..tracking import terminate_run

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
        log_figure(self.client, run_id, auc_fig, "plots/validation_auc.png")
        log_figure(self.client, run_id, loss_fig, "plots/loss.png")

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


def _study_callback_cls():
    from ray import tune

    class StudyCallback(_TrialCloser, tune.Callback):
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
            from ..search_control import trial_outcome

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
            job = self._plotter.submit(
                self._finish, trial.trial_id, status, epochs=epochs, tags=tags, metrics=metrics, now=now
            )
            self._plots.append((trial.trial_id, job))

    return StudyCallback
