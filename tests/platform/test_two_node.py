"""A study across two Ray nodes on this machine: a head and a worker node joined with
`ray start --address ... --block`, each with 1 CPU and its own custom resource (`head_node`,
`worker_node`), Ray storage and MLflow artifacts on S3 (moto), as a real cluster whose nodes
share no disk would have them.

Every trial runs 2 DDP workers of 1 CPU: they can only be placed one per node, and each rank's
node id reaches the trial's MLflow run (tag `cfcml.train_nodes`). The worker node is killed
(its raylet, SIGKILL by pid) while the second trial trains: the trial cannot continue on the
head's single CPU, so Ray Train waits for the resources; the study's node watch sees the lost node
and the infeasible worker group and, after `--node-loss-timeout`, stops the study cleanly by
itself (exit 75, no trial failed, every MLflow run closed, the reason on the parent run). The
node rejoins and `--resume` finishes the study without re-running the finished trial, evaluates
and registers.

Sized for a 2-core machine: 45 patients, 4x16x16 volumes, 1 fold, 3 epochs, 2 trials.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import s3_client

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.slow]

BUCKET = "cfcml-two-node"
EPOCHS = 3
STUDY = "twonode"
NODE_LOSS_TIMEOUT = 20
SMALL = ["data.image_size=[4,16,16]", "data.aug_prob=0.0", "train.select_min_epoch=0", "train.select_window=1"]


def machine_ip() -> str:
    """This machine's address as Ray resolves it for a multi-node cluster."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def alive_nodes(head) -> dict[str, str]:
    """{custom resource: node id} of the cluster's alive nodes (Ray's state API on the dashboard)."""
    from cfcml.platform.services import http_get, ray_auth_headers

    status, body = http_get(f"{head.url}/api/v0/nodes?limit=100", ray_auth_headers(head), timeout=10)
    assert status == 200, body[:500]
    nodes = json.loads(body)["data"]["result"]["result"]
    return {
        name: n["node_id"]
        for n in nodes
        if n["state"] == "ALIVE"
        for name in ("head_node", "worker_node")
        if name in n.get("resources_total", {})
    }


def raylet_pid(worker) -> int:
    from cfcml.platform.services.process import group_pids

    for pid in group_pids(worker.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if Path(f.read().split(b"\0")[0].decode()).name == "raylet":
                return pid
    raise AssertionError(f"no raylet in the process group of {worker.pid}")


def join_worker(head, state: Path, env: dict):
    """A worker node (1 CPU, `worker_node`) joined to ``head``. Ray gives a joining raylet a
    fixed 30 s to register with the GCS ("The current node timed out during startup"), which a
    busy 2-core machine can miss: a start that fails so is tried again."""
    from cfcml.platform.services import ServiceError, start_ray_worker

    for attempt in range(3):
        try:
            return start_ray_worker(head, state, num_cpus=1, env=env, resources={"worker_node": 1})
        except ServiceError as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"worker node start {attempt + 1} timed out; trying again")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster(moto_s3, tmp_path_factory):
    """Head (1 CPU, `head_node`) on this machine's address with token auth, a worker node
    (1 CPU, `worker_node`) joined to it, an MLflow server with proxied S3 artifacts."""
    import shutil
    import tempfile

    from cfcml.platform.services import start_mlflow_server, start_ray_head

    s3_client(moto_s3).create_bucket(Bucket=BUCKET)
    env = {**moto_s3.client_env, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    state = Path(tempfile.mkdtemp(prefix="c2n-", dir="/tmp"))  # short: Ray's socket paths
    services, info = [], {}
    try:
        mlflow = start_mlflow_server(state / "mlflow", artifacts_destination=f"s3://{BUCKET}/mlflow", env=env)
        services.append(mlflow)
        head = start_ray_head(
            state / "head", num_cpus=1, auth_mode="token", env=env, node_ip=machine_ip(), resources={"head_node": 1}
        )
        services.append(head)
        worker = join_worker(head, state / "worker", env)
        services.append(worker)
        port = moto_s3.url.rsplit(":", 1)[1]
        info.update(
            state=state,
            mlflow=mlflow,
            head=head,
            worker=worker,
            env=env,
            client_env={**env, **head.client_env, "MLFLOW_TRACKING_URI": mlflow.url},
            storage=f"s3://{BUCKET}/ray?endpoint_override=127.0.0.1:{port}&scheme=http",
        )
        yield info
    finally:
        for service in [info.get("worker"), *reversed(services)]:  # the worker: the last one to join
            if service is not None:
                service.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_a_worker_node_joins_with_the_heads_token_and_its_own_resource(cluster):
    """Two alive nodes, each with its own custom resource and 1 CPU; the worker node's
    processes run with the head's auth mode, token file and dashboard address."""
    head, worker = cluster["head"], cluster["worker"]
    nodes = alive_nodes(head)
    assert set(nodes) == {"head_node", "worker_node"} and nodes["head_node"] != nodes["worker_node"]
    with open(f"/proc/{raylet_pid(worker)}/environ", "rb") as f:
        environ = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    assert environ[b"RAY_AUTH_MODE"] == b"token"
    assert environ[b"RAY_AUTH_TOKEN_PATH"].decode() == head.client_env["RAY_AUTH_TOKEN_PATH"]
    assert b"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in environ  # Ray refuses worker nodes with it off
    # Ray Train's placement-group cleaner finds the cluster by it, not among other clusters on this machine
    assert environ[b"RAY_API_SERVER_ADDRESS"].decode() == head.url


def _space(tmp_path: Path) -> Path:
    """smoke.yaml with ASHA's grace period at the epoch budget: no trial is stopped early."""
    text = re.sub(r"grace_period: \d+", f"grace_period: {EPOCHS}", (ROOT / "search_spaces" / "smoke.yaml").read_text())
    path = tmp_path / "smoke-two-node.yaml"
    path.write_text(text)
    return path


def _runs(client):
    exp = client.get_experiment_by_name("cfcml-men")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`cfcml.study` = '{STUDY}'", max_results=100)


def _children(client):
    return sorted((r for r in _runs(client) if r.data.tags.get("mlflow.parentRunId")), key=lambda r: r.info.start_time)


def _wait(predicate, timeout: float, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(0.5)
    return None


def test_study_spans_two_nodes_survives_losing_one_and_resumes(cluster, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    from cfcml.datasets import write_synthetic
    from cfcml.platform.train_loop import TAG_TRAIN_NODES

    head, url = cluster["head"], cluster["mlflow"].url
    client = MlflowClient(url)
    cohort = write_synthetic("men", tmp_path / "men45", 45, 0)
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, str(ROOT / "jobs" / "tune_men.py"), "--preset", "men-smoke", "--data", str(cohort)]
    cmd += ["--name", STUDY, "--num-samples", "2", "--epochs", str(EPOCHS), "--search-runs", "1"]
    cmd += ["--workers-per-trial", "2", "--cpus-per-worker", "1", "--storage", cluster["storage"]]
    cmd += ["--tracking-uri", url, "--ray-address", head.address, "--search-space", str(_space(tmp_path))]
    cmd += ["--optuna-storage", optuna_url, "--git-commit", "test-commit", "--no-system-metrics"]
    cmd += ["--set", f"data.cache_dir={tmp_path / 'cache'}", *[a for s in SMALL for a in ("--set", s)]]
    cmd += ["--json-out", str(tmp_path / "summary.json"), "--node-loss-timeout", str(NODE_LOSS_TIMEOUT)]
    env = {**os.environ, **cluster["client_env"], "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    nodes = alive_nodes(head)

    # phase 1: the first trial finishes on both nodes; the worker node dies during the second
    t0 = time.time()
    log_path = tmp_path / "phase1.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            second = _wait(
                lambda: (c := _children(client)) and len(c) == 2 and TAG_TRAIN_NODES in c[1].data.tags and c[1],
                900,
                proc,
            )
            assert second is not None, (
                f"the second trial never trained (rc {proc.poll()}):\n{log_path.read_text()[-4000:]}"
            )
            os.kill(raylet_pid(cluster["worker"]), signal.SIGKILL)
            killed_at = time.time()
            print(f"phase 1: worker node killed at {killed_at - t0:.0f} s")
            cluster["worker"].stop()  # the rest of its process group (`ray start --block` tears down)
            assert _wait(lambda: "worker_node" not in alive_nodes(head), 90), "the head still lists the worker node"
            lost_at = time.time()
            _wait(lambda: proc.poll() is not None, 300)  # the node watch stops the study by itself
            rc1 = proc.poll()
        finally:
            if proc.poll() is None:
                proc.kill()
    phase1 = log_path.read_text()
    interrupted_at = time.time()
    assert rc1 == 75, f"a study stopped for a lost node exits 75, got {rc1}:\n{phase1[-4000:]}"
    assert interrupted_at - lost_at >= NODE_LOSS_TIMEOUT - 5, "stopped before the trial waited the timeout"
    assert "lost Ray node" in phase1 and "--resume" in phase1, phase1[-4000:]
    first, second = _children(client)
    assert first.info.status == "FINISHED" and client.get_run(second.info.run_id).info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in _runs(client))  # every MLflow run closed
    parent = next(r for r in _runs(client) if not r.data.tags.get("mlflow.parentRunId"))
    assert "lost Ray node" in parent.data.tags["cfcml.stop_reason"]
    # the two DDP ranks of a trial ran on different nodes, one per node
    assert sorted(first.data.tags[TAG_TRAIN_NODES].split(",")) == sorted(nodes.values())

    # phase 2: the node rejoins; --resume finishes the study
    cluster["worker"] = join_worker(head, cluster["state"] / "worker", cluster["env"])  # stopped by the fixture
    now = alive_nodes(head)
    assert now["worker_node"] != nodes["worker_node"] and now["head_node"] == nodes["head_node"]
    out = subprocess.run(
        [*cmd, "--resume"], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    print(f"phase 1: {interrupted_at - t0:.0f} s, phase 2 (resumed): {time.time() - interrupted_at:.0f} s")

    ostudy = optuna.load_study(study_name=STUDY, storage=optuna_url)
    assert [t.state.name for t in ostudy.trials] == ["COMPLETE", "COMPLETE"]
    runs = _runs(client)
    parents = [r for r in runs if not r.data.tags.get("mlflow.parentRunId")]
    children = _children(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [r.info.run_id for r in children] == [first.info.run_id, second.info.run_id]
    assert all(r.info.status == "FINISHED" for r in children)
    # the finished trial was not re-run: its epochs were logged once, before the interrupt
    history = client.get_metric_history(first.info.run_id, "cv_val_auc")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert all(m.timestamp / 1000 < killed_at for m in history)
    # the second trial finished on the head and the rejoined node
    second = client.get_run(second.info.run_id)
    assert sorted(second.data.tags[TAG_TRAIN_NODES].split(",")) == sorted(now.values())
    assert [m.step for m in client.get_metric_history(second.info.run_id, "cv_val_auc")][-1] == EPOCHS
    # evaluated and registered
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model_uri"] == "models:/cfcml-men@challenger"
    mv = client.get_model_version_by_alias("cfcml-men", "challenger")
    assert mv.run_id == summary["best_run_id"] and mv.tags["git.commit"] == "test-commit"
    assert client.get_run(parents[0].info.run_id).data.metrics["test_auc_mean"] >= 0
