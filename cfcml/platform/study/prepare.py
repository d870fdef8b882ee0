"""Before the search: the study's config, search space, cohort, runs and storage (:func:`prepare`),
then Ray and the trials that fit at once (:func:`start_ray`)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ...config import Config, ConfigError, parse_overrides
from ...datasets.reader import load_cohort
from ...datasets.spec import load_spec
from ...engine.protocol import protocol_runs
from ...engine.splits import hold_out
from ...models.pretrained import check_pretrained
from ..redact import redact
from ..search_space import SearchSpace, load_search_space
from ..tracking_server import TrackingServerError
from ..tracking_server import check_tracking_server as check
from .config import default_search_space, merge, resolve_trial_config, warm_caches
from .spec import StudyError, StudySpec
from .storage import join_uri, normalize_storage, optuna_url, storage_filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyPlan:
    """Everything decided before Ray starts (``concurrent``: once it has)."""

    spec: StudySpec
    cfg: Config  # the preset + overrides + epochs: every trial's base
    overrides: dict  # the study's overrides, nested (the cohort and an absolute cache folder among them)
    space: SearchSpace
    space_file: Path
    first: dict  # the first trial's point (the preset's own values)
    data: str
    cohort_spec: object
    full: object  # the whole cohort
    cohort: object  # what the study sees (without the held-back patients)
    held: list  # the held-back patients
    runs: list[dict]
    name: str
    storage: str
    study_path: str
    train_storage: str
    fs: object
    restoring: bool
    optuna_url: str
    concurrent: int = 0


def check_tracking_server(spec: StudySpec) -> None:
    """A server that does not answer: one line in seconds, before Ray or Optuna start anything."""

    if spec.tracking.tracking_uri and spec.tracking.tracking_uri.split("://", 1)[0].lower() in ("http", "https"):
        try:
            check(spec.tracking.tracking_uri)
        except TrackingServerError as e:
            raise StudyError(str(e)) from None


def study_config(spec: StudySpec) -> tuple[Config, dict]:
    """(the study's config, its overrides as a nested dict); a relative cache folder made
    absolute, as trials run in other working directories."""
    items = list(spec.search.overrides)
    if spec.dataset:
        items.insert(0, f"dataset={json.dumps(spec.dataset)}")
    overrides = parse_overrides(items)
    cfg = resolve_trial_config(spec.preset, overrides, {}, spec.budget.epochs)
    if not Path(cfg.data.cache_dir).is_absolute():
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).resolve())
        overrides = merge(overrides, {"data": {"cache_dir": cfg.data.cache_dir}})
    return cfg, overrides


def _cohort(spec: StudySpec, cfg: Config, data: str):
    """(schema, the whole cohort, what the study sees, the held-back patients)."""

    check_pretrained(cfg)  # refuse in the driver, before any trial starts
    cohort_spec = load_spec(cfg.dataset)
    full = load_cohort(cohort_spec, data)
    try:  # `cohort` is what the study sees; `held`: patients nothing in it ever sees
        cohort, held = hold_out(full, spec.search.holdout, spec.search.seed)
    except ConfigError as e:
        raise StudyError(str(e)) from None
    return cohort_spec, full, cohort, held


def _restoring(spec: StudySpec, study_path: str) -> bool:
    """Whether the study is restored; refuses a study that exists when --resume is not given."""
    from ray import tune

    exists = tune.Tuner.can_restore(study_path)
    if exists and not spec.storage.resume:
        raise StudyError(
            f"a study already exists at {redact(study_path)}: pass --resume to continue it, or another --name"
        )
    if spec.storage.resume and not exists:
        log.warning("nothing to resume at %s: starting the study", redact(study_path))
    return spec.storage.resume and exists


def _refuse_existing_optuna_study(name: str, url: str) -> None:
    import optuna

    try:
        optuna.load_study(study_name=name, storage=url)
        raise StudyError(f"Optuna study {name!r} already exists in {redact(url)}; use --resume or another --name")
    except KeyError:
        pass


def prepare(spec: StudySpec) -> StudyPlan:

    cfg, overrides = study_config(spec)
    space_file = Path(spec.search.search_space) if spec.search.search_space else default_search_space(cfg)
    space = load_search_space(space_file, cfg)
    first = space.first_point(cfg)
    data = str(Path(spec.data).expanduser().resolve())
    cohort_spec, full, cohort, held = _cohort(spec, cfg, data)
    runs = protocol_runs(cfg, cohort)[: spec.search.search_runs or None]
    name = spec.name or cfg.name
    storage = normalize_storage(spec.storage.location)
    study_path = join_uri(storage, name)
    fs, _ = storage_filesystem(study_path)
    restoring = _restoring(spec, study_path)
    url = optuna_url(spec.storage.optuna_storage, storage, name)
    if not restoring:
        _refuse_existing_optuna_study(name, url)
    return StudyPlan(
        spec=spec,
        cfg=cfg,
        overrides=overrides,
        space=space,
        space_file=space_file,
        first=first,
        data=data,
        cohort_spec=cohort_spec,
        full=full,
        cohort=cohort,
        held=held,
        runs=runs,
        name=name,
        storage=storage,
        study_path=study_path,
        train_storage=join_uri(storage, f"{name}_train"),
        fs=fs,
        restoring=restoring,
        optuna_url=url,
    )


def plan_concurrency(resources: dict, spec: StudySpec) -> int:
    """Trials that fit at once: trials x workers x (CPU, GPU) per worker within the cluster."""
    w, gpus = (
        max(1, spec.resources.workers_per_trial),
        spec.resources.gpus_per_worker or 0.0,
    )  # None (auto) is resolved before
    limits = [spec.search.num_samples]
    if spec.resources.cpus_per_worker > 0:
        limits.append(int(resources.get("CPU", 0) // (w * spec.resources.cpus_per_worker)))
    if gpus > 0:
        limits.append(int(resources.get("GPU", 0) // (w * gpus)))
    if spec.resources.max_concurrent:
        limits.append(spec.resources.max_concurrent)
    fit = min(limits)
    if fit < 1:
        raise StudyError(
            f"one trial needs {w} worker(s) x {spec.resources.cpus_per_worker:g} CPU / {gpus:g} GPU, the cluster "
            f"has {resources.get('CPU', 0):g} CPU / {resources.get('GPU', 0):g} GPU: lower --workers-per-trial"
        )
    return fit


def start_ray(plan: StudyPlan) -> StudyPlan:
    """Ray up; GPUs per worker resolved ("auto": what the cluster has); the trials that fit at
    once; the sentence cache filled. -> the plan with the resolved spec and ``concurrent``."""
    import ray

    spec = plan.spec
    if not ray.is_initialized():
        ray.init(address=spec.resources.ray_address, log_to_driver=True)
    resources = ray.cluster_resources()
    if spec.resources.gpus_per_worker is None:  # "auto": use the hardware the cluster has
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        spec = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, gpus_per_worker=gpus))
    concurrent = plan_concurrency(resources, spec)
    log.info(
        "cluster %s: up to %d concurrent trial(s) of %d worker(s)",
        resources,
        concurrent,
        spec.resources.workers_per_trial,
    )
    warm_caches(plan.cfg, plan.full)
    return dataclasses.replace(plan, spec=spec, concurrent=concurrent)
