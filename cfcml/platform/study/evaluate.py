"""Testing the best trial once: each of its runs from its checkpoint (:func:`evaluate_best`), in
the driver or as a Ray task on the hardware the trials used (:func:`_evaluate_task`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ...config import Config
from ...engine.splits import without_cases
from .storage import storage_filesystem


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

    from ...config import config_from_dict
    from ...datasets.reader import load_cohort
    from ...datasets.spec import remember
    from ...engine.run import METRICS, PREDICTIONS

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
    return result, files


def evaluate_best(cfg: Config, data: str, cohort, runs: list[dict], ckpt_dir: Path, device: str = "cpu") -> dict:
    """Test the best trial once: each run from its checkpoint, with the weights of its epoch
    selected on validation; also its validation predictions (for plots)."""
    import numpy as np

    from ...engine.metrics import metric_names
    from ...engine.run import PREDICTIONS, TrainingRun
    from ...engine.summary import markdown_table, summarize_runs

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
    md = markdown_table(
        summary,
        spec,
        title=f"best trial: test results (%, mean ± std over {len(per_run)} {spec.run_unit}; "
        "epochs selected on validation, test evaluated once)",
    )
    pooled = {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in preds.items()}
    return {
        "runs": per_run,
        "summary": summary,
        "markdown": md,
        "pooled": pooled,
        "metric_names": metric_names(spec.classes),
    }
