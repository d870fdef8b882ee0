"""Local services start on 127.0.0.1, answer their health checks and stop by process id."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from cfcml.platform.services import (
    Service,
    ServiceError,
    free_port,
    http_get,
    load_service,
    marked_pids,
    pid_alive,
    port_is_free,
    start_mlflow_server,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.services


def listening_addresses(port: int) -> set[str]:
    """Local IPs with a TCP socket in LISTEN state on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            hex_ip, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            if width == 8:
                found.add(".".join(str(b) for b in bytes.fromhex(hex_ip)[::-1]))
            else:
                found.add("::" if int(hex_ip, 16) == 0 else hex_ip)
    return found


def assert_gone(service: Service) -> None:
    assert not pid_alive(service.pid), f"leader {service.pid} still alive"
    assert marked_pids(service.marker) == [], "processes of the service remain"
    assert port_is_free(service.port), f"port {service.port} still in use"


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["CFCML_PYTHON"] = sys.executable
    env.update(extra)
    return env


def test_session_mlflow_server_is_local_and_healthy(mlflow_server):
    assert mlflow_server.url.startswith("http://127.0.0.1:")
    assert http_get(f"{mlflow_server.url}/health") == (200, "OK")
    assert listening_addresses(mlflow_server.port) == {"127.0.0.1"}
    recorded = load_service(mlflow_server.state_dir, "mlflow")
    assert recorded is not None and recorded.pid == mlflow_server.pid
    assert (Path(mlflow_server.state_dir) / "mlflow.pid").read_text().strip() == str(
        mlflow_server.pid
    )


def test_moto_start_stop(moto_s3):
    import boto3

    # a private instance, so the session one stays up
    from cfcml.platform.services import start_moto_s3

    with start_moto_s3() as s3:
        assert s3.url.startswith("http://127.0.0.1:")
        assert listening_addresses(s3.port) == {"127.0.0.1"}
        client = boto3.client("s3", endpoint_url=s3.url, **_aws(s3.client_env))
        client.create_bucket(Bucket="probe")
        assert [b["Name"] for b in client.list_buckets()["Buckets"]] == ["probe"]
    assert_gone(s3)


def _aws(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def test_mlflow_scripts_with_proxied_s3_artifacts(moto_s3, tmp_path):
    """mlflow/start.sh + S3 artifacts via the server (client has no S3 settings) + stop.sh."""
    import boto3
    from mlflow import MlflowClient

    s3 = boto3.client("s3", endpoint_url=moto_s3.url, **_aws(moto_s3.client_env))
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    state = tmp_path / "state"
    port = free_port()
    env = script_env(
        **moto_s3.client_env,
        CFCML_STATE_DIR=str(state),
        CFCML_MLFLOW_PORT=str(port),
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{bucket}/artifacts",
    )
    start = subprocess.run(
        ["bash", str(ROOT / "mlflow/start.sh")],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    service = load_service(state, "mlflow")
    assert service is not None and f"127.0.0.1:{port}" in start.stdout
    try:
        assert (state / "mlflow.pid").read_text().strip() == str(service.pid)
        assert http_get(f"{service.url}/health") == (200, "OK")
        assert listening_addresses(port) == {"127.0.0.1"}
        assert f"s3://{bucket}/artifacts" in service.extra["artifacts_destination"]

        client = MlflowClient(service.url)
        experiment_id = client.create_experiment("s3-proxy")
        run = client.create_run(experiment_id)
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")
        client.set_terminated(run.info.run_id)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.endswith("notes/hello.txt") for k in keys), keys
        # starting again is idempotent: it reports the running server
        again = subprocess.run(
            ["bash", str(ROOT / "mlflow/start.sh")],
            env=env,
            capture_output=True,
            check=False,
            text=True,
        )
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        stop = subprocess.run(
            ["bash", str(ROOT / "mlflow/stop.sh")],
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=120,
        )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert_gone(service)
    assert not (state / "mlflow.pid").exists()


def test_start_errors_name_the_log(tmp_path):
    with pytest.raises(ServiceError, match=r"log: .*mlflow\.log"):
        start_mlflow_server(tmp_path, backend_uri="bogus://nowhere", timeout=120)
    assert load_service(tmp_path, "mlflow") is None  # nothing left recorded or running


def test_busy_port_is_refused(mlflow_server, tmp_path):
    with pytest.raises(ServiceError, match="already in use"):
        start_mlflow_server(tmp_path, port=mlflow_server.port)


def test_stale_pid_file_never_kills_a_stranger(tmp_path):
    """A recycled pid (here: our own) without the service marker is not signalled."""
    stale = Service(
        name="mlflow",
        pid=os.getpid(),
        url="http://127.0.0.1:1",
        address="",
        port=free_port(),
        log_path=str(tmp_path / "x.log"),
        marker=f"mlflow-{uuid.uuid4().hex}",
        state_dir=str(tmp_path),
    )
    stale.save()
    assert not stale.owns_leader() and not stale.is_running()
    stale.stop(timeout=2)  # must return without signalling us
    assert load_service(tmp_path, "mlflow") is None


def test_ray_head_scripts(tmp_path):
    """cluster/start_local.sh → dashboard (token auth) + a submitted job → stop_local.sh."""
    # Ray's Unix socket paths must stay short: use a short state dir under /tmp
    state = Path(tempfile.mkdtemp(prefix="cfr-", dir="/tmp"))
    port, dashboard_port = free_port(), free_port()
    env = script_env(
        CFCML_STATE_DIR=str(state),
        CFCML_RAY_PORT=str(port),
        CFCML_RAY_DASHBOARD_PORT=str(dashboard_port),
        CFCML_RAY_NUM_CPUS="1",
    )
    service = None
    try:
        start = subprocess.run(
            ["bash", str(ROOT / "cluster/start_local.sh")],
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=300,
        )
        assert start.returncode == 0, start.stdout + start.stderr
        service = load_service(state, "ray")
        assert service is not None
        url = f"http://127.0.0.1:{dashboard_port}"
        assert service.url == url
        assert listening_addresses(dashboard_port) == {"127.0.0.1"}
        assert service.client_env["RAY_AUTH_MODE"] == "token"
        token = Path(service.client_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        assert (
            oct(Path(service.client_env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode)[-3:]
            == "600"
        )
        assert http_get(f"{url}/api/version")[0] == 401  # token auth is on
        status, body = http_get(
            f"{url}/api/version", {"Authorization": f"Bearer {token}"}
        )
        assert status == 200 and json.loads(body)["ray_version"]
        assert (state / "ray.env").read_text().count("export ") == 4

        # a job submitted like `make run` does (repo root, cluster/runtime_env.yaml, the
        # recorded client environment) runs on this cluster with the uploaded checkout
        probe = tmp_path / "probe.py"
        probe.write_text(
            "import os, ray, cfcml\nray.init()\n"
            "print('PROBE', ray.cluster_resources().get('CPU'), os.environ['RAY_AUTH_MODE'],"
            " os.environ['MLFLOW_TRACKING_URI'], cfcml.__file__)\n"
        )
        job = subprocess.run(
            [
                str(Path(sys.executable).parent / "ray"),
                "job",
                "submit",
                "--runtime-env",
                "cluster/runtime_env.yaml",
                "--",
                "python",
                str(probe),
            ],
            cwd=ROOT,
            env={**env, **service.client_env},
            capture_output=True,
            check=False,
            text=True,
            timeout=300,
        )
        out = job.stdout[-3000:] + job.stderr[-3000:]
        assert "PROBE 1.0 token http://127.0.0.1:5000 " in job.stdout, out
        imported_from = job.stdout.split("PROBE", 1)[1].split()[3]
        assert "runtime_resources" in imported_from, out  # the uploaded working_dir
    finally:
        stop = subprocess.run(
            ["bash", str(ROOT / "cluster/stop_local.sh")],
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=180,
        )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert service is not None
    assert_gone(service)
    # raylet, gcs_server, log_monitor... carry the session dir (under temp_dir) in argv
    temp_dir = service.extra["temp_dir"].encode()
    leftovers = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir in cmdline and pid_alive(int(entry)):
            leftovers.append((entry, cmdline[:120]))
    assert leftovers == [], f"Ray processes of this cluster remain: {leftovers}"
    for port_ in (port, dashboard_port):
        assert port_is_free(port_)
    shutil.rmtree(state, ignore_errors=True)
