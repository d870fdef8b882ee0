"""The hard-label rule `predict.decision` (balanced | prior; issue 24 part 4) and the CPU starter
presets (part 3): the prior rule raises accuracy on an imbalanced 5-class problem without
changing AUC, the metrics, the report, the run and the package all follow it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from cfcml.config import ConfigError, build_config, first_candidate_epoch
from cfcml.engine.decision import Decision, class_counts, decision_from_dict, pooled_decision, run_decision
from cfcml.engine.metrics import compute_metrics, metric_names, multiclass_metrics
from cfcml.report import stats

CLASSES = ["NEV", "MEL", "SK", "BCC", "MISC"]
PRIORS = np.array([0.55, 0.20, 0.12, 0.08, 0.05])  # NEV dominates, as in the 5-class cohort

FIVE_CLASS = """
name: lesions5
classes: [NEV, MEL, SK, BCC, MISC]
images:
  kind: photo
  series: [derm]
  path: "photos/{id}.jpg"
table:
  file: lesions.csv
  id: id
  label: diagnosis
  attributes:
    - {column: site, type: categorical, vocabulary: [trunk, limb, face], sentence: "The lesion site is {value}"}
    - {column: diameter, type: numeric, min: 0, max: 100, sentence: "The lesion diameter in mm is {value}"}
split:
  folds: fold
"""


def imbalanced_problem(seed: int = 0, n_train: int = 2000, n_test: int = 1500, signal: float = 1.0):
    """Class-conditional Gaussians x ~ N(signal * e_y, I): the logits signal * x are the exact
    log-likelihoods (up to a constant), i.e. what a model trained on balanced batches learns.
    -> (training labels, test labels, test logits)."""
    rng = np.random.default_rng(seed)
    y_train = rng.choice(5, n_train, p=PRIORS)
    y = rng.choice(5, n_test, p=PRIORS)
    x = signal * np.eye(5)[y] + rng.standard_normal((n_test, 5))
    return y_train, y, signal * x


def test_prior_rule_is_logit_adjustment_by_the_training_log_priors():
    y_train, _, logits = imbalanced_problem()
    d = run_decision("prior", y_train, 5)
    pi = np.bincount(y_train, minlength=5) / len(y_train)
    assert d.train_counts == tuple(np.bincount(y_train, minlength=5))
    np.testing.assert_allclose(d.priors, pi)
    # Menon et al. 2021: argmax(logits + log pi), from the probabilities alone
    np.testing.assert_array_equal(d.labels(softmax(logits, axis=1)), np.argmax(logits + np.log(pi), axis=1))
    np.testing.assert_array_equal(Decision().labels(softmax(logits, axis=1)), logits.argmax(1))
    # balanced priors adjust nothing
    np.testing.assert_array_equal(Decision("prior", (7, 7, 7, 7, 7)).labels(softmax(logits, 1)), logits.argmax(1))


def test_prior_rule_raises_accuracy_on_an_imbalanced_5_class_problem_without_changing_auc():
    y_train, y, logits = imbalanced_problem()
    probs = softmax(logits, axis=1)
    balanced = multiclass_metrics(y, probs, CLASSES)
    prior = multiclass_metrics(y, probs, CLASSES, run_decision("prior", y_train, 5))
    majority_rate = float(np.mean(y == 0))
    # argmax under-predicts the common class: accuracy below always saying NEV (the symptom)
    assert balanced["acc"] < majority_rate
    assert prior["acc"] > majority_rate and prior["acc"] > balanced["acc"] + 0.08
    assert prior["acc_nev"] > balanced["acc_nev"]  # the common class is recalled again
    # the rule moves hard labels only: AUC is computed from the same probabilities
    assert prior["auc"] == balanced["auc"]
    assert prior["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    # argmax is the balanced-error rule: it keeps the better balanced accuracy, which is why both are reported
    assert balanced["balanced_acc"] > prior["balanced_acc"]
    pred = run_decision("prior", y_train, 5).labels(probs)
    assert prior["acc"] == pytest.approx(accuracy_score(y, pred))
    assert prior["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_the_report_metrics_follow_the_same_rule_as_the_engine_metrics():
    y_train, y, logits = imbalanced_problem(seed=1, n_test=400)
    probs = softmax(logits, axis=1)
    d = run_decision("prior", y_train, 5)
    engine = multiclass_metrics(y, probs, CLASSES, d)
    report = stats.classification_metrics(y, probs, CLASSES, decision=d)
    assert list(report) == stats.metric_names(CLASSES) == metric_names(CLASSES)
    for k in engine:
        assert float(report[k]) == pytest.approx(engine[k], abs=1e-12), k
    plain = stats.classification_metrics(y, probs, CLASSES)
    assert float(plain["auc"]) == pytest.approx(float(report["auc"]), abs=1e-12)
    assert float(plain["acc"]) < float(report["acc"])
    # bootstrap weights: one row of ones reproduces the point value
    boot = stats.classification_metrics(y, probs, CLASSES, weights=np.ones((1, len(y))), decision=d)
    assert float(boot["balanced_acc"][0]) == pytest.approx(engine["balanced_acc"])


def test_binary_metrics_take_the_rule_too():
    spec = type("Spec", (), {"classes": ("NEV", "MEL"), "positive_index": 1})()
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.2).astype(int)
    logits = np.c_[np.zeros(500), 1.0 * (2 * y - 1) + rng.standard_normal(500)]
    probs = softmax(logits, axis=1)
    d = Decision("prior", (800, 200))
    plain, adjusted = compute_metrics(spec, y, probs), compute_metrics(spec, y, probs, d)
    assert adjusted["auc"] == plain["auc"] and adjusted["auprc"] == plain["auprc"]
    assert adjusted["acc"] > plain["acc"] and adjusted["spe"] > plain["spe"] and adjusted["sen"] < plain["sen"]


def test_bad_decisions_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="predict.decision"):
        Decision("bayes")
    with pytest.raises(ValueError, match="class counts"):
        Decision("prior")
    with pytest.raises(ValueError, match="3 class counts but probs have 5"):
        Decision("prior", (1, 2, 3)).labels(np.full((2, 5), 0.2))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        class_counts([0, 5], 5)
    with pytest.raises(ConfigError, match="predict.decision"):
        build_config("derm7pt-smoke", ["predict.decision=bayes"])


def test_pooled_decisions_sum_the_runs_training_counts_and_round_trip():
    d = pooled_decision("prior", [(10, 5, 1), (12, 4, 2)])
    assert d.train_counts == (22, 9, 3)
    assert decision_from_dict(json.loads(json.dumps(d.to_dict()))) == d
    assert decision_from_dict(None) == Decision() == pooled_decision("balanced", [None, None])
    with pytest.raises(ValueError, match="no recorded training class counts"):
        pooled_decision("prior", [(10, 5, 1), None])


def test_the_report_and_card_record_the_rule():
    from cfcml.report.build import compute_report
    from cfcml.report.card import model_card_markdown
    from cfcml.report.inputs import ReportInputs, SplitPredictions

    y_train, y, logits = imbalanced_problem(seed=2, n_test=300)
    d = run_decision("prior", y_train, 5)
    test = SplitPredictions([f"c{i}" for i in range(len(y))], y, softmax(logits, 1), logits=logits)
    inputs = ReportInputs(
        cohort={"name": "lesions5", "classes": CLASSES}, splits={"test": test}, meta={"decision": d.to_dict()}
    )
    report, _ = compute_report(inputs, n_bootstrap=50, tsne=False)
    assert report["decision"]["rule"] == "prior" and report["decision"]["train_counts"] == list(d.train_counts)
    engine = multiclass_metrics(y, softmax(logits, 1), CLASSES, d)
    assert report["metrics"]["acc"]["value"] == pytest.approx(engine["acc"])
    assert report["metrics"]["balanced_acc"]["value"] == pytest.approx(engine["balanced_acc"])
    confusion = np.array(report["confusion"])
    assert confusion.trace() / confusion.sum() == pytest.approx(engine["acc"])
    card = model_card_markdown(report)
    assert "`prior`" in card and "Menon" in card and "Balanced accuracy" in card
    plain, _ = compute_report(
        ReportInputs(cohort={"name": "lesions5", "classes": CLASSES}, splits={"test": test}), n_bootstrap=50, tsne=False
    )
    assert plain["auc"] == report["auc"] and plain["metrics"]["acc"]["value"] < report["metrics"]["acc"]["value"]
    assert "`balanced`" in model_card_markdown(plain)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def lesions(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic 5-class photo cohort described only by a schema file (half the patients NEV)."""
    from cfcml.datasets import write_synthetic
    from cfcml.datasets.spec import load_spec

    base = tmp_path_factory.mktemp("lesions5")
    schema = base / "lesions5.yaml"
    schema.write_text(FIVE_CLASS)
    data = write_synthetic(load_spec(schema), base / "data", 60, seed=4)
    return schema, data


@pytest.mark.slow
def test_a_run_records_its_training_counts_and_the_package_predicts_by_the_rule(lesions, tmp_path):
    from cfcml.datasets.reader import load_cohort
    from cfcml.datasets.spec import load_spec
    from cfcml.engine.run import train_one
    from cfcml.engine.splits import run_split
    from cfcml.platform.pyfunc import PackagedModel, build_package, cohort_frame

    schema, data = lesions
    cfg = build_config(
        "derm7pt-smoke",
        [
            f"dataset={schema}",
            "data.image_size=[32,32]",
            "train.epochs=1",
            "train.select_min_epoch=0",
            "train.batch_size=6",
            "predict.decision=prior",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    result = train_one(cfg, data, tmp_path / "run", fold=1, progress=False)
    cohort = load_cohort(load_spec(schema), data)
    split = run_split(cfg, cohort, 1, None)
    want = tuple(np.bincount([c.label for c in split.train], minlength=5))
    assert result["decision"]["rule"] == "prior" and tuple(result["decision"]["train_counts"]) == want
    saved = np.load(tmp_path / "run" / "predictions.npz")
    d = decision_from_dict(result["decision"])
    assert result["test"]["acc"] == pytest.approx(accuracy_score(saved["test_labels"], d.labels(saved["test_probs"])))
    assert result["test"]["auc"] == compute_metrics(cohort.spec, saved["test_labels"], saved["test_probs"])["auc"]

    package = build_package(cfg, [{"name": "fold1", "weights": tmp_path / "run" / "best.pt"}], cohort, tmp_path / "pkg")
    meta = json.loads((package / "meta.json").read_text())
    assert meta["decision"]["rule"] == "prior" and tuple(meta["decision"]["train_counts"]) == want
    frame = cohort_frame(cohort).head(12)
    out = PackagedModel(package, device="cpu").predict_frame(frame)
    probs = out[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert list(out["pred"]) == [CLASSES[k] for k in d.labels(probs)]
    # the package reads its rule from meta.json: overwhelming MISC priors make every prediction MISC
    meta["decision"]["train_counts"] = [1, 1, 1, 1, 10**9]
    (package / "meta.json").write_text(json.dumps(meta))
    assert set(PackagedModel(package, device="cpu").predict_frame(frame)["pred"]) == {"MISC"}
    meta["decision"] = {"rule": "balanced", "train_counts": None}
    (package / "meta.json").write_text(json.dumps(meta))
    assert list(PackagedModel(package, device="cpu").predict_frame(frame)["pred"]) == [
        CLASSES[k] for k in probs.argmax(1)
    ]


# --------------------------------------------------------------------------- starter presets

STARTERS = {"photo-starter": "derm7pt-smoke", "volume-starter": "men-smoke"}


@pytest.mark.parametrize("preset", sorted(STARTERS))
def test_starter_presets_stop_early_use_the_prior_rule_and_train_longer_than_the_smoke_ones(preset):
    from cfcml.config import preset_names

    assert preset in preset_names()
    cfg, smoke = build_config(preset), build_config(STARTERS[preset])
    assert cfg.predict.decision == "prior" and smoke.predict.decision == "balanced"
    assert 0 < cfg.train.patience < cfg.train.epochs and cfg.train.epochs > smoke.train.epochs
    assert cfg.train.select_window > 1  # small validation sets: the windowed score decides
    assert first_candidate_epoch(cfg.train) >= 5  # no early lucky epoch can start the patience clock
    assert cfg.model.image_pretrained == "none" and cfg.model.tabular_embedding == "mlp"  # nothing to download
    assert cfg.data.num_workers == 0 and cfg.train.device == "auto"


def test_starter_presets_build_for_cohorts_described_by_a_schema(lesions, capsys):
    from cfcml.cli import main

    schema, _ = lesions
    glioma = Path(__file__).resolve().parents[2] / "examples" / "glioma-demo.yaml"
    for preset, cohort in (("photo-starter", schema), ("volume-starter", glioma)):
        assert build_config(preset, [f"dataset={cohort}"]).predict.decision == "prior"
        assert main(["summary", "--preset", preset, "--dataset", str(cohort), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["trainable_params"] > 0 and out["frozen_params"] == 0 and len(out["stages"]) == 4
    with pytest.raises(ConfigError, match="reads photos"):
        build_config("photo-starter", [f"dataset={glioma}"])
