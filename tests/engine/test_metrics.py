"""Tests for cfcml.engine.metrics and cfcml.engine.summary.

Expected values are computed independently with scikit-learn / numpy / scipy on small
fixed arrays, so every assertion can fail if the implementation is wrong.
"""

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    recall_score,
    roc_auc_score,
)

from cfcml.datasets.spec import load_spec, spec_from_dict
from cfcml.engine.metrics import binary_metrics, compute_metrics, metric_names, multiclass_metrics
from cfcml.engine.summary import markdown_table, summarize_runs, wilcoxon_compare

MEN, DERM = load_spec("men"), load_spec("derm7pt")
METRIC_NAMES = {"men": metric_names(MEN.classes), "derm7pt": metric_names(DERM.classes)}
PAPER_RESULTS = {"men": MEN.paper["metrics"], "derm7pt": DERM.paper["metrics"]}


def men_metrics(y, p):
    return multiclass_metrics(y, p, MEN.classes)


def derm7pt_metrics(y, p):
    return binary_metrics(y, p, positive=1)


# --- fixed MEN example: 10 samples, 3 classes, some errors in every class -------------
MEN_Y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
MEN_P = np.array(
    [
        [0.80, 0.10, 0.10],
        [0.60, 0.30, 0.10],
        [0.30, 0.50, 0.20],  # G1 -> G2inv (error)
        [0.50, 0.20, 0.30],
        [0.20, 0.70, 0.10],
        [0.40, 0.35, 0.25],  # G2inv -> G1 (error)
        [0.10, 0.60, 0.30],
        [0.20, 0.20, 0.60],
        [0.10, 0.45, 0.45],  # tie -> argmax picks G2inv (error)
        [0.25, 0.25, 0.50],
    ]
)

# --- fixed Derm7pt example: 10 samples, 4 MEL -----------------------------------------
DERM_Y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
DERM_P1 = np.array([0.10, 0.20, 0.70, 0.30, 0.40, 0.05, 0.90, 0.60, 0.35, 0.20])
DERM_P = np.stack([1 - DERM_P1, DERM_P1], axis=1)


def test_men_metrics_match_sklearn():
    m = men_metrics(MEN_Y, MEN_P)
    pred = MEN_P.argmax(1)
    recalls = recall_score(MEN_Y, pred, average=None)
    assert set(m) == set(METRIC_NAMES["men"])
    assert m["acc"] == pytest.approx(accuracy_score(MEN_Y, pred))
    assert m["acc_g1"] == pytest.approx(recalls[0])
    assert m["acc_g2inv"] == pytest.approx(recalls[1])
    assert m["acc_g2ninv"] == pytest.approx(recalls[2])
    assert m["weighted_f1"] == pytest.approx(f1_score(MEN_Y, pred, average="weighted"))
    assert m["macro_f1"] == pytest.approx(f1_score(MEN_Y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(MEN_Y, MEN_P, multi_class="ovr", average="macro"))
    # hand check of the per-class accuracy on this example: 3/4, 2/3, 2/3
    assert (m["acc_g1"], m["acc_g2inv"], m["acc_g2ninv"]) == pytest.approx((0.75, 2 / 3, 2 / 3))
    assert all(0.0 <= v <= 1.0 for v in m.values())


def test_men_metrics_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    m_np = men_metrics(MEN_Y, MEN_P)
    m_t = men_metrics(torch.tensor(MEN_Y), torch.tensor(MEN_P, dtype=torch.float32))
    for k in m_np:
        assert m_t[k] == pytest.approx(m_np[k], abs=1e-6)


def test_men_absent_class():
    keep = MEN_Y != 2  # drop every G2ninv sample
    y, p = MEN_Y[keep], MEN_P[keep]
    m = men_metrics(y, p)
    assert math.isnan(m["acc_g2ninv"])
    assert not math.isnan(m["acc_g1"]) and not math.isnan(m["acc_g2inv"])
    # AUC = mean of the one-vs-rest AUCs of the present classes
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)])
    assert m["auc"] == pytest.approx(expected)


def test_men_single_class_and_empty_do_not_crash():
    m = men_metrics(np.zeros(3, int), MEN_P[:3])
    assert math.isnan(m["auc"]) and math.isnan(m["acc_g2inv"])
    assert m["acc"] == pytest.approx(accuracy_score(np.zeros(3), MEN_P[:3].argmax(1)))
    m = men_metrics(np.zeros(0, int), np.zeros((0, 3)))
    assert all(math.isnan(v) for v in m.values())


def test_derm7pt_metrics_match_sklearn():
    m = derm7pt_metrics(DERM_Y, DERM_P)
    pred = DERM_P.argmax(1)
    sen = recall_score(DERM_Y, pred, pos_label=1)
    spe = recall_score(DERM_Y, pred, pos_label=0)
    assert set(m) == set(METRIC_NAMES["derm7pt"])
    assert m["sen"] == pytest.approx(sen)
    assert m["spe"] == pytest.approx(spe)
    assert m["acc"] == pytest.approx(accuracy_score(DERM_Y, pred))
    assert m["g_mean"] == pytest.approx(math.sqrt(sen * spe))
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(DERM_Y, pred))
    assert m["auprc"] == pytest.approx(average_precision_score(DERM_Y, DERM_P1))
    assert m["auc"] == pytest.approx(roc_auc_score(DERM_Y, DERM_P1))
    # AUPRC is on probabilities; auprc_label (the paper's definition) on hard labels; they differ here
    assert m["auprc_label"] == pytest.approx(average_precision_score(DERM_Y, pred))
    assert m["auprc"] != pytest.approx(m["auprc_label"])


def test_derm7pt_absent_positive():
    y = np.zeros(4, int)
    m = derm7pt_metrics(y, DERM_P[:4])
    assert math.isnan(m["sen"]) and math.isnan(m["g_mean"]) and math.isnan(m["balanced_acc"])
    assert math.isnan(m["auc"]) and math.isnan(m["auprc"])
    assert m["spe"] == pytest.approx(recall_score(y, DERM_P[:4].argmax(1), pos_label=0))


def test_compute_metrics_follows_the_class_count():
    assert compute_metrics(MEN, MEN_Y, MEN_P) == men_metrics(MEN_Y, MEN_P)
    assert compute_metrics(DERM, DERM_Y, DERM_P) == derm7pt_metrics(DERM_Y, DERM_P)
    for ds, names in METRIC_NAMES.items():
        assert set(PAPER_RESULTS[ds]) <= set(names)
        assert all(0.0 < v < 1.0 for v in PAPER_RESULTS[ds].values())
    # a binary cohort whose positive class is listed first: SEN is the recall of class 0
    flipped = spec_from_dict({**DERM.to_dict(), "classes": ["MEL", "NEV"], "positive": "MEL"}, "test")
    m = compute_metrics(flipped, 1 - DERM_Y, DERM_P[:, ::-1])
    assert m == pytest.approx(derm7pt_metrics(DERM_Y, DERM_P))
    # four classes: per-class accuracy named after each class
    names = metric_names(("LGG", "HGG II", "HGG-III", "GBM"))
    assert names == [
        "acc",
        "balanced_acc",
        "acc_lgg",
        "acc_hgg_ii",
        "acc_hgg_iii",
        "acc_gbm",
        "weighted_f1",
        "macro_f1",
        "auc",
    ]


def _runs(values_by_metric, names=("fold0", "fold1", "fold2")):
    return [{"name": n, "metrics": {k: v[i] for k, v in values_by_metric.items()}} for i, n in enumerate(names)]


def test_summarize_runs_matches_numpy():
    vals = {"acc": [0.90, 0.95, 0.80], "auc": [0.97, float("nan"), 0.99]}
    s = summarize_runs(_runs(vals))
    assert s["metrics"]["acc"]["mean"] == pytest.approx(np.mean(vals["acc"]))
    assert s["metrics"]["acc"]["std"] == pytest.approx(np.std(vals["acc"], ddof=1))
    assert s["metrics"]["auc"]["mean"] == pytest.approx(np.nanmean(vals["auc"]))
    assert s["metrics"]["auc"]["std"] == pytest.approx(np.nanstd(vals["auc"], ddof=1))
    assert len(s["runs"]) == 3
    one = summarize_runs(_runs({"acc": [0.7]}, names=("seed0",)))
    assert one["metrics"]["acc"] == {"mean": pytest.approx(0.7), "std": 0.0}


def test_markdown_table_men_headers_and_values():
    vals = {n: [0.9, 0.8, 0.85] for n in METRIC_NAMES["men"]}
    vals["auc"] = [0.99, 0.97, 0.98]
    s = summarize_runs(_runs(vals))
    pvals = {n: 0.25 for n in METRIC_NAMES["men"]}
    md = markdown_table(s, MEN, title="MEN test", pvalues=pvals)
    lines = md.strip().splitlines()
    assert lines[0] == "### MEN test"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["Method", "ACC", "BA", "ACC_G1", "ACC_G2inv", "ACC_G2ninv", "W-F1", "M-F1", "AUC"]
    ours = [c.strip() for c in lines[4].strip("|").split("|")]
    auc_mean, auc_std = 100 * np.mean(vals["auc"]), 100 * np.std(vals["auc"], ddof=1)
    assert ours[-1] == f"{auc_mean:.2f} ± {auc_std:.2f}"
    paper = [c.strip() for c in lines[5].strip("|").split("|")]
    assert paper[1] == f"{100 * PAPER_RESULTS['men']['acc']:.2f}"
    pv = [c.strip() for c in lines[6].strip("|").split("|")]
    assert pv[1:] == ["0.250"] * 8


def test_markdown_table_derm7pt_headers_without_paper():
    s = summarize_runs(_runs({n: [0.5, 0.6, 0.7] for n in METRIC_NAMES["derm7pt"]}))
    md = markdown_table(s, DERM, include_paper=False)
    lines = md.strip().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["Method", "SEN", "SPE", "ACC", "G-Mean", "BA", "AUPRC", "AUPRC (labels)", "AUC"]
    assert len(lines) == 5  # title, blank, header, separator, one method row
    assert "3 seeds" in lines[0]


def test_markdown_table_puts_the_papers_auprc_under_auprc_label_with_a_footnote():
    s = summarize_runs(_runs({n: [0.5, 0.6, 0.7] for n in METRIC_NAMES["derm7pt"]}))
    lines = markdown_table(s, DERM).strip().splitlines()
    paper = [c.strip() for c in lines[5].strip("|").split("|")]
    assert paper[6] == "n/a" and paper[7] == "66.07"  # AUPRC | AUPRC (labels)
    assert "hard predictions" in lines[-1] and "AUPRC (labels)" in lines[-1]


def test_wilcoxon_compare_matches_scipy():
    names = [f"seed{i}" for i in range(6)]
    a = [0.91, 0.88, 0.93, 0.90, 0.87, 0.92]
    b = [0.89, 0.85, 0.94, 0.86, 0.80, 0.90]
    sa = summarize_runs(_runs({"auc": a, "acc": a}, names))
    # b's runs listed in a different order: pairing must go by name, not position
    sb = summarize_runs(_runs({"auc": b, "acc": a}, names)[::-1])
    p = wilcoxon_compare(sa, sb)
    assert p["auc"] == pytest.approx(wilcoxon(a, b).pvalue)
    assert math.isnan(p["acc"])  # identical values: no nonzero difference


def test_wilcoxon_three_folds_floor():
    sa = summarize_runs(_runs({"auc": [0.9, 0.91, 0.92]}))
    sb = summarize_runs(_runs({"auc": [0.8, 0.82, 0.83]}))
    assert wilcoxon_compare(sa, sb)["auc"] == pytest.approx(0.25)


def test_wilcoxon_mismatched_runs_raise():
    sa = summarize_runs(_runs({"auc": [0.9, 0.91, 0.92]}))
    sb = summarize_runs(_runs({"auc": [0.8, 0.82, 0.83]}, names=("fold0", "fold1", "fold9")))
    with pytest.raises(ValueError, match="fold2.*fold9"):
        wilcoxon_compare(sa, sb)
