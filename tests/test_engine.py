"""One training run and the protocol, end to end on tiny synthetic cohorts (CPU)."""

import json

import pytest
import torch

from cfcml.config import build_config
from cfcml.data.registry import write_synthetic
from cfcml.engine.protocol import run_protocol
from cfcml.engine.run import TrainingRun, train_one
from cfcml.engine.schedule import lr_factor

TINY = ["data.image_size=[32,32]", "train.epochs=3", "train.deterministic=true"]


@pytest.fixture(scope="module")
def derm_cohort(tmp_path_factory):
    return write_synthetic("derm7pt", tmp_path_factory.mktemp("derm") / "release_v0", 90, seed=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _cfg(cache_dir, *extra):
    return build_config("derm7pt-smoke", TINY + [f"data.cache_dir={cache_dir}", *extra])


def test_lr_schedule_warms_up_then_steps_down():
    t = build_config("men").train
    factors = [lr_factor(e, t) for e in range(20)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5:10] == [1.0] * 5 and factors[10:15] == pytest.approx([0.8] * 5)
    assert factors[15] == pytest.approx(0.64)


def test_same_seed_gives_identical_metrics(derm_cohort, cache_dir, tmp_path):
    a = train_one(_cfg(cache_dir), derm_cohort, tmp_path / "a", seed=0)
    b = train_one(_cfg(cache_dir), derm_cohort, tmp_path / "b", seed=0)
    assert a["test"] == b["test"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_resume_reaches_the_same_result_as_an_uninterrupted_run(derm_cohort, cache_dir, tmp_path):
    full = train_one(_cfg(cache_dir), derm_cohort, tmp_path / "full", seed=3)
    part = train_one(_cfg(cache_dir), derm_cohort, tmp_path / "cut", seed=3, max_epochs_this_call=2)
    assert part["finished"] is False and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = train_one(_cfg(cache_dir), derm_cohort, tmp_path / "cut", seed=3, resume=True)
    assert len(resumed["history"]) == 3
    assert resumed["test"] == full["test"]
    assert resumed["selected_epoch"] == full["selected_epoch"]


def test_run_writes_metrics_and_selects_on_validation(derm_cohort, cache_dir, tmp_path):
    result = train_one(_cfg(cache_dir, "train.select_metric=loss"), derm_cohort, tmp_path, seed=0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"] == pytest.approx(result["test"], nan_ok=True)
    losses = [h["val_loss"] for h in saved["history"]]
    assert saved["selected_epoch"] == losses.index(min(losses))
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["epoch"] == saved["selected_epoch"]
    assert set(saved["test"]) >= {"sen", "spe", "acc", "g_mean", "balanced_acc", "auprc", "auc"}
    assert not list(tmp_path.glob("*.tmp"))


def test_training_refuses_a_cohort_that_fails_the_check(derm_cohort, cache_dir, tmp_path):
    import shutil

    from cfcml.data.cohort import CohortError

    bad = tmp_path / "bad"
    shutil.copytree(derm_cohort, bad)
    next((bad / "images").rglob("*.*")).unlink()
    with pytest.raises(CohortError, match="problem"):
        TrainingRun(_cfg(cache_dir), bad, tmp_path / "run", seed=0)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_cv_protocol_end_to_end_with_comparison(derm_cohort, cache_dir, tmp_path):
    cfg = _cfg(cache_dir, "train.epochs=1", "train.seeds=[0,1]")
    first = run_protocol(cfg, derm_cohort, tmp_path / "cfcml")
    assert [r["name"] for r in first["runs"]] == ["seed0", "seed1"]
    saved = json.loads((tmp_path / "cfcml" / "summary.json").read_text())
    assert set(saved["metrics"]["auc"]) == {"mean", "std"}
    assert "| SEN" in (tmp_path / "cfcml" / "summary.md").read_text().replace("SEN |", "| SEN")
    other = run_protocol(build_config("derm7pt-smoke", TINY + [f"data.cache_dir={cache_dir}", "train.epochs=1",
                                                                "train.seeds=[0,1]", "loss.ccrm=false"]),
                         derm_cohort, tmp_path / "noccrm", compare=tmp_path / "cfcml")
    assert set(other["compare"]["wilcoxon_p"]) >= {"auc", "acc"}
