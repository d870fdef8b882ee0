"""A synthetic Derm7pt `release_v0` tree, in exactly the real on-disk format.

Nothing of the real release is used: images are drawn here, values are sampled from the
SPEC §1 vocabularies. The tree keeps the real format's quirks (header row, 0-based index
files, dropped diagnoses inside the index files, mixed .jpg/.JPG, mixed-case names, a few
rows with clinic == derm, `case_id` empty in most rows and `notes` in nearly all).

Class signal (docs/synthetic_cohorts.md has the measured AUCs): three independent noisy
cues, each weak alone, strong together.
- derm image: lesion colour (light brown -> dark blue-grey), colour variegation and border
  irregularity all follow one latent z_derm ~ N(SIGNAL·y, 1);
- clinic image: lesion size follows an independent latent z_clinic ~ N(SIGNAL·y, 1);
  its colour, position and the skin tone are class-independent nuisance;
- tabular: every melanoma has management = excision (the real data's leak) but so do 60 % of
  nevi; elevation and difficulty lean weakly towards melanoma; location and sex barely.
Lesion size is class-independent in the derm image and colour in the clinic image, so no
image carries another modality's cue.
"""

from __future__ import annotations

import csv
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cfcml.datasets.spec import load_spec

SPLITS = ("train", "valid", "test")
VOCAB = {a.column: a.words for a in load_spec("derm7pt").attributes}
# The release's meta.csv header, in its order (most columns are not read by cfcml).
META_COLUMNS = (
    "case_num",
    "diagnosis",
    "seven_point_score",
    "pigment_network",
    "streaks",
    "pigmentation",
    "regression_structures",
    "dots_and_globules",
    "blue_whitish_veil",
    "vascular_structures",
    "level_of_diagnostic_difficulty",
    "elevation",
    "location",
    "sex",
    "management",
    "clinic",
    "derm",
    "case_id",
    "notes",
)

SIGNAL = 1.0  # class shift of each image latent, in noise SDs: single-image AUC ≈ Φ(1/√2) ≈ 0.76
IMAGE_SIZE = (768, 512)  # (W, H), the typical size of the real photos

# Kept counts of the real release after the NEV/MEL filter, and the other (dropped) diagnoses
# its index files also list: 413 / 203 / 395 rows, 1011 in all.
RELEASE_COUNTS = {"train": (256, 90, 67), "valid": (100, 61, 42), "test": (219, 101, 75)}  # NEV, MEL, other
RELEASE_ROWS = 1011
CASE_ID_FILLED = 27 / 1011  # the release leaves case_id empty in 984 rows (the reader never uses it)

NEV_DIAGNOSES = {
    "clark nevus": 0.55,
    "reed or spitz nevus": 0.12,
    "dermal nevus": 0.12,
    "blue nevus": 0.05,
    "congenital nevus": 0.07,
    "combined nevus": 0.05,
    "recurrent nevus": 0.04,
}
MEL_DIAGNOSES = {
    "melanoma (less than 0.76 mm)": 0.4,
    "melanoma (in situ)": 0.25,
    "melanoma (0.76 to 1.5 mm)": 0.18,
    "melanoma (more than 1.5 mm)": 0.08,
    "melanoma metastasis": 0.05,
    "melanoma": 0.04,
}
OTHER_DIAGNOSES = {
    "basal cell carcinoma": 0.23,
    "seborrheic keratosis": 0.2,
    "miscellaneous": 0.15,
    "dermatofibroma": 0.1,
    "lentigo": 0.1,
    "melanosis": 0.08,
    "vascular lesion": 0.14,
}

# P(value | NEV), P(value | MEL) in VOCAB order. Management carries the leak; the rest is weak.
ATTRIBUTE_PROBS = {
    "level_of_diagnostic_difficulty": ((0.45, 0.40, 0.15), (0.30, 0.45, 0.25)),
    "elevation": ((0.60, 0.33, 0.07), (0.45, 0.40, 0.15)),
    "location": (
        (0.30, 0.20, 0.10, 0.12, 0.10, 0.10, 0.04, 0.02, 0.02),
        (0.28, 0.22, 0.09, 0.12, 0.10, 0.12, 0.04, 0.02, 0.01),
    ),
    "sex": ((0.50, 0.50), (0.46, 0.54)),
    "management": ((0.60, 0.28, 0.12), (1.0, 0.0, 0.0)),
}

# Seven-point criteria (not read by cfcml; realistic values for the full schema).
SEVEN_POINT = {
    "pigment_network": (("absent", "typical", "atypical"), (0.25, 0.55, 0.20), (0.20, 0.25, 0.55)),
    "streaks": (("absent", "regular", "irregular"), (0.80, 0.12, 0.08), (0.55, 0.15, 0.30)),
    "pigmentation": (
        ("absent", "diffuse regular", "localized regular", "diffuse irregular", "localized irregular"),
        (0.55, 0.20, 0.05, 0.10, 0.10),
        (0.35, 0.05, 0.05, 0.30, 0.25),
    ),
    "regression_structures": (
        ("absent", "blue areas", "white areas", "combinations"),
        (0.85, 0.05, 0.05, 0.05),
        (0.55, 0.15, 0.10, 0.20),
    ),
    "dots_and_globules": (("absent", "regular", "irregular"), (0.35, 0.35, 0.30), (0.25, 0.15, 0.60)),
    "blue_whitish_veil": (("absent", "present"), (0.85, 0.15), (0.55, 0.45)),
    "vascular_structures": (
        ("absent", "arborizing", "comma", "hairpin", "within regression", "wooly", "linear irregular", "dotted"),
        (0.85, 0.01, 0.06, 0.02, 0.01, 0.01, 0.02, 0.02),
        (0.80, 0.00, 0.02, 0.01, 0.05, 0.00, 0.06, 0.06),
    ),
}


def plan_counts(cases: int) -> dict[str, tuple[int, int, int]]:
    """Rows per split as (NEV, MEL, other), proportional to the real release (exact at 1011).

    Largest-remainder apportionment; every split keeps at least one NEV and one MEL.
    """
    if cases < 12:
        raise ValueError(f"need at least 12 cases to give every split both classes, got {cases}")
    cells = [(s, j) for s in SPLITS for j in range(3)]
    quotas = [RELEASE_COUNTS[s][j] * cases / RELEASE_ROWS for s, j in cells]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(cells)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: cases - sum(counts)]:
        counts[i] += 1
    for i, (s, j) in enumerate(cells):  # small cohorts: borrow from the largest cell
        if j < 2 and counts[i] == 0:
            counts[max(range(len(cells)), key=lambda c: counts[c])] -= 1
            counts[i] = 1
    return {s: tuple(counts[3 * k : 3 * k + 3]) for k, s in enumerate(SPLITS)}


def _pick(rng: np.random.Generator, table: dict) -> str:
    names, p = zip(*table.items())
    return names[rng.choice(len(names), p=np.asarray(p) / sum(p))]


def _choice(rng, values, probs) -> str:
    return values[rng.choice(len(values), p=np.asarray(probs) / sum(probs))]


def _record(rng: np.random.Generator, kind: int) -> dict:
    """Diagnosis, seven-point criteria and the five attributes of one row (kind 0 NEV, 1 MEL, 2 other)."""
    diag = _pick(rng, (NEV_DIAGNOSES, MEL_DIAGNOSES, OTHER_DIAGNOSES)[kind])
    like = kind if kind < 2 else int(rng.random() < 0.3)  # other diagnoses: a random mix
    row = {"diagnosis": diag}
    for col, (values, p_nev, p_mel) in SEVEN_POINT.items():
        row[col] = _choice(rng, values, (p_nev, p_mel)[like])
    row["seven_point_score"] = str(
        2 * (row["pigment_network"] == "atypical")
        + 2 * (row["blue_whitish_veil"] == "present")
        + 2 * (row["vascular_structures"] in ("linear irregular", "dotted", "within regression"))
        + (row["streaks"] == "irregular")
        + ("irregular" in row["pigmentation"])
        + (row["dots_and_globules"] == "irregular")
        + (row["regression_structures"] != "absent")
    )  # the 7-point checklist: major criteria 2 points, minor 1
    for attr, probs in ATTRIBUTE_PROBS.items():
        p = (0.5, 0.3, 0.2) if attr == "management" and kind == 2 else probs[like]  # dropped rows: no leak
        row[attr] = _choice(rng, VOCAB[attr], p)
    return row


# ---------------------------------------------------------------------------------------------
# Drawing: everything at 1/4 scale (cheap), one bilinear upsample to the full size at the end.

_W, _H = IMAGE_SIZE
_SMALL = (_W // 4, _H // 4)


def _smooth_noise(rng, shape_hw, amp, base, tint=(0.0, 0.0, 0.0)) -> Image.Image:
    """A smooth RGB field at 1/4 scale, bilinearly upsampled from coarse noise: base colour +
    brightness noise (amp) + noise along the `tint` colour direction + a little hue jitter."""
    lum, along = (rng.standard_normal((*shape_hw, 1)).astype(np.float32) for _ in range(2))
    hue = rng.standard_normal((*shape_hw, 3)).astype(np.float32)
    small = np.asarray(base, np.float32) + amp * lum + along * np.asarray(tint, np.float32) + 0.2 * amp * hue
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(_SMALL, Image.BILINEAR)


def _lesion_mask(rng, cx, cy, rx, ry, irregularity) -> Image.Image:
    """A blob with a wobbly border (radial harmonics), at 1/4 scale; centre/radii in full-size pixels."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5, 7):
        r += irregularity / k**0.5 * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.4, 1.8)
    pts = [(float((cx + rx * ri * math.cos(ti)) / 4), float((cy + ry * ri * math.sin(ti)) / 4)) for ti, ri in zip(t, r)]
    mask = Image.new("L", _SMALL, 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    return mask


_VIGNETTE: Image.Image | None = None


def _vignette() -> Image.Image:
    """The dark circular border of a dermoscope's field of view (drawn once, 1/4 scale)."""
    global _VIGNETTE
    if _VIGNETTE is None:
        mask = Image.new("L", _SMALL, 0)
        ImageDraw.Draw(mask).ellipse((-12, -30, _SMALL[0] + 12, _SMALL[1] + 30), fill=255)
        _VIGNETTE = mask
    return _VIGNETTE


def draw_derm(rng: np.random.Generator, z: float) -> Image.Image:
    """Dermoscopy: a large centred lesion whose colour, variegation and border follow z."""
    t = 1.0 / (1.0 + math.exp(-1.6 * (z - SIGNAL / 2)))  # 0 = benign-looking .. 1 = malignant-looking
    light = rng.uniform(0.85, 1.1)  # illumination: class-independent nuisance
    skin = light * np.array([225, 180, 160]) + rng.normal(0, 8, 3)
    lesion = light * ((1 - t) * np.array([170, 115, 80]) + t * np.array([85, 75, 105])) + rng.normal(0, 10, 3)
    bg = _smooth_noise(rng, (8, 12), 6, skin)
    # variegation grows with t: patches shift between brown and blue-grey
    tex = _smooth_noise(rng, (10, 15), 8, lesion, tint=t * np.array([45.0, 20.0, -15.0]))
    rx, ry = rng.uniform(130, 220), rng.uniform(100, 170)  # size: nuisance in this modality
    cx, cy = _W / 2 + rng.uniform(-60, 60), _H / 2 + rng.uniform(-40, 40)
    img = Image.composite(tex, bg, _lesion_mask(rng, cx, cy, rx, ry, 0.05 + 0.25 * t))
    img = Image.composite(img, Image.new("RGB", _SMALL, (12, 10, 10)), _vignette())
    return img.resize(IMAGE_SIZE, Image.BILINEAR)


def draw_clinic(rng: np.random.Generator, z: float) -> Image.Image:
    """Clinical photo: a smaller lesion on skin; its size follows z, everything else is nuisance."""
    radius = 42.0 * math.exp(0.32 * z)
    skin = rng.uniform(0.7, 1.05) * np.array([220, 170, 145]) + rng.normal(0, 10, 3)
    lesion = rng.uniform(0.35, 0.7) * np.array([190, 130, 95]) + rng.normal(0, 10, 3)
    bg = _smooth_noise(rng, (6, 9), 10, skin)
    tex = _smooth_noise(rng, (10, 15), 10, lesion)
    aspect = rng.uniform(0.75, 1.3)
    cx, cy = rng.uniform(0.3, 0.7) * _W, rng.uniform(0.3, 0.7) * _H
    mask = _lesion_mask(rng, cx, cy, radius * aspect, radius / aspect, rng.uniform(0.05, 0.2))
    return Image.composite(tex, bg, mask).resize(IMAGE_SIZE, Image.BILINEAR)


# ---------------------------------------------------------------------------------------------
# Writing


def _folder_names(rng: np.random.Generator, n: int) -> list[str]:
    """Three-letter folder codes in mixed case, like the release's."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    names: list[str] = []
    while len(names) < n:
        code = "".join(rng.choice(list(letters), 3))
        code = code.upper() if rng.random() < 0.3 else code.capitalize()
        if code.lower() not in {x.lower() for x in names}:
            names.append(code)
    return names


def write_synthetic_derm7pt(out, cases: int = 1011, seed: int = 0) -> Path:
    """Write a `release_v0`-shaped tree with `cases` rows into `out`; returns `out`.

    Deterministic per (cases, seed). Existing files of the same names are overwritten.
    """
    out = Path(out)
    plan = plan_counts(cases)
    rng = np.random.default_rng([seed, 7])
    kinds = [(s, k) for s in SPLITS for k in range(3) for _ in range(plan[s][k])]
    order = rng.permutation(len(kinds))  # meta.csv rows are not grouped by split or class
    rows_kind = [kinds[i] for i in order]

    folders = _folder_names(rng, max(1, -(-cases // 25)))
    kept = [i for i, (_, k) in enumerate(rows_kind) if k < 2]
    n_same = max(1, round(0.01 * cases))
    same = set(rng.choice(kept, n_same, replace=False).tolist())  # clinic == derm rows

    first_normal = min(set(range(cases)) - same)
    rows, jobs = [], []
    for i, (split, kind) in enumerate(rows_kind):
        r = np.random.default_rng([seed, 11, i])  # per row: order-independent, threadable
        rec = _record(r, kind)
        folder = folders[i // 25]
        num = 2 * (i % 25) + 1
        clinic_ext = ".JPG" if r.random() < 0.2 else ".jpg"
        derm_ext = ".JPG" if r.random() < 0.6 else ".jpg"
        if i == first_normal:  # guarantee both spellings even in tiny cohorts
            clinic_ext, derm_ext = ".jpg", ".JPG"
        clinic = f"{folder}/{folder.capitalize()}{num:03d}{clinic_ext}"
        derm = f"{folder}/{folder.upper()}{num + 1:03d}{derm_ext}"
        y = kind if kind < 2 else int(r.random() < 0.3)
        z_derm, z_clinic = r.normal(SIGNAL * y, 1.0), r.normal(SIGNAL * y, 1.0)
        if i in same:
            clinic = derm  # the release has a few rows pointing both columns at one photo
        else:
            jobs.append((clinic, "clinic", z_clinic, [seed, 13, i]))
        jobs.append((derm, "derm", z_derm, [seed, 17, i]))
        # As in the release: case_id is empty in 984 of 1011 rows and notes in nearly all.
        case_id = f"{folder}{num:03d}" if r.random() < CASE_ID_FILLED else ""
        rec.update(
            case_num=str(i + 1),
            clinic=clinic,
            derm=derm,
            case_id=case_id,
            notes="synthetic case" if r.random() < 0.03 else "",
        )
        rows.append(rec)

    (out / "meta").mkdir(parents=True, exist_ok=True)
    with open(out / "meta" / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=META_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    for split in SPLITS:
        with open(out / "meta" / f"{split}_indexes.csv", "w", newline="") as f:
            f.write("indexes\n" + "".join(f"{i}\n" for i, (s, _) in enumerate(rows_kind) if s == split))

    for folder in folders:
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)

    def render(job):
        rel, modality, z, key = job
        img = (draw_derm if modality == "derm" else draw_clinic)(np.random.default_rng(key), z)
        img.save(out / "images" / rel, format="JPEG", quality=88)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(render, jobs))
    return out
