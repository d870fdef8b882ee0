"""Paired AUC tests on patients (cfcml.engine.paired): DeLong against a brute-force reference,
its known properties, and the paired bootstrap's coverage on a simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from cfcml.engine.metrics import multiclass_metrics
from cfcml.engine.paired import compare_auc, delong_test, macro_auc, paired_bootstrap_auc


def _binormal(rng, n, shift_a=1.5, shift_b=0.5, rho=0.5):
    """Two correlated scores of the same patients; each marginal is N(shift * y, 1)."""
    y = (rng.random(n) < 0.4).astype(int)
    common = rng.standard_normal(n)
    noise_a = np.sqrt(rho) * common + np.sqrt(1 - rho) * rng.standard_normal(n)
    noise_b = np.sqrt(rho) * common + np.sqrt(1 - rho) * rng.standard_normal(n)
    return y, shift_a * y + noise_a, shift_b * y + noise_b


def _brute_force_delong(y, a, b):
    """DeLong (1988) by its definition: psi(X, Y) = 1 if X > Y, 1/2 if equal, 0 otherwise."""

    def components(s):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = components(a), components(b)
    m, n = len(v10_a), len(v01_a)
    s10, s01 = np.cov(np.vstack([v10_a, v10_b])), np.cov(np.vstack([v01_a, v01_b]))
    s = s10 / m + s01 / n
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    return auc_a - auc_b, np.sqrt(var)


def test_delong_matches_the_brute_force_definition_with_ties():
    rng = np.random.default_rng(0)
    y, a, b = _binormal(rng, 80)
    a, b = np.round(a, 1), np.round(b, 1)  # ties within and across classes
    result = delong_test(y, a, b)
    diff, se = _brute_force_delong(y, a, b)
    assert result["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert result["difference"] == pytest.approx(diff)
    assert result["se"] == pytest.approx(se)
    assert result["p"] == pytest.approx(2 * norm.sf(abs(diff / se)))


def test_delong_standard_error_agrees_with_the_bootstrap_spread():
    rng = np.random.default_rng(1)
    y, a, b = _binormal(rng, 400)
    probs = lambda s: np.c_[1 - s, s]
    boot = paired_bootstrap_auc(y, probs(a), probs(b), n_boot=2000, seed=3)
    d = delong_test(y, a, b)
    # the bootstrap CI's half-width is about 1.96 DeLong standard errors
    assert (boot["ci"][1] - boot["ci"][0]) / 2 == pytest.approx(1.96 * d["se"], rel=0.2)
    assert boot["difference"] == pytest.approx(d["difference"])


def test_identical_predictions_give_no_difference_and_p_one():
    rng = np.random.default_rng(2)
    y, a, _ = _binormal(rng, 100)
    probs = np.c_[1 - 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-a))]
    d = delong_test(y, a, a)
    assert d["difference"] == 0 and d["p"] == 1.0
    result = compare_auc(y, probs, probs.copy())
    assert result["difference"] == 0 and result["p"] == 1.0 and result["p_bootstrap"] == 1.0
    assert result["ci"] == [0.0, 0.0] and result["test"] == "DeLong"


def test_a_clearly_better_model_gets_a_small_p_and_a_ci_above_zero():
    rng = np.random.default_rng(3)
    y, a, b = _binormal(rng, 300, shift_a=2.0, shift_b=0.3)
    probs = lambda s: np.c_[-s, s]
    result = compare_auc(y, probs(a), probs(b), n_boot=1000)
    assert result["p"] < 1e-4 and result["ci"][0] > 0
    reverse = compare_auc(y, probs(b), probs(a), n_boot=1000)
    assert reverse["difference"] == pytest.approx(-result["difference"]) and reverse["ci"][1] < 0


def test_the_paired_bootstrap_ci_covers_the_true_difference():
    """Binormal scores with unit variance: each model's AUC is Phi(shift / sqrt(2)) exactly."""
    true = norm.cdf(1.2 / np.sqrt(2)) - norm.cdf(0.8 / np.sqrt(2))
    rng = np.random.default_rng(4)
    covered_boot = covered_delong = 0
    trials = 60
    for t in range(trials):
        y, a, b = _binormal(rng, 200, shift_a=1.2, shift_b=0.8)
        result = compare_auc(y, np.c_[-a, a], np.c_[-b, b], n_boot=400, seed=t)
        covered_boot += result["ci"][0] <= true <= result["ci"][1]
        covered_delong += result["delong"]["ci"][0] <= true <= result["delong"]["ci"][1]
    assert covered_boot >= 0.85 * trials and covered_delong >= 0.85 * trials  # nominal 95 %
    assert covered_boot < trials  # the interval is not trivially wide


def test_multiclass_uses_the_macro_one_vs_rest_auc_with_a_bootstrap_p():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 240)
    good = np.eye(3)[y] * 2.0 + rng.standard_normal((240, 3))
    poor = np.eye(3)[y] * 0.3 + rng.standard_normal((240, 3))
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)
    classes = ["a", "b", "c"]
    assert macro_auc(y, softmax(good)) == pytest.approx(multiclass_metrics(y, softmax(good), classes)["auc"])
    result = compare_auc(y, softmax(good), softmax(poor), n_boot=500)
    assert result["test"] == "paired bootstrap" and "delong" not in result
    assert result["p"] < 0.01 and result["ci"][0] > 0
    same = compare_auc(y, softmax(good), softmax(good), n_boot=200)
    assert same["difference"] == 0 and same["p"] == 1.0


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        paired_bootstrap_auc([0, 1, 0], np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="binary labels"):
        delong_test([0, 1, 2], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


@pytest.mark.parametrize("unit, words", [("folds", "the fold that tested it"), ("seeds", "over the seeds")])
def test_the_evidence_table_says_how_patients_were_pooled_for_its_protocol(unit, words):
    from cfcml.engine.evidence import POOLING, evidence_markdown

    pair = {"a": "CFCML", "b": "LogReg (attributes)", "auc_a": 0.8, "auc_b": 0.7, "difference": 0.1}
    pair |= {"ci": (0.02, 0.18), "p": 0.01, "test": "DeLong", "wilcoxon_p_auc": 0.25}
    text = evidence_markdown({"pairs": [pair], "images_add": None}, unit)
    assert words in text and all(other not in text for u, other in POOLING.items() if u != unit)
    assert f"p (Wilcoxon over {unit})" in text
