"""What a model needs to know about its cohort: `CohortShape`, derived by the cohort's spec.

It lives with the cohorts (`cfcml.datasets.shape`, a layer below the models); models import it from here.
"""

from __future__ import annotations

from ..datasets.shape import IMAGE_KINDS, CohortShape

__all__ = ["IMAGE_KINDS", "CohortShape"]
