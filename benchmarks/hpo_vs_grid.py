"""Does the search beat the paper's hand tuning, for less compute?

On a synthetic MEN-like cohort (``men-smoke`` scale) this runs

(a) **the paper's coordinate search** (Fig. 6): n_t over a 4-value grid at a fixed n_i, then
    n_i over a 4-value grid at the best n_t — 7 distinct configurations (one is shared), each
    the full protocol (3 folds x E epochs, ``cfcml cv``), α/β/γ at the preset's values; and
(b) **the platform's study** (Ray Tune + Optuna TPE + ASHA, each trial a Ray Train run over the
    3 folds in lockstep, tracked in MLflow: exactly ``jobs/tune_men.py``) over n_i, n_t, α, β,
    γ with a hard budget of at most half the grid's epochs (``--budget-epochs``), once per
    search seed.

Both select on mean validation AUC only; then the test AUC of each selected configuration
(mean ± std over folds), the epochs spent (every fold of every trial or configuration,
stopped trials included) and the wall time are reported. On a small cohort one run's test
AUC depends on its training seed about as much as on its configuration, so each selected
configuration is also retrained with other training seeds (``--retrain-seeds``, default
1 2 3; evaluation only, counted in neither method's epochs) and that mean is reported too. The smoke model is ~4x smaller than
the paper's, so the token grids are the paper's divided by 4 (n_t {2,4,6,8} at n_i = 8, then
n_i {4,8,12,16}; the preset's n_i = 8, n_t = 4 is the paper's 32 / 16 scaled the same way).

The grid has no search randomness (CPU training is deterministic for a seed at a fixed thread
count), so it runs once; the study runs once per search seed (TPE seed). Services: a local
MLflow server and Ray head are started (``cfcml.platform.services``, as ``make run`` does)
unless ``--tracking-uri`` and ``--ray-address`` point at running ones.

    python benchmarks/hpo_vs_grid.py --json docs/hpo_vs_grid.json   # defaults: ~30 min on 2 free cores

Writes ``--json OUT`` (``{"grid": {...}, "hpo": {...}}`` with ``best_val_auc, test_auc, epochs,
seconds, config`` in each; ``hpo`` aggregates the seeds, ``hpo.seeds`` has each), and with
``--docs DIR`` the table (``hpo_vs_grid.md``) and plot (``hpo_vs_grid.png``: best validation
AUC against epochs spent); all of it is logged to an MLflow run in experiment
``cfcml-hpo-vs-grid``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "cfcml-hpo-vs-grid"
PRESET = "men-smoke"
FOLDS = 3  # MEN's protocol
# the paper's Fig. 6 grids (n_t at n_i = 32, then n_i at the best n_t), divided by the smoke scale
PAPER_NT, PAPER_NI, PAPER_NI_FIXED = (8, 16, 24, 32), (16, 32, 48, 64), 32
SCALE = 4

log = logging.getLogger("hpo_vs_grid")


# ----------------------------------------------------------------------------- pure logic (tested)


def scaled_grid(scale: int = SCALE) -> dict:
    """The paper's coordinate-search grids divided by `scale` (token counts stay >= 1)."""
    return {
        "nt": [max(1, v // scale) for v in PAPER_NT],
        "ni": [max(1, v // scale) for v in PAPER_NI],
        "ni_fixed": max(1, PAPER_NI_FIXED // scale),
    }


def coordinate_step_one(grid: dict) -> list[tuple[int, int]]:
    """(n_i, n_t) configurations of the first axis: every n_t at the fixed n_i."""
    return [(grid["ni_fixed"], nt) for nt in grid["nt"]]


def coordinate_step_two(grid: dict, best_nt: int) -> list[tuple[int, int]]:
    """(n_i, n_t) of the second axis: every n_i at the best n_t (one is already trained)."""
    return [(ni, best_nt) for ni in grid["ni"]]


def select(records: list[dict], key: str = "val_auc") -> dict:
    """The record with the highest `key` (validation only); ties go to the earliest evaluated."""
    if not records:
        raise ValueError("nothing to select from")
    best = records[0]
    for r in records[1:]:
        if r[key] > best[key]:
            best = r
    return best


def grid_budget(n_configs: int, folds: int, epochs: int, fraction: float = 0.5) -> int:
    """Epochs the study may spend: `fraction` of the grid's (configs x folds x epochs), in whole
    epochs of all folds (one lockstep trial epoch costs `folds`)."""
    total = n_configs * folds * epochs
    return int(total * fraction) // folds * folds


def study_epochs(trial_epochs: list[int], folds: int) -> int:
    """Epochs a study spent: every fold of every trial, stopped ones included."""
    return sum(int(e) for e in trial_epochs) * folds


def best_so_far(points: list[tuple[float, float, int]]) -> list[tuple[int, float]]:
    """[(time, value, epochs)] in any order -> [(cumulative epochs, best value so far)] in time order."""
    out, spent, best = [], 0, -math.inf
    for _, value, epochs in sorted(points, key=lambda p: p[0]):
        spent += epochs
        best = max(best, value)
        out.append((spent, best))
    return out


def grid_curve(records: list[dict]) -> list[tuple[int, float]]:
    """The grid's best mean validation AUC after each configuration (in the order trained)."""
    return best_so_far([(i, r["val_auc"], r["epochs"]) for i, r in enumerate(records)])


def spread(values: list[float]) -> dict:
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def aggregate_seeds(seeds: list[dict]) -> dict:
    """The contract keys for several study seeds: means over seeds (what one search gives on
    average), `config` of the seed with the best validation AUC (what you would ship after
    running them all), `spread` per key, and each seed under `seeds`."""
    shipped = select(seeds, "best_val_auc")
    return {
        "best_val_auc": statistics.fmean(s["best_val_auc"] for s in seeds),
        "test_auc": statistics.fmean(s["test_auc"] for s in seeds),
        "test_auc_std": statistics.fmean(s["test_auc_std"] for s in seeds),  # over folds, averaged over seeds
        "epochs": statistics.fmean(s["epochs"] for s in seeds),
        "seconds": statistics.fmean(s["seconds"] for s in seeds),
        "config": shipped["config"],
        "config_seed": shipped["seed"],
        "spread": {k: spread([s[k] for s in seeds]) for k in ("best_val_auc", "test_auc", "epochs", "seconds")},
        "seeds": seeds,
    }


def verdict(grid: dict, hpo: dict, budget: int) -> dict:
    """Did the study reach at least the grid's test AUC with at most half its epochs?"""
    seeds = hpo["seeds"]
    wins = [s["seed"] for s in seeds if s["test_auc"] >= grid["test_auc"]]
    within = all(s["epochs"] <= budget for s in seeds)
    return {
        "seeds_at_least_grid_test_auc": len(wins),
        "seeds": len(seeds),
        "mean_test_auc_delta": hpo["test_auc"] - grid["test_auc"],
        "mean_val_auc_delta": hpo["best_val_auc"] - grid["best_val_auc"],
        "epochs_ratio": hpo["epochs"] / grid["epochs"],
        "every_seed_within_budget": within,
        "search_wins": within and hpo["test_auc"] >= grid["test_auc"],
        **(
            {
                "retrained_test_auc_delta": hpo["retrained_test_auc"] - grid["retrained"]["test_auc_mean"],
                "search_wins_retrained": within and hpo["retrained_test_auc"] >= grid["retrained"]["test_auc_mean"],
            }
            if "retrained" in grid and "retrained_test_auc" in hpo
            else {}
        ),
    }


def short_config(config: dict) -> str:
    names = {
        "model.n_image_tokens": "n_i",
        "model.n_tabular_tokens": "n_t",
        "loss.alpha": "α",
        "loss.beta": "β",
        "loss.gamma": "γ",
    }
    return ", ".join(
        f"{names.get(k, k)} {v:.3g}" if isinstance(v, float) else f"{names.get(k, k)} {v}" for k, v in config.items()
    )


def markdown(result: dict) -> str:
    grid, hpo, v = result["grid"], result["hpo"], result["verdict"]
    retrained = "retrained" in grid

    def pct(x):
        return f"{100 * x:.2f}"

    def again(entry):  # the configuration retrained with other training seeds
        if not retrained:
            return ""
        r = entry["retrained"]
        return f" {pct(r['test_auc_mean'])} ± {pct(r['test_auc_std'])} |"

    head = "| method | search seed | best val AUC | test AUC of the selected run (mean ± std over folds) |"
    rule = "|---|---|---|---|"
    if retrained:
        head += f" test AUC of the configuration retrained ({len(grid['retrained']['seeds'])} other training seeds) |"
        rule += "---|"
    rows = [
        head + " epochs | wall time | selected configuration |",
        rule + "---|---|---|",
        (
            f"| grid (paper's coordinate search) | – | {pct(grid['best_val_auc'])} | {pct(grid['test_auc'])} ± "
            f"{pct(grid['test_auc_std'])} |{again(grid)} {grid['epochs']} | {grid['seconds'] / 60:.1f} min | "
            f"{short_config(grid['config'])} |"
        ),
    ]
    for s in hpo["seeds"]:
        rows.append(
            f"| study (TPE + ASHA) | {s['seed']} | {pct(s['best_val_auc'])} | {pct(s['test_auc'])} ± "
            f"{pct(s['test_auc_std'])} |{again(s)} {s['epochs']} | {s['seconds'] / 60:.1f} min | "
            f"{short_config(s['config'])} |"
        )
    sp = hpo["spread"]
    mean_again = ""
    if retrained:
        r = sp["retrained_test_auc"]
        mean_again = f" {pct(r['mean'])} ± {pct(r['std'])} |"
    rows.append(
        f"| study, {sp['test_auc']['n']} seeds | mean ± std (min–max) | {pct(sp['best_val_auc']['mean'])} ± "
        f"{pct(sp['best_val_auc']['std'])} | {pct(sp['test_auc']['mean'])} ± {pct(sp['test_auc']['std'])} "
        f"({pct(sp['test_auc']['min'])}–{pct(sp['test_auc']['max'])}) |{mean_again} {sp['epochs']['mean']:.0f} "
        f"(≤ {result['settings']['budget_epochs']}) | {sp['seconds']['mean'] / 60:.1f} min | – |"
    )
    lines = [
        "\n".join(rows),
        "",
        (
            f"Study vs grid: test AUC {100 * v['mean_test_auc_delta']:+.2f} points on average over seeds "
            f"({v['seeds_at_least_grid_test_auc']}/{v['seeds']} seeds at least the grid's), validation AUC "
            f"{100 * v['mean_val_auc_delta']:+.2f}, epochs {v['epochs_ratio']:.2f}x the grid's."
        ),
    ]
    if "retrained_test_auc_delta" in v:
        lines.append(
            f"Selected configurations retrained with other seeds: study {100 * v['retrained_test_auc_delta']:+.2f} "
            "points against the grid's."
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot


def plot(result: dict, path: Path | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    g = result["grid"]["curve"]
    ax.step(
        [x for x, _ in g], [y for _, y in g], where="post", c="black", lw=2, label="grid (paper's coordinate search)"
    )
    configs = result["grid"].get("configs") or []
    if configs:  # each configuration's own value, where it finished
        ax.scatter(
            [x for x, _ in g],
            [r["val_auc"] for r in configs],
            c="black",
            s=14,
            alpha=0.4,
            zorder=3,
            label="grid: each configuration",
        )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(result["hpo"]["seeds"]):
        c = s["curve"]
        if c:
            ax.step(
                [x for x, _ in c],
                [y for _, y in c],
                where="post",
                c=colors[i % len(colors)],
                lw=1.4,
                label=f"study, search seed {s['seed']}",
            )
    ax.axvline(result["settings"]["budget_epochs"], c="gray", ls="--", lw=1, label="study budget (½ the grid's)")
    ax.set_xlabel("epochs spent (every fold of every trial / configuration)")
    ax.set_ylabel("best mean validation AUC so far")
    ax.set_title("search vs hand tuning (synthetic MEN, men-smoke)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120, metadata={"Software": None})
    return fig


# ----------------------------------------------------------------------------- the two methods


def config_params(ni: int, nt: int, cfg) -> dict:
    return {
        "model.n_image_tokens": ni,
        "model.n_tabular_tokens": nt,
        "loss.alpha": cfg.loss.alpha,
        "loss.beta": cfg.loss.beta,
        "loss.gamma": cfg.loss.gamma,
    }


def run_grid(data: Path, overrides: list[str], epochs: int, work: Path, grid: dict) -> dict:
    """The paper's coordinate search, each configuration the full protocol (`cfcml cv`)."""
    from cfcml.config import build_config
    from cfcml.engine.protocol import run_protocol

    records, seconds = [], 0.0

    def train(ni: int, nt: int) -> dict:
        nonlocal seconds
        cfg = build_config(
            PRESET, [*overrides, f"train.epochs={epochs}", f"model.n_image_tokens={ni}", f"model.n_tabular_tokens={nt}"]
        )
        out = work / f"ni{ni}_nt{nt}"
        t0 = time.time()
        summary = run_protocol(cfg, data, out, overwrite=True, report=lambda m: log.info("grid: %s", m))
        took = time.time() - t0
        seconds += took
        vals, trained = [], 0
        for r in summary["runs"]:
            metrics = json.loads((out / r["name"] / "metrics.json").read_text())
            vals.append(float(metrics["validation"]["val_auc"]))
            trained += len(metrics["history"])
        rec = {
            "config": config_params(ni, nt, cfg),
            "val_auc": statistics.fmean(vals),
            "val_auc_folds": vals,
            "test_auc": summary["metrics"]["auc"]["mean"],
            "test_auc_std": summary["metrics"]["auc"]["std"],
            "test_auc_folds": [r["metrics"]["auc"] for r in summary["runs"]],
            "epochs": trained,
            "seconds": took,
        }
        log.info(
            "grid: n_i %d n_t %d: val AUC %.4f, test AUC %.4f (%.0f s)", ni, nt, rec["val_auc"], rec["test_auc"], took
        )
        records.append(rec)
        return rec

    done: dict[tuple[int, int], dict] = {}
    for ni, nt in coordinate_step_one(grid):
        done[(ni, nt)] = train(ni, nt)
    best_nt = select([done[k] for k in coordinate_step_one(grid)])["config"]["model.n_tabular_tokens"]
    for ni, nt in coordinate_step_two(grid, best_nt):
        if (ni, nt) not in done:  # the shared configuration is not trained twice
            done[(ni, nt)] = train(ni, nt)
    best = select(records)
    return {
        "best_val_auc": best["val_auc"],
        "test_auc": best["test_auc"],
        "test_auc_std": best["test_auc_std"],
        "test_auc_folds": best["test_auc_folds"],
        "epochs": sum(r["epochs"] for r in records),
        "seconds": seconds,
        "config": best["config"],
        "best_nt_step_one": best_nt,
        "configs": records,
        "curve": grid_curve(records),
    }


def retrain(data: Path, overrides: list[str], epochs: int, work: Path, config: dict, seeds: list[int]) -> dict:
    """The test AUC of one configuration retrained with other training seeds (initialisation,
    batches, augmentation): what the configuration is worth, apart from its one selected run.
    Evaluation only: not counted in either method's search epochs."""
    from cfcml.config import build_config
    from cfcml.engine.protocol import run_protocol

    sets = [f"{k}={v}" for k, v in config.items()]
    per_seed = []
    for seed in seeds:
        cfg = build_config(PRESET, [*overrides, f"train.epochs={epochs}", *sets, f"train.seed={seed}"])
        name = "_".join(
            f"{k.split('.')[-1]}{v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}{v}"
            for k, v in config.items()
        )
        summary = run_protocol(
            cfg,
            data,
            work / "retrain" / name / f"seed{seed}",
            overwrite=True,
            report=lambda m: log.info("retrain: %s", m),
        )
        per_seed.append(summary["metrics"]["auc"]["mean"])
        log.info("retrain %s seed %d: test AUC %.4f", short_config(config), seed, per_seed[-1])
    return {
        "seeds": seeds,
        "test_auc": per_seed,
        **{f"test_auc_{k}": v for k, v in spread(per_seed).items() if k != "n"},
    }


def add_retrained(result: dict, data: Path, overrides: list[str], epochs: int, work: Path, seeds: list[int]) -> None:
    """Retrain every selected configuration (the grid's, each study seed's) with `seeds`,
    once per distinct configuration."""
    done: dict[str, dict] = {}
    for entry in [result["grid"], *result["hpo"]["seeds"]]:
        key = json.dumps(entry["config"], sort_keys=True)
        if key not in done:
            done[key] = retrain(data, overrides, epochs, work, entry["config"], seeds)
        entry["retrained"] = done[key]
    values = [s["retrained"]["test_auc_mean"] for s in result["hpo"]["seeds"]]
    result["hpo"]["retrained_test_auc"] = statistics.fmean(values)
    result["hpo"]["spread"]["retrained_test_auc"] = spread(values)


def reused_grid(path: Path, settings: dict) -> dict:
    """The grid of an earlier run, refused unless it was run on the same protocol."""
    old = json.loads(path.read_text())
    same = ("patients", "image_size", "epochs", "folds", "grid_nt", "grid_ni", "grid_ni_fixed", "train_seed")
    differ = [k for k in same if old["settings"].get(k) != settings[k]]
    if differ:
        raise SystemExit(f"--reuse-grid {path}: different {', '.join(differ)}")
    return old["grid"] | {"reused_from": str(path)}


def write_space(path: Path, grid: dict, asha: dict, sampler: dict) -> Path:
    """The study's space: the grid's token values as integer ranges, α/β/γ on log scales x/÷ 4
    around the preset's (the paper's) values, as in search_spaces/men.yaml."""
    import yaml

    ni, nt = sorted(grid["ni"]), sorted(grid["nt"])
    space = {
        "metric": "cv_val_auc",
        "mode": "max",
        "first_trial": "preset",
        "params": {
            "model.n_image_tokens": {"type": "int", "low": ni[0], "high": ni[-1], "step": ni[1] - ni[0]},
            "model.n_tabular_tokens": {"type": "int", "low": nt[0], "high": nt[-1], "step": nt[1] - nt[0]},
            "loss.alpha": {"type": "float", "low": 0.015, "high": 0.24, "log": True},
            "loss.beta": {"type": "float", "low": 0.01, "high": 0.16, "log": True},
            "loss.gamma": {"type": "float", "low": 0.06, "high": 0.96, "log": True},
        },
        "asha": asha,
        **({"sampler": sampler} if sampler else {}),
    }
    path.write_text("# written by benchmarks/hpo_vs_grid.py\n" + yaml.safe_dump(space, sort_keys=False))
    return path


def study_timeline(client, experiment_id: str, parent_run_id: str, folds: int) -> tuple[list[int], list[tuple]]:
    """Per trial: epochs trained (what its Train workers logged, so epochs finished after a stop
    decision count too), and every epoch's (time, cv_val_auc, folds) point, from MLflow."""
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000
    )
    epochs, points = [], []
    for child in children:
        history = client.get_metric_history(child.info.run_id, "cv_val_auc")
        steps = {m.step: m for m in history}  # a restarted epoch is logged again: count it once
        epochs.append(max(steps, default=0))
        points += [(m.timestamp, m.value, folds) for m in steps.values()]
    return epochs, points


def run_hpo(
    seed: int, data: Path, overrides: list[str], epochs: int, budget: int, space: Path, args, work: Path
) -> dict:
    from mlflow.tracking import MlflowClient

    from cfcml.platform.study import StudySpec, run_study

    name = f"hpo-vs-grid-{args.stamp}-s{seed}"
    spec = StudySpec.of(
        preset=PRESET,
        data=str(data),
        dataset="men",
        name=name,
        overrides=overrides,
        search_space=str(space),
        num_samples=args.max_trials,
        epochs=epochs,
        budget_epochs=budget,
        location=str(work / "ray_results"),
        seed=seed,
        tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
        experiment=EXPERIMENT,
        register=False,
        ray_address=os.environ.get("RAY_ADDRESS"),
        work_dir=str(work / f"eval-{seed}"),
        git_commit=args.git_commit,
    )
    t0 = time.time()
    summary = run_study(spec)
    seconds = time.time() - t0
    client = MlflowClient()
    trial_epochs, points = study_timeline(client, summary["experiment_id"], summary["parent_run_id"], FOLDS)
    spent = max(study_epochs(trial_epochs, FOLDS), int(summary.get("epochs_spent", 0)))
    auc = summary["test"]["auc"]
    return {
        "seed": seed,
        "best_val_auc": summary["best_cv_val_auc"],
        "test_auc": auc["mean"],
        "test_auc_std": auc["std"],
        "epochs": spent,
        "seconds": seconds,
        "config": summary["best_params"],
        "best_epochs": summary["best_epochs"],
        "trials": len(trial_epochs),
        "trial_states": summary.get("trial_states", {}),
        "trial_epochs": sorted(trial_epochs),
        "importances": summary.get("importances", {}),
        "parent_run_id": summary["parent_run_id"],
        "curve": best_so_far(points),
    }


# ----------------------------------------------------------------------------- services and MLflow


def warm_sentence_cache(data: Path, overrides: list[str]) -> None:
    """Embed the cohort's sentences once here, so that no grid worker builds the text encoder."""
    from cfcml.config import build_config
    from cfcml.datasets.reader import load_cohort
    from cfcml.platform.study import warm_caches

    cfg = build_config(PRESET, overrides)
    warm_caches(cfg, load_cohort(cfg.dataset, data))


def start_services(state: Path, cpus: int) -> list:
    """A local MLflow server and Ray head (as `make run` starts them); their client environment
    is exported so that run_study and MlflowClient find them."""
    from cfcml.platform.services import stack_client_env, start_tracking_and_ray

    mlflow, ray = start_tracking_and_ray(state, cpus, {"HF_HUB_OFFLINE": "1"})
    os.environ.update(stack_client_env(mlflow, ray))
    return [ray, mlflow]


def log_to_mlflow(result: dict, files: dict[str, Path]) -> str:
    """One run in EXPERIMENT with the settings, the headline numbers, the table, the plot and the
    JSON; one child per grid configuration. Returns the run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from cfcml.platform.tracking import FINISHED, terminate_run

    client = MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(
        exp_id, run_name=f"hpo-vs-grid-{result['settings']['stamp']}", tags={"cfcml.benchmark": "hpo_vs_grid"}
    )
    rid, now = run.info.run_id, int(time.time() * 1000)
    try:
        grid, hpo, v = result["grid"], result["hpo"], result["verdict"]
        metrics = {f"grid.{k}": grid[k] for k in ("best_val_auc", "test_auc", "test_auc_std", "epochs", "seconds")}
        metrics |= {f"hpo.{k}": hpo[k] for k in ("best_val_auc", "test_auc", "test_auc_std", "epochs", "seconds")}
        metrics |= {
            "hpo.test_auc_seed_std": hpo["spread"]["test_auc"]["std"],
            "test_auc_delta": v["mean_test_auc_delta"],
            "epochs_ratio": v["epochs_ratio"],
        }
        metrics |= {f"hpo.s{s['seed']}.{k}": s[k] for s in hpo["seeds"] for k in ("best_val_auc", "test_auc", "epochs")}
        params = {k: str(v)[:500] for k, v in result["settings"].items()}
        client.log_batch(
            rid,
            metrics=[Metric(k, float(x), now, 0) for k, x in metrics.items()],
            params=[Param(k, x) for k, x in params.items()],
        )
        client.set_tag(rid, "cfcml.search_wins", str(v["search_wins"]))
        for s in hpo["seeds"]:
            client.set_tag(rid, f"study.s{s['seed']}.parent_run_id", s["parent_run_id"])
        for path in files.values():
            client.log_artifact(rid, str(path))
        for rec in grid["configs"]:
            child = client.create_run(
                exp_id,
                run_name=f"grid ni{rec['config']['model.n_image_tokens']} nt{rec['config']['model.n_tabular_tokens']}",
                tags={"mlflow.parentRunId": rid},
            )
            client.log_batch(
                child.info.run_id,
                params=[Param(k, str(x)) for k, x in rec["config"].items()],
                metrics=[
                    Metric(k, float(rec[k]), now, 0)
                    for k in ("val_auc", "test_auc", "test_auc_std", "epochs", "seconds")
                ],
            )
            terminate_run(client, child.info.run_id, FINISHED)
        terminate_run(client, rid, FINISHED)
    except BaseException:
        terminate_run(client, rid, "FAILED")
        raise
    return rid


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--docs", type=Path, help="write hpo_vs_grid.{md,png} here (e.g. docs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search (TPE) seeds")
    p.add_argument("--epochs", type=int, default=20, help="E: epochs of every run, the same for both methods")
    p.add_argument("--patients", type=int, default=150)
    p.add_argument("--image-size", default="8,16,16", help="D,H,W of the volumes (men-smoke: 8,16,16)")
    p.add_argument("--budget-fraction", type=float, default=0.5, help="the study's epochs / the grid's")
    p.add_argument("--grace-period", type=int, default=4, help="ASHA grace period (epochs)")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA reduction factor")
    p.add_argument("--n-startup-trials", type=int, default=4, help="TPE random trials before modelling")
    p.add_argument("--no-multivariate", action="store_true", help="independent TPE instead of multivariate")
    p.add_argument("--max-trials", type=int, default=100, help="num_samples: an upper bound, the budget ends the study")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray head")
    p.add_argument("--data", type=Path, help="cohort folder (default: a synthetic one under --work)")
    p.add_argument("--work", type=Path, default=None, help="scratch (default: a temp dir, removed at the end)")
    p.add_argument(
        "--tracking-uri", default=None, help="use this MLflow server (with --ray-address) instead of starting one"
    )
    p.add_argument("--ray-address", default=None)
    p.add_argument("--git-commit", default=None)
    p.add_argument(
        "--retrain-seeds",
        type=int,
        nargs="*",
        default=[1, 2, 3],
        help="retrain each selected configuration with these training seeds (none: skip)",
    )
    p.add_argument(
        "--reuse-result",
        type=Path,
        default=None,
        help="take the grid and the studies from an earlier --json with the same settings and only retrain",
    )
    p.add_argument(
        "--reuse-grid",
        type=Path,
        default=None,
        help="take the grid from an earlier --json with the same cohort, epochs and image size (the grid "
        "is deterministic): for trying study settings",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    t_start = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="hvg-", dir="/tmp"))  # short: Ray's socket paths
    work.mkdir(parents=True, exist_ok=True)
    services = []
    try:
        if args.tracking_uri and args.ray_address:
            os.environ["MLFLOW_TRACKING_URI"], os.environ["RAY_ADDRESS"] = args.tracking_uri, args.ray_address
        else:
            services = start_services(work / "svc", args.cpus)
        from cfcml.datasets import write_synthetic

        data = args.data or work / f"men{args.patients}"
        if not (data / "clinical.csv").exists():
            write_synthetic("men", data, args.patients, 0)
        size = [int(x) for x in args.image_size.split(",")]
        overrides = [
            f"data.image_size=[{','.join(map(str, size))}]",
            f"data.cache_dir={work / 'cache'}",
            "train.device=cpu",
            "train.threads=1",
        ]
        grid_def = scaled_grid()
        n_configs = len(set(coordinate_step_one(grid_def)) | set(coordinate_step_two(grid_def, grid_def["nt"][0])))
        budget = grid_budget(n_configs, FOLDS, args.epochs, args.budget_fraction)
        asha = {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor}
        sampler = {
            "n_startup_trials": args.n_startup_trials,
            **({} if args.no_multivariate else {"multivariate": True}),
        }
        space = write_space(work / "space.yaml", grid_def, asha, sampler)
        settings = {
            "stamp": args.stamp,
            "preset": PRESET,
            "patients": args.patients,
            "image_size": size,
            "epochs": args.epochs,
            "folds": FOLDS,
            "grid_nt": grid_def["nt"],
            "grid_ni": grid_def["ni"],
            "grid_ni_fixed": grid_def["ni_fixed"],
            "grid_scale": f"paper / {SCALE}",
            "budget_fraction": args.budget_fraction,
            "budget_epochs": budget,
            "asha": asha,
            "sampler": {"name": "TPESampler", **sampler},
            "seeds": args.seeds,
            "train_seed": 0,
            "cpus": args.cpus,
            "space": space.read_text(),
        }
        log.info("settings: %s", {k: v for k, v in settings.items() if k != "space"})

        warm_sentence_cache(data, overrides)
        if args.reuse_result:
            earlier = json.loads(args.reuse_result.read_text())
            grid = reused_grid(args.reuse_result, settings)
            hpo = aggregate_seeds(earlier["hpo"]["seeds"])
            settings |= {k: earlier["settings"][k] for k in ("asha", "sampler", "seeds", "space", "stamp")}
        else:
            if args.reuse_grid:
                grid = reused_grid(args.reuse_grid, settings)
            else:
                grid = run_grid(data, overrides, args.epochs, work / "grid", grid_def)
            log.info(
                "grid: %d epochs, %.0f s, selected %s (val %.4f, test %.4f)",
                grid["epochs"],
                grid["seconds"],
                short_config(grid["config"]),
                grid["best_val_auc"],
                grid["test_auc"],
            )
            seeds = []
            for seed in args.seeds:
                seeds.append(run_hpo(seed, data, overrides, args.epochs, budget, space, args, work))
                s = seeds[-1]
                log.info(
                    "study seed %d: %d epochs, %.0f s, %d trials, selected %s (val %.4f, test %.4f)",
                    seed,
                    s["epochs"],
                    s["seconds"],
                    s["trials"],
                    short_config(s["config"]),
                    s["best_val_auc"],
                    s["test_auc"],
                )
            hpo = aggregate_seeds(seeds)
        result = {"grid": grid, "hpo": hpo, "settings": settings}
        if args.retrain_seeds:
            settings["retrain_seeds"] = args.retrain_seeds
            add_retrained(result, data, overrides, args.epochs, work, args.retrain_seeds)
        result["verdict"] = verdict(grid, hpo, budget)
        result["settings"]["total_seconds"] = time.time() - t_start
        table = markdown(result)
        print(table)
        out_dir = args.docs or work / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {
            "md": out_dir / "hpo_vs_grid.md",
            "png": out_dir / "hpo_vs_grid.png",
            "json": out_dir / "hpo_vs_grid.json",
        }
        files["md"].write_text(table)
        import matplotlib.pyplot as plt

        plt.close(plot(result, files["png"]))
        text = json.dumps(result, indent=2, default=float) + "\n"
        files["json"].write_text(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)
        run_id = log_to_mlflow(result, files)
        log.info(
            "logged to MLflow run %s (experiment %s); total %.1f min", run_id, EXPERIMENT, (time.time() - t_start) / 60
        )
        return 0
    except BaseException:
        log.exception("the benchmark failed")  # before the services go: a Ray driver dies with its head
        raise
    finally:
        if "ray" in sys.modules:
            import ray

            ray.shutdown()
        for service in services:
            service.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
