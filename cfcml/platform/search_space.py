"""Search spaces in YAML (`search_spaces/*.yaml`) -> Optuna distributions for Ray Tune.

A space file::

    metric: cv_val_auc          # what the study maximises (see cfcml.platform.train_loop)
    mode: max
    first_trial: preset         # run the preset's own values (the paper's point) first
    params:                     # dotted Config keys, as for `--set`
      model.n_image_tokens: {type: int, low: 16, high: 64, step: 16}
      loss.alpha: {type: float, low: 0.015, high: 0.24, log: true}
      model.token_mapping: {type: categorical, choices: [conv1d, perceiver]}
      train.lr: {type: float, low: 1.25e-4, high: 2.0e-3, log: true, enabled: false}
    asha: {grace_period: 2, reduction_factor: 3}   # rungs in epochs
    sampler: {n_startup_trials: 4, multivariate: true}   # optional TPESampler options

`enabled: false` keeps an optional parameter in the file without searching it (it then
stays at the preset's value). `first_trial` may also be a mapping of explicit values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError

TYPES = ("int", "float", "categorical")
# TPESampler options a space file may set (`sampler:`); the seed comes from the study (--seed)
SAMPLER_OPTIONS = (
    "n_startup_trials",
    "n_ei_candidates",
    "multivariate",
    "group",
    "constant_liar",
    "consider_endpoints",
    "prior_weight",
)


class SearchSpaceError(ConfigError):
    pass


@dataclass
class Param:
    name: str  # dotted config key
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list | None = None

    def distribution(self):
        import optuna.distributions as d  # Optuna only when a study builds its searcher

        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.type == "float":
            return d.FloatDistribution(float(self.low), float(self.high), step=self.step, log=self.log)
        return d.CategoricalDistribution(list(self.choices))

    def contains(self, value) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.type == "int":
            return float(value).is_integer() and (int(value) - int(self.low)) % int(self.step or 1) == 0
        return True

    def cast(self, value):
        if self.type == "int":
            return int(value)
        if self.type == "float":
            return float(value)
        return value

    def describe(self) -> str:
        if self.type == "categorical":
            return f"{{{', '.join(map(str, self.choices))}}}"
        if self.type == "int" and self.step and not self.log:
            values = range(int(self.low), int(self.high) + 1, int(self.step))
            return f"{{{', '.join(map(str, values))}}}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


@dataclass
class SearchSpace:
    params: list[Param]
    metric: str = "cv_val_auc"
    mode: str = "max"
    first_trial: str | dict = "preset"
    asha: dict = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    source: str = ""  # the YAML text, logged as an artifact
    sampler: dict = field(default_factory=dict)  # TPESampler keyword arguments (SAMPLER_OPTIONS)

    def distributions(self) -> dict:
        """{dotted key: optuna distribution} for `OptunaSearch(space=...)`."""
        return {p.name: p.distribution() for p in self.params}

    def first_point(self, cfg: Config) -> dict:
        """The first trial: the preset's own values (or the file's explicit ones), checked to
        lie inside the space so that Optuna can enqueue it."""
        explicit = self.first_trial if isinstance(self.first_trial, dict) else {}
        point = {}
        for p in self.params:
            value = explicit[p.name] if p.name in explicit else get_dotted(cfg, p.name)
            if not p.contains(value):
                raise SearchSpaceError(
                    f"first trial: {p.name}={value!r} lies outside the search space {p.describe()}; "
                    "widen the space or set first_trial explicitly"
                )
            point[p.name] = p.cast(value)
        return point

    def describe(self) -> dict[str, str]:
        return {p.name: p.describe() for p in self.params}


def get_dotted(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            raise SearchSpaceError(f"search space parameter {key!r} is not a config key")
        node = getattr(node, part)
    return node


def _param(name: str, spec: Any) -> Param | None:
    if not isinstance(spec, dict):
        raise SearchSpaceError(f"{name}: expected a mapping like {{type: float, low: ..., high: ...}}")
    if spec.get("enabled", True) is False:
        return None
    unknown = set(spec) - {"type", "low", "high", "step", "log", "choices", "enabled"}
    if unknown:
        raise SearchSpaceError(f"{name}: unknown field(s) {sorted(unknown)}")
    typ = spec.get("type")
    if typ not in TYPES:
        raise SearchSpaceError(f"{name}: type must be one of {TYPES}, got {typ!r}")
    if typ == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{name}: a categorical parameter needs a non-empty list of choices")
        return Param(name, typ, choices=choices)
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise SearchSpaceError(f"{name}: {typ} parameters need numeric low and high") from None
    step = spec.get("step")
    log = bool(spec.get("log", False))
    if not low < high:
        raise SearchSpaceError(f"{name}: low ({low:g}) must be below high ({high:g})")
    if log and (low <= 0 or step not in (None, 1)):
        raise SearchSpaceError(f"{name}: a log scale needs low > 0 and no step")
    if typ == "int":
        if not (low.is_integer() and high.is_integer()):
            raise SearchSpaceError(f"{name}: int bounds must be integers")
        if step is not None and (int(step) < 1 or (high - low) % int(step)):
            raise SearchSpaceError(f"{name}: step {step} must divide high - low")
    if step is not None:
        step = float(step) if typ == "float" else int(step)
    return Param(name, typ, low=low, high=high, step=step, log=log)


def load_search_space(path: str | Path, cfg: Config | None = None) -> SearchSpace:
    """Read and check a space file; with `cfg`, also check every key exists in the config and
    that the first trial lies inside the space."""
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"search space {path} not found")
    text = path.read_text()
    raw = yaml.safe_load(text) or {}
    unknown = set(raw) - {"metric", "mode", "first_trial", "params", "asha", "sampler"}
    if unknown:
        raise SearchSpaceError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    params = [p for name, spec in (raw.get("params") or {}).items() if (p := _param(name, spec)) is not None]
    if not params:
        raise SearchSpaceError(f"{path}: no enabled parameter under 'params'")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise SearchSpaceError(f"{path}: mode must be max or min")
    asha = {"grace_period": 1, "reduction_factor": 2} | (raw.get("asha") or {})
    if int(asha["grace_period"]) < 1 or float(asha["reduction_factor"]) < 2:
        raise SearchSpaceError(f"{path}: asha needs grace_period >= 1 and reduction_factor >= 2")
    first = raw.get("first_trial", "preset")
    if not (first == "preset" or isinstance(first, dict)):
        raise SearchSpaceError(f"{path}: first_trial must be 'preset' or a mapping of values")
    sampler = raw.get("sampler") or {}
    if not isinstance(sampler, dict) or set(sampler) - set(SAMPLER_OPTIONS):
        raise SearchSpaceError(f"{path}: sampler takes a mapping of TPESampler options {list(SAMPLER_OPTIONS)}")
    space = SearchSpace(
        params=params,
        metric=raw.get("metric", "cv_val_auc"),
        mode=mode,
        first_trial=first,
        asha=asha,
        source=text,
        sampler=sampler,
    )
    if cfg is not None:
        for p in params:
            get_dotted(cfg, p.name)
        space.first_point(cfg)
    return space


def trial_run_name(params: dict, index: int | None = None) -> str:
    """A readable MLflow run name from a trial's parameters, e.g. 't03 ni48 nt16 a0.06 b0.04 g0.24'."""
    short = {
        "model.n_image_tokens": "ni",
        "model.n_tabular_tokens": "nt",
        "loss.alpha": "a",
        "loss.beta": "b",
        "loss.gamma": "g",
        "train.lr": "lr",
        "loss.tau": "tau",
    }
    parts = [] if index is None else [f"t{index:02d}"]
    for key, value in params.items():
        tag = short.get(key, key.rsplit(".", 1)[-1])
        if isinstance(value, float):
            text = f"{value:.3g}" if not math.isnan(value) else "nan"
        else:
            text = str(value)
        parts.append(f"{tag}{text}")
    return " ".join(parts)
