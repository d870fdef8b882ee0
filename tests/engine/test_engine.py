"""One training run and the protocol, end to end on tiny synthetic cohorts (CPU)."""

import json
import math

import numpy as np
import pytest
import torch

from cfcml.config import build_config
from cfcml.datasets import write_synthetic
from cfcml.engine.protocol import run_protocol
from cfcml.engine.run import TrainingRun, train_one
from cfcml.engine.schedule import lr_factor

TINY = ["data.image_size=[32,32]", "train.epochs=3", "train.deterministic=true", "train.select_min_epoch=0"]


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

    from cfcml.datasets.cohort import CohortError

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
    other = run_protocol(
        build_config(
            "derm7pt-smoke",
            TINY + [f"data.cache_dir={cache_dir}", "train.epochs=1", "train.seeds=[0,1]", "loss.ccrm=false"],
        ),
        derm_cohort,
        tmp_path / "noccrm",
        compare=tmp_path / "cfcml",
    )
    assert set(other["compare"]["wilcoxon_p"]) >= {"auc", "acc"}


def test_plan_jobs_splits_cpu_threads_between_parallel_runs():
    from cfcml.engine.protocol import available_cpus, plan_jobs

    cpus = available_cpus()
    cfg = build_config("men-smoke", ["train.device=cpu"])
    auto = plan_jobs(cfg, pending=3)
    assert auto.jobs == (3 if 3 <= 2 * cpus else cpus) and auto.devices == ["cpu"] * auto.jobs
    assert plan_jobs(cfg, pending=2 * cpus + 1).jobs == cpus  # beyond two per core: one per core
    assert auto.threads == (max(1, cpus // auto.jobs) if auto.jobs > 1 else 0)
    four = plan_jobs(cfg, pending=2, jobs=4)
    assert four.jobs == 2  # never more workers than runs
    assert plan_jobs(cfg, pending=3, jobs=1).threads == 0  # one job: torch's default
    if not torch.cuda.is_available():  # asking for a GPU that is not there: the run's own error, no crash here
        assert plan_jobs(build_config("men-smoke", ["train.device=cuda"]), pending=3).devices == ["cuda"]
    pinned = plan_jobs(build_config("men-smoke", ["train.device=cpu", "train.threads=3"]), pending=3, jobs=3)
    assert pinned.threads == 3


def test_parallel_protocol_matches_sequential_at_the_same_thread_count(derm_cohort, cache_dir, tmp_path):
    threads = torch.get_num_threads()  # the in-process run keeps this process's count
    cfg = _cfg(cache_dir, "train.epochs=1", "train.seeds=[0,1]", "train.device=cpu", f"train.threads={threads}")
    events = []
    parallel = run_protocol(cfg, derm_cohort, tmp_path / "parallel", jobs=2, report=events.append)
    sequential = run_protocol(cfg, derm_cohort, tmp_path / "sequential", jobs=1)
    assert [r["metrics"] for r in parallel["runs"]] == [r["metrics"] for r in sequential["runs"]]
    assert "2 at a time" in events[0] and sum("finished" in e for e in events) == 2
    saved = json.loads((tmp_path / "parallel" / "seed1" / "metrics.json").read_text())
    assert saved["threads"] == threads and saved["device"] == "cpu"


def test_a_failed_parallel_run_is_named_and_finished_runs_are_kept(derm_cohort, cache_dir, tmp_path):
    from cfcml.engine.protocol import ProtocolError

    cfg = _cfg(cache_dir, "train.epochs=1", "train.seeds=[0,1]", "train.device=cpu")
    out = tmp_path / "cv"
    out.mkdir()
    (out / "seed1").write_text("a file where the run directory should go")
    with pytest.raises(ProtocolError, match="seed1"):
        run_protocol(cfg, derm_cohort, out, jobs=2)
    assert json.loads((out / "seed0" / "metrics.json").read_text())["finished"]
    assert not (out / "summary.json").exists()
    (out / "seed1").unlink()
    resumed = run_protocol(cfg, derm_cohort, out, jobs=2)  # seed0 is reused, only seed1 trains
    assert [r["name"] for r in resumed["runs"]] == ["seed0", "seed1"]


def test_selection_window_ignores_a_one_epoch_spike():
    from cfcml.engine.selection import selection_score

    history = [{"val_auc": v} for v in (0.5, 0.9, 0.5, 0.8, 0.8, 0.8)]
    spiky = [selection_score(history[: i + 1], "auc", 1) for i in range(6)]
    smooth = [selection_score(history[: i + 1], "auc", 3) for i in range(6)]
    assert spiky.index(max(spiky)) == 1
    assert all(math.isnan(v) for v in smooth[:2])  # partly filled windows are no candidates
    assert int(np.nanargmax(smooth)) == 5 and smooth[5] == pytest.approx(0.8)
    with_nan = [{"val_auc": 0.6}, {"val_auc": float("nan")}]
    assert selection_score(with_nan, "auc", 2) == pytest.approx(0.6)


def test_run_selects_on_the_windowed_validation_score(derm_cohort, cache_dir, tmp_path):
    from cfcml.engine.selection import select_epoch, selection_score

    saved = train_one(
        _cfg(cache_dir, "train.select_window=2", "train.epochs=4", "train.select_min_epoch=2"),
        derm_cohort,
        tmp_path,
        seed=1,
    )
    history = saved["history"]
    scores = [selection_score(history[: i + 1], "auc", 2, 2) for i in range(len(history))]
    assert [h["select_score"] for h in history] == pytest.approx(scores, nan_ok=True)
    assert all(math.isnan(v) for v in scores[:2])
    assert saved["selected_epoch"] == select_epoch(history, "auc", 2, 2) >= 2 and saved["select_window"] == 2
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["first_candidate_epoch"] == 2 and on_disk["epochs_trained"] == 4 and not on_disk["stopped_early"]


def test_device_augmentation_path_trains_deterministically_and_resumes(tmp_path):
    """`data.device_augment=always` (the GPU path, forced on the CPU): the split lives in a device
    bank and each batch is augmented there; runs are reproducible and resume exactly."""
    from cfcml.datasets.volume_augment import DeviceBatches

    men = write_synthetic("men", tmp_path / "men", 18, seed=2)
    over = [
        "data.image_size=[4,16,16]",
        "model.image_channels=2",
        "train.batch_size=6",
        "train.epochs=3",
        "train.select_min_epoch=0",
        "train.select_window=1",
        "train.deterministic=true",
        "data.device_augment=always",
        "data.aug_prob=0.8",
        f"data.cache_dir={tmp_path / 'c'}",
    ]
    cfg = build_config("men-smoke", over)
    run = TrainingRun(cfg, men, tmp_path / "probe", fold=1)
    assert isinstance(run.train_loader, DeviceBatches)
    full = train_one(cfg, men, tmp_path / "full", fold=1)
    again = train_one(build_config("men-smoke", over), men, tmp_path / "again", fold=1)
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in again["history"]]
    train_one(cfg, men, tmp_path / "cut", fold=1, max_epochs_this_call=2)
    resumed = train_one(cfg, men, tmp_path / "cut", fold=1, resume=True)
    assert resumed["test"] == full["test"]
    off = train_one(
        build_config(
            "men-smoke",
            [*over[:-3], "data.device_augment=never", "data.aug_prob=0.8", f"data.cache_dir={tmp_path / 'c'}"],
        ),
        men,
        tmp_path / "off",
        fold=1,
    )
    assert [h["train_loss"] for h in off["history"]] != [h["train_loss"] for h in full["history"]]  # another path
