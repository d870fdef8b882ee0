"""The reader-independent view of a cohort: cases, splits, classes and problems.

Every reader (MEN, Derm7pt, either on-disk layout) returns a `Cohort`; everything after
the reader (datasets, samplers, the engine, `cfcml data check`) only sees this.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One patient (MEN) or lesion (Derm7pt).

    `images` are in the cohort's modality order; `attributes` hold the raw tabular values
    keyed by the cohort's attribute names; `sentences` are the Table 1 sentences, one per
    attribute, in attribute order.
    """

    case_id: str
    label: int
    split: str
    images: tuple[Path, ...]
    attributes: dict
    sentences: tuple[str, ...]
    mask: Path | None = None


@dataclass
class Cohort:
    dataset: str  # "men" | "derm7pt"
    root: Path
    classes: tuple[str, ...]
    modalities: tuple[str, ...]
    attribute_names: tuple[str, ...]
    splits: tuple[str, ...]
    cases: list[Case] = field(default_factory=list)

    def split(self, *names: str) -> list[Case]:
        """The cases of the given split(s), in cohort order."""
        unknown = set(names) - set(self.splits)
        if unknown:
            raise KeyError(f"unknown split(s) {sorted(unknown)}; this cohort has {list(self.splits)}")
        return [c for c in self.cases if c.split in names]

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
