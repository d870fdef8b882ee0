"""The champion promotion gate against a real MLflow server and real pyfunc models."""

from __future__ import annotations

import uuid

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cfcml.platform.registry import CHAMPION, PromotionError, promote

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
def logged_models(mlflow_server):
    """Two runs, each with a logged pyfunc model and a val_auc metric."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"test-registry-{uuid.uuid4().hex[:8]}")
    previous = getattr(tracking_utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(mlflow_server.url)
    models = []
    rng = np.random.default_rng(0)
    try:
        for i, auc in enumerate((0.61, 0.83)):
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"fit-{i}"):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=FixedProbs(rng.normal(size=(3, 2))),
                    pip_requirements=["numpy"],
                )
                mlflow.log_metric("val_auc", auc)
            models.append(info)
    finally:
        tracking_utils._tracking_uri = previous
    return client, models


def _register(client, name, model_info, val_auc=None):
    tags = {"metric.val_auc": str(val_auc)} if val_auc is not None else None
    mv = client.create_model_version(
        name,
        source=model_info.model_uri,
        run_id=model_info.run_id,
        tags=tags,
        model_id=model_info.model_id,
    )
    return mv.version


@pytest.fixture
def model_name(logged_models):
    client, _ = logged_models
    name = f"cfcml-test-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    return name


def _champion(client, name):
    return client.get_registered_model(name).aliases.get(CHAMPION)


def test_gate(logged_models, model_name, mlflow_tracking):
    client, (m0, m1) = logged_models
    v1 = _register(client, model_name, m0, 0.70)
    v2 = _register(client, model_name, m1, 0.65)  # worse
    v3 = _register(client, model_name, m1, 0.80)  # better
    client.set_registered_model_alias(model_name, "challenger", v1)

    # no champion yet: the challenger becomes champion
    r = promote(client, model_name, alias="challenger")
    assert r.promoted and not r.forced and r.previous_champion is None
    assert r.champion == v1 and _champion(client, model_name) == v1
    assert r.candidate_value == pytest.approx(0.70)
    tags = client.get_model_version(model_name, v1).tags
    assert tags["promotion.forced"] == "false"
    assert tags["promotion.previous_champion"] == "none"

    # a worse candidate is refused, champion unchanged, no promotion tags written
    r = promote(client, model_name, version=v2)
    assert not r.promoted and r.champion == v1
    assert "not better" in r.message
    assert _champion(client, model_name) == v1
    assert "promotion.timestamp" not in client.get_model_version(model_name, v2).tags

    # an equal metric is not strictly better
    v_eq = _register(client, model_name, m1, 0.70)
    assert not promote(client, model_name, version=v_eq).promoted

    # a better one moves champion
    r = promote(client, model_name, version=v3)
    assert r.promoted and r.previous_champion == v1 and r.champion == v3
    assert r.champion_value == pytest.approx(0.70)
    assert _champion(client, model_name) == v3

    # the alias resolves to a loadable model that predicts probabilities
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}")
    probs = np.asarray(model.predict(np.ones((4, 3))))
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)

    # promoting the champion again is a no-op
    assert not promote(client, model_name, version=v3).promoted


def test_force_with_reason_records_tags(logged_models, model_name):
    client, (m0, m1) = logged_models
    good = _register(client, model_name, m1, 0.90)
    bad = _register(client, model_name, m0, 0.50)
    promote(client, model_name, version=good)

    with pytest.raises(PromotionError, match="reason"):
        promote(client, model_name, version=bad, force=True)
    with pytest.raises(PromotionError, match="reason"):
        promote(client, model_name, version=bad, force=True, reason="   ")
    assert _champion(client, model_name) == good

    r = promote(
        client, model_name, version=bad, force=True, reason="rollback: v1 leaks data"
    )
    assert r.promoted and r.forced and r.champion == bad
    assert _champion(client, model_name) == bad
    tags = client.get_model_version(model_name, bad).tags
    assert tags["promotion.forced"] == "true"
    assert tags["promotion.reason"] == "rollback: v1 leaks data"
    assert tags["promotion.previous_champion"] == good
    assert tags["promotion.timestamp"]


def test_metric_falls_back_to_source_run(logged_models, model_name):
    client, (m0, m1) = logged_models
    first = _register(client, model_name, m0)  # no tag: run metric 0.61
    second = _register(client, model_name, m1)  # no tag: run metric 0.83
    r = promote(client, model_name, version=first)
    assert r.promoted and r.candidate_value == pytest.approx(0.61)
    r = promote(client, model_name, version=second)
    assert r.promoted and r.champion_value == pytest.approx(0.61)
    assert r.candidate_value == pytest.approx(0.83)


def test_errors(logged_models, model_name):
    client, (m0, _) = logged_models
    v1 = _register(client, model_name, m0, 0.7)
    with pytest.raises(PromotionError, match="unknown registered model"):
        promote(client, f"{model_name}-nope", version=v1)
    with pytest.raises(PromotionError, match="no alias 'challenger'"):
        promote(client, model_name, alias="challenger")
    with pytest.raises(PromotionError, match="no version"):
        promote(client, model_name, version=99)
    with pytest.raises(PromotionError, match="exactly one"):
        promote(client, model_name)
    with pytest.raises(PromotionError, match="no 'val_loss'"):
        promote(client, model_name, version=v1, metric="val_loss")
    assert _champion(client, model_name) is None
