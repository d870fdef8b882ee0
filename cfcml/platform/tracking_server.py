"""Which MLflow tracking server a command talks to, and whether it answers — in seconds.

Rules (docs/platform.md, "Tracking server"): a command that needs the tracking server or
registry (`cfcml predict` with ``models:/``/``runs:/`` URIs, `cfcml promote`) uses
``--tracking-uri`` or ``MLFLOW_TRACKING_URI``; with neither it stops with an error instead
of MLflow's default (a ``mlflow.db`` SQLite file created in the working directory). A
``sqlite:///`` URI must name an existing database file for the same reason. An ``http(s)``
server is probed on ``/health`` before use, so an unreachable server or a closed port is one
clear line after at most ``timeout`` seconds, not MLflow's minutes of retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .redact import redact

# MLflow's defaults retry for minutes (7 retries, backoff factor 2, 120 s timeout). A CLI user
# wants an answer in seconds; a rate-limited server still gets two retries. The artifact
# download progress bars would put a dozen lines on stderr before any error line.
CLI_CLIENT_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class TrackingServerError(RuntimeError):
    """No tracking server given, or the one given cannot be used (one line, redacted)."""


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """``tracking_uri``, else the one MLflow was given (``MLFLOW_TRACKING_URI`` or
    ``mlflow.set_tracking_uri``); raises :class:`TrackingServerError` when there is none."""
    if tracking_uri:
        return tracking_uri
    # MLflow (seconds to import) only here: the CLI imports this module for every command
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if is_tracking_uri_set():
        import mlflow

        return mlflow.get_tracking_uri()
    raise TrackingServerError(
        "no MLflow tracking server given: pass --tracking-uri URL or set MLFLOW_TRACKING_URI "
        "(mlflow/start.sh serves http://127.0.0.1:5000); cfcml does not fall back to a ./mlflow.db"
    )


def check_tracking_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingServerError` unless ``tracking_uri`` can be used right now.

    ``http(s)://``: ``GET /health`` must answer 200 within ``timeout`` seconds.
    ``sqlite:///PATH``: PATH must exist (MLflow would silently create an empty database).
    ``file:`` / plain paths: the folder must exist. Other schemes (``databricks``, ...) pass.
    """
    shown = redact(tracking_uri)
    scheme = tracking_uri.split("://", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme in ("http", "https"):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                status = response.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ConnectionRefusedError):
                why = "connection refused: nothing listens on that port"
            elif isinstance(reason, socket.timeout | TimeoutError):
                why = f"no answer within {timeout:.0f} s"
            elif isinstance(reason, socket.gaierror):
                why = "unknown host name"
            else:
                why = redact(str(reason).strip() or type(reason).__name__, limit=160)
            raise TrackingServerError(
                f"cannot reach the MLflow tracking server at {shown} ({why}); start it (mlflow/start.sh) or "
                "pass the right --tracking-uri"
            ) from None
        if status != 200:
            raise TrackingServerError(
                f"{shown} answered HTTP {status} on /health: not a running MLflow tracking server"
            )
        return
    if scheme == "sqlite":
        path = tracking_uri.split("://", 1)[1]
        path = path.removeprefix("/")  # sqlite:///abs → /abs ; sqlite:///rel → rel
        path = path.split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).exists():
            raise TrackingServerError(f"no MLflow database at {path} (from {shown}); cfcml does not create one")
        return
    if scheme in ("", "file"):
        path = tracking_uri.split("://", 1)[1] if scheme else tracking_uri
        if not Path(path).is_dir():
            raise TrackingServerError(f"no MLflow tracking folder at {path}; cfcml does not create one")


@contextlib.contextmanager
def cli_mlflow_client() -> Iterator[None]:
    """For the block: MLflow's HTTP retries cut to seconds and no progress bars
    (:data:`CLI_CLIENT_SETTINGS`; settings the user exported win)."""
    previous = {k: os.environ.get(k) for k in CLI_CLIENT_SETTINGS}
    for key, value in CLI_CLIENT_SETTINGS.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
