"""Which pretrained weights a run uses: the check before training and the record after it.

`model.image_pretrained` (the 2D Swin-T backbone) takes
- `required`: the paper presets' default. The paper fine-tunes ImageNet weights, so a paper
  preset refuses to train until the user names them (or says `none` on purpose);
- `none`: random init, on purpose;
- a local checkpoint file (a full timm or Microsoft Swin-T checkpoint, head included);
- a timm hub name (`swin_tiny_patch4_window7_224.ms_in1k`, `hf-hub:timm/...`; needs the hub).

`model.text_pretrained` (the frozen CLIP text tower) takes `none`, an open_clip tag or
`TAG:/path/to/file` (see `cfcml.models.text`).

`check_pretrained(cfg)` runs before training and raises `ConfigError` (the CLI's exit 2);
`pretrained_provenance(cfg)` says what was used, for metrics.json, MLflow and the registry.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from ..util.errors import ConfigError
from ..util.file_hash import file_sha256
from .encoders import trains_pretrained_backbone, uses_text_tower
from .image_weights import RANDOM_INIT, REQUIRED, SWIN_CHECKPOINT_HELP, image_weights_kind
from .text import TextEncoderUnavailable, parse_text_pretrained, resolve_weights

if TYPE_CHECKING:  # models read the Config they are given; only the engine and above import the config module
    from ..config import Config


def check_pretrained(cfg: Config) -> None:
    """Refuse a training config whose weights are missing or unusable; raises ConfigError.

    Needs no network: hub names are checked for form only (the download fails on its own).
    """
    if trains_pretrained_backbone(cfg):
        spec = cfg.model.image_pretrained
        kind = image_weights_kind(spec)
        if kind == REQUIRED:
            raise ConfigError(
                f"preset {cfg.name!r} trains Swin-T from ImageNet weights (model.image_pretrained=required) and none "
                f"were given: {SWIN_CHECKPOINT_HELP}"
            )
        if kind == "hub":
            from timm.models import parse_model_name  # timm is heavy: only to check a hub name

            try:
                parse_model_name(spec)
            except ValueError as e:
                raise ConfigError(f"model.image_pretrained={spec!r}: {e}; {SWIN_CHECKPOINT_HELP}") from None
    if uses_text_tower(cfg):
        try:
            weights = parse_text_pretrained(cfg.model.text_pretrained)
        except TextEncoderUnavailable as e:
            raise ConfigError(str(e)) from None
        if weights.file is not None and not weights.file.is_file():
            raise ConfigError(
                f"model.text_pretrained={cfg.model.text_pretrained!r}: no such file {str(weights.file)!r} "
                "(give TAG:/path/to/file, an open_clip tag such as openai, or none)"
            )


def pretrained_provenance(cfg: Config) -> dict[str, str]:
    """What the run's pretrained parts were built from, as short strings:

    image: 'none' (random init; always for the 3D encoder) | 'sha256:<hex>' (a local file) |
           'hub:<name>' | 'unused' (images-only ablation off);
    text:  'none' (random-init tower) | '<tag>:sha256:<hex>' (the weights file, local or the
           hub's cached copy, and the tag that decided the activation) | 'unused'.
    The text digest needs the weights resolved, which training has already done.
    """
    if not cfg.model.use_images:
        image = "unused"
    elif not trains_pretrained_backbone(cfg):
        image = RANDOM_INIT
    else:
        spec = cfg.model.image_pretrained
        kind = image_weights_kind(spec)
        if kind == REQUIRED:
            check_pretrained(cfg)  # raises, with the way out
        elif kind == "file":
            image = f"sha256:{file_sha256(Path(spec).expanduser())}"
        elif kind == "hub":
            image = f"hub:{spec}"
        else:
            image = RANDOM_INIT
    if not uses_text_tower(cfg):
        text = "unused"
    else:
        weights, path = resolve_weights(cfg.model.text_pretrained)
        text = RANDOM_INIT if path is None else f"{weights.tag}:sha256:{file_sha256(path)}"
    return {"image": image, "text": text}


def without_pretrained_weights(cfg: Config) -> Config:
    """A copy of `cfg` whose image encoder starts from random weights: for building a model
    only to inspect it (`cfcml summary`) or to load a trained state dict into (no download,
    no checkpoint file, no refusal)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_pretrained=RANDOM_INIT))
