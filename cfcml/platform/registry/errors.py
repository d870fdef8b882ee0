"""The promotion gate's one error, and how MLflow says that something does not exist."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException


class PromotionError(RuntimeError):
    """The promotion request cannot be evaluated (unknown model/version/alias, no metric,
    a value out of range, different evaluation data, ...). Nothing was changed."""


def is_not_found(e: MlflowException) -> bool:
    """True when the tracking server answered that the thing asked for does not exist."""
    return e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")
