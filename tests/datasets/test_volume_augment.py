"""Batched on-device augmentation (`BatchVolumeAugment`) against the MONAI per-sample pipeline
(`augment_pipeline`), and the device-resident volume bank.

The distribution test reads every draw back from the output of a structured volume
(ramps along D, H and W, series offset by constants): the slopes give the crop size and the
flip axis, the exact zeros the erased box, second differences the noise s.d.; the same
reader is applied to MONAI's outputs and ours, and the two samples must agree (chi-square /
KS homogeneity) and match the specified probabilities and ranges.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import Flip, Resize, SpatialCrop
from scipy import stats

from cfcml.datasets.spec import load_spec

MODALITIES = load_spec("men").series
from cfcml.datasets.samplers import ClassBalancedBatchSampler
from cfcml.datasets.volume_augment import (
    AugmentDraws,
    BankTooLarge,
    BatchVolumeAugment,
    DeviceBatches,
    DeviceVolumeBank,
    bank_batches,
    check_bank_fits,
    chunked,
    volume_bank_bytes,
)
from cfcml.datasets.volume_transforms import augment_pipeline

SIZE = (4, 32, 32)  # small (D, H, W): MONAI runs ~1 ms per draw at this size
P = 0.3
STD = 0.1
SERIES_STEP = 3.0  # series s = series 0 + 3 s


def structured_volume(size=SIZE, series: int = 3) -> torch.Tensor:
    """[S, D, H, W]: 2 + 3 s + 5 d + y + x (never 0, unit in-plane slopes, D ramp for flips)."""
    d, h, w = size
    s_, z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (series, d, h, w)), indexing="ij")
    return 2.0 + SERIES_STEP * s_ + 5.0 * z + y + x


def read_draws(out: torch.Tensor) -> list[dict]:
    """Recover what each augmented structured volume of out [N, S, D, H, W] went through."""
    s, h, w = out.shape[1], out.shape[3], out.shape[4]
    o = out.double()
    box = o[:, 0, 0] == 0  # [N, H, W]
    erased = box.flatten(1).any(1)
    # the zeros are one box through every slice and series, nothing else
    assert torch.equal(o == 0, box[:, None, None].expand_as(o))
    valid = ~box[:, None]  # [N, 1, H, W], broadcast over slices
    # alignment: every series is series 0 plus its constant (same crop, flip, shared noise)
    step = SERIES_STEP * torch.arange(s, dtype=o.dtype).view(1, s, 1, 1, 1)
    assert ((o - o[:, :1] - step).abs() * valid[:, None]).max() < 1e-3
    v = o[:, 0]  # [N, D, H, W]

    def masked(values, ok):  # NaN outside `ok`, flattened per volume
        return torch.where(ok.expand_as(values), values, torch.nan).flatten(1)

    # mean interior differences = the slope (the first and last samples of a resized axis are clamped)
    sy = masked(v[:, :, 2:-1] - v[:, :, 1:-2], valid[:, :, 2:-1] & valid[:, :, 1:-2]).nanmean(1)
    sx = masked(v[..., 2:-1] - v[..., 1:-2], valid[..., 2:-1] & valid[..., 1:-2]).nanmean(1)
    sz = masked(v[:, -1:] - v[:, :1], valid).nanmean(1)
    flips = torch.stack([sz < 0, sy < 0, sx < 0], 1)
    assert (flips.sum(1) <= 1).all()
    # noise: second differences along W away from the clamped ends and the erased box
    ok = valid[..., 2:-3] & valid[..., 3:-2] & valid[..., 4:-1]
    d2 = masked(v[..., 4:-1] - 2 * v[..., 3:-2] + v[..., 2:-3], ok)
    sigma = (d2 - d2.nanmean(1, keepdim=True)).pow(2).nanmean(1).sqrt() / math.sqrt(6.0)
    rows, cols = box.any(2).sum(1), box.any(1).sum(1)
    axis = torch.where(flips.any(1), flips.long().argmax(1), -1)
    keys = ("crop_h", "crop_w", "flip_axis", "noise_sd", "erase_h", "erase_w")
    columns = ((sy.abs() * h).round().long(), (sx.abs() * w).round().long(), axis, sigma, rows * erased, cols * erased)
    return [dict(zip(keys, r)) for r in zip(*(c.tolist() for c in columns))]


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: a second thread only adds contention (2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def monai_draws(n: int, seed: int = 0) -> list[dict]:
    pipe = augment_pipeline(SIZE, MODALITIES, prob=P, noise_std=STD)
    pipe.set_random_state(seed)
    vol = structured_volume()
    outs = []
    for _ in range(n):
        d = pipe({m: vol[i : i + 1].clone() for i, m in enumerate(MODALITIES)})
        outs.append(torch.cat([torch.as_tensor(d[m]) for m in MODALITIES]))
    return read_draws(torch.stack(outs))


def batched_draws(n: int, seed: int = 0) -> list[dict]:
    aug = BatchVolumeAugment(SIZE, prob=P, noise_std=STD)
    vol = structured_volume()
    return read_draws(aug(vol.expand(n, *vol.shape), torch.Generator().manual_seed(seed)))


def _homogeneous(a, b, name: str) -> None:
    """Chi-square test that two categorical samples come from one distribution."""
    cats = sorted(set(a) | set(b))
    table = np.array([[a.count(c) for c in cats], [b.count(c) for c in cats]])
    table = table[:, table.sum(0) > 0]
    p = stats.chi2_contingency(table)[1] if table.shape[1] > 1 else 1.0
    assert p > 1e-3, f"{name}: MONAI {dict(zip(cats, table[0]))} vs batched {dict(zip(cats, table[1]))} (p={p:.2g})"


def _rate_ok(hits: int, n: int, p: float, name: str) -> None:
    tol = 4.5 * math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) < tol, f"{name}: {hits}/{n} = {hits / n:.3f}, expected {p:.3f} ± {tol:.3f}"


@pytest.mark.parametrize(
    "n_ours, n_monai", [(2000, 600), pytest.param(20000, 6000, marks=pytest.mark.slow, id="large")]
)
def test_equivalent_in_distribution_to_monai(n_ours, n_monai):
    ours, theirs = batched_draws(n_ours), monai_draws(n_monai)
    aug = BatchVolumeAugment(SIZE, prob=P, noise_std=STD)
    (h_lo, h_hi), (e_lo, e_hi) = aug.crop_height_range, aug.erase_height_range
    assert (h_lo, h_hi, e_lo, e_hi) == (28, 32, 3, 12)
    for draws, who in ((ours, "batched"), (theirs, "monai")):
        n = len(draws)
        crops = [(r["crop_h"], r["crop_w"]) for r in draws]
        # a crop of the full slice looks like no crop: P(seen) = p (1 - 1/25)
        full = (h_hi - h_lo + 1) ** 2
        _rate_ok(sum(c != (h_hi, h_hi) for c in crops), n, P * (1 - 1 / full), f"{who} crop rate")
        assert {h for h, _ in crops} == set(range(h_lo, h_hi + 1)), who
        _rate_ok(sum(r["flip_axis"] >= 0 for r in draws), n, P, f"{who} flip rate")
        for axis in range(3):
            _rate_ok(sum(r["flip_axis"] == axis for r in draws), n, P / 3, f"{who} flip axis {axis}")
        # noise s.d. uniform on [0, STD): below 1e-3 it hides under rounding
        sds = [r["noise_sd"] for r in draws if r["noise_sd"] > 1e-3]
        _rate_ok(len(sds), n, P * (1 - 1e-3 / STD), f"{who} noise rate")
        assert stats.kstest(sds, stats.uniform(1e-3, STD - 1e-3).cdf).pvalue > 1e-3, who
        erased = [r for r in draws if r["erase_h"]]
        _rate_ok(len(erased), n, P, f"{who} erase rate")
        assert {r["erase_h"] for r in erased} == set(range(e_lo, e_hi + 1)), who
        assert {r["erase_w"] for r in erased} == set(range(e_lo, e_hi + 1)), who
    for key in ("crop_h", "crop_w", "flip_axis", "erase_h", "erase_w"):
        _homogeneous([r[key] for r in theirs], [r[key] for r in ours], key)
    ks = stats.ks_2samp(*([r["noise_sd"] for r in draws if r["noise_sd"] > 1e-3] for draws in (theirs, ours)))
    assert ks.pvalue > 1e-3, ks


def test_draws_cover_the_specified_ranges_uniformly():
    aug = BatchVolumeAugment((24, 128, 128), prob=P, noise_std=STD)
    assert aug.crop_height_range == (111, 128) == aug.crop_width_range  # ceil(sqrt(.75) * 128)
    assert aug.erase_height_range == (12, 51) == aug.erase_width_range
    n = 20000
    dr = aug.draw(n, generator=torch.Generator().manual_seed(1))
    for flag in (dr.crop, dr.flip, dr.noise, dr.erase):
        _rate_ok(int(flag.sum()), n, P, "rate")
    # independent per patient: the four firing flags are uncorrelated
    flags = torch.stack([dr.crop, dr.flip, dr.noise, dr.erase]).double()
    assert (torch.corrcoef(flags) - torch.eye(4)).abs().max() < 0.05
    for values, (lo, hi) in ((dr.crop_height, (111, 128)), (dr.erase_width, (12, 51)), (dr.flip_axis, (0, 2))):
        counts = torch.bincount(values - lo, minlength=hi - lo + 1)
        assert len(counts) == hi - lo + 1 and stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert ((dr.crop_top >= 0) & (dr.crop_top + dr.crop_height <= 128)).all()
    assert ((dr.erase_left >= 0) & (dr.erase_left + dr.erase_width <= 128)).all()
    # the corner is uniform over the valid positions: top / (free space) is uniform on [0, 1]
    free = (128 - dr.crop_height + 1).double()
    assert stats.kstest(((dr.crop_top + torch.rand(n, dtype=torch.float64)) / free).numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest((dr.noise_std / STD).numpy(), "uniform").pvalue > 1e-3


def _only(b: int, **on) -> AugmentDraws:
    """Draws for b patients with every step off except what `on` sets (lists per patient)."""
    off, zero, one = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long)
    base = {
        "crop": off,
        "crop_top": zero,
        "crop_left": zero,
        "crop_height": one,
        "crop_width": one,
        "flip": off,
        "flip_axis": zero,
        "noise": off,
        "noise_std": torch.zeros(b),
        "erase": off,
        "erase_top": zero,
        "erase_left": zero,
        "erase_height": one,
        "erase_width": one,
    }
    base.update({k: torch.as_tensor(v, dtype=base[k].dtype) for k, v in on.items()})
    return AugmentDraws(**base)


def test_fixed_crop_matches_monai_crop_and_resize():
    """MONAI's own RandScaleCropd (as augment_pipeline builds it) picks the boxes; our crop of the
    same box must equal its crop + Resized output."""
    size = (6, 32, 40)
    crop = augment_pipeline(size, MODALITIES, prob=1.0).transforms[0].transforms[0]  # OneOf -> the crop Compose
    crop.set_random_state(3)
    x = torch.randn(5, 3, *size)
    boxes, refs = [], []
    for b in range(5):
        out = crop({m: x[b, i : i + 1].clone() for i, m in enumerate(MODALITIES)})
        _, ys, xs = crop.transforms[0].cropper._slices
        boxes.append((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start))
        refs.append(torch.cat([torch.as_tensor(out[m]) for m in MODALITIES]))
    assert len({bx[2:] for bx in boxes}) > 1  # the boxes differ in size
    top, left, height, width = zip(*boxes)
    aug = BatchVolumeAugment(size, prob=1.0)
    ours = aug.apply(x, _only(5, crop=[True] * 5, crop_top=top, crop_left=left, crop_height=height, crop_width=width))
    torch.testing.assert_close(ours, torch.stack(refs), atol=1e-4, rtol=1e-5)
    # a crop that is not square, in a corner, checked against SpatialCrop + Resize directly
    ref = Resize(size, mode="trilinear")(SpatialCrop(roi_start=(0, 4, 0), roi_end=(6, 32, 35))(x[0]))
    got = aug.apply(x[:1], _only(1, crop=[True], crop_top=[4], crop_height=[28], crop_width=[35]))[0]
    torch.testing.assert_close(got, torch.as_tensor(ref), atol=1e-4, rtol=1e-5)


def test_flip_erase_and_order_match_monai():
    size = (5, 12, 16)
    x = torch.randn(4, 2, *size)
    aug = BatchVolumeAugment(size)
    out = aug.apply(x, _only(4, flip=[True, True, True, False], flip_axis=[0, 1, 2, 1]))
    for b in range(3):
        assert torch.equal(out[b], torch.as_tensor(Flip(spatial_axis=b)(x[b])))
    assert torch.equal(out[3], x[3])
    # crop then flip (MONAI's order), then the box erased in the flipped frame
    dr = _only(
        1,
        crop=[True],
        crop_top=[1],
        crop_left=[2],
        crop_height=[10],
        crop_width=[13],
        flip=[True],
        flip_axis=[2],
        erase=[True],
        erase_top=[3],
        erase_left=[0],
        erase_height=[4],
        erase_width=[2],
    )
    ref = Resize(size, mode="trilinear")(SpatialCrop(roi_start=(0, 1, 2), roi_end=(5, 11, 15))(x[0]))
    ref = torch.as_tensor(Flip(spatial_axis=2)(ref)).clone()
    ref[:, :, 3:7, 0:2] = 0.0
    torch.testing.assert_close(aug.apply(x[:1], dr)[0], ref, atol=1e-4, rtol=1e-5)


def test_noise_is_one_field_per_patient_shared_by_its_series():
    size = (8, 64, 64)
    x = torch.zeros(3, 3, *size)
    aug = BatchVolumeAugment(size, noise_std=STD)
    out = aug.apply(
        x, _only(3, noise=[True, True, False], noise_std=[0.05, 0.02, 0.07]), torch.Generator().manual_seed(0)
    )
    assert torch.equal(out[:, 1], out[:, 0]) and torch.equal(out[:, 2], out[:, 0])
    assert abs(out[0].std().item() - 0.05) < 0.002 and abs(out[1].std().item() - 0.02) < 0.001
    assert not torch.equal(out[0, 0] / 0.05, out[1, 0] / 0.02)  # independent fields
    assert torch.equal(out[2], x[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prob_zero_is_the_identity_and_input_is_never_modified(dtype):
    x = torch.randn(6, 3, *SIZE).to(dtype)
    keep = x.clone()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(BatchVolumeAugment(SIZE, prob=0.0)(x, g), x)
    out = BatchVolumeAugment(SIZE, prob=1.0)(x, g)
    assert out.dtype == dtype and out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(x, keep)


def test_patients_that_draw_nothing_come_back_bit_for_bit():
    x = torch.randn(64, 2, *SIZE)
    aug = BatchVolumeAugment(SIZE, prob=P)
    dr = aug.draw(64, generator=torch.Generator().manual_seed(5))
    untouched = ~(dr.crop | dr.flip | dr.noise | dr.erase)
    assert 0 < int(untouched.sum()) < 64
    out = aug.apply(x, dr, torch.Generator().manual_seed(5))
    assert torch.equal(out[untouched], x[untouched])
    assert not (out[~untouched] == x[~untouched]).all(dim=(1, 2, 3, 4)).any()


def test_reproducible_per_seed():
    x = torch.randn(8, 3, *SIZE)
    aug = BatchVolumeAugment(SIZE, prob=0.5)
    a, b = (aug(x, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(8)))


def test_rejects_wrong_shapes_and_parameters():
    aug = BatchVolumeAugment(SIZE)
    with pytest.raises(ValueError, match="expected"):
        aug(torch.zeros(2, 3, 4, 32, 30))
    for bad in ({"prob": 1.5}, {"noise_std": -1.0}, {"crop_area": (0.9, 0.8)}):
        with pytest.raises(ValueError):
            BatchVolumeAugment(SIZE, **bad)


# ---------------------------------------------------------------------------- device bank


class _FakeCache:
    """What the bank needs of a VolumeCache: target_size and get(case) -> {series: [1, D, H, W]}."""

    def __init__(self, size):
        self.target_size, self.series, self.calls = size, MODALITIES, 0

    def get(self, case):
        self.calls += 1
        return {m: torch.full((1, *self.target_size), float(10 * case.n + i)) for i, m in enumerate(MODALITIES)}


class _Case:
    def __init__(self, n, label):
        self.n, self.label = n, label


def test_bank_batches_in_the_dataloader_format():
    cases = [_Case(n, n % 3) for n in range(12)]
    cache = _FakeCache(SIZE)
    bank = DeviceVolumeBank.from_cache(cache, cases, "cpu", budget_bytes=10**9)
    assert cache.calls == 12 and bank.volumes.shape == (12, 3, *SIZE) and len(bank) == 12
    assert bank.nbytes == volume_bank_bytes(12, 3, SIZE)
    batch = bank.batch([5, 0, 5])
    assert [x.shape for x in batch["images"]] == [(3, 1, *SIZE)] * 3
    assert all(x.dtype == torch.float32 and x.is_contiguous() for x in batch["images"])
    assert batch["images"][2][:, 0, 0, 0, 0].tolist() == [52.0, 2.0, 52.0]  # case 10 n + series
    assert batch["index"].tolist() == [5, 0, 5] and batch["index"].device.type == "cpu"
    assert batch["label"].tolist() == [2, 0, 2]
    # augmented on request; the bank itself stays intact
    aug = BatchVolumeAugment(SIZE, prob=1.0)
    out = bank.batch([1, 2], aug, torch.Generator().manual_seed(0))
    assert not torch.equal(out["images"][0], bank.batch([1, 2])["images"][0])
    assert torch.equal(bank.volumes[1, 0], torch.full(SIZE, 10.0))
    # bf16 storage, float32 batches
    half = DeviceVolumeBank.from_cache(cache, cases, "cpu", dtype=torch.bfloat16, budget_bytes=10**9)
    assert half.nbytes * 2 == bank.nbytes and half.batch([3])["images"][0].dtype == torch.float32


def test_bank_refuses_what_does_not_fit():
    # the paper's MEN cohort: 796 patients x 3 series x 24x128x128
    assert volume_bank_bytes(796, 3, (24, 128, 128)) == 796 * 3 * 24 * 128 * 128 * 4
    assert round(volume_bank_bytes(796, 3, (24, 128, 128)) / 2**30, 2) == 3.50
    assert round(volume_bank_bytes(796, 3, (24, 128, 128), torch.bfloat16) / 2**30, 2) == 1.75
    with pytest.raises(BankTooLarge, match=r"needs 3\.50 GiB \(in bfloat16: 1\.75 GiB\), over the 2\.00 GiB"):
        check_bank_fits((796, 3, 24, 128, 128), torch.float32, "cpu", budget_bytes=2 * 2**30)
    assert check_bank_fits((796, 3, 24, 128, 128), torch.bfloat16, "cpu", budget_bytes=2 * 2**30) > 0
    cache = _FakeCache(SIZE)
    with pytest.raises(BankTooLarge):
        DeviceVolumeBank.from_cache(cache, [_Case(0, 0), _Case(1, 1)], "cpu", budget_bytes=1000)
    assert cache.calls == 0  # refused before reading anything


def test_device_batches_follow_the_sampler_and_replay_per_seed():
    labels = [0] * 10 + [1] * 6 + [2] * 4
    bank = DeviceVolumeBank(torch.randn(20, 3, *SIZE), labels)
    sampler = ClassBalancedBatchSampler(labels, batch_size=6, seed=0)
    loader = DeviceBatches(bank, sampler, BatchVolumeAugment(SIZE, prob=0.5))
    assert len(loader) == len(sampler) == 3
    loader.manual_seed(11)
    first = list(loader)
    assert [b["index"].tolist() for b in first] == list(sampler)
    assert all(sorted(set(b["label"].tolist())) == [0, 1, 2] for b in first)
    loader.manual_seed(11)
    again = list(loader)
    assert all(torch.equal(a["images"][0], b["images"][0]) for a, b in zip(first, again))
    evaluation = DeviceBatches(bank, chunked(range(20), 8))
    assert [len(b["index"]) for b in evaluation] == [8, 8, 4]
    assert torch.equal(next(iter(evaluation))["images"][1][:, 0], bank.volumes[:8, 1])


def test_bank_batches_falls_back_to_bf16_then_refuses():
    class Dataset:  # what bank_batches reads of a VolumeDataset
        cache, cases = _FakeCache(SIZE), [_Case(n, n % 3) for n in range(6)]

    fp32 = volume_bank_bytes(6, 3, SIZE)
    batches = bank_batches(Dataset, chunked(range(6), 4), "cpu", budget_bytes=fp32)
    assert batches.bank.volumes.dtype == torch.float32 and len(batches) == 2
    batches = bank_batches(Dataset, chunked(range(6), 4), "cpu", BatchVolumeAugment(SIZE), budget_bytes=fp32 - 1)
    assert batches.bank.volumes.dtype == torch.bfloat16 and batches.augment is not None
    with pytest.raises(BankTooLarge):
        bank_batches(Dataset, chunked(range(6), 4), "cpu", budget_bytes=fp32 // 2 - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_cpu_implementation():
    dev = torch.device("cuda")
    x = torch.randn(6, 3, *SIZE)
    aug = BatchVolumeAugment(SIZE, prob=0.7)
    dr = aug.draw(6, generator=torch.Generator().manual_seed(0))
    dr_dev = AugmentDraws(**{k: getattr(dr, k).to(dev) for k in dr.__dataclass_fields__})
    dr.noise[:] = False
    dr_dev.noise[:] = False  # the noise fields come from different generators
    torch.testing.assert_close(aug.apply(x.to(dev), dr_dev).cpu(), aug.apply(x, dr), atol=1e-4, rtol=1e-5)
    g = torch.Generator(device=dev).manual_seed(0)
    out = DeviceVolumeBank(x, [0] * 6, device=dev).batch(range(6), aug, g)
    assert out["images"][0].device.type == "cuda" and out["label"].device.type == "cuda"
