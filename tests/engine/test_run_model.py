"""One run folder -> ready model (`cfcml.engine.run_model`), shared by the training run's test,
the report and the shipped package: the same selected weights, the same predictions, and one
clear error naming the file when best.pt is missing, corrupt or of another architecture."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from cfcml.config import build_config
from cfcml.datasets import write_synthetic
from cfcml.datasets.reader import load_cohort
from cfcml.engine.checkpoint import CheckpointError, load_checkpoint
from cfcml.engine.run import TrainingRun
from cfcml.engine.run_model import BEST, ready_model, ready_model_from_run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One epoch of a tiny Derm7pt run, finished (best.pt, config.yaml, predictions.npz written)."""
    base = tmp_path_factory.mktemp("runmodel")
    root = write_synthetic("derm7pt", base / "derm", 40, seed=1)
    overrides = [
        "data.image_size=[32,32]",
        "train.epochs=1",
        "train.select_min_epoch=0",
        "model.tabular_embedding=mlp",  # no text encoder: seconds, not minutes
        f"data.cache_dir={base}/c",
    ]
    run = TrainingRun(build_config("derm7pt-smoke", overrides), root, base / "run", seed=0, progress=False)
    while not run.done:
        run.train_epoch()
    run.finish()
    return run, load_cohort(run.spec, root), overrides


def test_a_run_folder_becomes_its_selected_model_in_eval_mode(finished_run):
    run, _, _ = finished_run
    cfg, model = ready_model_from_run(run.out, run.spec)
    assert cfg == run.cfg and not model.training
    saved = load_checkpoint(run.out / BEST, required=("model",))["model"]
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    # the run tested with the same weights: finish() loaded them into its own model
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in run.model.state_dict().items())


def test_the_package_predicts_what_the_run_tested(finished_run, tmp_path):
    from cfcml.platform.pyfunc import PackagedModel, build_package

    run, cohort, _ = finished_run
    package = build_package(
        run.cfg,
        [{"name": "seed0", "weights": run.out / BEST, "numeric_stats": run.numeric_stats}],
        cohort,
        tmp_path / "pkg",
    )
    packaged = PackagedModel(package, device="cpu")
    with np.load(run.out / "predictions.npz", allow_pickle=False) as saved:
        ids, probs = [str(c) for c in saved["test_case_ids"]], saved["test_probs"]
    by_id = {c.case_id: c for c in cohort.cases}
    np.testing.assert_allclose(packaged.predict_cases([by_id[i] for i in ids]), probs, atol=1e-5)


def test_missing_or_corrupt_best_pt_names_the_file(finished_run, tmp_path):
    run, _, _ = finished_run
    folder = tmp_path / "copy"
    shutil.copytree(run.out, folder)
    (folder / BEST).write_bytes(b"not a checkpoint")
    with pytest.raises(
        CheckpointError, match=rf"checkpoint {re.escape(str(folder / BEST))} refused: it is corrupt or not a PyTorch"
    ):
        ready_model_from_run(folder, run.spec)
    (folder / BEST).unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(folder / BEST))} does not exist"):
        ready_model_from_run(folder, run.spec)


def test_weights_of_another_architecture_are_refused_naming_the_file(finished_run):
    run, _, overrides = finished_run
    other = build_config("derm7pt-smoke", [*overrides, "model.dim=16"])
    weights = load_checkpoint(run.out / BEST, required=("model",))["model"]
    with pytest.raises(CheckpointError, match=r"weights/x\.pt does not fit this model \(\d+ size mismatch"):
        ready_model(other, run.spec, weights, "cpu", "weights/x.pt")
