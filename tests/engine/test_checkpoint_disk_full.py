"""Storage fills up while a checkpoint is written (issue 23, part 2).

The fault is real where the test may mount a tmpfs (root, as in the dev container): the file
system is filled to the last byte and the kernel refuses the write. Where it may not, the
write itself is made to fail with ENOSPC after part of the bytes went out (the only thing
mocked is that fault). Either way: the write fails with a message naming the path and the
cause, the previous checkpoint is intact and loadable, no temporary file is left, and at the
`cfcml train` level the error is one clear line (exit 2, no traceback) after which
`--resume` finishes the run once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cfcml.engine import checkpoint
from cfcml.engine.checkpoint import CheckpointWriteError, atomic_save, load_checkpoint

FULL = r"No space left on device \(ENOSPC\)"


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=False, capture_output=True
    )
    return done.returncode == 0


@contextlib.contextmanager
def small_fs(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (skips the test when this process may not mount)."""
    if not _mount_tmpfs(where, size):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-fault tests cover this case")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system refuses another byte; returns it."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    with pytest.raises(OSError):  # really full
        (folder / "probe").write_bytes(b"\0" * 8192)
    (folder / "probe").unlink(missing_ok=True)
    return filler


class _FailingFile(io.FileIO):
    """A real file whose writes fail with ENOSPC once `budget` bytes went out (part of the
    payload reaches the disk, as on a file system that runs full mid-write)."""

    budget = 0

    def write(self, data):
        room = self.budget - self.tell()
        if len(data) <= room:
            return super().write(data)
        if room > 0:
            super().write(memoryview(data)[:room])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _inject_enospc(monkeypatch, after_bytes: int, when=lambda: True):
    real_open = open

    def fake_open(file, mode="r", *args, **kwargs):
        if "w" in mode and when():
            _FailingFile.budget = after_bytes
            return io.BufferedWriter(_FailingFile(file, "wb"))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)


def _payload(n: int, value: float) -> dict:
    return {"model": {"w": torch.full((n,), value)}, "epoch": int(value)}


def _assert_previous_intact(folder: Path, path: Path, value: float, n: int) -> None:
    state = load_checkpoint(path, required=("model", "epoch"))
    assert state["epoch"] == int(value) and torch.equal(state["model"]["w"], torch.full((n,), value))
    assert not list(folder.glob("*.tmp")), "a temporary file was left behind"


def test_a_real_full_filesystem_keeps_the_previous_checkpoint(tmp_path):
    with small_fs(tmp_path / "fs", "2m") as fs:
        path = fs / "last.pt"
        atomic_save(_payload(50_000, 1.0), path)  # ~200 KB: fits
        before = path.read_bytes()
        filler = fill(fs)
        with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint {path}: {FULL}") as err:
            atomic_save(_payload(50_000, 2.0), path)
        assert err.value.path == path and err.value.errno == errno.ENOSPC
        assert "free space there and resume the run (--resume)" in str(err.value)
        assert path.read_bytes() == before
        _assert_previous_intact(fs, path, 1.0, 50_000)
        filler.unlink()  # space freed: the next write goes through
        atomic_save(_payload(50_000, 2.0), path)
        _assert_previous_intact(fs, path, 2.0, 50_000)


@pytest.mark.parametrize("after_bytes", [0, 100, 150_000])
def test_an_injected_enospc_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, after_bytes):
    path = tmp_path / "run" / "best.pt"
    atomic_save(_payload(50_000, 1.0), path)
    _inject_enospc(monkeypatch, after_bytes)
    with pytest.raises(CheckpointWriteError, match=rf"cannot write checkpoint {path}: {FULL}"):
        atomic_save(_payload(50_000, 2.0), path)
    _assert_previous_intact(path.parent, path, 1.0, 50_000)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    _inject_enospc(monkeypatch, 10)
    with pytest.raises(CheckpointWriteError, match=r"the previous last\.pt \(if any\) is unchanged"):
        atomic_save(_payload(1000, 1.0), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_other_storage_errors_name_the_cause_without_the_disk_full_advice(tmp_path, monkeypatch):
    def eio(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    path = tmp_path / "last.pt"
    atomic_save(_payload(10, 1.0), path)
    monkeypatch.setattr(checkpoint.os, "fsync", eio)
    with pytest.raises(CheckpointWriteError, match=r"Input/output error \(EIO\).* once the storage works") as err:
        atomic_save(_payload(10, 2.0), path)
    assert err.value.errno == errno.EIO
    _assert_previous_intact(tmp_path, path, 1.0, 10)


# --------------------------------------------------------------------------- `cfcml train`


@pytest.fixture(scope="module")
def derm(tmp_path_factory) -> Path:
    from cfcml.datasets import write_synthetic

    return write_synthetic("derm7pt", tmp_path_factory.mktemp("derm") / "data", 40, seed=1)


def _train(derm: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    sets = ["data.image_size=[32,32]", f"data.cache_dir={cache}", "train.select_min_epoch=0"]
    return [
        "train",
        "--preset",
        "derm7pt-smoke",
        "--data",
        str(derm),
        "--epochs",
        "2",
        "--out",
        str(out),
        *[a for s in sets for a in ("--set", s)],
        *extra,
    ]


def _train_fails_then_resumes(derm, out, cache, capsys, free_space) -> None:
    from cfcml.cli import main

    capsys.readouterr()
    assert main(_train(derm, out, cache)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and sum(line.startswith("error:") for line in err.splitlines()) == 1, err
    assert f"error: cannot write checkpoint {out}" in err and "No space left on device (ENOSPC)" in err, err
    assert not list(out.glob("*.tmp")) and not (out / "metrics.json").exists()
    last = load_checkpoint(out / "last.pt", required=("model", "optimizer", "epoch", "history"))
    assert last["epoch"] == 0 and len(last["history"]) == 1  # epoch 1's write failed: epoch 0's is intact
    load_checkpoint(out / "best.pt", required=("model", "epoch"))
    free_space()
    assert main(_train(derm, out, cache, "--resume")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "auc" in metrics["test"]
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_train_on_a_filesystem_that_fills_up_fails_clearly_and_resumes(derm, tmp_path, monkeypatch, capsys):
    """Real ENOSPC: once epoch 0's checkpoints are on the tmpfs, it is filled to the last byte."""
    with small_fs(tmp_path / "fs", "64m") as fs:
        out, state = fs / "run", {}

        def fill_once():  # called as a checkpoint file is opened: fill the disk before epoch 1's first write
            if (out / "last.pt").exists() and "filler" not in state:
                state["filler"] = fill(fs)
            return False  # the write itself is the real one

        _inject_enospc(monkeypatch, 0, when=fill_once)
        _train_fails_then_resumes(derm, out, tmp_path / "cache", capsys, lambda: state["filler"].unlink())


@pytest.mark.slow
def test_train_whose_checkpoint_write_fails_with_enospc_fails_clearly_and_resumes(derm, tmp_path, monkeypatch, capsys):
    out, fault = tmp_path / "run", {"on": True}
    _inject_enospc(monkeypatch, 4096, when=lambda: fault["on"] and (out / "last.pt").exists())
    _train_fails_then_resumes(derm, out, tmp_path / "cache", capsys, lambda: fault.update(on=False))
