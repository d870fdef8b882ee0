"""Why a run cannot start or go on: bad input, not a bug (the CLI exits 2 with the message)."""

from __future__ import annotations


class RunMismatch(ValueError):
    """A run folder holds a different run than the one asked for, or the run does not fit its cohort."""


class TrainingFailed(RuntimeError):
    """The run cannot go on (no such device, a non-finite loss, nothing selected); the last
    good checkpoint is kept."""
