"""Model registry promotion gate: move the ``champion`` alias only to a better model.

MLflow 3 promotes with aliases (stages are deprecated). A candidate model version is named
by version number or by alias (typically ``challenger``). Its validation metric is read from
the model-version tag ``metric.<name>`` (written at registration), falling back to the
source run's metric and then to the logged model's metric. The candidate becomes
``champion`` only if there is no champion yet or its metric is strictly better than the
champion's. ``force=True`` skips the comparison but requires a non-empty reason, which is
recorded as tags on the promoted version. Every successful promotion records
``promotion.*`` tags (timestamp, previous champion, forced, metric values) on the version.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG_PREFIX = "metric."


class PromotionError(RuntimeError):
    """The promotion request cannot be evaluated (unknown model/version/alias, no metric...)."""


@dataclass(frozen=True)
class PromotionResult:
    """What the gate decided. ``champion`` is the champion version after the call."""

    name: str
    candidate_version: str
    promoted: bool
    forced: bool
    metric: str
    candidate_value: float | None
    previous_champion: str | None
    champion_value: float | None
    champion: str | None
    message: str
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.message


def _is_not_found(e: MlflowException) -> bool:
    return e.error_code in (
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "INVALID_PARAMETER_VALUE",
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _parse_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def version_metric(client: MlflowClient, mv: ModelVersion, metric: str) -> float | None:
    """The validation metric of a model version, or None when it has none.

    Order: tag ``metric.<metric>`` on the version; the source run's metric; the logged
    model's metric (MLflow 3 ``ModelVersion.metrics``).
    """
    value = _parse_float((mv.tags or {}).get(f"{METRIC_TAG_PREFIX}{metric}"))
    if value is not None:
        return value
    if mv.run_id:
        try:
            run_metrics = client.get_run(mv.run_id).data.metrics
        except MlflowException:
            run_metrics = {}
        value = _parse_float(run_metrics.get(metric))
        if value is not None:
            return value
    for m in getattr(mv, "metrics", None) or []:
        if m.key == metric:
            value = _parse_float(m.value)
            if value is not None:
                return value
    return None


def resolve_version(
    client: MlflowClient,
    name: str,
    version: str | int | None = None,
    alias: str | None = None,
) -> ModelVersion:
    """The model version named by ``version`` or ``alias`` (exactly one of them)."""
    if (version is None) == (alias is None):
        raise PromotionError("give exactly one of version or alias")
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if _is_not_found(e):
            raise PromotionError(f"unknown registered model {name!r}") from e
        raise
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if _is_not_found(e):
                raise PromotionError(f"model {name!r} has no alias {alias!r}") from e
            raise
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if _is_not_found(e):
            raise PromotionError(f"model {name!r} has no version {version!r}") from e
        raise


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding the ``champion`` alias, or None."""
    aliases = client.get_registered_model(name).aliases or {}
    if CHAMPION not in aliases:
        return None
    return client.get_model_version(name, str(aliases[CHAMPION]))


def promote(
    client: MlflowClient,
    name: str,
    version: str | int | None = None,
    alias: str | None = None,
    metric: str = "val_auc",
    force: bool = False,
    reason: str | None = None,
    *,
    greater_is_better: bool = True,
) -> PromotionResult:
    """Move alias ``champion`` of model ``name`` to the candidate if it is better.

    The candidate is ``version`` or the version behind ``alias``. Without ``force`` it is
    promoted only when there is no champion or its ``metric`` is strictly better
    (higher when ``greater_is_better``) than the champion's; otherwise the champion is left
    unchanged and ``promoted`` is False. ``force=True`` requires a non-empty ``reason`` and
    records ``promotion.forced=true``, ``promotion.reason``, ``promotion.previous_champion``
    and ``promotion.timestamp`` on the candidate. Raises :class:`PromotionError` for unknown
    model/version/alias, a candidate that is not READY, or a missing metric that the
    comparison needs.
    """
    if force and not (reason and reason.strip()):
        raise PromotionError("--force needs a non-empty --reason")
    reason = reason.strip() if reason else None
    candidate = resolve_version(client, name, version=version, alias=alias)
    if candidate.status not in (None, "READY"):
        raise PromotionError(
            f"{name} version {candidate.version} is {candidate.status}, not READY"
        )
    champion = current_champion(client, name)
    previous = champion.version if champion else None
    cand_value = version_metric(client, candidate, metric)
    champ_value = version_metric(client, champion, metric) if champion else None

    def result(promoted: bool, message: str) -> PromotionResult:
        return PromotionResult(
            name=name,
            candidate_version=str(candidate.version),
            promoted=promoted,
            forced=force and promoted,
            metric=metric,
            candidate_value=cand_value,
            previous_champion=previous,
            champion_value=champ_value,
            champion=str(candidate.version) if promoted else previous,
            message=message,
            reason=reason,
        )

    label = f"{name} v{candidate.version}" + (f" (@{alias})" if alias else "")
    if champion is not None and str(champion.version) == str(candidate.version):
        return result(False, f"{label} is already the champion; nothing to do")

    if not force:
        if cand_value is None:
            raise PromotionError(
                f"{label} has no {metric!r} (tag {METRIC_TAG_PREFIX}{metric}, run metric "
                "or model metric); cannot compare — use --force --reason to override"
            )
        if champion is not None:
            if champ_value is None:
                raise PromotionError(
                    f"current champion {name} v{previous} has no {metric!r}; cannot "
                    "compare — use --force --reason to override"
                )
            better = (
                cand_value > champ_value
                if greater_is_better
                else cand_value < champ_value
            )
            if not better:
                return result(
                    False,
                    f"refused: {label} {metric}={_fmt(cand_value)} is not better than "
                    f"champion v{previous} {metric}={_fmt(champ_value)}; champion unchanged",
                )

    client.set_registered_model_alias(name, CHAMPION, str(candidate.version))
    tags = {
        "promotion.timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "promotion.previous_champion": previous or "none",
        "promotion.forced": "true" if force else "false",
        "promotion.metric": metric,
    }
    if cand_value is not None:
        tags[f"promotion.{metric}"] = repr(cand_value)
    if champ_value is not None:
        tags[f"promotion.previous_champion_{metric}"] = repr(champ_value)
    if reason:
        tags["promotion.reason"] = reason
    for key, value in tags.items():
        client.set_model_version_tag(name, str(candidate.version), key, value)

    if force:
        message = (
            f"forced: {label} is now champion (was {'v' + previous if previous else 'none'}; "
            f"{metric} {_fmt(cand_value)} vs {_fmt(champ_value)}); reason: {reason}"
        )
    elif previous is None:
        message = (
            f"promoted: {label} is the first champion ({metric}={_fmt(cand_value)})"
        )
    else:
        message = (
            f"promoted: {label} {metric}={_fmt(cand_value)} beats champion v{previous} "
            f"{metric}={_fmt(champ_value)}"
        )
    return result(True, message)
