"""What every comparison method shares: CFCML's encoders at stage 4, and the engine interface.

docs/baselines.md §2.1: every method sees exactly what CFCML's encoders give, at stage 4 only
(multi-granularity features are CFCML's contribution). Per image, the stage-4 map
[C_4, *grid] is flattened to N tokens and, where C_4 differs from C_t (Swin-T: 768 vs 128),
mapped by a per-image Linear(C_4 -> C_t) + ReLU (the authors' `linear_image`); the
attribute sentences go through the same Linear(512 -> C_t) + ReLU as in CFCML. Vector methods
use the token means f_j.

The engine's interface, the same for every method (CFCML included):
    forward(images, tabular) -> {"logits": [B, K], "features": M x [B, d] or None,
                                 "fused": [B, D] or None, ...method-specific tensors}
    loss_terms(out, labels, *, epoch) -> {"loss": total to backprop, every term for logging}
softmax(logits) are the class probabilities (evidential methods return log alpha - log S).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..ccrm import gather_with_grad
from ..encoders import image_encoder, tabular_embedding
from ..shape import CohortShape
from ..tokens import flatten_tokens

if TYPE_CHECKING:  # a method reads the Config it is given; only the engine and above import the config module
    from ...config import Config


def mlp_head(dim_in: int, hidden: Sequence[int], dim_out: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout per hidden width, then Linear(-> dim_out). With hidden
    (128, 16) this is the CFCML classifier shape; with () a single Linear."""
    layers, width = [], dim_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, dim_out))


class FusionMethod(nn.Module):
    """Base of every comparison method: the shared encoders, `encode`, and the optimiser hook.

    Subclasses build their fusion head after `super().__init__` and implement `forward` and
    `loss_terms`. `num_modalities` M = images + 1 (the table, last); `num_tokens[j]` the
    tokens of modality j at stage 4.
    """

    stages = (3,)  # the encoder stages a method uses (for `cfcml summary`): stage 4 only

    def __init__(self, cfg: Config, shape: CohortShape, num_tabular_features: int | None = None):
        super().__init__()
        m = cfg.model
        self.dim, self.num_classes = m.dim, shape.num_classes
        self.num_images = shape.num_images
        self.num_modalities = shape.num_images + 1
        encoder = image_encoder(cfg)
        self.pretrained_backbone = encoder.pretrained_backbone  # trained at backbone_lr_mult x LR
        n_enc = 1 if shape.shared_encoder else shape.num_images
        self.encoders = nn.ModuleList(encoder.build(cfg) for _ in range(n_enc))
        c4 = self.encoders[0].stage_channels[3]
        self.image_proj = (
            nn.ModuleList(nn.Sequential(nn.Linear(c4, m.dim), nn.ReLU()) for _ in range(shape.num_images))
            if c4 != m.dim
            else None
        )
        self.image_tokens = math.prod(encoder.grids(cfg.data.image_size)[3])
        self.tabular_embed = tabular_embedding(cfg).build(num_tabular_features, shape.num_attributes, m.dim)
        self.num_tokens = [self.image_tokens] * shape.num_images + [shape.num_attributes]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of pretrained-capable 2D backbones (trained at backbone_lr_mult x LR)."""
        return [p for e in self.encoders for p in e.parameters()] if self.pretrained_backbone else []

    def encode(self, images: list[torch.Tensor], tabular: torch.Tensor) -> list[torch.Tensor]:
        """-> M token tensors [B, N_j, d]: the images' stage-4 tokens, then the attribute tokens."""
        tokens = []
        for j, x in enumerate(images):
            flat = flatten_tokens(self.encoders[j if len(self.encoders) > 1 else 0](x)[3])
            if flat.shape[1] != self.image_tokens:
                raise ValueError(
                    f"image {j} stage 4 has {flat.shape[1]} tokens, the model was built for {self.image_tokens}: "
                    f"input grid {tuple(x.shape[2:])} differs from data.image_size"
                )
            tokens.append(self.image_proj[j](flat) if self.image_proj is not None else flat)
        tokens.append(self.tabular_embed(tabular))
        return tokens

    def loss_terms(self, out: dict, labels: torch.Tensor, *, epoch: int) -> dict:
        raise NotImplementedError


def pooled(tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """M x [B, N_j, d] -> M x [B, d]: the token means f_j."""
    return [t.mean(dim=1) for t in tokens]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_batch(labels: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under torch.distributed: all ranks' rows of `labels` and of each tensor (with gradient),
    in rank order; without a process group the inputs unchanged.

    For batch-level loss terms (contrastive negatives, load balance, margins): every rank then
    computes the same loss as one process on the concatenated batch. Add such terms unscaled:
    the all-gather backward sums the W ranks' identical gradients and DDP's averaging divides
    by W (see `cfcml.models.ccrm.ccrm_losses_distributed`).
    """
    if _world() == 1:
        return (labels, *tensors)
    return (gather_with_grad(labels), *(gather_with_grad(t) for t in tensors))
