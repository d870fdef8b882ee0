"""The kinds of image a cohort holds, as objects: what differs between 3D volumes and photos.

A schema names its kind (`images.kind`: "volume" | "photo"); `DatasetSpec.kind` returns the
object. Code asks the object (``spec.kind.spatial_dims``, ``spec.kind.word``) instead of
comparing the name. Where a kind picks a class or function of a higher layer (the dataset
and cache in `cfcml.engine.loaders`, the figure in `cfcml.report.figures`, the request
checks in `cfcml.platform.serve_request`), that layer keeps its own small dict keyed by the
kind's name: adding a kind is one entry here and one per such dict.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageKind:
    name: str  # as written in schemas, configs and MLflow tags
    spatial_dims: int  # 3: [D, H, W] | 2: [H, W]
    channels: int  # per image tensor: [B, channels, *spatial]
    suffix: str  # the file suffix the synthetic writer and the input example use
    has_mask: bool  # takes an optional ROI mask (schema `images.mask`, the package's `mask` column)
    word: str  # one image input in messages and report rows: "series T1C", "photo derm"
    shared_encoder: bool  # one 2D backbone for every photo (Derm7pt) vs one 3D encoder per series (MEN)

    @property
    def size_axes(self) -> str:
        """The axes of `data.image_size`, as messages name them."""
        return "D, H, W" if self.spatial_dims == 3 else "H, W"


VOLUME = ImageKind(
    name="volume", spatial_dims=3, channels=1, suffix=".nii.gz", has_mask=True, word="series", shared_encoder=False
)
PHOTO = ImageKind(
    name="photo", spatial_dims=2, channels=3, suffix=".jpg", has_mask=False, word="photo", shared_encoder=True
)

KINDS: dict[str, ImageKind] = {k.name: k for k in (VOLUME, PHOTO)}
IMAGE_KINDS = tuple(KINDS)  # the names, in the order messages list them
