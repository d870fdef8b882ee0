"""The typed experiment config: preset YAML + `--set key=value` overrides, validated once.

Every part of cfcml receives a `Config`; nothing below the CLI/jobs reads argv or env vars.
The config sits above the models and the cohorts it validates against (the method registry,
the cohort schema); those layers take the Config they are given and never import this module.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .datasets.spec import DatasetSpec, SpecError, load_spec
from .models import methods as _methods  # noqa: F401  (importing the package registers the built-in methods)
from .models.encoders import encoder_choices, image_encoder
from .models.registry import foreign_method_args, method_args_type, method_choices, method_config_problems
from .util.errors import ConfigError
from .util.metric_names import metric_names


@dataclass
class DataConfig:
    image_size: list[int] = field(default_factory=lambda: [24, 128, 128])  # (D,H,W) volumes or (H,W) photos
    val_fraction: float = 0.2  # cross-validated cohorts: stratified validation part of each training fold
    color: str = "rgb_imagenet"  # photos: rgb_imagenet | bgr_255 (the authors' code)
    aug_prob: float = 0.3
    augment: str = "default"  # Derm7pt: authors (their albumentations pipeline) | default (milder, both photos)
    device_augment: str = (
        "auto"  # volumes: auto (CUDA; small splits on CPU) | always | never: split on the device, augmented per batch
    )
    num_workers: int = 2
    cache_dir: str = ".cfcml-cache"


@dataclass
class ModelConfig:
    method: str = "cfcml"  # a registered method: cfcml | etmc | ccml | dmd | mvcnet | glomo | mrim | mrim_plus | ...
    image_encoder: str = "nnmamba3d"  # a registered image encoder (cfcml.models.encoders): nnmamba3d | swin_t
    image_channels: int = 16  # nnMamba base width C
    mamba_d_state: int = 16  # nnMamba's SSM state size N
    scan_impl: str = "auto"  # auto (mamba-ssm kernels on CUDA if installed, else chunked) | chunked | logdepth
    image_pretrained: str = (
        "none"  # Swin-T: required (refuse to train without) | none | a checkpoint path | a timm hub name
    )
    swin_variant: str = "tiny"  # tiny (the paper's Swin-T) | micro (smoke presets)
    swin_detach_early_stages: bool = False  # the authors' behaviour: only stage 4 trains Swin
    text_encoder: str = "clip"  # clip (open_clip ViT-B-32 text tower)
    text_pretrained: str = "openai"  # an open_clip tag | TAG:/path/to/file (a bare path is openai) | none
    tabular_embedding: str = "clip"  # a registered tabular embedding: clip | mlp (Fig. 9 ablation)
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
    epoch_steps: str = "dataset"  # majority (the authors' epoch: the majority class once through) | dataset
    select_metric: str = "auc"  # validation metric that picks the best epoch
    select_window: int = 1  # pick on the mean of the last N epochs' metric (small val sets)
    select_min_epoch: int = -1  # first epoch that may be selected (-1 = train.warmup_epochs; 0 allowed explicitly)
    patience: int = 0  # stop after N epochs without a better windowed score (0 = run all train.epochs)
    deterministic: bool = False
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads per run; 0 = torch's default (results depend on it)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # Derm7pt protocol
    modality_dropout: float = 0.0  # training only: remove each series/photo/attribute of a sample with this probability


@dataclass
class ReportConfig:
    temperature: bool = False  # the registered model divides its logits by the temperature fitted on validation


@dataclass
class PredictConfig:
    decision: str = "balanced"  # balanced (argmax: balanced priors) | prior (logits + log training class priors)


@dataclass
class Config:
    name: str = "men"
    dataset: str = "men"  # a built-in cohort (men, derm7pt) or the path of a cohort schema file
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # one section per registered method's args (cfcml.models.registry); only the selected method's may be set
    method_args: Any = field(default_factory=lambda: method_args_type()())
    report: ReportConfig = field(default_factory=ReportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.color": {"rgb_imagenet", "bgr_255"},
    "data.augment": {"authors", "default"},
    "data.device_augment": {"auto", "always", "never"},
    "model.scan_impl": {"auto", "chunked", "logdepth"},
    "model.text_encoder": {"clip"},
    "model.swin_variant": {"tiny", "micro"},
    "model.token_mapping": {"conv1d", "perceiver"},
    "model.sg_stage": {1, 2, 3, 4},
    "train.amp": {"auto", "bf16", "fp32"},
    "train.epoch_steps": {"majority", "dataset"},
    "predict.decision": {"balanced", "prior"},
}


def choices() -> dict[str, set]:
    """Every key with a fixed set of values: the table above, the encoder registry's
    (`model.image_encoder`, `model.tabular_embedding`) and the method registry's."""
    return {**CHOICES, **encoder_choices(), **method_choices()}


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
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            detail = str(e).splitlines()[0]
            raise ConfigError(f"{key.strip()}: {raw!r} is not a plain YAML value ({detail})") from None
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
        if isinstance(value, bool):  # YAML reads on/off/yes/no/true/false as booleans
            raise ConfigError(f"{key}: expected text, got {str(value).lower()} (quote it if you meant the word)")
        return str(value)
    if getattr(typ, "__origin__", None) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typ.__args__
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = get_type_hints(cls)
    if cls is Config:
        hints["method_args"] = method_args_type()  # the registry's sections, as registered now
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
            allowed = choices().get(key)
            if allowed is not None and kwargs[name] not in allowed:
                raise ConfigError(f"{key}: {kwargs[name]!r} is not one of {sorted(allowed, key=str)}")
    return cls(**kwargs)


def build_config(preset: str, overrides: list[str] | dict | None = None) -> Config:
    """The preset's values with overrides applied, type-checked; raises ConfigError."""
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    values = _merge(load_preset(preset), over)
    method, foreign = foreign_method_args(values)
    if foreign:
        raise ConfigError(
            f"{', '.join(foreign)} set while model.method={method}: those values would be ignored "
            "(select that method with --set model.method=..., or drop them)"
        )
    cfg = _build(Config, values, "")
    _validate(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with `to_dict()` (checkpoints, MLflow artifacts)."""
    cfg = _build(Config, values, "")
    _validate(cfg)
    return cfg


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_volume_size(size) -> None:
    _check(min(size) >= 2, "data.image_size", f"volumes need at least 2 voxels per axis, got {size}")


def _check_photo_size(size) -> None:
    _check(
        size[0] == size[1] and size[0] % 32 == 0,
        "data.image_size",
        f"Swin needs square photos with a side divisible by 32, got {size}",
    )


_IMAGE_SIZE_CHECKS = {"volume": _check_volume_size, "photo": _check_photo_size}  # data.image_size, per image kind


# (key, test, what is expected) for every bounded value; relations are checked below.
_RANGES = [
    ("data.val_fraction", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    ("data.aug_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("data.num_workers", lambda v: 0 <= v <= 64, "0..64"),
    ("model.image_channels", lambda v: v >= 1, ">= 1"),
    ("model.mamba_d_state", lambda v: v >= 1, ">= 1"),
    ("model.n_image_tokens", lambda v: 1 <= v <= 4096, "1..4096"),
    ("model.n_tabular_tokens", lambda v: 1 <= v <= 4096, "1..4096"),
    ("model.dim", lambda v: 1 <= v <= 8192, "1..8192"),
    ("model.heads", lambda v: v >= 1, ">= 1"),
    ("model.dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    ("loss.tau", lambda v: 1e-3 <= v <= 10, "a temperature in [0.001, 10] (0 divides by zero)"),
    ("loss.alpha", lambda v: 0 <= v <= 100, ">= 0 (and sensible: <= 100)"),
    ("loss.beta", lambda v: 0 <= v <= 100, ">= 0 (and sensible: <= 100)"),
    ("loss.gamma", lambda v: 0 <= v <= 100, ">= 0 (and sensible: <= 100)"),
    ("train.epochs", lambda v: 1 <= v <= 100_000, ">= 1"),
    ("train.batch_size", lambda v: 2 <= v <= 4096, "2..4096 (and no larger than the training part)"),
    ("train.lr", lambda v: 0 < v <= 10, "a learning rate > 0"),
    ("train.backbone_lr_mult", lambda v: 0 <= v <= 100, ">= 0"),
    ("train.weight_decay", lambda v: 0 <= v <= 10, ">= 0"),
    ("train.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("train.decay_every", lambda v: v >= 1, ">= 1"),
    ("train.decay_factor", lambda v: 0 < v <= 1, "a factor in (0, 1]"),
    ("train.select_window", lambda v: v >= 1, ">= 1 (1 = the epoch's own metric)"),
    ("train.select_min_epoch", lambda v: v >= -1, ">= 0, or -1 for train.warmup_epochs"),
    ("train.patience", lambda v: v >= 0, ">= 0 (0 = no early stop)"),
    ("train.threads", lambda v: 0 <= v <= 1024, "0 (torch's default) or a positive count"),
    ("train.modality_dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
]


def first_candidate_epoch(train: TrainConfig) -> int:
    """The first epoch (0-based) that may be selected: its window is full and the LR warm-up is over."""
    min_epoch = train.warmup_epochs if train.select_min_epoch < 0 else train.select_min_epoch
    return max(min_epoch, train.select_window - 1)


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def cohort_spec(cfg: Config) -> DatasetSpec:
    """The cohort schema `cfg.dataset` names; a bad name or schema is a ConfigError."""
    try:
        return load_spec(cfg.dataset)
    except SpecError as e:
        raise ConfigError(f"dataset: {e}") from None


def _validate(cfg: Config) -> None:
    for key, test, expected in _RANGES:
        value = _get(cfg, key)
        _check(_finite(value) and test(value), key, f"expected {expected}, got {value!r}")
    m, t = cfg.model, cfg.train
    _check(m.dim % m.heads == 0, "model.heads", f"{m.heads} heads do not divide model.dim = {m.dim}")
    _check(
        m.use_images or m.use_tabular, "model.use_images", "model.use_images and model.use_tabular cannot both be false"
    )
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device) is not None,
        "train.device",
        f"{t.device!r} is not one of auto, cpu, cuda, cuda:N, mps",
    )
    _check(
        len(t.seeds) >= 1 and len(set(t.seeds)) == len(t.seeds),
        "train.seeds",
        f"expected distinct seeds, got {t.seeds}",
    )
    _check(
        all(1 <= s <= 8192 for s in cfg.data.image_size),
        "data.image_size",
        f"sizes must lie in 1..8192, got {cfg.data.image_size}",
    )

    _check(
        first_candidate_epoch(t) < t.epochs,
        "train.select_min_epoch",
        f"no epoch can be selected: the first candidate is epoch {first_candidate_epoch(t)} (select_window "
        f"{t.select_window}, select_min_epoch {t.select_min_epoch}, warmup_epochs {t.warmup_epochs}) "
        f"but train.epochs = {t.epochs}",
    )
    spec = cohort_spec(cfg)
    wants = image_encoder(cfg).kind.name
    _check(
        wants == spec.image_kind,
        "model.image_encoder",
        f"the preset {cfg.name}'s encoder {m.image_encoder} reads {wants}s, but the {spec.name} cohort "
        f"({spec.source}) holds {spec.image_kind}s: choose a {spec.image_kind} preset",
    )
    ndim = spec.kind.spatial_dims
    _check(
        len(cfg.data.image_size) == ndim,
        "data.image_size",
        f"the {spec.name} cohort holds {spec.image_kind}s, which need {ndim} sizes "
        f"({spec.kind.size_axes}), got {cfg.data.image_size}",
    )
    _IMAGE_SIZE_CHECKS[spec.image_kind](cfg.data.image_size)
    _check(
        t.batch_size >= spec.num_classes,
        "train.batch_size",
        f"{t.batch_size} cannot hold one case of each of the {spec.num_classes} classes",
    )
    names = [*metric_names(spec.classes), "loss"]
    _check(
        t.select_metric in names,
        "train.select_metric",
        f"{t.select_metric!r} is not a metric of the {spec.name} cohort ({', '.join(names)})",
    )
    problems = method_config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def save_config(cfg: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
