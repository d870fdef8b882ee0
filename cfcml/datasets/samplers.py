"""Class-balanced batch samplers: every batch holds every class (SPEC §4).

Like the authors, each batch draws equal numbers per class; when the batch size is not a
multiple of the class count, the extra slots go to classes in turn (the b-th batch of the run
gives them to classes b, b+1, ... mod K), so over training the classes are drawn equally often.

How many batches make an epoch (`epoch_steps`; warm-up and LR decay count epochs, so this
sets the length of the whole schedule):
- `majority`, the authors' budget: as many batches as it takes to go once through the
  majority class at its share of a batch, `(K * n_majority) // batch_size` (as if every class
  were oversampled to the majority's size). Their loader did this: an epoch of
  n_majority / (batch_size / K) batches.
- `dataset`: `len(labels) // batch_size`, as many as plain shuffling would give.
Step counts (batches per epoch, majority / dataset):
- MEN, batch 36, 3 classes. The authors' training folds (no validation carved out): G1 434 of
  ~531 patients -> 36 / 14 (their ~1800 steps in 50 epochs). Ours, with a fifth of each
  training fold held out for validation: G1 347 of ~425 -> 28 / 11 (1400 vs 550 in 50 epochs).
- Derm7pt train split (NEV 256, MEL 90): batch 64 -> 8 / 5; batch 36 (the authors' code) ->
  14 / 9.
Each class is drawn from its own shuffled list, reshuffled whenever it runs out (a batch never
holds one case twice unless its class has fewer cases than the batch's share): a minority
class is therefore oversampled (its cases repeat across batches of one epoch) and a
majority class may leave some cases unseen in an epoch; they come up in later epochs.

Everything is a pure function of (seed, epoch[, rank]), so `set_epoch(e)` replays an epoch
exactly and `state_dict()` / `load_state_dict()` resume in the middle of one.
Both samplers yield lists of dataset indices: pass them as `DataLoader(batch_sampler=...)`.
"""

from __future__ import annotations

import numpy as np

EPOCH_STEPS = ("majority", "dataset")


def _as_labels(labels) -> np.ndarray:
    arr = np.asarray(labels.tolist() if hasattr(labels, "tolist") else labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("labels must be a non-empty 1-D sequence")
    return arr


class ClassBalancedBatchSampler:
    """Balanced batches over all of `labels` (one process)."""

    def __init__(self, labels, batch_size: int, seed: int = 0, drop_last: bool = True, epoch_steps: str = "dataset"):
        if epoch_steps not in EPOCH_STEPS:
            raise ValueError(f"epoch_steps must be one of {EPOCH_STEPS}, got {epoch_steps!r}")
        self.epoch_steps = epoch_steps
        self.labels = _as_labels(labels)
        self.classes = np.unique(self.labels)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded
        if self.batch_size < len(self.classes):
            raise ValueError(f"batch size {batch_size} cannot hold all {len(self.classes)} classes")

    # -- what differs between the single-process and the distributed sampler
    def _rng_key(self) -> list[int]:
        return [self.seed, self.epoch]

    def _pools(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Per class, the indices this process may draw from this epoch."""
        return [np.flatnonzero(self.labels == c) for c in self.classes]

    def _num_samples(self) -> int:
        return len(self.labels)

    def _majority_count(self) -> int:
        """Cases of the largest class this process draws from in an epoch."""
        return max(int((self.labels == c).sum()) for c in self.classes)

    # -- shared machinery
    def __len__(self) -> int:
        if self.epoch_steps == "majority":
            n = len(self.classes) * self._majority_count()  # every class oversampled to the majority's size
        else:
            n = self._num_samples()
        bs = self.batch_size
        batches = n // bs if self.drop_last else -(-n // bs)
        return max(1, batches)  # tiny cohorts (smoke runs) still train one batch per epoch

    def _epoch_batches(self) -> list[list[int]]:
        # One generator for the shared partition (same on every rank), one per rank for the draws.
        pools = self._pools(np.random.default_rng([self.seed, self.epoch]))
        rng = np.random.default_rng(self._rng_key())
        k, bs = len(pools), self.batch_size
        streams = [_CyclicStream(p, rng) for p in pools]
        batches = []
        for b in range(self.epoch * len(self), (self.epoch + 1) * len(self)):  # b counts across epochs
            per_class = [bs // k + ((c - b) % k < bs % k) for c in range(k)]
            batch = np.concatenate([s.take(n) for s, n in zip(streams, per_class)])
            batches.append(rng.permutation(batch).tolist())  # mix classes inside the batch
        return batches

    def __iter__(self):
        batches = self._epoch_batches()
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at its first batch."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        """Where iteration stands. `position` counts batches *yielded*: a DataLoader with
        workers prefetches, so when resuming mid-epoch save the number of batches actually
        trained instead (`{**s.state_dict(), "position": steps_done}`)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


class _CyclicStream:
    """Draw from a shuffled list without replacement, reshuffling whenever it runs out."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        self.order, self.next = rng.permutation(pool), 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.next == len(self.order):
                order = self.rng.permutation(self.pool)
                if out:  # reshuffled mid-batch: what this batch already holds goes last
                    held = np.isin(order, np.concatenate(out))
                    order = np.concatenate([order[~held], order[held]])
                self.order, self.next = order, 0
            got = self.order[self.next : self.next + n]
            self.next += len(got)
            n -= len(got)
            out.append(got)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


class DistributedClassBalancedBatchSampler(ClassBalancedBatchSampler):
    """Balanced batches per rank, ranks disjoint within an epoch.

    Each epoch, every class's indices are shuffled with a generator shared by all ranks and
    dealt round-robin to the ranks; a rank draws only from its own share, so no sample is seen
    by two ranks in one epoch, and every rank's batch still holds every class. All ranks run
    the same number of batches, so collectives line up: `(len(labels) // num_replicas) //
    batch_size_per_rank` (dataset), or `(K * (n_majority // num_replicas)) // batch_size_per_rank`
    (majority), i.e. about as many global batches as one process would run.
    """

    def __init__(
        self,
        labels,
        batch_size_per_rank: int,
        num_replicas: int,
        rank: int,
        seed: int = 0,
        drop_last: bool = True,
        epoch_steps: str = "dataset",
    ):
        super().__init__(labels, batch_size_per_rank, seed, drop_last, epoch_steps)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        smallest = min(int((self.labels == c).sum()) for c in self.classes)
        if smallest < self.num_replicas:
            raise ValueError(f"a class has {smallest} samples, fewer than the {num_replicas} ranks that each need one")

    def _rng_key(self) -> list[int]:
        return [self.seed, self.epoch, self.rank + 1]  # +1: never equal to the shared partition key

    def _pools(self, rng: np.random.Generator) -> list[np.ndarray]:
        pools = super()._pools(rng)
        return [rng.permutation(p)[self.rank :: self.num_replicas] for p in pools]

    def _num_samples(self) -> int:
        return len(self.labels) // self.num_replicas

    def _majority_count(self) -> int:
        return super()._majority_count() // self.num_replicas  # the same on every rank
