"""Read and check any cohort described by a schema (`DatasetSpec`).

`check_cohort` collects every problem it can find, each naming the file, row, case and
field, and returns the cohort of the valid cases next to them (so counts can be shown);
`load_cohort` raises `CohortError` with all problems (training refuses bad data).

Only the columns the schema names are read. Built-in cohorts may also accept other on-disk
layouts of their own (the MEN authors' fold folders): their package lists them in
`LAYOUTS`, and only schemas shipped with cfcml can reach that code — a user's schema never
names code.
"""

from __future__ import annotations

import importlib
import os
import re
import string
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cfcml.datasets.cohort import Case, Cohort, CohortError, Problem
from cfcml.datasets.photo_checks import DEFAULT_MIN_SIDE, PathFinder, check_photo
from cfcml.datasets.rows import RowParser, label_problem, resolve_cells
from cfcml.datasets.spec import DatasetSpec, load_spec
from cfcml.datasets.table import read_table, require_columns
from cfcml.datasets.volume_checks import MASK, check_series


@dataclass
class RowInput:
    """One patient as a layout presents it: table cells plus what the layout already knows."""

    where: str
    cells: dict[str, str]  # keyed by the schema's column names
    index: int  # 0-based data-row position in the table
    images: dict[str, Path] | None = None  # layouts that place files themselves
    mask: Path | None = None
    fold: int | None = None
    label_text: str | None = None


@dataclass
class LayoutRead:
    """What a layout hands the common checks."""

    rows: list[RowInput]
    table_rel: str
    problems: list[Problem] = field(default_factory=list)
    folds_preset: bool = False  # folds come from the layout, not from a column or file
    fold_where: str = ""


@dataclass
class CheckOptions:
    deep: bool = True  # decode every voxel / pixel (data check) or headers only (training)
    min_photo_side: int = DEFAULT_MIN_SIDE  # photos smaller than this are problems


def check_cohort(
    spec: DatasetSpec | str, root, deep: bool = True, min_photo_side: int | None = None
) -> tuple[Cohort | None, list[Problem]]:
    """Every problem with the cohort at `root` (an empty list when it is fit to train on)."""
    spec = spec if isinstance(spec, DatasetSpec) else load_spec(spec)
    root = Path(root)
    opts = CheckOptions(deep, DEFAULT_MIN_SIDE if min_photo_side is None else min_photo_side)
    if not root.is_dir():
        return None, [Problem(str(root), None, None, "cohort folder does not exist")]
    for layout in _builtin_layouts(spec):
        if layout.detect(root):
            return _check(spec, root, layout.read(spec, root), opts)
    return _check(spec, root, _read_table_layout(spec, root), opts)


def load_cohort(spec: DatasetSpec | str, root, deep: bool = False, min_photo_side: int | None = None) -> Cohort:
    """The checked cohort; raises CohortError listing every problem."""
    cohort, problems = check_cohort(spec, root, deep=deep, min_photo_side=min_photo_side)
    if problems or cohort is None:
        raise CohortError(Path(root), problems)
    return cohort


def _builtin_layouts(spec: DatasetSpec) -> list:
    if not spec.source.startswith("builtin:"):
        return []
    module = importlib.import_module(f"cfcml.datasets.{spec.source.removeprefix('builtin:')}")
    return list(getattr(module, "LAYOUTS", []))


# ----------------------------------------------------------------------------- the table layout


def _read_table_layout(spec: DatasetSpec, root: Path) -> LayoutRead:
    problems: list[Problem] = []
    table = read_table(root / spec.table_file, spec.table_file, problems)
    if table is None:
        below = [d for d in sorted(root.iterdir()) if (d / spec.table_file).is_file()] if root.is_dir() else []
        if below and not (root / spec.table_file).exists():
            problems[-1] = Problem(
                spec.table_file, None, None, f"not found under {root}; the cohort folder seems to be {below[0]}"
            )
        return LayoutRead([], spec.table_file, problems)
    wanted = [spec.id_column, spec.label_column, *spec.attribute_names, *spec.template_columns()]
    if spec.split.kind == "folds" and not _folds_file(spec, root):
        wanted.append(spec.split.folds_column)
    if require_columns(table, wanted, problems) is None:
        return LayoutRead([], table.rel, problems)  # one problem per missing column, not one per row
    rows = []
    for i, row in enumerate(table.rows):
        cells = resolve_cells(row, table.column, wanted)
        rows.append(RowInput(table.where(i), cells, i))
    read = LayoutRead(rows, table.rel, problems)
    read.fold_where = table.rel
    return read


def _folds_file(spec: DatasetSpec, root: Path) -> Path | None:
    f = spec.split.folds_file
    return root / f if f and (root / f).is_file() else None


# ----------------------------------------------------------------------------- common checks


def _check(spec: DatasetSpec, root: Path, read: LayoutRead, opts: CheckOptions) -> tuple[Cohort | None, list[Problem]]:
    problems = list(read.problems)
    if not read.rows and problems:
        return None, problems
    parser = RowParser(spec)
    notes: list[str] = []

    kept, labels_by_index, refused = _ids_and_labels(spec, parser, read, problems, notes)
    split_of, split_names = _assign_splits(
        spec=spec,
        root=root,
        read=read,
        kept=kept,
        labels_by_index=labels_by_index,
        problems=problems,
        notes=notes,
        unsure=set(refused.values()),
    )
    _orphan_image_folders(spec, root, {cid for _, cid, _ in kept}, problems, set(refused))

    finder = PathFinder(root)
    todo = []  # (row, id, label, split, {series: (path, rel)}, mask, ok so far)
    masks = 0
    for row, cid, label in kept:
        split = split_of.get(cid)
        if split is None and spec.split.kind == "files":
            continue  # in no split file: never used
        n_before = len(problems)
        values, raw, sentences, attr_problems = parser.attributes(row.cells, row.where, cid)
        problems += attr_problems
        images, mask = _locate_images(
            spec=spec, parser=parser, row=row, cid=cid, root=root, finder=finder, problems=problems
        )
        masks += mask is not None
        ok = len(problems) == n_before and label is not None and split is not None and images is not None
        todo.append((row, cid, label, split, images, mask, values, raw, sentences, ok))

    found = _check_images(spec, root, [(t[1], t[4], t[5]) for t in todo if t[4] is not None], opts)
    cases = []
    for row, cid, label, split, images, mask, values, raw, sentences, ok in todo:
        image_problems = found.get(cid, [])
        problems += image_problems
        if ok and not image_problems:
            cases.append(
                Case(
                    case_id=cid,
                    label=label,
                    split=split,
                    images=tuple(images[s][0] for s in spec.series),
                    attributes=values,
                    sentences=sentences,
                    mask=mask,
                    raw=raw,
                )
            )
    if spec.mask_path and spec.kind.has_mask and todo:
        notes.append(f"ROI mask found for {masks} of {len(todo)} patient(s); the others are used whole")
    cohort = Cohort(spec, root, split_names, cases, notes)
    return cohort, problems


def _ids_and_labels(spec, parser, read: LayoutRead, problems: list[Problem], notes: list[str]):
    """Ids and labels first: rows of other classes (when the schema drops them) are not read
    further. -> (kept [(row, id, label or None when invalid)], {row index: label} of every row not
    dropped, valid id or not (class coverage), {refused id: label}: ids refused as folder names,
    not judged again (folders, folds))."""
    kept: list[tuple[RowInput, str, int | None]] = []
    labels_by_index: dict[int, int | None] = {}
    seen: dict[str, str] = {}
    refused: dict[str, int | None] = {}
    dropped: Counter = Counter()
    for row in read.rows:
        text = row.label_text if row.label_text is not None else row.cells.get(spec.label_column, "")
        label = spec.class_of(text)
        if label is None and spec.other_labels == "drop":
            dropped[text.strip() or "(empty)"] += 1
            continue
        labels_by_index[row.index] = label
        cid, bad = parser.case_id(row.cells, row.where)
        if bad:
            problems.append(bad)
            refused[bad.case or ""] = label
            continue
        if _nfc(cid) in seen:  # NFC: `MÉN0001` typed composed and decomposed name one folder on macOS
            problems.append(Problem(row.where, cid, spec.id_column, f"duplicate case id (first on {seen[_nfc(cid)]})"))
            continue
        seen[_nfc(cid)] = row.where
        if label is None:
            problems.append(label_problem(spec, text, row.where, cid))
        kept.append((row, cid, label))
    if dropped:
        shown = ", ".join(f"{k} {n}" for k, n in dropped.most_common(8)) + (", ..." if len(dropped) > 8 else "")
        notes.append(
            f"{read.table_rel}: {sum(dropped.values())} row(s) dropped: {spec.label_column} is none of "
            f"{', '.join(spec.classes)} ({shown})"
        )
    return kept, labels_by_index, refused


def _locate_images(spec, parser, row: RowInput, cid, root, finder, problems):
    """({series: (path, rel)}, mask path) of one row, or (None, None) when a file is missing."""
    if row.images is not None:
        located = {}
        for s in spec.series:
            p = row.images[s]
            if not p.is_file():
                problems.append(Problem(_rel(p, root), cid, s, "missing image file"))
            located[s] = (p, _rel(p, root))
        return (located if all(p.is_file() for p, _ in located.values()) else None), row.mask
    rels, mask_rel, path_problems = parser.image_paths(row.cells, cid, row.where)
    problems += path_problems
    if path_problems:
        return None, None
    located, missing = {}, False
    for s, rel in rels.items():
        path, why = finder.find(rel)
        if path is None:
            problems.append(Problem(rel, cid, s, f"missing image file: {why}"))
            missing = True
        else:
            located[s] = (path, rel)
    mask = None
    if mask_rel is not None:
        mask, _ = finder.find(mask_rel)
    return (None if missing else located), mask


def _check_images(spec, root, items, opts: CheckOptions) -> dict[str, list[Problem]]:
    """{case id: problems} of every located image (threads: decoding releases the GIL)."""

    def one(item):
        cid, images, mask = item
        return cid, _IMAGE_CHECKS[spec.image_kind](root, cid, images, mask, opts)

    workers = min(4, os.cpu_count() or 1) if opts.deep else 2
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, items))


def _check_volumes(root, cid, images, mask, opts: CheckOptions) -> list[Problem]:
    paths = {s: p for s, (p, _) in images.items()} | ({MASK: mask} if mask is not None else {})
    rels = {s: r for s, (_, r) in images.items()} | ({MASK: _rel(mask, root)} if mask is not None else {})
    return check_series(paths, rels, cid, opts.deep)


def _check_photos(root, cid, images, mask, opts: CheckOptions) -> list[Problem]:
    out, done = [], set()
    for s, (p, rel) in images.items():
        if p in done:
            continue  # one photo used for two series (Derm7pt rows with clinic == derm)
        done.add(p)
        out += check_photo(p, rel, cid, s, "decode" if opts.deep else "header", opts.min_photo_side)
    return out


_IMAGE_CHECKS = {"volume": _check_volumes, "photo": _check_photos}  # one case's located images, per kind


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _orphan_image_folders(
    spec: DatasetSpec, root: Path, ids: set[str], problems: list[Problem], refused: set[str] = frozenset()
) -> None:
    """Folders named like a case id under the image root that no table row names (compared in
    Unicode NFC: macOS may store `MÉN0001` decomposed). A folder a refused id leads to (`A` for
    the id `A/1`) is not reported again: the id's own problem says what is wrong."""
    prefixes = set()
    for template in spec.image_paths.values():
        head, sep, _ = template.partition("{id}/")
        if not sep or any(name for _, name, _, _ in string.Formatter().parse(head)):
            return
        prefixes.add(head)
    if len(prefixes) != 1:
        return
    folder = root / prefixes.pop()
    if not folder.is_dir():
        return
    named = {_nfc(i) for i in ids} | {_nfc(re.split(r"[/\\]", r.strip())[0]) for r in refused}
    for d in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        if _nfc(d) not in named:
            problems.append(
                Problem(_rel(folder / d, root), d, None, f"image folder without a row in {spec.table_file}")
            )


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# ----------------------------------------------------------------------------- splits


def _assign_splits(
    spec, root, read: LayoutRead, kept, labels_by_index, problems, notes, unsure=frozenset()
) -> tuple[dict[str, str], tuple[str, ...]]:
    if spec.split.kind == "folds":
        return _fold_splits(spec, root, read, kept, problems, unsure)
    return _file_splits(
        spec=spec, root=root, read=read, kept=kept, labels_by_index=labels_by_index, problems=problems, notes=notes
    )


def _parse_fold(text: str) -> int | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return int(x) if x.is_integer() and x >= 1 else None


def _fold_splits(
    spec, root, read: LayoutRead, kept, problems, unsure=frozenset()
) -> tuple[dict[str, str], tuple[str, ...]]:
    """`unsure`: labels of rows refused before (their fold is unknown): classes not judged."""
    folds: dict[str, int] = {}
    source = _folds_file(spec, root)
    if read.folds_preset:
        folds = {cid: row.fold for row, cid, _ in kept if row.fold is not None}
        where, hint = read.fold_where, "missing fold assignment"
    elif source is not None:
        rel = _rel(source, root)
        where, hint = rel, f"no fold assignment in {rel}"
        table = read_table(source, rel, problems)
        cols = require_columns(table, ["id", "fold"], problems) if table is not None else None
        for i, r in enumerate(table.rows if cols else []):
            cid, text = r.get(cols["id"], ""), r.get(cols["fold"], "")
            if not cid or text == "":
                continue
            fold = _parse_fold(text)
            if fold is None:
                problems.append(Problem(table.where(i), cid, "fold", f"fold '{text}' is not an integer >= 1"))
            elif cid in folds and folds[cid] != fold:
                problems.append(
                    Problem(table.where(i), cid, "fold", f"patient listed in folds {folds[cid]} and {fold}")
                )
            else:
                folds.setdefault(cid, fold)
    else:
        col = spec.split.folds_column
        where = read.fold_where or spec.table_file
        hint = f"missing fold assignment (a '{col}' column 1..K in {spec.table_file} or a {spec.split.folds_file or 'folds file'} with id,fold)"
        for row, cid, _ in kept:
            text = row.cells.get(col, "").strip()
            if text == "":
                continue
            fold = _parse_fold(text)
            if fold is None:
                problems.append(Problem(row.where, cid, col, f"fold '{text}' is not an integer >= 1"))
            else:
                folds[cid] = fold
    for row, cid, _ in kept:
        if cid not in folds:
            problems.append(Problem(row.where, cid, "fold", hint))
    k = max(folds.values(), default=0)
    if k == 1:
        problems.append(Problem(where, None, "fold", "only one fold: cross-validation needs at least 2"))
    labels = {cid: label for _, cid, label in kept}
    for f in range(1, k + 1):
        have = {labels[cid] for cid, fold in folds.items() if fold == f and cid in labels}
        if not have:
            problems.append(Problem(where, None, "fold", f"fold {f} has no patient (folds are numbered 1..{k})"))
            continue
        if None in have or None in unsure:
            continue  # an unreadable label may be the missing class: not judged
        for i, name in enumerate(spec.classes):
            if i not in have and i not in unsure:
                problems.append(
                    Problem(where, None, "fold", f"fold {f} has no {name} patient (every fold needs every class)")
                )
    return {cid: f"fold{f}" for cid, f in folds.items()}, tuple(f"fold{f}" for f in range(1, k + 1))


def _file_splits(
    spec, root, read: LayoutRead, kept, labels_by_index, problems, notes
) -> tuple[dict[str, str], tuple[str, ...]]:
    rule = spec.split
    by_index = {row.index: cid for row, cid, _ in kept}
    n_rows = max([row.index for row in read.rows], default=-1) + 1
    known_ids = {cid for _, cid, _ in kept}
    all_ids = {row.cells.get(spec.id_column, "").strip() for row in read.rows}
    split_of: dict[str, str] = {}
    listed_rows: dict[int, str] = {}
    index_of_id = {row.cells.get(spec.id_column, "").strip(): row.index for row in read.rows}
    listed_labels: dict[str, set] = {split: set() for split in rule.files}  # class coverage of each split file
    for split, rel in rule.files.items():
        entries = _read_split_file(root / rel, rel, rule, problems)
        seen = Counter()
        for where, text in entries:
            seen[text] += 1
            if seen[text] == 2:
                problems.append(Problem(rel, None, rule.column or "id", f"{text} listed more than once"))
            if seen[text] > 1:
                continue
            if rule.by == "row":
                try:
                    idx = int(text)
                except ValueError:
                    problems.append(Problem(where, None, rule.column, f"not an integer: {text!r}"))
                    continue
                if not 0 <= idx < n_rows:
                    problems.append(
                        Problem(
                            where,
                            None,
                            rule.column,
                            f"index {idx} is outside {read.table_rel} (data rows 0..{n_rows - 1}; indexes are 0-based)",
                        )
                    )
                    continue
                if idx in listed_rows:
                    problems.append(
                        Problem(rel, None, rule.column, f"index {idx} is also in the {listed_rows[idx]} split")
                    )
                    continue
                listed_rows[idx] = split
                if idx in labels_by_index:
                    listed_labels[split].add(labels_by_index[idx])
                cid = by_index.get(idx)
            else:
                cid = text if text in known_ids else None
                if cid is None and text not in all_ids:
                    problems.append(Problem(where, text, "id", f"id {text!r} is not in {read.table_rel}"))
                    continue
                if index_of_id.get(text) in labels_by_index:
                    listed_labels[split].add(labels_by_index[index_of_id[text]])
            if cid is None:
                continue  # a dropped row (other label) or an invalid one, reported elsewhere
            if cid in split_of and split_of[cid] != split:
                problems.append(Problem(rel, cid, "id", f"case is also in the {split_of[cid]} split"))
                continue
            split_of[cid] = split
    unlisted = len(known_ids - set(split_of))
    if unlisted:
        notes.append(f"{unlisted} case(s) of {read.table_rel} are in no split file: not used")
    for split, rel in rule.files.items():
        have = listed_labels[split]
        for i, name in enumerate(spec.classes):
            if i not in have and None not in have:
                problems.append(Problem(rel, None, None, f"split {split} has no {name} case"))
    return split_of, tuple(rule.files)


def _read_split_file(path: Path, rel: str, rule, problems) -> list[tuple[str, str]]:
    """[(where, entry)] of a split file: a CSV column when the rule names one, else lines."""
    if rule.column is not None:
        table = read_table(path, rel, problems, require_rows=False)
        if table is None:
            return []
        col = table.column(rule.column)
        if col is None:
            problems.append(Problem(rel, None, rule.column, f"no '{rule.column}' column; header is {table.header}"))
            return []
        return [(f"{rel} line {table.lines[i]}", r.get(col, "")) for i, r in enumerate(table.rows) if r.get(col, "")]
    if not path.is_file():
        problems.append(Problem(rel, None, None, "split file not found"))
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem(rel, None, None, f"cannot read the split file: {e}"))
        return []
    return [
        (f"{rel} line {n}", line.strip())
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
