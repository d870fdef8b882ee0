"""``promote``: move the ``champion`` alias to a candidate version only when the gate says it is better.

Ties the parts together: the request is checked (:mod:`.metrics`), the candidate resolved
(:mod:`.versions`), then under the model's lock (:mod:`.lock`) the champion is read, both are
measured and compared (:mod:`.gate`), the champion is re-read right before the alias moves
(in case someone moved it without the gate: UI, API) and every attempt is audited (:mod:`.audit`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from .audit import append_audit, outcome_entry, promoted_version_tags, tag_promoted_version
from .errors import PromotionError
from .gate import Verdict, judge
from .lock import LOCK_WAIT_S, promotion_lock
from .metrics import DEFAULT_METRIC, MetricSpec, check_gate_metric, is_known, metric_spec
from .result import PromotionResult, with_promoted_message
from .versions import CHAMPION, current_champion, informational_value, measure, resolve_version, same_version

MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class _Request:
    """One promotion attempt: the candidate and how to judge it."""

    client: MlflowClient
    name: str
    candidate: ModelVersion
    label: str  # how messages name the candidate, e.g. "cfcml-men v3 (@challenger)"
    metric: str
    spec: MetricSpec | None  # None: forced with an unknown metric and no direction (nothing is compared)
    force: bool
    reason: str | None


def promote(
    client: MlflowClient,
    name: str,
    version: str | int | None = None,
    alias: str | None = None,
    metric: str = DEFAULT_METRIC,
    force: bool = False,
    reason: str | None = None,
    *,
    greater_is_better: bool | None = None,
    lock_wait: float = LOCK_WAIT_S,
) -> PromotionResult:
    """Move alias ``champion`` of model ``name`` to the candidate if it is better.

    The candidate is ``version`` or the version behind ``alias``. Without ``force`` it is
    promoted only when there is no champion or its own ``metric`` (its ``evaluation.json``, on
    untouched patients) is strictly better than the champion's, both valid and measured alike
    (kind, patients, data, protocol); a candidate that is not better leaves the champion
    unchanged and returns ``promoted=False``. ``greater_is_better``: None to use the metric's
    known direction (required for unknown metrics). ``force=True`` requires a non-empty
    ``reason``. Every attempt on an existing version is appended to the audit trail.
    Raises :class:`PromotionError` when the request cannot be evaluated; nothing but the
    audit trail is changed then.
    """
    if force and not (reason and reason.strip()):
        raise PromotionError("--force needs a non-empty --reason")
    reason = reason.strip() if reason else None
    metric = check_gate_metric(metric)
    spec = (
        None if force and greater_is_better is None and not is_known(metric) else metric_spec(metric, greater_is_better)
    )
    candidate = resolve_version(client, name, version=version, alias=alias)
    if candidate.status not in (None, "READY"):
        raise PromotionError(f"{name} version {candidate.version} is {candidate.status}, not READY")
    label = f"{name} v{candidate.version}" + (f" (@{alias})" if alias else "")
    req = _Request(
        client=client, name=name, candidate=candidate, label=label, metric=metric, spec=spec, force=force, reason=reason
    )
    entry = {"candidate": str(candidate.version), "metric": metric, "forced": force, "reason": reason}

    with promotion_lock(client, name, wait=lock_wait):
        try:
            outcome = _promote_locked(req)
        except PromotionError as e:
            append_audit(client, name, entry | {"outcome": "error", "message": str(e)})
            raise
        append_audit(client, name, entry | outcome_entry(outcome))
    return outcome


def _promote_locked(req: _Request) -> PromotionResult:
    client, name, candidate = req.client, req.name, req.candidate
    for attempt in range(1, MAX_ATTEMPTS + 1):
        champion = current_champion(client, name)
        if champion is not None and str(champion.version) == str(candidate.version):
            message = f"{req.label} is already the champion; nothing to do"
            return _result(req, champion, None, promoted=False, attempt=attempt, message=message)
        verdict = None
        if not req.force:
            verdict = _evaluate(req, champion)
            if not verdict.promote:
                return _result(req, champion, verdict, promoted=False, attempt=attempt, message=verdict.message)
        # the lock serialises cfcml promotions; this catches an alias moved outside the gate meanwhile
        if not same_version(current_champion(client, name), champion):
            continue
        client.set_registered_model_alias(name, CHAMPION, str(candidate.version))
        outcome = _result(req, champion, verdict, promoted=True, attempt=attempt, message="")
        measured = verdict.candidate if verdict is not None else None
        tag_promoted_version(client, name, str(candidate.version), promoted_version_tags(outcome, measured))
        return with_promoted_message(outcome, req.label)
    raise PromotionError(
        f"the champion of {name} changed {MAX_ATTEMPTS} times while {req.label} was being evaluated; "
        "nothing changed — try again when other promotions are done"
    )


def _evaluate(req: _Request, champion: ModelVersion | None) -> Verdict:
    """Compare the candidate with ``champion`` (None: no champion yet). Raises PromotionError
    when they cannot be compared; returns a refusal verdict when the candidate is not better."""
    cand = measure(req.client, req.candidate, req.spec, req.label)
    if champion is None:
        return Verdict(True, cand, None)
    champ_label = f"champion {req.name} v{champion.version}"
    champ = measure(req.client, champion, req.spec, champ_label)
    return judge(
        cand, champ, spec=req.spec, label=req.label, champ_label=champ_label, champion_version=str(champion.version)
    )


def _result(
    req: _Request, champion: ModelVersion | None, verdict: Verdict | None, *, promoted: bool, attempt: int, message: str
) -> PromotionResult:
    previous = str(champion.version) if champion else None
    if verdict is not None:
        cand = verdict.candidate.value
        champ = verdict.champion.value if verdict.champion else None
    else:  # forced or a no-op: informational values, unchecked
        cand = informational_value(req.client, req.candidate, req.metric)
        champ = informational_value(req.client, champion, req.metric)
    return PromotionResult(
        name=req.candidate.name,
        candidate_version=str(req.candidate.version),
        promoted=promoted,
        forced=req.force and promoted,
        metric=req.metric,
        candidate_value=cand,
        previous_champion=previous,
        champion_value=champ,
        champion=str(req.candidate.version) if promoted else previous,
        message=message,
        reason=req.reason,
        attempts=attempt,
    )
