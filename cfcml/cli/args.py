"""Argument types and the arguments several commands share.

What needs the cohort schemas or the config (numpy, torch) is imported when it is called, so
`cfcml --help` and argument errors never load them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..util.errors import ConfigError


def add_preset_args(p: argparse.ArgumentParser) -> None:
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


def add_dataset_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", help="men | derm7pt (or give --dataset)")
    p.add_argument("--dataset", dest="dataset_opt", metavar="NAME|PATH.yaml", help="a built-in cohort or a schema file")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def megabytes(text: str) -> float:
    value = float(text)
    if not 0 < value <= 4096:
        raise argparse.ArgumentTypeError(f"expected a size in MiB in (0, 4096], got {text}")
    return value


def dataset_arg(text: str) -> str:
    """A built-in name stays a name; a schema path becomes absolute (workers run elsewhere)."""
    from ..datasets.spec import builtin_names

    return text if text in builtin_names() else str(Path(text).expanduser().resolve())


def config_from_args(args):
    from ..config import build_config

    overrides = list(args.overrides)
    if getattr(args, "dataset", None):
        overrides.insert(0, f"dataset={json.dumps(dataset_arg(args.dataset))}")
    if getattr(args, "epochs", None) is not None:  # validated with the rest (e.g. against selection)
        overrides.append(f"train.epochs={args.epochs}")
    return build_config(args.preset, overrides)


def dataset_of(args) -> str:
    if args.dataset and args.dataset_opt and args.dataset != args.dataset_opt:
        raise ConfigError(f"two cohorts named: {args.dataset} and --dataset {args.dataset_opt}")
    name = args.dataset_opt or args.dataset
    if not name:
        raise ConfigError("name the cohort: men | derm7pt, or --dataset NAME|PATH.yaml")
    return dataset_arg(name)
