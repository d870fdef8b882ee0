"""What a run is: a digest of (resolved config, cohort, code, run selector).

A run folder is reused only when its identity matches the request exactly; otherwise the
caller is told what differs (config keys, the cohort's data, the code) and how to choose
(another `--out`, or `--overwrite`). Execution-only settings (device, CPU threads, loader
workers, cache folder) are not part of the identity: they decide how a run is computed,
not what it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ..config import Config

# `dataset` names where the schema is; its content is part of the cohort digest instead.
EXECUTION_ONLY = (
    "dataset",
    "train.device",
    "train.threads",
    "data.num_workers",
    "data.cache_dir",
    "data.device_augment",
    "report.temperature",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def identity_config(cfg: Config) -> dict:
    """The config keys that define a run (flat `section.key` -> value)."""
    return {k: v for k, v in _flat(cfg.to_dict()).items() if k not in EXECUTION_ONLY}


@functools.cache
def code_digest() -> str:
    """Content digest of the cfcml package's Python sources and shipped YAML (presets,
    schemas): changes with any code change, also where there is no git checkout."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]):
        if "__pycache__" in p.parts:
            continue
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg: Config, cohort_digest: str, run: str) -> dict:
    config = identity_config(cfg)
    code = code_digest()
    ident = {"run": run, "config_digest": _digest(config), "cohort_digest": cohort_digest, "code_digest": code}
    ident["digest"] = _digest(ident)
    ident["config"] = config
    return ident


def explain_mismatch(stored: dict | None, wanted: dict, where: Path) -> str:
    """Why the run in `where` is not the run asked for, and what to do."""
    if not stored or "digest" not in stored:
        why = ["it was written by an older cfcml without a run identity"]
    else:
        why = []
        if stored.get("run") != wanted["run"]:
            why.append(f"it is run {stored.get('run')}, not {wanted['run']}")
        old, new = stored.get("config", {}), wanted["config"]
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
        for k in changed[:6]:
            why.append(f"{k}: {old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} now")
        if len(changed) > 6:
            why.append(f"... and {len(changed) - 6} more config keys")
        if stored.get("cohort_digest") != wanted["cohort_digest"]:
            why.append("the cohort's data differ (cases, labels, splits, attributes or image files)")
        if stored.get("code_digest") != wanted["code_digest"]:
            why.append(f"the cfcml code differs ({stored.get('code_digest')} there, {wanted['code_digest']} now)")
    return (
        f"{where} holds a different run: "
        + "; ".join(why)
        + ". Choose another --out, or pass --overwrite to replace it."
    )
