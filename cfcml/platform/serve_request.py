"""A scoring request -> the registered model's input frame, or every reason it is refused.

The request is MLflow's scoring-server JSON (``{"dataframe_records": [...]}`` or
``{"dataframe_split": {"columns": [...], "data": [[...]]}}``) with one record per case and the
model's own input columns (`cfcml.platform.pyfunc.input_columns`): ``case_id``, each image
series or photo, ``mask`` (volumes, optional) and each attribute. Every column but ``mask``
must be present; ``null`` or ``""`` (or a missing-value word such as ``NA``) marks an input
the patient lacks, scored as the package scores an empty cell.

An image cell is either a data URL (``data:<type>;base64,<bytes>``: NIfTI ``.nii``/``.nii.gz``
for volume cohorts, PNG or JPEG for photo cohorts; the format is read from the bytes) or a
path under the server's data root. Paths are refused when the server has no data root, and
when they resolve outside it (``..``, absolute paths, symlinks out of it). Every image is
decoded and checked with the checks `cfcml data check` runs (3D volumes on one space, photos
that decode and are not blank) before the model sees it; an attribute value must be in the
schema's vocabulary or range.

Everything wrong with a request is collected (case, field, what was expected) into one
:class:`RequestError`, so a client can fix it in one go.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from cfcml.datasets.photo_checks import DEFAULT_MIN_SIDE, check_photo
from cfcml.datasets.rows import parse_attribute
from cfcml.datasets.spec import DatasetSpec
from cfcml.datasets.table import is_missing
from cfcml.datasets.volume_checks import MASK, check_series, read_grid, short_error

from .pyfunc import input_columns

DATA_URL = re.compile(r"data:(?P<type>[\w.+/-]*)(?P<params>(?:;[\w.+-]+=[\w.+/-]+)*);base64,(?P<data>.*)", re.DOTALL)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
GZIP_MAGIC = b"\x1f\x8b"
NIFTI_HEADER_SIZES = (348, 540)  # sizeof_hdr of NIfTI-1 / NIfTI-2, first 4 bytes of the file


@dataclass(frozen=True)
class Limits:
    """What one request may carry (the server's `--max-request-mb` and `--max-cases`)."""

    max_bytes: int = 64 * 2**20  # the request body
    max_cases: int = 64
    max_voxels: int = 64 * 2**20  # per decoded volume (a small .nii.gz may claim a huge grid)
    max_pixels: int = 40_000_000  # per decoded photo


@dataclass(frozen=True)
class FieldError:
    """One thing wrong with a request: which case (id and position), which field, what was expected."""

    message: str
    case: str | None = None
    index: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = []
        if self.index is not None:
            where.append(f"case {self.case!r} (#{self.index})" if self.case else f"case #{self.index}")
        if self.field:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class RequestError(ValueError):
    """The request cannot be scored; `errors` says everything that is wrong with it."""

    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(shown + more)

    def as_json(self) -> dict:
        return {"error_code": "BAD_REQUEST", "message": str(self), "errors": [asdict(e) for e in self.errors]}


def bad(message: str, field: str | None = None) -> RequestError:
    return RequestError([FieldError(message, field=field)])


@dataclass
class DecodedCase:
    """One case as the model's input row (strings, images as files) and the inputs it lacks."""

    row: dict[str, str]
    missing: list[str]


class RequestDecoder:
    """Turns request payloads into model input rows for one cohort schema."""

    def __init__(self, spec: DatasetSpec, data_root: Path | None, limits: Limits | None = None):
        self.spec = spec
        self.root = None if data_root is None else Path(data_root).resolve(strict=True)
        self.limits = limits or Limits()
        self.columns = input_columns(spec)
        self.images = [*spec.series, *([MASK] if spec.kind.has_mask else [])]
        self.required = [c for c in self.columns if c != MASK]
        self.attributes = {a.column: a for a in spec.attributes}

    # -- the envelope

    def records(self, payload) -> list[dict]:
        """The case records of a JSON payload (MLflow's ``dataframe_records`` or ``dataframe_split``)."""
        keys = ("dataframe_records", "dataframe_split")
        if not isinstance(payload, dict) or len(payload) != 1 or next(iter(payload)) not in keys:
            got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
            raise bad(
                f"expected a JSON object with one key, 'dataframe_records' (a list of cases) or "
                f"'dataframe_split' ({{'columns': [...], 'data': [[...], ...]}}); got {got}"
            )
        if "dataframe_records" in payload:
            records = payload["dataframe_records"]
            if not isinstance(records, list):
                raise bad("expected a list of case objects", field="dataframe_records")
        else:
            records = self._split_records(payload["dataframe_split"])
        if not records:
            raise bad("expected at least one case")
        if len(records) > self.limits.max_cases:
            raise bad(f"{len(records)} cases in one request; at most {self.limits.max_cases} are accepted")
        bad_rows = [
            FieldError(f"expected an object of column: value, got {type(r).__name__}", index=i)
            for i, r in enumerate(records)
            if not isinstance(r, dict)
        ]
        if bad_rows:
            raise RequestError(bad_rows)
        return records

    @staticmethod
    def _split_records(split) -> list[dict]:
        if (
            not isinstance(split, dict)
            or not isinstance(split.get("columns"), list)
            or not isinstance(split.get("data"), list)
        ):
            raise bad("expected {'columns': [names], 'data': [[values], ...]}", field="dataframe_split")
        extra = set(split) - {"columns", "data", "index"}
        if extra:
            raise bad(f"unknown keys {sorted(extra)} (expected columns, data, index)", field="dataframe_split")
        columns, out = split["columns"], []
        for i, values in enumerate(split["data"]):
            if not isinstance(values, list) or len(values) != len(columns):
                raise RequestError(
                    [
                        FieldError(
                            f"expected a list of {len(columns)} values (one per column)",
                            index=i,
                            field="dataframe_split.data",
                        )
                    ]
                )
            out.append(dict(zip(columns, values)))
        return out

    # -- the cases

    def decode(self, payload, workdir: Path) -> list[DecodedCase]:
        """Model input rows for every case of `payload`; inline images are written under `workdir`.
        Raises RequestError with every problem found."""
        records = self.records(payload)
        errors: list[FieldError] = []
        cases: list[DecodedCase] = []
        seen: dict[str, int] = {}
        for i, record in enumerate(records):
            case, problems = self._case(i, record, workdir)
            errors += problems
            if case is not None:
                cid = case.row["case_id"]
                if cid in seen:
                    errors.append(
                        FieldError(
                            f"case_id repeats case #{seen[cid]}: expected one record per case", cid, i, "case_id"
                        )
                    )
                seen.setdefault(cid, i)
                cases.append(case)
        if errors:
            raise RequestError(errors)
        return cases

    def _case(self, i: int, record: dict, workdir: Path) -> tuple[DecodedCase | None, list[FieldError]]:
        raw_id = record.get("case_id")
        cid = str(raw_id).strip() if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else ""
        errors = []

        def err(field, message):
            errors.append(FieldError(message, cid or None, i, field))

        for key in record:
            if key not in self.columns:
                err(key, f"unknown column; expected the model's columns {self.columns}")
        for key in self.required:
            if key not in record:
                err(key, 'missing column (give null or "" for an input the patient lacks)')
        if "case_id" in record and not cid:
            err("case_id", "expected a non-empty string or integer")
        if errors:
            return None, errors
        row, missing = {"case_id": cid}, []
        for a in self.spec.attributes:
            text, why = self._attribute(a, record[a.column])
            if why:
                err(a.column, why)
            row[a.column] = text
        for name in self.images:
            path, why = self._image(record.get(name), name, i, workdir)
            if why:
                err(name, why)
            row[name] = "" if path is None else str(path)
        if not errors:
            errors += [FieldError(str(p.message), cid, i, p.field) for p in self._check_images(row, cid)]
        missing = [s for s in self.spec.series if not row[s]] + [a for a in self.spec.attribute_names if not row[a]]
        if not errors and len(missing) == len(self.spec.series) + len(self.spec.attributes):
            err(None, "every image and attribute is empty: expected at least one input")
        return (None if errors else DecodedCase(row, missing)), errors

    # -- one cell

    def _attribute(self, a, value) -> tuple[str, str | None]:
        if value is None:
            return "", None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return "", f"expected a string or a number, got {type(value).__name__}"
        if isinstance(value, float):
            if not math.isfinite(value):
                return "", "expected a finite number"
            text = str(int(value)) if value.is_integer() and a.type == "categorical" else repr(value)
        else:
            text = str(value).strip()
        if is_missing(text):
            return "", None
        _, _, why = parse_attribute(a, text)
        return text, why

    def _image(self, value, name: str, i: int, workdir: Path) -> tuple[Path | None, str | None]:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None, None
        if not isinstance(value, str):
            return (
                None,
                f"expected a data URL (data:<type>;base64,...) or a path under the data root, got {type(value).__name__}",
            )
        if value.startswith("data:"):
            return self._inline(value, name, i, workdir)
        return self._path(value.strip())

    def _inline(self, value: str, name: str, i: int, workdir: Path) -> tuple[Path | None, str | None]:
        m = DATA_URL.fullmatch(value)
        if not m:
            return None, "expected a base64 data URL: data:<type>;base64,<bytes>"
        try:
            data = base64.b64decode(re.sub(r"\s+", "", m["data"]), validate=True)
        except (binascii.Error, ValueError):
            return None, "the data URL's payload is not valid base64"
        suffix, why = self._format(data)
        if why:
            return None, why
        path = workdir / f"{i}-{name}{suffix}"
        path.write_bytes(data)
        return path, None

    def _format(self, data: bytes) -> tuple[str, str | None]:
        """The file suffix the bytes need, or why they are not this cohort's image format."""
        return _FORMATS[self.spec.image_kind](data)

    def _path(self, text: str) -> tuple[Path | None, str | None]:
        if self.root is None:
            return (
                None,
                "paths are refused: the server was started without --data-root (send the image inline as a data URL)",
            )
        if "\0" in text:
            return None, "expected a path under the data root"
        given = Path(text)
        try:
            real = (given if given.is_absolute() else self.root / given).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return None, "expected a path under the data root (it does not resolve)"
        if not real.is_relative_to(self.root):
            return None, "refused: the path leads outside the server's data root (expected a path under it)"
        if not real.is_file():
            return None, f"no file {text!r} under the data root"
        return real, None

    # -- decoded images

    def _check_images(self, row: dict[str, str], cid: str):
        """The problems of a case's images, checked as `cfcml data check` checks a cohort's."""
        present = {n: Path(row[n]) for n in self.images if row[n]}
        if not present:
            return []
        return _IMAGE_CHECKS[self.spec.image_kind](present, cid, self.limits)


def _volume_format(data: bytes) -> tuple[str, str | None]:
    if data.startswith(GZIP_MAGIC):
        return ".nii.gz", None
    if len(data) >= 4 and (
        int.from_bytes(data[:4], "little") in NIFTI_HEADER_SIZES
        or int.from_bytes(data[:4], "big") in NIFTI_HEADER_SIZES
    ):
        return ".nii", None
    return "", "expected a NIfTI volume (.nii or .nii.gz bytes)"


def _photo_format(data: bytes) -> tuple[str, str | None]:
    if data.startswith(PNG_MAGIC):
        return ".png", None
    if data.startswith(JPEG_MAGIC):
        return ".jpg", None
    return "", "expected a PNG or JPEG photo"


def _check_volumes(present: dict[str, Path], cid: str, limits: Limits) -> list:
    too_big = []
    for name, path in present.items():
        try:
            shape, _ = read_grid(path, deep=False, is_mask=name == MASK)
        except Exception:  # noqa: BLE001 - check_series below says what is wrong
            shape = None
        if shape is not None and math.prod(shape) > limits.max_voxels:
            too_big.append(
                _Problem(name, f"{'x'.join(map(str, shape))} voxels: expected at most {limits.max_voxels} per volume")
            )
    if too_big:
        return too_big
    return check_series(present, dict.fromkeys(present, "request"), cid, deep=True)


def _check_photos(present: dict[str, Path], cid: str, limits: Limits) -> list:
    problems = []
    for name, path in present.items():
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
            problems.append(_Problem(name, f"undecodable image ({short_error(e)}): expected a PNG or JPEG photo"))
            continue
        if w * h > limits.max_pixels:
            problems.append(_Problem(name, f"{w}x{h} pixels: expected at most {limits.max_pixels} pixels"))
            continue
        problems += check_photo(path, "request", cid, name, "decode", DEFAULT_MIN_SIDE)
    return problems


# per image kind: the file suffix of inline bytes (or why they are refused), and the checks of a case's images
_FORMATS = {"volume": _volume_format, "photo": _photo_format}
_IMAGE_CHECKS = {"volume": _check_volumes, "photo": _check_photos}


@dataclass(frozen=True)
class _Problem:
    field: str
    message: str
