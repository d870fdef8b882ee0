"""Photo cohort cases -> tensors: one float32 image per photo, the case index and the label.

The tabular branch needs no tensors here: the model looks sentence embeddings up by case
(`dataset.cases[index].sentences`), or rows of `cfcml.datasets.tabular.tabular_features`.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cfcml.datasets.cohort import Case
from cfcml.datasets.photo_transforms import ImageCache, PairTransform, as_hw, decode_resized


class PhotoDataset(Dataset):
    """`__getitem__(i)` -> {"images": one float32 [3, H, W] per photo, "index": i, "label": int}.

    cache: True (own in-memory cache), False (decode every time) or an `ImageCache` to share
    between datasets of the same image size (train/valid/test of one run).
    Picklable, so it works with DataLoader workers (each worker gets a copy of the cache as
    it was when the workers started: call `warm_cache()` first).
    """

    def __init__(
        self,
        cases: list[Case],
        image_size,
        train: bool,
        color: str = "rgb_imagenet",
        cache: bool | ImageCache = True,
        aug_p: float = 0.5,
        augment: str = "default",
    ):
        self.cases = list(cases)
        self.image_size = as_hw(image_size)
        if isinstance(cache, ImageCache):
            if cache.size != self.image_size:
                raise ValueError(f"shared ImageCache holds {cache.size} images, dataset wants {self.image_size}")
            self.cache = cache
        else:
            self.cache = ImageCache(self.image_size) if cache else None
        self.transform = PairTransform(train, color, aug_p, augment)

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def labels(self) -> list[int]:
        return [c.label for c in self.cases]

    def warm_cache(self, threads: int | None = None) -> None:
        if self.cache is not None:
            self.cache.warm([p for c in self.cases for p in c.images if p is not None], threads)

    def _load(self, path) -> torch.Tensor:
        if path is None:  # a missing photo: a placeholder through the joint transform, zeroed after
            return torch.zeros(3, *self.image_size, dtype=torch.uint8)
        return self.cache.get(path) if self.cache is not None else decode_resized(path, self.image_size)

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        images = self.transform([self._load(p) for p in case.images])
        images = [torch.zeros_like(x) if p is None else x for x, p in zip(images, case.images)]
        return {"images": images, "index": i, "label": case.label}
