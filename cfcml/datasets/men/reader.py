"""MEN (meningioma grading) cohort: read and check both on-disk layouts.

Layout A (ours, SPEC §1)::

    clinical.csv                 id, grade, sex, age, location, adc_value, tumor_area,
                                 edema_area[, fold]
    splits.csv                   optional: id, fold (overrides the `fold` column)
    images/<id>/T1C.nii.gz       contrast-enhanced T1
    images/<id>/FLAIR_C.nii.gz   contrast-enhanced FLAIR
    images/<id>/ADC.nii.gz       apparent diffusion coefficient map
    images/<id>/mask.nii.gz      optional ROI (tumour + peritumoural region)

Layout B (the authors' code, pre-cropped series, FLAIR-C stored as `t2`)::

    <k>fold/{train,test}/{Grade_1,Grade_2_invasion,Grade_2_noninvasion}/<id>/
        t1_bbox.nii.gz  t2_bbox.nii.gz  adc_bbox.nii.gz
    <one clinical CSV beside the fold folders>   id, sex, age, location, adc_value,
                                                 tumor_area, edema_area[, grade]

A patient's fold in layout B is the k of the `<k>fold/test` folder that holds it; its label
is the Grade folder (cross-checked with the CSV `grade` when that column exists).

Accepted grade spellings (case-insensitive, surrounding spaces ignored): `G1`, `G2inv`,
`G2ninv`, or the layout-B folder names `Grade_1`, `Grade_2_invasion`, `Grade_2_noninvasion`.
Codes: location 1/2/3 = convex surface / skull base / other location; sex 0/1 = female /
male (written as integers; `1.0` is accepted too). Numeric attributes must be finite and
non-negative. Sentences insert the CSV cell text verbatim (after trimming spaces).

`check_men` collects every problem it can find; `read_men` raises `CohortError` with all of
them. Header checks (files exist, parse, share one space) always run; `deep=True` also
decompresses every voxel array, which catches truncated or corrupt files.
"""

from __future__ import annotations

import csv
import gzip
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfcml.datasets.cohort import Case, Cohort, CohortError, Problem

CLASSES = ("G1", "G2inv", "G2ninv")
MODALITIES = ("T1C", "FLAIR_C", "ADC")
ATTRIBUTES = ("location", "sex", "age", "adc_value", "tumor_area", "edema_area")  # Table 1 order
NUMERIC_ATTRIBUTES = ("age", "adc_value", "tumor_area", "edema_area")
LOCATIONS = {1: "convex surface", 2: "skull base", 3: "other location"}
SEXES = {0: "female", 1: "male"}

# Table 1 sentence templates (SPEC §1): value inserted verbatim, no trailing period.
TEMPLATES = {
    "location": "The tumor location in the brain is {v}",
    "sex": "The sex of patient is {v}",
    "age": "The age of patient is {v}",
    "adc_value": "The value of apparent diffusion coefficient is {v}",
    "tumor_area": "The tumor area in the brain is {v}",
    "edema_area": "The edema area in the brain is {v}",
}

LAYOUT_B_GRADE_DIRS = ("Grade_1", "Grade_2_invasion", "Grade_2_noninvasion")  # = CLASSES order
LAYOUT_B_FILES = ("t1_bbox.nii.gz", "t2_bbox.nii.gz", "adc_bbox.nii.gz")  # = MODALITIES order
_GRADE_SPELLINGS = {s.lower(): i for i, s in enumerate(CLASSES)} | {
    s.lower(): i for i, s in enumerate(LAYOUT_B_GRADE_DIRS)
}

# Series of one patient must lie in one space to be resampled onto the T1C grid.
GRID_MIN_COVERAGE = 0.8  # fraction of the T1C field of view another series must cover
GRID_MAX_ANGLE_DEG = 10.0  # largest rotation between voxel axes (flips/permutations are fine)


def parse_grade(text: str) -> int | None:
    """Class index for an accepted grade spelling, None otherwise."""
    return _GRADE_SPELLINGS.get(str(text).strip().lower())


def men_sentences(raw: dict[str, str]) -> tuple[str, ...]:
    """Table 1 sentences from the raw (trimmed) CSV cells of one valid patient row."""
    shown = dict(raw)
    shown["location"] = LOCATIONS[int(float(raw["location"]))]
    shown["sex"] = SEXES[int(float(raw["sex"]))]
    return tuple(TEMPLATES[a].format(v=shown[a]) for a in ATTRIBUTES)


# ----------------------------------------------------------------------------- public API


def read_men(root, folds=None, *, deep: bool = False) -> Cohort:
    """Read a MEN cohort (layout A or B); raise `CohortError` listing every problem.

    `folds`: layout A only — a splits CSV (id,fold), relative to `root` or absolute. Default:
    `root/splits.csv` when present, else the `fold` column of clinical.csv.
    """
    cohort, problems = check_men(root, folds, deep=deep)
    if problems:
        raise CohortError(Path(root), problems)
    return cohort


def check_men(root, folds=None, *, deep: bool = True) -> tuple[Cohort | None, list[Problem]]:
    """Validate a MEN cohort; return (cohort of the valid cases or None, every problem)."""
    root = Path(root)
    if _fold_dirs(root) and not (root / "images").is_dir():
        if folds is not None:
            raise ValueError("layout B takes its folds from the <k>fold/test folders; drop `folds`")
        return _LayoutB(root).check(deep)
    if (root / "clinical.csv").is_file() or (root / "images").is_dir():
        return _LayoutA(root, folds).check(deep)
    msg = "not a MEN cohort: expected clinical.csv + images/ (layout A) or <k>fold/ folders (layout B)"
    return None, [Problem(str(root), None, None, msg)]


def men_tabular_features(cases, fit_on=None) -> np.ndarray:
    """Tabular vectors for the MLP-embedding ablation, float32 [N, 9].

    Columns: one-hot location (3), one-hot sex (2), then age, adc_value, tumor_area,
    edema_area standardised with the mean/std of `fit_on` (pass the training cases so no
    statistic leaks from validation/test; default: `cases` themselves).
    """
    fit_on = cases if fit_on is None else fit_on
    ref = np.array([[c.attributes[a] for a in NUMERIC_ATTRIBUTES] for c in fit_on], dtype=np.float64)
    ref = ref.reshape(-1, len(NUMERIC_ATTRIBUTES))
    mean, std = ref.mean(0), ref.std(0)
    std[std == 0] = 1.0
    num = np.array([[c.attributes[a] for a in NUMERIC_ATTRIBUTES] for c in cases], dtype=np.float64)
    num = num.reshape(-1, len(NUMERIC_ATTRIBUTES))
    loc = np.eye(3)[np.array([c.attributes["location"] - 1 for c in cases], dtype=int)]
    sex = np.eye(2)[np.array([c.attributes["sex"] for c in cases], dtype=int)]
    return np.concatenate([loc, sex, (num - mean) / std], axis=1).astype(np.float32)


TABULAR_FEATURE_NAMES = (
    "location=convex surface",
    "location=skull base",
    "location=other location",
    "sex=female",
    "sex=male",
    *NUMERIC_ATTRIBUTES,
)


# ----------------------------------------------------------------------------- table rows


@dataclass
class _Row:
    """One clinical-table row with a usable, unique id (its images get checked either way)."""

    case_id: str
    where: str
    ok: bool  # every cell valid
    attributes: dict
    sentences: tuple[str, ...] | None
    label: int | None  # from the table's grade column, when present and valid


def _read_csv(path: Path, rel: str, problems: list[Problem]) -> tuple[list[dict], list[str]] | None:
    """(rows with lower-cased header keys and trimmed cells, header) or None when unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            rows = [{h: (v or "").strip() for h, v in zip(header, r.values())} for r in _plain(reader)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        problems.append(Problem(rel, None, None, f"cannot read the table: {e}"))
        return None
    return rows, header


def _plain(reader):
    for r in reader:
        r.pop(None, None)  # cells beyond the header: ignore rather than crash
        yield r


def _parse_rows(rows, header, rel, problems, need_grade: bool) -> list[_Row]:
    """Check every row of a clinical table; return the rows with a usable id (first of
    duplicates), each flagged ok or not."""
    required = ["id", *ATTRIBUTES] + (["grade"] if need_grade else [])
    missing_cols = [c for c in required if c not in header]
    for c in missing_cols:
        problems.append(Problem(rel, None, c, f"missing column '{c}' (header: {', '.join(header)})"))
    if "id" in missing_cols:
        return []
    has_grade = "grade" in header
    out, seen = [], {}
    for i, r in enumerate(rows):
        where = f"{rel} line {i + 2}"  # header is line 1
        cid = r.get("id", "")
        if not cid:
            problems.append(Problem(where, None, "id", "empty patient id"))
            continue
        if not re.fullmatch(r"[A-Za-z0-9._-]+", cid):
            problems.append(Problem(where, cid, "id", "id may only hold letters, digits, '.', '_' and '-'"))
            continue
        if cid in seen:
            problems.append(Problem(where, cid, "id", f"duplicate patient id (first on {seen[cid]})"))
            continue
        seen[cid] = where
        ok = True
        attrs = {}
        for a in ATTRIBUTES:
            if a in missing_cols:
                ok = False
                continue
            value, msg = _parse_attribute(a, r.get(a, ""))
            if msg:
                problems.append(Problem(where, cid, a, msg))
                ok = False
            attrs[a] = value
        label = None
        if has_grade:
            label = parse_grade(r.get("grade", ""))
            if label is None:
                problems.append(Problem(where, cid, "grade", _bad_grade(r.get("grade", ""))))
                ok = False
        sentences = men_sentences({a: r[a] for a in ATTRIBUTES}) if ok else None
        out.append(_Row(cid, where, ok, attrs, sentences, label))
    return out


def _bad_grade(text: str) -> str:
    return f"grade '{text}' is not one of {', '.join(CLASSES)} (or {', '.join(LAYOUT_B_GRADE_DIRS)})"


def _parse_attribute(name: str, text: str):
    """(value, None) or (None, message) for one attribute cell."""
    if text == "" or text.lower() in {"nan", "na", "n/a", "none", "null"}:
        return None, "missing value"
    try:
        x = float(text)
    except ValueError:
        x = None
    codes = {"location": LOCATIONS, "sex": SEXES}.get(name)
    if codes is not None:
        if x not in codes:
            expected = ", ".join(f"{k} = {v}" for k, v in codes.items())
            return None, f"unknown {name} code '{text}' (expected {expected})"
        return int(x), None
    if x is None:
        return None, f"'{text}' is not a number"
    if not math.isfinite(x):
        return None, f"'{text}' is not a finite number"
    if x < 0:
        return None, f"'{text}' is negative"
    return x, None


# ----------------------------------------------------------------------------- images


def _check_all(root: Path, patients: list[tuple[str, dict]], deep: bool) -> list[list[Problem]]:
    """`_check_series` for many (id, series paths); threads overlap the GIL-free gzip decoding."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4 if deep else 1) as pool:
        return list(pool.map(lambda p: _check_series(root, *p, deep), patients))


def _check_series(root: Path, cid: str, paths: dict[str, Path], deep: bool) -> list[Problem]:
    """Problems of one patient's series (+ optional 'mask'): present, readable, one space."""
    problems, loaded = [], {}
    for name, path in paths.items():
        rel = _rel(path, root)
        if not path.is_file():
            problems.append(Problem(rel, cid, name, "missing image file"))
            continue
        try:
            loaded[name] = _read_grid(path, deep, is_mask=name == "mask")
        except Exception as e:  # noqa: BLE001 - nibabel/gzip/numpy raise many types for corrupt files
            problems.append(Problem(rel, cid, name, f"unreadable or corrupt NIfTI: {_short(e)}"))
    ref_name = next(iter(paths))
    if ref_name in loaded:
        ref = loaded[ref_name]
        for name, grid in loaded.items():
            msg = grid_mismatch(ref, grid)
            if name != ref_name and msg:
                problems.append(
                    Problem(
                        _rel(paths[name], root), cid, name, f"cannot be put on the {ref_name} grid: {msg}"
                    )
                )
    return problems


def _read_grid(path: Path, deep: bool, is_mask: bool = False):
    """(shape, affine) of a 3D NIfTI; raises when it is unusable. `deep` reads every voxel."""
    import nibabel as nib

    header = None
    if not deep:  # parse only the 348-byte header: ~3x faster than nib.load
        try:
            with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
                header = nib.Nifti1Header.from_fileobj(f, check=True)
        except Exception:  # noqa: BLE001 - let nib.load below report the real error
            header = None
    img = nib.load(str(path)) if header is None else None
    header = img.header if header is None else header
    shape, affine = header.get_data_shape(), header.get_best_affine()
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape[:3]) < 1:
        raise ValueError(f"expected a 3D volume, got shape {shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError("invalid affine (singular or non-finite)")
    if deep:
        data = np.asanyarray(img.dataobj)
        if not np.all(np.isfinite(data)):
            raise ValueError("voxel data hold NaN or infinite values")
        if is_mask and not np.any(data > 0):
            raise ValueError("the mask is empty (no voxel > 0)")
    return tuple(shape[:3]), affine


def grid_mismatch(ref, other) -> str | None:
    """Why `other` (shape, affine) cannot be resampled onto `ref`, or None when it can.

    Different voxel sizes, counts, flips and axis orders are fine (resampling handles them);
    a rotation beyond GRID_MAX_ANGLE_DEG or covering too little of the reference field of view
    is not.
    """
    (rshape, raff), (oshape, oaff) = ref, other
    rdir = raff[:3, :3] / np.linalg.norm(raff[:3, :3], axis=0)
    odir = oaff[:3, :3] / np.linalg.norm(oaff[:3, :3], axis=0)
    best_cos = np.abs(rdir.T @ odir).max(axis=1).min()  # worst-aligned axis after matching
    angle = math.degrees(math.acos(min(1.0, float(best_cos))))
    if angle > GRID_MAX_ANGLE_DEG:
        return f"its axes are rotated {angle:.0f} degrees from the reference (tolerance {GRID_MAX_ANGLE_DEG:.0f})"
    rlo, rhi = _world_box(rshape, raff)
    olo, ohi = _world_box(oshape, oaff)
    inter = np.clip(np.minimum(rhi, ohi) - np.maximum(rlo, olo), 0, None).prod()
    cover = float(inter / (rhi - rlo).prod())
    if cover < GRID_MIN_COVERAGE:
        return f"it covers {cover:.0%} of the reference field of view (needs {GRID_MIN_COVERAGE:.0%})"
    return None


def _world_box(shape, affine):
    """Axis-aligned world bounding box (mm) of a voxel grid, voxel edges included."""
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _short(e: Exception) -> str:
    return (f"{type(e).__name__}: {e}").splitlines()[0][:200]


def _fold_problems(assigned: list[tuple[int, int]], k: int, where: str) -> list[Problem]:
    """Every fold 1..k must hold every class (stratified CV needs it).

    `assigned` holds (fold, label) of every patient with a fold, valid or not otherwise, so
    one bad file does not also surface as an empty fold. A fold holding an unreadable grade
    (label None) is not judged: that patient may be the missing class.
    """
    out = []
    for f in range(1, k + 1):
        have = {label for fold, label in assigned if fold == f}
        if None in have:
            continue
        for i, name in enumerate(CLASSES):
            if i not in have:
                out.append(
                    Problem(
                        where, None, "fold", f"fold {f} has no {name} patient (every fold needs every class)"
                    )
                )
    return out


def _cohort(root: Path, cases: list[Case], k: int) -> Cohort:
    return Cohort(
        dataset="men",
        root=root,
        classes=CLASSES,
        modalities=MODALITIES,
        attribute_names=ATTRIBUTES,
        splits=tuple(f"fold{f}" for f in range(1, k + 1)),
        cases=cases,
    )


def _parse_fold(text: str) -> int | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return int(x) if x.is_integer() and x >= 1 else None


# ----------------------------------------------------------------------------- layout A


class _LayoutA:
    def __init__(self, root: Path, folds):
        self.root = root
        self.splits = None
        if folds is not None:
            self.splits = Path(folds) if Path(folds).is_absolute() else root / folds
        elif (root / "splits.csv").is_file():
            self.splits = root / "splits.csv"

    def check(self, deep: bool):
        root, problems = self.root, []
        if not (root / "clinical.csv").is_file():
            return None, [Problem("clinical.csv", None, None, "missing clinical table")]
        table = _read_csv(root / "clinical.csv", "clinical.csv", problems)
        if table is None:
            return None, problems
        rows, header = table
        table_rows = _parse_rows(rows, header, "clinical.csv", problems, need_grade=True)
        folds = self._folds(rows, header, problems)

        listed = {r.get("id", "") for r in rows}
        images = root / "images"
        image_dirs = sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
        for d in image_dirs:
            if d not in listed:
                problems.append(Problem(f"images/{d}", d, None, "image folder without a row in clinical.csv"))

        todo = []  # (row, fold, series paths) of patients whose images get checked
        for row in table_rows:
            folder = root / "images" / row.case_id
            if not folder.is_dir():
                problems.append(
                    Problem(
                        f"images/{row.case_id}",
                        row.case_id,
                        None,
                        f"patient on {row.where} has no image folder",
                    )
                )
                continue
            fold = folds.get(row.case_id)
            if fold is None:
                problems.append(Problem(row.where, row.case_id, "fold", self._fold_hint()))
            paths = {m: folder / f"{m}.nii.gz" for m in MODALITIES}
            mask = folder / "mask.nii.gz"
            if mask.exists():
                paths["mask"] = mask
            todo.append((row, fold, paths))
        cases = []
        found_all = _check_all(root, [(row.case_id, paths) for row, _, paths in todo], deep)
        for (row, fold, paths), found in zip(todo, found_all):
            problems += found
            if found or not row.ok or fold is None:
                continue
            cases.append(
                Case(
                    case_id=row.case_id,
                    label=row.label,
                    split=f"fold{fold}",
                    images=tuple(paths[m] for m in MODALITIES),
                    attributes=row.attributes,
                    sentences=row.sentences,
                    mask=paths.get("mask"),
                )
            )
        k = max(folds.values(), default=0)
        labels = {r.get("id", ""): parse_grade(r.get("grade", "")) for r in rows}
        assigned = [(f, labels[cid]) for cid, f in folds.items() if cid in labels]
        if k:
            problems += _fold_problems(assigned, k, self._fold_where())
        return _cohort(root, cases, k), problems

    def _fold_where(self) -> str:
        return _rel(self.splits, self.root) if self.splits else "clinical.csv"

    def _fold_hint(self) -> str:
        if self.splits:
            return f"no fold assignment in {self._fold_where()}"
        return "missing fold assignment (a 'fold' column 1..K in clinical.csv or a splits.csv with id,fold)"

    def _folds(self, rows, header, problems) -> dict[str, int]:
        """{id: fold} from the splits file or the fold column; bad cells become problems."""
        if self.splits is None:
            if "fold" not in header:
                return {}
            source = [(f"clinical.csv line {i + 2}", r) for i, r in enumerate(rows)]
        else:
            rel = self._fold_where()
            if not self.splits.is_file():
                problems.append(Problem(rel, None, "fold", "splits file not found"))
                return {}
            table = _read_csv(self.splits, rel, problems)
            if table is None:
                return {}
            srows, sheader = table
            for c in ("id", "fold"):
                if c not in sheader:
                    problems.append(Problem(rel, None, c, f"missing column '{c}'"))
                    return {}
            source = [(f"{rel} line {i + 2}", r) for i, r in enumerate(srows)]
        out = {}
        for where, r in source:
            cid, text = r.get("id", ""), r.get("fold", "")
            if not cid or text == "":
                continue  # reported per patient as a missing fold assignment
            fold = _parse_fold(text)
            if fold is None:
                problems.append(Problem(where, cid, "fold", f"fold '{text}' is not an integer >= 1"))
            elif cid in out and out[cid] != fold and self.splits is not None:
                problems.append(Problem(where, cid, "fold", f"patient listed in folds {out[cid]} and {fold}"))
            else:
                out.setdefault(cid, fold)
        return out


# ----------------------------------------------------------------------------- layout B


def _fold_dirs(root: Path) -> dict[int, Path]:
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        m = re.fullmatch(r"(\d+)fold", p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return found


class _LayoutB:
    def __init__(self, root: Path):
        self.root = root

    def _table(self, problems):
        csvs = sorted(self.root.glob("*.csv"))
        if (self.root / "clinical.csv").is_file():
            csvs = [self.root / "clinical.csv"]
        if len(csvs) != 1:
            what = (
                "no clinical CSV"
                if not csvs
                else f"several CSVs ({', '.join(p.name for p in csvs)}); name the clinical one clinical.csv"
            )
            problems.append(
                Problem(
                    str(self.root),
                    None,
                    None,
                    f"layout B needs one clinical CSV beside the fold folders: found {what}",
                )
            )
            return None
        return csvs[0]

    def check(self, deep: bool):
        root, problems = self.root, []
        fold_dirs = _fold_dirs(root)
        k = max(fold_dirs)
        for f in range(1, k + 1):
            if f not in fold_dirs:
                problems.append(
                    Problem(
                        f"{f}fold",
                        None,
                        "fold",
                        f"fold folder {f}fold is missing (found {sorted(fold_dirs)})",
                    )
                )

        # Where each patient sits: {id: [(fold, part, grade index, folder)]}
        seen: dict[str, list] = {}
        for f, fdir in sorted(fold_dirs.items()):
            for part in ("train", "test"):
                for g, gname in enumerate(LAYOUT_B_GRADE_DIRS):
                    gdir = fdir / part / gname
                    if gdir.is_dir():
                        for p in sorted(gdir.iterdir()):
                            if p.is_dir():
                                seen.setdefault(p.name, []).append((f, part, g, p))
                others = [p.name for p in (fdir / part).iterdir()] if (fdir / part).is_dir() else []
                for name in sorted(set(others) - set(LAYOUT_B_GRADE_DIRS)):
                    problems.append(Problem(f"{fdir.name}/{part}/{name}", None, "grade", _bad_grade(name)))

        table_path = self._table(problems)
        rows = []
        if table_path is not None:
            table = _read_csv(table_path, table_path.name, problems)
            if table is not None:
                rows = _parse_rows(*table, table_path.name, problems, need_grade=False)
                listed = {r.get("id", "") for r in table[0]}
                for cid in sorted(set(seen) - listed):
                    problems.append(
                        Problem(
                            _rel(seen[cid][0][3], root),
                            cid,
                            None,
                            f"image folder without a row in {table_path.name}",
                        )
                    )

        todo = []  # (row, fold, label, series paths, row ok) of patients whose images get checked
        for row in rows:
            cid, spots = row.case_id, seen.get(row.case_id, [])
            if not spots:
                problems.append(
                    Problem(row.where, cid, None, "patient has no image folder under any <k>fold/")
                )
                continue
            tests = [s for s in spots if s[1] == "test"]
            grades = {s[2] for s in spots}
            bad = False
            if len(grades) > 1:
                names = ", ".join(LAYOUT_B_GRADE_DIRS[g] for g in sorted(grades))
                problems.append(
                    Problem(
                        _rel(spots[0][3], root),
                        cid,
                        "grade",
                        f"patient sits in different Grade folders: {names}",
                    )
                )
                bad = True
            if len(tests) != 1:
                msg = (
                    "missing fold assignment: not in any <k>fold/test folder"
                    if not tests
                    else f"in the test folders of several folds ({', '.join(str(s[0]) for s in tests)})"
                )
                problems.append(Problem(_rel(spots[0][3], root), cid, "fold", msg))
                continue
            fold, _, label, folder = tests[0]
            if any(s[0] == fold and s[1] == "train" for s in spots):
                problems.append(
                    Problem(
                        _rel(folder, root),
                        cid,
                        "fold",
                        f"patient is in both {fold}fold/train and {fold}fold/test",
                    )
                )
                bad = True
            if row.label is not None and row.label != label:
                problems.append(
                    Problem(
                        row.where,
                        cid,
                        "grade",
                        f"table grade {CLASSES[row.label]} disagrees with folder {LAYOUT_B_GRADE_DIRS[label]}",
                    )
                )
                bad = True
            paths = {m: folder / fname for m, fname in zip(MODALITIES, LAYOUT_B_FILES)}
            todo.append((row, fold, label, paths, row.ok and not bad))
        cases = []
        found_all = _check_all(root, [(t[0].case_id, t[3]) for t in todo], deep)
        for (row, fold, label, paths, ok), found in zip(todo, found_all):
            problems += found
            if ok and not found:
                cases.append(
                    Case(
                        case_id=row.case_id,
                        label=label,
                        split=f"fold{fold}",
                        images=tuple(paths[m] for m in MODALITIES),
                        attributes=row.attributes,
                        sentences=row.sentences,
                        mask=None,
                    )
                )
        assigned = [(s[0], s[2]) for spots in seen.values() for s in spots if s[1] == "test"]
        problems += _fold_problems(assigned, k, "<k>fold/test")
        return _cohort(root, cases, k), problems
