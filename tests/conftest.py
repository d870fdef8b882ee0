"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- isolation


@contextmanager
def mlflow_uris_kept():
    """MLflow keeps its tracking and registry URIs in module globals and mirrors them into
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: code that sets one (a test, or the study driver
    it runs in-process) would point every later test, and the processes they start, at its
    server. Restores the raw globals and variables, not the resolved URIs."""
    import os

    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _mlflow_uris_per_test():
    with mlflow_uris_kept():
        yield


# --------------------------------------------------------------------------- services
# Real services on 127.0.0.1 (free ports), started once per test session and stopped by
# process id at the end. Tests that use them are marked `services`.


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite + local proxied artifacts)."""
    from cfcml.platform.services import start_mlflow_server

    service = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield service
    service.stop()


@pytest.fixture
def mlflow_tracking(mlflow_server, monkeypatch):
    """Point the fluent MLflow API at the session server for one test; yields its URL."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = getattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server.url
    while mlflow.active_run() is not None:  # a failed test must not leak a run
        mlflow.end_run("KILLED")
    if hasattr(tracking_utils, "_tracking_uri"):
        tracking_utils._tracking_uri = previous


@pytest.fixture(scope="session")
def moto_s3():
    """An in-memory S3 (moto_server); `.url` is the endpoint, `.client_env` credentials."""
    from cfcml.platform.services import start_moto_s3

    service = start_moto_s3()
    yield service
    service.stop()


def s3_client(s3):
    """A boto3 S3 client for a moto service, with the service's own credentials."""
    import boto3

    env = s3.client_env
    return boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


@contextmanager
def ray_and_mlflow(prefix: str, env: dict[str, str], artifacts_destination: str | None = None):
    """A Ray head (2 CPUs, token auth) and an MLflow server as `make run` starts them, in a
    fresh state dir under /tmp (short: Ray's socket paths); yields (state, mlflow, ray) and
    stops both by process id."""
    from cfcml.platform.services import start_tracking_and_ray

    state = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    mlflow, ray = start_tracking_and_ray(state, 2, env, artifacts_destination)
    try:
        yield state, mlflow, ray
    finally:
        ray.stop()
        mlflow.stop()
        shutil.rmtree(state, ignore_errors=True)


# --------------------------------------------------------------------------- study commands

ROOT = Path(__file__).resolve().parents[1]


def study_command(job: str = "tune_men.py", *, sets=(), **options) -> list[str]:
    """The command line of a study job (``jobs/<job>``) as a user types it: each keyword is an
    option (``num_samples=2`` -> ``--num-samples 2``; True -> the bare flag, e.g.
    ``no_register=True``; None or False -> left out), each of ``sets`` a ``--set`` override."""
    cmd = [sys.executable, str(ROOT / "jobs" / job)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not None and value is not False:
            cmd += [flag, str(value)]
    for item in sets:
        cmd += ["--set", item]
    return cmd
