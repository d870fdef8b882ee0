"""The typed experiment config: preset YAML + `--set key=value` overrides, validated once.

Every part of cfcml receives a `Config`; nothing below the CLI/jobs reads argv or env vars.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .models.methods.args import CHOICES as METHOD_CHOICES
from .models.methods.args import MethodArgs, foreign_method_args, method_config_problems


@dataclass
class DataConfig:
    image_size: list[int] = field(default_factory=lambda: [24, 128, 128])  # (D,H,W) or (H,W)
    num_folds: int = 3  # MEN: K-fold stratified CV
    val_fraction: float = 0.2  # MEN: stratified validation part carved from each training fold
    color: str = "rgb_imagenet"  # Derm7pt: rgb_imagenet | bgr_255 (the authors' code)
    aug_prob: float = 0.3
    num_workers: int = 2
    cache_dir: str = ".cfcml-cache"


@dataclass
class ModelConfig:
    method: str = "cfcml"  # cfcml | etmc | ccml | dmd | mvcnet | glomo | mrim | mrim_plus (cfcml.models.methods)
    image_encoder: str = "nnmamba3d"  # nnmamba3d | swin_t
    image_channels: int = 16  # nnMamba base width C
    mamba_d_state: int = 16  # nnMamba's SSM state size N
    image_pretrained: str = "none"  # Swin-T: none | a hub tag | a local checkpoint path
    swin_variant: str = "tiny"  # tiny (the paper's Swin-T) | micro (smoke presets)
    swin_detach_early_stages: bool = False  # the authors' behaviour: only stage 4 trains Swin
    text_encoder: str = "clip"  # clip (open_clip ViT-B-32 text tower)
    text_pretrained: str = "openai"  # openai | none | a local checkpoint path
    tabular_embedding: str = "clip"  # clip | mlp (Fig. 9 ablation)
    token_mapping: str = "conv1d"  # conv1d | perceiver (Fig. 10 ablation)
    n_image_tokens: int = 48
    n_tabular_tokens: int = 16
    dim: int = 128  # C_t
    heads: int = 4
    mg_cie: bool = True  # False: SG-CIE at `sg_stage` only
    sg_stage: int = 4
    use_images: bool = True
    use_tabular: bool = True
    dropout: float = 0.5


@dataclass
class LossConfig:
    ccrm: bool = True
    tau: float = 0.07
    alpha: float = 0.06  # L_sam
    beta: float = 0.04  # L_up
    gamma: float = 0.24  # L_cp


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 36
    lr: float = 5e-4
    backbone_lr_mult: float = 0.1  # pretrained 2D backbone (Swin) learns 10x slower
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    decay_every: int = 5
    decay_factor: float = 0.8
    seed: int = 0
    select_metric: str = "auc"  # validation metric that picks the best epoch
    select_window: int = 1  # pick on the mean of the last N epochs' metric (small val sets)
    deterministic: bool = False
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads per run; 0 = torch's default (results depend on it)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # Derm7pt protocol


@dataclass
class Config:
    name: str = "men"
    dataset: str = "men"  # men | derm7pt
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_args: MethodArgs = field(default_factory=MethodArgs)  # only the selected method's section may be set

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


CHOICES = {
    "dataset": {"men", "derm7pt"},
    "data.color": {"rgb_imagenet", "bgr_255"},
    "model.image_encoder": {"nnmamba3d", "swin_t"},
    "model.text_encoder": {"clip"},
    "model.swin_variant": {"tiny", "micro"},
    "model.tabular_embedding": {"clip", "mlp"},
    "model.token_mapping": {"conv1d", "perceiver"},
    "model.sg_stage": {1, 2, 3, 4},
    "train.amp": {"auto", "bf16", "fp32"},
    "train.select_metric": {"auc", "acc", "macro_f1", "weighted_f1", "balanced_acc", "auprc", "g_mean", "loss"},
    **METHOD_CHOICES,
}


def preset_names() -> list[str]:
    files = resources.files("cfcml.presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    path = resources.files("cfcml.presets") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text()) or {}


def parse_overrides(items: list[str] | None) -> dict:
    """['train.lr=1e-3', 'model.mg_cie=false'] -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads "5e-4" as a string
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        return str(value)
    if getattr(typ, "__origin__", None) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typ.__args__
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {sorted(prefix + k for k in unknown)} in {where}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        typ, key = hints[name], prefix + name
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping")
            kwargs[name] = _build(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(value, typ, key)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"{key}: {kwargs[name]!r} is not one of {sorted(CHOICES[key], key=str)}")
    return cls(**kwargs)


def build_config(preset: str, overrides: list[str] | dict | None = None) -> Config:
    """The preset's values with overrides applied, type-checked; raises ConfigError."""
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    values = _merge(load_preset(preset), over)
    method, foreign = foreign_method_args(values)
    if foreign:
        raise ConfigError(f"{', '.join(foreign)} set while model.method={method}: those values would be ignored "
                          "(select that method with --set model.method=..., or drop them)")
    cfg = _build(Config, values, "")
    _validate(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with `to_dict()` (checkpoints, MLflow artifacts)."""
    cfg = _build(Config, values, "")
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    ndim = 3 if cfg.dataset == "men" else 2
    if len(cfg.data.image_size) != ndim:
        raise ConfigError(f"data.image_size: {cfg.dataset} needs {ndim} sizes, got {cfg.data.image_size}")
    if not (cfg.model.use_images or cfg.model.use_tabular):
        raise ConfigError("model.use_images and model.use_tabular cannot both be false")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be at least 2")
    if cfg.model.mamba_d_state < 1:
        raise ConfigError("model.mamba_d_state must be at least 1")
    if cfg.train.select_window < 1:
        raise ConfigError("train.select_window must be at least 1 (1 = the epoch's own metric)")
    if cfg.train.threads < 0:
        raise ConfigError("train.threads must be 0 (torch's default) or a positive count")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction must lie in (0, 1)")
    problems = method_config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
