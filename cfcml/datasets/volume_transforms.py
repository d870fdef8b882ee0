"""3D preprocessing (deterministic, cacheable) and augmentation (random) of a patient's MRI
series, as MONAI dictionary transforms (SPEC §1; any number of series, named by the cohort).

Input of `deterministic_pipeline`: {series: path, ...[, "mask": path]} (see `case_to_dict`);
the first series is the reference grid the others are resampled onto (T1C for MEN).
Output: {series: tensor}, each plain float32 [1, D, H, W] with D the slice axis — the
paper's 24x128x128 is (D, H, W) = (Z, Y, X), while NIfTI/MONAI arrays are (X, Y, Z), hence
the transpose at the end.

`augment_pipeline` takes and returns that same dictionary; the cache sits between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    Identityd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    OneOf,
    Orientationd,
    RandAxisFlipd,
    RandCoarseDropoutd,
    RandGaussianNoised,
    RandScaleCropd,
    ResampleToMatchd,
    Resized,
    ScaleIntensityRanged,
    SpatialPad,
    Transposed,
)

PIPELINE_VERSION = 2  # bump whenever deterministic output changes: it keys the volume cache
CLIP = (0.0, 1200.0)  # SPEC §1; mostly bounds ADC (CSF ~3000)
MASK = "mask"


def case_to_dict(case, series: Sequence[str]) -> dict:
    """The pipeline input for one `Case`: series paths by name, plus the mask if any."""
    d = {m: str(p) for m, p in zip(series, case.images) if p is not None}
    if case.mask is not None:
        d[MASK] = str(case.mask)
    return d


class EnsureMaskd(MapTransform):
    """Add an all-ones ROI on the reference grid when a patient has no mask (= whole volume)."""

    def __init__(self, ref_key: str, mask_key: str = MASK):
        super().__init__([mask_key], allow_missing_keys=True)
        self.ref_key, self.mask_key = ref_key, mask_key

    def __call__(self, data):
        d = dict(data)
        if self.mask_key not in d:
            d[self.mask_key] = torch.ones_like(d[self.ref_key])  # keeps the MetaTensor's affine
        return d


class PadToSquareInPlaned(MapTransform):
    """Zero-pad (X, Y) symmetrically to a square; Z is untouched. Arrays are [C, X, Y, Z]."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            side = max(d[key].shape[1:3])
            d[key] = SpatialPad((side, side, -1), mode="constant")(d[key])
        return d


def deterministic_pipeline(
    target_size: Sequence[int], series: Sequence[str], clip: tuple[float, float] = CLIP
) -> Compose:
    """Load, put all series on the first series' grid, ROI-crop, pad square, resize to
    `target_size` = (D, H, W), clip and z-score each series over its non-zero voxels.
    """
    d, h, w = (int(s) for s in target_size)
    series = list(series)
    ref, others = series[0], series[1:]
    return Compose(
        [
            LoadImaged(
                series + [MASK],
                reader="NibabelReader",
                ensure_channel_first=True,
                image_only=True,
                allow_missing_keys=True,
            ),
            # RAS voxel order: the last axis runs inferior->superior, the slice axis of axial MRI.
            Orientationd([ref], axcodes="RAS", labels=None),
            # Different grids over the same space: resample by their affines; outside is background.
            ResampleToMatchd(
                others + [MASK],
                key_dst=ref,
                mode=["bilinear"] * len(others) + ["nearest"],
                padding_mode="zeros",
                dtype=torch.float32,
                allow_missing_keys=True,
            ),
            EnsureMaskd(ref, MASK),
            CropForegroundd(series, source_key=MASK, start_coord_key=None, end_coord_key=None),  # ROI box
            DeleteItemsd(MASK),
            PadToSquareInPlaned(series),
            Resized(series, spatial_size=(w, h, d), mode="trilinear", anti_aliasing=True),  # (X, Y, Z)
            Transposed(series, indices=(0, 3, 2, 1)),  # [1, X, Y, Z] -> [1, Z, Y, X] = [1, D, H, W]
            ScaleIntensityRanged(series, a_min=clip[0], a_max=clip[1], b_min=clip[0], b_max=clip[1], clip=True),
            NormalizeIntensityd(series, nonzero=True, channel_wise=True),  # background stays 0
            EnsureTyped(series, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def augment_pipeline(
    target_size: Sequence[int],
    series: Sequence[str],
    prob: float = 0.3,
    noise_std: float = 0.1,
    crop_area: tuple[float, float] = (0.75, 1.0),
) -> Compose:
    """Training augmentation on preprocessed [1, D, H, W] tensors, each step with `prob`.

    Every step draws once per sample and applies the same draw to all series (one crop, one
    flip axis, one noise field, one erased box), so the modalities stay aligned.
    - random resized crop: an in-plane box covering `crop_area` of the slice (all slices kept),
      resized back to `target_size`;
    - flip along one random axis;
    - Gaussian noise (s.d. `noise_std`, the images are z-scored);
    - random erasing: one box through all slices, 10-40 % of each in-plane side, set to 0.
    """
    d, h, w = (int(s) for s in target_size)
    keys = list(series)
    side_min = crop_area[0] ** 0.5
    crop = Compose(
        [
            RandScaleCropd(
                keys,
                roi_scale=(1.0, side_min, side_min),
                max_roi_scale=(1.0, crop_area[1] ** 0.5, crop_area[1] ** 0.5),
                random_size=True,
            ),
            Resized(keys, spatial_size=(d, h, w), mode="trilinear"),
        ]
    )
    erase = RandCoarseDropoutd(
        keys,
        holes=1,
        spatial_size=(-1, max(1, h // 10), max(1, w // 10)),
        max_spatial_size=(-1, max(1, 2 * h // 5), max(1, 2 * w // 5)),
        fill_value=0.0,
        prob=prob,
    )
    return Compose(
        [
            OneOf([crop, Identityd(keys)], weights=[prob, 1.0 - prob]),
            RandAxisFlipd(keys, prob=prob),
            RandGaussianNoised(keys, prob=prob, std=noise_std),
            erase,
            EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )
