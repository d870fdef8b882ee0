"""MEN data: synthetic cohort, its schema read in both layouts, sentences, tabular features,
3D preprocessing, augmentation, volume cache and the torch Dataset."""

from __future__ import annotations

import csv
import pickle
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cfcml.datasets.men.synthetic import (
    class_counts,
    convert_to_layout_b,
    measure_signal,
    write_synthetic_men,
)
from cfcml.datasets.reader import load_cohort
from cfcml.datasets.rows import RowParser
from cfcml.datasets.spec import load_spec
from cfcml.datasets.tabular import tabular_features
from cfcml.datasets.volume_checks import grid_mismatch

SIZE = (8, 32, 32)  # (D, H, W), the smoke preset's
MEN = load_spec("men")
CLASSES, MODALITIES, ATTRIBUTES = MEN.classes, MEN.series, MEN.attribute_names


def read_men(root):
    return load_cohort(MEN, root)


def men_sentences(raw: dict) -> tuple:
    _, _, sentences, problems = RowParser(MEN).attributes(raw, "test", "x")
    assert not problems, problems
    return sentences


@pytest.fixture(scope="module")
def men_root(tmp_path_factory) -> Path:
    return write_synthetic_men(tmp_path_factory.mktemp("men") / "a", patients=30, seed=3, shape=(32, 32, 8))


@pytest.fixture(scope="module")
def cohort(men_root):
    return read_men(men_root)


# ----------------------------------------------------------------------------- synth + readers


def test_round_trip_counts_and_stratified_folds(men_root, cohort):
    assert cohort.dataset == "men" and cohort.classes == CLASSES and cohort.modalities == MODALITIES
    assert cohort.attribute_names == ATTRIBUTES and cohort.splits == ("fold1", "fold2", "fold3")
    per_class = Counter(c.label for c in cohort.cases)
    assert [per_class[i] for i in range(3)] == list(class_counts(30, 3)) == [24, 3, 3]
    counts = cohort.counts()
    for i, name in enumerate(CLASSES):
        per_fold = [counts[f][name] for f in cohort.splits]
        assert min(per_fold) >= 1 and max(per_fold) - min(per_fold) <= 1, (name, per_fold)
    with open(men_root / "clinical.csv") as f:
        table = {r["id"]: r for r in csv.DictReader(f)}
    for c in cohort.cases:
        assert c.split == f"fold{table[c.case_id]['fold']}" and CLASSES[c.label] == table[c.case_id]["grade"]
        assert [p.name for p in c.images] == ["T1C.nii.gz", "FLAIR_C.nii.gz", "ADC.nii.gz"]
    assert any(c.mask is not None for c in cohort.cases) and any(c.mask is None for c in cohort.cases)


def test_full_size_cohort_keeps_the_real_imbalance():
    assert list(class_counts(796, 3)) == [650, 60, 86]


def test_synthetic_cohort_is_deterministic(tmp_path, men_root):
    again = write_synthetic_men(tmp_path / "again", patients=30, seed=3, shape=(32, 32, 8))
    assert (again / "clinical.csv").read_text() == (men_root / "clinical.csv").read_text()
    for f in sorted((men_root / "images").rglob("*.nii.gz"))[:12]:
        assert (again / f.relative_to(men_root)).read_bytes() == f.read_bytes()
    other = write_synthetic_men(tmp_path / "other", patients=30, seed=4, shape=(32, 32, 8))
    assert (other / "clinical.csv").read_text() != (men_root / "clinical.csv").read_text()


def test_series_use_different_grids_over_one_space(cohort):
    imgs = [nib.load(p) for p in cohort.cases[0].images]
    assert len({i.shape for i in imgs}) == 3  # T1C, FLAIR-C and ADC grids all differ
    for img in imgs:
        assert grid_mismatch((imgs[0].shape, imgs[0].affine), (img.shape, img.affine)) is None
        assert img.get_data_dtype() == np.int16 and img.header.get_zooms()[2] >= 5.0  # thick slices


def test_layout_b_reads_as_the_same_cohort(men_root, cohort, tmp_path):
    b = read_men(convert_to_layout_b(men_root, tmp_path / "b"))
    assert b.splits == cohort.splits and b.counts() == cohort.counts()

    def view(c):
        return c.case_id, c.label, c.split, c.attributes, c.sentences

    assert sorted(map(view, b.cases)) == sorted(map(view, cohort.cases))
    assert [p.name for p in b.cases[0].images] == ["t1_bbox.nii.gz", "t2_bbox.nii.gz", "adc_bbox.nii.gz"]
    assert all(c.mask is None for c in b.cases)


def test_folds_from_a_splits_file(men_root, tmp_path):
    import shutil

    root = Path(shutil.copytree(men_root, tmp_path / "s"))
    with open(root / "clinical.csv") as f:
        table = list(csv.DictReader(f))
    with open(root / "clinical.csv", "w", newline="") as f:  # drop the fold column
        w = csv.DictWriter(f, [k for k in table[0] if k != "fold"], extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    with open(root / "splits.csv", "w") as f:  # the schema's split.folds_file
        f.write("id,fold\n" + "".join(f"{r['id']},{4 - int(r['fold'])}\n" for r in table))
    got = read_men(root)
    want = {r["id"]: f"fold{4 - int(r['fold'])}" for r in table}
    assert {c.case_id: c.split for c in got.cases} == want


def test_sentences_match_table_1_exactly():
    raw = {
        "location": "2",
        "sex": "1",
        "age": "61",
        "adc_value": "850",
        "tumor_area": "3.14",
        "edema_area": "0.5",
    }
    assert men_sentences(raw) == (
        "The tumor location in the brain is skull base",
        "The sex of patient is male",
        "The age of patient is 61",
        "The value of apparent diffusion coefficient is 850",
        "The tumor area in the brain is 3.14",
        "The edema area in the brain is 0.5",
    )
    assert men_sentences(raw | {"location": "1", "sex": "0"})[:2] == (
        "The tumor location in the brain is convex surface",
        "The sex of patient is female",
    )
    assert men_sentences(raw | {"location": "3"})[0] == "The tumor location in the brain is other location"


def test_read_sentences_insert_csv_cells_verbatim(men_root, cohort):
    with open(men_root / "clinical.csv") as f:
        table = {r["id"]: r for r in csv.DictReader(f)}
    for c in cohort.cases:
        r = table[c.case_id]
        assert c.sentences[2] == f"The age of patient is {r['age']}"
        assert c.sentences[4] == f"The tumor area in the brain is {r['tumor_area']}"
        assert MEN.attributes[0].values[r["location"]] == c.attributes["location"]
        assert c.attributes["tumor_area"] == float(r["tumor_area"]) and c.raw["location"] == r["location"]


def test_tabular_features_fit_on_training_cases_only(cohort):
    train, test = cohort.split("fold1", "fold2"), cohort.split("fold3")
    x_train, x_test = tabular_features(MEN, train, fit_on=train), tabular_features(MEN, test, fit_on=train)
    assert x_train.shape == (len(train), 9) and x_test.dtype == np.float32
    assert np.allclose(x_train[:, :3].sum(1), 1) and np.allclose(x_train[:, 3:5].sum(1), 1)
    assert np.allclose(x_train[:, 5:].mean(0), 0, atol=1e-5)  # standardised on train...
    ages = np.array([c.attributes["age"] for c in train])
    assert np.allclose(
        x_test[:, 5], (np.array([c.attributes["age"] for c in test]) - ages.mean()) / ages.std(), atol=1e-5
    )


@pytest.mark.slow
def test_synthetic_signal_is_spread_across_modalities():
    auc = measure_signal(patients=796, seed=0)
    for block in ("images", "tabular"):
        assert 0.7 <= auc[block] <= 0.88, (block, auc)
    assert auc["FLAIR_C"] > max(auc["T1C"], auc["ADC"]) + 0.05, auc  # the images' cue is in FLAIR-C
    assert auc["all"] > 0.93 and auc["all"] > max(auc["images"], auc["tabular"]) + 0.1, auc


def test_synthetic_signal_smoke():
    auc = measure_signal(patients=150, seed=1, shape=(24, 24, 6))
    assert auc["all"] > max(auc["images"], auc["tabular"]) + 0.1, auc


# ----------------------------------------------------------------------------- preprocessing


def _write(path: Path, data, affine) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return str(path)


def _grid(spacing, origin):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def _pipeline(size):
    from cfcml.datasets.volume_transforms import deterministic_pipeline

    return deterministic_pipeline(size, MODALITIES)


def test_pipeline_output_shape_background_and_zscore(cohort):
    pipe = _pipeline(SIZE)
    for case in cohort.cases[:4]:
        from cfcml.datasets.volume_transforms import case_to_dict

        out = pipe(case_to_dict(case, MODALITIES))
        assert set(out) == set(MODALITIES)
        for m in MODALITIES:
            x = out[m]
            assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (1, *SIZE)
            fg = x[x != 0]
            assert abs(fg.mean().item()) < 1e-4 and abs(fg.std(unbiased=False).item() - 1) < 1e-3
    # No mask: the whole volume is kept, so the zero corners outside the head survive.
    nomask = next(c for c in cohort.cases if c.mask is None)
    out = pipe(case_to_dict(nomask, MODALITIES))
    assert (out["T1C"][0, :, 0, 0] == 0).all() and (out["T1C"][0, :, 16, 16] != 0).all()


def test_axis_order_crop_and_square_padding(tmp_path):
    # T1C (X, Y, Z) = (16, 12, 4); marker at x=2, y=3, z=1; every voxel foreground.
    vol = np.full((16, 12, 4), 100.0) + np.arange(16)[:, None, None]  # not constant: z-scores to non-zero
    vol[2, 3, 1] = 900.0
    aff = _grid((1, 1, 5), (0, 0, 0))
    d = {m: _write(tmp_path / f"{m}.nii.gz", vol, aff) for m in MODALITIES}
    out = _pipeline((4, 16, 16))(d)["T1C"]
    # Y is padded 12 -> 16 (2 each side), output is [1, Z, Y, X].
    assert out.shape == (1, 4, 16, 16)
    assert np.unravel_index(int(out.argmax()), out.shape) == (0, 1, 3 + 2, 2)
    assert (out[0, :, :2, :] == 0).all() and (out[0, :, -2:, :] == 0).all()
    # With a mask the ROI box (X 4..11, Y 2..5, Z 1..2) is cropped, then padded to a square.
    mask = np.zeros(vol.shape)
    mask[4:12, 2:6, 1:3] = 1
    d["mask"] = _write(tmp_path / "mask.nii.gz", mask, aff)
    out = _pipeline((2, 8, 8))(d)["T1C"]
    assert out.shape == (1, 2, 8, 8)
    assert (out[0, :, :2] == 0).all() and (out[0, :, 6:] == 0).all() and (out[0, :, 2:6] != 0).all()


def test_clip_then_zscore(tmp_path):
    vol = np.full((8, 8, 2), 600.0)
    vol[:4] = 3000.0  # clipped to 1200
    vol[:, :2] = 0.0  # background
    aff = _grid((1, 1, 5), (0, 0, 0))
    d = {m: _write(tmp_path / f"{m}.nii.gz", vol, aff) for m in MODALITIES}
    out = _pipeline((2, 8, 8))(d)["ADC"][0].numpy()
    ref = np.clip(vol, 0, 1200).transpose(2, 1, 0)
    fg = ref != 0
    ref[fg] = (ref[fg] - ref[fg].mean()) / ref[fg].std()
    assert np.allclose(out, ref, atol=1e-4)


def test_series_on_different_grids_are_resampled_onto_t1c(tmp_path):
    # Same 32 x 32 x 20 mm space: T1C at 1 mm, ADC at 2 mm, FLAIR at 1.6 mm with 4 mm slices.
    def phantom(spacing, shape):
        aff = _grid(spacing, np.array(spacing) / 2)  # box [0, 32] x [0, 32] x [0, 20]
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
        xyz = ijk * spacing + np.array(spacing) / 2
        inside = (xyz[..., 0] > 4) & (xyz[..., 0] < 14) & (xyz[..., 1] > 18) & (xyz[..., 1] < 28)
        return np.where(inside, 1000.0, 200.0), aff

    d = {}
    for m, sp, sh in [
        ("T1C", (1, 1, 5), (32, 32, 4)),
        ("FLAIR_C", (1.6, 1.6, 4), (20, 20, 5)),
        ("ADC", (2, 2, 5), (16, 16, 4)),
    ]:
        d[m] = _write(tmp_path / f"{m}.nii.gz", *phantom(sp, sh))
    out = _pipeline((4, 32, 32))(d)
    bright = {m: (out[m][0] > (out[m].max() + out[m].min()) / 2).numpy() for m in MODALITIES}
    for m in ("FLAIR_C", "ADC"):  # the box lands on the same T1C voxels (edges blur a little)
        iou = (bright[m] & bright["T1C"]).sum() / (bright[m] | bright["T1C"]).sum()
        assert iou > 0.8, (m, iou)


def test_augmentation_changes_values_keeps_shapes(cohort):
    from cfcml.datasets.volume_transforms import augment_pipeline, case_to_dict

    base = _pipeline(SIZE)(case_to_dict(cohort.cases[0], MODALITIES))
    aug = augment_pipeline(SIZE, MODALITIES, prob=1.0)  # every step fires
    aug.set_random_state(seed=0)
    out = aug({k: v.clone() for k, v in base.items()})
    for m in MODALITIES:
        assert out[m].shape == base[m].shape and out[m].dtype == torch.float32
        assert not torch.equal(out[m], base[m])
    # One erased box through all slices and all series (same place in each).
    zero = [(out[m][0] == 0).all(0) for m in MODALITIES]
    assert zero[0].any() and torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
    # Default probability: some draws leave a sample untouched, others do not.
    aug = augment_pipeline(SIZE, MODALITIES)
    aug.set_random_state(seed=1)
    changed = [not torch.equal(aug({k: v.clone() for k, v in base.items()})["T1C"], base["T1C"]) for _ in range(20)]
    assert 0 < sum(changed) < 20


# ----------------------------------------------------------------------------- cache + dataset


def test_memory_cache_second_pass_decodes_nothing(cohort):
    from cfcml.datasets.volume_cache import VolumeCache

    cache = VolumeCache(SIZE, MODALITIES)
    cases = cohort.cases[:6]
    first = [cache.get(c) for c in cases]
    assert cache.decode_count == 6 and cache.hits == 0
    second = [cache.get(c) for c in cases]
    assert cache.decode_count == 6 and cache.hits == 6
    for a, b in zip(first, second):
        assert all(torch.equal(a[m], b[m]) for m in MODALITIES)
    first[0]["T1C"].zero_()  # callers own their tensors: the cache is unaffected
    assert torch.equal(cache.get(cases[0])["T1C"], second[0]["T1C"])


def test_disk_cache_survives_processes_and_keys_on_content(cohort, tmp_path):
    from cfcml.datasets.volume_cache import VolumeCache, make_volume_cache

    cases = cohort.cases[:3]
    a = VolumeCache(SIZE, MODALITIES, tmp_path / "cache")
    a.warm(cases)
    assert a.decode_count == 3 and len(list((tmp_path / "cache").glob("*.npy"))) == 3
    b = pickle.loads(pickle.dumps(VolumeCache(SIZE, MODALITIES, tmp_path / "cache")))  # e.g. a new run
    got = [b.get(c) for c in cases]
    assert b.decode_count == 0 and b.hits == 3
    assert all(torch.equal(got[0][m], a.get(cases[0])[m]) for m in MODALITIES)
    assert VolumeCache((4, 16, 16), MODALITIES, tmp_path / "cache").key(cases[0]) != a.key(cases[0])
    parallel = VolumeCache(SIZE, MODALITIES)
    parallel.warm(cases, num_workers=2)  # decoded in worker processes, kept in this one
    assert parallel.decode_count == 3 and torch.equal(parallel.get(cases[1])["ADC"], a.get(cases[1])["ADC"])
    assert make_volume_cache(cohort.cases, SIZE, MODALITIES).kind == "memory"
    assert make_volume_cache(cohort.cases, (24, 128, 128), MODALITIES, tmp_path, memory_budget_mb=1).kind == "disk"


def test_dataset_items_and_dataloader_workers(cohort):
    from cfcml.datasets.volume_cache import VolumeCache
    from cfcml.datasets.volume_dataset import VolumeDataset

    cases = cohort.cases[:6]
    cache = VolumeCache(SIZE, MODALITIES)
    cache.warm(cases)
    train = VolumeDataset(cases, MODALITIES, SIZE, train=True, cache=cache)
    test = VolumeDataset(cases, MODALITIES, SIZE, train=False, cache=cache)
    item = test[2]
    assert set(item) == {"images", "index", "label"} and item["index"] == 2 and item["label"] == cases[2].label
    assert [tuple(x.shape) for x in item["images"]] == [(1, *SIZE)] * 3
    assert torch.equal(test[2]["images"][0], item["images"][0])  # evaluation is deterministic
    clone = pickle.loads(pickle.dumps(train))
    assert [tuple(x.shape) for x in clone[0]["images"]] == [(1, *SIZE)] * 3

    loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=2)
    for _ in range(2):  # two epochs
        batches = list(loader)
    assert [tuple(x.shape) for x in batches[0]["images"]] == [(3, 1, *SIZE)] * 3
    assert batches[0]["label"].tolist() == [c.label for c in cases[:3]]
    assert cache.decode_count == 6  # warmed once; workers only read
