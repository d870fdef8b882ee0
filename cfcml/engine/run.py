"""One training run (a fold or a seed): train, select on validation, test once.

Also the body of every Ray Train worker: under torch.distributed each rank trains on its
share of the class-balanced batches, CCRM sees the all-gathered global batch, and validation
predictions are gathered before metrics so every rank selects the same epoch.

A run folder knows what it holds (`engine.identity`): a finished run is reused only when
config, cohort and code match; a different run is never silently overwritten. Everything
is written atomically (temp file, then rename), `metrics.json` last.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from cfcml.datasets.reader import load_cohort
from cfcml.datasets.volume_augment import BankTooLarge, DeviceBatches, bank_batches

from ..config import Config, cohort_spec, first_candidate_epoch, save_config
from ..models.pretrained import check_pretrained, pretrained_provenance
from .checkpoint import (
    atomic_save,
    clean_stale_temp_files,
    load_checkpoint,
    load_state_checked,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .decision import run_decision
from .errors import RunMismatch, TrainingFailed
from .identity import explain_mismatch, run_identity
from .inference import Env, predict, resolve_env, to_inputs
from .loaders import LOADERS, build_tabular_inputs, make_datasets, make_train_sampler
from .metrics import compute_metrics
from .modality_dropout import build_modality_dropout
from .run_model import BEST, run_architecture, selected_weights
from .schedule import build_optimizer
from .selection import better, patience_exhausted, selection_score
from .splits import run_split

log = logging.getLogger(__name__)
LAST, METRICS, PREDICTIONS = "last.pt", "metrics.json", "predictions.npz"  # BEST: see run_model
RUN_FILES = (LAST, BEST, METRICS, PREDICTIONS, "config.yaml")

# reporter(epoch, metrics, run_dir) is called after every epoch (rank 0 and others alike:
# Ray Train wants every rank to report) — e.g. to forward metrics to Ray Tune or MLflow.
Reporter = Callable[[int, dict, Path], None]


def _loader(dataset, env: Env, cfg: Config, batch_sampler=None) -> DataLoader:
    kwargs = {"num_workers": cfg.data.num_workers, "pin_memory": env.device.type == "cuda", "persistent_workers": False}
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=False, **kwargs)


CPU_BANK_MAX_BYTES = 512 * 2**20  # `auto` on a CPU: small splits, where per-sample pipeline overhead dominates


def _train_loader(dataset, sampler, spec, env: Env, cfg: Config):
    """The training batches: a DataLoader with per-sample augmentation, or, for volumes
    (`data.device_augment`), the split held on the device and augmented a batch at a time
    there (the same transforms and probabilities, tested equal in distribution). `auto` takes
    the batched path on a GPU (per-sample CPU pipelines cannot feed it) and on a CPU for
    splits under CPU_BANK_MAX_BYTES (tiny volumes: MONAI's per-call overhead dominates)."""
    mode = cfg.data.device_augment
    batch_augment = LOADERS[spec.image_kind].batch_augment
    if batch_augment is None or mode == "never":
        return _loader(dataset, env, cfg, batch_sampler=sampler)
    if mode == "auto" and env.device.type != "cuda":
        need = len(dataset) * len(spec.series) * math.prod(cfg.data.image_size) * 4
        if need > CPU_BANK_MAX_BYTES:
            return _loader(dataset, env, cfg, batch_sampler=sampler)
    augment = batch_augment(cfg)
    try:
        return bank_batches(dataset, sampler, env.device, augment)
    except BankTooLarge as e:
        if mode == "always":
            raise TrainingFailed(f"data.device_augment=always: {e}") from None
        log.warning("%s; training with the per-sample DataLoader instead", e)
        return _loader(dataset, env, cfg, batch_sampler=sampler)


def _shard(dataset, env: Env):
    """Evaluation share of this rank: every case exactly once across ranks (no padding)."""
    if env.world == 1:
        return dataset
    return torch.utils.data.Subset(dataset, list(range(env.rank, len(dataset), env.world)))


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch  # every epoch reseeds, so a resumed run repeats the same draws


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def finished_result(out: Path) -> dict | None:
    """The metrics.json of a finished run in `out`, or None."""
    path = Path(out) / METRICS
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("finished") else None


def clear_run(out: Path) -> None:
    """Remove the files a run writes (nothing else in the folder)."""
    for name in RUN_FILES:
        (Path(out) / name).unlink(missing_ok=True)


class TrainingRun:
    """One run's state, stepped an epoch at a time (so a tuner can run K folds in lockstep).

    `resume`: continue from `out/last.pt` (only if it holds this very run); without it an
    existing run in `out` is refused unless `overwrite`.
    """

    def __init__(
        self,
        cfg: Config,
        data_root,
        out_dir,
        fold: int | None = None,
        seed: int | None = None,
        resume: bool = False,
        cohort=None,
        progress: bool = True,
        overwrite: bool = False,
    ):
        self.cfg, self.env = cfg, resolve_env(cfg)
        t, env = cfg.train, self.env
        self.progress = progress  # a tqdm bar per epoch when stderr is a terminal
        if t.threads:
            torch.set_num_threads(t.threads)
        self.seed = t.seed if seed is None else seed
        self.out = out = Path(out_dir)
        check_pretrained(cfg)  # paper presets refuse random-init encoders unless asked for explicitly
        self.spec = cohort.spec if cohort is not None else cohort_spec(cfg)
        cohort = cohort or load_cohort(self.spec, data_root)  # refuses a cohort that fails the check
        self.split = split = run_split(cfg, cohort, fold, seed)
        # predict.decision's hard-label rule, with this run's training class counts (saved in metrics.json)
        self.decision = run_decision(cfg.predict.decision, [c.label for c in split.train], len(self.spec.classes))
        self.identity = run_identity(cfg, cohort.digest(), split.name)
        if t.batch_size > len(split.train):
            raise RunMismatch(
                f"train.batch_size {t.batch_size} is larger than the training part of "
                f"{split.name} ({len(split.train)} cases): lower it"
            )
        state = self._claim_folder(resume, overwrite)  # refuses before anything is written
        if self.finished is not None:
            return  # the folder holds this very run, finished: nothing to build

        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=env.device.type == "cuda")
        seed_everything(self.seed)
        self.shape = self.spec.shape()
        self.num_classes = self.shape.num_classes
        self.tables, self.numeric_stats = build_tabular_inputs(cfg, self.spec, split)
        self.datasets = make_datasets(cfg, self.spec, split)

        self.model = run_architecture(cfg, self.spec).to(env.device)
        self.train_model = self.model
        if env.world > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer, self.scheduler = build_optimizer(self.model, t)
        self.modality_dropout = build_modality_dropout(cfg, self.spec)  # None unless train.modality_dropout > 0
        self.sampler = make_train_sampler(cfg, split.train, self.seed, env.rank, env.world)
        self.train_loader = _train_loader(self.datasets["train"], self.sampler, self.spec, env, cfg)
        self.val_loader = _loader(_shard(self.datasets["val"], env), env, cfg)

        self.epoch, self.history, self.best = 0, [], {"epoch": None, "value": None}
        if state is not None:
            load_state_checked(self.model, state["model"], out / LAST)
            load_state_checked(self.optimizer, state["optimizer"], out / LAST, what="optimizer")
            load_state_checked(self.scheduler, state["scheduler"], out / LAST, what="scheduler")
            load_state_checked(self.sampler, state["sampler"], out / LAST, what="sampler")
            self.epoch, self.history, self.best = state["epoch"] + 1, state["history"], state["best"]
            set_rng_state(state["rng"])
            log.info("resumed %s at epoch %d", out, self.epoch)
        if env.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")

    def _claim_folder(self, resume: bool, overwrite: bool) -> dict | None:
        """The checkpoint to resume from, or None; refuses a folder holding another run."""
        out = self.out
        if self.env.rank == 0:
            clean_stale_temp_files(out)  # leftovers of an interrupted write
        if overwrite:
            if self.env.rank == 0:
                clear_run(out)
            return None
        finished = finished_result(out)
        if finished is not None:
            if finished.get("identity", {}).get("digest") != self.identity["digest"]:
                raise RunMismatch(explain_mismatch(finished.get("identity"), self.identity, out))
            self.finished = finished
            return None
        if not (out / LAST).exists():
            return None
        state = load_checkpoint(
            out / LAST,
            map_location=self.env.device,
            required=("model", "optimizer", "scheduler", "sampler", "epoch", "history", "best", "rng"),
        )
        if state.get("identity", {}).get("digest") != self.identity["digest"]:
            raise RunMismatch(explain_mismatch(state.get("identity"), self.identity, out))
        if not resume:
            raise RunMismatch(
                f"{out} holds an unfinished run of this configuration: pass --resume to continue it, "
                "or --overwrite to start again"
            )
        return state

    finished: dict | None = None  # set when the folder already holds this run, finished

    @property
    def first_candidate(self) -> int:
        return first_candidate_epoch(self.cfg.train)

    @property
    def stopped_early(self) -> bool:
        """`train.patience` epochs without a better windowed validation score."""
        t = self.cfg.train
        return self.epoch < t.epochs and patience_exhausted(
            self.best["epoch"], self.epoch, self.first_candidate, t.patience
        )

    @property
    def done(self) -> bool:
        return self.finished is not None or self.epoch >= self.cfg.train.epochs or self.stopped_early

    def train_epoch(self) -> dict:
        """Train one epoch, validate, checkpoint; -> the epoch's record (train_*, val_* metrics)."""
        t, epoch, t0 = self.cfg.train, self.epoch, time.time()
        sums, n = self._train_steps()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()

        pred = predict(self.model, self.val_loader, self.tables["val"], self.env)
        val = compute_metrics(self.spec, pred["labels"], pred["probs"], self.decision) | {"loss": pred["loss"]}
        record = {"epoch": epoch, "lr": lr, "seconds": time.time() - t0}
        record |= {f"train_{k}": v / max(n, 1) for k, v in sums.items()} | {f"val_{k}": v for k, v in val.items()}
        self.history.append(record)
        record["select_score"] = score = selection_score(
            self.history, t.select_metric, t.select_window, self.first_candidate
        )
        improved = better(t.select_metric, score, self.best["value"])
        if improved:
            self.best = {"epoch": epoch, "value": score}
        if self.env.rank == 0:
            self._save_checkpoints(val, improved)
            log.info(
                "%(run)s epoch %(epoch)d: val %(metric)s=%(value).4f, selection score %(score).4f (best epoch %(best)s)",
                {
                    "run": self.split.name,
                    "epoch": epoch + 1,
                    "metric": t.select_metric,
                    "value": val[t.select_metric],
                    "score": score,
                    "best": self.best["epoch"],
                },
            )
        self.epoch += 1
        return record

    def _seed_epoch(self) -> int:
        """Seed every source of randomness of this epoch on this rank; -> the seed."""
        seed = _epoch_seed(self.seed, self.epoch) + self.env.rank
        seed_everything(seed)
        self.sampler.set_epoch(self.epoch)
        if isinstance(self.train_loader, DeviceBatches):  # batched augmentation on the device
            self.train_loader.manual_seed(seed)
        if hasattr(self.datasets["train"], "set_epoch"):
            self.datasets["train"].set_epoch(seed)
        return seed

    def _train_steps(self) -> tuple[dict[str, float], int]:
        """One pass over the training loader: -> (summed loss terms, steps)."""
        env, epoch = self.env, self.epoch
        seed = self._seed_epoch()
        drop = self.modality_dropout
        drop_rng = drop.generator(seed) if drop is not None else None
        self.train_model.train()
        sums, n = {}, 0
        show_bar = self.progress and env.rank == 0 and sys.stderr.isatty()
        desc = f"{self.split.name} epoch {epoch + 1}/{self.cfg.train.epochs}"
        bar = tqdm(self.train_loader, desc=desc, leave=False, disable=not show_bar)
        for batch in bar:
            inputs, y = to_inputs(batch, self.tables["train"], env)
            if drop is not None:
                inputs = drop(inputs, drop_rng)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.amp):
                out_m = self.train_model(**inputs)
            parts = self.model.loss_terms(out_m, y, epoch=epoch)  # the method's own objective
            if not torch.isfinite(parts["loss"]):
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                raise TrainingFailed(
                    f"{self.split.name}: non-finite loss at epoch {epoch + 1}, step {n + 1} ({terms}); "
                    f"stopped, the last good checkpoint is kept in {self.out} (try a lower train.lr)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            self.optimizer.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
            bar.set_postfix(loss=f"{parts['loss'].item():.3f}")
        return sums, n

    def _save_checkpoints(self, val: dict, improved: bool) -> None:
        """best.pt when the selection score improved, then last.pt (resume state), each atomically."""
        config = self.cfg.to_dict()
        if improved:
            atomic_save(
                {
                    "model": self.model.state_dict(),
                    "config": config,
                    "epoch": self.epoch,
                    "val": val,
                    "identity": self.identity,
                },
                self.out / BEST,
            )
        atomic_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "epoch": self.epoch,
                "history": self.history,
                "best": self.best,
                "rng": rng_state(),
                "config": config,
                "identity": self.identity,
            },
            self.out / LAST,
        )

    def finish(self) -> dict:
        """Test once, with the weights of the epoch selected on validation; write the
        predictions, then metrics.json (last: its presence means the run is complete)."""
        if self.finished is not None:
            return self.finished
        env, out = self.env, self.out
        if env.world > 1:
            dist.barrier()  # rank 0 has written best.pt
        if not (out / BEST).exists():
            raise TrainingFailed(
                f"{self.split.name}: no epoch had a finite validation {self.cfg.train.select_metric}, "
                f"so no weights were selected (see {out / LAST}); nothing to test"
            )
        load_state_checked(self.model, selected_weights(out / BEST, env.device), out / BEST)
        test_loader = _loader(_shard(self.datasets["test"], env), env, self.cfg)
        test = predict(self.model, test_loader, self.tables["test"], env, keep=True)
        val = predict(self.model, self.val_loader, self.tables["val"], env, keep=True)
        best_epoch = self.best["epoch"]
        result = {
            "run": self.split.name,
            "preset": self.cfg.name,
            "dataset": self.spec.name,
            "selected_epoch": best_epoch,
            "select_metric": self.cfg.train.select_metric,
            "select_window": self.cfg.train.select_window,
            "first_candidate_epoch": self.first_candidate,  # 0-based, as selected_epoch
            "patience": self.cfg.train.patience,
            "epochs_trained": len(self.history),
            "stopped_early": self.stopped_early,
            "selection": "validation (never test)",
            "validation": self.history[best_epoch] if best_epoch is not None else None,
            "decision": self.decision.to_dict(),  # the hard-label rule and the training class counts
            "test": compute_metrics(self.spec, test["labels"], test["probs"], self.decision) | {"loss": test["loss"]},
            "history": self.history,
            "sizes": {"train": len(self.split.train), "val": len(self.split.val), "test": len(self.split.test)},
            # CPU results are bit-identical for a seed only at the same thread count
            "device": str(env.device),
            "threads": torch.get_num_threads(),
            "pretrained": pretrained_provenance(self.cfg),  # what the encoders started from
            "identity": self.identity,
            "finished": True,
        }
        if env.rank == 0:
            arrays = {}
            for part, cases, p in (("val", self.split.val, val), ("test", self.split.test, test)):
                arrays[f"{part}_case_ids"] = np.array([cases[i].case_id for i in p["index"]])
                arrays |= {f"{part}_{k}": p[k] for k in ("labels", "probs", "logits", "features") if k in p}
            _save_npz(out / PREDICTIONS, **arrays)
            _write_json(out / METRICS, result)
        return result


def train_one(
    cfg: Config,
    data_root,
    out_dir,
    fold: int | None = None,
    seed: int | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    cohort=None,
    max_epochs_this_call: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train one run and return the contents of its metrics.json (reusing the run when the
    folder already holds it, finished). `max_epochs_this_call` stops early without testing
    (tests use it to simulate a crash)."""
    run = TrainingRun(
        cfg,
        data_root,
        out_dir,
        fold=fold,
        seed=seed,
        resume=resume,
        cohort=cohort,
        progress=progress,
        overwrite=overwrite,
    )
    if run.finished is not None:
        return run.finished
    for _ in range(max_epochs_this_call or cfg.train.epochs):
        if run.done:
            break
        record = run.train_epoch()
        if reporter is not None:
            reporter(record["epoch"], record, run.out)
    if not run.done:
        return {"history": run.history, "best": run.best, "finished": False}
    return run.finish()
