"""2D image pipeline for Derm7pt: decode + resize once (cached), then joint augmentation.

The deterministic part (JPEG decode, RGB, resize to the model size) runs once per file and is
kept in memory as uint8 [3, H, W] (224² × 3 B = 150 KB; 827 cases × 2 images ≈ 250 MB).
Augmentation (SPEC §4) runs on that cached tensor every time and is *joint*: torchvision v2
samples one set of parameters per call, so the clinical and dermoscopic image of a case get
the same flips, rotation, shift-scale-rotate and brightness/contrast.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from cfcml.datasets.photo_checks import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLORS = ("rgb_imagenet", "bgr_255")


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
    """SPEC §4 Derm7pt augmentation, each step with probability p.

    Limits follow albumentations' defaults, which the authors used: shift ±6.25 %,
    scale ±10 %, rotate ±45°, brightness/contrast ±20 %. Pixels moved in from outside are
    black (torchvision has no reflect border for affine; dermoscopy corners are dark anyway).
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
    """Cached uint8 images of one case -> model inputs, with joint augmentation when training."""

    def __init__(self, train: bool, color: str = "rgb_imagenet", p: float = 0.5):
        if color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {color!r}")
        self.color = color
        self.augment = train_augmentation(p) if train else None

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.augment is not None:
            out = self.augment(*[tv_tensors.Image(x) for x in images])  # one parameter draw for all
            images = list(out) if len(images) > 1 else [out]
        return [to_model_input(x, self.color) for x in images]

