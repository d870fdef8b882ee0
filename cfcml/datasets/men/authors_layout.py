"""The MEN authors' own on-disk layout, read into the same cases as the schema's layout.

    <k>fold/{train,test}/{Grade_1,Grade_2_invasion,Grade_2_noninvasion}/<id>/
        t1_bbox.nii.gz  t2_bbox.nii.gz  adc_bbox.nii.gz      (pre-cropped; FLAIR-C stored as t2)
    <one clinical CSV beside the fold folders>             id, sex, age, location, ...[, grade]

A patient's fold is the k of the `<k>fold/test` folder that holds it; its label is the Grade
folder (cross-checked with the table's grade when that column exists). Everything else
(attributes, image checks, fold coverage) goes through the common reader.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from cfcml.datasets.cohort import Problem
from cfcml.datasets.reader import LayoutRead, RowInput
from cfcml.datasets.rows import id_problem, resolve_cells
from cfcml.datasets.spec import DatasetSpec
from cfcml.datasets.table import read_table, require_columns

GRADE_DIRS = ("Grade_1", "Grade_2_invasion", "Grade_2_noninvasion")  # = the schema's class order
SERIES_FILES = {"T1C": "t1_bbox.nii.gz", "FLAIR_C": "t2_bbox.nii.gz", "ADC": "adc_bbox.nii.gz"}


def fold_dirs(root: Path) -> dict[int, Path]:
    found = {}
    for p in root.iterdir() if root.is_dir() else []:
        m = re.fullmatch(r"(\d+)fold", p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return found


def detect(root: Path) -> bool:
    """Fold folders and no images/ folder: the authors' layout."""
    return bool(fold_dirs(root)) and not (root / "images").is_dir()


def _table_path(root: Path, problems: list[Problem]) -> Path | None:
    if (root / "clinical.csv").is_file():
        return root / "clinical.csv"
    csvs = sorted(root.glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    what = (
        "no clinical CSV"
        if not csvs
        else f"several CSVs ({', '.join(p.name for p in csvs)}); name the clinical one clinical.csv"
    )
    problems.append(
        Problem(
            str(root), None, None, f"the authors' layout needs one clinical CSV beside the fold folders: found {what}"
        )
    )
    return None


def read(spec: DatasetSpec, root: Path) -> LayoutRead:
    problems: list[Problem] = []
    folds = fold_dirs(root)
    _check_fold_numbers(folds, problems)
    spots = _patient_folders(folds, problems)
    path = _table_path(root, problems)
    table = read_table(path, path.name, problems) if path is not None else None
    wanted = [spec.id_column, *spec.attribute_names]
    if table is None or require_columns(table, wanted, problems) is None:
        return LayoutRead(
            [], path.name if path else "clinical.csv", problems, folds_preset=True, fold_where="<k>fold/test"
        )
    grade_col = table.column(spec.label_column)
    listed = {_nfc(r.get(table.column(spec.id_column), "").strip()) for r in table.rows}
    listed |= {
        re.split(r"[/\\]", cid)[0] for cid in listed if id_problem(cid)
    }  # `A` of a refused id `A/1`: no 2nd error
    for cid in sorted(set(spots) - listed):
        problems.append(Problem(_rel(spots[cid][0][3], root), cid, None, f"image folder without a row in {table.rel}"))

    rows = []
    for i, r in enumerate(table.rows):
        cells = resolve_cells(r, table.column, wanted)
        cid, where = cells[spec.id_column].strip(), table.where(i)
        if not cid or id_problem(cid):
            rows.append(RowInput(where, cells, i))  # the common checks report the empty or refused id
            continue
        here = spots.get(_nfc(cid), [])  # NFC: macOS may store `MÉN0001` decomposed
        placed = _place(cid, where, here, root)
        if isinstance(placed, Problem):
            problems.append(placed)
            continue
        fold, g, folder = placed
        table_grade = r.get(grade_col, "").strip() if grade_col is not None else ""
        table_label = spec.class_of(r[grade_col]) if table_grade else None
        if table_label is not None and table_label != g:
            message = f"table grade {spec.classes[table_label]} disagrees with folder {GRADE_DIRS[g]}"
            problems.append(Problem(where, cid, spec.label_column, message))
            continue
        images = {s: folder / SERIES_FILES[s] for s in spec.series}
        rows.append(RowInput(where, cells, i, images=images, fold=fold, label_text=GRADE_DIRS[g]))
    return LayoutRead(rows, table.rel, problems, folds_preset=True, fold_where="<k>fold/test")


def _check_fold_numbers(folds: dict[int, Path], problems: list[Problem]) -> None:
    for f in range(1, max(folds) + 1):
        if f not in folds:
            problems.append(
                Problem(f"{f}fold", None, "fold", f"fold folder {f}fold is missing (found {sorted(folds)})")
            )


def _patient_folders(folds: dict[int, Path], problems: list[Problem]) -> dict[str, list]:
    """Where each patient sits: {id: [(fold, part, grade index, folder)]}; unknown grade
    folders are problems."""
    spots: dict[str, list] = {}
    for f, fdir in sorted(folds.items()):
        for part in ("train", "test"):
            for g, gname in enumerate(GRADE_DIRS):
                gdir = fdir / part / gname
                for p in sorted(gdir.iterdir()) if gdir.is_dir() else []:
                    if p.is_dir():
                        spots.setdefault(_nfc(p.name), []).append((f, part, g, p))
            others = [p.name for p in (fdir / part).iterdir()] if (fdir / part).is_dir() else []
            for name in sorted(set(others) - set(GRADE_DIRS)):
                problems.append(
                    Problem(
                        f"{fdir.name}/{part}/{name}",
                        None,
                        "grade",
                        f"grade folder '{name}' is not one of {', '.join(GRADE_DIRS)}",
                    )
                )
    return spots


def _place(cid: str, where: str, here: list, root: Path) -> tuple[int, int, Path] | Problem:
    """(test fold, grade index, folder) of a patient from the folders it sits in, or the problem."""
    if not here:
        return Problem(where, cid, None, "patient has no image folder under any <k>fold/")
    tests = [s for s in here if s[1] == "test"]
    grades = {s[2] for s in here}
    if len(grades) > 1:
        names = ", ".join(GRADE_DIRS[g] for g in sorted(grades))
        return Problem(_rel(here[0][3], root), cid, "grade", f"patient sits in different Grade folders: {names}")
    if len(tests) != 1:
        msg = (
            "missing fold assignment: not in any <k>fold/test folder"
            if not tests
            else f"in the test folders of several folds ({', '.join(str(s[0]) for s in tests)})"
        )
        return Problem(_rel(here[0][3], root), cid, "fold", msg)
    fold, _, g, folder = tests[0]
    if any(s[0] == fold and s[1] == "train" for s in here):
        return Problem(_rel(folder, root), cid, "fold", f"patient is in both {fold}fold/train and {fold}fold/test")
    return fold, g, folder


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
