"""Platform pieces that need no services: search spaces, URIs, concurrency, CV metrics, pyfunc rows."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from cfcml.config import build_config
from cfcml.platform.search_space import (
    SearchSpaceError,
    load_search_space,
    trial_run_name,
)
from cfcml.platform.study import StudySpec, join_uri, plan_concurrency, resolve_trial_config

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "search_spaces"


@pytest.mark.parametrize(
    "preset,space,expected",
    [
        (
            "men",
            "men",
            {
                "model.n_image_tokens": 48,
                "model.n_tabular_tokens": 16,
                "loss.alpha": 0.06,
                "loss.beta": 0.04,
                "loss.gamma": 0.24,
            },
        ),
        (
            "derm7pt",
            "derm7pt",
            {
                "model.n_image_tokens": 32,
                "model.n_tabular_tokens": 24,
                "loss.alpha": 0.04,
                "loss.beta": 0.06,
                "loss.gamma": 0.18,
            },
        ),
        ("men-smoke", "smoke", {"model.n_image_tokens": 8, "model.n_tabular_tokens": 4}),
        ("derm7pt-smoke", "smoke", {"loss.alpha": 0.04, "loss.gamma": 0.18}),
    ],
)
def test_shipped_spaces_start_at_the_paper_point(preset, space, expected):
    cfg = build_config(preset)
    s = load_search_space(SPACES / f"{space}.yaml", cfg)
    first = s.first_point(cfg)
    assert expected.items() <= first.items()
    assert s.metric == "cv_val_auc" and s.mode == "max"
    dists = s.distributions()
    assert set(dists) == set(first)
    for key, value in first.items():  # the first point is a member of every distribution
        assert dists[key]._contains(dists[key].to_internal_repr(value))


def test_paper_grids_and_log_scales():
    s = load_search_space(SPACES / "men.yaml", build_config("men"))
    d = s.distributions()
    assert s.describe()["model.n_image_tokens"] == "{16, 32, 48, 64}"
    assert s.describe()["model.n_tabular_tokens"] == "{8, 16, 24, 32}"
    assert all(d[k].log for k in ("loss.alpha", "loss.beta", "loss.gamma"))
    assert "train.lr" not in d and "loss.tau" not in d  # optional, disabled in the file


def test_bad_spaces_are_refused(tmp_path):
    def write(text):
        p = tmp_path / "s.yaml"
        p.write_text(text)
        return p

    cfg = build_config("men")
    with pytest.raises(SearchSpaceError, match="outside the search space"):
        load_search_space(write("params:\n  model.n_image_tokens: {type: int, low: 8, high: 16, step: 8}\n"), cfg)
    with pytest.raises(SearchSpaceError, match="not a config key"):
        load_search_space(write("params:\n  model.nope: {type: float, low: 1, high: 2}\n"), cfg)
    with pytest.raises(SearchSpaceError, match="log scale"):
        load_search_space(write("params:\n  loss.alpha: {type: float, low: 0, high: 1, log: true}\n"), cfg)
    with pytest.raises(SearchSpaceError, match="type must be"):
        load_search_space(write("params:\n  loss.alpha: {type: normal, low: 0, high: 1}\n"), cfg)
    explicit = load_search_space(
        write("first_trial: {loss.alpha: 0.5}\nparams:\n  loss.alpha: {type: float, low: 0.1, high: 1}\n"), cfg
    )
    assert explicit.first_point(cfg) == {"loss.alpha": 0.5}


def test_trial_parameters_become_a_config():
    small = ["train.batch_size=6", "train.select_min_epoch=0", "train.select_window=1"]  # 3 epochs: a candidate exists
    cfg = resolve_trial_config("men-smoke", small, {"loss.alpha": 0.123, "model.n_image_tokens": 16}, 3)
    assert (cfg.loss.alpha, cfg.model.n_image_tokens, cfg.train.batch_size, cfg.train.epochs) == (0.123, 16, 6, 3)
    assert trial_run_name({"model.n_image_tokens": 48, "loss.alpha": 0.0612345}) == "ni48 a0.0612"


def test_storage_uris_keep_their_query_last():
    s3 = "s3://bucket/ray?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(s3, "study_train") == "s3://bucket/ray/study_train?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri("/tmp/x", "study") == "/tmp/x/study"


def test_concurrency_follows_resources():
    spec = StudySpec.of(preset="men-smoke", data=".", num_samples=10)
    assert plan_concurrency({"CPU": 2.0}, spec) == 2
    spec.resources.workers_per_trial = 2
    assert plan_concurrency({"CPU": 8.0}, spec) == 4
    spec.resources.max_concurrent = 3
    assert plan_concurrency({"CPU": 8.0}, spec) == 3
    spec.resources.gpus_per_worker, spec.resources.max_concurrent = 1.0, None
    assert plan_concurrency({"CPU": 64.0, "GPU": 4.0}, spec) == 2
    spec.resources.workers_per_trial = 8
    with pytest.raises(Exception, match="lower --workers-per-trial"):
        plan_concurrency({"CPU": 64.0, "GPU": 4.0}, spec)


def test_cv_objective_uses_each_folds_selected_epoch():
    from cfcml.platform.train_loop import cv_metrics

    def run(name, history, best):
        return SimpleNamespace(split=SimpleNamespace(name=name), history=history, best={"epoch": best})

    h1 = [{"val_auc": 0.9, "val_loss": 1.0, "train_loss": 2.0}, {"val_auc": 0.7, "val_loss": 1.1, "train_loss": 1.5}]
    h2 = [{"val_auc": 0.5, "val_loss": 1.0, "train_loss": 2.0}, {"val_auc": 0.8, "val_loss": 0.9, "train_loss": 1.4}]
    records = [dict(h1[1], epoch=1, lr=1e-3), dict(h2[1], epoch=1, lr=1e-3)]
    m = cv_metrics([run("fold1", h1, 0), run("fold2", h2, 1)], records)
    assert m["epoch"] == 2
    assert m["cv_val_auc"] == pytest.approx((0.9 + 0.8) / 2)  # selected epochs, not the current one
    assert m["cv_val_auc_epoch"] == pytest.approx((0.7 + 0.8) / 2)
    assert m["fold1/selected_epoch"] == 1 and m["fold2/selected_epoch"] == 2
    assert m["fold2/val_auc"] == 0.8
    early = cv_metrics(
        [run("fold1", h1[:1], None), run("fold2", h2[:1], 0)], [dict(h1[0], epoch=0), dict(h2[0], epoch=0)]
    )
    assert math.isnan(early["cv_val_auc"]) and early["cv_candidate"] == 0  # no candidate yet: not an AUC of 0
    assert m["cv_candidate"] == 1
    stopped = cv_metrics([run("fold1", h1, 0), run("fold2", h2, 1)], [records[1]], trained=[run("fold2", h2, 1)])
    assert stopped["cv_val_auc"] == pytest.approx((0.9 + 0.8) / 2) and "fold1/val_auc" not in stopped


def test_pyfunc_rows_round_trip_to_the_same_sentences(tmp_path):
    from cfcml.datasets import write_synthetic
    from cfcml.datasets.reader import load_cohort
    from cfcml.datasets.spec import load_spec
    from cfcml.platform.pyfunc import MISSING_WORD, case_record, example_frame, model_signature, record_to_case

    men = load_spec("men")
    write_synthetic(men, tmp_path / "men", 9, 0)
    cohort = load_cohort(men, tmp_path / "men")
    for case in cohort.cases:
        row = case_record(men, case)
        back, missing = record_to_case(men, row)
        assert back.sentences == case.sentences and back.images == case.images and back.mask == case.mask
        assert back.attributes == case.attributes and missing == []
    sig = model_signature(men)
    assert [c.name for c in sig.inputs.inputs][:5] == ["case_id", "T1C", "FLAIR_C", "ADC", "mask"]
    assert [c.name for c in sig.inputs.inputs if c.required] == ["case_id"]
    assert [c.name for c in sig.outputs.inputs] == [
        "case_id",
        "prob_G1",
        "prob_G2inv",
        "prob_G2ninv",
        "pred",
        "inputs_used",
        "inputs_missing",
        "status",
    ]
    # a patient without FLAIR-C and without age is read, and says so
    row = case_record(men, cohort.cases[0]) | {"FLAIR_C": "", "age": ""}
    back, missing = record_to_case(men, row)
    assert missing == ["FLAIR_C", "age"] and back.images[1] is None
    assert back.sentences[2] == f"The age of patient is {MISSING_WORD}"
    with pytest.raises(ValueError, match="no input at all"):
        record_to_case(men, {"case_id": "x"})
    with pytest.raises(ValueError, match="location: unknown location code '7'"):
        record_to_case(men, case_record(men, cohort.cases[0]) | {"location": "7"})
    # the input example is synthetic: no case id, path or value of the cohort appears in it
    example = example_frame(men).iloc[0].to_dict()
    assert example["case_id"] not in {c.case_id for c in cohort.cases}
    assert not any(str(tmp_path) in str(v) for v in example.values())


def test_gpus_per_worker_defaults_to_the_hardware_the_cluster_has():
    from cfcml.platform.study.options import build_parser

    parser = build_parser("jobs/tune_men.py", {"dataset": "men", "preset": "men"}, 60)
    assert parser.parse_args([]).gpus_per_worker is None  # auto
    assert parser.parse_args(["--gpus-per-worker", "auto"]).gpus_per_worker is None
    assert parser.parse_args(["--gpus-per-worker", "0.5"]).gpus_per_worker == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpus-per-worker", "-1"])
    assert (
        plan_concurrency({"CPU": 2.0}, StudySpec.of(preset="men-smoke", data=".", num_samples=4)) == 2
    )  # auto on a CPU cluster
