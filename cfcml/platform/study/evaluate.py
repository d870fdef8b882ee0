"""Testing the best trial once: each of its runs from its checkpoint (:func:`evaluate_best`), in
the driver or as a Ray task on the hardware the trials used (:func:`_evaluate_task`). With
tabular attributes, the classical baselines (`engine.baselines`) are fitted on exactly the
same runs and the best trial is paired with each on the same test patients (`engine.evidence`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ...config import Config, config_from_dict
from ...datasets.reader import load_cohort
from ...datasets.spec import remember
from ...engine.evidence import baseline_models, config_model, evidence_markdown, paired_evidence
from ...engine.metrics import metric_names
from ...engine.protocol import BASELINES_DIR
from ...engine.run import METRICS, PREDICTIONS, TrainingRun
from ...engine.splits import without_cases
from ...engine.summary import markdown_table, summarize_runs
from .storage import storage_filesystem

log = logging.getLogger(__name__)


def _evaluate_task(
    cfg_dict: dict,
    cohort_spec: dict,
    data: str,
    runs: list[dict],
    checkpoint_path: str,
    storage: str,
    holdout: list[str] | None = None,
) -> tuple[dict, dict]:
    """Ray task body: fetch the best trial's checkpoint, evaluate it on this node's device."""
    import ray.train

    spec = remember(cohort_spec)
    cfg = config_from_dict(cfg_dict)
    fs, _ = storage_filesystem(storage)
    with tempfile.TemporaryDirectory(prefix="cfcml-eval-") as tmp:
        ray.train.Checkpoint(checkpoint_path, filesystem=fs).to_directory(tmp)
        cohort = without_cases(load_cohort(spec, data), holdout)  # what the trials trained on
        result = evaluate_best(cfg, data, cohort, runs, Path(tmp), device=cfg.train.device)
        files = {
            f"{r['name']}/{n}": (Path(tmp) / r["name"] / n).read_bytes() for r in runs for n in (PREDICTIONS, METRICS)
        }
        files |= {
            path.relative_to(tmp).as_posix(): path.read_bytes()
            for path in sorted((Path(tmp) / BASELINES_DIR).rglob("*"))
            if path.is_file()
        }
    return result, files


def receive(result: dict, files: dict[str, bytes], ckpt_dir: Path) -> dict:
    """In the driver: `_evaluate_task`'s files written under `ckpt_dir` (the runs' predictions and
    metrics, the baselines' folders), and the baselines' folders in `result` pointed there."""
    for rel, blob in files.items():
        (ckpt_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / rel).write_bytes(blob)
    for kind, b in result.get("baselines", {}).items():  # the task's folder was its own temporary one
        b["folder"] = str(ckpt_dir / BASELINES_DIR / kind)
    return result


def baselines_and_evidence(cfg: Config, cohort, runs: list[dict], ckpt_dir: Path, summary: dict) -> dict:
    """{"baselines": run_baselines' result (files in ckpt_dir/baselines/), "paired": the best trial
    vs each baseline on the same test patients}; {} for a cohort without tabular attributes."""
    if not cohort.spec.attributes:
        return {}
    from ...engine.baselines import run_baselines  # scikit-learn takes seconds to import

    baselines = run_baselines(cfg, cohort, runs, ckpt_dir / BASELINES_DIR, report=log.info)
    this = config_model(cfg.to_dict(), [ckpt_dir / r["name"] for r in runs], summary)
    return {"baselines": baselines, "paired": paired_evidence(this, baseline_models(baselines), cohort.spec)}


def evaluate_best(cfg: Config, data: str, cohort, runs: list[dict], ckpt_dir: Path, device: str = "cpu") -> dict:
    """Test the best trial once: each run from its checkpoint, with the weights of its epoch
    selected on validation; also its validation predictions (for plots). With tabular attributes
    also the classical baselines on the same runs ("baselines", rows of the markdown table) and
    the paired evidence on patients ("paired", a section of the markdown)."""
    import numpy as np

    cfg.train.device = device
    per_run, preds = [], {"test": ([], []), "val": ([], [])}
    for r in runs:
        run = TrainingRun(
            cfg, data, ckpt_dir / r["name"], fold=r.get("fold"), seed=r.get("seed"), resume=True, cohort=cohort
        )
        result = run.finish()
        saved = np.load(ckpt_dir / r["name"] / PREDICTIONS)
        for part in ("test", "val"):
            preds[part][0].append(saved[f"{part}_labels"])
            preds[part][1].append(saved[f"{part}_probs"])
        per_run.append(
            {
                "name": r["name"],
                "metrics": result["test"],
                "selected_epoch": result["selected_epoch"],
                "numeric_stats": run.numeric_stats,
            }
        )
    summary = summarize_runs([{k: v for k, v in r.items() if k != "numeric_stats"} for r in per_run])
    spec = cohort.spec
    evidence = baselines_and_evidence(cfg, cohort, runs, ckpt_dir, summary)
    md = markdown_table(
        summary,
        spec,
        title=f"best trial: test results (%, mean ± std over {len(per_run)} {spec.run_unit}; "
        "epochs selected on validation, test evaluated once)",
        extra_rows=[(b["label"], b) for b in evidence.get("baselines", {}).values()],
    )
    if evidence:
        md += "\n" + evidence_markdown(evidence["paired"], spec.run_unit)
    pooled = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in preds.items()}
    return {
        "runs": per_run,
        "summary": summary,
        "markdown": md,
        "pooled": pooled,
        "metric_names": metric_names(spec.classes),
        **evidence,
    }
