"""Model registry promotion gate: move the ``champion`` alias only to a better model.

MLflow 3 promotes with aliases (stages are deprecated). A candidate model version is named
by version number or by alias (typically ``challenger``). The gate:

* **measures the artifact, not the search**: the value compared is the registered model's own
  metric on patients nothing in its study saw, read from the ``evaluation.json`` in the
  version's artifacts (``{"kind": "holdout" | "test_split" | "out_of_fold", "ids": [...],
  "data_digest": "...", "metrics": {...}}``, written at registration by scoring the package
  as ``cfcml predict`` does). Default metric ``auc``. A version of kind ``out_of_fold`` has no
  such measurement and is refused. The search's maximum (``val_*``, ``cv_*``, ``best_*``, a
  max over epochs and trials: a study with more trials would win without being better) and
  the members' own ``test_*`` metrics are never gate metrics (:func:`check_gate_metric`).
* **knows each metric's direction and range** (:func:`metric_spec`): ``auc``/``acc``/... are
  higher is better in [0, 1], ``loss`` lower is better, ``brier`` lower is better in [0, 2]
  (the multi-class score sums over classes). A metric it does not know is refused unless the
  caller says which way is better; a direction that contradicts a known metric is refused too.
  A value that is missing, NaN/inf or out of range is refused.
* **compares like with like**: both versions must have been measured the same way (same
  ``kind``), on the same patients (digest of the ``ids``), on the same data (``data_digest``)
  and under the same protocol (``cfcml.protocol_digest``, a param of the source run, else a
  version tag: :mod:`cfcml.platform.protocol_digest`); otherwise the request is refused,
  naming what differs.
* **serialises promotions of a model** (no lost update): a promotion holds a lock while it
  reads the champion, compares and moves the alias. The lock is the registered model
  ``<name>--promotion-lock``: creating a registered model is atomic in MLflow (its name is
  unique in the store), so of two concurrent promotions one creates it and the other waits;
  the holder deletes it when done (a lock left by a killed process is broken after
  :data:`LOCK_STALE_S` seconds). Inside it the champion is still re-read right before the
  write, in case someone moved the alias without the gate (UI, API).
* **audits every attempt**: each promotion, refusal or forced promotion is appended to the
  registered model's tags as ``promotion.log.<UTC time>.<random>`` (JSON: candidate, previous
  champion, outcome, metric values, digests, reason, message; a distinct key per attempt, so
  concurrent attempts never overwrite each other; :func:`audit_trail` reads them back). A
  promoted version also carries ``promotion.*`` tags (timestamp, previous champion, forced,
  metric values, reason).

``force=True`` skips every check except that the candidate exists and is READY, and requires
a non-empty ``reason``; it is audited like every promotion.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from .protocol_digest import PROTOCOL_DIGEST_KEY, PROTOCOL_KEY, fields_digest, protocol_differences

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_METRIC = "auc"
EVALUATION_FILE = "evaluation.json"
OWN_KINDS = ("holdout", "test_split")  # measured on patients nothing in the study saw
KINDS = (*OWN_KINDS, "out_of_fold")
MAX_ATTEMPTS = 3
LOCK_SUFFIX = "--promotion-lock"
LOCK_WAIT_S = 120.0  # how long a promotion waits for another one of the same model
LOCK_STALE_S = 120.0  # a lock unchanged this long was left by a killed process
AUDIT_PREFIX = "promotion.log."


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
    **{
        m: (True, 0.0, 1.0)
        for m in (
            "auc",
            "acc",
            "sen",
            "spe",
            "g_mean",
            "balanced_acc",
            "auprc",
            "auprc_label",
            "weighted_f1",
            "macro_f1",
            "f1",
            "precision",
            "recall",
            "accuracy",
            "sensitivity",
            "specificity",
            "ppv",
            "npv",
        )
    },
    "loss": (False, 0.0, math.inf),
    "brier": (False, 0.0, 2.0),  # multi-class: sum over classes of (p - y)^2
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
                name, changed = name[len(prefix) :], True
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


_SEARCH_PREFIXES = ("val_", "cv_", "best_")


def check_gate_metric(metric: str) -> str:
    """``metric`` if it may be a gate metric: a plain name of the artifact's own metrics
    (``auc``, ``balanced_acc``, ``brier``, ...). Raises :class:`PromotionError` for the search's
    maximum and for the members' metrics."""
    name = metric.strip().lower()
    if not name:
        raise PromotionError("--metric is empty; the default is the artifact's own 'auc'")
    if "/" in name:
        raise PromotionError(
            f"{metric!r} is a member run's metric (one fold or seed model), not the registered model's; "
            f"give a plain name measured on the package, e.g. --metric {DEFAULT_METRIC}"
        )
    if name.startswith(_SEARCH_PREFIXES) or name.endswith("_epoch"):
        raise PromotionError(
            f"{metric!r} is the search's maximum (selected on validation over epochs and trials: a study with more "
            "trials would win without being better), so it can never be the gate metric; the gate compares the "
            f"registered model's own metric on untouched patients ({EVALUATION_FILE}), e.g. --metric {DEFAULT_METRIC}"
        )
    if name.startswith(("test_", "train_", "mean_")) or name.endswith(("_mean", "_std")):
        raise PromotionError(
            f"{metric!r} summarises the study's member runs (each fold or seed model on its own split), not the "
            f"registered model; the gate reads the package's own metrics from {EVALUATION_FILE}: use the plain name, "
            f"e.g. --metric {_base_name(name) if _base_name(name) in _KNOWN else DEFAULT_METRIC}"
        )
    return metric.strip()


# --------------------------------------------------------------------------- what a version was measured on


@dataclass(frozen=True)
class Evaluation:
    """A version's ``evaluation.json``: how and on which patients its metrics were measured."""

    kind: str
    ids: tuple[str, ...]
    data_digest: str
    metrics: dict[str, float]

    @property
    def ids_digest(self) -> str:
        """Digest of the patient ids (computed here from the ids, never trusted from the file)."""
        from ..engine.splits import ids_digest  # sklearn: imported only when a gate compares

        return ids_digest(self.ids)


def parse_evaluation(data: object, who: str) -> Evaluation:
    """Check an ``evaluation.json`` document; errors name the field and what was expected."""
    where = f"{who}: {EVALUATION_FILE}"
    if not isinstance(data, dict):
        raise PromotionError(f"{where} is not a JSON object")
    kind = data.get("kind")
    if kind not in KINDS:
        raise PromotionError(f"{where}: 'kind' is {kind!r}; expected one of {', '.join(KINDS)}")
    ids = data.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise PromotionError(f"{where}: 'ids' must be a list of non-empty patient id strings")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PromotionError(f"{where}: 'ids' lists {dup!r} more than once")
    if kind in OWN_KINDS and not ids:
        raise PromotionError(f"{where}: 'ids' is empty; a {kind} evaluation names the patients it scored")
    digest = data.get("data_digest")
    if not isinstance(digest, str) or not digest:
        raise PromotionError(f"{where}: 'data_digest' must be a non-empty string (the cohort's digest)")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise PromotionError(f"{where}: 'metrics' must be an object of metric name -> number")
    values = {}
    for key, value in metrics.items():
        if value is None:  # undefined (e.g. AUC with one class present): absent for the gate
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PromotionError(f"{where}: metrics[{key!r}] is {value!r}; expected a number")
        values[str(key)] = float(value)
    return Evaluation(kind, tuple(ids), digest, values)


# where evaluation.json lies in a version's artifacts: inside the package (a study's pyfunc stores it under
# artifacts/<cfcml.platform.pyfunc.PACKAGE_ARTIFACT>; not imported here: it would load torch), or at the root
EVALUATION_PATHS = (f"artifacts/package/{EVALUATION_FILE}", EVALUATION_FILE)


def _download(client: MlflowClient, mv: ModelVersion, rel: str, dst: Path) -> str | None:
    """Download ``rel`` of a version's artifacts through ``client``'s server (never the process's
    default tracking URI); None when the version has no such file."""
    dst.mkdir(parents=True, exist_ok=True)
    parent = posixpath.dirname(rel) or None
    uri = client.get_model_version_download_uri(mv.name, str(mv.version))
    if uri.startswith("runs:/"):
        run_id, _, sub = uri.removeprefix("runs:/").partition("/")
        rel, parent = posixpath.join(sub, rel), posixpath.join(sub, parent or "")
        if rel not in {f.path for f in client.list_artifacts(run_id, parent.rstrip("/") or None)}:
            return None
        return client.download_artifacts(run_id, rel, str(dst))
    if uri.startswith("models:/"):  # an MLflow 3 logged model
        uri = client.get_logged_model(uri.removeprefix("models:/").split("/")[0]).artifact_location
    repo = get_artifact_repository(uri, tracking_uri=client.tracking_uri)
    if rel not in {f.path for f in repo.list_artifacts(parent)}:
        return None
    return repo.download_artifacts(rel, str(dst))


def load_evaluation(client: MlflowClient, mv: ModelVersion, who: str) -> Evaluation:
    """The ``evaluation.json`` in the artifacts of model version ``mv`` (:data:`EVALUATION_PATHS`)."""
    with tempfile.TemporaryDirectory(prefix="cfcml-gate-") as tmp:
        for i, rel in enumerate(EVALUATION_PATHS):
            path = _download(client, mv, rel, Path(tmp) / str(i))
            if path is not None:
                break
        else:
            raise PromotionError(
                f"{who} has no {EVALUATION_FILE} in its artifacts: it was never measured as itself (registered "
                "before the gate compared the artifact's own metrics?); use --force --reason to promote anyway"
            )
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PromotionError(f"{who}: {EVALUATION_FILE} is not valid JSON ({e})") from None
    return parse_evaluation(data, who)


@dataclass(frozen=True)
class Protocol:
    """How a version was trained and selected (:mod:`cfcml.platform.protocol_digest`)."""

    digest: str
    fields: dict | None  # None when only the digest was recorded


def version_protocol(mv: ModelVersion, run: Run, who: str) -> Protocol:
    """The protocol of ``mv``: params of its source run (immutable once logged), else its
    version tags. Fields and digest that disagree are refused."""
    for source in (run.data.params, mv.tags or {}):
        digest, text = source.get(PROTOCOL_DIGEST_KEY), source.get(PROTOCOL_KEY)
        if not digest and not text:
            continue
        fields = None
        if text:
            try:
                fields = json.loads(text)
            except json.JSONDecodeError:
                raise PromotionError(f"{who}: {PROTOCOL_KEY} is not valid JSON") from None
            if not isinstance(fields, dict):
                raise PromotionError(f"{who}: {PROTOCOL_KEY} is not a JSON object")
            if digest and fields_digest(fields) != digest:
                raise PromotionError(f"{who}: {PROTOCOL_DIGEST_KEY} {digest} is not the digest of its {PROTOCOL_KEY}")
        return Protocol(digest or fields_digest(fields), fields)
    raise PromotionError(
        f"{who} records no {PROTOCOL_DIGEST_KEY} (param of its source run or version tag), so it is unknown whether "
        "it was measured under the champion's protocol; use --force --reason to promote anyway"
    )


@dataclass(frozen=True)
class Measurement:
    """A version's gate value and what it was measured on."""

    value: float
    evaluation: Evaluation
    protocol: Protocol


def measure(client: MlflowClient, mv: ModelVersion, spec: MetricSpec, who: str) -> Measurement:
    """``spec``'s value of ``mv`` from its own ``evaluation.json``, checked, with its protocol."""
    evaluation = load_evaluation(client, mv, who)
    if evaluation.kind not in OWN_KINDS:
        raise PromotionError(
            f"{who} has no test metric of its own: its {EVALUATION_FILE} is of kind {evaluation.kind!r} (the "
            "cross-validated estimate of single fold models; every patient trained or selected some member of the "
            f"package), so it cannot be compared; register it from a study with --holdout, or use --force --reason"
        )
    value = evaluation.metrics.get(spec.name)
    if value is None:
        have = ", ".join(sorted(evaluation.metrics))
        raise PromotionError(f"{who}: its {EVALUATION_FILE} has no metric {spec.name!r} (it has: {have})")
    spec.check(value, who)
    return Measurement(value, evaluation, version_protocol(mv, source_run(client, mv, who), who))


def _differences(cand: Measurement, champ: Measurement) -> list[str]:
    """What makes the two measurements incomparable (empty: like with like)."""
    a, b = cand.evaluation, champ.evaluation
    out = []
    if a.kind != b.kind:
        out.append(f"evaluation kind {a.kind} vs {b.kind}")
    if a.ids_digest != b.ids_digest:
        only_a, only_b = len(set(a.ids) - set(b.ids)), len(set(b.ids) - set(a.ids))
        out.append(
            f"patients: ids digest {a.ids_digest[:16]} ({len(a.ids)} ids) vs {b.ids_digest[:16]} ({len(b.ids)} ids), "
            f"{only_a} only in the candidate, {only_b} only in the champion"
        )
    if a.data_digest != b.data_digest:
        out.append(f"data: data_digest {a.data_digest[:16]} vs {b.data_digest[:16]}")
    pa, pb = cand.protocol, champ.protocol
    if pa.digest != pb.digest:
        named = protocol_differences(pa.fields, pb.fields) if pa.fields is not None and pb.fields is not None else []
        out.append(
            f"protocol: {PROTOCOL_DIGEST_KEY} {pa.digest} vs {pb.digest}" + (f" ({'; '.join(named)})" if named else "")
        )
    return out


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
    """The run that produced ``mv`` (its params are immutable once logged)."""
    if not mv.run_id:
        raise PromotionError(f"{who} has no source run: its protocol cannot be read from run data")
    try:
        return client.get_run(mv.run_id)
    except MlflowException as e:
        if _is_not_found(e):
            raise PromotionError(f"{who}: its source run {mv.run_id} no longer exists") from None
        raise


def _informational(client: MlflowClient, mv: ModelVersion | None, metric: str) -> float | None:
    """A version's own ``metric`` from its evaluation.json, unchecked; None when unavailable
    (for forced promotions and no-ops, which compare nothing)."""
    if mv is None:
        return None
    try:
        return load_evaluation(client, mv, f"v{mv.version}").metrics.get(metric)
    except (PromotionError, MlflowException, OSError):
        return None


# --------------------------------------------------------------------------- the lock and the audit trail


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


@contextmanager
def promotion_lock(
    client: MlflowClient, name: str, wait: float = LOCK_WAIT_S, stale: float = LOCK_STALE_S
) -> Iterator[str]:
    """Hold the promotion lock of model ``name`` (see the module docstring); yields its token."""
    lock, token = lock_name(name), secrets.token_hex(8)
    deadline, seen = time.monotonic() + wait, None  # seen: (lock's creation time, when we first saw it)
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"cfcml.promotion_lock": token, "cfcml.lock_for": name},
                description=f"held while a promotion of {name} runs; deleted after it",
            )
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock).creation_timestamp
        except MlflowException as e:
            if _is_not_found(e):
                continue  # released between our create and our read: try again at once
            raise
        now = time.monotonic()
        if seen is None or seen[0] != held:
            seen = (held, now)
        elif now - seen[1] > stale:  # the same lock for too long: its holder died
            _delete_quietly(client, lock)
            seen = None
            continue
        if now > deadline:
            raise PromotionError(
                f"another promotion of {name} has held the lock {lock!r} for over {wait:.0f} s; nothing changed — "
                "try again later (a lock left by a killed process is removed after "
                f"{stale:.0f} s, or delete that registered model)"
            )
        time.sleep(0.05 + secrets.randbelow(100) / 1000)
    try:
        yield token
    finally:
        try:
            if (client.get_registered_model(lock).tags or {}).get("cfcml.promotion_lock") == token:
                _delete_quietly(client, lock)
        except MlflowException:
            pass  # broken as stale by another process: not ours to delete


def _delete_quietly(client: MlflowClient, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except MlflowException as e:
        if not _is_not_found(e):
            raise


def _audit(client: MlflowClient, name: str, entry: dict) -> None:
    """Append one attempt to the model's audit trail (a tag key of its own: nothing is overwritten)."""
    stamp = datetime.now(UTC)
    entry = {"time": stamp.isoformat(timespec="microseconds"), **entry}
    key = f"{AUDIT_PREFIX}{stamp.strftime('%Y%m%dT%H%M%S.%fZ')}.{secrets.token_hex(4)}"
    client.set_registered_model_tag(name, key, json.dumps(entry, sort_keys=True, default=str))


def audit_trail(client: MlflowClient, name: str) -> list[dict]:
    """Every promotion attempt recorded for model ``name``, oldest first."""
    tags = client.get_registered_model(name).tags or {}
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(AUDIT_PREFIX))]


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class _Verdict:
    promote: bool
    candidate: Measurement
    champion: Measurement | None
    message: str = ""


def _evaluate(client, name, candidate, champion, spec: MetricSpec, label: str) -> _Verdict:
    """Compare ``candidate`` with ``champion`` (None: no champion yet). Raises PromotionError
    when they cannot be compared; returns a refusal verdict when the candidate is not better."""
    cand = measure(client, candidate, spec, label)
    if champion is None:
        return _Verdict(True, cand, None)
    champ_label = f"champion {name} v{champion.version}"
    champ = measure(client, champion, spec, champ_label)
    differences = _differences(cand, champ)
    if differences:
        raise PromotionError(
            f"{label} and {champ_label} were not measured alike — {'; '.join(differences)}: their {spec.name} values "
            "are not comparable; use --force --reason to promote anyway"
        )
    if not spec.better(cand.value, champ.value):
        return _Verdict(
            False,
            cand,
            champ,
            f"refused: {label} {spec.name}={_fmt(cand.value)} is not better than champion v{champion.version} "
            f"{spec.name}={_fmt(champ.value)} ({'higher' if spec.greater_is_better else 'lower'} is better, "
            f"{cand.evaluation.kind}, {len(cand.evaluation.ids)} patients); champion unchanged",
        )
    return _Verdict(True, cand, champ)


def _same(a: ModelVersion | None, b: ModelVersion | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and str(a.version) == str(b.version))


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
        None
        if force and greater_is_better is None and _base_name(metric) not in _KNOWN
        else metric_spec(metric, greater_is_better)
    )
    candidate = resolve_version(client, name, version=version, alias=alias)
    if candidate.status not in (None, "READY"):
        raise PromotionError(f"{name} version {candidate.version} is {candidate.status}, not READY")
    label = f"{name} v{candidate.version}" + (f" (@{alias})" if alias else "")
    entry = {"candidate": str(candidate.version), "metric": metric, "forced": force, "reason": reason}

    with promotion_lock(client, name, wait=lock_wait):
        try:
            outcome = _promote_locked(client, name, candidate, label, metric, spec, force, reason)
        except PromotionError as e:
            _audit(client, name, entry | {"outcome": "error", "message": str(e)})
            raise
        _audit(
            client,
            name,
            entry
            | {
                "outcome": "promoted" if outcome.promoted else "unchanged",
                "previous_champion": outcome.previous_champion,
                "champion": outcome.champion,
                "candidate_value": outcome.candidate_value,
                "champion_value": outcome.champion_value,
                "attempts": outcome.attempts,
                "message": outcome.message,
            },
        )
    return outcome


def _promote_locked(client, name, candidate, label, metric, spec, force, reason) -> PromotionResult:
    for attempt in range(1, MAX_ATTEMPTS + 1):
        champion = current_champion(client, name)
        if champion is not None and str(champion.version) == str(candidate.version):
            return _result(
                client,
                candidate,
                champion,
                metric,
                None,
                False,
                force,
                reason,
                attempt,
                f"{label} is already the champion; nothing to do",
            )
        verdict = None
        if not force:
            verdict = _evaluate(client, name, candidate, champion, spec, label)
            if not verdict.promote:
                return _result(
                    client, candidate, champion, metric, verdict, False, force, reason, attempt, verdict.message
                )
        # the lock serialises cfcml promotions; this catches an alias moved outside the gate meanwhile
        if not _same(current_champion(client, name), champion):
            continue
        client.set_registered_model_alias(name, CHAMPION, str(candidate.version))
        outcome = _result(client, candidate, champion, metric, verdict, True, force, reason, attempt, "")
        _record(client, name, candidate, outcome, verdict)
        return _with_message(outcome, label)
    raise PromotionError(
        f"the champion of {name} changed {MAX_ATTEMPTS} times while {label} was being evaluated; "
        "nothing changed — try again when other promotions are done"
    )


def _result(
    client,
    candidate,
    champion,
    metric,
    verdict: _Verdict | None,
    promoted: bool,
    force: bool,
    reason: str | None,
    attempt: int,
    message: str,
) -> PromotionResult:
    previous = str(champion.version) if champion else None
    if verdict is not None:
        cand = verdict.candidate.value
        champ = verdict.champion.value if verdict.champion else None
    else:  # forced or a no-op: informational values, unchecked
        cand = _informational(client, candidate, metric)
        champ = _informational(client, champion, metric)
    return PromotionResult(
        name=candidate.name,
        candidate_version=str(candidate.version),
        promoted=promoted,
        forced=force and promoted,
        metric=metric,
        candidate_value=cand,
        previous_champion=previous,
        champion_value=champ,
        champion=str(candidate.version) if promoted else previous,
        message=message,
        reason=reason,
        attempts=attempt,
    )


def _record(
    client: MlflowClient, name: str, candidate: ModelVersion, r: PromotionResult, verdict: _Verdict | None
) -> None:
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
    if verdict is not None:
        m = verdict.candidate
        tags |= {
            "promotion.evaluation": m.evaluation.kind,
            "promotion.ids_digest": m.evaluation.ids_digest,
            "promotion.protocol_digest": m.protocol.digest,
        }
    if r.reason:
        tags["promotion.reason"] = r.reason
    for key, value in tags.items():
        client.set_model_version_tag(name, str(candidate.version), key, value)


def _with_message(r: PromotionResult, label: str) -> PromotionResult:
    m = r.metric
    if r.forced:
        was = "v" + r.previous_champion if r.previous_champion else "none"
        message = (
            f"forced: {label} is now champion (was {was}; {m} {_fmt(r.candidate_value)} vs "
            f"{_fmt(r.champion_value)}); reason: {r.reason}"
        )
    elif r.previous_champion is None:
        message = f"promoted: {label} is the first champion ({m}={_fmt(r.candidate_value)})"
    else:
        message = (
            f"promoted: {label} {m}={_fmt(r.candidate_value)} beats champion v{r.previous_champion} "
            f"{m}={_fmt(r.champion_value)}"
        )
    return PromotionResult(**{**r.to_dict(), "message": message})
