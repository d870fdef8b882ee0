"""`cfcml tune` and the `jobs/tune*.py` scripts: command-line options generated from `StudySpec`.

Every leaf field of :class:`cfcml.platform.study.StudySpec` (its own fields and those of its parts:
search, resources, budget, storage, tracking; each part is a group in ``--help``) becomes one
option (``--<field-name>``;
a boolean that defaults to true becomes ``--no-<field-name>``), typed from the field's type and
defaulting to the field's default. :data:`OPTIONS` only adds what a type cannot say: the help
text (a field's ``metadata={"help": ...}`` wins), a flag whose name differs from the field, a
value parser, or a default read from the environment. A new study option is one new field (and
its help line); ``tests/cli/test_front_door.py`` fails when a field has no option or no help.

Three options belong to the command, not to the study: where a synthetic cohort is written when
``--data`` is not given, its size, and where the summary goes (``--synth-dir``, ``--synth-size``,
``--json-out``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import PARTS, NodeLost, StudyError, StudyInterrupted, StudySpec


@dataclass(frozen=True)
class Option:
    """What the command line adds to a StudySpec field (everything else comes from the field)."""

    help: str = ""
    flag: str | None = None  # default --<field-name> (--no-<field-name> for a bool that defaults to true)
    parse: Callable[[str], Any] | None = None  # one value's parser (default: the field's type)
    metavar: str | None = None
    default: Callable[[Any], Any] | None = None  # the field's default -> the option's (e.g. from the environment)
    required: bool | None = None  # default: required when the field has no default
    unset: str = ""  # what a None default means, for the help (e.g. "the preset's")
    hidden: bool = False


def gpus(text: str) -> float | None:
    """``auto`` (None: 1 GPU per worker when the cluster has GPUs, else 0) or a number >= 0."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of GPUs, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a number >= 0, got {text!r}")
    return value


def fault(text: str) -> dict:
    """EPOCH:MARKER[:HOLD_S] -> {"epoch", "marker"[, "hold_s"]} (tests: kill a Train worker once)."""
    epoch, sep, marker = text.partition(":")
    if not sep or not epoch.isdigit() or not marker:
        raise argparse.ArgumentTypeError(f"expected EPOCH:MARKER[:HOLD_S], got {text!r}")
    head, _, hold = marker.rpartition(":")
    if head and hold.isdigit():
        return {"epoch": int(epoch), "marker": head, "hold_s": int(hold)}
    return {"epoch": int(epoch), "marker": marker}


def _env(name: str) -> Callable[[Any], Any]:
    return lambda default: os.environ.get(name, default)


OPTIONS: dict[str, Option] = {
    "preset": Option("the model preset, e.g. men | men-smoke | derm7pt | derm7pt-smoke"),
    "data": Option("cohort folder; default: write a synthetic cohort first (--synth-dir)", parse=Path, required=False),
    "dataset": Option(
        "the cohort: a built-in one (men, derm7pt) or a schema file", metavar="NAME|PATH.yaml", unset="the preset's"
    ),
    "name": Option("study name (default: the preset); --resume needs the same one"),
    "overrides": Option("config override for every trial (repeatable)", flag="--set", metavar="KEY=VALUE"),
    "search_space": Option("YAML space (default: search_spaces/<dataset|smoke>.yaml)"),
    "num_samples": Option("trials in the study"),
    "max_concurrent": Option("cap on concurrent trials (default: as many as the cluster's CPUs/GPUs fit)"),
    "workers_per_trial": Option("Ray Train workers (DDP ranks) per trial"),
    "cpus_per_worker": Option("CPUs per Ray Train worker"),
    "gpus_per_worker": Option(
        "GPUs per Train worker; auto (default): 1 when the cluster has GPUs, else 0 (CPU, gloo)",
        parse=gpus,
        metavar="auto|N",
    ),
    "epochs": Option("epochs per trial (ASHA's max_t); default: the preset's"),
    "holdout": Option(
        "hold back this stratified fraction of a folds cohort's patients from the whole study; the "
        "registered model is measured on them (default 0: the paper's protocol)",
        metavar="FRACTION",
    ),
    "budget_epochs": Option(
        "cap on epochs summed over every fold/seed of every trial (stopped ones included); "
        "the search ends when no further trial fits"
    ),
    "location": Option(
        "Ray storage: a local path or s3://bucket/path[?endpoint_override=host:port&scheme=http]",
        flag="--storage",
        metavar="PATH|URI",
        default=os.path.expanduser,
    ),
    "resume": Option("continue an interrupted study (finished trials are kept)"),
    "seed": Option("seed of the TPE sampler and of --holdout"),
    "max_failures": Option("Ray Train worker-group restarts per trial"),
    "node_loss_timeout": Option(
        "after a Ray node is lost, seconds to wait for trials the remaining nodes cannot place before "
        "the study stops cleanly (exit 75) for --resume; 0: wait for a new node indefinitely (autoscaler)",
        metavar="SECONDS",
    ),
    "search_runs": Option("train only the first N folds (MEN) / seeds (Derm7pt) per trial (default: all)"),
    "tracking_uri": Option("MLflow server (default: $MLFLOW_TRACKING_URI)", default=_env("MLFLOW_TRACKING_URI")),
    "experiment": Option("MLflow experiment (default cfcml-<cohort name>)"),
    "model_name": Option("registered model (default cfcml-<cohort name>)"),
    "register": Option("do not log/register the best model"),
    "optuna_storage": Option("SQLAlchemy URL of the Optuna study (default: SQLite)"),
    "git_commit": Option(
        "recorded on the model version (default: $CFCML_GIT_COMMIT)", default=_env("CFCML_GIT_COMMIT")
    ),
    "ray_address": Option("default: RAY_ADDRESS, else a local Ray"),
    "system_metrics": Option("do not sample CPU/memory/GPU into MLflow"),
    "system_metrics_interval": Option("seconds between system samples"),
    "quiet": Option("no live progress (trials x epochs, latest objective, time left) on stderr"),
    "work_dir": Option("keep the final evaluation's files here"),
    # tests: SIGKILL the rank-0 Train worker of the first trial once, during EPOCH (MARKER: a file)
    "fault": Option("tests only", flag="--inject-fault", parse=fault, metavar="EPOCH:MARKER[:HOLD_S]", hidden=True),
}

_SCALARS = (int, float, str)


def unwrap_optional(tp: Any) -> Any:
    """X of ``X | None`` (any other type as it is)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def option_for(f: dataclasses.Field) -> Option:
    """The field's Option: the table's entry, its help replaced by the field's ``metadata["help"]``."""
    opt = OPTIONS.get(f.name, Option())
    return dataclasses.replace(opt, help=f.metadata["help"]) if "help" in f.metadata else opt


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(parser, f: dataclasses.Field, tp: Any, given: Mapping[str, Any]) -> None:
    opt = option_for(f)
    default = given[f.name] if f.name in given else field_default(f)
    if opt.default is not None and default is not dataclasses.MISSING:
        default = opt.default(default)
    base = unwrap_optional(tp)
    kw: dict[str, Any] = {"dest": f.name, "help": argparse.SUPPRESS if opt.hidden else opt.help}
    if base is bool:
        on = default is True
        flag = opt.flag or _flag(f"no_{f.name}" if on else f.name)
        parser.add_argument(flag, action="store_false" if on else "store_true", default=bool(default), **kw)
        return
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base) or (str,)
        kw.update(action="append", type=opt.parse or item, default=[])
    else:
        parse = opt.parse or (base if base in _SCALARS else None)
        if parse is None:
            raise TypeError(
                f"StudySpec.{f.name}: no command-line parser for {tp!r}; give one in cfcml.platform.study.options.OPTIONS"
            )
        required = default is dataclasses.MISSING if opt.required is None else opt.required
        kw.update(type=parse, default=None if default is dataclasses.MISSING else default, required=required)
        if default not in (None, dataclasses.MISSING) and "default" not in opt.help and not opt.hidden:
            kw["help"] = f"{opt.help} (default {default})".lstrip()
        elif default is None and opt.unset and not opt.hidden:
            kw["help"] = f"{opt.help} (default: {opt.unset})"
    parser.add_argument(opt.flag or _flag(f.name), metavar=opt.metavar, **kw)


def study_fields() -> list[tuple[str | None, dataclasses.Field, Any]]:
    """Every leaf field of StudySpec in order, as (part name or None, field, type)."""
    out = []
    hints = typing.get_type_hints(StudySpec)
    for f in dataclasses.fields(StudySpec):
        if f.name in PARTS:
            part = PARTS[f.name]
            part_hints = typing.get_type_hints(part)
            out += [(f.name, g, part_hints[g.name]) for g in dataclasses.fields(part)]
        else:
            out.append((None, f, hints[f.name]))
    return out


def add_study_options(
    parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None, synth_size: int = 60
) -> None:
    """One option per StudySpec leaf field, each part of the spec an option group (``defaults``:
    a job's own defaults, e.g. its cohort), then the command's own three."""
    groups = {
        name: parser.add_argument_group(name, (part.__doc__ or "").strip().splitlines()[0])
        for name, part in PARTS.items()
    }
    for part, f, tp in study_fields():
        _add_field(groups[part] if part else parser, f, tp, defaults or {})
    parser.add_argument("--synth-dir", type=Path, default=None, help="default ~/.cache/cfcml/synthetic/<cohort name>")
    parser.add_argument(
        "--synth-size",
        type=int,
        default=synth_size,
        help=f"patients / cases of the synthetic cohort (default {synth_size})",
    )
    parser.add_argument("--json-out", type=Path, default=None, help="write the study summary (JSON) here")


DESCRIPTION = "Ray Tune + Optuna search for CFCML on a cohort, tracked in MLflow."


def build_parser(
    prog: str = "cfcml tune", defaults: Mapping[str, Any] | None = None, synth_size: int = 60
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_study_options(parser, defaults, synth_size)
    return parser


def study_spec(args: argparse.Namespace) -> StudySpec:
    """The StudySpec of parsed options: the cohort resolved (a schema path made absolute, none
    given: the preset's) and, without --data, a synthetic cohort written first."""
    from ...config import build_config
    from ...datasets import write_synthetic
    from ...datasets.spec import builtin_names, load_spec

    dataset = args.dataset or build_config(args.preset).dataset
    cohort = dataset if dataset in builtin_names() else str(Path(dataset).expanduser().resolve())
    schema = load_spec(cohort)
    data = args.data
    if data is None:
        data = args.synth_dir or Path(os.path.expanduser(f"~/.cache/cfcml/synthetic/{schema.name}"))
        if not (data / schema.table_file).exists():
            print(f"no --data: writing a synthetic {schema.name} cohort ({args.synth_size}) to {data}", flush=True)
            write_synthetic(schema, data, args.synth_size, 0)
    values = {f.name: getattr(args, f.name) for _, f, _ in study_fields()}
    return StudySpec.of(**(values | {"dataset": cohort, "data": str(data)}))


def _report(summary: dict, json_out: Path | None) -> None:
    text = json.dumps(summary, indent=2, default=str)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(json_out)
    print(summary.get("test_markdown", ""))
    best = f"cv_val_auc {summary['best_cv_val_auc']:.4f}, params {summary['best_params']}"
    print(f"best trial {summary['best_trial_id']}: {best}")
    if "model_uri" in summary:
        print(f"registered {summary['model_name']} version {summary['model_version']}: {summary['model_uri']}")


@contextlib.contextmanager
def _stop_signals_as_interrupt():
    """`ray job stop` and schedulers send SIGTERM, a closed terminal SIGHUP: treat them like
    Ctrl+C, which Tune turns into a clean stop that keeps the experiment state for --resume."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    """Run the study of parsed options: 0 done, 2 bad input (one line on stderr), 130 interrupted,
    75 stopped after losing a node (EX_TEMPFAIL: resume once the cluster has room again)."""
    from ...config import ConfigError
    from ...datasets.cohort import CohortError
    from ...datasets.spec import SpecError
    from ..redact import redact
    from . import run as study_run  # imports torch, Ray and MLflow: only when a study runs, not for --help

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = study_spec(args)
        with _stop_signals_as_interrupt():
            summary = study_run.run_study(spec)
    except NodeLost as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 75
    except StudyInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (StudyError, ConfigError, CohortError, SpecError) as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    _report(summary, args.json_out)
    return 0


def main(
    argv: list[str] | None = None,
    *,
    prog: str = "cfcml tune",
    defaults: Mapping[str, Any] | None = None,
    synth_size: int = 60,
) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the study; ``defaults`` are a job's own
    (``{"dataset": "men", "preset": "men"}`` for jobs/tune_men.py)."""
    return run(build_parser(prog, defaults, synth_size).parse_args(argv))
