"""After the search: the :class:`Finaliser` tests the best trial once, logs the results, builds
the study's report and packages, measures and registers the best model. It holds the study's
plan (spec, config, cohort, runs) and its tracking (client, parent run), so each step takes
only what differs."""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ...config import Config, cohort_spec
from ...datasets.spec import shipped
from ...engine.decision import Decision, pooled_decision, recorded_train_counts
from ...models.pretrained import pretrained_provenance
from ..artifact_eval import evaluation_set, member_seen_ids, write_evaluation
from ..protocol_digest import protocol_record
from ..pyfunc import ALIAS, build_package, log_model, package_versions, tag_version
from ..redact import redact
from ..report_logging import cohort_dataset, link_model, package_meta, study_report, version_tags
from ..tracking import mlflow_run
from ..train_loop import OBJECTIVE
from .config import resolve_trial_config
from .evaluate import _evaluate_task, evaluate_best, receive
from .measure import calibration_meta, describe_model, evaluation_metrics, measure_package, study_meta_for
from .parent import Tracking
from .plots import log_figure, plot_confusion, plot_curves, plot_roc
from .prepare import StudyPlan
from .records import find_child_run
from .spec import TAG_FINAL, StudyError

log = logging.getLogger(__name__)

TAG_IMAGES_ADD = "cfcml.images_add"  # the parent run's answer to "do the images add to the table?"


@dataclass(frozen=True)
class Best:
    """The best trial: its id, parameters, config, MLflow run and checkpoint."""

    trial_id: str
    params: dict
    cfg: Config
    run_id: str | None
    checkpoint_path: str


@dataclass(frozen=True)
class Measured:
    """The package's own measurement: the patients it was measured on, evaluation.json's
    record and the report the version carries (None when it could not be built)."""

    evalset: object
    record: dict
    report: dict | None


def baseline_record(baseline: dict) -> dict:
    """A baseline's summary (`run_baselines`) without its local folder, for files and the study summary."""
    return {k: v for k, v in baseline.items() if k != "folder"}


class Finaliser:
    def __init__(self, plan: StudyPlan, tracking: Tracking):
        self.plan, self.spec, self.tracking = plan, plan.spec, tracking
        self.client, self.parent_id = tracking.client, tracking.parent_id

    # ------------------------------------------------------------------ the whole step

    def finalise(self, results) -> dict:
        """Log the search, pick the best trial and (unless a resumed study already did) test,
        report and register it; -> the study summary."""
        import mlflow

        self.log_search(results)
        best, summary = self.pick_best(results)
        mlflow.log_metric("best_cv_val_auc", summary["best_cv_val_auc"])
        mlflow.set_tags({"cfcml.best_trial_id": best.trial_id, "cfcml.best_run_id": best.run_id or ""})
        parent_tags = self.client.get_run(self.parent_id).data.tags
        if parent_tags.get(TAG_FINAL) == "done":
            log.info("the best trial was already evaluated and registered; nothing left to do")
            return summary | json.loads(parent_tags.get("cfcml.final_summary", "{}"))
        work = (
            Path(self.spec.storage.work_dir)
            if self.spec.storage.work_dir
            else Path(tempfile.mkdtemp(prefix="cfcml-study-"))
        )
        try:
            summary = self.evaluate_and_register(best, summary, work)
            final = {k: summary[k] for k in ("model_name", "model_version", "model_uri", "evaluation") if k in summary}
            self.client.set_tag(self.parent_id, "cfcml.final_summary", json.dumps(final))
            self.client.set_tag(self.parent_id, TAG_FINAL, "done")
        finally:
            if not self.spec.storage.work_dir:
                shutil.rmtree(work, ignore_errors=True)
        return summary

    def log_search(self, results) -> None:
        """trials.csv and every trial's objective curve on the parent run."""
        import mlflow

        frame = results.get_dataframe()
        with tempfile.TemporaryDirectory() as tmp:
            frame.to_csv(Path(tmp) / "trials.csv", index=False)
            mlflow.log_artifact(str(Path(tmp) / "trials.csv"))
        curves = {}
        for r in results:
            if r.metrics_dataframe is not None and OBJECTIVE in r.metrics_dataframe:
                df = r.metrics_dataframe
                curves[r.metrics.get("trial_id", "?")] = list(zip(df["epoch"].astype(int), df[OBJECTIVE].astype(float)))
        figure = plot_curves(curves, "cv_val_auc of every trial (ASHA rungs)", "cv_val_auc")
        log_figure(self.client, self.parent_id, figure, "plots/search_curves.png")

    def pick_best(self, results) -> tuple[Best, dict]:
        import mlflow

        plan, tracking = self.plan, self.tracking
        ok = [r for r in results if r.error is None and OBJECTIVE in (r.metrics or {})]
        if not ok:
            raise StudyError("no trial finished without error: nothing to evaluate")
        result = results.get_best_result(metric=OBJECTIVE, mode=plan.space.mode, scope="last")
        trial_id = result.metrics["trial_id"]
        params = {k: v for k, v in result.config.items()}
        best = Best(
            trial_id=trial_id,
            params=params,
            cfg=resolve_trial_config(self.spec.preset, plan.overrides, params, plan.cfg.train.epochs),
            run_id=find_child_run(self.client, tracking.experiment_id, self.parent_id, trial_id),
            checkpoint_path=result.metrics["checkpoint_path"],
        )
        summary = {
            "study": plan.name,
            "study_path": redact(plan.study_path),
            "parent_run_id": self.parent_id,
            "experiment_id": tracking.experiment_id,
            "trials": len(results),
            "best_trial_id": trial_id,
            "best_run_id": best.run_id,
            "best_params": params,
            "best_cv_val_auc": float(result.metrics[OBJECTIVE]),
            "best_epochs": int(result.metrics.get("epoch", 0)),
            "optuna_storage": redact(plan.optuna_url),
            "tracking_uri": redact(mlflow.get_tracking_uri()),
        }
        return best, summary

    def evaluate_and_register(self, best: Best, summary: dict, work: Path) -> dict:
        import ray.train

        plan = self.plan
        ckpt_dir = work / "best_checkpoint"
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ray.train.Checkpoint(best.checkpoint_path, filesystem=plan.fs).to_directory(str(ckpt_dir))
        test = self.evaluate(best, ckpt_dir)
        self.log_test(best, test, decision=self.decision(best, ckpt_dir))
        summary["test"] = {k: v for k, v in test["summary"]["metrics"].items()}
        summary["test_markdown"] = test["markdown"]
        if test.get("baselines"):  # the report's card reads "paired" (report.from_runs.evidence_meta)
            summary["baselines"] = {kind: baseline_record(b) for kind, b in test["baselines"].items()}
            summary["paired"] = test["paired"]
        report = study_report(
            plan.cohort,
            plan.runs,
            ckpt_dir,
            work / "report",
            client=self.client,
            run_ids=[self.parent_id, best.run_id],
            summary=summary,
            commit=self.tracking.commit,
        )
        if self.spec.tracking.register:
            summary |= self.register(best, test, ckpt_dir, work, summary, report=report)
        return summary

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, best: Best, ckpt_dir: Path) -> dict:
        """`evaluate_best` on the hardware the trials used: in the driver (CPU) when they trained
        on CPUs, else as a Ray task holding a GPU; its predictions and metrics files come back
        into `ckpt_dir` either way."""
        plan, spec = self.plan, self.spec
        if not spec.resources.gpus_per_worker:
            return evaluate_best(best.cfg, spec.data, plan.cohort, plan.runs, ckpt_dir, device="cpu")
        import ray

        task = ray.remote(num_gpus=min(1.0, spec.resources.gpus_per_worker), num_cpus=spec.resources.cpus_per_worker)(
            _evaluate_task
        )
        result, files = ray.get(
            task.remote(
                cfg_dict=best.cfg.to_dict(),
                cohort_spec=shipped(plan.cohort.spec),
                data=spec.data,
                runs=plan.runs,
                checkpoint_path=best.checkpoint_path,
                storage=plan.study_path,
                holdout=[c.case_id for c in plan.held],
            )
        )
        return receive(result, files, ckpt_dir)

    def decision(self, best: Best, ckpt_dir: Path) -> Decision:
        """The study's hard-label rule with the training class counts of the best trial's runs together."""
        counts = [recorded_train_counts(ckpt_dir / r["name"]) for r in self.plan.runs]
        return pooled_decision(best.cfg.predict.decision, counts)

    def log_test(self, best: Best, test: dict, decision: Decision | None = None) -> None:
        """The test metrics (mean/std and per run), summary and plots (confusion matrices under
        `decision`, None: balanced) on the parent and best runs; the baselines' test metrics
        (`baseline_<kind>_test_<metric>_<mean|std>`) and the answer to "do the images add to the
        table?" (tag `cfcml.images_add`) on the parent run."""
        from mlflow.entities import Metric

        classes = cohort_spec(best.cfg).classes
        self._log_baselines(test)
        for run_id in [self.parent_id] + ([best.run_id] if best.run_id else []):
            now = int(time.time() * 1000)
            metrics = []
            for name, stats in test["summary"]["metrics"].items():
                for stat in ("mean", "std"):
                    if not math.isnan(stats[stat]):
                        metrics.append(Metric(f"test_{name}_{stat}", float(stats[stat]), now, 0))
            for r in test["runs"]:
                metrics += [
                    Metric(f"test/{r['name']}/{k}", float(v), now, 0)
                    for k, v in r["metrics"].items()
                    if not math.isnan(v)
                ]
            self.client.log_batch(run_id, metrics=metrics)
            self._log_test_files(run_id, test, classes, decision)

    def _log_baselines(self, test: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"baseline_{kind}_test_{name}_{stat}", float(stats[stat]), now, 0)
            for kind, b in (test.get("baselines") or {}).items()
            for name, stats in b["metrics"].items()
            for stat in ("mean", "std")
            if not math.isnan(stats[stat])
        ]
        if metrics:
            self.client.log_batch(self.parent_id, metrics=metrics)
        images_add = (test.get("paired") or {}).get("images_add")
        if images_add:
            self.client.set_tag(self.parent_id, TAG_IMAGES_ADD, images_add["sentence"])

    def _log_test_files(self, run_id: str, test: dict, classes, decision: Decision | None = None) -> None:
        client = self.client
        client.log_text(run_id, test["markdown"] + "\n", "best_trial/test_summary.md")
        evidence = {}
        if test.get("baselines"):
            evidence = {
                "baselines": {kind: baseline_record(b) for kind, b in test["baselines"].items()},
                "paired": test["paired"],
            }
        client.log_text(
            run_id,
            json.dumps(
                {k: v for k, v in test["summary"].items() if k != "runs"}
                | {"runs": [{k: v for k, v in r.items() if k != "numeric_stats"} for r in test["runs"]]}
                | evidence,
                indent=2,
                default=float,
            ),
            "best_trial/test_summary.json",
        )
        for split, (y, p) in test["pooled"].items():
            label = "test (pooled over folds)" if split == "test" else "validation at the selected epochs"
            figure = plot_confusion(y, p, classes, f"confusion matrix, {label}", decision)
            log_figure(client, run_id, figure, f"plots/confusion_{split}.png")
            log_figure(client, run_id, plot_roc(y, p, classes, f"ROC, {label}"), f"plots/roc_{split}.png")

    # ------------------------------------------------------------------ registration

    def register(self, best: Best, test: dict, ckpt_dir: Path, work: Path, summary: dict, report=None) -> dict:
        """Package the best trial's runs as a pyfunc, measure the package as `cfcml predict` loads
        it on the patients nothing in the study saw (`cfcml.platform.artifact_eval`), ship that as
        evaluation.json inside it, and register it: the version's metrics, tags, card and report
        are the package's own (or, without untouched patients, say that they are a single fold
        model's cross-validated estimate)."""

        plan = self.plan
        evalset = evaluation_set(plan.full, plan.cohort, list(plan.held), self.tracking.digest)
        package = self._build_package(best, test, ckpt_dir, work, summary, evalset)
        meta = study_meta_for(summary, self.tracking.commit, best.cfg, evalset)
        record, own_report = measure_package(
            package,
            plan.cohort,
            plan.full,
            evalset,
            ckpt_dir=ckpt_dir,
            runs=plan.runs,
            work=work,
            members_report=report,
            meta=meta,
        )
        measured = Measured(evalset=evalset, record=record, report=own_report)
        write_evaluation(record, package)
        suffix = "" if best.cfg.model.method == "cfcml" else f"-{best.cfg.model.method}"  # never meets CFCML's gate
        model_name = self.spec.tracking.model_name or f"cfcml-{plan.cohort.spec.name}{suffix}"
        info, protocol = self._log_model(best, package, model_name, summary, evalset)
        version = str(info.registered_model_version)
        self._publish(best, info, measured, model_name, protocol)
        uri = f"models:/{model_name}@{ALIAS}"
        log.info(
            "registered %s version %s (%s); measured on %d %s patient(s)",
            model_name,
            version,
            uri,
            record["n"],
            evalset.kind,
        )
        evaluation = {k: record[k] for k in ("kind", "ids_digest", "n", "metrics")}
        return {
            "model_name": model_name,
            "model_version": version,
            "model_uri": uri,
            "model_info_uri": info.model_uri,
            "evaluation": evaluation,
        }

    def _build_package(self, best: Best, test: dict, ckpt_dir: Path, work: Path, summary: dict, evalset) -> Path:

        plan, cfg = self.plan, best.cfg
        by_name = {r["name"]: r for r in test["runs"]}
        meta = {
            "study": plan.name,
            "trial_id": best.trial_id,
            "cv_val_auc": summary["best_cv_val_auc"],
            "data_digest": self.tracking.digest,
            "evaluation_kind": evalset.kind,
            "members_seen": member_seen_ids(cfg, plan.cohort, plan.runs),
            **calibration_meta(cfg, ckpt_dir, plan.runs, package_meta),
        }
        members = [
            {
                "name": r["name"],
                "weights": ckpt_dir / r["name"] / "best.pt",
                "numeric_stats": by_name[r["name"]]["numeric_stats"],
            }
            for r in plan.runs
        ]
        return build_package(cfg, members, plan.full, work / "package", extra_meta=meta)

    def _log_model(self, best: Best, package: Path, model_name: str, summary: dict, evalset):
        """The package logged (and registered) in the best trial's run, with the data digest and
        the protocol the promotion gate compares: -> (model info, protocol params)."""
        import mlflow

        plan, digest = self.plan, self.tracking.digest
        opened = mlflow_run(run_id=best.run_id, nested=True, tracking_uri=self.spec.tracking.tracking_uri)
        with opened if best.run_id else nullcontext():
            mlflow.log_param("data.digest", digest)  # the promotion gate compares it between versions
            protocol = protocol_record(
                best.cfg, plan.runs, self.spec.search.holdout
            )  # and the protocol (protocol_digest)
            mlflow.log_params(protocol)
            info = log_model(
                package,
                plan.full.spec,
                registered_model_name=model_name,
                metadata={
                    "trial_id": best.trial_id,
                    "study": plan.name,
                    "cv_val_auc": summary["best_cv_val_auc"],
                    "evaluation_kind": evalset.kind,
                },
            )
        return info, protocol

    def _publish(self, best: Best, info, measured: Measured, model_name: str, protocol: dict) -> None:
        """The version's metrics on the parent run (and the model), evaluation.json, the
        version's tags and alias, and its card."""
        import mlflow

        full, record, kind = self.plan.full, measured.record, measured.evalset.kind
        version = str(info.registered_model_version)
        own = evaluation_metrics(record, measured.report)
        link_model(self.client, self.parent_id, info.model_id, None, cohort_dataset(full, str(full.root)))
        mlflow.log_metrics(own, run_id=self.parent_id, synchronous=True)
        if kind != "out_of_fold":  # the model's own numbers; a fold model's CV estimate is not
            mlflow.log_metrics(own, run_id=self.parent_id, model_id=info.model_id, synchronous=True)
        self.client.log_text(self.parent_id, json.dumps(record, indent=2), "evaluation.json")
        tracking = self.tracking
        tags = version_tags(
            best.trial_id,
            tracking.digest,
            tracking.commit,
            pretrained_provenance(best.cfg),
            package_versions()["cfcml"],
        )
        tags |= {
            "method": best.cfg.model.method,
            "evaluation.kind": kind,
            "evaluation.ids_digest": record["ids_digest"],
            "evaluation.data_digest": record["data_digest"],
            "evaluation.n": str(record["n"]),
            **protocol,
        }
        if kind != "out_of_fold":
            tags |= {k: f"{v:.6g}" for k, v in own.items()}
        tag_version(self.client, model_name, version, tags, alias=ALIAS)
        describe_model(self.client, model_name, version, measured.report, kind)
