"""Live progress: runs x epochs of the total, the latest validation metric, elapsed and left."""

import io
import multiprocessing as mp

import pytest

from cfcml.engine.progress import Progress, queue_reporter, reporter_for


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_count_epochs_and_estimate_time_left():
    out, clock = io.StringIO(), _Clock()
    p = Progress(["fold1", "fold2"], 4, "auc", stream=out, live=False, clock=clock)
    clock.now = 10
    p.epoch_done("fold1", 0, 0.61)
    clock.now = 20
    p.epoch_done("fold2", 0, 0.7)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # one plain line per finished epoch
    assert lines[0].startswith("fold1 epoch 1/4: val auc=0.6100 (1/8 epochs")
    assert "fold1 auc 0.610 fold2 auc 0.700" in lines[1] and "0:20 elapsed, ~1:00 left" in lines[1]
    p.run_done("fold1", 2)  # stopped early (patience): the total shrinks
    assert p.total == 6 and p.completed == 3


def test_a_terminal_gets_one_line_redrawn_in_place():
    out = io.StringIO()
    p = Progress(["seed0"], 2, "auc", stream=out, live=True, clock=_Clock())
    p.epoch_done("seed0", 0, 0.5)
    p.wrap(lambda message: out.write(message + "\n"))("seed0 finished")
    p.close()
    text = out.getvalue()
    assert text.count("\r\033[K") == 2 and "\n" not in text.split("seed0 finished")[0]
    assert text.endswith("\n")


def test_reused_runs_are_not_timed():
    clock = _Clock()
    p = Progress(["fold1", "fold2"], 5, "auc", stream=io.StringIO(), live=False, clock=clock)
    p.run_done("fold1", 5)  # finished before this command
    assert p.remaining_seconds() is None
    clock.now = 30
    p.epoch_done("fold2", 2, 0.8)  # resumed at epoch 3: epochs 1-2 were trained earlier
    assert p.completed == 8 and p.remaining_seconds() == 30 * 2  # one epoch timed, two left


def test_worker_events_reach_the_parent_through_a_queue():
    out = io.StringIO()
    p = Progress(["fold1"], 3, "auc", stream=out, live=False, clock=_Clock())
    queue = mp.get_context("spawn").Queue()
    thread = p.follow(queue)
    report = queue_reporter(queue, "fold1", "auc")
    for epoch in range(3):
        report(epoch, {"val_auc": 0.5 + epoch / 10}, None)
    queue.put(None)
    thread.join(timeout=10)
    assert p.completed == 3 and p.latest["fold1"] == 0.7
    assert reporter_for(None, "fold1", "auc") is None and queue_reporter(None, "fold1", "auc") is None


@pytest.mark.slow
def test_cv_prints_progress_unless_quiet(tmp_path, capfd):
    from cfcml import cli
    from cfcml.datasets import write_synthetic

    data = write_synthetic("derm7pt", tmp_path / "d", 40, seed=0)
    common = [
        "cv",
        "--preset",
        "derm7pt-smoke",
        "--data",
        str(data),
        "--jobs",
        "1",
        "--set",
        "data.image_size=[32,32]",
        "--set",
        "train.epochs=2",
        "--set",
        "train.seeds=[0]",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert cli.main([*common, "--out", str(tmp_path / "a")]) == 0
    err = capfd.readouterr().err
    assert "seed0 epoch 1/2: val auc=" in err and "seed0 epoch 2/2" in err and "2/2 epochs (1 runs)" in err
    assert cli.main([*common, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "epoch 1/2" not in capfd.readouterr().err
