"""mlflow_run never leaves a run RUNNING (real MLflow server)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cfcml.platform.tracking import (
    RunTerminated,
    end_running_children,
    mlflow_run,
    status_for,
)

pytestmark = pytest.mark.services


@pytest.fixture
def experiment(mlflow_tracking):
    return f"test-tracking-{uuid.uuid4().hex[:8]}"


def _status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def test_status_mapping():
    assert status_for(None) == "FINISHED"
    assert status_for(ValueError()) == "FAILED"
    assert status_for(KeyboardInterrupt()) == "KILLED"
    assert status_for(RunTerminated()) == "KILLED"
    assert status_for(SystemExit(0)) == "FINISHED"
    assert status_for(SystemExit(3)) == "FAILED"


def test_success_finishes(experiment):
    with mlflow_run("ok", experiment_name=experiment) as run:
        mlflow.log_metric("x", 1.0)
    assert _status(run.info.run_id) == "FINISHED"
    assert mlflow.active_run() is None


def test_exception_marks_failed_and_reraises(experiment):
    with (
        pytest.raises(ValueError, match="boom"),
        mlflow_run("bad", experiment_name=experiment) as run,
    ):
        mlflow.log_param("p", 1)
        raise ValueError("boom")
    run_id = run.info.run_id
    assert _status(run_id) == "FAILED"
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["error.type"] == "ValueError"
    assert "boom" in tags["error.message"]
    assert mlflow.active_run() is None


def test_keyboard_interrupt_marks_killed(experiment):
    with (
        pytest.raises(KeyboardInterrupt),
        mlflow_run("ctrl-c", experiment_name=experiment) as run,
    ):
        raise KeyboardInterrupt
    assert _status(run.info.run_id) == "KILLED"


def test_sigterm_inside_block_marks_killed(experiment):
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a clean slate, whatever ran before
    try:
        _sigterm_inside_block_marks_killed(experiment)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_inside_block_marks_killed(experiment):
    with (
        pytest.raises(RunTerminated),
        mlflow_run("sigterm", experiment_name=experiment) as run,
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs at the next bytecode boundary
            time.sleep(0.01)
        raise AssertionError("SIGTERM was not delivered")
    assert _status(run.info.run_id) == "KILLED"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored


def test_nested_child_failure_fails_both(experiment):
    with (
        pytest.raises(RuntimeError),
        mlflow_run("parent", experiment_name=experiment) as parent,
        mlflow_run("child", nested=True) as child,
    ):
        raise RuntimeError("trial crashed")
    client = MlflowClient()
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert _status(child.info.run_id) == "FAILED"
    assert _status(parent.info.run_id) == "FAILED"


def test_runs_left_open_inside_are_ended(experiment):
    with (
        pytest.raises(ZeroDivisionError),
        mlflow_run("outer", experiment_name=experiment) as outer,
    ):
        inner = mlflow.start_run(run_name="forgotten", nested=True)
        1 / 0  # noqa: B018
    assert _status(inner.info.run_id) == "FAILED"
    assert _status(outer.info.run_id) == "FAILED"


def test_parent_run_id_from_another_process_and_orphan_cleanup(experiment):
    client = MlflowClient()
    with mlflow_run("tune-parent", experiment_name=experiment) as parent:
        parent_id = parent.info.run_id
        experiment_id = parent.info.experiment_id
    # a trial in another process: only the parent id travels
    with mlflow_run("trial-0", experiment_id=experiment_id, parent_run_id=parent_id) as trial:
        pass
    assert client.get_run(trial.info.run_id).data.tags["mlflow.parentRunId"] == parent_id
    assert _status(trial.info.run_id) == "FINISHED"
    # a trial whose process was SIGKILLed leaves its run RUNNING; the parent cleans up
    orphan = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent_id})
    assert _status(orphan.info.run_id) == "RUNNING"
    assert end_running_children(client, parent_id) == [orphan.info.run_id]
    assert _status(orphan.info.run_id) == "KILLED"
    assert _status(trial.info.run_id) == "FINISHED"


def test_sighup_inside_block_marks_killed(experiment):
    previous = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with (
            pytest.raises(RunTerminated, match=f"signal {int(signal.SIGHUP)}"),
            mlflow_run("sighup", experiment_name=experiment) as run,
        ):
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                time.sleep(0.01)
            raise AssertionError("SIGHUP was not delivered")
        assert _status(run.info.run_id) == "KILLED"
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def test_error_tags_are_redacted_short_and_one_line(experiment):
    secret = "postgresql://mlflow:hunter2@db:5432/mlflow?sslpassword=topsecret"
    with (
        pytest.raises(RuntimeError),
        mlflow_run("leaky", experiment_name=experiment) as run,
    ):
        raise RuntimeError(f"cannot open {secret}\n" + "x" * 10_000)
    message = MlflowClient().get_run(run.info.run_id).data.tags["error.message"]
    assert "hunter2" not in message and "topsecret" not in message
    assert "postgresql://mlflow:***@db" in message
    assert len(message) <= 500 and "\n" not in message


def test_runs_record_their_owner_process(experiment):
    import socket

    with mlflow_run("owned", experiment_name=experiment) as run:
        pass
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["cfcml.host"] == socket.gethostname() and tags["cfcml.pid"] == str(os.getpid())
    assert tags["cfcml.process"].endswith(
        ":" + Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    )


_DRIVER = """
import sys, time
from cfcml.platform.tracking import mlflow_run
with mlflow_run("driver", experiment_id=sys.argv[1], tags={"cfcml.study": sys.argv[2]}) as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


def test_study_start_sweeps_runs_of_dead_processes(experiment, mlflow_tracking, tmp_path):
    import socket
    import subprocess
    import sys

    from cfcml.platform.tracking import owner_tags, sweep_stale_runs

    client = MlflowClient()
    experiment_id = client.create_experiment(experiment)
    study = f"s-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "MLFLOW_TRACKING_URI": mlflow_tracking}
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, experiment_id, study], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        dead_id = driver.stdout.readline().strip()
    finally:
        driver.kill()  # SIGKILL: nothing in the driver can end its run
        driver.wait(timeout=30)
    assert _status(dead_id) == "RUNNING"
    # a trial of the dead driver running on another node, a live run of this process, a run of
    # another host and another study's dead run: only the first is the sweep's business
    trial = client.create_run(
        experiment_id,
        tags={"mlflow.parentRunId": dead_id, "cfcml.study": study, "cfcml.host": "other-node", "cfcml.pid": "1"},
    )
    alive = client.create_run(experiment_id, tags={"cfcml.study": study, **owner_tags()})
    remote = client.create_run(experiment_id, tags={"cfcml.study": study, "cfcml.host": "other-node", "cfcml.pid": "1"})
    other_study = client.create_run(
        experiment_id, tags={"cfcml.study": "another", "cfcml.host": socket.gethostname(), "cfcml.pid": str(driver.pid)}
    )
    ended = sweep_stale_runs(client, experiment_id, tags={"cfcml.study": study})
    assert sorted(ended) == sorted([dead_id, trial.info.run_id])
    assert _status(dead_id) == "KILLED" and _status(trial.info.run_id) == "KILLED"
    assert client.get_run(dead_id).data.tags["error.type"] == "orphaned"
    for run in (alive, remote, other_study):
        assert _status(run.info.run_id) == "RUNNING"
        client.set_terminated(run.info.run_id)
    assert sweep_stale_runs(client, experiment_id, tags={"cfcml.study": study}) == []


def test_supervised_run_is_opened_and_reopened_but_never_ended_by_its_worker(experiment):
    """A Tune trial's run: the trainable opens it (or reopens it on resume) and logs to it, the
    study driver alone ends it; the worker's own tag_error leaves the status alone."""
    from cfcml.platform.tracking import open_supervised_run, owner_tags, tag_error

    client = MlflowClient()
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id).info.run_id
    run_id = open_supervised_run(
        client, experiment_id, run_name="trial", parent_run_id=parent, tags={"cfcml.trial_id": "t1"}
    )
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "trial"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["cfcml.trial_id"] == "t1"
    assert run.data.tags["cfcml.pid"] == owner_tags()["cfcml.pid"]
    assert end_running_children(client, parent) == [run_id]  # the driver's view: a child left open
    assert _status(run_id) == "KILLED"

    # resumed by a new worker: RUNNING again, same run, this process recorded as its owner
    client.set_tag(run_id, "cfcml.pid", "1")
    assert open_supervised_run(client, experiment_id, run_id=run_id, parent_run_id=parent) == run_id
    assert _status(run_id) == "RUNNING" and client.get_run(run_id).data.tags["cfcml.pid"] == str(os.getpid())
    tag_error(client, run_id, ValueError("cannot open postgresql://u:hunter2@db/x\nwrong"))
    tags = client.get_run(run_id).data.tags
    assert _status(run_id) == "RUNNING" and tags["error.type"] == "ValueError"
    assert "\n" not in tags["error.message"] and "hunter2" not in tags["error.message"]
    client.set_terminated(run_id, "FAILED")  # what StudyCallback.on_trial_error does
    client.set_terminated(parent)


def test_study_callback_ends_trial_runs_at_once_and_plots_in_the_background(experiment, caplog):
    """The driver's StudyCallback: status, objective and outcome tags at once (Tune's loop is not
    held up by the plots); the curves are drawn on its thread and awaited at experiment end;
    it pickles with plots in flight (Tune saves callbacks with the experiment state)."""
    import threading
    from types import SimpleNamespace

    from mlflow.entities import Metric
    from ray import cloudpickle

    from cfcml.platform.study import callback as tune_mod

    client = MlflowClient()
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id).info.run_id
    runs = {}
    for trial_id in ("t-done", "t-pruned"):
        runs[trial_id] = client.create_run(
            experiment_id, tags={"mlflow.parentRunId": parent, "cfcml.trial_id": trial_id}
        ).info.run_id
        client.log_batch(
            runs[trial_id],
            metrics=[
                Metric(f"fold1/{k}", 0.5 + e / 10, 0, e) for k in ("val_auc", "val_loss", "train_loss") for e in (1, 2)
            ],
        )
    callback = tune_mod._study_callback_cls()(mlflow.get_tracking_uri(), experiment_id, parent, 4, ["fold1"], [2])
    entered, release, real_plot = threading.Event(), threading.Event(), tune_mod.trial_validation_plot

    def slow_plot(*args):  # a loaded driver: drawing takes long
        entered.set()
        assert release.wait(60)
        return real_plot(*args)

    tune_mod.trial_validation_plot = slow_plot
    try:
        callback.on_trial_complete(
            0, [], SimpleNamespace(trial_id="t-done", last_result={"epoch": 4, "cv_val_auc": 0.8})
        )
        callback.on_trial_complete(
            0, [], SimpleNamespace(trial_id="t-pruned", last_result={"epoch": 2, "cv_val_auc": 0.6})
        )
        assert entered.wait(60)
        tune_mod.trial_validation_plot = real_plot  # the next plot draws at once
        done = client.get_run(runs["t-done"])  # closed on the background thread before its plot
        assert done.info.status == "FINISHED" and done.data.metrics["val_auc"] == 0.8
        assert done.data.tags["cfcml.trial_state"] == "COMPLETE"
        assert client.list_artifacts(runs["t-done"], "plots") == []  # still being drawn
        saved = cloudpickle.dumps(callback)  # as Tune saves it with the experiment state, plots in flight
        release.set()
        callback.on_experiment_end([])
        pruned = client.get_run(runs["t-pruned"])  # queued behind the slow plot, closed by the end
        assert pruned.info.status == "FINISHED" and pruned.data.tags["cfcml.trial_state"] == "PRUNED"
        assert pruned.data.tags["cfcml.asha_rung"] == "2"
    finally:
        release.set()
        tune_mod.trial_validation_plot = real_plot
    for run_id in runs.values():
        assert {a.path for a in client.list_artifacts(run_id, "plots")} == {
            "plots/validation_auc.png",
            "plots/loss.png",
        }
    # a failed trial: FAILED at once; a plot that fails is a warning, not a failed study
    failed = client.create_run(
        experiment_id, tags={"mlflow.parentRunId": parent, "cfcml.trial_id": "t-fail"}
    ).info.run_id
    tune_mod.trial_validation_plot = lambda *a: (_ for _ in ()).throw(RuntimeError("no disk"))
    try:
        callback.on_trial_error(0, [], SimpleNamespace(trial_id="t-fail", last_result={"epoch": 1}))
        callback.on_trial_error(0, [], SimpleNamespace(trial_id="t-without-run", last_result={}))  # skipped
        with caplog.at_level("WARNING", logger=tune_mod.log.name):
            callback.on_experiment_end([])
    finally:
        tune_mod.trial_validation_plot = real_plot
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and run.data.tags["cfcml.trial_state"] == "FAIL"
    assert "could not plot the validation curves of trial t-fail: no disk" in caplog.text
    # loaded last: in the process that saved it, loading rebinds the class's methods
    restored = cloudpickle.loads(saved)
    assert restored.parent_run_id == parent and restored._plots == [] and restored._plotter is None
    client.set_terminated(parent)
