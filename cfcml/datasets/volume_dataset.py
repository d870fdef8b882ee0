"""3D torch Dataset: cached preprocessed series, plus random augmentation when training."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset, get_worker_info

from cfcml.datasets.volume_cache import VolumeCache
from cfcml.datasets.volume_transforms import augment_pipeline


class VolumeDataset(Dataset):
    """`ds[i]` -> {"images": one float32 [1, D, H, W] per series, "index": i, "label": int}.

    `index` is the position in `cases`, so callers can look up per-case data kept elsewhere
    (sentence embeddings, tabular vectors). Pass one shared `cache` for all datasets of a
    cohort and `cache.warm(cases)` before creating DataLoader workers; without one the dataset
    keeps a private in-memory cache. Picklable (DataLoader workers, spawn or fork).
    """

    def __init__(
        self, cases, series, target_size, train: bool, cache: VolumeCache | None = None, aug_prob: float = 0.3
    ):
        self.cases = list(cases)
        self.series = tuple(series)
        self.target_size = tuple(int(s) for s in target_size)
        self.train = train
        self.cache = cache if cache is not None else VolumeCache(self.target_size, self.series)
        if self.cache.target_size != self.target_size:
            raise ValueError(f"cache holds {self.cache.target_size} volumes, dataset wants {self.target_size}")
        self.augment = augment_pipeline(self.target_size, self.series, prob=aug_prob) if train else None
        self._seeded_for = None

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        vols = self.cache.get(case)  # fresh tensors: augmenting them leaves the cache intact
        if self.augment is not None:
            self._seed_augment()
            vols = self.augment(vols)
        return {"images": [vols[m] for m in self.series], "index": i, "label": case.label}

    def _seed_augment(self) -> None:
        """MONAI transforms carry their own RNG, which forked workers would all share: reseed
        once per process from torch's per-worker seed (itself derived from torch.manual_seed)."""
        info = get_worker_info()
        token = (os.getpid(), None if info is None else info.seed)
        if token != self._seeded_for:
            seed = info.seed if info is not None else torch.initial_seed()
            self.augment.set_random_state(seed=seed % 2**32)
            self._seeded_for = token
