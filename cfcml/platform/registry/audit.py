"""The audit trail of promotions.

Every promotion, refusal or forced promotion is appended to the registered model's tags as
``promotion.log.<UTC time>.<random>`` (JSON; a distinct key per attempt, so concurrent attempts
never overwrite each other; :func:`audit_trail` reads them back). A promoted version also
carries ``promotion.*`` tags (timestamp, previous champion, forced, metric values, reason).
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime

from mlflow.tracking import MlflowClient

from .gate import Measurement
from .result import PromotionResult

AUDIT_PREFIX = "promotion.log."


def append_audit(client: MlflowClient, name: str, entry: dict) -> None:
    """Append one attempt to the model's audit trail (a tag key of its own: nothing is overwritten)."""
    stamp = datetime.now(UTC)
    entry = {"time": stamp.isoformat(timespec="microseconds"), **entry}
    key = f"{AUDIT_PREFIX}{stamp.strftime('%Y%m%dT%H%M%S.%fZ')}.{secrets.token_hex(4)}"
    client.set_registered_model_tag(name, key, json.dumps(entry, sort_keys=True, default=str))


def audit_trail(client: MlflowClient, name: str) -> list[dict]:
    """Every promotion attempt recorded for model ``name``, oldest first."""
    tags = client.get_registered_model(name).tags or {}
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(AUDIT_PREFIX))]


def outcome_entry(r: PromotionResult) -> dict:
    """The audit fields of a decided attempt (added to the request's own fields)."""
    return {
        "outcome": "promoted" if r.promoted else "unchanged",
        "previous_champion": r.previous_champion,
        "champion": r.champion,
        "candidate_value": r.candidate_value,
        "champion_value": r.champion_value,
        "attempts": r.attempts,
        "message": r.message,
    }


def promoted_version_tags(r: PromotionResult, measured: Measurement | None) -> dict[str, str]:
    """The ``promotion.*`` tags of a promoted version; ``measured``: its gate measurement (None when forced)."""
    tags = {
        "promotion.timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "promotion.previous_champion": r.previous_champion or "none",
        "promotion.forced": "true" if r.forced else "false",
        "promotion.metric": r.metric,
    }
    if r.candidate_value is not None:
        tags[f"promotion.{r.metric}"] = repr(r.candidate_value)
    if r.champion_value is not None:
        tags[f"promotion.previous_champion_{r.metric}"] = repr(r.champion_value)
    if measured is not None:
        tags |= {
            "promotion.evaluation": measured.evaluation.kind,
            "promotion.ids_digest": measured.evaluation.ids_digest,
            "promotion.protocol_digest": measured.protocol.digest,
        }
    if r.reason:
        tags["promotion.reason"] = r.reason
    return tags


def tag_promoted_version(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
