"""The champion promotion gate against a real MLflow server and a real pyfunc model."""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from cfcml.platform import registry
from cfcml.platform.protocol_digest import PROTOCOL_DIGEST_KEY, PROTOCOL_KEY, fields_digest
from cfcml.platform.registry import CHAMPION, PromotionError, audit_trail, metric_spec, promote, promotion

pytestmark = pytest.mark.services


class FixedProbs(mlflow.pyfunc.PythonModel):
    """Softmax of a fixed linear map: [n, 3] features -> [n, 2] class probabilities.

    (MLflow warns once that `predict` has no type hints; it forces that filter itself.)
    """

    def __init__(self, weight):
        self.weight = np.asarray(weight, dtype=np.float64)

    def predict(self, context, model_input, params=None):
        logits = np.asarray(model_input, dtype=np.float64) @ self.weight
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def registry_env(mlflow_server):
    """(client, experiment id, a logged pyfunc model every version points at)."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"test-registry-{uuid.uuid4().hex[:8]}")
    previous = getattr(tracking_utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name="model"):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=FixedProbs(np.random.default_rng(0).normal(size=(3, 2))),
                pip_requirements=["numpy"],
            )
    finally:
        tracking_utils._tracking_uri = previous
    return client, experiment_id, info


@pytest.fixture
def model_name(registry_env):
    client = registry_env[0]
    name = f"cfcml-test-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    return name


PROTOCOL = {  # what cfcml.platform.protocol_digest.protocol_fields records for a study
    "preset": "men-smoke",
    "data.image_size": [16, 32, 32],
    "runs": ["fold1", "fold2", "fold3"],
    "data.val_fraction": 0.2,
    "holdout": 0.2,
    "train.select_metric": "auc",
    "train.select_window": 5,
    "train.select_min_epoch": 4,
    "train.patience": 0,
    "train.epochs": 50,
}
IDS = [f"MEN{i:04d}" for i in range(30)]


def version(
    env,
    name,
    metrics,
    *,
    kind="holdout",
    ids=IDS,
    data_digest="digest-a",
    protocol=PROTOCOL,
    protocol_as="param",
    document=None,
    tags=None,
    pyfunc=False,
    at="model",
) -> str:
    """Register a version whose artifacts hold an `evaluation.json` with `metrics` measured on
    `ids` (or `document` as written, or none when `document` is False), and whose protocol is
    recorded as params of its source run (``protocol_as="param"``), as version tags ("tag") or
    not at all (`protocol` None) — as a study's registration does. `at`: where the file lies in
    the run's artifacts. ``pyfunc=True``: the version is the module's logged pyfunc model, the
    file inside its package as a study ships it (one such version per module)."""
    client, experiment_id, info = env
    run_id = client.create_run(experiment_id).info.run_id
    record = (
        {} if protocol is None else {PROTOCOL_KEY: json.dumps(protocol), PROTOCOL_DIGEST_KEY: fields_digest(protocol)}
    )
    if protocol_as == "param":
        for key, value in record.items():
            client.log_param(run_id, key, value)
    doc = (
        {"kind": kind, "ids": list(ids), "data_digest": data_digest, "metrics": metrics}
        if document is None
        else document
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "evaluation.json"
        path.write_text(json.dumps(doc))
        if document is not False and pyfunc:
            client.log_model_artifact(info.model_id, str(path), artifact_path="artifacts/package")
        elif document is not False:
            client.log_artifact(run_id, str(path), artifact_path=at)
    client.set_terminated(run_id)
    version_tags = {**(tags or {}), **(record if protocol_as == "tag" else {})}
    if pyfunc:
        mv = client.create_model_version(
            name, source=info.model_uri, run_id=run_id, tags=version_tags, model_id=info.model_id
        )
    else:
        mv = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id, tags=version_tags)
    return str(mv.version)


def champion(client, name):
    return client.get_registered_model(name).aliases.get(CHAMPION)


def test_gate_promotes_only_a_better_model(registry_env, model_name, mlflow_tracking):
    client = registry_env[0]
    v1 = version(registry_env, model_name, {"auc": 0.70})
    v2 = version(registry_env, model_name, {"auc": 0.65})
    v3 = version(registry_env, model_name, {"auc": 0.80}, pyfunc=True)
    v_eq = version(registry_env, model_name, {"auc": 0.70})
    client.set_registered_model_alias(model_name, "challenger", v1)

    r = promote(client, model_name, alias="challenger")  # default metric: the artifact's own auc
    assert r.promoted and not r.forced and r.previous_champion is None and r.champion == v1 and r.metric == "auc"
    assert champion(client, model_name) == v1 and r.candidate_value == pytest.approx(0.70)
    tags = client.get_model_version(model_name, v1).tags
    assert tags["promotion.forced"] == "false" and tags["promotion.previous_champion"] == "none"
    assert tags["promotion.evaluation"] == "holdout" and tags["promotion.protocol_digest"] == fields_digest(PROTOCOL)

    r = promote(client, model_name, version=v2)  # worse: refused, nothing written but the audit trail
    assert not r.promoted and r.champion == v1 and "not better" in r.message and "higher is better" in r.message
    assert champion(client, model_name) == v1
    assert "promotion.timestamp" not in client.get_model_version(model_name, v2).tags
    assert not promote(client, model_name, version=v_eq).promoted  # equal is not strictly better

    r = promote(client, model_name, version=v3)
    assert r.promoted and r.previous_champion == v1 and r.champion == v3
    assert r.champion_value == pytest.approx(0.70) and champion(client, model_name) == v3
    probs = np.asarray(mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}").predict(np.ones((4, 3))))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert not promote(client, model_name, version=v3).promoted  # already champion: a no-op

    trail = audit_trail(client, model_name)  # every attempt, in order
    assert [(e["candidate"], e["outcome"]) for e in trail] == [
        (v1, "promoted"),
        (v2, "unchanged"),
        (v_eq, "unchanged"),
        (v3, "promoted"),
        (v3, "unchanged"),
    ]
    assert trail[3]["previous_champion"] == v1 and trail[3]["candidate_value"] == pytest.approx(0.80)


def test_brier_is_lower_is_better(registry_env, model_name):
    """The reported bug (then on val_loss): a lower-is-better metric promoted 0.9 over 0.2."""
    client = registry_env[0]
    good = version(registry_env, model_name, {"brier": 0.2})
    worse = version(registry_env, model_name, {"brier": 0.9})
    better = version(registry_env, model_name, {"brier": 0.1})
    assert promote(client, model_name, version=good, metric="brier").promoted
    r = promote(client, model_name, version=worse, metric="brier")
    assert not r.promoted and champion(client, model_name) == good and "lower is better" in r.message
    assert promote(client, model_name, version=better, metric="brier").promoted
    assert champion(client, model_name) == better


def test_version_tags_never_override_the_evaluation(registry_env, model_name):
    client = registry_env[0]
    v1 = version(registry_env, model_name, {"auc": 0.7})
    forged = version(registry_env, model_name, {"auc": 0.5}, tags={"metric.auc": "0.99", "auc": "0.99"})
    promote(client, model_name, version=v1)
    r = promote(client, model_name, version=forged)
    assert not r.promoted and r.candidate_value == pytest.approx(0.5)
    assert champion(client, model_name) == v1


@pytest.mark.parametrize(
    ("metric", "value", "match"),
    [
        ("auc", math.inf, r"(not a finite number|outside its valid range \[0, 1\])"),
        ("auc", math.nan, "not a finite number"),
        ("auc", 1.7, r"outside its valid range \[0, 1\]"),
        ("acc", -0.1, r"outside its valid range \[0, 1\]"),
        ("brier", 2.5, r"outside its valid range \[0, 2\]"),
        ("loss", -0.5, r"outside its valid range \[0, inf\]"),
    ],
)
def test_invalid_values_are_refused(registry_env, model_name, metric, value, match):
    client = registry_env[0]
    champ = version(registry_env, model_name, {metric: 0.5})
    promote(client, model_name, version=champ, metric=metric)
    bad = version(registry_env, model_name, {metric: value})
    with pytest.raises(PromotionError, match=match):
        promote(client, model_name, version=bad, metric=metric)
    assert champion(client, model_name) == champ
    assert audit_trail(client, model_name)[-1]["outcome"] == "error"


def test_invalid_value_is_refused_for_a_first_champion_too(registry_env, model_name):
    bad = version(registry_env, model_name, {"auc": 3.0})
    with pytest.raises(PromotionError, match="outside its valid range"):
        promote(registry_env[0], model_name, version=bad)
    assert champion(registry_env[0], model_name) is None


def test_metric_directions():
    assert metric_spec("val_loss").greater_is_better is False
    assert metric_spec("fold2/val_auc").greater_is_better is True
    assert metric_spec("cv_val_auc").high == 1.0 and metric_spec("test_auc_mean").greater_is_better
    assert metric_spec("acc_G2inv").greater_is_better and metric_spec("val_brier").greater_is_better is False
    assert metric_spec("brier").high == 2.0  # the multi-class Brier score sums over classes: [0, 2]
    with pytest.raises(PromotionError, match="unknown metric 'my_score'.*--greater-is-better"):
        metric_spec("my_score")
    with pytest.raises(PromotionError, match="unknown metric"):
        metric_spec("test_auc_std")  # a spread has no "better" direction
    assert metric_spec("my_score", greater_is_better=False).greater_is_better is False
    with pytest.raises(PromotionError, match="lower is better; --greater-is-better contradicts it"):
        metric_spec("val_loss", greater_is_better=True)


def test_unknown_metric_needs_a_direction(registry_env, model_name):
    client = registry_env[0]
    a = version(registry_env, model_name, {"dice": 0.4})
    b = version(registry_env, model_name, {"dice": 0.6})
    with pytest.raises(PromotionError, match="unknown metric 'dice'"):
        promote(client, model_name, version=a, metric="dice")
    assert promote(client, model_name, version=a, metric="dice", greater_is_better=True).promoted
    assert not promote(client, model_name, version=b, metric="dice", greater_is_better=False).promoted
    assert promote(client, model_name, version=b, metric="dice", greater_is_better=True).promoted


def test_evaluation_data_must_match(registry_env, model_name):
    client = registry_env[0]
    champ = version(registry_env, model_name, {"auc": 0.6}, data_digest="aaaa1111")
    other_data = version(registry_env, model_name, {"auc": 0.9}, data_digest="bbbb2222")
    no_protocol = version(registry_env, model_name, {"auc": 0.9}, data_digest="aaaa1111", protocol=None)
    same_data = version(registry_env, model_name, {"auc": 0.7}, data_digest="aaaa1111", protocol_as="tag")
    promote(client, model_name, version=champ)
    with pytest.raises(PromotionError, match=r"not measured alike — data: data_digest bbbb2222 vs aaaa1111"):
        promote(client, model_name, version=other_data)
    with pytest.raises(PromotionError, match=r"records no cfcml.protocol_digest"):
        promote(client, model_name, version=no_protocol)
    assert champion(client, model_name) == champ
    assert promote(client, model_name, version=same_data).promoted  # protocol from a run param vs a version tag
    r = promote(client, model_name, version=other_data, force=True, reason="new cohort release, re-validated")
    assert r.forced and champion(client, model_name) == other_data


@pytest.mark.parametrize(("concurrent_value", "promoted"), [(0.95, False), (0.75, True)])
def test_champion_moved_between_read_and_write_is_re_evaluated(
    registry_env, model_name, monkeypatch, concurrent_value, promoted
):
    """Another promotion lands after the gate read the champion: the gate compares again."""
    client = registry_env[0]
    old = version(registry_env, model_name, {"auc": 0.70})
    concurrent = version(registry_env, model_name, {"auc": concurrent_value})
    candidate = version(registry_env, model_name, {"auc": 0.80})
    promote(client, model_name, version=old)

    real, calls = promotion.current_champion, []

    def racing_champion(c, name):
        calls.append(name)
        if len(calls) == 2:  # the re-check right before the write: someone promoted meanwhile
            c.set_registered_model_alias(name, CHAMPION, concurrent)
        return real(c, name)

    monkeypatch.setattr(promotion, "current_champion", racing_champion)
    r = promote(client, model_name, version=candidate)
    assert r.attempts == 2 and r.previous_champion == concurrent
    assert r.promoted is promoted
    assert champion(client, model_name) == (candidate if promoted else concurrent)


def test_a_champion_that_keeps_moving_is_an_error(registry_env, model_name, monkeypatch):
    client = registry_env[0]
    a = version(registry_env, model_name, {"auc": 0.1})
    b = version(registry_env, model_name, {"auc": 0.2})
    candidate = version(registry_env, model_name, {"auc": 0.9})
    promote(client, model_name, version=a)
    real, state = promotion.current_champion, {"n": 0}

    def flapping(c, name):
        state["n"] += 1
        c.set_registered_model_alias(name, CHAMPION, a if state["n"] % 2 else b)
        return real(c, name)

    monkeypatch.setattr(promotion, "current_champion", flapping)
    with pytest.raises(PromotionError, match="changed 3 times"):
        promote(client, model_name, version=candidate)
    assert champion(client, model_name) in (a, b)


def test_force_with_reason_records_tags(registry_env, model_name):
    client = registry_env[0]
    good = version(registry_env, model_name, {"auc": 0.90})
    bad = version(registry_env, model_name, {"auc": 0.50})
    promote(client, model_name, version=good)
    for reason in (None, "   "):
        with pytest.raises(PromotionError, match="reason"):
            promote(client, model_name, version=bad, force=True, reason=reason)
    assert champion(client, model_name) == good
    r = promote(client, model_name, version=bad, force=True, reason="rollback: v1 leaks data")
    assert r.promoted and r.forced and r.champion == bad and champion(client, model_name) == bad
    tags = client.get_model_version(model_name, bad).tags
    assert tags["promotion.forced"] == "true" and tags["promotion.reason"] == "rollback: v1 leaks data"
    assert tags["promotion.previous_champion"] == good and tags["promotion.timestamp"]
    assert float(tags["promotion.auc"]) == pytest.approx(0.5)
    assert audit_trail(client, model_name)[-1] | {"time": None} == {
        "time": None,
        "candidate": bad,
        "metric": "auc",
        "forced": True,
        "reason": "rollback: v1 leaks data",
        "outcome": "promoted",
        "previous_champion": good,
        "champion": bad,
        "candidate_value": 0.5,
        "champion_value": 0.9,
        "attempts": 1,
        "message": r.message,
    }


def test_errors(registry_env, model_name):
    client = registry_env[0]
    v1 = version(registry_env, model_name, {"auc": 0.7})
    with pytest.raises(PromotionError, match="unknown registered model"):
        promote(client, f"{model_name}-nope", version=v1)
    with pytest.raises(PromotionError, match="no alias 'challenger'"):
        promote(client, model_name, alias="challenger")
    with pytest.raises(PromotionError, match="no version"):
        promote(client, model_name, version=99)
    with pytest.raises(PromotionError, match="exactly one"):
        promote(client, model_name)
    with pytest.raises(PromotionError, match=r"evaluation.json has no metric 'brier' \(it has: auc\)"):
        promote(client, model_name, version=v1, metric="brier")
    # MLflow 3 refuses to register a version without provenance, but older registries hold them
    orphan = ModelVersion(model_name, "7", creation_timestamp=0, run_id=None)
    with pytest.raises(PromotionError, match="v7 has no source run"):
        registry.source_run(client, orphan, f"{model_name} v7")
    assert champion(client, model_name) is None
