"""Local services for development, tests and `make run`: MLflow tracking server, Ray head, S3.

One module per job: ``process`` (pids, ports, signals, private files), ``service`` (the
:class:`Service` record: spawn in its own process group, state/pid files, wait for health,
stop by pid), ``mlflow_server``, ``ray_head``, ``s3`` (moto) and ``dev`` (the `cfcml dev
start|stop|status|env` command, also ``python -m cfcml.platform.services``). Every service is
the leader of its own process group with its output in ``<state>/<name>.log`` and its state in
``<state>/<name>.json`` / ``.pid`` (state dir default ``.cfcml-state/`` in the repository root);
stopping kills the recorded group by id, escalates to SIGKILL and sweeps any process carrying
the service's marker environment variable. Nothing is ever killed by name. Every port binds to
127.0.0.1 unless asked otherwise, and an open network service (MLflow without auth, Ray with
``RAY_AUTH_MODE=disabled``) is refused.

Environment facts these modules rely on (Ray 2.60, MLflow 3.17) are in the docstrings of
``mlflow_server`` and ``ray_head``.
"""

from .dev import DESCRIPTION, DEV_STACK, SERVICE_NAMES, STOP_ORDER, add_dev_arguments, main, run_dev
from .mlflow_server import MLFLOW_ADMIN_USER, MLFLOW_DEFAULT_PORT, mlflow_client_env, start_mlflow_server
from .process import (
    DEFAULT_STATE_DIR,
    LOCALHOST,
    MARKER_ENV,
    ServiceError,
    ServiceRefused,
    default_state_dir,
    free_port,
    http_get,
    is_loopback,
    marked_pids,
    pid_alive,
    port_is_free,
    repo_root,
    venv_bin,
)
from .ray_head import (
    RAY_AUTH_MODES,
    RAY_DEFAULT_DASHBOARD_PORT,
    RAY_DEFAULT_PORT,
    ensure_ray_token,
    ray_auth_headers,
    ray_token_path,
    start_ray_head,
    start_ray_worker,
)
from .s3 import MOTO_CLIENT_ENV, start_moto_s3
from .service import Service, ServiceAlreadyRunning, load_service, state_path
from .stack import QUIET_ENV, stack_client_env, start_tracking_and_ray

__all__ = [
    "DEFAULT_STATE_DIR",
    "DESCRIPTION",
    "DEV_STACK",
    "LOCALHOST",
    "MARKER_ENV",
    "MLFLOW_ADMIN_USER",
    "MLFLOW_DEFAULT_PORT",
    "MOTO_CLIENT_ENV",
    "QUIET_ENV",
    "RAY_AUTH_MODES",
    "RAY_DEFAULT_DASHBOARD_PORT",
    "RAY_DEFAULT_PORT",
    "SERVICE_NAMES",
    "STOP_ORDER",
    "Service",
    "ServiceAlreadyRunning",
    "ServiceError",
    "ServiceRefused",
    "add_dev_arguments",
    "default_state_dir",
    "ensure_ray_token",
    "free_port",
    "http_get",
    "is_loopback",
    "load_service",
    "main",
    "marked_pids",
    "mlflow_client_env",
    "pid_alive",
    "port_is_free",
    "ray_auth_headers",
    "ray_token_path",
    "repo_root",
    "run_dev",
    "stack_client_env",
    "start_mlflow_server",
    "start_moto_s3",
    "start_ray_head",
    "start_ray_worker",
    "start_tracking_and_ray",
    "state_path",
    "venv_bin",
]
