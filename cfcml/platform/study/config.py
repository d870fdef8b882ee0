"""A trial's config: the preset, the study's `--set` overrides (parsed once) and the trial's
parameters, merged as nested dicts and built by :func:`cfcml.config.build_config`."""

from __future__ import annotations

from pathlib import Path

from ...config import Config, build_config, parse_overrides
from ...models.encoders import uses_text_tower
from ...models.registry import SEARCH_SPACES_DIR, search_space_path
from .spec import StudyError


def nest(dotted: dict) -> dict:
    """``{"loss.alpha": 0.1}`` -> ``{"loss": {"alpha": 0.1}}`` (values kept as they are)."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section (neither is changed)."""
    merged = dict(base)
    for k, v in over.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def resolve_trial_config(preset: str, overrides: list[str] | dict, params: dict, epochs: int | None) -> Config:
    """The preset + the study's overrides (the cohort among them; `--set` strings or their
    nested dict) + the trial's parameters (dotted keys, native values) + the epochs."""
    values = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    values = merge(values, nest(params))
    if epochs:  # validated with the rest (e.g. against selection)
        values = merge(values, {"train": {"epochs": int(epochs)}})
    return build_config(preset, values)


def default_search_space(cfg: Config) -> Path:
    """The search space shipped for the preset: search_spaces/<preset>.yaml (smoke.yaml for the
    *-smoke presets); for a comparison method, search_spaces/<method>.yaml (its own
    hyper-parameters). The space is about the model, so it follows the preset, not the cohort."""
    method_space = search_space_path(cfg.model.method)  # a comparison method's own, from its registration
    path = method_space or SEARCH_SPACES_DIR / f"{'smoke' if cfg.name.endswith('-smoke') else cfg.name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.name for p in SEARCH_SPACES_DIR.glob("*.yaml")))
        raise StudyError(f"no search space ships for preset {cfg.name!r} ({known}): pass --search-space FILE")
    return path


def warm_caches(cfg: Config, cohort) -> None:
    """Fill the on-disk sentence-embedding cache once in the driver, so that no trial builds
    the text encoder (concurrent trials would each build it)."""
    if uses_text_tower(cfg):
        from ...models.text import sentence_cache

        sentence_cache(cfg.data.cache_dir, cfg.model.text_pretrained).embed(
            sorted({s for c in cohort.cases for s in c.sentences})
        )
