"""`cfcml predict`: score every case of a cohort with a logged or registered model."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def load_model(model_uri: str, tracking_uri: str | None = None):
    """The pyfunc behind `model_uri` (e.g. ``models:/cfcml-men@champion``, ``runs:/<id>/model``)."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)


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
        raise ValueError(f"{model_uri} is not a cfcml model (its MLmodel metadata names no dataset)")
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
    tmp.replace(out)
    accuracy = float((preds["pred"] == preds["label"]).mean()) if len(preds) else float("nan")
    log.info("%d cases scored with %s (accuracy over every split %.3f)", len(preds), model_uri, accuracy)
    return out
