"""From a run's split to what the engine iterates: datasets, the balanced sampler and the
tabular inputs (sentence embeddings through the on-disk cache, or MLP features).

Text is encoded here, in the main process, once per distinct sentence — never in DataLoader
workers and never in the training step.
"""

from __future__ import annotations

import torch

from cfcml.datasets.cohort import Case
from cfcml.datasets.samplers import ClassBalancedBatchSampler, DistributedClassBalancedBatchSampler

from ..config import Config


def make_datasets(cfg: Config, split) -> dict:
    """{"train", "val", "test"} datasets of a run, sharing one cache that is filled here, in the
    main process, before any DataLoader worker starts (a worker's cache dies with it)."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    everyone = [c for cases in parts.values() for c in cases]
    if cfg.dataset == "men":
        from cfcml.datasets.volume_dataset import MenDataset

        cache = shared_volume_cache(cfg, everyone)
        cache.warm(everyone, num_workers=cfg.data.num_workers)
        return {k: MenDataset(v, cfg.data.image_size, train=(k == "train"), cache=cache, aug_prob=cfg.data.aug_prob)
                for k, v in parts.items()}  # fmt: skip
    from cfcml.datasets.photo_dataset import Derm7ptDataset

    cache = shared_image_cache(cfg)
    datasets = {k: Derm7ptDataset(v, cfg.data.image_size, train=(k == "train"), color=cfg.data.color, cache=cache,
                                  aug_p=cfg.data.aug_prob, augment=cfg.data.augment) for k, v in parts.items()}  # fmt: skip
    for ds in datasets.values():
        ds.warm_cache()
    return datasets


_CACHES: dict = {}


def shared_image_cache(cfg: Config):
    """One decoded-image cache per image size, shared by the runs of one process (seeds, folds)."""
    from cfcml.datasets.photo_transforms import ImageCache, as_hw

    key = ("2d", tuple(cfg.data.image_size))
    if key not in _CACHES:
        _CACHES[key] = ImageCache(as_hw(cfg.data.image_size))
    return _CACHES[key]


def shared_volume_cache(cfg: Config, cases: list[Case]):
    """One preprocessed-volume cache per target size: in memory when the cohort fits, else on
    disk under cfg.data.cache_dir (keyed by content hash, so runs and trials reuse it)."""
    from cfcml.datasets.volume_cache import make_volume_cache

    key = ("3d", tuple(cfg.data.image_size), cfg.data.cache_dir)
    if key not in _CACHES:
        _CACHES[key] = make_volume_cache(cases, cfg.data.image_size, cfg.data.cache_dir)
    return _CACHES[key]


def make_train_sampler(cfg: Config, cases: list[Case], seed: int, rank: int = 0, world: int = 1):
    """Class-balanced batches; under DDP each rank draws batch_size / world from its own share.
    `train.epoch_steps` sets the epoch's length (majority: the authors' budget; see samplers)."""
    labels = [c.label for c in cases]
    steps = cfg.train.epoch_steps
    if world == 1:
        return ClassBalancedBatchSampler(labels, cfg.train.batch_size, seed=seed, epoch_steps=steps)
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} workers")
    return DistributedClassBalancedBatchSampler(labels, cfg.train.batch_size // world, world, rank, seed=seed,
                                                epoch_steps=steps)  # fmt: skip


def tabular_features(cfg: Config, cases: list[Case], fit_on: list[Case]):
    """Encoded attributes [N, F] for the MLP embedding, scaled with statistics of `fit_on` only."""
    if cfg.dataset == "men":
        from cfcml.datasets.men.reader import men_tabular_features

        return torch.from_numpy(men_tabular_features(cases, fit_on=fit_on))
    from cfcml.datasets.derm7pt.reader import derm7pt_tabular_features

    return torch.from_numpy(derm7pt_tabular_features(cases))


def sentence_embeddings(cfg: Config, cases: list[Case]) -> torch.Tensor:
    """[N, t, 512] frozen-text-encoder embeddings of each case's attribute sentences."""
    from ..models.text import sentence_cache

    cache = sentence_cache(cfg.data.cache_dir, cfg.model.text_pretrained)
    flat = [s for c in cases for s in c.sentences]
    if not flat:
        return torch.empty(len(cases), 0, 512)
    return cache.embed(flat).view(len(cases), len(cases[0].sentences), -1)


def build_tabular_inputs(cfg: Config, split) -> tuple[dict, int | None]:
    """-> ({"train"|"val"|"test": tensor indexed by dataset position or None}, MLP feature count)."""
    parts = {"train": split.train, "val": split.val, "test": split.test}
    if not cfg.model.use_tabular:
        return {k: None for k in parts}, None
    if cfg.model.tabular_embedding == "mlp":
        tables = {k: tabular_features(cfg, v, fit_on=split.train) for k, v in parts.items()}
        return tables, tables["train"].shape[1]
    return {k: sentence_embeddings(cfg, v) for k, v in parts.items()}, None
