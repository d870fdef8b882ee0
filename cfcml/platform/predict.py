"""`cfcml predict`: score every case of a cohort with a logged or registered model.

Failures to get the model — no tracking server given, an unreachable server or a closed
port, an unknown model/alias/run, a path without a model, refused credentials — raise
:class:`PredictError` with one redacted line, within seconds (MLflow's retries are cut short).
MLflow and the packaged model's code (`.pyfunc`: torch) are imported only once a model is to
be loaded, so a wrong path or an unreachable server is reported before their seconds of import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cfcml.datasets.reader import load_cohort
from cfcml.datasets.spec import load_spec

from ..engine.metrics import compute_metrics
from .redact import one_line, redact
from .tracking_server import TrackingServerError, check_tracking_server, cli_mlflow_client, resolve_tracking_uri

log = logging.getLogger(__name__)

# model URIs resolved through the tracking server / model registry
SERVER_SCHEMES = ("models:", "runs:", "mlflow-artifacts:")


class PredictError(RuntimeError):
    """The model cannot be loaded or used for prediction (one line, no secrets)."""


def _mlflow_reason(e: Exception) -> str:
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        code = getattr(e, "error_code", "")
        text = e.message if hasattr(e, "message") else str(e)
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in text.lower():
            return f"not found ({one_line(text, limit=200)})"
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or "401" in text or "403" in text:
            return "the tracking server refused the credentials (set MLFLOW_TRACKING_USERNAME/PASSWORD)"
        return one_line(text, limit=300)
    return one_line(f"{type(e).__name__}: {e}", limit=300)


def load_model(model_uri: str, tracking_uri: str | None = None):
    """The pyfunc behind ``model_uri`` (``models:/cfcml-men@champion``, ``runs:/<id>/model``,
    or a local model folder). Raises :class:`PredictError` (one line) when it cannot be had."""
    import mlflow

    shown = redact(model_uri)
    if model_uri.startswith(SERVER_SCHEMES):
        try:
            uri = resolve_tracking_uri(tracking_uri)
            check_tracking_server(uri)
        except TrackingServerError as e:
            raise PredictError(f"cannot load {shown}: {e}") from None
        mlflow.set_tracking_uri(uri)
    else:
        path = Path(model_uri.removeprefix("file://"))
        if "://" not in model_uri.removeprefix("file://") and not (path / "MLmodel").is_file():
            raise PredictError(f"no MLflow model at {shown} (a folder with an MLmodel file, or models:/NAME@ALIAS)")
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
    try:
        with cli_mlflow_client():
            return mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; each becomes one line
        raise PredictError(f"cannot load {shown}: {_mlflow_reason(e)}") from None


BATCH_CASES = 256  # cases scored per pyfunc call: memory stays bounded however large the cohort


def seen_by_package(meta: dict) -> dict[str, str]:
    """{case id: "train" | "selection"} for the ids some packaged member trained or selected on
    (the package's meta.json ``members_seen``; empty for packages that do not record it)."""
    seen: dict[str, str] = {}
    for parts in (meta.get("members_seen") or {}).values():
        for i in parts.get("selection", ()):
            seen.setdefault(str(i), "selection")
        for i in parts.get("train", ()):
            seen[str(i)] = "train"  # training outranks selection
    return seen


def predict_cohort(
    model_uri: str,
    data_dir,
    out="preds.csv",
    tracking_uri: str | None = None,
    dataset: str | None = None,
    batch_cases: int = BATCH_CASES,
    echo: Callable[[str], None] | None = print,
) -> Path:
    """Predict every case of the cohort at `data_dir` (read and checked like for training,
    with the model's own schema unless `dataset` names another) and write a CSV:
    case_id, split, label (the cohort's class), seen, prob_<class>..., pred, inputs_used, status.

    ``seen`` is ``train`` / ``selection`` for patients some packaged model trained or selected
    its epoch on (from the package), else empty; metrics are computed over the unseen ones only.
    Cases are scored `batch_cases` at a time and appended to a temporary file renamed into
    place at the end (a reader never sees half a file); `echo` gets the closing line (cases/s,
    seen ids, metrics)."""
    from .pyfunc import cohort_frame

    model = load_model(model_uri, tracking_uri)
    meta = (model.metadata.metadata or {}) if model.metadata else {}
    if meta.get("dataset") is None:
        raise PredictError(f"{redact(model_uri)} is not a cfcml model (its MLmodel metadata names no dataset)")
    packaged = model.unwrap_python_model().model
    spec = load_spec(dataset) if dataset else packaged.spec
    seen = seen_by_package(packaged.meta)
    cohort = load_cohort(spec, data_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    labels, probs, n_seen, n_bad = [], [], 0, 0
    t0 = time.perf_counter()
    try:
        for start in range(0, len(cohort.cases), max(1, batch_cases)):
            batch = cohort.cases[start : start + max(1, batch_cases)]
            preds = model.predict(cohort_frame(cohort, batch))
            by_id = {c.case_id: c for c in batch}
            cases = [by_id[i] for i in preds["case_id"]]
            preds.insert(1, "split", [c.split for c in cases])
            preds.insert(2, "label", [cohort.classes[c.label] for c in cases])
            preds.insert(3, "seen", [seen.get(c.case_id, "") for c in cases])
            preds.to_csv(tmp, mode="w" if start == 0 else "a", header=start == 0, index=False)
            p = preds[[f"prob_{k}" for k in cohort.classes]].to_numpy(dtype=np.float64)
            unseen = (preds["seen"] == "").to_numpy() & np.isfinite(p).all(1)
            n_seen += int((preds["seen"] != "").sum())
            n_bad += int((~np.isfinite(p).all(1)).sum())
            labels += [c.label for c, u in zip(cases, unseen) if u]
            probs.append(p[unseen])
        if not cohort.cases:
            cohort_frame(cohort, []).iloc[:0].to_csv(tmp, index=False)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    n = len(cohort.cases)
    line = f"{n} cases scored with {redact(model_uri)} in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} cases/s)"
    if n_bad:
        line += f"; {n_bad} not scored (see status)"
    line += f"; {n_seen} seen in training/selection by the package (column seen), left out of the metrics"
    if labels and len(set(labels)) > 1:
        metrics = compute_metrics(spec, np.array(labels), np.concatenate(probs))
        line += f"; over the {len(labels)} unseen: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    else:
        line += f"; {len(labels)} unseen case(s): no metrics (they need unseen cases of 2+ classes)"
    log.info(line)
    if echo is not None:
        echo(line)
    return out
