"""The paper's protocol: every MEN fold or every Derm7pt seed, then mean ± std (Tables 2/3)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from ..data.registry import load_cohort
from .run import train_one
from .summary import markdown_table, summarize_runs, wilcoxon_compare


def protocol_runs(cfg: Config, cohort) -> list[dict]:
    """[{"name": ..., "fold": k} | {"name": ..., "seed": s}] for this dataset's protocol."""
    if cfg.dataset == "men":
        return [{"name": s, "fold": int(s.removeprefix("fold"))} for s in cohort.splits]
    return [{"name": f"seed{s}", "seed": s} for s in cfg.train.seeds]


def run_protocol(cfg: Config, data_root: str | Path, out_dir: str | Path, compare: str | Path | None = None, resume: bool = True) -> dict:
    """Train every run into out_dir/<run>/, then write summary.json and summary.md.

    Runs already finished (their metrics.json exists) are reused, so an interrupted protocol
    continues where it stopped.
    """
    out = Path(out_dir)
    cohort = load_cohort(cfg.dataset, data_root)
    runs = []
    for r in protocol_runs(cfg, cohort):
        run_dir = out / r["name"]
        done = run_dir / "metrics.json"
        if resume and done.exists() and json.loads(done.read_text()).get("finished"):
            result = json.loads(done.read_text())
        else:
            result = train_one(cfg, data_root, run_dir, fold=r.get("fold"), seed=r.get("seed"), resume=resume, cohort=cohort)
        runs.append({"name": r["name"], "metrics": result["test"], "selected_epoch": result["selected_epoch"]})
    summary = summarize_runs(runs)
    pvalues = None
    if compare:
        other = json.loads((Path(compare) / "summary.json").read_text())
        pvalues = wilcoxon_compare(summary, other)
        summary["compare"] = {"against": str(compare), "wilcoxon_p": pvalues}
    unit = "folds" if cfg.dataset == "men" else "seeds"
    summary["markdown"] = markdown_table(
        summary, cfg.dataset, title=f"{cfg.name}: test results (%, mean ± std over {len(runs)} {unit}; epoch selected on validation)",
        pvalues=pvalues,
    )
    summary["preset"] = cfg.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "summary.md").write_text(summary["markdown"] + "\n")
    return summary
