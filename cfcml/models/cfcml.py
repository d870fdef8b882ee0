"""The CFCML model (Fig. 1): image encoders -> token mapping -> MG-CIE -> fusion -> classifier.

Every image encoder exposes the same interface (timm-style): `stage_channels` and a forward
returning four stage maps [B, C_s, *grid_s]. MG-CIE never asks which encoder it has.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .cie import GranularityCIE, GranularityFusion
from .encoders import image_encoder, tabular_embedding
from .objective import cfcml_objective
from .registry import method_class, register_method
from .shape import CohortShape
from .tokens import flatten_tokens, make_token_map

if TYPE_CHECKING:  # a model reads the Config it is given; only the engine and above import the config module
    from ..config import Config


def stage_grids(encoder: str, image_size: list[int]) -> list[tuple[int, ...]]:
    """The spatial grid of each stage map of the named image encoder for an input grid."""
    return image_encoder(encoder).grids(image_size)


def build_image_encoder(cfg: Config) -> nn.Module:
    """A fresh image encoder of the kind `model.image_encoder` names (`cfcml.models.encoders`)."""
    return image_encoder(cfg).build(cfg)


# no search_space: CFCML tunes with its preset's (search_spaces/<preset>.yaml)
@register_method("cfcml", display="CFCML", on_cfcml=True)
class CFCML(nn.Module):
    """images: list of m tensors ([B,1,D,H,W] MRI series or [B,3,H,W] photos);
    tabular: sentence embeddings [B, t, 512] (clip) or encoded attributes [B, F] (mlp).

    forward -> {"logits": [B, K], "features": M tensors [B, C_t] (images first, tabular last),
                "fused": [B, M C_t] (the classifier input)}.
    loss_terms -> CE + CCRM (SPEC §3; `cfcml.models.objective.cfcml_objective`).
    """

    def __init__(self, cfg: Config, shape: CohortShape, num_tabular_features: int | None = None):
        super().__init__()
        m = cfg.model
        self.loss_cfg, self.num_classes = cfg.loss, shape.num_classes
        self.use_images, self.use_tabular = m.use_images, m.use_tabular
        self.stages = [0, 1, 2, 3] if m.mg_cie else [m.sg_stage - 1]
        self.num_images = shape.num_images if m.use_images else 0
        num_modalities = self.num_images + int(m.use_tabular)
        dim = m.dim

        encoder = image_encoder(cfg)
        self.pretrained_backbone = encoder.pretrained_backbone  # trained at backbone_lr_mult x LR
        if m.use_images:
            n_enc = 1 if shape.shared_encoder else self.num_images
            self.encoders = nn.ModuleList(encoder.build(cfg) for _ in range(n_enc))
            grids = encoder.grids(cfg.data.image_size)
            channels = self.encoders[0].stage_channels
            self.token_grids = [math.prod(grids[s]) for s in self.stages]
            # token_maps[j][g]: modality j, granularity g (one per modality even with a shared encoder)
            self.image_token_maps = nn.ModuleList(
                nn.ModuleList(
                    make_token_map(m.token_mapping, math.prod(grids[s]), m.n_image_tokens, channels[s], dim, m.heads)
                    for s in self.stages
                )
                for _ in range(self.num_images)
            )
        if m.use_tabular:
            self.tabular_embed = tabular_embedding(cfg).build(num_tabular_features, shape.num_attributes, dim)
            # One map t -> n_t, shared by all granularities (the tabular tokens have one granularity).
            self.tabular_token_map = make_token_map(
                m.token_mapping, shape.num_attributes, m.n_tabular_tokens, dim, dim, m.heads
            )

        self.cie = nn.ModuleList(GranularityCIE(num_modalities, dim, m.heads) for _ in self.stages)
        expand = 2 if num_modalities > 1 else 1  # CIE doubles the tokens (query + attention output)
        n_tokens = [m.n_image_tokens] * self.num_images + [m.n_tabular_tokens] * int(m.use_tabular)
        self.fusion = nn.ModuleList(GranularityFusion(expand * len(self.stages) * n, n) for n in n_tokens)
        self.classifier = nn.Sequential(
            nn.Linear(dim * num_modalities, 128),
            nn.ReLU(),
            nn.Dropout(m.dropout),
            nn.Linear(128, 16),
            nn.ReLU(),
            nn.Dropout(m.dropout),
            nn.Linear(16, shape.num_classes),
        )

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of pretrained-capable 2D backbones (trained at backbone_lr_mult x LR)."""
        if not self.use_images or not self.pretrained_backbone:
            return []
        return [p for e in self.encoders for p in e.parameters()]

    def _image_tokens(self, images: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """-> tokens[j][g] [B, n_i, C_t] for each image modality j and used granularity g."""
        out = []
        for j, x in enumerate(images):
            encoder = self.encoders[j if len(self.encoders) > 1 else 0]
            maps = encoder(x)
            tokens = []
            for g, s in enumerate(self.stages):
                flat = flatten_tokens(maps[s])
                if flat.shape[1] != self.token_grids[g]:
                    raise ValueError(
                        f"image {j} stage {s + 1} has {flat.shape[1]} tokens, the model was built for "
                        f"{self.token_grids[g]}: input grid {tuple(x.shape[2:])} differs from data.image_size"
                    )
                tokens.append(self.image_token_maps[j][g](flat))
            out.append(tokens)
        return out

    def forward(self, images: list[torch.Tensor] | None = None, tabular: torch.Tensor | None = None) -> dict:
        per_modality = self._image_tokens(images) if self.use_images else []
        if self.use_tabular:
            tab = self.tabular_token_map(self.tabular_embed(tabular))
            per_modality.append([tab] * len(self.stages))
        enhanced = [[] for _ in per_modality]  # enhanced[j][g]
        for g, cie in enumerate(self.cie):
            for j, e in enumerate(cie([tokens[g] for tokens in per_modality])):
                enhanced[j].append(e)
        features = [fuse(e) for fuse, e in zip(self.fusion, enhanced)]
        fused = torch.cat(features, dim=1)
        return {"logits": self.classifier(fused), "features": features, "fused": fused}

    def loss_terms(self, out: dict, labels: torch.Tensor, *, epoch: int) -> dict:
        """-> {"loss", "ce", and with CCRM on "sam", "up", "cp"} (the epoch is not used)."""
        return cfcml_objective(out, labels, self.loss_cfg, self.num_classes)


def build_model(cfg: Config, shape: CohortShape, num_tabular_features: int | None = None) -> nn.Module:
    """The model of `cfg.model.method` (CFCML or a comparison method, `cfcml.models.methods`),
    with the engine's interface: forward(images, tabular) -> {"logits", "features", "fused", ...},
    loss_terms(out, labels, *, epoch) -> {"loss", ...}, backbone_parameters().

    The method comes from the registry: a Config exists only once `cfcml.config` is imported,
    which imports `cfcml.models.methods` and so registers every built-in method (this module
    cannot import that package: the methods build on CFCML's encoders here)."""
    return method_class(cfg.model.method)(cfg, shape, num_tabular_features)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
