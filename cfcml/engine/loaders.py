"""From a run's split to what the engine iterates: datasets, the balanced sampler and the
tabular inputs (sentence embeddings through the on-disk cache, or MLP features).

Text is encoded here, in the main process, once per distinct sentence — never in DataLoader
workers and never in the training step. The registered model calls the same builders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Config
from ..datasets.cohort import Case
from ..datasets.photo_dataset import PhotoDataset
from ..datasets.photo_transforms import ImageCache, as_hw
from ..datasets.samplers import ClassBalancedBatchSampler, DistributedClassBalancedBatchSampler
from ..datasets.spec import DatasetSpec
from ..datasets.tabular import numeric_stats, tabular_features
from ..datasets.volume_augment import BatchVolumeAugment
from ..datasets.volume_cache import make_volume_cache
from ..datasets.volume_dataset import VolumeDataset
from ..models.encoders import tabular_embedding, uses_attribute_features
from ..models.text import sentence_cache


def _volume_dataset(cfg: Config, spec: DatasetSpec, cases: list[Case], train: bool, cache):
    return VolumeDataset(cases, spec.series, cfg.data.image_size, train=train, cache=cache, aug_prob=cfg.data.aug_prob)


def _photo_dataset(cfg: Config, spec: DatasetSpec, cases: list[Case], train: bool, cache):
    return PhotoDataset(
        cases,
        cfg.data.image_size,
        train=train,
        color=cfg.data.color,
        cache=cache if cache is not None else True,
        aug_p=cfg.data.aug_prob,
        augment=cfg.data.augment,
    )


def _volume_cache(cfg: Config, spec: DatasetSpec, cases: list[Case]):
    """In memory when the cohort fits, else on disk under cfg.data.cache_dir (keyed by content
    hash, so runs and trials reuse it)."""
    size = tuple(cfg.data.image_size)
    key = ("volume", size, spec.series, cfg.data.cache_dir)
    if key not in _CACHES:
        _CACHES[key] = make_volume_cache(cases, size, spec.series, cfg.data.cache_dir)
    return _CACHES[key]


def _photo_cache(cfg: Config, spec: DatasetSpec, cases: list[Case]):
    """Decoded uint8 images in memory."""
    size = tuple(cfg.data.image_size)
    key = ("photo", size)
    if key not in _CACHES:
        _CACHES[key] = ImageCache(as_hw(size))
    return _CACHES[key]


def _warm_volumes(cache, cfg: Config, cases: list[Case]) -> None:
    cache.warm(cases, num_workers=cfg.data.num_workers)


def _warm_photos(cache, cfg: Config, cases: list[Case]) -> None:
    cache.warm([p for c in cases for p in c.images if p is not None])


@dataclass(frozen=True)
class KindLoaders:
    """What the engine builds for one image kind: its Dataset, its shared decoded-image cache,
    and how that cache is filled before DataLoader workers start."""

    dataset: Callable  # (cfg, spec, cases, train, cache) -> torch Dataset
    cache: Callable  # (cfg, spec, cases) -> the process-wide cache
    warm: Callable  # (cache, cfg, cases) -> None
    batch_augment: Callable | None = None  # (cfg) -> the on-device batch augmentation; None: per sample only


def _volume_batch_augment(cfg: Config) -> BatchVolumeAugment:
    return BatchVolumeAugment(cfg.data.image_size, prob=cfg.data.aug_prob)


LOADERS = {
    "volume": KindLoaders(_volume_dataset, _volume_cache, _warm_volumes, _volume_batch_augment),
    "photo": KindLoaders(_photo_dataset, _photo_cache, _warm_photos),
}


def make_dataset(cfg: Config, spec: DatasetSpec, cases: list[Case], train: bool, cache=None):
    """One torch Dataset of `cases` for the cohort's image kind (volumes or photos)."""
    return LOADERS[spec.image_kind].dataset(cfg, spec, cases, train, cache)


def make_datasets(cfg: Config, spec: DatasetSpec, split) -> dict:
    """{"train", "val", "test"} datasets of a run, sharing one cache that is filled here, in the
    main process, before any DataLoader worker starts (a worker's cache dies with it)."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    everyone = [c for cases in parts.values() for c in cases]
    cache = shared_cache(cfg, spec, everyone)
    LOADERS[spec.image_kind].warm(cache, cfg, everyone)
    return {k: make_dataset(cfg, spec, v, train=(k == "train"), cache=cache) for k, v in parts.items()}


_CACHES: dict = {}


def shared_cache(cfg: Config, spec: DatasetSpec, cases: list[Case]):
    """One decoded-image cache per (kind, size, series), shared by the runs of one process."""
    return LOADERS[spec.image_kind].cache(cfg, spec, cases)


def make_train_sampler(cfg: Config, cases: list[Case], seed: int, rank: int = 0, world: int = 1):
    """Class-balanced batches; under DDP each rank draws batch_size / world from its own share.
    `train.epoch_steps` sets the epoch's length (majority: the authors' budget; see samplers)."""
    labels = [c.label for c in cases]
    steps = cfg.train.epoch_steps
    if world == 1:
        return ClassBalancedBatchSampler(labels, cfg.train.batch_size, seed=seed, epoch_steps=steps)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} workers")
    return DistributedClassBalancedBatchSampler(
        labels, cfg.train.batch_size // world, world, rank, seed=seed, epoch_steps=steps
    )


def sentence_embeddings(cfg: Config, cases: list[Case]) -> torch.Tensor:
    """[N, t, 512] frozen-text-encoder embeddings of each case's attribute sentences."""
    cache = sentence_cache(cfg.data.cache_dir, cfg.model.text_pretrained)
    flat = [s for c in cases for s in c.sentences]
    if not flat:
        return torch.empty(len(cases), 0, 512)
    return cache.embed(flat).view(len(cases), len(cases[0].sentences), -1)


def tabular_inputs(
    cfg: Config, spec: DatasetSpec, cases: list[Case], numeric_stats: dict | None
) -> torch.Tensor | None:
    """The tabular input tensor of `cases` (row i = case i): sentence embeddings [N, t, 512]
    or MLP features [N, F] scaled with `numeric_stats` (fitted on the training part)."""
    if not cfg.model.use_tabular:
        return None
    if tabular_embedding(cfg).reads_features:
        return torch.from_numpy(tabular_features(spec, cases, stats=numeric_stats))
    return sentence_embeddings(cfg, cases)


def build_tabular_inputs(cfg: Config, spec: DatasetSpec, split) -> tuple[dict, dict | None]:
    """-> ({"train"|"val"|"test": tensor indexed by dataset position or None}, numeric scaling
    statistics of the training part (MLP embedding) or None)."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    stats = numeric_stats(spec, split.train) if uses_attribute_features(cfg) else None
    return {k: tabular_inputs(cfg, spec, v, stats) for k, v in parts.items()}, stats
