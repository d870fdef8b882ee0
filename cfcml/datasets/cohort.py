"""The reader-independent view of a cohort: cases, splits, classes and problems.

The schema-driven reader (and the MEN authors' layout behind the same interface) returns a
`Cohort`; everything after it (datasets, samplers, the engine, `cfcml data check`) only
sees this and the cohort's `DatasetSpec`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cfcml.datasets.file_digests import file_digests
from cfcml.datasets.spec import DatasetSpec


@dataclass(frozen=True)
class Case:
    """One patient (or lesion).

    `images` are in the cohort's series order; `attributes` hold the tabular values keyed by
    column (float for numeric, the word for categorical); `raw` the table cells they came
    from; `sentences` one per attribute, in attribute order. `label` is -1 when unknown
    (prediction).
    """

    case_id: str
    label: int
    split: str
    images: tuple[Path, ...]
    attributes: dict
    sentences: tuple[str, ...]
    mask: Path | None = None
    raw: dict = field(default_factory=dict, compare=False)


@dataclass
class Cohort:
    spec: DatasetSpec
    root: Path
    splits: tuple[str, ...]
    cases: list[Case] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # info lines (rows dropped and why, ...)

    @property
    def dataset(self) -> str:
        return self.spec.name

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.spec.series

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return self.spec.attribute_names

    def split(self, *names: str) -> list[Case]:
        """The cases of the given split(s), in cohort order."""
        unknown = set(names) - set(self.splits)
        if unknown:
            raise KeyError(f"unknown split(s) {sorted(unknown)}; this cohort has {list(self.splits)}")
        return [c for c in self.cases if c.split in names]

    def digest(self) -> str:
        """sha256 over the schema, the cases (id, label, split, sentences) and each image's
        relative path and content digest (cached on disk by path, size and mtime: see
        `cfcml.datasets.file_digests`), so an edited file of the same size is new data."""
        h = hashlib.sha256(json.dumps(self.spec.to_dict(), sort_keys=True, default=str).encode())
        files = [Path(p) for c in self.cases for p in (*c.images, c.mask) if p is not None]
        contents = file_digests([p for p in files if p.exists()])
        for c in sorted(self.cases, key=lambda c: c.case_id):
            h.update(f"|{c.case_id}|{c.label}|{c.split}|{'/'.join(c.sentences)}".encode())
            for p in (*c.images, c.mask):
                if p is None:
                    continue
                p = Path(p)
                rel = p.relative_to(self.root) if p.is_relative_to(self.root) else p.name
                h.update(f"|{rel}:{contents.get(str(p), 'missing')}".encode())
        return h.hexdigest()

    def counts(self) -> dict[str, dict[str, int]]:
        """{"<split>": {"<class>": count}} with every class listed, zeros included."""
        out = {}
        for s in self.splits:
            n = Counter(c.label for c in self.cases if c.split == s)
            out[s] = {name: n.get(i, 0) for i, name in enumerate(self.classes)}
        return out


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cohort, precise enough to fix without reading code."""

    where: str  # file (and row) the problem is in, e.g. "meta/meta.csv row 12"
    case: str | None  # patient / case id, when known
    field: str | None  # column or series, when relevant
    message: str  # what is wrong and what was expected

    def __str__(self) -> str:
        parts = [self.where]
        if self.case:
            parts.append(f"case {self.case}")
        if self.field:
            parts.append(f"field {self.field}")
        return f"{': '.join([', '.join(parts), self.message])}"


class CohortError(ValueError):
    """Raised by readers when a cohort fails its check; carries every problem found."""

    def __init__(self, root: Path, problems: list[Problem]):
        self.root = Path(root)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cohort at {self.root} has {len(self.problems)} problem(s):\n{lines}")
