"""Derm7pt (the official `release_v0` folder): schema, reader and checker.

    release_v0/meta/meta.csv                  one row per lesion, 19 columns, header row
    release_v0/meta/{train,valid,test}_indexes.csv   column `indexes`: 0-based data-row positions
    release_v0/images/<folder>/<file>         `clinic` / `derm` are paths relative to images/

Only nevi (NEV) and melanomas (MEL) are kept (SPEC §1); every other diagnosis is dropped even
when an index file lists it. `check_derm7pt` collects every problem; `read_derm7pt` raises
`CohortError` carrying all of them.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cfcml.datasets.cohort import Case, Cohort, CohortError, Problem

DATASET = "derm7pt"
CLASSES = ("NEV", "MEL")
MODALITIES = ("clinic", "derm")
SPLITS = ("train", "valid", "test")
ATTRIBUTES = ("level_of_diagnostic_difficulty", "elevation", "location", "sex", "management")

META_COLUMNS = (
    "case_num", "diagnosis", "seven_point_score", "pigment_network", "streaks", "pigmentation",
    "regression_structures", "dots_and_globules", "blue_whitish_veil", "vascular_structures",
    "level_of_diagnostic_difficulty", "elevation", "location", "sex", "management",
    "clinic", "derm", "case_id", "notes",
)  # fmt: skip

# SPEC §1 vocabularies; the order is also the one-hot order of `derm7pt_tabular_features`.
VOCAB = {
    "level_of_diagnostic_difficulty": ("low", "medium", "high"),
    "elevation": ("flat", "palpable", "nodular"),
    "location": ("back", "lower limbs", "abdomen", "upper limbs", "chest", "head neck", "acral",
                 "buttocks", "genital areas"),
    "sex": ("female", "male"),
    "management": ("excision", "clinical follow up", "no further examination"),
}  # fmt: skip

NEVUS_DIAGNOSES = frozenset(
    f"{kind} nevus" for kind in ("blue", "clark", "combined", "congenital", "dermal", "recurrent", "reed or spitz")
)

# Table 1 of the paper: the attribute wording it prints and the template it puts it in.
# Value inserted verbatim, no trailing period.
TEMPLATES = {
    "level_of_diagnostic_difficulty": "The level of diagnostic difficulty is {v}",
    "elevation": "The lesion elevation is {v}",
    "location": "The lesion location is {v}",
    "sex": "The sex of patient is {v}",
    "management": "The management for the patient is {v}",
}

META = "meta/meta.csv"


def diagnosis_label(diagnosis: str) -> int | None:
    """0 = NEV, 1 = MEL, None = dropped (every other diagnosis)."""
    d = diagnosis.strip()
    if d in NEVUS_DIAGNOSES:
        return 0
    if d.startswith("melanoma"):
        return 1
    return None


def derm7pt_sentences(attributes: dict) -> tuple[str, ...]:
    """The five Table 1 sentences, in `ATTRIBUTES` order."""
    return tuple(TEMPLATES[a].format(v=attributes[a]) for a in ATTRIBUTES)


def derm7pt_tabular_feature_names() -> list[str]:
    return [f"{a}={v}" for a in ATTRIBUTES for v in VOCAB[a]]


def derm7pt_tabular_features(cases) -> np.ndarray:
    """One-hot attributes [len(cases), 20] float32 (the MLP-embedding ablation, Fig. 9)."""
    names = {n: i for i, n in enumerate(derm7pt_tabular_feature_names())}
    out = np.zeros((len(cases), len(names)), dtype=np.float32)
    for row, case in enumerate(cases):
        for a in ATTRIBUTES:
            col = names.get(f"{a}={case.attributes[a]}")
            if col is not None:  # the reader rejects unknown values; stay total anyway
                out[row, col] = 1.0
    return out


# ---------------------------------------------------------------------------------------------
# Checking


class _ImageFinder:
    """Exact (case-sensitive) lookup of image paths, the same on every file system.

    `Path.exists` says yes to `x.jpg` when only `x.JPG` exists on macOS/Windows, and no on
    Linux; listing directories makes the check portable and gives the near miss as a hint.
    """

    def __init__(self, images_root: Path):
        self.images_root = images_root
        self._listings: dict[Path, list[str] | None] = {}

    def _listing(self, folder: Path) -> list[str] | None:
        if folder not in self._listings:
            try:
                self._listings[folder] = sorted(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                self._listings[folder] = None
        return self._listings[folder]

    def find(self, rel: str) -> tuple[Path | None, str]:
        """(path, "") when `rel` exists exactly, else (None, what is wrong)."""
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            return None, f"expected a path relative to images/, got {rel!r}"
        folder = self.images_root
        for i, part in enumerate(parts):
            names = self._listing(folder)
            if names is None:
                return None, f"folder {folder} does not exist"
            if part not in names:
                near = [n for n in names if n.lower() == part.lower()]
                hint = f" (on disk as {near[0]!r}: names are case-sensitive)" if near else ""
                what = "file" if i == len(parts) - 1 else "folder"
                return None, f"{what} images/{Path(*parts[: i + 1]).as_posix()} does not exist{hint}"
            folder = folder / part
        return folder, ""


def _verify_image(path: Path, mode: str) -> str:
    """'' when the image is fine, else why not. mode: 'header' (parse + verify) | 'decode'."""
    try:
        with Image.open(path) as im:
            if mode == "decode":
                im.load()  # a full decode: catches truncated/corrupt JPEG data
            else:
                im.verify()
    except Exception as e:  # noqa: BLE001 -- PIL raises many types (OSError, SyntaxError, ...)
        return f"unreadable image ({type(e).__name__}: {e})"
    return ""


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
        reader = csv.DictReader(f)
        rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
        return [c.strip() for c in reader.fieldnames or []], rows


def _read_index_file(root: Path, split: str, n_rows: int, problems: list[Problem]) -> list[int]:
    rel = f"meta/{split}_indexes.csv"
    path = root / rel
    if not path.is_file():
        problems.append(Problem(rel, None, None, "index file missing (expected column 'indexes')"))
        return []
    header, rows = _read_csv(path)
    if "indexes" not in header:
        problems.append(Problem(rel, None, "indexes", f"no 'indexes' column; header is {header}"))
        return []
    out = []
    for line, r in enumerate(rows, start=2):
        raw = r.get("indexes", "")
        try:
            idx = int(raw)
        except ValueError:
            problems.append(Problem(f"{rel} line {line}", None, "indexes", f"not an integer: {raw!r}"))
            continue
        if not 0 <= idx < n_rows:
            problems.append(
                Problem(f"{rel} line {line}", None, "indexes",
                        f"index {idx} is outside {META} (data rows 0..{n_rows - 1}; indexes are 0-based)")
            )  # fmt: skip
            continue
        out.append(idx)
    for idx, n in Counter(out).items():
        if n > 1:
            problems.append(Problem(rel, None, "indexes", f"index {idx} listed {n} times"))
    return list(dict.fromkeys(out))


def check_derm7pt(root, verify_images: str = "decode") -> tuple[Cohort | None, list[Problem]]:
    """Validate a `release_v0` folder; returns (cohort, every problem found).

    The cohort is None only when the structure is unreadable (no meta.csv or missing
    columns); otherwise it holds the kept cases that have no problem, so counts can be
    shown next to the problems.
    `verify_images`: 'decode' (full JPEG decode), 'header' (parse + PIL verify, faster) or
    'exists' (names only).
    """
    if verify_images not in ("decode", "header", "exists"):
        raise ValueError(f"verify_images must be decode|header|exists, got {verify_images!r}")
    root = Path(root)
    problems: list[Problem] = []
    if not (root / META).is_file():
        hint = " (give the release_v0 folder itself)" if (root / "release_v0").is_dir() else ""
        return None, [Problem(META, None, None, f"not found under {root}{hint}")]
    header, rows = _read_csv(root / META)
    missing = [c for c in META_COLUMNS if c not in header]
    if missing:
        return None, [Problem(f"{META} header", None, None, f"missing column(s) {missing}; header is {header}")]

    split_of: dict[int, str] = {}
    for split in SPLITS:
        for idx in _read_index_file(root, split, len(rows), problems):
            if idx in split_of:
                problems.append(
                    Problem(f"meta/{split}_indexes.csv", None, "indexes",
                            f"index {idx} is also in the {split_of[idx]} split")
                )  # fmt: skip
            else:
                split_of[idx] = split

    finder = _ImageFinder(root / "images")
    to_verify: dict[Path, list[tuple[int, str, str, str]]] = defaultdict(list)  # path -> (row, where, case, field)
    cases: dict[int, Case] = {}  # data row -> case
    bad_rows: set[int] = set()
    seen_ids: dict[str, int] = {}
    for i, r in enumerate(rows):
        label = diagnosis_label(r["diagnosis"])
        if label is None or i not in split_of:
            continue  # dropped diagnosis, or not in any split: never used
        where = f"{META} data row {i} (line {i + 2})"
        n_before = len(problems)
        case_id = r["case_id"]
        if not case_id:
            problems.append(Problem(where, None, "case_id", "missing value"))
            case_id = f"row{i}"
        elif case_id in seen_ids:
            problems.append(Problem(where, case_id, "case_id", f"duplicate case id (also data row {seen_ids[case_id]})"))
        seen_ids.setdefault(case_id, i)

        for a in ATTRIBUTES:
            v = r[a]
            if not v:
                problems.append(Problem(where, case_id, a, "missing value"))
            elif v not in VOCAB[a]:
                problems.append(Problem(where, case_id, a, f"unknown value {v!r}; expected one of {list(VOCAB[a])}"))

        images = []
        for m in MODALITIES:
            rel = r[m]
            if not rel:
                problems.append(Problem(where, case_id, m, "missing image path"))
                images.append(root / "images")
                continue
            path, why = finder.find(rel)
            if path is None:
                problems.append(Problem(where, case_id, m, why))
                path = root / "images" / rel
            elif verify_images != "exists":
                to_verify[path].append((i, f"images/{rel}", case_id, m))
            images.append(path)

        attrs = {a: r[a] for a in ATTRIBUTES}
        cases[i] = Case(case_id, label, split_of[i], tuple(images), attrs, derm7pt_sentences(attrs))
        if len(problems) > n_before:
            bad_rows.add(i)

    if to_verify:  # PIL decoding releases the GIL: threads help
        paths = list(to_verify)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for path, why in zip(paths, pool.map(lambda p: _verify_image(p, verify_images), paths)):
                for i, where, case_id, m in to_verify[path] if why else []:
                    problems.append(Problem(where, case_id, m, why))
                    bad_rows.add(i)

    # Class coverage is a property of the split files, so judge it on every kept case.
    listed = Cohort(DATASET, root, CLASSES, MODALITIES, ATTRIBUTES, SPLITS, list(cases.values()))
    for split, per_class in listed.counts().items():
        for name, n in per_class.items():
            if n == 0:
                problems.append(Problem(f"meta/{split}_indexes.csv", None, None, f"split {split} has no {name} case"))
    valid = [c for i, c in cases.items() if i not in bad_rows]
    return Cohort(DATASET, root, CLASSES, MODALITIES, ATTRIBUTES, SPLITS, valid), problems


def read_derm7pt(root, verify_images: str = "header") -> Cohort:
    """The kept (NEV/MEL) cases of a `release_v0` folder; raises CohortError on any problem.

    Reading parses every image header; `check_derm7pt` (and `cfcml data check`) decodes them.
    """
    cohort, problems = check_derm7pt(root, verify_images=verify_images)
    if problems:
        raise CohortError(Path(root), problems)
    return cohort
