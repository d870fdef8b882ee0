"""A study's final evaluation of the best trial without Ray: the classical baselines on the same
runs and the paired evidence (`evaluate_best`), what the Finaliser logs of them, and the
confusion matrix under the study's hard-label rule (`plot_confusion`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from cfcml.engine.decision import Decision
from cfcml.platform.study.plots import confusion_counts, plot_confusion

SEEDS = ("seed0", "seed1")


# --------------------------------------------------------------------------- the confusion matrix


def _imbalanced(seed: int = 0):
    """90 % class 0, with probabilities that a class-balanced model gives: class 1 over-called."""
    rng = np.random.default_rng(seed)
    y = (rng.random(400) < 0.1).astype(int)
    p1 = np.clip(0.55 + 0.3 * (y == 1) + rng.normal(0, 0.1, len(y)), 0.01, 0.99)
    return y, np.column_stack([1 - p1, p1])


def test_confusion_counts_follow_the_decision_rule():
    from sklearn.metrics import confusion_matrix

    y, p = _imbalanced()
    balanced = confusion_counts(y, p, 2)
    assert np.array_equal(balanced, confusion_matrix(y, p.argmax(1), labels=[0, 1]))
    prior = Decision("prior", (900, 100))
    adjusted = confusion_counts(y, p, 2, prior)
    assert np.array_equal(adjusted, confusion_matrix(y, prior.labels(p), labels=[0, 1]))
    assert adjusted.sum() == balanced.sum() == len(y) and adjusted.sum(1).tolist() == balanced.sum(1).tolist()
    assert adjusted[0, 1] < balanced[0, 1]  # fewer common-class patients called rare
    assert np.trace(adjusted) > np.trace(balanced)


def test_plot_confusion_shows_the_counts_of_its_rule_and_names_a_prior_rule():
    import matplotlib.pyplot as plt

    y, p = _imbalanced(1)
    classes = ["benign", "malignant"]
    prior = Decision("prior", (900, 100))
    shown = {}
    for name, decision in (("default", None), ("balanced", Decision()), ("prior", prior)):
        fig = plot_confusion(y, p, classes, "confusion matrix, test", decision)
        ax = fig.axes[0]
        shown[name] = (np.array([int(t.get_text()) for t in ax.texts]).reshape(2, 2), ax.get_title())
        plt.close(fig)
    assert np.array_equal(shown["default"][0], confusion_counts(y, p, 2))
    assert np.array_equal(shown["prior"][0], confusion_counts(y, p, 2, prior))
    assert not np.array_equal(shown["prior"][0], shown["default"][0])
    assert shown["default"][1] == shown["balanced"][1] == "confusion matrix, test"
    assert shown["prior"][1].startswith("confusion matrix, test\n") and "prior" in shown["prior"][1]
    assert "benign 0.90" in shown["prior"][1] and "malignant 0.10" in shown["prior"][1]


# --------------------------------------------------------------------------- the best trial's evaluation


@pytest.fixture(scope="module")
def best_trial(tmp_path_factory):
    """The two tiny runs of a fused model's trial (prior decision rule) on a synthetic Derm7pt
    cohort, tested once by `evaluate_best` -> (cfg, cohort, runs, ckpt_dir, result)."""
    from cfcml.config import build_config, cohort_spec
    from cfcml.datasets import write_synthetic
    from cfcml.datasets.reader import load_cohort
    from cfcml.engine.run import TrainingRun
    from cfcml.engine.splits import protocol_runs
    from cfcml.platform.study.evaluate import evaluate_best

    base = tmp_path_factory.mktemp("best")
    data = write_synthetic("derm7pt", base / "release_v0", 90, seed=1)
    cfg = build_config(
        "derm7pt-smoke",
        [
            "data.image_size=[32,32]",
            f"data.cache_dir={base / 'cache'}",
            "train.epochs=1",
            "train.seeds=[0,1]",
            "train.select_min_epoch=0",
            "predict.decision=prior",
        ],
    )
    cohort = load_cohort(cohort_spec(cfg), data)
    runs = protocol_runs(cfg, cohort)
    assert [r["name"] for r in runs] == list(SEEDS)
    ckpt = base / "best_checkpoint"
    for r in runs:  # as a trial leaves them: trained and checkpointed, not yet tested
        run = TrainingRun(cfg, data, ckpt / r["name"], seed=r["seed"], cohort=cohort, progress=False)
        while not run.done:
            run.train_epoch()
    result = evaluate_best(cfg, str(data), cohort, runs, ckpt, device="cpu")
    return cfg, cohort, runs, ckpt, result


@pytest.mark.slow
def test_evaluate_best_fits_the_baselines_on_the_same_runs_and_pairs_them(best_trial):
    from cfcml.engine.baselines import LABELS

    _, cohort, _, ckpt, result = best_trial
    assert set(result["baselines"]) == set(LABELS)
    for kind, b in result["baselines"].items():
        assert b["label"] == LABELS[kind] and [r["name"] for r in b["runs"]] == list(SEEDS)
        for run in SEEDS:
            saved_metrics = json.loads((ckpt / "baselines" / kind / run / "metrics.json").read_text())
            assert saved_metrics["test"] == pytest.approx(next(r for r in b["runs"] if r["name"] == run)["metrics"])
            assert saved_metrics["decision"]["rule"] == "prior"
            with (
                np.load(ckpt / "baselines" / kind / run / "predictions.npz") as base,
                np.load(ckpt / run / "predictions.npz") as deep,
            ):
                assert list(base["test_case_ids"]) == list(deep["test_case_ids"])  # the same patients
                assert list(base["test_labels"]) == list(deep["test_labels"])
    pairs = result["paired"]["pairs"]
    assert [p["b"] for p in pairs] == list(LABELS.values())
    assert all(p["a"] == "CFCML" and p["test"] == "DeLong" for p in pairs)
    tested = len(cohort.split("test"))  # a fixed split: every seed tests the same patients, paired once each
    assert all(p["n_patients"] == tested for p in pairs)
    sentence = result["paired"]["images_add"]["sentence"]
    assert result["paired"]["images_add"]["against"] == max(pairs, key=lambda p: p["auc_b"])["b"]

    md = result["markdown"]
    table, evidence = md.split("### Paired evidence on patients")
    for label in LABELS.values():
        assert f"| {label} |" in table  # a row of the test table
        assert f"| CFCML vs {label} |" in evidence
    assert f"**Do the images add to the table?** {sentence}" in evidence


def test_a_cohort_without_attributes_gets_no_baselines(tmp_path):
    from cfcml.config import build_config
    from cfcml.platform.study.evaluate import baselines_and_evidence

    spec = SimpleNamespace(name="images-only", attributes=())
    cohort = SimpleNamespace(spec=spec, cases=[])
    out = baselines_and_evidence(build_config("derm7pt-smoke"), cohort, [{"name": "seed0", "seed": 0}], tmp_path, {})
    assert out == {} and not (tmp_path / "baselines").exists()


class _Client:
    """What the Finaliser calls on an MLflow client, recorded (figures: their axes' texts and titles)."""

    def __init__(self):
        self.metrics, self.tags, self.texts, self.figures = {}, {}, {}, {}

    def log_batch(self, run_id, metrics):
        self.metrics.setdefault(run_id, {}).update({m.key: m.value for m in metrics})

    def set_tag(self, run_id, key, value):
        self.tags.setdefault(run_id, {})[key] = value

    def log_text(self, run_id, text, path):
        self.texts[(run_id, path)] = text

    def log_figure(self, run_id, fig, path):
        ax = fig.axes[0]
        self.figures[(run_id, path)] = ([t.get_text() for t in ax.texts], ax.get_title())


@pytest.mark.slow
def test_the_finaliser_logs_baselines_evidence_and_the_rules_confusion(best_trial):
    from cfcml.engine.decision import pooled_decision, recorded_train_counts
    from cfcml.engine.splits import run_split
    from cfcml.platform.study.finalise import TAG_IMAGES_ADD, Best, Finaliser

    cfg, cohort, runs, ckpt, result = best_trial
    client = _Client()
    plan = SimpleNamespace(spec=SimpleNamespace(), runs=runs)
    finaliser = Finaliser(plan, SimpleNamespace(client=client, parent_id="parent"))
    best = Best("t1", {}, cfg, "child", "unused")

    decision = finaliser.decision(best, ckpt)
    counts = sum(
        np.bincount([c.label for c in run_split(cfg, cohort, None, r["seed"]).train], minlength=2) for r in runs
    )
    assert decision.rule == "prior" and decision.train_counts == tuple(int(c) for c in counts)
    assert decision == pooled_decision("prior", [recorded_train_counts(ckpt / r["name"]) for r in runs])

    finaliser.log_test(best, result, decision=decision)
    parent = client.metrics["parent"]
    for kind, b in result["baselines"].items():
        for name, stats in b["metrics"].items():
            if not np.isnan(stats["mean"]):
                assert parent[f"baseline_{kind}_test_{name}_mean"] == pytest.approx(stats["mean"])
    assert not any(k.startswith("baseline_") for k in client.metrics["child"])  # the parent's alone
    assert parent["test_auc_mean"] == pytest.approx(result["summary"]["metrics"]["auc"]["mean"])
    assert client.tags["parent"][TAG_IMAGES_ADD] == result["paired"]["images_add"]["sentence"]
    assert "child" not in client.tags

    for run_id in ("parent", "child"):
        md = client.texts[(run_id, "best_trial/test_summary.md")]
        assert md == result["markdown"] + "\n" and "LogReg (attributes)" in md and "Paired evidence" in md
        saved = json.loads(client.texts[(run_id, "best_trial/test_summary.json")])
        assert set(saved["baselines"]) == set(result["baselines"])
        assert all("folder" not in b for b in saved["baselines"].values())  # no local paths
        assert [p["b"] for p in saved["paired"]["pairs"]] == [p["b"] for p in result["paired"]["pairs"]]
        texts, title = client.figures[(run_id, "plots/confusion_test.png")]
        y, p = result["pooled"]["test"]
        assert [int(t) for t in texts] == confusion_counts(y, p, 2, decision).ravel().tolist()
        assert "decision: prior" in title


@pytest.mark.slow
def test_the_study_report_and_card_state_whether_the_images_add(best_trial, tmp_path):
    from cfcml.platform.report_logging import study_report

    _, cohort, runs, ckpt, result = best_trial
    client = _Client()
    client.log_artifacts = lambda run_id, local, path: client.texts.setdefault((run_id, path), local)
    summary = {"study": "s", "best_trial_id": "t1", "best_cv_val_auc": 0.7, "trials": 2, "paired": result["paired"]}
    report = study_report(
        cohort, runs, ckpt, tmp_path / "report", client, ["parent"], summary, "abc", n_bootstrap=50, tsne=False
    )
    assert report is not None and "cfcml.report_error" not in client.tags.get("parent", {})
    sentence = result["paired"]["images_add"]["sentence"]
    assert report["meta"]["images_add"] == sentence
    assert set(report["meta"]["baselines"]) == {p["b"] for p in result["paired"]["pairs"]}
    assert f"Do the images add to the table? {sentence}" in (tmp_path / "report" / "model_card.md").read_text()


@pytest.mark.slow
def test_the_ray_task_ships_the_baselines_back_to_the_driver(best_trial, tmp_path):
    """`_evaluate_task` (run here as a plain function) from a trial's checkpoint; `receive` writes
    its files into the driver's checkpoint folder, where the paired evidence can be recomputed."""
    import shutil

    from cfcml.datasets.spec import shipped
    from cfcml.engine.evidence import baseline_models, config_model, paired_evidence
    from cfcml.platform.study.evaluate import _evaluate_task, receive
    from cfcml.platform.train_loop import RUN_FILES

    cfg, cohort, runs, ckpt, result = best_trial
    trial = tmp_path / "storage" / "checkpoint_000000"  # what a trial checkpoints: no test results
    for r in runs:
        (trial / r["name"]).mkdir(parents=True)
        for name in RUN_FILES:
            shutil.copy2(ckpt / r["name"] / name, trial / r["name"] / name)
    remote, files = _evaluate_task(
        cfg.to_dict(), shipped(cohort.spec), str(cohort.root), runs, str(trial), str(tmp_path / "storage")
    )
    kinds = set(result["baselines"])
    wanted = {
        f"baselines/{k}/{r['name']}/{n}" for k in kinds for r in runs for n in ("metrics.json", "predictions.npz")
    }
    assert wanted <= set(files) and all(files[w] for w in wanted)
    assert [p["b"] for p in remote["paired"]["pairs"]] == [p["b"] for p in result["paired"]["pairs"]]

    driver = tmp_path / "driver"
    for r in runs:
        shutil.copytree(trial / r["name"], driver / r["name"])
    received = receive(remote, files, driver)
    assert all(b["folder"] == str(driver / "baselines" / k) for k, b in received["baselines"].items())
    this = config_model(cfg.to_dict(), [driver / r["name"] for r in runs], received["summary"])
    again = paired_evidence(this, baseline_models(received["baselines"]), cohort.spec)
    assert [p["auc_b"] for p in again["pairs"]] == [p["auc_b"] for p in remote["paired"]["pairs"]]
    assert [p["auc_a"] for p in again["pairs"]] == [p["auc_a"] for p in remote["paired"]["pairs"]]
