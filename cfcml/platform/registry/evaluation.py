"""A version's ``evaluation.json``: how, on which patients and on which data its own metrics were measured.

Pure: :func:`parse_evaluation` checks a parsed document; reading it from a version's
artifacts is :func:`cfcml.platform.registry.versions.load_evaluation`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PromotionError

EVALUATION_FILE = "evaluation.json"
OWN_KINDS = ("holdout", "test_split")  # measured on patients nothing in the study saw
KINDS = (*OWN_KINDS, "out_of_fold")
# where evaluation.json lies in a version's artifacts: inside the package (a study's pyfunc stores it under
# artifacts/<cfcml.platform.pyfunc.PACKAGE_ARTIFACT>; not imported here: it would load torch), or at the root
EVALUATION_PATHS = (f"artifacts/package/{EVALUATION_FILE}", EVALUATION_FILE)


@dataclass(frozen=True)
class Evaluation:
    """A version's ``evaluation.json``: how and on which patients its metrics were measured."""

    kind: str
    ids: tuple[str, ...]
    data_digest: str
    metrics: dict[str, float]

    @property
    def ids_digest(self) -> str:
        """Digest of the patient ids (computed here from the ids, never trusted from the file)."""
        from ...engine.splits import ids_digest  # sklearn: imported only when a gate compares

        return ids_digest(self.ids)


def parse_evaluation(data: object, who: str) -> Evaluation:
    """Check an ``evaluation.json`` document; errors name the field and what was expected."""
    where = f"{who}: {EVALUATION_FILE}"
    if not isinstance(data, dict):
        raise PromotionError(f"{where} is not a JSON object")
    kind = data.get("kind")
    if kind not in KINDS:
        raise PromotionError(f"{where}: 'kind' is {kind!r}; expected one of {', '.join(KINDS)}")
    ids = data.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise PromotionError(f"{where}: 'ids' must be a list of non-empty patient id strings")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PromotionError(f"{where}: 'ids' lists {dup!r} more than once")
    if kind in OWN_KINDS and not ids:
        raise PromotionError(f"{where}: 'ids' is empty; a {kind} evaluation names the patients it scored")
    digest = data.get("data_digest")
    if not isinstance(digest, str) or not digest:
        raise PromotionError(f"{where}: 'data_digest' must be a non-empty string (the cohort's digest)")
    return Evaluation(kind, tuple(ids), digest, _parse_metrics(data.get("metrics"), where))


def _parse_metrics(metrics: object, where: str) -> dict[str, float]:
    if not isinstance(metrics, dict):
        raise PromotionError(f"{where}: 'metrics' must be an object of metric name -> number")
    values = {}
    for key, value in metrics.items():
        if value is None:  # undefined (e.g. AUC with one class present): absent for the gate
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PromotionError(f"{where}: metrics[{key!r}] is {value!r}; expected a number")
        values[str(key)] = float(value)
    return values
