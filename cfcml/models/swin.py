"""The 2D image encoder: timm's Swin-T as a four-stage feature extractor (NCHW maps).

Stage 4 is what timm's `forward_features` returns: the last stage *followed by Swin's final
LayerNorm*, as in the authors' model (the full backbone minus its head). timm's
`features_only` extractor drops that norm, so it is kept here and loaded from checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict
from timm.models.swin_transformer import checkpoint_filter_fn
from torch import nn

from ..util.errors import ConfigError
from .image_weights import REQUIRED, SWIN_CHECKPOINT_HELP, image_weights_kind

# `tiny` is the paper's Swin-T; `micro` is a narrow, shallow Swin for smoke presets.
SWIN_VARIANTS = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    "micro": {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4},
}
TIMM_NAME = "swin_tiny_patch4_window7_224"


class SwinEncoder2D(nn.Module):
    """Images [B, 3, H, W] -> four NCHW stage maps (stride 4, 8, 16, 32); stage 4 is normed.

    `pretrained`: "none", a local checkpoint path (a full timm or Microsoft Swin checkpoint,
    ImageNet head included) or a timm hub name (e.g. "swin_tiny_patch4_window7_224.ms_in1k" or
    "hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k"; needs the hub). "required" (the paper
    presets' default) is refused with a ConfigError that says how to pass weights.
    `detach_early_stages` reproduces the authors' code, where stages 1-3 came from a no-grad
    pass so only stage 4 trained the backbone.
    """

    def __init__(
        self, img_size: int = 224, variant: str = "tiny", pretrained: str = "none", detach_early_stages: bool = False
    ):
        super().__init__()
        kind = image_weights_kind(pretrained)
        if kind == REQUIRED:
            raise ConfigError(f"model.image_pretrained=required: Swin-T needs ImageNet weights; {SWIN_CHECKPOINT_HELP}")
        self.body = timm.create_model(
            TIMM_NAME, pretrained=False, features_only=True, img_size=img_size, **SWIN_VARIANTS[variant]
        )
        self.stage_channels = list(self.body.feature_info.channels())
        self.norm = nn.LayerNorm(self.stage_channels[-1])  # Swin's final norm (timm's default eps)
        if kind == "file":
            self.load_full_state(_local_checkpoint_state(Path(pretrained).expanduser(), img_size, variant))
        elif kind == "hub":
            full = timm.create_model(pretrained, pretrained=True, img_size=img_size, **SWIN_VARIANTS[variant])
            self.load_full_state(full.state_dict())
        self.detach_early_stages = detach_early_stages

    def load_full_state(self, state: dict) -> None:
        """Load a full timm Swin state dict (layers.i., norm., head.) into the extractor (named
        layers_i.) and the final norm; the head is dropped. Strict on everything else."""
        body = {
            re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v
            for k, v in state.items()
            if not k.startswith(("head.", "norm."))
        }
        self.body.load_state_dict(body)
        self.norm.load_state_dict({k[len("norm.") :]: v for k, v in state.items() if k.startswith("norm.")})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)  # timm gives NHWC, so the LayerNorm acts on the channel axis
        feats[3] = self.norm(feats[3])
        if self.detach_early_stages:
            feats = [f.detach() for f in feats[:3]] + [feats[3]]
        return [f.permute(0, 3, 1, 2).contiguous() for f in feats]


def _local_checkpoint_state(path: Path, img_size: int, variant: str) -> dict:
    """A full timm/Microsoft Swin checkpoint as a timm state dict of `variant`'s architecture.
    Strict on the backbone and the final norm: a checkpoint of another architecture (missing
    or extra blocks, other widths) is an error rather than a partial load."""
    full = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, **SWIN_VARIANTS[variant])
    try:
        # also converts the original Microsoft layout; it looks keys up in `full`, so a foreign one fails here
        state = checkpoint_filter_fn(load_state_dict(str(path)), full)
        missing, unexpected = full.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("head.")}, strict=False
        )
    except (RuntimeError, AttributeError, KeyError) as e:  # shape mismatches, blocks the model lacks
        raise ValueError(f"{path} does not fit Swin ({variant}): {str(e)[:300]}") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit Swin ({variant}): it lacks {missing[:3]}, has extra {unexpected[:3]}")
    return full.state_dict()
