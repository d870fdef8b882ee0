"""Where a run computes and how it predicts: the device and rank (:class:`Env`), a batch as
model inputs, and :func:`predict`, the predictions over a loader gathered across ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Config
from .errors import TrainingFailed


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
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingFailed(f"train.device={t.device}: this machine has no CUDA device (use cpu or auto)")
    device = torch.device(want)
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    amp = (t.amp == "bf16") or (t.amp == "auto" and device.type == "cuda")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Env(device, amp, rank, world)


def to_inputs(batch: dict, tabular_table: torch.Tensor | None, env: Env) -> tuple[dict, torch.Tensor]:
    """A loader batch as model keyword inputs on the device (tabular rows looked up by case index), and its labels."""
    images = [x.to(env.device, non_blocking=True) for x in batch["images"]]
    tabular = tabular_table[batch["index"]].to(env.device, non_blocking=True) if tabular_table is not None else None
    return {"images": images, "tabular": tabular}, batch["label"].to(env.device)


def fused_features(out: dict) -> torch.Tensor | None:
    """The fused feature of a model output (the classifier's input), for t-SNE and reports."""
    if out.get("fused") is not None:
        return out["fused"]
    feats = out.get("features")
    return torch.cat([f.float() for f in feats], dim=1) if feats else None


@torch.no_grad()
def predict(model, loader, tabular_table, env: Env, keep: bool = False) -> dict:
    """Predictions over this rank's loader, gathered across ranks, in dataset order.

    -> {"labels" [N], "probs" [N, K], "loss" (mean CE)} and, with `keep`, "index" [N],
    "logits" [N, K] and "features" [N, F] (fused features, when the model gives them).
    """
    model.eval()
    parts = {"index": [], "labels": [], "logits": [], "features": []}
    total = 0.0
    for batch in loader:
        inputs, y = to_inputs(batch, tabular_table, env)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.amp):
            out = model(**inputs)
        logits = out["logits"].float()
        if (y >= 0).all():  # prediction cases carry label -1: no loss to report
            total += F.cross_entropy(logits, y, reduction="sum").item()
        else:
            total = math.nan
        parts["index"].append(batch["index"].cpu())
        parts["labels"].append(y.cpu())
        parts["logits"].append(logits.cpu())
        if keep and (f := fused_features(out)) is not None:
            parts["features"].append(f.float().cpu())
    arrays = {k: torch.cat(v).numpy() for k, v in parts.items() if v}
    if env.world > 1:
        gathered = [None] * env.world
        dist.all_gather_object(gathered, (arrays, total))
        arrays = {k: np.concatenate([a[k] for a, _ in gathered]) for k in arrays}
        total = sum(t for _, t in gathered)
    order = np.argsort(arrays["index"], kind="stable") if "index" in arrays else None
    arrays = {k: v[order] for k, v in arrays.items()} if order is not None else arrays
    n = len(arrays.get("labels", []))
    logits = arrays.get("logits", np.zeros((0, 0), dtype=np.float32))
    result = {
        "labels": arrays.get("labels", np.zeros(0, dtype=np.int64)),
        "probs": torch.from_numpy(logits).softmax(-1).numpy() if n else logits,
        "loss": total / max(n, 1),
    }
    if keep:
        result |= {k: arrays[k] for k in ("index", "logits", "features") if k in arrays}
    return result
