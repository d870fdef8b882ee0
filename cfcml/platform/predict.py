"""`cfcml predict`: score every case of a cohort with a logged or registered model.

Failures to get the model — no tracking server given, an unreachable server or a closed
port, an unknown model/alias/run, a path without a model, refused credentials — raise
:class:`PredictError` with one redacted line, within seconds (MLflow's retries are cut short).
"""

from __future__ import annotations

import logging
from pathlib import Path

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


def predict_cohort(model_uri: str, data_dir, out="preds.csv", tracking_uri: str | None = None,
                   dataset: str | None = None) -> Path:  # fmt: skip
    """Predict every case of the cohort at `data_dir` (read and checked like for training,
    with the model's own schema unless `dataset` names another) and write a CSV:
    case_id, split, label (the cohort's class), prob_<class>..., pred, inputs_used, status."""
    from cfcml.datasets.reader import load_cohort
    from cfcml.datasets.spec import load_spec

    from .pyfunc import cohort_frame

    model = load_model(model_uri, tracking_uri)
    meta = (model.metadata.metadata or {}) if model.metadata else {}
    if meta.get("dataset") is None:
        raise PredictError(f"{redact(model_uri)} is not a cfcml model (its MLmodel metadata names no dataset)")
    spec = load_spec(dataset) if dataset else model.unwrap_python_model().model.spec
    cohort = load_cohort(spec, data_dir)
    preds = model.predict(cohort_frame(cohort))
    by_id = {c.case_id: c for c in cohort.cases}
    preds.insert(1, "split", [by_id[i].split for i in preds["case_id"]])
    preds.insert(2, "label", [cohort.classes[by_id[i].label] for i in preds["case_id"]])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    preds.to_csv(tmp, index=False)
    tmp.replace(out)  # a reader never sees half a file
    accuracy = float((preds["pred"] == preds["label"]).mean()) if len(preds) else float("nan")
    log.info("%d cases scored with %s (accuracy over every split %.3f)", len(preds), redact(model_uri), accuracy)
    return out
