"""Process-level helpers shared by the services: executables, ports, pids, signals, private files.

Nothing here kills by name: processes are found by pid, by process group, or by the marker
environment variable ``CFCML_SERVICE_ID`` that every service process inherits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

MARKER_ENV = "CFCML_SERVICE_ID"
DEFAULT_STATE_DIR = ".cfcml-state"
LOCALHOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service failed to start, to become ready, or to stop."""


class ServiceRefused(ServiceError):
    """A start request that would be unsafe (an open network service): nothing was started."""


def repo_root() -> Path:
    """The repository root (the directory that contains the `cfcml` package)."""
    return Path(__file__).resolve().parents[3]


def default_state_dir() -> Path:
    return repo_root() / DEFAULT_STATE_DIR


def venv_bin() -> Path:
    """The directory of the running interpreter (the venv's bin/ when run from a venv)."""
    return Path(sys.executable).parent


def executable(name: str) -> str:
    """``name`` next to the running interpreter, else on PATH."""
    candidate = venv_bin() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"executable {name!r} not found next to {sys.executable} or on PATH")
    return found


def base_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment for a service, without its marker, with ``env`` on top."""
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


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from the network


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by this user only (0600, also when it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def private_secret(path: Path, make: Callable[[int], str] = secrets.token_urlsafe) -> str:
    """The secret in ``path``, created (``make(32)``: 256 random bits, 0600) when missing or empty."""
    if not path.exists() or not path.read_text().strip():
        write_private(path, make(32))
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


def require_free(port: int, host: str, what: str) -> None:
    """Raise ServiceError naming ``what`` when ``port`` is taken on ``host`` (wildcards: 127.0.0.1)."""
    check_host = LOCALHOST if host in ("0.0.0.0", "::", "") else host
    if not port_is_free(port, check_host):
        raise ServiceError(
            f"{what}: port {port} on {check_host} is already in use; stop whatever listens there or choose another port"
        )


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


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if len(stat) > 2 and int(stat[2]) == pgid and stat[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def has_marker(pid: int, marker: str) -> bool | None:
    """Whether ``pid``'s environment holds ``CFCML_SERVICE_ID=<marker>``; None when unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    return f"{MARKER_ENV}={marker}".encode() in env


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment contains ``CFCML_SERVICE_ID=<marker>``."""
    me = os.getpid()
    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) != me and has_marker(int(entry), marker) and pid_alive(int(entry))
    ]


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def log_tail(path: Path, lines: int = 25) -> str:
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
