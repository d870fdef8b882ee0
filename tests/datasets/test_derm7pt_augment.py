"""The authors' Derm7pt augmentation (`data.augment: authors`) against what their code did."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from cfcml.datasets.photo_transforms import (
    AuthorsAugmentation,
    PairTransform,
    brightness_contrast,
    shift_scale_rotate,
)


def photo(h=32, w=32, seed=0, low=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_step_probabilities_and_ranges_over_many_draws():
    torch.manual_seed(0)
    aug = AuthorsAugmentation(p=0.5)
    n = 8000
    draws = [aug.draw(224, 224) for _ in range(n)]
    freq = {
        "vflip": sum(d["vflip"] for d in draws) / n,
        "hflip": sum(d["hflip"] for d in draws) / n,
        "ssr": sum(d["ssr"] is not None for d in draws) / n,
        "rot90": sum(d["k"] != 0 for d in draws) / n,
        "bc": sum(d["bc"] is not None for d in draws) / n,
    }
    # pipeline p = 0.5, each step p = 0.5: 0.25 per step; rotate-90 also draws k = 0 a quarter of the time
    expected = {"vflip": 0.25, "hflip": 0.25, "ssr": 0.25, "rot90": 0.25 * 0.75, "bc": 0.25}
    for name, f in freq.items():
        assert abs(f - expected[name]) < 0.025, (name, f)
    untouched = sum(not (d["vflip"] or d["hflip"] or d["ssr"] or d["k"] or d["bc"]) for d in draws) / n
    assert abs(untouched - (0.5 + 0.5 * 0.5**4 * 0.625)) < 0.025  # half skip the pipeline outright
    scales = [d["ssr"]["scale"] for d in draws if d["ssr"]]
    assert 0.5 <= min(scales) < 0.55 and 1.45 < max(scales) <= 1.5  # ±50 %, not ±10 %
    angles = [d["ssr"]["angle"] for d in draws if d["ssr"]]
    assert -45 <= min(angles) < -40 and 40 < max(angles) <= 45
    shifts = [d["ssr"][k] for d in draws if d["ssr"] for k in ("dx", "dy")]
    assert max(abs(s) for s in shifts) <= 0.0625
    bcs = [d["bc"] for d in draws if d["bc"]]
    assert all(0.8 <= b["alpha"] <= 1.2 and -0.2 <= b["beta"] <= 0.2 for b in bcs)
    assert {d["k"] for d in draws} == {0, 1, 2, 3}


def test_brightness_contrast_on_the_clinical_photo_only_geometry_shared():
    aug = AuthorsAugmentation(p=1.0)
    clinic, derm = photo(seed=1), photo(seed=2)
    only_bc = {"vflip": False, "hflip": False, "ssr": None, "k": 0, "bc": {"alpha": 1.1, "beta": 0.1}}
    c, d = aug.apply([clinic, derm], only_bc)
    assert torch.equal(d, derm) and not torch.equal(c, clinic)
    assert torch.equal(c, brightness_contrast(clinic, 1.1, 0.1))
    # exact geometric steps: both photos move identically
    flips = {"vflip": True, "hflip": True, "ssr": None, "k": 1, "bc": {"alpha": 0.9, "beta": -0.1}}
    c, d = aug.apply([clinic, derm], flips)
    expected = lambda x: torch.rot90(x.flip(-2).flip(-1), 1, dims=(-2, -1))
    assert torch.equal(d, expected(derm)) and torch.equal(c, brightness_contrast(expected(clinic), 0.9, -0.1))


def test_one_shift_scale_rotate_draw_moves_both_photos_alike():
    """A bright square in the same place on both photos lands in the same place after a draw."""
    base = torch.full((3, 64, 64), 40, dtype=torch.uint8)
    base[:, 10:22, 36:50] = 220
    torch.manual_seed(3)
    aug = AuthorsAugmentation(p=1.0)
    moved = 0
    for _ in range(20):
        params = aug.draw(64, 64)
        params["bc"] = None  # compare geometry only
        c, d = aug.apply([base, base.clone()], params)
        cy, cx = _centroid(c)
        dy, dx = _centroid(d)
        assert abs(cy - dy) < 1 and abs(cx - dx) < 1
        moved += abs(cy - _centroid(base)[0]) + abs(cx - _centroid(base)[1]) > 2
    assert moved >= 10


def _centroid(img):
    m = (img[0].float() > 130).float()
    ys, xs = torch.meshgrid(torch.arange(m.shape[0]), torch.arange(m.shape[1]), indexing="ij")
    return (m * ys).sum().item() / m.sum().item(), (m * xs).sum().item() / m.sum().item()


@pytest.mark.parametrize(
    "angle,scale,dx,dy", [(30.0, 0.5, 0.05, -0.03), (-45.0, 1.5, -0.0625, 0.0), (0.0, 0.6, 0.0, 0.0)]
)
def test_shift_scale_rotate_matches_a_reference_affine_with_mirrored_borders(angle, scale, dx, dy):
    """Against scipy's affine_transform (order 1, mode 'mirror' = OpenCV's reflect-101), given the
    inverse of OpenCV's getRotationMatrix2D + shift."""
    img = photo(24, 40, seed=4)
    h, w = img.shape[-2:]
    a = math.radians(angle)
    al, be = scale * math.cos(a), scale * math.sin(a)
    fwd = np.array(
        [[al, be, (1 - al) * w / 2 - be * h / 2 + dx * w], [-be, al, be * w / 2 + (1 - al) * h / 2 + dy * h], [0, 0, 1]]
    )
    inv = np.linalg.inv(fwd)
    matrix = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])  # (row, col) order
    offset = np.array([inv[1, 2], inv[0, 2]])
    ref = np.stack(
        [ndimage.affine_transform(ch.astype(np.float64), matrix, offset, order=1, mode="mirror") for ch in img.numpy()]
    )
    ours = shift_scale_rotate(img, angle, scale, dx, dy).numpy().astype(np.float64)
    assert np.abs(ours - np.clip(np.round(ref), 0, 255)).max() <= 1
    near = shift_scale_rotate(img, angle, scale, dx, dy, nearest=True)
    assert set(near.unique().tolist()) <= set(img.unique().tolist())  # nearest: no new colours (their mask)


def test_shrinking_mirrors_the_photo_instead_of_filling_black():
    img = photo(32, 32, seed=5, low=60)
    out = shift_scale_rotate(img, 20.0, 0.5, 0.0, 0.0)
    assert out.min() >= 60  # reflect-101: every output pixel comes from the photo


def test_pair_transform_modes():
    clinic, derm = photo(seed=6), photo(seed=7)
    torch.manual_seed(0)
    t = PairTransform(train=True, p=0.5, augment="authors")
    assert isinstance(t.augment, AuthorsAugmentation)
    outs = [t([clinic, derm]) for _ in range(40)]
    assert all(x.dtype == torch.float32 and x.shape == (3, 32, 32) for pair in outs for x in pair)
    unchanged = sum(torch.equal(pair[1], outs[0][1]) for pair in outs)
    assert 0 < unchanged < 40
    assert PairTransform(train=False, augment="authors").augment is None
    assert not isinstance(PairTransform(train=True).augment, AuthorsAugmentation)  # default stays ours
    with pytest.raises(ValueError, match="augment"):
        PairTransform(train=True, augment="albumentations")


def test_config_reaches_the_training_dataset_only(tmp_path):
    from cfcml.config import build_config
    from cfcml.datasets.derm7pt.synthetic import write_synthetic_derm7pt
    from cfcml.datasets.reader import load_cohort
    from cfcml.datasets.spec import load_spec
    from cfcml.engine.loaders import make_datasets
    from cfcml.engine.splits import fixed_split

    spec = load_spec("derm7pt")
    write_synthetic_derm7pt(tmp_path / "release_v0", cases=24, seed=0)
    split = fixed_split(load_cohort(spec, tmp_path / "release_v0"), seed=0)
    assert build_config("derm7pt").data.augment == "authors"
    cfg = build_config("derm7pt-smoke", ["data.image_size=[32,32]"])
    assert cfg.data.augment == "authors"
    ds = make_datasets(cfg, spec, split)
    assert isinstance(ds["train"].transform.augment, AuthorsAugmentation) and ds["train"].transform.augment.p == 0.5
    assert ds["val"].transform.augment is None and ds["test"].transform.augment is None
    ds = make_datasets(build_config("derm7pt-smoke", ["data.image_size=[32,32]", "data.augment=default"]), spec, split)
    assert not isinstance(ds["train"].transform.augment, AuthorsAugmentation)
