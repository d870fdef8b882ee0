"""The paper's protocol: every fold (cross-validated cohorts) or every seed (cohorts with a
fixed split), then mean ± std (Tables 2/3).

The runs are independent, so `jobs` of them can train at once in worker processes. On a CPU
each worker gets cores // jobs torch threads (at least one): the small presets are bound by per-op overhead,
where one thread is about as fast as two, so parallel runs nearly divide the wall time. On a
multi-GPU machine each worker owns one GPU. A run's CPU result is bit-identical for a seed
only at the same thread count; metrics.json records the count.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from cfcml.datasets.reader import load_cohort

from ..config import Config, cohort_spec, config_from_dict
from ..models.pretrained import check_pretrained
from .baselines import run_baselines
from .checkpoint import load_checkpoint
from .errors import RunMismatch
from .evidence import Model, baseline_models, config_model, evidence_markdown, model_kind, model_name, paired_evidence
from .identity import explain_mismatch, run_identity
from .progress import Progress, queue_reporter, reporter_for
from .run import LAST, _write_json, clear_run, finished_result, train_one
from .splits import protocol_runs
from .summary import markdown_table, summarize_runs, wilcoxon_compare

BASELINES_DIR = "baselines"


class ProtocolError(RuntimeError):
    pass


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class JobPlan:
    jobs: int  # runs training at once
    threads: int  # torch threads per run; 0 leaves torch's default
    devices: list[str]  # worker i trains on devices[i]


def plan_jobs(cfg: Config, pending: int, jobs: int | None = None) -> JobPlan:
    """How many runs train at once and where. `jobs` None: one per GPU; on a CPU all runs at
    once while they are at most two per core (3 runs on 2 cores take 1.5 run-times at once,
    2 in two waves), else one per core."""
    t = cfg.train
    on_cuda = t.device.startswith("cuda") or (t.device == "auto" and torch.cuda.is_available())
    slots = torch.cuda.device_count() if on_cuda else available_cpus()
    if jobs is None:
        jobs = pending if not on_cuda and pending <= 2 * slots else slots
    n = max(1, min(jobs, pending))
    if on_cuda and slots and t.device in ("auto", "cuda"):  # no GPU: the run itself says so
        devices = [f"cuda:{i % slots}" for i in range(n)]  # more jobs than GPUs pack onto them
    else:
        devices = [t.device] * n
    threads = t.threads or (max(1, slots // n) if not on_cuda and n > 1 else 0)
    return JobPlan(n, threads, devices)


def _report_finished(
    report: Callable[[str], None], cfg: Config, name: str, result: dict, done: int, total: int
) -> None:
    value = result["test"].get(cfg.train.select_metric, float("nan"))
    report(
        f"{name} finished ({done}/{total}): test {cfg.train.select_metric}={value:.4f}, "
        f"epoch {result['selected_epoch']} selected on validation"
    )


_WORKER: dict = {}  # this worker process's device and thread count


def _init_worker(counter, devices: list[str], threads: int, events=None) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER.update(device=devices[index % len(devices)], threads=threads, events=events)


def _train_in_worker(cfg_dict: dict, data_root: str, run_dir: str, fold, seed, resume: bool) -> dict:
    cfg = config_from_dict(cfg_dict)
    cfg.train.device = _WORKER["device"]
    cfg.train.threads = _WORKER["threads"]
    reporter = queue_reporter(_WORKER.get("events"), Path(run_dir).name, cfg.train.select_metric)
    return train_one(cfg, data_root, run_dir, fold=fold, seed=seed, resume=resume, progress=False, reporter=reporter)


def _train_in_parallel(
    cfg: Config,
    data_root,
    out: Path,
    pending: list[dict],
    plan: JobPlan,
    resume: bool,
    report: Callable[[str], None],
    progress: Progress | None = None,
) -> dict[str, dict]:
    """Train `pending` runs in `plan.jobs` worker processes; -> {run name: metrics.json}.

    A failed run stops the runs not yet started; runs already training finish (their results
    are kept on disk, so the next call resumes from them), then ProtocolError names the run.
    """
    ctx = mp.get_context("spawn")  # fork after torch's thread pools exist can deadlock
    counter = ctx.Value("i", 0)
    events = ctx.Queue() if progress is not None else None
    follower = progress.follow(events) if progress is not None else None
    results, failures = {}, []
    with ProcessPoolExecutor(
        plan.jobs, mp_context=ctx, initializer=_init_worker, initargs=(counter, plan.devices, plan.threads, events)
    ) as pool:
        futures = {
            pool.submit(
                _train_in_worker,
                cfg_dict=cfg.to_dict(),
                data_root=str(data_root),
                run_dir=str(out / r["name"]),
                fold=r.get("fold"),
                seed=r.get("seed"),
                resume=resume,
            ): r["name"]
            for r in pending
        }
        for future in as_completed(futures):
            name = futures[future]
            try:
                results[name] = future.result()
            except Exception as e:  # noqa: BLE001 — reported below with the run's name
                failures.append((name, e))
                for f in futures:
                    f.cancel()
                continue
            if progress is not None:
                progress.run_done(name, len(results[name]["history"]))
            _report_finished(report, cfg, name, results[name], len(results), len(pending))
    if follower is not None:
        events.put(None)
        follower.join()
    if failures:
        name, error = failures[0]
        raise ProtocolError(f"run {name} failed ({out / name}): {type(error).__name__}: {error}") from error
    return results


def check_run_folders(cfg: Config, cohort, out: Path, planned: list[dict], overwrite: bool) -> dict[str, dict]:
    """{name: metrics.json} of the planned runs already finished in `out` (reused); refuses,
    before anything trains, when a folder holds a different run (unless `overwrite`)."""
    digest = cohort.digest()
    reused = {}
    for r in planned:
        folder = out / r["name"]
        if overwrite:
            clear_run(folder)
            continue
        wanted = run_identity(cfg, digest, r["name"])
        finished = finished_result(folder)
        if finished is not None:
            if finished.get("identity", {}).get("digest") != wanted["digest"]:
                raise RunMismatch(explain_mismatch(finished.get("identity"), wanted, folder))
            reused[r["name"]] = finished
        elif (folder / LAST).exists():
            stored = load_checkpoint(folder / LAST).get("identity")
            if (stored or {}).get("digest") != wanted["digest"]:
                raise RunMismatch(explain_mismatch(stored, wanted, folder))
    return reused


def _paired(cfg: Config, spec, out: Path, summary: dict, compare, other: dict | None) -> dict:
    """Paired evidence on patients: this model vs the --compare model and every baseline."""
    this = config_model(cfg.to_dict(), [out / r["name"] for r in summary["runs"]], summary)
    others = []
    if other is not None:
        name = f"{model_name(other.get('config'))} [{Path(compare).name}]"
        others.append(
            Model(name, model_kind(other.get("config")), [Path(compare) / r["name"] for r in other["runs"]], other)
        )
    others += baseline_models(summary.get("baselines"))
    return paired_evidence(this, others, spec)


def run_protocol(
    cfg: Config,
    data_root: str | Path,
    out_dir: str | Path,
    compare: str | Path | None = None,
    jobs: int | None = None,
    report: Callable[[str], None] | None = None,
    overwrite: bool = False,
    baselines: bool = False,
    progress: bool = False,
) -> dict:
    """Train every run into out_dir/<run>/, then write summary.json and summary.md.

    `baselines`: also fit the classical models on the attributes alone (`engine.baselines`)
    on the same splits into out_dir/baselines/, as rows of the table; with them or `compare`,
    summary.md gets the paired evidence on patients (`engine.evidence`).

    Runs already finished with the same config, cohort and code are reused (and unfinished
    ones resumed), so an interrupted protocol continues where it stopped; a folder holding a
    different run is refused unless `overwrite`. `jobs`: runs trained at once (None: see
    `plan_jobs`). `report` receives one line per event (e.g. print to stderr); `progress` shows
    live epochs on stderr (`engine.progress`).
    """
    out, report = Path(out_dir), report or (lambda message: None)
    check_pretrained(cfg)  # before any worker starts
    spec = cohort_spec(cfg)
    cohort = load_cohort(spec, data_root)  # bad input fails here, before any worker starts
    planned = protocol_runs(cfg, cohort)
    results = check_run_folders(cfg, cohort, out, planned, overwrite)
    pending = [r for r in planned if r["name"] not in results]
    live = Progress([r["name"] for r in planned], cfg.train.epochs, cfg.train.select_metric) if progress else None
    for name, result in results.items() if live else ():
        live.run_done(name, len(result["history"]))
    report = live.wrap(report) if live else report
    if pending:
        results |= _train_pending(
            cfg, data_root, out, pending, cohort=cohort, jobs=jobs, reused=len(results), report=report, live=live
        )
    summary, other = _summarize(planned, results, compare)
    if baselines:
        summary["baselines"] = run_baselines(cfg, cohort, planned, out / BASELINES_DIR, report=report)
    summary["markdown"] = _markdown(cfg, spec, summary)
    if baselines or compare:
        summary["paired"] = _paired(cfg, spec, out, summary, compare, other)
        summary["markdown"] += "\n" + evidence_markdown(summary["paired"], spec.run_unit)
    summary |= {
        "preset": cfg.name,
        "dataset": spec.name,
        "data": str(Path(data_root).resolve()),
        "cohort_digest": cohort.digest(),
        "config": cfg.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "summary.json", summary)
    (out / "summary.md.tmp").write_text(summary["markdown"] + "\n")
    (out / "summary.md.tmp").replace(out / "summary.md")
    return summary


def _train_pending(cfg: Config, data_root, out: Path, pending: list[dict], *, cohort, jobs, reused, report, live):
    """Train the runs not finished yet, one at a time or in worker processes; -> {run: metrics.json}."""
    plan = plan_jobs(cfg, len(pending), jobs)
    report(
        f"{cfg.name}: training {len(pending)} run(s), {plan.jobs} at a time"
        + (f", {plan.threads} thread(s) each" if plan.threads else "")
        + (f", {reused} reused from {out}" if reused else "")
    )
    results: dict[str, dict] = {}
    if plan.jobs > 1:
        results = _train_in_parallel(cfg, data_root, out, pending, plan, resume=True, report=report, progress=live)
    for done, r in enumerate(pending if plan.jobs == 1 else (), 1):
        reporter = reporter_for(live, r["name"], cfg.train.select_metric)
        results[r["name"]] = train_one(
            cfg,
            data_root,
            out / r["name"],
            fold=r.get("fold"),
            seed=r.get("seed"),
            resume=True,
            cohort=cohort,
            reporter=reporter,
            progress=not live,
        )
        if live:
            live.run_done(r["name"], len(results[r["name"]]["history"]))
        _report_finished(report, cfg, r["name"], results[r["name"]], done, len(pending))
    if live:
        live.close()
    return results


def _summarize(planned: list[dict], results: dict, compare) -> tuple[dict, dict | None]:
    """(mean ± std of the test metrics over the runs, with Wilcoxon p-values against the
    `compare` protocol; that protocol's summary, for the paired tests, or None)."""
    runs = [
        {
            "name": r["name"],
            "metrics": results[r["name"]]["test"],
            "selected_epoch": results[r["name"]]["selected_epoch"],
        }
        for r in planned
    ]
    summary = summarize_runs(runs)
    if compare:
        other = json.loads((Path(compare) / "summary.json").read_text())
        summary["compare"] = {"against": str(compare), "wilcoxon_p": wilcoxon_compare(summary, other)}
        return summary, other
    return summary, None


def _markdown(cfg: Config, spec, summary: dict) -> str:
    return markdown_table(
        summary,
        spec,
        title=f"{cfg.name} on {spec.name}: test results (%, mean ± std over {len(summary['runs'])} {spec.run_unit}; "
        "epoch selected on validation)",
        pvalues=(summary.get("compare") or {}).get("wilcoxon_p"),
        extra_rows=[(b["label"], b) for b in summary.get("baselines", {}).values()],
    )
