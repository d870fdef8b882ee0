"""The platform against real local services: a Ray head, an MLflow server whose artifacts live
in S3 (moto on 127.0.0.1), Ray storage on the same S3.

- Ray Train: 2 CPU workers (DDP, gloo) reach the metrics of 1 process on the same global batch.
- A study end to end, run as the job script would run it: 2 smoke trials at once, the first
  trial's Train worker SIGKILLed mid-epoch (it resumes from its checkpoint), the study
  interrupted (SIGINT) after one trial finished and resumed with --resume (the finished trial
  is not re-run); then the MLflow runs, plots, Optuna study, S3 objects, the registered
  cfcml-men@challenger, the promotion gate and `cfcml predict` with @champion.

Sized for a 2-core machine: 45 patients, 4x16x16 volumes, 2 epochs, 2 folds per trial.
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
from conftest import ray_and_mlflow, s3_client, study_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.slow]

BUCKET = "cfcml-test"
SMALL = [
    "data.image_size=[4,16,16]",
    "data.aug_prob=0.0",
    "train.select_min_epoch=0",
    "train.select_window=1",
]  # 1-2 epoch trials


@pytest.fixture(scope="module")
def stack(moto_s3):
    """Ray head (2 CPUs, token auth) + MLflow server with proxied S3 artifacts, both started
    with the S3 credentials so that Train workers and the server can reach the bucket."""
    s3_client(moto_s3).create_bucket(Bucket=BUCKET)
    env = {**moto_s3.client_env, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with ray_and_mlflow("cfp-", env, artifacts_destination=f"s3://{BUCKET}/mlflow") as (state, mlflow, ray):
        port = moto_s3.url.rsplit(":", 1)[1]
        yield {
            "mlflow": mlflow,
            "ray": ray,
            "s3": moto_s3,
            "state": state,
            "env": {**env, **ray.client_env, "MLFLOW_TRACKING_URI": mlflow.url},
            "storage": f"s3://{BUCKET}/ray?endpoint_override=127.0.0.1:{port}&scheme=http",
        }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from cfcml.datasets import write_synthetic

    return write_synthetic("men", tmp_path_factory.mktemp("men") / "men45", 45, 0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One sentence-embedding cache for the module: the text encoder is built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def client_env(stack, monkeypatch):
    for k, v in stack["env"].items():
        monkeypatch.setenv(k, v)
    return stack["env"]


# --------------------------------------------------------------------------------- Ray Train


def _ddp_compare(cohort: str, cache_dir: str, out: str) -> None:
    """Runs in a fresh interpreter (see the test): the 1-process reference and the 2-worker
    Ray Train run, metrics written to out/compare.json."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from cfcml.config import build_config
    from cfcml.datasets.reader import load_cohort
    from cfcml.datasets.spec import load_spec, shipped
    from cfcml.engine.run import TrainingRun
    from cfcml.platform.train_loop import cv_metrics, train_loop_per_worker

    out = Path(out)
    cfg = build_config("men-smoke", [*SMALL, "train.epochs=2", f"data.cache_dir={cache_dir}", "train.device=cpu"])
    runs = [{"name": "fold1", "fold": 1}]

    # the 1-process reference: the engine itself, world size 1
    ref_run = TrainingRun(cfg, cohort, out / "ref", fold=1, cohort=load_cohort("men", cohort))
    while not ref_run.done:
        record = ref_run.train_epoch()
    ref = cv_metrics([ref_run], [record])

    ray.init(address=os.environ["CFCML_TEST_RAY_ADDRESS"])
    try:
        t0 = time.time()
        result = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg.to_dict(),
                "data": str(cohort),
                "runs": runs,
                "mlflow": None,
                "spec": shipped(load_spec("men")),
            },
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="ddp2", storage_path=str(out / "ray")),
        ).fit()
        print(f"2-worker Train run: {time.time() - t0:.0f} s")
    finally:
        ray.shutdown()
    (out / "compare.json").write_text(
        json.dumps(
            {
                "ref": ref,
                "ddp": result.metrics,
                "checkpoint": result.checkpoint is not None,
            },
            default=float,
        )
    )


def test_two_ddp_workers_match_one_process(stack, cohort, cache_dir, client_env, tmp_path):
    """Same seed, same global batch (12 = 1 x 12 = 2 x 6), 2 epochs of fold 1: the 2-worker
    Ray Train run (DDP over gloo, distributed class-balanced sampler, CCRM on the all-gathered
    batch, validation gathered across ranks) lands within 0.05 of the single process on the
    validation loss and within 0.1 on the training cross-entropy. (The batches differ in
    composition - each rank draws from its own share - and BatchNorm sees 6 instead of 12
    samples, so equality is not expected; a broken gather or loss would miss by far more.)

    The Ray driver runs in a fresh interpreter: Ray reads its auth mode once per process and
    leaves a SIGTERM handler behind, so an in-process driver would depend on test order."""
    code = (
        f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]; "
        f"from test_platform_study import _ddp_compare; "
        f"_ddp_compare({str(cohort)!r}, {str(cache_dir)!r}, {str(tmp_path)!r})"
    )
    env = {**os.environ, **client_env, "CFCML_TEST_RAY_ADDRESS": stack["ray"].address}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads((tmp_path / "compare.json").read_text())
    ref, ddp = res["ref"], res["ddp"]
    print({k: (ref[k], ddp[k]) for k in ("fold1/val_loss", "fold1/val_auc", "fold1/train_ce", "cv_val_auc")})
    assert ddp["epoch"] == ref["epoch"] == 2
    assert abs(ddp["fold1/val_loss"] - ref["fold1/val_loss"]) < 0.05
    assert abs(ddp["fold1/train_ce"] - ref["fold1/train_ce"]) < 0.1
    assert res["checkpoint"]  # rank 0 checkpointed every epoch


# --------------------------------------------------------------------------------- the study


def _space(tmp_path: Path) -> Path:
    """smoke.yaml with ASHA's grace period at the 2-epoch budget: no early stop, so the fault
    trial surely reaches epoch 2 (ASHA's stopping is exercised by `make run`)."""
    text = re.sub(r"grace_period: \d+", "grace_period: 2", (ROOT / "search_spaces" / "smoke.yaml").read_text())
    path = tmp_path / "smoke-test.yaml"
    path.write_text(text)
    return path


def _runs(client, study: str):
    exp = client.get_experiment_by_name("cfcml-men")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`cfcml.study` = '{study}'", max_results=100)


def test_study_end_to_end_with_fault_interrupt_resume_registry_and_predict(
    stack, cohort, cache_dir, client_env, tmp_path
):
    import boto3
    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient

    from cfcml.cli import main as cfcml_main
    from cfcml.config import build_config
    from cfcml.platform.registry import promote
    from cfcml.platform.search_space import load_search_space

    url = stack["mlflow"].url
    client = MlflowClient(url)
    study, marker = "e2e", tmp_path / "fault-marker.json"
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = _space(tmp_path)
    cmd = study_command(
        preset="men-smoke",
        data=cohort,
        name=study,
        num_samples=2,
        epochs=2,
        search_runs=2,
        storage=stack["storage"],
        tracking_uri=url,
        ray_address=stack["ray"].address,
        search_space=space,
        optuna_storage=optuna_url,
        git_commit="test-commit",
        inject_fault=f"2:{marker}:120",
        json_out=tmp_path / "summary.json",
        system_metrics_interval=2,
        sets=[f"data.cache_dir={cache_dir}", *SMALL],
    )
    env = {**os.environ, **client_env, "PYTHONUNBUFFERED": "1"}

    # phase 1: start, wait until one trial has finished, then Ctrl+C
    t0 = time.time()
    with open(tmp_path / "phase1.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        finished = []
        while proc.poll() is None and time.time() - t0 < 420:
            finished = [
                r for r in _runs(client, study) if r.data.tags.get("mlflow.parentRunId") and r.info.status == "FINISHED"
            ]
            if finished:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(1)
        rc1 = proc.wait(timeout=180)
    phase1 = (tmp_path / "phase1.log").read_text()
    assert finished, f"no trial finished before the timeout (rc {proc.returncode}):\n{phase1[-3000:]}"
    assert rc1 == 130, f"an interrupted study exits 130, got {rc1}:\n{phase1[-3000:]}"
    done_first = finished[0]
    interrupted_at = time.time()
    parent1 = [r for r in _runs(client, study) if not r.data.tags.get("mlflow.parentRunId")]
    assert [r.info.status for r in parent1] == ["KILLED"]
    assert all(r.info.status != "RUNNING" for r in _runs(client, study))  # nothing left RUNNING
    print(f"phase 1 (interrupted): {interrupted_at - t0:.0f} s")

    # phase 2: --resume finishes the study; the finished trial is not re-run
    out = subprocess.run(
        [*cmd, "--resume"], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=540
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    print(f"phase 2 (resumed): {time.time() - interrupted_at:.0f} s")
    summary = json.loads((tmp_path / "summary.json").read_text())

    # Optuna: exactly 2 trials, the first at the paper (preset) point
    ostudy = optuna.load_study(study_name=study, storage=optuna_url)
    assert [t.state.name for t in ostudy.trials] == ["COMPLETE", "COMPLETE"]
    first = load_search_space(space, build_config("men-smoke")).first_point(build_config("men-smoke"))
    assert ostudy.trials[0].params == first

    # MLflow: one parent, one child per trial named from its parameters, nothing RUNNING
    runs = _runs(client, study)
    parents = [r for r in runs if not r.data.tags.get("mlflow.parentRunId")]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    states = [
        (
            r.info.run_name,
            r.info.status,
            {k: v for k, v in r.data.tags.items() if k.startswith(("error.", "cfcml."))},
            r.data.metrics.get("epochs_trained"),
        )
        for r in children
    ]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children), f"{states}\n{out.stdout[-6000:]}"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert all(r.info.run_name.startswith("ni") and " a" in r.info.run_name for r in children)
    assert parent.data.tags["optuna.storage"] == optuna_url and parent.data.tags["optuna.study_name"] == study
    assert any(k.startswith("system/") for k in parent.data.metrics)  # system metrics on
    assert parent.data.metrics["test_auc_mean"] >= 0 and "test_acc_std" in parent.data.metrics

    def artifacts(run_id, path=""):
        out = []
        for a in client.list_artifacts(run_id, path):
            out += artifacts(run_id, a.path) if a.is_dir else [a.path]
        return out

    parent_files = set(artifacts(parent.info.run_id))
    report_files = {"report/report.html", "report/report.json", "report/model_card.md"}  # the best trial's report
    assert {
        "config.yaml",
        "search_space/smoke-test.yaml",
        "trials.csv",
        "optuna_study.txt",
        "plots/search_curves.png",
        "best_trial/test_summary.md",
        "plots/confusion_test.png",
        "plots/roc_test.png",
        "plots/roc_val.png",
        *report_files,
    } <= parent_files
    assert report_files <= set(artifacts(summary["best_run_id"]))
    report = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "report/report.json", str(tmp_path))).read_text()
    )
    assert {"auc_ci", "ece", "brier", "operating_points", "subgroups", "missing_modality"} <= set(report)
    assert report["meta"]["trial_id"] == summary["best_trial_id"] and report["meta"]["synthetic"] is True
    # MLflow conventions: model training, the cohort as the parent run's dataset
    assert client.get_experiment_by_name("cfcml-men").tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("men", parent.data.tags["data.digest"][:16])]
    assert json.loads(inputs[0].dataset.profile)["cases"] == 45
    for child in children:
        cid = child.info.run_id
        assert {"config.yaml", "plots/validation_auc.png", "plots/loss.png"} <= set(artifacts(cid))
        for fold in ("fold1", "fold2"):  # per-epoch metrics per fold
            assert [m.step for m in client.get_metric_history(cid, f"{fold}/val_auc")][-1] == 2
        assert any(k.startswith("system/train-rank0/") for k in child.data.metrics)
        assert "val_auc" in child.data.metrics  # the objective, for the promotion gate
    table = Path(client.download_artifacts(parent.info.run_id, "best_trial/test_summary.md", str(tmp_path))).read_text()
    assert "| CFCML (ours) |" in table and "ACC_G2inv" in table and "± " in table  # the paper's layout
    # the classical baselines on the best trial's runs, paired with it on the same test patients
    from cfcml.engine.baselines import LABELS

    for kind, label in LABELS.items():
        assert f"| {label} |" in table and f"| CFCML vs {label} |" in table
        assert 0 <= parent.data.metrics[f"baseline_{kind}_test_auc_mean"] <= 1
    sentence = parent.data.tags["cfcml.images_add"]
    assert "### Paired evidence on patients" in table and f"**Do the images add to the table?** {sentence}" in table
    assert summary["paired"]["images_add"]["sentence"] == sentence and set(summary["baselines"]) == set(LABELS)
    assert report["meta"]["images_add"] == sentence and set(report["meta"]["baselines"]) == set(LABELS.values())
    saved = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "best_trial/test_summary.json", str(tmp_path))).read_text()
    )
    assert [p["b"] for p in saved["paired"]["pairs"]] == list(LABELS.values())
    assert all(p["test"] == "paired bootstrap" for p in saved["paired"]["pairs"])  # 3 classes: no DeLong

    # the finished trial was not re-run: its epochs were logged once, before the interrupt
    history = client.get_metric_history(done_first.info.run_id, "cv_val_auc")
    assert [m.step for m in history] == [1, 2]
    assert all(m.timestamp / 1000 < interrupted_at for m in history)

    # concurrency: the second trial started before the first one ended
    starts = sorted(r.info.start_time for r in children)
    assert starts[1] < done_first.info.end_time

    # fault injection: the first trial's worker was killed during epoch 2 and its run went on
    # from the epoch-1 checkpoint (by Ray Train's restart, or by the resumed study)
    assert json.loads(marker.read_text())["epoch"] == 2
    fault_run = next(
        r
        for r in children
        if r.data.params["model.n_image_tokens"] == str(first["model.n_image_tokens"])
        and float(r.data.params["loss.alpha"]) == first["loss.alpha"]
    )
    assert fault_run.data.metrics["restarts"] >= 1
    assert fault_run.data.metrics["resumed_from_epoch"] == 2
    assert [m.step for m in client.get_metric_history(fault_run.info.run_id, "cv_val_auc")][-1] == 2

    # S3 holds the Ray experiment, the Train checkpoints and the MLflow artifacts
    s3 = boto3.client("s3", endpoint_url=stack["s3"].url, region_name="us-east-1")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    assert any(k.startswith(f"ray/{study}/experiment_state") for k in keys)
    assert any(
        k.startswith(f"ray/{study}_train/") and "/checkpoint_" in k and k.endswith("fold2/best.pt") for k in keys
    )
    assert any(k.startswith("mlflow/") and k.endswith("package/weights/fold1.pt") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("plots/search_curves.png") for k in keys)

    # registry: cfcml-men@challenger with a handful of provenance tags and the model card as its description
    assert summary["model_uri"] == "models:/cfcml-men@challenger"
    mv = client.get_model_version_by_alias("cfcml-men", "challenger")
    assert mv.version == summary["model_version"] and mv.run_id == summary["best_run_id"]
    assert {
        "trial_id",
        "method",
        "data.digest",
        "git.commit",
        "pretrained.image",
        "pretrained.text",
        "version.cfcml",
        "evaluation.kind",
        "cfcml.protocol_digest",
    } <= set(mv.tags)
    # holdout 0 on a folds cohort: no patient is untouched by the ensemble, and the version says so
    assert mv.tags["evaluation.kind"] == "out_of_fold" and not any(
        k.startswith(("holdout_", "test_split_")) for k in mv.tags
    )
    assert mv.tags["git.commit"] == "test-commit" and mv.tags["trial_id"] == summary["best_trial_id"]
    assert "# Model card" in mv.description and "cross-validated estimate of a single fold model" in mv.description
    # the logged model: an output of the study's parent run, with the report's test metrics
    model_id = mv.source.removeprefix("models:/")
    assert model_id in [o.model_id for o in client.get_run(parent.info.run_id).outputs.model_outputs]
    logged = client.get_logged_model(model_id)
    assert not [m.key for m in logged.metrics if m.key.startswith(("holdout_", "test_split_"))]  # no own test metric
    assert "loss.alpha" in logged.params  # the trial's parameters

    # the pyfunc: signature and input example, loadable from the registry
    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model("models:/cfcml-men@challenger")
    assert [c.name for c in model.metadata.get_input_schema().inputs][:4] == ["case_id", "T1C", "FLAIR_C", "ADC"]
    assert model.metadata.saved_input_example_info is not None
    assert model.metadata.metadata["dataset"] == "men"

    # promotion gate: an out-of-fold version has no metric of its own to gate on; --force --reason is audited
    with pytest.raises(Exception, match="no test metric of its own"):
        promote(client, "cfcml-men", alias="challenger")
    forced = promote(client, "cfcml-men", alias="challenger", force=True, reason="e2e test: paper protocol, no holdout")
    assert forced.promoted and forced.champion == mv.version

    # cfcml predict with the champion scores the whole cohort
    preds_path = tmp_path / "preds.csv"
    assert (
        cfcml_main(
            [
                "predict",
                "--model",
                "models:/cfcml-men@champion",
                "--data",
                str(cohort),
                "--out",
                str(preds_path),
                "--tracking-uri",
                url,
            ]
        )
        == 0
    )
    import pandas as pd

    preds = pd.read_csv(preds_path)
    assert len(preds) == 45 and set(preds["split"]) == {"fold1", "fold2", "fold3"}
    probs = preds[["prob_G1", "prob_G2inv", "prob_G2ninv"]].to_numpy()
    assert (abs(probs.sum(1) - 1) < 1e-4).all()
    assert set(preds["pred"]) <= {"G1", "G2inv", "G2ninv"} and (preds["status"] == "ok").all()
    # the registered model is code + plain data (models from code): nothing in it is a pickle
    local = Path(mlflow.artifacts.download_artifacts("models:/cfcml-men@champion"))
    assert not list(local.rglob("*.pkl")) and "python_model.pkl" not in (local / "MLmodel").read_text()
    # a patient with a series and an attribute missing is still scored, and the output says so
    from cfcml.datasets.reader import load_cohort
    from cfcml.platform.pyfunc import cohort_frame

    frame = cohort_frame(load_cohort("men", cohort)).head(2)
    frame.loc[0, ["FLAIR_C", "age"]] = ""
    frame.loc[1, "ADC"] = "/nowhere/ADC.nii.gz"
    out = mlflow.pyfunc.load_model("models:/cfcml-men@champion").predict(frame)
    assert out.loc[0, "status"] == "ok" and out.loc[0, "inputs_missing"] == "FLAIR_C,age"
    assert (
        "FLAIR_C" not in out.loc[0, "inputs_used"].split(",")
        and abs(out.loc[0, ["prob_G1", "prob_G2inv", "prob_G2ninv"]].sum() - 1) < 1e-4
    )
    assert out.loc[1, "status"].startswith("not scored: ADC: image file") and out.loc[1, "pred"] == ""


def test_a_cohort_described_only_by_a_schema_tunes_registers_and_predicts(stack, cache_dir, client_env, tmp_path):
    """The third cohort, unlike MEN and Derm7pt (4 series, 2 classes, 3 attributes): the generic
    job, registry and `cfcml predict` take it with no code change."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from cfcml.cli import main as cfcml_main

    schema = ROOT / "examples" / "glioma-demo.yaml"
    data = tmp_path / "glioma"
    assert cfcml_main(["synth", "--dataset", str(schema), "--out", str(data), "--patients", "48"]) == 0
    url = stack["mlflow"].url
    cmd = study_command(
        "tune.py",
        dataset=schema,
        preset="men-smoke",
        data=data,
        name="glioma",
        num_samples=2,
        epochs=1,
        search_runs=1,
        storage=tmp_path / "ray_results",
        tracking_uri=url,
        ray_address=stack["ray"].address,
        json_out=tmp_path / "summary.json",
        no_system_metrics=True,
        holdout=0.25,
        sets=[f"data.cache_dir={cache_dir}", *SMALL, "train.batch_size=6"],
    )
    out = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env={**os.environ, **client_env}, cwd=tmp_path, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model_uri"] == "models:/cfcml-glioma-demo@challenger"
    assert set(summary["test"]) >= {"sen", "spe", "auprc", "auprc_label", "auc"}  # the binary metric set
    client = MlflowClient(url)
    assert client.get_experiment_by_name("cfcml-glioma-demo") is not None

    # --holdout through Ray: 12 of 48 patients held back, recorded on the parent run, never in a
    # trial, and the registered package measured on them as itself
    from cfcml.engine.splits import ids_digest

    mv = client.get_model_version_by_alias("cfcml-glioma-demo", "challenger")
    parent_id = client.get_run(mv.run_id).data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    held = json.loads(Path(client.download_artifacts(parent_id, "holdout_ids.json", str(tmp_path))).read_text())
    assert parent.data.params["holdout"] == "0.25" and len(held["ids"]) == 12
    assert parent.data.tags["cfcml.holdout_ids_digest"] == held["ids_digest"] == ids_digest(held["ids"])
    assert mv.tags["evaluation.kind"] == "holdout" and mv.tags["evaluation.n"] == "12" and "holdout_auc" in mv.tags
    assert mv.tags["evaluation.ids_digest"] == held["ids_digest"]
    evaluation = json.loads(Path(client.download_artifacts(parent_id, "evaluation.json", str(tmp_path))).read_text())
    assert evaluation["kind"] == "holdout" and sorted(evaluation["ids"]) == sorted(held["ids"])
    assert float(mv.tags["holdout_auc"]) == pytest.approx(evaluation["metrics"]["auc"], abs=1e-5)
    preds_path = tmp_path / "preds.csv"
    assert (
        cfcml_main(
            [
                "predict",
                "--model",
                "models:/cfcml-glioma-demo@challenger",
                "--data",
                str(data),
                "--out",
                str(preds_path),
                "--tracking-uri",
                url,
            ]
        )
        == 0
    )
    preds = pd.read_csv(preds_path)
    assert len(preds) == 48 and [c for c in preds.columns if c.startswith("prob_")] == ["prob_LGG", "prob_HGG"]
    assert (preds["status"] == "ok").all() and set(preds["pred"]) <= {"LGG", "HGG"}

    # a comparison method goes through the same job, its own search space and its own registered model
    etmc = [
        *cmd,
        "--set",
        "model.method=etmc",
        "--name",
        "glioma-etmc",
        "--num-samples",
        "1",
        "--json-out",
        str(tmp_path / "etmc.json"),
    ]
    out = subprocess.run(
        etmc, check=False, capture_output=True, text=True, env={**os.environ, **client_env}, cwd=tmp_path, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "etmc.json").read_text())
    assert summary["model_uri"] == "models:/cfcml-glioma-demo-etmc@challenger" and "annealing_epochs" in str(
        summary["best_params"]
    )
    assert (
        cfcml_main(
            [
                "predict",
                "--model",
                summary["model_uri"],
                "--data",
                str(data),
                "--out",
                str(tmp_path / "p2.csv"),
                "--tracking-uri",
                url,
            ]
        )
        == 0
    )
    assert (pd.read_csv(tmp_path / "p2.csv")["status"] == "ok").all()
