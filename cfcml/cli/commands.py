"""One function per command: each turns parsed arguments into a library call and an exit status.

Each command imports its implementation when it runs, so `cfcml --help` and argument errors
answer in well under a second without loading torch, Ray or MLflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..platform.redact import one_line
from ..platform.tracking_server import (
    TrackingServerError,
    check_tracking_server,
    cli_mlflow_client,
    resolve_tracking_uri,
)
from .args import config_from_args, dataset_arg, dataset_of
from .errors import EXIT_BAD_INPUT, EXIT_REFUSED


def cmd_summary(args) -> int:
    from ..models.summary import format_summary, summarize

    s = summarize(config_from_args(args))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_synth(args) -> int:
    from ..datasets import write_synthetic

    dataset = dataset_of(args)
    out = write_synthetic(dataset, args.out, args.size, args.seed)
    print(f"wrote a synthetic {Path(dataset).stem if dataset.endswith('.yaml') else dataset} cohort to {out}")
    return 0


def _min_photo_side(args) -> int | None:
    if args.allow_small:
        return 1
    if args.preset:
        from ..config import build_config

        return min(build_config(args.preset).data.image_size)
    return None


def cmd_data_check(args) -> int:
    from ..datasets.reader import check_cohort
    from ..datasets.spec import load_spec

    spec = load_spec(dataset_of(args))
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
    from ..engine.progress import Progress, reporter_for
    from ..engine.run import train_one

    cfg = config_from_args(args)
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
    from ..engine.protocol import ProtocolError, run_protocol

    if args.methods:
        return _cv_methods(args)
    cfg = config_from_args(args)
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
    from ..engine.compare import parse_methods, run_comparison
    from ..engine.protocol import ProtocolError

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

    from ..platform.registry import PromotionError, promote

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
    from ..platform.predict import predict_cohort

    out = predict_cohort(
        args.model,
        args.data,
        out=args.out,
        tracking_uri=args.tracking_uri,
        dataset=dataset_arg(args.dataset) if args.dataset else None,
    )
    print(f"wrote predictions to {out}")
    return 0


def cmd_serve(args) -> int:
    from ..platform.serve import serve
    from ..platform.serve_request import Limits

    limits = Limits(max_bytes=int(args.max_request_mb * 2**20), max_cases=args.max_cases)
    return serve(
        args.model,
        host=args.host,
        port=args.port,
        data_root=args.data_root,
        tracking_uri=args.tracking_uri,
        limits=limits,
    )


def cmd_report(args) -> int:
    from ..report.from_runs import report_from_folder

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
    from ..platform.study.options import run

    return run(args)


def cmd_dev(args) -> int:
    from ..platform.services import run_dev

    return run_dev(args)
