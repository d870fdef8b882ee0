"""Photos (2D images): exact-case path lookup, correct colour conversion, and checks.

`load_rgb` turns every PIL mode into 8-bit RGB the right way: 16-bit greyscale is scaled
(PIL's own convert would clip it to white), palette and alpha images are composited on
black, CMYK/YCbCr/greyscale converted. `check_photo` finds what makes a photo unusable:
unreadable, too small for the model input, or blank.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from cfcml.datasets.cohort import Problem

DEFAULT_MIN_SIDE = 32  # pixels; `cfcml data check --preset P` checks against the model input instead
BLANK_STD = 1.0  # grey-level standard deviation (0-255) below which a photo shows nothing


class PathFinder:
    """Exact (case-sensitive) lookup of files under a root, the same on every file system.

    `Path.exists` says yes to `x.jpg` when only `x.JPG` exists on macOS/Windows, and no on
    Linux; listing directories makes the check portable and gives the near miss as a hint.
    """

    def __init__(self, root: Path):
        self.root = root
        self._listings: dict[Path, list[str] | None] = {}

    def _listing(self, folder: Path) -> list[str] | None:
        if folder not in self._listings:
            try:
                self._listings[folder] = sorted(os.listdir(folder))
            except OSError:  # missing, not a folder, no permission, a symlink loop
                self._listings[folder] = None
        return self._listings[folder]

    def find(self, rel: str) -> tuple[Path | None, str]:
        """(path, "") when `rel` exists exactly as written, else (None, what is wrong)."""
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            return None, f"expected a path inside the cohort folder, got {rel!r}"
        folder = self.root
        for i, part in enumerate(parts):
            names = self._listing(folder)
            if names is None:
                return None, f"folder {Path(*parts[:i]).as_posix() or '.'} does not exist"
            if part not in names:  # the same text in another Unicode normalization (macOS writes NFD) is the name
                part = next(
                    (n for n in names if unicodedata.normalize("NFC", n) == unicodedata.normalize("NFC", part)), part
                )
            if part not in names:
                near = [n for n in names if n.lower() == part.lower()]
                hint = f" (on disk as {near[0]!r}: names are case-sensitive)" if near else ""
                what = "file" if i == len(parts) - 1 else "folder"
                return None, f"{what} {Path(*parts[: i + 1]).as_posix()} does not exist{hint}"
            folder = folder / part
        if not folder.is_file():
            return None, f"{Path(rel).as_posix()} is not a file"
        return folder, ""


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, without clipping 16-bit data or leaking alpha."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
        return Image.fromarray(np.clip(arr / scale, 0, 255).round().astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` to 8-bit RGB; `draft_size` (W, H) lets JPEG decoding shrink early."""
    with Image.open(path) as im:
        if draft_size is not None and im.format == "JPEG":
            im.draft("RGB", draft_size)
        im.load()
        return to_rgb(im)


def check_photo(path: Path, rel: str, case_id: str, field: str, mode: str, min_side: int) -> list[Problem]:
    """Problems of one photo. mode: 'decode' (full decode + blank check) | 'header' | 'exists'."""
    if mode == "exists":
        return []
    try:
        with Image.open(path) as im:
            size = im.size
            if mode == "decode":
                im.load()  # a full decode: catches truncated/corrupt data
                rgb = to_rgb(im)
            else:
                im.verify()
    except Exception as e:  # noqa: BLE001 -- PIL raises many types (OSError, SyntaxError, ...)
        return [Problem(rel, case_id, field, f"unreadable image ({type(e).__name__}: {e})")]
    problems = []
    if min(size) < min_side:
        problems.append(
            Problem(
                rel,
                case_id,
                field,
                f"image is {size[0]}x{size[1]} pixels, smaller than "
                f"{min_side} (the model input); use a larger image or --allow-small",
            )
        )
    if mode == "decode":
        grey = np.asarray(rgb.convert("L"), dtype=np.float32)
        if grey.std() < BLANK_STD:
            problems.append(Problem(rel, case_id, field, f"blank image: every pixel is about {grey.mean():.0f}"))
    return problems
