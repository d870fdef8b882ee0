"""A cohort is data, not code: `DatasetSpec` is one cohort's schema file, parsed and checked.

A schema file (YAML; paths relative to the cohort root)::

    name: glioma-demo
    classes: [LGG, HGG]              # label values as written in the table; order = class index
    positive: HGG                    # binary cohorts: positive class for SEN/SPE/AUPRC
    images:
      kind: volume                   # volume: 3D NIfTI series | photo: 2D RGB images
      series: [T1, T1C, T2, FLAIR]
      path: "images/{id}/{series}.nii.gz"
      mask: "images/{id}/mask.nii.gz"    # optional ROI (volume only)
    table:
      file: clinical.csv
      id: id
      label: grade
      attributes:
        - {column: age, type: numeric, sentence: "The age of patient is {value}"}
        - {column: sex, type: categorical, values: {0: female, 1: male}, sentence: "The sex of patient is {value}"}
    split:
      folds: fold                    # a column with fold numbers 1..K: K-fold CV
      # or: files: {train: splits/train.txt, valid: splits/valid.txt, test: splits/test.txt}

Optional keys beyond that contract, for releases laid out differently (the built-in Derm7pt
schema uses them):

- `images.path` may map each series to its own template. Placeholders: `{id}`, `{series}`
  and any table column, e.g. `{clinic: "images/{clinic}", derm: "images/{derm}"}` when the
  table holds each photo's path.
- `table.labels`: more spellings of each class (`{raw value: class}`); a key may end in `*`
  (prefix match). Label matching ignores case and surrounding spaces.
- `table.other_labels: error | drop` (default error): `drop` skips rows whose label is none
  of the classes, e.g. Derm7pt's other diagnoses; `data check` says how many and which.
- numeric attributes: `min`, `max` (values outside are errors naming row and column).
- `split.folds_file`: a CSV `id,fold` that, when present, overrides the fold column.
- `split.by: id | row`, `split.column`: split files list ids (default; plain lines, or a
  CSV with the id column) or 0-based data-row positions in the named CSV column.
- `paper`: reference numbers shown next to ours (`metrics`, `params_m`, `gflops`,
  `ablation_auc`); `description`: one line for humans.

Unknown keys are errors, so a typo never silently changes what is read. Nothing in a schema
is executed: a schema names columns and files, never code.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .image_kinds import IMAGE_KINDS, KINDS, ImageKind
from .shape import CohortShape

ATTRIBUTE_TYPES = ("numeric", "categorical")
SPLIT_FILE_NAMES = ("train", "valid", "test")
BUILTIN_DIR = "cfcml.datasets"


class SpecError(ValueError):
    """The schema file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Attribute:
    column: str
    type: str  # numeric | categorical
    sentence: str  # template with one {value}
    values: dict[str, str] | None = None  # categorical: raw code -> word
    vocabulary: tuple[str, ...] | None = None  # categorical: allowed words (written as is)
    min: float | None = None
    max: float | None = None

    @property
    def words(self) -> tuple[str, ...]:
        """The categorical words in order (one-hot order of the MLP embedding)."""
        if self.values is not None:
            return tuple(dict.fromkeys(self.values.values()))
        return self.vocabulary or ()

    def sentence_for(self, shown: str) -> str:
        return self.sentence.format(value=shown)


@dataclass(frozen=True)
class SplitRule:
    kind: str  # "folds" (K-fold CV) | "files" (a fixed train/valid/test split x seeds)
    folds_column: str | None = None
    folds_file: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    by: str = "id"  # files list ids | 0-based data-row positions
    column: str | None = None  # CSV column of the split files (None: one entry per line)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    positive: str | None
    image_kind: str  # the kind's name, as in schemas, configs and MLflow tags; `kind` is the object
    series: tuple[str, ...]
    image_paths: dict[str, str]  # series -> path template
    mask_path: str | None
    table_file: str
    id_column: str
    label_column: str
    attributes: tuple[Attribute, ...]
    split: SplitRule
    label_aliases: dict[str, str] = field(default_factory=dict)  # lower-cased raw -> class
    other_labels: str = "error"
    paper: dict = field(default_factory=dict)
    description: str = ""
    source: str = ""  # where the schema came from (a path, or builtin:<name>)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the YAML as read

    # -- derived views
    @property
    def kind(self) -> ImageKind:
        """What the cohort's image kind implies (dimensions, channels, ROI mask, ...)."""
        return KINDS[self.image_kind]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def positive_index(self) -> int | None:
        return None if self.positive is None else self.classes.index(self.positive)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.column for a in self.attributes)

    @property
    def run_unit(self) -> str:
        return "folds" if self.split.kind == "folds" else "seeds"

    def shape(self) -> CohortShape:
        return CohortShape(self.num_classes, len(self.series), len(self.attributes), self.image_kind)

    def template_columns(self) -> list[str]:
        """Table columns the image path templates read (besides id and series)."""
        cols = []
        for template in [*self.image_paths.values(), self.mask_path or ""]:
            for _, name, _, _ in string.Formatter().parse(template):
                if name and name not in ("id", "series") and name not in cols:
                    cols.append(name)
        return cols

    def class_of(self, raw: str) -> int | None:
        """Class index of a raw label cell, None when it names no class."""
        text = raw.strip().lower()
        for name, i in ((c.lower(), i) for i, c in enumerate(self.classes)):
            if text == name:
                return i
        for key, cls in self.label_aliases.items():
            if text == key or (key.endswith("*") and text.startswith(key[:-1])):
                return self.classes.index(cls)
        return None

    def to_dict(self) -> dict:
        """The schema as read (round-trips through `spec_from_dict`)."""
        return dict(self.raw)


# ----------------------------------------------------------------------------- parsing


def builtin_names() -> list[str]:
    base = resources.files(BUILTIN_DIR)
    return sorted(p.name for p in base.iterdir() if p.is_dir() and (p / "cohort.yaml").is_file())


def builtin_schema_path(name: str) -> Path:
    return Path(str(resources.files(BUILTIN_DIR) / name / "cohort.yaml"))


_SHIPPED: dict[str, DatasetSpec] = {}  # schemas received from another machine (Ray workers), by path


def remember(spec_dict: dict) -> DatasetSpec:
    """Rebuild a spec shipped as `{"source", "raw"}` (see `shipped`) and make `load_spec` of
    its path find it on a machine where that file does not exist."""
    spec = spec_from_dict(spec_dict["raw"], spec_dict["source"])
    _SHIPPED[spec.source] = spec
    return spec


def shipped(spec: DatasetSpec) -> dict:
    return {"source": spec.source, "raw": spec.to_dict()}


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """A built-in cohort by name (`men`, `derm7pt`) or a schema file by path."""
    text = str(name_or_path)
    if text in builtin_names():
        path, source = builtin_schema_path(text), f"builtin:{text}"
    else:
        path = Path(text).expanduser()
        source = str(path)
        if not path.is_file():
            if source in _SHIPPED:
                return _SHIPPED[source]
            known = ", ".join(builtin_names())
            raise SpecError(f"dataset {text!r} is neither a built-in cohort ({known}) nor an existing schema file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{source}: cannot read the schema: {e}") from None
    return spec_from_dict(raw, source)


_TOP = {"name", "classes", "positive", "images", "table", "split", "paper", "description"}
_IMAGES = {"kind", "series", "path", "mask"}
_TABLE = {"file", "id", "label", "attributes", "labels", "other_labels"}
_ATTR = {"column", "type", "sentence", "values", "vocabulary", "min", "max"}
_SPLIT = {"folds", "folds_file", "files", "by", "column"}


class _Reader:
    """Typed access to one YAML mapping with errors naming the file and the dotted key."""

    def __init__(self, data: Any, source: str, prefix: str, allowed: set[str]):
        self.source, self.prefix = source, prefix
        if not isinstance(data, dict):
            self.fail("", f"expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - allowed)
        if unknown:
            self.fail(unknown[0], f"unknown key (allowed here: {', '.join(sorted(allowed))})")
        self.data = {str(k): v for k, v in data.items()}

    def fail(self, key: str, message: str):
        where = f"{self.prefix}{key}".rstrip(".") or "the top level"
        raise SpecError(f"{self.source}: {where}: {message}")

    def get(self, key: str, kind: type | tuple, default: Any = ..., allow_empty: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                self.fail(key, "missing")
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(key, f"expected {names}, got {value!r}")
        if not allow_empty and isinstance(value, (str, list, dict)) and not value:
            self.fail(key, "must not be empty")
        return value

    def text(self, key: str, default: Any = ...) -> str:
        value = self.get(key, (str, int, float), default)
        return value if value is None else str(value).strip()

    def names(self, key: str) -> tuple[str, ...]:
        items = self.get(key, list)
        out = tuple(str(x).strip() for x in items)
        if any(not x for x in out):
            self.fail(key, "holds an empty name")
        dup = sorted({x for x in out if out.count(x) > 1})
        if dup:
            self.fail(key, f"duplicate name(s) {dup}")
        return out

    def sub(self, key: str, allowed: set[str]) -> _Reader:
        return _Reader(self.get(key, dict), self.source, f"{self.prefix}{key}.", allowed)


def _code(key: Any) -> str:
    """A categorical code as text: 1, 1.0 and '1' are the same code."""
    text = str(key).strip()
    try:
        x = float(text)
    except ValueError:
        return text
    return str(int(x)) if x.is_integer() else text


def _attribute(item: Any, i: int, r: _Reader) -> Attribute:
    a = _Reader(item, r.source, f"{r.prefix}attributes[{i}].", _ATTR)
    column, kind, sentence = a.text("column"), a.text("type"), a.get("sentence", str)
    if kind not in ATTRIBUTE_TYPES:
        a.fail("type", f"{kind!r} is not one of {', '.join(ATTRIBUTE_TYPES)}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(sentence) if name is not None]
    except ValueError as e:
        a.fail("sentence", f"bad template: {e}")
    if fields != ["value"]:
        a.fail("sentence", f"must hold {{value}} exactly once, got {sentence!r}")
    values = vocabulary = None
    if kind == "categorical":
        if ("values" in a.data) == ("vocabulary" in a.data):
            a.fail("", "a categorical attribute needs exactly one of `values` (code -> word) or `vocabulary`")
        if "values" in a.data:
            raw = a.get("values", dict)
            values = {_code(k): str(v).strip() for k, v in raw.items()}
            if len(values) != len(raw):
                a.fail("values", "two codes are the same number")
            if any(not v for v in values.values()):
                a.fail("values", "holds an empty word")
        else:
            vocabulary = a.names("vocabulary")
    else:
        for key in ("values", "vocabulary"):
            if key in a.data:
                a.fail(key, "only categorical attributes have one")
    bounds = {k: a.get(k, (int, float), None) for k in ("min", "max")}
    if kind == "categorical" and any(v is not None for v in bounds.values()):
        a.fail("min", "only numeric attributes have bounds")
    if None not in bounds.values() and bounds["min"] > bounds["max"]:
        a.fail("min", f"min {bounds['min']} is above max {bounds['max']}")
    return Attribute(
        column=column,
        type=kind,
        sentence=sentence,
        values=values,
        vocabulary=vocabulary,
        min=bounds["min"],
        max=bounds["max"],
    )


def _path_template(template: str, where: _Reader, key: str, series: tuple[str, ...] = ()) -> str:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        where.fail(key, f"bad template {template!r}: {e}")
    if any(not f or not re.fullmatch(r"[A-Za-z_][\w. -]*", f) for f in fields):
        where.fail(key, f"placeholders must name id, series or a table column: {template!r}")
    p = Path(template)
    if p.is_absolute() or ".." in p.parts:
        where.fail(key, f"must be a path inside the cohort folder, got {template!r}")
    return template


def spec_from_dict(raw: Any, source: str = "<schema>") -> DatasetSpec:
    """Check a parsed schema and build the spec; raises SpecError naming the key."""
    top = _Reader(raw, source, "", _TOP)
    name, classes, positive = _read_identity(top)
    kind, series, paths, mask = _read_images(top.sub("images", _IMAGES))
    tab = top.sub("table", _TABLE)
    table_file, id_col, label_col = tab.text("file"), tab.text("id"), tab.text("label")
    _path_template(table_file, tab, "file")
    attributes = _read_attributes(tab)
    aliases, other = _read_labels(tab, classes)
    split = _read_split(top.sub("split", _SPLIT))
    paper = top.get("paper", dict, {}) or {}
    spec = DatasetSpec(
        name=name,
        classes=classes,
        positive=positive if len(classes) == 2 else None,
        image_kind=kind,
        series=series,
        image_paths=paths,
        mask_path=mask,
        table_file=table_file,
        id_column=id_col,
        label_column=label_col,
        attributes=attributes,
        split=split,
        label_aliases=aliases,
        other_labels=other,
        paper=paper,
        description=top.text("description", "") or "",
        source=source,
        raw=raw,
    )
    _check_column_roles(top, spec)
    return spec


def _read_identity(top: _Reader) -> tuple[str, tuple[str, ...], str | None]:
    """(name, classes, positive); with two classes and no `positive`, the second class."""
    name = top.text("name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        top.fail("name", f"{name!r}: use letters, digits, '.', '_' and '-' (it names MLflow experiments and models)")
    classes = top.names("classes")
    if len(classes) < 2:
        top.fail("classes", "needs at least two classes")
    if len({c.lower() for c in classes}) != len(classes):
        top.fail("classes", "two classes differ only in case")
    positive = top.text("positive", None)
    if positive is not None and positive not in classes:
        top.fail("positive", f"{positive!r} is not one of the classes {list(classes)}")
    if positive is None and len(classes) == 2:
        positive = classes[1]
    return name, classes, positive


def _read_images(img: _Reader) -> tuple[str, tuple[str, ...], dict[str, str], str | None]:
    """(kind, series, one path template per series, ROI mask template or None)."""
    kind = img.text("kind")
    if kind not in IMAGE_KINDS:
        img.fail("kind", f"{kind!r} is not one of {', '.join(IMAGE_KINDS)}")
    series = img.names("series")
    if "mask" in series:
        img.fail("series", "'mask' names the ROI (images.mask), not a series")
    path = img.get("path", (str, dict))
    if isinstance(path, str):
        paths = {s: _path_template(path, img, "path", series) for s in series}
        if len(series) > 1 and "{series}" not in path:
            img.fail("path", "with several series the template needs {series} (or give one template per series)")
    else:
        missing = [s for s in series if s not in path]
        extra = [str(k) for k in path if str(k) not in series]
        if missing or extra:
            img.fail("path", f"one template per series: missing {missing}, not a series {extra}")
        paths = {s: _path_template(str(path[s]), img, f"path.{s}") for s in series}
    mask = img.text("mask", None)
    if mask is not None:
        if not KINDS[kind].has_mask:
            with_masks = " and ".join(k.name for k in KINDS.values() if k.has_mask)
            img.fail("mask", f"only {with_masks} cohorts have ROI masks")
        _path_template(mask, img, "mask")
    return kind, series, paths, mask


def _read_attributes(tab: _Reader) -> tuple[Attribute, ...]:
    attributes = tuple(_attribute(item, i, tab) for i, item in enumerate(tab.get("attributes", list)))
    cols = [a.column for a in attributes]
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        tab.fail("attributes", f"column(s) {dup} listed twice")
    return attributes


def _read_labels(tab: _Reader, classes: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """(label aliases: lower-cased raw label -> class, what to do with other labels)."""
    aliases = {}
    for raw_label, cls in (tab.get("labels", dict, {}) or {}).items():
        cls = str(cls).strip()
        if cls not in classes:
            tab.fail(f"labels.{raw_label}", f"{cls!r} is not one of the classes {list(classes)}")
        aliases[str(raw_label).strip().lower()] = cls
    other = tab.text("other_labels", "error")
    if other not in ("error", "drop"):
        tab.fail("other_labels", f"{other!r} is not one of error, drop")
    return aliases, other


def _read_split(sp: _Reader) -> SplitRule:
    if ("folds" in sp.data) == ("files" in sp.data):
        sp.fail("", "give exactly one of `folds` (a fold column) or `files` (train/valid/test lists)")
    if "folds" in sp.data:
        for key in ("by", "column", "files"):
            if key in sp.data:
                sp.fail(key, "only split files have one")
        folds_file = sp.text("folds_file", None)
        if folds_file is not None:
            _path_template(folds_file, sp, "folds_file")
        return SplitRule("folds", folds_column=sp.text("folds"), folds_file=folds_file)
    if "folds_file" in sp.data:
        sp.fail("folds_file", "only fold splits have one")
    files = {str(k): str(v) for k, v in sp.get("files", dict).items()}
    if sorted(files) != sorted(SPLIT_FILE_NAMES):
        sp.fail("files", f"needs exactly {', '.join(SPLIT_FILE_NAMES)}, got {sorted(files)}")
    for k, v in files.items():
        _path_template(v, sp, f"files.{k}")
    by = sp.text("by", "id")
    if by not in ("id", "row"):
        sp.fail("by", f"{by!r} is not one of id, row")
    split = SplitRule("files", files=files, by=by, column=sp.text("column", None))
    if by == "row" and split.column is None:
        sp.fail("column", "row positions are read from a CSV column: name it")
    return split


def _check_column_roles(top: _Reader, spec: DatasetSpec) -> None:
    """The id, label and fold columns are distinct and none of them is an attribute."""
    split, cols = spec.split, [a.column for a in spec.attributes]
    roles = {"id": spec.id_column, "label": spec.label_column}
    roles |= {"fold": split.folds_column} if split.kind == "folds" else {}
    for role, col in roles.items():
        if col in cols:
            top.fail("table", f"column {col!r} is both the {role} column and an attribute")
    if len(set(roles.values())) < len(roles):
        top.fail("table", f"the {', '.join(roles)} columns must differ: {roles}")
