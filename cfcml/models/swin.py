"""The 2D image encoder: timm's Swin-T as a four-stage feature extractor (NCHW maps)."""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from torch import nn

# `tiny` is the paper's Swin-T; `micro` is a narrow, shallow Swin for smoke presets.
SWIN_VARIANTS = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    "micro": {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4},
}
TIMM_NAME = "swin_tiny_patch4_window7_224"


class SwinEncoder2D(nn.Module):
    """Images [B, 3, H, W] -> four NCHW stage maps (stride 4, 8, 16, 32).

    `pretrained`: "none", a timm hub tag (e.g. "timm/swin_tiny_patch4_window7_224.ms_in1k", needs
    a hub) or a local checkpoint path. `detach_early_stages` reproduces the authors' code, where
    stages 1-3 came from a no-grad pass so only stage 4 trained the backbone.
    """

    def __init__(self, img_size: int = 224, variant: str = "tiny", pretrained: str = "none", detach_early_stages: bool = False):
        super().__init__()
        kwargs = dict(features_only=True, img_size=img_size, **SWIN_VARIANTS[variant])
        if pretrained == "none":
            self.body = timm.create_model(TIMM_NAME, pretrained=False, **kwargs)
        elif Path(pretrained).expanduser().exists():
            self.body = timm.create_model(TIMM_NAME, pretrained=False, **kwargs)
            _load_local_checkpoint(self.body, Path(pretrained).expanduser(), img_size, variant)
        else:
            self.body = timm.create_model(pretrained, pretrained=True, **kwargs)
        self.stage_channels = list(self.body.feature_info.channels())
        self.detach_early_stages = detach_early_stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)  # timm gives NHWC
        if self.detach_early_stages:
            feats = [f.detach() for f in feats[:3]] + [feats[3]]
        return [f.permute(0, 3, 1, 2).contiguous() for f in feats]


def _load_local_checkpoint(body: nn.Module, path: Path, img_size: int, variant: str) -> None:
    """Load a full timm/Microsoft Swin checkpoint (ImageNet head included) into the feature
    extractor: strict on the backbone, so a checkpoint of another architecture is an error."""
    from timm.models import load_state_dict
    from timm.models.swin_transformer import checkpoint_filter_fn

    full = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, **SWIN_VARIANTS[variant])
    state = checkpoint_filter_fn(load_state_dict(str(path)), full)  # also converts the original Microsoft layout
    missing, _ = full.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing:
        raise ValueError(f"{path} does not fit Swin ({variant}): it lacks {missing[:3]}...")
    # The feature extractor names stages layers_0..3 and has no final norm or head.
    body.load_state_dict({
        re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v
        for k, v in full.state_dict().items() if not k.startswith(("head.", "norm."))
    })  # fmt: skip
