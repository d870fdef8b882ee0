"""The `cfcml` command. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3


def _add_preset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", required=True, help="men | derm7pt | men-smoke | derm7pt-smoke | photo-starter | volume-starter"
    )
    p.add_argument(
        "--dataset",
        metavar="NAME|PATH.yaml",
        help="the cohort: a built-in one (men, derm7pt) or a schema file (default: the preset's)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-3 (repeatable)",
    )


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _dataset_arg(text: str) -> str:
    """A built-in name stays a name; a schema path becomes absolute (workers run elsewhere)."""
    from .datasets.spec import builtin_names

    return text if text in builtin_names() else str(Path(text).expanduser().resolve())


def _config(args):
    from .config import build_config

    overrides = list(args.overrides)
    if getattr(args, "dataset", None):
        overrides.insert(0, f"dataset={json.dumps(_dataset_arg(args.dataset))}")
    if getattr(args, "epochs", None) is not None:  # validated with the rest (e.g. against selection)
        overrides.append(f"train.epochs={args.epochs}")
    return build_config(args.preset, overrides)


def cmd_summary(args) -> int:
    from .models.summary import format_summary, summarize

    s = summarize(_config(args))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def _dataset_of(args) -> str:
    from .config import ConfigError

    if args.dataset and args.dataset_opt and args.dataset != args.dataset_opt:
        raise ConfigError(f"two cohorts named: {args.dataset} and --dataset {args.dataset_opt}")
    name = args.dataset_opt or args.dataset
    if not name:
        raise ConfigError("name the cohort: men | derm7pt, or --dataset NAME|PATH.yaml")
    return _dataset_arg(name)


def cmd_synth(args) -> int:
    from .datasets import write_synthetic

    dataset = _dataset_of(args)
    out = write_synthetic(dataset, args.out, args.size, args.seed)
    print(f"wrote a synthetic {Path(dataset).stem if dataset.endswith('.yaml') else dataset} cohort to {out}")
    return 0


def _min_photo_side(args) -> int | None:
    if args.allow_small:
        return 1
    if args.preset:
        from .config import build_config

        return min(build_config(args.preset).data.image_size)
    return None


def cmd_data_check(args) -> int:
    from .datasets.reader import check_cohort
    from .datasets.spec import load_spec

    spec = load_spec(_dataset_of(args))
    cohort, problems = check_cohort(spec, args.root, deep=True, min_photo_side=_min_photo_side(args))
    notes = cohort.notes if cohort is not None else []
    for note in notes if args.json or problems else []:
        print(f"info: {note}", file=sys.stderr)  # JSON on stdout keeps exactly its contract
    if problems:
        if args.json:
            print(json.dumps({"problems": [str(p) for p in problems]}))
        else:
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            print(f"{args.root}: {len(problems)} problem(s); fix them before training", file=sys.stderr)
        return EXIT_BAD_INPUT
    counts = cohort.counts()
    if args.json:
        print(json.dumps({"splits": counts}))
    else:
        for note in notes:
            print(f"info: {note}")
        print(f"{spec.name} cohort at {args.root}: {len(cohort.cases)} cases, no problems")
        for split, per_class in counts.items():
            print(
                f"  {split:8s} "
                + "  ".join(f"{c} {n}" for c, n in per_class.items())
                + f"  (total {sum(per_class.values())})"
            )
    return 0


def cmd_train(args) -> int:
    from .engine.progress import Progress, reporter_for
    from .engine.run import train_one

    cfg = _config(args)
    name = f"fold{args.fold}" if args.fold is not None else f"seed{args.seed}"
    live = None if args.quiet else Progress([name], cfg.train.epochs, cfg.train.select_metric)
    result = train_one(
        cfg,
        args.data,
        out_dir=args.out,
        fold=args.fold,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        reporter=reporter_for(live, name, cfg.train.select_metric),
        progress=False,
    )
    if live is not None:
        live.close()
    print(json.dumps(result["test"], indent=2))
    return 0


def cmd_cv(args) -> int:
    from .engine.protocol import ProtocolError, run_protocol

    if args.methods:
        return _cv_methods(args)
    cfg = _config(args)
    try:
        summary = run_protocol(
            cfg,
            args.data,
            out_dir=args.out,
            compare=args.compare,
            jobs=args.jobs,
            report=_stderr_or_quiet(args),
            overwrite=args.overwrite,
            baselines=args.baselines,
            progress=not args.quiet,
        )
    except ProtocolError as e:  # a run failed in a worker; finished runs are kept for the next call
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary["markdown"])
    return 0


def _stderr_or_quiet(args):
    if args.quiet:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _cv_methods(args) -> int:
    from .engine.compare import parse_methods, run_comparison
    from .engine.protocol import ProtocolError

    if args.compare:
        print(
            "error: --compare and --methods exclude each other (--methods compares against CFCML itself)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        comparison = run_comparison(
            args.preset,
            args.overrides,
            parse_methods(args.methods),
            args.data,
            args.out,
            epochs=args.epochs,
            jobs=args.jobs,
            baselines=args.baselines,
            report=_stderr_or_quiet(args),
            progress=not args.quiet,
        )
    except ProtocolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(comparison["markdown"])
    return 0


def cmd_promote(args) -> int:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .platform.redact import one_line
    from .platform.registry import PromotionError, promote
    from .platform.tracking_server import (
        TrackingServerError,
        check_tracking_server,
        cli_mlflow_client,
        resolve_tracking_uri,
    )

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
        check_tracking_server(uri)
    except TrackingServerError as e:
        raise PromotionError(str(e)) from None
    try:
        with cli_mlflow_client():
            r = promote(
                MlflowClient(uri),
                args.model,
                version=args.version,
                alias=args.alias,
                metric=args.metric,
                force=args.force,
                reason=args.reason,
                greater_is_better=args.greater_is_better,
            )
    except MlflowException as e:
        raise PromotionError(f"the tracking server failed the request: {one_line(e.message, limit=300)}") from None
    print(r.message)
    # 0: promoted (or already champion); 3: refused by the gate, champion unchanged
    return 0 if r.promoted or r.champion == r.candidate_version else EXIT_REFUSED


def cmd_predict(args) -> int:
    from .platform.predict import predict_cohort

    out = predict_cohort(
        args.model,
        args.data,
        out=args.out,
        tracking_uri=args.tracking_uri,
        dataset=_dataset_arg(args.dataset) if args.dataset else None,
    )
    print(f"wrote predictions to {out}")
    return 0


def cmd_serve(args) -> int:
    from .platform.serve import serve
    from .platform.serve_request import Limits

    limits = Limits(max_bytes=int(args.max_request_mb * 2**20), max_cases=args.max_cases)
    return serve(
        args.model,
        host=args.host,
        port=args.port,
        data_root=args.data_root,
        tracking_uri=args.tracking_uri,
        limits=limits,
    )


def _megabytes(text: str) -> float:
    value = float(text)
    if not 0 < value <= 4096:
        raise argparse.ArgumentTypeError(f"expected a size in MiB in (0, 4096], got {text}")
    return value


def cmd_report(args) -> int:
    from .report.from_runs import report_from_folder

    meta = {"synthetic": True} if args.synthetic else None
    report = report_from_folder(
        args.run_dir,
        args.out,
        data=args.data,
        device=args.device,
        missing=not args.no_missing,
        explain=(args.explain, args.explain),
        meta=meta,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
    )
    ci = report.get("auc_ci") or [None, None]
    auc = "n/a" if report.get("auc") is None else f"{report['auc']:.3f}"
    span = "n/a" if None in ci else f"{ci[0]:.3f}-{ci[1]:.3f}"
    print(f"wrote {args.out / 'report.html'} and {args.out / 'report.json'} (test AUC {auc}, 95 % CI {span})")
    return 0


def cmd_tune(args) -> int:
    from .platform.study.options import run

    return run(args)


def cmd_dev(args) -> int:
    from .platform.services import run_dev

    return run_dev(args)


def _epochs(text: str) -> int:
    return _positive_int(text)


def _add_dataset_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", help="men | derm7pt (or give --dataset)")
    p.add_argument("--dataset", dest="dataset_opt", metavar="NAME|PATH.yaml", help="a built-in cohort or a schema file")


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

    p = sub.add_parser("summary", help="parameters, GFLOPs and token shapes of a preset's model")
    _add_preset_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("synth", help="write a synthetic cohort in the real on-disk format")
    _add_dataset_choice(p)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--patients", "--cases", dest="size", type=_positive_int, default=None, help="cohort size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("data", help="cohort tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate a cohort and print counts per split and class")
    _add_dataset_choice(c)
    c.add_argument("--root", required=True, type=Path)
    c.add_argument("--json", action="store_true")
    c.add_argument("--preset", help="also check photos against this preset's input size")
    c.add_argument("--allow-small", action="store_true", help="accept photos smaller than the model input")
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("train", help="one training run (a fold or a seed)")
    _add_preset_args(p)
    p.add_argument("--data", required=True, type=Path)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fold", type=_positive_int, help="cross-validated cohorts: the test fold (1..K)")
    g.add_argument("--seed", type=int, help="cohorts with a fixed split: the run's seed")
    p.add_argument("--epochs", type=_epochs)
    p.add_argument("--out", type=Path, default=Path("runs/train"))
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.add_argument(
        "--quiet", action="store_true", help="no live progress (runs x epochs, latest validation metric, time left)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="the paper's protocol: all folds, or all seeds of a fixed split")
    _add_preset_args(p)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--epochs", type=_epochs)
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
        type=_positive_int,
        help="runs trained at once in worker processes (default: all while at most two per "
        "CPU core, else one per core; one per GPU); CPU threads are split between them",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no live progress (runs x epochs, latest validation metric, time left)"
    )
    p.set_defaults(func=cmd_cv)

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
    p.set_defaults(func=cmd_promote)

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
    p.set_defaults(func=cmd_predict)

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
    p.add_argument("--max-request-mb", type=_megabytes, default=64.0, help="largest request body in MiB (default 64)")
    p.add_argument("--max-cases", type=_positive_int, default=64, help="most cases in one request (default 64)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="the clinical report of a finished run or cv folder (report.html + report.json)")
    p.add_argument("run_dir", type=Path, metavar="RUN_OR_CV_DIR")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", type=Path, help="the cohort's folder (default: the one recorded in the cv's summary.json)")
    p.add_argument("--device", default="cpu", help="where the model runs for missing inputs and Grad-CAM (cpu, cuda)")
    p.add_argument("--n-bootstrap", type=_positive_int, default=2000, help="bootstrap resamples of the test patients")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and t-SNE seed")
    p.add_argument(
        "--explain",
        type=_count,
        default=2,
        metavar="N",
        help="Grad-CAM for the N most confident correct and N most confident wrong test cases (0: none)",
    )
    p.add_argument("--no-missing", action="store_true", help="skip the missing-input evaluation")
    p.add_argument("--synthetic", action="store_true", help="state in the report that the cohort is synthetic")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tune", help="a hyper-parameter study (Ray Tune + Optuna + ASHA, tracked in MLflow)")
    if tune_options:
        from .platform.study import options as study_options

        p.description = study_options.DESCRIPTION
        study_options.add_study_options(p)
    p.set_defaults(func=cmd_tune)

    from .platform import services

    p = sub.add_parser("dev", help="start, stop or list the local Ray head, MLflow server and S3")
    p.description = services.DESCRIPTION
    services.add_dev_arguments(p)
    p.set_defaults(func=cmd_dev)
    return parser


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (exit 2), not that cfcml is broken."""
    from .config import ConfigError
    from .datasets.cohort import CohortError
    from .datasets.spec import SpecError
    from .datasets.volume_cache import BlankSeriesError
    from .engine.checkpoint import CheckpointError
    from .engine.errors import RunMismatch, TrainingFailed
    from .models.text import TextEncoderUnavailable
    from .platform.predict import PredictError
    from .platform.registry import PromotionError
    from .platform.tracking_server import TrackingServerError

    # FileNotFoundError & co.: a path the user gave (data, run folder, checkpoint) is not there
    return (
        ConfigError,
        CohortError,
        SpecError,
        RunMismatch,
        TrainingFailed,
        TextEncoderUnavailable,
        BlankSeriesError,
        CheckpointError,
        PromotionError,
        PredictError,
        TrackingServerError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        UnicodeDecodeError,
    )


def _error_line(e: BaseException) -> str:
    from .platform.redact import one_line

    text = one_line(e, limit=1000)
    if isinstance(e, OSError) and e.filename and e.strerror:  # "[Errno 2] No such file..." → the path first
        text = one_line(f"{e.filename}: {e.strerror}", limit=1000)
    return text or type(e).__name__


def _quiet_showwarning(show):
    """``warnings.showwarning`` without MLflow's advice to a model's author about type hints
    (MLflow puts its own "once" filter in front of any of ours, so it is dropped where shown)."""

    def showwarning(message, *rest, **kwargs):
        if "Add type hints to the `predict` method" not in str(message):
            show(message, *rest, **kwargs)

    return showwarning


def main(argv: list[str] | None = None) -> int:
    """Run the command; every error becomes one line on stderr and exit status 2 (bad input)
    or 1 (internal error), with the traceback only under ``--debug`` (accepted anywhere)."""
    import traceback
    import warnings

    from .datasets.cohort import CohortError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser(tune_options=argv[:1] == ["tune"]).parse_args(argv)
    show = warnings.showwarning
    if not debug:
        warnings.showwarning = _quiet_showwarning(show)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI boundary: every error becomes one line
        if debug:
            traceback.print_exc()
        code = getattr(e, "exit_code", None)  # an error class may say what it is
        if code is None:
            code = EXIT_BAD_INPUT if isinstance(e, _bad_input_errors()) else EXIT_INTERNAL
        if code == EXIT_INTERNAL:
            hint = "" if debug else " (cfcml --debug ... shows the traceback)"
            print(f"error: internal error: {type(e).__name__}: {_error_line(e)}{hint}", file=sys.stderr)
        elif isinstance(e, CohortError):  # every problem on its own line: fix them all at once
            from .platform.redact import redact

            print(f"error: {redact(str(e))}", file=sys.stderr)
        else:
            print(f"error: {_error_line(e)}", file=sys.stderr)
        return int(code)
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
