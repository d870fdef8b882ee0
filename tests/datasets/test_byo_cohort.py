"""Bring your own cohort: cohorts described only by a schema file go through synth, check,
train and cv with no code change (the tune/registry/predict leg is in test_platform_study.py).

Two schemas unlike MEN and Derm7pt: `examples/glioma-demo.yaml` (4 MRI series, 2 classes,
3 attributes, K-fold) and a photo cohort written here (3 photos, 3 classes, a fixed split in
plain-text id lists, a path column per photo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cfcml.cli import main
from cfcml.datasets.reader import check_cohort
from cfcml.datasets.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
GLIOMA = ROOT / "examples" / "glioma-demo.yaml"
SMALL = [
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
]  # 1-epoch runs select epoch 0

SKIN = """
name: skin-demo
classes: [benign, dysplastic, malignant]
images:
  kind: photo
  series: [overview, closeup, dermoscopy]
  path: {overview: "photos/{overview_file}", closeup: "photos/{id}-close.jpg", dermoscopy: "photos/{id}-derm.jpg"}
table:
  file: tables/lesions.csv
  id: lesion
  label: histology
  attributes:
    - {column: site, type: categorical, vocabulary: [trunk, limb, face], sentence: "The lesion site is {value}"}
    - {column: diameter, type: numeric, min: 0, max: 100, sentence: "The lesion diameter in mm is {value}"}
split:
  files: {train: lists/train.txt, valid: lists/valid.txt, test: lists/test.txt}
"""


@pytest.fixture(scope="module")
def glioma(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("glioma") / "data"
    assert main(["synth", "--dataset", str(GLIOMA), "--out", str(out), "--patients", "48", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def skin(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("skin")
    schema = base / "skin.yaml"
    schema.write_text(SKIN)
    assert main(["synth", "--dataset", str(schema), "--out", str(base / "data"), "--cases", "72"]) == 0
    return schema, base / "data"


def test_the_glioma_schema_reads_with_its_own_series_classes_and_attributes(glioma, capsys):
    spec = load_spec(GLIOMA)
    assert spec.shape().num_images == 4 and spec.num_classes == 2 and spec.positive == "HGG"
    capsys.readouterr()
    assert main(["data", "check", "--dataset", str(GLIOMA), "--root", str(glioma), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["splits"]
    assert list(counts) == ["fold1", "fold2", "fold3"] and all(set(c) == {"LGG", "HGG"} for c in counts.values())
    assert sum(sum(c.values()) for c in counts.values()) == 48
    cohort, _ = check_cohort(spec, glioma)
    case = cohort.cases[0]
    assert [p.name for p in case.images] == ["T1.nii.gz", "T1C.nii.gz", "T2.nii.gz", "FLAIR.nii.gz"]
    assert case.sentences[2].startswith("The Karnofsky performance score is ")
    # the synthetic table carries an extra, empty column the schema does not name: ignored
    assert "notes" in (glioma / "clinical.csv").read_text().splitlines()[0]


def test_glioma_trains_and_cross_validates_with_the_binary_metric_set(glioma, tmp_path, capsys):
    cache = ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    base = ["--preset", "men-smoke", "--dataset", str(GLIOMA), "--data", str(glioma), "--epochs", "1", *SMALL, *cache]
    assert main(["train", *base, "--fold", "2", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "glioma-demo" and metrics["run"] == "fold2"
    assert set(metrics["test"]) == {
        "sen",
        "spe",
        "acc",
        "g_mean",
        "balanced_acc",
        "auprc",
        "auprc_label",
        "auc",
        "loss",
    }
    assert main(["cv", *base, "--out", str(tmp_path / "cv")]) == 0
    table = (tmp_path / "cv" / "summary.md").read_text()
    assert "glioma-demo" in table and "| SEN |" in table and "3 folds" in table
    assert "CFCML (paper)" not in table  # no reference numbers in this schema


def test_a_photo_cohort_with_three_classes_and_split_lists(skin, tmp_path, capsys):
    schema, data = skin
    capsys.readouterr()
    assert main(["data", "check", "--dataset", str(schema), "--root", str(data), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["splits"]
    assert list(counts) == ["train", "valid", "test"]
    assert all(set(c) == {"benign", "dysplastic", "malignant"} and min(c.values()) > 0 for c in counts.values())
    assert (data / "lists" / "train.txt").read_text().split()[0].startswith("SKI")  # one id per line
    args = [
        "--preset",
        "derm7pt-smoke",
        "--dataset",
        str(schema),
        "--data",
        str(data),
        "--epochs",
        "1",
        "--set",
        "data.image_size=[32,32]",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        "train.seeds=[0]",
        "--set",
        "train.select_min_epoch=0",
    ]
    assert main(["cv", *args, "--out", str(tmp_path / "cv")]) == 0
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert set(summary["metrics"]) >= {"acc", "acc_benign", "acc_dysplastic", "acc_malignant", "macro_f1", "auc"}
    assert [r["name"] for r in summary["runs"]] == ["seed0"]


def test_a_volume_preset_on_the_photo_cohort_is_refused_naming_both(skin, tmp_path, capsys):
    schema, data = skin
    code = main(
        [
            "train",
            "--preset",
            "men-smoke",
            "--dataset",
            str(schema),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "men-smoke" in err and "nnmamba3d" in err and "skin-demo" in err and "photos" in err
