"""Local services start on 127.0.0.1, answer their health checks and stop by process id."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import s3_client

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

ROOT = Path(__file__).resolve().parents[2]

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


def _listening_by_inode() -> dict[str, tuple[str, int]]:
    """socket inode -> (local ip, port) of every TCP socket in LISTEN state."""
    found = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            hex_ip, hex_port = fields[1].split(":")
            if fields[3] != "0A":
                continue
            raw = bytes.fromhex(hex_ip)
            if width == 8:
                ip = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                ip = str(ipaddress.IPv6Address(words))
                mapped = ipaddress.IPv6Address(words).ipv4_mapped
                ip = str(mapped) if mapped else ip
            found[fields[9]] = (ip, int(hex_port, 16))
    return found


def listening_sockets_of(pids) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket held by one of ``pids``."""
    sockets = _listening_by_inode()
    held = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in sockets:
                held.add(sockets[target[8:-1]])
    return held


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
    assert (Path(mlflow_server.state_dir) / "mlflow.pid").read_text().strip() == str(mlflow_server.pid)


def test_moto_start_stop(moto_s3):
    # a private instance, so the session one stays up
    from cfcml.platform.services import start_moto_s3

    with start_moto_s3() as s3:
        assert s3.url.startswith("http://127.0.0.1:")
        assert listening_addresses(s3.port) == {"127.0.0.1"}
        client = s3_client(s3)
        client.create_bucket(Bucket="probe")
        assert [b["Name"] for b in client.list_buckets()["Buckets"]] == ["probe"]
    assert_gone(s3)


def test_mlflow_scripts_with_proxied_s3_artifacts(moto_s3, tmp_path):
    """mlflow/start.sh + S3 artifacts via the server (client has no S3 settings) + stop.sh."""
    from mlflow import MlflowClient

    s3 = s3_client(moto_s3)
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
        assert oct(Path(service.client_env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode)[-3:] == "600"
        assert http_get(f"{url}/api/version")[0] == 401  # token auth is on
        status, body = http_get(f"{url}/api/version", {"Authorization": f"Bearer {token}"})
        assert status == 200 and json.loads(body)["ray_version"]
        env_file = (state / "ray.env").read_text()
        assert env_file.count("export ") == 5 and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in env_file
        assert service.address.startswith("127.0.0.1:")
        # every port of every process of this cluster listens on loopback only (GCS, raylet,
        # agents, client server, dashboard): nothing is reachable from the network
        sockets = listening_sockets_of(service.remaining_pids())
        assert {p for _, p in sockets} >= {port, dashboard_port}
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets

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


def _cmdlines(pids) -> str:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return "\n".join(out)


def test_backend_uri_password_is_in_no_command_line_log_or_state_file(tmp_path):
    """The server gets the URI through its environment; ps, mlflow.log and the state show none of it."""
    from mlflow import MlflowClient

    secret = f"pw{uuid.uuid4().hex}"
    state = tmp_path / "state"
    state.mkdir()
    # SQLite ignores unknown URI parameters, so this is a working URI that carries a password
    uri = f"sqlite:///file:{state}/mlflow.db?uri=true&password={secret}"
    env = script_env(CFCML_STATE_DIR=str(state), CFCML_MLFLOW_PORT=str(free_port()), MLFLOW_BACKEND_STORE_URI=uri)
    start = subprocess.run(
        ["bash", str(ROOT / "mlflow/start.sh")], env=env, capture_output=True, check=False, text=True, timeout=300
    )
    assert start.returncode == 0, start.stdout + start.stderr
    service = load_service(state, "mlflow")
    try:
        assert MlflowClient(service.url).create_experiment("works")  # the URI really is in use
        pids = service.remaining_pids()
        assert len(pids) >= 2  # mlflow server + uvicorn
        assert secret not in _cmdlines(pids)
        server_env = Path(f"/proc/{service.pid}/environ").read_bytes()
        assert f"MLFLOW_BACKEND_STORE_URI={uri}".encode() in server_env.split(b"\0")
        for path in state.iterdir():
            if path.is_file() and path.suffix in (".log", ".json", ".env", ".pid"):
                assert secret not in path.read_text(errors="replace"), path
        assert service.extra["backend_uri"].endswith("password=***")
        assert secret not in start.stdout + start.stderr
    finally:
        service.stop()


def test_failed_start_shows_no_password(tmp_path):
    secret = f"pw{uuid.uuid4().hex}"
    with pytest.raises(ServiceError) as info:  # SQLite refuses user info: the server exits
        start_mlflow_server(tmp_path, backend_uri=f"sqlite://mlflow:{secret}@/{tmp_path}/x.db", timeout=120)
    assert "log:" in str(info.value) and secret not in str(info.value)
    assert secret not in (tmp_path / "mlflow.log").read_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "mlflow.example.org"])
def test_mlflow_on_a_network_address_needs_allow_remote(tmp_path, host):
    from cfcml.platform.services import ServiceRefused

    with pytest.raises(ServiceRefused, match=f"refusing to serve MLflow on {host}.*--allow-remote"):
        start_mlflow_server(tmp_path, host=host)
    assert load_service(tmp_path, "mlflow") is None and not (tmp_path / "mlflow.log").exists()


def test_unauthenticated_ray_on_a_network_address_is_refused(tmp_path):
    from cfcml.platform.services import ServiceRefused, start_ray_head

    with pytest.raises(ServiceRefused, match=r"without authentication \(RAY_AUTH_MODE=disabled\) on 192\.0\.2\.10"):
        start_ray_head(tmp_path, num_cpus=1, auth_mode="disabled", node_ip="192.0.2.10")
    assert load_service(tmp_path, "ray") is None and not (tmp_path / "ray.log").exists()


@pytest.mark.parametrize(
    ("node_ip", "auth_mode", "error", "match"),
    [
        ("127.0.0.1", "token", "ServiceError", r"a head on 127\.0\.0\.1 is single-node.*node_ip="),
        (
            "192.0.2.10",
            "disabled",
            "ServiceRefused",
            r"without authentication \(RAY_AUTH_MODE=disabled\) on 192\.0\.2\.10",
        ),
    ],
)
def test_a_worker_node_is_refused_a_loopback_or_open_head(tmp_path, node_ip, auth_mode, error, match):
    """Ray runs worker nodes only in multi-node mode, where a loopback head is unreachable; and a
    worker node on a network address without authentication would run anyone's code."""
    from cfcml.platform.services import ServiceRefused, start_ray_worker

    head = Service(
        name="ray",
        pid=0,
        url="http://127.0.0.1:1",
        address=f"{node_ip}:6379",
        port=1,
        log_path=str(tmp_path / "ray.log"),
        marker="none",
        client_env={"RAY_AUTH_MODE": auth_mode},
        extra={"node_ip": node_ip},
    )
    with pytest.raises({"ServiceError": ServiceError, "ServiceRefused": ServiceRefused}[error], match=match):
        start_ray_worker(head, tmp_path / "worker", num_cpus=1)
    assert load_service(tmp_path / "worker", "ray-worker") is None and not (tmp_path / "worker").exists()


@pytest.mark.parametrize(
    ("script", "args", "env", "match"),
    [
        ("mlflow/start.sh", ["--host", "0.0.0.0"], {}, "refusing to serve MLflow on 0.0.0.0"),
        (
            "cluster/start_local.sh",
            ["--node-ip-address", "192.0.2.10"],
            {"RAY_AUTH_MODE": "disabled"},
            "refusing to start a Ray cluster without authentication",
        ),
    ],
)
def test_scripts_refuse_open_services_with_exit_2(tmp_path, script, args, env, match):
    run = subprocess.run(
        ["bash", str(ROOT / script), *args],
        env=script_env(CFCML_STATE_DIR=str(tmp_path), **env),
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert match in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_remote_mlflow_runs_basic_auth(tmp_path):
    """--allow-remote on 0.0.0.0: basic auth on, password generated 0600, env file without it."""
    from cfcml.platform.services import mlflow_client_env

    state = tmp_path / "state"
    port = free_port()
    env = script_env(CFCML_STATE_DIR=str(state), CFCML_MLFLOW_PORT=str(port))
    start = subprocess.run(
        ["bash", str(ROOT / "mlflow/start.sh"), "--host", "0.0.0.0", "--allow-remote"],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    service = load_service(state, "mlflow")
    try:
        assert "warning: MLflow serves 0.0.0.0" in start.stderr and "basic auth" in start.stderr
        password_file = Path(service.extra["admin_password_file"])
        assert oct(password_file.stat().st_mode)[-3:] == "600"
        password = password_file.read_text().strip()
        assert len(password) >= 32
        assert http_get(f"{service.url}/health")[0] == 200
        search = f"{service.url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_get(search)[0] == 401  # no credentials
        import base64

        good = {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(b"admin:password1234").decode()}
        assert http_get(search, good)[0] == 200 and http_get(search, bad)[0] == 401
        env_file = (state / "mlflow.env").read_text()
        assert password not in env_file and f'MLFLOW_TRACKING_PASSWORD="$(cat {password_file})"' in env_file
        assert mlflow_client_env(service)["MLFLOW_TRACKING_PASSWORD"] == password
        assert password not in _cmdlines(service.remaining_pids())
        assert password not in Path(service.log_path).read_text()
    finally:
        service.stop()
