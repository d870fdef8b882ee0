"""`cfcml report` on real runs: a finished cv of the synthetic MEN cohort (tiny: 45 patients,
4x16x16 volumes, 1 epoch, 3 folds) -> report.json + report.html; the missing-input rows and
Grad-CAM come from the trained weights; the CLI's exit codes on bad folders and data."""

import json
import shutil

import numpy as np
import pytest

from cfcml.cli import main as cfcml_main

TINY = [
    "data.image_size=[4,16,16]",
    "data.aug_prob=0.0",
    "train.epochs=1",
    "train.device=cpu",
    "train.select_min_epoch=0",
    "train.select_window=1",
]
SERIES = ["T1C", "FLAIR_C", "ADC"]
ATTRIBUTES = ["location", "sex", "age", "adc_value", "tumor_area", "edema_area"]


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """A finished `cfcml cv` folder and its cohort."""
    from cfcml.config import build_config
    from cfcml.datasets import write_synthetic
    from cfcml.engine.protocol import run_protocol

    root = tmp_path_factory.mktemp("report-cv")
    data = write_synthetic("men", root / "men45", 45, 0)
    cfg = build_config("men-smoke", [*TINY, f"data.cache_dir={root / 'cache'}"])
    run_protocol(cfg, data, root / "cv", jobs=1)
    return root / "cv", data


@pytest.fixture(scope="module")
def report(cv, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert cfcml_main(["report", str(cv[0]), "--out", str(out), "--n-bootstrap", "300", "--explain", "1"]) == 0
    return out, json.loads((out / "report.json").read_text())


def _inside(value, ci):
    return ci[0] - 1e-12 <= value <= ci[1] + 1e-12


@pytest.mark.slow
def test_report_of_a_cv_folder(cv, report):
    out, r = report
    assert {"report.html", "report.json", "model_card.md"} <= {p.name for p in out.iterdir()}
    assert {"auc_ci", "ece", "brier", "operating_points", "subgroups", "missing_modality"} <= set(r)
    assert r["bootstrap"]["n"] == 300 and r["bootstrap"]["n_cases"] == 45  # every patient tested once
    assert r["runs"]["test"] == ["fold1", "fold2", "fold3"] and r["counts"]["test"]["patients"] == 45
    # the CIs contain their point estimates
    assert _inside(r["auc"], r["auc_ci"])
    for name, m in r["metrics"].items():
        if m["value"] is not None and m["ci"][0] is not None:
            assert _inside(m["value"], m["ci"]), name
    assert _inside(r["ece"], r["ece_ci"]) and _inside(r["brier"], r["brier_ci"])
    # one row per series and attribute, plus the reference; "none" reproduces the saved predictions
    assert list(r["missing_modality"]) == [
        "none",
        *[f"series {s}" for s in SERIES],
        *[f"attribute {a}" for a in ATTRIBUTES],
    ]
    assert r["missing_modality"]["none"]["auc"] == pytest.approx(r["auc"], abs=1e-6)
    assert all(set(v) == {"auc", "acc", "balanced_acc", "macro_f1"} for v in r["missing_modality"].values())
    # subgroups from the cohort's attributes, t-SNE of the saved fused features, Grad-CAM per series
    assert [s["column"] for s in r["subgroups"]] == ATTRIBUTES
    assert r["embedding"]["n"] == 45 and r["embedding"]["features_dim"] > 0
    assert 1 <= len(r["explanations"]) <= 2
    assert all(e["kind"] == "volume" and e["inputs"] == SERIES for e in r["explanations"])
    assert r["meta"]["synthetic"] is True and r["meta"]["runs"] == ["fold1", "fold2", "fold3"]
    assert r["meta"]["data_digest"] == json.loads((cv[0] / "summary.json").read_text())["cohort_digest"]
    page = (out / "report.html").read_text()
    assert "series FLAIR_C" in page and "attribute age" in page and "synthetic" in (out / "model_card.md").read_text()


@pytest.mark.slow
def test_removing_an_input_changes_what_the_model_sees(cv):
    """The removal reaches the model: with the series' volume zeroed / the attribute's sentence
    replaced, the predictions differ from the reference (same weights, same cases)."""
    from cfcml.engine.loaders import make_dataset, tabular_inputs
    from cfcml.report import from_runs as fr

    runs, summary = fr.find_runs(cv[0])
    cohort = fr.load_run_cohort(runs[:1], summary, None)
    run = fr.load_run_model(runs[0], cohort)
    saved = np.load(runs[0].path / "predictions.npz")
    reference = fr._probs(run, run.test_dataset, run.test_tabular, "cpu")
    np.testing.assert_allclose(reference, saved["test_probs"], atol=1e-5)
    cases = [fr.without_series(c, 1) for c in run.split.test]
    dataset = make_dataset(runs[0].cfg, cohort.spec, cases, train=False)
    assert all(float(dataset[i]["images"][1].abs().max()) == 0 for i in range(3))
    assert not np.allclose(fr._probs(run, dataset, run.test_tabular, "cpu"), reference)
    cases = [fr.without_attribute(c, cohort.spec, 2) for c in run.split.test]
    tab = tabular_inputs(runs[0].cfg, cohort.spec, cases, None)
    assert not np.allclose(fr._probs(run, run.test_dataset, tab, "cpu"), reference)


def test_removal_is_the_registered_models_convention(tmp_path):
    """without_series / without_attribute give the very case the pyfunc builds from a row with
    that cell left empty."""
    from cfcml.datasets import write_synthetic
    from cfcml.datasets.reader import load_cohort
    from cfcml.platform.pyfunc import case_record, record_to_case
    from cfcml.report.from_runs import without_attribute, without_series

    cohort = load_cohort("men", write_synthetic("men", tmp_path / "men", 36, 0))
    spec, case = cohort.spec, cohort.cases[0]
    row = case_record(spec, case)
    row["FLAIR_C"], row["age"] = "", ""
    shipped, missing = record_to_case(spec, row)
    assert missing == ["FLAIR_C", "age"]
    ours = without_attribute(without_series(case, 1), spec, 2)
    assert ours.images == shipped.images and ours.sentences == shipped.sentences
    assert ours.attributes == shipped.attributes and ours.raw["age"] == ""


@pytest.mark.slow
def test_cli_exit_codes(cv, tmp_path):
    folder, data = cv
    assert cfcml_main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "empty").mkdir()
    assert cfcml_main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    lone = tmp_path / "lone"
    shutil.copytree(folder / "fold2", lone)  # a single run outside its cv: no data root recorded
    assert cfcml_main(["report", str(lone), "--out", str(tmp_path / "o")]) == 2
    other = _other_cohort(tmp_path)
    assert cfcml_main(["report", str(lone), "--out", str(tmp_path / "o"), "--data", str(other)]) == 2  # other data
    unfinished = tmp_path / "unfinished"
    shutil.copytree(folder / "fold2", unfinished)
    (unfinished / "predictions.npz").unlink()
    assert cfcml_main(["report", str(unfinished), "--out", str(tmp_path / "o"), "--data", str(data)]) == 2
    assert not (tmp_path / "o").exists()
    out = tmp_path / "single"
    assert (
        cfcml_main(
            [
                "report",
                str(lone),
                "--out",
                str(out),
                "--data",
                str(data),
                "--n-bootstrap",
                "100",
                "--explain",
                "0",
                "--no-missing",
            ]
        )
        == 0
    )
    r = json.loads((out / "report.json").read_text())
    assert r["runs"]["test"] == ["fold2"] and r["missing_modality"] == {} and r["explanations"] == []


def _other_cohort(tmp_path):
    from cfcml.datasets import write_synthetic

    return write_synthetic("men", tmp_path / "other", 45, 7)


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_of_real_runs_renders_offline_in_headless_chromium(report, tmp_path):
    import re
    import subprocess

    from cfcml.report.html import SECTIONS

    out, r = report
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000",
        "--dump-dom",
        (out / "report.html").as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True).stdout
    assert re.findall(r"<h2>([^<]*)</h2>", dom) == [title for _, title in SECTIONS]
    figures = 5 + len(r["explanations"])  # roc, pr, reliability, subgroups, t-SNE + one per explained case
    assert len(re.findall(r'<img [^>]*src="data:image/png', dom)) == figures
