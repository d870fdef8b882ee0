"""Run the deterministic 3D preprocessing once per case and keep the result.

One cache serves a whole cohort — every fold's train/val/test datasets share it — so each
patient is decoded (load + resample + crop + resize + normalise) once per process, or once
ever with a disk cache. Random augmentation runs after the cache, on a copy.

- memory (`cache_dir=None`): a dict of tensors; fine for small cohorts (the smoke presets).
- disk (`cache_dir=...`): one `.npy` per case, named by a content hash of the case's input
  files + the target size + `PIPELINE_VERSION`; survives runs and is shared by DataLoader
  workers and concurrent trials (writes are atomic renames). Changing a file, the size or
  the pipeline gives a new key, so stale entries are never read.

`make_volume_cache` picks memory when the preprocessed cohort fits a budget, disk otherwise.
Call `warm(cases)` in the main process before building DataLoaders: memory-cache entries
filled inside a worker die with it. Counters (`decode_count`, `hits`) count in the process
that does the work.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from cfcml.datasets.file_digests import file_digest
from cfcml.datasets.volume_checks import blank_reason
from cfcml.datasets.volume_transforms import (
    PIPELINE_VERSION,
    case_to_dict,
    deterministic_pipeline,
)


class BlankSeriesError(ValueError):
    """A series holds no image after preprocessing (blank or near-constant): refuse to train on it."""


class VolumeCache:
    """Preprocessed volumes by case: `get(case)` -> {series: [1,D,H,W], ...} in `series` order."""

    def __init__(self, target_size, series, cache_dir=None):
        self.target_size = tuple(int(s) for s in target_size)
        self.series = tuple(series)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._memory: dict[str, np.ndarray] = {}  # by key(case)
        self._pipelines = _Pipelines(self.target_size)
        self.decode_count = 0  # deterministic pipeline runs in this process
        self.hits = 0  # gets answered from memory or disk

    @property
    def kind(self) -> str:
        return "memory" if self.cache_dir is None else "disk"

    def key(self, case) -> str:
        """Content hash of the inputs + target size + pipeline version (stable across runs)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"volumes-v{PIPELINE_VERSION}|{self.target_size}|{','.join(self.series)}".encode())
        for p in (*case.images, case.mask):
            h.update(b"|none" if p is None else f"|{file_digest(p)}".encode())  # a stat when memoised
        return h.hexdigest()

    def get(self, case) -> dict[str, torch.Tensor]:
        """The case's preprocessed series (fresh tensors: callers may modify them)."""
        arr = self._load(case)
        return {m: torch.from_numpy(arr[i : i + 1].copy()) for i, m in enumerate(self.series)}

    def warm(self, cases, num_workers: int = 0) -> None:
        """Decode every case not cached yet (in parallel worker processes if asked)."""
        todo = [c for c in cases if not self._cached(c)]
        if num_workers <= 0 or len(todo) < 2:
            for c in todo:
                self._load(c)
            return
        loader = torch.utils.data.DataLoader(
            _Decode(todo, self.target_size, self.series), batch_size=None, num_workers=num_workers
        )
        for case, arr in zip(todo, loader):
            self.decode_count += 1
            self._store(case, arr.numpy())

    # ------------------------------------------------------------------ internals

    def _path(self, case) -> Path:
        return self.cache_dir / f"{self.key(case)}.npy"

    def _cached(self, case) -> bool:
        if self.cache_dir is None:
            return self.key(case) in self._memory
        return self._path(case).is_file()

    def _load(self, case) -> np.ndarray:
        if self.cache_dir is None:
            arr = self._memory.get(self.key(case))
        else:
            path = self._path(case)
            arr = np.load(path) if path.is_file() else None
        if arr is not None:
            self.hits += 1
            return arr
        arr = _decode(self._pipelines, case, self.series)
        self.decode_count += 1
        self._store(case, arr)
        return arr

    def _store(self, case, arr: np.ndarray) -> None:
        if self.cache_dir is None:
            self._memory[self.key(case)] = arr
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, self._path(case))  # atomic: readers never see half a file


class _Pipelines:
    """One deterministic pipeline per set of present series (a patient may lack one); built
    on first use, dropped when pickled (DataLoader workers rebuild theirs)."""

    def __init__(self, target_size):
        self.target_size, self._built = target_size, {}

    def __call__(self, present: tuple[str, ...]):
        if present not in self._built:
            self._built[present] = deterministic_pipeline(self.target_size, present)
        return self._built[present]

    def __getstate__(self):
        return {"target_size": self.target_size, "_built": {}}


def _decode(pipelines: _Pipelines, case, series) -> np.ndarray:
    """Run the deterministic pipeline; stack the series as float32 [S, D, H, W] (a missing
    series is all zeros, which is the mean after z-scoring); refuse blank ones."""
    present = tuple(m for m, p in zip(series, case.images) if p is not None)
    arr = np.zeros((len(series), *pipelines.target_size), dtype=np.float32)
    if not present:
        return arr
    out = pipelines(present)(case_to_dict(case, series))
    for i, m in enumerate(series):
        if m in present:
            arr[i] = out[m][0].numpy()
    for m, vol in zip(present, [arr[series.index(m)] for m in present]):
        why = blank_reason(vol)
        if why:
            raise BlankSeriesError(
                f"case {case.case_id}, series {m} ({case.images[series.index(m)]}): {why} "
                "after the ROI crop and resize; fix or drop this case"
            )
    return arr


class _Decode(torch.utils.data.Dataset):
    """Decoding as a Dataset, so `warm` can fan out over DataLoader worker processes."""

    def __init__(self, cases, target_size, series):
        self.cases, self.series, self._pipelines = cases, tuple(series), _Pipelines(tuple(target_size))

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        return torch.from_numpy(_decode(self._pipelines, self.cases[i], self.series))


def make_volume_cache(cases, target_size, series, cache_dir=None, memory_budget_mb: float = 1024) -> VolumeCache:
    """Memory cache when the preprocessed `cases` fit `memory_budget_mb`, else a disk cache
    under `cache_dir` (required then)."""
    need_mb = len(cases) * len(series) * int(np.prod(target_size)) * 4 / 2**20
    if need_mb <= memory_budget_mb:
        return VolumeCache(target_size, series)
    if cache_dir is None:
        raise ValueError(
            f"preprocessed cohort needs {need_mb:.0f} MiB > budget {memory_budget_mb:.0f} MiB: give a cache_dir"
        )
    return VolumeCache(target_size, series, Path(cache_dir) / "volumes")
