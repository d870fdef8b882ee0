"""One training run (a MEN fold or a Derm7pt seed): train, select on validation, test once.

Also the body of every Ray Train worker: under torch.distributed each rank trains on its
share of the class-balanced batches, CCRM sees the all-gathered global batch, and validation
predictions are gathered before metrics so every rank selects the same epoch.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from cfcml.datasets.loaders import build_tabular_inputs, make_datasets, make_train_sampler
from cfcml.datasets.registry import cohort_shape, load_cohort

from ..config import Config, save_config
from ..models.cfcml import build_model
from .checkpoint import atomic_save, rng_state, seed_everything, set_rng_state
from .metrics import compute_metrics
from .schedule import build_optimizer
from .splits import run_split

log = logging.getLogger(__name__)
LAST, BEST = "last.pt", "best.pt"

# reporter(epoch, metrics, run_dir) is called after every epoch (rank 0 and others alike:
# Ray Train wants every rank to report) — e.g. to forward metrics to Ray Tune or MLflow.
Reporter = Callable[[int, dict, Path], None]


@dataclass
class Env:
    device: torch.device
    amp: bool  # bf16 autocast
    rank: int = 0
    world: int = 1


def resolve_env(cfg: Config) -> Env:
    t = cfg.train
    want = t.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(want)
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    amp = (t.amp == "bf16") or (t.amp == "auto" and device.type == "cuda")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Env(device, amp, rank, world)


def _loader(dataset, env: Env, cfg: Config, batch_sampler=None) -> DataLoader:
    kwargs = {"num_workers": cfg.data.num_workers, "pin_memory": env.device.type == "cuda", "persistent_workers": False}
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=False, **kwargs)


def _to_inputs(batch: dict, tabular_table: torch.Tensor | None, env: Env) -> tuple[dict, torch.Tensor]:
    images = [x.to(env.device, non_blocking=True) for x in batch["images"]]
    tabular = tabular_table[batch["index"]].to(env.device, non_blocking=True) if tabular_table is not None else None
    return {"images": images, "tabular": tabular}, batch["label"].to(env.device)


@torch.no_grad()
def predict(model, loader, tabular_table, env: Env) -> tuple[np.ndarray, np.ndarray, float]:
    """-> (labels [N], probabilities [N, K], mean CE) over this rank's loader, gathered across ranks."""
    model.eval()
    labels, probs, losses = [], [], []
    for batch in loader:
        inputs, y = _to_inputs(batch, tabular_table, env)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.amp):
            logits = model(**inputs)["logits"].float()
        losses.append(F.cross_entropy(logits, y, reduction="sum").item())
        labels.append(y.cpu())
        probs.append(logits.softmax(-1).cpu())
    y, p = torch.cat(labels).numpy(), torch.cat(probs).numpy()
    total = sum(losses)
    if env.world > 1:
        parts = [None] * env.world
        dist.all_gather_object(parts, (y, p, total))
        y = np.concatenate([a for a, _, _ in parts])
        p = np.concatenate([b for _, b, _ in parts])
        total = sum(c for _, _, c in parts)
    return y, p, total / max(len(y), 1)


def _shard(dataset, env: Env):
    """Evaluation share of this rank: every case exactly once across ranks (no padding)."""
    if env.world == 1:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(env.rank, len(dataset), env.world)))


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new < old if metric == "loss" else new > old


def selection_score(history: list[dict], metric: str, window: int) -> float:
    """The validation score an epoch is selected on: the mean of `metric` over the last `window`
    epochs (NaN epochs skipped). A window > 1 keeps a one-epoch spike on a small validation
    set from picking the weights; the weights kept are still those of the epoch itself."""
    values = [h[f"val_{metric}"] for h in history[-window:]]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch  # every epoch reseeds, so a resumed run repeats the same draws


class TrainingRun:
    """One run's state, stepped an epoch at a time (so a tuner can run K folds in lockstep)."""

    def __init__(self, cfg: Config, data_root, out_dir, fold: int | None = None, seed: int | None = None,
                 resume: bool = False, cohort=None, progress: bool = True):
        self.cfg, self.env = cfg, resolve_env(cfg)
        t, env = cfg.train, self.env
        self.progress = progress  # a tqdm bar per epoch when stderr is a terminal
        if t.threads:
            torch.set_num_threads(t.threads)
        self.seed = t.seed if seed is None else seed
        self.out = out = Path(out_dir)
        if env.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=env.device.type == "cuda")
        seed_everything(self.seed)

        cohort = cohort or load_cohort(cfg.dataset, data_root)  # refuses a cohort that fails the check
        self.split = split = run_split(cfg, cohort, fold, seed)
        shape = cohort_shape(cfg.dataset)
        self.num_classes = shape.num_classes
        self.tables, num_features = build_tabular_inputs(cfg, split)
        self.datasets = make_datasets(cfg, split)

        self.model = build_model(cfg, shape, num_tabular_features=num_features).to(env.device)
        self.train_model = self.model
        if env.world > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer, self.scheduler = build_optimizer(self.model, t)
        self.sampler = make_train_sampler(cfg, split.train, self.seed, env.rank, env.world)
        self.train_loader = _loader(self.datasets["train"], env, cfg, batch_sampler=self.sampler)
        self.val_loader = _loader(_shard(self.datasets["val"], env), env, cfg)

        self.epoch, self.history, self.best = 0, [], {"epoch": None, "value": None}
        if resume and (out / LAST).exists():
            state = torch.load(out / LAST, map_location=env.device, weights_only=False)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.sampler.load_state_dict(state["sampler"])
            self.epoch, self.history, self.best = state["epoch"] + 1, state["history"], state["best"]
            set_rng_state(state["rng"])
            log.info("resumed %s at epoch %d", out, self.epoch)

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.train.epochs

    def train_epoch(self) -> dict:
        """Train one epoch, validate, checkpoint; -> the epoch's record (train_*, val_* metrics)."""
        cfg, env, t, epoch = self.cfg, self.env, self.cfg.train, self.epoch
        seed_everything(_epoch_seed(self.seed, epoch) + env.rank)
        self.sampler.set_epoch(epoch)
        if hasattr(self.datasets["train"], "set_epoch"):
            self.datasets["train"].set_epoch(_epoch_seed(self.seed, epoch) + env.rank)
        self.train_model.train()
        sums, n, t0 = {}, 0, time.time()
        show_bar = self.progress and env.rank == 0 and sys.stderr.isatty()
        bar = tqdm(self.train_loader, desc=f"{self.split.name} epoch {epoch + 1}/{t.epochs}", leave=False, disable=not show_bar)
        for batch in bar:
            inputs, y = _to_inputs(batch, self.tables["train"], env)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.amp):
                out_m = self.train_model(**inputs)
            parts = self.model.loss_terms(out_m, y, epoch=epoch)  # the method's own objective
            self.optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            self.optimizer.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
            bar.set_postfix(loss=f"{parts['loss'].item():.3f}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()

        y_val, p_val, val_loss = predict(self.model, self.val_loader, self.tables["val"], env)
        val = compute_metrics(cfg.dataset, y_val, p_val) | {"loss": val_loss}
        record = {"epoch": epoch, "lr": lr, "seconds": time.time() - t0}
        record |= {f"train_{k}": v / max(n, 1) for k, v in sums.items()} | {f"val_{k}": v for k, v in val.items()}
        self.history.append(record)
        record["select_score"] = score = selection_score(self.history, t.select_metric, t.select_window)
        improved = _better(t.select_metric, score, self.best["value"])
        if improved:
            self.best = {"epoch": epoch, "value": score}
        if env.rank == 0:
            if improved:
                atomic_save({"model": self.model.state_dict(), "config": cfg.to_dict(), "epoch": epoch, "val": val}, self.out / BEST)
            atomic_save({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(), "epoch": epoch, "history": self.history,
                "best": self.best, "rng": rng_state(), "config": cfg.to_dict(),
            }, self.out / LAST)  # fmt: skip
            log.info("%s epoch %d: val %s=%.4f, selection score %.4f (best epoch %s)", self.split.name, epoch + 1,
                     t.select_metric, val[t.select_metric], score, self.best["epoch"])
        self.epoch += 1
        return record

    def finish(self) -> dict:
        """Test once, with the weights of the epoch selected on validation; write metrics.json."""
        env, out = self.env, self.out
        if env.world > 1:
            dist.barrier()  # rank 0 has written best.pt
        state = torch.load(out / BEST, map_location=env.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        test_loader = _loader(_shard(self.datasets["test"], env), env, self.cfg)
        y, p, test_loss = predict(self.model, test_loader, self.tables["test"], env)
        best_epoch = self.best["epoch"]
        result = {
            "run": self.split.name,
            "preset": self.cfg.name,
            "selected_epoch": best_epoch,
            "select_metric": self.cfg.train.select_metric,
            "select_window": self.cfg.train.select_window,
            "selection": "validation (never test)",
            "validation": self.history[best_epoch] if best_epoch is not None else None,
            "test": compute_metrics(self.cfg.dataset, y, p) | {"loss": test_loss},
            "history": self.history,
            "sizes": {"train": len(self.split.train), "val": len(self.split.val), "test": len(self.split.test)},
            # CPU results are bit-identical for a seed only at the same thread count
            "device": str(env.device), "threads": torch.get_num_threads(),
            "finished": True,
        }
        if env.rank == 0:
            tmp = out / "metrics.json.tmp"
            tmp.write_text(json.dumps(result, indent=2, default=float))
            tmp.replace(out / "metrics.json")
            np.savez(out / "test_predictions.npz", labels=y, probs=p)
        return result


def train_one(cfg: Config, data_root, out_dir, fold: int | None = None, seed: int | None = None, resume: bool = False,
              reporter: Reporter | None = None, cohort=None, max_epochs_this_call: int | None = None,
              progress: bool = True) -> dict:
    """Train one run and return the contents of its metrics.json.

    `max_epochs_this_call` stops early without testing (tests use it to simulate a crash).
    """
    run = TrainingRun(cfg, data_root, out_dir, fold=fold, seed=seed, resume=resume, cohort=cohort, progress=progress)
    for _ in range(max_epochs_this_call or cfg.train.epochs):
        if run.done:
            break
        record = run.train_epoch()
        if reporter is not None:
            reporter(record["epoch"], record, run.out)
    if not run.done:
        return {"history": run.history, "best": run.best, "finished": False}
    return run.finish()
