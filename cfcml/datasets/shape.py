"""What a model needs to know about its cohort: counts and the image kind, nothing else.

Models never ask which cohort they serve; the cohort's spec (`cfcml.datasets.spec`) derives this.
"""

from __future__ import annotations

from dataclasses import dataclass

from .image_kinds import IMAGE_KINDS, KINDS, ImageKind


@dataclass(frozen=True)
class CohortShape:
    num_classes: int
    num_images: int  # MRI series (volume) or photos (photo) per patient
    num_attributes: int  # tabular attributes (one sentence each)
    image_kind: str  # "volume": [B, 1, D, H, W] per series | "photo": [B, 3, H, W] per photo

    def __post_init__(self):
        if self.image_kind not in IMAGE_KINDS:
            raise ValueError(f"image_kind must be one of {IMAGE_KINDS}, got {self.image_kind!r}")
        if self.num_classes < 2 or self.num_images < 1 or self.num_attributes < 1:
            raise ValueError(f"a cohort needs >= 2 classes, >= 1 image and >= 1 attribute, got {self}")

    @property
    def kind(self) -> ImageKind:
        return KINDS[self.image_kind]

    @property
    def in_channels(self) -> int:
        return self.kind.channels

    @property
    def shared_encoder(self) -> bool:
        """Photos of one patient share one 2D backbone (the paper's Derm7pt); each MRI series
        has its own 3D encoder (the paper's MEN)."""
        return self.kind.shared_encoder
