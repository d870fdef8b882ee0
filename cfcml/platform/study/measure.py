"""What the registered model's numbers are: the package measured as `cfcml predict` loads it
(:func:`measure_package`), its version metrics, its card's lead and its report's header."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from ...config import Config
from ...engine.decision import decision_from_dict
from ...report.build import build_report
from ...report.card import REGISTRY_DESCRIPTION_MAX, model_card_markdown
from ...report.from_runs import pooled_predictions, read_run
from ...report.inputs import SplitPredictions
from ..artifact_eval import (
    ESTIMATES,
    METRIC_PREFIX,
    artifact_report_inputs,
    ensemble_temperature,
    evaluation_record,
    metric_names_for,
    score_frame,
)
from ..predict import load_model
from ..pyfunc import save_model
from ..redact import redact
from ..report_logging import study_meta

log = logging.getLogger(__name__)


def calibration_meta(cfg: Config, ckpt_dir: Path, runs: list[dict], package_meta) -> dict:
    """The package's temperature: fitted on the ensemble's own validation probabilities where
    every member selected on the same patients (a `files` cohort's valid split); with folds
    (no patient is unseen by every member) on the members' pooled validation logits, as said."""

    if not cfg.report.temperature:
        return {}
    t = ensemble_temperature([ckpt_dir / r["name"] for r in runs])
    if t is not None:
        return {"temperature": t, "temperature_fitted_on": "the ensemble's probabilities on the validation split"}
    return package_meta(cfg, ckpt_dir, runs) | {
        "temperature_fitted_on": "each fold model's validation logits, pooled (no validation patient is unseen by "
        "every fold model)"
    }


def study_meta_for(summary: dict, commit: str, cfg: Config, evalset) -> dict:
    """Report header facts for the package's own report."""

    return study_meta(summary, commit) | {
        "preset": cfg.name,
        "method": cfg.model.method,
        "data_digest": evalset.data_digest,
        "selection_rule": "the study's best trial; per member the epoch selected on its validation part",
        "split_description": f"{evalset.kind}: {ESTIMATES[evalset.kind]}",
    }


def measure_package(
    package: Path,
    cohort,
    full,
    evalset,
    ckpt_dir: Path,
    runs: list[dict],
    work: Path,
    members_report: dict | None,
    meta: dict,
) -> tuple[dict, dict | None]:
    """(evaluation.json's record, the report the version carries). With untouched patients the
    package is saved as an MLflow model, loaded by `cfcml predict`'s loader and scored on them;
    its report takes thresholds from the ensemble's validation-side probabilities (a `files`
    cohort's valid split scored by the package; with folds, the members' own validation parts).
    Without (out_of_fold), the members' pooled out-of-fold predictions and their report."""

    folders = [read_run(ckpt_dir / r["name"]) for r in runs]
    decision = decision_from_dict(json.loads((Path(package) / "meta.json").read_text()).get("decision"))
    meta = {**meta, "decision": decision.to_dict()}  # the package's hard-label rule, for its own report and card
    if evalset.kind == "out_of_fold":
        oof = pooled_predictions(folders, "test")
        return evaluation_record(evalset, full.spec, oof.case_ids, oof.labels, oof.probs, decision), members_report
    local = work / "measured_model"
    shutil.rmtree(local, ignore_errors=True)
    model = load_model(str(save_model(package, full.spec, local)))
    ids, labels, probs = score_frame(model, full, evalset.cases)
    record = evaluation_record(evalset, full.spec, ids, labels, probs, decision)
    if evalset.kind == "test_split":
        v_ids, v_labels, v_probs = score_frame(model, full, cohort.split("valid"))
        val = SplitPredictions(v_ids, v_labels, v_probs, runs=["package"] * len(v_ids))
    else:
        val = pooled_predictions(folders, "val")
    try:
        inputs = artifact_report_inputs(full, record, labels, probs, val, meta)
        own = build_report(inputs, work / "model_report")
    except Exception as e:  # noqa: BLE001 - the report is evidence; evaluation.json stands without it
        log.warning("could not build the registered model's own report: %s", redact(e))
        return record, None
    return record, own


def evaluation_metrics(record: dict, report: dict | None) -> dict[str, float]:
    """The version's metrics: ``<kind>_<metric>`` from evaluation.json, with the report's
    bootstrap CI as ``<kind>_<metric>_ci_low`` / ``_ci_high`` where it has one."""

    out = metric_names_for(record["kind"], record["metrics"])
    if report is not None and record["kind"] != "out_of_fold":
        prefix = METRIC_PREFIX[record["kind"]]
        for name, m in (report.get("metrics") or {}).items():
            lo, hi = (m.get("ci") or [None, None])[:2]
            if f"{prefix}_{name}" in out and isinstance(lo, int | float) and isinstance(hi, int | float):
                out[f"{prefix}_{name}_ci_low"], out[f"{prefix}_{name}_ci_high"] = float(lo), float(hi)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def describe_model(client, name: str, version: str, report: dict | None, kind: str) -> None:
    """The model card as the version's description, opening with what its numbers estimate."""

    if kind == "out_of_fold":
        lead = (
            "**What these numbers are:** the cross-validated estimate of a single fold model (each patient scored "
            "by the fold model that did not train on it). The registered model averages the fold models; every "
            "patient here trained or selected some of them, so its own accuracy has not been measured: run a "
            "study with --holdout to measure it.\n\n"
        )
    else:
        lead = f"**What these numbers are:** {ESTIMATES[kind]}; measured by loading this package as `cfcml predict` does.\n\n"
    card = model_card_markdown(report, REGISTRY_DESCRIPTION_MAX - len(lead)) if report else ""
    client.update_model_version(name, str(version), description=lead + card)
