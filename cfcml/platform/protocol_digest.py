"""The protocol a registered model was measured under: its fields and their digest.

Two models' numbers are comparable only when they were produced the same way: the same preset,
image size, runs (folds or seeds), validation fraction, held-out fraction, epoch-selection rule
and epoch budget. :func:`protocol_fields` lists exactly those, :func:`protocol_digest` hashes
them, and :func:`protocol_differences` names the fields in which two protocols differ (what the
promotion gate prints when it refuses). A study records both at registration, as params of the
version's source run (immutable once logged) and as version tags, under :data:`PROTOCOL_KEY`
and :data:`PROTOCOL_DIGEST_KEY` (see :func:`protocol_record`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from ..config import Config

PROTOCOL_KEY = "cfcml.protocol"  # the fields, as JSON
PROTOCOL_DIGEST_KEY = "cfcml.protocol_digest"  # their digest (16 hex digits)


def _run_name(run: str | Mapping) -> str:
    return run if isinstance(run, str) else str(run["name"])


def protocol_fields(cfg: Config, runs: Iterable[str | Mapping], holdout: float = 0.0) -> dict:
    """The protocol of a model built from ``runs`` (names, or ``protocol_runs`` dicts such as
    ``{"name": "fold1", "fold": 1}``) with ``holdout`` (fraction of patients held back from the
    whole study; 0 = none) under ``cfg``. ``train.select_min_epoch`` -1 is resolved to the
    warm-up length, so the default and its explicit value give the same protocol."""
    t = cfg.train
    return {
        "preset": cfg.name,
        "data.image_size": [int(s) for s in cfg.data.image_size],
        "runs": sorted(_run_name(r) for r in runs),
        "data.val_fraction": float(cfg.data.val_fraction),
        "holdout": float(holdout),
        "train.select_metric": t.select_metric,
        "train.select_window": int(t.select_window),
        "train.select_min_epoch": int(t.warmup_epochs if t.select_min_epoch < 0 else t.select_min_epoch),
        "train.patience": int(t.patience),
        "train.epochs": int(t.epochs),
    }


def fields_digest(fields: Mapping) -> str:
    """The digest of protocol fields (order-independent)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def protocol_digest(cfg: Config, runs: Iterable[str | Mapping], holdout: float = 0.0) -> str:
    """The digest of :func:`protocol_fields`."""
    return fields_digest(protocol_fields(cfg, runs, holdout))


def protocol_record(cfg: Config, runs: Iterable[str | Mapping], holdout: float = 0.0) -> dict[str, str]:
    """``{PROTOCOL_KEY: fields as JSON, PROTOCOL_DIGEST_KEY: digest}``: what registration logs
    as params of the version's source run and sets as version tags."""
    fields = protocol_fields(cfg, runs, holdout)
    return {PROTOCOL_KEY: json.dumps(fields, sort_keys=True), PROTOCOL_DIGEST_KEY: fields_digest(fields)}


def protocol_differences(a: Mapping, b: Mapping) -> list[str]:
    """``["train.epochs 50 vs 30", ...]``: the fields in which ``a`` and ``b`` differ (a field
    only one of them has shows as ``missing``)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "missing"), b.get(key, "missing")
        if va != vb:
            out.append(f"{key} {json.dumps(va)} vs {json.dumps(vb)}")
    return out
