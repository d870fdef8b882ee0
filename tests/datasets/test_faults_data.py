"""Bad data, bad configs and misuse of runs: each refused with one clear line naming the
file/row/field/key, exit 2, nothing half-written; or handled correctly where the input is
valid but unusual (16-bit and palette photos). The platform's faults (checkpoints, registry,
services, secrets) are in test_faults_platform.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from cfcml.cli import main
from cfcml.datasets import write_synthetic
from cfcml.datasets.photo_transforms import decode_resized
from cfcml.datasets.reader import check_cohort

SMALL_MEN = [
    "--set",
    "data.image_size=[4,16,16]",
    "--set",
    "model.image_channels=2",
    "--set",
    "train.batch_size=6",
    "--set",
    "train.select_min_epoch=0",
    "--set",
    "train.select_window=1",
]


@pytest.fixture(scope="module")
def men(tmp_path_factory) -> Path:
    return write_synthetic("men", tmp_path_factory.mktemp("men") / "c", 18, seed=5)


@pytest.fixture(scope="module")
def derm(tmp_path_factory) -> Path:
    return write_synthetic("derm7pt", tmp_path_factory.mktemp("derm") / "release_v0", 40, seed=1)


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "cfcml.cli", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def assert_refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-2000:])


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, table: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(table[0]))
        w.writeheader()
        w.writerows(table)


# ----------------------------------------------------------------------------- images


def test_16_bit_and_palette_photos_decode_to_what_they_show(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32)[None, :].repeat(64, 0) * 1000).astype(np.uint16)  # 0..63000
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # uint16: mode I;16
    out = decode_resized(tmp_path / "deep.png", 64)
    assert str(out.dtype) == "torch.uint8"
    row = out[0, 0].numpy().astype(int)
    assert row[0] == 0 and 240 <= row[-1] <= 250 and (np.diff(row) >= 0).all()  # not clipped to white
    pal = Image.new("P", (40, 40))
    pal.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    pal.paste(1, (10, 10, 30, 30))
    pal.save(tmp_path / "pal.png")
    out = decode_resized(tmp_path / "pal.png", 40)
    assert out[:, 20, 20].tolist() == [200, 30, 10] and out[:, 0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("kind", ["blank", "tiny"])
def test_unusable_photos_are_problems(derm, tmp_path, kind):
    root = copy(derm, tmp_path)
    cohort, _ = check_cohort("derm7pt", root)
    case = cohort.cases[0]
    path = case.images[1]
    if kind == "blank":
        Image.new("RGB", (300, 200), (120, 90, 80)).save(path, format="JPEG")
    else:
        noise = np.random.default_rng(0).integers(0, 255, (16, 20, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path, format="JPEG")
    _, problems = check_cohort("derm7pt", root)
    p = next(p for p in problems if p.case == case.case_id)
    assert p.field == "derm" and ("blank image" if kind == "blank" else "20x16 pixels, smaller than 32") in p.message
    if kind == "tiny":
        assert check_cohort("derm7pt", root, min_photo_side=1)[1] == []  # --allow-small


@pytest.mark.parametrize("kind", ["blank", "tiny"])
def test_unusable_volumes_are_problems_and_training_refuses_them(men, tmp_path, kind):
    root = copy(men, tmp_path)
    cid = rows(root / "clinical.csv")[0]["id"]
    path = root / "images" / cid / "ADC.nii.gz"
    img = nib.load(str(path))
    data = np.zeros(img.shape, dtype=np.int16) if kind == "blank" else np.ones((1, 1, 1), dtype=np.int16)
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    _, problems = check_cohort("men", root)
    p = next(p for p in problems if p.case == cid)
    assert p.field == "ADC" and ("blank series" if kind == "blank" else "too small to be an image") in p.message
    r = run_cli(
        "train",
        "--preset",
        "men-smoke",
        "--data",
        root,
        "--out",
        tmp_path / "run",
        "--epochs",
        1,
        *SMALL_MEN,
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert_refused(r, cid, "ADC")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_symlink_loop_in_the_image_tree_is_a_problem_not_a_crash(derm, tmp_path):
    root = copy(derm, tmp_path)
    cohort, _ = check_cohort("derm7pt", root)
    folder = cohort.cases[0].images[0].parent
    shutil.rmtree(folder)
    folder.symlink_to(folder)  # a loop
    _, problems = check_cohort("derm7pt", root)
    assert any(p.case == cohort.cases[0].case_id and "does not exist" in p.message for p in problems)


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("1e308", "above the maximum 120"),
        ("-3", "below the minimum 0"),
        ("nan", "missing value"),
        ("inf", "not a finite number"),
        ("sixty", "is not a number"),
    ],
)
def test_absurd_numbers_are_refused_with_row_and_column(men, tmp_path, cell, message):
    root = copy(men, tmp_path)
    table = rows(root / "clinical.csv")
    table[2]["age"] = cell
    write_rows(root / "clinical.csv", table)
    _, problems = check_cohort("men", root)
    p = next(p for p in problems if p.field == "age")
    assert p.case == table[2]["id"] and "data row 2" in p.where and message in p.message


def test_header_only_table_fails_the_check(men, tmp_path):
    root = copy(men, tmp_path)
    header = (root / "clinical.csv").read_text().splitlines()[0]
    (root / "clinical.csv").write_text(header + "\n")
    r = run_cli("data", "check", "men", "--root", root)
    assert_refused(r, "clinical.csv", "no data rows")


def test_json_check_prints_only_the_contract(men, tmp_path):
    root = copy(men, tmp_path)
    r = run_cli("data", "check", "men", "--root", root, "--json")
    assert r.returncode == 0 and list(json.loads(r.stdout)) == ["splits"]
    table = rows(root / "clinical.csv")
    table[0]["sex"] = "7"
    write_rows(root / "clinical.csv", table)
    r = run_cli("data", "check", "men", "--root", root, "--json")
    assert r.returncode == 2 and list(json.loads(r.stdout)) == ["problems"]
    assert any("unknown sex code '7'" in p for p in json.loads(r.stdout)["problems"])


# ----------------------------------------------------------------------------- configs and schemas


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--epochs", "0"], ["--epochs: expected a positive whole number"]),
        (["--set", "data.num_folds=3"], ["unknown key(s) ['data.num_folds']"]),
        (["--set", "train.batch_size=100000"], ["train.batch_size: expected 2..4096"]),
        (["--set", "loss.tau=0"], ["loss.tau"]),
        (["--set", "train.lr=-1"], ["train.lr: expected a learning rate > 0"]),
        (["--set", "data.image_size=[0,16,16]"], ["data.image_size"]),
        (["--set", "model.heads=3"], ["model.heads: 3 heads do not divide"]),
        (["--set", "train.device=tpu"], ["train.device: 'tpu'"]),
        (["--fold", "9"], ["--fold 9: the cohort has folds 1..3"]),
        (["--seed", "1"], ["cross-validated: choose a run with --fold"]),
        (["--dataset", "derm7pt"], ["encoder nnmamba3d reads volumes, but the derm7pt cohort"]),
        (["--set", "train.batch_size=64"], ["train.batch_size 64 is larger than the training part"]),
    ],
)
def test_bad_run_requests_exit_2_with_one_clear_line(men, tmp_path, args, needles):
    r = run_cli(
        "train",
        "--preset",
        "men-smoke",
        "--data",
        men,
        "--out",
        tmp_path / "run",
        *SMALL_MEN,
        *args,
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert_refused(r, *needles)
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda s: s.replace("series: [T1, T1C, T2, FLAIR]", "series: [T1, T1C, T2, mask]"),
            "images.series: 'mask' names the ROI",
        ),
        (lambda s: s.replace("label: grade", "label: grade\n  lable: x"), "table.lable: unknown key"),
        (
            lambda s: s.replace("The age of patient is {value}", "The age of patient is"),
            "must hold {value} exactly once",
        ),
        (lambda s: s.replace("positive: HGG", "positive: GBM"), "positive: 'GBM' is not one of the classes"),
        (
            lambda s: s.replace('path: "images/{id}/{series}.nii.gz"', 'path: "../../{id}/{series}.nii.gz"'),
            "inside the cohort folder",
        ),
    ],
)
def test_bad_schemas_name_the_file_and_key(tmp_path, edit, needle):
    text = (Path(__file__).resolve().parents[2] / "examples" / "glioma-demo.yaml").read_text()
    schema = tmp_path / "bad.yaml"
    schema.write_text(edit(text))
    r = run_cli("data", "check", "--dataset", schema, "--root", tmp_path)
    assert_refused(r, str(schema), needle)


# ----------------------------------------------------------------------------- runs


def test_a_run_folder_is_reused_only_for_the_same_run(men, tmp_path):
    out, cache = tmp_path / "cv", f"data.cache_dir={tmp_path / 'cache'}"
    base = ["cv", "--preset", "men-smoke", "--data", men, "--out", out, "--epochs", 1, *SMALL_MEN, "--set", cache]
    assert main(list(map(str, base))) == 0
    summary = (out / "summary.json").read_text()
    config = (out / "fold1" / "config.yaml").read_text()
    r = run_cli(*base, "--set", "model.use_tabular=false")
    assert_refused(r, "holds a different run", "model.use_tabular: True there, False now", "--overwrite")
    assert (out / "fold1" / "config.yaml").read_text() == config  # the refused run wrote nothing
    assert main(list(map(str, base))) == 0  # the same request reuses every run ...
    assert json.loads((out / "summary.json").read_text())["runs"] == json.loads(summary)["runs"]
    r = run_cli(*base, "--set", "model.use_tabular=false", "--overwrite")  # ... and --overwrite replaces them
    assert r.returncode == 0, r.stderr[-1500:]
    assert "use_tabular: false" in (out / "fold1" / "config.yaml").read_text()


def test_a_non_finite_loss_stops_the_run_keeping_the_last_good_checkpoint(men, tmp_path, monkeypatch):
    """Fault injection: the loss turns NaN at the first step of epoch 2."""
    import torch

    import cfcml.engine.run as run_module
    from cfcml.config import build_config
    from cfcml.engine.errors import TrainingFailed

    calls = {"n": 0}
    cfg = build_config(
        "men-smoke",
        [
            "data.image_size=[4,16,16]",
            "model.image_channels=2",
            "train.epochs=3",
            "train.select_min_epoch=0",
            "train.select_window=1",
            "train.batch_size=6",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    run = run_module.TrainingRun(cfg, men, tmp_path / "run", fold=1)
    steps_per_epoch, real = len(run.train_loader), run.model.loss_terms

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > steps_per_epoch:
            parts["loss"] = parts["loss"] * torch.tensor(float("nan"))
        return parts

    monkeypatch.setattr(run.model, "loss_terms", poisoned)
    run.train_epoch()
    with pytest.raises(TrainingFailed, match="non-finite loss at epoch 2, step 1"):
        run.train_epoch()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and (tmp_path / "run" / "best.pt").exists()  # epoch 1's checkpoint, intact
    assert not list((tmp_path / "run").glob("*.tmp*"))
