"""build_report on synthetic, fixed ReportInputs (binary and 3-class): the JSON contract, CIs
around their point estimates, a self-contained HTML page (also rendered in headless Chromium
where it is installed), the model card, and the subgroup rules."""

import base64
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from cfcml.report import ReportInputs, SplitPredictions, build_report, model_card_markdown
from cfcml.report.build import write_atomic
from cfcml.report.card import REGISTRY_DESCRIPTION_MAX
from cfcml.report.html import SECTIONS
from cfcml.report.subgroups import subgroup_analysis
from cfcml.report.synthetic import synthetic_inputs

REQUIRED = {
    "auc_ci",
    "n_bootstrap",
    "metrics",
    "ece",
    "ece_after",
    "brier",
    "brier_after",
    "temperature",
    "operating_points",
    "subgroups",
    "missing_modality",
    "calibration",
}


@pytest.fixture(scope="module", params=[2, 3], ids=["binary", "3-class"])
def built(request, tmp_path_factory):
    k = request.param
    inputs = synthetic_inputs(k, n_val=80, n_test=90, seed=k)
    out = tmp_path_factory.mktemp(f"report{k}")
    returned = build_report(inputs, out)
    return k, inputs, out, returned


def _strict_json(path):
    def reject(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_files_and_json_contract(built):
    k, inputs, out, returned = built
    assert sorted(p.name for p in out.iterdir()) == ["model_card.md", "report.html", "report.json"]  # no temp files
    report = _strict_json(out / "report.json")
    assert report == returned
    assert REQUIRED <= set(report)
    assert report["n_bootstrap"] == report["bootstrap"]["n"] == 2000
    assert report["bootstrap"]["n_cases"] == 90
    names = (
        ["sen", "spe", "acc", "g_mean", "balanced_acc", "auprc", "auprc_label", "auc"]
        if k == 2
        else ["acc", "balanced_acc", "acc_g1", "acc_g2inv", "acc_g2ninv", "weighted_f1", "macro_f1", "auc"]
    )
    assert list(report["metrics"]) == names
    assert report["auc"] == report["metrics"]["auc"]["value"]
    assert report["missing_modality"] == inputs.missing_modality
    assert set(report["curves"]["roc"]) == ({"MEL"} if k == 2 else {"G1", "G2inv", "G2ninv"})


def test_cis_contain_point_estimates(built):
    _, _, _, r = built
    lo, hi = r["auc_ci"]
    assert lo < r["auc"] < hi
    for name, m in r["metrics"].items():
        assert m["ci"][0] <= m["value"] <= m["ci"][1], name
    assert r["ece_ci"][0] <= r["ece"] <= r["ece_ci"][1]
    assert r["brier_ci"][0] <= r["brier"] <= r["brier_ci"][1]
    for op in r["operating_points"]:
        for name, m in op["test"].items():
            assert m["ci"][0] <= m["value"] <= m["ci"][1], (op["class"], op["kind"], name)
    for s in r["subgroups"]:
        for g in s["groups"]:
            for name, m in g["metrics"].items():
                assert m["ci"][0] <= m["value"] <= m["ci"][1], (s["column"], g["name"], name)


def test_temperature_fitted_on_validation_improves_overconfident_model(built):
    _, inputs, _, r = built
    assert r["temperature"] > 1.2  # the synthetic logits are three times too sharp
    assert r["ece_after"] < r["ece"]
    assert r["calibration"]["val_nll_after"] < r["calibration"]["val_nll_before"]
    # the JSON's temperature is the validation optimum, not the test's
    from cfcml.report.stats import fit_temperature

    val = inputs.splits["val"]
    assert r["temperature"] == pytest.approx(fit_temperature(val.logits, val.labels), rel=1e-6)


def test_operating_points_and_subgroups_shape(built):
    k, _, _, r = built
    assert len(r["operating_points"]) == (4 if k == 2 else 12)
    assert {(o["kind"], o["target"]) for o in r["operating_points"]} == {
        ("sen_at_spe", 0.9),
        ("sen_at_spe", 0.95),
        ("spe_at_sen", 0.9),
        ("spe_at_sen", 0.95),
    }
    columns = [s["column"] for s in r["subgroups"]]
    assert columns == [a["column"] for a in r["cohort"]["attributes"]]
    for s in r["subgroups"]:
        assert sum(g["n"] for g in s["groups"]) == 90  # every case in exactly one group
        assert any(g["name"] == "missing" for g in s["groups"]) == (s is r["subgroups"][0])
    small = [g for s in r["subgroups"] for g in s["groups"] if g["n"] < 10]
    assert small and all(not g["reportable"] and not g["metrics"] and "too small" in g["notes"][0] for g in small)
    if k == 3:
        age = r["subgroups"][1]
        assert [g["name"] for g in age["groups"]] == ["< 40", "40–64", "≥ 65"]
        assert age["bands"]["source"] == "fixed clinical bands"
        assert r["subgroups"][3]["bands"]["source"] == "validation tertiles"


def test_html_is_self_contained(built):
    _, _, out, r = built
    page = (out / "report.html").read_text()
    for forbidden in ("http://", "https://", 'src="//', "<script", "<link", "@import", "url("):
        assert forbidden not in page.lower(), forbidden
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:  # valid PNGs that carry no URL either (matplotlib writes its own into the metadata by default)
        png = base64.b64decode(s.split(",", 1)[1])
        assert png.startswith(b"\x89PNG") and b"http" not in png
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    assert "Content-Security-Policy" in page
    for sid, title in SECTIONS:
        assert f'<section id="{sid}"><h2>{title}</h2>' in page
    # one ROC + PR + reliability + subgroups + t-SNE + 3 Grad-CAM figures
    assert len(srcs) == 8
    assert f"{r['auc']:.3f}" in page
    assert "<h4>Known limitations</h4>" in page and "<code>--set model.use_images=false</code>" in page  # the card


def test_model_card(built):
    k, _, out, r = built
    card = model_card_markdown(r)
    assert card == (out / "model_card.md").read_text()
    for heading in (
        "## Intended use",
        "## Cohort and split",
        "## Performance on the test set",
        "## Calibration",
        "## Operating points",
        "## Subgroups (test)",
        "## Missing inputs",
        "## Known limitations",
    ):
        assert heading in card
    assert "not a medical device" in card and "synthetic" in card
    assert f"{r['auc']:.3f} | {r['auc_ci'][0]:.3f} – {r['auc_ci'][1]:.3f}" in card
    assert ("`management` attribute leaks the label" in card) == (k == 2)  # Derm7pt-like only
    assert "tabular-only baseline" in card
    r2 = dict(r, meta=dict(r["meta"], baselines={"tabular only": {"auc": 0.61}}))
    assert "tabular only: AUC 0.610" in model_card_markdown(r2)


def test_model_card_fits_the_registry_description(built):
    _, _, _, r = built
    big = dict(r, subgroups=r["subgroups"] * 6)  # many attributes: the full card is far too long
    assert len(model_card_markdown(big)) > REGISTRY_DESCRIPTION_MAX
    card = model_card_markdown(big, REGISTRY_DESCRIPTION_MAX)
    assert len(card) <= REGISTRY_DESCRIPTION_MAX
    for kept in ("not a medical device", "## Performance on the test set", "## Known limitations"):
        assert kept in card
    short = model_card_markdown(r, 2600)
    assert len(short) <= 2600 and "Left out here for length, see report.html: Subgroups (test)" in short
    assert "## Subgroups" not in short and "## Known limitations" in short
    with pytest.raises(ValueError, match="essential"):
        model_card_markdown(r, 300)


def _which_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_which_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_renders_in_headless_chromium_offline(built, tmp_path):
    _, _, out, _ = built
    cmd = [
        _which_chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: nothing could load from a network
        "--virtual-time-budget=5000",
        "--dump-dom",
        (out / "report.html").as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    headings = re.findall(r"<h2>([^<]*)</h2>", dom)
    assert headings == [title for _, title in SECTIONS]
    assert len(re.findall(r'<img [^>]*src="data:image/png', dom)) == 8


# --------------------------------------------------------------------------- edge cases
def test_seed_protocol_repeats_cases_and_minimal_inputs(tmp_path):
    """Two seeds predict the same test cases; no validation, logits, features or attributes."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    rows = []
    for seed in ("seed0", "seed1"):
        p1 = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 40), 0.01, 0.99)
        rows.append((p1, seed))
    probs = np.concatenate([np.stack([1 - p, p], 1) for p, _ in rows])
    test = SplitPredictions(
        case_ids=[f"c{i}" for i in range(40)] * 2, labels=np.r_[y, y], probs=probs, runs=["seed0"] * 40 + ["seed1"] * 40
    )
    inputs = ReportInputs(cohort={"name": "tiny", "classes": ["NEV", "MEL"], "positive": "MEL"}, splits={"test": test})
    r = build_report(inputs, tmp_path, n_bootstrap=300)
    assert r["bootstrap"]["n_cases"] == 40 and r["counts"]["test"] == {
        "classes": {"NEV": int((y == 0).sum()), "MEL": int((y == 1).sum())},
        "patients": 40,
        "predictions": 80,
    }
    assert set(r["per_run"]["runs"]) == {"seed0", "seed1"}
    assert r["temperature"] is None and r["ece_after"] is None and r["operating_points"] == []
    assert r["subgroups"] == [] and r["missing_modality"] == {} and r["embedding"] is None
    page = (tmp_path / "report.html").read_text()
    assert "Not evaluated" in page and "needs validation and test logits" in page


def test_inputs_are_validated():
    good = synthetic_inputs(2, n_val=20, n_test=20, explanations=False)
    good.validate()
    bad = synthetic_inputs(2, n_val=20, n_test=20, explanations=False)
    bad.splits["test"].probs = bad.splits["test"].probs[:, :1]
    with pytest.raises(ValueError, match="probs has shape"):
        bad.validate()
    bad = synthetic_inputs(2, n_val=20, n_test=20, explanations=False)
    bad.splits["test"].labels[0] = 5
    with pytest.raises(ValueError, match="labels must lie"):
        bad.validate()
    bad = synthetic_inputs(2, n_val=20, n_test=20, explanations=False)
    bad.splits["test"].case_ids[1] = bad.splits["test"].case_ids[0]
    bad.splits["test"].runs[1] = bad.splits["test"].runs[0]
    with pytest.raises(ValueError, match="appears twice"):
        bad.validate()
    bad = synthetic_inputs(2, n_val=20, n_test=20, explanations=False)
    bad.cohort.positive = None
    with pytest.raises(ValueError, match="positive"):
        bad.validate()


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_atomic(target, "old")
    assert target.stat().st_mode & 0o777 == 0o644

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _split(ids, labels, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    p1 = np.clip(0.25 + 0.5 * (labels == 1) + rng.normal(0, 0.2, len(labels)), 0.01, 0.99)
    return SplitPredictions(case_ids=ids, labels=labels, probs=np.stack([1 - p1, p1], 1))


def test_subgroup_rules():
    rng = np.random.default_rng(1)
    n = 60
    test_ids, val_ids = [f"t{i}" for i in range(n)], [f"v{i}" for i in range(n)]
    y = rng.integers(0, 2, n)
    y[:20] = 0  # "site A" below holds no positive case
    attrs = {
        c: {"site": "A" if i < 20 else ("B" if i < 52 else "C"), "score": float(i)} for i, c in enumerate(test_ids)
    }
    attrs |= {c: {"score": 100.0 + i} for i, c in enumerate(val_ids)}  # validation scores 100..159
    specs = [{"column": "site", "type": "categorical"}, {"column": "score", "type": "numeric"}]
    res = subgroup_analysis(
        _split(test_ids, y), attrs, specs, ["NEV", "MEL"], "MEL", val=_split(val_ids, rng.integers(0, 2, n)), n_boot=200
    )
    site = {g["name"]: g for g in res[0]["groups"]}
    assert [g["name"] for g in res[0]["groups"]] == ["A", "B", "C"]
    assert site["A"]["reportable"] and set(site["A"]["metrics"]) == {"acc", "spe"}
    assert "no AUC: no MEL case" in site["A"]["notes"] and "no sen: no MEL case" in site["A"]["notes"]
    assert set(site["B"]["metrics"]) == {"acc", "balanced_acc", "auc", "sen", "spe"}
    assert not site["C"]["reportable"] and site["C"]["n"] == 8
    # tertiles come from validation (100..159), so every test score (0..59) falls in the lowest band
    score = res[1]
    edges = np.quantile(np.arange(100.0, 160.0), [1 / 3, 2 / 3])
    assert score["bands"]["edges"] == pytest.approx(edges) and score["bands"]["source"] == "validation tertiles"
    assert [g["n"] for g in score["groups"]] == [60, 0, 0]
    assert score["groups"][1]["notes"] == ["no test case"]
    assert math.isclose(sum(g["counts"]["MEL"] for g in score["groups"]), int(y.sum()))
