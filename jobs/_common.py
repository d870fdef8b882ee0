"""Command line shared by the tune jobs: parse arguments, build a StudySpec, run the study.

Submitted with `ray job submit --working-dir . -- python jobs/tune_men.py ...`; also runs
directly (`python jobs/tune_men.py ...`, starting or joining a Ray cluster via RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path


def build_parser(prog: str, dataset: str | None, preset: str | None, synth_size: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Ray Tune + Optuna search for CFCML on a cohort, tracked in MLflow.")
    p.add_argument("--dataset", default=dataset, required=dataset is None, metavar="NAME|PATH.yaml",
                   help="the cohort: a built-in one (men, derm7pt) or a schema file" + (f" (default {dataset})" if dataset else ""))
    p.add_argument("--preset", default=preset, required=preset is None,
                   help="the model preset, e.g. men | men-smoke | derm7pt | derm7pt-smoke" + (f" (default {preset})" if preset else ""))
    p.add_argument("--data", type=Path, help="cohort folder; default: write a synthetic cohort first (--synth-dir)")
    p.add_argument("--num-samples", type=int, default=8, help="trials in the study")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="cap on concurrent trials (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) per trial")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=_gpus, default=None, metavar="auto|N",
                   help="GPUs per Train worker; auto (default): 1 when the cluster has GPUs, else 0 (CPU, gloo)")
    p.add_argument("--storage", default=os.path.expanduser("~/ray_results/cfcml"),
                   help="Ray storage: a local path or s3://bucket/path[?endpoint_override=host:port&scheme=http]")
    p.add_argument("--name", default=None, help="study name (default: the preset); --resume needs the same one")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (finished trials are kept)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (ASHA's max_t); default: the preset's")
    p.add_argument("--budget-epochs", type=int, default=None,
                   help="cap on epochs summed over every fold/seed of every trial (stopped ones included); "
                   "the search ends when no further trial fits")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every trial (repeatable)")
    p.add_argument("--search-space", default=None, help="YAML space (default: search_spaces/<dataset|smoke>.yaml)")
    p.add_argument("--search-runs", type=int, default=None,
                   help="train only the first N folds (MEN) / seeds (Derm7pt) per trial (default: all)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--max-failures", type=int, default=2, help="Ray Train worker-group restarts per trial")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="MLflow server")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default cfcml-<cohort name>)")
    p.add_argument("--model-name", default=None, help="registered model (default cfcml-<cohort name>)")
    p.add_argument("--no-register", action="store_true", help="do not log/register the best model")
    p.add_argument("--optuna-storage", default=None, help="SQLAlchemy URL of the Optuna study (default: SQLite)")
    p.add_argument("--git-commit", default=os.environ.get("CFCML_GIT_COMMIT"), help="recorded on the model version")
    p.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, else a local Ray")
    p.add_argument("--no-system-metrics", action="store_true", help="do not sample CPU/memory/GPU into MLflow")
    p.add_argument("--system-metrics-interval", type=float, default=10.0, help="seconds between system samples")
    p.add_argument("--synth-dir", type=Path, default=None, help="default ~/.cache/cfcml/synthetic/<cohort name>")
    p.add_argument("--synth-size", type=int, default=synth_size, help="patients / cases of the synthetic cohort")
    p.add_argument("--work-dir", default=None, help="keep the final evaluation's files here")
    p.add_argument("--json-out", type=Path, default=None, help="write the study summary (JSON) here")
    # tests: SIGKILL the rank-0 Train worker of the first trial once, during EPOCH (MARKER: a file)
    p.add_argument("--inject-fault", default=None, metavar="EPOCH:MARKER[:HOLD_S]", help=argparse.SUPPRESS)
    return p


def _gpus(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of GPUs, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a number >= 0, got {text!r}")
    return value


def _fault(text: str | None) -> dict | None:
    if not text:
        return None
    epoch, marker = text.split(":", 1)  # EPOCH:MARKER[:HOLD_S]
    marker, _, hold = marker.rpartition(":") if marker.rpartition(":")[2].isdigit() else (marker, "", "")
    return {"epoch": int(epoch), "marker": marker, **({"hold_s": int(hold)} if hold else {})}


def main(prog: str, dataset: str | None = None, preset: str | None = None, synth_size: int = 60,
         argv: list[str] | None = None) -> int:  # fmt: skip
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser(prog, dataset, preset, synth_size).parse_args(argv)

    from cfcml.config import ConfigError
    from cfcml.datasets import write_synthetic
    from cfcml.datasets.cohort import CohortError
    from cfcml.datasets.spec import SpecError, builtin_names, load_spec
    from cfcml.platform.tune import StudyError, StudyInterrupted, StudySpec, run_study

    try:
        cohort = args.dataset if args.dataset in builtin_names() else str(Path(args.dataset).expanduser().resolve())
        schema = load_spec(cohort)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = args.data
    if data is None:
        data = args.synth_dir or Path(os.path.expanduser(f"~/.cache/cfcml/synthetic/{schema.name}"))
        if not (data / schema.table_file).exists():
            print(f"no --data: writing a synthetic {schema.name} cohort ({args.synth_size}) to {data}", flush=True)
            write_synthetic(schema, data, args.synth_size, 0)
    spec = StudySpec(
        preset=args.preset, data=str(data), dataset=cohort, name=args.name, overrides=args.overrides,
        search_space=args.search_space,
        num_samples=args.num_samples, max_concurrent=args.max_concurrent, workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, epochs=args.epochs,
        budget_epochs=args.budget_epochs,
        storage=args.storage, resume=args.resume, seed=args.seed, max_failures=args.max_failures,
        search_runs=args.search_runs, tracking_uri=args.tracking_uri, experiment=args.experiment,
        model_name=args.model_name, register=not args.no_register, optuna_storage=args.optuna_storage,
        git_commit=args.git_commit, ray_address=args.ray_address, system_metrics=not args.no_system_metrics,
        system_metrics_interval=args.system_metrics_interval,
        work_dir=args.work_dir, fault=_fault(args.inject_fault),
    )  # fmt: skip
    # `ray job stop` and schedulers send SIGTERM: treat it like Ctrl+C, which Tune turns into a
    # clean stop that keeps the experiment state for --resume.
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal stops the study as cleanly as `ray job stop`
        signal.signal(sig, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        summary = run_study(spec)
    except StudyInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (StudyError, ConfigError, CohortError, SpecError) as e:
        from cfcml.platform.redact import redact

        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2, default=str)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    print(summary.get("test_markdown", ""))
    print(f"best trial {summary['best_trial_id']}: cv_val_auc {summary['best_cv_val_auc']:.4f}, params {summary['best_params']}")
    if "model_uri" in summary:
        print(f"registered {summary['model_name']} version {summary['model_version']}: {summary['model_uri']}")
    return 0
