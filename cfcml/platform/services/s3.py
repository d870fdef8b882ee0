"""An in-memory S3 (``moto_server``) on 127.0.0.1 as a supervised local service."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .process import LOCALHOST, base_env, executable, free_port, http_get, require_free
from .service import Service, check_not_running, launch, wait_ready

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
    state = Path(state_dir).resolve() if state_dir else None
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
        check_not_running(state, name)
    port = int(port) if port else free_port(LOCALHOST)
    require_free(port, LOCALHOST, "moto s3")
    log_dir = state if state is not None else Path(tempfile.mkdtemp(prefix="cfcml-moto-"))
    url = f"http://{LOCALHOST}:{port}"
    service = launch(
        name,
        [executable("moto_server"), "-H", LOCALHOST, "-p", str(port)],
        base_env(MOTO_CLIENT_ENV),
        log_path=log_dir / f"{name}.log",
        cwd=log_dir,
        url=url,
        address=f"{LOCALHOST}:{port}",
        port=port,
        state_dir=str(state) if state is not None else None,
        extra={} if state is not None else {"tmp_log_dir": str(log_dir)},
        client_env={**MOTO_CLIENT_ENV, "MLFLOW_S3_ENDPOINT_URL": url, "AWS_ENDPOINT_URL_S3": url},
    )
    wait_ready(service, lambda: http_get(f"{url}/moto-api/")[0] == 200, timeout, url)
    return service
