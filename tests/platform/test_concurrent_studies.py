"""Two studies at once (issue 23, item 3): submitted together with `ray job submit`, as two users
would, to one Ray head and one MLflow server, both registering the SAME model name.

Both jobs succeed; the registry holds two versions, each the model of its own study's best trial
(its run is a child of that study's parent run); no run is left RUNNING. (Two concurrent
`cfcml promote` calls on one name are tested in tests/platform/test_promote_gate.py.)

Sized for a 2-core machine: 45 patients, 4x16x16 volumes, 1 trial x 1 epoch x 1 fold per study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ray_and_mlflow, study_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.slow]

MODEL = "cfcml-shared"
SMALL = ["data.image_size=[4,16,16]", "data.aug_prob=0.0", "train.select_min_epoch=0", "train.select_window=1"]


@pytest.fixture(scope="module")
def services():
    env = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with ray_and_mlflow("cfc-", env) as (_, mlflow, ray):
        yield {"mlflow": mlflow, "ray": ray, "env": {**env, **ray.client_env, **mlflow.client_env}}


def _ray(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_two_studies_submitted_at_once_register_distinct_versions_of_one_model(services, tmp_path):
    from mlflow.tracking import MlflowClient

    from cfcml.datasets import write_synthetic

    cohort = write_synthetic("men", tmp_path / "men45", 45, 0)
    url = services["mlflow"].url
    env = {**os.environ, **services["env"], "PYTHONUNBUFFERED": "1"}
    # cluster/runtime_env.yaml, pointed at this test's MLflow server
    runtime = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime["working_dir"] = str(ROOT)
    runtime["env_vars"]["MLFLOW_TRACKING_URI"] = url
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime))
    studies = ("conc-a", "conc-b")
    submits = []
    for name in studies:
        study = study_command(
            preset="men-smoke",
            data=cohort,
            name=name,
            num_samples=1,
            epochs=1,
            search_runs=1,
            storage=tmp_path / "ray",
            tracking_uri=url,
            model_name=MODEL,
            no_system_metrics=True,
            json_out=tmp_path / f"{name}.json",
            sets=[f"data.cache_dir={tmp_path / 'cache'}", *SMALL],
        )
        entrypoint = ["python", "jobs/tune_men.py", *study[2:]]  # as a user types it, from the repo root
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--submission-id", name]
        submit += ["--runtime-env", str(tmp_path / "runtime_env.yaml"), "--", *entrypoint]
        submits.append((subprocess.Popen(submit, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + 840
    try:
        for proc, _ in submits:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for proc, log in submits:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in studies}
    for (proc, _), name in zip(submits, studies):
        status = _ray("status", name, env=env)
        said = status.stdout + status.stderr
        assert proc.returncode == 0 and f"Job '{name}' succeeded" in said, f"{said}\n{logs[name][-4000:]}"

    summaries = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in studies}
    client = MlflowClient(url)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    assert {s["model_name"] for s in summaries.values()} == {MODEL}
    assert {s["model_version"] for s in summaries.values()} == {"1", "2"}  # no collision, none lost
    by_version = {v.version: v for v in versions}
    for name, summary in summaries.items():
        version = by_version[summary["model_version"]]
        assert version.run_id == summary["best_run_id"]  # the version is this study's best trial
        run = client.get_run(version.run_id)
        assert run.data.tags["cfcml.study"] == name
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["cfcml.study"] == name and not parent.data.tags.get("mlflow.parentRunId")
        assert version.tags["trial_id"] == summary["best_trial_id"]
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert challenger.version in {"1", "2"}  # the alias names one whole version, not a mix
    exp = client.get_experiment_by_name("cfcml-men")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]  # 2 parents + 2 trials, nothing left RUNNING
