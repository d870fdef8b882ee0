"""How a study shows up in MLflow: the experiment as model training, the cohort as a dataset,
the model linked to the study with its metrics, the clinical report, the model card.

- `ensure_experiment`: get or create the experiment and tag it
  `mlflow.experimentKind = custom_model_development`, so the UI files it as model training
  (runs, metrics, models) instead of its GenAI view; set again on reuse.
- `log_cohort`: the cohort as an `mlflow.data` dataset input of the study's parent run
  (name, digest = the cohort digest's first 16 hex digits, source = the redacted data root,
  profile = cases and counts per split and class, schema = the input columns).
- `study_report`: the clinical report of the best trial, built from the checkpointed runs
  `evaluate_best` has just tested (`cfcml.report.from_runs`), logged under `report/` of the
  parent run and of the best trial's run.
- `link_model`: the logged model as an output of the parent run, with the report's pooled
  test metrics (and their CIs) attached to the model.
- `version_tags` / `describe_version`: a registered version keeps a handful of tags (trial,
  data digest, commit, pretrained weights, cfcml version); the evidence is its description,
  the model card (`model_card_markdown(report, REGISTRY_DESCRIPTION_MAX)`).
- `package_meta`: with `report.temperature` on, the temperature fitted on the validation
  logits goes into the package, and the registered model applies it.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.types import ColSpec, Schema

from ..report.build import build_report
from ..report.card import REGISTRY_DESCRIPTION_MAX, model_card_markdown
from ..report.from_runs import evidence_meta, inputs_from_runs, pooled_predictions, read_run
from ..report.stats import fit_temperature
from .delivery import call_with_retry
from .pyfunc import input_columns, package_versions
from .redact import one_line, redact

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
REPORT_ARTIFACTS = "report"
DATASET_CONTEXT = "cohort"
DIGEST_CHARS = 16  # MLflow's SQL stores keep a dataset digest in 36 characters
TAG_REPORT_ERROR = "cfcml.report_error"


def ensure_experiment(client, name: str) -> str:
    """The experiment's id (created if missing), tagged as model training. Two studies starting
    at once may both find it missing: the one whose create loses reads the winner's."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # created concurrently by another study
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


# ----------------------------------------------------------------------------- the cohort


def cohort_profile(cohort) -> dict:
    counts = cohort.counts()
    return {
        "cases": len(cohort.cases),
        "classes": list(cohort.classes),
        "splits": counts,
        "per_class": {c: sum(s[c] for s in counts.values()) for c in cohort.classes},
        "digest": cohort.digest(),
        "image_kind": cohort.spec.image_kind,
        "series": list(cohort.spec.series),
        "attributes": list(cohort.spec.attribute_names),
    }


def cohort_dataset(cohort, data_root: str):
    """An `mlflow.data` dataset describing the cohort (no data is uploaded)."""

    class CohortDataset(MetaDataset):
        """A MetaDataset with a profile (MetaDataset has none)."""

        def __init__(self, profile: dict, **kwargs):
            self._profile = profile
            super().__init__(**kwargs)

        @property
        def profile(self):
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    spec = cohort.spec
    columns = [*input_columns(spec), spec.label_column]
    schema = Schema([ColSpec("string", c, required=c in ("case_id", spec.label_column)) for c in columns])
    with warnings.catch_warnings():  # a local path matches two equivalent local sources
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        source = resolve_dataset_source(redact(str(data_root)))
    return CohortDataset(
        profile=cohort_profile(cohort),
        source=source,
        name=spec.name,
        digest=cohort.digest()[:DIGEST_CHARS],
        schema=schema,
    )


def log_cohort(client, run_id: str, cohort, data_root: str):
    """Log the cohort as a dataset input of `run_id` (idempotent: MLflow keeps one input per
    dataset name and digest). Returns the dataset."""
    dataset = cohort_dataset(cohort, data_root)
    tags = [InputTag("mlflow.data.context", DATASET_CONTEXT)]
    tags += [
        InputTag(f"counts.{split}", ", ".join(f"{c} {n}" for c, n in per_class.items()))
        for split, per_class in cohort.counts().items()
    ]
    # two studies logging the same cohort at once race on the server's insert of the dataset
    # (UNIQUE constraint on experiment, name, digest); a retry finds the winner's row and links it
    call_with_retry(
        lambda: client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)]),
        f"log the cohort {cohort.spec.name} as an input of run {run_id}",
        deadline_s=15.0,
        first_delay_s=0.5,
        max_delay_s=4.0,
    )
    return dataset


# ----------------------------------------------------------------------------- the report


def study_meta(summary: dict, commit: str) -> dict:
    """Report facts of the study (`_after_search`'s summary): what was searched and chosen."""
    return {
        "commit": commit,
        "study": summary.get("study"),
        "trial_id": summary.get("best_trial_id"),
        "cv_val_auc": summary.get("best_cv_val_auc"),
        "hyperparameters": summary.get("best_params"),
        "versions": package_versions(),
        "trial_selection": (
            f"the trial with the best mean validation AUC over the runs (cv_val_auc "
            f"{summary.get('best_cv_val_auc', math.nan):.4f}) among {summary.get('trials', '?')} "
            "trials (Optuna TPE + ASHA); test data never seen by the search"
        ),
    }


def study_report(
    cohort,
    runs: list[dict],
    ckpt_dir: Path,
    out_dir: Path,
    client,
    run_ids: list[str | None],
    summary: dict,
    commit: str,
    **options,
) -> dict | None:
    """Build the best trial's report from its checkpointed runs (each `ckpt_dir/<run>` tested
    by `evaluate_best`) and log it under `report/` of every run in `run_ids` (None skipped).
    A failure is logged and tagged (`cfcml.report_error`), not raised: the search's result
    still counts. Returns the report dict or None."""
    run_ids = [r for r in run_ids if r]
    try:
        folders = [read_run(ckpt_dir / r["name"]) for r in runs]
        meta = study_meta(summary, commit) | evidence_meta(summary)  # baselines' AUCs, images-add sentence
        inputs = inputs_from_runs(folders, cohort, device="cpu", meta=meta)
        inputs.meta["selection_rule"] = f"{meta['trial_selection']}; {inputs.meta['selection_rule']}"
        report = build_report(inputs, out_dir, **options)
    except Exception as e:  # noqa: BLE001 - the report is evidence; its failure must not lose the search
        log.warning("could not build the clinical report of the best trial: %s", redact(e))
        for run_id in run_ids:
            client.set_tag(run_id, TAG_REPORT_ERROR, one_line(f"{type(e).__name__}: {e}", limit=500))
        return None
    for run_id in run_ids:
        client.log_artifacts(run_id, str(out_dir), REPORT_ARTIFACTS)
    return report


def model_metrics(report: dict) -> dict[str, float]:
    """The report's headline numbers as model metrics: pooled test metrics with their CIs,
    calibration and the validation-fitted temperature."""
    out = {}
    for name, m in report.get("metrics", {}).items():
        out[f"test_pooled_{name}"] = m.get("value")
        lo, hi = (m.get("ci") or [None, None])[:2]
        out[f"test_pooled_{name}_ci_low"], out[f"test_pooled_{name}_ci_high"] = lo, hi
    for key in ("ece", "brier", "ece_after", "brier_after", "temperature"):
        out[f"test_{key}" if key != "temperature" else "val_temperature"] = report.get(key)
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and math.isfinite(v)}


def link_model(client, parent_run_id: str, model_id: str, report: dict | None, dataset=None) -> None:
    """The logged model as an output of the study's parent run, with the report's metrics
    (logged on the parent run, attached to the model, evaluated on `dataset`, the cohort's
    `cohort_dataset`). The model already carries the trial's parameters: `log_model` copies
    those of the run it is logged in."""
    client.log_outputs(parent_run_id, [LoggedModelOutput(model_id, step=0)])
    metrics = model_metrics(report) if report else {}
    if metrics:
        mlflow.log_metrics(metrics, run_id=parent_run_id, model_id=model_id, dataset=dataset, synchronous=True)


def package_meta(cfg, ckpt_dir: Path, runs: list[dict]) -> dict:
    """What the package's meta.json gets for calibration: with `report.temperature` on, the
    temperature fitted (minimum NLL) on the pooled validation logits of the packaged runs (the
    report's own `temperature`); else nothing, and the model returns the runs' probabilities."""
    if not cfg.report.temperature:
        return {}
    val = pooled_predictions([read_run(ckpt_dir / r["name"]) for r in runs], "val")
    if val.logits is None:
        raise RuntimeError("report.temperature is on, but the runs saved no validation logits to fit it on")
    return {"temperature": fit_temperature(val.logits, val.labels), "temperature_fitted_on": "validation logits"}


# ----------------------------------------------------------------------------- the version


def version_tags(trial_id: str, digest: str, commit: str, pretrained: dict, cfcml_version: str) -> dict[str, str]:
    """The handful of tags a registered version keeps (the rest is in its description)."""
    return {
        "trial_id": trial_id,
        "data.digest": digest,
        "git.commit": commit,
        **{f"pretrained.{k}": str(v) for k, v in pretrained.items()},
        "version.cfcml": cfcml_version,
    }


def describe_version(client, name: str, version: str, report: dict | None) -> str | None:
    """The model card as the version's description (Markdown, within MLflow's limit)."""
    if report is None:
        return None
    card = model_card_markdown(report, REGISTRY_DESCRIPTION_MAX)
    client.update_model_version(name, str(version), description=card)
    return card
