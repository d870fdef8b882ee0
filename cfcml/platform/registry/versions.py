"""Reading the registry: a model's versions, its champion, a version's source run, its own
``evaluation.json`` and protocol, and so its measured gate value."""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from .errors import PromotionError, is_not_found
from .evaluation import EVALUATION_FILE, EVALUATION_PATHS, Evaluation, parse_evaluation
from .gate import Measurement, Protocol, gate_value, parse_protocol
from .metrics import MetricSpec

CHAMPION = "champion"
CHALLENGER = "challenger"


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
        if is_not_found(e):
            raise PromotionError(f"unknown registered model {name!r}") from None
        raise
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if is_not_found(e):
                raise PromotionError(f"model {name!r} has no alias {alias!r}") from None
            raise
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if is_not_found(e):
            raise PromotionError(f"model {name!r} has no version {version!r}") from None
        raise


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding the ``champion`` alias, or None."""
    aliases = client.get_registered_model(name).aliases or {}
    if CHAMPION not in aliases:
        return None
    return client.get_model_version(name, str(aliases[CHAMPION]))


def same_version(a: ModelVersion | None, b: ModelVersion | None) -> bool:
    """True when ``a`` and ``b`` are the same version (or both None)."""
    return (a is None and b is None) or (a is not None and b is not None and str(a.version) == str(b.version))


def source_run(client: MlflowClient, mv: ModelVersion, who: str) -> Run:
    """The run that produced ``mv`` (its params are immutable once logged)."""
    if not mv.run_id:
        raise PromotionError(f"{who} has no source run: its protocol cannot be read from run data")
    try:
        return client.get_run(mv.run_id)
    except MlflowException as e:
        if is_not_found(e):
            raise PromotionError(f"{who}: its source run {mv.run_id} no longer exists") from None
        raise


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


def version_protocol(mv: ModelVersion, run: Run, who: str) -> Protocol:
    """The protocol of ``mv``: params of its source run (immutable once logged), else its
    version tags. Fields and digest that disagree are refused."""
    return parse_protocol((run.data.params, mv.tags or {}), who)


def measure(client: MlflowClient, mv: ModelVersion, spec: MetricSpec, who: str) -> Measurement:
    """``spec``'s value of ``mv`` from its own ``evaluation.json``, checked, with its protocol."""
    evaluation = load_evaluation(client, mv, who)
    value = gate_value(evaluation, spec, who)
    return Measurement(value, evaluation, version_protocol(mv, source_run(client, mv, who), who))


def informational_value(client: MlflowClient, mv: ModelVersion | None, metric: str) -> float | None:
    """A version's own ``metric`` from its evaluation.json, unchecked; None when unavailable
    (for forced promotions and no-ops, which compare nothing)."""
    if mv is None:
        return None
    try:
        return load_evaluation(client, mv, f"v{mv.version}").metrics.get(metric)
    except (PromotionError, MlflowException, OSError):
        return None
