"""2D image pipeline for Derm7pt: decode + resize once (cached), then joint augmentation.

The deterministic part (JPEG decode, RGB, resize to the model size) runs once per file and is
kept in memory as uint8 [3, H, W] (224² × 3 B = 150 KB; 827 cases × 2 images ≈ 250 MB).
Augmentation (SPEC §4) runs on that cached tensor every time; the photos of a case always
share one geometric draw (flips, shift-scale-rotate, rotate-90). Two pipelines
(`data.augment`):
- `authors` (`AuthorsAugmentation`), what the authors' code did with albumentations: the
  whole pipeline runs with probability p and then each step with p (their p = 0.5, so each
  step fires in a quarter of the samples and half of them are left untouched); shift ±6.25 %,
  scale ±50 %, rotate ±45° with mirrored borders; brightness/contrast ±20 % on the *clinical
  photo only* (they passed the dermoscopy photo as albumentations' `mask`, which photometric
  steps skip and geometric steps resample with nearest-neighbour interpolation; we do the same).
- `default`, ours (`train_augmentation`): each step independently with p, scale ±10 %,
  black borders, brightness/contrast on both photos alike.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from cfcml.datasets.photo_checks import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLORS = ("rgb_imagenet", "bgr_255")
AUGMENTS = ("authors", "default")


def as_hw(size) -> tuple[int, int]:
    """224 | (224, 224) | [224, 224] -> (H, W)."""
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def decode_resized(path, size) -> torch.Tensor:
    """JPEG -> RGB uint8 [3, H, W] at `size` (aspect ratio not kept, as in the paper).

    `draft` lets the JPEG decoder itself shrink by 1/2, 1/4 or 1/8 while staying at least
    `size` (2-4x faster decodes); PIL's bilinear resize then antialiases the rest of the way.
    """
    h, w = as_hw(size)
    try:
        with Image.open(path) as im:
            im.draft("RGB", (w, h))
            im.load()
            im = to_rgb(im).resize((w, h), Image.BILINEAR)  # 16-bit, palette and alpha converted right
    except Exception as e:
        raise OSError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


class ImageCache:
    """Path -> decoded, resized uint8 image; `decode_count` counts real decodes.

    Warm it in the main process before DataLoader workers fork, so workers inherit it
    instead of each decoding (and holding) their own copy.
    """

    def __init__(self, size):
        self.size = as_hw(size)
        self.decode_count = 0
        self._images: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._images)

    def get(self, path) -> torch.Tensor:
        key = str(path)
        img = self._images.get(key)
        if img is None:
            img = self._images[key] = decode_resized(key, self.size)
            self.decode_count += 1
        return img

    def warm(self, paths, threads: int | None = None) -> None:
        """Decode every not-yet-cached path (PIL releases the GIL, so threads help)."""
        todo = list(dict.fromkeys(str(p) for p in paths if str(p) not in self._images))
        threads = threads or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for key, img in zip(todo, pool.map(lambda p: decode_resized(p, self.size), todo)):
                self._images[key] = img
        self.decode_count += len(todo)


class RandomRotate90(v2.Transform):
    """Rotate by k·90°, k uniform in {0, 1, 2, 3}, with probability p (one k for all inputs).

    On non-square images only k ∈ {0, 2} keeps the shape, so only those are drawn.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs) -> dict:
        if torch.rand(1).item() >= self.p:
            return {"k": 0}
        images = [x for x in flat_inputs if isinstance(x, torch.Tensor)]
        square = all(x.shape[-1] == x.shape[-2] for x in images)
        k = int(torch.randint(0, 4, (1,)).item()) if square else 2 * int(torch.randint(0, 2, (1,)).item())
        return {"k": k}

    def transform(self, inpt, params):
        if params["k"] == 0:
            return inpt
        out = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def train_augmentation(p: float = 0.5) -> v2.Compose:
    """Our (`default`) Derm7pt augmentation: each step independently with probability p, one
    parameter draw for all photos of a case.

    Limits are albumentations' ShiftScaleRotate/RandomBrightnessContrast defaults (shift ±6.25 %,
    scale ±10 %, rotate ±45°, brightness/contrast ±20 %), milder than the authors' scale ±50 %.
    Pixels moved in from outside are black (dermoscopy corners are dark anyway).
    """
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p),
            v2.RandomVerticalFlip(p),
            v2.RandomApply(
                [
                    v2.RandomAffine(
                        degrees=45,
                        translate=(0.0625, 0.0625),
                        scale=(0.9, 1.1),
                        interpolation=v2.InterpolationMode.BILINEAR,
                    )
                ],
                p=p,
            ),
            RandomRotate90(p),
            v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=p),
        ]
    )


class AuthorsAugmentation:
    """The authors' Derm7pt augmentation on uint8 [3, H, W] photos (clinical photo first).

    Their albumentations pipeline, step by step: vertical flip, horizontal flip,
    shift-scale-rotate (shift ±0.0625 of the size, scale 1 ± 0.5, angle ±45°, rotation about the
    centre, mirrored (reflect-101) borders), rotate by k·90° with k uniform in {0, 1, 2, 3},
    brightness/contrast (x·α + 255·β, α ∈ 1 ± 0.2, β ∈ ±0.2, clipped). The whole pipeline runs
    with probability p, then each step with p. Geometry is drawn once per case and applied to
    every photo; the first photo is resampled bilinearly and gets brightness/contrast, the others
    (their `mask`) are resampled nearest-neighbour and keep their colours.
    """

    shift, scale, degrees = 0.0625, 0.5, 45.0
    brightness, contrast = 0.2, 0.2

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def _fires(self) -> bool:
        return torch.rand(1).item() < self.p

    def draw(self, height: int, width: int) -> dict:
        """One parameter set (torch's RNG, so DataLoader workers seed it); None = step skipped."""
        out = {"vflip": False, "hflip": False, "ssr": None, "k": 0, "bc": None}
        if not self._fires():
            return out
        out["vflip"], out["hflip"] = self._fires(), self._fires()
        if self._fires():
            u = torch.rand(4).tolist()
            out["ssr"] = {
                "angle": (2 * u[0] - 1) * self.degrees,
                "scale": 1 + (2 * u[1] - 1) * self.scale,
                "dx": (2 * u[2] - 1) * self.shift,
                "dy": (2 * u[3] - 1) * self.shift,
            }
        if self._fires():  # k = 0 is one of the four outcomes, as in albumentations
            k = int(torch.randint(0, 4, (1,)).item())
            out["k"] = k if height == width else 2 * (k % 2)  # non-square: only shape-keeping turns
        if self._fires():
            u = torch.rand(2).tolist()
            out["bc"] = {"alpha": 1 + (2 * u[0] - 1) * self.contrast, "beta": (2 * u[1] - 1) * self.brightness}
        return out

    def apply(self, images: list[torch.Tensor], params: dict) -> list[torch.Tensor]:
        out = []
        for i, img in enumerate(images):
            x = img.as_subclass(torch.Tensor)
            if params["vflip"]:
                x = x.flip(-2)
            if params["hflip"]:
                x = x.flip(-1)
            if params["ssr"] is not None:
                x = shift_scale_rotate(x, **params["ssr"], nearest=i > 0)
            if params["k"]:
                x = torch.rot90(x, params["k"], dims=(-2, -1))
            if i == 0 and params["bc"] is not None:
                x = brightness_contrast(x, **params["bc"])
            out.append(x.contiguous())
        return out

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        h, w = images[0].shape[-2:]
        return self.apply(images, self.draw(h, w))


def shift_scale_rotate(
    img: torch.Tensor, angle: float, scale: float, dx: float, dy: float, nearest: bool = False
) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, H, W], as OpenCV's warpAffine with getRotationMatrix2D about
    the centre (angle in degrees, counter-clockwise), the shift in fractions of the size, and
    reflect-101 borders (grid_sample's reflection about the edge pixels' centres)."""
    h, w = img.shape[-2:]
    a = math.radians(angle)
    alpha, beta = scale * math.cos(a), scale * math.sin(a)
    cx, cy = w / 2, h / 2
    # forward map (source -> output pixel), then inverted to sample the source for each output pixel
    fwd = torch.tensor(
        [
            [alpha, beta, (1 - alpha) * cx - beta * cy + dx * w],
            [-beta, alpha, beta * cx + (1 - alpha) * cy + dy * h],
            [0.0, 0.0, 1.0],
        ],
        dtype=torch.float64,
    )
    inv = torch.linalg.inv(fwd)[:2].to(torch.float32)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    src = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1) @ inv.T  # [H, W, 2] source (x, y) in pixels
    grid = torch.stack([2 * src[..., 0] / max(w - 1, 1) - 1, 2 * src[..., 1] / max(h - 1, 1) - 1], dim=-1)
    out = F.grid_sample(
        img[None].to(torch.float32),
        grid[None],
        mode="nearest" if nearest else "bilinear",
        padding_mode="reflection",
        align_corners=True,
    )[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def brightness_contrast(img: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """uint8 -> uint8: x·alpha + 255·beta, clipped and truncated (albumentations' uint8 table
    for RandomBrightnessContrast with brightness_by_max)."""
    return (img.to(torch.float32) * alpha + 255.0 * beta).clamp_(0, 255).to(torch.uint8)


def to_model_input(img: torch.Tensor, color: str = "rgb_imagenet") -> torch.Tensor:
    """uint8 RGB [3, H, W] -> float32 [3, H, W].

    rgb_imagenet: RGB scaled to [0, 1] then ImageNet mean/std (what pretrained Swin expects).
    bgr_255: BGR in [0, 1], i.e. OpenCV's channel order divided by 255 (the authors' code).
    """
    x = img.as_subclass(torch.Tensor).to(torch.float32).div_(255.0)
    if color == "rgb_imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std
    if color == "bgr_255":
        return x.flip(0).contiguous()
    raise ValueError(f"color must be one of {COLORS}, got {color!r}")


class PairTransform:
    """Cached uint8 images of one case (clinical photo first) -> model inputs, with joint
    augmentation when training (`augment`: authors | default, see the module docstring)."""

    def __init__(self, train: bool, color: str = "rgb_imagenet", p: float = 0.5, augment: str = "default"):
        if color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {color!r}")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.color = color
        if not train:
            self.augment = None
        elif augment == "authors":
            self.augment = AuthorsAugmentation(p)
        else:
            self.augment = train_augmentation(p)

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(self.augment, AuthorsAugmentation):
            images = self.augment(images)
        elif self.augment is not None:
            out = self.augment(*[tv_tensors.Image(x) for x in images])  # one parameter draw for all
            images = list(out) if len(images) > 1 else [out]
        return [to_model_input(x, self.color) for x in images]
