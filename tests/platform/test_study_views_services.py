"""A tiny study against real local services (MLflow server + Ray head), as `make run` starts
them: the Optuna views in the parent run, pruned trials visible as such in MLflow and Optuna,
and an epoch budget that is never overrun — not even by epochs a stopped trial's Train workers
could train after Tune's decision.

6 trials x 2 epochs x 1 fold on 45 patients (4x16x16), budget 10 epochs: trials stop at
epoch 1 (the ASHA rung; grace 1, reduction factor 2) by ASHA or by the budget.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ray_and_mlflow, study_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.slow]

BUDGET = 10


@pytest.fixture(scope="module")
def services():
    env = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with ray_and_mlflow("cfv-", env) as (_, mlflow, ray):
        yield {"mlflow": mlflow, "ray": ray, "env": {**env, **ray.client_env, **mlflow.client_env}}


def test_study_views_pruned_trials_and_budget(services, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    from cfcml.datasets import write_synthetic

    cohort = write_synthetic("men", tmp_path / "men45", 45, 0)
    space = tmp_path / "space.yaml"
    smoke = re.sub(r"grace_period: \d+", "grace_period: 1", (ROOT / "search_spaces" / "smoke.yaml").read_text())
    space.write_text(smoke + "sampler: {n_startup_trials: 2}\n")  # a rung at epoch 1 of 2
    url, study, optuna_url = services["mlflow"].url, "views", f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = study_command(
        preset="men-smoke",
        data=cohort,
        name=study,
        num_samples=6,
        epochs=2,
        search_runs=1,
        budget_epochs=BUDGET,
        storage=tmp_path / "ray",
        tracking_uri=url,
        ray_address=services["ray"].address,
        search_space=space,
        optuna_storage=optuna_url,
        no_register=True,
        no_system_metrics=True,
        json_out=tmp_path / "summary.json",
        sets=[
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.image_size=[4,16,16]",
            "data.aug_prob=0.0",
            "train.select_min_epoch=0",
            "train.select_window=1",
        ],
    )
    env = {**os.environ, **services["env"], "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=840, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("cfcml-men")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`cfcml.study` = '{study}'", max_results=50)
    parent = next(r for r in runs if not r.data.tags.get("mlflow.parentRunId"))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]

    # the Optuna views in the parent run
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} | {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    assert {
        "plots/optuna_history.png",
        "plots/optuna_parallel_coordinate.png",
        "plots/optuna_intermediate_values.png",
        "plots/optuna_param_importances.png",
        "optuna_trials.csv",
        "optuna_param_importances.json",
    } <= files
    assert {f"importance.{k}" for k in ("model.n_image_tokens", "loss.alpha", "loss.gamma")} <= set(parent.data.metrics)
    complete = [r for r in children if r.data.tags.get("cfcml.trial_state") == "COMPLETE"]
    pruned = [r for r in children if r.data.tags.get("cfcml.trial_state") == "PRUNED"]
    assert len(complete) + len(pruned) == len(children) >= 3

    # pruned trials: tagged with who stopped them and where, and PRUNED in Optuna too
    assert pruned, "the budget (or ASHA) should have stopped at least one trial"
    for r in pruned:
        assert r.data.tags["cfcml.stopped_by"] in ("ASHA", "budget") and r.data.tags["cfcml.stopped_at_epoch"] == "1"
        assert r.data.tags["cfcml.asha_rung"] == "1" and r.data.metrics["epochs_trained"] == 1
    for r in complete:
        assert r.data.metrics["epochs_trained"] == 2 and "cfcml.stopped_by" not in r.data.tags
    states = [t.state.name for t in optuna.load_study(study_name=study, storage=optuna_url).trials]
    assert states.count("PRUNED") == len(pruned) and states.count("COMPLETE") == len(complete)
    assert summary["trial_states"]["pruned"] == len(pruned)

    # what the Train workers really trained (every epoch they logged) stays within the budget:
    # a stopped trial's workers wait at the rung for the decision instead of training on
    trained = {
        r.info.run_id: max(m.step for m in client.get_metric_history(r.info.run_id, "cv_val_auc")) for r in children
    }
    for r in pruned:
        assert trained[r.info.run_id] == 1, "a stopped trial trained past its rung"
    assert sum(trained.values()) == summary["epochs_spent"] == parent.data.metrics["epochs_spent"] <= BUDGET
    assert parent.data.metrics["budget_epochs"] == BUDGET and parent.data.params["budget_epochs"] == str(BUDGET)
