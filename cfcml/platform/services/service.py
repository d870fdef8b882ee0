"""A running service's record: process group leader, address, log, state file; start and stop by pid.

Every service is started as the leader of its own process group (``start_new_session``), with
its output in a log file and its state (pid, url, log path) in ``<state>/<name>.json`` plus
``<state>/<name>.pid``. Stopping kills the recorded process group by id, waits, escalates to
SIGKILL, and finally sweeps any process that carries the service's marker environment variable
(Ray job drivers start their own sessions, so the process group alone does not cover them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Self

from ..redact import redact
from .process import (
    MARKER_ENV,
    ServiceError,
    group_pids,
    has_marker,
    killpg,
    log_tail,
    marked_pids,
    pid_alive,
    signal_pids,
    wait_until,
)


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

    def forget(self) -> None:
        """Remove the state and pid files."""
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
        marked = has_marker(self.pid, self.marker)
        return True if marked is None else marked  # cannot read it: trust the pid file

    def is_running(self) -> bool:
        return self.owns_leader() or bool(self.remaining_pids())

    def remaining_pids(self) -> list[int]:
        self._reap()
        pids = set(marked_pids(self.marker))
        if self.owns_leader() or pids:
            pids.update(group_pids(self.pid))
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
                signal_pids([self.pid], signal.SIGTERM)
                wait_until(lambda: not self.owns_leader(), max(1.0, 0.6 * timeout))
            killpg(self.pid, signal.SIGTERM)
            signal_pids(marked_pids(self.marker), signal.SIGTERM)
            wait_until(lambda: not self.remaining_pids(), max(1.0, deadline - time.monotonic()))
        survivors = self.remaining_pids()
        if survivors:
            if leader:
                killpg(self.pid, signal.SIGKILL)
            signal_pids(survivors, signal.SIGKILL)
            wait_until(lambda: not self.remaining_pids(), 10.0)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5)
        survivors = self.remaining_pids()
        if survivors:
            raise ServiceError(f"{self.name}: processes {survivors} survived SIGKILL")
        self.forget()
        if self.extra.get("tmp_log_dir"):  # a stateless service's private log dir
            shutil.rmtree(self.extra["tmp_log_dir"], ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServiceAlreadyRunning(ServiceError):
    def __init__(self, service: Service):
        self.service = service
        super().__init__(
            f"{service.name} is already running (pid {service.pid}, {service.url}); "
            f"stop it first (state in {service.state_file})"
        )


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


def check_not_running(state_dir: Path, name: str) -> None:
    """Raise ServiceAlreadyRunning when ``name`` runs; forget stale state from a crash."""
    existing = load_service(state_dir, name)
    if existing is None:
        return
    if existing.is_running():
        raise ServiceAlreadyRunning(existing)
    existing.forget()


def launch(name: str, cmd: list[str], env: Mapping[str, str], *, log_path: Path, cwd: Path | None, **record) -> Service:
    """Start ``cmd`` as the leader of a new process group, its output in ``log_path`` (the
    command line first, redacted), with a fresh marker in its environment; ``record`` holds
    the remaining :class:`Service` fields (url, address, port, state_dir, client_env, ...)."""
    marker = f"{name}-{uuid.uuid4().hex[:16]}"
    full_env = {**env, MARKER_ENV: marker}
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
    return Service(name=name, pid=popen.pid, log_path=str(log_path), marker=marker, _popen=popen, **record)


def _failure(service: Service, what: str) -> str:
    return f"{what}; log: {service.log_path}\n--- last lines ---\n{log_tail(Path(service.log_path))}"


def wait_ready(service: Service, ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Record ``service``, then poll ``ready`` until true; on timeout or early exit stop it and raise."""
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
            raise ServiceError(_failure(service, f"{service.name} exited with status {popen.returncode} before {what}"))
        time.sleep(0.5)
    with contextlib.suppress(ServiceError):
        service.stop(timeout=10)
    raise ServiceError(_failure(service, f"{service.name} did not become ready ({what}) within {timeout:.0f} s"))
