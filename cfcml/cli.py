"""The `cfcml` command. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3


def _add_preset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="men | derm7pt | men-smoke | derm7pt-smoke")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _config(args):
    from .config import build_config

    return build_config(args.preset, args.overrides)


def cmd_summary(args) -> int:
    from .datasets.registry import cohort_shape
    from .models.summary import format_summary, summarize

    cfg = _config(args)
    s = summarize(cfg, cohort_shape(cfg.dataset))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_synth(args) -> int:
    from .datasets.registry import write_synthetic

    out = write_synthetic(args.dataset, args.out, args.size, args.seed)
    print(f"wrote a synthetic {args.dataset} cohort to {out}")
    return 0


def cmd_data_check(args) -> int:
    from .datasets.registry import check_cohort

    cohort, problems = check_cohort(args.dataset, args.root)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"{args.root}: {len(problems)} problem(s); fix them before training", file=sys.stderr)
        return EXIT_BAD_INPUT
    counts = cohort.counts()
    if args.json:
        print(json.dumps({"splits": counts}))
    else:
        print(f"{args.dataset} cohort at {args.root}: {len(cohort.cases)} cases, no problems")
        for split, per_class in counts.items():
            print(f"  {split:8s} " + "  ".join(f"{c} {n}" for c, n in per_class.items()) + f"  (total {sum(per_class.values())})")
    return 0


def cmd_train(args) -> int:
    from .engine.run import train_one

    cfg = _config(args)
    if args.epochs:
        cfg.train.epochs = args.epochs
    result = train_one(cfg, args.data, out_dir=args.out, fold=args.fold, seed=args.seed, resume=args.resume)
    print(json.dumps(result["test"], indent=2))
    return 0


def cmd_cv(args) -> int:
    from .engine.protocol import ProtocolError, run_protocol

    if args.methods:
        return _cv_methods(args)
    cfg = _config(args)
    if args.epochs:
        cfg.train.epochs = args.epochs
    try:
        summary = run_protocol(cfg, args.data, out_dir=args.out, compare=args.compare, jobs=args.jobs,
                               report=lambda message: print(message, file=sys.stderr, flush=True))
    except ProtocolError as e:  # a run failed in a worker; finished runs are kept for the next call
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary["markdown"])
    return 0


def _cv_methods(args) -> int:
    from .engine.compare import parse_methods, run_comparison
    from .engine.protocol import ProtocolError

    if args.compare:
        print("error: --compare and --methods exclude each other (--methods compares against CFCML itself)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        comparison = run_comparison(args.preset, args.overrides, parse_methods(args.methods), args.data, args.out,
                                    epochs=args.epochs, jobs=args.jobs,
                                    report=lambda message: print(message, file=sys.stderr, flush=True))
    except ProtocolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(comparison["markdown"])
    return 0


def cmd_promote(args) -> int:
    from mlflow import MlflowClient

    from .platform.registry import PromotionError, promote

    try:
        r = promote(MlflowClient(args.tracking_uri), args.model, version=args.version, alias=args.alias,
                    metric=args.metric, force=args.force, reason=args.reason)
    except PromotionError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(r.message)
    # 0: promoted (or already champion); 3: refused by the gate, champion unchanged
    return 0 if r.promoted or r.champion == r.candidate_version else EXIT_REFUSED


def cmd_predict(args) -> int:
    from .platform.predict import predict_cohort

    out = predict_cohort(args.model, args.data, out=args.out, tracking_uri=args.tracking_uri)
    print(f"wrote predictions to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfcml", description="Train, tune, track and ship CFCML models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="parameters, GFLOPs and token shapes of a preset's model")
    _add_preset_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("synth", help="write a synthetic cohort in the real on-disk format")
    p.add_argument("dataset", choices=["men", "derm7pt"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--patients", "--cases", dest="size", type=int, default=None, help="cohort size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("data", help="cohort tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate a cohort and print counts per split and class")
    c.add_argument("dataset", choices=["men", "derm7pt"])
    c.add_argument("--root", required=True, type=Path)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("train", help="one training run (a fold or a seed)")
    _add_preset_args(p)
    p.add_argument("--data", required=True, type=Path)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fold", type=int, help="MEN: the test fold (1..K)")
    g.add_argument("--seed", type=int, help="Derm7pt: the run's seed")
    p.add_argument("--epochs", type=int)
    p.add_argument("--out", type=Path, default=Path("runs/train"))
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="the paper's protocol: all folds (MEN) or seeds (Derm7pt)")
    _add_preset_args(p)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--epochs", type=int)
    p.add_argument("--out", type=Path, default=Path("runs/cv"))
    p.add_argument("--compare", type=Path, help="another protocol run: add Wilcoxon p-values")
    p.add_argument("--methods", help="comma-separated model.method values (or 'all'): the protocol once per method into "
                   "OUT/<method>/, then OUT/comparison.md and .json with Wilcoxon p-values against CFCML (always run)")
    p.add_argument("--jobs", type=_positive_int, help="runs trained at once in worker processes (default: all while at most two per "
                   "CPU core, else one per core; one per GPU); CPU threads are split between them")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("promote", help="move the 'champion' alias if the candidate is better")
    p.add_argument("--model", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--version")
    g.add_argument("--alias")
    p.add_argument("--metric", default="val_auc")
    p.add_argument("--force", action="store_true")
    p.add_argument("--reason")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="score a cohort with a registered model")
    p.add_argument("--model", required=True, help="e.g. models:/cfcml-men@champion")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("preds.csv"))
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .datasets.cohort import CohortError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CohortError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
