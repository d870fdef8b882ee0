"""One table row -> the fields of a case, following the cohort's schema.

Used for training cohorts (with labels and splits) and for prediction rows (the registered
model's input), so both read a patient the same way.
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections.abc import Callable
from pathlib import Path

from cfcml.datasets.cohort import Problem
from cfcml.datasets.spec import Attribute, DatasetSpec, _code
from cfcml.datasets.table import is_missing

ID_PUNCTUATION = "._-"  # besides letters, marks and digits of any script
MAX_NAME_BYTES = 255  # one file-name component on ext4, XFS, APFS, NTFS (UTF-8 bytes)
MAX_ABS_NUMBER = 1e12  # beyond this a "number" is a data-entry error that would swamp scaling


def parse_attribute(a: Attribute, text: str) -> tuple[object, str, str | None]:
    """(value, shown text, None) or (None, "", why it is not valid) for one attribute cell."""
    if is_missing(text):
        return None, "", "missing value"
    if a.type == "categorical":
        if a.values is not None:
            word = a.values.get(_code(text))
            if word is None:
                expected = ", ".join(f"{k} = {v}" for k, v in a.values.items())
                return None, "", f"unknown {a.column} code '{text}' (expected {expected})"
            return word, word, None
        if text in a.vocabulary:
            return text, text, None
        near = [w for w in a.vocabulary if w.lower() == text.lower()]
        hint = f" (did you mean {near[0]!r}? values are case-sensitive)" if near else ""
        return None, "", f"unknown value {text!r}; expected one of {list(a.vocabulary)}{hint}"
    try:
        x = float(text)
    except ValueError:
        return None, "", f"'{text}' is not a number"
    if not math.isfinite(x):
        return None, "", f"'{text}' is not a finite number"
    if a.min is not None and x < a.min:
        return None, "", f"{text} is below the minimum {a.min:g} the schema allows"
    if a.max is not None and x > a.max:
        return None, "", f"{text} is above the maximum {a.max:g} the schema allows"
    if abs(x) > MAX_ABS_NUMBER:
        return None, "", f"{text} is too large to be a measurement (give the schema a min/max if it is one)"
    return x, text, None


def id_problem(cid: str) -> str | None:
    """Why `cid` cannot name a folder on every mainstream file system, or None when it can.

    Letters, combining marks and digits of any script (`MÉN0001`, `病例-001`) and '.', '_',
    '-' are accepted; path separators, whitespace, control and other characters, an id of
    dots only ('.', '..') and names over 255 UTF-8 bytes are not.
    """
    for c in cid:
        if unicodedata.category(c)[0] not in "LMN" and c not in ID_PUNCTUATION:
            name = unicodedata.name(c, "")
            what = name.lower() if name else "whitespace" if c.isspace() else "a control character"
            allowed = f"letters and digits of any script, {', '.join(map(repr, ID_PUNCTUATION))}"
            return f"{c!r} (U+{ord(c):04X}, {what}) is not allowed: it may hold {allowed}"
    if set(cid) == {"."}:
        return f"{cid!r} is not a folder name"
    if len(cid.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is {len(cid.encode('utf-8'))} bytes long in UTF-8; a file name holds at most {MAX_NAME_BYTES}"
    return None


class RowParser:
    """Turns table cells (keyed by the schema's column names) into case fields."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.id_in_paths = any("{id}" in t for t in [*spec.image_paths.values(), spec.mask_path or ""])

    def case_id(self, cells: dict, where: str) -> tuple[str | None, Problem | None]:
        cid = cells.get(self.spec.id_column, "").strip()
        if not cid:
            return None, Problem(where, None, self.spec.id_column, "empty case id")
        why = id_problem(cid) if self.id_in_paths else None
        if why:
            return None, Problem(where, cid, self.spec.id_column, f"the id names a folder: {why}")
        return cid, None

    def attributes(self, cells: dict, where: str, cid: str | None) -> tuple[dict, dict, tuple | None, list[Problem]]:
        """(values, raw cells, sentences or None when any cell is bad, problems)."""
        values, raw, shown, problems = {}, {}, [], []
        for a in self.spec.attributes:
            text = cells.get(a.column, "").strip()
            raw[a.column] = text
            value, text_shown, why = parse_attribute(a, text)
            if why:
                problems.append(Problem(where, cid, a.column, why))
            values[a.column] = value
            shown.append(text_shown)
        if problems:
            return values, raw, None, problems
        sentences = tuple(a.sentence_for(s) for a, s in zip(self.spec.attributes, shown))
        return values, raw, sentences, []

    def image_paths(self, cells: dict, cid: str, where: str) -> tuple[dict[str, str], str | None, list[Problem]]:
        """({series: path relative to the root}, mask path or None, problems) from the templates."""
        out, problems = {}, []
        for series, template in self.spec.image_paths.items():
            rel, why = _fill(template, cells, cid, series)
            if why:
                problems.append(Problem(where, cid, series, why))
            else:
                out[series] = rel
        mask = None
        if self.spec.mask_path:
            mask, why = _fill(self.spec.mask_path, cells, cid, "mask")
            mask = None if why else mask
        return out, mask, problems


def _fill(template: str, cells: dict, cid: str, series: str) -> tuple[str, str | None]:
    values = {"id": cid, "series": series}
    for _, name, _, _ in string.Formatter().parse(template):
        if name and name not in values:
            text = cells.get(name, "").strip()
            if is_missing(text):
                return "", f"missing image path (column {name})"
            values[name] = text
    rel = template.format(**values)
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return "", f"image path {rel!r} leaves the cohort folder"
    return p.as_posix(), None


def label_problem(spec: DatasetSpec, text: str, where: str, cid: str | None) -> Problem:
    spellings = list(spec.classes) + [
        k for k in spec.label_aliases if k.lower() not in {c.lower() for c in spec.classes}
    ]
    return Problem(where, cid, spec.label_column, f"label '{text}' is not one of {', '.join(spellings)}")


def resolve_cells(row: dict, column_of: Callable[[str], str | None], wanted: list[str]) -> dict[str, str]:
    """A row's cells keyed by the schema's column names (header names may differ in case)."""
    out = {}
    for name in wanted:
        col = column_of(name)
        out[name] = row.get(col, "") if col is not None else ""
    return out
