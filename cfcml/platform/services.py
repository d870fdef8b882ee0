"""Local services for development, tests and `make run`: MLflow tracking server, Ray head, S3.

Every service is started as the leader of its own process group (``start_new_session``),
with its output in a log file and its state (pid, url, log path) in a JSON file under a
state directory (default ``.cfcml-state/`` in the repository root). Stopping kills the
recorded process group by id, waits, escalates to SIGKILL, and finally sweeps any process
that carries the service's marker environment variable (Ray job drivers start their own
sessions, so the process group alone does not cover them). Nothing is ever killed by name.

The shell scripts ``mlflow/start.sh``, ``mlflow/stop.sh``, ``cluster/start_local.sh`` and
``cluster/stop_local.sh`` are thin wrappers around the command line at the bottom of this
module (``python -m cfcml.platform.services start|stop|status|env ...``), so there is one
implementation of each thing.

Environment facts this module relies on (Ray 2.60, MLflow 3.17):

* MLflow spawns uvicorn (and, unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, about
  seven huey job consumers); we disable job execution (GenAI jobs, unused here) and stop
  the whole process group.
* Ray's token authentication is controlled by ``RAY_AUTH_MODE`` (``token`` | ``disabled``).
  When it is unset, ``ray start`` silently switches to token mode if ``~/.ray/auth_token``
  exists (a local ``ray.init()`` creates it). We always set it explicitly; in ``token``
  mode the token lives in ``<state>/ray_auth_token`` and is passed with
  ``RAY_AUTH_TOKEN_PATH``, on the server side and on every client (see :func:`ray_client_env`).
* Ray replaces a node address of ``127.0.0.1`` by the machine's real IP (for multi-node
  clusters) and then binds its GCS, raylet, agents and client server there or on all
  interfaces. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (a single-node cluster, which a
  local head is) and ``--node-ip-address 127.0.0.1`` it keeps 127.0.0.1 and every port binds
  to loopback (checked in tests/test_services.py). A head on a real address needs token auth:
  an unauthenticated cluster there is refused.
* MLflow's backend store URI may hold a database password: it goes to the server through
  ``MLFLOW_BACKEND_STORE_URI`` in its environment (readable only by the same user), never on
  the command line (visible to every user in ``ps``) or in the log. A server on a
  non-loopback address is started only with ``allow_remote=True``, which turns on MLflow's
  ``basic-auth`` app (admin password generated into a 0600 file in the state dir).
* ``ray start --block`` drains the node for up to 30 s on SIGTERM; we set
  ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0`` and signal the leader first so that Ray tears
  its processes down in order.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Self

from .redact import redact

log = logging.getLogger(__name__)

MARKER_ENV = "CFCML_SERVICE_ID"
DEFAULT_STATE_DIR = ".cfcml-state"
LOCALHOST = "127.0.0.1"

MLFLOW_DEFAULT_PORT = 5000
RAY_DEFAULT_PORT = 6379
RAY_DEFAULT_DASHBOARD_PORT = 8265
RAY_AUTH_MODES = ("token", "disabled")

# Unix domain sockets are limited to 107 bytes; Ray puts
# "<temp_dir>/session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store" under --temp-dir.
_RAY_SOCKET_SUFFIX_LEN = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_UNIX_SOCKET_MAX = 107


class ServiceError(RuntimeError):
    """A service failed to start, to become ready, or to stop."""


class ServiceRefused(ServiceError):
    """A start request that would be unsafe (an open network service): nothing was started."""


# --------------------------------------------------------------------------- utilities


def repo_root() -> Path:
    """The repository root (the directory that contains the `cfcml` package)."""
    return Path(__file__).resolve().parents[2]


def default_state_dir() -> Path:
    return repo_root() / DEFAULT_STATE_DIR


def venv_bin() -> Path:
    """The directory of the running interpreter (the venv's bin/ when run from a venv)."""
    return Path(sys.executable).parent


def _executable(name: str) -> str:
    candidate = venv_bin() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"executable {name!r} not found next to {sys.executable} or on PATH")
    return found


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from the network


def _write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by this user only (0600, also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def _private_secret(path: Path) -> str:
    """The secret in ``path``, created (256 random bits, 0600) when missing or empty."""
    if not path.exists() or not path.read_text().strip():
        _write_private(path, secrets.token_urlsafe(32))
    os.chmod(path, 0o600)
    return path.read_text().strip()


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """True when nothing listens on ``host:port`` and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        if s.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment contains ``CFCML_SERVICE_ID=<marker>``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0") and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 3.0):
    """(status, body) of a GET; status 0 when the connection fails."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, ""


# --------------------------------------------------------------------------- Service


@dataclass
class Service:
    """A running local service: its process group leader, address and log.

    ``url`` is what a browser or HTTP client uses (MLflow UI/API, Ray dashboard and Jobs
    API, S3 endpoint). ``address`` is the protocol address (the GCS ``ip:port`` for Ray,
    the same as ``url`` otherwise). ``client_env`` holds the environment variables a client
    needs (e.g. ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN_PATH`` for Ray, AWS test credentials for
    moto). Use it as a context manager to stop it on exit.
    """

    name: str
    pid: int
    url: str
    address: str
    port: int
    log_path: str
    marker: str
    state_dir: str | None = None
    client_env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    leader_first: bool = False  # SIGTERM the leader alone before the group (Ray)
    _popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    # -- state file
    @property
    def state_file(self) -> Path | None:
        return state_path(self.state_dir, self.name) if self.state_dir else None

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Service:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self) -> None:
        if self.state_file is None:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(self.state_file)
        self.state_file.with_suffix(".pid").write_text(f"{self.pid}\n")

    def _forget(self) -> None:
        if self.state_file is None:
            return
        for path in (self.state_file, self.state_file.with_suffix(".pid")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- liveness
    def _reap(self) -> None:
        if self._popen is not None:
            self._popen.poll()

    def owns_leader(self) -> bool:
        """True when the recorded pid is alive and is really this service (marker check)."""
        self._reap()
        if not pid_alive(self.pid):
            return False
        try:
            with open(f"/proc/{self.pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            return True  # cannot read it: trust the pid file
        return f"{MARKER_ENV}={self.marker}".encode() in env

    def is_running(self) -> bool:
        return self.owns_leader() or bool(self.remaining_pids())

    def remaining_pids(self) -> list[int]:
        self._reap()
        pids = set(marked_pids(self.marker))
        if self.owns_leader() or pids:
            pids.update(_group_pids(self.pid))
        return sorted(pids)

    # -- stop
    def stop(self, timeout: float = 30.0) -> None:
        """Stop the service by process id: SIGTERM, wait, SIGKILL, sweep marked processes.

        Raises ServiceError when processes survive SIGKILL (should not happen).
        """
        deadline = time.monotonic() + timeout
        leader = self.owns_leader()
        if leader:
            if self.leader_first:
                _signal_pids([self.pid], signal.SIGTERM)
                _wait_until(lambda: not self.owns_leader(), max(1.0, 0.6 * timeout))
            _killpg(self.pid, signal.SIGTERM)
            _signal_pids(marked_pids(self.marker), signal.SIGTERM)
            _wait_until(lambda: not self.remaining_pids(), max(1.0, deadline - time.monotonic()))
        survivors = self.remaining_pids()
        if survivors:
            if leader:
                _killpg(self.pid, signal.SIGKILL)
            _signal_pids(survivors, signal.SIGKILL)
            _wait_until(lambda: not self.remaining_pids(), 10.0)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5)
        survivors = self.remaining_pids()
        if survivors:
            raise ServiceError(f"{self.name}: processes {survivors} survived SIGKILL")
        self._forget()
        if self.extra.get("tmp_log_dir"):  # a stateless service's private log dir
            shutil.rmtree(self.extra["tmp_log_dir"], ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def state_path(state_dir: str | os.PathLike, name: str) -> Path:
    return Path(state_dir) / f"{name}.json"


def load_service(state_dir: str | os.PathLike, name: str) -> Service | None:
    """The service recorded in ``<state_dir>/<name>.json``, or None."""
    path = state_path(state_dir, name)
    if not path.exists():
        return None
    try:
        return Service.from_json(path.read_text())
    except (json.JSONDecodeError, TypeError) as e:
        raise ServiceError(f"unreadable state file {path}: {e}") from e


def _check_not_running(state_dir: Path, name: str) -> None:
    existing = load_service(state_dir, name)
    if existing is None:
        return
    if existing.is_running():
        raise ServiceAlreadyRunning(existing)
    existing._forget()  # stale state from a crash


class ServiceAlreadyRunning(ServiceError):
    def __init__(self, service: Service):
        self.service = service
        super().__init__(
            f"{service.name} is already running (pid {service.pid}, {service.url}); "
            f"stop it first (state in {service.state_file})"
        )


def _spawn(
    name: str,
    cmd: list[str],
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None,
) -> tuple[subprocess.Popen, str]:
    marker = f"{name}-{uuid.uuid4().hex[:16]}"
    full_env = dict(env)
    full_env[MARKER_ENV] = marker
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        log_file.write(f"$ {redact(' '.join(cmd))}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    return popen, marker


def _wait_ready(
    service: Service,
    ready: Callable[[], bool],
    timeout: float,
    what: str,
) -> None:
    """Poll ``ready`` until true; on timeout or early exit stop the service and raise."""
    try:
        service.save()
    except BaseException:
        with contextlib.suppress(Exception):
            service.stop(timeout=10)
        raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except BaseException:
            with contextlib.suppress(Exception):
                service.stop(timeout=10)
            raise
        popen = service._popen
        if popen is not None and popen.poll() is not None:
            service.stop(timeout=10)
            raise ServiceError(
                f"{service.name} exited with status {popen.returncode} before {what}; "
                f"log: {service.log_path}\n--- last lines ---\n{_log_tail(Path(service.log_path))}"
            )
        time.sleep(0.5)
    with contextlib.suppress(ServiceError):
        service.stop(timeout=10)
    raise ServiceError(
        f"{service.name} did not become ready ({what}) within {timeout:.0f} s; "
        f"log: {service.log_path}\n--- last lines ---\n{_log_tail(Path(service.log_path))}"
    )


def _require_free(port: int, host: str, what: str) -> None:
    check_host = LOCALHOST if host in ("0.0.0.0", "::", "") else host
    if not port_is_free(port, check_host):
        raise ServiceError(
            f"{what}: port {port} on {check_host} is already in use; stop whatever listens there or choose another port"
        )


def _base_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    merged.pop(MARKER_ENV, None)
    # the venv's bin first, so that `python`, `ray`, `mlflow` resolve to this environment
    merged["PATH"] = os.pathsep.join([str(venv_bin()), merged.get("PATH", "")])
    # a busy machine starts Train workers slowly: Ray's 60 s default fails trials that would run
    merged.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    merged.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # threads that do not spin when trials share cores
    if env:
        merged.update({k: str(v) for k, v in env.items()})
    return merged


# --------------------------------------------------------------------------- MLflow


MLFLOW_ADMIN_USER = "admin"


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
    stored in ``<state>/mlartifacts``, bound to 127.0.0.1 on a free port (pass
    ``port=5000`` for the documented address). ``backend_uri`` may be any SQLAlchemy URI
    (e.g. ``postgresql://user:pw@host/db``; needs a driver such as psycopg2 installed); it
    reaches the server through its environment (``MLFLOW_BACKEND_STORE_URI``), never its
    command line, and is recorded redacted. ``artifacts_destination`` may be
    ``s3://bucket/prefix``: clients upload through the server (``mlflow-artifacts:/``), so
    only the server needs AWS credentials; pass ``MLFLOW_S3_ENDPOINT_URL``/``AWS_*`` in
    ``env`` (or the environment) for S3-compatible stores.

    ``host`` other than a loopback address makes the server reachable from the network: it
    is refused unless ``allow_remote=True``, which runs MLflow's ``basic-auth`` app (user
    ``admin``, password generated into ``<state>/mlflow_admin_password``, mode 0600; users
    and permissions in ``<state>/basic_auth.db``) and logs a warning (basic auth over plain
    http sends the password in clear: put TLS in front). ``allowed_hosts`` is passed to
    ``--allowed-hosts`` (MLflow's Host-header check; its default admits localhost and
    private-network addresses). The process group, log (``<state>/<name>.log``) and state
    file are recorded in the state dir.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if not is_loopback(host) and not allow_remote:
        raise ServiceRefused(
            f"refusing to serve MLflow on {host}: that address is reachable from the network and the server "
            "would have no authentication; use --host 127.0.0.1, or pass --allow-remote (turns on MLflow's "
            "basic-auth app)"
        )
    _check_not_running(state, name)
    port = int(port) if port else free_port(LOCALHOST)
    _require_free(port, host, f"mlflow server ({name})")
    backend_uri = backend_uri or f"sqlite:///{state / 'mlflow.db'}"
    artifacts_destination = artifacts_destination or str(state / "mlartifacts")
    cmd = [
        _executable("mlflow"),
        "server",
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    full_env = _base_env(env)
    full_env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    full_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # the server must not treat itself as a client of another tracking server
    full_env.pop("MLFLOW_TRACKING_URI", None)
    # secrets through the environment (only this user can read /proc/PID/environ), not argv
    full_env["MLFLOW_BACKEND_STORE_URI"] = backend_uri
    full_env["MLFLOW_ARTIFACTS_DESTINATION"] = artifacts_destination
    for key in (
        "MLFLOW_REGISTRY_STORE_URI",
        "MLFLOW_AUTH_CONFIG_PATH",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        full_env.pop(key, None)  # only what this function decides
    client_env = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    extra = {"backend_uri": redact(backend_uri), "artifacts_destination": redact(artifacts_destination), "host": host}
    if allow_remote:
        cmd += ["--app-name", "basic-auth"]
        if allowed_hosts:
            cmd += ["--allowed-hosts", allowed_hosts]
        password_file = state / "mlflow_admin_password"
        config = _write_private(
            state / "basic_auth.ini",
            (
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{state / 'basic_auth.db'}\nadmin_username = {MLFLOW_ADMIN_USER}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            ),
        )
        full_env.update(
            {
                "MLFLOW_AUTH_CONFIG_PATH": str(config),
                "MLFLOW_AUTH_ADMIN_PASSWORD": _private_secret(password_file),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": _private_secret(state / "mlflow_flask_secret_key"),
            }
        )
        client_env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN_USER
        extra["admin_password_file"] = str(password_file)
        extra["warning"] = (
            f"MLflow serves {host}:{port}, reachable from the network, with basic auth (user {MLFLOW_ADMIN_USER}, "
            f"password in {password_file}); plain http sends it in clear: put TLS (a reverse proxy) in front"
        )
        log.warning("%s", extra["warning"])
    log_path = state / f"{name}.log"
    popen, marker = _spawn(name, cmd, log_path, full_env, cwd=state)
    url_host = LOCALHOST if host in ("0.0.0.0", "::", "") else host
    url = f"http://{url_host}:{port}"
    client_env["MLFLOW_TRACKING_URI"] = url
    service = Service(
        name=name,
        pid=popen.pid,
        url=url,
        address=url,
        port=port,
        log_path=str(log_path),
        marker=marker,
        state_dir=str(state),
        client_env=client_env,
        extra=extra,
        _popen=popen,
    )
    _wait_ready(service, lambda: http_get(f"{url}/health")[0] == 200, timeout, f"{url}/health")
    return service


def mlflow_client_env(service: Service) -> dict[str, str]:
    """What an MLflow client of ``service`` needs in its environment, with the basic-auth
    password read from its 0600 file when the server has one."""
    env = dict(service.client_env)
    password_file = service.extra.get("admin_password_file")
    if password_file:
        env["MLFLOW_TRACKING_PASSWORD"] = Path(password_file).read_text().strip()
    return env


# --------------------------------------------------------------------------- Ray


def ray_token_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir).resolve() / "ray_auth_token"


def ensure_ray_token(state_dir: str | os.PathLike) -> Path:
    """Create ``<state>/ray_auth_token`` (0600, 256 random bits) unless it exists."""
    path = ray_token_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or not path.read_text().strip():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def ray_client_env(service: Service) -> dict[str, str]:
    """Environment a Ray client (``ray job submit``, ``ray.init(address=...)``) needs."""
    return dict(service.client_env)


def ray_auth_headers(service: Service) -> dict[str, str]:
    """HTTP headers for the dashboard / Jobs REST API of a token-auth cluster."""
    token_path = service.client_env.get("RAY_AUTH_TOKEN_PATH")
    if service.client_env.get("RAY_AUTH_MODE") != "token" or not token_path:
        return {}
    return {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"}


def start_ray_head(
    state_dir: str | os.PathLike,
    num_cpus: int | None = None,
    *,
    port: int | None = None,
    dashboard_port: int | None = None,
    num_gpus: int | None = None,
    auth_mode: str = "token",
    object_store_memory: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
    name: str = "ray",
    node_ip: str = LOCALHOST,
) -> Service:
    """Start a local Ray head (``ray start --head --block``) as a process group.

    ``node_ip`` is the node's address (``--node-ip-address``). At the default 127.0.0.1 the
    cluster is single-node and every Ray port (GCS, raylet, agents, client server) binds to
    loopback; another address makes the GCS reachable from the network for worker nodes,
    which is refused with ``auth_mode="disabled"`` (an open cluster runs anyone's code).
    The dashboard and Jobs API bind to 127.0.0.1 either way (``dashboard_port``, free port
    when None; pass 8265 for the documented address; reach it from elsewhere through an SSH
    tunnel); the GCS listens on ``port`` (free when None).
    ``--temp-dir`` is ``<state>/ray-tmp`` (keep the state dir path short: Unix sockets under
    it are limited to 107 bytes). Usage stats are off. ``auth_mode`` is ``token`` (default:
    a per-state-dir token in ``<state>/ray_auth_token``) or ``disabled``; either way
    ``RAY_AUTH_MODE`` is set explicitly on the cluster and in ``service.client_env``.
    Waits for the "Ray runtime started" line and the dashboard's ``/api/version``.
    """
    if auth_mode not in RAY_AUTH_MODES:
        raise ServiceError(f"auth_mode must be one of {RAY_AUTH_MODES}, not {auth_mode!r}")
    loopback = is_loopback(node_ip)
    if auth_mode == "disabled" and not loopback:
        raise ServiceRefused(
            f"refusing to start a Ray cluster without authentication (RAY_AUTH_MODE=disabled) on {node_ip}: "
            "anyone who can reach it could run code on it; use --auth-mode token, or --node-ip-address 127.0.0.1"
        )
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    _check_not_running(state, name)
    temp_dir = state / "ray-tmp"
    if len(str(temp_dir)) + _RAY_SOCKET_SUFFIX_LEN > _UNIX_SOCKET_MAX:
        raise ServiceError(
            f"state dir {state} is too long for Ray's Unix sockets "
            f"(<= {_UNIX_SOCKET_MAX - _RAY_SOCKET_SUFFIX_LEN - len('/ray-tmp')} characters); "
            "use a shorter --state-dir"
        )
    num_cpus = int(num_cpus) if num_cpus else (os.cpu_count() or 1)
    port = int(port) if port else free_port(LOCALHOST)
    dashboard_port = int(dashboard_port) if dashboard_port else free_port(LOCALHOST)
    _require_free(port, LOCALHOST, "ray head (GCS)")
    _require_free(dashboard_port, LOCALHOST, "ray dashboard")

    client_env = {"RAY_AUTH_MODE": auth_mode, "RAY_USAGE_STATS_ENABLED": "0"}
    if loopback:
        # single-node: Ray keeps 127.0.0.1 as the node address instead of the machine's IP,
        # so GCS, raylet, agents and the client server all bind to loopback
        client_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    full_env = _base_env(env)
    for key in (
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    ):
        full_env.pop(key, None)
    if auth_mode == "token":
        client_env["RAY_AUTH_TOKEN_PATH"] = str(ensure_ray_token(state))
    full_env.update(client_env)
    full_env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"

    cmd = [
        _executable("ray"),
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--node-ip-address",
        node_ip,
        "--dashboard-host",
        LOCALHOST,
        "--dashboard-port",
        str(dashboard_port),
        # these default to fixed ports (10001, 52365): pick free ones so that two local
        # clusters (e.g. `make run` and the tests) can coexist
        "--ray-client-server-port",
        str(free_port(LOCALHOST)),
        "--dashboard-agent-listen-port",
        str(free_port(LOCALHOST)),
        "--num-cpus",
        str(num_cpus),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(int(num_gpus))]
    if object_store_memory:
        cmd += ["--object-store-memory", str(int(object_store_memory))]
    log_path = state / f"{name}.log"
    popen, marker = _spawn(name, cmd, log_path, full_env, cwd=None)
    url = f"http://{LOCALHOST}:{dashboard_port}"
    client_env["RAY_API_SERVER_ADDRESS"] = url
    service = Service(
        name=name,
        pid=popen.pid,
        url=url,
        address="",  # the GCS address, known once the head is up
        port=dashboard_port,
        log_path=str(log_path),
        marker=marker,
        state_dir=str(state),
        client_env=client_env,
        extra={
            "gcs_port": str(port),
            "temp_dir": str(temp_dir),
            "num_cpus": str(num_cpus),
            "node_ip": node_ip,
        },
        leader_first=True,
        _popen=popen,
    )
    headers = ray_auth_headers(service)

    def ready() -> bool:
        if "Ray runtime started" not in Path(log_path).read_text(errors="replace"):
            return False
        return http_get(f"{url}/api/version", headers)[0] == 200

    _wait_ready(service, ready, timeout, f"Ray runtime started and {url}/api/version")
    current = temp_dir / "ray_current_cluster"
    service.address = current.read_text().strip() if current.exists() else f"{LOCALHOST}:{port}"
    service.save()
    return service


# --------------------------------------------------------------------------- S3 (moto)

MOTO_CLIENT_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_moto_s3(
    port: int | None = None,
    *,
    state_dir: str | os.PathLike | None = None,
    timeout: float = 60.0,
    name: str = "s3",
) -> Service:
    """Start ``moto_server`` (an in-memory S3) on 127.0.0.1 and a free port.

    ``service.client_env`` has ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` and test
    credentials. Without ``state_dir`` the log goes to a temporary directory and no state
    file is written.
    """
    import tempfile

    state = Path(state_dir).resolve() if state_dir else None
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
        _check_not_running(state, name)
    port = int(port) if port else free_port(LOCALHOST)
    _require_free(port, LOCALHOST, "moto s3")
    log_dir = state if state is not None else Path(tempfile.mkdtemp(prefix="cfcml-moto-"))
    log_path = log_dir / f"{name}.log"
    full_env = _base_env(MOTO_CLIENT_ENV)
    cmd = [_executable("moto_server"), "-H", LOCALHOST, "-p", str(port)]
    popen, marker = _spawn(name, cmd, log_path, full_env, cwd=log_dir)
    url = f"http://{LOCALHOST}:{port}"
    service = Service(
        name=name,
        pid=popen.pid,
        url=url,
        address=f"{LOCALHOST}:{port}",
        port=port,
        log_path=str(log_path),
        marker=marker,
        state_dir=str(state) if state is not None else None,
        extra={} if state is not None else {"tmp_log_dir": str(log_dir)},
        client_env={
            **MOTO_CLIENT_ENV,
            "MLFLOW_S3_ENDPOINT_URL": url,
            "AWS_ENDPOINT_URL_S3": url,
        },
        _popen=popen,
    )
    _wait_ready(service, lambda: http_get(f"{url}/moto-api/")[0] == 200, timeout, url)
    return service


# --------------------------------------------------------------------------- CLI

SERVICE_NAMES = ("mlflow", "ray", "s3")


def _env_lines(service: Service) -> list[str]:
    """``export`` lines for a client shell; a password is read from its 0600 file when the
    line runs, so the env file itself holds no secret."""
    lines = [f"export {k}={v}" for k, v in sorted(service.client_env.items())]
    password_file = service.extra.get("admin_password_file")
    if password_file:
        lines.append(f'export MLFLOW_TRACKING_PASSWORD="$(cat {password_file})"')
    return lines


def _print_env(service: Service, shell: bool) -> None:
    for line in _env_lines(service):
        print(line if shell else line.removeprefix("export "))


def _write_env_file(service: Service) -> Path | None:
    """``<state>/<name>.env``: ``export`` lines a shell can source before using the service."""
    if not service.state_dir:
        return None
    path = Path(service.state_dir) / f"{service.name}.env"
    path.write_text("\n".join(_env_lines(service)) + "\n")
    return path


DESCRIPTION = "Start, stop and list the local MLflow server, Ray head and S3 (moto), by process id."
DEV_STACK = ("mlflow", "ray")  # what `start` without a service name starts: what `make run` uses
STOP_ORDER = ("ray", "mlflow", "s3")  # the clients (Ray job drivers log to MLflow and S3) first


def _env(name: str, default: str | None = None) -> str | None:
    """A default from the environment (a string: argparse converts it with the option's type)."""
    return os.environ.get(name) or default


def add_dev_arguments(parser: argparse.ArgumentParser) -> None:
    """`start [mlflow|ray|s3]`, `stop [mlflow|ray|s3|all]`, `status`, `env`; defaults from the
    environment variables the shell scripts (mlflow/start.sh, cluster/start_local.sh) honour."""
    parser.add_argument(
        "--state-dir",
        default=_env("CFCML_STATE_DIR", str(default_state_dir())),
        help="where pids, logs and data live (default: $CFCML_STATE_DIR, else <repo>/.cfcml-state)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    timeout = _env("CFCML_SERVICE_TIMEOUT", "180")
    start = sub.add_parser(
        "start", help="start services in the background (default: the MLflow server, then the Ray head)"
    )
    start_sub = start.add_subparsers(dest="service", metavar="{mlflow,ray,s3}")
    mlflow = p = start_sub.add_parser("mlflow", help="the MLflow tracking server")
    p.add_argument(
        "--host", default=_env("CFCML_MLFLOW_HOST", LOCALHOST), help="a non-loopback address needs --allow-remote"
    )
    p.add_argument("--port", type=int, default=_env("CFCML_MLFLOW_PORT", str(MLFLOW_DEFAULT_PORT)))
    p.add_argument(
        "--backend-uri",
        default=None,
        help="default: $MLFLOW_BACKEND_STORE_URI, else sqlite:///<state>/mlflow.db (a URI with a password "
        "belongs in that variable: a command line is visible to every user in ps)",
    )
    p.add_argument(
        "--artifacts-destination", default=None, help="default: $MLFLOW_ARTIFACTS_DESTINATION, else <state>/mlartifacts"
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="serve a non-loopback --host, with MLflow's basic-auth app (admin password in <state>)",
    )
    p.add_argument("--allowed-hosts", default=None, help="MLflow --allowed-hosts (Host-header check)")
    p.add_argument("--workers", type=int, default=_env("MLFLOW_WORKERS", "1"))
    p.add_argument("--timeout", type=float, default=timeout)
    ray = p = start_sub.add_parser("ray", help="a local Ray head")
    p.add_argument("--port", type=int, default=_env("CFCML_RAY_PORT", str(RAY_DEFAULT_PORT)))
    p.add_argument(
        "--dashboard-port", type=int, default=_env("CFCML_RAY_DASHBOARD_PORT", str(RAY_DEFAULT_DASHBOARD_PORT))
    )
    p.add_argument("--num-cpus", type=int, default=_env("CFCML_RAY_NUM_CPUS"), help="default: nproc")
    p.add_argument("--num-gpus", type=int, default=_env("CFCML_RAY_NUM_GPUS"))
    p.add_argument("--auth-mode", choices=RAY_AUTH_MODES, default=_env("RAY_AUTH_MODE", "token"))
    p.add_argument(
        "--node-ip-address",
        default=_env("CFCML_RAY_NODE_IP", LOCALHOST),
        help="default 127.0.0.1: single node, every port on loopback; another address needs token auth",
    )
    p.add_argument("--timeout", type=float, default=timeout)
    p = start_sub.add_parser("s3", help="a local S3 (moto)")
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--timeout", type=float, default=60.0)
    start.set_defaults(stack_parsers={"mlflow": mlflow, "ray": ray})

    stop = sub.add_parser("stop", help="stop a service (default: all) by its recorded process id")
    stop.add_argument("service", nargs="?", default="all", choices=(*SERVICE_NAMES, "all"))
    stop.add_argument("--timeout", type=float, default=30.0)

    status = sub.add_parser("status", help="show recorded services")
    status.add_argument("--json", action="store_true")

    env_cmd = sub.add_parser("env", help="print the client environment of a running service")
    env_cmd.add_argument("service", choices=SERVICE_NAMES)
    env_cmd.add_argument("--shell", action="store_true", help="print `export` lines")


def _start(state: Path, name: str, args: argparse.Namespace) -> Service:
    if name == "mlflow":
        if args.backend_uri and redact(args.backend_uri) != args.backend_uri:
            print(
                "warning: --backend-uri holds a credential, visible in ps while this command runs; "
                "pass it in MLFLOW_BACKEND_STORE_URI instead",
                file=sys.stderr,
            )
        return start_mlflow_server(
            state,
            port=args.port,
            backend_uri=args.backend_uri or _env("MLFLOW_BACKEND_STORE_URI", _env("MLFLOW_BACKEND_URI")),
            artifacts_destination=args.artifacts_destination or os.environ.get("MLFLOW_ARTIFACTS_DESTINATION"),
            host=args.host,
            workers=args.workers,
            timeout=args.timeout,
            allow_remote=args.allow_remote,
            allowed_hosts=args.allowed_hosts,
        )
    if name == "ray":
        return start_ray_head(
            state,
            num_cpus=args.num_cpus,
            port=args.port,
            dashboard_port=args.dashboard_port,
            num_gpus=args.num_gpus,
            auth_mode=args.auth_mode,
            timeout=args.timeout,
            node_ip=args.node_ip_address,
        )
    return start_moto_s3(args.port, state_dir=state, timeout=args.timeout)


def _start_and_report(state: Path, name: str, args: argparse.Namespace) -> None:
    try:
        service = _start(state, name, args)
    except ServiceAlreadyRunning as e:
        print(f"{e.service.name}: already running (pid {e.service.pid}) at {e.service.url}")
        _write_env_file(e.service)
        return
    env_file = _write_env_file(service)
    if service.extra.get("warning"):
        print(f"warning: {service.extra['warning']}", file=sys.stderr)
    print(f"{service.name}: started (pid {service.pid}) at {service.url}")
    print(f"{service.name}: log {service.log_path}")
    if env_file:
        print(f"{service.name}: client environment in {env_file} (source it)")


def _stop(state: Path, which: str, timeout: float) -> None:
    """Stop one service or all; with all, one that fails to stop does not keep the others running."""
    failed = []
    for name in STOP_ORDER if which == "all" else (which,):
        try:
            service = load_service(state, name)
            if service is None:
                if which != "all":
                    print(f"{name}: not running (no state in {state})")
                continue
            service.stop(timeout=timeout)
        except ServiceError as e:
            failed.append(e)
            continue
        with contextlib.suppress(FileNotFoundError):
            (state / f"{name}.env").unlink()
        print(f"{name}: stopped (pid {service.pid})")
    if failed:
        raise ServiceError("; ".join(str(e) for e in failed))


def _status(state: Path, as_json: bool) -> None:
    rows = []
    for name in SERVICE_NAMES:
        service = load_service(state, name)
        if service is not None:
            rows.append({**json.loads(service.to_json()), "running": service.is_running()})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        flag = "running" if row["running"] else "dead (stale state)"
        print(f"{row['name']}: {flag}, pid {row['pid']}, {row['url']}, log {row['log_path']}")
    if not rows:
        print(f"no services recorded in {state}")


def run_dev(args: argparse.Namespace) -> int:
    """Run parsed `add_dev_arguments` options: 0 done, 2 refused (bad input), 1 a service failed."""
    state = Path(args.state_dir).resolve()
    try:
        if args.command == "start":
            if args.service is not None:
                _start_and_report(state, args.service, args)
            else:  # the dev stack, each service with its defaults (environment included)
                for name in DEV_STACK:
                    _start_and_report(state, name, args.stack_parsers[name].parse_args([]))
            return 0
        if args.command == "stop":
            _stop(state, args.service, args.timeout)
            return 0
        if args.command == "status":
            _status(state, args.json)
            return 0
        if args.command == "env":
            service = load_service(state, args.service)
            if service is None or not service.is_running():
                print(f"{args.service}: not running (state dir {state})", file=sys.stderr)
                return 1
            _print_env(service, args.shell)
            return 0
    except ServiceRefused as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        return 2
    except ServiceError as e:
        print(f"error: {redact(e)}", file=sys.stderr)
        return 1
    return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m cfcml.platform.services ...``: the same commands as ``cfcml dev ...``."""
    parser = argparse.ArgumentParser(prog="python -m cfcml.platform.services", description=DESCRIPTION)
    add_dev_arguments(parser)
    return run_dev(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
