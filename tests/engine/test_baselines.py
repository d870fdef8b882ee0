"""Classical baselines on the attributes alone (cfcml.engine.baselines) and `cfcml cv --baselines`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cfcml.cli import main
from cfcml.config import ConfigError
from cfcml.datasets import write_synthetic
from cfcml.datasets.cohort import Case
from cfcml.datasets.spec import spec_from_dict
from cfcml.engine.baselines import GRIDS, LABELS, attribute_frame, fit_baseline, make_model
from cfcml.engine.metrics import metric_names
from cfcml.engine.paired import compare_auc
from cfcml.engine.splits import RunSplit

SCHEMA = {
    "name": "linear-demo",
    "classes": ["benign", "malignant"],
    "positive": "malignant",
    "images": {"kind": "photo", "series": ["derm"], "path": "photos/{id}.jpg"},
    "table": {
        "file": "t.csv",
        "id": "id",
        "label": "y",
        "attributes": [
            {"column": "age", "type": "numeric", "sentence": "The age is {value}"},
            {"column": "size", "type": "numeric", "sentence": "The size is {value}"},
            {
                "column": "colour",
                "type": "categorical",
                "vocabulary": ["tan", "brown", "black"],
                "sentence": "The colour is {value}",
            },
        ],
    },
    "split": {"files": {"train": "a.txt", "valid": "b.txt", "test": "c.txt"}},
}
WEIGHTS = {"age": 0.06, "size": -0.8, "black": 1.5, "brown": 0.5}


def _linear_cases(n: int, seed: int, missing: float = 0.0) -> tuple[list[Case], np.ndarray]:
    """Cases whose label is Bernoulli(sigmoid(a linear function of the attributes)); -> (cases, true logits)."""
    rng = np.random.default_rng(seed)
    age, size = rng.normal(55, 15, n), rng.normal(3, 1.2, n)
    colour = rng.choice(["tan", "brown", "black"], n)
    logit = (
        WEIGHTS["age"] * (age - 55)
        + WEIGHTS["size"] * (size - 3)
        + 1.5 * (colour == "black")
        + 0.5 * (colour == "brown")
        - 0.6
    )
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    cases = []
    for i in range(n):
        values = {"age": float(age[i]), "size": float(size[i]), "colour": str(colour[i])}
        for col in values:
            if rng.random() < missing:
                values[col] = None
        cases.append(Case(f"P{seed}-{i:04d}", int(y[i]), "x", (), values, ()))
    return cases, logit


def test_logistic_regression_reaches_the_ceiling_of_a_linear_cohort_and_the_paired_test_agrees():
    spec = spec_from_dict(SCHEMA)
    train, _ = _linear_cases(800, 0)
    val, _ = _linear_cases(300, 1)
    test, logit = _linear_cases(500, 2)
    y_test = np.array([c.label for c in test])
    ceiling = roc_auc_score(y_test, logit)  # the Bayes-optimal score
    lr = fit_baseline("logreg", spec, RunSplit("seed0", train, val, test))
    hgb = fit_baseline("hgb", spec, RunSplit("seed0", train, val, test))
    assert lr["test"]["metrics"]["auc"] == pytest.approx(ceiling, abs=0.015)
    assert ceiling - 0.06 < hgb["test"]["metrics"]["auc"] <= ceiling + 0.02
    assert list(lr["test"]["labels"]) == list(y_test) and lr["test"]["probs"].shape == (500, 2)
    assert set(lr["test"]["metrics"]) == set(metric_names(spec.classes))
    oracle = 1 / (1 + np.exp(-logit))
    paired = compare_auc(y_test, lr["test"]["probs"], np.c_[1 - oracle, oracle], positive=1)
    assert paired["ci"][0] < 0 < paired["ci"][1] and paired["p"] > 0.05  # no difference from the oracle


def test_selection_uses_validation_only_and_records_the_grid():
    spec = spec_from_dict(SCHEMA)
    train, _ = _linear_cases(200, 3)
    val, _ = _linear_cases(80, 4)
    test, _ = _linear_cases(80, 5)
    fitted = fit_baseline("logreg", spec, RunSplit("seed0", train, val, test))
    aucs = [g["val_auc"] for g in fitted["grid"]]
    assert [g["params"] for g in fitted["grid"]] == GRIDS["logreg"]
    assert fitted["params"] == GRIDS["logreg"][int(np.argmax(aucs))]
    flipped = [Case(c.case_id, 1 - c.label, c.split, (), c.attributes, ()) for c in test]  # test labels never matter
    again = fit_baseline("logreg", spec, RunSplit("seed0", train, val, flipped))
    assert again["params"] == fitted["params"]
    np.testing.assert_allclose(again["test"]["probs"], fitted["test"]["probs"])


@pytest.mark.parametrize("kind", list(LABELS))
def test_missing_attribute_values_are_handled_like_the_model_does(kind):
    spec = spec_from_dict(SCHEMA)
    train, _ = _linear_cases(300, 6, missing=0.2)
    val, _ = _linear_cases(100, 7, missing=0.2)
    test, _ = _linear_cases(100, 8, missing=0.2)
    frame = attribute_frame(spec, test)
    assert (frame["colour"] == "unknown").any() and frame["age"].isna().any()  # the sentence route's word; NaN
    fitted = fit_baseline(kind, spec, RunSplit("seed0", train, val, test))
    assert np.isfinite(fitted["test"]["probs"]).all() and fitted["test"]["metrics"]["auc"] > 0.65
    model = make_model(kind, spec, GRIDS[kind][0]).fit(attribute_frame(spec, train), [c.label for c in train])
    blank = attribute_frame(spec, [Case("blank", 0, "x", (), {"age": None, "size": None, "colour": None}, ())])
    assert np.isfinite(model.predict_proba(blank)).all()


def test_a_class_absent_from_training_gets_probability_zero_in_its_column():
    three = dict(SCHEMA, classes=["tan", "brown", "black"], positive=None)
    three["table"] = dict(SCHEMA["table"], attributes=SCHEMA["table"]["attributes"][:2])
    spec = spec_from_dict(three)
    cases, _ = _linear_cases(90, 9)
    cases = [Case(c.case_id, i % 2, "x", (), c.attributes, ()) for i, c in enumerate(cases)]  # classes 0 and 1 only
    fitted = fit_baseline("logreg", spec, RunSplit("seed0", cases[:50], cases[50:70], cases[70:]))
    assert fitted["test"]["probs"].shape == (20, 3) and np.all(fitted["test"]["probs"][:, 2] == 0)
    np.testing.assert_allclose(fitted["test"]["probs"].sum(1), 1.0)


@pytest.fixture(scope="module")
def cv_with_baselines(tmp_path_factory):
    base = tmp_path_factory.mktemp("cvb")
    data = write_synthetic("derm7pt", base / "release_v0", 90, seed=1)
    args = [
        "--preset",
        "derm7pt-smoke",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--set",
        "data.image_size=[32,32]",
        "--set",
        f"data.cache_dir={base / 'cache'}",
        "--set",
        "train.seeds=[0,1]",
        "--set",
        "train.select_min_epoch=0",
    ]
    assert main(["cv", *args, "--out", str(base / "cv"), "--baselines"]) == 0
    return base / "cv", data


def test_cv_baselines_write_rows_runs_and_paired_evidence(cv_with_baselines):
    cv, _ = cv_with_baselines
    table = (cv / "summary.md").read_text()
    summary = json.loads((cv / "summary.json").read_text())
    for kind, label in LABELS.items():
        assert f"| {label} |" in table and f"{label} vs " not in table.split("Paired evidence")[0]
        assert f"| CFCML vs {label} |" in table
        assert [r["name"] for r in summary["baselines"][kind]["runs"]] == ["seed0", "seed1"]
        for run in ("seed0", "seed1"):
            metrics = json.loads((cv / "baselines" / kind / run / "metrics.json").read_text())
            deep = json.loads((cv / run / "metrics.json").read_text())
            assert set(metrics["test"]) == set(deep["test"]) - {"loss"}
            with (
                np.load(cv / "baselines" / kind / run / "predictions.npz") as saved,
                np.load(cv / run / "predictions.npz") as deep_saved,
            ):
                assert list(saved["test_case_ids"]) == list(deep_saved["test_case_ids"])
                assert list(saved["test_labels"]) == list(deep_saved["test_labels"])
                assert saved["test_probs"].shape == deep_saved["test_probs"].shape
    pairs = summary["paired"]["pairs"]
    assert [p["b"] for p in pairs] == list(LABELS.values()) and all(p["test"] == "DeLong" for p in pairs)
    assert all(p["n_patients"] == len(np.load(cv / "seed0" / "predictions.npz")["test_case_ids"]) for p in pairs)
    sentence = summary["paired"]["images_add"]["sentence"]
    assert "best attributes-only model" in sentence and "95 % CI" in sentence
    assert f"**Do the images add to the table?** {sentence}" in table
    strongest = max(pairs, key=lambda p: p["auc_b"])
    assert summary["paired"]["images_add"]["against"] == strongest["b"]


def test_the_report_of_a_cv_folder_states_whether_the_images_add(cv_with_baselines, tmp_path):
    from cfcml.report.from_runs import report_from_folder

    cv, _ = cv_with_baselines
    report = report_from_folder(cv, tmp_path / "report", missing=False, explain=(0, 0), n_bootstrap=100, tsne=False)
    sentence = json.loads((cv / "summary.json").read_text())["paired"]["images_add"]["sentence"]
    assert report["meta"]["images_add"] == sentence
    assert set(report["meta"]["baselines"]) == set(LABELS.values())
    card = (tmp_path / "report" / "model_card.md").read_text()
    assert f"Do the images add to the table? {sentence}" in card


def test_baselines_refuse_a_cohort_without_attributes():
    from cfcml.config import build_config
    from cfcml.engine.baselines import run_baselines

    cohort = SimpleNamespace(
        spec=SimpleNamespace(name="images-only", attributes=())
    )  # schemas require one; code may not
    with pytest.raises(ConfigError, match="no tabular attributes"):
        run_baselines(build_config("derm7pt-smoke"), cohort, [], "unused")


def test_cv_methods_with_baselines_puts_them_in_the_comparison(cv_with_baselines, tmp_path):
    _, data = cv_with_baselines
    args = [
        "--preset",
        "derm7pt-smoke",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--set",
        "data.image_size=[32,32]",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        "train.seeds=[0]",
        "--set",
        "train.select_min_epoch=0",
    ]
    assert main(["cv", *args, "--methods", "etmc", "--baselines", "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:5] == [*LABELS.values(), "ETMC", "CFCML"]  # baselines first, CFCML (the reference) last
    assert "| CFCML vs LogReg (attributes) |" in table and "**Do the images add to the table?**" in table
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert set(comparison["methods"]) == {*LABELS, "etmc", "cfcml"} and comparison["methods"]["logreg"]["wilcoxon_p"]
    assert (tmp_path / "cmp" / "cfcml" / "baselines" / "logreg" / "seed0" / "predictions.npz").is_file()
    assert not (tmp_path / "cmp" / "etmc" / "baselines").exists()  # fitted once, with the reference
