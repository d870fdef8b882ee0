"""MLflow conventions of a study (cfcml.platform.report_logging) against a local SQLite store,
and the temperature the registered model applies when `report.temperature` is on."""

import json

import numpy as np
import pytest
from conftest import mlflow_uris_kept

from cfcml.config import build_config, save_config
from cfcml.platform import report_logging as rl
from cfcml.report.synthetic import synthetic_inputs


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from cfcml.datasets import write_synthetic
    from cfcml.datasets.reader import load_cohort

    return load_cohort("men", write_synthetic("men", tmp_path_factory.mktemp("men") / "men36", 36, 0))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One SQLite store for the module (creating its schema takes seconds)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp, mlflow_uris_kept():
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield MlflowClient(uri, registry_uri=uri)


def test_experiment_is_model_training_on_create_and_on_reuse(client):
    first = rl.ensure_experiment(client, "cfcml-new")
    assert client.get_experiment(first).tags[rl.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("cfcml-old")  # created before the convention
    assert rl.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert rl.ensure_experiment(client, "cfcml-old") == old
    assert client.get_experiment(old).tags[rl.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert rl.ensure_experiment(client, "cfcml-new") == first


def test_cohort_logged_as_the_parent_runs_dataset(client, cohort):
    exp = rl.ensure_experiment(client, "cfcml-men")
    run = client.create_run(exp)
    for _ in range(2):  # a resumed study logs it again: still one input
        rl.log_cohort(client, run.info.run_id, cohort, str(cohort.root))
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert ds.name == "men" and ds.digest == cohort.digest()[:16]
    assert str(cohort.root) in ds.source
    profile = json.loads(ds.profile)
    assert profile["splits"] == cohort.counts() and profile["cases"] == 36 and profile["digest"] == cohort.digest()
    assert tags["mlflow.data.context"] == "cohort"
    assert tags["counts.fold1"] == ", ".join(f"{c} {n}" for c, n in cohort.counts()["fold1"].items())
    assert "case_id" in ds.schema and "grade" in ds.schema


def test_data_root_with_credentials_is_redacted(cohort):
    ds = rl.cohort_dataset(cohort, "s3://key:secret@bucket/cohorts/men")
    assert "secret" not in ds.source.to_json()


def test_model_linked_to_the_parent_with_metrics_and_a_described_version(client, cohort):
    import mlflow

    from cfcml.report import REGISTRY_DESCRIPTION_MAX, compute_report, model_card_markdown

    report, _ = compute_report(
        synthetic_inputs(3, n_val=60, n_test=80, explanations=False), n_bootstrap=200, tsne=False
    )
    exp = rl.ensure_experiment(client, "cfcml-men")
    parent = client.create_run(exp).info.run_id
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    model = mlflow.initialize_logged_model(name="model", source_run_id=child, experiment_id=exp)
    cohort_ds = rl.log_cohort(client, parent, cohort, str(cohort.root))
    rl.link_model(client, parent, model.model_id, report, cohort_ds)

    run = client.get_run(parent)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert run.data.metrics["test_pooled_auc"] == pytest.approx(report["auc"])
    assert run.data.metrics["test_pooled_auc_ci_low"] == pytest.approx(report["auc_ci"][0])
    logged = client.get_logged_model(model.model_id)
    by_key = {m.key: m.value for m in logged.metrics}
    assert by_key["test_pooled_auc"] == pytest.approx(report["auc"]) and by_key["test_ece"] == pytest.approx(
        report["ece"]
    )
    assert {(m.dataset_name, m.dataset_digest) for m in logged.metrics} == {("men", cohort.digest()[:16])}

    client.create_registered_model("cfcml-men")
    mv = client.create_model_version("cfcml-men", f"models:/{model.model_id}", run_id=child, model_id=model.model_id)
    tags = rl.version_tags("t1", "abc", "c0ffee", {"image": "none", "text": "none"}, "0.1.0")
    assert len(tags) <= 8
    card = rl.describe_version(client, "cfcml-men", mv.version, report)
    got = client.get_model_version("cfcml-men", mv.version).description
    assert got == card == model_card_markdown(report, REGISTRY_DESCRIPTION_MAX) and len(got) <= REGISTRY_DESCRIPTION_MAX
    assert got.startswith("# Model card") and "## Performance on the test set" in got
    assert rl.describe_version(client, "cfcml-men", mv.version, None) is None  # no report: nothing written


def _fake_run(folder, name, rng, cfg):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"run": name, "finished": True}))
    (folder / "best.pt").write_bytes(b"")
    save_config(cfg, folder / "config.yaml")
    labels = rng.integers(0, 3, 20)
    logits = 3 * (1.2 * np.eye(3)[labels] + rng.normal(size=(20, 3)))  # over-confident, like synthetic_inputs
    np.savez(
        folder / "predictions.npz",
        val_case_ids=np.array([f"{name}-{i}" for i in range(20)]),
        val_labels=labels,
        val_probs=np.full((20, 3), 1 / 3),
        val_logits=logits,
    )
    return labels, logits


def test_package_temperature_is_fitted_on_validation_only_when_enabled(tmp_path):
    from cfcml.report.stats import fit_temperature

    rng = np.random.default_rng(0)
    off = build_config("men-smoke")
    on = build_config("men-smoke", ["report.temperature=true"])
    parts = [_fake_run(tmp_path / n, n, rng, on) for n in ("fold1", "fold2")]
    runs = [{"name": "fold1"}, {"name": "fold2"}]
    assert rl.package_meta(off, tmp_path, runs) == {}
    meta = rl.package_meta(on, tmp_path, runs)
    y, z = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    assert meta["temperature"] == pytest.approx(fit_temperature(z, y)) and meta["temperature"] > 1  # over-confident


@pytest.mark.slow
def test_registered_model_applies_the_packaged_temperature(tmp_path, cohort):
    """PackagedModel: with `temperature` in meta.json each run's probabilities become
    softmax(logits / T); without it they are the runs' own."""
    import torch

    from cfcml.datasets.tabular import num_features
    from cfcml.engine.checkpoint import atomic_save
    from cfcml.models.cfcml import build_model
    from cfcml.platform.pyfunc import PackagedModel, build_package

    cfg = build_config(
        "men-smoke",
        ["data.image_size=[4,16,16]", "model.tabular_embedding=mlp", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    torch.manual_seed(0)
    model = build_model(cfg, cohort.spec.shape(), num_tabular_features=num_features(cohort.spec))
    with torch.no_grad():
        model.classifier[-1].weight.mul_(40)  # confident logits, so a temperature matters
    atomic_save({"model": model.state_dict()}, tmp_path / "best.pt")
    stats = {a.column: (0.0, 1.0) for a in cohort.spec.attributes if a.type == "numeric"}
    package = build_package(
        cfg, [{"name": "fold1", "weights": tmp_path / "best.pt", "numeric_stats": stats}], cohort, tmp_path / "package"
    )
    cases = cohort.cases[:6]
    plain = PackagedModel(package, device="cpu").predict_cases(cases)
    meta = json.loads((package / "meta.json").read_text())
    (package / "meta.json").write_text(json.dumps({**meta, "temperature": 2.5}))
    scaled = PackagedModel(package, device="cpu").predict_cases(cases)
    log_p = np.log(plain)
    expected = np.exp(log_p / 2.5) / np.exp(log_p / 2.5).sum(1, keepdims=True)
    np.testing.assert_allclose(scaled, expected, atol=1e-5)
    assert not np.allclose(scaled, plain, atol=1e-3)
