"""The `cfcml` argument parser: one function per command adds its sub-parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..platform import services  # `dev`'s options live with the services they start (no torch, Ray, MLflow)
from . import commands
from .args import add_dataset_choice, add_preset_args, count, megabytes, positive_int


def build_parser(tune_options: bool = True) -> argparse.ArgumentParser:
    """The `cfcml` parser; ``tune_options=False`` leaves out the options of `tune` (generating
    them imports the study machinery, which other commands do not need)."""
    parser = argparse.ArgumentParser(
        prog="cfcml",
        description="Train, tune, track and ship CFCML models.",
        epilog="Exit status: 0 done, 2 bad input (one line on stderr), 1 internal error, "
        "3 promotion refused by the gate.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (any position)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_summary(sub)
    _add_synth(sub)
    _add_data(sub)
    _add_train(sub)
    _add_cv(sub)
    _add_promote(sub)
    _add_predict(sub)
    _add_serve(sub)
    _add_report(sub)
    _add_tune(sub, tune_options)
    _add_dev(sub)
    return parser


def _add_summary(sub) -> None:
    p = sub.add_parser("summary", help="parameters, GFLOPs and token shapes of a preset's model")
    add_preset_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.cmd_summary)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic cohort in the real on-disk format")
    add_dataset_choice(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--patients", "--cases", dest="size", type=positive_int, default=None, help="cohort size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.cmd_synth)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="cohort tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate a cohort and print counts per split and class")
    add_dataset_choice(c)
    c.add_argument("--root", required=True, type=Path)
    c.add_argument("--json", action="store_true")
    c.add_argument("--preset", help="also check photos against this preset's input size")
    c.add_argument("--allow-small", action="store_true", help="accept photos smaller than the model input")
    c.set_defaults(func=commands.cmd_data_check)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="one training run (a fold or a seed)")
    add_preset_args(p)
    p.add_argument("--data", required=True, type=Path)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fold", type=positive_int, help="cross-validated cohorts: the test fold (1..K)")
    g.add_argument("--seed", type=int, help="cohorts with a fixed split: the run's seed")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--out", type=Path, default=Path("runs/train"))
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.add_argument(
        "--quiet", action="store_true", help="no live progress (runs x epochs, latest validation metric, time left)"
    )
    p.set_defaults(func=commands.cmd_train)


def _add_cv(sub) -> None:
    p = sub.add_parser("cv", help="the paper's protocol: all folds, or all seeds of a fixed split")
    add_preset_args(p)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--out", type=Path, default=Path("runs/cv"))
    p.add_argument("--overwrite", action="store_true", help="replace different runs already in --out")
    p.add_argument("--compare", type=Path, help="another protocol run: add Wilcoxon p-values")
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also fit classical models on the attributes alone "
        "(logistic regression, gradient boosting) on the same splits: rows of summary.md, paired tests",
    )
    p.add_argument(
        "--methods",
        help="comma-separated model.method values (or 'all'): the protocol once per method into "
        "OUT/<method>/, then OUT/comparison.md and .json with Wilcoxon p-values against CFCML (always run)",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        help="runs trained at once in worker processes (default: all while at most two per "
        "CPU core, else one per core; one per GPU); CPU threads are split between them",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no live progress (runs x epochs, latest validation metric, time left)"
    )
    p.set_defaults(func=commands.cmd_cv)


def _add_promote(sub) -> None:
    p = sub.add_parser("promote", help="move the 'champion' alias if the candidate's own measured metric is better")
    p.add_argument("--model", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--version")
    g.add_argument("--alias")
    p.add_argument(
        "--metric",
        default="auc",
        help="the versions' own metric on untouched patients, from their "
        "evaluation.json (default auc); never the search's val_*/cv_* maximum",
    )
    d = p.add_mutually_exclusive_group()
    d.add_argument(
        "--greater-is-better",
        dest="greater_is_better",
        action="store_const",
        const=True,
        default=None,
        help="needed for a metric the gate does not know (it knows auc, acc, loss, ...)",
    )
    d.add_argument("--lower-is-better", dest="greater_is_better", action="store_const", const=False)
    p.add_argument("--force", action="store_true", help="skip the comparison (needs --reason)")
    p.add_argument("--reason")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI (required: no local fallback)")
    p.set_defaults(func=commands.cmd_promote)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="score a cohort with a registered model")
    p.add_argument("--model", required=True, help="e.g. models:/cfcml-men@champion")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument(
        "--dataset", metavar="NAME|PATH.yaml", help="read --data with this schema (default: the model's own)"
    )
    p.add_argument("--out", type=Path, default=Path("preds.csv"))
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI; required for models:/ and runs:/ URIs (no local fallback)",
    )
    p.set_defaults(func=commands.cmd_predict)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a registered model over HTTP (POST /invocations, GET /ping)")
    p.add_argument("--model", required=True, help="e.g. models:/cfcml-men@champion")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--data-root", type=Path, help="images may be given as paths under this folder (default: inline only)"
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI; required for models:/ and runs:/ URIs (no local fallback)",
    )
    p.add_argument("--max-request-mb", type=megabytes, default=64.0, help="largest request body in MiB (default 64)")
    p.add_argument("--max-cases", type=positive_int, default=64, help="most cases in one request (default 64)")
    p.set_defaults(func=commands.cmd_serve)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="the clinical report of a finished run or cv folder (report.html + report.json)")
    p.add_argument("run_dir", type=Path, metavar="RUN_OR_CV_DIR")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", type=Path, help="the cohort's folder (default: the one recorded in the cv's summary.json)")
    p.add_argument("--device", default="cpu", help="where the model runs for missing inputs and Grad-CAM (cpu, cuda)")
    p.add_argument("--n-bootstrap", type=positive_int, default=2000, help="bootstrap resamples of the test patients")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and t-SNE seed")
    p.add_argument(
        "--explain",
        type=count,
        default=2,
        metavar="N",
        help="Grad-CAM for the N most confident correct and N most confident wrong test cases (0: none)",
    )
    p.add_argument("--no-missing", action="store_true", help="skip the missing-input evaluation")
    p.add_argument("--synthetic", action="store_true", help="state in the report that the cohort is synthetic")
    p.set_defaults(func=commands.cmd_report)


def _add_tune(sub, tune_options: bool) -> None:
    p = sub.add_parser("tune", help="a hyper-parameter study (Ray Tune + Optuna + ASHA, tracked in MLflow)")
    if tune_options:
        from ..platform.study import options as study_options  # imports the study machinery: only for `tune`

        p.description = study_options.DESCRIPTION
        study_options.add_study_options(p)
    p.set_defaults(func=commands.cmd_tune)


def _add_dev(sub) -> None:
    p = sub.add_parser("dev", help="start, stop or list the local Ray head, MLflow server and S3")
    p.description = services.DESCRIPTION
    services.add_dev_arguments(p)
    p.set_defaults(func=commands.cmd_dev)
