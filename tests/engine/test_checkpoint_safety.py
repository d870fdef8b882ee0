"""Checkpoints load without running code from the file, and real ones round-trip."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cfcml.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    clean_stale_temp_files,
    load_checkpoint,
    load_state_checked,
    rng_state,
    set_rng_state,
    to_plain,
)


class _WritesMarker:
    """Unpickling this calls os.system: the classic malicious-checkpoint payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecsMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _write_torch_zip(payload, path):
    torch.save(payload, path)


def _write_torch_legacy(payload, path):
    torch.save(payload, path, _use_new_zipfile_serialization=False)


def _write_plain_pickle(payload, path):
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)


@pytest.mark.parametrize("writer", [_write_torch_zip, _write_torch_legacy, _write_plain_pickle])
@pytest.mark.parametrize("gadget", [_WritesMarker, _ExecsMarker])
def test_malicious_checkpoint_runs_nothing(tmp_path, writer, gadget):
    marker = tmp_path / "PWNED"
    path = tmp_path / "last.pt"
    # the gadget hides where a real checkpoint keeps state: inside the optimizer state
    writer({"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: gadget(marker)}}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"last\.pt refused: .*nothing from it was run"):
        load_checkpoint(path)
    assert not marker.exists()


def test_the_gadget_is_real(tmp_path):
    """Control: the same file loaded the unsafe way does run the code (so the test above means something)."""
    marker = tmp_path / "PWNED"
    _write_torch_zip({"x": _ExecsMarker(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"is empty \(0 bytes\)"),
        (os.urandom(512), r"refused: it is corrupt or not a PyTorch checkpoint|is corrupt or truncated"),
        ("truncated", r"is corrupt or truncated"),
        ("list", r"holds a list, not a cfcml checkpoint"),
        ("numpy", r"numpy.*may not contain.*another --out"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, content, match):
    path = tmp_path / "last.pt"
    if content == "truncated":
        torch.save({"model": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "numpy":  # what cfcml wrote before RNG state was stored as plain data
        torch.save({"rng": {"numpy": np.random.get_state()}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_directory_and_required_keys(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"missing 'optimizer', 'epoch'"):
        load_checkpoint(tmp_path / "x.pt", required=("model", "optimizer", "epoch"))


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # has_gauss / cached_gaussian in use
    atomic_save({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(2).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(2).tolist()) == expected


def test_to_plain_keeps_state_dicts_and_converts_numpy():
    sd = torch.nn.BatchNorm1d(3).state_dict()
    assert to_plain(sd) is sd and hasattr(to_plain(sd), "_metadata")
    out = to_plain({"h": [{"auc": np.float64(0.5)}], "a": np.arange(3), "t": (np.int64(2), "x")})
    assert type(out["h"][0]["auc"]) is float and torch.equal(out["a"], torch.arange(3))
    assert out["t"] == (2, "x") and type(out["t"][0]) is int


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        atomic_save({"f": lambda: 0}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_clean_stale_temp_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"keep")
    (run / "last.ptk2j3h4.tmp").write_bytes(b"half")
    (run / "metrics.json.tmp").write_text("{")
    outside = tmp_path / "precious.tmp"
    outside.write_text("not ours")
    (run / "link.tmp").symlink_to(outside)
    (run / "sub").mkdir()
    (run / "sub" / "x.tmp").write_text("not at the top level")
    removed = clean_stale_temp_files(run)
    assert sorted(p.name for p in removed) == ["last.ptk2j3h4.tmp", "link.tmp", "metrics.json.tmp"]
    assert sorted(p.name for p in run.iterdir()) == ["last.pt", "sub"]
    assert outside.read_text() == "not ours" and (run / "sub" / "x.tmp").exists()
    assert clean_stale_temp_files(tmp_path / "missing") == []


def test_module_mismatch_names_keys_and_shapes(tmp_path):
    path = tmp_path / "best.pt"
    atomic_save({"model": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()}, path)
    state = load_checkpoint(path)["model"]
    other = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    with pytest.raises(
        CheckpointError,
        match=r"best\.pt does not fit this model \(.*size mismatch: 0\.weight \(4x3 in "
        r"the file, 8x3 in the model\).*2 missing: 3\.weight, 3\.bias",
    ):
        load_state_checked(other, state, path)
    opt = torch.optim.Adam(other.parameters())
    with pytest.raises(CheckpointError, match=r"its optimizer state does not fit"):
        load_state_checked(opt, {"state": {}, "param_groups": []}, path, what="optimizer")


# --------------------------------------------------------------------------- a real run's checkpoints


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch of a tiny Derm7pt run: its last.pt / best.pt are what --resume and Ray restore read."""
    from cfcml.config import build_config
    from cfcml.datasets import write_synthetic
    from cfcml.engine.run import TrainingRun

    base = tmp_path_factory.mktemp("ckpt")
    root = write_synthetic("derm7pt", base / "derm", 40, seed=1)
    overrides = [
        "data.image_size=[32,32]",
        "train.epochs=2",
        "train.select_min_epoch=0",
        f"data.cache_dir={base / 'cache'}",
    ]
    run = TrainingRun(build_config("derm7pt-smoke", overrides), root, base / "run", seed=0, progress=False)
    run.train_epoch()
    return run, root, overrides


def test_real_checkpoints_round_trip(trained_run):
    run, _, _ = trained_run
    last = load_checkpoint(
        run.out / "last.pt",
        required=("model", "optimizer", "scheduler", "sampler", "epoch", "history", "best", "rng", "config"),
    )
    best = load_checkpoint(run.out / "best.pt", required=("model", "config", "epoch", "val"))
    load_state_checked(run.model, last["model"], run.out / "last.pt")
    load_state_checked(run.model, best["model"], run.out / "best.pt")
    load_state_checked(run.optimizer, last["optimizer"], run.out / "last.pt", what="optimizer")
    load_state_checked(run.scheduler, last["scheduler"], run.out / "last.pt", what="scheduler")
    load_state_checked(run.sampler, last["sampler"], run.out / "last.pt", what="sampler")
    set_rng_state(last["rng"])
    assert last["epoch"] == 0 and isinstance(last["history"][0]["val_loss"], float)
    assert last["config"]["name"] == "derm7pt-smoke"
    for key, value in run.model.state_dict().items():
        assert torch.equal(value.cpu(), last["model"][key].cpu()), key


def test_checkpoint_of_another_architecture_is_refused(trained_run, tmp_path):
    from cfcml.config import build_config
    from cfcml.engine.run import TrainingRun

    run, root, overrides = trained_run
    other = TrainingRun(
        build_config("derm7pt-smoke", [*overrides, "model.dim=16"]), root, tmp_path, seed=0, progress=False
    )
    state = load_checkpoint(run.out / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt does not fit this model \(\d+ size mismatch: .* in the file"):
        load_state_checked(other.model, state["model"], run.out / "last.pt")
