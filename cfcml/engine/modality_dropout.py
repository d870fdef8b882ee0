"""Modality dropout (`train.modality_dropout = p`): while training, each image series / photo
and each tabular attribute of each sample is removed with probability p, so the model learns
to answer when an input is missing — the everyday case in a clinic.

Removed means what the registered model sees for an empty input (`cfcml.platform.pyfunc`):

- an image: all zeros (the datasets' missing series or photo; the mean after z-scoring);
- an attribute, sentence route: the embedding of its sentence with `MISSING_WORD`
  ("The age of patient is unknown"), computed once per run through the sentence cache;
- an attribute, MLP route: its feature columns zero (no one-hot word, standardised value 0).

A sample never loses everything: when all its inputs were drawn for removal, one of them,
chosen uniformly, is kept (so the removal rate is p - p^n / n for n inputs, slightly below p).
Masks are drawn on the CPU from a generator the engine seeds from the epoch seed, so runs
stay deterministic and resume to the same draws; evaluation never goes through here.
(Zeroing a preprocessed series differs from the registered model in one detail: there a
missing reference series, the schema's first, makes the next one the resampling grid.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.encoders import tabular_embedding
from ..models.text import sentence_cache

MISSING_WORD = "unknown"  # what an empty attribute becomes in its sentence (the registered model's word)


@dataclass
class ModalityDropout:
    """p: removal probability; num_images: image inputs it may remove (0: the model ignores
    images); num_attributes: attributes it may remove (0: no tabular input); unknown [t, E]:
    each attribute's "unknown" sentence embedding (sentence route) or None; columns [F]: the
    attribute index of each MLP feature column (MLP route) or None."""

    p: float
    num_images: int
    num_attributes: int
    unknown: Tensor | None = None
    columns: Tensor | None = None

    def __post_init__(self):
        if not 0 <= self.p < 1:
            raise ValueError(f"modality dropout p must lie in [0, 1), got {self.p}")

    @staticmethod
    def generator(seed: int) -> torch.Generator:
        """A private generator for the masks; the seed is mixed so that the masks do not repeat
        the global stream that the same epoch seed gives augmentation and dropout."""
        return torch.Generator().manual_seed((int(seed) * 6364136223846793005 + 1442695040888963407) % 2**63)

    def masks(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """-> (keep_images [B, num_images], keep_attributes [B, num_attributes]) bool, on the CPU;
        every row keeps at least one input."""
        n = self.num_images + self.num_attributes
        keep = torch.rand(batch, n, generator=generator) >= self.p
        rescue = torch.randint(max(n, 1), (batch,), generator=generator)  # drawn always: the stream stays aligned
        empty = ~keep.any(dim=1)
        if n:
            keep[empty, rescue[empty]] = True
        return keep[:, : self.num_images], keep[:, self.num_images :]

    def __call__(self, inputs: dict, generator: torch.Generator) -> dict:
        """{"images": m tensors [B, C, *grid], "tabular": [B, t, E] | [B, F] | None} -> the same
        with the removed inputs replaced (new tensors; the batch is not modified in place)."""
        images, tabular = list(inputs["images"]), inputs.get("tabular")
        batch = (images[0] if images else tabular).shape[0]
        keep_img, keep_att = self.masks(batch, generator)
        for j in range(self.num_images):
            x = images[j]
            images[j] = x * keep_img[:, j].to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if self.num_attributes and tabular is not None:
            keep_att = keep_att.to(tabular.device)
            if self.unknown is not None:  # sentence embeddings [B, t, E]
                tabular = torch.where(
                    keep_att[..., None], tabular, self.unknown.to(tabular.device, tabular.dtype)[None]
                )
            elif self.columns is not None:  # MLP features [B, F]
                tabular = tabular * keep_att[:, self.columns.to(tabular.device)].to(tabular.dtype)
        return {**inputs, "images": images, "tabular": tabular}


def feature_columns(spec) -> list[int]:
    """The attribute index of each column of `cfcml.datasets.tabular.tabular_features(spec, ...)`."""
    out = []
    for i, a in enumerate(spec.attributes):
        out += [i] * (len(a.words) if a.type == "categorical" else 1)
    return out


def unknown_embeddings(cfg, spec) -> Tensor:
    """[t, E] the frozen text encoder's embedding of each attribute's sentence with MISSING_WORD
    (through the on-disk cache, like every other sentence)."""
    cache = sentence_cache(cfg.data.cache_dir, cfg.model.text_pretrained)
    return cache.embed([a.sentence_for(MISSING_WORD) for a in spec.attributes]).float()


def build_modality_dropout(cfg, spec) -> ModalityDropout | None:
    """The run's modality dropout, or None when `train.modality_dropout` is 0."""
    p, m = cfg.train.modality_dropout, cfg.model
    if p <= 0:
        return None
    num_images = len(spec.series) if m.use_images else 0
    num_attributes = len(spec.attributes) if m.use_tabular else 0
    unknown = columns = None
    if num_attributes:
        if tabular_embedding(cfg).uses_text_tower:
            unknown = unknown_embeddings(cfg, spec)
        else:
            columns = torch.tensor(feature_columns(spec), dtype=torch.long)
    return ModalityDropout(p, num_images, num_attributes, unknown, columns)
