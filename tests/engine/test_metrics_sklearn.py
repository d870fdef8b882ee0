"""The one implementation of the metric set (`cfcml.engine.metrics`) against scikit-learn, the
reference, on random inputs: binary and multi-class, with tied scores, the prior hard-label
rule, bootstrap weights and the degenerate cases (one class only, an absent class, a predicted
class absent from y, empty input, probabilities that are not finite)."""

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from cfcml.engine.decision import Decision
from cfcml.engine.metrics import binary_metrics, classification_metrics, compute_metrics, multiclass_metrics
from cfcml.report import stats

NAN = math.nan
CLASSES5 = ["A", "B", "C", "D", "E"]


def _recall(y, pred, c, sample_weight=None):
    w = np.ones(len(y)) if sample_weight is None else sample_weight
    mask = y == c
    return float(np.sum(w[mask] * (pred[mask] == c)) / np.sum(w[mask])) if mask.any() else NAN


def _sk(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(*args, **kwargs))


def sklearn_binary(y, p, positive, pred, sample_weight=None):
    """The binary set by scikit-learn: NaN where a class is missing (scikit-learn raises or warns)."""
    sen, spe = _recall(y, pred, positive, sample_weight), _recall(y, pred, 1 - positive, sample_weight)
    y_pos = (y == positive).astype(int)
    both = 0 < y_pos.sum() < len(y_pos)
    kw = {"sample_weight": sample_weight}
    return {
        "sen": sen,
        "spe": spe,
        "acc": _sk(accuracy_score, y, pred, **kw) if len(y) else NAN,
        "g_mean": math.sqrt(sen * spe),
        "balanced_acc": _sk(balanced_accuracy_score, y, pred, **kw) if both else NAN,
        "auprc": _sk(average_precision_score, y_pos, p[:, positive], **kw) if both else NAN,
        "auprc_label": _sk(average_precision_score, y_pos, (pred == positive).astype(float), **kw) if both else NAN,
        "auc": _sk(roc_auc_score, y_pos, p[:, positive], **kw) if both else NAN,
    }


def sklearn_multiclass(y, p, classes, pred, sample_weight=None):
    """The multi-class set by scikit-learn: balanced accuracy over the classes in y, F1 over the
    labels in y or pred (zero_division=0), AUC the mean one-vs-rest AUC over the classes in y."""
    k = len(classes)
    if len(y) == 0:
        return {n: NAN for n in ["acc", "balanced_acc", *[f"acc_{c.lower()}" for c in classes]]} | {
            "weighted_f1": NAN,
            "macro_f1": NAN,
            "auc": NAN,
        }
    kw = {"sample_weight": sample_weight}
    present = [c for c in range(k) if (y == c).any()]
    if len(present) < 2:
        auc = NAN
    elif len(present) == k and np.allclose(p.sum(1), 1):  # scikit-learn's macro OvR needs probabilities
        auc = _sk(roc_auc_score, y, p, multi_class="ovr", average="macro", **kw)
    else:
        auc = float(np.mean([_sk(roc_auc_score, (y == c).astype(int), p[:, c], **kw) for c in present]))
    return {
        "acc": _sk(accuracy_score, y, pred, **kw),
        "balanced_acc": _sk(balanced_accuracy_score, y, pred, **kw),
        **{f"acc_{name.lower()}": _recall(y, pred, j, sample_weight) for j, name in enumerate(classes)},
        "weighted_f1": _sk(f1_score, y, pred, average="weighted", zero_division=0, **kw),
        "macro_f1": _sk(f1_score, y, pred, average="macro", zero_division=0, **kw),
        "auc": auc,
    }


def random_case(rng, k, i):
    """Labels and probabilities of one random case; i picks the kind of degeneracy."""
    n = int(rng.choice([0, 1, 2, 5, 20, 80, 300])) if i % 7 else 0
    y = rng.integers(0, k, n)
    if i % 5 == 1:
        y = np.full(n, rng.integers(0, k))  # one class only
    elif i % 5 == 2:
        y = rng.integers(0, max(1, k - 2), n)  # absent classes
    logits = rng.normal(size=(n, k)) + rng.uniform(0, 3) * np.eye(k)[y]
    if i % 4 == 0:
        logits = np.round(logits)  # tied scores
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    if i % 6 == 3:
        p = np.round(p, 1)  # ties in the probabilities and in the argmax
    if i % 5 == 3 and n:
        p[:, rng.integers(0, k)] *= 0.01  # a class (almost) never predicted
    decision = Decision("prior", tuple(int(c) for c in rng.integers(1, 60, k))) if i % 3 == 0 else None
    return y, p, decision


def assert_same(ours: dict, reference: dict, context):
    assert list(ours) == list(reference), context
    for name, ref in reference.items():
        assert isinstance(ours[name], float), (name, context)
        assert ours[name] == pytest.approx(ref, rel=0, abs=1e-12, nan_ok=True), (name, context)


@pytest.mark.parametrize("positive", [0, 1])
def test_binary_metrics_agree_with_sklearn_on_random_inputs(positive):
    rng = np.random.default_rng(100 + positive)
    for i in range(100):
        y, p, decision = random_case(rng, 2, i)
        pred = (decision or Decision()).labels(p)
        reference = sklearn_binary(y, p, positive, pred)
        assert_same(binary_metrics(y, p, positive, decision), reference, i)
        names = ["NEV", "MEL"]
        assert_same(classification_metrics(y, p, names, names[positive], decision=decision), reference, i)


@pytest.mark.parametrize("k", [3, 5])
def test_multiclass_metrics_agree_with_sklearn_on_random_inputs(k):
    rng = np.random.default_rng(200 + k)
    classes = CLASSES5[:k]
    for i in range(100):
        y, p, decision = random_case(rng, k, i)
        pred = (decision or Decision()).labels(p)
        reference = sklearn_multiclass(y, p, classes, pred)
        assert_same(multiclass_metrics(y, p, classes, decision), reference, i)
        assert_same(classification_metrics(y, p, classes, decision=decision), reference, i)


@pytest.mark.parametrize("k", [2, 4])
def test_bootstrap_weights_agree_with_sklearn_sample_weights(k):
    rng = np.random.default_rng(300 + k)
    classes = CLASSES5[:k]
    positive = classes[1] if k == 2 else None
    for i in range(20):
        y, p, _ = random_case(rng, k, 5 * i)  # every class present, no empty input
        if len(np.unique(y)) < k:
            continue
        w = rng.integers(1, 4, size=(3, len(y))).astype(float)
        batched = classification_metrics(y, p, classes, positive, weights=w)
        pred = p.argmax(1)
        for b in range(3):
            if k == 2:
                reference = sklearn_binary(y, p, 1, pred, sample_weight=w[b])
            else:
                reference = sklearn_multiclass(y, p, classes, pred, sample_weight=w[b])
            for name, ref in reference.items():
                assert batched[name][b] == pytest.approx(ref, rel=0, abs=1e-12, nan_ok=True), (name, i, b)


def test_degenerate_inputs_named_cases():
    classes = ["G1", "G2inv", "G2ninv"]
    p3 = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    # one class only: recall and accuracy defined, AUC not
    m = multiclass_metrics(np.zeros(4, int), p3, classes)
    assert m["acc"] == m["balanced_acc"] == m["acc_g1"] == 0.5
    assert math.isnan(m["auc"]) and math.isnan(m["acc_g2inv"])
    # a class never predicted and absent from y: left out of F1 (scikit-learn's labels)
    y = np.array([0, 1, 0, 1])
    m = multiclass_metrics(y, p3, classes)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p3.argmax(1), average="macro"), abs=1e-12)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p3[:, 1]), abs=1e-12)  # classes 0 and 1 present
    # a predicted class absent from y: in macro F1 with F1 0, not in balanced accuracy
    y = np.array([0, 0, 0, 1])
    pred = p3.argmax(1)
    m = multiclass_metrics(y, p3, classes)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["balanced_acc"] == pytest.approx(_sk(balanced_accuracy_score, y, pred), abs=1e-12)
    # empty input: every value NaN, binary and multi-class, through compute_metrics
    binary_spec = type("Spec", (), {"classes": ("NEV", "MEL"), "positive_index": None})()
    multi_spec = type("Spec", (), {"classes": tuple(classes), "positive_index": None})()
    for spec, k in ((binary_spec, 2), (multi_spec, 3)):
        m = compute_metrics(spec, np.zeros(0, int), np.zeros((0, k)))
        assert m and all(math.isnan(v) for v in m.values())


def test_non_finite_probabilities_give_no_auc():
    """scikit-learn refuses NaN scores; a diverged model's AUC/AUPRC is NaN, its accuracy is not."""
    rng = np.random.default_rng(5)
    y = np.arange(40) % 3
    p = rng.dirichlet(np.ones(3), size=40)
    p[7] = np.nan
    with pytest.raises(ValueError):
        roc_auc_score((y == 0).astype(int), p[:, 0])
    m = multiclass_metrics(y, p, ["a", "b", "c"])
    assert math.isnan(m["auc"]) and not math.isnan(m["acc"])
    yb = np.arange(40) % 2
    pb = rng.dirichlet(np.ones(2), size=40)
    pb[3] = np.inf
    m = binary_metrics(yb, pb)
    assert math.isnan(m["auc"]) and math.isnan(m["auprc"]) and not math.isnan(m["auprc_label"])


def test_the_report_re_exports_the_engine_implementation():
    assert stats.classification_metrics is classification_metrics
    from cfcml.engine import metrics

    assert stats.confusion is metrics.confusion and stats.average_precision is metrics.average_precision


def test_bad_shapes_and_labels_are_refused():
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        multiclass_metrics(np.zeros(3, int), np.zeros((3, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="4 samples but probs has 3"):
        binary_metrics(np.zeros(4, int), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="class indices 0..1"):
        binary_metrics(np.array([0, 2]), np.full((2, 2), 0.5))
