"""Patients held back from a study, and the registered model measured as itself.

- `hold_out`: patient-level, stratified, seeded; disjoint from every run's train/val/test;
  refused for a cohort with a fixed split.
- The package measured as `cfcml predict` loads it: evaluation.json's metrics equal re-scoring
  the saved model with `mlflow.pyfunc.load_model` on its ids; the package records what each
  member saw.
- `cfcml predict`: flags seen ids, computes metrics over unseen ones only, streams batches into
  the same file as one pass would, and leaves an existing file intact when it fails.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from cfcml.config import ConfigError, build_config
from cfcml.datasets import write_synthetic
from cfcml.datasets.reader import load_cohort
from cfcml.datasets.spec import load_spec
from cfcml.engine.splits import fold_split, hold_out, ids_digest, protocol_runs

QUICK = [
    "train.epochs=1",
    "train.select_min_epoch=0",
    "train.select_window=1",
    "data.image_size=[4,16,16]",
    "model.image_channels=2",
    "train.batch_size=6",
]


@pytest.fixture(scope="module")
def men(tmp_path_factory):
    root = write_synthetic("men", tmp_path_factory.mktemp("men") / "men", 90, seed=3)
    return load_cohort(load_spec("men"), root)


def test_holdout_is_stratified_seeded_and_never_in_any_run(men):
    kept, held = hold_out(men, 0.2, seed=5)
    _, held_again = hold_out(men, 0.2, seed=5)
    assert [c.case_id for c in held] == [c.case_id for c in held_again]
    assert {c.case_id for c in hold_out(men, 0.2, seed=6)[1]} != {c.case_id for c in held}
    ids = {c.case_id for c in held}
    assert len(held) == math.ceil(0.2 * len(men.cases)) and ids.isdisjoint(c.case_id for c in kept.cases)
    assert len(kept.cases) + len(held) == len(men.cases)
    whole, part = Counter(c.label for c in men.cases), Counter(c.label for c in held)
    for label, n in whole.items():  # stratified: each class held back in proportion (within one case)
        assert abs(part[label] - 0.2 * n) <= 1
    folds = {c.case_id: c.split for c in men.cases}
    assert all(folds[c.case_id] == c.split for c in kept.cases)  # kept patients stay in their folds
    cfg = build_config("men-smoke", QUICK)
    for r in protocol_runs(cfg, kept):
        split = fold_split(kept, r["fold"], cfg.data.val_fraction)
        assert ids.isdisjoint(c.case_id for c in split.train + split.val + split.test)
    assert kept.digest() != men.digest() and hold_out(men, 0.0)[0] is men
    assert ids_digest(ids) == ids_digest(sorted(ids, reverse=True))


def test_holdout_is_refused_for_a_fixed_split_and_for_bad_fractions(tmp_path, men):
    derm = write_synthetic("derm7pt", tmp_path / "derm" / "release_v0", 24, seed=1)
    with pytest.raises(ConfigError, match="fixed train/valid/test split"):
        hold_out(load_cohort(load_spec("derm7pt"), derm), 0.2)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        hold_out(men, 1.0)


@pytest.fixture(scope="module")
def measured(men, tmp_path_factory):
    """Two fold models trained on the kept patients, packaged and measured on the held-back ones."""
    from cfcml.engine.run import train_one
    from cfcml.platform.artifact_eval import evaluation_set, member_seen_ids, write_evaluation
    from cfcml.platform.pyfunc import build_package, save_model
    from cfcml.platform.study import measure_package

    tmp = tmp_path_factory.mktemp("measured")
    cfg = build_config("men-smoke", [*QUICK, f"data.cache_dir={tmp / 'cache'}"])
    kept, held = hold_out(men, 0.25, seed=0)
    runs = protocol_runs(cfg, kept)[:2]
    for r in runs:
        train_one(cfg, men.root, tmp / "runs" / r["name"], fold=r["fold"], progress=False, cohort=kept)
    evalset = evaluation_set(men, kept, held, men.digest())
    members = [{"name": r["name"], "weights": tmp / "runs" / r["name"] / "best.pt"} for r in runs]
    seen = member_seen_ids(cfg, kept, runs)
    package = build_package(cfg, members, men, tmp / "package", extra_meta={"members_seen": seen})
    record, report = measure_package(package, kept, men, evalset, tmp / "runs", runs, tmp, None, {"preset": cfg.name})
    write_evaluation(record, package)
    model_dir = save_model(package, men.spec, tmp / "model")  # what log_model ships
    return {"record": record, "report": report, "model": model_dir, "held": held, "seen": seen, "tmp": tmp}


@pytest.mark.slow
def test_evaluation_json_is_the_shipped_models_own_measurement(measured, men):
    import mlflow.pyfunc

    from cfcml.engine.metrics import compute_metrics
    from cfcml.platform.pyfunc import cohort_frame

    shipped = json.loads((measured["model"] / "artifacts" / "package" / "evaluation.json").read_text())
    assert shipped["kind"] == "holdout" and shipped["ids"] == sorted(c.case_id for c in measured["held"])
    assert shipped["ids_digest"] == ids_digest(shipped["ids"]) and shipped["data_digest"] == men.digest()
    model = mlflow.pyfunc.load_model(str(measured["model"]))
    by_id = {c.case_id: c for c in men.cases}
    preds = model.predict(cohort_frame(men, [by_id[i] for i in shipped["ids"]]))
    probs = preds[[f"prob_{c}" for c in men.classes]].to_numpy()
    again = compute_metrics(men.spec, np.array([by_id[i].label for i in preds["case_id"]]), probs)
    assert again.keys() == shipped["metrics"].keys()
    for k, v in again.items():
        assert v == pytest.approx(shipped["metrics"][k], abs=1e-9, nan_ok=True), k
    # every member's training and selection ids are in the package, none of them held back
    meta = json.loads((measured["model"] / "artifacts" / "package" / "meta.json").read_text())
    assert meta["members_seen"] == measured["seen"]
    held = set(shipped["ids"])
    assert all(held.isdisjoint(p["train"] + p["selection"]) for p in meta["members_seen"].values())
    assert measured["report"] is not None and measured["report"]["counts"]["test"]


@pytest.mark.slow
def test_predict_flags_seen_ids_streams_and_writes_atomically(measured, men, tmp_path, monkeypatch):
    from cfcml.engine.metrics import compute_metrics
    from cfcml.platform import predict as predict_mod

    lines = []
    one = predict_mod.predict_cohort(
        str(measured["model"]), men.root, tmp_path / "one.csv", batch_cases=10_000, echo=lines.append
    )
    streamed = predict_mod.predict_cohort(
        str(measured["model"]), men.root, tmp_path / "streamed.csv", batch_cases=4, echo=lines.append
    )
    a, b = pd.read_csv(one, keep_default_na=False), pd.read_csv(streamed, keep_default_na=False)
    pd.testing.assert_frame_equal(a, b, atol=1e-6)
    assert len(a) == len(men.cases) and not list(tmp_path.glob("*.tmp"))
    seen_train = {i for p in measured["seen"].values() for i in p["train"]}
    seen_any = seen_train | {i for p in measured["seen"].values() for i in p["selection"]}
    flagged = dict(zip(a["case_id"].astype(str), a["seen"]))
    assert {i for i, s in flagged.items() if s} == seen_any
    assert all(flagged[i] == "train" for i in seen_train)
    assert all(flagged[c.case_id] == "" for c in measured["held"])
    unseen = a[a["seen"] == ""]
    y = np.array([men.classes.index(v) for v in unseen["label"]])
    auc = compute_metrics(men.spec, y, unseen[[f"prob_{c}" for c in men.classes]].to_numpy())["auc"]
    assert f"{len(seen_any)} seen in training/selection" in lines[0]
    assert f"over the {len(unseen)} unseen" in lines[0] and f"auc {auc:.3f}" in lines[0] and "cases/s" in lines[0]

    # a failure mid-stream leaves the previous file as it was and no temporary file behind
    real = predict_mod.load_model

    class Failing:
        def __init__(self, model):
            self.model, self.calls = model, 0
            self.metadata = model.metadata

        def unwrap_python_model(self):
            return self.model.unwrap_python_model()

        def predict(self, frame):
            self.calls += 1
            if self.calls == 2:
                raise OSError("disk went away")
            return self.model.predict(frame)

    monkeypatch.setattr(predict_mod, "load_model", lambda *a, **k: Failing(real(*a, **k)))
    before = one.read_bytes()
    with pytest.raises(OSError, match="disk went away"):
        predict_mod.predict_cohort(str(measured["model"]), men.root, one, batch_cases=4, echo=None)
    assert one.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_out_of_fold_kind_without_a_holdout(men):
    from cfcml.platform.artifact_eval import ESTIMATES, evaluation_set

    evalset = evaluation_set(men, men, [], men.digest())
    assert evalset.kind == "out_of_fold" and not evalset.ids
    assert "single fold model" in ESTIMATES["out_of_fold"]
