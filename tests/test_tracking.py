"""mlflow_run never leaves a run RUNNING (real MLflow server)."""

from __future__ import annotations

import os
import signal
import time
import uuid

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
    assert (
        client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"]
        == parent.info.run_id
    )
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
    with mlflow_run(
        "trial-0", experiment_id=experiment_id, parent_run_id=parent_id
    ) as trial:
        pass
    assert (
        client.get_run(trial.info.run_id).data.tags["mlflow.parentRunId"] == parent_id
    )
    assert _status(trial.info.run_id) == "FINISHED"
    # a trial whose process was SIGKILLed leaves its run RUNNING; the parent cleans up
    orphan = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent_id})
    assert _status(orphan.info.run_id) == "RUNNING"
    assert end_running_children(client, parent_id) == [orphan.info.run_id]
    assert _status(orphan.info.run_id) == "KILLED"
    assert _status(trial.info.run_id) == "FINISHED"
