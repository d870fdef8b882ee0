"""The image encoders and tabular embeddings a model can use, as registered objects.

`model.image_encoder` and `model.tabular_embedding` name an entry here; code asks the entry
(``image_encoder(cfg).kind``, ``tabular_embedding(cfg).uses_text_tower``) instead of comparing
the name. Adding an encoder or an embedding is one `register_*` call: the config's allowed
values, the cohort-kind check, model construction, `cfcml summary` and the input pipelines
all read the registry.

Every image encoder is a feature extractor with the same interface (timm-style): a module with
`stage_channels` (four ints) whose forward returns four stage maps [B, C_s, *grid_s], grid_s
being the input grid divided by `strides[s]` (rounded up).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..datasets.image_kinds import PHOTO, VOLUME, ImageKind
from ..util.errors import ConfigError
from .nnmamba import NNMambaEncoder3D
from .text import CLIP_TEXT_DIM, MLPTabularEmbedding, TabularTextProjection

if TYPE_CHECKING:  # models read the Config they are given; only the engine and above import the config module
    from ..config import Config


def _no_head(cfg: Config) -> int:
    return 0


@dataclass(frozen=True)
class ImageEncoder:
    name: str  # as written in presets and `model.image_encoder`
    kind: ImageKind  # the image kind it reads (checked against the cohort's)
    strides: tuple[int, int, int, int]  # of the four stage maps, relative to the input grid
    build: Callable[[Config], nn.Module]  # cfg -> a fresh encoder (pretrained weights loaded as cfg says)
    # A pretrained-capable 2D backbone: trained at train.backbone_lr_mult x LR, its weights checked by
    # `check_pretrained` and recorded by `pretrained_provenance`.
    pretrained_backbone: bool = False
    # Parameters the paper counts but the features-only encoder lacks (Swin's ImageNet head), for `cfcml summary`.
    head_params: Callable[[Config], int] = _no_head

    def grids(self, image_size: list[int]) -> list[tuple[int, ...]]:
        """The spatial grid of each stage map for an input grid (stride-2 steps round up)."""
        return [tuple(math.ceil(s / stride) for s in image_size) for stride in self.strides]


@dataclass(frozen=True)
class TabularEmbedding:
    name: str  # as written in presets and `model.tabular_embedding`
    # True: reads the frozen CLIP text tower's sentence embeddings [B, t, 512] of the attribute
    # sentences; False: reads the encoded attribute features [B, F] (`cfcml.datasets.tabular`).
    uses_text_tower: bool
    build: Callable[[int | None, int, int], nn.Module]  # (num_features F, num_attributes t, dim) -> [B, t, dim]
    example: Callable[[int, int, int], torch.Tensor]  # (batch, num_attributes, num_features) -> a random input

    @property
    def reads_features(self) -> bool:
        """Reads encoded attribute features [B, F] (scaled with the training part's statistics)."""
        return not self.uses_text_tower


def _build_nnmamba3d(cfg: Config) -> nn.Module:
    m = cfg.model
    return NNMambaEncoder3D(VOLUME.channels, m.image_channels, d_state=m.mamba_d_state, scan_impl=m.scan_impl)


def _build_swin_t(cfg: Config) -> nn.Module:
    from .swin import SwinEncoder2D  # imports timm (heavy): only for photo cohorts

    m = cfg.model
    if cfg.data.image_size[0] != cfg.data.image_size[1]:
        raise ValueError(f"Swin needs square images, got data.image_size={cfg.data.image_size}")
    return SwinEncoder2D(cfg.data.image_size[0], m.swin_variant, m.image_pretrained, m.swin_detach_early_stages)


def _swin_imagenet_head(cfg: Config) -> int:
    """Swin-T's ImageNet head (docs/baselines.md §1.3): features x 1000 + 1000, 0.77 M for Swin-T."""
    from .swin import SWIN_VARIANTS  # timm is heavy: imported only where a photo cohort's Swin is used

    features = SWIN_VARIANTS[cfg.model.swin_variant]["embed_dim"] * 8
    return features * 1000 + 1000


def _build_clip(num_features: int | None, num_attributes: int, dim: int) -> nn.Module:
    return TabularTextProjection(CLIP_TEXT_DIM, dim)


def _build_mlp(num_features: int | None, num_attributes: int, dim: int) -> nn.Module:
    if not num_features:
        raise ValueError("model.tabular_embedding=mlp needs the number of encoded tabular features")
    return MLPTabularEmbedding(num_features, num_attributes, dim)


IMAGE_ENCODERS: dict[str, ImageEncoder] = {}
TABULAR_EMBEDDINGS: dict[str, TabularEmbedding] = {}


def register_image_encoder(entry: ImageEncoder) -> ImageEncoder:
    if entry.name in IMAGE_ENCODERS:
        raise ValueError(f"image encoder {entry.name!r} is already registered")
    if len(entry.strides) != 4:
        raise ValueError(f"image encoder {entry.name!r}: expected 4 stage strides, got {entry.strides}")
    IMAGE_ENCODERS[entry.name] = entry
    return entry


def register_tabular_embedding(entry: TabularEmbedding) -> TabularEmbedding:
    if entry.name in TABULAR_EMBEDDINGS:
        raise ValueError(f"tabular embedding {entry.name!r} is already registered")
    TABULAR_EMBEDDINGS[entry.name] = entry
    return entry


register_image_encoder(ImageEncoder("nnmamba3d", VOLUME, (2, 4, 8, 16), _build_nnmamba3d))
register_image_encoder(
    ImageEncoder(
        "swin_t", PHOTO, (4, 8, 16, 32), _build_swin_t, pretrained_backbone=True, head_params=_swin_imagenet_head
    )
)
register_tabular_embedding(
    TabularEmbedding("clip", True, _build_clip, lambda batch, t, f: torch.randn(batch, t, CLIP_TEXT_DIM))
)
register_tabular_embedding(TabularEmbedding("mlp", False, _build_mlp, lambda batch, t, f: torch.randn(batch, f)))


def _lookup(table: dict, field: str, cfg_or_name):
    name = cfg_or_name if isinstance(cfg_or_name, str) else getattr(cfg_or_name.model, field)
    if name not in table:
        raise ConfigError(f"model.{field}: unknown value {name!r}; known: {', '.join(table)}")
    return table[name]


def image_encoder(cfg_or_name: Config | str) -> ImageEncoder:
    """The entry `model.image_encoder` names (a Config or the name); ConfigError naming the key otherwise."""
    return _lookup(IMAGE_ENCODERS, "image_encoder", cfg_or_name)


def tabular_embedding(cfg_or_name: Config | str) -> TabularEmbedding:
    """The entry `model.tabular_embedding` names (a Config or the name); ConfigError naming the key otherwise."""
    return _lookup(TABULAR_EMBEDDINGS, "tabular_embedding", cfg_or_name)


def encoder_choices() -> dict[str, set[str]]:
    """The allowed values of the two config keys (read when a config is validated)."""
    return {"model.image_encoder": set(IMAGE_ENCODERS), "model.tabular_embedding": set(TABULAR_EMBEDDINGS)}


def trains_pretrained_backbone(cfg: Config) -> bool:
    """The run's images go through a pretrained-capable 2D backbone (`model.image_pretrained` applies)."""
    return cfg.model.use_images and image_encoder(cfg).pretrained_backbone


def uses_text_tower(cfg: Config) -> bool:
    """The run reads the attribute sentences through the frozen CLIP text tower."""
    return cfg.model.use_tabular and tabular_embedding(cfg).uses_text_tower


def uses_attribute_features(cfg: Config) -> bool:
    """The run reads the encoded attribute features [B, F] (scaled with training statistics)."""
    return cfg.model.use_tabular and tabular_embedding(cfg).reads_features
