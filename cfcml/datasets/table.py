"""Reading a cohort's CSV tables the way real releases are written.

Only the columns a reader asks for matter: others may be empty, odd or missing. Cells are
trimmed; a byte-order mark is tolerated; header names are matched exactly first, then
ignoring case and surrounding spaces. Problems (unreadable file, wrong encoding, no data
rows, a missing column) come back as `Problem`s naming the file, never as exceptions.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from cfcml.datasets.cohort import Problem

MISSING = frozenset({"", "nan", "na", "n/a", "none", "null"})


def is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING


@dataclass
class Table:
    rel: str  # the file as named in messages (relative to the cohort root)
    header: list[str]
    rows: list[dict[str, str]]  # header name -> trimmed cell
    lines: list[int]  # file line of each row (1 = the header)

    def column(self, wanted: str) -> str | None:
        """The header name that `wanted` refers to (exact, else case-insensitive), or None."""
        if wanted in self.header:
            return wanted
        folded = [h for h in self.header if h.strip().lower() == wanted.strip().lower()]
        return folded[0] if len(folded) == 1 else None

    def where(self, i: int) -> str:
        """Data row i (0-based) as a location: the data-row number and the file line."""
        return f"{self.rel} data row {i} (line {self.lines[i]})"


def read_table(path: Path, rel: str, problems: list[Problem], require_rows: bool = True) -> Table | None:
    """The CSV at `path`, or None (with a problem) when it cannot be used at all."""
    if not path.is_file():
        problems.append(Problem(rel, None, None, "file not found" if not path.exists() else "not a file"))
        return None
    try:
        raw = path.read_bytes()
    except OSError as e:
        problems.append(Problem(rel, None, None, f"cannot read the file: {e.strerror or e}"))
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        problems.append(
            Problem(
                f"{rel} line {line}",
                None,
                None,
                f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save the table as UTF-8",
            )
        )
        return None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        records = [(reader.line_num, cells) for cells in reader]
    except csv.Error as e:
        problems.append(Problem(f"{rel} line {reader.line_num}", None, None, f"not a valid CSV file: {e}"))
        return None
    if not records or not any(cell.strip() for cell in records[0][1]):
        problems.append(Problem(rel, None, None, "empty file: expected a header row and one row per case"))
        return None
    header = [h.strip() for h in records[0][1]]
    rows, lines = [], []
    for line, cells in records[1:]:
        if not any(c.strip() for c in cells):
            continue  # blank line
        rows.append({h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header) if h})
        lines.append(line)
    if require_rows and not rows:
        problems.append(Problem(rel, None, None, "the table has a header but no data rows"))
    return Table(rel, header, rows, lines)


def require_columns(table: Table, wanted: list[str], problems: list[Problem]) -> dict[str, str] | None:
    """{wanted name: header name} for every wanted column, or None (one problem per missing)."""
    found, missing = {}, []
    for name in wanted:
        col = table.column(name)
        if col is None:
            missing.append(name)
        else:
            found[name] = col
    for name in missing:
        problems.append(
            Problem(
                f"{table.rel} header",
                None,
                name,
                f"missing column '{name}' (header: {', '.join(h for h in table.header if h)})",
            )
        )
    return None if missing else found
