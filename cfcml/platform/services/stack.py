"""An MLflow server and a Ray head started together, as `make run` starts them: for the tests
and benchmarks that need the pair in a state folder of their own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .mlflow_server import start_mlflow_server
from .ray_head import start_ray_head
from .service import Service

QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}


def start_tracking_and_ray(
    state: Path,
    num_cpus: int,
    env: Mapping[str, str] | None = None,
    artifacts_destination: str | None = None,
) -> tuple[Service, Service]:
    """(mlflow, ray): a tracking server in ``<state>/mlflow`` and a Ray head with token auth in
    ``<state>/ray``, both with ``env`` (usage stats and telemetry off unless it says otherwise).
    When the head cannot start, the server is stopped before the error propagates."""
    env = {**QUIET_ENV, **(env or {})}
    mlflow = start_mlflow_server(state / "mlflow", artifacts_destination=artifacts_destination, env=env)
    try:
        ray = start_ray_head(state / "ray", num_cpus=num_cpus, auth_mode="token", env=env)
    except BaseException:
        mlflow.stop()
        raise
    return mlflow, ray


def stack_client_env(mlflow: Service, ray: Service) -> dict[str, str]:
    """What a driver needs to reach both: the tracking URI (and its credentials), Ray's address and token."""
    return {**mlflow.client_env, **ray.client_env, "RAY_ADDRESS": ray.address}
