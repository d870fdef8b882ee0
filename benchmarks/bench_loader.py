"""Training data path throughput: augmented MEN patients delivered per second, ready on the device.

    python benchmarks/bench_loader.py [--patients 40] [--batch 36] [--batches 3] [--workers 0 2]
                                      [--device cuda] [--data DIR] [--bank-patients 796] [--threads 1]

(a) today's path: `VolumeDataset` (cached preprocessed volumes + MONAI `augment_pipeline`, one
    patient at a time on the CPU) behind a DataLoader with the class-balanced batch sampler,
    with and without worker processes, batches copied to the device;
(b) the batched path: the split resident on the device (`DeviceVolumeBank`, float32 and
    bf16 storage) and `BatchVolumeAugment` applied to the whole batch there.

Both run at the paper's size (3 series x 24x128x128, batch 36 by default) on a synthetic
cohort (`cfcml synth men`, written to a temporary folder unless --data is given; its
preprocessing is done before timing). --bank-patients > patients fills the bank with random
volumes of that many patients instead (e.g. 796, the paper's cohort). One line per
configuration; the first batch of each is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cfcml.datasets.men.synthetic import write_synthetic_men
from cfcml.datasets.reader import load_cohort
from cfcml.datasets.samplers import ClassBalancedBatchSampler
from cfcml.datasets.spec import load_spec
from cfcml.datasets.volume_augment import BatchVolumeAugment, DeviceBatches, DeviceVolumeBank, volume_bank_bytes
from cfcml.datasets.volume_cache import VolumeCache
from cfcml.datasets.volume_dataset import VolumeDataset

MEN = load_spec("men")
MODALITIES = MEN.series
SIZE = (24, 128, 128)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(batches, device: torch.device, count: int) -> float:
    """Patients/s over `count` batches of an iterator of engine-format batches, after one warm-up."""
    it = iter(batches)
    first = next(it)
    [x.to(device, non_blocking=True) for x in first["images"]]
    _sync(device)
    t0, patients = time.perf_counter(), 0
    for _ in range(count):
        batch = next(it)
        images = [x.to(device, non_blocking=True) for x in batch["images"]]  # what the engine does
        patients += images[0].shape[0]
    _sync(device)
    return patients / (time.perf_counter() - t0)


def _sampler(labels, batch: int, batches: int):
    """Enough class-balanced batches for a warm-up + `batches` timed ones (epochs chained)."""
    sampler = ClassBalancedBatchSampler(labels, batch, seed=0)
    out, epoch = [], 0
    while len(out) < batches + 1:
        sampler.set_epoch(epoch)
        out += list(sampler)
        epoch += 1
    return out[: batches + 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=40, help="synthetic cohort size (when --data is not given)")
    p.add_argument("--data", type=Path, help="an existing MEN cohort (layout A or B)")
    p.add_argument("--batch", type=int, default=36)
    p.add_argument("--batches", type=int, default=3, help="timed batches per configuration")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bank-patients", type=int, default=0, help="random-volume bank of this many patients")
    p.add_argument("--prob", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:  # the cache keys stat the files: keep them while timing
        root = args.data or write_synthetic_men(Path(tmp) / "men", patients=args.patients, seed=0)
        run(args, load_cohort(MEN, root).cases, torch.device(args.device))


def run(args, cases, device: torch.device) -> None:
    cache = VolumeCache(SIZE, MODALITIES)
    t0 = time.perf_counter()
    cache.warm(cases)
    decode = time.perf_counter() - t0
    labels = [c.label for c in cases]
    shape = f"{len(MODALITIES)} x {'x'.join(map(str, SIZE))}, batch {args.batch}, p={args.prob}"
    print(
        f"# {len(cases)} patients ({shape}); preprocessing {len(cases) / decode:.1f} patients/s (cached before "
        f"timing); torch threads {torch.get_num_threads()}; device {device}"
    )

    # (a) per-sample MONAI augmentation in a DataLoader
    dataset = VolumeDataset(cases, MODALITIES, SIZE, train=True, cache=cache, aug_prob=args.prob)
    for workers in args.workers:
        torch.manual_seed(0)
        loader = DataLoader(
            dataset,
            batch_sampler=_sampler(labels, args.batch, args.batches),
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        rate = _rate(loader, device, args.batches)
        print(f"per-sample MONAI DataLoader, workers={workers}, -> {device}: {rate:.1f} patients/s")

    # (b) device-resident bank + batched augmentation on the device
    aug = BatchVolumeAugment(SIZE, prob=args.prob)
    for dtype in (torch.float32, torch.bfloat16):
        if args.bank_patients > len(cases):
            n = args.bank_patients
            bank = DeviceVolumeBank(
                torch.randn(n, len(MODALITIES), *SIZE, device=device, dtype=dtype), torch.arange(n) % 3
            )
            bank_labels = bank.labels.tolist()
        else:
            bank, bank_labels = DeviceVolumeBank.from_cache(cache, cases, device, dtype=dtype), labels
        gib = volume_bank_bytes(len(bank), len(MODALITIES), SIZE, dtype) / 2**30
        loader = DeviceBatches(bank, _sampler(bank_labels, args.batch, args.batches), aug)
        loader.manual_seed(0)
        rate = _rate(loader, device, args.batches)
        name = str(dtype).removeprefix("torch.")
        print(f"batched on {device}, bank {name} ({len(bank)} patients, {gib:.2f} GiB): {rate:.1f} patients/s")
        del bank, loader


if __name__ == "__main__":
    main()
