"""Cluster and service files parse, validate and contain the fields the docs promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "mlflow/start.sh",
    "mlflow/stop.sh",
    "cluster/start_local.sh",
    "cluster/stop_local.sh",
]


def load(rel: str):
    return yaml.safe_load((ROOT / rel).read_text())


def test_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = load("cluster/runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation
    assert env["working_dir"] == "."
    for excluded in (".venv", "data", ".cfcml-state", "mlruns", ".git"):
        assert excluded in env["excludes"]
    assert env["env_vars"] == {
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_WAIT_POLICY": "PASSIVE",  # idle threads must not spin on a shared node
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",  # a busy node still starts its workers
    }


def test_aws_autoscaler_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster/aws.yaml")
    validate_config(prepare_config(config))  # Ray's schema + consistency checks
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = {k: v for k, v in types.items() if v.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_workers, "no GPU worker type"
    instance_types = {v["node_config"]["InstanceType"] for v in gpu_workers.values()}
    assert instance_types & {"g5.xlarge", "p4d.24xlarge"}
    for spec in gpu_workers.values():
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1
    assert any(".[cuda]" in c for c in config["worker_setup_commands"])
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "RAY_USAGE_STATS_ENABLED=0" in start


def test_kuberay_rayjob():
    job = load("cluster/kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/tune_men.py")
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no GPU worker group"
    assert all(g["maxReplicas"] >= g["minReplicas"] >= 0 for g in gpu_groups)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts(script):
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, check=True).stdout
    assert out.strip()


def test_mlflow_dir_never_shadows_the_mlflow_package():
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import mlflow; print(mlflow.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "site-packages" in out


def test_readme_documents_each_file():
    readme = (ROOT / "cluster" / "README.md").read_text()
    for name in (
        "start_local.sh",
        "stop_local.sh",
        "runtime_env.yaml",
        "aws.yaml",
        "kuberay-rayjob.yaml",
        "RAY_AUTH_MODE",
        "mlflow/start.sh",
        "--node-ip-address",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0",
        "--allow-remote",
        "basic-auth",
        "MLFLOW_BACKEND_STORE_URI",
        "start_ray_worker",
        "cfcml.train_nodes",
        "tests/platform/test_two_node.py",
        "ray start --address",
    ):
        assert name in readme, name


def _tune_commands(text: str) -> list[list[str]]:
    """Every complete `python jobs/tune_men.py ...` command in ``text`` (continuation lines joined;
    elided ones, with `...`, skipped), as argv after the script."""
    import shlex

    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if "python jobs/tune_men.py" not in line:
            continue
        command = line.split("python jobs/tune_men.py", 1)[1].split("`")[0]
        if "..." not in command:
            commands.append(shlex.split(command))
    return commands


def test_documented_study_commands_parse():
    """The RayJob's entrypoint and the multi-node commands in cluster/README.md are accepted by
    the study's own parser (an option renamed in the code must be renamed there too)."""
    from cfcml.platform.study.options import build_parser

    job = load("cluster/kuberay-rayjob.yaml")
    commands = _tune_commands(job["spec"]["entrypoint"]) + _tune_commands((ROOT / "cluster" / "README.md").read_text())
    assert len(commands) >= 2
    parser = build_parser("jobs/tune_men.py", {"dataset": "men", "preset": "men"})
    for argv in commands:
        args = parser.parse_args(argv)  # exits 2 (SystemExit) on an unknown option
        assert args.preset == "men" and args.data is not None, argv


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("mlflow/start.sh", ["--allow-remote", "--allowed-hosts", "MLFLOW_BACKEND_STORE_URI"]),
        ("cluster/start_local.sh", ["--node-ip-address", "CFCML_RAY_NODE_IP"]),
    ],
)
def test_scripts_document_their_exposure_flags(script, flags):
    out = subprocess.run(["bash", str(ROOT / script), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in flags:
        assert flag in out, flag


def test_mlflow_start_passes_no_uri_on_a_command_line():
    """The backend/artifact URIs may hold passwords: exported to the server, never argv."""
    text = (ROOT / "mlflow/start.sh").read_text()
    assert 'export MLFLOW_BACKEND_STORE_URI="$BACKEND"' in text
    assert '--backend-uri "$BACKEND"' not in text and '--artifacts-destination "$ARTIFACTS"' not in text
