"""Checks of one patient's 3D series (NIfTI): present, readable, usable, on one space.

Header checks (shape, affine) always run; `deep=True` also decompresses every voxel, which
catches truncated or corrupt files, non-finite values and blank (near-constant) series.
Series on different voxel grids are fine (preprocessing resamples them onto the first
series' grid) as long as they lie in one space: a rotation beyond GRID_MAX_ANGLE_DEG or too
little overlap with the reference field of view is a problem.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from cfcml.datasets.cohort import Problem

GRID_MIN_COVERAGE = 0.8  # fraction of the reference field of view another series must cover
GRID_MAX_ANGLE_DEG = 10.0  # largest rotation between voxel axes (flips/permutations are fine)
MIN_VOXELS_PER_AXIS = 4  # a 1x1x1 or 2-slice "volume" is not an image the encoders can use
MASK = "mask"


class UnusableImage(ValueError):
    """The file reads but holds no usable image (our own checks, not a decoder error)."""


def read_grid(path: Path, deep: bool, is_mask: bool = False):
    """(shape, affine) of a 3D NIfTI; raises UnusableImage, or the decoder's error when it is corrupt."""
    import nibabel as nib  # ~1 s to import: only when a volume is read (photo cohorts never)

    header = None
    if not deep:  # parse only the 348-byte header: ~3x faster than nib.load
        try:
            with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
                header = nib.Nifti1Header.from_fileobj(f, check=True)
        except Exception:  # noqa: BLE001 - let nib.load below report the real error
            header = None
    img = nib.load(str(path)) if header is None else None
    header = img.header if header is None else header
    shape, affine = header.get_data_shape(), header.get_best_affine()
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape[:3]) < 1:
        raise UnusableImage(f"expected a 3D volume, got shape {shape}")
    if not is_mask and min(shape[:3]) < MIN_VOXELS_PER_AXIS:
        raise UnusableImage(
            f"{'x'.join(map(str, shape[:3]))} voxels: too small to be an image "
            f"(at least {MIN_VOXELS_PER_AXIS} per axis)"
        )
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UnusableImage("invalid affine (singular or non-finite)")
    if deep:
        data = np.asanyarray(img.dataobj)
        if not np.all(np.isfinite(data)):
            raise UnusableImage("voxel data hold NaN or infinite values")
        if is_mask and not np.any(data > 0):
            raise UnusableImage("the mask is empty (no voxel > 0)")
        if not is_mask:
            why = blank_reason(data)
            if why:
                raise UnusableImage(why)
    return tuple(shape[:3]), affine


def blank_reason(data: np.ndarray) -> str | None:
    """Why a series holds no image (all one value, or nearly), or None."""
    lo, hi = float(np.min(data)), float(np.max(data))
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        return f"blank series: every voxel is {lo:g}"
    if float(np.std(data)) <= 1e-4 * (hi - lo):
        return "near-constant series: almost every voxel has the same value"
    return None


def grid_mismatch(ref, other) -> str | None:
    """Why `other` (shape, affine) cannot be resampled onto `ref`, or None when it can."""
    (rshape, raff), (oshape, oaff) = ref, other
    rdir = raff[:3, :3] / np.linalg.norm(raff[:3, :3], axis=0)
    odir = oaff[:3, :3] / np.linalg.norm(oaff[:3, :3], axis=0)
    best_cos = np.abs(rdir.T @ odir).max(axis=1).min()  # worst-aligned axis after matching
    angle = math.degrees(math.acos(min(1.0, float(best_cos))))
    if angle > GRID_MAX_ANGLE_DEG:
        return f"its axes are rotated {angle:.0f} degrees from the reference (tolerance {GRID_MAX_ANGLE_DEG:.0f})"
    rlo, rhi = _world_box(rshape, raff)
    olo, ohi = _world_box(oshape, oaff)
    inter = np.clip(np.minimum(rhi, ohi) - np.maximum(rlo, olo), 0, None).prod()
    cover = float(inter / (rhi - rlo).prod())
    if cover < GRID_MIN_COVERAGE:
        return f"it covers {cover:.0%} of the reference field of view (needs {GRID_MIN_COVERAGE:.0%})"
    return None


def _world_box(shape, affine):
    """Axis-aligned world bounding box (mm) of a voxel grid, voxel edges included."""
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def short_error(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}").splitlines()[0][:200]


def check_series(paths: dict[str, Path], rels: dict[str, str], case_id: str, deep: bool) -> list[Problem]:
    """Problems of one patient's series (+ optional 'mask'); the first series is the reference grid."""
    problems, loaded = [], {}
    for name, path in paths.items():
        try:
            loaded[name] = read_grid(path, deep, is_mask=name == MASK)
        except Exception as e:  # noqa: BLE001 - nibabel/gzip/numpy raise many types for corrupt files
            what = (
                f"unusable NIfTI: {e}"
                if isinstance(e, UnusableImage)
                else f"unreadable or corrupt NIfTI: {short_error(e)}"
            )
            problems.append(Problem(rels[name], case_id, name, what))
    ref = next(iter(paths))
    if ref in loaded:
        for name, grid in loaded.items():
            msg = grid_mismatch(loaded[ref], grid) if name != ref else None
            if msg:
                problems.append(Problem(rels[name], case_id, name, f"cannot be put on the {ref} grid: {msg}"))
    return problems
