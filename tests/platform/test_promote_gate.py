"""The promotion gate compares like with like (the artifact's own metric, same patients, same
protocol) and stays consistent under concurrency: two `cfcml promote` processes at once, two
registrations of the same model name at once, against a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import uuid

import pytest

from cfcml.config import build_config
from cfcml.platform.protocol_digest import (
    PROTOCOL_DIGEST_KEY,
    PROTOCOL_KEY,
    fields_digest,
    protocol_differences,
    protocol_digest,
    protocol_fields,
    protocol_record,
)
from cfcml.platform.registry import (
    CHAMPION,
    Measurement,
    PromotionError,
    Protocol,
    audit_trail,
    check_gate_metric,
    differences,
    gate_value,
    judge,
    lock_name,
    metric_spec,
    parse_evaluation,
    parse_protocol,
    promote,
)
from tests.platform.test_registry import IDS, PROTOCOL, version

RUNS = [{"name": "fold1", "fold": 1}, {"name": "fold2", "fold": 2}, {"name": "fold3", "fold": 3}]

# --------------------------------------------------------------------------- no server


@pytest.mark.parametrize("metric", ["val_auc", "cv_val_auc", "best_cv_val_auc", "VAL_AUC", "cv_val_auc_epoch"])
def test_the_search_maximum_is_never_the_gate_metric(metric):
    with pytest.raises(PromotionError, match="search's maximum.*can never be the gate metric.*--metric auc"):
        check_gate_metric(metric)


@pytest.mark.parametrize(
    ("metric", "match"),
    [
        ("test_auc_mean", "member runs.*--metric auc"),
        ("test_auc", "member runs.*--metric auc"),
        ("test_brier_mean", "member runs.*--metric brier"),
        ("fold1/val_auc", "a member run's metric"),
    ],
)
def test_member_metrics_are_not_gate_metrics(metric, match):
    with pytest.raises(PromotionError, match=match):
        check_gate_metric(metric)


def test_plain_metrics_are_gate_metrics():
    assert [check_gate_metric(m) for m in ("auc", "balanced_acc", "brier", "acc_G2inv", "dice")] == [
        "auc",
        "balanced_acc",
        "brier",
        "acc_G2inv",
        "dice",
    ]


def test_protocol_digest_covers_the_protocol_and_nothing_else():
    base = build_config("men-smoke")
    digest = protocol_digest(base, RUNS, holdout=0.2)
    assert protocol_digest(base, [r["name"] for r in reversed(RUNS)], holdout=0.2) == digest  # names, any order
    # the default minimum epoch (-1: the warm-up length) is the same protocol as its explicit value
    warmup = base.train.warmup_epochs
    assert protocol_digest(build_config("men-smoke", [f"train.select_min_epoch={warmup}"]), RUNS, 0.2) == digest
    assert protocol_digest(build_config("men-smoke", ["train.lr=0.01", "loss.tau=0.1"]), RUNS, 0.2) == digest
    changed = {
        "data.val_fraction": (["data.val_fraction=0.3"], RUNS, 0.2),
        "train.epochs": (["train.epochs=7"], RUNS, 0.2),
        "train.select_window": (["train.select_window=2"], RUNS, 0.2),
        "train.select_min_epoch": ([f"train.select_min_epoch={warmup + 1}"], RUNS, 0.2),
        "data.image_size": (["data.image_size=[16,32,48]"], RUNS, 0.2),
        "holdout": ([], RUNS, 0.0),
        "runs": ([], RUNS[:2], 0.2),
    }
    a = protocol_fields(base, RUNS, 0.2)
    for key, (overrides, runs, holdout) in changed.items():
        cfg = build_config("men-smoke", overrides)
        assert protocol_digest(cfg, runs, holdout) != digest, key
        diffs = protocol_differences(a, protocol_fields(cfg, runs, holdout))
        assert [d.split(" ")[0] for d in diffs] == [key], diffs
    assert protocol_differences(a, a | {"train.epochs": 30}) == [f"train.epochs {a['train.epochs']} vs 30"]
    record = protocol_record(base, RUNS, 0.2)
    assert record["cfcml.protocol_digest"] == digest and '"train.epochs"' in record["cfcml.protocol"]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "is not a JSON object"),
        ({"kind": "cv", "ids": ["a"], "data_digest": "d", "metrics": {}}, r"'kind' is 'cv'; expected one of holdout"),
        ({"kind": "holdout", "ids": "a,b", "data_digest": "d", "metrics": {}}, "'ids' must be a list"),
        ({"kind": "holdout", "ids": ["a", "a"], "data_digest": "d", "metrics": {}}, "'ids' lists 'a' more than once"),
        ({"kind": "holdout", "ids": [], "data_digest": "d", "metrics": {}}, "'ids' is empty"),
        ({"kind": "holdout", "ids": ["a"], "metrics": {}}, "'data_digest' must be a non-empty string"),
        (
            {"kind": "holdout", "ids": ["a"], "data_digest": "d", "metrics": {"auc": "0.9"}},
            r"metrics\['auc'\] is '0.9'",
        ),
    ],
)
def test_a_malformed_evaluation_is_named(doc, match):
    with pytest.raises(PromotionError, match=f"v9: evaluation.json.*{match}"):
        parse_evaluation(doc, "v9")


def test_the_gate_reads_what_a_study_ships():
    from cfcml.engine.splits import ids_digest
    from cfcml.platform import artifact_eval
    from cfcml.platform.pyfunc import PACKAGE_ARTIFACT
    from cfcml.platform.registry import EVALUATION_FILE, EVALUATION_PATHS, KINDS

    assert EVALUATION_PATHS[0] == f"artifacts/{PACKAGE_ARTIFACT}/{artifact_eval.EVALUATION_FILE}"
    assert EVALUATION_FILE == artifact_eval.EVALUATION_FILE and KINDS == artifact_eval.KINDS
    e = parse_evaluation({"kind": "holdout", "ids": ["b", "a"], "data_digest": "d", "metrics": {}}, "x")
    assert e.ids_digest == ids_digest(["a", "b"])  # the digest registration tags as evaluation.ids_digest


def _measurement(value, *, ids=("a", "b"), kind="holdout", data="d", protocol=None):
    fields = PROTOCOL if protocol is None else protocol
    evaluation = parse_evaluation({"kind": kind, "ids": list(ids), "data_digest": data, "metrics": {"auc": value}}, "x")
    return Measurement(value, evaluation, Protocol(fields_digest(fields), fields))


def test_the_gate_rules_are_pure_functions_of_the_measurements():
    auc, brier = metric_spec("auc"), metric_spec("brier")
    champ = _measurement(0.7)
    same = {"spec": auc, "label": "m v2", "champ_label": "champion m v1", "champion_version": "1"}
    assert judge(_measurement(0.8, ids=("b", "a")), champ, **same).promote  # ids in any order: like with like
    refused = judge(_measurement(0.7), champ, **same)  # equal is not strictly better
    assert not refused.promote and refused.champion is champ
    assert refused.message == (
        "refused: m v2 auc=0.7 is not better than champion v1 auc=0.7 (higher is better, holdout, 2 patients); "
        "champion unchanged"
    )
    lower = judge(_measurement(1.2), _measurement(1.5), **same | {"spec": brier})
    assert (
        lower.promote
        and "lower is better" in judge(_measurement(1.5), _measurement(1.2), **same | {"spec": brier}).message
    )
    other = _measurement(0.9, ids=("a", "c"), kind="test_split", data="e", protocol=PROTOCOL | {"train.epochs": 80})
    found = differences(other, champ)
    assert [d.split(" ")[0] for d in found] == ["evaluation", "patients:", "data:", "protocol:"]
    assert "1 only in the candidate, 1 only in the champion" in found[1] and "train.epochs 80 vs 50" in found[3]
    with pytest.raises(PromotionError, match=r"m v2 and champion m v1 were not measured alike — evaluation kind"):
        judge(other, champ, **same)


def test_a_gate_value_is_the_artifacts_own_valid_metric():
    doc = {"kind": "holdout", "ids": ["a"], "data_digest": "d", "metrics": {"auc": 0.8, "brier": 1.7}}
    assert gate_value(parse_evaluation(doc, "v1"), metric_spec("auc"), "v1") == 0.8
    assert gate_value(parse_evaluation(doc, "v1"), metric_spec("brier"), "v1") == 1.7  # multi-class: [0, 2]
    with pytest.raises(PromotionError, match=r"v1: its evaluation.json has no metric 'acc' \(it has: auc, brier\)"):
        gate_value(parse_evaluation(doc, "v1"), metric_spec("acc"), "v1")
    with pytest.raises(PromotionError, match="v1 has no test metric of its own.*'out_of_fold'"):
        gate_value(parse_evaluation(doc | {"kind": "out_of_fold"}, "v1"), metric_spec("auc"), "v1")
    with pytest.raises(PromotionError, match=r"brier = 2.5 is outside its valid range \[0, 2\]"):
        gate_value(parse_evaluation(doc | {"metrics": {"brier": 2.5}}, "v1"), metric_spec("brier"), "v1")


def test_a_protocol_is_read_from_the_first_source_that_records_one():
    record = {PROTOCOL_KEY: json.dumps(PROTOCOL), PROTOCOL_DIGEST_KEY: fields_digest(PROTOCOL)}
    assert parse_protocol([{}, record], "v1") == Protocol(fields_digest(PROTOCOL), PROTOCOL)  # param else tag
    other = PROTOCOL | {"holdout": 0.1}
    assert parse_protocol([{PROTOCOL_KEY: json.dumps(other)}, record], "v1").digest == fields_digest(other)
    assert parse_protocol([{PROTOCOL_DIGEST_KEY: "abc"}], "v1") == Protocol("abc", None)
    with pytest.raises(PromotionError, match="v1: cfcml.protocol_digest abc is not the digest of its cfcml.protocol"):
        parse_protocol([record | {PROTOCOL_DIGEST_KEY: "abc"}], "v1")
    with pytest.raises(PromotionError, match="v1: cfcml.protocol is not valid JSON"):
        parse_protocol([{PROTOCOL_KEY: "{"}], "v1")
    with pytest.raises(PromotionError, match="v1: cfcml.protocol is not a JSON object"):
        parse_protocol([{PROTOCOL_KEY: "[1]"}], "v1")
    with pytest.raises(PromotionError, match="v1 records no cfcml.protocol_digest.*--force --reason"):
        parse_protocol([{}, {"other": "x"}], "v1")


def test_ids_digest_ignores_order():
    a = parse_evaluation({"kind": "holdout", "ids": ["b", "a"], "data_digest": "d", "metrics": {"auc": 0.5}}, "x")
    b = parse_evaluation({"kind": "holdout", "ids": ["a", "b"], "data_digest": "d", "metrics": {"auc": None}}, "y")
    c = parse_evaluation({"kind": "holdout", "ids": ["a", "c"], "data_digest": "d", "metrics": {}}, "z")
    assert a.ids_digest == b.ids_digest != c.ids_digest and b.metrics == {}


# --------------------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def env(mlflow_server):
    """(client, experiment id, None): versions point at their own run's artifacts."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    return client, client.create_experiment(f"test-gate-{uuid.uuid4().hex[:8]}"), None


@pytest.fixture
def name(env):
    model = f"cfcml-gate-{uuid.uuid4().hex[:8]}"
    env[0].create_registered_model(model)
    return model


def champion_of(client, model):
    return client.get_registered_model(model).aliases.get(CHAMPION)


@pytest.mark.services
def test_gate_compares_like_with_like_only(env, name):
    client = env[0]
    champ = version(env, name, {"auc": 0.70})
    other_patients = version(env, name, {"auc": 0.95}, ids=IDS[:-2] + ["MEN9998", "MEN9999"])
    more_epochs = version(env, name, {"auc": 0.95}, protocol=PROTOCOL | {"train.epochs": 80, "holdout": 0.1})
    digest_only = version(
        env, name, {"auc": 0.95}, protocol=None, protocol_as="tag", tags={"cfcml.protocol_digest": "0123456789abcdef"}
    )
    out_of_fold = version(env, name, {"auc": 0.99}, kind="out_of_fold")
    unmeasured = version(env, name, {}, document=False)
    # the same patients listed in another order; evaluation.json inside the package, as a study ships it
    alike = version(env, name, {"auc": 0.75}, ids=list(reversed(IDS)), at="model/artifacts/package")
    assert promote(client, name, version=champ).promoted

    with pytest.raises(
        PromotionError,
        match=r"not measured alike — patients: ids digest \w+ \(30 ids\) vs \w+ \(30 "
        r"ids\), 2 only in the candidate, 2 only in the champion",
    ):
        promote(client, name, version=other_patients)
    with pytest.raises(
        PromotionError,
        match=r"protocol: cfcml.protocol_digest \w+ vs \w+ \(holdout 0.1 vs 0.2; "
        r"train.epochs 80 vs 50\).*--force --reason",
    ):
        promote(client, name, version=more_epochs)
    with pytest.raises(PromotionError, match=r"protocol: cfcml.protocol_digest 0123456789abcdef vs \w+: their auc"):
        promote(client, name, version=digest_only)
    with pytest.raises(PromotionError, match="no test metric of its own.*kind 'out_of_fold'.*--holdout"):
        promote(client, name, version=out_of_fold)
    with pytest.raises(PromotionError, match="has no evaluation.json in its artifacts"):
        promote(client, name, version=unmeasured)
    for metric in ("val_auc", "cv_val_auc", "test_auc_mean"):
        with pytest.raises(PromotionError, match="search's maximum|member runs"):
            promote(client, name, version=alike, metric=metric)
    assert champion_of(client, name) == champ

    r = promote(client, name, version=alike)
    assert r.promoted and r.previous_champion == champ and r.candidate_value == pytest.approx(0.75)
    refusals = [e for e in audit_trail(client, name) if e["outcome"] == "error"]
    assert [e["candidate"] for e in refusals] == [other_patients, more_epochs, digest_only, out_of_fold, unmeasured]
    assert "train.epochs 80 vs 50" in refusals[1]["message"]

    r = promote(client, name, version=out_of_fold, force=True, reason="paper protocol comparison, signed off")
    assert r.forced and champion_of(client, name) == out_of_fold and r.candidate_value == pytest.approx(0.99)


@pytest.mark.services
def test_an_out_of_fold_version_is_no_first_champion(env, name):
    v = version(env, name, {"auc": 0.9}, kind="out_of_fold")
    with pytest.raises(PromotionError, match="no test metric of its own"):
        promote(env[0], name, version=v)
    assert champion_of(env[0], name) is None


@pytest.mark.services
def test_multi_class_brier_lies_in_0_to_2(env, name):
    client = env[0]
    champ = version(env, name, {"brier": 1.5, "auc": 0.55})
    better = version(env, name, {"brier": 1.2, "auc": 0.60})
    assert promote(client, name, version=champ, metric="brier").promoted
    r = promote(client, name, version=better, metric="brier")
    assert r.promoted and r.champion_value == pytest.approx(1.5) and champion_of(client, name) == better
    impossible = version(env, name, {"brier": 2.01})
    with pytest.raises(PromotionError, match=r"brier = 2.01 is outside its valid range \[0, 2\]"):
        promote(client, name, version=impossible, metric="brier")


# --------------------------------------------------------------------------- two processes at once


def _promote_process(url: str, model: str, candidate: str, barrier, delay: float, results) -> None:
    """A `cfcml promote` in its own process; the alias write is slowed by `delay` seconds so
    that two promotions overlap for certain (the window a lost update needs)."""
    import os

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow import MlflowClient

    from cfcml import cli

    real = MlflowClient.set_registered_model_alias

    def slow_write(self, *args, **kwargs):
        time.sleep(delay)
        return real(self, *args, **kwargs)

    MlflowClient.set_registered_model_alias = slow_write
    barrier.wait(timeout=300)
    rc = cli.main(["promote", "--model", model, "--version", candidate, "--tracking-uri", url])
    results.put((candidate, rc))


def _register_process(url: str, experiment_id: str, model: str, n: int, barrier, results) -> None:
    """Register `n` versions of `model` (the path a study's `log_model(registered_model_name=)`
    takes: `mlflow.register_model`), each from a run of its own."""
    import os

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(url)
    mlflow.set_tracking_uri(url)
    runs = [client.create_run(experiment_id).info.run_id for _ in range(n)]
    logged = [client.create_logged_model(experiment_id, name="model", source_run_id=r).model_id for r in runs]
    barrier.wait(timeout=300)
    for run_id, model_id in zip(runs, logged, strict=True):
        mv = mlflow.register_model(f"models:/{model_id}", model, await_registration_for=0)
        results.put((run_id, str(mv.version)))


def _run_two(target, args_a: tuple, args_b: tuple, expected: int) -> list:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, *rest, results)) for a, rest in (args_a, args_b)]
    for p in procs:
        p.start()
    out = [results.get(timeout=400) for _ in range(expected)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a worker process failed (exit {p.exitcode})"
    return out


@pytest.mark.services
@pytest.mark.slow
def test_two_concurrent_promotions_leave_one_champion_and_both_attempts(env, name, mlflow_server):
    """Without serialisation both processes compare with the old champion and both write:
    the last write wins even when it is the worse model, and the audit trail loses one."""
    client = env[0]
    old = version(env, name, {"auc": 0.70})
    good = version(env, name, {"auc": 0.80})
    best = version(env, name, {"auc": 0.90})
    assert promote(client, name, version=old).promoted

    out = dict(
        _run_two(
            _promote_process,
            ((mlflow_server.url, name, good), (1.0,)),
            ((mlflow_server.url, name, best), (1.0,)),
            expected=2,
        )
    )
    assert champion_of(client, name) == best  # whichever came first, the better model is the champion
    assert out[best] == 0 and out[good] in (0, 3)

    trail = audit_trail(client, name)
    assert sorted(e["candidate"] for e in trail[1:]) == sorted([good, best])  # both attempts, nothing lost
    holder = old
    for entry in trail[1:]:  # serialised: each attempt compared with the champion the previous one left
        assert entry["previous_champion"] == holder, trail
        holder = entry["champion"]
    assert holder == best
    assert not client.search_registered_models(f"name = '{lock_name(name)}'")  # the lock was released


@pytest.mark.services
@pytest.mark.slow
def test_two_processes_registering_one_model_never_collide(env, mlflow_server):
    client, experiment_id, _ = env
    model = f"cfcml-concurrent-{uuid.uuid4().hex[:8]}"  # created by whichever process registers first
    n = 5
    out = _run_two(
        _register_process,
        ((mlflow_server.url, experiment_id, model, n), ()),
        ((mlflow_server.url, experiment_id, model, n), ()),
        expected=2 * n,
    )
    versions = [v for _, v in out]
    assert sorted(versions, key=int) == [str(i) for i in range(1, 2 * n + 1)]  # distinct, none skipped
    for run_id, v in out:
        assert client.get_model_version(model, v).run_id == run_id  # each version is the run that registered it
