"""The MLflow tracking server (``mlflow server``) as a supervised local service.

MLflow spawns uvicorn (and, unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, about seven
huey job consumers); we disable job execution (GenAI jobs, unused here) and stop the whole
process group. The backend store URI may hold a database password: it goes to the server
through ``MLFLOW_BACKEND_STORE_URI`` in its environment (readable only by the same user), never
on the command line (visible to every user in ``ps``) or in the log. A server on a non-loopback
address is started only with ``allow_remote=True``, which turns on MLflow's ``basic-auth`` app
(admin password generated into a 0600 file in the state dir).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ..redact import redact
from .process import (
    LOCALHOST,
    ServiceRefused,
    base_env,
    executable,
    free_port,
    http_get,
    is_loopback,
    private_secret,
    require_free,
    write_private,
)
from .service import Service, check_not_running, launch, wait_ready

log = logging.getLogger(__name__)

MLFLOW_DEFAULT_PORT = 5000
MLFLOW_ADMIN_USER = "admin"

# set by this module alone: never inherited from the caller's environment
_SERVER_ONLY_ENV = (
    "MLFLOW_REGISTRY_STORE_URI",
    "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


def _server_env(env: Mapping[str, str] | None, backend_uri: str, artifacts_destination: str) -> dict[str, str]:
    full_env = base_env(env)
    full_env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    full_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # the server must not treat itself as a client of another tracking server
    full_env.pop("MLFLOW_TRACKING_URI", None)
    # secrets through the environment (only this user can read /proc/PID/environ), not argv
    full_env["MLFLOW_BACKEND_STORE_URI"] = backend_uri
    full_env["MLFLOW_ARTIFACTS_DESTINATION"] = artifacts_destination
    for key in _SERVER_ONLY_ENV:
        full_env.pop(key, None)
    return full_env


def _basic_auth(state: Path, address: str) -> tuple[dict[str, str], dict[str, str]]:
    """(server environment, record extras) for MLflow's basic-auth app: config, admin password
    and Flask secret in 0600 files under ``state``."""
    password_file = state / "mlflow_admin_password"
    config = write_private(
        state / "basic_auth.ini",
        (
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{state / 'basic_auth.db'}\nadmin_username = {MLFLOW_ADMIN_USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        ),
    )
    server_env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": private_secret(password_file),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": private_secret(state / "mlflow_flask_secret_key"),
    }
    extra = {
        "admin_password_file": str(password_file),
        "warning": (
            f"MLflow serves {address}, reachable from the network, with basic auth (user {MLFLOW_ADMIN_USER}, "
            f"password in {password_file}); plain http sends it in clear: put TLS (a reverse proxy) in front"
        ),
    }
    return server_env, extra


def start_mlflow_server(
    state_dir: str | os.PathLike,
    port: int | None = None,
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    host: str = LOCALHOST,
    workers: int = 1,
    timeout: float = 180.0,
    name: str = "mlflow",
    allow_remote: bool = False,
    allowed_hosts: str | None = None,
) -> Service:
    """Start ``mlflow server`` in the background and wait until ``/health`` answers ``OK``.

    Defaults: SQLite ``<state>/mlflow.db`` as backend and registry store, proxied artifacts
    stored in ``<state>/mlartifacts``, bound to 127.0.0.1 on a free port (pass ``port=5000``
    for the documented address). ``backend_uri`` may be any SQLAlchemy URI (needs its driver
    installed); it reaches the server through its environment (``MLFLOW_BACKEND_STORE_URI``),
    never its command line, and is recorded redacted. ``artifacts_destination`` may be
    ``s3://bucket/prefix``: clients upload through the server (``mlflow-artifacts:/``), so only
    the server needs AWS credentials (``MLFLOW_S3_ENDPOINT_URL``/``AWS_*`` in ``env``).

    ``host`` other than a loopback address is refused unless ``allow_remote=True``, which runs
    MLflow's ``basic-auth`` app (user ``admin``, password generated into
    ``<state>/mlflow_admin_password``, mode 0600) and logs a warning (plain http: put TLS in
    front). ``allowed_hosts`` goes to ``--allowed-hosts`` (MLflow's Host-header check). The
    process group, log (``<state>/<name>.log``) and state file are recorded in the state dir.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if not is_loopback(host) and not allow_remote:
        raise ServiceRefused(
            f"refusing to serve MLflow on {host}: that address is reachable from the network and the server "
            "would have no authentication; use --host 127.0.0.1, or pass --allow-remote (turns on MLflow's "
            "basic-auth app)"
        )
    check_not_running(state, name)
    port = int(port) if port else free_port(LOCALHOST)
    require_free(port, host, f"mlflow server ({name})")
    backend_uri = backend_uri or f"sqlite:///{state / 'mlflow.db'}"
    artifacts_destination = artifacts_destination or str(state / "mlartifacts")
    cmd = [executable("mlflow"), "server", "--serve-artifacts", "--host", host, "--port", str(port)]
    cmd += ["--workers", str(workers)]
    full_env = _server_env(env, backend_uri, artifacts_destination)
    client_env = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    extra = {"backend_uri": redact(backend_uri), "artifacts_destination": redact(artifacts_destination), "host": host}
    if allow_remote:
        cmd += ["--app-name", "basic-auth"] + (["--allowed-hosts", allowed_hosts] if allowed_hosts else [])
        auth_env, auth_extra = _basic_auth(state, f"{host}:{port}")
        full_env.update(auth_env)
        extra.update(auth_extra)
        client_env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN_USER
        log.warning("%s", extra["warning"])
    url = f"http://{LOCALHOST if host in ('0.0.0.0', '::', '') else host}:{port}"
    client_env["MLFLOW_TRACKING_URI"] = url
    service = launch(
        name,
        cmd,
        full_env,
        log_path=state / f"{name}.log",
        cwd=state,
        url=url,
        address=url,
        port=port,
        state_dir=str(state),
        client_env=client_env,
        extra=extra,
    )
    wait_ready(service, lambda: http_get(f"{url}/health")[0] == 200, timeout, f"{url}/health")
    return service


def mlflow_client_env(service: Service) -> dict[str, str]:
    """What an MLflow client of ``service`` needs in its environment, with the basic-auth
    password read from its 0600 file when the server has one."""
    env = dict(service.client_env)
    password_file = service.extra.get("admin_password_file")
    if password_file:
        env["MLFLOW_TRACKING_PASSWORD"] = Path(password_file).read_text().strip()
    return env
