from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cfcml.datasets.samplers import (
    ClassBalancedBatchSampler,
    DistributedClassBalancedBatchSampler,
)

# Derm7pt's training split: 256 NEV, 90 MEL, shuffled.
DERM = np.random.default_rng(0).permutation([0] * 256 + [1] * 90)
# MEN-like: three classes, batch size not a multiple of 3.
MEN = np.random.default_rng(1).permutation([0] * 200 + [1] * 20 + [2] * 30)


def epochs(sampler, n):
    out = []
    for e in range(n):
        sampler.set_epoch(e)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("labels,bs", [(DERM, 64), (DERM, 36), (MEN, 36), (MEN, 7)])
def test_every_batch_holds_every_class_equally(labels, bs):
    s = ClassBalancedBatchSampler(labels, bs, seed=3)
    k = len(set(labels.tolist()))
    assert len(s) == len(labels) // bs
    extra = Counter()
    for batches in epochs(s, 5):
        assert len(batches) == len(labels) // bs
        for b in batches:
            assert len(b) == bs
            n = Counter(labels[b].tolist())
            assert set(n) == set(range(k))
            assert max(n.values()) - min(n.values()) <= 1  # equal, remainder spread
            extra.update(c for c, m in n.items() if m > bs // k)
    if bs % k:  # over many batches the extra slots rotate over the classes
        assert max(extra.values()) - min(extra.values()) <= 1


def test_no_duplicates_inside_a_batch_when_classes_are_large_enough():
    s = ClassBalancedBatchSampler(DERM, 64, seed=0)
    for batches in epochs(s, 3):
        assert all(len(set(b)) == len(b) for b in batches)


def test_minority_is_oversampled_and_majority_cycles_through():
    s = ClassBalancedBatchSampler(DERM, 64, seed=0)
    seen = Counter(i for batches in epochs(s, 10) for b in batches for i in b)
    mel = np.flatnonzero(DERM == 1)
    nev = np.flatnonzero(DERM == 0)
    # 160 MEL draws per epoch over 90 cases: each melanoma once or twice per epoch.
    assert all(10 <= seen[i] <= 20 for i in mel)
    assert all(seen[i] >= 1 for i in nev)  # 160 of 256 nevi per epoch: all come up over epochs


def test_reproducible_per_seed_and_epoch():
    a = epochs(ClassBalancedBatchSampler(DERM, 64, seed=5), 3)
    b = epochs(ClassBalancedBatchSampler(DERM, 64, seed=5), 3)
    c = epochs(ClassBalancedBatchSampler(DERM, 64, seed=6), 3)
    assert a == b and a != c and a[0] != a[1]
    s = ClassBalancedBatchSampler(DERM, 64, seed=5)
    s.set_epoch(2)
    assert list(s) == a[2] and list(s) == a[2]  # iterating again replays the epoch


def test_drop_last_false_rounds_up_and_tiny_cohorts_get_one_batch():
    assert len(ClassBalancedBatchSampler(DERM, 64, drop_last=False)) == 6
    tiny = ClassBalancedBatchSampler([0, 0, 0, 1], 12)
    (batch,) = list(tiny)
    assert len(batch) == 12 and Counter(np.asarray([0, 0, 0, 1])[batch].tolist()) == {0: 6, 1: 6}
    with pytest.raises(ValueError, match="cannot hold"):
        ClassBalancedBatchSampler(MEN, 2)


def test_state_dict_resumes_mid_epoch():
    s = ClassBalancedBatchSampler(DERM, 36, seed=1)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4)
    it = iter(s)
    first = list(islice(it, 3))
    state = s.state_dict()
    assert state == {"seed": 1, "epoch": 4, "position": 3}

    resumed = ClassBalancedBatchSampler(DERM, 36, seed=999)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the training loop calls this again after loading: keeps the position
    assert first + list(resumed) == full
    assert resumed.state_dict()["position"] == 0  # the epoch finished
    fresh = ClassBalancedBatchSampler(DERM, 36, seed=1)
    fresh.set_epoch(5)
    resumed.set_epoch(5)
    assert list(resumed) == list(fresh)


def test_works_as_a_dataloader_batch_sampler():
    ds = TensorDataset(torch.arange(len(DERM)), torch.as_tensor(DERM))
    loader = DataLoader(ds, batch_sampler=ClassBalancedBatchSampler(DERM, 16, seed=0))
    batches = list(loader)
    assert len(batches) == len(DERM) // 16
    assert all(set(y.tolist()) == {0, 1} for _, y in batches)


@pytest.mark.parametrize("labels,world,bs", [(DERM, 2, 32), (DERM, 4, 16), (MEN, 3, 12)])
def test_distributed_ranks_are_disjoint_balanced_and_aligned(labels, world, bs):
    k = len(set(labels.tolist()))
    for epoch in range(3):
        per_rank = []
        for rank in range(world):
            s = DistributedClassBalancedBatchSampler(labels, bs, world, rank, seed=7)
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == (len(labels) // world) // bs  # same count on every rank
            for b in batches:
                n = Counter(labels[b].tolist())
                assert len(b) == bs and set(n) == set(range(k))
                assert max(n.values()) - min(n.values()) <= 1
            per_rank.append({i for b in batches for i in b})
        for r in range(world):
            for q in range(r + 1, world):
                assert not per_rank[r] & per_rank[q], f"ranks {r} and {q} share samples in epoch {epoch}"


def test_distributed_reproducible_and_epochs_reshuffle_the_partition():
    def rank_sets(epoch):
        out = []
        for rank in range(2):
            s = DistributedClassBalancedBatchSampler(DERM, 32, 2, rank, seed=0)
            s.set_epoch(epoch)
            out.append(list(s))
        return out

    assert rank_sets(0) == rank_sets(0)
    assert rank_sets(0) != rank_sets(1)
    with pytest.raises(ValueError, match="fewer than"):
        DistributedClassBalancedBatchSampler([0] * 10 + [1], 4, 2, 0)
    with pytest.raises(ValueError, match="rank"):
        DistributedClassBalancedBatchSampler(DERM, 4, 2, 2)


# ---------------------------------------------------------------------------------------------
# epoch_steps: the authors' epoch (the majority class once through) vs len(labels) // batch_size

# A MEN training fold as the authors had it (no validation part; their loader's G1 count, 434)
# and as we have it (a fifth held out for validation).
MEN_AUTHORS = np.random.default_rng(2).permutation([0] * 434 + [1] * 40 + [2] * 57)
MEN_OURS = np.random.default_rng(3).permutation([0] * 347 + [1] * 32 + [2] * 46)


@pytest.mark.parametrize(
    "labels,bs,majority,dataset",
    [(MEN_AUTHORS, 36, 36, 14), (MEN_OURS, 36, 28, 11), (DERM, 64, 8, 5), (DERM, 36, 14, 9), (MEN, 7, 85, 35)],
)
def test_epoch_steps_counts(labels, bs, majority, dataset):
    assert len(ClassBalancedBatchSampler(labels, bs, epoch_steps="majority")) == majority
    assert len(ClassBalancedBatchSampler(labels, bs, epoch_steps="dataset")) == dataset
    s = ClassBalancedBatchSampler(labels, bs, seed=1, epoch_steps="majority")
    k = len(set(labels.tolist()))
    for batches in epochs(s, 2):
        assert len(batches) == majority
        for b in batches:
            n = Counter(labels[b].tolist())
            assert len(b) == bs and set(n) == set(range(k)) and max(n.values()) - min(n.values()) <= 1


def test_majority_epoch_goes_once_through_the_majority_class():
    nev = set(np.flatnonzero(DERM == 0).tolist())
    s = ClassBalancedBatchSampler(DERM, 64, seed=4, epoch_steps="majority")
    for batches in epochs(s, 3):
        drawn = Counter(i for b in batches for i in b if DERM[i] == 0)
        assert set(drawn) == nev and set(drawn.values()) == {1}  # 8 batches x 32 = all 256 nevi, once each


def test_majority_epochs_replay_and_resume():
    s = ClassBalancedBatchSampler(MEN_OURS, 36, seed=2, epoch_steps="majority")
    full = epochs(s, 3)
    assert epochs(ClassBalancedBatchSampler(MEN_OURS, 36, seed=2, epoch_steps="majority"), 3) == full
    s.set_epoch(2)
    first = list(islice(iter(s), 10))
    resumed = ClassBalancedBatchSampler(MEN_OURS, 36, seed=0, epoch_steps="majority")
    resumed.load_state_dict(s.state_dict())
    resumed.set_epoch(2)
    assert first + list(resumed) == full[2]
    assert resumed.state_dict()["position"] == 0


@pytest.mark.parametrize("labels,world,bs", [(DERM, 2, 32), (MEN_OURS, 3, 12), (MEN_AUTHORS, 4, 9)])
def test_distributed_majority_epochs_are_aligned_disjoint_and_as_long_as_one_process(labels, world, bs):
    single = len(ClassBalancedBatchSampler(labels, bs * world, epoch_steps="majority"))
    lengths, per_rank = set(), []
    for rank in range(world):
        s = DistributedClassBalancedBatchSampler(labels, bs, world, rank, seed=5, epoch_steps="majority")
        s.set_epoch(1)
        batches = list(s)
        lengths.add(len(batches))
        per_rank.append({i for b in batches for i in b})
    assert len(lengths) == 1  # every rank runs the same number of batches
    (n,) = lengths
    k = len(set(labels.tolist()))
    assert n == (k * (max(Counter(labels.tolist()).values()) // world)) // bs
    assert abs(n - single) <= 1
    for r in range(world):
        for q in range(r + 1, world):
            assert not per_rank[r] & per_rank[q]


def test_unknown_epoch_steps_is_refused():
    with pytest.raises(ValueError, match="epoch_steps"):
        ClassBalancedBatchSampler(DERM, 64, epoch_steps="authors")
