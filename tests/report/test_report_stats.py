"""cfcml.report.stats against scikit-learn, torchmetrics or brute-force loops on fixed inputs."""

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cfcml.engine.metrics import binary_metrics, multiclass_metrics
from cfcml.report import stats

RNG = np.random.default_rng(7)


def _scores(n, k, seed, signal=1.5, ties=False):
    """Fixed labels [n] and probabilities [n, k] that carry some signal about the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + signal * np.eye(k)[y]
    if ties:
        logits = np.round(logits)  # many tied scores
    p = np.exp(logits)
    return y, logits, p / p.sum(1, keepdims=True)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_weights_resample_cases_not_rows():
    ids = ["a", "a", "b", "c", "c", "d"]  # two runs predicted a and c
    labels = [0, 0, 1, 0, 0, 1]
    w = stats.bootstrap_weights(ids, labels, n_boot=500, seed=1)
    assert w.shape == (500, 6)
    assert np.array_equal(w[:, 0], w[:, 1]) and np.array_equal(w[:, 3], w[:, 4])  # rows of a case move together
    per_case = w[:, [0, 2, 3, 5]]
    assert np.all(per_case.sum(1) == 4)  # 4 cases drawn per resample
    # stratified: 2 cases of class 0 (a, c) and 2 of class 1 (b, d) in every resample
    assert np.all(per_case[:, [0, 2]].sum(1) == 2) and np.all(per_case[:, [1, 3]].sum(1) == 2)
    assert np.array_equal(w, stats.bootstrap_weights(ids, labels, n_boot=500, seed=1))  # seeded
    assert not np.array_equal(w, stats.bootstrap_weights(ids, labels, n_boot=500, seed=2))


def test_unstratified_bootstrap_can_lose_a_class():
    ids = [str(i) for i in range(8)]
    labels = [0] * 7 + [1]
    w = stats.bootstrap_weights(ids, labels, n_boot=400, seed=0, stratified=False)
    assert np.all(w.sum(1) == 8)
    lost = w[:, 7] == 0
    assert 0 < lost.sum() < 400  # (7/8)^8 ~ 34% of resamples have no positive case
    # ... and the metrics of those resamples are NaN, left out of the CI
    score = np.linspace(0.1, 0.9, 8)
    aucs = stats.roc_auc(np.array(labels), score, w)
    assert np.all(np.isnan(aucs[lost])) and np.all(np.isfinite(aucs[~lost]))
    lo, hi, n_valid = stats.percentile_ci(aucs)
    assert n_valid == int((~lost).sum()) and lo <= hi


def test_weights_equal_explicit_resampling():
    """A weight row is the same as repeating rows: check against scikit-learn on the repeats."""
    y, _, p = _scores(40, 2, seed=3, ties=True)
    w = stats.bootstrap_weights([str(i) for i in range(40)], y, n_boot=5, seed=0, stratified=False)
    aucs = stats.roc_auc(y, p[:, 1], w)
    aps = stats.average_precision(y, p[:, 1], w)
    for b in range(5):
        rows = np.repeat(np.arange(40), w[b].astype(int))
        assert aucs[b] == pytest.approx(roc_auc_score(y[rows], p[rows, 1]))
        assert aps[b] == pytest.approx(average_precision_score(y[rows], p[rows, 1]))


def test_percentile_ci_brute_force():
    samples = np.r_[np.arange(1000.0), np.nan]
    lo, hi, n = stats.percentile_ci(samples, 0.9)
    assert n == 1000
    assert lo == pytest.approx(np.percentile(np.arange(1000.0), 5))
    assert hi == pytest.approx(np.percentile(np.arange(1000.0), 95))


# --------------------------------------------------------------------------- ranking metrics
@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_ap_match_sklearn(ties):
    y, _, p = _scores(200, 2, seed=11, ties=ties)
    assert stats.roc_auc(y, p[:, 1]) == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert stats.average_precision(y, p[:, 1]) == pytest.approx(average_precision_score(y, p[:, 1]))
    sw = RNG.integers(0, 4, 200).astype(float)  # integer weights incl. zeros
    assert stats.roc_auc(y, p[:, 1], sw[None])[0] == pytest.approx(roc_auc_score(y, p[:, 1], sample_weight=sw))
    assert stats.average_precision(y, p[:, 1], sw[None])[0] == pytest.approx(
        average_precision_score(y, p[:, 1], sample_weight=sw)
    )


def test_ranking_metrics_nan_with_one_class():
    assert math.isnan(stats.roc_auc(np.ones(5), np.linspace(0, 1, 5)))
    assert math.isnan(stats.average_precision(np.zeros(5), np.linspace(0, 1, 5)))


def test_roc_curve_band_matches_sklearn_and_contains_curve():
    y, _, p = _scores(150, 2, seed=5)
    w = stats.bootstrap_weights([str(i) for i in range(150)], y, n_boot=300, seed=0)
    band = stats.roc_curve_band(y, p[:, 1], w)
    fpr, tpr, _ = roc_curve(y, p[:, 1], drop_intermediate=False)
    # scikit-learn also starts at (0, 0) with threshold inf
    assert np.allclose(band["fpr"], fpr) and np.allclose(band["tpr"], tpr)
    assert band["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    lo, hi = band["auc_ci"]
    assert lo < band["auc"] < hi
    inside = (band["tpr_lo"] <= band["tpr_grid"] + 1e-9) & (band["tpr_grid"] <= band["tpr_hi"] + 1e-9)
    assert inside.mean() > 0.95
    # step value on the grid: the best TPR at FPR <= g (brute force)
    for g, v in zip(band["grid"][::10], band["tpr_grid"][::10]):
        assert v == pytest.approx(tpr[fpr <= g + 1e-12].max())


def test_pr_curve_band_brute_force():
    y, _, p = _scores(120, 2, seed=8)
    w = stats.bootstrap_weights([str(i) for i in range(120)], y, n_boot=200, seed=0)
    band = stats.pr_curve_band(y, p[:, 1], w)
    assert band["ap"] == pytest.approx(average_precision_score(y, p[:, 1]))
    assert band["ap_ci"][0] < band["ap"] < band["ap_ci"][1]
    r, pr = band["recall"], band["precision"]
    for g, v in zip(band["grid"][::10], band["precision_grid"][::10]):
        assert v == pytest.approx(pr[r >= g - 1e-12].max())  # interpolated precision


# --------------------------------------------------------------------------- metric set
def test_binary_metric_set_matches_sklearn_and_engine():
    y, _, p = _scores(90, 2, seed=2)
    pred = p.argmax(1)
    m = stats.classification_metrics(y, p, ["NEV", "MEL"], "MEL")
    assert list(m) == stats.metric_names(["NEV", "MEL"])
    sen, spe = recall_score(y, pred, pos_label=1), recall_score(y, pred, pos_label=0)
    assert m["sen"] == pytest.approx(sen) and m["spe"] == pytest.approx(spe)
    assert m["acc"] == pytest.approx(accuracy_score(y, pred))
    assert m["g_mean"] == pytest.approx(math.sqrt(sen * spe))
    assert m["auprc_label"] == pytest.approx(average_precision_score(y, pred))
    engine = binary_metrics(y, p, positive=1)
    for k in engine:
        assert m[k] == pytest.approx(engine[k])
    # the positive class may be index 0: metrics are those of the flipped problem
    flipped = stats.classification_metrics(1 - y, p[:, ::-1], ["MEL", "NEV"], "MEL")
    for k in m:
        assert flipped[k] == pytest.approx(m[k])


def test_multiclass_metric_set_matches_sklearn_and_engine():
    y, _, p = _scores(120, 3, seed=4, signal=1.0)
    classes = ["G1", "G2inv", "G2ninv"]
    m = stats.classification_metrics(y, p, classes)
    assert list(m) == ["acc", "balanced_acc", "acc_g1", "acc_g2inv", "acc_g2ninv", "weighted_f1", "macro_f1", "auc"]
    engine = multiclass_metrics(y, p, classes)
    for k in engine:
        assert m[k] == pytest.approx(engine[k])
    pred = p.argmax(1)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    # a class never predicted and absent: sklearn's labels = present in y or prediction
    keep = (y != 2) & (pred != 2)
    m2 = stats.classification_metrics(y[keep], p[keep], classes)
    assert m2["macro_f1"] == pytest.approx(f1_score(y[keep], pred[keep], average="macro"))
    assert math.isnan(m2["acc_g2ninv"])


def test_metric_set_weights_match_repeated_rows():
    y, _, p = _scores(60, 3, seed=9)
    classes = ["a", "b", "c"]
    w = stats.bootstrap_weights([str(i) for i in range(60)], y, n_boot=4, seed=3)
    batched = stats.classification_metrics(y, p, classes, None, w)
    for b in range(4):
        rows = np.repeat(np.arange(60), w[b].astype(int))
        single = stats.classification_metrics(y[rows], p[rows], classes)
        for k in single:
            assert batched[k][b] == pytest.approx(single[k])


@pytest.mark.parametrize("k", [2, 3])
def test_metrics_with_ci_contain_point(k):
    y, _, p = _scores(150, k, seed=12)
    classes = [f"c{i}" for i in range(k)]
    positive = "c1" if k == 2 else None
    w = stats.bootstrap_weights([str(i) for i in range(150)], y, n_boot=2000, seed=0)
    res = stats.metrics_with_ci(y, p, classes, positive, w)
    for name, r in res.items():
        lo, hi = r["ci"]
        assert lo <= r["value"] <= hi, name
        assert hi - lo < 0.35, name
        assert r["n_valid"] == 2000


# --------------------------------------------------------------------------- calibration
def _brute_force_ece(conf, outcome, n_bins):
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = [(c, o) for c, o in zip(conf, outcome) if (lo < c <= hi) or (b == 0 and c == 0)]
        if inside:
            cs, os_ = zip(*inside)
            total += len(inside) / len(conf) * abs(np.mean(os_) - np.mean(cs))
    return total


def test_ece_matches_brute_force_and_torchmetrics():
    torch = pytest.importorskip("torch")
    from torchmetrics.functional.classification import multiclass_calibration_error

    y, _, p = _scores(300, 3, seed=21)
    ece = stats.expected_calibration_error(y, p, n_bins=15)
    correct = (p.argmax(1) == y).astype(float)
    assert ece == pytest.approx(_brute_force_ece(p.max(1), correct, 15))
    tm = multiclass_calibration_error(torch.tensor(p), torch.tensor(y), num_classes=3, n_bins=15, norm="l1")
    assert ece == pytest.approx(float(tm), abs=1e-6)
    # values exactly on bin edges go to the lower bin: (lo, hi]
    p_edge = np.array([[0.6, 0.4], [0.6, 0.4], [0.8, 0.2]])
    assert stats.expected_calibration_error([0, 1, 0], p_edge, n_bins=5) == pytest.approx(
        _brute_force_ece([0.6, 0.6, 0.8], [1, 0, 1], 5)
    )


def test_positive_class_ece_matches_sklearn_calibration_curve():
    y, _, p = _scores(400, 2, seed=22)
    frac_pos, mean_pred = calibration_curve(y, p[:, 1], n_bins=10, strategy="uniform")
    counts = np.histogram(p[:, 1], bins=np.linspace(0, 1, 11))[0]
    counts = counts[counts > 0]
    expected = np.sum(counts / counts.sum() * np.abs(frac_pos - mean_pred))
    assert stats.positive_class_ece(y, p, 1, n_bins=10) == pytest.approx(expected)


def test_brier_matches_sklearn():
    y, _, p = _scores(100, 3, seed=23)
    assert stats.brier_score(y, p) == pytest.approx(brier_score_loss(y, p))
    yb, _, pb = _scores(100, 2, seed=24)
    assert stats.brier_score(yb, pb) == pytest.approx(2 * brier_score_loss(yb, pb[:, 1]))


def test_reliability_table_counts_and_means():
    y, _, p = _scores(200, 3, seed=25)
    t = stats.reliability_table(y, p, n_bins=10)
    assert t["count"].sum() == 200 and t["count"][:3].sum() == 0  # max prob of 3 classes >= 1/3
    conf = p.max(1)
    b = 7  # (0.7, 0.8]
    inside = (conf > 0.7) & (conf <= 0.8)
    assert t["count"][b] == inside.sum()
    assert t["confidence"][b] == pytest.approx(conf[inside].mean())
    assert t["accuracy"][b] == pytest.approx((p.argmax(1) == y)[inside].mean())


def test_temperature_recovers_known_scale_and_beats_grid():
    # labels drawn from softmax(z): calibrated at T=1; the model outputs 3 z -> best T near 3
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 3)) * 1.5
    pz = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in pz])
    t = stats.fit_temperature(3 * z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    grid = np.linspace(0.5, 6, 2000)
    best = grid[np.argmin([stats.nll(3 * z, y, g) for g in grid])]
    assert t == pytest.approx(best, abs=0.01)
    assert stats.nll(3 * z, y, t) <= stats.nll(3 * z, y, best) + 1e-9
    after = stats.apply_temperature(3 * z, t)
    assert np.allclose(after.sum(1), 1)
    assert stats.expected_calibration_error(y, after) < stats.expected_calibration_error(
        y, stats.apply_temperature(3 * z, 1.0)
    )


# --------------------------------------------------------------------------- operating points
def _brute_force_threshold(y, score, kind, target):
    best = None
    for t in sorted(set(score.tolist()) | {np.nextafter(score.max(), np.inf)}):
        sen = np.mean(score[y == 1] >= t)
        spe = np.mean(score[y == 0] < t)
        ok = spe >= target if kind == "sen_at_spe" else sen >= target
        key = (sen, spe) if kind == "sen_at_spe" else (spe, sen)
        if ok and (best is None or key > best[0]):
            best = (key, t, sen, spe)
    return best[1:]


@pytest.mark.parametrize("kind,target", stats.OPERATING_TARGETS)
@pytest.mark.parametrize("ties", [False, True])
def test_choose_threshold_brute_force(kind, target, ties):
    y, _, p = _scores(80, 2, seed=31, ties=ties)
    got = stats.choose_threshold(y, p[:, 1], kind, target)
    t, sen, spe = _brute_force_threshold(y, p[:, 1], kind, target)
    assert got["threshold"] == t and got["sen"] == pytest.approx(sen) and got["spe"] == pytest.approx(spe)
    assert (got["spe"] if kind == "sen_at_spe" else got["sen"]) >= target


def test_choose_threshold_without_a_class():
    assert stats.choose_threshold(np.ones(4), np.arange(4.0), "sen_at_spe", 0.9)["threshold"] is None


def test_rates_at_threshold_brute_force():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    s = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.5, 0.5])
    r = stats.rates_at_threshold(y, s, 0.5)  # positives called: .9 .6 .7 .5 .5 -> tp 3, fp 2, fn 1, tn 2
    assert (r["sen"], r["spe"], r["ppv"], r["npv"]) == pytest.approx((3 / 4, 2 / 4, 3 / 5, 2 / 3))


@pytest.mark.parametrize("k", [2, 3])
def test_operating_points_chosen_on_val_reported_on_test(k):
    yv, _, pv = _scores(200, k, seed=41)
    yt, _, pt = _scores(150, k, seed=42)
    classes = [f"c{i}" for i in range(k)]
    positive = "c1" if k == 2 else None
    w = stats.bootstrap_weights([str(i) for i in range(150)], yt, n_boot=500, seed=0)
    ops = stats.operating_points(yv, pv, yt, pt, classes, positive, w)
    assert len(ops) == 4 * (1 if k == 2 else k)
    for op in ops:
        j = classes.index(op["class"])
        chosen = stats.choose_threshold(yv == j, pv[:, j], op["kind"], op["target"])
        assert op["threshold"] == chosen["threshold"]  # from validation ...
        on_test = stats.rates_at_threshold(yt == j, pt[:, j], op["threshold"])
        for m, r in op["test"].items():  # ... reported on test
            assert r["value"] == pytest.approx(on_test[m])
            assert r["ci"][0] <= r["value"] <= r["ci"][1]
    if k == 2:
        assert {op["class"] for op in ops} == {"c1"}


def test_report_and_engine_name_per_class_metrics_alike_for_any_class_name():
    """The report's metrics carry the same names as a run's metrics.json, also for class
    names that are not plain ASCII words (one definition of the names, in cfcml.util)."""
    from cfcml.engine.metrics import multiclass_metrics

    classes = ["Grade I", "Grade_II", "Méningiome", "病例"]
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    probs = rng.dirichlet(np.ones(4), size=40)
    report = stats.classification_metrics(labels, probs, classes)
    engine = multiclass_metrics(labels, probs, classes)
    assert list(report) == list(engine) == stats.metric_names(classes)
    assert {"acc_grade_i", "acc_grade_ii", "acc_méningiome", "acc_病例"} <= set(report)
