"""MEN training augmentation applied to a whole batch on the device that holds it, and the
device-resident volumes it reads from.

`BatchVolumeAugment` is `volume_transforms.augment_pipeline` (MONAI, one patient at a time on
the CPU) re-expressed over a batch [B, S, D, H, W]: same steps in the same order, same
probabilities, same parameter distributions, drawn independently per patient and shared by
the S series of a patient:

1. random resized crop, with probability `prob` (MONAI: `OneOf([crop, identity],
   weights=[prob, 1 - prob])`): an in-plane box, height and width drawn independently and
   uniformly from the integers ceil(sqrt(crop_area[0]) * side) .. ceil(sqrt(crop_area[1]) * side)
   (`RandScaleCrop(random_size=True)`), its corner uniform over the valid positions, all slices
   kept; resized back with trilinear interpolation, align_corners=False (`Resized`);
2. flip along one spatial axis (D, H or W, uniform) with probability `prob` (`RandAxisFlip`);
3. Gaussian noise with probability `prob`: s.d. uniform in [0, noise_std)
   (`RandGaussianNoise(sample_std=True)`), ONE field added to every series (MONAI's dictionary
   version shares the noise between keys);
4. erasing with probability `prob`: one box through all slices and series, height and width
   uniform in max(1, side // 10) .. max(1, 2 * side // 5), corner uniform, set to 0
   (`RandCoarseDropout(holes=1)`).

The crop is one bilinear `grid_sample` at the source positions PyTorch's
`interpolate(align_corners=False)` uses, so a cropped patient equals MONAI's crop + resize up
to float rounding; flips, noise and erasing are exact; a patient no step fires for comes back
bit for bit. Each step touches only the patients it fires for (selected by index, vectorised,
no loop over patients), which keeps the CPU path cheap at p = 0.3; on a GPU the whole batch is
a handful of memory passes.

`DeviceVolumeBank` keeps a split's preprocessed volumes as one [N, S, D, H, W] tensor on a
device and returns batches in the DataLoader's format; `DeviceBatches` iterates it over a
batch sampler's index lists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

_UNIFORMS = 14  # columns of the per-patient uniform draws, see BatchVolumeAugment.draw


@dataclass
class AugmentDraws:
    """The random parameters of one batch, one entry per patient (tensors [B], one device).

    Box coordinates are in voxels of the (D, H, W) volume; where a step does not fire its
    parameters are still drawn but unused. `flip_axis`: 0 = D, 1 = H, 2 = W.
    """

    crop: torch.Tensor  # bool
    crop_top: torch.Tensor  # long
    crop_left: torch.Tensor
    crop_height: torch.Tensor
    crop_width: torch.Tensor
    flip: torch.Tensor  # bool
    flip_axis: torch.Tensor  # long
    noise: torch.Tensor  # bool
    noise_std: torch.Tensor  # float32
    erase: torch.Tensor  # bool
    erase_top: torch.Tensor  # long
    erase_left: torch.Tensor
    erase_height: torch.Tensor
    erase_width: torch.Tensor

    def subset(self, rows: torch.Tensor) -> AugmentDraws:
        return AugmentDraws(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def _randint(u: torch.Tensor, low, high) -> torch.Tensor:
    """Uniform integers in [low, high] (inclusive; tensors or ints) from uniforms u in [0, 1)."""
    low = torch.as_tensor(low, device=u.device)
    span = torch.as_tensor(high, device=u.device) - low + 1
    return low + torch.minimum(torch.floor(u * span).long(), span - 1)


class BatchVolumeAugment:
    """`augment_pipeline(target_size, prob, noise_std, crop_area)` over a batch, on its device.

    `aug(x, generator)` with x [B, S, D, H, W] (float32, bf16 or fp16, any device, (D, H, W) ==
    `target_size`) returns a new tensor of the same shape and dtype; x is never modified. The
    arithmetic runs in float32. `generator` must live on x's device (a CUDA generator for
    CUDA tensors); None uses that device's default generator.
    """

    def __init__(
        self,
        target_size: Sequence[int],
        prob: float = 0.3,
        noise_std: float = 0.1,
        crop_area: tuple[float, float] = (0.75, 1.0),
    ):
        d, h, w = (int(s) for s in target_size)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if not 0.0 < crop_area[0] <= crop_area[1] <= 1.0:
            raise ValueError(f"crop_area must satisfy 0 < min <= max <= 1, got {crop_area}")
        self.target_size = (d, h, w)
        self.prob, self.noise_std = float(prob), float(noise_std)
        self.crop_area = (float(crop_area[0]), float(crop_area[1]))
        # The same integer bounds MONAI computes (RandScaleCrop: ceil(scale * size); the dropout's
        # spatial_size / max_spatial_size as augment_pipeline passes them).
        lo, hi = crop_area[0] ** 0.5, crop_area[1] ** 0.5
        self.crop_height_range = (math.ceil(lo * h), math.ceil(hi * h))
        self.crop_width_range = (math.ceil(lo * w), math.ceil(hi * w))
        self.erase_height_range = (max(1, h // 10), max(1, 2 * h // 5))
        self.erase_width_range = (max(1, w // 10), max(1, 2 * w // 5))

    def __repr__(self) -> str:
        return (
            f"BatchVolumeAugment(target_size={self.target_size}, prob={self.prob}, "
            f"noise_std={self.noise_std}, crop_area={self.crop_area})"
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], x.device, generator), generator)

    # ------------------------------------------------------------------ draws

    def draw(self, batch: int, device=None, generator: torch.Generator | None = None) -> AugmentDraws:
        """Independent parameters for `batch` patients (one tensor op; nothing leaves `device`)."""
        _, h, w = self.target_size
        u = torch.rand(batch, _UNIFORMS, generator=generator, device=device, dtype=torch.float64).unbind(1)
        crop_h = _randint(u[1], *self.crop_height_range)
        crop_w = _randint(u[2], *self.crop_width_range)
        erase_h = _randint(u[10], *self.erase_height_range)
        erase_w = _randint(u[11], *self.erase_width_range)
        return AugmentDraws(
            crop=u[0] < self.prob,
            crop_height=crop_h,
            crop_width=crop_w,
            crop_top=_randint(u[3], 0, h - crop_h),
            crop_left=_randint(u[4], 0, w - crop_w),
            flip=u[5] < self.prob,
            flip_axis=_randint(u[6], 0, 2),
            noise=u[7] < self.prob,
            noise_std=(u[8] * self.noise_std).float(),
            erase=u[9] < self.prob,
            erase_height=erase_h,
            erase_width=erase_w,
            erase_top=_randint(u[12], 0, h - erase_h),
            erase_left=_randint(u[13], 0, w - erase_w),
        )

    # ------------------------------------------------------------------ application

    def apply(self, x: torch.Tensor, draws: AugmentDraws, generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply `draws` to x [B, S, D, H, W] in MONAI's order: crop, flip, noise, erase."""
        if x.dim() != 5 or tuple(x.shape[2:]) != self.target_size:
            raise ValueError(f"expected [B, S, {', '.join(map(str, self.target_size))}], got {list(x.shape)}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = x.to(work, copy=True)
        rows = torch.nonzero(draws.crop).squeeze(1)
        if rows.numel():
            out[rows] = self._crop_resize(out[rows], draws.subset(rows))
        for axis in range(3):  # after the crop, as in MONAI; a patient flips along one axis at most
            rows = torch.nonzero(draws.flip & (draws.flip_axis == axis)).squeeze(1)
            if rows.numel():
                out[rows] = out[rows].flip(2 + axis)
        rows = torch.nonzero(draws.noise).squeeze(1)
        if rows.numel():
            field = torch.randn((rows.numel(), 1, *self.target_size), generator=generator, device=x.device, dtype=work)
            out[rows] += field * draws.noise_std[rows].to(work).view(-1, 1, 1, 1, 1)  # one field for all series
        out.masked_fill_(self._erase_mask(draws, x.device), 0.0)
        return out.to(x.dtype)

    def _crop_resize(self, y: torch.Tensor, dr: AugmentDraws) -> torch.Tensor:
        """y [k, S, D, H, W] -> each row's in-plane box resized back to (H, W), slices untouched.

        One bilinear `grid_sample` over the S * D slices at the source positions that
        `interpolate(mode="trilinear", align_corners=False)` uses for a box of that size (the
        slice axis keeps its size, so its trilinear weights are exactly 0 and 1)."""
        k, s, d, h, w = y.shape
        rows = _source_positions(dr.crop_top, dr.crop_height, h)  # [k, H] in voxels of the full slice
        cols = _source_positions(dr.crop_left, dr.crop_width, w)  # [k, W]
        # align_corners=True maps -1 .. 1 onto voxel centres 0 .. size - 1.
        gy = (rows * (2.0 / (h - 1)) - 1.0) if h > 1 else torch.zeros_like(rows)
        gx = (cols * (2.0 / (w - 1)) - 1.0) if w > 1 else torch.zeros_like(cols)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1).to(y.dtype)
        out = F.grid_sample(y.reshape(k, s * d, h, w), grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out.view(k, s, d, h, w)

    def _erase_mask(self, dr: AugmentDraws, device) -> torch.Tensor:
        """[B, 1, 1, H, W] True inside each firing patient's box (all slices, all series)."""
        _, h, w = self.target_size
        ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
        in_rows = (ys >= dr.erase_top[:, None]) & (ys < (dr.erase_top + dr.erase_height)[:, None])
        in_cols = (xs >= dr.erase_left[:, None]) & (xs < (dr.erase_left + dr.erase_width)[:, None])
        mask = dr.erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
        return mask[:, None, None]


def _source_positions(start: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """[k, n] float64 source positions of a linear resize of [start, start + length) to n samples,
    PyTorch's align_corners=False rule: (i + 0.5) * length / n - 0.5, clamped to [0, length - 1]."""
    dst = torch.arange(n, device=start.device, dtype=torch.float64)
    scale = (length.double() / n)[:, None]
    src = (scale * (dst + 0.5) - 0.5).clamp_min(0.0)
    return torch.minimum(src, (length - 1).double()[:, None]) + start.double()[:, None]


# ---------------------------------------------------------------------- device-resident volumes


class BankTooLarge(MemoryError):
    """The volumes would not fit the memory budget given to the bank."""


def volume_bank_bytes(num_cases: int, num_series: int, size: Sequence[int], dtype=torch.float32) -> int:
    """Bytes a [num_cases, num_series, *size] bank takes. The paper's MEN cohort, 796 patients x
    3 series x 24x128x128: 3.50 GiB in float32, 1.75 GiB in bf16."""
    return num_cases * num_series * math.prod(int(s) for s in size) * torch.empty((), dtype=dtype).element_size()


def default_budget_bytes(device) -> int | None:
    """A quarter of the device's free memory (the model and its activations need the rest);
    None when it cannot be measured."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return None


def _resolve(device) -> torch.device:
    """'cuda' -> 'cuda:<current>', so device comparisons mean what they say."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_bank_fits(shape: Sequence[int], dtype, device, budget_bytes: int | None = None) -> int:
    """Bytes of a bank of `shape` [N, S, D, H, W]; raises `BankTooLarge` (saying what it needs and
    what bf16 would need) when that exceeds `budget_bytes` (default `default_budget_bytes(device)`)."""
    n, s, *size = (int(v) for v in shape)
    need = volume_bank_bytes(n, s, size, dtype)
    budget = default_budget_bytes(device) if budget_bytes is None else budget_bytes
    if budget is not None and need > budget:
        hint = ""
        if torch.empty((), dtype=dtype).element_size() > 2:
            hint = f" (in bfloat16: {_gib(volume_bank_bytes(n, s, size, torch.bfloat16))})"
        raise BankTooLarge(
            f"a device volume bank of {n} cases x {s} series x {'x'.join(map(str, size))} {dtype} needs "
            f"{_gib(need)}{hint}, over the {_gib(budget)} budget on {torch.device(device)}; "
            "store it in bfloat16, raise the budget, or keep the volumes on the host (per-sample augmentation)"
        )
    return need


class DeviceVolumeBank:
    """A split's preprocessed volumes [N, S, D, H, W] and labels [N], resident on one device.

    `batch(indices, augment, generator)` -> the DataLoader's batch format for those dataset
    positions: {"images": S tensors float32 [B, 1, D, H, W] on the device, "index": long [B] on
    the CPU (positions, for the CPU-side tabular tables), "label": long [B] on the device}.
    """

    def __init__(self, volumes: torch.Tensor, labels, device=None, budget_bytes: int | None = None):
        """Hold `volumes` [N, S, D, H, W] (moved to `device` if given; that move is refused when it
        would exceed `budget_bytes`, default `default_budget_bytes(device)`) and `labels` [N]."""
        if volumes.dim() != 5:
            raise ValueError(f"volumes must be [N, S, D, H, W], got {list(volumes.shape)}")
        device = _resolve(device) if device is not None else volumes.device
        if volumes.device != device:
            check_bank_fits(volumes.shape, volumes.dtype, device, budget_bytes)
        self.volumes = volumes.to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        if len(self.labels) != len(self.volumes):
            raise ValueError(f"{len(self.labels)} labels for {len(self.volumes)} volumes")

    @classmethod
    def from_cache(
        cls,
        cache,
        cases,
        device,
        dtype=torch.float32,
        budget_bytes: int | None = None,
        series: Sequence[str] | None = None,
    ) -> DeviceVolumeBank:
        """Fill a bank from `cache.get(case)` (a `VolumeCache`), one case at a time, straight into
        device memory (no second host copy of the cohort). Refuses before allocating when the
        bank would exceed `budget_bytes` (default: `default_budget_bytes(device)`)."""
        cases, device = list(cases), _resolve(device)
        series = tuple(series or cache.series)
        shape = (len(cases), len(series), *cache.target_size)
        check_bank_fits(shape, dtype, device, budget_bytes)
        volumes = torch.empty(shape, dtype=dtype, device=device)
        for i, case in enumerate(cases):
            vols = cache.get(case)
            volumes[i] = torch.cat([vols[m] for m in series]).to(device=device, dtype=dtype)
        return cls(volumes, [c.label for c in cases])

    def __len__(self) -> int:
        return len(self.volumes)

    @property
    def device(self) -> torch.device:
        return self.volumes.device

    @property
    def nbytes(self) -> int:
        return self.volumes.numel() * self.volumes.element_size()

    def batch(
        self, indices, augment: BatchVolumeAugment | None = None, generator: torch.Generator | None = None
    ) -> dict:
        """The batch of dataset positions `indices`, augmented on the device when `augment` is given."""
        index = torch.as_tensor(list(indices) if not torch.is_tensor(indices) else indices, dtype=torch.long)
        on_device = index.to(self.device)
        x = self.volumes.index_select(0, on_device)
        x = augment(x, generator) if augment is not None else x
        x = x.float()
        return {
            "images": [x[:, s : s + 1].contiguous() for s in range(x.shape[1])],
            "index": index.cpu(),
            "label": self.labels.index_select(0, on_device),
        }


class DeviceBatches:
    """A drop-in for the engine's DataLoader over a bank: iterates `batch_sampler` (any iterable
    of index lists with a length, e.g. `ClassBalancedBatchSampler`, or `chunked(...)`).

    Call `manual_seed(seed)` at the start of each epoch for reproducible augmentation.
    """

    def __init__(
        self,
        bank: DeviceVolumeBank,
        batch_sampler: Iterable,
        augment: BatchVolumeAugment | None = None,
        generator: torch.Generator | None = None,
    ):
        self.bank, self.batch_sampler, self.augment = bank, batch_sampler, augment
        self.generator = generator if generator is not None else torch.Generator(device=bank.device)

    def manual_seed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for indices in self.batch_sampler:
            yield self.bank.batch(indices, self.augment, self.generator)


def bank_batches(
    dataset, batch_sampler: Iterable, device, augment: BatchVolumeAugment | None = None, budget_bytes: int | None = None
) -> DeviceBatches:
    """The device path for a `VolumeDataset` (its `cache` and `cases`): the cases in a bank on
    `device`, float32 when it fits `budget_bytes`, else bf16 (training autocasts to bf16 on CUDA
    anyway), iterated over `batch_sampler` and augmented there when `augment` is given. Raises
    `BankTooLarge` when neither fits (the caller then keeps its DataLoader)."""
    try:
        bank = DeviceVolumeBank.from_cache(dataset.cache, dataset.cases, device, torch.float32, budget_bytes)
    except BankTooLarge:
        bank = DeviceVolumeBank.from_cache(dataset.cache, dataset.cases, device, torch.bfloat16, budget_bytes)
    return DeviceBatches(bank, batch_sampler, augment)


def chunked(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches of `indices` (the evaluation order, last batch short)."""
    indices = list(indices)
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
