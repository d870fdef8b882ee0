"""Model registry promotion gate: move the ``champion`` alias only to a better model.

MLflow 3 promotes with aliases (stages are deprecated). A candidate model version is named
by version number or by alias (typically ``challenger``). The gate:

* **knows each metric's direction and range** (:func:`metric_spec`): ``val_loss`` is lower
  is better, ``val_auc``/``acc``/... higher is better and lie in [0, 1]. A metric it does not
  know is refused unless the caller says which way is better (``greater_is_better``); a
  direction that contradicts a known metric is refused too.
* **reads values only from the source run's metrics** (``client.get_run(mv.run_id)``, the
  latest logged value), never from model-version tags, which anyone with edit rights can
  change. A value that is missing, NaN/inf or out of range is refused.
* **compares like with like**: challenger and champion must carry the same evaluation data
  digest (``data.digest``: a param of the source run, else its tag, else the param/tag of its
  parent run, e.g. the study run of a tuned trial); otherwise the request is refused.
* **re-checks the champion right before moving the alias**: if another promotion moved it
  between the read and the write, the candidate is evaluated again against the new champion
  (up to :data:`MAX_ATTEMPTS` times), so a better champion is never silently replaced. MLflow
  has no compare-and-set for aliases, so two promotions racing within the milliseconds
  between the re-check and the write can still both write; serialise promotions (one CI job)
  where that matters.

``force=True`` skips every check except that the candidate exists and is READY, and requires
a non-empty ``reason``; it is recorded in ``promotion.*`` tags on the promoted version
(timestamp, previous champion, forced, metric values, reason), like every promotion.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

CHAMPION = "champion"
CHALLENGER = "challenger"
DIGEST_KEY = "data.digest"
MAX_ATTEMPTS = 3


class PromotionError(RuntimeError):
    """The promotion request cannot be evaluated (unknown model/version/alias, no metric,
    a value out of range, different evaluation data, ...). Nothing was changed."""


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricSpec:
    """How to compare a metric: its direction and the range a valid value lies in."""

    name: str
    greater_is_better: bool
    low: float = -math.inf
    high: float = math.inf
    known: bool = True

    def check(self, value: float, who: str) -> float:
        if not math.isfinite(value):
            raise PromotionError(f"{who}: {self.name} = {value!r} is not a finite number; refusing to compare")
        if not self.low <= value <= self.high:
            raise PromotionError(
                f"{who}: {self.name} = {value:.6g} is outside its valid range [{self.low:g}, {self.high:g}]; "
                "refusing to compare"
            )
        return value

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a > b if self.greater_is_better else a < b


# base metric name → (greater_is_better, low, high); names as in summary.json and run metrics
_KNOWN = {
    **{m: (True, 0.0, 1.0) for m in ("auc", "acc", "sen", "spe", "g_mean", "balanced_acc", "auprc", "auprc_label",
                                     "weighted_f1", "macro_f1", "f1", "precision", "recall", "accuracy",
                                     "sensitivity", "specificity", "ppv", "npv")},
    "loss": (False, 0.0, math.inf),
    "brier": (False, 0.0, 1.0),
    "ece": (False, 0.0, 1.0),
}
_PREFIXES = ("cv_", "val_", "test_", "train_", "best_", "mean_")


def _base_name(metric: str) -> str:
    """``fold1/val_auc`` → ``auc``; ``test_auc_mean`` → ``auc``; ``cv_val_auc_epoch`` → ``auc``."""
    name = metric.rsplit("/", 1)[-1].lower()
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix):], True
    for suffix in ("_mean", "_epoch"):
        name = name.removesuffix(suffix)
    if re.fullmatch(r"acc_.+", name):  # per-class accuracy, acc_<class>
        return "acc"
    return name


def metric_spec(metric: str, greater_is_better: bool | None = None) -> MetricSpec:
    """The direction and range of ``metric``; ``greater_is_better`` is required for an
    unknown metric and must agree with a known one. Raises :class:`PromotionError`."""
    known = _KNOWN.get(_base_name(metric))
    if known is None:
        if greater_is_better is None:
            raise PromotionError(
                f"unknown metric {metric!r}: say which way is better with --greater-is-better or "
                f"--lower-is-better (known: {', '.join(sorted(_KNOWN))}, with val_/test_/cv_ prefixes)"
            )
        return MetricSpec(metric, greater_is_better, known=False)
    direction, low, high = known
    if greater_is_better is not None and greater_is_better != direction:
        raise PromotionError(
            f"{metric} is {'higher' if direction else 'lower'} is better; "
            f"--{'lower' if direction else 'greater'}-is-better contradicts it"
        )
    return MetricSpec(metric, direction, low, high)


# --------------------------------------------------------------------------- results


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
    attempts: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.message


def _is_not_found(e: MlflowException) -> bool:
    return e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


# --------------------------------------------------------------------------- reading the registry


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
            raise PromotionError(f"unknown registered model {name!r}") from None
        raise
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if _is_not_found(e):
                raise PromotionError(f"model {name!r} has no alias {alias!r}") from None
            raise
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if _is_not_found(e):
            raise PromotionError(f"model {name!r} has no version {version!r}") from None
        raise


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding the ``champion`` alias, or None."""
    aliases = client.get_registered_model(name).aliases or {}
    if CHAMPION not in aliases:
        return None
    return client.get_model_version(name, str(aliases[CHAMPION]))


def source_run(client: MlflowClient, mv: ModelVersion, who: str) -> Run:
    """The run that produced ``mv`` (where its metrics are logged, immutable once logged)."""
    if not mv.run_id:
        raise PromotionError(f"{who} has no source run: its metrics cannot be read from run data")
    try:
        return client.get_run(mv.run_id)
    except MlflowException as e:
        if _is_not_found(e):
            raise PromotionError(f"{who}: its source run {mv.run_id} no longer exists") from None
        raise


def run_metric(run: Run, spec: MetricSpec, who: str) -> float:
    """The latest value of ``spec.name`` logged in ``run``, checked (finite, in range)."""
    value = run.data.metrics.get(spec.name)
    if value is None:
        raise PromotionError(f"{who}: its source run {run.info.run_id} has no metric {spec.name!r}; cannot compare")
    return spec.check(float(value), who)


def data_digest(client: MlflowClient, run: Run) -> str | None:
    """``data.digest`` of ``run``: its param, else its tag, else its parent run's param/tag."""
    for r in (run, _parent(client, run)):
        if r is None:
            continue
        value = r.data.params.get(DIGEST_KEY) or r.data.tags.get(DIGEST_KEY)
        if value:
            return value
    return None


def _parent(client: MlflowClient, run: Run) -> Run | None:
    parent_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if not parent_id:
        return None
    try:
        return client.get_run(parent_id)
    except MlflowException:
        return None


def version_metric(client: MlflowClient, mv: ModelVersion, metric: str) -> float | None:
    """The source run's latest ``metric`` of a version, unchecked; None when unavailable.
    (Informational, e.g. for forced promotions; the gate itself uses :func:`run_metric`.)"""
    if not mv.run_id:
        return None
    try:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
    except MlflowException:
        return None
    return None if value is None else float(value)


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class _Verdict:
    promote: bool
    candidate_value: float | None
    champion_value: float | None
    message: str = ""


def _evaluate(client, name, candidate, champion, spec: MetricSpec, label: str) -> _Verdict:
    """Compare ``candidate`` with ``champion`` (None: no champion yet). Raises PromotionError
    when they cannot be compared; returns a refusal verdict when the candidate is not better."""
    cand_run = source_run(client, candidate, label)
    cand_value = run_metric(cand_run, spec, label)
    if champion is None:
        return _Verdict(True, cand_value, None)
    champ_label = f"champion {name} v{champion.version}"
    champ_run = source_run(client, champion, champ_label)
    champ_value = run_metric(champ_run, spec, champ_label)
    cand_digest, champ_digest = data_digest(client, cand_run), data_digest(client, champ_run)
    if not cand_digest or not champ_digest:
        who = label if not cand_digest else champ_label
        raise PromotionError(
            f"{who}: its source run records no {DIGEST_KEY} (param or tag), so it is unknown whether both were "
            "evaluated on the same data; use --force --reason to promote anyway"
        )
    if cand_digest != champ_digest:
        raise PromotionError(
            f"{label} was evaluated on other data ({DIGEST_KEY} {cand_digest[:12]}…) than {champ_label} "
            f"({champ_digest[:12]}…): their {spec.name} values are not comparable; use --force --reason to "
            "promote anyway"
        )
    if not spec.better(cand_value, champ_value):
        return _Verdict(
            False, cand_value, champ_value,
            f"refused: {label} {spec.name}={_fmt(cand_value)} is not better than champion v{champion.version} "
            f"{spec.name}={_fmt(champ_value)} ({'higher' if spec.greater_is_better else 'lower'} is better); "
            "champion unchanged",
        )  # fmt: skip
    return _Verdict(True, cand_value, champ_value)


def _same(a: ModelVersion | None, b: ModelVersion | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and str(a.version) == str(b.version))


def promote(
    client: MlflowClient,
    name: str,
    version: str | int | None = None,
    alias: str | None = None,
    metric: str = "val_auc",
    force: bool = False,
    reason: str | None = None,
    *,
    greater_is_better: bool | None = None,
) -> PromotionResult:
    """Move alias ``champion`` of model ``name`` to the candidate if it is better.

    The candidate is ``version`` or the version behind ``alias``. Without ``force`` it is
    promoted only when there is no champion or its ``metric`` (from its source run) is
    strictly better than the champion's, both valid and evaluated on the same data
    (``data.digest``); a candidate that is not better leaves the champion unchanged and
    returns ``promoted=False``. ``greater_is_better``: None to use the metric's known
    direction (required for unknown metrics). ``force=True`` requires a non-empty ``reason``.
    Raises :class:`PromotionError` when the request cannot be evaluated; nothing is changed then.
    """
    if force and not (reason and reason.strip()):
        raise PromotionError("--force needs a non-empty --reason")
    reason = reason.strip() if reason else None
    spec = None if force and greater_is_better is None and _base_name(metric) not in _KNOWN else metric_spec(
        metric, greater_is_better
    )
    candidate = resolve_version(client, name, version=version, alias=alias)
    if candidate.status not in (None, "READY"):
        raise PromotionError(f"{name} version {candidate.version} is {candidate.status}, not READY")
    label = f"{name} v{candidate.version}" + (f" (@{alias})" if alias else "")

    for attempt in range(1, MAX_ATTEMPTS + 1):
        champion = current_champion(client, name)
        if champion is not None and str(champion.version) == str(candidate.version):
            return _result(client, candidate, champion, metric, None, False, force, reason, attempt,
                           f"{label} is already the champion; nothing to do")  # fmt: skip
        verdict = None
        if not force:
            verdict = _evaluate(client, name, candidate, champion, spec, label)
            if not verdict.promote:
                return _result(client, candidate, champion, metric, verdict, False, force, reason, attempt,
                               verdict.message)  # fmt: skip
        # no lost update: the champion must still be the one just evaluated against
        if not _same(current_champion(client, name), champion):
            continue
        client.set_registered_model_alias(name, CHAMPION, str(candidate.version))
        outcome = _result(client, candidate, champion, metric, verdict, True, force, reason, attempt, "")
        _record(client, name, candidate, outcome)
        return _with_message(outcome, label)
    raise PromotionError(
        f"the champion of {name} changed {MAX_ATTEMPTS} times while {label} was being evaluated; "
        "nothing changed — try again when other promotions are done"
    )


def _result(client, candidate, champion, metric, verdict: _Verdict | None, promoted: bool, force: bool,
            reason: str | None, attempt: int, message: str) -> PromotionResult:  # fmt: skip
    previous = str(champion.version) if champion else None
    if verdict is not None:
        cand, champ = verdict.candidate_value, verdict.champion_value
    else:  # forced or a no-op: informational values, unchecked
        cand = version_metric(client, candidate, metric)
        champ = version_metric(client, champion, metric) if champion else None
    return PromotionResult(
        name=candidate.name, candidate_version=str(candidate.version), promoted=promoted, forced=force and promoted,
        metric=metric, candidate_value=cand, previous_champion=previous, champion_value=champ,
        champion=str(candidate.version) if promoted else previous, message=message, reason=reason, attempts=attempt,
    )


def _record(client: MlflowClient, name: str, candidate: ModelVersion, r: PromotionResult) -> None:
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
    if r.reason:
        tags["promotion.reason"] = r.reason
    for key, value in tags.items():
        client.set_model_version_tag(name, str(candidate.version), key, value)


def _with_message(r: PromotionResult, label: str) -> PromotionResult:
    m = r.metric
    if r.forced:
        was = "v" + r.previous_champion if r.previous_champion else "none"
        message = (f"forced: {label} is now champion (was {was}; {m} {_fmt(r.candidate_value)} vs "
                   f"{_fmt(r.champion_value)}); reason: {r.reason}")  # fmt: skip
    elif r.previous_champion is None:
        message = f"promoted: {label} is the first champion ({m}={_fmt(r.candidate_value)})"
    else:
        message = (f"promoted: {label} {m}={_fmt(r.candidate_value)} beats champion v{r.previous_champion} "
                   f"{m}={_fmt(r.champion_value)}")  # fmt: skip
    return PromotionResult(**{**r.to_dict(), "message": message})
